"""
Rollouts: a batch of text prompts in, sampled responses out, in the padded tensor layout that PPO and the
evaluation both use, and the one function that says which model output scores which response token; which
prompts a PPO run samples and how its batch splits over ranks, groups and minibatches.

Layout of one rollout of B prompts, P = longest prompt in tokens, N = max_new_tokens:

    tokens  [pad pad <|user|> p r o m p t <|assistant|> | r e s p <|endoftext|> pad pad]
             '------------------ P columns ---------------' '-------- N columns ---------'
"""

from dataclasses import dataclass

import torch

import kernels
from nanopost.config import UserError
from nanopost.data import load_prompts


@dataclass
class Rollout:
    prompts: list          # B prompt strings
    responses: list        # B decoded responses, without the end token
    tokens: torch.Tensor   # (B, P+N) long
    mask: torch.Tensor     # (B, P+N) bool, real tokens (prompt and response): the attention mask
    response_mask: torch.Tensor  # (B, N) bool, sampled tokens up to and including the end token
    logprobs: torch.Tensor  # (B, N) float32, sampling-time log-probs of the response tokens, 0 at pads
    ended: torch.Tensor    # (B,) bool, the row sampled the end token before the length limit
    prompt_len: int        # P

    @property
    def response_tokens(self):
        return self.tokens[:, self.prompt_len:]  # (B, N)


def at_response(x, prompt_len):
    """(B, P+N, ...) per-position outputs -> (B, N, ...) the outputs that score the N response tokens.

    The output at column t is computed from tokens 0..t and predicts the token at column t+1, so response token
    P+j is scored by column P+j-1: the response window starts one column early and drops the last column
    (which predicts a token that was never sampled). Every logit, log-prob and value of a response goes through
    here; an off-by-one in this slice would train on the wrong tokens without any error."""
    return x[:, prompt_len - 1:-1]


def response_logprobs(model, tokens, mask, prompt_len, temperature=1.0, return_entropy=False):
    """Log-probs (and entropy) of the response tokens under `model` at `temperature`, from one forward pass.
    tokens, mask: (B, P+N). Returns logp (B, N) [or (logp, entropy)] and the response logits (B, N, V)."""
    logits = at_response(model(tokens, attention_mask=mask), prompt_len)  # (B, N, V)
    resp = tokens[:, prompt_len:]  # (B, N)
    resp = torch.where(mask[:, prompt_len:], resp, torch.zeros_like(resp))  # pads: any in-range id, never counted
    out = kernels.token_logprobs(logits, resp, temperature=temperature, return_entropy=return_entropy)
    return out, logits


def rollout(model, tok, prompts, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    tokens, mask, logprobs = model.generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                            eos_id=tok.eot_id, generator=generator, pad_id=tok.eot_id)
    P = tokens.size(1) - max_new_tokens
    resp, response_mask = tokens[:, P:], mask[:, P:]                 # (B, N) each
    ended = ((resp == tok.eot_id) & response_mask).any(dim=1)        # (B,)
    responses = []
    for row, real in zip(resp.tolist(), response_mask.tolist()):
        ids = [t for t, r in zip(row, real) if r and t != tok.eot_id]
        responses.append(tok.decode(ids))
    return Rollout(list(prompts), responses, tokens, mask, response_mask, logprobs, ended, P)


def train_eval_prompts(path, builtin, builtin_eval, n_eval, tok, block_size, max_new_tokens, too_long):
    """-> (the prompts PPO samples, the held-out prompts its evaluation scores), each checked against the
    context now, not when a batch happens to draw one: from your file, its held-out tail (n_eval, a tenth at
    most); else the built-in lists."""
    train = load_prompts(path, builtin, tok, block_size, max_new_tokens, too_long)
    if not path:
        return train, load_prompts("", builtin_eval, tok, block_size, max_new_tokens)
    n_train = len(train) - min(n_eval, len(train) // 10)
    return train[:n_train], train[n_train:]


def draw_prompts(prompts, n_prompts, local_prompts, group_size, rank, generator):
    """An iteration's prompts: n_prompts drawn without replacement (the same draw on every rank: `generator` is
    shared), this rank's share of local_prompts, each repeated group_size times in a row (a group)."""
    global_idx = torch.randperm(len(prompts), generator=generator)[:n_prompts]
    local_idx = global_idx[rank * local_prompts:(rank + 1) * local_prompts].tolist()
    return [prompts[i] for i in local_idx for _ in range(group_size)]


def check_groups(advantage, group_size, whiten_rewards):
    """The knobs a critic-free run (--advantage=grpo|rloo, a group baseline) cannot use, each a one-line error."""
    if advantage != "gae" and group_size < 2:
        raise UserError(f"--advantage={advantage}: needs --group_size >= 2 (a group baseline), got {group_size}")
    if advantage != "gae" and whiten_rewards:
        raise UserError("--whiten_rewards: only for --advantage=gae (a group baseline compares raw scores)")


def split_batch(batch_size, group_size, num_minibatches, world_size):
    """A global batch of batch_size responses in groups of group_size samples of one prompt, over ranks
    (a group stays on one rank) -> (prompts per iteration, prompts per rank, rows per minibatch)."""
    local_bs = batch_size // world_size
    if batch_size % world_size or local_bs % num_minibatches or local_bs % group_size:
        raise UserError(f"--batch_size={batch_size}: must split evenly over {world_size} rank(s) and then "
                        f"into --num_minibatches={num_minibatches} and into groups of --group_size="
                        f"{group_size} (a group stays on one rank)")
    return batch_size // group_size, local_bs // group_size, local_bs // num_minibatches


def check_fill(n_prompts, n_train, batch_size, group_size):
    """An iteration draws n_prompts distinct prompts: the training prompts must hold that many."""
    if n_prompts > n_train:
        raise UserError(f"--batch_size={batch_size}: more than the {n_train} training prompts can fill "
                        f"({n_prompts} prompts per iteration at --group_size={group_size})")
