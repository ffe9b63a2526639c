"""
Loading a model or a run: a nanopost checkpoint or a Hugging Face GPT-2 folder as a model, every global RNG's
state, and the resume policy (what a resumed run may change and what it may not, and the state it continues from).
"""

import dataclasses
import os
import random

import numpy as np
import torch

from nanopost.checkpoint import check_model_finite, read_torch_file, save_checkpoint
from nanopost.config import UserError, parse_config, validate
from nanopost.distributed import all_gather, print0
from nanopost.gpt2 import load_folder
from nanopost.model import GPT, GPTConfig, ValueModel


def load_checkpoint(path, device="cpu"):
    """A checkpoint's dict. A folder is a Hugging Face GPT-2 checkpoint, read as one (nanopost.gpt2)."""
    if os.path.isdir(path):
        return load_folder(path, device)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    ckpt = read_torch_file(path, device, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"checkpoint {path} has no 'model' and 'model_args' entries; is it a nanopost checkpoint?")
    return ckpt


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


def open_run(cls, argv, script, fixed):
    """The config of a run (cls, knobs from argv, each in its range) and the checkpoint it starts from -> (cfg,
    the knobs given, ckpt, resume, out_dir/ckpt.pt): --init_from's, or with --init_from=resume the run's own,
    out_dir/ckpt.pt, whose saved config the given knobs override (resume_config: `fixed` ones may not change)."""
    cfg, given = parse_config(cls, argv)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume = cfg.init_from == "resume"
    init_path = ckpt_path if resume else cfg.init_from
    ckpt = load_checkpoint(init_path)
    refuse_reward_model(ckpt, cfg.init_from)
    if resume:
        cfg = resume_config(cls, given, ckpt, ckpt_path, script, fixed)
    validate(cfg)
    return cfg, given, ckpt, resume, ckpt_path


def load_policy_and_reference(ckpt, resume, device):
    """PPO's policy and its frozen reference, the initial policy (saved as "ref_model" by a run, so a resumed
    run keeps the reference it started with), and their model_args: dropout 0, or rollout and update would
    see different models (N-details). Both in eval mode, set once: with dropout 0 it changes nothing."""
    model_args = dict(ckpt["model_args"], dropout=0.0)
    policy = load_weights(build_model(model_args), ckpt["model"]).to(device).eval()
    ref_weights = ckpt["ref_model"] if resume else ckpt["model"]
    ref_policy = load_weights(build_model(model_args), ref_weights).to(device).eval()
    return policy, ref_policy.requires_grad_(False), model_args

def load_value_model(ckpt, resume, value_init, device):
    """PPO's value model (a trunk and a scalar head) and its model_args. A checkpoint that holds one (the resumed
    run's, or a PPO run's as --value_init) gives it whole; a language model's (--value_init, else `ckpt`, the
    initial policy) gives the trunk, under a fresh head (draws from the global torch RNG). In eval mode: its
    dropout is 0."""
    if resume:
        value_ckpt = ckpt
    elif value_init:
        value_ckpt = load_checkpoint(value_init)
    else:
        value_ckpt = None
    refuse_reward_model(value_ckpt or {}, value_init)
    if value_ckpt and "value_model" in value_ckpt:
        args = value_ckpt["value_model_args"]
        return load_weights(ValueModel(build_model(args)), value_ckpt["value_model"]).to(device).eval(), args
    trunk_ckpt = value_ckpt or ckpt
    args = dict(trunk_ckpt["model_args"], dropout=0.0)
    return ValueModel(load_weights(build_model(args), trunk_ckpt["model"])).to(device).eval(), args


def start_or_resume(seed, rt, optimizers, ckpt=None, path=None):
    """A run's own RNG streams and the step it starts after: fresh from `seed` at step 0, or, given `ckpt` (the
    run's checkpoint at `path`, written by save_run), everything that run held, so it continues bit-exactly:
    each rank's streams, every global RNG, the optimizers' state (at this run's learning rates).

    Streams: "data" draws the prompt order, the same on every rank (they agree on the global batch); "shuffle"
    (minibatches) and "sample" (responses, on the run's device) are one per rank. `optimizers`: {checkpoint key:
    optimizer}, each keeping this run's learning rate."""
    streams = dict(data=torch.Generator().manual_seed(seed),
                   shuffle=torch.Generator().manual_seed(seed + 1 + rt.rank),
                   sample=torch.Generator(device=rt.device).manual_seed(seed + 1000 + rt.rank))
    if ckpt is None:
        return streams, 0
    if len(ckpt["rank_rng"]) != rt.world_size:
        raise UserError(f"{path} was written by {len(ckpt['rank_rng'])} rank(s); resume it with as many "
                        f"(this run has {rt.world_size})")
    for key, opt in optimizers.items():
        lr = opt.param_groups[0]["lr"]  # this run's, which may differ from the saved one (printed as changed)
        opt.load_state_dict(ckpt[key])
        opt.param_groups[0]["lr"] = lr
    streams["data"].set_state(ckpt["data_rng"])
    streams["shuffle"].set_state(ckpt["rank_rng"][rt.rank]["shuffle"])
    streams["sample"].set_state(ckpt["rank_rng"][rt.rank]["sample"])
    set_rng_state(ckpt["rng"])
    return streams, ckpt["step"]


def save_run(path, models, limits, streams, master, **entries):
    """Save `entries` (step among them; a model or an optimizer as its state_dict) and every RNG a resumed run
    replays (start_or_resume reads them back). Collective: every rank contributes its streams; rank 0 writes. A
    model grown non-finite or past its limits stops the run first (Diverged), the last good checkpoint kept."""
    entries = {k: v.state_dict() if isinstance(v, (torch.nn.Module, torch.optim.Optimizer)) else v
               for k, v in entries.items()}
    check_model_finite(entries["step"], path, models, limits)  # identical on every rank
    rank_rng = all_gather(dict(shuffle=streams["shuffle"].get_state(), sample=streams["sample"].get_state()))
    if master:
        save_checkpoint(path, dict(entries, rng=get_rng_state(), data_rng=streams["data"].get_state(),
                                   rank_rng=rank_rng))
