"""
The runtime: device, data parallel (torchrun), bf16 autocast, TF32 and CPU memory reuse in one `Runtime`, and
the collectives both training scripts use (the gradient all-reduce, sums and maxima over ranks, the weights-in-sync
invariant). Every collective is a no-op in a single process.
"""

import ctypes
import dataclasses
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanopost.config import UserError


@dataclasses.dataclass
class Runtime:
    device: str       # "cpu", "cuda" or "cuda:N" (this rank's GPU under torchrun)
    rank: int
    local_rank: int
    world_size: int
    bf16: bool        # bfloat16 autocast (CUDA only: CPU always runs float32)

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device={device}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={device}: CUDA is not available on this machine")
    return device


def setup_runtime(device="auto", dtype="float32"):
    """Pick the device, join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    device = resolve_device(device)
    rank, local_rank, world_size = 0, 0, 1
    if int(os.environ.get("RANK", -1)) != -1:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed on Ampere+, loss unaffected here
        torch.backends.cudnn.allow_tf32 = True
    if device == "cpu":
        keep_freed_memory()
    return Runtime(device, rank, local_rank, world_size, bf16=device.startswith("cuda") and dtype == "bfloat16")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory():
    """Keep the memory a CPU step frees for the next step, as CUDA's caching allocator does. torch's CPU tensors come
    from malloc, and glibc gives back to the OS every block above its mmap threshold and the free top of the heap
    above its trim threshold, so each step faulted its activations back in a page at a time: 2,000 to 3,000 page
    faults a step at the quick start's shape, ~1.4 us each, 2 to 4% of the step. Freed memory now stays in the
    process, which then holds its peak use until it exits. Not glibc (macOS, musl): nothing to change."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest; bigger blocks (none in the default model) still map
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def teardown(rt):
    if rt.ddp:
        # every rank arrives first: a rank that destroys the group while rank 0 still evaluates and saves aborts
        # gloo ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t):
    """Sum a tensor over ranks in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_over_ranks(values):
    """{name: scalar tensor} -> {name: float}, each summed over ranks, all of them in one collective."""
    total = all_reduce_sum(torch.stack([v.detach().double() for v in values.values()]))
    return dict(zip(values, total.tolist()))


def any_rank(flag, device):
    """Whether `flag` holds on any rank, the same answer on all: ranks that stop must stop together, else
    one would wait forever in the next collective."""
    return all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] (a one-item list in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_grads(params):
    """Sum gradients over ranks, one collective for all of them. Both scripts divide each rank's loss by the
    *global* token count, so the sum is exactly the gradient of one process holding the union of the ranks'
    batches (DDP's averaging would need a * world_size to undo)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def assert_in_sync(model, step, what):
    """Invariant under data parallel: every rank holds the same weights after an update."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    s = torch.stack([sum(p.detach().double().sum() for p in model.parameters())])
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    assert lo.item() == hi.item(), f"step {step}: {what} weights differ across ranks ({lo.item()} vs {hi.item()})"
