"""
Evaluation: what a post-trained checkpoint gained on the new task, what it lost from pretraining, and how far
it moved from the base model.

    python -m nanopost.evaluate --base=out/base/ckpt.pt out/s0/sft/ckpt.pt out/s0/ppo/ckpt.pt

prints one row per checkpoint (the base first). On your data, it prints what your data can measure:

    python -m nanopost.evaluate --data=chats.jsonl --prompts=prompts.jsonl --reward_fn=my.py:score out/a/ckpt.pt ...

the loss on your conversations or corpus (--data) and your reward on k samples per prompt (--prompts).
Everything is computed on held-out data with a fixed seed, so two runs of the command print the same numbers.
Cost with the defaults (k=8 samples on 24 prompts, 64 held-out docs per skill, 64 probes per skill), measured on
a shared 2-core CPU: ~20 s per checkpoint, two thirds of it sampling and the two forward passes for entropy and KL.

The metrics, and the choices behind them:
- new task: verifier accuracy over k samples per held-out prompt (world.eval_prompts). A sample counts as
  correct when the verifier says it is valid AND it ended with <|endoftext|>; a truncated answer is not an answer.
  pass@k = fraction of prompts with at least one correct sample among the k.
- diversity: distinct valid answers per prompt among its k samples (the paper's worry: SFT on a narrow
  demonstrator collapses onto one answer); distinct-1/2 (Li et al. 2016) over RESPONSE TOKEN ids (the
  tokenizer's tokens, <|endoftext|> excluded), computed over the k responses to one prompt and averaged over
  prompts, so it measures how different the samples for the same prompt are, not how different the prompts are;
  mean per-token entropy (nats) of pi at the sampled response positions.
- forgetting: mean per-token cross-entropy on world.heldout[skill] (documents never trained on), and greedy
  accuracy on world.probes[skill], each reported as the change from the base model.
- distance: both directions of the KL of whole responses between pi and the base, per response, on the held-out
  prompts, each estimated on the samples it is an expectation over: kl_base_pi = KL(pi_base || pi) on responses
  sampled from the BASE, kl_pi_base = KL(pi || pi_base) on responses sampled from pi. The exact per-token KL
  (kernels.token_kl) summed along a sampled response is an unbiased estimate of the sequence-level KL when the
  samples come from the KL's first argument (E_p[sum_t KL(p(.|s_t) || q(.|s_t))] = KL(p || q) of sequences); on
  the other model's samples it estimates neither direction. "RL's Razor" (Shenfeld, Pari & Agrawal 2025, eq. 1)
  finds that forgetting tracks the forward one, E_x[KL(pi_base || pi)], measured on the new task's prompts.
Entropy and KL are taken at temperature 1 (the policy itself); the samples are drawn at the eval temperature, 1 by
default, where the estimates are unbiased.
"""

import contextlib
import os
import time
from dataclasses import dataclass

import torch

import kernels
from nanopost.config import UserError, entry, knob, parse_config, validate
from nanopost.distributed import barrier, resolve_device
from nanopost.dpo import dpo_loss, logratios
from nanopost.loading import load_model
from nanopost.data import (IGNORE, collate, is_corpus, load_conversations, load_corpus, load_ppo_prompts,
                           sft_example, spread_windows)
from nanopost.prefs import collate_pairs, response_mask
from nanopost.reward import load_reward_fn, score_responses
from nanopost.rollout import at_response, response_logprobs, rollout
from nanopost.tokenizer import from_checkpoint
from nanopost.world import encode_doc, load_world

# rows per forward pass: the (rows, T, V) fp32 logits dominate memory; 32 x 128 x 4k x 4 B = 64 MB
EVAL_BATCH = 32
# rows per rollout: sampling is one small forward per token, so on CPU per-step overhead dominates and bigger
# batches are cheaper per row (measured, 256 samples of 32 tokens, 2 cores: 27 s in batches of 32, 11 s of 128,
# 8 s of 256); the KV cache is only (L, 2, B, T, C) = 4 x 2 x 256 x 64 x 128 x 4 B = 67 MB
ROLLOUT_BATCH = 256


class _eval_mode:
    """Put a model in eval mode for a block and give it back in whatever mode it was in (training loops call us)."""

    def __init__(self, *models):
        self.models = [m for m in models if m is not None]

    def __enter__(self):
        self.was_training = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.models, self.was_training):
            m.train(mode)
        return False


# -----------------------------------------------------------------------------
# diversity helpers (pure python, tested on fixed lists)

def distinct_n(seqs, n):
    """Unique n-grams / total n-grams over a list of token sequences (Li et al. 2016). 0.0 when there are none."""
    grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def evenly_spaced(xs, n):
    """n items of xs evenly spaced over the whole list (all of xs when n >= len): covers every phrasing, every
    probe kind, instead of the first n of one kind."""
    xs = list(xs)
    if n >= len(xs):
        return xs
    return [xs[(i * len(xs)) // n] for i in range(n)]


def completion_matches(generated, expected):
    """Greedy completion is right when it starts with the expected text and the word ends there
    ("42" must not match "425"); leading whitespace is ignored on both sides."""
    g, e = generated.lstrip(), expected.strip()
    return g.startswith(e) and (len(g) == len(e) or not g[len(e)].isalnum())


def distinct_answers(verdicts):
    """Number of different answers among the correct samples of one prompt."""
    return len({v["answer"] for v in verdicts if v["correct"]})


# -----------------------------------------------------------------------------
# forgetting: held-out pretraining loss and probe accuracy

@torch.no_grad()
def heldout_losses(model, tok, world, device, max_docs=64):
    """
    {skill: mean per-token cross-entropy (nats) on the first max_docs documents of world.heldout[skill]}.
    Each document is preceded by <|endoftext|>, as in the pretraining stream, so every one of its tokens
    (chat-format ones included, the way pretraining sees them) is predicted; tokens are weighted equally across
    documents (sum of losses / number of tokens). Documents longer than the context are cut to fit.
    """
    out = {}
    T_max = model.config.block_size
    with _eval_mode(model):
        for skill in world.skills:
            docs = [([tok.eot_id] + encode_doc(tok, d))[:T_max + 1] for d in world.heldout[skill][:max_docs]]
            docs = [d for d in docs if len(d) >= 2]
            assert docs, f"world.heldout[{skill!r}] has no document with 2 or more tokens"
            docs.sort(key=len)  # similar lengths in one batch -> little padding
            out[skill] = mean_loss(model, [collate([(d[:-1], d[1:]) for d in docs[i:i + EVAL_BATCH]], tok.eot_id)
                                           for i in range(0, len(docs), EVAL_BATCH)], device)
    return out


@torch.no_grad()
def mean_loss(model, batches, device):
    """Mean cross-entropy (nats) per target token over batches of X, Y (B, T); IGNORE targets do not count, so
    every token weighs the same whatever batch it sits in."""
    total, count = 0.0, 0
    for X, Y in batches:
        logits = model(X.to(device))  # (B, T, V)
        total += kernels.cross_entropy(logits.flatten(0, 1), Y.to(device).flatten(), reduction="sum").item()
        count += int((Y != IGNORE).sum())
    return total / count


def lm_val_metrics(model, batches, device):
    """A language model's held-out metrics in train_sft.py: {"val_loss": mean_loss(...)}, the
    counterpart of a reward model's nanopost.prefs.pair_metrics."""
    return dict(val_loss=mean_loss(model, batches, device))


@torch.no_grad()
def dpo_metrics(model, ref_model, examples, decided, batch_size, pad_id, device, beta, label_smoothing, ipo,
                tok, prompts, max_new_tokens, seed):
    """Held-out: the DPO loss, the preference accuracy of the implicit reward (on all pairs and on those the labeler
    decided), the mean implicit rewards of chosen and rejected and their margin, and KL(pi || ref) in nats per
    response on one sample of pi per prompt (none: left out), sampled at temperature 1, where the summed per-token
    KL is an unbiased estimate of the KL of whole responses."""
    loss, rewards = [], []
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        X, M = collate_pairs(batch, pad_id)                                         # (b, 2, T) each
        lr = logratios(model, ref_model, X.to(device), response_mask(batch, M).to(device),
                       contextlib.nullcontext)
        loss.append(dpo_loss(lr[:, 0], lr[:, 1], beta, label_smoothing, ipo))
        rewards.append(beta * lr)
    loss, rewards = torch.cat(loss), torch.cat(rewards)                            # (n,), (n, 2)
    right = (rewards[:, 0] > rewards[:, 1]).float()
    decided = torch.tensor(decided, dtype=torch.bool, device=right.device)
    chosen, rejected = rewards.mean(0).tolist()
    out = dict(val_loss=loss.mean().item(), acc=right.mean().item(),
               acc_decided=right[decided].mean().item() if decided.any() else float("nan"),
               chosen=chosen, rejected=rejected, margin=chosen - rejected)
    if prompts:
        out["kl_ref"] = kl_on_own_samples(model, ref_model, tok, prompts, max_new_tokens, 1.0, seed, device)
    return out


def continuation(model, tok, stream, max_new_tokens, temperature, seed, device):
    """A sample continuing the first 16 tokens of a held-out token stream: what the model has learned
    to write (train_sft.py's eval on your corpus)."""
    start = [int(t) for t in stream[:16]]
    gen = torch.Generator(device=device).manual_seed(seed)
    out, _, _ = model.generate([start], max_new_tokens, temperature=temperature, generator=gen)
    return tok.decode_text(start) + " >>> " + tok.decode_text(out[0, len(start):].tolist())


def lm_metrics(model, tok, world, prompts, heldout_docs, stream, temperature, max_new_tokens, seed,
               device):
    """train_sft.py's evaluation of a language model beyond the val loss: with the built-in world, the
    held-out loss per pretraining skill (forgetting) and the task eval on prompts (none: skipped); with
    a held-out token stream, a sample continuing it. -> dict"""
    record = {}
    if world is not None:
        record["heldout"] = heldout_losses(model, tok, world, device, max_docs=heldout_docs)
    if prompts:
        record["task"] = task_eval(model, tok, world, prompts, k=1, temperature=temperature,
                                   max_new_tokens=max_new_tokens, seed=seed, device=device)
    if stream is not None:
        record["sample"] = continuation(model, tok, stream, max_new_tokens, temperature, seed, device)
    return record


@torch.no_grad()
def probe_accuracy(model, tok, world, device, max_probes=64):
    """
    {skill: fraction of world.probes[skill] whose greedy completion starts with the expected completion}.
    Probes are plain pretraining text (not chat format), so they go through model.generate, not rollout.
    eos_id = <|endoftext|>: a model that ends the document right away has answered nothing.
    At most max_probes per skill, evenly spread over the list. Skills without probes are left out.
    """
    out = {}
    probes_by_skill = getattr(world, "probes", {}) or {}
    with _eval_mode(model):
        for skill, probes in probes_by_skill.items():
            probes = evenly_spaced(probes, max_probes)
            if not probes:
                continue
            correct = 0
            for i in range(0, len(probes), ROLLOUT_BATCH):
                batch = probes[i:i + ROLLOUT_BATCH]
                # a probe starts a document, and in the pretraining stream every document follows <|endoftext|>
                prompts = [[tok.eot_id] + tok.encode(p) for p, _ in batch]
                # +2 tokens of slack: the expected text may tokenize differently after the prompt's last token
                n_new = max(len(tok.encode(e)) for _, e in batch) + 2
                n_new = min(n_new, model.config.block_size - max(len(p) for p in prompts))
                assert n_new > 0, f"probe prompt of skill {skill!r} does not fit the context"
                tokens, mask, _ = model.generate(prompts, n_new, temperature=0.0, eos_id=tok.eot_id)
                P = tokens.size(1) - n_new
                for b, (_, expected) in enumerate(batch):
                    gen = [t for t, keep in zip(tokens[b, P:].tolist(), mask[b, P:].tolist())
                           if keep and t != tok.eot_id]
                    correct += completion_matches(tok.decode(gen), expected)
            out[skill] = correct / len(probes)
    return out


# -----------------------------------------------------------------------------
# new task: sampling, verifier, diversity, entropy and KL to the base model

@torch.no_grad()
def response_stats(model, ro, other=None):
    """Per-token entropy of `model` and, given `other`, KL(model || other) at the response positions of a rollout
    sampled from `model`. Returns (entropy_sum, kl_sum or None, n_tokens): sums, so batches pool exactly; the KL
    sum over a response is an unbiased estimate of KL(model || other) of whole responses (module docstring)."""
    P = ro.prompt_len
    # rows stop at eos, so the last columns are often pads in every row: drop them before the forward passes
    T = int(ro.mask.any(0).nonzero().max()) + 1
    ent_sum, kl_sum, n_tok = 0.0, 0.0, 0
    for i in range(0, ro.tokens.size(0), EVAL_BATCH):
        tokens, mask = ro.tokens[i:i + EVAL_BATCH, :T], ro.mask[i:i + EVAL_BATCH, :T]  # (b, T)
        rmask = ro.response_mask[i:i + EVAL_BATCH, :T - P]  # (b, T-P) True for sampled tokens incl. eos
        (_, ent), logits = response_logprobs(model, tokens, mask, P, return_entropy=True)  # (b, T-P), (b, T-P, V)
        ent_sum += ent[rmask].sum().item()
        n_tok += int(rmask.sum())
        if other is not None:
            other_logits = at_response(other(tokens, attention_mask=mask), P)  # (b, T-P, V)
            kl_sum += kernels.token_kl(logits.float(), other_logits.float())[rmask].sum().item()
    return ent_sum, (kl_sum if other is not None else None), n_tok


@torch.no_grad()
def kl_on_own_samples(model, other, tok, prompts, max_new_tokens, temperature=1.0, seed=0, device="cpu"):
    """KL(model || other) of whole responses, nats per response, on one sample of `model` per prompt: task_eval's
    kl_pi_base for any prompts (no verifier needed). Deterministic given `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    kl_sum = 0.0
    with _eval_mode(model, other):
        for i in range(0, len(prompts), ROLLOUT_BATCH):
            ro = rollout(model, tok, prompts[i:i + ROLLOUT_BATCH], max_new_tokens, temperature=temperature,
                         generator=gen)
            kl_sum += response_stats(model, ro, other)[1]
    return kl_sum / len(prompts)


def score_samples(world, prompts, responses, ended, k, response_tokens=None):
    """
    Verifier and diversity metrics of k samples per prompt, from the samples alone (no model).
    prompts/responses/ended: flat lists, the k samples of prompt i at positions i*k .. i*k+k-1.
    response_tokens: the responses' token ids without <|endoftext|>, for distinct-1/2 (left out when None).
    Returns (metrics dict, per-sample verdicts).
    """
    n = len(responses)
    assert len(prompts) == n == len(ended) and n % k == 0, f"{len(prompts)} prompts, {n} responses, k={k}"
    verdicts = []
    for p, r, e in zip(prompts, responses, ended):
        v = dict(world.verify(p, r, bool(e)))
        v["correct"] = bool(v["valid"]) and bool(e)  # a truncated answer is not an answer
        v["reward"] = float(world.score(p, r, bool(e)))
        verdicts.append(v)
    groups = [range(j, j + k) for j in range(0, n, k)]
    out = dict(
        accuracy=sum(v["correct"] for v in verdicts) / n,
        pass_at_k=sum(any(verdicts[j]["correct"] for j in g) for g in groups) / len(groups),
        ended=sum(bool(e) for e in ended) / n,
        well_formed=sum(bool(v["well_formed"]) for v in verdicts) / n,
        reward=sum(v["reward"] for v in verdicts) / n,
        distinct_valid=sum(distinct_answers([verdicts[j] for j in g]) for g in groups) / len(groups),
    )
    if response_tokens is not None:
        for n_ in (1, 2):
            out[f"distinct_{n_}"] = sum(distinct_n([response_tokens[j] for j in g], n_) for g in groups) / len(groups)
    return out, verdicts


@torch.no_grad()
def task_eval(model, tok, world, prompts, k=1, temperature=1.0, max_new_tokens=32, seed=0, device="cpu",
              base_model=None, top_k=None, n_show=0):
    """
    Sample k responses per prompt, score them with world.verify, and measure their diversity.

    Returns dict of floats: accuracy (mean over all samples of valid-and-ended), pass_at_k, ended, well_formed,
    reward (mean world.score), distinct_valid (distinct correct answers per prompt, mean over prompts),
    distinct_1, distinct_2 (token-level, per prompt over its k samples, mean over prompts), entropy (nats per
    response token), resp_len (tokens), and, when base_model is given, kl_pi_base and kl_base_pi (KL(pi ||
    pi_base) on pi's samples, KL(pi_base || pi) on k samples per prompt from the base; nats per response; see the
    module docstring). With n_show > 0 it also returns "samples": the first n_show (prompt, response, verdict) triples.
    Deterministic: a torch.Generator seeded with `seed` drives all sampling.
    """
    if k < 1:
        raise ValueError(f"task_eval: k must be >= 1, got {k}")
    if not prompts:
        raise ValueError("task_eval: empty prompt list")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    flat = [p for p in prompts for _ in range(k)]  # prompt i owns rows i*k .. i*k+k-1
    responses, ended, resp_tokens = [], [], []
    ent_sum, kl_sum, n_tok = 0.0, 0.0, 0
    with _eval_mode(model, base_model):
        for i in range(0, len(flat), ROLLOUT_BATCH):
            ro = rollout(model, tok, flat[i:i + ROLLOUT_BATCH], max_new_tokens, temperature=temperature,
                         top_k=top_k, generator=gen)
            e, kl, n = response_stats(model, ro, base_model)
            ent_sum, n_tok = ent_sum + e, n_tok + n
            if kl is not None:
                kl_sum += kl
            P = ro.prompt_len
            responses += ro.responses
            ended += ro.ended.tolist()
            for b in range(len(ro.responses)):
                ids = ro.tokens[b, P:][ro.response_mask[b]].tolist()
                resp_tokens.append([t for t in ids if t != tok.eot_id])
        base_kl_sum = 0.0
        if base_model is not None:  # KL(base || pi) on the base's own samples: the same samples for any pi
            base_gen = torch.Generator(device=device).manual_seed(seed + 1)
            for i in range(0, len(flat), ROLLOUT_BATCH):
                ro = rollout(base_model, tok, flat[i:i + ROLLOUT_BATCH], max_new_tokens, temperature=temperature,
                             top_k=top_k, generator=base_gen)
                base_kl_sum += response_stats(base_model, ro, model)[1]
    out, verdicts = score_samples(world, flat, responses, ended, k, resp_tokens)
    out["entropy"] = ent_sum / max(n_tok, 1)
    out["resp_len"] = n_tok / len(flat)
    if base_model is not None:
        out["kl_pi_base"] = kl_sum / len(flat)
        out["kl_base_pi"] = base_kl_sum / len(flat)
    if n_show:
        out["samples"] = list(zip(flat, responses, verdicts))[:n_show]
    return out


@torch.no_grad()
def reward_eval(model, tok, prompts, reward_fn, k=1, temperature=1.0, max_new_tokens=32, seed=0, device="cpu"):
    """Your reward function on k sampled responses per prompt (any prompts, any reward: what PPO on your data
    optimises) -> dict(reward, ended, resp_len), means over all samples. Deterministic given `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    flat = [p for p in prompts for _ in range(k)]
    scores, ended, n_tok = [], [], 0
    with _eval_mode(model):
        for i in range(0, len(flat), ROLLOUT_BATCH):
            ro = rollout(model, tok, flat[i:i + ROLLOUT_BATCH], max_new_tokens, temperature=temperature, generator=gen)
            scores += score_responses(reward_fn, ro.prompts, ro.responses, ro.ended.tolist())
            ended += ro.ended.tolist()
            n_tok += int(ro.response_mask.sum())
    return dict(reward=sum(scores) / len(flat), ended=sum(ended) / len(flat), resp_len=n_tok / len(flat))


# -----------------------------------------------------------------------------
# one checkpoint, all metrics

def evaluate_model(model, tok, world, device, base_model=None, base_metrics=None, k=8, n_prompts=24,
                   temperature=1.0, max_new_tokens=32, seed=0, max_docs=64, max_probes=64):
    """
    Every metric for one model, flat: task metrics, kl_pi_base, kl_base_pi, loss/<skill>, probe/<skill>, and, given
    the base model's own metrics, dloss/<skill>, dloss_mean and dprobe/<skill> (this model minus the base).
    """
    prompts = evenly_spaced(world.eval_prompts, n_prompts)
    m = task_eval(model, tok, world, prompts, k=k, temperature=temperature, max_new_tokens=max_new_tokens,
                  seed=seed, device=device, base_model=base_model)
    for skill, v in heldout_losses(model, tok, world, device, max_docs=max_docs).items():
        m[f"loss/{skill}"] = v
    for skill, v in probe_accuracy(model, tok, world, device, max_probes=max_probes).items():
        m[f"probe/{skill}"] = v
    if base_metrics is not None:
        skills = [s for s in world.skills if f"loss/{s}" in base_metrics]
        for s in skills:
            m[f"dloss/{s}"] = m[f"loss/{s}"] - base_metrics[f"loss/{s}"]
        m["dloss_mean"] = sum(m[f"dloss/{s}"] for s in skills) / len(skills)
        for key in [key for key in m if key.startswith("probe/")]:
            if key in base_metrics:
                m["d" + key] = m[key] - base_metrics[key]
    return m


def evaluate_checkpoints(base_path, paths, device="cpu", world_seed=-1, log=print, **kw):
    """Evaluate the base checkpoint and every path in `paths` against it -> {path: metrics}, base first.
    world_seed=-1: the world the base model was trained on (its config's world_seed, else 0)."""
    base_model, base_ckpt = load_model(base_path, device)
    if world_seed < 0:
        world_seed = (base_ckpt.get("config") or {}).get("world_seed", 0)
    world = load_world(seed=world_seed)
    tok = from_checkpoint(base_ckpt, base_path)
    results = {}
    # the base is the zero point: KL to itself is 0 (tests check the kernel agrees), its losses anchor forgetting
    t0 = time.time()
    base_metrics = evaluate_model(base_model, tok, world, device, base_model=None, **kw)
    base_metrics["kl_pi_base"] = base_metrics["kl_base_pi"] = 0.0
    for key in [key for key in list(base_metrics) if key.startswith(("loss/", "probe/"))]:
        base_metrics["d" + key] = 0.0
    base_metrics["dloss_mean"] = 0.0
    results[base_path] = base_metrics
    log(f"eval | {base_path} | acc {base_metrics['accuracy']:.3f} | kl {base_metrics['kl_base_pi']:.4f} | "
        f"{time.time() - t0:.1f}s")
    for path in paths:
        t0 = time.time()
        model, ckpt = load_model(path, device)
        other = from_checkpoint(ckpt, path)
        if other.fingerprint != tok.fingerprint:
            raise UserError(f"{path}: tokenizer {other.name!r} differs from the base checkpoint's {tok.name!r}")
        m = evaluate_model(model, tok, world, device, base_model=base_model, base_metrics=base_metrics, **kw)
        results[path] = m
        log(f"eval | {path} | acc {m['accuracy']:.3f} | kl {m['kl_base_pi']:.4f} | dloss {m['dloss_mean']:+.4f} | "
            f"{time.time() - t0:.1f}s")
        del model
    return results


# -----------------------------------------------------------------------------
# your data: the loss on your conversations or corpus, your reward on your prompts

@torch.no_grad()
def data_loss(model, tok, path, device, max_rows=256):
    """Mean cross-entropy (nats) per learned token of your data: the assistant turns of SFT conversations, or
    every token of a corpus in block_size windows; at most max_rows sequences, evenly spread."""
    T = model.config.block_size
    if is_corpus(path):
        tokens, _ = load_corpus(path, tok, os.path.dirname(os.path.abspath(path)))
        if len(tokens) < T + 2:
            raise UserError(f"{path}: {len(tokens)} tokens, fewer than block_size+2={T + 2}")
        X, Y = spread_windows(tokens, max_rows, T)
        batches = [(X[i:i + EVAL_BATCH], Y[i:i + EVAL_BATCH]) for i in range(0, len(X), EVAL_BATCH)]
    else:
        made = [sft_example(tok, turns, T) for turns in evenly_spaced(load_conversations(path), max_rows)]
        rows = [(x, y) for x, y, _ in (m for m in made if m is not None)]
        if not rows:
            raise UserError(f"{path}: no conversation fits block_size={T}")
        batches = [collate(rows[i:i + EVAL_BATCH], tok.eot_id) for i in range(0, len(rows), EVAL_BATCH)]
    with _eval_mode(model):
        return mean_loss(model, batches, device)


def evaluate_on_your_data(paths, data="", prompts="", reward_fn="", device="cpu", k=8, temperature=1.0,
                          max_new_tokens=32, seed=0, log=print):
    """{path: metrics} of each checkpoint on your data: data_loss on `data`, and the mean of `reward_fn` over k
    samples on each of `prompts` (nanopost.data.load_ppo_prompts's formats)."""
    if prompts and not reward_fn:
        raise UserError("--prompts needs --reward_fn=module:function or file.py:function (the built-in verifier "
                        "scores only the built-in task's prompts)")
    score = load_reward_fn(reward_fn, None) if prompts else None
    results = {}
    for path in paths:
        t0 = time.time()
        model, ckpt = load_model(path, device)
        tok = from_checkpoint(ckpt, path)
        m = {}
        if data:
            m["val_loss"] = data_loss(model, tok, data, device)
        if prompts:
            ps = load_ppo_prompts(prompts, tok, model.config.block_size - max_new_tokens)
            m.update(reward_eval(model, tok, ps, score, k=k, temperature=temperature, max_new_tokens=max_new_tokens,
                                 seed=seed, device=device))
        results[path] = m
        log(f"eval | {path} | " + " | ".join(f"{key} {v:.4f}" for key, v in m.items()) + f" | {time.time() - t0:.1f}s")
    return results


# -----------------------------------------------------------------------------
# the table

def table_columns(metrics_list):
    """(key, header, format) for every column present in any of the metric dicts, in a fixed reading order:
    task, diversity, distance, then forgetting per skill (Δ held-out loss, Δ probe accuracy; both vs the base)."""
    cols = [("accuracy", "acc", "{:.3f}"), ("pass_at_k", "pass@k", "{:.3f}"),
            ("distinct_valid", "distinct_valid", "{:.2f}"), ("distinct_1", "dist-1", "{:.3f}"),
            ("distinct_2", "dist-2", "{:.3f}"), ("entropy", "entropy", "{:.3f}"),
            ("kl_base_pi", "KL(base||pi)", "{:.3f}"), ("kl_pi_base", "KL(pi||base)", "{:.3f}"),
            ("dloss_mean", "dloss_mean", "{:+.4f}")]
    keys = {}  # insertion-ordered set: skills stay in world.skills order
    for m in metrics_list:
        keys.update(dict.fromkeys(m))
    if "accuracy" not in keys:  # your data (on the built-in task the verifier's columns say more: reward = acc)
        cols = [("val_loss", "val_loss", "{:.4f}"), ("reward", "reward", "{:.4f}"), ("ended", "ended", "{:.3f}"),
                ("resp_len", "resp_len", "{:.1f}")] + cols
    cols += [(k, k, "{:+.4f}") for k in keys if k.startswith("dloss/")]
    cols += [(k, k, "{:+.3f}") for k in keys if k.startswith("dprobe/")]
    return [c for c in cols if c[0] in keys]


def render_table(header, body, markdown=False):
    """Rows of strings -> a fixed-width text table, or markdown (a '|' inside a cell is escaped there)."""
    if markdown:
        row = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        return "\n".join([row(header), "|" + "|".join("---" for _ in header) + "|"] + [row(r) for r in body])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    row = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([row(header), row(["-" * w for w in widths])] + [row(r) for r in body])


def format_table(rows, markdown=False):
    """rows: list of (name, metrics dict of floats) -> one line per checkpoint, one column per metric."""
    cols = table_columns([m for _, m in rows])
    header = ["checkpoint"] + [h for _, h, _ in cols]
    body = [[name] + [fmt.format(m[key]) if key in m else "-" for key, _, fmt in cols] for name, m in rows]
    return render_table(header, body, markdown)


# -----------------------------------------------------------------------------
# command line

@dataclass
class Config:
    base: str = knob("", "base checkpoint: KL and forgetting are measured against it (required on built-in data)")
    data: str = knob("", "your data (SFT conversations or a corpus): the loss of every checkpoint on it")
    prompts: str = knob("", "your prompts: the mean of --reward_fn over k samples of each checkpoint")
    reward_fn: str = knob("", "module:function or file.py:function scoring (prompts, responses), for --prompts")
    k: int = knob(8, "samples per prompt for accuracy and diversity")
    n_prompts: int = knob(24, "held-out task prompts, evenly spread over world.eval_prompts")
    temperature: float = knob(1.0, "sampling temperature of the k samples (entropy and KL always use T=1)")
    max_new_tokens: int = knob(32, "response length limit; a response that hits it did not end (answers: <= 9 tokens)")
    seed: int = knob(0, "sampling seed: same seed, same numbers")
    max_docs: int = knob(64, "held-out documents per pretraining skill")
    max_probes: int = knob(64, "probes per skill for greedy-completion accuracy")
    world_seed: int = knob(-1, "seed of the built-in world; -1 = the one in the base checkpoint's config")
    device: str = knob("auto", "cpu, cuda, or auto")


def main(argv):
    paths = [a for a in argv if not a.startswith("--")]
    cfg, _ = parse_config(Config, argv=[a for a in argv if a.startswith("--")])
    validate(cfg)
    if cfg.data or cfg.prompts:  # your data: your metrics, for the base (if given) and every checkpoint
        results = evaluate_on_your_data([cfg.base] * bool(cfg.base) + paths, cfg.data, cfg.prompts, cfg.reward_fn,
                                        resolve_device(cfg.device), cfg.k, cfg.temperature, cfg.max_new_tokens,
                                        cfg.seed)
        print(format_table(list(results.items())))
        return results
    if not cfg.base:
        raise UserError("evaluate: --base=PATH is required (the checkpoint KL and forgetting are measured against)")
    device = resolve_device(cfg.device)
    kw = {k: getattr(cfg, k) for k in ("k", "n_prompts", "temperature", "max_new_tokens", "seed", "max_docs",
                                       "max_probes")}
    results = evaluate_checkpoints(cfg.base, paths, device=device, world_seed=cfg.world_seed, **kw)
    print(format_table([(p, m) for p, m in results.items()]))
    return results


if __name__ == "__main__":
    entry(main)


def evaluate_policy(step, policy, tok, prompts, world, reward_fn, log, rt, k, temperature, max_new_tokens):
    """Rank 0 samples k responses per held-out prompt (the others wait) and scores them: the verifier's metrics,
    or with reward_fn, your reward's (above); printed and logged. -> the metrics, None on the other
    ranks or without prompts."""
    res = None
    if rt.master and prompts:
        kw = dict(k=k, temperature=temperature, seed=0, device=rt.device, max_new_tokens=max_new_tokens)
        with torch.no_grad(), rt.autocast():
            if reward_fn is None:
                res = task_eval(policy, tok, world, prompts, **kw)
            else:
                res = reward_eval(policy, tok, prompts, reward_fn, **kw)
        print(f"eval {step} | " + " | ".join(f"{name} {v:.4f}" for name, v in res.items()), flush=True)
        log.write(dict(kind="eval", step=step, **res))
    barrier()
    return res
