"""
The plumbing both training scripts share: the config system, checkpoints, distributed setup, logs.

Config: each script declares a dataclass whose fields are `knob(default, help)`; `parse_config` reads
`--key=value` overrides, checks their types against the defaults, refuses unknown keys and prints
every knob with its help for `--help`.
"""

import dataclasses
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from nanopost.model import GPT, GPTConfig


# -----------------------------------------------------------------------------
# config

def knob(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


def _parse_value(key, text, kind):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}={text}: expected a bool (true/false)")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key}={text}: expected {kind.__name__}") from None


def parse_config(cls, argv=None):
    """Build cls() with --key=value overrides from argv; --help prints the knobs and exits."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "--help" in argv or "-h" in argv:
        print(f"{os.path.basename(sys.argv[0])} knobs (override with --key=value):")
        for f in fields.values():
            print(f"  --{f.name}={f.default!s:<24} {f.metadata.get('help', '')}")
        sys.exit(0)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"bad argument {arg!r}: expected --key=value (see --help)")
        key, text = arg[2:].split("=", 1)
        if key not in fields:
            raise ValueError(f"unknown config key --{key} (see --help for the list)")
        kind = type(fields[key].default)
        overrides[key] = _parse_value(key, text, kind)
    return cls(**overrides)


# -----------------------------------------------------------------------------
# devices and distributed data parallel

@dataclasses.dataclass
class Dist:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def setup_ddp(device):
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Dist(False, 0, 0, 1)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    d = Dist(True, dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size())
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    return d


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# checkpoints: written atomically, so a crash or a NaN never leaves a half-written file behind

def save_checkpoint(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a mix


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch raises several unrelated types for a truncated or foreign file
        raise ValueError(f"checkpoint {path} could not be read: {e}") from e


def build_model(model_args):
    return GPT(GPTConfig(**model_args))


def load_model(path, device="cpu"):
    """The language model stored under "model" in any nanopost checkpoint, and the checkpoint."""
    ckpt = load_checkpoint(path, device)
    for key in ("model", "model_args"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} has no {key!r} entry; is it a nanopost checkpoint?")
    model = build_model(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def get_rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# logs

def append_jsonl(path, record):
    """One JSON line per record. NaN and inf become null: they are not JSON, and strict readers reject them
    (PPO's explained variance is NaN when every return in a batch is the same)."""
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def format_eta(seconds):
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m}m{s:02d}s"
