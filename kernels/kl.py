"""
Per-token KL divergence between two categorical distributions given as logits, fused in one Triton
pass.

    p = softmax(x / T),  q = softmax(y / T)            x = logits, y = ref_logits, both (..., V)
    KL(p || q) = sum_i p_i (log p_i - log q_i)
               = sum_i p_i (x_i - y_i) / T  -  lse_p  +  lse_q          (sum_i p_i = 1)
    lse_p = logsumexp(x / T),  lse_q = logsumexp(y / T)                  -> KL is (...,) float32

The forward reads each row of x and y exactly once: it keeps running maxima m_x, m_y of the raw
logits, running sums d_x = sum exp(u_x), d_y = sum exp(u_y) with u_x = (x - m_x)/T,
u_y = (y - m_y)/T, and s = sum exp(u_x) u with u = u_x - u_y, rescaling them whenever a chunk
raises a maximum (online softmax, Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax", arXiv:1805.02867; the names and the -inf guard are those of kernels/_rows.py, with _x and
_y for the two rows). Since log p_i - log q_i = u_i - log(d_x / d_y),
    KL = s / d_x - log(d_x / d_y).
Only five floats per row (m_x, log d_x, m_y, log d_y, s / d_x) are saved for the backward, which
recomputes p and q from the logits instead of storing an (N, V) probability matrix.
Precision: nothing of the size of the logits is subtracted after rounding. u is formed relative to
the maxima, not as (x - y)/T with the maxima taken out at the end: under offsets softmax ignores
(x + 12, y - 6), sum p (x - y)/T and (m_x - m_y)/T would be ~18 each, and their fp32 rounding puts
a KL of 1 off float64 by 3e-6 to 5e-6, 2.5 to 6 times torch's log_softmax route; this form is off
by 3e-7 to 4e-7 (test_kl_of_one_under_offsets in tests/test_kernels_kl.py). The normalizers enter
as one log of their ratio, not log d_x - log d_y (each up to log V ~ 11). lse is kept split as
(m, log d), so p_i = exp((x_i - m_x)/T - log d_x) never rounds an lse ~ 1e4 (spacing 1e-3); and x/T
is never rounded before the max is subtracted (at T != 1 that alone costs ulp(|x|/T) per logit).

Which KL you get depends on argument order: token_kl(policy, ref) is KL(policy || ref), the usual
PPO/RLHF penalty; the forward KL to a base model is token_kl(base_logits, logits).
Conventions, as in the float64 math: a p_i = 0 (x_i = -inf) term contributes 0; q_i = 0 where
p_i > 0 gives KL = +inf; a NaN anywhere in a row makes that row's KL NaN.

Memory traffic per row: forward reads 2V elements; backward reads 2V and writes V per requested
gradient. The PyTorch version also writes and re-reads six (N, V) fp32 temporaries (x/T, y/T, logp,
logq, diff, p * diff), ~48 bytes per logit against the kernel's 2s (s = input element size), and
autograd keeps four of them alive until the backward.
"""

import torch
import torch.nn.functional as F

from kernels import _dispatch, _rows
from kernels._dispatch import tl, triton
from kernels._rows import launch_config


# -----------------------------------------------------------------------------
# reference: the same math in plain PyTorch (CPU path and test oracle)

def token_kl_ref(logits, ref_logits, *, temperature=1.0):
    _validate(logits, ref_logits, temperature)
    # fp32 (fp64 for fp64 input, which gradcheck needs), materializing the (..., V) temporaries the
    # kernel avoids
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = F.log_softmax(logits.to(dtype) / temperature, dim=-1)        # (..., V)
    logq = F.log_softmax(ref_logits.to(dtype) / temperature, dim=-1)    # (..., V)
    # p_i = 0 contributes 0 (0 log 0 = 0); unmasked, -inf - -inf would make the row NaN. Masking the
    # difference rather than the product keeps the backward free of 0 * inf = NaN as well.
    diff = torch.where(logp == float("-inf"), 0.0, logp - logq)       # (..., V)
    return (logp.exp() * diff).sum(-1)


def _validate(logits, ref_logits, temperature):
    for name, x in (("logits", logits), ("ref_logits", ref_logits)):
        if not torch.is_tensor(x):
            raise ValueError(f"token_kl: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"token_kl: {name}.dtype = {x.dtype}, expected a floating dtype")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(
                f"token_kl: {name}.shape = {tuple(x.shape)}, expected (..., V) with V >= 1")
    if (logits.shape != ref_logits.shape or logits.dtype != ref_logits.dtype
            or logits.device != ref_logits.device):
        raise ValueError(
            f"token_kl: logits {tuple(logits.shape)} {logits.dtype} {logits.device} and ref_logits "
            f"{tuple(ref_logits.shape)} {ref_logits.dtype} {ref_logits.device} "
            "must match in shape, dtype, device")
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature < float("inf")):
        raise ValueError(f"token_kl: temperature = {temperature!r}, expected a finite number > 0")


# -----------------------------------------------------------------------------
# Triton kernels: one program per row

@triton.jit
def _kl_fwd_kernel(x_ptr, x_start, x_stride_a, x_stride_b, y_ptr, y_shift_0, y_shift_a, y_shift_b,
                   n_inner, kl_ptr, mean_ptr, max_x_ptr, logd_x_ptr, max_y_ptr, logd_y_ptr, n_cols,
                   inv_temp, BLOCK: tl.constexpr):
    # int64 row offsets, and the online softmax below: kernels/_rows.py
    row = tl.program_id(0).to(tl.int64)
    first, head = _rows.chunk_grid(_rows.offset(row, n_inner, x_start, x_stride_a, x_stride_b),
                                   x_ptr, BLOCK)
    # x's row is x_ptr[head : end] (chunk_grid); y's row, addressed through its shifts, is
    # y_ptr[head : end]
    x_ptr += first
    y_ptr += first + _rows.offset(row, n_inner, y_shift_0, y_shift_a, y_shift_b)
    end = head + n_cols

    m_x = tl.full([], float("-inf"), tl.float32)
    m_y = tl.full([], float("-inf"), tl.float32)
    d_x = tl.zeros([], tl.float32)
    d_y = tl.zeros([], tl.float32)
    s = tl.zeros([], tl.float32)                   # sum exp(u_x) u,  u = u_x - u_y
    for off in range(0, end, BLOCK):
        x = _rows.load_chunk(x_ptr, off, head, end, BLOCK)  # -inf outside the row
        y = _rows.load_chunk(y_ptr, off, head, end, BLOCK)
        m_x_new = tl.maximum(m_x, tl.max(x, axis=0))
        m_y_new = tl.maximum(m_y, tl.max(y, axis=0))
        shift_x = tl.where(m_x_new == float("-inf"), 0.0, m_x_new)
        shift_y = tl.where(m_y_new == float("-inf"), 0.0, m_y_new)
        alpha_x = tl.exp((m_x - shift_x) * inv_temp)
        alpha_y = tl.exp((m_y - shift_y) * inv_temp)
        u_x = (x - shift_x) * inv_temp
        u_y = (y - shift_y) * inv_temp
        e_x = tl.exp(u_x)
        # p_i = 0 (x = -inf, incl. outside the row) adds 0, not 0 * inf = NaN. q_i = 0 under p_i > 0
        # adds +inf explicitly, because e_x may have underflowed to 0 even though p_i > 0
        # mathematically.
        term = tl.where(x == float("-inf"), 0.0,
                        tl.where(y == float("-inf"), float("inf"), e_x * (u_x - u_y)))
        # with the new maxima, the u of the columns seen so far moves by
        # (shift_y - m_y)/T - (shift_x - m_x)/T; d_x == 0 (no finite x yet) means there is nothing
        # to move, and the where keeps -inf - -inf out
        moved = tl.where(d_x > 0,
                         d_x * ((shift_y - m_y) * inv_temp - (shift_x - m_x) * inv_temp),
                         0.0)
        s = (s + moved) * alpha_x + tl.sum(term, axis=0)
        d_x = d_x * alpha_x + tl.sum(e_x, axis=0)
        d_y = d_y * alpha_y + tl.sum(tl.exp(u_y), axis=0)
        m_x = m_x_new
        m_y = m_y_new
    # A NaN input reaches d_x or d_y through exp(NaN) even where max() skips NaNs, so KL is NaN too.
    mean = s / d_x                                 # E_p[u], kept for the backward
    kl = mean - tl.log(d_x / d_y)
    tl.store(kl_ptr + row, kl)
    tl.store(mean_ptr + row, mean)
    tl.store(max_x_ptr + row, m_x)
    tl.store(logd_x_ptr + row, tl.log(d_x))
    tl.store(max_y_ptr + row, m_y)
    tl.store(logd_y_ptr + row, tl.log(d_y))


# Backward. With a_i = log p_i = x_i/T - lse_p, b_i = log q_i = y_i/T - lse_q,
# KL = sum_j p_j (a_j - b_j):
#   d a_j / d x_i = (delta_ij - p_i) / T,   d p_j / d x_i = p_j (delta_ij - p_i) / T,
#   d b_j / d y_i likewise
#   dKL/dx_i = sum_j p_j (delta_ij - p_i)(a_j - b_j)/T + sum_j p_j (delta_ij - p_i)/T
#            = p_i (a_i - b_i - KL) / T   (the second sum is (p_i - p_i)/T = 0)
#            = p_i (u_i - E_p[u]) / T     (a_i - b_i = u_i - log(d_x / d_y), the constant cancels)
#   dKL/dy_i = -sum_j p_j (delta_ij - q_i) / T = (q_i - p_i) / T
# with u_i = (x_i - m_x)/T - (y_i - m_y)/T as in the forward. The last form of dKL/dx avoids
# lse_p - lse_q - KL, a difference of numbers of the size of the logits: with |logits| ~ 1e4 it
# would lose ~1e-3 of absolute accuracy in every p_i-weighted term. Both need p and q, so both
# logits are read once; each requested gradient is written once, in the input dtype, scaled by the
# upstream gradient g of that row.
@triton.jit
def _kl_bwd_kernel(x_ptr, x_start, x_stride_a, x_stride_b, y_ptr, y_shift_0, y_shift_a, y_shift_b,
                   n_inner, dx_ptr, dx_shift_0, dx_shift_a, dx_shift_b, dy_ptr, dy_shift_0,
                   dy_shift_a, dy_shift_b, dkl_ptr, dkl_stride, mean_ptr, max_x_ptr, logd_x_ptr,
                   max_y_ptr, logd_y_ptr, n_cols, inv_temp, NEED_DX: tl.constexpr,
                   NEED_DY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 row offsets: kernels/_rows.py
    first, head = _rows.chunk_grid(_rows.offset(row, n_inner, x_start, x_stride_a, x_stride_b),
                                   x_ptr, BLOCK)
    # from here on each row is ptr[head : end], as in the forward
    x_ptr += first
    y_ptr += first + _rows.offset(row, n_inner, y_shift_0, y_shift_a, y_shift_b)
    dx_ptr += first + _rows.offset(row, n_inner, dx_shift_0, dx_shift_a, dx_shift_b)
    dy_ptr += first + _rows.offset(row, n_inner, dy_shift_0, dy_shift_a, dy_shift_b)
    end = head + n_cols
    g = tl.load(dkl_ptr + row * dkl_stride) * inv_temp
    mean = tl.load(mean_ptr + row)
    m_x = tl.load(max_x_ptr + row)
    logd_x = tl.load(logd_x_ptr + row)
    m_y = tl.load(max_y_ptr + row)
    logd_y = tl.load(logd_y_ptr + row)
    for off in range(0, end, BLOCK):
        x = _rows.load_chunk(x_ptr, off, head, end, BLOCK)  # raw, as in the forward
        y = _rows.load_chunk(y_ptr, off, head, end, BLOCK)
        u_x = (x - m_x) * inv_temp  # log p + logd_x
        u_y = (y - m_y) * inv_temp  # log q + logd_y
        p = tl.exp(u_x - logd_x)
        if NEED_DX:
            # p_i = 0 has zero gradient; unmasked it would be 0 * (-inf - ...) = NaN
            dx = tl.where(u_x == float("-inf"), 0.0, p * ((u_x - u_y) - mean)) * g
            _rows.store_chunk(dx_ptr, off, head, end, dx, BLOCK)
        if NEED_DY:
            _rows.store_chunk(dy_ptr, off, head, end, (tl.exp(u_y - logd_y) - p) * g, BLOCK)


# -----------------------------------------------------------------------------
# launchers: validate, allocate, launch

def _kl_forward(x3, y3, temperature, block):
    """x3, y3 (A, B, V) with unit last stride (N = A * B rows) -> kl (N,) fp32 and the backward's
    five (N,) fp32 row statistics: E_p[u] with u = (x - max x)/T - (y - max y)/T, max x,
    log sum exp((x - max x)/T), and the same two for y."""
    A, B, V = x3.shape
    N = A * B
    assert y3.shape == x3.shape, \
        f"ref_logits rows {tuple(y3.shape)} != logits rows {tuple(x3.shape)}"
    assert V == 1 or x3.stride(2) == y3.stride(2) == 1, \
        f"rows must be unit-stride, got {x3.stride()}, {y3.stride()}"
    kl = _dispatch.empty(N, dtype=torch.float32, device=x3.device)
    stats = [_dispatch.empty(N, dtype=torch.float32, device=x3.device) for _ in range(5)]
    if N > 0:
        BLOCK, num_warps = launch_config(V, block)
        _kl_fwd_kernel[(N,)](*_rows.addressing(x3), *_rows.addressing_like(y3, x3), B, kl, *stats,
                             V, 1.0 / temperature, BLOCK=BLOCK, num_warps=num_warps)
        _dispatch.launches["token_kl_fwd"] += 1
    return kl, stats


def _kl_backward(x3, y3, dkl, stats, temperature, block, need_dx, need_dy):
    """dkl (N,) (any stride, e.g. 0 when expanded from a sum) -> dx, dy (A, B, V) in the inputs'
    dtype, each None unless needed; both laid out in step with x3, so that they share its rows'
    16-byte phase."""
    A, B, V = x3.shape
    N = A * B
    assert dkl.shape == (N,), f"dkl shape {tuple(dkl.shape)} != ({N},)"
    # laid out in step with x3 (contiguous when it is, see _rows.grad_rows)
    dx = _rows.grad_rows(x3, x3.dtype) if need_dx else None
    dy = _rows.grad_rows(x3, y3.dtype) if need_dy else None
    if N > 0:
        BLOCK, num_warps = launch_config(V, block)
        # a gradient nobody needs is compiled out (constexpr); the other buffer stands in for its
        # pointer
        dx_args = _rows.addressing_like(dx if need_dx else dy, x3)
        dy_args = _rows.addressing_like(dy if need_dy else dx, x3)
        _kl_bwd_kernel[(N,)](*_rows.addressing(x3), *_rows.addressing_like(y3, x3), B, *dx_args,
                             *dy_args, dkl, dkl.stride(0), *stats, V, 1.0 / temperature,
                             NEED_DX=need_dx, NEED_DY=need_dy, BLOCK=BLOCK, num_warps=num_warps)
        _dispatch.launches["token_kl_bwd"] += 1
    return dx, dy


class _TokenKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, y3, temperature, block):
        kl, stats = _kl_forward(x3, y3, temperature, block)
        ctx.save_for_backward(x3, y3, *stats)  # x3, y3 are the caller's logits (views), not copies
        ctx.args = (temperature, block)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dkl):
        x3, y3, *stats = ctx.saved_tensors
        need_dx, need_dy = ctx.needs_input_grad[:2]
        dx, dy = _kl_backward(x3, y3, dkl, stats, *ctx.args, need_dx, need_dy)
        return dx, dy, None, None


# -----------------------------------------------------------------------------
# public

def token_kl(logits, ref_logits, *, temperature=1.0, _block=None):
    """KL(softmax(logits/T) || softmax(ref_logits/T)) per position: (..., V), (..., V) -> (...,)
    float32.

    Differentiable in whichever of the two inputs requires grad. Triton on CUDA (and on CPU under
    TRITON_INTERPRET=1) for float32/bfloat16/float16, the PyTorch reference otherwise. `_block`
    (private) forces the chunk size; tests use it to cover the multi-chunk path on small V.
    """
    if not _dispatch.use_kernel(logits):
        return token_kl_ref(logits, ref_logits, temperature=temperature)
    _validate(logits, ref_logits, temperature)
    x3, y3 = _rows.as_rows(logits), _rows.as_rows(ref_logits)  # (A, B, V) each, usually views
    kl = _TokenKL.apply(x3, y3, float(temperature), _block)  # (N,)
    return kl.view(logits.shape[:-1])
