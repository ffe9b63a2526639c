"""
How every kernel lays out and walks its rows: logits as an (A, B, V) view, the chunk size, chunks that start on
16-byte boundaries, and gradients allocated in step with the logits they belong to.

Why 16-byte boundaries: a memory-bound kernel needs wide loads. The GPU reads at most 16 bytes per thread per
instruction (`ld.global.v4.b32`: 8 bf16 or 4 fp32), and Triton emits that only where it can prove the address
16-byte aligned and the mask constant across the 16 bytes. What it knows comes from the JIT's specialisation:
a pointer argument whose address is a multiple of 16, an integer argument that is a multiple of 16 (see
kernels/aot.py). Walking a row from its first column with the mask `col < V` proves nothing at GPT-2's
V = 50257: row r of bf16 logits starts at byte 2 * 50257 * r, and such a walk reads every logit 2 bytes at a time
(kernels/BENCHMARK.md has the compiler's rows for it and for the walk below).

So a row is walked in BLOCK-wide chunks laid on a grid anchored at its first 16-byte boundary (chunk_grid()):

            chunk 0         chunk 1         chunk 2                   last chunk
        |---------------|---------------|---------------|  ...  |---------------|
                     |<------------------------ the row ------------------>|
        ^ first      ^ head                                                 ^ end

chunk 1 starts on the row's first 16-byte boundary, so chunk 0 holds only the row's first < VEC columns (VEC = 16 /
element size), and there is no chunk 0 when the row starts on a boundary.

Only the chunks holding the row's two ends are masked (as flash-attention's EVEN_K masks only the last, partial
block); every chunk between them is loaded without a mask from an address the compiler itself can prove aligned:
the row start rounded up to a multiple of VEC is a product with VEC, and the JIT marked the pointer. Nothing
is promised with tl.multiple_of, so a wrong assumption costs speed (scalar loads), never a misaligned access.

Two things make the proof hold beyond contiguous logits:
- The pointer. The JIT only knows about the pointer it is handed, and a slice such as PPO's logits[:, P-1:-1]
  starts (P - 1) * V elements into its buffer, off a 16-byte boundary for most V. So a kernel is handed the
  slice's address rounded down to 16 bytes (when its storage reaches back that far) and the element offset
  `start` of the slice from there (addressing()).
- The other tensors a kernel touches at the same columns (the reference logits y, the gradients) must sit at the
  same 16-byte phase for their loads and stores to be wide too. Each is addressed as x's row offset plus a
  "shift", shift_0 + a * shift_a + b * shift_b: its start and strides minus x's (addressing_like()). When the
  shifts are multiples of 16 (0 when the layouts match) the JIT says so and the compiler proves the phase;
  gradients are allocated so that they are (grad_rows()).

What every forward keeps while it walks a row is the online softmax (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax", arXiv:1805.02867), under the same names in all three kernels (kl.py walks two rows, x's
and y's, and suffixes each name with _x or _y):

    m       running max of the raw logits seen so far (-inf until the first finite one); m_new: after this chunk
    shift   m_new, or 0 while m_new is still -inf (a masked chunk, a vocabulary slice banned with -inf):
            exp(-inf - -inf) would be NaN. A NaN logit still makes d NaN through exp, whatever max did with it
    alpha   exp((m - shift) / T): rescales what was summed under the old max to the new one (0 while m is -inf)
    u       (x - shift) / T, the chunk's logits relative to the max (T = 1 in cross_entropy.py)
    d       sum_j exp(u_j) over the columns seen so far
    logd    log d, saved with m for the backward, which recomputes p_j = exp((x_j - m) / T - logd) from the two

The max is subtracted before dividing by T: x - m is exact for the logits that matter, whereas x / T rounded at
|x| ~ 1e4 is already off by ulp(|x| / T) ~ 1e-3 before anything is subtracted.

Row offsets are int64 (program_id(0).to(tl.int64)): with N = 32k tokens and V = 128k, row * stride passes 2**31, and
an int32 product wraps negative and reads memory before the tensor (the bug DeepSpeed PR #8591 fixed in its Triton
kernels). A target or token column is loaded masked to the row, so an out-of-range index (on CUDA check_indices
reports it asynchronously) never reads outside it.
"""

import torch

from kernels import _dispatch
from kernels._dispatch import tl, triton


def as_rows(x: torch.Tensor):
    """(..., V) -> (A, B, V) view with last stride 1; row r = (r // B, r % B) sits at
    (r // B) * stride(0) + (r % B) * stride(1), so kernels take two row strides.

    Two strides instead of one cover the common training layouts without a copy: contiguous logits, a column
    slice (row stride != V), and logits[:, :-1] (the last position predicts nothing), whose (B, T-1) rows cannot
    collapse to a single stride. Only more than two leading dims that cannot merge (rare), or a last stride
    != 1, cost a copy.
    """
    V = x.shape[-1]
    if V > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, V)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.flatten(0, -3)  # a view when the outer leading dims merge, else a copy


def launch_config(n_cols, block=None):
    """(BLOCK, num_warps) for a one-program-per-row kernel that loops over a row of n_cols in BLOCK chunks.
    `block` forces the chunk size (tests use it to exercise the multi-chunk loop on small rows)."""
    # BLOCK: the whole row when it fits, else 4096-column chunks. 4096 fp32 over 8 warps is 16 values per thread:
    # enough loads in flight to saturate HBM without spilling registers; a bigger chunk only adds register
    # pressure, a smaller one adds loop trips. The loop makes any V (1, odd, > 65536) work with one kernel.
    BLOCK = block or min(triton.next_power_of_2(n_cols), 4096)
    assert BLOCK & (BLOCK - 1) == 0, f"BLOCK must be a power of two, got {BLOCK}"
    # one warp per 512 columns (16 per thread), between 1 and 8: more warps than that would idle on short rows
    num_warps = max(1, min(8, BLOCK // 512))
    return BLOCK, num_warps


def _aligned(t3):
    """(view, start): a view whose data_ptr() is t3's rounded down to 16 bytes, t3's first element `start` elements
    after it; (t3, 0) when t3 is aligned already or its storage begins after that boundary."""
    address, size = t3.data_ptr(), t3.element_size()
    start = address % 16 // size
    if start == 0 or address % size or start > t3.storage_offset():
        return t3, 0
    return t3.as_strided((1,), (1,), t3.storage_offset() - start), start


def addressing(x3):
    """The kernel arguments (x_ptr, x_start, x_stride_a, x_stride_b) of an (A, B, V) view: row r of x3 is
    x_ptr[x_start + (r // B) * x_stride_a + (r % B) * x_stride_b :][:V], with x_ptr 16-byte aligned when x3's
    storage allows (see the docstring)."""
    view, start = _aligned(x3)
    return view, start, x3.stride(0), x3.stride(1)


def addressing_like(t3, x3):
    """The kernel arguments (t_ptr, t_shift_0, t_shift_a, t_shift_b) that address the rows of t3, shaped like x3,
    from x3's row offsets: t3's start and strides minus x3's (see the docstring)."""
    view, start = _aligned(t3)
    return view, start - _aligned(x3)[1], t3.stride(0) - x3.stride(0), t3.stride(1) - x3.stride(1)


def grad_rows(x3, dtype):
    """An uninitialized (A, B, V) gradient for x3 whose rows sit at their x3 row's 16-byte phase.

    Contiguous x3 gets a contiguous buffer. Otherwise (a slice such as logits[:, P-1:-1]) it starts at x3's offset
    from a 16-byte boundary and each stride is the smallest >= the contiguous one that is congruent to x3's modulo
    16, so that addressing_like(dx, x3) has shifts that are multiples of 16 and the gradient stores are as wide as
    the logit loads; the cost is at most 15 unused elements per row and 7 before the first.
    """
    A, B, V = x3.shape
    start = _aligned(x3)[1]
    stride_b = V + (x3.stride(1) - V) % 16
    stride_a = B * stride_b + (x3.stride(0) - B * stride_b) % 16
    buffer = _dispatch.empty(start + A * stride_a, dtype=dtype, device=x3.device)
    return buffer.as_strided((A, B, V), (stride_a, stride_b, 1), start)


# -----------------------------------------------------------------------------
# in-kernel helpers (inlined by Triton into each kernel)

@triton.jit
def offset(row, n_inner, start, stride_a, stride_b):
    """Element offset of row `row` of an (A, n_inner, V) view: start + (row // n_inner, row % n_inner) . strides
    (or, given shifts, the difference between two tensors' offsets)."""
    return start + (row // n_inner) * stride_a + (row % n_inner) * stride_b


@triton.jit
def chunk_grid(lo, x_ptr, BLOCK: tl.constexpr):
    """(first, head) for a row that begins at x_ptr[lo]: the row's chunks are x_ptr[first + k * BLOCK + (0..BLOCK-1)],
    a grid anchored at the row's first 16-byte boundary and reaching back over the < VEC columns before it, and the
    row begins `head` columns into the grid (int32; < BLOCK unless BLOCK < VEC)."""
    VEC = 128 // x_ptr.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
    aligned = (lo + VEC - 1) // VEC * VEC
    first = aligned - tl.cdiv(aligned - lo, BLOCK) * BLOCK
    return first, (lo - first).to(tl.int32)


@triton.jit
def in_row(off, head, end, BLOCK: tl.constexpr):
    """Which columns of the chunk at grid offset `off` lie in the row [head, end): a (BLOCK,) mask."""
    cols = tl.arange(0, BLOCK)
    return (cols >= head - off) & (cols < end - off)


@triton.jit
def load_chunk(ptr, off, head, end, BLOCK: tl.constexpr):
    """ptr[off : off + BLOCK] as fp32, -inf outside the row [head, end). Unmasked unless the chunk holds a row end.
    -inf, not 0, pads: a 0 would add exp(0 - m) per phantom column to a softmax sum (verl PR #5349)."""
    ptr += off
    if (off < head) | (off + BLOCK > end):
        x = tl.load(ptr + tl.arange(0, BLOCK), mask=in_row(off, head, end, BLOCK), other=float("-inf"))
    else:
        x = tl.load(ptr + tl.arange(0, BLOCK))
    return x.to(tl.float32)


@triton.jit
def store_chunk(ptr, off, head, end, value, BLOCK: tl.constexpr):
    """ptr[off : off + BLOCK] = value inside the row [head, end), in ptr's dtype. Unmasked unless at a row end."""
    ptr += off
    value = value.to(ptr.dtype.element_ty)
    if (off < head) | (off + BLOCK > end):
        tl.store(ptr + tl.arange(0, BLOCK), value, mask=in_row(off, head, end, BLOCK))
    else:
        tl.store(ptr + tl.arange(0, BLOCK), value)
