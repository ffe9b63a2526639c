"""
The thesis study: does PPO forget less than SFT at matched accuracy, and is it the KL anchor or the on-policy data?

    python -m nanopost.studies.thesis --seeds=0,1,2,3,4  # the full study (THESIS.md), measured 2026-12-07: the
                                                        # base 5 min of CPU, 34-36 min of training CPU per seed
                                                        # (ppo_weak 4.5; dpo, ppo_rm and their reward model 8;
                                                        # the same from the start 8.3), evaluation ~16 min a seed
                                                        # on loaded cores; 3 h wall in four runs as 2-3
                                                        # processes on 2 shared cores
    OMP_NUM_THREADS=1 python -m nanopost.studies.thesis ...  # on a shared machine (2 threads on busy cores spun
                                                            # 40x slower)
    python -m nanopost.studies.thesis --seeds=0 --ppo_iters=80 --dpo_iters=80 --snapshot_every=10 \
        --rft_rounds=10 --rft_k=4 --rft_epochs=4 --k=4 --n_prompts=16 --max_docs=32 --match_acc=0.1,0.3,0.5 \
        --readme_plot=false  # a pilot

"Retaining by Doing" (Chen, Razin, Narasimhan & Chen 2025) finds RL's retention comes from on-policy data, not
from the KL regularizer or the advantage estimator; RL's Razor (Shenfeld, Pari & Agrawal 2025) finds forgetting
tracks the forward KL(pi_base || pi) on the new task (R^2 0.96 toy, 0.71 LLMs). From the one shared base model
(out/base, as nanopost.studies.experiment trains it), per seed:

    sft      train_sft.py on the narrow demonstrator (N+0=N): off-policy data, no anchor
    sft_oracle  the same SFT on samples of pi* ∝ pi_base * exp(r / beta), the optimum of ppo's objective
             (write_oracle_data): RL's Razor's "oracle SFT", off-policy data from the KL-minimal solution
    ppo      train_ppo.py: GAE with a value model, the KL(pi || base) anchor at kl_coef=0.05 (its default k1;
             every KL mode optimises the same objective, tests/test_kl_objective.py)
    ppo_kl0  the same with kl_coef=0: the anchor removed, everything else equal
    ppo_weak the same with kl_coef=0.01 (weak_kl_coef): an anchor PPO climbs against from this base. At 0.05
             PPO's advantages, like RLOO's, weigh the rare 0/1 score against the KL as the objective does, and
             both stalled at the base; GRPO divides the score's advantage by its group's std (0.35 when 1 of 8
             scores), so at the same kl_coef its anchor weighs ~3x less against the score (THESIS.md)
    grpo     train_ppo.py --advantage=grpo: no critic, group baseline, the same anchor
    rft      rejection-sampling fine-tuning: rounds of "sample k answers per training prompt from the latest
             model, keep the verified ones (world.score == 1), train_sft.py on them for rft_epochs passes": on-policy
             data, no policy gradient, no anchor. Every verified sample is kept, duplicates too: SFT then fits
             pi(y | x, correct), the policy's own distribution restricted to right answers, the KL-closest correct
             policy that RL's Razor's "oracle SFT" approximates. A round's steps follow its data (epochs, not a
             fixed count): the base gets ~1% right, and 30 steps of 32 on its 13 verified samples (a pilot) were
             ~70 passes over them, memorising rather than staying on-policy. Each round is a train_sft.py run that
             continues the previous round's AdamW state (--init_optimizer), so the rounds are one optimizer on
             changing data, as PPO's iterations are, not a fresh Adam per round (whose first sign-like steps forgot
             +0.12 nats at 1e-3 in a pilot round that learned nothing); rft steps at PPO's constant 1e-4.
    ppo_rm   train_ppo.py --reward_model: ppo's run against a reward model (train_sft.py --data=prefs) learned
             from the built-in labeler's preference pairs on the base's samples; the verifier stays the gold
    dpo      train_sft.py --objective=dpo on the same pairs (same base, same seed: the same pairs, checked by
             their hash), no reward model and no sampling: the same objective as ppo_rm (Rafailov et al. 2023)
             from fixed, offline data. ppo_rm standardises the reward model's score r by its std s on the base's
             samples, so it climbs E[r] - kl_coef * s * KL(pi || base); dpo's beta is kl_coef * s, which makes
             the two optima the same pi* ∝ base * exp(r / beta) wherever r is the pairs' Bradley-Terry reward
    dpo_start, ppo_rm_start  dpo and ppo_rm from a start that already answers (start_iters SFT steps from the
             base, as in nanopost.studies.overopt), with their own reward model and pairs drawn from the start's
             samples; their trajectories run base -> start -> ..., matched only past the start (a level the
             start passed reads the same for both). From the base's samples (0.5% right) neither preference arm
             learned the task, so they never reached the accuracies where the others are compared

Every run keeps snapshots along training (--snapshot_steps of the scripts), and every snapshot is evaluated with
nanopost.evaluate: one trajectory (accuracy, forgetting = mean Δ held-out loss, KL(base || pi) on the base's
samples and KL(pi || base) on pi's, per response) per run. Methods
are compared at matched accuracy by linear interpolation along each trajectory (first crossing), per seed, then
as a mean with a 95% bootstrap interval over seeds; and at matched KL(base || pi), RL's Razor's axis, for the
runs that move the model without reaching the accuracies (a learned reward can climb while the verifier does not).
Writes out/thesis/report.md, results.json and curves.png.

Diversity against the optimum: the KL-regularised objective max E[r] - beta KL(pi || ref) is maximised by
pi* ∝ ref * exp(r / beta) (e.g. Rafailov et al. 2023, eq. 4). The task makes it computable: the valid answers to
target N are a+b=N for a = 0..N, each scored under the reference; pi* keeps the reference's relative odds among
them. We report, per prompt, the mass on valid answers other than the demonstrator's N+0=N under pi and pi*.
"""

import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from nanopost.config import entry, knob, parse_config, parse_list, validate
from nanopost.distributed import resolve_device
from nanopost.loading import load_checkpoint, load_model
from nanopost.evaluate import evaluate_checkpoints, reward_eval
from nanopost.metrics import eval_mode, evenly_spaced
from nanopost.reward import load_reward_model
from nanopost.studies.experiment import ROOT, SFT_SNAPSHOTS, EvalKnobs, pearson, run_stage, snapshots, value_at
from nanopost.rollout import response_logprobs, rollout
from nanopost.tokenizer import from_checkpoint
from nanopost.world import demonstrate, load_world

METHODS = ["sft", "sft_oracle", "dpo", "dpo_start", "ppo", "ppo_weak", "ppo_rm", "ppo_rm_start", "ppo_kl0", "grpo",
           "rft"]
COLORS = dict(sft="tab:red", sft_oracle="tab:purple", dpo="tab:brown", ppo="tab:blue", ppo_weak="tab:gray",
              ppo_rm="tab:olive", ppo_kl0="tab:cyan", grpo="tab:green", rft="tab:orange", dpo_start="tab:pink",
              ppo_rm_start="yellowgreen")
PAPER_R2 = dict(toy=0.96, llm=0.71)  # RL's Razor: forgetting against KL(base || pi), R^2


# -----------------------------------------------------------------------------
# statistics: small, pure, tested on hand values

def bootstrap_ci(xs, level=0.95, n_boot=10000, seed=0):
    """Mean of xs and its percentile bootstrap interval (Efron & Tibshirani 1993): resample xs with replacement
    n_boot times, take the (1-level)/2 and (1+level)/2 percentiles of the resampled means. Seeded: the same
    sample gives the same interval. -> (mean, lo, hi); one value gives a zero-width interval."""
    x = np.asarray(xs, dtype=np.float64)
    assert x.ndim == 1 and len(x) > 0, "bootstrap_ci needs a non-empty list of numbers"
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(x.mean()), float(lo), float(hi)


# -----------------------------------------------------------------------------
# diversity, measured against the KL-regularised optimum

def valid_answers(n):
    """Every answer the verifier accepts to target n, written canonically: a+b=n for a = 0..n."""
    return [f"{a}+{n - a}={n}" for a in range(n + 1)]


@torch.no_grad()
def answer_logprobs(model, tok, prompt, answers, device="cpu"):
    """log pi(answer, then <|endoftext|> | prompt) of each answer's own tokenization -> (len(answers),) float64.
    A sample could spell the same string with other tokens, so this is a lower bound on the string's mass."""
    p = tok.encode_prompt(prompt)
    resp = [tok.encode(a) + [tok.eot_id] for a in answers]
    N = max(len(r) for r in resp)
    tokens = torch.tensor([p + r + [tok.eot_id] * (N - len(r)) for r in resp], device=device)  # (A, P+N)
    mask = torch.tensor([[True] * (len(p) + len(r)) + [False] * (N - len(r)) for r in resp], device=device)
    with eval_mode(model):
        logp, _ = response_logprobs(model, tokens, mask, len(p))  # (A, N)
    return torch.where(mask[:, len(p):], logp, 0.0).sum(1).double().cpu()


def optimum_masses(ref_logp, pi_logp, demo, beta):
    """Mass on valid answers, and on valid answers other than index `demo`, under pi and under the optimum
    pi* ∝ ref * exp(r / beta) with r = 1 on every valid answer and 0 elsewhere: pi*(y) = ref(y) e^(r/beta) / Z,
    Z = e^(1/beta) ref(valid) + (1 - ref(valid)). ref_logp, pi_logp: log-probs of the valid answers (A,)."""
    ref, pi = ref_logp.double().exp(), pi_logp.double().exp()
    ref_valid = float(ref.sum())
    boost = math.exp(min(1.0 / beta, 700.0))  # e^(1/beta); beyond e^700 it overflows and pi* is all valid anyway
    Z = boost * ref_valid + (1.0 - ref_valid)
    return dict(pi_valid=float(pi.sum()), pi_other=float(pi.sum() - pi[demo]),
                opt_valid=boost * ref_valid / Z, opt_other=boost * (ref_valid - float(ref[demo])) / Z)


def diversity_vs_optimum(model, ref_model, tok, world, prompts, beta, device="cpu"):
    """optimum_masses averaged over prompts, plus the share of the valid mass off the demonstrator's answer
    (other / valid) under pi and pi*: how far a policy is from the diversity its objective asks for."""
    rows = []
    for prompt in prompts:
        answers = valid_answers(world.parse_target(prompt))
        demo = answers.index(demonstrate(prompt))
        rows.append(optimum_masses(answer_logprobs(ref_model, tok, prompt, answers, device),
                                   answer_logprobs(model, tok, prompt, answers, device), demo, beta))
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    out["pi_other_share"] = sum(r["pi_other"] / max(r["pi_valid"], 1e-300) for r in rows) / len(rows)
    out["opt_other_share"] = sum(r["opt_other"] / max(r["opt_valid"], 1e-300) for r in rows) / len(rows)
    return out


# -----------------------------------------------------------------------------
# training data made from a model: rft's verified samples, the oracle's samples of pi*

def write_pairs(out_path, pairs, seed):
    """[(prompt, completion)] -> a JSONL for train_sft.py --data, written atomically, shuffled so that its
    held-out last tenth spans every target rather than the last few."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        for i in order:
            f.write(json.dumps(dict(prompt=pairs[i][0], completion=pairs[i][1])) + "\n")
    os.replace(tmp, out_path)


@torch.no_grad()
def write_oracle_data(ckpt_path, out_path, k, seed, beta, device="cpu"):
    """RL's Razor's oracle SFT: k samples per training prompt from pi* ∝ pi_base * exp(r / beta), the optimum of
    the objective ppo and grpo climb, computed exactly: a target's valid answers are enumerable (valid_answers),
    answer_logprobs scores them under the base, and pi* keeps the base's odds among them. The invalid answers'
    share of pi*, (1 - base(valid)) / Z, is left out. -> (pairs written, the largest share left out)."""
    model, ckpt = load_model(ckpt_path, device)
    tok = from_checkpoint(ckpt, ckpt_path)
    world = load_world(seed=(ckpt.get("config") or {}).get("world_seed", 0))
    rng = np.random.default_rng(seed)
    pairs, left_out = [], 0.0
    for prompt in world.ppo_prompts:
        answers = valid_answers(world.parse_target(prompt))
        logp = answer_logprobs(model, tok, prompt, answers, device)  # (A,) float64
        left_out = max(left_out, 1.0 - optimum_masses(logp, logp, 0, beta)["opt_valid"])
        probs = torch.softmax(logp, 0).numpy()
        pairs += [(prompt, answers[i]) for i in rng.choice(len(answers), size=k, p=probs)]
    write_pairs(out_path, pairs, seed)
    return len(pairs), left_out


# rft: on-policy data from the model's own verified samples

def verified(world, prompts, responses, ended):
    """The (prompt, response) pairs the verifier rewards (valid and ended): rejection sampling's accept step."""
    return [(p, r) for p, r, e in zip(prompts, responses, ended) if world.score(p, r, bool(e)) == 1.0]


@torch.no_grad()
def write_rft_data(ckpt_path, out_path, k, seed, max_new_tokens=16, temperature=1.0, device="cpu", batch=256):
    """Sample k responses per training prompt (world.ppo_prompts) from the checkpoint, keep the verified ones, and
    write them as a prompt/completion JSONL for train_sft.py --data. -> (kept, sampled)."""
    model, ckpt = load_model(ckpt_path, device)
    tok = from_checkpoint(ckpt, ckpt_path)
    world = load_world(seed=(ckpt.get("config") or {}).get("world_seed", 0))
    flat = [p for p in world.ppo_prompts for _ in range(k)]
    gen = torch.Generator(device=device).manual_seed(seed)
    kept = []
    with eval_mode(model):
        for i in range(0, len(flat), batch):
            ro = rollout(model, tok, flat[i:i + batch], max_new_tokens, temperature=temperature, generator=gen)
            kept += verified(world, ro.prompts, ro.responses, ro.ended.tolist())
    write_pairs(out_path, kept, seed)
    return len(kept), len(flat)


# -----------------------------------------------------------------------------
# the study

@dataclass
class Config(EvalKnobs):  # k, n_prompts, max_new_tokens, eval_seed, max_docs: the quick start's evaluation
    out_dir: str = knob("out", "base/ is read (or trained) here; runs go to thesis/s<seed>/<method>/")
    seeds: str = knob("0,1,2,3,4", "comma-separated training seeds (the base model is shared by all)")
    sft_iters: int = knob(150, "train_sft.py --max_iters of sft (150: the 98% model that collapses)", ge=1)
    sft_snapshots: str = knob(SFT_SNAPSHOTS, "sft steps kept as trajectory points (dense early: SFT passes PPO's "
                                             "accuracy within ~10 steps)")
    ppo_iters: int = knob(200, "train_ppo.py --max_iters of ppo, ppo_weak, ppo_rm(_start), ppo_kl0, grpo", ge=1)
    dpo_iters: int = knob(200, "train_sft.py --max_iters of dpo(_start) (its stage defaults: 32 pairs a step, lr 1e-4)",
                          ge=1)
    snapshot_every: int = knob(20, "keep a snapshot of the PPO runs and dpo every this many steps", ge=1)
    kl_coef: float = knob(0.05, "the anchor of ppo, ppo_rm and grpo (train_ppo.py's default); beta of pi*; "
                                "dpo's beta, in the reward model's units", gt=0)
    weak_kl_coef: float = knob(0.01, "the anchor of ppo_weak", gt=0)
    start_iters: int = knob(8, "SFT steps from the base to the start of dpo_start and ppo_rm_start", ge=1)
    group_size: int = knob(8, "grpo: responses per prompt (64 responses per iteration = 8 prompts x 8)", ge=2)
    oracle_k: int = knob(16, "sft_oracle: samples of pi* per training prompt (16 x 210 prompts: 3360 examples)",
                         ge=1)
    rft_rounds: int = knob(8, "rft: rounds of sample -> filter -> SFT, each from the latest model; each round's "
                              "model is a trajectory point", ge=1)
    rft_k: int = knob(8, "rft: samples per training prompt per round", ge=1)
    rft_epochs: float = knob(2.0, "rft: passes over a round's verified samples (its steps = epochs * kept / batch)",
                             gt=0)
    rft_batch: int = knob(16, "rft: train_sft.py --batch_size", ge=1)
    rft_lr: float = knob(1e-4, "rft: constant learning rate, no warmup (train_ppo.py's policy lr)", gt=0)
    match_acc: str = knob("0.5,0.8", "accuracies at which methods are compared along their trajectories")
    match_kl: str = knob("5,10,20", "KL(base || pi) levels, nats per response, at which forgetting is compared too")
    n_boot: int = knob(10000, "bootstrap resamples per interval", ge=100)
    device: str = knob("auto", "cpu, cuda, or auto (passed to the training scripts too)")
    force: bool = knob(False, "rerun stages whose checkpoint already exists")
    readme_plot: bool = knob(True, "also copy the curves to .assets/thesis.png, the README's figure (off for a pilot)")


def every(cfg, n):
    """The --snapshot_steps of a run of n steps: every cfg.snapshot_every steps."""
    return "--snapshot_steps=" + ",".join(str(s) for s in range(cfg.snapshot_every, n, cfg.snapshot_every))


def preference_arms(cfg, d, init, seed, suffix):
    """ppo_rm and dpo from init: a reward model (train_sft.py --data=prefs draws the pairs from init's samples and
    the seed), PPO against it, DPO on the same pairs -> {method + suffix: [(step, ckpt path)]}."""
    common = [f"--seed={seed}", f"--device={cfg.device}"]
    prefs = ["--data=prefs", f"--init_from={init}"] + common
    rm = run_stage(cfg, f"rm{suffix} seed={seed}", "train_sft.py", prefs, os.path.join(d, "rm" + suffix),
                   inputs=[init])
    out = os.path.join(d, "ppo_rm" + suffix)
    run_stage(cfg, f"ppo_rm{suffix} seed={seed}", "train_ppo.py",
              [f"--init_from={init}", f"--max_iters={cfg.ppo_iters}", "--max_minutes=0", every(cfg, cfg.ppo_iters),
               f"--kl_coef={cfg.kl_coef}", f"--reward_model={rm}"] + common, out, inputs=[init, rm])
    runs = {"ppo_rm" + suffix: snapshots(out, cfg.ppo_iters)}
    rm_ckpt = load_checkpoint(rm)
    beta = cfg.kl_coef * rm_ckpt["reward_norm"]["std"]  # ppo_rm's objective, in the reward model's units
    out = os.path.join(d, "dpo" + suffix)
    dpo = run_stage(cfg, f"dpo{suffix} seed={seed}", "train_sft.py", prefs + [
        "--objective=dpo", f"--dpo_beta={beta:.6g}", f"--max_iters={cfg.dpo_iters}", every(cfg, cfg.dpo_iters)],
        out, inputs=[init, rm])
    if load_checkpoint(dpo)["data_hash"] != rm_ckpt["data_hash"]:
        raise RuntimeError(f"seed {seed}: {dpo} and {rm} were trained on different preference pairs")
    runs["dpo" + suffix] = snapshots(out, cfg.dpo_iters)
    return runs


def run_seed(cfg, base, seed):
    """Train the eleven methods of one seed (skipping finished stages) -> {method: [(step, ckpt path)]}."""
    d = os.path.join(cfg.out_dir, "thesis", f"s{seed}")
    common = [f"--seed={seed}", f"--device={cfg.device}"]
    runs = {}
    out = os.path.join(d, "sft")
    run_stage(cfg, f"sft seed={seed}", "train_sft.py", ["--data=sft", f"--init_from={base}",
              f"--max_iters={cfg.sft_iters}", f"--snapshot_steps={cfg.sft_snapshots}"] + common, out, inputs=[base])
    runs["sft"] = snapshots(out, cfg.sft_iters)
    data = os.path.join(d, "sft_oracle_samples.jsonl")
    if cfg.force or not os.path.isfile(data) or os.path.getmtime(data) < os.path.getmtime(base):
        n, left_out = write_oracle_data(base, data, cfg.oracle_k, seed, cfg.kl_coef, resolve_device(cfg.device))
        print(f"stage sft_oracle seed={seed} | {n} samples of pi* | invalid share left out <= {left_out:.1e}",
              flush=True)
    out = os.path.join(d, "sft_oracle")  # the same SFT as sft, on pi*'s samples instead of the demonstrator's
    run_stage(cfg, f"sft_oracle seed={seed}", "train_sft.py", [f"--data={data}", f"--init_from={base}",
              f"--max_iters={cfg.sft_iters}", f"--snapshot_steps={cfg.sft_snapshots}"] + common, out,
              inputs=[base, data])
    runs["sft_oracle"] = snapshots(out, cfg.sft_iters)
    ppo = [f"--init_from={base}", f"--max_iters={cfg.ppo_iters}", "--max_minutes=0", every(cfg, cfg.ppo_iters)]
    for method, extra in (("ppo", [f"--kl_coef={cfg.kl_coef}"]), ("ppo_kl0", ["--kl_coef=0"]),
                          ("ppo_weak", [f"--kl_coef={cfg.weak_kl_coef}"]),
                          ("grpo", [f"--kl_coef={cfg.kl_coef}", "--advantage=grpo", f"--group_size={cfg.group_size}"])):
        out = os.path.join(d, method)
        run_stage(cfg, f"{method} seed={seed}", "train_ppo.py", ppo + extra + common, out, inputs=[base])
        runs[method] = snapshots(out, cfg.ppo_iters)
    runs.update(preference_arms(cfg, d, base, seed, ""))
    start = run_stage(cfg, f"start seed={seed}", "train_sft.py", ["--data=sft", f"--init_from={base}",
                      f"--max_iters={cfg.start_iters}"] + common, os.path.join(d, "start"), inputs=[base])
    runs.update({m: [(cfg.start_iters, start)] + [(cfg.start_iters + s, p) for s, p in pts]
                 for m, pts in preference_arms(cfg, d, start, seed, "_start").items()})
    runs["rft"], latest, step = [], base, 0
    for r in range(cfg.rft_rounds):
        out = os.path.join(d, "rft", f"round{r}")
        data = os.path.join(out + "_samples.jsonl")
        if cfg.force or not os.path.isfile(data) or os.path.getmtime(data) < os.path.getmtime(latest):
            t0 = time.time()
            kept, n = write_rft_data(latest, data, cfg.rft_k, seed=seed * 1000 + r, device=resolve_device(cfg.device))
            print(f"stage rft seed={seed} round {r} | sampled {n} | kept {kept} verified | {time.time() - t0:.0f}s",
                  flush=True)
        with open(data) as f:
            kept = sum(1 for line in f if line.strip())
        if not kept:
            print(f"stage rft seed={seed} round {r} | no verified sample: rft stops here", flush=True)
            break
        iters = max(1, math.ceil(cfg.rft_epochs * kept / cfg.rft_batch))
        # rounds after the first continue the previous round's AdamW state: one optimizer over all rounds
        latest = run_stage(cfg, f"rft seed={seed} round {r}", "train_sft.py",
                           [f"--data={data}", f"--init_from={latest}", f"--max_iters={iters}",
                            f"--batch_size={cfg.rft_batch}", f"--learning_rate={cfg.rft_lr}", "--lr_decay=false",
                            "--warmup_iters=0", f"--init_optimizer={str(r > 0).lower()}"] + common,
                           out, inputs=[latest, data])
        step += iters
        runs["rft"].append((step, latest))
    return runs


def trajectory(points, key="dloss_mean"):
    """[(accuracy, metric)] along a run, starting at the base."""
    return [(m["accuracy"], m[key]) for _, m in points]


def summarize(cfg, runs, results):
    """Per-run numbers and per-method means with bootstrap intervals; comparisons at matched accuracy."""
    levels = parse_list(cfg.match_acc, "match_acc", float, low=0)
    kl_levels = parse_list(cfg.match_kl, "match_kl", float, low=0)
    base_m = results["base"]
    per_run = {}  # (method, seed) -> dict
    for (method, seed), pts in runs.items():
        traj = [(0, base_m)] + [(s, results[p]) for s, p in pts]
        final = traj[-1][1]
        row = dict(acc=final["accuracy"], forgetting=final["dloss_mean"], kl=final["kl_base_pi"],
                   kl_pi=final["kl_pi_base"], distinct_valid=final["distinct_valid"], steps=[s for s, _ in traj],
                   curve=trajectory(traj), kl_curve=trajectory(traj, "kl_base_pi"),
                   kl_pi_curve=trajectory(traj, "kl_pi_base"))
        row.update({k: final[k] for k in final if k.startswith(("pi_", "opt_", "rm_score"))})
        row["razor_curve"] = [(kl, f) for (_, kl), (_, f) in zip(row["kl_curve"], row["curve"])]
        # an arm from the start is matched where its own training takes it: a level that the start's SFT steps
        # already passed would read the same for both start arms, by construction
        own = 1 if method.endswith("_start") else 0
        for a in levels:
            row[f"forgetting@{a}"] = value_at(row["curve"][own:], a)
            row[f"kl@{a}"] = value_at(row["kl_curve"][own:], a)
        for k in kl_levels:  # forgetting where KL(base || pi) first reaches k
            row[f"forgetting@kl{k:g}"] = value_at(row["razor_curve"][own:], k)
        per_run[(method, seed)] = row
    return per_run, levels, kl_levels


def method_table(per_run, levels, kl_levels, seeds, n_boot):
    """Markdown rows: per method, mean [95% CI] over seeds of each final metric and of forgetting at each level."""
    keys = ["acc", "forgetting", "kl", "kl_pi", "distinct_valid", "pi_other_share"] + \
        [f"forgetting@{a}" for a in levels] + [f"kl@{a}" for a in levels] + [f"forgetting@kl{k:g}" for k in kl_levels]
    head = ["method", "runs"] + keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        rows = [per_run[(method, s)] for s in seeds if (method, s) in per_run]
        if not rows:
            continue
        cells = [method, str(len(rows))]
        for k in keys:
            xs = [r[k] for r in rows if r.get(k) is not None]
            if not xs:
                cells.append("-")
                continue
            m, lo, hi = bootstrap_ci(xs, n_boot=n_boot)
            n = "" if len(xs) == len(rows) else f" (n={len(xs)})"
            cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]{n}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# (first, second, question): per-seed differences in forgetting, first minus second
PAIRS = [("sft", "ppo", "does PPO forget less than SFT?"), ("sft", "grpo", "does GRPO forget less than SFT?"),
         ("sft_oracle", "sft", "does SFT on the KL-minimal solution forget less than SFT?"),
         ("sft_oracle", "ppo", "does oracle SFT forget like RL (RL's Razor)?"),
         ("sft", "ppo_kl0", "does PPO without the anchor forget less than SFT?"),
         ("ppo_kl0", "ppo", "does removing the anchor matter?"),
         ("ppo_kl0", "ppo_weak", "does the anchor matter, where anchored PPO moves?"),
         ("sft", "ppo_weak", "does anchored PPO forget less than SFT?"),
         ("grpo", "ppo_weak", "critic-free vs a PPO that moves"),
         ("rft", "sft", "does on-policy SFT forget less than SFT?"), ("rft", "ppo", "does rft retain like PPO?"),
         ("rft", "ppo_kl0", "on-policy, no anchor: SFT on verified samples vs the policy gradient"),
         ("grpo", "ppo", "critic-free vs PPO"),
         ("grpo", "ppo_kl0", "anchored and critic-free vs unanchored with a critic (when ppo stalls)"),
         ("grpo", "rft", "the policy gradient with an anchor vs SFT on verified samples"),
         ("dpo", "ppo_rm", "the same pairs and objective: offline vs on-policy"),
         ("sft", "dpo", "does DPO forget less than SFT?"), ("dpo", "grpo", "offline pairs vs the on-policy verifier"),
         ("ppo_rm", "grpo", "a learned reward vs the verifier, both on-policy"),
         ("dpo_start", "ppo_rm_start", "from a start that answers, the same pairs and objective: offline vs on-policy"),
         ("sft", "dpo_start", "does DPO after a short SFT forget less than SFT?"),
         ("sft", "ppo_rm_start", "does PPO on a learned reward after a short SFT forget less than SFT?")]
KL_PAIRS = [p for p in PAIRS if p[:2] in {("dpo", "ppo_rm"), ("dpo_start", "ppo_rm_start"), ("sft", "dpo"),
                                          ("dpo", "grpo"), ("ppo_rm", "grpo"), ("sft", "grpo"), ("sft", "ppo_weak"),
                                          ("ppo_kl0", "ppo_weak")}]


def paired_differences(per_run, pairs, keys, seeds, n_boot):
    """Each question of pairs as per-seed differences in forgetting at the matched levels of keys (positive = the
    first method forgets more), mean and 95% bootstrap interval over the seeds where both runs reach the level.
    keys: [(per_run key, how the level reads)]."""
    lines = []
    for a, b, question in pairs:
        for key, at in keys:
            d = [per_run[(a, s)][key] - per_run[(b, s)][key] for s in seeds if (a, s) in per_run and (b, s) in
                 per_run and per_run[(a, s)][key] is not None and per_run[(b, s)][key] is not None]
            if not d:
                lines.append(f"- {a} − {b} at {at} ({question}): no seed where both reach it")
                continue
            m, lo, hi = bootstrap_ci(d, n_boot=n_boot)
            lines.append(f"- {a} − {b} at {at} ({question}): {m:+.3f} [{lo:+.3f}, {hi:+.3f}] nats/token, "
                         f"{len(d)} seed(s)")
    return lines


def objective_lines(per_run, base_scores, seeds, kl_coef, n_boot):
    """The objective dpo and ppo_rm share, J = E[r] - kl_coef * KL(pi || base) with r the seed's reward model's
    normalised score (nats and scores per response), where each final model got: r on its samples, kl_pi, J, per
    method and as dpo - ppo_rm per seed. The base's J is its score (its KL is 0)."""
    ci = lambda xs: "{:+.3f} [{:+.3f}, {:+.3f}]".format(*bootstrap_ci(xs, n_boot=n_boot))
    J = {("base", s): (r, 0.0) for s, r in base_scores.items()}
    J.update({k: (row["rm_score"], row["kl_pi"]) for k, row in per_run.items() if row.get("rm_score") is not None})
    lines = []
    for method in ("base", "dpo", "ppo_rm"):
        xs = [J[(method, s)] for s in seeds if (method, s) in J]
        if xs:
            lines.append(f"- {method}: reward model score {ci([r for r, _ in xs])}, KL(π‖base) "
                         f"{ci([k for _, k in xs])}, J {ci([r - kl_coef * k for r, k in xs])}, {len(xs)} seed(s)")
    value = lambda key: J[key][0] - kl_coef * J[key][1]
    d = [value(("dpo", s)) - value(("ppo_rm", s)) for s in seeds if ("dpo", s) in J and ("ppo_rm", s) in J]
    if d:
        lines.append(f"- dpo − ppo_rm in J, per seed: {ci(d)}, {len(d)} seed(s)")
    return lines


def plot_curves(per_run, path):
    """RL's Razor's figures: forgetting against accuracy (left) and against KL(base || pi) (right) along training,
    faint per-seed lines, one colour per method, and the mean over seeds on a grid where every seed's run reaches."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    top_kl = max(kl for r in per_run.values() for kl, _ in r["razor_curve"])
    panels = ((axes[0], "curve", np.linspace(0.0, 1.0, 101), "new-task accuracy (held-out prompts)"),
              (axes[1], "razor_curve", np.linspace(0.0, top_kl, 101),
               "KL(base‖π) on the task's held-out prompts (nats per response)"))
    for ax, key, grid, xlabel in panels:
        for method in METHODS:
            curves = [r[key] for (m, _), r in per_run.items() if m == method]
            for c in curves:
                ax.plot(*zip(*c), color=COLORS[method], alpha=0.3, lw=0.8, marker=".", ms=3)
            mean = [(g, np.mean(ys)) for g in grid if curves and None not in (ys := [value_at(c, g) for c in curves])]
            if mean:
                ax.plot(*zip(*mean), color=COLORS[method], lw=2.2, label=f"{method} (mean of {len(curves)})")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forgetting: mean Δ held-out loss vs base (nats/token)")
    axes[0].set_title("forgetting against accuracy, along training")
    axes[1].set_title("forgetting against the KL to the base (RL's Razor's axis)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kl_lines(per_run):
    """RL's Razor's claim: does forgetting follow the KL to the base? R² for both directions (the paper's is
    KL(base || pi)), over final runs and over every trajectory point."""
    lines = []
    finals = list(per_run.values())
    for key, curve, name in (("kl", "kl_curve", "KL(base‖π), RL's Razor's"), ("kl_pi", "kl_pi_curve", "KL(π‖base)")):
        points = [(kl, f) for r in finals for (_, kl), (_, f) in zip(r[curve][1:], r["curve"][1:])]
        for what, xs, ys in (("final checkpoints", [r[key] for r in finals], [r["forgetting"] for r in finals]),
                             ("every trajectory point", [p[0] for p in points], [p[1] for p in points])):
            r = pearson(xs, ys)
            lines.append(f"- forgetting vs {name} over {len(xs)} {what}: " + (
                "undefined" if r is None else f"Pearson r {r:+.3f}, R² {r * r:.3f}"))
    lines.append(f"- RL's Razor, forgetting vs KL(base‖π): R² {PAPER_R2['toy']} toy, {PAPER_R2['llm']} LLMs")
    return lines


def main(argv):
    cfg, _ = parse_config(Config, argv=argv)
    validate(cfg)  # every knob checked before minutes of training, not when its stage starts
    seeds = parse_list(cfg.seeds, "seeds")
    for name in ("match_acc", "match_kl"):  # checked before hours of training, used in summarize
        parse_list(getattr(cfg, name), name, float, low=0)
    t0 = time.time()
    base = os.path.join(cfg.out_dir, "base", "ckpt.pt")
    if not os.path.isfile(base):  # the experiment's own base stage: the same command, so both share it
        run_stage(cfg, "base", "train_sft.py", ["--data=pretrain", "--eval_prompts=0", f"--device={cfg.device}"],
                  os.path.dirname(base))
    times = {}
    runs = {}
    for seed in seeds:
        t = time.time()
        for method, pts in run_seed(cfg, base, seed).items():
            runs[(method, seed)] = pts
        times[f"train s{seed}"] = time.time() - t

    # evaluate every trajectory point once; results are cached by path and modification time
    device = resolve_device(cfg.device)
    thesis_dir = os.path.join(cfg.out_dir, "thesis")
    cache_path = os.path.join(thesis_dir, "evals.json")
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) and not cfg.force else {}
    eval_kw = cfg.eval_kwargs()
    stamp = lambda p: f"{p}@{os.path.getmtime(p)}@{json.dumps(eval_kw, sort_keys=True)}"
    paths = [base] + [p for pts in runs.values() for _, p in pts]
    todo = [p for p in paths[1:] if stamp(p) not in cache]
    t = time.time()
    if todo or stamp(base) not in cache:
        fresh = evaluate_checkpoints(base, todo, device=device, **eval_kw)
        cache.update({stamp(p): m for p, m in fresh.items()})
    results = {p: cache[stamp(p)] for p in paths}
    # diversity against pi* for every final checkpoint (and the base): exact masses, not samples
    base_model, base_ckpt = load_model(base, device)
    tok = from_checkpoint(base_ckpt, base)
    world = load_world(seed=(base_ckpt.get("config") or {}).get("world_seed", 0))
    prompts = evenly_spaced(world.eval_prompts, cfg.n_prompts)
    for p in [base] + [pts[-1][1] for pts in runs.values()]:
        if "pi_other" not in results[p]:
            model, _ = load_model(p, device)
            results[p].update(diversity_vs_optimum(model, base_model, tok, world, prompts, cfg.kl_coef, device))
    # the objective dpo and ppo_rm share: the seed's reward model on samples of the base and of their final models
    base_scores = {}
    for seed in seeds:
        rm = load_reward_model(os.path.join(thesis_dir, f"s{seed}", "rm", "ckpt.pt"), tok,
                               base_model.config.block_size, device).score_texts
        rm_score = lambda model: reward_eval(model, tok, prompts, rm, k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                                             seed=cfg.eval_seed, device=device)["reward"]
        base_scores[seed] = rm_score(base_model)  # not cached: the base's entry outlives a retrained reward model
        for method in ("dpo", "ppo_rm"):
            p = runs[(method, seed)][-1][1]
            if "rm_score" not in results[p]:
                results[p]["rm_score"] = rm_score(load_model(p, device)[0])
    os.makedirs(thesis_dir, exist_ok=True)
    if os.path.isfile(cache_path):  # keep what a study run on other seeds wrote since this one read the cache
        with open(cache_path) as f:
            cache = {**json.load(f), **cache}
    with open(cache_path + f".tmp{os.getpid()}", "w") as f:
        json.dump(cache, f)
    os.replace(f.name, cache_path)
    times["eval"] = time.time() - t
    results["base"] = results[base]

    per_run, levels, kl_levels = summarize(cfg, runs, results)
    png = os.path.join(thesis_dir, "curves.png")
    plot_curves(per_run, png)
    if cfg.readme_plot:
        shutil.copyfile(png, os.path.join(ROOT, ".assets", "thesis.png"))
    b = results[base]
    wall = time.time() - t0
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu.ru_utime + cpu.ru_stime
    lines = ["# nanopost thesis study: the KL anchor or on-policy data?", "",
             f"Seeds {seeds}; mean [95% bootstrap interval] over seeds ({cfg.n_boot} resamples). acc: verifier "
             f"accuracy, {cfg.k} samples on {cfg.n_prompts} held-out prompts; forgetting: mean Δ held-out "
             "pretraining loss vs the base (nats/token); kl: KL(base‖π) on the base's samples, kl_pi: KL(π‖base) on "
             "π's samples (nats per response, sequence-level); pi_other_share: share of "
             "π's valid-answer mass off the demonstrator's N+0=N (exact, from scoring all N+1 valid answers); "
             "forgetting@a, kl@a: interpolated where the run's trajectory first reaches accuracy a, forgetting@klk "
             "where its KL(base‖π) first reaches k (n = runs that reach it).", "",
             *method_table(per_run, levels, kl_levels, seeds, cfg.n_boot), "",
             f"Base: acc {b['accuracy']:.3f}, pi_other_share {b['pi_other_share']:.3f}. The optimum "
             f"π* ∝ π_base·exp(r/β), β={cfg.kl_coef}: mass on valid answers {b['opt_valid']:.3f}, share off N+0=N "
             f"{b['opt_other_share']:.3f}.", "",
             "## matched accuracy, per-seed differences in forgetting", "",
             *paired_differences(per_run, PAIRS, [(f"forgetting@{a}", f"acc {a}") for a in levels], seeds,
                                 cfg.n_boot), "",
             "## matched KL(base‖π), per-seed differences in forgetting", "",
             *paired_differences(per_run, KL_PAIRS, [(f"forgetting@kl{k:g}", f"KL {k:g}") for k in kl_levels],
                                 seeds, cfg.n_boot), "",
             f"## the objective dpo and ppo_rm share: J = E[r] − {cfg.kl_coef}·KL(π‖base), r normalised", "",
             *objective_lines(per_run, base_scores, seeds, cfg.kl_coef, cfg.n_boot), "",
             "## forgetting against the KL to the base", "", *kl_lines(per_run), "",
             "![forgetting vs accuracy along training](curves.png)", "",
             "## time", "", f"- total {wall / 60:.1f} min wall, {cpu / 60:.1f} min training CPU (a skipped stage "
             "counts 0); " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()), "",
             "## config", "", "```", json.dumps(asdict(cfg), indent=1), "```", ""]
    with open(os.path.join(thesis_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(thesis_dir, "results.json"), "w") as f:
        json.dump(dict(config=asdict(cfg), runs={f"{m} s{s}": r for (m, s), r in per_run.items()},
                       trajectories={f"{m} s{s}": pts for (m, s), pts in runs.items()}), f, indent=1)
    print("\n".join(lines[:lines.index("## config")]))
    print(f"wrote {thesis_dir}/report.md, results.json, curves.png")


if __name__ == "__main__":
    entry(main)
