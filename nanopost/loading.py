"""
Loading a model or a run: a nanopost checkpoint or a Hugging Face GPT-2 folder as a model, every global RNG's
state, and the resume policy (what a resumed run may change and what it may not).
"""

import dataclasses
import os
import random

import numpy as np
import torch

from nanopost.checkpoint import read_torch_file
from nanopost.config import UserError
from nanopost.distributed import print0
from nanopost.gpt2 import load_folder
from nanopost.model import GPT, GPTConfig


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
