"""
GPU-only checks of the three kernels (kernels.cross_entropy, kernels.token_logprobs, kernels.token_kl), compiled,
at a real vocabulary size: accuracy against float64, int64 row offsets past 2**31 elements, and peak memory.

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

# outputs are fp32 sums over V = 151936 terms; gradients are rounded once to bf16 (8 bits of mantissa)
OUT_TOL = dict(atol=1e-4, rtol=1e-4)
GRAD_TOL = dict(atol=1e-6, rtol=1.6e-2)


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


CHECKS = {"bf16_matches_fp64": check_bf16_matches_fp64, "int64_offsets": check_int64_offsets,
          "peak_memory": check_peak_memory}


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


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET: these checks are for compiled kernels"
    assert torch.cuda.is_available(), "needs CUDA"
    CHECKS[sys.argv[1]](*sys.argv[2:])
    print(f"ok | {' '.join(sys.argv[1:])}")
