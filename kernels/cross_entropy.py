"""
Fused cross-entropy over a large vocabulary, with label smoothing and z-loss.

For one row of logits x (V entries) and target t, with lse = log sum_j exp(x_j):

    nll    = lse - x_t                    (= -log softmax(x)_t)
    smooth = lse - (1/V) sum_j x_j        (= -(1/V) sum_j log softmax(x)_j, the uniform target)
    loss   = (1 - eps) * nll + eps * smooth + z * lse**2

eps is label smoothing exactly as in torch.nn.functional.cross_entropy (Szegedy et al. 2016);
z * lse**2 is the auxiliary z-loss that keeps the softmax normalizer near 1 (PaLM, Chowdhery et al.
2022, section 5).

The kernel never materializes softmax: the forward streams the row once in BLOCK-sized chunks and
keeps a running max m and a running sum d = sum_j exp(x_j - m), rescaling d whenever m grows (online
softmax, Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; the names and the
-inf guard are those of kernels/_rows.py). Only O(N) fp32 scalars are saved for backward, which
streams the row once more and writes the gradient once, in the logits' dtype. The caller's logits
are never overwritten (Liger-Kernel writes the gradient into the logits buffer in the forward; that
saves memory but silently corrupts logits anyone else still holds).

Memory traffic per row: forward reads V elements; backward reads V and writes V. The naive PyTorch
version (float() + log_softmax + gather) also writes and re-reads (N, V) fp32 intermediates, each
twice the bytes of bf16 logits.
"""

import torch

from kernels import _dispatch, _rows
from kernels._dispatch import check_indices, check_logits, tl, triton
from kernels._rows import launch_config

REDUCTIONS = ("mean", "sum", "none")


# -----------------------------------------------------------------------------
# reference: the same math in plain PyTorch (CPU path and test oracle)

def cross_entropy_ref(logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                      z_loss=0.0):
    _validate(logits, targets, ignore_index, reduction, label_smoothing, z_loss)
    # materializes (..., V) in fp32 (fp64 if given fp64): 4 bytes per logit, the cost the
    # kernel avoids
    x = logits.double() if logits.dtype == torch.float64 else logits.float()  # (..., V)
    lse = torch.logsumexp(x, dim=-1)  # (...,)
    valid = targets != ignore_index  # (...,)
    safe_t = torch.where(valid, targets, 0).long()
    loss = (1.0 - label_smoothing) * (lse - x.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1))
    if label_smoothing:
        loss = loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    return _reduce(loss, valid, reduction)


def _reduce(loss, valid, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # mean over non-ignored tokens; an all-ignored batch gives 0 (torch gives NaN), so a micro-batch
    # that is all padding contributes nothing instead of poisoning the step. The count stays a
    # tensor: no host sync.
    return loss.sum() / valid.sum().clamp(min=1)


def _validate(logits, targets, ignore_index, reduction, label_smoothing, z_loss):
    check_logits(logits, targets, what="targets")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}, expected one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss={z_loss} must be >= 0")
    check_indices(targets, logits.shape[-1], ignore_index, what="targets")


# -----------------------------------------------------------------------------
# Triton kernels: one program per row

@triton.jit
def _ce_fwd_kernel(x_ptr, x_start, x_stride_a, x_stride_b, n_inner, t_ptr, loss_ptr, max_ptr,
                   logd_ptr, n_cols, ignore_index, eps, z_loss, SMOOTH: tl.constexpr,
                   BLOCK: tl.constexpr):
    # int64 row offsets, and the online softmax below: kernels/_rows.py
    row = tl.program_id(0).to(tl.int64)
    first, head = _rows.chunk_grid(_rows.offset(row, n_inner, x_start, x_stride_a, x_stride_b),
                                   x_ptr, BLOCK)
    x_ptr += first  # the row is x_ptr[head : end] (chunk_grid)
    end = head + n_cols
    t = tl.load(t_ptr + row)

    m = tl.zeros([], dtype=tl.float32) + float("-inf")
    d = tl.zeros([], dtype=tl.float32)
    sum_x = tl.zeros([], dtype=tl.float32)  # sum_j x_j, for label smoothing
    for off in range(0, end, BLOCK):
        x = _rows.load_chunk(x_ptr, off, head, end, BLOCK)  # -inf outside the row
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        if SMOOTH:
            sum_x += tl.sum(tl.where(_rows.in_row(off, head, end, BLOCK), x, 0.0), axis=0)
    logd = tl.log(d)

    valid = t != ignore_index
    # masked: an out-of-range target reads nothing (kernels/_rows.py)
    x_t = tl.load(x_ptr + head + t, mask=valid & (t >= 0) & (t < n_cols), other=0.0).to(tl.float32)
    # lse = m + logd is never formed for the nll: at |x| ~ 1e4 rounding m + logd to fp32 costs
    # ~5e-4, while (m - x_t) + logd keeps every digit of the small result
    loss = (1.0 - eps) * ((m - x_t) + logd)
    if SMOOTH:
        loss += eps * ((m - sum_x / n_cols) + logd)
    lse = m + logd
    loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(max_ptr + row, m)
    tl.store(logd_ptr + row, logd)


# Gradient of one row's loss, with p = softmax(x), d lse / d x_i = p_i and g the upstream gradient
# of that loss:
#   d nll    / d x_i = p_i - [i == t]
#   d smooth / d x_i = p_i - 1/V
#   d z lse^2/ d x_i = 2 z lse p_i
#   => d loss / d x_i = g * ( p_i (1 + 2 z lse) - (1 - eps) [i == t] - eps / V )
# and 0 for an ignored row. p_i is recomputed as exp((x_i - m) - logd) from the two saved scalars.
@triton.jit
def _ce_bwd_kernel(x_ptr, x_start, x_stride_a, x_stride_b, n_inner, dx_ptr, dx_shift_0, dx_shift_a,
                   dx_shift_b, t_ptr, dloss_ptr, dloss_stride, max_ptr, logd_ptr, n_cols,
                   ignore_index, eps, z_loss, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 row offsets: kernels/_rows.py
    first, head = _rows.chunk_grid(_rows.offset(row, n_inner, x_start, x_stride_a, x_stride_b),
                                   x_ptr, BLOCK)
    x_ptr += first  # the row is x_ptr[head : end], and dx's is dx_ptr[head : end]
    dx_ptr += first + _rows.offset(row, n_inner, dx_shift_0, dx_shift_a, dx_shift_b)
    end = head + n_cols
    t = tl.load(t_ptr + row)
    # the target's column in the chunk grid, int32 like the grid. An out-of-range target (on CUDA
    # reported asynchronously by check_indices) may then mark a wrong column of this row, never an
    # address outside it
    t_col = head + t.to(tl.int32)
    valid = t != ignore_index
    g = tl.load(dloss_ptr + row * dloss_stride)
    m = tl.load(max_ptr + row)
    logd = tl.load(logd_ptr + row)
    g_p = g * (1.0 + 2.0 * z_loss * (m + logd))
    g_t = g * (1.0 - eps)
    g_u = g * eps / n_cols
    for off in range(0, end, BLOCK):
        x = _rows.load_chunk(x_ptr, off, head, end, BLOCK)
        p = tl.exp((x - m) - logd)
        dx = g_p * p - g_u - tl.where(tl.arange(0, BLOCK) == t_col - off, g_t, 0.0)
        _rows.store_chunk(dx_ptr, off, head, end, tl.where(valid, dx, 0.0), BLOCK)


# -----------------------------------------------------------------------------
# launchers: validate, allocate, launch

def _ce_forward(x3, t, ignore_index, eps, z_loss):
    """x3 (A, B, V) with unit last stride (N = A * B rows), t (N,) int64 -> loss, row_max, row_logd,
    each (N,) fp32, with logsumexp = row_max + row_logd (kept apart for precision, see the
    kernel)."""
    A, B, V = x3.shape
    N = A * B
    assert V == 1 or x3.stride(2) == 1, f"rows must be unit-stride, got strides {x3.stride()}"
    assert t.shape == (N,) and t.dtype == torch.int64 and t.is_contiguous(), \
        "targets must be contiguous (N,) int64"
    loss = _dispatch.empty(N, dtype=torch.float32, device=x3.device)
    row_max = _dispatch.empty(N, dtype=torch.float32, device=x3.device)
    row_logd = _dispatch.empty(N, dtype=torch.float32, device=x3.device)
    if N > 0:
        BLOCK, num_warps = launch_config(V)
        _ce_fwd_kernel[(N,)](*_rows.addressing(x3), B, t, loss, row_max, row_logd, V, ignore_index,
                             eps, z_loss, SMOOTH=eps > 0, BLOCK=BLOCK, num_warps=num_warps)
        _dispatch.launches["cross_entropy_fwd"] += 1
    return loss, row_max, row_logd


def _ce_backward(x3, t, dloss, row_max, row_logd, ignore_index, eps, z_loss):
    """dloss (N,) (any stride, e.g. 0 when expanded from a mean) -> dx (A, B, V) in x3's dtype, laid
    out in step with x3 (see _rows.grad_rows)."""
    A, B, V = x3.shape
    N = A * B
    assert dloss.shape == (N,), f"dloss shape {tuple(dloss.shape)} != ({N},)"
    dx = _rows.grad_rows(x3, x3.dtype)  # contiguous when x3 is
    if N > 0:
        BLOCK, num_warps = launch_config(V)
        _ce_bwd_kernel[(N,)](*_rows.addressing(x3), B, *_rows.addressing_like(dx, x3), t, dloss,
                             dloss.stride(0), row_max, row_logd, V, ignore_index, eps, z_loss,
                             BLOCK=BLOCK, num_warps=num_warps)
        _dispatch.launches["cross_entropy_bwd"] += 1
    return dx


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, t, ignore_index, eps, z_loss):
        loss, row_max, row_logd = _ce_forward(x3, t, ignore_index, eps, z_loss)
        # x3 is the caller's logits (a view), not a copy
        ctx.save_for_backward(x3, t, row_max, row_logd)
        ctx.args = (ignore_index, eps, z_loss)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x3, t, row_max, row_logd = ctx.saved_tensors
        dx = _ce_backward(x3, t, dloss, row_max, row_logd, *ctx.args)
        return dx, None, None, None, None


# -----------------------------------------------------------------------------
# the path without a kernel (CPU training)

def _cross_entropy_torch(logits, targets, ignore_index, reduction, label_smoothing, z_loss):
    """float32 logits without z_loss: torch's fused F.cross_entropy, the same math as the reference
    in float32. Its log_softmax is one pass each way, where the reference's logsumexp, gather and
    where cost two to three times as long on CPU (1024 x 1024 logits, forward and backward: 1.6 ms
    against 3.6 ms, one thread). float64 (the gradcheck oracle), half precision (the reference
    upcasts; torch would round log_softmax to bf16) and z_loss take the reference."""
    if logits.dtype != torch.float32 or z_loss:
        return cross_entropy_ref(logits, targets, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing, z_loss=z_loss)
    _validate(logits, targets, ignore_index, reduction, label_smoothing, z_loss)
    V = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1).long(),
                                             reduction="none", ignore_index=ignore_index,
                                             label_smoothing=label_smoothing)  # (N,)
    return _reduce(loss.view(targets.shape), targets != ignore_index, reduction)


# -----------------------------------------------------------------------------
# public

def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0):
    """Cross-entropy of logits (..., V) against integer targets (...,), computed in fp32.

    Same semantics as torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1)) with
    ignore_index, label_smoothing and reduction, except: "mean" over zero non-ignored tokens is 0
    (not NaN); "none" returns float32 of shape (...,) with 0 at ignored positions; z_loss adds
    z_loss * logsumexp**2 per non-ignored token.
    """
    if not _dispatch.use_kernel(logits):
        return _cross_entropy_torch(logits, targets, ignore_index, reduction, label_smoothing,
                                    z_loss)
    _validate(logits, targets, ignore_index, reduction, label_smoothing, z_loss)
    x3 = _rows.as_rows(logits)  # (A, B, V), usually a view of logits
    t = targets.reshape(-1).long().contiguous()  # (N,)
    loss = _CrossEntropy.apply(x3, t, int(ignore_index), float(label_smoothing),
                               float(z_loss))  # (N,)
    return _reduce(loss.view(targets.shape), targets != ignore_index, reduction)
