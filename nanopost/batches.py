"""
What train_sft.py trains on, whichever --data: the stage it names, the train and held-out splits,
each step's batch and the val loss's batches.

  --data               stage     train and val                       a step's batch
  pretrain | FILE.txt  pretrain  token streams                       random block_size windows
  sft | FILE.jsonl     sft       (x, y) conversations                right-padded (or packed) rows
  prefs | PAIRS.jsonl  reward    (chosen ids, rejected ids) pairs    right-padded pairs
    --objective=dpo    dpo       the same pairs                      the same, Y their response tokens

  pretrain     every skill's documents of the built-in world (world.pretrain), each ending in
               <|endoftext|>, as one stream; world.heldout the same way is the val stream
  FILE.txt     your corpus, or a .jsonl of {"text": ...} documents, tokenized once into a cached
               memmap (nanopost.data.load_corpus)
  sft          the built-in demonstrations, world.sft_train and world.sft_val
  FILE.jsonl   your conversations: {"messages": [...]} (system and multi-turn), {"prompt",
               "completion"}, or ShareGPT's .json array (nanopost.data.load_conversations)
  prefs        the built-in world's preference pairs: a simulated labeler compares samples of the
               --init_from model and programmatic answers (nanopost.prefs.world_preferences)
  PAIRS.jsonl  your pairs, {"prompt", "chosen", "rejected"} or HH-RLHF's {"chosen", "rejected"}
               transcripts (nanopost.prefs.load_preferences; .gz read as is)

Your files keep their last 10% for validation (hold_out). SFT learns every assistant turn (and
the <|endoftext|> ending it); a conversation longer than the context drops its oldest exchanges
(the system turn stays), one whose last exchange alone does not fit is dropped, an error or
truncated (--too_long), and both are counted and printed. --packing=true puts several
conversations in one row (nanopost.data.pack), attention blocked between them and positions
restarting per conversation: the same examples and loss, without the padding that right-padding
every row to the longest computes (tok/s counts real tokens).
"""

import hashlib
from dataclasses import dataclass

import numpy as np

from nanopost.config import UserError
from nanopost.data import (IGNORE, collate, is_corpus, load_corpus, numbered_conversations, pack,
                           sft_examples, spread_windows, windows)
from nanopost.distributed import print0
from nanopost.loading import load_model
from nanopost.prefs import (collate_pairs, encode_pair, is_preferences, load_preferences,
                            pairs_hash, response_mask, world_preferences)
from nanopost.world import encode_doc

PREF_PAIRS = dict(train=4096, val=512)  # built-in preference pairs (--data=prefs)


def stage_of(data, objective="reward"):
    """--data, --objective -> "pretrain" (token streams), "sft" (conversations), "reward" or "dpo" (preference
    pairs: a reward model, or the policy trained on them by DPO or IPO)."""
    if data == "pretrain" or is_corpus(data):
        return "pretrain"
    if data == "prefs" or is_preferences(data):
        return "reward" if objective == "reward" else "dpo"
    return "sft"


def hold_out(items, at_least=0):
    """-> (train, val): the last 10% of items (at least `at_least`) is the validation split. A set
    too small to spare one (under 10 items, at_least 0) validates on its training items."""
    n_val = max(len(items) // 10, at_least)
    if n_val == 0:
        return items, items
    return items[:len(items) - n_val], items[len(items) - n_val:]


@dataclass
class TrainData:
    """One --data resolved: what train_sft.py samples its batches from and evaluates on."""
    stage: str                 # stage_of(--data, --objective)
    train: object              # a token stream (pretrain) or a list of examples
    val: object                # the same, held out
    hash: str = None           # sha256 a resume must find again; None: built-in corpus or demos
    val_decided: list = None   # reward: each val pair decided by the labeler's hidden score
    norm_prompts: list = None  # reward: the prompts on whose samples reward_norm is measured
    policy: object = None      # reward: the --init_from language model (None from scratch)
    val_prompts: list = None   # pairs: the held-out prompts that fit with max_new_tokens


def load_train_data(cfg, stage, world, tok, block_size, device):
    """train_sft.py's cfg.data (of stage_of(cfg.data)) as a TrainData; a UserError when a split is
    too small to train on."""
    if stage == "pretrain":
        return _streams(cfg, world, tok, block_size)
    if stage in ("reward", "dpo"):
        return _pairs(cfg, stage, world, tok, block_size, device)
    return _conversations(cfg, world, tok, block_size)


def _streams(cfg, world, tok, block_size):
    data_hash = None
    if cfg.data == "pretrain":
        # every skill's docs, each ending in <|endoftext|>, as one stream: windows cross doc
        # boundaries like GPT-2's
        streams = (np.array([t for s in world.skills for d in docs[s] for t in encode_doc(tok, d)])
                   for docs in (world.pretrain, world.heldout))
    else:
        # your corpus, tokenized once into a cached memmap; its last 10% (at least one window) is
        # the val stream
        tokens, data_hash = load_corpus(cfg.data, tok, cfg.out_dir)
        streams = hold_out(tokens, at_least=block_size + 2)
    stream, val_stream = streams
    for name, s in (("train", stream), ("held-out", val_stream)):
        if len(s) <= block_size + 1:
            raise UserError(f"{cfg.data}: the {name} stream has {len(s)} tokens, fewer than "
                            f"block_size+2={block_size + 2}")
    print0(f"data: train stream {len(stream):,} tokens | held-out {len(val_stream):,} tokens")
    return TrainData("pretrain", stream, val_stream, data_hash)


def _conversations(cfg, world, tok, block_size):
    data_hash = None
    if cfg.data == "sft":
        splits = ([(f"--data=sft example {i}",
                    [("user", ex["prompt"]), ("assistant", ex["completion"])])
                   for i, ex in enumerate(split)] for split in (world.sft_train, world.sft_val))
    else:
        numbered = numbered_conversations(cfg.data, "assistant")
        raw = [(f"{cfg.data}:{lineno}", turns) for lineno, turns in numbered]
        with open(cfg.data, "rb") as f:
            data_hash = hashlib.sha256(f.read()).hexdigest()
        splits = hold_out(raw)
    train, val = (sft_examples(raw, tok, block_size, cfg.too_long, f"sft {split}")
                  for split, raw in zip(("train", "val"), splits))
    for split, examples in (("train", train), ("val", val)):
        if not examples:
            raise UserError(f"{cfg.data}: no {split} example fits in block_size={block_size}")
    return TrainData("sft", train, val, data_hash)


def _pairs(cfg, stage, world, tok, block_size, device):
    # the model this one starts from: whose samples the built-in labeler compares, and (as the
    # policy PPO will start from) whose scores set the normalisation. Loaded from init_from, so a
    # resume sees the same one
    policy = None
    if cfg.init_from != "scratch":
        policy = load_model(cfg.init_from, device)[0]
    if cfg.data == "prefs":
        prompts = dict(train=world.ppo_prompts, val=world.eval_prompts)
        train_raw, val_raw = (world_preferences(world, tok, policy, PREF_PAIRS[split],
                                                prompts[split], cfg.seed + i, cfg.max_new_tokens,
                                                device)
                              for i, split in enumerate(("train", "val")))
        norm_prompts = world.ppo_prompts
    else:
        train_raw, val_raw = hold_out(load_preferences(cfg.data))  # UserError("path:LINE: ...")
        norm_prompts = [p.prompt for p in train_raw]
    train, val = ([encode_pair(tok, p, block_size) for p in split]
                  for split in (train_raw, val_raw))
    for split, examples in (("train", train), ("val", val)):
        n_truncated = sum(t for *_, t in examples)
        print0(f"data: preference pairs {split} {len(examples)} | {n_truncated} keep only their "
               f"last block_size={block_size} tokens")
    # the held-out prompts whose samples measure DPO's KL(pi || ref), each fitting with a response
    prompts = world.eval_prompts if cfg.data == "prefs" else [p.prompt for p in val_raw]
    fits = [p for p in prompts if len(tok.encode_prompt(p)) + cfg.max_new_tokens <= block_size]
    return TrainData(stage, train, val, pairs_hash(train_raw + val_raw),
                     val_decided=[p.decided for p in val_raw], norm_prompts=norm_prompts,
                     policy=policy, val_prompts=fits)


def sample_batch(data, step, seed, n, block_size):
    """The global batch of n sequences for optimizer step `step`: a pure function of (seed, step),
    which is what makes resume exact and lets every rank agree on the batch without communicating.
    -> X, Y (n, T) windows of the stream, or a list of n examples."""
    rng = np.random.default_rng([seed, step])
    if data.stage == "pretrain":
        starts = rng.integers(0, len(data.train) - block_size - 1, size=n)
        return windows(data.train, starts, block_size)
    return [data.train[i] for i in rng.integers(0, len(data.train), size=n)]


def step_batches(data, step, cfg, rt, block_size, pad_id):
    """-> this rank's cfg.grad_accum micro-batches X, Y (b, T) and segments (None, or (b, T) when
    packed), the global count the step's loss divides by (its loss tokens; its pairs for a reward
    model, whose X is (b, 2, T) chosen and rejected and Y their real-token mask), and the global
    count of real (not padding) tokens. DPO's Y is the pairs' response tokens (nanopost.prefs.response_mask)."""
    batch = sample_batch(data, step, cfg.seed, cfg.batch_size * cfg.grad_accum, block_size)
    if data.stage == "pretrain":
        X, Y = batch
        n_real = X.numel()
    elif data.stage in ("reward", "dpo"):
        X, Y = collate_pairs(batch, pad_id)
        n_real = int(Y.sum())
        Y = response_mask(batch, Y) if data.stage == "dpo" else Y
    else:
        X, Y = collate(batch, pad_id)
        n_real = sum(len(x) for x, _ in batch)
    n_loss = len(X) if data.stage in ("reward", "dpo") else int((Y != IGNORE).sum())
    b = cfg.batch_size // rt.world_size
    micro = []
    for k in range(cfg.grad_accum):
        lo = k * cfg.batch_size + rt.rank * b  # this rank's slice of micro-batch k
        if cfg.packing:
            micro.append([t.to(rt.device) for t in pack(batch[lo:lo + b], block_size, pad_id)])
        else:
            micro.append((X[lo:lo + b].to(rt.device), Y[lo:lo + b].to(rt.device), None))
    return micro, n_loss, n_real


def val_batches(data, n, batch_size, block_size, pad_id):
    """The held-out batches of the val loss, X, Y (b, T) each: n windows spread over the whole val
    stream, or its first n examples."""
    if data.stage == "pretrain":
        X, Y = spread_windows(data.val, n, block_size)  # (n, T) each
        return [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, len(X), batch_size)]
    examples = data.val[:n]
    starts = range(0, len(examples), batch_size)
    return [collate(examples[i:i + batch_size], pad_id) for i in starts]
