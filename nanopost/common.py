"""
The plumbing both training scripts share, written once so the two loops behave the same way.

  config       each script declares a dataclass of `knob(default, help, ...)` fields; `parse_config` reads
               `--key=value` overrides (type-checked, unknown keys refused, `--help` lists them all) and
               `validate` checks every knob's range before anything in out_dir is touched
  errors       `UserError` (bad input: one line `error: ...`, exit 2) and `Diverged` (a non-finite loss or
               model: exit 1, the last good checkpoint intact); `entry` turns them into that line and exit code
  runtime      device, data parallel (torchrun), bf16 autocast and TF32 in one `Runtime`; the gradient all-reduce
               and the masked means and whitening over the global batch (every rank's tokens)
  run files    one run per out_dir (a lock), checkpoints written atomically and read without executing code,
               the run log, and the resume policy: what a resume may change and what it may not
"""

import dataclasses
import fcntl
import json
import math
import os
import pickle
import random
import re
import sys
import tempfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from nanopost.model import GPT, GPTConfig


# -----------------------------------------------------------------------------
# errors

class UserError(ValueError):
    """Bad user input (a knob, a file, a checkpoint): reported as one line, no traceback, exit 2."""


class Diverged(RuntimeError):
    """Training produced a non-finite loss or model: exit 1 with out_dir/ckpt.pt still the last good one."""


def entry(main):
    """Run main(sys.argv[1:]) as a command: UserError and Diverged become one `error:` line on stderr and exit 2
    or 1; anything else is an internal bug and keeps its traceback."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


# -----------------------------------------------------------------------------
# config

def knob(default, help, *, ge=None, gt=None, lt=None, choices=None):
    """A config field: its default, one line of help, and the values it accepts (checked by `validate`)."""
    return dataclasses.field(default=default, metadata=dict(help=help, ge=ge, gt=gt, lt=lt, choices=choices))


def _parse_value(key, text, kind):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key}={text}: expected a bool (true/false)")
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"--{key}={text}: expected {kind.__name__}") from None
    if kind is float and not math.isfinite(value):
        raise UserError(f"--{key}={text}: expected a finite number")
    return value


def parse_config(cls, argv=None):
    """-> (cls() with the --key=value overrides of argv, {key: value} of the overrides given); --key alone is
    --key=true for a bool knob. --help prints every knob with its default and help, then exits."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "--help" in argv or "-h" in argv:
        print(f"{os.path.basename(sys.argv[0])} knobs (override with --key=value):")
        for f in fields.values():
            print(f"  --{f.name}={f.default!s:<24} {f.metadata.get('help', '')}")
        sys.exit(0)
    given = {}
    for arg in argv:
        if arg.startswith("--") and "=" not in arg and isinstance(getattr(fields.get(arg[2:]), "default", None), bool):
            arg += "=true"  # a bare --flag switches a bool knob on
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"bad argument {arg!r}: expected --key=value (see --help)")
        key, text = arg[2:].split("=", 1)
        if key not in fields:
            raise UserError(f"unknown knob --{key} (see --help for the list)")
        given[key] = _parse_value(key, text, type(fields[key].default))
    return cls(**given), given


def validate(cfg):
    """Check every knob against the range its `knob(...)` declares; the error names the knob and the value."""
    for f in dataclasses.fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if m.get("choices") is not None and value not in m["choices"]:
            raise UserError(f"--{f.name}={value}: expected one of {', '.join(map(str, m['choices']))}")
        if m.get("ge") is not None and value < m["ge"]:
            raise UserError(f"--{f.name}={value}: must be >= {m['ge']}")
        if m.get("gt") is not None and value <= m["gt"]:
            raise UserError(f"--{f.name}={value}: must be > {m['gt']}")
        if m.get("lt") is not None and value >= m["lt"]:
            raise UserError(f"--{f.name}={value}: must be < {m['lt']}")


# -----------------------------------------------------------------------------
# runtime: device, data parallel, autocast

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
    return Runtime(device, rank, local_rank, world_size, bf16=device.startswith("cuda") and dtype == "bfloat16")


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


def masked_mean(x, mask, n=None):
    """Mean of x over mask; `n` overrides the count (data parallel: the global token count).
    torch.where instead of x*mask so that a NaN or inf sitting in a pad slot cannot leak into the sum."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / (mask.sum() if n is None else n)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the real tokens of the global batch (all ranks); pads come out 0. -> (that, 1 / std):
    the scale, for a loss term that must shrink with x. shift_mean=False keeps the mean (N-details: rewards are
    scaled, advantages are centred)."""
    xm = torch.where(mask, x, torch.zeros_like(x)).double()
    stats = all_reduce_sum(torch.stack([xm.sum(), (xm * xm).sum(), mask.sum().double()]))
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean * mean).clamp(min=0.0)
    var = var * stats[2] / (stats[2] - 1).clamp(min=1.0)  # unbiased, as torch.var
    scale = torch.rsqrt(var + 1e-8)
    out = (x.double() - mean) * scale
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out.to(x.dtype), torch.zeros_like(x)), scale.item()


def assert_in_sync(model, step, what):
    """Invariant under data parallel: every rank holds the same weights after an update."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    s = torch.stack([sum(p.detach().double().sum() for p in model.parameters())])
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    assert lo.item() == hi.item(), f"step {step}: {what} weights differ across ranks ({lo.item()} vs {hi.item()})"


# -----------------------------------------------------------------------------
# one run per out_dir

_locks = []  # open lock files: closing one (or the process dying, even by kill -9) releases its lock


def lock_out_dir(out_dir):
    """Create out_dir and hold an exclusive lock on it for the life of the process; a second run into the same
    out_dir would interleave checkpoints and logs, so it stops with the pid of the first."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise UserError(f"{out_dir} is in use by pid {pid} (one run per out_dir)") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    _locks.append(f)
    # temp files of a writer killed mid-save (save_checkpoint's NAME.pt.XXXXXXXX.tmp, in out_dir and its snapshots):
    # nobody else writes here now, and each is as large as a checkpoint
    for folder in (out_dir, os.path.join(out_dir, "snap")):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if re.fullmatch(r".+\.pt\.\w{8}\.tmp", name):
                os.remove(os.path.join(folder, name))


# -----------------------------------------------------------------------------
# checkpoints: written atomically, read without executing code

def save_checkpoint(path, obj):
    """Write obj to a temp file unique to this writer, fsync, then rename over path: readers see the old file or
    the new one, never a mix, and two writers never share a temp file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException:
        os.unlink(tmp)
        raise


def parse_list(text, knob, kind=int, low=None):
    """--seeds=0,1,2 -> [0, 1, 2]: a comma-separated knob's values as `kind`, each >= low when given; an empty list,
    a value that is not a number or one below low is a UserError naming the knob."""
    what = "integers" if kind is int else "numbers"
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{knob}={text}: expected comma-separated {what}, e.g. {'1,2,3' if kind is int else '0,0.5'}"
                        ) from None
    if not values:
        raise UserError(f"--{knob}={text}: expected one or more {what}")
    if low is not None and any(v < low for v in values):
        raise UserError(f"--{knob}={text}: every value must be >= {low}")
    return values


def parse_steps(text, knob):
    """--snapshot_steps=10,20,40 -> {10, 20, 40}: the steps at which a script keeps a snapshot ('' = none)."""
    return set(parse_list(text, knob, int, low=1)) if text.strip() else set()


def save_snapshot(out_dir, step, **entries):
    """out_dir/snap/step_<step>.pt, atomically: the model and what reading it needs (model_args, config,
    tokenizer), no optimizer or RNG state. A point of the training trajectory to evaluate, not a resume point."""
    path = os.path.join(out_dir, "snap", f"step_{step}.pt")
    save_checkpoint(path, dict(entries, step=step))
    return path


def load_checkpoint(path, device="cpu"):
    """A checkpoint's dict. A folder is a Hugging Face GPT-2 checkpoint, read as one (nanopost.gpt2)."""
    if os.path.isdir(path):
        from nanopost.gpt2 import load_folder  # lazy: gpt2 needs the tokenizer, which imports this module
        return load_folder(path, device)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    ckpt = read_torch_file(path, device, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"checkpoint {path} has no 'model' and 'model_args' entries; is it a nanopost checkpoint?")
    return ckpt


def read_torch_file(path, device="cpu", what="checkpoint"):
    """torch.load with weights_only=True: tensors and plain containers only, so opening a file from someone else
    cannot run their code (a full unpickler would call whatever the file names)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        name = re.search(r"GLOBAL (\S+)", str(e))
        if name is None:  # not a pickle torch can read at all
            raise UserError(f"{what} {path} could not be read: {str(e).splitlines()[0][:200]}") from None
        raise UserError(f"{what} {path} holds {name.group(1)}, not only tensors and plain data: refused, since "
                        f"loading it could run code") from None
    except Exception as e:  # torch raises several unrelated types for a truncated or foreign file
        raise UserError(f"{what} {path} could not be read: {type(e).__name__}: {e}") from None


def build_model(model_args):
    return GPT(GPTConfig(**model_args))


def load_weights(model, state_dict):
    # a torch.compile'd module saves its keys under "_orig_mod."; strip it so any checkpoint loads
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()})
    return model


def refuse_reward_model(ckpt, path):
    """A reward model (train_sft.py on preference pairs) where a language model is expected: one line, not a
    state-dict error listing every key."""
    if ckpt.get("kind") == "reward_model":
        raise UserError(f"{path} is a reward model, not a language model; use it as train_ppo.py --reward_model={path}")


def load_model(path, device="cpu"):
    """The language model stored under "model" in any nanopost checkpoint, and the checkpoint."""
    ckpt = load_checkpoint(path, device)
    refuse_reward_model(ckpt, path)
    model = load_weights(build_model(ckpt["model_args"]), ckpt["model"])
    return model.to(device), ckpt


def get_rng_state():
    """Every global RNG, as tensors and plain data (what weights_only loading accepts)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    state = dict(python=random.getstate(), numpy=np_state, torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    np_state["state"]["key"] = np.array(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# the non-finite policy: never take a step on a non-finite gradient, never save a model that computes NaN

def _kept(ckpt_path):
    return f"{ckpt_path} keeps the last good checkpoint" if os.path.exists(ckpt_path) else "no checkpoint was written"


def check_finite(step, ckpt_path, **values):
    """Raise Diverged naming every non-finite value (loss, gradient norm, ...) at this step."""
    bad = {k: v for k, v in values.items() if not math.isfinite(float(v))}
    if bad:
        raise Diverged(f"non-finite {', '.join(f'{k}={float(v)}' for k, v in bad.items())} at step {step}; "
                       f"{_kept(ckpt_path)}. Try a lower learning_rate.")


# A weight 100x beyond the largest the run started with (and at least 1e4) is a blown-up step, not learning: Adam
# moves a weight by about the learning rate per step (its update m/sqrt(v) is of order 1), so a healthy run at
# lr 1e-3 needs some 10 million steps to take a weight from below 10 to 1e4. Such weights can still compute finite
# outputs (LayerNorm hides their scale), so only this bound catches them before they are saved.
WEIGHT_GROWTH, WEIGHT_FLOOR = 100, 1e4


@torch.no_grad()
def weight_limits(models):
    """{name: the largest |weight| check_model_finite accepts}, from the models as the run starts (or resumes)."""
    return {name: max(WEIGHT_FLOOR, WEIGHT_GROWTH * max(p.abs().max().item() for p in model.parameters()))
            for name, model in models.items()}


@torch.no_grad()
def check_model_finite(step, ckpt_path, models, limits):
    """Before a save: finite weights no larger than `limits` (weight_limits), and finite outputs on a fixed batch
    (weights of ~1e30 are finite, yet every forward pass gives inf or NaN, and a checkpoint holding them is
    useless)."""
    for name, model in models.items():
        params = list(model.parameters())
        cfg = getattr(model, "config", None) or model.trunk.config
        probe = torch.arange(min(cfg.block_size, 16), device=params[0].device).remainder(cfg.vocab_size)[None]
        was_training = model.training
        model.eval()  # no dropout: the probe must not draw from the RNG a resumed run replays
        finite = all(bool(torch.isfinite(p).all()) for p in params) and bool(torch.isfinite(model(probe)).all())
        model.train(was_training)
        lr = "value_lr" if name == "value_model" else "learning_rate"
        if not finite:
            raise Diverged(f"the {name} is non-finite after step {step} (weights or outputs); not saving, "
                           f"{_kept(ckpt_path)}. Try a lower {lr}.")
        largest = max(p.abs().max().item() for p in params)
        if largest > limits[name]:
            raise Diverged(f"the {name} blew up after step {step}: a weight of {largest:.3g}, over the limit "
                           f"{limits[name]:.3g} ({WEIGHT_GROWTH}x its largest at the start, at least "
                           f"{WEIGHT_FLOOR:g}); not saving, {_kept(ckpt_path)}. Try a lower {lr}.")


# -----------------------------------------------------------------------------
# resume: the checkpoint's config, with the knobs the command line may change

def resume_config(cls, given, ckpt, path, script, fixed):
    """The config of a resumed run: the checkpoint's, overridden by the knobs given on the command line.

    A run-defining knob (in `fixed`) given with another value is an error naming every such key with both
    values, raised before anything is written. Other knobs given with a new value are applied and printed."""
    if ckpt.get("script") != script:
        raise UserError(f"{path} was written by {ckpt.get('script', 'an unknown script')}, not {script}; "
                        f"resume it with that script, or start from it with --init_from={path}")
    saved = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in dataclasses.fields(cls)}}
    diff = {k: (saved[k], v) for k, v in given.items() if k != "init_from" and k in saved and saved[k] != v}
    refused = {k: d for k, d in diff.items() if k in fixed}
    if refused:
        raise UserError(f"cannot resume {path}: " + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
                        + " (run-defining; start a new run in another out_dir)")
    for k, (a, b) in diff.items():
        print0(f"changed: {k} {a} -> {b}")
    # init_from keeps what the run started from, so the saved config still says where it came from
    return cls(**{**saved, **given, "init_from": saved.get("init_from", "scratch")})


# -----------------------------------------------------------------------------
# the run log: out_dir/log.jsonl, one JSON object per logged step

def _strict(value):
    """NaN and inf become null, at any depth: they are not JSON, and strict readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(_strict(record), allow_nan=False) + "\n")


def _parse(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # the line a killed run was writing when it died
        return None


class RunLog:
    """out_dir/log.jsonl. A fresh run starts an empty log; a resume from step S keeps the records at or before
    S and drops the rest (written after the last save, then lost to a crash), so every step appears once."""

    def __init__(self, path, resume_step=None, master=True):
        self.path, self.master, self.kept = path, master, []
        if not master:
            return
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                records = [_parse(line) for line in f]
            self.kept = [r for r in records if r is not None and r.get("step", 0) <= resume_step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in self.kept)

    def write(self, record):
        if self.master:
            append_jsonl(self.path, record)

    def first(self, kind):
        """The first kept record of this kind (a resumed run's 'before'), or None."""
        return next((r for r in self.kept if r.get("kind") == kind), None)


def format_eta(seconds):
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m}m{s:02d}s"
