"""
Compile every kernel for sm_80 (A100) and sm_90 (H100) on a machine without a GPU, and read what the compiler made:
registers, spills, shared memory, and how wide the loads of the logits and the stores of the gradient are.

    python -m kernels.aot                        # every variant, sm_80 + sm_90, fp32/bf16/fp16, six vocabularies
    python -m kernels.aot --check                # the same; exit 1 if a row fails problems() (spill, narrow, ...)
    python -m kernels.aot --arch 90 --dtype bfloat16 --vocab 50257 --layout response --out /tmp/aot.md

The interpreter the CPU tests run accepts code the compiler may reject and says nothing of registers or load widths;
this does, from what the GPU would run. Compiler output only: no row here is a timing.

How each row is made, so that it is the kernel the JIT would build on a GPU for that launch:
1. The launch: the real launcher (_ce_forward, _logprobs_backward, ...) is called on "meta" tensors (shapes and
   strides, no memory) laid out as LAYOUTS says, and the kernel call it makes is recorded instead of run: the
   arguments, the constexpr variant, the BLOCK and num_warps it chose. A meta tensor's data_ptr() is its byte offset
   from an allocation at address 0, which stands for the CUDA caching allocator's blocks (aligned to 512 bytes):
   aligned buffers, exact offsets for views.
2. The specialisation: those arguments go through the JIT's own binder (triton.runtime.jit's
   create_function_from_signature over native_specialize_impl, then JITFunction._pack_args), built for a CUDA
   backend of the chosen arch instead of the active driver's. That is where the JIT decides that a pointer whose
   address is a multiple of 16, or an integer that is one, gets tt.divisibility=16 and an integer equal to 1 becomes
   a constant. tests/test_kernels_compile.py pins that rule; tests/test_kernels_gpu.py checks on a GPU that the JIT's
   own kernel for a launch has the same hash as the one built here.
3. triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) runs the whole pipeline as
   JITFunction._do_compile does, ptxas included (the triton wheel ships it: CUDA 12.9's for sm_80, 13.x's for
   sm_90); cuobjdump -res-usage (also in the wheel) reads registers, stack, local memory and shared memory.
4. Load and store widths come from the PTX: each ld.global / st.global is traced back through the address
   arithmetic to the kernel parameter it indexes, so "logit loads" are those from x_ptr and y_ptr, "gradient stores"
   those to dx_ptr and dy_ptr. The counts are static (instructions in the code, not executions): a 128b count is the
   16-byte vector path, 16b/32b counts are the masked chunks at the two ends of a row and the one-element gather of
   the target logit.
"""

import argparse
import collections
import concurrent.futures
import datetime
import functools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from kernels._rows import as_rows
from kernels.cross_entropy import _ce_backward, _ce_bwd_kernel, _ce_forward, _ce_fwd_kernel
from kernels.kl import _kl_backward, _kl_bwd_kernel, _kl_forward, _kl_fwd_kernel
from kernels.logprobs import _logprobs_backward, _logprobs_bwd_kernel, _logprobs_forward, _logprobs_fwd_kernel

ARCHS = (80, 90)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# 1024: the shipped nanopost tokenizer's scale; 32000: Llama 2 / Mistral; 50257: GPT-2; 50304: GPT-2 rounded up to a
# multiple of 64 (nanoGPT); 151936: Qwen2; 262144: Gemma 3
VOCABS = (1024, 32000, 50257, 50304, 151936, 262144)
N = 16384  # rows (tokens) of the logits, the benchmark's; only the divisibility of N * V and N reaches the compiler
KERNELS = {k.fn.__name__: k for k in (_ce_fwd_kernel, _ce_bwd_kernel, _logprobs_fwd_kernel, _logprobs_bwd_kernel,
                                      _kl_fwd_kernel, _kl_bwd_kernel)}
LOADS, STORES = ("x_ptr", "y_ptr"), ("dx_ptr", "dy_ptr")  # the logits, the gradient: the (N, V) traffic
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# -----------------------------------------------------------------------------
# 1. the launches: each launcher once per constexpr variant it uses, recorded instead of run

LAYOUTS = {
    "contiguous": "logits (N, V), as train_sft.py passes them",
    "response": "logits[:, P-1:-1] of (B, P + R, V) for the policy and the reference model, as "
                "nanopost.rollout.at_response slices them for PPO: each starts (P - 1) V elements into its buffer",
    "padded": "logits (N, V) in rows of V rounded up to a multiple of 64 (nanoGPT's 50304 for GPT-2), i.e. "
              "logits[..., :V] of a model whose vocabulary was padded: the other route issue #24 names",
    "ref-stride": "policy logits (N, V), reference logits (N, V + 1)[:, :V]: the reference rows drift out of the "
                  "policy rows' 16-byte phase, so token_kl's reads of them stay narrow (what --check catches)",
}


def launches(V, dtype, layout="contiguous", n=N):
    """[(kernel name, args, kwargs)] of every kernel variant the launchers start for n rows of V logits of `dtype`
    laid out as LAYOUTS[layout] says."""
    def logits(ref=False):
        if layout == "response":
            B, P = 64, 64
            return torch.empty(B, P + n // B, V, dtype=dtype, device="meta")[:, P - 1:-1]  # (B, n / B, V)
        if layout == "padded":
            return torch.empty(n, (V + 63) // 64 * 64, dtype=dtype, device="meta")[:, :V]  # (n, V)
        if layout == "ref-stride" and ref:
            return torch.empty(n, V + 1, dtype=dtype, device="meta")[:, :V]  # (n, V)
        return torch.empty(n, V, dtype=dtype, device="meta")  # (n, V)
    x3, y3 = as_rows(logits()), as_rows(logits(ref=True))  # the policy's and the reference model's
    n = x3.shape[0] * x3.shape[1]
    t = torch.empty(n, dtype=torch.int64, device="meta")

    def row():  # an (n,) fp32 per-row statistic
        return torch.empty(n, dtype=torch.float32, device="meta")
    # upstream gradients: a sum's or mean's backward expands one scalar (stride 0, cross-entropy in train_sft.py),
    # per-token terms arrive contiguous (stride 1)
    summed, per_token = torch.empty(1, device="meta").expand(n), row()
    calls = [
        lambda: _ce_forward(x3, t, -100, 0.0, 0.0),
        lambda: _ce_forward(x3, t, -100, 0.1, 0.0),  # label smoothing: SMOOTH=True
        lambda: _ce_backward(x3, t, summed, row(), row(), -100, 0.0, 0.0),
        lambda: _logprobs_forward(x3, t, 1.0, False),
        lambda: _logprobs_forward(x3, t, 1.0, True),
        lambda: _logprobs_backward(x3, t, per_token, per_token, row(), row(), row(), 1.0),
        lambda: _logprobs_backward(x3, t, per_token, None, None, row(), row(), 1.0),
        lambda: _logprobs_backward(x3, t, None, per_token, row(), row(), row(), 1.0),
        lambda: _kl_forward(x3, y3, 1.0, None),
        lambda: _kl_backward(x3, y3, per_token, [row() for _ in range(5)], 1.0, None, True, True),
        lambda: _kl_backward(x3, y3, per_token, [row() for _ in range(5)], 1.0, None, True, False),
        lambda: _kl_backward(x3, y3, per_token, [row() for _ in range(5)], 1.0, None, False, True),
    ]
    recorded = []

    def record(name, *args, grid, warmup, **kwargs):
        recorded.append((name, args, kwargs))
    for name, kernel in KERNELS.items():  # JITFunction's kernel[grid](...) calls self.run: shadow it
        kernel.run = functools.partial(record, name)
    try:
        for call in calls:
            call()
    finally:
        for kernel in KERNELS.values():
            del kernel.run
    assert len(recorded) == len(calls), f"{len(calls)} launcher calls made {len(recorded)} launches"
    return recorded


def variant(kwargs):
    """The constexpr flags of a launch, e.g. "HAS_DLOGP=1 HAS_DENT=0" ("-" when the kernel has none)."""
    flags = [f"{k}={int(v)}" for k, v in kwargs.items() if k not in ("BLOCK", "num_warps")]
    return " ".join(flags) or "-"


# -----------------------------------------------------------------------------
# 2 + 3. specialise as the JIT does, compile for the target

def jit_specialise(kernel, args, kwargs, arch):
    """(target, options, signature, constexprs, attrs) the JIT would derive from this launch on an sm_`arch` GPU:
    JITFunction.create_binder + run + _pack_args, with the backend built for `arch` instead of the driver's."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # what JITFunction.run adds to every launch's keyword arguments before binding them
    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, options, signature, constexprs, attrs


def compile_launch(kernel, args, kwargs, arch):
    """-> (CompiledKernel with asm["ptx"] and asm["cubin"], signature) for one recorded launch."""
    target, options, signature, constexprs, attrs = jit_specialise(kernel, args, kwargs, arch)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__), signature


# -----------------------------------------------------------------------------
# 4. read the cubin and the PTX

def resources(cubin: bytes):
    """{"regs", "stack", "local", "shared"} of the one kernel in a cubin, from cuobjdump -res-usage (bytes but regs)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert m, f"no resource line in cuobjdump's output:\n{out}"
    return dict(regs=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]))


_INSN = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+(.*);")
_REG = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"\[\w+_param_(\d+)\]")


def _operands(text):
    """Split an instruction's operands at the commas outside {} and []."""
    out, depth, cur = [], 0, ""
    for c in text:
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        if c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
    return out + [cur.strip()]


def _bits(opcode):
    """Width in bits of one ld/st instruction: ld.global.v4.b32 -> 128, ld.global.b16 -> 16."""
    vec = re.search(r"\.v(\d)\b", opcode)
    scalar = re.search(r"\.[bfsu](\d+)$", opcode)
    return (int(vec[1]) if vec else 1) * int(scalar[1])


def memory_widths(ptx, params):
    """{param name: Counter(("ld" | "st", bits) -> count)} for the global loads and stores of a kernel's PTX, each
    attributed to the pointer parameter(s) its address is computed from. `params` names the PTX parameters in order.

    Every register definition (but loads, whose value is data, not an address) is an edge from its source registers;
    a load from a parameter is a root. A register redefined in a loop gets the union of its definitions."""
    defs, roots, accesses = collections.defaultdict(set), {}, []
    for line in ptx.splitlines():
        m = _INSN.match(line)
        if not m:
            continue
        opcode, ops = m[1], _operands(m[2])
        if opcode.startswith("ld.param"):
            p = _PARAM.search(m[2])
            if p:
                roots[ops[0]] = int(p[1])
        elif opcode.startswith(("ld.global", "st.global")):
            address = ops[1] if opcode.startswith("ld") else ops[0]
            accesses.append((opcode[:2], _bits(opcode), _REG.findall(address)))
        elif not opcode.startswith(("ld.", "st.", "bra", "bar", "ret", "red.", "atom.")) and ops:
            for dst in _REG.findall(ops[0]):
                defs[dst].update(r for op in ops[1:] for r in _REG.findall(op))

    @functools.lru_cache(maxsize=None)
    def origin(reg):
        seen, todo, found = {reg}, [reg], set()
        while todo:
            r = todo.pop()
            if r in roots:
                found.add(roots[r])
            for s in defs.get(r, ()):
                if s not in seen:
                    seen.add(s)
                    todo.append(s)
        return frozenset(found)

    out = collections.defaultdict(collections.Counter)
    for kind, bits, regs in accesses:
        for p in set().union(*(origin(r) for r in regs)):
            out[params[p]][(kind, bits)] += 1
    return out


def rounding_to_16_bits(ptx):
    """The rounding modes of the PTX's fp32 -> bf16 / fp16 conversions, e.g. {"rn"}: round to nearest even."""
    return set(re.findall(r"cvt\.(\w+)\.(?:bf16|f16)(?:x2)?\.f32", ptx))


# -----------------------------------------------------------------------------
# one row of the table, and what makes it a problem

def analyse(name, args, kwargs, arch, dtype_name, V, layout="contiguous"):
    """Compile one recorded launch and read it: a dict, one row of the table (an "error" key if it did not build)."""
    kernel = KERNELS[name]
    row = dict(kernel=name.strip("_").removesuffix("_kernel"), variant=variant(kwargs), arch=arch,
               dtype=dtype_name, V=V, layout=layout, BLOCK=kwargs["BLOCK"], warps=kwargs["num_warps"])
    try:
        compiled, signature = compile_launch(kernel, args, kwargs, arch)
    except Exception as e:  # a kernel the compiler rejects is a row of the table, not the end of it
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    ptx = compiled.asm["ptx"]
    params = [p for p, ty in signature.items() if ty != "constexpr"]  # the PTX's parameters, in order
    widths = memory_widths(ptx, params)
    row.update(resources(compiled.asm["cubin"]), triton_shared=compiled.metadata.shared,
               widths={p: widths[p] for p in LOADS + STORES if p in params},
               loads=sum((widths[p] for p in LOADS), collections.Counter()),
               stores=sum((widths[p] for p in STORES), collections.Counter()),
               rounding=sorted(rounding_to_16_bits(ptx)))
    return row


def problems(row):
    """Why a row fails --check: it did not compile, it spills, it reads the logits or writes the gradient without
    16-byte vectors, or it rounds to bf16 or fp16 other than to nearest even. [] if none."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["stack"] or row["local"]:
        out.append(f"spills: stack {row['stack']} B, local {row['local']} B")
    # per thread, one unmasked chunk is BLOCK * element size / threads bytes; vector accesses (>= 64 bits) of at
    # least that many bytes to each of the logits and gradients mean the loop over whole chunks moves all of it
    # in vectors. (A kernel that never touches a pointer, e.g. dy_ptr with NEED_DY=0, has no accesses to judge.)
    share = row["BLOCK"] * torch.finfo(DTYPES[row["dtype"]]).bits // 8 // (32 * row["warps"])
    for param, counts in row["widths"].items():
        kind = "ld" if param in LOADS else "st"
        vector = sum(bits // 8 * c for (k, bits), c in counts.items() if k == kind and bits >= 64)
        if counts and vector < share:
            out.append(f"narrow {'loads from' if kind == 'ld' else 'stores to'} {param}: {fmt(counts)} cover "
                       f"{vector} of the {share} bytes per thread of a chunk")
    # Triton's interpreter truncates fp32 -> bf16 (tests/test_kernels.py, TOL); what the GPU runs must round
    if row["rounding"] not in ([], ["rn"]):
        out.append(f"fp32 -> 16-bit conversions round {row['rounding']}, not to nearest even (rn)")
    return out


def fmt(counts):
    """Counter(("ld", 128) -> 2, ("ld", 16) -> 17) -> "128b x2, 16b x17" (widest first)."""
    return ", ".join(f"{bits}b x{c}" for (_, bits), c in sorted(counts.items(), key=lambda kv: -kv[0][1])) or "-"


COLUMNS = ("kernel", "variant", "sm", "dtype", "V", "layout", "BLOCK/warps", "regs", "spill B (stack/local)",
           "shared B (triton/cubin)", "logit loads", "gradient stores")


def cells(row):
    head = (row["kernel"], row["variant"], row["arch"], row["dtype"], row["V"], row["layout"],
            f"{row['BLOCK']}/{row['warps']}")
    if "error" in row:
        return head + ("-", "-", "-", row["error"], "-")
    return head + (row["regs"], f"{row['stack']}/{row['local']}", f"{row['triton_shared']}/{row['shared']}",
                   fmt(row["loads"]), fmt(row["stores"]))


# -----------------------------------------------------------------------------
# main

def _job(job):
    """One (arch, dtype name, V, layout, launch index) -> its row; runs in a worker process."""
    arch, dtype_name, V, layout, i = job
    name, args, kwargs = launches(V, DTYPES[dtype_name], layout)[i]
    return analyse(name, args, kwargs, arch, dtype_name, V, layout)


def main(argv=None):
    ap = argparse.ArgumentParser(description="compile every kernel for CUDA targets without a GPU and read the result")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma list of compute capabilities")
    ap.add_argument("--dtype", default=",".join(DTYPES), help="comma list of " + ",".join(DTYPES))
    ap.add_argument("--vocab", default=",".join(map(str, VOCABS)), help="comma list of vocabulary sizes V")
    ap.add_argument("--layout", default="contiguous",
                    help="comma list of " + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()))
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes")
    ap.add_argument("--check", action="store_true", help="exit 1 if any row has a problem (see problems())")
    ap.add_argument("--out", default=None, help="also write the table as markdown to this file")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    dtypes = args.dtype.split(",")
    vocabs = [int(v) for v in args.vocab.split(",")]
    layouts = args.layout.split(",")
    for knob, names, allowed in (("--dtype", dtypes, DTYPES), ("--layout", layouts, LAYOUTS)):
        bad = [n for n in names if n not in allowed]
        if bad:
            raise SystemExit(f"error: {knob}: unknown {bad}; choose from {list(allowed)}")
    n_launches = len(launches(8, torch.float32))
    jobs = [(a, d, V, layout, i) for layout in layouts for V in vocabs for d in dtypes for a in archs
            for i in range(n_launches)]
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_job, jobs))

    header = (f"compiler output, not a timing | {datetime.date.today()} | triton {triton.__version__} | "
              f"torch {torch.__version__} | layout {args.layout} | N = {N} rows")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows]
    failures = [f"{r['kernel']} {r['variant']} sm_{r['arch']} {r['dtype']} V={r['V']} {r['layout']}: {p}"
                for r in rows for p in problems(r)]
    print(header)
    print("\n".join(lines))
    print(f"{len(rows)} kernels compiled, {len(failures)} problems")
    for f in failures:
        print("PROBLEM", f)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + "\n".join(lines) + "\n")
    if args.check and failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
