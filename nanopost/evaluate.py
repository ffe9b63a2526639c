"""
Evaluation: what a post-trained checkpoint gained on the new task, what it lost from pretraining, and how far
it moved from the base model, assembled from nanopost.metrics (each metric and the choices behind it); also the
held-out evals that train_sft.py and train_ppo.py print while they train.

    python -m nanopost.evaluate --base=out/base/ckpt.pt out/s0/sft/ckpt.pt out/s0/ppo/ckpt.pt

prints one row per checkpoint (the base first). On your data, it prints what your data can measure:

    python -m nanopost.evaluate --data=chats.jsonl --prompts=prompts.jsonl --reward_fn=my.py:score out/a/ckpt.pt ...

the loss on your conversations or corpus (--data) and your reward on k samples per prompt (--prompts).
Everything is computed on held-out data with a fixed seed, so two runs of the command print the same numbers.
Cost with the defaults (k=8 samples on 24 prompts, 64 held-out docs per skill, 64 probes per skill), measured on
a shared 2-core CPU: ~20 s per checkpoint, two thirds of it sampling and the two forward passes for entropy and KL.
"""

import contextlib
import time
from dataclasses import dataclass

import torch

from nanopost.config import UserError, entry, knob, parse_config, validate
from nanopost.distributed import barrier, resolve_device
from nanopost.dpo import dpo_loss, logratios
from nanopost.loading import load_model
from nanopost.data import load_ppo_prompts
from nanopost.metrics import (ROLLOUT_BATCH, continuation, data_loss, eval_mode, evenly_spaced, heldout_losses,
                              kl_on_own_samples, mean_loss, probe_accuracy, task_eval)
from nanopost.prefs import collate_pairs, response_mask
from nanopost.reward import load_reward_fn, score_responses
from nanopost.rollout import rollout
from nanopost.tokenizer import from_checkpoint
from nanopost.world import load_world


# -----------------------------------------------------------------------------
# what the training scripts print at each eval: train_sft.py's (a language model, DPO), train_ppo.py's

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
def reward_eval(model, tok, prompts, reward_fn, k=1, temperature=1.0, max_new_tokens=32, seed=0, device="cpu"):
    """Your reward function on k sampled responses per prompt (any prompts, any reward: what PPO on your data
    optimises) -> dict(reward, ended, resp_len), means over all samples. Deterministic given `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    flat = [p for p in prompts for _ in range(k)]
    scores, ended, n_tok = [], [], 0
    with eval_mode(model):
        for i in range(0, len(flat), ROLLOUT_BATCH):
            ro = rollout(model, tok, flat[i:i + ROLLOUT_BATCH], max_new_tokens, temperature=temperature, generator=gen)
            scores += score_responses(reward_fn, ro.prompts, ro.responses, ro.ended.tolist())
            ended += ro.ended.tolist()
            n_tok += int(ro.response_mask.sum())
    return dict(reward=sum(scores) / len(flat), ended=sum(ended) / len(flat), resp_len=n_tok / len(flat))


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
