"""The GPT: padded batches, the KV cache, sampling."""

import pytest
import torch
import torch.nn.functional as F

from nanopost.model import GPT, GPTConfig, KVCache, rotary_angles, split_rotate


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=32, vocab_size=37, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def left_pad(prompts, pad=0):
    P = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = True
    return idx, mask


def test_rotary_scores_depend_only_on_the_offset():
    # q at position i against k at position j: the same score for (i, j) and (i + s, j + s), but not for another offset
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 8, dtype=torch.float64)  # (B, T, C)

    def score(i, j):
        qi = split_rotate(torch.cat([q, q, q], -1), 1, *(a.double() for a in rotary_angles(torch.tensor([[i]]), 8)))[0]
        kj = split_rotate(torch.cat([k, k, k], -1), 1, *(a.double() for a in rotary_angles(torch.tensor([[j]]), 8)))[1]
        return float((qi * kj).sum())

    assert score(0, 0) == pytest.approx(float((q * k).sum()))  # position 0 is no rotation
    for i, j, s in [(5, 2, 7), (9, 0, 100), (3, 3, 41)]:
        assert score(i + s, j + s) == pytest.approx(score(i, j), rel=1e-5, abs=1e-6)  # angles are float32
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_padding_does_not_change_real_logits(pos_emb):
    model = tiny_model(pos_emb=pos_emb)
    seq = torch.randint(0, 37, (1, 9))
    ref = model(seq)                                       # (1, 9, V) unpadded
    idx, mask = left_pad([seq[0].tolist(), [1, 2, 3]], pad=5)
    out = model(idx, mask)
    torch.testing.assert_close(out[0], ref[0])
    # right padding too: pads after the real tokens change nothing before them
    idx = torch.cat([seq, torch.full((1, 4), 7)], dim=1)
    mask = torch.cat([torch.ones(1, 9, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(idx, mask)[:, :9], ref)
    assert torch.isfinite(model(idx, mask)).all(), "pad rows must not produce NaN"


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_packed_rows_equal_each_example_alone_loss_and_gradients(pos_emb):
    # --packing: examples share rows but attend only within themselves with positions from 0, so every logit, the
    # per-token loss and the gradients equal those of the right-padded batch of the same examples
    from nanopost.data import IGNORE, collate, pack
    model = tiny_model(seed=3, pos_emb=pos_emb).train()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in [13, 4, 9, 1, 6, 11, 3]:
        x = torch.randint(0, 37, (n,), generator=g).tolist()
        y = torch.randint(0, 37, (n,), generator=g).tolist()
        examples.append((x, [IGNORE] * (n // 3) + y[n // 3:]))

    def loss_and_grads(X, Y, segments=None):
        model.zero_grad()
        logits = model(X, segments=segments)
        loss = F.cross_entropy(logits.flatten(0, 1), Y.flatten(), ignore_index=IGNORE, reduction="sum")
        (loss / int((Y != IGNORE).sum())).backward()
        return loss.detach(), logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    X, Y = collate(examples, pad_id=0)
    ref_loss, ref_logits, ref_grads = loss_and_grads(X, Y)
    Xp, Yp, seg = pack(examples, block_size=16, pad_id=0)
    assert len(Xp) < len(X)
    loss, logits, grads = loss_and_grads(Xp, Yp, seg)
    torch.testing.assert_close(loss, ref_loss)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], msg=k)
    # and logit by logit: find each example in the packed rows and compare with its unpacked row
    for i, (x, _) in enumerate(examples):
        r, at = next((r, at) for r in range(len(Xp)) for at in range(Xp.size(1) - len(x) + 1)
                     if Xp[r, at:at + len(x)].tolist() == x and (at == 0 or seg[r, at - 1] != seg[r, at]))
        torch.testing.assert_close(logits[r, at:at + len(x)], ref_logits[i, :len(x)])
    # without the segments the same rows would attend across examples: the check above can fail
    assert not torch.allclose(model(Xp).detach(), logits, atol=1e-4)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_matches_full_recompute(chunk, pos_emb):
    # prefill a left-padded batch, then feed new tokens `chunk` at a time, some rows padded mid-way
    model = tiny_model(seed=1, pos_emb=pos_emb)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 37, (n,), generator=g).tolist() for n in (7, 2, 5)]
    idx, mask = left_pad(prompts)
    new = torch.randint(0, 37, (3, 9), generator=g)
    new_mask = torch.ones(3, 9, dtype=torch.bool)
    new_mask[1, 4:] = False  # row 1 "ended" after 4 new tokens: the rest are pads
    full_idx, full_mask = torch.cat([idx, new], 1), torch.cat([mask, new_mask], 1)
    ref = model(full_idx, full_mask)                          # (B, T, V) recompute everything

    cache = KVCache(model.config, 3, full_idx.size(1))
    P = idx.size(1)
    got = [model(idx, mask, cache)]
    for s in range(0, 9, chunk):
        e = min(s + chunk, 9)
        got.append(model(new[:, s:e], full_mask[:, :P + e], cache))
    got = torch.cat(got, 1)
    real = full_mask
    torch.testing.assert_close(got[real], ref[real])


def test_generate_logprobs_match_recompute_and_stop_per_row():
    model = tiny_model(seed=2)
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8]]
    g = torch.Generator().manual_seed(0)
    eos = 3
    tokens, mask, logprobs = model.generate(prompts, 12, temperature=0.7, eos_id=eos, generator=g)
    P = 5
    assert tokens.shape == (3, P + 12) and mask.shape == tokens.shape and logprobs.shape == (3, 12)
    # prompts are left-padded and marked real
    assert mask[:, :P].sum(1).tolist() == [5, 1, 2]
    logits = model(tokens, mask)                                      # (B, T, V)
    ref = F.log_softmax(logits[:, P - 1:-1].float() / 0.7, -1).gather(2, tokens[:, P:, None]).squeeze(2)
    resp_mask = mask[:, P:]
    torch.testing.assert_close(logprobs[resp_mask], ref[resp_mask], rtol=1e-4, atol=1e-4)
    assert (logprobs[~resp_mask] == 0).all()
    for row in range(3):
        real = tokens[row, P:][resp_mask[row]].tolist()
        if eos in real:  # the end token is the last real token; nothing after it is real
            assert real.index(eos) == len(real) - 1
        else:
            assert len(real) == 12
        # real tokens are contiguous from the start of the response
        assert resp_mask[row].tolist() == [True] * len(real) + [False] * (12 - len(real))


def test_generate_greedy_is_deterministic_and_top_k_restricts():
    model = tiny_model(seed=3)
    a = model.generate([[1, 2], [3]], 6, temperature=0)[0]
    b = model.generate([[1, 2], [3]], 6, temperature=0)[0]
    assert torch.equal(a, b)
    tokens, _, _ = model.generate([[1, 2]] * 8, 6, temperature=1.0, top_k=1,
                                  generator=torch.Generator().manual_seed(0))
    greedy = model.generate([[1, 2]], 6, temperature=0)[0]
    assert (tokens == greedy).all(), "top_k=1 sampling must equal greedy decoding"


def test_generate_refuses_too_long():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model.generate([[1] * 30], 5)


def test_learned_positions_are_gpt2s_table():
    # pos_emb="learned": token embedding + row t of transformer.wpe at position t, no rotation. A run of one
    # repeated token tells positions apart only through the table: with it zeroed, every position is alike
    model = tiny_model(pos_emb="learned")
    assert model.transformer.wpe.weight.shape == (32, 16)
    same = torch.tensor([[5, 5, 5]])
    with torch.no_grad():
        assert not torch.allclose(model(same)[0, 0], model(same)[0, 2])
        model.transformer.wpe.weight.zero_()
        torch.testing.assert_close(model(same)[0, 0], model(same)[0, 2])
    assert "transformer.wpe.weight" not in tiny_model().state_dict()  # rope: no table, as before


def test_hidden_feeds_a_scalar_head_and_weights_are_tied():
    model = tiny_model()
    h = model.hidden(torch.randint(0, 37, (2, 5)))
    assert h.shape == (2, 5, 16)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "transformer.h.0.attn.c_attn.weight" in model.state_dict()


def test_split_rotate_equals_float64_forward_and_backward():
    # c_attn's output (B, T, 3C) split into heads, positions as a padded batch gives them (B, T); the float64
    # reference splits with views and rotates each pair (x[i], x[i + hs/2]) of q and k by the same float32 angles
    B, T, H, hs = 3, 7, 6, 10
    qkv = torch.randn(B, T, 3 * H * hs, requires_grad=True)
    pos = torch.randint(0, 100, (B, T))
    cos, sin = rotary_angles(pos, hs)
    assert cos.shape == sin.shape == (B, 1, T, hs)
    qkv64 = qkv.detach().double().requires_grad_()
    inv = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)
    angles = (pos[:, None, :, None].float() * inv).double()  # (B, 1, T, hs/2)
    c, s = angles.cos(), angles.sin()
    q, k, v = (t.view(B, T, H, hs).transpose(1, 2) for t in qkv64.split(H * hs, dim=2))  # (B, H, T, hs)
    refs = [torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1) for x1, x2 in (q.chunk(2, -1), k.chunk(2, -1))]
    refs.append(v)
    outs = split_rotate(qkv, H, cos, sin)
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.float32 and out.shape == (B, H, T, hs)
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    gs = [torch.randn_like(ref) for ref in refs]
    (dx,), (dx64,) = torch.autograd.grad(outs, qkv, [g.float() for g in gs]), torch.autograd.grad(refs, qkv64, gs)
    torch.testing.assert_close(dx.double(), dx64, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # sampling takes the same math without the autograd node
        for a, b in zip(split_rotate(qkv, H, cos, sin), outs):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    qkv16 = qkv.detach().bfloat16().requires_grad_()  # autocast: computed in float32, returned in the input's dtype
    outs16 = split_rotate(qkv16, H, cos, sin)
    assert all(o.dtype == torch.bfloat16 for o in outs16)
    (dx16,) = torch.autograd.grad(outs16, qkv16, [g.bfloat16() for g in gs])
    assert dx16.dtype == torch.bfloat16
    torch.testing.assert_close(dx16.double(), dx64, atol=0.05, rtol=0.02)


def test_no_buffers_so_old_checkpoints_load():
    # rotary tables are computed in each forward, never stored: a checkpoint holds the parameters only, so one
    # saved before any change to the rotary path loads with strict key checking
    for pos_emb in ("rope", "learned"):
        model = tiny_model(pos_emb=pos_emb)
        assert list(model.buffers()) == []
        assert set(model.state_dict()) == {n for n, _ in model.named_parameters()} | {"lm_head.weight"}
