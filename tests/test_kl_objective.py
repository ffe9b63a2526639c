"""
Proof of train_ppo.py's objective, J = E[score] - beta * KL(pi || ref) with the KL of whole responses, for every KL
mode (k1, k3, full) and every advantage (gae, rloo, grpo). On a tabular two-token bandit every expectation is a
finite sum, so the expected gradient of the surrogate the script builds (steps 4 to 6 of its loop, from the same
functions) is computed exactly in float64 and compared with grad J by autograd on the closed form.

Then short training runs on a one-token bandit, from the same functions, end at the optimum of that objective,
pi* ∝ ref * exp(score / beta), for every mode.
"""

import itertools
import math

import pytest
import torch

import kernels
import train_ppo
from train_ppo import masked_mean, masked_whiten

V, BETA = 3, 0.7  # tokens; the KL coefficient
MODES = ["k1", "k3", "full"]


def bandit(seed, n_steps):
    """Random tabular logits of pi and ref: row 0 is the state after the prompt, row 1 + a the state after the
    first token a (two steps). Random scores, one per response, and a value per state (any baseline will do)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(1 + V, V, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.randn(1 + V, V, generator=g, dtype=torch.float64)
    seqs = list(itertools.product(range(V), repeat=n_steps))
    scores = {y: float(s) for y, s in zip(seqs, torch.rand(len(seqs), generator=g, dtype=torch.float64))}
    values = torch.randn(1 + V, generator=g, dtype=torch.float64)
    return theta, ref, seqs, scores, values


def states(y):
    return [0] + [1 + a for a in y[:-1]]  # the row of theta each token is sampled from


def seq_logprob(table, y):
    return sum(torch.log_softmax(table[s], -1)[a] for s, a in zip(states(y), y))


def objective(theta, ref, seqs, scores, beta):
    """J(theta) in closed form: the expected score and the KL of whole responses, summed over every response."""
    logp = torch.stack([seq_logprob(theta, y) for y in seqs])
    ref_logp = torch.stack([seq_logprob(ref, y) for y in seqs])
    p = logp.exp()
    s = torch.tensor([scores[y] for y in seqs], dtype=torch.float64)
    return (p * s).sum() - beta * (p * (logp - ref_logp)).sum()


def surrogate(theta, ref, batch, scores, values, mode, advantage, beta, group_size, wrong=None):
    """The loss train_ppo.py builds for one batch of responses (its loop's steps 4 to 6, first minibatch, on policy).
    `wrong` rebuilds a KL the project must not use, to show the check can fail: "k3_in_reward" and "full_in_reward"
    (the estimate at its own token, no direct part), "loss_only" (the direct part without the prefix part)."""
    rows = [states(y) for y in batch]
    logits = torch.stack([theta[r] for r in rows])  # (B, N, V)
    ref_logits = torch.stack([ref[r] for r in rows])  # (B, N, V)
    tokens = torch.tensor(batch)  # (B, N)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    old_logits = logits.detach()
    old_logp = kernels.token_logprobs(old_logits, tokens)
    ref_logp = kernels.token_logprobs(ref_logits, tokens)
    full_kl = kernels.token_kl(old_logits, ref_logits)
    s = torch.tensor([scores[y] for y in batch], dtype=torch.float64)
    estimator = {"k3_in_reward": "k3", "full_in_reward": "full"}.get(wrong, mode)
    kl = train_ppo.kl_estimate(old_logp, ref_logp, estimator, full_kl)
    kl_rewards = train_ppo.kl_rewards(kl, mask, "k1" if wrong in ("k3_in_reward", "full_in_reward") else mode, beta)
    if wrong == "loss_only":
        kl_rewards = torch.zeros_like(kl_rewards)
    if advantage == "gae":  # lam = 1: returns less a baseline per state, whatever the value model says
        rewards = kl_rewards.clone()
        rewards[:, -1] += s
        adv, _ = train_ppo.compute_gae(rewards, values[torch.tensor(rows)], mask, 1.0, 1.0)
    else:
        adv = train_ppo.group_advantages(s, kl_rewards, mask, group_size, advantage)
    newlogp = kernels.token_logprobs(logits, tokens)
    loss, *_ = train_ppo.policy_loss(newlogp, old_logp, adv, mask, 0.2)
    if wrong not in ("k3_in_reward", "full_in_reward"):
        direct = train_ppo.kl_direct(mode, newlogp, old_logp, ref_logp, logits, ref_logits, 1.0)
        if direct is not None:
            loss = loss + beta * masked_mean(direct, mask)
    return loss


def expected_gradient(theta, ref, seqs, scores, values, mode, advantage, beta, group_size, wrong=None):
    """E[grad surrogate] over every batch the policy can sample: one response (gae), or every ordered group of
    group_size responses (rloo, grpo), each weighted by its probability under the policy."""
    with torch.no_grad():
        p = {y: seq_logprob(theta, y).exp().item() for y in seqs}
    total = torch.zeros_like(theta)
    batches = [(y,) for y in seqs] if advantage == "gae" else itertools.product(seqs, repeat=group_size)
    for batch in batches:
        loss = surrogate(theta, ref, list(batch), scores, values, mode, advantage, beta, group_size, wrong)
        grad, = torch.autograd.grad(loss, theta)
        total += math.prod(p[y] for y in batch) * grad
    return total


@pytest.mark.parametrize("n_steps", [1, 2])
@pytest.mark.parametrize("advantage", ["gae", "rloo", "grpo"])
@pytest.mark.parametrize("mode", MODES)
def test_expected_gradient_is_the_gradient_of_the_objective(mode, advantage, n_steps):
    theta, ref, seqs, scores, values = bandit(seed=n_steps, n_steps=n_steps)
    if advantage == "grpo":  # grpo standardises its scores (a rescaled objective, as documented): the KL part alone
        scores = dict.fromkeys(scores, 0.0)
    want, = torch.autograd.grad(objective(theta, ref, seqs, scores, BETA), theta)
    # the loss is a mean over the batch's tokens, n_steps per response: E[grad loss] = -grad J / n_steps. Groups
    # of 3 one-token responses (27 batches), of 2 two-token ones (81)
    got = -n_steps * expected_gradient(theta, ref, seqs, scores, values, mode, advantage, BETA, 4 - n_steps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert want.abs().max() > 0.05  # a real gradient, not two zeros


@pytest.mark.parametrize("wrong, n_steps", [("k3_in_reward", 1), ("full_in_reward", 1), ("loss_only", 2)])
def test_the_check_catches_a_kl_that_optimises_something_else(wrong, n_steps):
    # what train_ppo.py used to do (k3 or the exact KL in the reward at its own token), and a KL in the loss alone,
    # which is right for one token and misses the prefix part from the second on
    theta, ref, seqs, scores, values = bandit(seed=n_steps, n_steps=n_steps)
    want, = torch.autograd.grad(objective(theta, ref, seqs, scores, BETA), theta)
    got = -n_steps * expected_gradient(theta, ref, seqs, scores, values, "full" if wrong != "k3_in_reward" else "k3",
                                       "gae", BETA, 1, wrong=wrong)
    assert (got - want).abs().max() > 1e-2
    if wrong == "full_in_reward":  # the anchor is gone: exactly the gradient of E[score] alone
        no_kl, = torch.autograd.grad(objective(theta, ref, seqs, scores, 0.0), theta)
        torch.testing.assert_close(got, no_kl, rtol=0, atol=1e-10)
    if wrong == "k3_in_reward":  # it climbs E[s] - beta * (KL(pi || ref) - KL(ref || pi)) (one token)
        p, q = torch.softmax(theta[0], -1), torch.softmax(ref[0], -1)
        reverse, = torch.autograd.grad((q * (q.log() - p.log())).sum(), theta)
        torch.testing.assert_close(got, want + BETA * reverse, rtol=0, atol=1e-10)


def test_whitening_scales_the_losss_kl_term_with_the_advantages():
    # step 5 divides the advantages by their std; the KL's direct part must shrink by the same factor, else the
    # update mixes grad E[s] and grad KL in another ratio than J. masked_whiten returns the factor it applied
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    white, scale = masked_whiten(adv, mask)
    real = adv[mask]
    torch.testing.assert_close(white[mask], (real - real.mean()) * scale)


# -----------------------------------------------------------------------------
# training runs on a one-token bandit: the policy ends at the optimum of J

def optimum(ref_logits, scores, beta):
    """pi* ∝ ref * exp(score / beta): P(reward) and KL(pi* || ref)."""
    logp = torch.log_softmax(ref_logits + scores / beta, -1)
    return logp.exp() @ scores, (logp.exp() * (logp - torch.log_softmax(ref_logits, -1))).sum()


def grpo_optimum(ref_logits, scores, beta, k, eps=1e-4):
    """grpo's fixed point: pi ∝ ref * exp(c * score) where c = (E[A | s=1] - E[A | s=0]) / beta for the
    group-standardised advantage A under that same pi (binary scores; the other k - 1 samples Binomial(k-1, p))."""
    c = 1.0 / beta
    for _ in range(200):
        p = float(torch.softmax(ref_logits + c * scores, -1) @ scores)
        h = {}
        for mine in (0, 1):
            h[mine] = 0.0
            for m in range(k):  # m of the other k - 1 responses were rewarded
                ones = mine + m
                mean = ones / k
                std = math.sqrt(ones * (k - ones) / (k * (k - 1)))
                h[mine] += math.comb(k - 1, m) * p ** m * (1 - p) ** (k - 1 - m) * (mine - mean) / (std + eps)
        c = 0.5 * c + 0.5 * (h[1] - h[0]) / beta
    logp = torch.log_softmax(ref_logits + c * scores, -1)
    return logp.exp() @ scores, (logp.exp() * (logp - torch.log_softmax(ref_logits, -1))).sum()


def train_bandit(mode, advantage, ref_logits, scores, beta, iters=600, batch=64, group_size=4, seed=0):
    """PPO on a one-token bandit with the script's pieces: sample, score, steps 4 to 6 (2 epochs x 2 minibatches),
    Adam. -> the policy's logits, averaged over the last 100 iterations (the noise of one batch averaged out)."""
    g = torch.Generator().manual_seed(seed)
    theta = ref_logits.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.02)
    tail = []
    for it in range(iters):
        with torch.no_grad():  # one prompt: any group_size consecutive samples are a group of it
            a = torch.multinomial(torch.softmax(theta, -1), batch, replacement=True, generator=g)
            logits = theta.detach().expand(batch, 1, -1)
            ref = ref_logits.expand(batch, 1, -1)
            tokens, mask = a[:, None], torch.ones(batch, 1, dtype=torch.bool)
            old_logp, ref_logp = kernels.token_logprobs(logits, tokens), kernels.token_logprobs(ref, tokens)
            kl = train_ppo.kl_estimate(old_logp, ref_logp, mode, kernels.token_kl(logits, ref))
            kl_rewards = train_ppo.kl_rewards(kl, mask, mode, beta)
            s = scores[a]
            kl_scale = 1.0
            if advantage == "gae":  # no value model: lam = 1, the whitening's mean is the baseline
                adv, _ = train_ppo.compute_gae(kl_rewards + s[:, None], torch.zeros(batch, 1), mask, 1.0, 1.0)
                adv, kl_scale = masked_whiten(adv, mask)
            else:
                adv = train_ppo.group_advantages(s, kl_rewards, mask, group_size, advantage)
        for _ in range(2):
            for mb in torch.randperm(batch, generator=g).view(2, -1):
                new_logits = theta.expand(len(mb), 1, -1)
                newlogp = kernels.token_logprobs(new_logits, tokens[mb])
                loss, *_ = train_ppo.policy_loss(newlogp, old_logp[mb], adv[mb], mask[mb], 0.2)
                direct = train_ppo.kl_direct(mode, newlogp, old_logp[mb], ref_logp[mb], new_logits, ref[mb], 1.0)
                if direct is not None:
                    loss = loss + kl_scale * beta * masked_mean(direct, mask[mb])
                opt.zero_grad()
                loss.backward()
                opt.step()
        if it >= iters - 100:
            tail.append(torch.log_softmax(theta.detach(), -1))
    logp = torch.stack(tail).exp().mean(0).log()
    return logp.exp() @ scores, (logp.exp() * (logp - torch.log_softmax(ref_logits, -1))).sum()


@pytest.mark.parametrize("advantage", ["gae", "rloo", "grpo"])
@pytest.mark.parametrize("mode", MODES)
def test_a_bandit_run_ends_at_the_optimum(mode, advantage, reference_kernels):
    # 6 tokens, two of them rewarded and unlikely under ref; beta = 1 puts pi* at P(reward) 0.138 and KL 0.047, far
    # from both ref (0.056) and the reward-only optimum (1.0): the code before the fix ended at P(reward) 0.38 with
    # k3 in the reward (KL 0.99) and at 1.00 with the exact KL there (KL 3.35); every mode here ends within 0.005
    ref_logits = torch.tensor([1.0, 0.5, 0.0, 0.2, -1.5, -1.8])
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    want_p, want_kl = (grpo_optimum(ref_logits, scores, 1.0, 4) if advantage == "grpo"
                       else optimum(ref_logits, scores, 1.0))
    got_p, got_kl = train_bandit(mode, advantage, ref_logits, scores, 1.0)
    assert abs(got_p - want_p) < 0.02 and abs(got_kl - want_kl) < 0.02, (
        f"P(reward) {got_p:.3f} vs {want_p:.3f}, KL {got_kl:.3f} vs {want_kl:.3f}")
