"""
Benchmark the fused kernels against what a training script would write without them.

Run:  python -m kernels.bench                      # CUDA: N=16384, V in {50257, 151936}, bf16 and fp32
      python -m kernels.bench --small              # tiny shapes; automatic when there is no CUDA
      python -m kernels.bench --out kernels/BENCHMARK_RUN.md   # also write the table as markdown
      python -m kernels.bench --ops token_kl --impls nanopost,eager   # a subset
      python -m kernels.bench --n 4096 --vocab 32000,128256          # other shapes

Ops: cross_entropy (mean over tokens), token_logprobs with entropy, token_kl (gradient for the policy logits
only; the reference logits come from a frozen model). Modes: fwd (no autograd) and fwd+bwd (torch.autograd.grad
of the sum of the outputs, so no .grad accumulation is timed).
Implementations: nanopost (this package), eager (plain PyTorch in fp32, the usual recipe), compile
(torch.compile of eager), liger (Liger-Kernel, when importable; it has no logprobs+entropy op, and its KL op takes
log-probabilities, so that column includes two torch log_softmax calls).

GB/s counts the minimum traffic an implementation must move, s = bytes per logit:
    cross_entropy, token_logprobs   fwd: read logits once (N V s)     fwd+bwd: read twice, write grad (3 N V s)
    token_kl                        fwd: read both once (2 N V s)     fwd+bwd: read both twice, write one grad (5 N V s)
and "%copy" divides that by the bandwidth of a plain tensor copy of one logits tensor measured in the same run.
"peak MiB" is torch.cuda.max_memory_allocated during one call minus what was allocated before (inputs excluded).
Time is the median of triton.testing.do_bench on CUDA; on CPU the median of a few time.perf_counter runs, where
nanopost runs the Triton interpreter (TRITON_INTERPRET=1) or the reference: that checks the script runs, it is not
a performance number.
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import kernels
from kernels import _dispatch

# -----------------------------------------------------------------------------
# baselines: the same math the way a training script writes it without this package (fp32 for bf16 inputs,
# as autocast does for log_softmax / cross_entropy)


def ce_eager(x, t):
    return F.cross_entropy(x.float(), t)


def logprobs_eager(x, t):
    logp_all = F.log_softmax(x.float(), dim=-1)  # (N, V) fp32
    return logp_all.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def kl_eager(x, y):
    return kernels.token_kl_ref(x, y)


def liger_impl(op):
    """Liger-Kernel's function for `op`, None if it has none, or a str saying why it is unavailable."""
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return "liger_kernel not importable (pip install liger-kernel)"
    if op == "cross_entropy":
        loss = liger.LigerCrossEntropyLoss()  # computes the gradient in the forward, into its input's buffer
        return lambda x, t: loss(x, t)
    if op == "token_kl":
        kl = liger.LigerKLDIVLoss(reduction="batchmean", log_target=True)  # y_pred = log q, y_true = log p
        return lambda x, y: kl(F.log_softmax(y.float(), -1), F.log_softmax(x.float(), -1))
    return None


OPS = {
    "cross_entropy": dict(ours=lambda x, t: kernels.cross_entropy(x, t), eager=ce_eager, reads=1),
    "token_logprobs": dict(ours=lambda x, t: kernels.token_logprobs(x, t, return_entropy=True),
                           eager=logprobs_eager, reads=1),
    "token_kl": dict(ours=lambda x, y: kernels.token_kl(x, y), eager=kl_eager, reads=2),
}
IMPLS = ("nanopost", "eager", "compile", "liger")

# Published numbers to measure against (H100, bf16), each compared with the matching nanopost row after the table.
# Liger-Kernel's Triton cross-entropy does forward + backward at 8192 x 128256 in 2.2 ms (its PR #1290, 2026-08):
# "at least 1.2x Liger" means at most 2.2 / 1.2 = 1.84 ms on that shape. quack's cross-entropy moves about 3 TB/s
# (~90% of an H100's peak) on rows wider than 4k columns.
LIGER_CE = dict(op="cross_entropy", mode="fwd+bwd", dtype="bfloat16", N=8192, V=128256, ms=2.2)
QUACK_GBPS = 3000


def fmt(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def min_bytes(op, mode, N, V, elem):
    reads = OPS[op]["reads"]
    if mode == "fwd":
        return reads * N * V * elem
    return (2 * reads + 1) * N * V * elem


# -----------------------------------------------------------------------------
# measurement


def make_inputs(op, N, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, V, device=device, dtype=dtype, generator=g)  # (N, V) policy logits
    if op == "token_kl":
        aux = torch.randn(N, V, device=device, dtype=dtype, generator=g)  # (N, V) reference logits
    else:
        aux = torch.randint(0, V, (N,), device=device, generator=g)  # (N,) targets / sampled tokens
    return x, aux


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def step_fn(fn, x, aux, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(x, aux)
        return run
    xg = x.detach().requires_grad_()

    def run():
        outs = as_tuple(fn(xg, aux))
        return torch.autograd.grad(sum(o.float().sum() for o in outs), xg)
    return run


def time_ms(run, cuda, reps):
    if cuda:
        import triton.testing
        return triton.testing.do_bench(run, return_mode="median")
    run()  # warm-up: the interpreter and torch both pay first-call costs
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peak_extra_mib(run, cuda):
    if not cuda:
        return None  # no allocator statistics for CPU tensors
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def copy_gbps(N, V, dtype, device, cuda, reps):
    src = torch.randn(N, V, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), cuda, reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9  # read + write


def check_agrees(op, x, aux):
    """Guard against benchmarking a broken kernel: nanopost's forward must match eager."""
    with torch.no_grad():
        ours = as_tuple(OPS[op]["ours"](x, aux))
        ref = as_tuple(OPS[op]["eager"](x, aux))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-3)


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    ap = argparse.ArgumentParser(description="benchmark kernels.cross_entropy / token_logprobs / token_kl")
    ap.add_argument("--small", action="store_true", help="tiny shapes (default when CUDA is unavailable)")
    ap.add_argument("--ops", default=",".join(OPS), help="comma list of " + ",".join(OPS))
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ",".join(IMPLS))
    ap.add_argument("--compile", action="store_true", help="also run torch.compile on CPU (slow to compile)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per cell on CPU (CUDA uses do_bench)")
    ap.add_argument("--n", type=int, default=None, help="override the number of tokens N")
    ap.add_argument("--vocab", default=None, help="override the vocabulary sizes, comma list (e.g. 32000,128256)")
    ap.add_argument("--out", default=None, help="also write the table as markdown to this file")
    args = ap.parse_args(argv)
    ops = args.ops.split(",")
    impls = args.impls.split(",")
    for name, allowed in ((ops, OPS), (impls, IMPLS)):
        bad = [n for n in name if n not in allowed]
        if bad:
            raise ValueError(f"unknown name(s) {bad}; choose from {list(allowed)}")

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    small = args.small or not cuda
    # 16384 tokens = e.g. 32 sequences of 512; 50257 = GPT-2's vocabulary, 151936 = Qwen2's
    N, vocabs = (8, (1000, 5003)) if small else (16384, (50257, 151936))
    N = args.n if args.n is not None else N
    vocabs = tuple(int(v) for v in args.vocab.split(",")) if args.vocab else vocabs
    dtypes = (torch.bfloat16, torch.float32)
    probe = torch.empty(1, device=device)
    if cuda:
        path = "triton (compiled)"
    elif _dispatch.use_triton(probe):
        path = "triton interpreter"
    else:
        path = "pytorch reference"
    machine = torch.cuda.get_device_name() if cuda else f"{os.cpu_count()}-core CPU ({platform.machine()})"
    header = (f"date {datetime.date.today()} | {machine} | torch {torch.__version__} | N={N} | "
              f"nanopost path: {path} | timing: {'do_bench median' if cuda else f'perf_counter median of {args.reps}'}")
    print(header)
    if not cuda:
        print("NOTE: no CUDA; these timings only show the script runs, they are not performance numbers")

    compiled = {op: torch.compile(OPS[op]["eager"]) for op in ops} if (cuda or args.compile) else {}
    liger = {op: liger_impl(op) for op in ops} if "liger" in impls else {}
    for op, l in liger.items():
        if isinstance(l, str):
            print(f"NOTE: liger skipped for {op}: {l}")
        elif l is None:
            print(f"NOTE: liger has no equivalent of {op}")

    cols = ("op", "mode", "dtype", "V", "impl", "ms", "GB/s", "%copy", "peak MiB")
    widths = (15, 8, 9, 7, 9, 10, 8, 7, 9)
    rows = []

    def emit(row):
        rows.append(row)
        print(" ".join(str(c).rjust(w) for c, w in zip(row, widths)), flush=True)

    print(" ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for V in vocabs:
            copy = copy_gbps(N, V, dtype, device, cuda, args.reps)
            emit(("copy", "-", dname, V, "torch", "-", fmt(copy), "100", "-"))
            for op in ops:
                x, aux = make_inputs(op, N, V, dtype, device)
                check_agrees(op, x, aux)
                for mode in ("fwd", "fwd+bwd"):
                    for impl in impls:  # liger last: its cross-entropy overwrites its input with the gradient
                        if impl == "nanopost":
                            fn = OPS[op]["ours"]
                        elif impl == "eager":
                            fn = OPS[op]["eager"]
                        elif impl == "compile":
                            fn = compiled.get(op)
                        else:
                            fn = liger.get(op)
                        if fn is None or isinstance(fn, str):
                            continue
                        xin = x.clone() if impl == "liger" else x
                        run = step_fn(fn, xin, aux, mode)
                        oom = False
                        try:
                            ms = time_ms(run, cuda, args.reps)
                            peak = peak_extra_mib(run, cuda)
                        except torch.cuda.OutOfMemoryError:  # e.g. eager fp32 KL at V=151936 (~7 fp32 copies)
                            oom = True
                        if oom:  # outside the except block, so the traceback's tensors are already freed
                            emit((op, mode, dname, V, impl, "OOM", "-", "-", "-"))
                            torch.cuda.empty_cache()
                            continue
                        gbps = min_bytes(op, mode, N, V, x.element_size()) / (ms * 1e-3) / 1e9
                        emit((op, mode, dname, V, impl, f"{ms:.3f}", fmt(gbps), fmt(100 * gbps / copy),
                              "-" if peak is None else f"{peak:.0f}"))
                del x, aux
                if cuda:
                    torch.cuda.empty_cache()

    notes = anchor_notes(rows, N, machine)
    for line in notes:
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n")
            f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for row in rows:
                f.write("| " + " | ".join(str(c) for c in row) + " |\n")
            f.write("".join(f"\n{line}\n" for line in notes))
        print(f"wrote {args.out}")


def anchor_notes(rows, N, machine):
    """Lines comparing nanopost's bf16 cross-entropy fwd+bwd rows with LIGER_CE (on its own shape) and QUACK_GBPS
    (rows wider than 4k); the anchors are H100 numbers, so `machine` is repeated in every line."""
    notes = []
    for op, mode, dtype, V, impl, ms, gbps, *_ in rows:
        if (op, mode, dtype, impl) != ("cross_entropy", "fwd+bwd", "bfloat16", "nanopost") or ms in ("-", "OOM"):
            continue
        if (N, V) == (LIGER_CE["N"], LIGER_CE["V"]):
            goal = LIGER_CE["ms"] / 1.2
            verdict = "meets" if float(ms) <= goal else "misses"
            notes.append(f"anchor | {machine} | cross_entropy fwd+bwd bf16 {N} x {V}: {ms} ms against Liger-Kernel's "
                         f"published {LIGER_CE['ms']} ms on an H100 ({LIGER_CE['ms'] / float(ms):.2f}x); {verdict} "
                         f"the 1.2x goal (<= {goal:.2f} ms)")
        if V > 4096:
            notes.append(f"anchor | {machine} | cross_entropy fwd+bwd bf16 {N} x {V}: {gbps} GB/s, "
                         f"{100 * float(gbps) / QUACK_GBPS:.0f}% of quack's ~{QUACK_GBPS} GB/s on an H100")
    return notes


if __name__ == "__main__":
    main()
