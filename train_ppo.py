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
Every mode climbs J = E[score] - kl_coef * KL(pi || ref) (see kl_rewards): gae when lam = 1, rloo
exactly, grpo with each prompt's score divided by its group's std (Liu et al. 2025, "Dr. GRPO").

    python train_ppo.py --init_from=out/sft/ckpt.pt --out_dir=out/ppo_sft  # or out/base/ckpt.pt
    python train_ppo.py --init_from=resume --out_dir=out/ppo_sft --max_iters=400  # continue exactly
    torchrun --standalone --nproc_per_node=2 train_ppo.py --init_from=out/sft/ckpt.pt
    python train_ppo.py --init_from=out/base/ckpt.pt --advantage=grpo --group_size=8  # no critic
    python train_ppo.py --reward_fn=file.py:score --prompts=p.jsonl  # or --reward_model=rm.pt

Details follow Huang et al. 2024, "The N Implementation Details of RLHF with PPO": the reference is
the initial policy, log-probs are recomputed at the sampling temperature (logprob_diff: the gap),
a separate value trunk, whitened advantages, no dropout. Data parallel: every sum is over ranks, so
an update equals one process holding the union of their batches. Deliberate deviations:
  - separate optimizers for policy and value model, so no vf_coef (with Adam the scale of an
    independent loss does not change the update); the value head starts at zero (ValueModel)
  - a response cut at max_new_tokens is scored as it is and is terminal (no bootstrap from V);
    missing_eos_penalty is subtracted from its score instead of replacing it (N-details: -1)
  - constant learning rate (no annealing), so a resumed run is the same run whatever max_iters says
  - GRPO's loss is a mean over all real tokens, not of per-response means (Shao et al. 2024), as
    Liu et al. 2025 argue; its KL is not Shao et al.'s k3 in the loss (see kl_direct)
"""

import os
import time
from dataclasses import asdict, dataclass

import torch
from torch.optim import AdamW

import kernels
from nanopost import ppo_batch
from nanopost.checkpoint import lock_out_dir, save_snapshot, weight_limits
from nanopost.config import entry, knob, parse_steps
from nanopost.data import TOO_LONG
from nanopost.distributed import (all_reduce_sum, any_rank, assert_in_sync, print0, setup_runtime,
                                  teardown)
from nanopost.evaluate import evaluate_policy
from nanopost.loading import (load_policy_and_reference, load_value_model, open_run, save_run,
                              start_or_resume)
from nanopost.optim import update_models
from nanopost.ppo_log import final_report, log_train, train_record
from nanopost.reward import score_rollout, setup_rewards
from nanopost.rollout import at_response, response_logprobs, rollout
from nanopost.runlog import RunLog
from nanopost.tokenizer import from_checkpoint
from nanopost.world import load_world

# -----------------------------------------------------------------------------
# config: every knob in one place

@dataclass
class Config:
    # I/O
    out_dir: str = knob("out/ppo", "where ckpt.pt and log.jsonl go")
    init_from: str = knob("out/sft/ckpt.pt", "policy ckpt.pt or GPT-2 folder; resume = out_dir's")
    value_init: str = knob("", "checkpoint for the value trunk; '' = the initial policy's weights")
    reward_fn: str = knob("", "module:function or file.py:function -> floats; '' = world.score")
    reward_model: str = knob("", "reward model ckpt.pt (train_sft.py); the verifier is then gold")
    prompts: str = knob("", "JSONL file of training prompts; '' = world.ppo_prompts")
    too_long: str = knob("error", "prompts too long: error | drop | truncate", choices=TOO_LONG)
    world_seed: int = knob(0, "seed of the built-in world (prompts, verifier, eval prompts)")
    seed: int = knob(1337, "seed for sampling, prompt order and minibatch shuffles")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = knob("float32", "or bfloat16 (autocast, CUDA)", choices=("float32", "bfloat16"))
    compile: bool = knob(True, "torch.compile the update's forwards (CUDA only; sampling is eager)")
    # rollout
    batch_size: int = knob(64, "responses per iteration, all ranks (/group_size prompts)", ge=1)
    group_size: int = knob(1, "responses per prompt in a batch (grpo and rloo need >= 2)", ge=1)
    max_new_tokens: int = knob(16, "response length limit; a longer one is cut, not ended", ge=1)
    temperature: float = knob(1.0, "sampling temperature, also of the log-probs and KL", gt=0)
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of a response without eot")
    # PPO (2 epochs x 2 minibatches at lr 1e-4: studies/RESULTS.md, "PPO's defaults")
    advantage: str = knob("gae", "gae (value model) | grpo | rloo", choices=("gae", "grpo", "rloo"))
    max_iters: int = knob(200, "PPO iterations (rollout + update)", ge=0)
    max_minutes: float = knob(5.0, "also stop (eval + save) after this many minutes; 0 = off", ge=0)
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
    whiten_rewards: bool = knob(False, "whiten per-token rewards (no mean shift; gae only)")
    # KL penalty (k1 by default: studies/RESULTS.md, "PPO's defaults")
    kl_coef: float = knob(0.05, "initial KL penalty coefficient beta", ge=0)
    kl_estimator: str = knob("k1", "KL(pi || ref): k1 | full | k3", choices=("k1", "full", "k3"))
    adaptive_kl: bool = knob(False, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = knob(1.0, "target KL per response (nats) for the adaptive controller", gt=0)
    kl_horizon: int = knob(10000, "adaptive controller horizon, in responses", ge=1)
    # eval / logging / checkpoints
    eval_interval: int = knob(50, "evaluate every this many iterations; 0 = start and end", ge=0)
    eval_prompts: int = knob(54, "held-out prompts per eval (of --prompts: a tenth at most)", ge=0)
    eval_k: int = knob(4, "samples per eval prompt", ge=1)
    eval_temperature: float = knob(1.0, "sampling temperature of the evaluation", gt=0)
    ckpt_interval: int = knob(50, "save out_dir/ckpt.pt every this many iterations; 0 = end", ge=0)
    snapshot_steps: str = knob("", "iterations to also keep out_dir/snap/step_<n>.pt (the policy)")

# a resume may change any other knob (max_iters, learning rates, intervals, coefficients)
RUN_DEFINING = ("value_init", "reward_fn", "reward_model", "prompts", "world_seed", "seed",
                "batch_size", "max_new_tokens", "temperature", "advantage", "group_size",
                "too_long")

# -----------------------------------------------------------------------------
# the pieces of PPO, as small functions the tests call directly

def masked_mean(x, mask, n=None):
    """Mean over mask, or sum / n (the global token count); torch.where: a NaN pad cannot leak."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / (mask.sum() if n is None else n)

def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the real tokens of all ranks, pads 0 -> (that, 1 / std, for a loss
    term that must shrink with x). shift_mean=False keeps the mean (N-details: rewards)."""
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
    """GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam
    A_{t+1}, R = A + V. (B, N) each; mask: a prefix per row, V = 0 after it -> (A, R), 0 at pads."""
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
    """GRPO (Shao et al. 2024, sec. 4.1.2): (s - group mean) / (group std + eps); (B,) -> (B,)."""
    g = scores.view(-1, group_size)  # (B/k, k)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)

def rloo_advantages(scores, group_size):
    """RLOO (Ahmadian et al. 2024, eq. 6; Kool et al. 2019): s_i - the mean of the group's other
    k-1 scores = k/(k-1) (s_i - group mean). scores: (B,), groups adjacent -> (B,)."""
    g = scores.view(-1, group_size)  # (B/k, k)
    return ((g - g.mean(1, keepdim=True)) * group_size / (group_size - 1)).view(-1)

def policy_loss(logp, old_logp, advantages, mask, clip_coef, n=None):
    """Clipped surrogate (Schulman et al. 2017, eq. 7), negated; approx_kl: k3 (Schulman 2020)."""
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
    """0.5 max((V - R)^2, (clip(V, V_old +- eps) - R)^2), OpenAI baselines' ppo2 (N-details)."""
    v_loss_unclipped = (newvalues - returns) ** 2
    v_clipped = old_values + torch.clamp(newvalues - old_values, -clip_coef, clip_coef)
    v_loss_clipped = (v_clipped - returns) ** 2
    v_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask, n)
    with torch.no_grad():
        vf_clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).to(newvalues.dtype), mask, n)
    return v_loss, vf_clipfrac

# J's KL is E_pi[sum_t KL_t], KL_t = KL(pi(.|s_t) || ref(.|s_t)), optimum pi* ∝ ref exp(score /
# kl_coef). Its gradient has two parts (Amini, Vieira & Cotterell 2025, Rao-Blackwellized KL):
#   direct  sum_t grad KL_t at each visited state, the state held fixed;
#   prefix  sum_t grad log pi(a_t|s_t) * sum_{t' > t} KL_t': a token is charged the KL it leads to.
# k1 in the reward carries both (E[grad log pi * k1] = grad KL_t). k3 and full put the prefix part
# in the reward and the direct part in the loss (kl_direct): at its own token an exact KL would
# drop it (E[grad log pi * KL_t] = 0) and k3 give grad KL(ref || pi). tests/test_kl_objective.py
# checks each mode's expected gradient against grad J on a bandit.

def kl_estimate(logp, ref_logp, estimator, full_kl=None):
    """KL_t at the sampled states (Schulman 2020, "Approximating KL divergence"): k1 = log pi -
    log ref; k3 = (r - 1) - log r, r = ref/pi (both unbiased, k3 >= 0); full = full_kl, exact."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        logr = ref_logp - logp
        return logr.exp() - 1.0 - logr
    assert estimator == "full" and full_kl is not None, f"kl estimator {estimator!r} needs full_kl"
    return full_kl

def kl_rewards(kl, mask, estimator, kl_coef):
    """The KL rewards (B, N), 0 at pads: -kl_coef * KL_t at its token (k1), the next (k3, full)."""
    if estimator != "k1":
        kl = torch.cat([torch.where(mask[:, 1:], kl[:, 1:], 0.0), torch.zeros_like(kl[:, :1])], 1)
    return torch.where(mask, -kl_coef * kl, 0.0)

def kl_direct(estimator, newlogp, old_logp, ref_logp, logits, ref_logits, temperature):
    """The direct part for the loss (B, N), None for k1: full, the exact KL_t (no sampling noise);
    k3, ratio * k3 with ratio = pi / pi_old, whose mean under pi_old is KL_t of pi."""
    if estimator == "full":
        return kernels.token_kl(logits, ref_logits, temperature=temperature)
    if estimator == "k3":
        return (newlogp - old_logp).exp() * kl_estimate(newlogp, ref_logp, "k3")
    return None

def group_advantages(scores, rewards, mask, group_size, advantage):
    """Critic-free (B, N), 0 at pads: the score's group advantage, plus each token's KL reward-to-go
    (rewards: kl_rewards) less the mean KL reward of the group's other responses."""
    togo = rewards.flip(1).cumsum(1).flip(1)  # (B, N) sum over t' >= t
    total = togo[:, 0].view(-1, group_size)  # (B/k, k)
    others = ((total.sum(1, keepdim=True) - total) / (group_size - 1)).view(-1)  # (B,)
    score_advantage = grpo_advantages if advantage == "grpo" else rloo_advantages
    score_adv = score_advantage(scores, group_size)  # (B,)
    return torch.where(mask, score_adv[:, None] + togo - others[:, None], 0.0)

def adaptive_kl_coef(kl_coef, current_kl, target, horizon, n_steps):
    """Ziegler et al. 2019, sec. 2.2: beta <- beta (1 + n_steps / horizon * e), e = clip(KL/target
    - 1, -0.2, 0.2), a proportional controller; the clip keeps one noisy batch from swinging it."""
    proportional_error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + proportional_error * n_steps / horizon)


def main(argv):
    cfg, given, ckpt, resume, ckpt_path = open_run(Config, argv, "train_ppo.py", RUN_DEFINING)
    ppo_batch.check_groups(cfg.advantage, cfg.group_size, cfg.whiten_rewards)
    critic = cfg.advantage == "gae"  # grpo and rloo take their baseline from the group: no critic
    snapshots = parse_steps(cfg.snapshot_steps, "snapshot_steps")
    rt = setup_runtime(cfg.device, cfg.dtype)
    n_prompts, local_prompts, mb_size = ppo_batch.split_batch(  # per iteration
        cfg.batch_size, cfg.group_size, cfg.num_minibatches, rt.world_size)

    # models: the policy (trained), the reference (the initial policy, frozen), a value model (gae)
    tok = from_checkpoint(ckpt, ckpt_path if resume else cfg.init_from)
    policy, ref_policy, model_args = load_policy_and_reference(ckpt, resume, rt.device)
    torch.manual_seed(cfg.seed)  # the value head init: identical on every rank
    adam = dict(eps=1e-5, weight_decay=0.0)  # eps: cleanrl/baselines PPO; betas: N-details' Adam
    models = dict(policy=policy)  # the trained ones; optimizers: {checkpoint key: AdamW}
    optimizers = dict(optimizer=AdamW(policy.parameters(), lr=cfg.learning_rate, **adam))
    if critic:
        value_model, value_args = load_value_model(ckpt, resume, cfg.value_init, rt.device)
        models.update(value_model=value_model)
        optimizers.update(value_optimizer=AdamW(value_model.parameters(), lr=cfg.value_lr, **adam))
    limits = weight_limits(models)  # how large a weight may grow before a save refuses it
    compiled = cfg.compile and rt.device_type == "cuda"  # the update's forwards; sampling: eager
    policy_update = torch.compile(policy) if compiled else policy
    value_update = torch.compile(value_model) if compiled and critic else models.get("value_model")

    # data: your prompts and a held-out tail of them, or the built-in ones (eval: every phrasing)
    world = load_world(seed=cfg.world_seed)
    block_size = model_args["block_size"]
    train_prompts, eval_prompts = ppo_batch.train_eval_prompts(
        cfg.prompts, world.ppo_prompts, world.eval_prompts,
        cfg.eval_prompts, tok, block_size, cfg.max_new_tokens, cfg.too_long)
    ppo_batch.check_fill(n_prompts, len(train_prompts), cfg.batch_size, cfg.group_size)
    reward_fn, reward_model, eval_with = setup_rewards(
        cfg.reward_fn, cfg.reward_model, cfg.prompts, world, tok, block_size, rt.device)
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
    def evaluate(step):  # rank 0 scores the held-out prompts; the others wait
        return evaluate_policy(step, policy, tok, eval_prompts, world, eval_with, log, rt,
                               cfg.eval_k, cfg.eval_temperature, cfg.max_new_tokens)
    first_eval = log.first("eval") if resume else evaluate(start)  # a resume's log holds it
    t_start = time.time()  # after the first eval: max_minutes counts training time

    # -------------------------------------------------------------------------
    # training loop
    temperature, step = cfg.temperature, start
    done = step >= cfg.max_iters  # a run resumed at max_iters trains no further
    while not done:
        step += 1
        t0 = time.time()

        # --- 1. rollout: the global batch of prompts, this rank's share, each group_size times ---
        prompts = ppo_batch.draw_prompts(train_prompts, n_prompts, local_prompts, cfg.group_size,
                                         rt.rank, streams["data"])
        with torch.no_grad(), rt.autocast():
            samples = rollout(policy, tok, prompts, cfg.max_new_tokens, temperature=temperature,
                              generator=streams["sample"])
        P, b_tokens, b_attn = samples.prompt_len, samples.tokens, samples.mask  # (B, P+N) each
        b_mask = samples.response_mask  # (B, N) bool: the sampled tokens, eot included
        B, N = b_mask.shape

        # --- 2. score: the reward function, or the reward model and the verifier as gold ---
        raw_scores, gold = score_rollout(samples, reward_fn, reward_model, rt, not cfg.prompts)
        b_scores = torch.tensor(raw_scores, dtype=torch.float32, device=rt.device)  # (B,)
        b_scores = b_scores - cfg.missing_eos_penalty * (~samples.ended.to(rt.device)).float()

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
        for epoch in range(cfg.ppo_epochs):
            b_inds = torch.randperm(B, generator=streams["shuffle"])
            for lo in range(0, B, mb_size):
                mb_inds = b_inds[lo:lo + mb_size].to(rt.device)
                mb_tokens, mb_attn, mb_mask = b_tokens[mb_inds], b_attn[mb_inds], b_mask[mb_inds]
                mb_logprobs, mb_ref_logprobs = b_logprobs[mb_inds], b_ref_logprobs[mb_inds]
                n_tok = all_reduce_sum(mb_mask.sum().double()).clamp(min=1.0)  # all ranks' tokens
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
                checked = dict(pg_loss=pg_loss) | (dict(v_loss=v_loss) if critic else {})
                update_models(loss, models, optimizers, cfg.grad_clip, checked, step, ckpt_path)
                mb_stats.update(ratio_mean=masked_mean(ratio, mb_mask, n_tok),
                                ratio_sq=masked_mean(ratio * ratio, mb_mask, n_tok))
                for k, v in mb_stats.items():
                    update_sums[k] = update_sums.get(k, 0.0) + v.detach().double()
        for name, m in models.items():
            assert_in_sync(m, step, name)  # data parallel: every rank holds the same weights
        t_learn = time.time() - t0 - t_rollout

        # --- logging: means over every rank's responses, tokens and minibatch updates ---
        record = train_record(step, kl_coef, samples, raw_scores, gold, update_sums, n_updates,
                              t_rollout, t_learn, b_logprobs, b_ref_logprobs, b_full_kl, b_kl,
                              b_entropy, *((b_returns, b_values) if critic else ()))
        log_train(log, cfg.max_iters, record)
        if cfg.adaptive_kl:  # from the KL this batch was penalised with (Ziegler et al. 2019)
            kl_coef = adaptive_kl_coef(kl_coef, record["kl_penalised"], cfg.kl_target,
                                       cfg.kl_horizon, record["n_responses"])

        out_of_time = cfg.max_minutes > 0 and time.time() - t_start > 60 * cfg.max_minutes
        done = any_rank(out_of_time, rt.device) or step == cfg.max_iters  # all ranks stop together
        if done and step < cfg.max_iters:
            print0(f"max_minutes={cfg.max_minutes} reached after {step - start} iterations; "
                   "stopping")
        if cfg.eval_interval > 0 and step % cfg.eval_interval == 0 and not done:
            evaluate(step)
        if done or (cfg.ckpt_interval > 0 and step % cfg.ckpt_interval == 0):
            value = dict(value_model=value_model, value_model_args=value_args,
                         value_optimizer=optimizers["value_optimizer"]) if critic else {}
            save_run(ckpt_path, models, limits, streams, rt.master, model=policy,
                     model_args=model_args, config=asdict(cfg), step=step, script="train_ppo.py",
                     **tok.checkpoint_entries(), optimizer=optimizers["optimizer"], **value,
                     ref_model=ref_policy, kl_coef=kl_coef)
        if step in snapshots and rt.master:
            save_snapshot(cfg.out_dir, step, model=policy.state_dict(), model_args=model_args,
                          config=asdict(cfg), script="train_ppo.py", **tok.checkpoint_entries())

    final_report(evaluate, start, step, time.time() - t_start, first_eval)
    teardown(rt)


if __name__ == "__main__":
    entry(main)
