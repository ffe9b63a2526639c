"""
PPO with a value model, a frozen reference and a per-token KL penalty, for the tiny nanopost GPT; or, with
--advantage=grpo|rloo, critic-free PPO whose baseline is the other responses to the same prompt.

The whole algorithm is one loop in main(), read top to bottom like cleanrl's ppo.py:
  1. rollout   sample one response per prompt from the policy (KV cache, per-row stop at eot)
  2. score     reward_fn(prompts, responses) -> one float per response (default: the built-in verifier), or a
               learned reward model (--reward_model) on the whole batch in one forward
  3. logprobs  recompute log pi(a_t|s_t) of the sampled tokens under the policy and the frozen reference
  4. rewards   the score on the last real token (Ziegler et al. 2019), and -kl_coef * the KL estimate: at the
               token's own position (k1) or at the next (full, k3: the rest of the KL's gradient is in the loss)
  5. GAE       advantages over response tokens, whitened over real tokens (Schulman et al. 2016); or one
               advantage per response from its group of group_size samples of the same prompt (GRPO, RLOO)
  6. update    ppo_epochs passes of shuffled minibatches: clipped ratio objective, clipped value loss,
               entropy bonus, the KL's direct part (full, k3), gradient clipping; pad tokens never contribute
               (Schulman et al. 2017)

Every KL mode climbs the same objective, J = E[score] - kl_coef * KL(pi || ref) with the KL of whole responses,
whose optimum is pi* ∝ ref * exp(score / kl_coef) (see kl_rewards; tests/test_kl_objective.py proves it): gae
exactly when lam = 1 (below 1, GAE trades bias for variance), rloo exactly, grpo with its score rescaled (below).

    python train_ppo.py --init_from=out/sft/ckpt.pt --out_dir=out/ppo_sft       # or from out/base/ckpt.pt
    python train_ppo.py --init_from=resume --out_dir=out/ppo_sft --max_iters=400  # continue exactly
    torchrun --standalone --nproc_per_node=2 train_ppo.py --init_from=out/sft/ckpt.pt
    python train_ppo.py --reward_fn=file.py:score --prompts=prompts.jsonl      # score(prompts, responses) -> floats
    python train_ppo.py --init_from=out/base/ckpt.pt --advantage=grpo --group_size=8   # no value model
    python train_ppo.py --reward_model=out/rm/ckpt.pt   # RLHF: a reward model from train_sft.py --data=prefs

Critic-free advantages (outcome supervision: the score's advantage is one scalar per response, on all its
tokens; no value model, no value optimizer, no value loss). --batch_size counts responses, so an iteration costs
the same whatever group_size is: batch_size / group_size prompts, each sampled group_size times, a group never
split over ranks.
  grpo  A_i = (s_i - mean(s_group)) / (std(s_group) + 1e-4), sample std (Shao et al. 2024, DeepSeekMath, sec.
        4.1.2). Standardising a group rescales its prompt's score: per prompt, grpo climbs E[s]/c - kl_coef * KL
        with c the group's std (and (k-1)/k for the own sample in the mean), so its optimum sharpens as the group
        agrees (Liu et al. 2025, "Dr. GRPO", make the same point). The KL is not standardised.
  rloo  A_i = s_i - mean(s_j, j != i) (Ahmadian et al. 2024, "Back to Basics", sec. 3; Kool et al. 2019): the
        baseline is independent of the response it judges, so the estimate of grad E[s] is unbiased.
  Both add the KL's per-token reward-to-go less the other responses' mean (group_advantages), and the direct
  part in the loss, so the KL term is the gradient of kl_coef * KL(pi || ref) as it is for gae.

Details follow Huang et al. 2024, "The N Implementation Details of RLHF with PPO" (Ziegler et al. 2019's recipe):
the reference is the initial policy; log-probs are recomputed at the sampling temperature (the gap to sampling is
logged as logprob_diff: it catches position and padding bugs); a separate value trunk; whitened advantages; no
dropout. Data parallel: ranks sample shares of the global batch; statistics, token counts and gradients are summed
over ranks, so an update equals one process holding the union.

Deliberate deviations:
  - separate optimizers for policy and value model, so there is no vf_coef: with Adam the scale of an
    independent loss does not change the update (only gradient clipping sees it, and each model clips its own)
  - the value head starts at zero instead of N(0, 1/sqrt(C+1)): see nanopost.model.ValueModel
  - a response cut at max_new_tokens is scored as it is and treated as terminal (no bootstrap from V at the
    cut); missing_eos_penalty is subtracted from its score instead of replacing it (N-details uses -1)
  - constant learning rate (no annealing) so a resumed run is the same run whatever max_iters says
  - GRPO's loss is a mean over all real tokens of the minibatch, not a mean of per-response means (Shao et
    al.): every token weighs the same, as in the PPO loss here (and as Liu et al. 2025, "Dr. GRPO", argue)
  - GRPO's KL is not Shao et al.'s k3 in the loss: on policy that term's gradient is grad KL(ref || pi), the other
    direction, and it misses the prefix part; --kl_estimator=k3 here weights it by the ratio and adds that part
  - the KL term shrinks with the advantages: whitening divides them by their std, and the loss's KL term by the
    same, so the update stays a positive multiple of grad J
"""

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import kernels
from nanopost.config import UserError, entry, knob, parse_config, parse_steps, validate
from nanopost.distributed import (all_gather, all_reduce_max, all_reduce_sum, assert_in_sync, barrier, print0,
                                  setup_runtime, sync_grads, teardown)
from nanopost.checkpoint import (check_finite, check_model_finite, lock_out_dir, save_checkpoint,
                                 save_snapshot, weight_limits)
from nanopost.loading import (build_model, get_rng_state, load_checkpoint, load_weights, refuse_reward_model,
                              resume_config, set_rng_state)
from nanopost.runlog import RunLog
from nanopost.data import TOO_LONG, load_prompts
from nanopost.evaluate import reward_eval, spread, task_eval
from nanopost.model import ValueModel
from nanopost.reward import load_reward_fn, load_reward_model, score_responses
from nanopost.rollout import at_response, response_logprobs, rollout
from nanopost.tokenizer import from_checkpoint
from nanopost.world import load_world

# -----------------------------------------------------------------------------
# config: every knob in one place

@dataclass
class Config:
    # I/O
    out_dir: str = knob("out/ppo", "where ckpt.pt and log.jsonl go")
    init_from: str = knob("out/sft/ckpt.pt", "policy checkpoint (SFT or base ckpt.pt, or a GPT-2 folder), or 'resume' "
                                             "= out_dir/ckpt.pt")
    value_init: str = knob("", "checkpoint for the value trunk; '' = the initial policy's weights")
    reward_fn: str = knob("", "module:function or file.py:function, (prompts, responses) -> floats; '' = world.score")
    reward_model: str = knob("", "reward model ckpt.pt (train_sft.py on preference pairs), normalised to mean 0, "
                                 "std 1 on its initial model; the built-in verifier is then logged as gold")
    prompts: str = knob("", "JSONL file of training prompts; '' = world.ppo_prompts")
    too_long: str = knob("error", "prompts with no room for max_new_tokens: error (name them) | drop (counted) | "
                                  "truncate (keep the end: oldest turns, then the start of the last, go first)",
                         choices=TOO_LONG)
    world_seed: int = knob(0, "seed of the built-in world (prompts, verifier, eval prompts)")
    seed: int = knob(1337, "seed for sampling, prompt order and minibatch shuffles")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = knob("float32", "float32 | bfloat16 (autocast, CUDA only)", choices=("float32", "bfloat16"))
    compile: bool = knob(True, "torch.compile the update's forward passes (CUDA only; sampling stays eager)")
    # rollout
    batch_size: int = knob(64, "responses per iteration, global over all ranks (batch_size/group_size prompts)",
                           ge=1)
    group_size: int = knob(1, "responses sampled per prompt in one batch (grpo and rloo need >= 2)", ge=1)
    max_new_tokens: int = knob(16, "response length limit; longer responses are cut and count as not ended", ge=1)
    temperature: float = knob(1.0, "sampling temperature; log-probs and KL are computed at the same temperature", gt=0)
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of responses that never emitted eot")
    # PPO
    advantage: str = knob("gae", "gae (value model) | grpo | rloo (critic-free group baselines)",
                          choices=("gae", "grpo", "rloo"))
    max_iters: int = knob(200, "PPO iterations (rollout + update)", ge=0)
    max_minutes: float = knob(5.0, "also stop (eval + save) after this many minutes of this run; 0 = no limit", ge=0)
    # 2 x 2 updates per batch: on the ~1M model each update already moves approx_kl by ~0.005 at lr 1e-4,
    # and learning is ~70% of an iteration's time on CPU; 4 x 4 at 3e-5 learned slower per minute
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
    whiten_rewards: bool = knob(False, "whiten per-token rewards (no mean shift) before GAE (gae only)")
    # KL penalty
    kl_coef: float = knob(0.05, "initial KL penalty coefficient beta", ge=0)
    # k1 by default: both optimise the same objective (tests/test_kl_objective.py), but from the built-in base, where
    # most batches hold no correct answer, PPO with the exact KL's direct part in the loss did not leave the base in
    # 200 iterations on 3 of 3 seeds (nanopost/THESIS.md); why is not settled yet
    kl_estimator: str = knob("k1", "per-token KL(pi || ref): k1 (all in the reward) | full (exact over the vocab: "
                                   "the prefix part in the reward, the direct part in the loss) | k3 (as full, "
                                   "sampled)", choices=("k1", "full", "k3"))
    adaptive_kl: bool = knob(False, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = knob(1.0, "target KL per response (nats) for the adaptive controller", gt=0)
    kl_horizon: int = knob(10000, "adaptive controller horizon, in responses", ge=1)
    # eval / logging / checkpoints
    eval_interval: int = knob(50, "evaluate every this many iterations; 0 = only at start and end", ge=0)
    eval_prompts: int = knob(54, "held-out prompts per evaluation (of --prompts: a tenth at most); 0 = off", ge=0)
    eval_k: int = knob(4, "samples per eval prompt (more samples, less noise in the before/after score)", ge=1)
    eval_temperature: float = knob(1.0, "sampling temperature of the evaluation (the policy PPO optimises)", gt=0)
    ckpt_interval: int = knob(50, "save out_dir/ckpt.pt every this many iterations (and at the end); 0 = end", ge=0)
    snapshot_steps: str = knob("", "comma-separated iterations at which to also keep out_dir/snap/step_<n>.pt "
                                   "(the policy alone: a training trajectory to evaluate later)")


# a resume may change any other knob (max_iters, learning rates, intervals, coefficients); these define the run
RUN_DEFINING = ("value_init", "reward_fn", "reward_model", "prompts", "world_seed", "seed", "batch_size",
                "max_new_tokens", "temperature", "advantage", "group_size", "too_long")
SHOWN = ("score", "gold", "kl", "kl_full", "kl_coef", "entropy", "approx_kl", "clipfrac", "pg_loss",  # printed
         "v_loss", "explained_var", "resp_len", "ended", "logprob_diff", "tok_per_s")  # every iteration (if logged)

# -----------------------------------------------------------------------------
# the pieces of PPO, as small functions the tests call directly

def masked_mean(x, mask, n=None):
    """Mean of x over mask; `n` overrides the count (data parallel: the global token count).
    torch.where instead of x*mask so that a NaN or inf sitting in a pad slot cannot leak into the sum."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / (mask.sum() if n is None else n)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the real tokens of the global batch (all ranks); pads come out 0. -> (that, 1 / std):
    the scale, for a loss term that must shrink with x. shift_mean=False keeps the mean (N-details: rewards are
    scaled, advantages are centred)."""
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

    rewards, values: (B, N); mask: (B, N) bool, a prefix per row (right padding), so the last real token is
    terminal and V(after it) = 0. Pads may hold anything. Returns (advantages, returns), (B, N), 0 at pads:
    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1} ;  returns = A + V
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
    """GRPO's outcome advantage (Shao et al. 2024, sec. 4.1.2): each response's score standardised within its
    group. scores: (B,), the group_size samples of a prompt adjacent. Returns (B,); a group whose scores are
    all equal (all right or all wrong) gets 0: it says nothing about which response is better.
    eps=1e-4 (as in TRL): keeps a near-constant group finite."""
    g = scores.view(-1, group_size)  # (B/k, k)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)


def rloo_advantages(scores, group_size):
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 6; Kool et al. 2019): each response's score minus the
    mean of the OTHER k-1 scores of its group, = k/(k-1) * (s_i - group mean). scores: (B,), groups adjacent."""
    g = scores.view(-1, group_size)  # (B/k, k)
    return ((g - g.mean(1, keepdim=True)) * group_size / (group_size - 1)).view(-1)


def policy_loss(logp, old_logp, advantages, mask, clip_coef, n=None):
    """Clipped surrogate objective (PPO, Schulman et al. 2017, eq. 7), negated to be minimised.
    All inputs (B, N); `n` = number of real tokens to divide by (global count under data parallel).
    Returns pg_loss and, detached, approx_kl (k3 of the ratio, Schulman 2020 blog), clipfrac, ratio."""
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
    (value clipping from OpenAI baselines' ppo2, as in the lm-human-preferences code N-details reproduces).
    Returns v_loss and the fraction of tokens where the clipped branch was taken (detached)."""
    v_loss_unclipped = (newvalues - returns) ** 2
    v_clipped = old_values + torch.clamp(newvalues - old_values, -clip_coef, clip_coef)
    v_loss_clipped = (v_clipped - returns) ** 2
    v_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask, n)
    with torch.no_grad():
        vf_clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).to(newvalues.dtype), mask, n)
    return v_loss, vf_clipfrac


# The objective is J = E[score] - beta * KL(pi || ref), the KL of whole responses: E_pi[sum_t KL_t], KL_t =
# KL(pi(.|s_t) || ref(.|s_t)) at the states pi visits. Its gradient has two parts (Amini, Vieira & Cotterell 2025,
# "Better Estimation of the KL Divergence Between Language Models", sec. on Rao-Blackwellized gradients):
#   direct  sum_t grad KL_t at each visited state, the state held fixed;
#   prefix  sum_t grad log pi(a_t|s_t) * sum_{t' > t} KL_t': a token is charged the KL of the states it leads to.
# k1 carries both in the reward: at its own token E[grad log pi * (log pi - log ref)] = grad KL_t is the direct
# part. k3 and full put the prefix part in the reward and the direct part in the loss (kl_direct). A k3 or exact
# KL in the reward at its own token would be wrong: E[grad log pi * KL_t] = 0 drops the direct part (full), and
# E[grad k3] = grad KL(ref || pi), the other direction. tests/test_kl_objective.py enumerates every expectation
# on a two-token bandit in float64 and checks each mode's expected gradient against grad J.

def kl_estimate(logp, ref_logp, estimator, full_kl=None):
    """Per-token estimate of KL_t at the sampled states (Schulman 2020, "Approximating KL divergence"):
    k1 = log pi - log ref (unbiased, can be negative); k3 = (r - 1) - log r with r = ref/pi (unbiased, >= 0);
    full = the exact KL over the vocabulary (passed in as full_kl, from kernels.token_kl)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        logr = ref_logp - logp
        return logr.exp() - 1.0 - logr
    assert estimator == "full" and full_kl is not None, f"kl estimator {estimator!r} needs full_kl"
    return full_kl


def kl_rewards(kl, mask, estimator, kl_coef):
    """The KL's per-token rewards (B, N), 0 at pads: -kl_coef * the estimate at its own token (k1), or at the next
    one (k3, full: the prefix part; 0 after the last real token), the direct part then being in the loss."""
    if estimator != "k1":
        kl = torch.cat([torch.where(mask[:, 1:], kl[:, 1:], 0.0), torch.zeros_like(kl[:, :1])], 1)
    return torch.where(mask, -kl_coef * kl, 0.0)


def kl_direct(estimator, newlogp, old_logp, ref_logp, logits, ref_logits, temperature):
    """The direct part of the KL gradient for the loss (B, N): full, the exact KL_t through kernels.token_kl's
    backward (the whole expectation over next tokens, no sampling noise); k3, ratio * k3 with ratio = pi / pi_old,
    whose mean under the rollout's pi_old is KL_t of the current pi, on and off policy. None for k1."""
    if estimator == "full":
        return kernels.token_kl(logits, ref_logits, temperature=temperature)
    if estimator == "k3":
        return (newlogp - old_logp).exp() * kl_estimate(newlogp, ref_logp, "k3")
    return None


def group_advantages(scores, rewards, mask, group_size, advantage):
    """Critic-free advantages (B, N), 0 at pads: the score's advantage from its group on every token of a response
    (grpo_advantages or rloo_advantages), plus each token's KL reward-to-go less the mean KL reward of the other
    responses of its group (a baseline that cannot depend on the token). rewards: kl_rewards (no score)."""
    togo = rewards.flip(1).cumsum(1).flip(1)  # (B, N) sum over t' >= t
    total = togo[:, 0].view(-1, group_size)  # (B/k, k)
    others = ((total.sum(1, keepdim=True) - total) / (group_size - 1)).view(-1)  # (B,)
    score_adv = (grpo_advantages if advantage == "grpo" else rloo_advantages)(scores, group_size)  # (B,)
    return torch.where(mask, score_adv[:, None] + togo - others[:, None], 0.0)


def adaptive_kl_coef(kl_coef, current_kl, target, horizon, n_steps):
    """Ziegler et al. 2019, sec. 2.2: beta <- beta * (1 + K_beta * e), e = clip(KL/target - 1, -0.2, 0.2),
    K_beta = n_steps / horizon. A proportional controller: the clip keeps one noisy batch from swinging beta."""
    proportional_error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + proportional_error * n_steps / horizon)


def main(argv):
    cfg, given = parse_config(Config, argv)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume = cfg.init_from == "resume"
    ckpt = load_checkpoint(ckpt_path if resume else cfg.init_from)
    refuse_reward_model(ckpt, cfg.init_from)
    if resume:
        cfg = resume_config(Config, given, ckpt, ckpt_path, "train_ppo.py", RUN_DEFINING)
    validate(cfg)
    critic = cfg.advantage == "gae"  # grpo and rloo take their baseline from the group: no value model at all
    if not critic and cfg.group_size < 2:
        raise UserError(f"--advantage={cfg.advantage}: needs --group_size >= 2 (a group baseline), got "
                        f"{cfg.group_size}")
    if not critic and cfg.whiten_rewards:
        raise UserError("--whiten_rewards: only for --advantage=gae (a group baseline compares raw scores)")
    snapshots = parse_steps(cfg.snapshot_steps, "snapshot_steps")
    rt = setup_runtime(cfg.device, cfg.dtype)
    local_bs = cfg.batch_size // rt.world_size
    if cfg.batch_size % rt.world_size or local_bs % cfg.num_minibatches or local_bs % cfg.group_size:
        raise UserError(f"--batch_size={cfg.batch_size}: must split evenly over {rt.world_size} rank(s) and then "
                        f"into --num_minibatches={cfg.num_minibatches} and into groups of --group_size="
                        f"{cfg.group_size} (a group stays on one rank)")
    mb_size = local_bs // cfg.num_minibatches
    n_prompts, local_prompts = cfg.batch_size // cfg.group_size, local_bs // cfg.group_size  # per iteration

    # -------------------------------------------------------------------------
    # models: policy (trained), reference (frozen initial policy), value model (trunk + scalar head) for gae
    model_args = dict(ckpt["model_args"], dropout=0.0)  # N-details: dropout would make rollout and update differ
    tok = from_checkpoint(ckpt, ckpt_path if resume else cfg.init_from)
    policy = load_weights(build_model(model_args), ckpt["model"]).to(rt.device)
    ref_policy = load_weights(build_model(model_args), ckpt["ref_model" if resume else "model"]).to(rt.device)
    ref_policy.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the value head init: identical on every rank
    vckpt = (ckpt if resume else load_checkpoint(cfg.value_init) if cfg.value_init else None) if critic else None
    refuse_reward_model(vckpt or {}, cfg.value_init)
    value_model = value_optimizer = value_args = None
    if critic and vckpt and "value_model" in vckpt:  # this run, or a PPO checkpoint: its trained value model whole
        value_args = vckpt["value_model_args"]
        value_model = load_weights(ValueModel(build_model(value_args)), vckpt["value_model"]).to(rt.device)
    elif critic:  # an LM checkpoint (by default the initial policy): its trunk and a fresh head
        value_args = dict((vckpt or ckpt)["model_args"], dropout=0.0)
        value_model = ValueModel(load_weights(build_model(value_args), (vckpt or ckpt)["model"])).to(rt.device)
    models = dict(policy=policy) | (dict(value_model=value_model) if critic else {})  # what is trained
    limits = weight_limits(models)  # how large a weight may grow before a save refuses it
    # dropout is 0, so eval() changes nothing numerically; it is set once and never switched back
    for m in (ref_policy, *models.values()):
        m.eval()
    # the update's forwards (fixed minibatch shapes) compiled; sampling's KV-cache steps and checkpoints stay eager
    compiled = cfg.compile and rt.device_type == "cuda"
    learner, value_learner = (torch.compile(m) if compiled and m is not None else m for m in (policy, value_model))

    # eps=1e-5: cleanrl/baselines PPO value; betas: the default Adam of the N-details reference code
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
    if critic:
        value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=cfg.value_lr, eps=1e-5, weight_decay=0.0)
    optimizers = [(optimizer, "optimizer", cfg.learning_rate)] + (
        [(value_optimizer, "value_optimizer", cfg.value_lr)] if critic else [])

    # -------------------------------------------------------------------------
    # data: prompts checked against the context now, not when a batch happens to draw one
    world = load_world(seed=cfg.world_seed)
    block_size = model_args["block_size"]
    train_prompts = load_prompts(cfg.prompts, world.ppo_prompts, tok, block_size, cfg.max_new_tokens, cfg.too_long)
    if cfg.prompts:  # your prompts: a held-out tail of them (up to a tenth) is what the evaluation scores
        n_train = len(train_prompts) - min(cfg.eval_prompts, len(train_prompts) // 10)
        train_prompts, eval_prompts = train_prompts[:n_train], train_prompts[n_train:]
    else:  # the built-in held-out prompts, spread over every phrasing
        eval_prompts = load_prompts("", spread(world.eval_prompts, cfg.eval_prompts), tok, block_size,
                                    cfg.max_new_tokens)
    if n_prompts > len(train_prompts):
        raise UserError(f"--batch_size={cfg.batch_size}: more than the {len(train_prompts)} training prompts can fill "
                        f"({n_prompts} prompts per iteration at --group_size={cfg.group_size})")
    if cfg.reward_model and cfg.reward_fn:
        raise UserError(f"--reward_model={cfg.reward_model} --reward_fn={cfg.reward_fn}: give one reward, not two")
    reward_fn = load_reward_fn(cfg.reward_fn, world)
    reward_model = load_reward_model(cfg.reward_model, tok, block_size, rt.device) if cfg.reward_model else None
    if reward_model and cfg.prompts:  # your prompts have no verifier: the evaluation scores with the reward model
        reward_fn = reward_model.score_texts

    # RNG streams: prompt order (the same on every rank: they agree on the global batch), shuffles, sampling
    data_gen = torch.Generator().manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1 + rt.rank)
    sample_gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 + rt.rank)
    kl_coef, start = cfg.kl_coef, 0
    if resume:
        if len(ckpt["rank_rng"]) != rt.world_size:
            raise UserError(f"{ckpt_path} was written by {len(ckpt['rank_rng'])} rank(s); resume it with as many "
                            f"(this run has {rt.world_size})")
        for opt, key, lr in optimizers:
            opt.load_state_dict(ckpt[key])
            opt.param_groups[0]["lr"] = lr  # this run's, which may differ from the saved one (printed as changed)
        kl_coef = cfg.kl_coef if "kl_coef" in given else ckpt["kl_coef"]  # the adaptive controller's state
        start = ckpt["step"]
        data_gen.set_state(ckpt["data_rng"])
        shuffle_gen.set_state(ckpt["rank_rng"][rt.rank]["shuffle"])
        sample_gen.set_state(ckpt["rank_rng"][rt.rank]["sample"])
        set_rng_state(ckpt["rng"])
    del ckpt, vckpt

    print0(f"policy {policy.num_params() / 1e6:.2f}M | {cfg.advantage} | {rt.world_size} rank(s) | {local_prompts} "
           f"prompts/rank/iter x {cfg.group_size} samples | {len(train_prompts)} train prompts | "
           f"{len(eval_prompts)} eval prompts | reward {(reward_model or reward_fn).__name__}")
    if rt.master:  # the first write into out_dir: every knob and the data were checked above
        lock_out_dir(cfg.out_dir)
    log = RunLog(os.path.join(cfg.out_dir, "log.jsonl"), resume_step=start if resume else None, master=rt.master)

    def save(step):
        """Everything needed to continue bit-exactly; collective (every rank contributes its RNG state)."""
        check_model_finite(step, ckpt_path, models, limits)  # identical on every rank
        gathered = all_gather(dict(shuffle=shuffle_gen.get_state(), sample=sample_gen.get_state()))
        value = dict(value_model=value_model.state_dict(), value_model_args=value_args,
                     value_optimizer=value_optimizer.state_dict()) if critic else {}
        if rt.master:
            save_checkpoint(ckpt_path, dict(
                model=policy.state_dict(), model_args=model_args, config=asdict(cfg), step=step,
                script="train_ppo.py", **tok.checkpoint_entries(), optimizer=optimizer.state_dict(), **value,
                ref_model=ref_policy.state_dict(), kl_coef=kl_coef,
                rng=get_rng_state(), data_rng=data_gen.get_state(), rank_rng=gathered))

    def evaluate(step):
        """The verifier's metrics on the built-in task, else the mean of your reward on the held-out prompts
        (rank 0; other ranks wait at the barrier)."""
        res = None
        if rt.master and eval_prompts:
            kw = dict(k=cfg.eval_k, temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens, seed=0,
                      device=rt.device)
            with torch.no_grad(), rt.autocast():
                res = (reward_eval(policy, tok, eval_prompts, reward_fn, **kw) if cfg.prompts or cfg.reward_fn
                       else task_eval(policy, tok, world, eval_prompts, **kw))
            print(f"eval {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)
            log.write(dict(kind="eval", step=step, **res))
        barrier()
        return res

    first_eval = log.first("eval") if resume else evaluate(start)  # a resume's log holds its start's eval
    t_start = time.time()  # after the first eval: max_minutes counts training time

    # -------------------------------------------------------------------------
    # training loop
    T, step = cfg.temperature, start
    while step < cfg.max_iters:
        step += 1
        t0 = time.time()

        # --- 1. rollout: the global batch of prompts, this rank's share, each prompt group_size times in a row ---
        global_idx = torch.randperm(len(train_prompts), generator=data_gen)[:n_prompts]
        local_idx = global_idx[rt.rank * local_prompts:(rt.rank + 1) * local_prompts].tolist()
        with torch.no_grad(), rt.autocast():
            ro = rollout(policy, tok, [train_prompts[i] for i in local_idx for _ in range(cfg.group_size)],
                         cfg.max_new_tokens, temperature=T, generator=sample_gen)
        P, b_tokens, b_attn = ro.prompt_len, ro.tokens, ro.mask  # (B, P+N) long, (B, P+N) bool
        b_mask, b_ended = ro.response_mask, ro.ended.to(rt.device)  # (B, N) bool: sampled tokens incl. eot; (B,)
        B, N = b_mask.shape

        # --- 2. score: the reward function, or the reward model with the verifier as gold (built-in prompts) ---
        gold = None
        if reward_model is None:
            raw_scores = score_responses(reward_fn, ro.prompts, ro.responses, ro.ended.tolist())
        else:
            if not cfg.prompts:
                gold = torch.tensor(score_responses(reward_fn, ro.prompts, ro.responses, ro.ended.tolist()),
                                    dtype=torch.float64, device=rt.device)  # (B,)
            with torch.no_grad(), rt.autocast():
                raw_scores = reward_model(b_tokens, b_attn).tolist()  # (B,) one forward, at each last real token
        b_scores = torch.tensor(raw_scores, dtype=torch.float32, device=rt.device)  # (B,)
        b_scores = b_scores - cfg.missing_eos_penalty * (~b_ended).float()

        # --- 3. log-probs of the sampled tokens, recomputed under policy and reference ---
        with torch.no_grad(), rt.autocast():
            (b_logprobs, b_entropy), logits = response_logprobs(policy, b_tokens, b_attn, P, T, return_entropy=True)
            b_ref_logprobs, ref_logits = response_logprobs(ref_policy, b_tokens, b_attn, P, T)
            b_full_kl = kernels.token_kl(logits, ref_logits, temperature=T)  # (B, N) exact KL per position
            b_ref_logits = ref_logits if cfg.kl_estimator == "full" else None  # (B, N, V) for the loss
            if critic:
                b_values = at_response(value_model(b_tokens, attention_mask=b_attn), P).float()  # (B, N) V(s_t)
            del logits, ref_logits
        # sampling and recomputation agree up to kernel noise; a gap means a temperature, position or padding bug
        logprob_diff = torch.where(b_mask, (b_logprobs - ro.logprobs.to(rt.device)).abs(), 0.0).max()

        # --- 4. per-token rewards: the KL's (see kl_rewards), the score on the last real token ---
        b_kl = kl_estimate(b_logprobs, b_ref_logprobs, cfg.kl_estimator, b_full_kl)  # (B, N)
        b_kl_rewards = kl_rewards(b_kl, b_mask, cfg.kl_estimator, kl_coef)  # (B, N)
        last = b_mask.sum(1) - 1  # (B,) index of the last real response token (eot if ended)
        b_rewards = b_kl_rewards.index_put((torch.arange(B, device=rt.device), last), b_scores, accumulate=True)
        kl_scale = 1.0  # the loss's KL term shrinks with the advantages it stands beside
        if cfg.whiten_rewards:
            b_rewards, kl_scale = masked_whiten(b_rewards, b_mask, shift_mean=False)

        # --- 5. advantages: GAE and returns, or from the group of each response, on all its tokens ---
        if critic:
            b_advantages, b_returns = compute_gae(b_rewards, b_values, b_mask, cfg.gamma, cfg.lam)
            b_advantages, scale = masked_whiten(b_advantages, b_mask, shift_mean=True)
            kl_scale *= scale
        else:
            b_advantages = group_advantages(b_scores, b_kl_rewards, b_mask, cfg.group_size, cfg.advantage)
        t_rollout = time.time() - t0

        # --- 6. PPO update: ppo_epochs passes of shuffled minibatches ---
        upd, n_updates = {}, cfg.ppo_epochs * cfg.num_minibatches  # per-minibatch means, summed over both
        for epoch in range(cfg.ppo_epochs):
            b_inds = torch.randperm(B, generator=shuffle_gen)
            for lo in range(0, B, mb_size):
                mb_inds = b_inds[lo:lo + mb_size].to(rt.device)
                mb_mask = b_mask[mb_inds]
                # divide by the global token count of this minibatch, so summed rank gradients equal the
                # gradient of the masked mean over the union (data parallel == one big process)
                n_tok = all_reduce_sum(mb_mask.sum().double()).clamp(min=1.0)
                with rt.autocast():
                    (newlogprob, entropy), new_logits = response_logprobs(learner, b_tokens[mb_inds],
                                                                          b_attn[mb_inds], P, T, return_entropy=True)
                pg_loss, approx_kl, clipfrac, ratio = policy_loss(
                    newlogprob, b_logprobs[mb_inds], b_advantages[mb_inds], mb_mask, cfg.clip_coef, n_tok)
                entropy_bonus = masked_mean(entropy, mb_mask, n_tok)
                loss = pg_loss - cfg.ent_coef * entropy_bonus
                mb = dict(pg_loss=pg_loss, entropy_bonus=entropy_bonus, approx_kl=approx_kl, clipfrac=clipfrac)
                if critic:
                    with rt.autocast():
                        newvalues = at_response(value_learner(b_tokens[mb_inds], attention_mask=b_attn[mb_inds]), P)
                    v_loss, vf_clipfrac = value_loss(newvalues.float(), b_values[mb_inds], b_returns[mb_inds],
                                                     mb_mask, cfg.vf_clip_coef, n_tok)
                    loss = loss + v_loss  # disjoint parameters: one backward serves both models, each its optimizer
                    mb.update(v_loss=v_loss, vf_clipfrac=vf_clipfrac)
                direct = kl_direct(cfg.kl_estimator, newlogprob, b_logprobs[mb_inds], b_ref_logprobs[mb_inds],
                                   new_logits, None if b_ref_logits is None else b_ref_logits[mb_inds], T)
                if direct is not None:  # the direct part of the KL gradient (k3, full)
                    kl_loss = masked_mean(direct, mb_mask, n_tok)
                    loss = loss + kl_scale * kl_coef * kl_loss
                    mb.update(kl_loss=kl_loss)
                for opt, _, _ in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                sync_grads([p for m in models.values() for p in m.parameters()])
                norms = {f"{name}_grad_norm": nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip or math.inf)
                         for name, m in models.items()}
                losses = dict(pg_loss=pg_loss) | (dict(v_loss=v_loss) if critic else {})
                losses = dict(zip(losses, all_reduce_sum(torch.stack(list(losses.values())).detach().double())))
                check_finite(step, ckpt_path, **losses, **norms)  # before the step: the weights are the last good ones
                for opt, _, _ in optimizers:
                    opt.step()
                mb.update(ratio_mean=masked_mean(ratio, mb_mask, n_tok),
                          ratio_sq=masked_mean(ratio * ratio, mb_mask, n_tok))
                upd = {k: upd.get(k, 0.0) + v.detach().double() for k, v in mb.items()}
        for name, m in models.items():
            assert_in_sync(m, step, name)  # data parallel: every rank holds the same weights
        t_learn = time.time() - t0 - t_rollout

        # --- logging: sums over this rank's responses and tokens, summed over ranks once, then divided ---
        per_token = dict(kl=b_logprobs - b_ref_logprobs, kl_full=b_full_kl, kl_penalised=b_kl, entropy=b_entropy)
        if critic:
            err = b_returns - b_values  # (B, N) what the value model missed, for the explained variance
            per_token.update(ret=b_returns, ret_sq=b_returns ** 2, err=err, err_sq=err ** 2)
        sc = torch.tensor(raw_scores, dtype=torch.float64, device=rt.device)  # (B,)
        sums = {k: torch.where(b_mask, v, 0.0).double().sum() for k, v in per_token.items()}
        sums.update(n_resp=sc.new_tensor(B), n_tok=b_mask.double().sum(), score=sc.sum(), score_sq=(sc * sc).sum(),
                    ended=b_ended.double().sum(), **upd, **({} if gold is None else dict(gold=gold.sum())))
        s = dict(zip(sums, all_reduce_sum(torch.stack(list(sums.values()))).tolist()))
        n_resp, n_tok_all, dt = s["n_resp"], s["n_tok"], t_rollout + t_learn
        rec = dict(kind="train", step=step, **{k: s[k] / n_resp for k in ("score", "kl", "kl_full", "kl_penalised")},
                   score_std=math.sqrt(max(s["score_sq"] / n_resp - (s["score"] / n_resp) ** 2, 0.0)),
                   kl_coef=kl_coef, entropy=s["entropy"] / n_tok_all, **{k: s[k] / n_updates for k in mb},
                   resp_len=n_tok_all / n_resp, ended=s["ended"] / n_resp, n_responses=int(n_resp),
                   logprob_diff=all_reduce_max(logprob_diff.double()).item(), tok_per_s=n_tok_all / dt,
                   t_rollout=t_rollout, t_learn=t_learn)
        rec["ratio_var"] = rec.pop("ratio_sq") - rec["ratio_mean"] ** 2
        if critic:
            var_ret, var_err = (s[k + "_sq"] / n_tok_all - (s[k] / n_tok_all) ** 2 for k in ("ret", "err"))
            rec["explained_var"] = (1.0 - var_err / var_ret) if var_ret > 0 else float("nan")
        if gold is not None:  # the verifier next to the reward model's score: where the proxy and the truth part
            rec["gold"] = s["gold"] / n_resp
        print0(f"step {step}/{cfg.max_iters} | " + " | ".join(f"{k} {rec[k]:.4g}" for k in SHOWN if k in rec)
               + f" | {dt:.2f}s (rollout {100 * t_rollout / dt:.0f}%)")
        log.write(rec)

        # adaptive KL: after the iteration, from the KL this batch was penalised with (Ziegler et al. 2019)
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, rec["kl_penalised"], cfg.kl_target, cfg.kl_horizon, int(n_resp))

        # every rank must agree to stop, else one would wait forever in the next collective
        out_of_time = all_reduce_sum(torch.tensor(
            float(cfg.max_minutes > 0 and time.time() - t_start > 60 * cfg.max_minutes), device=rt.device)).item()
        done = step == cfg.max_iters or out_of_time > 0
        if out_of_time and step < cfg.max_iters:
            print0(f"max_minutes={cfg.max_minutes} reached after {step - start} iterations; stopping")
        if cfg.eval_interval > 0 and step % cfg.eval_interval == 0 and not done:
            evaluate(step)
        if done or (cfg.ckpt_interval > 0 and step % cfg.ckpt_interval == 0):
            save(step)
        if step in snapshots and rt.master:
            save_snapshot(cfg.out_dir, step, model=policy.state_dict(), model_args=model_args, config=asdict(cfg),
                          script="train_ppo.py", **tok.checkpoint_entries())
        if done:
            break

    print0(f"trained iterations {start}..{step} in {(time.time() - t_start) / 60:.1f} min (evals excluded)")
    last_eval = evaluate(step) if step > start else first_eval
    if rt.master and first_eval and last_eval:
        print("eval before -> after: " + " | ".join(
            f"{k} {first_eval[k]:.4f} -> {last_eval[k]:.4f}" for k in last_eval if k in first_eval))
    teardown(rt)


if __name__ == "__main__":
    entry(main)
