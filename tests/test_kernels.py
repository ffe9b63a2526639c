"""
kernels.cross_entropy and kernels.token_logprobs against float64 oracles built from torch.nn.functional.

tests/conftest.py sets TRITON_INTERPRET=1, so on this CPU-only machine every call below runs the real Triton
kernels through the interpreter (test_triton_path_ran proves it with the launch counter). The interpreter
costs ~10 ms per row, so large vocabularies get few rows.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _dispatch, _rows

assert _dispatch.INTERPRET, "tests/conftest.py must set TRITON_INTERPRET=1 before anything imports triton"

# dtype -> (atol, rtol) for the forward (fp32 outputs, computed from the same rounded inputs, so only fp32
# accumulation error) and for the gradient (stored in the logits' dtype: one rounding). bf16's 8e-3 is one whole bf16
# step (2**-7), not half of one: Triton 3.9's interpreter converts fp32 -> bf16 by truncating the mantissa, where
# compiled Triton rounds to nearest even (cvt.rn.bf16.f32, checked by tests/test_kernels_compile.py), so a bf16
# gradient here can be one step below what the GPU writes. tests/test_kernels_gpu.py holds the compiled kernels to
# half a step (2**-8). fp16 conversions round to nearest in both.
TOL = {
    torch.float32: dict(fwd=(2e-5, 2e-5), grad=(1e-6, 1e-4)),
    torch.bfloat16: dict(fwd=(2e-5, 2e-5), grad=(1e-5, 8e-3)),
    torch.float16: dict(fwd=(2e-5, 2e-5), grad=(1e-5, 1e-3)),
}
DTYPES = list(TOL)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    # every launcher allocates its outputs NaN-filled: an element a kernel forgets to write fails assert_close
    monkeypatch.setattr(_dispatch, "poison", True)


def close(actual, expected, dtype, which):
    atol, rtol = TOL[dtype][which]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


# -----------------------------------------------------------------------------
# float64 oracles, from torch.nn.functional (independent of kernels/*_ref)

def ce_oracle(x64, t, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    V = x64.shape[-1]
    loss = F.cross_entropy(x64.reshape(-1, V), t.reshape(-1), ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing).view(t.shape)
    valid = t != ignore_index
    if z_loss:
        loss = loss + torch.where(valid, z_loss * torch.logsumexp(x64, -1) ** 2, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def logprobs_oracle(x64, t, temperature=1.0):
    y = x64 / temperature
    logp = F.log_softmax(y, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    # H = lse - sum p y, with -inf logits (p = 0) dropped from the sum
    entropy = torch.logsumexp(y, -1) - (F.softmax(y, -1) * torch.where(y == float("-inf"), 0.0, y)).sum(-1)
    return logp, entropy


def check_ce(x, t, fn=kernels.cross_entropy, **kw):
    """Forward and gradient (random upstream gradient) of fn vs ce_oracle."""
    x = x.detach().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    loss, ref = fn(x, t, **kw), ce_oracle(x64, t, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    close(loss, ref, x.dtype, "fwd")
    g = torch.randn_like(ref)
    (dx,), (dx64,) = torch.autograd.grad(loss, x, g.float()), torch.autograd.grad(ref, x64, g)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    close(dx, dx64, x.dtype, "grad")
    return loss, dx


def check_logprobs(x, t, temperature=1.0, each_grad=False, fn=kernels.token_logprobs):
    """Both outputs and the gradient of a random mix of them (each_grad: also each output's gradient alone,
    which compiles the backward without the other term)."""
    x = x.detach().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    logp, ent = fn(x, t, temperature=temperature, return_entropy=True)
    logp_ref, ent_ref = logprobs_oracle(x64, t, temperature)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == t.shape
    close(logp, logp_ref, x.dtype, "fwd")
    close(ent, ent_ref, x.dtype, "fwd")
    g, h = torch.randn_like(logp_ref), torch.randn_like(ent_ref)
    for a, b in [(g, h), (g, None), (None, h)] if each_grad else [(g, h)]:
        out = [o * w.float() for o, w in [(logp, a), (ent, b)] if w is not None]
        ref = [o * w for o, w in [(logp_ref, a), (ent_ref, b)] if w is not None]
        dx, = torch.autograd.grad(sum(o.sum() for o in out), x, retain_graph=True)
        dx64, = torch.autograd.grad(sum(o.sum() for o in ref), x64, retain_graph=True)
        close(dx, dx64, x.dtype, "grad")
    if each_grad:  # return_entropy=False is its own kernel variant (ENTROPY=False)
        close(fn(x, t, temperature=temperature), logp_ref, x.dtype, "fwd")
    return logp, ent


def rand_targets(shape, V, ignore_frac=0.0, ignore_index=-100):
    t = torch.randint(0, V, shape)
    return torch.where(torch.rand(shape) < ignore_frac, ignore_index, t)


# (leading shape, V): the GPT-2 vocab (realistic), V = 1, odd and non-power-of-two sizes, V past 65536 (where
# kernels that hold a whole row in one block stop compiling), three leading dims. V = 262144: test_largest_vocab
SHAPES = [((2, 3), 50257), ((3,), 1), ((4,), 3), ((2, 5), 1000), ((2,), 70000), ((2, 3, 2), 7)]
# fp16 at V > 50000 is left out for interpreter time only: fp32 and bf16 cover those vocabularies, and fp16
# is covered on every smaller one
CASES = [(s, V, d) for s, V in SHAPES for d in DTYPES if not (V > 50000 and d == torch.float16)]
CASE_IDS = [f"{'x'.join(map(str, s))}xV{V}-{str(d).split('.')[-1]}" for s, V, d in CASES]


# -----------------------------------------------------------------------------
# dispatch

def test_triton_path_ran():
    x, t = torch.randn(3, 17, requires_grad=True), torch.randint(0, 17, (3,))
    before = dict(_dispatch.launches)
    kernels.cross_entropy(x, t).backward()
    logp, ent = kernels.token_logprobs(x, t, return_entropy=True)
    (logp + ent).sum().backward()
    for name in ["cross_entropy_fwd", "cross_entropy_bwd", "token_logprobs_fwd", "token_logprobs_bwd"]:
        assert _dispatch.launches[name] == before.get(name, 0) + 1, name


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    x, t = torch.randn(3, 17), torch.randint(0, 17, (3,))
    assert not _dispatch.use_triton(x)
    before = sum(_dispatch.launches.values())
    loss = kernels.cross_entropy(x, t)
    logp = kernels.token_logprobs(x, t)
    assert sum(_dispatch.launches.values()) == before
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    torch.testing.assert_close(logp, F.log_softmax(x, -1)[torch.arange(3), t])


def test_missing_triton_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    monkeypatch.setattr(_dispatch, "_warned", False)
    x, t = torch.randn(3, 17), torch.randint(0, 17, (3,))
    before = sum(_dispatch.launches.values())
    for _ in range(3):
        torch.testing.assert_close(kernels.cross_entropy(x, t), F.cross_entropy(x, t))
    assert sum(_dispatch.launches.values()) == before
    assert capsys.readouterr().out.count("WARNING") == 1


def test_float64_uses_reference():
    x, t = torch.randn(3, 17, dtype=torch.float64), torch.randint(0, 17, (3,))
    before = sum(_dispatch.launches.values())
    torch.testing.assert_close(kernels.cross_entropy(x, t), F.cross_entropy(x, t))
    assert kernels.token_logprobs(x, t).dtype == torch.float64
    assert sum(_dispatch.launches.values()) == before


def hostile_batch(dtype):
    """(2, 3, 1001) logits with half of one row -inf, and targets with ~30% ignored, that row's at a finite logit."""
    x = torch.randn(2, 3, 1001, dtype=dtype) * 3
    x[0, 1, :500] = float("-inf")
    t = rand_targets((2, 3), 1001, ignore_frac=0.3)
    t[0, 1] = 700
    return x, t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_references(dtype):
    # the references are the CPU training path: same oracle, same tolerances, including -inf logits
    x, t = hostile_batch(dtype)
    before = sum(_dispatch.launches.values())
    for reduction in ["mean", "sum", "none"]:
        check_ce(x, t, fn=kernels.cross_entropy_ref, reduction=reduction, z_loss=1e-3)
    check_ce(x[1], t[1], fn=kernels.cross_entropy_ref, label_smoothing=0.1)
    check_logprobs(x, t.clamp(min=0), temperature=0.7, each_grad=True, fn=kernels.token_logprobs_ref)
    assert sum(_dispatch.launches.values()) == before


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_path(monkeypatch, dtype):
    # what CPU training runs without the interpreter: torch's fused cross-entropy for float32 without z_loss, the
    # reference otherwise; against the float64 oracle with ignored targets, label smoothing, -inf logits, odd V
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    x, t = hostile_batch(dtype)
    before = sum(_dispatch.launches.values())
    for reduction in ["mean", "sum", "none"]:
        check_ce(x, t, reduction=reduction)
        check_ce(x, t, reduction=reduction, z_loss=1e-3)
        t1 = t[1].clamp(min=0)  # another ignore_index: the first target's value
        check_ce(x[1], t1, reduction=reduction, label_smoothing=0.1, ignore_index=t1[0].item())
    check_ce(torch.randn(5, 1, dtype=dtype), torch.zeros(5, dtype=torch.long))  # V = 1
    loss, _ = check_ce(x[:, :2], t[:, :2])  # a strided view
    torch.testing.assert_close(kernels.cross_entropy(x[:, :2], t[:, :2].int()), loss, atol=0, rtol=0)  # int32
    for reduction in ["mean", "none"]:  # every target ignored: mean 0 (not NaN), zero gradient
        check_ce(x, torch.full_like(t, -100), reduction=reduction)
    assert sum(_dispatch.launches.values()) == before
    with pytest.raises(ValueError, match=r"targets\[1\] = 7 is out of range"):
        kernels.cross_entropy(torch.randn(2, 7), torch.tensor([0, 7]))


def test_poisoned_allocation():
    assert _dispatch.empty(2, 3, dtype=torch.bfloat16, device="cpu").isnan().all()


# -----------------------------------------------------------------------------
# values and gradients

@pytest.mark.parametrize("shape,V,dtype", CASES, ids=CASE_IDS)
def test_cross_entropy_shapes(shape, V, dtype):
    check_ce(torch.randn(*shape, V, dtype=dtype) * 3, rand_targets(shape, V, ignore_frac=0.2), reduction="none")


@pytest.mark.parametrize("shape,V,dtype", CASES, ids=CASE_IDS)
def test_token_logprobs_shapes(shape, V, dtype):
    check_logprobs(torch.randn(*shape, V, dtype=dtype) * 3, torch.randint(0, V, shape))


def test_largest_vocab():
    V = 262144
    x, t = torch.randn(1, V) * 3, torch.randint(0, V, (1,))
    check_ce(x, t, reduction="none", label_smoothing=0.1, z_loss=1e-4)
    check_logprobs(x, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(label_smoothing=0.25,
                                  z_loss=1e-2, ignore_index=5)], ids=["plain", "smooth", "zloss", "all"])
def test_cross_entropy_options(opts, reduction, dtype):
    V = 333
    t = rand_targets((3, 4), V, ignore_frac=0.3, ignore_index=opts.get("ignore_index", -100))
    check_ce(torch.randn(3, 4, V, dtype=dtype) * 2, t, reduction=reduction, **opts)


def test_cross_entropy_matches_torch_mean():
    # our "mean" is torch's whenever some token is not ignored
    x, t = torch.randn(6, 500), rand_targets((6,), 500, ignore_frac=0.5)
    t[0] = 3
    for eps in [0.0, 0.2]:
        torch.testing.assert_close(kernels.cross_entropy(x, t, label_smoothing=eps),
                                   F.cross_entropy(x, t, label_smoothing=eps))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored(reduction):
    x = torch.randn(2, 3, 50, requires_grad=True)
    t = torch.full((2, 3), -100)
    loss = kernels.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    assert not loss.isnan().any() and (loss == 0).all()
    loss.sum().backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("temperature", [0.5, 1.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_temperature(temperature, dtype):
    check_logprobs(torch.randn(2, 3, 777, dtype=dtype) * 2, torch.randint(0, 777, (2, 3)), temperature,
                   each_grad=True)


def test_empty_batch():
    x, t = torch.randn(0, 10, requires_grad=True), torch.zeros(0, dtype=torch.long)
    assert kernels.cross_entropy(x, t).item() == 0
    assert kernels.cross_entropy(x, t, reduction="none").shape == (0,)
    assert kernels.token_logprobs(x, t).shape == (0,)


# -----------------------------------------------------------------------------
# numerics: huge magnitudes, -inf, NaN

@pytest.mark.parametrize("make", [lambda x: x + 1e4, lambda x: x - 1e4, lambda x: x * 1e4],
                         ids=["offset+1e4", "offset-1e4", "scale1e4"])
def test_huge_magnitude_is_exact(make):
    # values near 1e4 have an fp32 spacing of 1e-3: only differences relative to the row max keep the small
    # results (loss ~ log V, entropy ~ log V) exact, which the fp32 tolerance below demands
    V = 5000  # > BLOCK, so the running max is rescaled across chunks
    x = make(torch.randn(3, V))
    t = torch.randint(0, V, (3,))
    check_ce(x, t, reduction="none")
    check_logprobs(x, t)
    check_logprobs(x, t, temperature=0.8, each_grad=True)


def test_neg_inf_logits():
    V = 5000
    x = torch.randn(3, V) * 2
    t = torch.randint(4200, V, (3,))
    x[0, :4200] = float("-inf")  # the whole first 4096-wide chunk of row 0 is -inf
    x[1, torch.randint(0, V, (100,))] = float("-inf")
    x[1, t[1]] = 0.5
    check_ce(x, t, reduction="none")
    logp, ent = check_logprobs(x, t)
    assert logp.isfinite().all() and ent.isfinite().all()
    # a -inf target logit is an infinite loss, as in torch
    x[2, t[2]] = float("-inf")
    loss = kernels.cross_entropy(x, t, reduction="none")
    assert loss[2] == float("inf") and loss[:2].isfinite().all()


def test_nan_propagates():
    V = 5000
    x = torch.randn(3, V, requires_grad=True)
    t = torch.randint(0, V, (3,))
    with torch.no_grad():
        x[1, 4500] = float("nan")  # in the second chunk, after a finite running max exists
    loss = kernels.cross_entropy(x, t, reduction="none")
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()
    assert kernels.cross_entropy(x, t).isnan()
    loss.sum().backward()
    assert x.grad[1].isnan().all() and not x.grad[[0, 2]].isnan().any()
    logp, ent = kernels.token_logprobs(x, t, return_entropy=True)
    assert logp[1].isnan() and ent[1].isnan() and not logp[[0, 2]].isnan().any()
    x.grad = None
    (logp + ent).sum().backward()
    assert x.grad[1].isnan().all() and not x.grad[[0, 2]].isnan().any()


# -----------------------------------------------------------------------------
# memory layout

@pytest.mark.parametrize("make", [lambda b: b[..., :-5], lambda b: b[:, :-1, :-5], lambda b: b[1:, :, 2:-3]],
                         ids=["column-slice", "drop-last-position", "offset-slice"])
def test_strided_views_without_copy(make):
    # row stride != V, and logits[:, :-1] (whose (B, T-1) rows cannot share one stride): both are views
    V = 1000
    x = make(torch.randn(3, 4, V + 5))
    x3 = _rows.as_rows(x)
    assert x3.data_ptr() == x.data_ptr() and x3.stride() == x.stride()
    t = torch.randint(0, V, x.shape[:-1])
    check_ce(x, t, reduction="none", label_smoothing=0.1)
    check_logprobs(x, t)


def test_offsets_past_2_31():
    # rows at element offsets 0, 2**30 + 7 and 2**31 + 14 of one 4 GiB bf16 buffer (virtual memory: only the three
    # rows' pages are ever touched). With an int32 row index, 2 * (2**30 + 7) wraps negative and the kernel reads
    # before the buffer; that segfaults, so the check runs in a subprocess and a crash fails this test cleanly.
    code = """if True:
        import torch, torch.nn.functional as F, kernels
        V, stride = 1000, 2**30 + 7
        x = torch.empty(2 * stride + V, dtype=torch.bfloat16).as_strided((3, V), (stride, 1))
        x.copy_(torch.randn(3, V))
        t = torch.randint(0, V, (3,))
        ref = F.log_softmax(x.float(), -1)[torch.arange(3), t]
        torch.testing.assert_close(kernels.cross_entropy(x, t, reduction="none"), -ref)
        torch.testing.assert_close(kernels.token_logprobs(x, t), ref)
        x.requires_grad_()
        dx, = torch.autograd.grad(kernels.cross_entropy(x, t), x)
        torch.testing.assert_close(dx.float(), (F.softmax(x.float(), -1) - F.one_hot(t, V)) / 3, atol=1e-5, rtol=1e-2)
        assert kernels._dispatch.launches["cross_entropy_fwd"] == 2
        print("ok")
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_rows_addressed_from_16_byte_boundaries():
    # kernels/_rows.py: each kernel gets the logits' address rounded down to 16 bytes plus an element offset, and
    # addresses the reference logits and the gradient by shifts from the logits' row offsets; every shift must be
    # a multiple of 16 for the compiler to prove them in phase. Contiguous logits get a contiguous gradient.
    def slices(make):
        return [make(4, 1001), make(2, 9, 1001)[:, 3:-1], make(3, 4, 1010)[1:, :, 2:-7], make(5, 1003)[:, 1:]]
    for x, y in zip(slices(lambda *s: torch.empty(*s, dtype=torch.bfloat16)),
                    slices(lambda *s: torch.empty(*s, dtype=torch.bfloat16))):
        x3, y3 = _rows.as_rows(x), _rows.as_rows(y)
        x_ptr, x_start, stride_a, stride_b = _rows.addressing(x3)
        assert x_ptr.data_ptr() % 16 == 0 and x_ptr.data_ptr() + 2 * x_start == x3.data_ptr()
        assert (stride_a, stride_b) == x3.stride()[:2]
        assert _rows.addressing_like(y3, x3)[1:] == (0, 0, 0)
        dx = _rows.grad_rows(x3, torch.bfloat16)
        dx_ptr, *shifts = _rows.addressing_like(dx, x3)
        assert dx.shape == x3.shape and dx_ptr.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in shifts)
        assert dx.is_contiguous() == x3.is_contiguous()
        A, B, V = x3.shape
        assert 0 <= dx.stride(1) - V < 16 and 0 <= dx.stride(0) - B * dx.stride(1) < 16


def test_layouts_that_copy():
    V = 300
    t = torch.randint(0, V, (3, 2, 2))
    # three leading dims whose outer two cannot merge, and a last stride != 1: as_rows copies, values still right
    x = torch.randn(2, 3, 2, V).transpose(0, 1)
    assert _rows.as_rows(x).data_ptr() != x.data_ptr()
    check_ce(x, t, reduction="none", z_loss=1e-3)
    check_logprobs(x, t)
    x = torch.randn(V, 3, 2, 2).permute(1, 2, 3, 0)
    check_ce(x, t, reduction="mean")
    check_logprobs(x, t, temperature=0.9)


def test_logits_not_modified():
    x = torch.randn(4, 999, dtype=torch.bfloat16, requires_grad=True)
    before = x.detach().clone()
    t = torch.randint(0, 999, (4,))
    kernels.cross_entropy(x, t, label_smoothing=0.1).backward()
    logp, ent = kernels.token_logprobs(x, t, return_entropy=True)
    (logp + ent).sum().backward()
    assert torch.equal(x.detach(), before)


# -----------------------------------------------------------------------------
# errors

def test_out_of_range_indices():
    x = torch.randn(2, 3, 10)
    t = torch.randint(0, 10, (2, 3))
    for bad in [10, -5, 12345]:
        tb = t.clone()
        tb[1, 2] = bad
        with pytest.raises(ValueError, match=rf"targets\[1, 2\] = {bad} is out of range"):
            kernels.cross_entropy(x, tb)
        with pytest.raises(ValueError, match=rf"tokens\[1, 2\] = {bad} is out of range"):
            kernels.token_logprobs(x, tb)
    tb = t.clone()
    tb[0, 0] = -100  # ignore_index is fine for cross_entropy, not for token_logprobs
    kernels.cross_entropy(x, tb)
    with pytest.raises(ValueError, match="-100"):
        kernels.token_logprobs(x, tb)


def test_bad_arguments():
    x, t = torch.randn(2, 10), torch.randint(0, 10, (2,))
    for kw, what in [(dict(reduction="avg"), "reduction"), (dict(label_smoothing=1.5), "label_smoothing"),
                     (dict(z_loss=-1.0), "z_loss")]:
        with pytest.raises(ValueError, match=what):
            kernels.cross_entropy(x, t, **kw)
    for fn in [kernels.cross_entropy, kernels.token_logprobs]:
        with pytest.raises(ValueError, match="shape"):
            fn(x, t[:1])
        with pytest.raises(ValueError, match="integer"):
            fn(x, t.float())
        with pytest.raises(ValueError, match="V >= 1"):
            fn(torch.randn(2, 0), t)
    for T in [0.0, -1.0, float("inf")]:
        with pytest.raises(ValueError, match="temperature"):
            kernels.token_logprobs(x, t, temperature=T)
