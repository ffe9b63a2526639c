"""
Which path a kernel call takes, and the checks every launcher shares.

    CUDA tensor + triton importable      -> compiled Triton kernel
    CPU tensor  + TRITON_INTERPRET=1     -> the same Triton kernel, run by the Triton interpreter (tests)
    anything else, float64 included      -> the pure-PyTorch reference in each op file

TRITON_INTERPRET is read once, at import, because triton itself reads it when `@triton.jit` decorates a
function; flipping it later would make this module and the decorated kernels disagree.
"""

import collections
import os
import types

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # only a missing package falls back; any other import error is a real bug and should raise
    HAS_TRITON = False
    # stand-ins so op files can still define their kernels (`@triton.jit`, `BLOCK: tl.constexpr`) at import;
    # use_triton() is then always False, so those functions are never called
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# the kernels compute in fp32, so a float64 input (gradcheck) runs the reference to keep its precision
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# kernel name -> number of launches; tests read it to prove the Triton path (not the reference) ran
launches = collections.Counter()

# tests set this True: launchers then allocate outputs filled with NaN instead of uninitialized memory, so an
# element a kernel forgets to write shows up as NaN instead of passing by luck with leftover bytes
poison = False

_warned = False


def _warn_once(msg):
    global _warned
    if not _warned:
        print(f"WARNING: {msg}")
        _warned = True


def use_triton(x: torch.Tensor) -> bool:
    """True when the op on `x` should run the Triton kernel, False when it should run the reference."""
    if not HAS_TRITON:
        if x.is_cuda or INTERPRET:
            _warn_once("triton is not importable; kernels fall back to the pure-PyTorch references")
        return False
    if x.is_cuda:
        return True
    return INTERPRET and x.device.type == "cpu"


def use_kernel(logits) -> bool:
    """True when an op on `logits` runs its Triton kernel; float64 runs the reference (e.g. for gradcheck)."""
    return torch.is_tensor(logits) and use_triton(logits) and logits.dtype in KERNEL_DTYPES


def check_logits(logits, idx, what):
    """logits: floating (..., V) with V >= 1; idx: integer tensor of logits' leading shape on the same device."""
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"logits must be a floating tensor of shape (..., V), got {_describe(logits)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have V >= 1 columns, got shape {tuple(logits.shape)}")
    if not torch.is_tensor(idx) or idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"{what} must be an integer tensor, got {_describe(idx)}")
    if idx.shape != logits.shape[:-1]:
        raise ValueError(f"{what} shape {tuple(idx.shape)} must equal logits shape without its last dim "
                         f"{tuple(logits.shape[:-1])}")
    if idx.device != logits.device:
        raise ValueError(f"{what} on {idx.device} but logits on {logits.device}")


def _describe(x):
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__


def check_indices(idx: torch.Tensor, n_cols: int, ignore_index=None, what="targets"):
    """Every entry of `idx` must be in [0, n_cols) or equal `ignore_index`.

    CUDA: torch._assert_async queues a device-side assert, so a training step never stalls on a host sync
    (a `.item()` per step costs a full pipeline drain); a bad index then aborts at the next sync with a
    CUDA error instead of a ValueError. That trade is deliberate: the kernels additionally mask their
    loads, so even before the assert fires a bad index never reads memory outside its row.
    CPU: the check is cheap and synchronous anyway, so raise a ValueError naming the first bad value and
    its position.
    """
    if idx.numel() == 0:
        return
    bad = (idx < 0) | (idx >= n_cols)
    if ignore_index is not None:
        bad &= idx != ignore_index
    if idx.is_cuda:
        torch._assert_async(~bad.any(), f"{what} out of range [0, {n_cols})")
        return
    if bad.any():
        pos = tuple(int(i) for i in bad.nonzero()[0])
        value = int(idx[pos])
        allowed = f"[0, {n_cols})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"{what}[{', '.join(map(str, pos))}] = {value} is out of range {allowed}")


def empty(*shape, dtype, device):
    """torch.empty for (floating) kernel outputs; NaN-filled while `poison` is set (see above)."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
