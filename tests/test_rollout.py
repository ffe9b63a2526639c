"""nanopost.rollout: the padded layout of a rollout, the one response slice (`at_response`) and the log-probs
recomputed from it, which must equal the log-probs sampling drew the tokens with."""

import torch

from nanopost.rollout import at_response, response_logprobs, rollout

PROMPTS = ["Write an addition that equals 12.", "Make 40 by adding two numbers.", "hi"]


def test_at_response_scores_token_p_plus_j_with_column_p_plus_j_minus_1():
    B, P, N = 2, 3, 4
    cols = torch.arange(P + N).expand(B, P + N)  # (B, P+N): each output holds its own column index
    got = at_response(cols[..., None].expand(B, P + N, 5), P)  # (B, N, 5): trailing dims ride along
    assert got.shape == (B, N, 5)
    assert got[0, :, 0].tolist() == [P + j - 1 for j in range(N)]  # the column that predicts token P+j


def test_rollout_layout(tok, tiny_gpt):
    model = tiny_gpt(seed=4, n_layer=2, n_embd=32).eval()
    N = 10
    ro = rollout(model, tok, PROMPTS, N, generator=torch.Generator().manual_seed(0))
    B, P = len(PROMPTS), ro.prompt_len
    assert P == max(len(tok.encode_prompt(p)) for p in PROMPTS)
    assert ro.tokens.shape == ro.mask.shape == (B, P + N)
    assert ro.response_mask.shape == ro.logprobs.shape == (B, N)
    assert torch.equal(ro.response_mask, ro.mask[:, P:])
    for b, p in enumerate(PROMPTS):
        ids = tok.encode_prompt(p)  # left-padded: the prompt ends where the response starts
        assert ro.tokens[b, P - len(ids):P].tolist() == ids and ro.mask[b, :P].sum() == len(ids)
        real = ro.response_mask[b]
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any(), "the response mask is a prefix"
        assert ro.ended[b] == (ro.tokens[b, P + n - 1] == tok.eot_id)
        assert (ro.logprobs[b, n:] == 0).all() and (ro.logprobs[b, :n] < 0).all()
        ids = [t for t in ro.tokens[b, P:P + n].tolist() if t != tok.eot_id]
        assert ro.responses[b] == tok.decode(ids)


def test_logprob_recomputation_matches_sampling(tok, tiny_gpt):
    model = tiny_gpt(seed=4, n_layer=2, n_embd=32).eval()
    for T in (1.0, 0.7):
        ro = rollout(model, tok, PROMPTS, 10, temperature=T, generator=torch.Generator().manual_seed(0))
        P = ro.prompt_len
        with torch.no_grad():
            (logp, ent), logits = response_logprobs(model, ro.tokens, ro.mask, P, T, return_entropy=True)
            full = model(ro.tokens, attention_mask=ro.mask)  # (B, P+N, V)
        m = ro.response_mask  # (B, N)
        assert m.any() and logits.shape == (*m.shape, tok.vocab_size)
        torch.testing.assert_close(logp[m], ro.logprobs[m], atol=1e-5, rtol=1e-5)
        assert (ent[m] > 0).all()
        # by the definition, independently of at_response: token P+j under logits[:, P+j-1] at temperature T
        ref = torch.log_softmax(full[:, P - 1:-1].double() / T, -1).gather(-1, ro.tokens[:, P:, None]).squeeze(-1)
        torch.testing.assert_close(logp[m].double(), ref[m], atol=1e-5, rtol=1e-5)
