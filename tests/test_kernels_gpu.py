"""
GPU-only checks of the three kernels (kernels.cross_entropy, kernels.token_logprobs, kernels.token_kl), compiled,
at a real vocabulary size: accuracy against float64 (bf16 gradients rounded to nearest even), int64 row offsets past
2**31 elements, peak memory, and that the JIT builds the very kernels kernels.aot builds on a CPU.

Every test re-runs this file in a fresh Python without TRITON_INTERPRET: tests/conftest.py sets it for the CPU
tests, and under it Triton would push these CUDA tensors through the (slow, host-side) interpreter instead of
compiling them. Without CUDA every test skips with "needs CUDA".

Run: python -m pytest -q tests/test_kernels_gpu.py
     python tests/test_kernels_gpu.py CHECK OP          (one check in this process, e.g. `int64_offsets token_kl`)
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("cross_entropy", "token_logprobs", "token_kl")
DEVICE = "cuda"  # a name, not a literal, so the checks' logic can be dry-run on CPU under the interpreter
V_BIG = 151936  # Qwen2's vocabulary, the largest in common use; 151936 = 2**7 * 1187, far from a power of two

# outputs are fp32 sums over V = 151936 terms
OUT_TOL = dict(atol=1e-4, rtol=1e-4)
# gradients are fp32 values rounded once to bf16. Compiled, Triton rounds to nearest even (cvt.rn.bf16.f32, which
# tests/test_kernels_compile.py checks in the PTX): at most half a bf16 step, 2**-8 relative, off the exact value,
# plus fp32 error. (The interpreter the CPU tests run truncates instead, up to a whole step: tests/test_kernels.py.)
GRAD_TOL = dict(atol=1e-6, rtol=2**-8 + 1e-4)
# and so nearly every bf16 gradient is the float64 gradient rounded to nearest even, bit for bit; only an fp32
# error across a rounding midpoint (~1e-6 / 4e-3 of entries) may differ. Truncation matches about half of them.
ROUNDED_AS_FP64 = 0.99


# -----------------------------------------------------------------------------
# helpers, run in the child process

def make_inputs(op, N, V, dtype, seed, grad=True):
    """-> (diff, extra): the float inputs the op is differentiated in, and its integer inputs."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(N, V, device=DEVICE, dtype=dtype, generator=g).requires_grad_(grad)  # (N, V)
    if op == "token_kl":
        y = torch.randn(N, V, device=DEVICE, dtype=dtype, generator=g).requires_grad_(grad)  # (N, V)
        return [x, y], []
    t = torch.randint(0, V, (N,), device=DEVICE, generator=g)  # (N,)
    return [x], [t]


def run_kernel(op, diff, extra):
    import kernels
    if op == "cross_entropy":
        return [kernels.cross_entropy(diff[0], extra[0], reduction="none")]
    if op == "token_logprobs":
        return list(kernels.token_logprobs(diff[0], extra[0], return_entropy=True))
    return [kernels.token_kl(diff[0], diff[1])]


def run_reference(op, diff, extra):
    """float64 math from torch's own functions, on the same values."""
    x = diff[0]
    if op == "cross_entropy":
        return [F.cross_entropy(x, extra[0], reduction="none")]
    logp = F.log_softmax(x, dim=-1)
    if op == "token_logprobs":
        return [logp.gather(-1, extra[0].unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)]
    logq = F.log_softmax(diff[1], dim=-1)
    return [F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)]


def compare(op, diff, extra, rows):
    """Kernel forward + backward (random upstream gradients) vs float64 on `rows` only."""
    outs = run_kernel(op, diff, extra)
    g = torch.Generator(device=DEVICE).manual_seed(123)
    ups = [torch.randn(o.shape, device=DEVICE, generator=g) for o in outs]
    torch.autograd.backward(outs, ups)
    diff64 = [d.detach()[rows].double().requires_grad_() for d in diff]
    refs = run_reference(op, diff64, [e[rows] for e in extra])
    torch.autograd.backward(refs, [u[rows].double() for u in ups])
    for o, r in zip(outs, refs):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.detach()[rows].double(), r.detach(), **OUT_TOL)
    for d, d64 in zip(diff, diff64):
        assert d.grad.dtype == d.dtype
        torch.testing.assert_close(d.grad[rows].double(), d64.grad, **GRAD_TOL)
        if d.dtype == torch.bfloat16:
            same = (d.grad[rows] == d64.grad.to(torch.bfloat16)).double().mean().item()
            assert same >= ROUNDED_AS_FP64, f"only {same:.4f} of the bf16 gradient is float64's rounded to nearest"


def check_bf16_matches_fp64(op):
    torch.manual_seed(0)
    N = 256
    diff, extra = make_inputs(op, N, V_BIG, torch.bfloat16, seed=1)
    compare(op, diff, extra, torch.arange(N, device=DEVICE))
    import kernels._dispatch as dispatch
    assert dispatch.launches[f"{op}_fwd"] == 1 and dispatch.launches[f"{op}_bwd"] == 1, dispatch.launches


def check_int64_offsets(op):
    # 14200 * 151936 = 2.16e9 elements > 2**31: rows from 14134 on start past 2**31 and are only reachable with
    # int64 offsets; an int32 product would wrap negative and fault or read another row.
    N = 14200
    assert N * V_BIG > 2**31
    first_past = 2**31 // V_BIG + 1
    diff, extra = make_inputs(op, N, V_BIG, torch.bfloat16, seed=2)
    rows = torch.tensor([0, 1, first_past - 1, first_past, first_past + 1, N - 1], device=DEVICE)
    compare(op, diff, extra, rows)


def check_peak_memory(op, both="0"):
    """fwd + bwd may allocate one gradient buffer per differentiated input, plus O(N) per-row scalars."""
    N = 4096
    diff, extra = make_inputs(op, N, V_BIG, torch.bfloat16, seed=3, grad=False)
    n_grads = 2 if both == "1" else 1
    for d in diff[:n_grads]:
        d.requires_grad_()
    outs = run_kernel(op, diff, extra)  # warm-up: compile outside the measured window
    ups = [torch.randn(o.shape, device=DEVICE) for o in outs]
    torch.autograd.backward(outs, ups)
    for d in diff:
        d.grad = None
    del outs
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outs = run_kernel(op, diff, extra)
    torch.autograd.backward(outs, ups)
    torch.cuda.synchronize()
    extra_bytes = torch.cuda.max_memory_allocated() - base
    grad_bytes = n_grads * diff[0].numel() * diff[0].element_size()
    # 64 bytes per row = 16 fp32 scalars (saved stats, outputs, upstream copies); 2 MiB of allocator rounding
    allowed = grad_bytes + 64 * N + 2**21
    print(f"{op} | grads {n_grads} | extra {extra_bytes / 2**20:.1f} MiB | allowed {allowed / 2**20:.1f} MiB")
    assert extra_bytes <= allowed, f"{op}: fwd+bwd allocated {extra_bytes} bytes, allowed {allowed}"


def check_aot_matches_jit(op):
    """Every kernel the JIT builds for op's forward and backward at GPT-2's V = 50257 is one kernels.aot builds on a
    CPU for the same launch (same hash: same specialisation, options and code), and the driver's register and spill
    counts are the ones kernels.aot reads from the cubin."""
    import kernels
    from kernels import aot
    N, V = 4096, 50257
    diff, extra = make_inputs(op, N, V, torch.bfloat16, seed=4)
    # the upstream gradients kernels.aot assumes: a sum for cross-entropy (stride 0), per token for the others
    if op == "cross_entropy":
        outs = [kernels.cross_entropy(diff[0], extra[0], reduction="sum")]
    else:
        outs = run_kernel(op, diff, extra)
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    torch.cuda.synchronize()
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability()
    built = {ck.hash: (name, ck) for name, k in aot.KERNELS.items() for ck in k.device_caches[device][0].values()}
    assert len(built) == 2, f"{op}: expected one forward and one backward kernel, the JIT built {len(built)}"
    names = {name for name, _ in built.values()}
    ours = {}
    for name, args, kwargs in aot.launches(V, torch.bfloat16, "contiguous", n=N):
        if name in names:
            compiled, _ = aot.compile_launch(aot.KERNELS[name], args, kwargs, 10 * major + minor)
            ours[compiled.hash] = compiled
    for h, (name, ck) in built.items():
        assert h in ours, f"{name}: the JIT's kernel {h} is none of the {len(ours)} kernels.aot built for it"
        regs = aot.resources(ck.asm["cubin"])["regs"]
        print(f"{name} | hash {h[:12]} | regs driver {ck.n_regs} cuobjdump {regs} | spills {ck.n_spills}")
        assert ck.n_regs == regs and ck.n_spills == 0, (name, ck.n_regs, regs, ck.n_spills)


CHECKS = {"bf16_matches_fp64": check_bf16_matches_fp64, "int64_offsets": check_int64_offsets,
          "peak_memory": check_peak_memory, "aot_matches_jit": check_aot_matches_jit}


# -----------------------------------------------------------------------------
# pytest side: each check in a clean child process

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run_child(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("op", OPS)
def test_bf16_large_vocab_matches_fp64(op):
    run_child("bf16_matches_fp64", op)


@pytest.mark.parametrize("op", OPS)
def test_int64_row_offsets(op):
    run_child("int64_offsets", op)


@pytest.mark.parametrize("op, both", [(op, "0") for op in OPS] + [("token_kl", "1")])
def test_peak_memory(op, both):
    run_child("peak_memory", op, both)


@pytest.mark.parametrize("op", OPS)
def test_aot_matches_jit(op):
    run_child("aot_matches_jit", op)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET: these checks are for compiled kernels"
    assert torch.cuda.is_available(), "needs CUDA"
    CHECKS[sys.argv[1]](*sys.argv[2:])
    print(f"ok | {' '.join(sys.argv[1:])}")
