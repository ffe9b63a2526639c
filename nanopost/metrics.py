"""
Metrics of one model: what it gained on the new task, what it lost from pretraining, and how far it moved from
the base model. Measurements only, each deterministic given its seed; nanopost.evaluate assembles them into
what the training scripts print at each eval and what `python -m nanopost.evaluate` prints per checkpoint.

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

import os

import torch

import kernels
from nanopost.config import UserError
from nanopost.data import IGNORE, collate, is_corpus, load_conversations, load_corpus, sft_example, spread_windows
from nanopost.rollout import at_response, response_logprobs, rollout
from nanopost.world import encode_doc

# rows per forward pass: the (rows, T, V) fp32 logits dominate memory; 32 x 128 x 4k x 4 B = 64 MB
EVAL_BATCH = 32
# rows per rollout: sampling is one small forward per token, so on CPU per-step overhead dominates and bigger
# batches are cheaper per row (measured, 256 samples of 32 tokens, 2 cores: 27 s in batches of 32, 11 s of 128,
# 8 s of 256); the KV cache is only (L, 2, B, T, C) = 4 x 2 x 256 x 64 x 128 x 4 B = 67 MB
ROLLOUT_BATCH = 256


class eval_mode:
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
    with eval_mode(model):
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
    with eval_mode(model):
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
    with eval_mode(model, other):
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
    with eval_mode(model, base_model):
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


# -----------------------------------------------------------------------------
# your data: the loss on your conversations or corpus; a sample continuing your held-out text

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
    with eval_mode(model):
        return mean_loss(model, batches, device)


def continuation(model, tok, stream, max_new_tokens, temperature, seed, device):
    """A sample continuing the first 16 tokens of a held-out token stream: what the model has learned
    to write (train_sft.py's eval on your corpus)."""
    start = [int(t) for t in stream[:16]]
    gen = torch.Generator(device=device).manual_seed(seed)
    out, _, _ = model.generate([start], max_new_tokens, temperature=temperature, generator=gen)
    return tok.decode_text(start) + " >>> " + tok.decode_text(out[0, len(start):].tolist())
