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
    (the max gap to the sampling-time log-probs is logged as lp_diff: it catches position/padding bugs)
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

import importlib
import importlib.util
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import kernels
from nanopost.common import (append_jsonl, build_model, get_rng_state, knob, load_checkpoint, parse_config,
                             print0, resolve_device, save_checkpoint, set_rng_state, setup_ddp)
from nanopost.rollout import rollout
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
    dtype: str = knob("float32", "float32 | bfloat16 (autocast, CUDA only)")
    # rollout
    batch_size: int = knob(64, "prompts per iteration, global over all ranks (one response each)")
    max_new_tokens: int = knob(16, "response length limit; longer responses are cut and count as not ended")
    temperature: float = knob(1.0, "sampling temperature; log-probs and KL are computed at the same temperature")
    missing_eos_penalty: float = knob(0.0, "subtracted from the score of responses that never emitted eot")
    # PPO
    max_iters: int = knob(200, "PPO iterations (rollout + update)")
    max_minutes: float = knob(5.0, "also stop (eval + save) after this many minutes of this run; 0 = no limit")
    # 2 x 2 updates per batch: on the ~1M model each update already moves approx_kl by ~0.005 at lr 1e-4,
    # and learning is ~70% of an iteration's time on CPU; 4 x 4 at 3e-5 learned slower per minute
    ppo_epochs: int = knob(2, "passes over each rollout batch")
    num_minibatches: int = knob(2, "minibatches per pass (per rank rows must divide evenly)")
    learning_rate: float = knob(1e-4, "policy AdamW learning rate (constant)")
    value_lr: float = knob(2e-4, "value model AdamW learning rate (constant)")
    clip_coef: float = knob(0.2, "PPO ratio clip epsilon")
    vf_clip_coef: float = knob(0.2, "value clip range around the rollout-time values")
    ent_coef: float = knob(0.0, "entropy bonus coefficient")
    max_grad_norm: float = knob(1.0, "gradient norm clip, per model")
    gamma: float = knob(1.0, "discount; 1.0 because the episode is a short response with the score at the end")
    lam: float = knob(0.95, "GAE lambda")
    whiten_rewards: bool = knob(False, "whiten per-token rewards (no mean shift) before GAE")
    # KL penalty
    kl_coef: float = knob(0.05, "initial KL penalty coefficient beta")
    kl_estimator: str = knob("k1", "per-token KL: k1 = logp-ref_logp, k3 = (r-1)-log r, full = exact over vocab")
    adaptive_kl: bool = knob(False, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = knob(1.0, "target KL per response (nats) for the adaptive controller")
    kl_horizon: int = knob(10000, "adaptive controller horizon, in responses")
    # eval / logging / checkpoints
    eval_interval: int = knob(50, "evaluate every this many iterations (and at start and end); 0 = start and end")
    eval_prompts: int = knob(54, "held-out prompts (first of world.eval_prompts) per evaluation")
    eval_k: int = knob(4, "samples per eval prompt (more samples, less noise in the before/after score)")
    eval_temperature: float = knob(1.0, "sampling temperature of the evaluation (the policy PPO optimises)")
    ckpt_interval: int = knob(50, "save out_dir/ckpt.pt every this many iterations (and at the end)")


KL_ESTIMATORS = ("k1", "k3", "full")

# -----------------------------------------------------------------------------
# the pieces of PPO, as small functions the tests call directly


def masked_mean(x, mask, n=None):
    """Mean of x over mask; `n` overrides the count (data parallel: the global token count).
    torch.where instead of x*mask so that a NaN or inf sitting in a pad slot cannot leak into the sum."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / (mask.sum() if n is None else n)


def all_reduce_sum(t):
    """Sum a tensor over ranks in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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


def response_logprobs(model, tokens, attn_mask, prompt_len, temperature, return_entropy=False):
    """Log-probs (and entropy) of the response tokens under `model` at `temperature`.
    tokens, attn_mask: (B, P+N) from rollout; the response token at column P+j is predicted by logits[:, P+j-1].
    Returns logp (B, N) [, entropy (B, N)] and the response logits (B, N, V) for the full-vocab KL."""
    P = prompt_len
    logits = model(tokens, attention_mask=attn_mask)[:, P - 1:-1]  # (B, N, V)
    resp = tokens[:, P:]  # (B, N); pad slots hold some pad id, masked later
    resp = torch.where(attn_mask[:, P:], resp, torch.zeros_like(resp))  # any in-range id; never counted
    out = kernels.token_logprobs(logits, resp, temperature=temperature, return_entropy=return_entropy)
    return out, logits


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
# reward functions


def load_reward_fn(spec, world):
    """'' -> the built-in verifier; 'module:function' or 'path/to/file.py:function' -> that callable.
    Every reward fn returned here takes (prompts, responses, ended) and returns a list of floats."""
    if spec == "":
        return lambda prompts, responses, ended: [world.score(p, r, e) for p, r, e in zip(prompts, responses, ended)]
    if ":" not in spec:
        raise ValueError(f"reward_fn={spec!r}: expected 'module:function' or 'file.py:function'")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        if not os.path.exists(mod_name):
            raise ValueError(f"reward_fn={spec!r}: file {mod_name} not found")
        mspec = importlib.util.spec_from_file_location("nanopost_user_reward", mod_name)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward_fn={spec!r}: {mod_name} has no callable {fn_name!r}")
    return lambda prompts, responses, ended: fn(prompts, responses)


def score_responses(reward_fn, prompts, responses, ended, name="reward_fn"):
    """Call reward_fn and check what comes back: a finite float for every response, in order.
    Anything else stops the run with a message that names the prompt at fault."""
    try:
        scores = reward_fn(prompts, responses, ended)
    except Exception as exc:  # a user function may raise anything; re-raise with the prompt named
        # find the first prompt that fails on its own, so the message points at the data, not the batch
        for p, r, e in zip(prompts, responses, ended):
            try:
                reward_fn([p], [r], [e])
            except Exception:
                raise ValueError(f"{name} raised {type(exc).__name__}: {exc} on prompt {p!r} "
                                 f"(response {r!r})") from exc
        raise ValueError(f"{name} raised {type(exc).__name__}: {exc} on a batch starting with prompt "
                         f"{prompts[0]!r} (no single prompt fails alone)") from exc
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must return a list of floats, got {type(scores).__name__} for the batch "
                         f"starting with prompt {prompts[0]!r}: {exc}") from exc
    if len(scores) != len(prompts):
        raise ValueError(f"{name} returned {len(scores)} scores for {len(prompts)} responses "
                         f"(batch starting with prompt {prompts[0]!r})")
    for p, r, s in zip(prompts, responses, scores):
        if not math.isfinite(s):
            raise ValueError(f"{name} returned {s} for prompt {p!r} (response {r!r})")
    return scores


# -----------------------------------------------------------------------------
# data parallel helpers (hand-written gradient all-reduce: two models, one collective each)


def sync_grads(model, world_size):
    """Sum gradients over ranks. The losses are already divided by the *global* token count, so the sum is
    exactly the gradient of the single-process loss on the union of the ranks' minibatches."""
    if world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def assert_in_sync(model, it, what):
    """Invariant: every rank holds the same weights after an update (else the all-reduce is broken)."""
    s = torch.stack([sum(p.detach().double().sum() for p in model.parameters())]).double()
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    assert lo.item() == hi.item(), f"iteration {it}: {what} weights differ across ranks ({lo.item()} vs {hi.item()})"


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(Config, argv=sys.argv[1:] if argv is None else argv)
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={cfg.kl_estimator!r}: expected one of {KL_ESTIMATORS}")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens}: must be >= 1")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature={cfg.temperature}: PPO needs a sampling policy, must be > 0")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={cfg.dtype!r}: expected float32 or bfloat16")

    device = resolve_device(cfg.device)
    ddp = setup_ddp(device)
    rank, world_size = ddp.rank, ddp.world_size
    if ddp.ddp and device.startswith("cuda"):
        device = f"cuda:{ddp.local_rank}"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16)
                if device_type == "cuda" and cfg.dtype == "bfloat16" else nullcontext())
    if cfg.batch_size % world_size != 0:
        raise ValueError(f"batch_size={cfg.batch_size} must divide evenly over {world_size} ranks")
    local_bs = cfg.batch_size // world_size
    if local_bs % cfg.num_minibatches != 0:
        raise ValueError(f"batch_size/world_size={local_bs} must be a multiple of num_minibatches="
                         f"{cfg.num_minibatches}")
    mb_size = local_bs // cfg.num_minibatches
    if ddp.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    ckpt_out = os.path.join(cfg.out_dir, "ckpt.pt")

    # -------------------------------------------------------------------------
    # models: policy (trained), reference (frozen initial policy), value model (trunk + scalar head)
    resume = cfg.init_from == "resume"
    ckpt = load_checkpoint(ckpt_out if resume else cfg.init_from)
    model_args = dict(ckpt["model_args"])
    model_args["dropout"] = 0.0  # N-details: dropout would make rollout and update log-probs differ
    tok = get_tokenizer(ckpt.get("tokenizer", "nanopost"))

    def load_lm(state_dict, args=model_args):
        m = build_model(args)
        # a torch.compile'd model saves its keys under "_orig_mod."; strip it so any checkpoint loads
        m.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()})
        return m.to(device)

    policy = load_lm(ckpt["model"])
    ref_policy = load_lm(ckpt["ref_model"] if resume else ckpt["model"])
    ref_policy.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the value head init: identical on every rank
    value_args = model_args
    if resume:
        value_args = ckpt["value_model_args"]
        value_model = ValueModel(build_model(value_args)).to(device)
        value_model.load_state_dict(ckpt["value_model"])
    elif cfg.value_init:
        vckpt = load_checkpoint(cfg.value_init)
        if "value_model" in vckpt:  # a PPO checkpoint: take its trained value model whole
            value_args = vckpt["value_model_args"]
            value_model = ValueModel(build_model(value_args)).to(device)
            value_model.load_state_dict(vckpt["value_model"])
        else:  # any LM checkpoint (e.g. a reward model or another size): its trunk, a fresh head
            value_args = dict(vckpt["model_args"], dropout=0.0)
            value_model = ValueModel(load_lm(vckpt["model"], value_args)).to(device)
        del vckpt
    else:
        value_model = ValueModel(load_lm(ckpt["model"])).to(device)
    # dropout is 0, so eval() changes nothing numerically; it is set once and never switched back
    policy.eval()
    ref_policy.eval()
    value_model.eval()

    # eps=1e-5: cleanrl/baselines PPO value; betas: the default Adam of the N-details reference code
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
    value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=cfg.value_lr, eps=1e-5, weight_decay=0.0)

    world = load_world(seed=cfg.world_seed)
    if cfg.prompts:
        from nanopost.data import load_ppo_jsonl
        train_prompts = load_ppo_jsonl(cfg.prompts)
    else:
        train_prompts = list(world.ppo_prompts)
    if cfg.batch_size > len(train_prompts):
        raise ValueError(f"batch_size={cfg.batch_size} > {len(train_prompts)} training prompts")
    eval_prompts = list(world.eval_prompts)[:cfg.eval_prompts]
    reward_fn = load_reward_fn(cfg.reward_fn, world)
    reward_name = f"reward_fn={cfg.reward_fn}" if cfg.reward_fn else "reward_fn (world.score)"

    # three RNG streams: prompt order (same on every rank, so ranks agree on the global batch),
    # minibatch shuffles (per rank, CPU) and sampling (per rank, on the model's device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1 + rank)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 + rank)
    kl_coef = cfg.kl_coef
    start_iter = 0
    if resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        value_optimizer.load_state_dict(ckpt["value_optimizer"])
        kl_coef = ckpt["kl_coef"]
        start_iter = ckpt["step"]
        assert len(ckpt["rank_rng"]) == world_size, \
            f"checkpoint was written by {len(ckpt['rank_rng'])} ranks, this run has {world_size}"
        data_gen.set_state(ckpt["data_rng"])
        shuffle_gen.set_state(ckpt["rank_rng"][rank]["shuffle"])
        sample_gen.set_state(ckpt["rank_rng"][rank]["sample"])
        set_rng_state(ckpt["rng"])
    del ckpt

    n_params = sum(p.numel() for p in policy.parameters())
    print0(f"policy {n_params / 1e6:.2f}M params | init_from {cfg.init_from} | {world_size} rank(s) | "
           f"{local_bs} prompts/rank/iter | {len(train_prompts)} train prompts | {len(eval_prompts)} eval prompts")

    def save(it):
        """Everything needed to continue bit-exactly; collective (every rank contributes its RNG state)."""
        rank_rng = dict(shuffle=shuffle_gen.get_state(), sample=sample_gen.get_state())
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, rank_rng)
        else:
            gathered = [rank_rng]
        if ddp.master:
            save_checkpoint(ckpt_out, dict(
                model=policy.state_dict(), model_args=model_args, config=asdict(cfg), step=it,
                tokenizer=tok.name, optimizer=optimizer.state_dict(),
                value_model=value_model.state_dict(), value_model_args=value_args,
                value_optimizer=value_optimizer.state_dict(),
                ref_model=ref_policy.state_dict(), kl_coef=kl_coef, rng=get_rng_state(),
                data_rng=data_gen.get_state(), rank_rng=gathered))

    def run_eval(it):
        """Held-out verifier score of the current policy (rank 0; other ranks wait at the barrier)."""
        if ddp.master:
            from nanopost.evaluate import task_eval
            t0 = time.time()
            with torch.no_grad(), autocast:
                res = task_eval(policy, tok, world, eval_prompts, k=cfg.eval_k, temperature=cfg.eval_temperature,
                                max_new_tokens=cfg.max_new_tokens, seed=0, device=device)
            res = {k: v for k, v in res.items() if isinstance(v, (int, float))}
            print0(f"eval {it} | " + " | ".join(f"{k} {v:.4f}" for k, v in res.items())
                   + f" | {time.time() - t0:.1f}s")
            append_jsonl(log_path, dict(kind="eval", iter=it, **res))
        if world_size > 1:
            dist.barrier()
        return res if ddp.master else None

    first_eval = run_eval(start_iter)
    t_start = time.time()  # after the first eval: max_minutes counts training time

    # -------------------------------------------------------------------------
    # training loop
    T = cfg.temperature
    it = start_iter
    for it in range(start_iter, cfg.max_iters):
        t0 = time.time()

        # --- 1. rollout: the global batch of prompts, this rank's share ---
        global_idx = torch.randperm(len(train_prompts), generator=data_gen)[:cfg.batch_size]
        local_idx = global_idx[rank * local_bs:(rank + 1) * local_bs].tolist()
        batch_prompts = [train_prompts[i] for i in local_idx]
        with torch.no_grad(), autocast:
            ro = rollout(policy, tok, batch_prompts, cfg.max_new_tokens, temperature=T, generator=sample_gen)
        P = ro.prompt_len
        b_tokens, b_attn = ro.tokens, ro.mask  # (B, P+N) long, (B, P+N) bool
        b_mask = ro.response_mask[:, P:]  # (B, N) bool: sampled tokens incl. eot
        b_ended = ro.ended.to(device)  # (B,) bool
        B, N = b_mask.shape

        # --- 2. score ---
        raw_scores = score_responses(reward_fn, ro.prompts, ro.responses, ro.ended.tolist(), name=reward_name)
        b_scores = torch.tensor(raw_scores, dtype=torch.float32, device=device)  # (B,)
        b_scores = b_scores - cfg.missing_eos_penalty * (~b_ended).float()

        # --- 3. log-probs of the sampled tokens, recomputed under policy and reference ---
        with torch.no_grad(), autocast:
            (b_logprobs, b_entropy), logits = response_logprobs(policy, b_tokens, b_attn, P, T, return_entropy=True)
            b_ref_logprobs, ref_logits = response_logprobs(ref_policy, b_tokens, b_attn, P, T)
            b_full_kl = kernels.token_kl(logits, ref_logits, temperature=T)  # (B, N) exact KL per position
            b_values = value_model(b_tokens, attention_mask=b_attn)[:, P - 1:-1].float()  # (B, N) V(s_t)
            del logits, ref_logits
        # sampling and recomputation should agree up to kernel/batching noise; a large gap means a bug in
        # either path (wrong temperature, position ids, or padding)
        logprob_diff = torch.where(b_mask, (b_logprobs - ro.logprobs.to(device)).abs(),
                                   torch.zeros_like(b_logprobs)).max()

        # --- 4. per-token rewards: KL penalty everywhere, score on the last real token ---
        b_kl = kl_penalty(b_logprobs, b_ref_logprobs, cfg.kl_estimator, b_full_kl)  # (B, N)
        b_rewards = torch.where(b_mask, -kl_coef * b_kl, torch.zeros_like(b_kl))
        last = b_mask.sum(1) - 1  # (B,) index of the last real response token (eot if ended)
        b_rewards[torch.arange(B, device=device), last] += b_scores
        if cfg.whiten_rewards:
            b_rewards = masked_whiten(b_rewards, b_mask, shift_mean=False)

        # --- 5. advantages (GAE) and returns ---
        b_advantages, b_returns = compute_gae(b_rewards, b_values, b_mask, cfg.gamma, cfg.lam)
        b_advantages = masked_whiten(b_advantages, b_mask, shift_mean=True)
        t_rollout = time.time() - t0

        # --- 6. PPO update: ppo_epochs passes of shuffled minibatches ---
        t1 = time.time()
        stats = torch.zeros(8, dtype=torch.float64, device=device)  # summed over minibatches and ranks
        n_updates = 0
        for epoch in range(cfg.ppo_epochs):
            b_inds = torch.randperm(B, generator=shuffle_gen)
            for start in range(0, B, mb_size):
                mb_inds = b_inds[start:start + mb_size].to(device)
                mb_mask = b_mask[mb_inds]
                # divide by the global token count of this minibatch, so summed rank gradients equal the
                # gradient of the masked mean over the union (data parallel == one big process)
                n_tok = all_reduce_sum(mb_mask.sum().double()).clamp(min=1.0)
                with autocast:
                    (newlogprob, entropy), _ = response_logprobs(policy, b_tokens[mb_inds], b_attn[mb_inds], P, T,
                                                                 return_entropy=True)
                    newvalues = value_model(b_tokens[mb_inds], attention_mask=b_attn[mb_inds])[:, P - 1:-1].float()
                pg_loss, approx_kl, clipfrac, ratio = policy_loss(
                    newlogprob, b_logprobs[mb_inds], b_advantages[mb_inds], mb_mask, cfg.clip_coef, n_tok)
                entropy_loss = masked_mean(entropy, mb_mask, n_tok)
                v_loss, vf_clipfrac = value_loss(newvalues, b_values[mb_inds], b_returns[mb_inds], mb_mask,
                                                 cfg.vf_clip_coef, n_tok)
                # disjoint parameters: one backward serves both models, each with its own optimizer
                loss = pg_loss - cfg.ent_coef * entropy_loss + v_loss

                mb_stats = all_reduce_sum(torch.stack([
                    pg_loss.detach().double(), v_loss.detach().double(), entropy_loss.detach().double(),
                    approx_kl.double(), clipfrac.double(), masked_mean(ratio, mb_mask, n_tok).double(),
                    masked_mean(ratio * ratio, mb_mask, n_tok).double(), vf_clipfrac.double()]))
                if not math.isfinite(mb_stats[0].item() + mb_stats[1].item()):
                    raise RuntimeError(f"iteration {it + 1}: non-finite loss (pg_loss={mb_stats[0].item()}, "
                                       f"v_loss={mb_stats[1].item()}) at epoch {epoch}; lower learning_rate or "
                                       f"check the reward function's scale")
                stats += mb_stats
                n_updates += 1

                optimizer.zero_grad(set_to_none=True)
                value_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                sync_grads(policy, world_size)
                sync_grads(value_model, world_size)
                nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                nn.utils.clip_grad_norm_(value_model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                value_optimizer.step()
        if world_size > 1:
            assert_in_sync(policy, it + 1, "policy")
            assert_in_sync(value_model, it + 1, "value model")
        t_learn = time.time() - t1

        # --- logging: sums over this rank's responses, summed over ranks, then divided ---
        def tok_sum(x):  # (B, N) -> sum over real response tokens
            return torch.where(b_mask, x, torch.zeros_like(x)).double().sum()
        sc = torch.tensor(raw_scores, dtype=torch.float64, device=device)  # (B,)
        err = b_returns - b_values  # (B, N) what the value model missed, for the explained variance
        sums = dict(n_resp=torch.tensor(float(B), dtype=torch.float64, device=device), score=sc.sum(),
                    score_sq=(sc * sc).sum(), kl=tok_sum(b_logprobs - b_ref_logprobs), kl_full=tok_sum(b_full_kl),
                    kl_pen=tok_sum(b_kl), n_tok=b_mask.double().sum(), ended=b_ended.double().sum(),
                    entropy=tok_sum(b_entropy), ret=tok_sum(b_returns), ret_sq=tok_sum(b_returns ** 2),
                    err=tok_sum(err), err_sq=tok_sum(err ** 2))
        sums = dict(zip(sums, all_reduce_sum(torch.stack(list(sums.values()))).tolist()))
        lp_diff = logprob_diff.double().reshape(1)
        if world_size > 1:
            dist.all_reduce(lp_diff, op=dist.ReduceOp.MAX)
        n_resp, n_tok_all = sums["n_resp"], sums["n_tok"]
        score_mean = sums["score"] / n_resp
        score_std = math.sqrt(max(sums["score_sq"] / n_resp - score_mean ** 2, 0.0))
        kl_mean = sums["kl_pen"] / n_resp  # KL per response with the penalised estimator: what the controller sees
        var_ret = sums["ret_sq"] / n_tok_all - (sums["ret"] / n_tok_all) ** 2
        var_err = sums["err_sq"] / n_tok_all - (sums["err"] / n_tok_all) ** 2
        stats = (stats / max(n_updates, 1)).tolist()
        ratio_mean, ratio_var = stats[5], stats[6] - stats[5] ** 2
        dt = t_rollout + t_learn
        rec = dict(
            kind="train", iter=it + 1, score=score_mean, score_std=score_std,
            kl=sums["kl"] / n_resp, kl_full=sums["kl_full"] / n_resp, kl_penalised=kl_mean, kl_coef=kl_coef,
            entropy=sums["entropy"] / n_tok_all, approx_kl=stats[3], clipfrac=stats[4],
            ratio_mean=ratio_mean, ratio_var=ratio_var, pg_loss=stats[0], v_loss=stats[1], vf_clipfrac=stats[7],
            explained_var=(1.0 - var_err / var_ret) if var_ret > 0 else float("nan"),
            resp_len=n_tok_all / n_resp, ended=sums["ended"] / n_resp, n_responses=int(n_resp),
            logprob_diff=lp_diff.item(), tok_per_s=n_tok_all / dt, t_rollout=t_rollout, t_learn=t_learn)

        # adaptive KL: after the iteration, from the KL this batch was penalised with (Ziegler et al. 2019)
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, kl_mean, cfg.kl_target, cfg.kl_horizon, int(n_resp))

        if ddp.master:
            print(f"iter {it + 1}/{cfg.max_iters} | score {score_mean:.3f}±{score_std:.3f} | "
                  f"kl {rec['kl']:.3f} | kl_full {rec['kl_full']:.3f} | kl_coef {rec['kl_coef']:.4f} | "
                  f"ent {rec['entropy']:.3f} | approx_kl {rec['approx_kl']:.4f} | clipfrac {rec['clipfrac']:.3f} | "
                  f"ratio {ratio_mean:.4f}/{ratio_var:.2e} | pg {rec['pg_loss']:.4f} | vf {rec['v_loss']:.4f} | "
                  f"ev {rec['explained_var']:.3f} | len {rec['resp_len']:.1f} | eot {rec['ended']:.2f} | "
                  f"lp_diff {rec['logprob_diff']:.1e} | tok/s {rec['tok_per_s']:.0f} | "
                  f"{dt:.2f}s (rollout {100 * t_rollout / dt:.0f}% / learn {100 * t_learn / dt:.0f}%)", flush=True)
            append_jsonl(log_path, rec)

        # every rank must agree to stop, else one would wait forever in the next collective
        out_of_time = torch.tensor(float(cfg.max_minutes > 0 and time.time() - t_start > 60 * cfg.max_minutes),
                                   device=device)
        if world_size > 1:
            dist.all_reduce(out_of_time, op=dist.ReduceOp.MAX)
        if out_of_time.item() and it + 1 < cfg.max_iters:
            print0(f"max_minutes={cfg.max_minutes} reached after {it + 1 - start_iter} iterations; stopping")
        done = it + 1 == cfg.max_iters or bool(out_of_time.item())
        if cfg.eval_interval > 0 and (it + 1) % cfg.eval_interval == 0 and not done:
            run_eval(it + 1)
        if done or (cfg.ckpt_interval > 0 and (it + 1) % cfg.ckpt_interval == 0):
            save(it + 1)
        if done:
            break

    t_train = time.time() - t_start
    last_eval = run_eval(it + 1) if cfg.max_iters > start_iter else first_eval
    print0(f"trained iterations {start_iter}..{it + 1} in {t_train / 60:.1f} min (evals excluded: the first one)")
    if ddp.master and first_eval is not None and last_eval is not None:
        print("eval before -> after: " + " | ".join(
            f"{k} {first_eval[k]:.4f} -> {last_eval[k]:.4f}" for k in first_eval if k in last_eval))
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
