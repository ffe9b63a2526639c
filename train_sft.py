"""
Pretraining, supervised fine-tuning (SFT) and reward models of a tiny GPT in one hand-written loop.

--data chooses the objective and its data (nanopost.batches describes the formats and splits):
  pretrain | FILE.txt   next-token cross-entropy on every token of the built-in corpus, or of yours
                        (a scratch model: --tokenizer=X.bpe, `python -m nanopost.train_tokenizer`)
  sft | FILE.jsonl      the same on response tokens only: the built-in demonstrations, or your
                        conversations; prompts and padding get target IGNORE (InstructGPT's SFT)
  prefs | PAIRS.jsonl   a reward model (RewardModel: the trunk and a scalar head read at the last
                        real token), Bradley-Terry loss -log sigmoid(r_c - r_r) (Stiennon et al.
                        2020) on the built-in labeler's preference pairs, or yours. Its checkpoint
                        says kind="reward_model" and holds reward_norm (train_ppo.py --reward_model)
  --objective=dpo       the policy itself on those pairs, no reward model: DPO against the frozen
                        --init_from (Rafailov et al. 2023; ipo: Azar et al. 2023; nanopost.dpo)

The default pipeline (CPU, 2 cores, ~1M-parameter model; the README has the numbers we measured):

    python train_sft.py --data=pretrain --out_dir=out/base
    python train_sft.py --data=sft --init_from=out/base/ckpt.pt --out_dir=out/sft

More GPUs: torchrun --standalone --nproc_per_node=8 train_sft.py --data=sft --init_from=...
Resume:    python train_sft.py --init_from=resume --out_dir=out/sft [--max_iters=300 ...]: the
           checkpoint's config with the knobs you give, except run-defining ones (RUN_DEFINING).
Any knob:  --key=value (python train_sft.py --help lists them all).

Deliberate choices and deviations:
- out_dir, max_iters, batch_size and learning_rate default to ""/-1, "the stage default"
  (STAGE_DEFAULTS): pretraining from scratch wants more steps and a larger lr than fine-tuning.
- Batches are sampled with replacement from an RNG seeded by (seed, step), not by walking epochs: a
  resumed run draws exactly the batches the uninterrupted run would have, with no iterator state.
- The cosine schedule ends at lr_decay_iters, fixed when the run starts (= its max_iters): a resume
  with a larger max_iters continues the same curve and then trains on at min_lr.
- batch_size is the global batch per micro-step (over all ranks); each rank takes its slice. A
  step's loss is the sum over all its loss tokens (every rank, every micro-step) divided by their
  total count (longer responses weigh more), and the gradients are summed by hand, so N processes
  compute the same update as 1 process with the same batch (up to float summation order).
- sft_kl_coef > 0 adds coef * KL(policy || initial model) per loss token (kernels.token_kl), a cheap
  anchor against forgetting; the frozen copy is saved in the checkpoint, so a resume anchors to it.
- bf16 autocast and torch.compile are used on CUDA only; on CPU the loop is float32 eager torch.
- Evaluation (rank 0, every eval_interval steps, before the first step and at the end): the val loss
  (on pairs, every held-out pair's ranking too, and DPO's KL(pi || ref) on its samples); on the
  built-in data the held-out loss per skill (forgetting) and the task accuracy; on yours, a sample.
"""

import math
import os
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch

import kernels
from nanopost.batches import load_train_data, step_batches, val_batches
from nanopost.checkpoint import (check_finite, check_model_finite, lock_out_dir, save_checkpoint,
                                 save_snapshot, weight_limits)
from nanopost.config import UserError, entry, knob
from nanopost.data import IGNORE, TOO_LONG, load_prompts
from nanopost.distributed import (all_reduce_sum, assert_in_sync, print0, setup_runtime, sync_grads,
                                  teardown)
from nanopost.dpo import dpo_pair_loss
from nanopost.evaluate import dpo_metrics, lm_metrics, lm_val_metrics
from nanopost.loading import get_rng_state, set_rng_state
from nanopost.metrics import evenly_spaced
from nanopost.model import GPTConfig, RewardModel
from nanopost.prefs import bradley_terry_loss, pair_metrics, pair_rewards
from nanopost.reward import reward_norm
from nanopost.runlog import RunLog, eval_line, print_before_after, train_line
from nanopost.sft_setup import adamw, configure, init_model, lr_at
from nanopost.world import load_world

# ------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # run
    out_dir: str = knob("", "where ckpt.pt and log.jsonl go; empty = stage default (out/base, "
                            "out/sft, out/rm)")
    init_from: str = knob("scratch", "scratch | resume (out_dir/ckpt.pt) | a ckpt.pt or a GPT-2 "
                                     "folder to start from")
    data: str = knob("sft", "pretrain (built-in corpus) | sft (built-in demonstrations) | prefs "
                            "(built-in preference pairs: a reward model) | path to a corpus, "
                            "conversations or preference pairs")
    seed: int = knob(1337, "seeds the model init and the batch sampling")
    world_seed: int = knob(0, "which built-in task world (nanopost.world.load_world)")
    tokenizer: str = knob("nanopost", "tokenizer for a scratch model; a checkpoint brings its own")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = knob("bfloat16", "autocast dtype on CUDA (CPU always trains in float32)",
                      choices=("bfloat16", "float32"))
    compile: bool = knob(True, "torch.compile the model (CUDA only)")
    # optimization
    max_iters: int = knob(-1, "optimizer steps; -1 = stage default (STAGE_DEFAULTS)", ge=0)
    batch_size: int = knob(-1, "sequences per micro-step, summed over all ranks; -1 = stage "
                               "default", ge=1)
    grad_accum: int = knob(1, "micro-steps per optimizer step", ge=1)
    learning_rate: float = knob(-1.0, "peak AdamW learning rate; -1 = stage default", gt=0)
    min_lr: float = knob(-1.0, "floor of the cosine decay; -1 = learning_rate / 10", ge=0)
    warmup_iters: int = knob(20, "linear warmup steps from 0 to learning_rate", ge=0)
    lr_decay: bool = knob(True, "cosine decay to min_lr after warmup (else constant)")
    lr_decay_iters: int = knob(-1, "step at which the cosine reaches min_lr; -1 = max_iters of the "
                                   "first run", ge=0)
    weight_decay: float = knob(0.1, "AdamW decoupled weight decay, on 2-D weights only", ge=0)
    beta1: float = knob(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = knob(0.95, "AdamW beta2 (0.95: steadier than 0.999 at small batch, as in GPT-3)",
                        ge=0, lt=1)
    grad_clip: float = knob(1.0, "clip the global gradient norm to this; 0 = off", ge=0)
    too_long: str = knob("drop", "conversations whose last exchange alone exceeds block_size: "
                                 "error (name them) | drop (counted) | truncate (keep their last "
                                 "block_size tokens)", choices=TOO_LONG)
    packing: bool = knob(False, "conversations: pack each micro-batch's examples into as few "
                                "block_size rows as fit (block-diagonal attention; the same loss, "
                                "less padding)")
    init_optimizer: bool = knob(False, "also continue the AdamW state of --init_from (a "
                                       "train_sft.py checkpoint of the same kind of model): new "
                                       "data, one optimizer (rft's rounds)")
    sft_kl_coef: float = knob(0.0, "weight of KL(model || initial model) per loss token; 0 = off",
                              ge=0)
    objective: str = knob("reward", "preference pairs train: reward (a reward model) | dpo | ipo "
                                    "(the policy)", choices=("reward", "dpo", "ipo"))
    dpo_beta: float = knob(0.1, "DPO/IPO: beta, the weight of KL(policy || reference)", gt=0)
    dpo_label_smoothing: float = knob(0.0, "cDPO: the rate of flipped labels assumed", ge=0, lt=0.5)
    # model (scratch only; a checkpoint brings its own shape)
    n_layer: int = knob(GPTConfig.n_layer, "transformer blocks", ge=1)
    n_head: int = knob(GPTConfig.n_head, "attention heads", ge=1)
    n_embd: int = knob(GPTConfig.n_embd, "embedding width (a multiple of 2 * n_head: rotary pairs)",
                       ge=2)
    block_size: int = knob(GPTConfig.block_size, "context length in tokens", ge=2)
    pos_emb: str = knob(GPTConfig.pos_emb, "positions: rope (rotary) | learned (GPT-2's table, as "
                                           "nanoGPT's)", choices=("rope", "learned"))
    dropout: float = knob(GPTConfig.dropout, "dropout probability (0: too few steps to overfit)",
                          ge=0, lt=1)
    # logging and evaluation
    log_interval: int = knob(10, "print and log the training loss every this many steps", ge=1)
    eval_interval: int = knob(250, "evaluate and save every this many steps; 0 = only before and "
                                   "at the end", ge=0)
    eval_examples: int = knob(64, "val examples (sft) or block_size windows (pretrain) for the val "
                                  "loss (a reward model evaluates on every held-out pair)", ge=1)
    heldout_docs: int = knob(64, "held-out docs per pretraining skill for the forgetting losses",
                             ge=1)
    eval_prompts: int = knob(64, "held-out task prompts (spread over all) sampled, scored by the "
                                 "verifier; 0 = off", ge=0)
    eval_temperature: float = knob(1.0, "sampling temperature for the task eval", gt=0)
    max_new_tokens: int = knob(32, "response length limit for the task eval", ge=1)
    snapshot_steps: str = knob("", "comma-separated steps at which to also keep "
                                   "out_dir/snap/step_<n>.pt (the model alone: a training "
                                   "trajectory to evaluate later)")


# a resume may change any other knob (max_iters, learning rates, intervals, coefficients)
RUN_DEFINING = ("data", "seed", "world_seed", "tokenizer", "batch_size", "grad_accum", "n_layer",
                "n_head", "n_embd", "block_size", "pos_emb", "dropout", "lr_decay_iters",
                "too_long", "objective", "dpo_beta", "dpo_label_smoothing")

# knobs left at -1 (or "") take these; nanopost/studies/RESULTS.md ("Stage defaults") says why
STAGE_DEFAULTS = {
    "pretrain": dict(out_dir="out/base", max_iters=2400, batch_size=8, learning_rate=1.5e-3),
    "sft": dict(out_dir="out/sft", max_iters=150, batch_size=32, learning_rate=1e-3),
    "reward": dict(out_dir="out/rm", max_iters=300, batch_size=32, learning_rate=1e-3),  # in pairs
    "dpo": dict(out_dir="out/dpo", max_iters=200, batch_size=32, learning_rate=1e-4),  # in pairs
}


# ------------------------------------------------------------------------------------------------
# the objectives: a micro-batch -> (its loss sum / n_loss, the step's count, to backward; its sums
# {loss, kl, ...}, detached, for the log); DPO's is nanopost.dpo.dpo_pair_loss


def lm_loss(model, X, Y, segments, n_loss, autocast, ref_model=None, kl_coef=0.0):
    """Next-token cross-entropy on the targets that are not IGNORE; with a ref_model, plus
    kl_coef * KL(model || ref_model) on the same tokens (an anchor against forgetting)."""
    with autocast():
        logits = model(X, segments=segments)  # (b, T, V)
    ce_sum = kernels.cross_entropy(logits.flatten(0, 1), Y.flatten(), reduction="sum")
    loss = ce_sum / n_loss
    kl_sum = torch.zeros_like(ce_sum)
    if ref_model is not None:
        with torch.no_grad(), autocast():
            ref_logits = ref_model(X, segments=segments)  # (b, T, V)
        kl_sum = (kernels.token_kl(logits, ref_logits) * (Y != IGNORE)).sum()
        loss = loss + kl_coef * kl_sum / n_loss
    return loss, dict(loss=ce_sum.detach(), kl=kl_sum.detach())


def pair_loss(model, X, M, segments, n_loss, autocast):
    """Bradley-Terry on preference pairs: X (b, 2, T) chosen and rejected, M their real tokens."""
    with autocast():
        r = pair_rewards(model, X, M).float()  # (b, 2)
    bt_sum = bradley_terry_loss(r[:, 0], r[:, 1]).sum()
    right = (r[:, 0] > r[:, 1]).sum().float()
    return bt_sum / n_loss, dict(loss=bt_sum.detach(), kl=torch.zeros_like(right), acc=right)


def main(argv):
    cfg, stage, ckpt, resume, snapshots = configure(Config, argv, STAGE_DEFAULTS, RUN_DEFINING)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # --------------------------------------------------------------------------------------------
    # runtime and model: from scratch, from a checkpoint (e.g. the base model for SFT), or resumed
    rt = setup_runtime(cfg.device, cfg.dtype)
    if cfg.batch_size % rt.world_size != 0:
        raise UserError(f"--batch_size={cfg.batch_size}: must divide evenly over the "
                        f"{rt.world_size} processes")
    torch.manual_seed(cfg.seed)  # the same on every rank: the scratch inits must match
    model, model_args, tok, ref_model = init_model(cfg, stage, ckpt, ckpt_path, resume, rt.device)
    block_size = model_args["block_size"]

    # --------------------------------------------------------------------------------------------
    # data, and the objective, chosen once

    builtin = cfg.data in ("pretrain", "sft", "prefs") and stage != "reward"  # its world's metrics
    your_corpus = stage == "pretrain" and not builtin  # evaluated by a sample of its held-out text
    world = load_world(seed=cfg.world_seed)
    eval_prompts = evenly_spaced(world.eval_prompts, cfg.eval_prompts if builtin else 0)
    eval_prompts = load_prompts("", eval_prompts, tok, block_size, cfg.max_new_tokens)
    data = load_train_data(cfg, stage, world, tok, block_size, rt.device)
    if resume and ckpt.get("data_hash") != data.hash:
        raise UserError(f"cannot resume {ckpt_path}: {cfg.data} is not the data it started with "
                        f"(its contents changed); train on it in a new out_dir")
    pairs = dict(examples=data.val, decided=data.val_decided, batch_size=cfg.batch_size,
                 pad_id=tok.eot_id, device=rt.device)
    if stage == "reward":
        micro_loss = partial(pair_loss, autocast=rt.autocast)
        val_metrics = partial(pair_metrics, **pairs)
    elif stage == "dpo":
        dpo = dict(ref_model=ref_model, beta=cfg.dpo_beta, ipo=cfg.objective == "ipo",
                   label_smoothing=cfg.dpo_label_smoothing)
        micro_loss = partial(dpo_pair_loss, autocast=rt.autocast, **dpo)
        val_metrics = partial(dpo_metrics, **pairs, **dpo, tok=tok, seed=cfg.seed,
                              prompts=evenly_spaced(data.val_prompts, cfg.eval_prompts),
                              max_new_tokens=cfg.max_new_tokens)
    else:
        micro_loss = partial(lm_loss, autocast=rt.autocast, ref_model=ref_model,
                             kl_coef=cfg.sft_kl_coef)
        val = val_batches(data, cfg.eval_examples, cfg.batch_size, block_size, tok.eot_id)
        val_metrics = partial(lm_val_metrics, batches=val, device=rt.device)

    # --------------------------------------------------------------------------------------------
    # optimizer, and where a resumed run left off
    params, optimizer = adamw(model, cfg)
    if resume or cfg.init_optimizer:
        optimizer.load_state_dict(ckpt["optimizer"])  # the lr is set again every step
    step = ckpt["step"] if resume else 0
    if resume:
        set_rng_state(ckpt["rng"])
    ckpt = None  # free the loaded tensors
    raw_model = model  # eval, sampling and checkpoints use the uncompiled module
    limits = weight_limits(dict(model=raw_model))  # how large a weight may grow before saves refuse
    if cfg.compile and rt.device_type == "cuda":
        model = torch.compile(model)

    # --------------------------------------------------------------------------------------------
    # evaluation (rank 0 only) and checkpoints
    def evaluate(step):
        # a scratch model at step 0 scores 0 and runs every sample to the length limit
        prompts = [] if step == 0 and cfg.init_from == "scratch" else eval_prompts
        raw_model.eval()
        with rt.autocast():
            record = dict(kind="eval", step=step, **val_metrics(raw_model))
            record.update(lm_metrics(raw_model, tok, world if builtin else None, prompts,
                                     cfg.heldout_docs, data.val if your_corpus else None,
                                     cfg.eval_temperature, cfg.max_new_tokens, cfg.seed, rt.device))
        raw_model.train()
        print(eval_line(record, cfg.max_iters))
        log.write(record)
        return record

    def save(step):
        check_model_finite(step, ckpt_path, dict(model=raw_model), limits)
        obj = dict(model=raw_model.state_dict(), model_args=model_args,
                   optimizer=optimizer.state_dict(), config=asdict(cfg), step=step,
                   rng=get_rng_state(), stage=stage, script="train_sft.py", data_hash=data.hash,
                   **tok.checkpoint_entries())
        if ref_model is not None:
            obj["ref_model"] = ref_model.state_dict()
        if isinstance(raw_model, RewardModel):  # for PPO: what it is, its scale on PPO's start
            with rt.autocast():
                norm = reward_norm(raw_model, tok, rt.device, data.policy, data.norm_prompts,
                                   cfg.max_new_tokens, data.val, tok.eot_id)
            obj.update(kind="reward_model", reward_norm=norm)
            print(f"reward_norm: {obj['reward_norm']}")
        save_checkpoint(ckpt_path, obj)
        print(f"saved {ckpt_path} at step {step}")

    # --------------------------------------------------------------------------------------------
    # training loop
    if rt.master:  # the first write into out_dir: every knob and the data were checked above
        lock_out_dir(cfg.out_dir)
    log = RunLog(os.path.join(cfg.out_dir, "log.jsonl"), resume_step=step if resume else None,
                 master=rt.master)
    first = record = None  # evals before and after, for the forgetting table
    if rt.master:
        # a resume does not evaluate its starting point again: the log holds that step's eval
        first = log.first("eval") if resume else evaluate(step)
    model.train()
    t_start, step_start = time.time(), step
    while step < cfg.max_iters:
        step += 1
        t0 = time.time()
        lr = lr_at(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters,
                   cfg.lr_decay)
        for group in optimizer.param_groups:
            group["lr"] = lr

        micro, n_loss, n_real = step_batches(data, step, cfg, rt, block_size, tok.eot_id)
        sums = {}  # the objective's sums over this rank: loss, kl, pairs ranked right, rewards
        for X, Y, segments in micro:
            loss, micro_sums = micro_loss(model, X, Y, segments, n_loss)
            loss.backward()
            sums = {k: sums.get(k, 0) + v for k, v in micro_sums.items()}
        sync_grads(params)
        means = dict(zip(sums, (all_reduce_sum(torch.stack([*sums.values()])) / n_loss).tolist()))
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        # checked before the step, while the weights are still good
        check_finite(step, ckpt_path, **means, grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert_in_sync(raw_model, step, "model")  # data parallel: every rank holds the same weights

        # logging: one line and one JSON record per log_interval steps
        dt = time.time() - t0
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            eta = (time.time() - t_start) / (step - step_start) * (cfg.max_iters - step)
            stats = dict(kind="train", step=step, **means, lr=lr, grad_norm=grad_norm,
                         tok_per_s=n_real / dt, eta_s=eta)
            print0(train_line(stats, cfg.max_iters, show_kl=cfg.sft_kl_coef > 0))
            log.write(stats)

        if rt.master and ((cfg.eval_interval and step % cfg.eval_interval == 0)
                          or step == cfg.max_iters):
            record = evaluate(step)
            check_finite(step, ckpt_path, val_loss=record["val_loss"])
            save(step)
        if rt.master and step in snapshots:
            save_snapshot(cfg.out_dir, step, model=raw_model.state_dict(), model_args=model_args,
                          config=asdict(cfg), script="train_sft.py", **tok.checkpoint_entries())

    # the summary: forgetting on each pretraining skill and the task accuracy, before -> after
    if rt.master and first is not None and record is not None:
        print_before_after(first, record, time.time() - t_start, len(eval_prompts))
    teardown(rt)


if __name__ == "__main__":
    entry(main)
