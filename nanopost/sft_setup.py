"""
How a train_sft.py run starts, before its loop: the config (stage defaults, a resume's checkpoint
config, every knob checked against the others and the checkpoint), the model and its frozen
reference, and the optimizer and its schedule.
"""

import copy
import math
import os
from dataclasses import asdict, replace

import torch

from nanopost.batches import stage_of
from nanopost.config import UserError, parse_config, parse_steps, validate
from nanopost.distributed import print0
from nanopost.loading import build_model, load_checkpoint, load_weights, resume_config
from nanopost.model import GPTConfig, RewardModel
from nanopost.tokenizer import from_checkpoint, get_tokenizer


def configure(config_cls, argv, stage_defaults, run_defining):
    """The run's config: the knobs given, the stage's defaults, and on a resume the checkpoint's
    config, all checked before anything is written.
    -> cfg, stage, the checkpoint to start from (or None), resume, the snapshot steps"""
    cfg, given = parse_config(config_cls, argv)
    stage = stage_of(cfg.data, cfg.objective)
    # resolved now, so that the config saved in the checkpoint holds the values actually used
    unset = {k: v for k, v in stage_defaults[stage].items() if getattr(cfg, k) in (-1, "")}
    cfg = replace(cfg, **unset)
    cfg = replace(cfg, min_lr=cfg.learning_rate / 10 if cfg.min_lr < 0 else cfg.min_lr)
    decay_iters = cfg.max_iters if cfg.lr_decay_iters < 0 else cfg.lr_decay_iters
    cfg = replace(cfg, lr_decay_iters=decay_iters)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume = cfg.init_from == "resume"
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        given_now = {**given, "out_dir": cfg.out_dir}
        cfg = resume_config(config_cls, given_now, ckpt, ckpt_path, "train_sft.py", run_defining)
        saved = ckpt["config"]
        floor_followed = saved["min_lr"] == saved["learning_rate"] / 10
        if "learning_rate" in given and "min_lr" not in given and floor_followed:
            cfg = replace(cfg, min_lr=cfg.learning_rate / 10)  # the floor follows a new peak
            print0(f"changed: min_lr {saved['min_lr']} -> {cfg.min_lr}")
        stage = stage_of(cfg.data, cfg.objective)
    elif cfg.init_from != "scratch":
        ckpt = load_checkpoint(cfg.init_from)
    validate(cfg)
    if cfg.packing and stage != "sft":
        raise UserError(f"--packing=true --data={cfg.data}: packing is for conversations "
                        f"(pretraining windows have no padding to remove; a reward model reads "
                        f"each pair's last token)")
    snapshots = parse_steps(cfg.snapshot_steps, "snapshot_steps")
    check_knobs(cfg, stage, ckpt, resume, ckpt_path)
    return cfg, stage, ckpt, resume, snapshots


def check_knobs(cfg, stage, ckpt, resume, ckpt_path):
    """The knobs that contradict each other or the checkpoint: a UserError naming them."""
    shape = f"--n_embd={cfg.n_embd} --n_head={cfg.n_head}"
    if ckpt is None and cfg.n_embd % cfg.n_head:
        raise UserError(f"{shape}: n_embd must be a multiple of n_head")
    if ckpt is None and cfg.pos_emb == "rope" and (cfg.n_embd // cfg.n_head) % 2:
        raise UserError(f"{shape}: the head size n_embd/n_head must be even (rotary positions "
                        f"rotate pairs of channels; --pos_emb=learned does not)")
    init_opt = f"--init_optimizer=true: --init_from={cfg.init_from}"
    starts_optimizer = cfg.init_optimizer and not resume
    if starts_optimizer and (ckpt or {}).get("script") != "train_sft.py":
        raise UserError(f"{init_opt} is not a train_sft.py checkpoint, so it holds no AdamW state "
                        f"of this script's")
    if starts_optimizer and (ckpt.get("kind") == "reward_model") != (stage == "reward"):
        raise UserError(f"{init_opt} trained another kind of model (a language model and a reward "
                        f"model have different parameters)")
    kl = f"--sft_kl_coef={cfg.sft_kl_coef}"
    if resume and cfg.sft_kl_coef > 0 and "ref_model" not in ckpt:
        raise UserError(f"{kl}: {ckpt_path} was trained without the KL anchor, so it holds no "
                        f"reference model to anchor to")
    if stage == "reward" and cfg.sft_kl_coef > 0:
        raise UserError(f"{kl}: a reward model has no next-token distribution to anchor")
    objective = f"--objective={cfg.objective}"
    if cfg.objective != "reward" and stage != "dpo":
        raise UserError(f"{objective} --data={cfg.data}: DPO and IPO train on preference pairs (--data=prefs "
                        f"or a pairs file)")
    if stage == "dpo" and cfg.sft_kl_coef > 0:
        raise UserError(f"{kl} {objective}: DPO's reference is its anchor already (--dpo_beta)")
    if cfg.dpo_label_smoothing > 0 and cfg.objective != "dpo":
        raise UserError(f"--dpo_label_smoothing={cfg.dpo_label_smoothing}: cDPO's label noise is a DPO knob; "
                        f"{objective} does not use it")


def init_model(cfg, stage, ckpt, ckpt_path, resume, device):
    """The model to train, on device: a scratch one of cfg's shape, or the checkpoint's (init_from,
    or ckpt_path on a resume); a reward model wraps the trunk in a RewardModel. With sft_kl_coef > 0
    or DPO also the frozen initial model the KL anchors to, or DPO's reference (a resume restores the
    one saved with the run, not its current weights). -> model, model_args, tokenizer, ref_model
    (or None)"""
    path = ckpt_path if resume else cfg.init_from
    if ckpt is None:
        tok = get_tokenizer(cfg.tokenizer)
        model_args = asdict(GPTConfig(block_size=cfg.block_size, vocab_size=tok.vocab_size,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                      dropout=cfg.dropout, pos_emb=cfg.pos_emb))
        model = build_model(model_args)
    else:
        model_args = ckpt["model_args"]
        model = build_model(model_args)
        if ckpt.get("kind") == "reward_model":
            model = RewardModel(model)
        model = load_weights(model, ckpt["model"])
        if isinstance(model, RewardModel) and stage != "reward":
            trains = f"--objective={cfg.objective}" if stage == "dpo" else f"--data={cfg.data}"
            raise UserError(f"{path} is a reward model; {trains} trains a language model")
        tok = from_checkpoint(ckpt, path)
        if model_args["vocab_size"] < tok.vocab_size:
            raise UserError(f"{path}: the model has {model_args['vocab_size']} token embeddings "
                            f"but tokenizer {tok.name!r} has {tok.vocab_size} tokens")
        print0(f"loaded {path} (step {ckpt.get('step')}); its shape overrides "
               f"n_layer/n_head/n_embd/block_size/pos_emb")
    if stage == "reward" and not isinstance(model, RewardModel):
        model = RewardModel(model)  # the trunk of the base or SFT model (or scratch), a zero head
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"model: {n_params / 1e6:.2f}M parameters | {model_args}")
    ref_model = None
    if cfg.sft_kl_coef > 0 or stage == "dpo":
        ref_model = copy.deepcopy(model)
        if resume:
            load_weights(ref_model, ckpt["ref_model"])
        ref_model.eval().requires_grad_(False)
    return model, model_args, tok, ref_model


def adamw(model, cfg):
    """AdamW (Loshchilov & Hutter) with weight decay on the matmul and embedding weights only, not
    on biases or norms. -> the trained parameters, the optimizer"""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                  fused=True)  # one kernel for all params, on CPU as on CUDA
    return params, optimizer


def lr_at(step, lr, min_lr, warmup_iters, decay_iters, decay):
    """Linear warmup to lr, then a cosine to min_lr at decay_iters (SGDR, Loshchilov & Hutter)."""
    if step <= warmup_iters:
        return lr * step / max(warmup_iters, 1)
    if not decay:
        return lr
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(decay_iters - warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
