"""
PPO for the tiny nanopost GPT with a value model, a frozen reference and a per-token KL penalty;
or, with --advantage=grpo|rloo, critic-free PPO whose baseline is the other responses to the prompt.

The whole algorithm is one loop in main(), read top to bottom like cleanrl's ppo.py:
  1. rollout   sample one response per prompt from the policy (KV cache, per-row stop at eot)
  2. score     reward_fn(prompts, responses) -> a float per response (default: the built-in
               verifier), or a learned reward model (--reward_model) on the batch in one forward
  3. logprobs  recompute log pi(a_t|s_t) of the sampled tokens under the policy and the reference
  4. rewards   the score on the last real token (Ziegler et al. 2019), and -kl_coef * the KL
               estimate at its token (k1) or at the next (full, k3: the rest is in the loss)
  5. GAE       advantages over response tokens, whitened (Schulman et al. 2016); or, critic-free,
               one per response from its group of group_size samples of the prompt (GRPO, RLOO)
  6. update    ppo_epochs passes of shuffled minibatches: clipped ratio objective, clipped value
               loss, entropy bonus, the KL's direct part (full, k3), gradient clipping; pad tokens
               never contribute (Schulman et al. 2017)

Every KL mode climbs J = E[score] - kl_coef * KL(pi || ref), the KL of whole responses, whose
optimum is pi* ∝ ref * exp(score / kl_coef) (see kl_rewards; tests/test_kl_objective.py proves it):
gae exactly when lam = 1 (below, GAE trades bias for variance), rloo exactly, grpo with each
prompt's score divided by its group's std, so its optimum sharpens as the group agrees (Liu et al.
2025, "Dr. GRPO"). --batch_size counts responses: batch_size / group_size prompts, each sampled
group_size times in a row, a group never split over ranks.

    python train_ppo.py --init_from=out/sft/ckpt.pt --out_dir=out/ppo_sft  # or out/base/ckpt.pt
    python train_ppo.py --init_from=resume --out_dir=out/ppo_sft --max_iters=400  # continue exactly
    torchrun --standalone --nproc_per_node=2 train_ppo.py --init_from=out/sft/ckpt.pt
    python train_ppo.py --reward_fn=file.py:score --prompts=p.jsonl  # score(prompts, responses)
    python train_ppo.py --init_from=out/base/ckpt.pt --advantage=grpo --group_size=8  # no critic
    python train_ppo.py --reward_model=out/rm/ckpt.pt  # RLHF: a reward model (train_sft.py)

Details follow Huang et al. 2024, "The N Implementation Details of RLHF with PPO": the reference is
the initial policy; log-probs are recomputed at the sampling temperature (the gap to sampling is
logged as logprob_diff: it catches position and padding bugs); a separate value trunk; whitened
advantages; no dropout. Data parallel: statistics, token counts and gradients are summed over
ranks, so an update equals one process holding the union of their batches. Deliberate deviations:
  - separate optimizers for policy and value model, so no vf_coef: with Adam the scale of an
    independent loss does not change the update (only gradient clipping sees it; each model clips)
  - the value head starts at zero instead of N(0, 1/sqrt(C+1)): see nanopost.model.ValueModel
  - a response cut at max_new_tokens is scored as it is and is terminal (no bootstrap from V);
    missing_eos_penalty is subtracted from its score instead of replacing it (N-details: -1)
  - constant learning rate (no annealing), so a resumed run is the same run whatever max_iters says
  - GRPO's loss is a mean over all real tokens of the minibatch, not of per-response means (Shao et
    al. 2024): every token weighs the same, as in the PPO loss here (and as Liu et al. 2025 argue)
  - GRPO's KL is not Shao et al.'s k3 in the loss: on policy its gradient is grad KL(ref || pi), the
    other direction, without the prefix part; --kl_estimator=k3 weights it by the ratio, adds it
  - the KL term shrinks with the advantages: whitening divides them by their std, and the loss's KL
    term by the same, so the update stays a positive multiple of grad J
"""

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import kernels
from nanopost.checkpoint import check_finite, lock_out_dir, save_snapshot, weight_limits
from nanopost.config import UserError, entry, knob, parse_config, parse_steps, validate
from nanopost.data import TOO_LONG
from nanopost.distributed import (all_reduce_max, all_reduce_sum, assert_in_sync, barrier, print0,
                                  setup_runtime, sum_over_ranks, sync_grads, teardown)
from nanopost.evaluate import reward_eval, task_eval
from nanopost.evaluate import spread as evenly_spaced
from nanopost.loading import (load_checkpoint, load_policy_and_reference, load_value_model,
                              refuse_reward_model, resume_config, save_run, start_or_resume)
from nanopost.reward import score_rollout, setup_rewards
from nanopost.rollout import (at_response, response_logprobs, rollout, split_batch,
                              train_eval_prompts)
from nanopost.runlog import RunLog
from nanopost.tokenizer import from_checkpoint
from nanopost.world import load_world

# -----------------------------------------------------------------------------
# config: every knob in one place

@dataclass
class Config:
    # I/O
    out_dir: str = knob("out/ppo", "where ckpt.pt and log.jsonl go")
    init_from: str = knob("out/sft/ckpt.pt", "policy checkpoint (SFT or base ckpt.pt, or a GPT-2 "
                          "folder), or 'resume' = out_dir/ckpt.pt")
    value_init: str = knob("", "checkpoint for the value trunk; '' = the initial policy's weights")
    reward_fn: str = knob("", "module:function or file.py:function, (prompts, responses) -> "
                          "floats; '' = world.score")
    reward_model: str = knob("", "reward model ckpt.pt (train_sft.py on preference pairs), "
                             "normalised to mean 0, std 1 on its initial model; the built-in "
                             "verifier is then logged as gold")
    prompts: str = knob("", "JSONL file of training prompts; '' = world.ppo_prompts")
    too_long: str = knob("error", "prompts with no room for max_new_tokens: error (name them) | "
                         "drop (counted) | truncate (keep the end: oldest turns, then the start of "
                         "the last, go first)", choices=TOO_LONG)
    world_seed: int = knob(0, "seed of the built-in world (prompts, verifier, eval prompts)")
    seed: int = knob(1337, "seed for sampling, prompt order and minibatch shuffles")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = knob("float32", "float32 | bfloat16 (autocast, CUDA only)",
                      choices=("float32", "bfloat16"))
    compile: bool = knob(True, "torch.compile the update's forward passes (CUDA only; sampling "
                         "stays eager)")
    # rollout
    batch_size: int = knob(64, "responses per iteration, global over all ranks "
                           "(batch_size/group_size prompts)", ge=1)
    group_size: int = knob(1, "responses sampled per prompt in one batch (grpo and rloo need >= 2)",
                           ge=1)
    max_new_tokens: int = knob(16, "response length limit; longer responses are cut and count as "
                               "not ended", ge=1)
    temperature: float = knob(1.0, "sampling temperature; log-probs and KL are computed at the "
                              "same temperature", gt=0)
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of responses that never "
                                      "emitted eot")
    # PPO (2 epochs x 2 minibatches at lr 1e-4: nanopost/RESULTS.md, "PPO's defaults", says why)
    advantage: str = knob("gae", "gae (value model) | grpo | rloo (critic-free group baselines)",
                          choices=("gae", "grpo", "rloo"))
    max_iters: int = knob(200, "PPO iterations (rollout + update)", ge=0)
    max_minutes: float = knob(5.0, "also stop (eval + save) after this many minutes of this run; "
                              "0 = no limit", ge=0)
    ppo_epochs: int = knob(2, "passes over each rollout batch", ge=1)
    num_minibatches: int = knob(2, "minibatches per pass (per rank rows must divide evenly)", ge=1)
    learning_rate: float = knob(1e-4, "policy AdamW learning rate (constant)", gt=0)
    value_lr: float = knob(2e-4, "value model AdamW learning rate (constant)", gt=0)
    clip_coef: float = knob(0.2, "PPO ratio clip epsilon", gt=0)
    vf_clip_coef: float = knob(0.2, "value clip range around the rollout-time values", gt=0)
    ent_coef: float = knob(0.0, "entropy bonus coefficient", ge=0)
    grad_clip: float = knob(1.0, "clip each model's gradient norm to this; 0 = off", ge=0)
    gamma: float = knob(1.0, "discount (1: a short episode, the score at its end)", ge=0)
    lam: float = knob(0.95, "GAE lambda", ge=0)
    whiten_rewards: bool = knob(False, "whiten per-token rewards (no mean shift) before GAE "
                                "(gae only)")
    # KL penalty (k1 by default: with the exact KL's direct part in the loss, PPO did not leave the
    # built-in base; nanopost/RESULTS.md, "PPO's defaults")
    kl_coef: float = knob(0.05, "initial KL penalty coefficient beta", ge=0)
    kl_estimator: str = knob("k1", "per-token KL(pi || ref): k1 (all in the reward) | full (exact "
                             "over the vocab: the prefix part in the reward, the direct part in "
                             "the loss) | k3 (as full, sampled)", choices=("k1", "full", "k3"))
    adaptive_kl: bool = knob(False, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = knob(1.0, "target KL per response (nats) for the adaptive controller", gt=0)
    kl_horizon: int = knob(10000, "adaptive controller horizon, in responses", ge=1)
    # eval / logging / checkpoints
    eval_interval: int = knob(50, "evaluate every this many iterations; 0 = only at start and "
                              "end", ge=0)
    eval_prompts: int = knob(54, "held-out prompts per evaluation (of --prompts: a tenth at most); "
                             "0 = off", ge=0)
    eval_k: int = knob(4, "samples per eval prompt (more samples, less noise in the before/after "
                       "score)", ge=1)
    eval_temperature: float = knob(1.0, "sampling temperature of the evaluation (the policy PPO "
                                   "optimises)", gt=0)
    ckpt_interval: int = knob(50, "save out_dir/ckpt.pt every this many iterations (and at the "
                              "end); 0 = end", ge=0)
    snapshot_steps: str = knob("", "comma-separated iterations at which to also keep "
                               "out_dir/snap/step_<n>.pt (the policy alone: a training trajectory "
                               "to evaluate later)")

def check_knobs(cfg):
    """The knob combinations a critic-free run cannot use, each a one-line error."""
    if cfg.advantage != "gae" and cfg.group_size < 2:
        raise UserError(f"--advantage={cfg.advantage}: needs --group_size >= 2 (a group baseline), "
                        f"got {cfg.group_size}")
    if cfg.advantage != "gae" and cfg.whiten_rewards:
        raise UserError("--whiten_rewards: only for --advantage=gae (a group baseline compares raw "
                        "scores)")

# a resume may change any other knob (max_iters, learning rates, intervals, coefficients)
RUN_DEFINING = ("value_init", "reward_fn", "reward_model", "prompts", "world_seed", "seed",
                "batch_size", "max_new_tokens", "temperature", "advantage", "group_size",
                "too_long")
SHOWN = ("score", "gold", "kl", "kl_full", "kl_coef", "entropy", "approx_kl", "clipfrac",  # printed
         "pg_loss", "v_loss", "explained_var", "resp_len", "ended", "logprob_diff", "tok_per_s")

# -----------------------------------------------------------------------------
# the pieces of PPO, as small functions the tests call directly

def masked_mean(x, mask, n=None):
    """Mean of x over mask; `n` overrides the count (data parallel: the global token count).
    torch.where instead of x*mask: a NaN or inf sitting in a pad slot cannot leak into the sum."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / (mask.sum() if n is None else n)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the real tokens of the global batch (all ranks); pads come out 0.
    -> (that, 1 / std): the scale, for a loss term that must shrink with x. shift_mean=False keeps
    the mean (N-details: rewards are scaled, advantages are centred)."""
    xm = torch.where(mask, x, torch.zeros_like(x)).double()
    stats = all_reduce_sum(torch.stack([xm.sum(), (xm * xm).sum(), mask.sum().double()]))
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean * mean).clamp(min=0.0)
    var = var * stats[2] / (stats[2] - 1).clamp(min=1.0)  # unbiased, as torch.var
    scale = torch.rsqrt(var + 1e-8)
    out = (x.double() - mean) * scale
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out.to(x.dtype), torch.zeros_like(x)), scale.item()


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over the response tokens (Schulman et al. 2016).

    rewards, values: (B, N); mask: (B, N) bool, a prefix per row (right padding), so the last real
    token is terminal and V(after it) = 0. Pads may hold anything. Returns (advantages, returns),
    (B, N), 0 at pads:
    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V
    """
    maskf = mask.to(values.dtype)
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    B, N = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, N)
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(N)):
        last = t + 1 == N  # the step after the last column is terminal: no value to bootstrap from
        nextvalues = torch.zeros_like(lastgaelam) if last else values[:, t + 1]
        nextnonterminal = torch.zeros_like(lastgaelam) if last else maskf[:, t + 1]
        delta = rewards[:, t] + gamma * nextvalues * nextnonterminal - values[:, t]
        lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * maskf
    returns = advantages + values
    return advantages, returns


def grpo_advantages(scores, group_size, eps=1e-4):
    """GRPO's outcome advantage (Shao et al. 2024, sec. 4.1.2): each response's score standardised
    within its group, A_i = (s_i - mean) / (sample std + eps). scores: (B,), the group_size samples
    of a prompt adjacent. Returns (B,); a group whose scores are all equal (all right or all wrong)
    gets 0: it says nothing about which response is better. eps=1e-4 (as in TRL): keeps a
    near-constant group finite."""
    g = scores.view(-1, group_size)  # (B/k, k)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)


def rloo_advantages(scores, group_size):
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 6; Kool et al. 2019): each response's
    score minus the mean of the OTHER k-1 scores of its group, = k/(k-1) * (s_i - group mean).
    scores: (B,), groups adjacent."""
    g = scores.view(-1, group_size)  # (B/k, k)
    return ((g - g.mean(1, keepdim=True)) * group_size / (group_size - 1)).view(-1)


def policy_loss(logp, old_logp, advantages, mask, clip_coef, n=None):
    """Clipped surrogate objective (PPO, Schulman et al. 2017, eq. 7), negated to be minimised.
    All inputs (B, N); `n` = number of real tokens to divide by (global count under data parallel).
    Returns pg_loss and, detached, approx_kl (k3 of the ratio, Schulman 2020 blog), clipfrac,
    ratio."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask, n)
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - logratio, mask, n)
        clipfrac = masked_mean(((ratio - 1.0).abs() > clip_coef).to(ratio.dtype), mask, n)
    return pg_loss, approx_kl, clipfrac, ratio.detach()


def value_loss(newvalues, old_values, returns, mask, clip_coef, n=None):
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2) over real tokens
    (value clipping from OpenAI baselines' ppo2, as in the lm-human-preferences code N-details
    reproduces). Returns v_loss and the fraction of tokens where the clipped branch was taken
    (detached)."""
    v_loss_unclipped = (newvalues - returns) ** 2
    v_clipped = old_values + torch.clamp(newvalues - old_values, -clip_coef, clip_coef)
    v_loss_clipped = (v_clipped - returns) ** 2
    v_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask, n)
    with torch.no_grad():
        vf_clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).to(newvalues.dtype), mask, n)
    return v_loss, vf_clipfrac


# The objective is J = E[score] - beta * KL(pi || ref), the KL of whole responses: E_pi[sum_t KL_t],
# KL_t = KL(pi(.|s_t) || ref(.|s_t)) at the states pi visits. Its gradient has two parts (Amini,
# Vieira & Cotterell 2025, "Better Estimation of the KL Divergence Between Language Models", sec. on
# Rao-Blackwellized gradients):
#   direct  sum_t grad KL_t at each visited state, the state held fixed;
#   prefix  sum_t grad log pi(a_t|s_t) * sum_{t' > t} KL_t': a token is charged the KL of the
#           states it leads to.
# k1 carries both in the reward: at its own token E[grad log pi * (log pi - log ref)] = grad KL_t is
# the direct part. k3 and full put the prefix part in the reward and the direct part in the loss
# (kl_direct). A k3 or exact KL in the reward at its own token would be wrong: E[grad log pi * KL_t]
# = 0 drops the direct part (full), and E[grad k3] = grad KL(ref || pi), the other direction.
# tests/test_kl_objective.py enumerates every expectation on a two-token bandit in float64 and
# checks each mode's expected gradient against grad J.

def kl_estimate(logp, ref_logp, estimator, full_kl=None):
    """Per-token estimate of KL_t at the sampled states (Schulman 2020, "Approximating KL
    divergence"): k1 = log pi - log ref (unbiased, can be negative); k3 = (r - 1) - log r with
    r = ref/pi (unbiased, >= 0); full = the exact KL over the vocabulary (full_kl, from
    kernels.token_kl)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        logr = ref_logp - logp
        return logr.exp() - 1.0 - logr
    assert estimator == "full" and full_kl is not None, f"kl estimator {estimator!r} needs full_kl"
    return full_kl


def kl_rewards(kl, mask, estimator, kl_coef):
    """The KL's per-token rewards (B, N), 0 at pads: -kl_coef * the estimate at its own token (k1),
    or at the next one (k3, full: the prefix part; 0 after the last real token), the direct part
    then being in the loss."""
    if estimator != "k1":
        kl = torch.cat([torch.where(mask[:, 1:], kl[:, 1:], 0.0), torch.zeros_like(kl[:, :1])], 1)
    return torch.where(mask, -kl_coef * kl, 0.0)


def kl_direct(estimator, newlogp, old_logp, ref_logp, logits, ref_logits, temperature):
    """The direct part of the KL gradient for the loss (B, N): full, the exact KL_t through
    kernels.token_kl's backward (the whole expectation over next tokens, no sampling noise); k3,
    ratio * k3 with ratio = pi / pi_old, whose mean under the rollout's pi_old is KL_t of the
    current pi, on and off policy. None for k1."""
    if estimator == "full":
        return kernels.token_kl(logits, ref_logits, temperature=temperature)
    if estimator == "k3":
        return (newlogp - old_logp).exp() * kl_estimate(newlogp, ref_logp, "k3")
    return None


def group_advantages(scores, rewards, mask, group_size, advantage):
    """Critic-free advantages (B, N), 0 at pads: the score's advantage from its group on every token
    of a response (grpo_advantages or rloo_advantages), plus each token's KL reward-to-go less the
    mean KL reward of the other responses of its group (a baseline that cannot depend on the token).
    rewards: kl_rewards (no score)."""
    togo = rewards.flip(1).cumsum(1).flip(1)  # (B, N) sum over t' >= t
    total = togo[:, 0].view(-1, group_size)  # (B/k, k)
    others = ((total.sum(1, keepdim=True) - total) / (group_size - 1)).view(-1)  # (B,)
    score_advantage = grpo_advantages if advantage == "grpo" else rloo_advantages
    score_adv = score_advantage(scores, group_size)  # (B,)
    return torch.where(mask, score_adv[:, None] + togo - others[:, None], 0.0)


def adaptive_kl_coef(kl_coef, current_kl, target, horizon, n_steps):
    """Ziegler et al. 2019, sec. 2.2: beta <- beta * (1 + K_beta * e), K_beta = n_steps / horizon,
    e = clip(KL/target - 1, -0.2, 0.2). A proportional controller: the clip keeps one noisy batch
    from swinging beta."""
    proportional_error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + proportional_error * n_steps / horizon)


def main(argv):
    cfg, given = parse_config(Config, argv)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume = cfg.init_from == "resume"
    init_path = ckpt_path if resume else cfg.init_from
    ckpt = load_checkpoint(init_path)
    refuse_reward_model(ckpt, cfg.init_from)
    if resume:
        cfg = resume_config(Config, given, ckpt, ckpt_path, "train_ppo.py", RUN_DEFINING)
    validate(cfg)
    check_knobs(cfg)
    critic = cfg.advantage == "gae"  # grpo and rloo take their baseline from the group: no critic
    snapshots = parse_steps(cfg.snapshot_steps, "snapshot_steps")
    rt = setup_runtime(cfg.device, cfg.dtype)
    n_prompts, local_prompts, mb_size = split_batch(cfg.batch_size, cfg.group_size,
                                                    cfg.num_minibatches, rt.world_size)  # per iter

    # models: the policy (trained), the reference (the initial policy, frozen), a value model (gae)
    tok = from_checkpoint(ckpt, init_path)
    policy, ref_policy, model_args = load_policy_and_reference(ckpt, resume, rt.device)
    torch.manual_seed(cfg.seed)  # the value head init: identical on every rank
    value_model = value_args = value_optimizer = None
    adam = dict(eps=1e-5, weight_decay=0.0)  # eps: cleanrl/baselines PPO; betas: N-details' Adam
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, **adam)
    optimizers = [(optimizer, "optimizer", cfg.learning_rate)]  # (it, checkpoint key, its lr)
    if critic:
        value_model, value_args = load_value_model(ckpt, resume, cfg.value_init, rt.device)
        value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=cfg.value_lr, **adam)
        optimizers.append((value_optimizer, "value_optimizer", cfg.value_lr))
    models = dict(policy=policy) | (dict(value_model=value_model) if critic else {})  # trained
    limits = weight_limits(models)  # how large a weight may grow before a save refuses it
    # the update's forwards (fixed minibatch shapes) compiled; sampling and checkpoints stay eager
    compiled = cfg.compile and rt.device_type == "cuda"
    policy_update = torch.compile(policy) if compiled else policy
    value_update = torch.compile(value_model) if compiled and critic else value_model

    # data: your prompts and a held-out tail of them, or the built-in ones (eval: every phrasing)
    world = load_world(seed=cfg.world_seed)
    block_size = model_args["block_size"]
    builtin_eval = evenly_spaced(world.eval_prompts, cfg.eval_prompts)
    train_prompts, eval_prompts = train_eval_prompts(cfg.prompts, world.ppo_prompts, builtin_eval,
                                                     cfg.eval_prompts, tok, block_size,
                                                     cfg.max_new_tokens, cfg.too_long)
    if n_prompts > len(train_prompts):
        raise UserError(f"--batch_size={cfg.batch_size}: more than the {len(train_prompts)} "
                        f"training prompts can fill ({n_prompts} prompts per iteration at "
                        f"--group_size={cfg.group_size})")
    reward_fn, reward_model = setup_rewards(cfg.reward_fn, cfg.reward_model, cfg.prompts, world,
                                            tok, block_size, rt.device)
    # RNG streams for prompt order, shuffles and sampling; a resume restores them and all it saved
    streams, start = start_or_resume(cfg.seed, rt, optimizers, ckpt if resume else None, ckpt_path)
    kl_coef = ckpt["kl_coef"] if resume and "kl_coef" not in given else cfg.kl_coef  # adaptive
    del ckpt
    reward_name = (reward_model or reward_fn).__name__
    print0(f"policy {policy.num_params() / 1e6:.2f}M | {cfg.advantage} | {rt.world_size} rank(s) | "
           f"{local_prompts} prompts/rank/iter x {cfg.group_size} samples | {len(train_prompts)} "
           f"train prompts | {len(eval_prompts)} eval prompts | reward {reward_name}")
    if rt.master:  # the first write into out_dir: every knob and the data were checked above
        lock_out_dir(cfg.out_dir)
    log = RunLog(os.path.join(cfg.out_dir, "log.jsonl"), start if resume else None, rt.master)

    def evaluate(step):
        """Rank 0 (the others wait): the verifier's metrics, or your reward on held-out prompts."""
        res = None
        if rt.master and eval_prompts:
            kw = dict(k=cfg.eval_k, temperature=cfg.eval_temperature, seed=0, device=rt.device,
                      max_new_tokens=cfg.max_new_tokens)
            with torch.no_grad(), rt.autocast():
                if cfg.prompts or cfg.reward_fn:
                    res = reward_eval(policy, tok, eval_prompts, reward_fn, **kw)
                else:
                    res = task_eval(policy, tok, world, eval_prompts, **kw)
            print(f"eval {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in res.items()),
                  flush=True)
            log.write(dict(kind="eval", step=step, **res))
        barrier()
        return res

    first_eval = log.first("eval") if resume else evaluate(start)  # a resume's log holds it
    t_start = time.time()  # after the first eval: max_minutes counts training time

    # -------------------------------------------------------------------------
    # training loop
    temperature, step = cfg.temperature, start
    while step < cfg.max_iters:
        step += 1
        t0 = time.time()

        # --- 1. rollout: the global batch of prompts, this rank's share, each group_size times ---
        global_idx = torch.randperm(len(train_prompts), generator=streams["data"])[:n_prompts]
        local_idx = global_idx[rt.rank * local_prompts:(rt.rank + 1) * local_prompts].tolist()
        prompts = [train_prompts[i] for i in local_idx for _ in range(cfg.group_size)]
        with torch.no_grad(), rt.autocast():
            samples = rollout(policy, tok, prompts, cfg.max_new_tokens, temperature=temperature,
                              generator=streams["sample"])
        P, b_tokens, b_attn = samples.prompt_len, samples.tokens, samples.mask  # (B, P+N) each
        b_mask = samples.response_mask  # (B, N) bool: the sampled tokens, eot included
        b_ended = samples.ended.to(rt.device)  # (B,) bool
        B, N = b_mask.shape

        # --- 2. score: the reward function, or the reward model and the verifier as gold ---
        raw_scores, gold = score_rollout(samples, reward_fn, reward_model, rt, not cfg.prompts)
        b_scores = torch.tensor(raw_scores, dtype=torch.float32, device=rt.device)  # (B,)
        b_scores = b_scores - cfg.missing_eos_penalty * (~b_ended).float()

        # --- 3. log-probs of the sampled tokens, recomputed under policy and reference ---
        with torch.no_grad(), rt.autocast():
            (b_logprobs, b_entropy), logits = response_logprobs(
                policy, b_tokens, b_attn, P, temperature, return_entropy=True)  # (B, N) each
            b_ref_logprobs, ref_logits = response_logprobs(
                ref_policy, b_tokens, b_attn, P, temperature)  # (B, N), (B, N, V)
            b_full_kl = kernels.token_kl(logits, ref_logits, temperature=temperature)  # (B, N)
            b_ref_logits = ref_logits if cfg.kl_estimator == "full" else None  # for the loss
            if critic:  # (B, N) V(s_t)
                b_values = at_response(value_model(b_tokens, attention_mask=b_attn), P).float()
            del logits, ref_logits
        # sampling and recomputation agree up to kernel noise; a gap is a temperature, position
        # or padding bug
        logprob_gap = (b_logprobs - samples.logprobs.to(rt.device)).abs()  # (B, N)
        logprob_diff = torch.where(b_mask, logprob_gap, 0.0).max()

        # --- 4. per-token rewards: the KL's (see kl_rewards), the score on the last real token ---
        b_kl = kl_estimate(b_logprobs, b_ref_logprobs, cfg.kl_estimator, b_full_kl)  # (B, N)
        b_kl_rewards = kl_rewards(b_kl, b_mask, cfg.kl_estimator, kl_coef)  # (B, N)
        last = b_mask.sum(1) - 1  # (B,) index of the last real response token (eot if ended)
        rows = torch.arange(B, device=rt.device)  # (B,)
        b_rewards = b_kl_rewards.index_put((rows, last), b_scores, accumulate=True)  # (B, N)
        kl_scale = 1.0  # the loss's KL term shrinks with the advantages it stands beside
        if cfg.whiten_rewards:
            b_rewards, kl_scale = masked_whiten(b_rewards, b_mask, shift_mean=False)

        # --- 5. advantages: GAE and returns, or from each response's group, on all its tokens ---
        if critic:
            b_advantages, b_returns = compute_gae(b_rewards, b_values, b_mask, cfg.gamma, cfg.lam)
            b_advantages, scale = masked_whiten(b_advantages, b_mask, shift_mean=True)
            kl_scale *= scale
        else:
            b_advantages = group_advantages(b_scores, b_kl_rewards, b_mask, cfg.group_size,
                                            cfg.advantage)  # (B, N)
        t_rollout = time.time() - t0

        # --- 6. PPO update: ppo_epochs passes of shuffled minibatches ---
        update_sums, n_updates = {}, cfg.ppo_epochs * cfg.num_minibatches  # minibatch stats summed
        max_norm = cfg.grad_clip or math.inf  # grad_clip=0: clip_grad_norm_ only measures the norm
        for epoch in range(cfg.ppo_epochs):
            b_inds = torch.randperm(B, generator=streams["shuffle"])
            for lo in range(0, B, mb_size):
                mb_inds = b_inds[lo:lo + mb_size].to(rt.device)
                mb_tokens, mb_attn, mb_mask = b_tokens[mb_inds], b_attn[mb_inds], b_mask[mb_inds]
                mb_logprobs, mb_ref_logprobs = b_logprobs[mb_inds], b_ref_logprobs[mb_inds]
                # divide by the global token count of this minibatch, so summed rank gradients are
                # the gradient of the masked mean over the union (data parallel == one process)
                n_tok = all_reduce_sum(mb_mask.sum().double()).clamp(min=1.0)
                with rt.autocast():
                    (newlogprob, entropy), new_logits = response_logprobs(
                        policy_update, mb_tokens, mb_attn, P, temperature, return_entropy=True)
                pg_loss, approx_kl, clipfrac, ratio = policy_loss(
                    newlogprob, mb_logprobs, b_advantages[mb_inds], mb_mask, cfg.clip_coef, n_tok)
                entropy_bonus = masked_mean(entropy, mb_mask, n_tok)
                loss = pg_loss - cfg.ent_coef * entropy_bonus
                mb_stats = dict(pg_loss=pg_loss, entropy_bonus=entropy_bonus, approx_kl=approx_kl,
                                clipfrac=clipfrac)
                if critic:
                    with rt.autocast():
                        newvalues = at_response(value_update(mb_tokens, attention_mask=mb_attn), P)
                    v_loss, vf_clipfrac = value_loss(newvalues.float(), b_values[mb_inds],
                                                     b_returns[mb_inds], mb_mask, cfg.vf_clip_coef,
                                                     n_tok)
                    loss = loss + v_loss  # disjoint parameters: one backward serves both models
                    mb_stats.update(v_loss=v_loss, vf_clipfrac=vf_clipfrac)
                mb_ref_logits = None if b_ref_logits is None else b_ref_logits[mb_inds]
                direct = kl_direct(cfg.kl_estimator, newlogprob, mb_logprobs, mb_ref_logprobs,
                                   new_logits, mb_ref_logits, temperature)
                if direct is not None:  # the direct part of the KL gradient (k3, full)
                    kl_loss = masked_mean(direct, mb_mask, n_tok)
                    loss = loss + kl_scale * kl_coef * kl_loss
                    mb_stats.update(kl_loss=kl_loss)
                for opt, _, _ in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                sync_grads([p for m in models.values() for p in m.parameters()])
                norms = {f"{name}_grad_norm": nn.utils.clip_grad_norm_(m.parameters(), max_norm)
                         for name, m in models.items()}
                losses = dict(pg_loss=pg_loss) | (dict(v_loss=v_loss) if critic else {})
                # before the step, so the weights stay the last good ones
                check_finite(step, ckpt_path, **sum_over_ranks(losses), **norms)
                for opt, _, _ in optimizers:
                    opt.step()
                mb_stats.update(ratio_mean=masked_mean(ratio, mb_mask, n_tok),
                                ratio_sq=masked_mean(ratio * ratio, mb_mask, n_tok))
                for k, v in mb_stats.items():
                    update_sums[k] = update_sums.get(k, 0.0) + v.detach().double()
        for name, m in models.items():
            assert_in_sync(m, step, name)  # data parallel: every rank holds the same weights
        t_learn = time.time() - t0 - t_rollout

        # --- logging: this rank's sums over responses and tokens, summed over ranks, divided ---
        per_token = dict(kl=b_logprobs - b_ref_logprobs, kl_full=b_full_kl, kl_penalised=b_kl,
                         entropy=b_entropy)
        if critic:
            err = b_returns - b_values  # (B, N) what the value model missed: explained variance
            per_token.update(ret=b_returns, ret_sq=b_returns ** 2, err=err, err_sq=err ** 2)
        b_raw = torch.tensor(raw_scores, dtype=torch.float64, device=rt.device)  # (B,)
        sums = {k: torch.where(b_mask, v, 0.0).double().sum() for k, v in per_token.items()}
        sums.update(n_resp=b_raw.new_tensor(B), n_tok=b_mask.double().sum(), score=b_raw.sum(),
                    score_sq=(b_raw * b_raw).sum(), ended=b_ended.double().sum(), **update_sums)
        if gold is not None:
            sums.update(gold=gold.sum())
        total = sum_over_ranks(sums)
        n_resp, n_tok_all, dt = total["n_resp"], total["n_tok"], t_rollout + t_learn
        mean_score = total["score"] / n_resp
        record = dict(kind="train", step=step,
                      **{k: total[k] / n_resp for k in ("score", "kl", "kl_full", "kl_penalised")},
                      score_std=math.sqrt(max(total["score_sq"] / n_resp - mean_score ** 2, 0.0)),
                      kl_coef=kl_coef, entropy=total["entropy"] / n_tok_all,
                      **{k: total[k] / n_updates for k in update_sums},
                      resp_len=n_tok_all / n_resp, ended=total["ended"] / n_resp,
                      n_responses=int(n_resp),
                      logprob_diff=all_reduce_max(logprob_diff.double()).item(),
                      tok_per_s=n_tok_all / dt, t_rollout=t_rollout, t_learn=t_learn)
        record["ratio_var"] = record.pop("ratio_sq") - record["ratio_mean"] ** 2
        if critic:
            var_ret, var_err = (total[k + "_sq"] / n_tok_all - (total[k] / n_tok_all) ** 2
                                for k in ("ret", "err"))
            record["explained_var"] = (1.0 - var_err / var_ret) if var_ret > 0 else float("nan")
        if gold is not None:  # the verifier beside the reward model: where proxy and truth part
            record["gold"] = total["gold"] / n_resp
        print0(f"step {step}/{cfg.max_iters} | "
               + " | ".join(f"{k} {record[k]:.4g}" for k in SHOWN if k in record)
               + f" | {dt:.2f}s (rollout {100 * t_rollout / dt:.0f}%)")
        log.write(record)

        # adaptive KL: after the iteration, from the KL this batch was penalised with (Ziegler
        # et al. 2019)
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, record["kl_penalised"], cfg.kl_target,
                                       cfg.kl_horizon, int(n_resp))

        # every rank must agree to stop, else one would wait forever in the next collective
        out_of_time = cfg.max_minutes > 0 and time.time() - t_start > 60 * cfg.max_minutes
        any_out_of_time = all_reduce_sum(torch.tensor(float(out_of_time), device=rt.device))
        done = step == cfg.max_iters or any_out_of_time.item() > 0
        if done and step < cfg.max_iters:
            print0(f"max_minutes={cfg.max_minutes} reached after {step - start} iterations; "
                   "stopping")
        if cfg.eval_interval > 0 and step % cfg.eval_interval == 0 and not done:
            evaluate(step)
        if done or (cfg.ckpt_interval > 0 and step % cfg.ckpt_interval == 0):
            value = dict(value_model=value_model.state_dict(), value_model_args=value_args,
                         value_optimizer=value_optimizer.state_dict()) if critic else {}
            save_run(ckpt_path, models, limits, streams, rt.master, model=policy.state_dict(),
                     model_args=model_args, config=asdict(cfg), step=step, script="train_ppo.py",
                     **tok.checkpoint_entries(), optimizer=optimizer.state_dict(),
                     **value, ref_model=ref_policy.state_dict(), kl_coef=kl_coef)
        if step in snapshots and rt.master:
            save_snapshot(cfg.out_dir, step, model=policy.state_dict(), model_args=model_args,
                          config=asdict(cfg), script="train_ppo.py", **tok.checkpoint_entries())
        if done:
            break

    print0(f"trained iterations {start}..{step} in {(time.time() - t_start) / 60:.1f} min "
           "(evals excluded)")
    last_eval = evaluate(step) if step > start else first_eval
    if rt.master and first_eval and last_eval:
        print("eval before -> after: " + " | ".join(
            f"{k} {first_eval[k]:.4f} -> {last_eval[k]:.4f}" for k in last_eval if k in first_eval))
    teardown(rt)


if __name__ == "__main__":
    entry(main)
