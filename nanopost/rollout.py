"""
Rollouts: a batch of text prompts in, sampled responses out, in the padded tensor layout that PPO
and the evaluation both use.

Layout of one rollout of B prompts, P = longest prompt in tokens, N = max_new_tokens:

    tokens  [pad pad <|user|> p r o m p t <|assistant|> | r e s p <|endoftext|> pad pad]
             '------------------ P columns ---------------' '-------- N columns ---------'

Logits at column t predict the token at column t+1, so the response token at column P+j is
scored by logits[:, P+j-1].
"""

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompts: list          # B prompt strings
    responses: list        # B decoded responses, without the end token
    tokens: torch.Tensor   # (B, P+N) long
    mask: torch.Tensor     # (B, P+N) bool, real tokens (prompt and response)
    response_mask: torch.Tensor  # (B, P+N) bool, sampled tokens up to and including the end token
    logprobs: torch.Tensor  # (B, N) float32, sampling-time log-probs of the response tokens, 0 at pads
    ended: torch.Tensor    # (B,) bool, the row sampled the end token before the length limit
    prompt_len: int        # P

    @property
    def response_tokens(self):
        return self.tokens[:, self.prompt_len:]  # (B, N)


def rollout(model, tok, prompts, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    tokens, mask, logprobs = model.generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                            eos_id=tok.eot_id, generator=generator, pad_id=tok.eot_id)
    P = tokens.size(1) - max_new_tokens
    response_mask = mask.clone()
    response_mask[:, :P] = False
    resp = tokens[:, P:]                                               # (B, N)
    ended = ((resp == tok.eot_id) & mask[:, P:]).any(dim=1)            # (B,)
    responses = []
    for row, real in zip(resp.tolist(), mask[:, P:].tolist()):
        ids = [t for t, r in zip(row, real) if r and t != tok.eot_id]
        responses.append(tok.decode(ids))
    return Rollout(list(prompts), responses, tokens, mask, response_mask, logprobs, ended, P)
