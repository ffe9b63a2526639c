"""
PPO with a value model, a frozen reference and a per-token KL penalty, for the tiny nanopost GPT.

The whole algorithm is one loop in main(), read top to bottom like cleanrl's ppo.py:
  1. rollout   sample one response per prompt from the policy (KV cache, per-row stop at eot)
  2. score     reward_fn(prompts, responses) -> one float per response (default: the built-in verifier)
  3. logprobs  recompute log pi(a_t|s_t) of the sampled tokens under the policy and the frozen reference
  4. rewards   r_t = -kl_coef * KL_t on every response token, + score on the last real token (Ziegler et al. 2019)
  5. GAE       advantages over response tokens, whitened over real tokens (Schulman et al. 2016)
  6. update    ppo_epochs passes of shuffled minibatches: clipped ratio objective, clipped value loss,
               entropy bonus, gradient clipping; pad tokens never contribute (Schulman et al. 2017)

Run (from an SFT or a base checkpoint; CPU works, ~1M-param default model; stops after max_iters=200 or
max_minutes=5 of training, whichever comes first, then evaluates and saves out_dir/ckpt.pt):
    python train_ppo.py --init_from=out/sft/ckpt.pt --out_dir=out/ppo_sft
    python train_ppo.py --init_from=out/base/ckpt.pt --out_dir=out/ppo_base
    python train_ppo.py --init_from=resume --out_dir=out/ppo_sft --max_iters=400      # continue exactly
    torchrun --standalone --nproc_per_node=2 train_ppo.py --init_from=out/sft/ckpt.pt  # data parallel
    python train_ppo.py --help                                                         # every knob
A custom reward: --reward_fn=my_module:score or --reward_fn=path/to/file.py:score, where
score(prompts: list[str], responses: list[str]) -> list[float]; custom prompts: --prompts=file.jsonl.

The details that make PPO work on language models follow Huang et al. 2024, "The N Implementation Details
of RLHF with PPO" (the lm-human-preferences recipe of Ziegler et al. 2019):
  - the frozen reference is the initial policy; the KL penalty is per token, the score sits on the last token
  - log-probs are recomputed with a forward pass at the sampling temperature, never taken from sampling
    (the max gap to the sampling-time log-probs is logged as logprob_diff: it catches position/padding bugs)
  - the value model is a separate GPT trunk initialised from the policy (or value_init) with a scalar head
  - advantages are whitened (shift mean), rewards optionally whitened (no mean shift)
  - dropout is forced to 0 so the log-probs of the rollout and of the update come from the same function

Data parallel: each rank samples its share of the global batch of prompts; whitening statistics, logged
aggregates and every minibatch loss's token count are summed over ranks, and gradients are summed by hand, so
an update is the update of one process holding the union of the ranks' minibatches. The samples themselves
differ from a 1-process run (each rank has its own sampling RNG), so runs are equal in distribution, not bitwise.

Deliberate deviations:
  - separate optimizers for policy and value model, so there is no vf_coef: with Adam the scale of an
    independent loss does not change the update (only gradient clipping sees it, and each model clips its own)
  - the value head starts at zero instead of N(0, 1/sqrt(C+1)): see ValueModel
  - a response that hits max_new_tokens is scored as it is and treated as terminal (no bootstrap from V at the
    cut); missing_eos_penalty is subtracted from its score instead of replacing the score (N-details uses -1)
  - constant learning rate (no annealing) so a resumed run is the same run whatever max_iters says
  - one response per prompt per iteration; prompts are drawn without replacement within an iteration
  - in data parallel, rank 0 alone runs the evaluation; other ranks wait
"""

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import kernels
from nanopost.common import (RunLog, UserError, all_reduce_sum, assert_in_sync, build_model, check_finite,
                             check_model_finite, entry, get_rng_state, knob, load_checkpoint, load_weights,
                             lock_out_dir, parse_config, print0, resume_config, save_checkpoint, set_rng_state,
                             setup_runtime, sync_grads, teardown, validate)
from nanopost.data import check_fit, load_ppo_jsonl
from nanopost.evaluate import spread, task_eval
from nanopost.reward import load_reward_fn, score_responses
from nanopost.rollout import at_response, response_logprobs, rollout
from nanopost.tokenizer import get_tokenizer
from nanopost.world import load_world

# -----------------------------------------------------------------------------
# config: every knob in one place


@dataclass
class Config:
    # I/O
    out_dir: str = knob("out/ppo", "where ckpt.pt and log.jsonl go")
    init_from: str = knob("out/sft/ckpt.pt", "policy checkpoint (SFT or base ckpt.pt), or 'resume' = out_dir/ckpt.pt")
    value_init: str = knob("", "checkpoint for the value trunk; '' = the initial policy's weights")
    reward_fn: str = knob("", "'module:function' (or 'file.py:function') taking (prompts, responses) -> floats; "
                              "'' = the built-in verifier world.score")
    prompts: str = knob("", "JSONL file of training prompts; '' = world.ppo_prompts")
    world_seed: int = knob(0, "seed of the built-in world (prompts, verifier, eval prompts)")
    seed: int = knob(1337, "seed for sampling, prompt order and minibatch shuffles")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = knob("float32", "float32 | bfloat16 (autocast, CUDA only)", choices=("float32", "bfloat16"))
    # rollout
    batch_size: int = knob(64, "prompts per iteration, global over all ranks (one response each)", ge=1)
    max_new_tokens: int = knob(16, "response length limit; longer responses are cut and count as not ended", ge=1)
    temperature: float = knob(1.0, "sampling temperature; log-probs and KL are computed at the same temperature", gt=0)
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of responses that never emitted eot")
    # PPO
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
    gamma: float = knob(1.0, "discount; 1.0 because the episode is a short response with the score at the end",
                        ge=0)
    lam: float = knob(0.95, "GAE lambda", ge=0)
    whiten_rewards: bool = knob(False, "whiten per-token rewards (no mean shift) before GAE")
    # KL penalty
    kl_coef: float = knob(0.05, "initial KL penalty coefficient beta", ge=0)
    kl_estimator: str = knob("k1", "per-token KL: k1 = logp-ref_logp, k3 = (r-1)-log r, full = exact over vocab",
                             choices=("k1", "k3", "full"))
    adaptive_kl: bool = knob(False, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = knob(1.0, "target KL per response (nats) for the adaptive controller", gt=0)
    kl_horizon: int = knob(10000, "adaptive controller horizon, in responses", ge=1)
    # eval / logging / checkpoints
    eval_interval: int = knob(50, "evaluate every this many iterations; 0 = only at start and end", ge=0)
    eval_prompts: int = knob(54, "held-out prompts (spread over all phrasings) per evaluation; 0 = off", ge=0)
    eval_k: int = knob(4, "samples per eval prompt (more samples, less noise in the before/after score)", ge=1)
    eval_temperature: float = knob(1.0, "sampling temperature of the evaluation (the policy PPO optimises)", gt=0)
    ckpt_interval: int = knob(50, "save out_dir/ckpt.pt every this many iterations (and at the end); 0 = end", ge=0)


# a resume may change any other knob (max_iters, learning rates, intervals, coefficients); these define the run
RUN_DEFINING = ("value_init", "reward_fn", "prompts", "world_seed", "seed", "batch_size", "max_new_tokens",
                "temperature")
# printed every iteration (log.jsonl has every statistic)
SHOWN = ("score", "kl", "kl_full", "kl_coef", "entropy", "approx_kl", "clipfrac", "pg_loss", "v_loss",
         "explained_var", "resp_len", "ended", "logprob_diff", "tok_per_s")

# -----------------------------------------------------------------------------
# the pieces of PPO, as small functions the tests call directly


def masked_mean(x, mask, n=None):
    """Mean of x over mask; `n` overrides the count (data parallel: the global token count).
    torch.where instead of x*mask so that a NaN or inf sitting in a pad slot cannot leak into the sum."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / (mask.sum() if n is None else n)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the real tokens of the global batch (all ranks); pads come out 0.
    shift_mean=False keeps the mean (N-details: rewards are scaled, advantages are centred)."""
    xm = torch.where(mask, x, torch.zeros_like(x)).double()
    stats = all_reduce_sum(torch.stack([xm.sum(), (xm * xm).sum(), mask.sum().double()]))
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean * mean).clamp(min=0.0)
    var = var * stats[2] / (stats[2] - 1).clamp(min=1.0)  # unbiased, as torch.var
    out = (x.double() - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out.to(x.dtype), torch.zeros_like(x))


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over the response tokens (Schulman et al. 2016).

    rewards, values: (B, N) float; mask: (B, N) bool, True on real response tokens. The mask of each row must
    be a prefix (right padding): the last real token is terminal, so V(after it) = 0. Pads may hold anything.
    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1} ;  returns = A + V
    Returns (advantages, returns), both (B, N) and 0 at pads.
    """
    maskf = mask.to(values.dtype)
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    B, N = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, N)
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(N)):
        if t + 1 < N:
            nextvalues, nextnonterminal = values[:, t + 1], maskf[:, t + 1]
        else:
            nextvalues, nextnonterminal = torch.zeros_like(lastgaelam), torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues * nextnonterminal - values[:, t]
        lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * maskf
    returns = advantages + values
    return advantages, returns


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


def kl_penalty(logp, ref_logp, estimator, full_kl=None):
    """Per-token KL(pi || ref) estimate on the sampled tokens (Schulman 2020, "Approximating KL divergence").
    k1 = log pi - log ref (unbiased, can be negative); k3 = (r - 1) - log r with r = ref/pi (unbiased, >= 0);
    full = the exact KL over the vocabulary at that position (passed in as full_kl)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        logr = ref_logp - logp
        return logr.exp() - 1.0 - logr
    assert estimator == "full" and full_kl is not None, f"kl estimator {estimator!r} needs full_kl"
    return full_kl


def adaptive_kl_coef(kl_coef, current_kl, target, horizon, n_steps):
    """Ziegler et al. 2019, sec. 2.2: beta <- beta * (1 + K_beta * e), e = clip(KL/target - 1, -0.2, 0.2),
    K_beta = n_steps / horizon. A proportional controller: the clip keeps one noisy batch from swinging beta."""
    proportional_error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + proportional_error * n_steps / horizon)


class ValueModel(nn.Module):
    """V(s_t): a GPT trunk (model.hidden, after the final layer norm) and a scalar head nn.Linear(C, 1)."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        C = trunk.config.n_embd
        self.head = nn.Linear(C, 1)
        # zero init (N-details uses N(0, 1/sqrt(C+1))): a random head makes the first advantages pure value
        # noise, and whitening scales that noise up to unit size; on the tiny model the first update then
        # moved the policy by ~3 nats of KL before any reward was seen. With V = 0 the first advantages
        # are the rewards themselves.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, attention_mask=None):
        h = self.trunk.hidden(idx, attention_mask=attention_mask)  # (B, T, C)
        return self.head(h).squeeze(-1)  # (B, T)



# -----------------------------------------------------------------------------


def main(argv):
    cfg, given = parse_config(Config, argv)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume = cfg.init_from == "resume"
    ckpt = load_checkpoint(ckpt_path if resume else cfg.init_from)
    if resume:
        cfg = resume_config(Config, given, ckpt, ckpt_path, "train_ppo.py", RUN_DEFINING)
    validate(cfg)
    rt = setup_runtime(cfg.device, cfg.dtype)
    local_bs = cfg.batch_size // rt.world_size
    if cfg.batch_size % rt.world_size or local_bs % cfg.num_minibatches:
        raise UserError(f"--batch_size={cfg.batch_size}: must split evenly over {rt.world_size} rank(s) and then "
                        f"into --num_minibatches={cfg.num_minibatches}")
    mb_size = local_bs // cfg.num_minibatches
    if rt.master:
        lock_out_dir(cfg.out_dir)

    # -------------------------------------------------------------------------
    # models: policy (trained), reference (frozen initial policy), value model (trunk + scalar head)
    model_args = dict(ckpt["model_args"], dropout=0.0)  # N-details: dropout would make rollout and update differ
    tok = get_tokenizer(ckpt.get("tokenizer", "nanopost"))

    def lm(state_dict, args=model_args):
        return load_weights(build_model(args), state_dict).to(rt.device)

    policy = lm(ckpt["model"])
    ref_policy = lm(ckpt["ref_model"] if resume else ckpt["model"]).requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the value head init: identical on every rank
    vckpt = ckpt if resume else load_checkpoint(cfg.value_init) if cfg.value_init else None
    if vckpt is not None and "value_model" in vckpt:  # this run, or a PPO checkpoint: its trained value model whole
        value_args = vckpt["value_model_args"]
        value_model = load_weights(ValueModel(build_model(value_args)), vckpt["value_model"]).to(rt.device)
    else:  # any LM checkpoint (e.g. another size): its trunk and a fresh head
        value_args = dict(vckpt["model_args"], dropout=0.0) if vckpt else model_args
        value_model = ValueModel(lm((vckpt or ckpt)["model"], value_args)).to(rt.device)
    # dropout is 0, so eval() changes nothing numerically; it is set once and never switched back
    policy.eval(), ref_policy.eval(), value_model.eval()

    # eps=1e-5: cleanrl/baselines PPO value; betas: the default Adam of the N-details reference code
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
    value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=cfg.value_lr, eps=1e-5, weight_decay=0.0)

    # -------------------------------------------------------------------------
    # data: prompts checked against the context now, not when a batch happens to draw one
    world = load_world(seed=cfg.world_seed)
    block_size = model_args["block_size"]
    if cfg.prompts:
        train_prompts = load_ppo_jsonl(cfg.prompts, tok, block_size - cfg.max_new_tokens)
    else:
        train_prompts = list(world.ppo_prompts)
        check_fit(tok, train_prompts, block_size, cfg.max_new_tokens, "the built-in training prompts")
    if cfg.batch_size > len(train_prompts):
        raise UserError(f"--batch_size={cfg.batch_size}: more than the {len(train_prompts)} training prompts")
    eval_prompts = spread(world.eval_prompts, cfg.eval_prompts)  # every phrasing, not only the first
    if eval_prompts:
        check_fit(tok, eval_prompts, block_size, cfg.max_new_tokens, "the built-in eval prompts")
    reward_fn = load_reward_fn(cfg.reward_fn, world)
    reward_name = f"reward_fn={cfg.reward_fn}" if cfg.reward_fn else "reward_fn (world.score)"

    # three RNG streams: prompt order (same on every rank, so ranks agree on the global batch),
    # minibatch shuffles (per rank, CPU) and sampling (per rank, on the model's device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1 + rt.rank)
    sample_gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 + rt.rank)
    kl_coef, start = cfg.kl_coef, 0
    if resume:
        if len(ckpt["rank_rng"]) != rt.world_size:
            raise UserError(f"{ckpt_path} was written by {len(ckpt['rank_rng'])} rank(s); resume it with as many "
                            f"(this run has {rt.world_size})")
        optimizer.load_state_dict(ckpt["optimizer"])
        value_optimizer.load_state_dict(ckpt["value_optimizer"])
        for opt, lr in ((optimizer, cfg.learning_rate), (value_optimizer, cfg.value_lr)):
            for group in opt.param_groups:
                group["lr"] = lr  # the command line's, which may differ from the saved one (printed as changed)
        kl_coef = cfg.kl_coef if "kl_coef" in given else ckpt["kl_coef"]  # the adaptive controller's state
        start = ckpt["step"]
        data_gen.set_state(ckpt["data_rng"])
        shuffle_gen.set_state(ckpt["rank_rng"][rt.rank]["shuffle"])
        sample_gen.set_state(ckpt["rank_rng"][rt.rank]["sample"])
        set_rng_state(ckpt["rng"])
    del ckpt, vckpt

    n_params = sum(p.numel() for p in policy.parameters())
    print0(f"policy {n_params / 1e6:.2f}M params | init_from {cfg.init_from} | {rt.world_size} rank(s) | "
           f"{local_bs} prompts/rank/iter | {len(train_prompts)} train prompts | {len(eval_prompts)} eval prompts")
    log = RunLog(os.path.join(cfg.out_dir, "log.jsonl"), resume_step=start if resume else None, master=rt.master)

    def save(step):
        """Everything needed to continue bit-exactly; collective (every rank contributes its RNG state)."""
        check_model_finite(step, ckpt_path, policy=policy, value_model=value_model)  # identical on every rank
        gathered = [dict(shuffle=shuffle_gen.get_state(), sample=sample_gen.get_state())]
        if rt.ddp:
            gathered = [None] * rt.world_size
            dist.all_gather_object(gathered, dict(shuffle=shuffle_gen.get_state(), sample=sample_gen.get_state()))
        if rt.master:
            save_checkpoint(ckpt_path, dict(
                model=policy.state_dict(), model_args=model_args, config=asdict(cfg), step=step,
                tokenizer=tok.name, script="train_ppo.py", optimizer=optimizer.state_dict(),
                value_model=value_model.state_dict(), value_model_args=value_args,
                value_optimizer=value_optimizer.state_dict(), ref_model=ref_policy.state_dict(), kl_coef=kl_coef,
                rng=get_rng_state(), data_rng=data_gen.get_state(), rank_rng=gathered))

    def evaluate(step):
        """Held-out verifier score of the current policy (rank 0; other ranks wait at the barrier)."""
        res = None
        if rt.master and eval_prompts:
            t0 = time.time()
            with torch.no_grad(), rt.autocast():
                res = task_eval(policy, tok, world, eval_prompts, k=cfg.eval_k, temperature=cfg.eval_temperature,
                                max_new_tokens=cfg.max_new_tokens, seed=0, device=rt.device)
            res = {k: v for k, v in res.items() if isinstance(v, (int, float))}
            print(f"eval {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in res.items())
                  + f" | {time.time() - t0:.1f}s", flush=True)
            log.write(dict(kind="eval", step=step, **res))
        if rt.ddp:
            dist.barrier()
        return res

    # a resume does not evaluate its starting point again: the log already holds that step's eval
    first_eval = log.first("eval") if resume else evaluate(start)
    t_start = time.time()  # after the first eval: max_minutes counts training time

    # -------------------------------------------------------------------------
    # training loop
    T = cfg.temperature
    step = start
    while step < cfg.max_iters:
        step += 1
        t0 = time.time()

        # --- 1. rollout: the global batch of prompts, this rank's share ---
        global_idx = torch.randperm(len(train_prompts), generator=data_gen)[:cfg.batch_size]
        local_idx = global_idx[rt.rank * local_bs:(rt.rank + 1) * local_bs].tolist()
        with torch.no_grad(), rt.autocast():
            ro = rollout(policy, tok, [train_prompts[i] for i in local_idx], cfg.max_new_tokens, temperature=T,
                         generator=sample_gen)
        P, b_tokens, b_attn = ro.prompt_len, ro.tokens, ro.mask  # (B, P+N) long, (B, P+N) bool
        b_mask, b_ended = ro.response_mask, ro.ended.to(rt.device)  # (B, N) bool: sampled tokens incl. eot; (B,)
        B, N = b_mask.shape

        # --- 2. score ---
        raw_scores = score_responses(reward_fn, ro.prompts, ro.responses, ro.ended.tolist(), name=reward_name)
        b_scores = torch.tensor(raw_scores, dtype=torch.float32, device=rt.device)  # (B,)
        b_scores = b_scores - cfg.missing_eos_penalty * (~b_ended).float()

        # --- 3. log-probs of the sampled tokens, recomputed under policy and reference ---
        with torch.no_grad(), rt.autocast():
            (b_logprobs, b_entropy), logits = response_logprobs(policy, b_tokens, b_attn, P, T, return_entropy=True)
            b_ref_logprobs, ref_logits = response_logprobs(ref_policy, b_tokens, b_attn, P, T)
            b_full_kl = kernels.token_kl(logits, ref_logits, temperature=T)  # (B, N) exact KL per position
            b_values = at_response(value_model(b_tokens, attention_mask=b_attn), P).float()  # (B, N) V(s_t)
            del logits, ref_logits
        # sampling and recomputation should agree up to kernel/batching noise; a large gap means a bug in
        # either path (wrong temperature, position ids, or padding)
        logprob_diff = torch.where(b_mask, (b_logprobs - ro.logprobs.to(rt.device)).abs(), 0.0).max()

        # --- 4. per-token rewards: KL penalty everywhere, score on the last real token ---
        b_kl = kl_penalty(b_logprobs, b_ref_logprobs, cfg.kl_estimator, b_full_kl)  # (B, N)
        b_rewards = torch.where(b_mask, -kl_coef * b_kl, torch.zeros_like(b_kl))
        last = b_mask.sum(1) - 1  # (B,) index of the last real response token (eot if ended)
        b_rewards[torch.arange(B, device=rt.device), last] += b_scores
        if cfg.whiten_rewards:
            b_rewards = masked_whiten(b_rewards, b_mask, shift_mean=False)

        # --- 5. advantages (GAE) and returns ---
        b_advantages, b_returns = compute_gae(b_rewards, b_values, b_mask, cfg.gamma, cfg.lam)
        b_advantages = masked_whiten(b_advantages, b_mask, shift_mean=True)
        t_rollout = time.time() - t0

        # --- 6. PPO update: ppo_epochs passes of shuffled minibatches ---
        t1 = time.time()
        upd = {}  # update statistics: sums over minibatches of per-minibatch means, reduced once below
        n_updates = 0
        for epoch in range(cfg.ppo_epochs):
            b_inds = torch.randperm(B, generator=shuffle_gen)
            for lo in range(0, B, mb_size):
                mb_inds = b_inds[lo:lo + mb_size].to(rt.device)
                mb_mask = b_mask[mb_inds]
                # divide by the global token count of this minibatch, so summed rank gradients equal the
                # gradient of the masked mean over the union (data parallel == one big process)
                n_tok = all_reduce_sum(mb_mask.sum().double()).clamp(min=1.0)
                with rt.autocast():
                    (newlogprob, entropy), _ = response_logprobs(policy, b_tokens[mb_inds], b_attn[mb_inds], P, T,
                                                                 return_entropy=True)
                    newvalues = at_response(value_model(b_tokens[mb_inds], attention_mask=b_attn[mb_inds]), P)
                pg_loss, approx_kl, clipfrac, ratio = policy_loss(
                    newlogprob, b_logprobs[mb_inds], b_advantages[mb_inds], mb_mask, cfg.clip_coef, n_tok)
                entropy_loss = masked_mean(entropy, mb_mask, n_tok)
                v_loss, vf_clipfrac = value_loss(newvalues.float(), b_values[mb_inds], b_returns[mb_inds], mb_mask,
                                                 cfg.vf_clip_coef, n_tok)
                # disjoint parameters: one backward serves both models, each with its own optimizer
                loss = pg_loss - cfg.ent_coef * entropy_loss + v_loss

                optimizer.zero_grad(set_to_none=True)
                value_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                sync_grads(list(policy.parameters()) + list(value_model.parameters()))
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                pg_norm = nn.utils.clip_grad_norm_(policy.parameters(), clip)
                vf_norm = nn.utils.clip_grad_norm_(value_model.parameters(), clip)
                losses = all_reduce_sum(torch.stack([pg_loss.detach(), v_loss.detach()]).double()).tolist()
                check_finite(step, ckpt_path, pg_loss=losses[0], v_loss=losses[1], policy_grad_norm=pg_norm,
                             value_grad_norm=vf_norm)  # before the step: the weights are still the last good ones
                optimizer.step()
                value_optimizer.step()

                mb = dict(pg_loss=pg_loss, v_loss=v_loss, entropy_loss=entropy_loss, approx_kl=approx_kl,
                          clipfrac=clipfrac, vf_clipfrac=vf_clipfrac, ratio_mean=masked_mean(ratio, mb_mask, n_tok),
                          ratio_sq=masked_mean(ratio * ratio, mb_mask, n_tok))
                upd = {k: upd.get(k, 0.0) + v.detach().double() for k, v in mb.items()}
                n_updates += 1
        if rt.ddp:
            assert_in_sync(policy, step, "policy")
            assert_in_sync(value_model, step, "value model")
        t_learn = time.time() - t1

        # --- logging: sums over this rank's responses and tokens, summed over ranks once, then divided ---
        def tok_sum(x):  # (B, N) -> sum over real response tokens
            return torch.where(b_mask, x, torch.zeros_like(x)).double().sum()
        sc = torch.tensor(raw_scores, dtype=torch.float64, device=rt.device)  # (B,)
        err = b_returns - b_values  # (B, N) what the value model missed, for the explained variance
        sums = dict(n_resp=torch.tensor(float(B), dtype=torch.float64, device=rt.device), score=sc.sum(),
                    score_sq=(sc * sc).sum(), kl=tok_sum(b_logprobs - b_ref_logprobs), kl_full=tok_sum(b_full_kl),
                    kl_pen=tok_sum(b_kl), n_tok=b_mask.double().sum(), ended=b_ended.double().sum(),
                    entropy=tok_sum(b_entropy), ret=tok_sum(b_returns), ret_sq=tok_sum(b_returns ** 2),
                    err=tok_sum(err), err_sq=tok_sum(err ** 2), **upd)
        s = dict(zip(sums, all_reduce_sum(torch.stack(list(sums.values()))).tolist()))
        lp_diff = logprob_diff.double().reshape(1)
        if rt.ddp:
            dist.all_reduce(lp_diff, op=dist.ReduceOp.MAX)
        n_resp, n_tok_all = s["n_resp"], s["n_tok"]
        u = {k: s[k] / n_updates for k in upd}  # mean over the iteration's updates
        var_ret = s["ret_sq"] / n_tok_all - (s["ret"] / n_tok_all) ** 2
        var_err = s["err_sq"] / n_tok_all - (s["err"] / n_tok_all) ** 2
        dt = t_rollout + t_learn
        rec = dict(
            kind="train", step=step, score=s["score"] / n_resp,
            score_std=math.sqrt(max(s["score_sq"] / n_resp - (s["score"] / n_resp) ** 2, 0.0)),
            kl=s["kl"] / n_resp, kl_full=s["kl_full"] / n_resp, kl_penalised=s["kl_pen"] / n_resp, kl_coef=kl_coef,
            entropy=s["entropy"] / n_tok_all, approx_kl=u["approx_kl"], clipfrac=u["clipfrac"],
            ratio_mean=u["ratio_mean"], ratio_var=u["ratio_sq"] - u["ratio_mean"] ** 2, pg_loss=u["pg_loss"],
            v_loss=u["v_loss"], vf_clipfrac=u["vf_clipfrac"],
            explained_var=(1.0 - var_err / var_ret) if var_ret > 0 else float("nan"),
            resp_len=n_tok_all / n_resp, ended=s["ended"] / n_resp, n_responses=int(n_resp),
            logprob_diff=lp_diff.item(), tok_per_s=n_tok_all / dt, t_rollout=t_rollout, t_learn=t_learn)
        print0(f"step {step}/{cfg.max_iters} | " + " | ".join(f"{k} {rec[k]:.4g}" for k in SHOWN)
               + f" | {dt:.2f}s (rollout {100 * t_rollout / dt:.0f}%)")
        log.write(rec)

        # adaptive KL: after the iteration, from the KL this batch was penalised with (Ziegler et al. 2019)
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, rec["kl_penalised"], cfg.kl_target, cfg.kl_horizon, int(n_resp))

        # every rank must agree to stop, else one would wait forever in the next collective
        out_of_time = all_reduce_sum(torch.tensor(
            float(cfg.max_minutes > 0 and time.time() - t_start > 60 * cfg.max_minutes), device=rt.device)).item()
        if out_of_time and step < cfg.max_iters:
            print0(f"max_minutes={cfg.max_minutes} reached after {step - start} iterations; stopping")
        done = step == cfg.max_iters or out_of_time > 0
        if cfg.eval_interval > 0 and step % cfg.eval_interval == 0 and not done:
            evaluate(step)
        if done or (cfg.ckpt_interval > 0 and step % cfg.ckpt_interval == 0):
            save(step)
        if done:
            break

    t_train = time.time() - t_start
    last_eval = evaluate(step) if step > start else first_eval
    print0(f"trained iterations {start}..{step} in {t_train / 60:.1f} min (evals excluded: the first one)")
    if rt.master and first_eval and last_eval:
        print("eval before -> after: " + " | ".join(
            f"{k} {first_eval[k]:.4f} -> {last_eval[k]:.4f}" for k in last_eval if k in first_eval))
    teardown(rt)


if __name__ == "__main__":
    entry(main)
