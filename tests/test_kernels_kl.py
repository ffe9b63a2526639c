"""
kernels.token_kl against a float64 reference. On CPU the Triton kernels run through the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small; large V uses N = 1 or 2.
Run: python -m pytest -q tests/test_kernels_kl.py
"""

import pytest
import torch
import torch.nn.functional as F

from kernels import _dispatch, _rows, bench
from kernels._dispatch import launches
from kernels.kl import token_kl, token_kl_ref

# The interpreter evaluates masked lanes too (-inf - -inf) before tl.where discards them; numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# KL is always accumulated and returned in fp32 from the same (exactly representable) inputs, so its
# tolerance does not depend on the dtype; the gradients are rounded to the input dtype once on store. For bf16 that
# rounding is a truncation under Triton 3.9's interpreter (one whole bf16 step, 2**-7 = 7.8e-3, below the exact
# value at worst), where compiled Triton rounds to nearest even (half a step): see TOL in tests/test_kernels.py.
TOL = {
    #                 KL (float32 out)            gradient (input dtype)
    torch.float32: (dict(atol=1e-5, rtol=1e-4), dict(atol=1e-6, rtol=1e-4)),
    torch.bfloat16: (dict(atol=1e-5, rtol=1e-4), dict(atol=1e-6, rtol=1e-2)),
    torch.float16: (dict(atol=1e-5, rtol=1e-4), dict(atol=1e-6, rtol=2e-3)),
}


def ref64(x, y, temperature=1.0):
    """float64 KL via torch's own kl_div, with 0 log 0 = 0 for p_i = 0 (kl_div alone gives NaN there)."""
    logp = F.log_softmax(x.double() / temperature, dim=-1)
    logq = F.log_softmax(y.double() / temperature, dim=-1)
    zero = logp == float("-inf")
    # masked on the inputs, not the output: kl_div's backward at a -inf target is NaN even with zero grad
    terms = F.kl_div(logq.masked_fill(zero, 0.0), logp.masked_fill(zero, 0.0), log_target=True, reduction="none")
    return terms.masked_fill(zero, 0.0).sum(-1)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """The launchers' output buffers start as NaN, so an element the kernel forgets to write fails."""
    monkeypatch.setattr(_dispatch, "poison", True)


def make(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    y = (torch.randn(shape, generator=g) * scale).to(dtype)
    return x, y


def check(x, y, *, temperature=1.0, grad_x=True, grad_y=True, block=None, seed=1):
    """Forward + backward with a random upstream gradient vs the float64 reference; proves Triton ran."""
    kl_tol, grad_tol = TOL[x.dtype]
    x = x.detach().clone().requires_grad_(grad_x)
    y = y.detach().clone().requires_grad_(grad_y)
    before = launches.copy()
    out = token_kl(x, y, temperature=temperature, _block=block)
    assert out.dtype == torch.float32 and out.shape == x.shape[:-1]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    if grad_x or grad_y:
        out.backward(g)
    x64 = x.detach().double().requires_grad_(grad_x)
    y64 = y.detach().double().requires_grad_(grad_y)
    expect = ref64(x64, y64, temperature)
    torch.testing.assert_close(out.detach().double(), expect.detach(), **kl_tol)
    assert launches["token_kl_fwd"] == before["token_kl_fwd"] + 1, "the Triton forward did not run"
    if grad_x or grad_y:
        expect.backward(g.double())
        assert launches["token_kl_bwd"] == before["token_kl_bwd"] + 1, "the Triton backward did not run"
    for t, t64, wanted in ((x, x64, grad_x), (y, y64, grad_y)):
        if wanted:
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            torch.testing.assert_close(t.grad.double(), t64.grad, **grad_tol)
        else:
            assert t.grad is None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, temperature, block", [
    ((1, 1), 1.0, None),            # V = 1: KL is exactly 0
    ((5, 3), 0.7, None),            # odd V, one chunk
    ((2, 3, 2, 37), 1.3, 16),       # three leading dims, several chunks with a ragged tail
    ((4, 1000), 2.0, 128),          # 8 chunks, online rescaling across chunks
    ((3, 37), 1.0, 4),              # chunks narrower than 16 bytes of bf16/fp16: a row's head spans two of them
    ((1, 50257), 1.0, None),        # N = 1, GPT-2 vocab
    ((2, 70000), 0.9, None),        # V > 65536 and not a power of two
])
def test_matches_fp64(dtype, shape, temperature, block):
    x, y = make(shape, dtype, scale=3.0)
    check(x, y, temperature=temperature, block=block)


@pytest.mark.parametrize("grad_x, grad_y", [(True, False), (False, True), (False, False)])
def test_grad_wrt_one_input(grad_x, grad_y):
    x, y = make((3, 300), torch.bfloat16, scale=2.0, seed=3)
    check(x, y, temperature=0.8, grad_x=grad_x, grad_y=grad_y, block=64)


def test_large_magnitude():
    # |logits| ~ 1e4: exp would overflow without the running max; KL ~ 1e4 here, and the gradients also
    # guard dKL/dx against an lse_p - lse_q - KL cancellation (it cost ~1e-3 of absolute error at 1e4).
    x, y = make((4, 777), torch.float32, scale=1e4, seed=4)
    check(x, y, block=128)
    # near-copies: the O(1e4) maxima must cancel before rounding, or a KL of ~0 (resp. ~1e-3) drowns
    y_close = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    check(x, y_close, block=128)
    check(x / 1e3, y_close / 1e3, block=128)
    # a common offset of 1e4 (softmax does not see it) under a small KL: m + log s rounded on its own
    # would cost ~5e-4 here, far above the tolerance
    base = 1e4 + torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    check(base, base + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7)), block=128)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_kl_of_one_under_offsets(temperature):
    # KL ~ 1 at V = 32000 under offsets softmax ignores (+12 on the policy, -6 on the reference). Formed as
    # sum p (x - y)/T - (m_x - m_y)/T - (log s_x - log s_y), terms of ~18 and ~10 cancel: the fp32 kernel was off
    # float64 by 5.4e-6 (T = 1) and 3.2e-6 (T = 0.8) on these rows, where torch's log_softmax route in fp32 is off
    # by 8.4e-7 and 1.3e-6. Relative to the running maxima, with one log of s_x / s_y: 2.9e-7 and 4.0e-7.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(8, 32000, generator=g) + 12.0
    y = torch.randn(8, 32000, generator=g) - 6.0
    kl = token_kl(x, y, temperature=temperature)
    expect = ref64(x, y, temperature)
    assert 0.5 < expect.mean() < 2.0
    torch.testing.assert_close(kl.double(), expect, atol=1e-6, rtol=0)
    check(x[:2], y[:2], temperature=temperature)  # and the gradients, at the usual tolerance


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_large_magnitude_at_a_temperature(temperature):
    # x / T rounded before the max is subtracted costs ulp(1e4 / T) ~ 1e-3 per logit, a KL error far above the
    # tolerance when the KL itself is ~1e-4: the kernels subtract the raw maximum first, then scale.
    base = 1e4 + torch.randn((4, 777), generator=torch.Generator().manual_seed(8))
    close = base + 0.01 * torch.randn(base.shape, generator=torch.Generator().manual_seed(9))
    check(base, close, temperature=temperature, block=128)
    x, y = make((4, 777), torch.float32, scale=1e4, seed=10)
    check(x, y, temperature=temperature, block=128)


def test_neg_inf_entries():
    # -inf logits, as a top-k / vocab mask produces. Chunk 4 puts whole all -inf chunks at the front.
    x, y = make((3, 16), torch.float32, seed=6)
    x[:, :5] = float("-inf")           # p_i = 0 on the first chunk and a bit: terms must be 0, not NaN
    y[:, :4] = float("-inf")           # q_i = 0 only where p_i = 0 too: KL stays finite
    y[0, 9] = float("-inf")            # row 0: q_i = 0 where p_i > 0 -> KL = +inf
    x[1, 12] = float("-inf")
    y[2, 7:] = -1e30                   # huge but finite
    kl = token_kl(x, y, _block=4)
    expect = ref64(x, y)
    assert kl[0].item() == float("inf") and expect[0].item() == float("inf")
    torch.testing.assert_close(kl[1:].double(), expect[1:], **TOL[torch.float32][0])
    # gradients of the finite rows, through -inf entries (zero gradient where p_i = 0)
    check(x[1:], y[1:], block=4)


def test_identical_inputs_give_zero():
    x, _ = make((3, 2000), torch.bfloat16, scale=5.0, seed=7)
    xg = x.clone().requires_grad_()
    yg = x.clone().requires_grad_()
    kl = token_kl(xg, yg, temperature=0.5)
    kl.sum().backward()
    torch.testing.assert_close(kl, torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(xg.grad.float(), torch.zeros(x.shape), atol=1e-6, rtol=0)
    torch.testing.assert_close(yg.grad.float(), torch.zeros(x.shape), atol=1e-6, rtol=0)


def test_nan_propagates_per_row():
    x, y = make((4, 50), torch.float32, seed=8)
    x[1, 17] = float("nan")
    y[2, 3] = float("nan")
    kl = token_kl(x, y, _block=16)
    assert torch.isnan(kl[1]) and torch.isnan(kl[2])
    torch.testing.assert_close(kl[[0, 3]].double(), ref64(x[[0, 3]], y[[0, 3]]), **TOL[torch.float32][0])


def test_non_contiguous_rows_without_copy():
    g = torch.Generator().manual_seed(9)
    big_x = torch.randn(2, 6, 301, generator=g).to(torch.bfloat16)
    big_y = torch.randn(12, 310, generator=g).to(torch.bfloat16)
    x = big_x[:, :-1]                  # (2, 5, 301): response slice, rows not mergeable into one stride
    y = big_y[:10, :301].unflatten(0, (2, 5))  # (2, 5, 301), row stride 310
    assert not x.is_contiguous() and not y.is_contiguous()
    # the launcher's (A, B, V) view must alias the caller's memory: no hidden (N, V) copy
    assert _rows.as_rows(x).data_ptr() == x.data_ptr()
    assert _rows.as_rows(y).data_ptr() == y.data_ptr()
    check(x, y, temperature=1.1, block=64)
    # last-dim stride != 1 still works (through one copy)
    check(big_y[:8, :12].t(), big_y[:8, 40:52].t(), block=8)  # (12, 8), last stride 310


def test_empty_batch():
    x, y = make((0, 7), torch.float32)
    assert token_kl(x, y).shape == (0,)


def test_reference_path_when_triton_not_used(monkeypatch):
    monkeypatch.setattr(_dispatch, "use_triton", lambda t: False)
    x, y = make((3, 40), torch.float32, seed=10)
    before = launches.copy()
    torch.testing.assert_close(token_kl(x, y, temperature=0.6).double(), ref64(x, y, 0.6), **TOL[torch.float32][0])
    assert launches == before


@pytest.mark.parametrize("bad, match", [
    (lambda x, y: token_kl(x, y[:, :-1]), "must match"),
    (lambda x, y: token_kl(x, y.half()), "must match"),
    (lambda x, y: token_kl(x.long(), y.long()), "dtype"),
    (lambda x, y: token_kl(x, y, temperature=0.0), "temperature"),
    (lambda x, y: token_kl(x[:, :0], y[:, :0]), "V >= 1"),
    (lambda x, y: token_kl(x.tolist(), y), "torch.Tensor"),
])
def test_bad_input_raises(bad, match):
    x, y = make((2, 5), torch.float32)
    with pytest.raises(ValueError, match=match):
        bad(x, y)


def test_float64_uses_reference_and_gradcheck():
    x, y = make((2, 9), torch.float64, seed=12)
    x.requires_grad_()
    y.requires_grad_()
    before = launches.copy()
    assert torch.autograd.gradcheck(lambda a, b: token_kl(a, b, temperature=0.9), (x, y))
    assert launches == before


def test_reference_matches_kl_div():
    x, y = make((3, 4, 33), torch.float32, seed=11)
    torch.testing.assert_close(token_kl_ref(x.double(), y.double(), temperature=1.7), ref64(x, y, 1.7))


def test_bench_script_runs(tmp_path):
    # the benchmark is a script, not a test, but it must not rot: tiny shapes, one timed run per cell
    out = tmp_path / "bench.md"
    bench.main(["--small", "--n", "2", "--vocab", "33", "--ops", "token_kl", "--impls", "nanopost,eager",
                "--reps", "1", "--out", str(out)])
    table = out.read_text()
    assert "| token_kl | fwd+bwd | bfloat16 | 33 | nanopost |" in table
    assert "| token_kl | fwd | float32 | 33 | eager |" in table
