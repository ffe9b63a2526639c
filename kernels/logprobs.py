"""
Per-token log-probabilities and entropies at a sampling temperature, in one pass over the
vocabulary.

For one row of logits x (V entries), temperature T, token t, y = x / T and p = softmax(y):

    logp = log p_t = y_t - lse(y)
    H    = -sum_j p_j log p_j = lse(y) - sum_j p_j y_j

Policy-gradient losses need logp of the sampled tokens (PPO's ratio) and often H (entropy bonus);
both come from the same streaming pass. With a running max m of the raw logits,
u_j = (x_j - m) / T = y_j - max(y), d = sum_j exp(u_j) and s = sum_j exp(u_j) u_j:
    lse = m / T + log d,   logp = (x_t - m) / T - log d,   H = log d - s / d,
and when the running max moves from m to m' both sums are rescaled, with alpha = exp((m - m') / T):
    d' = alpha d,   s' = alpha (s + d (m - m') / T)
(online softmax, Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", extended to
the first moment; the names and the -inf guard are those of kernels/_rows.py). Writing everything
relative to m, and dividing by T only after subtracting it, keeps rows of magnitude 1e4 exact in
fp32: nothing of size |x| is subtracted from another thing of size |x| after rounding.

Memory traffic per row: forward reads V elements; backward reads V and writes V. The PyTorch version
(log_softmax in fp32, gather, then p * logp for H) writes and re-reads several (N, V) fp32 tensors.
"""

import math

import torch

from kernels import _dispatch, _rows
from kernels._dispatch import check_indices, check_logits, tl, triton
from kernels._rows import launch_config


# -----------------------------------------------------------------------------
# reference: the same math in plain PyTorch (CPU path and test oracle)

def token_logprobs_ref(logits, tokens, *, temperature=1.0, return_entropy=False):
    _validate(logits, tokens, temperature)
    y = ((logits.double() if logits.dtype == torch.float64 else logits.float())
         / temperature)  # (..., V)
    logp_all = torch.log_softmax(y, dim=-1)  # (..., V)
    logp = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (...,)
    if not return_entropy:
        return logp
    p = logp_all.exp()  # (..., V)
    # 0 * log 0 = 0: a -inf logit (a banned token) has p = 0 and must contribute nothing, not NaN.
    # where() keeps the gradient finite too (its unused branch gets a zero gradient, and 0 * -inf
    # never happens).
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(dim=-1)  # (...,)
    return logp, entropy


def _validate(logits, tokens, temperature):
    check_logits(logits, tokens, what="tokens")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 "
                         "(greedy decoding has no logprobs)")
    check_indices(tokens, logits.shape[-1], what="tokens")


# -----------------------------------------------------------------------------
# Triton kernels: one program per row

@triton.jit
def _logprobs_fwd_kernel(x_ptr, x_start, x_stride_a, x_stride_b, n_inner, t_ptr, logp_ptr, ent_ptr,
                         max_ptr, logd_ptr, n_cols, inv_temp, ENTROPY: tl.constexpr,
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
    s = tl.zeros([], dtype=tl.float32)  # sum_j exp(u_j) u_j, for the entropy
    for off in range(0, end, BLOCK):
        x = _rows.load_chunk(x_ptr, off, head, end, BLOCK)  # -inf outside the row
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp((m - shift) * inv_temp)
        u = (x - shift) * inv_temp  # y - max(y)
        e = tl.exp(u)
        if ENTROPY:
            # the where()s turn 0 * -inf into 0 * 0: e == 0 for a -inf logit, and d == 0 while m is
            # still -inf. A NaN logit makes e NaN, which survives the product.
            s = alpha * (s + d * tl.where(d > 0, (m - shift) * inv_temp, 0.0))
            s += tl.sum(e * tl.where(e > 0, u, 0.0), axis=0)
        d = d * alpha + tl.sum(e, axis=0)
        m = m_new
    logd = tl.log(d)

    # masked: an out-of-range token reads nothing (kernels/_rows.py)
    x_t = tl.load(x_ptr + head + t, mask=(t >= 0) & (t < n_cols), other=0.0).to(tl.float32)
    tl.store(logp_ptr + row, (x_t - m) * inv_temp - logd)
    if ENTROPY:
        tl.store(ent_ptr + row, logd - s / d)
    tl.store(max_ptr + row, m)
    tl.store(logd_ptr + row, logd)


# Gradients, with y = x / T, p = softmax(y), log p_i = (x_i - m) / T - logd, and g, h the upstream
# gradients of logp and H:
#   d logp / d y_i = [i == t] - p_i
#   d H    / d y_i = -sum_j (log p_j + 1) p_j ([i == j] - p_i) = -p_i (log p_i + H)
#   d y_i  / d x_i = 1 / T
#   => d / d x_i = ( g ([i == t] - p_i) - h p_i (log p_i + H) ) / T
# with p_i (log p_i + H) := 0 where p_i = 0 (a -inf logit), the limit of p log p.
@triton.jit
def _logprobs_bwd_kernel(x_ptr, x_start, x_stride_a, x_stride_b, n_inner, dx_ptr, dx_shift_0,
                         dx_shift_a, dx_shift_b, t_ptr, dlogp_ptr, dlogp_stride, dent_ptr,
                         dent_stride, ent_ptr, max_ptr, logd_ptr, n_cols, inv_temp,
                         HAS_DLOGP: tl.constexpr, HAS_DENT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 row offsets: kernels/_rows.py
    first, head = _rows.chunk_grid(_rows.offset(row, n_inner, x_start, x_stride_a, x_stride_b),
                                   x_ptr, BLOCK)
    x_ptr += first  # the row is x_ptr[head : end], and dx's is dx_ptr[head : end]
    dx_ptr += first + _rows.offset(row, n_inner, dx_shift_0, dx_shift_a, dx_shift_b)
    end = head + n_cols
    t = tl.load(t_ptr + row)
    # the token's column in the chunk grid (int32, as in cross_entropy.py)
    t_col = head + t.to(tl.int32)
    m = tl.load(max_ptr + row)
    logd = tl.load(logd_ptr + row)
    g = tl.zeros([], dtype=tl.float32)
    h = tl.zeros([], dtype=tl.float32)
    H = tl.zeros([], dtype=tl.float32)
    if HAS_DLOGP:
        g = tl.load(dlogp_ptr + row * dlogp_stride)
    if HAS_DENT:
        h = tl.load(dent_ptr + row * dent_stride)
        H = tl.load(ent_ptr + row)
    for off in range(0, end, BLOCK):
        x = _rows.load_chunk(x_ptr, off, head, end, BLOCK)
        logp = (x - m) * inv_temp - logd
        p = tl.exp(logp)
        dy = tl.where(tl.arange(0, BLOCK) == t_col - off, g, 0.0) - g * p
        if HAS_DENT:
            dy -= h * p * tl.where(p > 0, logp + H, 0.0)
        _rows.store_chunk(dx_ptr, off, head, end, dy * inv_temp, BLOCK)


# -----------------------------------------------------------------------------
# launchers: validate, allocate, launch

def _logprobs_forward(x3, t, temperature, entropy):
    """x3 (A, B, V) with unit last stride (N = A * B rows), t (N,) int64 -> logp, ent (None unless
    `entropy`), row_max, row_logd, each (N,) fp32: row_max is the max of the raw logits and
    row_logd = log sum_j exp((x_j - row_max) / T), so that
    logsumexp(x / T) = row_max / T + row_logd."""
    A, B, V = x3.shape
    N = A * B
    assert V == 1 or x3.stride(2) == 1, f"rows must be unit-stride, got strides {x3.stride()}"
    assert t.shape == (N,) and t.dtype == torch.int64 and t.is_contiguous(), \
        "tokens must be contiguous (N,) int64"
    logp = _dispatch.empty(N, dtype=torch.float32, device=x3.device)
    ent = _dispatch.empty(N, dtype=torch.float32, device=x3.device) if entropy else None
    row_max = _dispatch.empty(N, dtype=torch.float32, device=x3.device)
    row_logd = _dispatch.empty(N, dtype=torch.float32, device=x3.device)
    if N > 0:
        BLOCK, num_warps = launch_config(V)
        # without entropy the ENTROPY=False kernel never touches ent_ptr; logp stands in for the
        # pointer
        ent_arg = ent if entropy else logp
        _logprobs_fwd_kernel[(N,)](*_rows.addressing(x3), B, t, logp, ent_arg, row_max, row_logd, V,
                                   1.0 / temperature, ENTROPY=entropy, BLOCK=BLOCK,
                                   num_warps=num_warps)
        _dispatch.launches["token_logprobs_fwd"] += 1
    return logp, ent, row_max, row_logd


def _logprobs_backward(x3, t, dlogp, dent, ent, row_max, row_logd, temperature):
    """dlogp, dent (N,) or None (any stride) -> dx (A, B, V) in x3's dtype, laid out in step with x3
    (see _rows.grad_rows)."""
    A, B, V = x3.shape
    N = A * B
    dx = _rows.grad_rows(x3, x3.dtype)  # contiguous when x3 is
    if N > 0:
        BLOCK, num_warps = launch_config(V)
        # a missing gradient's term is compiled out (constexpr); row_max stands in for its pointers,
        # never read
        has_dlogp, has_dent = dlogp is not None, dent is not None
        dlogp = dlogp if has_dlogp else row_max
        dent, ent = (dent, ent) if has_dent else (row_max, row_max)
        _logprobs_bwd_kernel[(N,)](*_rows.addressing(x3), B, *_rows.addressing_like(dx, x3), t,
                                   dlogp, dlogp.stride(0), dent, dent.stride(0), ent, row_max,
                                   row_logd, V, 1.0 / temperature, HAS_DLOGP=has_dlogp,
                                   HAS_DENT=has_dent, BLOCK=BLOCK, num_warps=num_warps)
        _dispatch.launches["token_logprobs_bwd"] += 1
    return dx


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, t, temperature, entropy):
        logp, ent, row_max, row_logd = _logprobs_forward(x3, t, temperature, entropy)
        # x3 is the caller's logits (a view), not a copy
        ctx.save_for_backward(x3, t, ent, row_max, row_logd)
        ctx.temperature = temperature
        # an output nobody differentiates arrives as None instead of a zero tensor, and its term is
        # compiled out
        ctx.set_materialize_grads(False)
        return (logp, ent) if entropy else logp

    @staticmethod
    def backward(ctx, dlogp, dent=None):
        x3, t, ent, row_max, row_logd = ctx.saved_tensors
        if dlogp is None and dent is None:
            return None, None, None, None
        dx = _logprobs_backward(x3, t, dlogp, dent, ent, row_max, row_logd, ctx.temperature)
        return dx, None, None, None


# -----------------------------------------------------------------------------
# public

def token_logprobs(logits, tokens, *, temperature=1.0, return_entropy=False):
    """log_softmax(logits / temperature)[..., token] for logits (..., V) and tokens (...,) -> (...,)
    float32.

    With return_entropy=True also returns the entropy of softmax(logits / temperature) per position,
    from the same pass over the logits: (logp, entropy). Both outputs are differentiable.
    """
    if not _dispatch.use_kernel(logits):
        return token_logprobs_ref(logits, tokens, temperature=temperature,
                                  return_entropy=return_entropy)
    _validate(logits, tokens, temperature)
    x3 = _rows.as_rows(logits)  # (A, B, V), usually a view of logits
    t = tokens.reshape(-1).long().contiguous()  # (N,)
    out = _TokenLogprobs.apply(x3, t, float(temperature), bool(return_entropy))
    if return_entropy:
        logp, ent = out
        return logp.view(tokens.shape), ent.view(tokens.shape)
    return out.view(tokens.shape)
