"""
Pretraining and supervised fine-tuning (SFT) of a tiny GPT in one hand-written loop.

Both stages minimize next-token cross-entropy; they differ only in which tokens count:
  --data=pretrain   every token of the built-in corpus (world.pretrain docs joined by <|endoftext|>,
                    random block_size windows), from scratch -> a base model
  --data=sft        only the response tokens of the built-in demonstrations (world.sft_train); prompt
                    tokens and padding get target IGNORE, as in InstructGPT's SFT stage
  --data=FILE.jsonl the same on your conversations: {"messages": [...]} (system and multi-turn), {"prompt",
                    "completion"}, or ShareGPT's .json array (nanopost.data.load_conversations); the last 10% is
                    held out for the val loss
  --data=prefs      a reward model (RewardModel: the trunk and a scalar head read at the last real token) on the
                    built-in world's preference pairs (nanopost.prefs: a simulated labeler compares samples of the
                    --init_from model and programmatic answers), Bradley-Terry loss -log sigmoid(r_c - r_r)
                    (Stiennon et al. 2020); the held-out pairwise accuracy is evaluated on every held-out pair
  --data=PAIRS.jsonl the same on your preference pairs, {"prompt", "chosen", "rejected"} or HH-RLHF's
                    {"chosen", "rejected"} transcripts (nanopost.prefs.load_preferences; .gz read as is); the
                    last 10% is held out. The checkpoint says kind="reward_model" and holds reward_norm, the
                    mean and std of its scores on the initial model's samples (train_ppo.py --reward_model)
  --data=FILE.txt   every token of your corpus (or a .jsonl of {"text": ...} documents), tokenized once into a
                    cached memmap (nanopost.data.load_corpus); its last 10% is held out for the val loss.
                    --tokenizer=my.bpe (from `python -m nanopost.tokenizer --data=...`) for a scratch model.

The default pipeline (CPU, 2 cores, ~1M-parameter model; see the README for the numbers we measured):

    python train_sft.py --data=pretrain --out_dir=out/base
    python train_sft.py --data=sft --init_from=out/base/ckpt.pt --out_dir=out/sft

More GPUs: torchrun --standalone --nproc_per_node=8 train_sft.py --data=sft --init_from=... --out_dir=...
Resume:    python train_sft.py --init_from=resume --out_dir=out/sft [--max_iters=300 ...]: the checkpoint's
           config, with the knobs you give; run-defining ones (RUN_DEFINING) may not change.
Any knob:  --key=value (python train_sft.py --help lists them all).

Deliberate choices and deviations:
- out_dir, max_iters, batch_size and learning_rate default to ""/-1, meaning "the stage default" in
  STAGE_DEFAULTS below: pretraining from scratch wants more steps and a larger learning rate than fine-tuning.
- Batches are sampled with replacement from an RNG seeded by (seed, step), not by walking epochs: a resumed
  run then draws exactly the batches the uninterrupted run would have, with no iterator state to save.
- The cosine schedule ends at lr_decay_iters, fixed when the run starts (= its max_iters): a resume with a
  larger max_iters continues the same curve and then trains on at min_lr.
- batch_size is the global batch per micro-step (over all ranks); each rank takes its slice. The loss of a step is
  the sum over all its loss tokens (every rank, every micro-step) divided by their total count, and the
  gradients are summed by hand, so N processes compute the same update as 1 process with the same batch
  (up to float summation order). Sequences with more response tokens weigh more (a per-token mean).
- SFT data are conversations: the loss is on every assistant turn (and the <|endoftext|> ending it), nothing
  else. One longer than the context drops its oldest exchanges (the system turn stays); one whose last exchange
  alone does not fit is dropped. Both are counted and printed.
- sft_kl_coef > 0 adds coef * KL(policy || initial model) per loss token (kernels.token_kl), a cheap anchor
  against forgetting; the frozen copy is stored in the checkpoint so a resumed run anchors to the same model.
- --packing=true puts several conversations in one row (nanopost.data.pack) with attention blocked between them
  and positions restarting per conversation: the step sees the same examples and the same loss, and skips the
  padding that right-padding every row to the longest would compute. tok/s counts real tokens, not padding.
- bf16 autocast and torch.compile are used on CUDA only; on CPU the loop is plain float32 eager torch.
- Evaluation (rank 0, every eval_interval steps, before the first step and at the end): val loss; on the
  built-in data also held-out loss per pretraining skill (forgetting) and the verifier's accuracy on sampled
  answers to held-out task prompts (skipped for a scratch model at step 0: it scores 0 and every sample runs to
  the length limit); on your corpus, a sample continuing the held-out text.
"""

import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

import kernels
from nanopost.config import UserError, entry, knob, parse_config, parse_steps, validate
from nanopost.distributed import all_reduce_sum, assert_in_sync, print0, setup_runtime, sync_grads, teardown
from nanopost.checkpoint import (check_finite, check_model_finite, lock_out_dir, save_checkpoint,
                                 save_snapshot, weight_limits)
from nanopost.loading import (build_model, get_rng_state, load_checkpoint, load_model, load_weights,
                              resume_config, set_rng_state)
from nanopost.runlog import RunLog, format_eta
from nanopost.data import (IGNORE, TOO_LONG, collate, is_corpus, load_corpus, load_prompts, numbered_conversations,
                           pack, sft_examples, spread_windows, windows)
from nanopost.evaluate import heldout_losses, mean_loss, spread, task_eval
from nanopost.model import GPTConfig, RewardModel
from nanopost.prefs import (bradley_terry_loss, collate_pairs, encode_pair, is_preferences, load_preferences,
                            pair_metrics, pair_rewards, pairs_hash, world_preferences)
from nanopost.reward import reward_norm
from nanopost.tokenizer import from_checkpoint, get_tokenizer
from nanopost.world import encode_doc, load_world

TASK_SHOWN = ("accuracy", "ended", "well_formed", "distinct_valid")  # of task_eval's metrics; log.jsonl has all

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # run
    out_dir: str = knob("", "where ckpt.pt and log.jsonl go; empty = stage default (out/base, out/sft, out/rm)")
    init_from: str = knob("scratch", "scratch | resume (out_dir/ckpt.pt) | a ckpt.pt or a GPT-2 folder to start from")
    data: str = knob("sft", "pretrain (built-in corpus) | sft (built-in demonstrations) | prefs (built-in preference "
                           "pairs: a reward model) | path to a corpus, conversations or preference pairs")
    seed: int = knob(1337, "seeds the model init and the batch sampling")
    world_seed: int = knob(0, "which built-in task world (nanopost.world.load_world)")
    tokenizer: str = knob("nanopost", "tokenizer for a scratch model; a checkpoint brings its own")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = knob("bfloat16", "autocast dtype on CUDA (CPU always trains in float32)",
                      choices=("bfloat16", "float32"))
    compile: bool = knob(True, "torch.compile the model (CUDA only)")
    # optimization
    max_iters: int = knob(-1, "optimizer steps; -1 = stage default (STAGE_DEFAULTS)", ge=0)
    batch_size: int = knob(-1, "sequences per micro-step, summed over all ranks; -1 = stage default", ge=1)
    grad_accum: int = knob(1, "micro-steps per optimizer step", ge=1)
    learning_rate: float = knob(-1.0, "peak AdamW learning rate; -1 = stage default", gt=0)
    min_lr: float = knob(-1.0, "floor of the cosine decay; -1 = learning_rate / 10", ge=0)
    warmup_iters: int = knob(20, "linear warmup steps from 0 to learning_rate", ge=0)
    lr_decay: bool = knob(True, "cosine decay to min_lr after warmup (else constant)")
    lr_decay_iters: int = knob(-1, "step at which the cosine reaches min_lr; -1 = max_iters of the first run", ge=0)
    weight_decay: float = knob(0.1, "AdamW decoupled weight decay, on 2-D weights only", ge=0)
    beta1: float = knob(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = knob(0.95, "AdamW beta2 (0.95: steadier than 0.999 at small batch, as in GPT-3)", ge=0, lt=1)
    grad_clip: float = knob(1.0, "clip the global gradient norm to this; 0 = off", ge=0)
    too_long: str = knob("drop", "conversations whose last exchange alone exceeds block_size: error (name them) | "
                                 "drop (counted) | truncate (keep their last block_size tokens)", choices=TOO_LONG)
    packing: bool = knob(False, "conversations: pack each micro-batch's examples into as few block_size rows as "
                                "fit (block-diagonal attention; the same loss, less padding)")
    init_optimizer: bool = knob(False, "also continue the AdamW state of --init_from (a train_sft.py checkpoint of "
                                       "the same kind of model): new data, one optimizer (rft's rounds)")
    sft_kl_coef: float = knob(0.0, "weight of KL(model || initial model) per loss token; 0 = off", ge=0)
    # model (scratch only; a checkpoint brings its own shape)
    n_layer: int = knob(GPTConfig.n_layer, "transformer blocks", ge=1)
    n_head: int = knob(GPTConfig.n_head, "attention heads", ge=1)
    n_embd: int = knob(GPTConfig.n_embd, "embedding width (a multiple of 2 * n_head: rotary pairs)", ge=2)
    block_size: int = knob(GPTConfig.block_size, "context length in tokens", ge=2)
    pos_emb: str = knob(GPTConfig.pos_emb, "positions: rope (rotary) | learned (GPT-2's table, as nanoGPT's)",
                        choices=("rope", "learned"))
    dropout: float = knob(GPTConfig.dropout, "dropout probability (0: too few steps to overfit)", ge=0, lt=1)
    # logging and evaluation
    log_interval: int = knob(10, "print and log the training loss every this many steps", ge=1)
    eval_interval: int = knob(250, "evaluate and save every this many steps; 0 = only before and at the end", ge=0)
    eval_examples: int = knob(64, "val examples (sft) or block_size windows (pretrain) for the val loss (a reward "
                                  "model evaluates on every held-out pair)", ge=1)
    heldout_docs: int = knob(64, "held-out docs per pretraining skill for the forgetting losses", ge=1)
    eval_prompts: int = knob(64, "held-out task prompts (spread over all) sampled, scored by the verifier; 0 = off",
                             ge=0)
    eval_temperature: float = knob(1.0, "sampling temperature for the task eval", gt=0)
    max_new_tokens: int = knob(32, "response length limit for the task eval", ge=1)
    snapshot_steps: str = knob("", "comma-separated steps at which to also keep out_dir/snap/step_<n>.pt (the "
                                   "model alone: a training trajectory to evaluate later)")


# a resume may change any other knob (max_iters, learning rates, intervals, coefficients); these define the run
RUN_DEFINING = ("data", "seed", "world_seed", "tokenizer", "batch_size", "grad_accum", "n_layer", "n_head", "n_embd",
                "block_size", "pos_emb", "dropout", "lr_decay_iters", "too_long")

# knobs left at -1 (or "") take these. pretrain: 2400 small steps rather than 600 of 32 sequences (the same 2.5M
# tokens): with batch 16 x 1200 the base copied the target into "a-b=N" 86% of the time (teacher-forced), with
# 32 x 600 27-54% (lr 2e-3, 4e-3), and copying is what the new task needs. sft: held-out accuracy 93% after 50
# steps, 98% after 150; 400 steps reached 100% but forgot ~1.5 nats per token more on every pretraining skill.
STAGE_DEFAULTS = {
    "pretrain": dict(out_dir="out/base", max_iters=2400, batch_size=8, learning_rate=1.5e-3),
    "sft": dict(out_dir="out/sft", max_iters=150, batch_size=32, learning_rate=1e-3),
    "reward": dict(out_dir="out/rm", max_iters=300, batch_size=32, learning_rate=1e-3),  # batch_size in pairs
}
PREF_PAIRS = dict(train=4096, val=512)  # built-in preference pairs (--data=prefs)


def stage_of(data):
    if data == "pretrain" or is_corpus(data):
        return "pretrain"
    return "reward" if data == "prefs" or is_preferences(data) else "sft"


def sample_batch(stage, step, seed, n, block_size, stream=None, examples=None):
    """The global batch of n sequences for optimizer step `step`: a pure function of (seed, step), which is what
    makes resume exact and lets every rank agree on the batch without communicating. -> X, Y (n, T) windows of
    the stream, or a list of n (x, y) examples."""
    rng = np.random.default_rng([seed, step])
    if stage == "pretrain":
        return windows(stream, rng.integers(0, len(stream) - block_size - 1, size=n), block_size)
    return [examples[i] for i in rng.integers(0, len(examples), size=n)]


def lr_at(step, lr, min_lr, warmup_iters, decay_iters, decay):
    """Linear warmup to lr, then a cosine to min_lr at decay_iters (Loshchilov & Hutter, SGDR), flat after."""
    if step <= warmup_iters:
        return lr * step / max(warmup_iters, 1)
    if not decay:
        return lr
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(decay_iters - warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def main(argv):
    cfg, given = parse_config(Config, argv)
    stage = stage_of(cfg.data)
    # resolve the stage defaults now, so the config saved in the checkpoint holds the values actually used
    cfg = replace(cfg, **{k: v for k, v in STAGE_DEFAULTS[stage].items() if getattr(cfg, k) in (-1, "")})
    cfg = replace(cfg, min_lr=cfg.learning_rate / 10 if cfg.min_lr < 0 else cfg.min_lr,
                  lr_decay_iters=cfg.max_iters if cfg.lr_decay_iters < 0 else cfg.lr_decay_iters)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume = cfg.init_from == "resume"
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        cfg = resume_config(Config, {**given, "out_dir": cfg.out_dir}, ckpt, ckpt_path, "train_sft.py", RUN_DEFINING)
        saved, saved_data_hash = ckpt["config"], ckpt.get("data_hash")
        if "learning_rate" in given and "min_lr" not in given and saved["min_lr"] == saved["learning_rate"] / 10:
            cfg = replace(cfg, min_lr=cfg.learning_rate / 10)  # the floor follows a new peak, as in a fresh run
            print0(f"changed: min_lr {saved['min_lr']} -> {cfg.min_lr}")
        stage = stage_of(cfg.data)
    elif cfg.init_from != "scratch":
        ckpt = load_checkpoint(cfg.init_from)
    validate(cfg)
    if cfg.packing and stage != "sft":
        raise UserError(f"--packing=true --data={cfg.data}: packing is for conversations (pretraining windows have "
                        f"no padding to remove; a reward model reads each pair's last token)")
    snapshots = parse_steps(cfg.snapshot_steps, "snapshot_steps")
    if ckpt is None and cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd={cfg.n_embd} --n_head={cfg.n_head}: n_embd must be a multiple of n_head")
    if ckpt is None and cfg.pos_emb == "rope" and (cfg.n_embd // cfg.n_head) % 2:
        raise UserError(f"--n_embd={cfg.n_embd} --n_head={cfg.n_head}: the head size n_embd/n_head must be even "
                        f"(rotary positions rotate pairs of channels; --pos_emb=learned does not)")
    if cfg.init_optimizer and not resume and (ckpt or {}).get("script") != "train_sft.py":
        raise UserError(f"--init_optimizer=true: --init_from={cfg.init_from} is not a train_sft.py checkpoint, so "
                        f"it holds no AdamW state of this script's")
    if cfg.init_optimizer and not resume and (ckpt.get("kind") == "reward_model") != (stage == "reward"):
        raise UserError(f"--init_optimizer=true: --init_from={cfg.init_from} trained another kind of model "
                        f"(a language model and a reward model have different parameters)")
    if resume and cfg.sft_kl_coef > 0 and "ref_model" not in ckpt:
        raise UserError(f"--sft_kl_coef={cfg.sft_kl_coef}: {ckpt_path} was trained without the KL anchor, so it "
                        f"holds no reference model to anchor to")
    if stage == "reward" and cfg.sft_kl_coef > 0:
        raise UserError(f"--sft_kl_coef={cfg.sft_kl_coef}: a reward model has no next-token distribution to anchor")

    # ------------------------------------------------------------------------------------------------------------
    # runtime, out_dir, model: from scratch, from a checkpoint (e.g. the base model for SFT), or resume this run

    rt = setup_runtime(cfg.device, cfg.dtype)
    if cfg.batch_size % rt.world_size != 0:
        raise UserError(f"--batch_size={cfg.batch_size}: must divide evenly over the {rt.world_size} processes")
    torch.manual_seed(cfg.seed)  # the same on every rank: the scratch init must match (weights are never broadcast)
    if ckpt is None:
        tok = get_tokenizer(cfg.tokenizer)
        model_args = asdict(GPTConfig(block_size=cfg.block_size, vocab_size=tok.vocab_size, n_layer=cfg.n_layer,
                                      n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, pos_emb=cfg.pos_emb))
        model = build_model(model_args)
    else:
        model_args = ckpt["model_args"]
        model = build_model(model_args)
        model = load_weights(RewardModel(model) if ckpt.get("kind") == "reward_model" else model, ckpt["model"])
        path = ckpt_path if resume else cfg.init_from
        if isinstance(model, RewardModel) and stage != "reward":
            raise UserError(f"{path} is a reward model; --data={cfg.data} trains a language model")
        tok = from_checkpoint(ckpt, path)
        if model_args["vocab_size"] < tok.vocab_size:
            raise UserError(f"{path}: the model has {model_args['vocab_size']} token embeddings but tokenizer "
                            f"{tok.name!r} has {tok.vocab_size} tokens")
        print0(f"loaded {path} (step {ckpt.get('step')}); its shape overrides n_layer/n_head/n_embd/block_size/pos_emb")
    if stage == "reward" and not isinstance(model, RewardModel):
        model = RewardModel(model)  # the trunk of the base or SFT model (or a scratch one) and a zero-init head
    model.to(rt.device)
    block_size = model_args["block_size"]
    print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {model_args}")

    # frozen initial model for the KL anchor; resume restores the one saved with the run, not the current weights
    ref_model = None
    if cfg.sft_kl_coef > 0:
        ref_model = copy.deepcopy(model)
        if resume:
            load_weights(ref_model, ckpt["ref_model"])
        ref_model.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------------------------
    # data

    # the built-in world's own metrics (forgetting per skill, task accuracy) only when it is the data
    builtin = cfg.data in ("pretrain", "sft")
    world = load_world(seed=cfg.world_seed)
    eval_prompts = spread(world.eval_prompts, cfg.eval_prompts if builtin else 0)  # every phrasing, not the first
    eval_prompts = load_prompts("", eval_prompts, tok, block_size, cfg.max_new_tokens)
    stream = val_stream = train_examples = val_examples = data_hash = init_lm = None
    if cfg.data == "pretrain":
        # every skill's docs, each ending in <|endoftext|>, as one stream: windows cross doc boundaries like GPT-2's
        stream = np.array([t for s in world.skills for d in world.pretrain[s] for t in encode_doc(tok, d)])
        val_stream = np.array([t for s in world.skills for d in world.heldout[s] for t in encode_doc(tok, d)])
    elif stage == "pretrain":
        # your corpus, tokenized once into a cached memmap; its last 10% (at least one window) is the val stream
        tokens, data_hash = load_corpus(cfg.data, tok, cfg.out_dir)
        n_val = max(len(tokens) // 10, block_size + 2)
        stream, val_stream = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    if stage == "pretrain":
        for name, s in (("train", stream), ("held-out", val_stream)):
            if len(s) <= block_size + 1:
                raise UserError(f"{cfg.data}: the {name} stream has {len(s)} tokens, fewer than block_size+2="
                                f"{block_size + 2}")
        print0(f"data: train stream {len(stream):,} tokens | held-out {len(val_stream):,} tokens")
    elif stage == "reward":
        # the model this one starts from: whose samples the built-in labeler compares, and (as the policy PPO will
        # start from) whose scores set the normalisation. Loaded from init_from, so a resume sees the same one
        if cfg.init_from != "scratch":
            init_lm = load_model(cfg.init_from, rt.device)[0]
        if cfg.data == "prefs":
            train_raw, val_raw = (world_preferences(world, tok, init_lm, PREF_PAIRS[split], prompts, cfg.seed + i,
                                                    cfg.max_new_tokens, rt.device)
                                  for i, (split, prompts) in enumerate((("train", world.ppo_prompts),
                                                                        ("val", world.eval_prompts))))
        else:
            raw = load_preferences(cfg.data)  # UserError("path:LINE: ...") on a bad record
            n_val = len(raw) // 10
            train_raw, val_raw = (raw[:-n_val], raw[-n_val:]) if n_val > 0 else (raw, raw)
        data_hash = pairs_hash(train_raw + val_raw)
        train_examples, val_examples = ([encode_pair(tok, p, block_size) for p in split]
                                        for split in (train_raw, val_raw))
        val_decided = [p.decided for p in val_raw]
        for split, ex in (("train", train_examples), ("val", val_examples)):
            print0(f"data: preference pairs {split} {len(ex)} | {sum(t for *_, t in ex)} keep only their last "
                   f"block_size={block_size} tokens")
    else:
        if cfg.data == "sft":
            train_raw, val_raw = ([(f"--data=sft example {i}", [("user", ex["prompt"]),
                                                                ("assistant", ex["completion"])])
                                   for i, ex in enumerate(split)] for split in (world.sft_train, world.sft_val))
        else:
            raw = [(f"{cfg.data}:{lineno}", turns) for lineno, turns in numbered_conversations(cfg.data, "assistant")]
            with open(cfg.data, "rb") as f:
                data_hash = hashlib.sha256(f.read()).hexdigest()
            # hold out the last 10% as validation; a tiny file validates on its training examples
            n_val = len(raw) // 10
            train_raw, val_raw = (raw[:-n_val], raw[-n_val:]) if n_val > 0 else (raw, raw)
        train_examples, val_examples = (sft_examples(raw, tok, block_size, cfg.too_long, f"sft {split}")
                                        for split, raw in (("train", train_raw), ("val", val_raw)))
        for split, examples in (("train", train_examples), ("val", val_examples)):
            if not examples:
                raise UserError(f"{cfg.data}: no {split} example fits in block_size={block_size}")
    if resume and saved_data_hash != data_hash:
        raise UserError(f"cannot resume {ckpt_path}: {cfg.data} is not the data it started with (its contents "
                        f"changed); train on it in a new out_dir")

    def get_batch(step):
        """-> this rank's grad_accum micro-batches X, Y (b, T) and segments (None, or (b, T) when packed), the
        global count the step's loss divides by, and the global count of real (not padding) tokens."""
        batch = sample_batch(stage, step, cfg.seed, cfg.batch_size * cfg.grad_accum, block_size,
                             stream=stream, examples=train_examples)
        if stage == "pretrain":
            X, Y = batch
            n_real = X.numel()
        elif stage == "reward":  # X (n, 2, T) chosen and rejected; Y their real-token mask
            X, Y = collate_pairs(batch, tok.eot_id)
            n_real = int(Y.sum())
        else:
            X, Y = collate(batch, tok.eot_id)
            n_real = sum(len(x) for x, _ in batch)
        # over all ranks and micro-steps: the divisor of the step's loss (a reward model's loss is per pair)
        n_tokens = len(X) if stage == "reward" else int((Y != IGNORE).sum())
        b = cfg.batch_size // rt.world_size
        micro = []
        for k in range(cfg.grad_accum):
            lo = k * cfg.batch_size + rt.rank * b  # this rank's slice of micro-batch k
            if cfg.packing:
                micro.append([t.to(rt.device) for t in pack(batch[lo:lo + b], block_size, tok.eot_id)])
            else:
                micro.append((X[lo:lo + b].to(rt.device), Y[lo:lo + b].to(rt.device), None))
        return micro, n_tokens, n_real

    # ------------------------------------------------------------------------------------------------------------
    # optimizer: AdamW (Loshchilov & Hutter), weight decay on matmul/embedding weights only, not biases or norms

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                  fused=True)  # one kernel for all params, on CPU as on CUDA
    step = 0
    if resume or cfg.init_optimizer:
        optimizer.load_state_dict(ckpt["optimizer"])  # the lr is set again every step, from the schedule
    if resume:
        step = ckpt["step"]
        set_rng_state(ckpt["rng"])
    ckpt = None  # free the loaded tensors

    raw_model = model  # eval, sampling and checkpoints use the uncompiled module
    limits = weight_limits(dict(model=raw_model))  # how large a weight may grow before a save refuses it
    if cfg.compile and rt.device_type == "cuda":
        model = torch.compile(model)

    # ------------------------------------------------------------------------------------------------------------
    # evaluation (rank 0 only) and checkpoints

    @torch.no_grad()
    def val_loss():
        if stage == "pretrain":
            X, Y = spread_windows(val_stream, cfg.eval_examples, block_size)  # (n, T) each
            batches = [(X[i:i + cfg.batch_size], Y[i:i + cfg.batch_size]) for i in range(0, len(X), cfg.batch_size)]
        else:
            ex = val_examples[:cfg.eval_examples]
            batches = [collate(ex[i:i + cfg.batch_size], tok.eot_id) for i in range(0, len(ex), cfg.batch_size)]
        with rt.autocast():
            return mean_loss(raw_model, batches, rt.device)

    @torch.no_grad()
    def sample():
        """A continuation of the held-out stream's first tokens: what the model has learned to write."""
        start = [int(t) for t in val_stream[:16]]
        gen = torch.Generator(device=rt.device).manual_seed(cfg.seed)
        out, _, _ = raw_model.generate([start], cfg.max_new_tokens, temperature=cfg.eval_temperature,
                                       generator=gen)
        return tok.decode_text(start) + " >>> " + tok.decode_text(out[0, len(start):].tolist())

    def evaluate(step):
        raw_model.eval()
        if stage == "reward":  # every held-out pair: the Bradley-Terry loss and the pairwise accuracy
            with rt.autocast():
                record = dict(kind="eval", step=step, **pair_metrics(raw_model, val_examples, val_decided,
                                                                     cfg.batch_size, tok.eot_id, rt.device))
        else:
            record = dict(kind="eval", step=step, val_loss=val_loss())
        line = f"eval {step}/{cfg.max_iters} | val {record['val_loss']:.4f}"
        if stage == "reward":
            line += f" | acc {record['acc']:.3f} | acc_decided {record['acc_decided']:.3f}"
        with rt.autocast():
            if builtin:
                record["heldout"] = heldout_losses(raw_model, tok, world, rt.device, max_docs=cfg.heldout_docs)
                line += " | heldout " + " ".join(f"{s} {v:.4f}" for s, v in record["heldout"].items())
            # a scratch model at step 0 scores 0 and runs every sample to the length limit: not worth the time
            if eval_prompts and not (step == 0 and cfg.init_from == "scratch"):
                record["task"] = task_eval(raw_model, tok, world, eval_prompts, k=1,
                                           temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                                           seed=cfg.seed, device=rt.device)
                line += " | task " + " ".join(f"{k} {record['task'][k]:.3f}" for k in TASK_SHOWN)
            if stage == "pretrain" and not builtin:
                record["sample"] = sample()
                line += f"\nsample {step}: {record['sample']!r}"
        raw_model.train()
        print(line)
        log.write(record)
        return record

    def save(step):
        check_model_finite(step, ckpt_path, dict(model=raw_model), limits)
        obj = dict(model=raw_model.state_dict(), model_args=model_args, optimizer=optimizer.state_dict(),
                   config=asdict(cfg), step=step, rng=get_rng_state(), stage=stage, script="train_sft.py",
                   data_hash=data_hash, **tok.checkpoint_entries())
        if ref_model is not None:
            obj["ref_model"] = ref_model.state_dict()
        if stage == "reward":  # what PPO needs: that it is one, and its scale on the policy PPO starts from
            with rt.autocast():
                obj.update(kind="reward_model", reward_norm=reward_norm(
                    raw_model, tok, rt.device, init_lm, world.ppo_prompts if cfg.data == "prefs" else
                    [p.prompt for p in train_raw], cfg.max_new_tokens, val_examples, tok.eot_id))
            print(f"reward_norm: {obj['reward_norm']}")
        save_checkpoint(ckpt_path, obj)
        print(f"saved {ckpt_path} at step {step}")

    # ------------------------------------------------------------------------------------------------------------
    # training loop

    if rt.master:  # the first write into out_dir: every knob and the data were checked above
        lock_out_dir(cfg.out_dir)
    log = RunLog(os.path.join(cfg.out_dir, "log.jsonl"), resume_step=step if resume else None, master=rt.master)
    first = record = None  # evals before and after, for the forgetting table
    if rt.master:
        # a resume does not evaluate its starting point again: the log already holds that step's eval
        first = log.first("eval") if resume else evaluate(step)
    model.train()
    t_start, step_start = time.time(), step
    while step < cfg.max_iters:
        step += 1
        t0 = time.time()
        lr = lr_at(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters, cfg.lr_decay)
        for group in optimizer.param_groups:
            group["lr"] = lr

        micro, n_tokens, n_real = get_batch(step)
        stats = torch.zeros(3, device=rt.device)  # [sum of CE, sum of KL, pairs ranked right] over this rank's
        for X, Y, segments in micro:
            if stage == "reward":  # X (b, 2, T) chosen and rejected, Y their real-token mask
                with rt.autocast():
                    r = pair_rewards(model, X, Y).float()  # (b, 2)
                loss_sum = bradley_terry_loss(r[:, 0], r[:, 1]).sum()
                stats[2] += (r[:, 0] > r[:, 1]).sum()
            else:
                with rt.autocast():
                    logits = model(X, segments=segments)  # (b, T, V)
                loss_sum = kernels.cross_entropy(logits.flatten(0, 1), Y.flatten(), reduction="sum")
            loss = loss_sum / n_tokens
            stats[0] += loss_sum.detach()
            if ref_model is not None:
                with torch.no_grad(), rt.autocast():
                    ref_logits = ref_model(X, segments=segments)  # (b, T, V)
                kl_sum = (kernels.token_kl(logits, ref_logits) * (Y != IGNORE)).sum()  # over loss tokens only
                loss = loss + cfg.sft_kl_coef * kl_sum / n_tokens
                stats[1] += kl_sum.detach()
            loss.backward()
        sync_grads(params)
        ce, kl, acc = (all_reduce_sum(stats) / n_tokens).tolist()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        check_finite(step, ckpt_path, loss=ce, kl=kl, grad_norm=grad_norm)  # before the step: weights still good
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert_in_sync(raw_model, step, "model")  # data parallel: every rank holds the same weights

        # logging: one line and one JSON record per log_interval steps
        dt = time.time() - t0
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            eta = (time.time() - t_start) / (step - step_start) * (cfg.max_iters - step)
            line = (f"step {step}/{cfg.max_iters} | loss {ce:.4f} | lr {lr:.1e} | tok/s {n_real / dt:.0f}"
                    f" | eta {format_eta(eta)}")
            print0(line + (f" | kl {kl:.4f}" if ref_model is not None else "")
                   + (f" | acc {acc:.3f}" if stage == "reward" else ""))
            log.write(dict(kind="train", step=step, loss=ce, kl=kl, lr=lr, grad_norm=grad_norm,
                           tok_per_s=n_real / dt, eta_s=eta, **(dict(acc=acc) if stage == "reward" else {})))

        if rt.master and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_iters):
            record = evaluate(step)
            check_finite(step, ckpt_path, val_loss=record["val_loss"])
            save(step)
        if rt.master and step in snapshots:
            save_snapshot(cfg.out_dir, step, model=raw_model.state_dict(), model_args=model_args, config=asdict(cfg),
                          script="train_sft.py", **tok.checkpoint_entries())

    # ------------------------------------------------------------------------------------------------------------
    # summary: forgetting on each pretraining skill, before vs after this run

    if rt.master and first is not None and record is not None:
        print(f"done in {format_eta(time.time() - t_start)}. before -> after: val loss {first['val_loss']:.4f} -> "
              f"{record['val_loss']:.4f}" + ("; held-out loss per pretraining skill:" if builtin else ""))
        for s, before in first.get("heldout", {}).items():
            print(f"  {s:12s} {before:.4f} -> {record['heldout'][s]:.4f}")
        if "task" in first and "task" in record:
            print(f"task accuracy on {len(eval_prompts)} held-out prompts: {first['task']['accuracy']:.3f} -> "
                  f"{record['task']['accuracy']:.3f}")
    teardown(rt)


if __name__ == "__main__":
    entry(main)
