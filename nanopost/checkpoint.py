"""
The files a run writes, and what may go into them: one run per out_dir (a lock), checkpoints written atomically
and read without executing code, snapshots along training, and the non-finite policy (never save a model that
computes NaN or has blown up).
"""

import fcntl
import math
import os
import pickle
import re
import tempfile

import torch

from nanopost.config import Diverged, UserError


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


def save_snapshot(out_dir, step, **entries):
    """out_dir/snap/step_<step>.pt, atomically: the model and what reading it needs (model_args, config,
    tokenizer), no optimizer or RNG state. A point of the training trajectory to evaluate, not a resume point."""
    path = os.path.join(out_dir, "snap", f"step_{step}.pt")
    save_checkpoint(path, dict(entries, step=step))
    return path


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
