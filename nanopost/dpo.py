"""
Direct preference optimisation: the policy learns from preference pairs itself, with no reward
model and no sampling in its loop (train_sft.py --objective=dpo on --data=prefs or a pairs file).

DPO (Rafailov et al. 2023, eq. 7) fits the Bradley-Terry model of the pairs with the implicit reward
r(x, y) = beta * log(pi(y|x) / ref(y|x)), the reward under which pi is the optimum of
E[r] - beta * KL(pi || ref). With the log-ratios lr_w, lr_l of the chosen and rejected responses
(sums over response tokens) and h = lr_w - lr_l, per pair:

    dpo   L = -log sigmoid(beta h)
    cDPO  L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (Mitchell 2023: labels
                                                                            flipped with rate eps)
    ipo   L = (h - 1 / (2 beta))^2                                        (Azar et al. 2023)

ref is the frozen starting model; its log-probs carry no gradient. The log-probs go through
kernels.token_logprobs after nanopost.rollout.at_response, the slice and kernel PPO uses.
Held-out metrics: nanopost.evaluate.dpo_metrics.
"""

import torch
import torch.nn.functional as F

import kernels
from nanopost.rollout import at_response


def pair_logprobs(model, X, R):
    """log pi(y|x) of every side of a pair batch, summed over its response tokens -> (B, 2) fp32.

    X (B, 2, T) right-padded pairs, R (B, 2, T) their response tokens. The rows need no attention
    mask: a causal model's real tokens never attend to the pads after them. Prompts differ in length
    from pair to pair, so the window at_response scores is every token after the first
    (prompt_len=1), and R picks the responses in it."""
    tokens = X.flatten(0, 1)                                          # (2B, T)
    logits = at_response(model(tokens), 1)                            # (2B, T-1, V)
    logp = kernels.token_logprobs(logits, tokens[:, 1:])              # (2B, T-1)
    return (logp * R.flatten(0, 1)[:, 1:]).sum(-1).view(X.size(0), 2)  # (B, 2)


def dpo_loss(logratio_chosen, logratio_rejected, beta, label_smoothing=0.0, ipo=False):
    """The per-pair loss of the module docstring, from the log-ratios log pi/ref of each side (B,)
    -> (B,). Gradient in h: dpo -beta * ((1 - eps) sigmoid(-beta h) - eps sigmoid(beta h)), which
    shrinks as the pair is ranked right (a pair whose labels may be flipped stops pushing at
    h = log((1 - eps) / eps) / beta); ipo 2 (h - 1 / (2 beta)), which pulls h to a fixed margin
    instead of pushing it to infinity."""
    h = logratio_chosen - logratio_rejected
    if ipo:
        return (h - 1 / (2 * beta)) ** 2
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def logratios(model, ref_model, X, R, autocast):
    """log pi/ref of both sides (B, 2), differentiable in model; the reference under no_grad."""
    with autocast():
        logp = pair_logprobs(model, X, R)                             # (B, 2)
        with torch.no_grad():
            ref_logp = pair_logprobs(ref_model, X, R)                 # (B, 2)
    return logp - ref_logp


def dpo_pair_loss(model, X, R, segments, n_loss, autocast, ref_model, beta, label_smoothing, ipo):
    """train_sft.py's micro-batch loss on pairs X (b, 2, T) with response tokens R: the sum of
    dpo_loss over the pairs / n_loss (the step's pair count, all ranks), and the sums it logs: the
    loss, the pairs the implicit reward ranks right, the implicit rewards beta * log pi/ref of
    chosen and rejected."""
    lr = logratios(model, ref_model, X, R, autocast)                  # (b, 2)
    loss_sum = dpo_loss(lr[:, 0], lr[:, 1], beta, label_smoothing, ipo).sum()
    rewards = beta * lr.detach()                                      # (b, 2)
    right = (rewards[:, 0] > rewards[:, 1]).sum().float()
    return loss_sum / n_loss, dict(loss=loss_sum.detach(), acc=right, chosen=rewards[:, 0].sum(),
                                   rejected=rewards[:, 1].sum())
