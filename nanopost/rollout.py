"""
Rollouts: a batch of text prompts in, sampled responses out, in the padded tensor layout that PPO
and the evaluation both use, and the one function that says which model output scores which
response token.

Layout of one rollout of B prompts, P = longest prompt in tokens, N = max_new_tokens:

    tokens  [pad pad <|user|> p r o m p t <|assistant|> | r e s p <|endoftext|> pad pad]
             '------------------ P columns ---------------' '-------- N columns ---------'
"""

from dataclasses import dataclass

import torch

import kernels


@dataclass
class Rollout:
    prompts: list          # B prompt strings
    responses: list        # B decoded responses, without the end token
    tokens: torch.Tensor   # (B, P+N) long
    mask: torch.Tensor     # (B, P+N) bool, real tokens (prompt and response): the attention mask
    response_mask: torch.Tensor  # (B, N) bool, sampled tokens up to and including the end token
    logprobs: torch.Tensor  # (B, N) float32, sampling-time log-probs of the response tokens,
                            # 0 at pads
    ended: torch.Tensor    # (B,) bool, the row sampled the end token before the length limit
    prompt_len: int        # P


def at_response(x, prompt_len):
    """(B, P+N, ...) per-position outputs -> (B, N, ...) the outputs that score the N
    response tokens.

    The output at column t is computed from tokens 0..t and predicts the token at column t+1, so
    response token P+j is scored by column P+j-1: the response window starts one column early and
    drops the last column (which predicts a token that was never sampled). Every logit, log-prob and
    value of a response goes through here; an off-by-one in this slice would train on the wrong
    tokens without any error."""
    return x[:, prompt_len - 1:-1]


def response_logprobs(model, tokens, mask, prompt_len, temperature=1.0, return_entropy=False):
    """Log-probs (and entropy) of the response tokens under `model` at `temperature`, from one
    forward pass. tokens, mask: (B, P+N). Returns logp (B, N) [or (logp, entropy)] and the response
    logits (B, N, V)."""
    logits = at_response(model(tokens, attention_mask=mask), prompt_len)  # (B, N, V)
    resp = tokens[:, prompt_len:]  # (B, N)
    # pads: any in-range id, never counted
    resp = torch.where(mask[:, prompt_len:], resp, torch.zeros_like(resp))
    out = kernels.token_logprobs(logits, resp, temperature=temperature,
                                 return_entropy=return_entropy)
    return out, logits


def rollout(model, tok, prompts, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    tokens, mask, logprobs = model.generate(prompt_ids, max_new_tokens, temperature=temperature,
                                            top_k=top_k, eos_id=tok.eot_id, generator=generator,
                                            pad_id=tok.eot_id)
    P = tokens.size(1) - max_new_tokens
    resp, response_mask = tokens[:, P:], mask[:, P:]                 # (B, N) each
    ended = ((resp == tok.eot_id) & response_mask).any(dim=1)        # (B,)
    responses = []
    for row, real in zip(resp.tolist(), response_mask.tolist()):
        ids = [t for t, r in zip(row, real) if r and t != tok.eot_id]
        responses.append(tok.decode(ids))
    return Rollout(list(prompts), responses, tokens, mask, response_mask, logprobs, ended, P)
