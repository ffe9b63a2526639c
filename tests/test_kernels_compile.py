"""
Every kernel variant compiled for sm_80 (A100) and sm_90 (H100) on this CPU, as the JIT would build it on a GPU
(kernels/aot.py): it compiles, spills nothing, moves the logits and the gradients in 16-byte vectors (also at GPT-2's
odd V = 50257 and at PPO's response slices), and rounds its bf16 stores to nearest even. No GPU needed: the triton
wheel ships ptxas and cuobjdump.

Each test runs kernels.aot in a fresh Python without TRITON_INTERPRET: tests/conftest.py sets it, and under it the
kernels are interpreter functions, not JIT functions. TRITON_CACHE_DIR is a fresh folder, so every kernel is built.
Run: python -m pytest -q tests/test_kernels_compile.py
"""

import os
import re
import subprocess
import sys

import pytest

from kernels import _dispatch

# the compiler, ptxas and cuobjdump all come with the triton wheel, which exists for Linux only
pytestmark = pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="needs triton (Linux wheels only)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = 12  # kernel x constexpr variant: ce fwd x2, bwd; logprobs fwd x2, bwd x3; kl fwd, bwd x3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(*args) -> CompletedProcess of `python -m kernels.aot *args` in a clean environment (one shared cache)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")

    def run(*args, code=None):
        cmd = [sys.executable, "-W", "ignore", *(["-c", code] if code else ["-m", "kernels.aot", *args])]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return run


def table(stdout):
    """The rows of kernels.aot's markdown table, as lists of cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines() if line.startswith("| ")]
    return rows[1:]  # without the header


def test_every_variant_compiles_unspilled_and_vector_wide(run):
    # V = 1024 (one 1024-column chunk, 2 warps), 32000 (aligned rows, 4096-column chunks, 8 warps) and 50257 (rows
    # start anywhere) in bf16; fp32 and fp16 at 50257. The other vocabularies of the full table specialise like
    # 32000 (every size and stride a multiple of 16) and build the same kernels.
    proc = run("--check", "--arch", "80,90", "--dtype", "bfloat16", "--vocab", "1024,32000,50257")
    proc2 = run("--check", "--arch", "80,90", "--dtype", "float32,float16", "--vocab", "50257")
    for p in (proc, proc2):
        assert p.returncode == 0, f"kernels.aot --check failed:\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
        assert "0 problems" in p.stdout
    rows = table(proc.stdout) + table(proc2.stdout)
    assert len(rows) == VARIANTS * 2 * (3 + 2)
    assert {r[2] for r in rows} == {"80", "90"}
    for kernel, variant, sm, dtype, V, layout, _, regs, spill, _, loads, stores in rows:
        assert spill == "0/0", (kernel, variant, sm, dtype, V)
        # the done-when of issue #24: at V = 50257 the logits move in 16-byte vectors too (before: "16b x17" alone)
        assert loads.startswith("128b"), (kernel, variant, sm, dtype, V, loads)
        assert stores == "-" or stores.startswith("128b"), (kernel, variant, sm, dtype, V, stores)


def test_response_slices_wide_and_a_misaligned_reference_caught(run):
    # PPO's logits[:, P-1:-1] start (P - 1) V elements into their buffer, off a 16-byte boundary at V = 50257: the
    # kernels get the address rounded down plus an offset, and stay wide. A reference tensor with another row
    # stride cannot be kept in phase with the policy's rows: --check must flag exactly its loads, and fail.
    proc = run("--check", "--arch", "90", "--dtype", "bfloat16", "--vocab", "50257", "--layout", "response,ref-stride")
    assert proc.returncode == 1, proc.stdout[-6000:] + proc.stderr[-3000:]
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 4, problems  # kl fwd and the three kl bwd variants
    assert all(re.match(r"PROBLEM kl_(fwd|bwd) .* ref-stride: narrow loads from y_ptr", p) for p in problems), problems
    response = [r for r in table(proc.stdout) if r[5] == "response"]
    assert len(response) == VARIANTS and all(r[10].startswith("128b") for r in response), response


def test_specialisation_is_the_jits_rule(run):
    # kernels.aot specialises through the JIT's own binder; this pins the rule the table's rows rest on: a pointer
    # whose address is a multiple of 16 bytes and an integer that is a multiple of 16 get tt.divisibility=16, an
    # integer equal to 1 becomes a constant, floats get nothing. (tests/test_kernels_gpu.py checks on a GPU that a
    # kernel built this way has the JIT's own hash.)
    code = """if True:
        import torch
        from kernels import aot
        kernel = aot.KERNELS["_ce_fwd_kernel"]
        x = torch.empty(64, 1003, dtype=torch.bfloat16, device="meta")
        t = torch.empty(64, dtype=torch.int64, device="meta")
        f = torch.empty(64, device="meta")
        for args in [(x, 0, 1003, 1003, 64, t, f, f, f, 1003, -100, 0.0, 0.0),
                     (x[:, 8:], 16, 1, 1003, 1, t[1:], f[4:], f[1:], f, 48, -16, 0.1, 2.0)]:
            _, _, signature, constexprs, attrs = aot.jit_specialise(kernel, args, dict(SMOOTH=False, BLOCK=1024,
                                                                                      num_warps=2), 90)
            for i, (name, a) in enumerate(zip(kernel.arg_names, args)):
                marked = ["tt.divisibility", 16] in attrs.get((i,), [])
                if isinstance(a, torch.Tensor):
                    assert marked == (a.data_ptr() % 16 == 0), (name, a.data_ptr(), attrs.get((i,)))
                elif isinstance(a, float):
                    assert not marked and signature[name] == "fp32", (name, signature[name])
                elif a == 1:
                    assert signature[name] == "constexpr" and constexprs[(i,)] == 1, (name, signature[name])
                else:
                    assert marked == (a % 16 == 0), (name, a, attrs.get((i,)))
        print("ok")
    """
    proc = run(code=code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
