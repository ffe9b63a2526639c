"""
A GPT-2 style transformer, small enough to train on a laptop CPU in minutes.

Parameter names follow GPT-2 (transformer.wte, h.0.attn.c_attn, ...), the token embedding is tied
to the output head (Press & Wolf 2017), attention is causal scaled-dot-product attention. Positions
are rotary (RoPE, Su et al. 2021), not GPT-2's learned table: attention then depends on how far
apart two tokens are, not where they sit, so "copy the number from the prompt" is the same skill at
every offset. With a learned table the ~1M-parameter default model, pretrained for 5 CPU-minutes,
never learned to copy a target number from the prompt; with RoPE it does (README, "Why RoPE").
GPT-2's learned table is the other choice (pos_emb="learned", transformer.wpe), so a GPT-2
checkpoint loads as it was trained (nanopost.gpt2). Two things go beyond nanoGPT because
post-training needs them:

- padded batches: `attention_mask` (B, T) marks real tokens; positions count real tokens only, and
  pads are never attended to. Prompts are left-padded, responses right-padded.
- a KV cache for batched sampling (`generate`), which must give the same logits as recomputing the
  whole sequence (tests/test_model.py checks it).

`hidden()` exposes the trunk (after the final layer norm) so a value or reward head can sit on it.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 128   # longest sequence (prompt + response) the model sees
    vocab_size: int = 1024  # the shipped nanopost BPE: 256 bytes + 765 merges + 3 specials
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128       # with the defaults above: ~0.9M parameters, the CPU default
    dropout: float = 0.0
    bias: bool = True       # GPT-2 uses biases in Linear and LayerNorm
    # "rope" (rotary) | "learned": GPT-2's table transformer.wpe, for GPT-2 checkpoints
    pos_emb: str = "rope"


class KVCache:
    """Keys and values of every layer for the tokens seen so far: (n_layer, B, nh, S_max, hs)."""

    def __init__(self, config, batch_size, max_len):
        self.shape = (config.n_layer, batch_size, config.n_head, max_len,
                      config.n_embd // config.n_head)
        # allocated on first write, in the dtype the layers produce (bf16 under autocast)
        self.k = self.v = None
        self.length = 0         # filled slots; advanced by GPT.hidden after all layers wrote

    def update(self, layer, k, v):
        # k, v: (B, nh, T, hs) for the new tokens; returns keys and values of all tokens so far
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        end = self.length + k.size(2)
        assert end <= self.shape[3], f"KV cache overflow: {end} > {self.shape[3]} slots"
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def rotary_angles(pos, head_size, base=10000.0):
    """Rotary tables for positions pos (B, T) (Su et al. 2021): cos and sin of pos * base^(-2i/hs),
    i < hs/2, each repeated over both halves of a head, the sin negated on the first half, as
    (B, 1, T, hs) each, so _rotate() works on whole rows of a (B, nh, T, hs) tensor. Built once per
    forward and shared by every layer and head."""
    inv_freq = base ** (
        -torch.arange(0, head_size, 2, dtype=torch.float32, device=pos.device) / head_size)
    angles = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, hs/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (B, 1, T, hs) each


def _rotate(x, cos, sin):
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): one full-width multiply, then each half adds
    # the other half times its sin in place. No concatenation of strided halves, which cost more
    # than the arithmetic.
    h = x.size(-1) // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h])
    out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out


class _SplitRotate(torch.autograd.Function):
    # one autograd node for split, view, transpose and both rotations. A rotation's Jacobian is the
    # rotation by the opposite angle, so the backward is the same op with sin negated and saves
    # nothing but the tables. It writes the three heads' gradients straight into one (B, T, 3C)
    # tensor, where autograd would reshape each head's gradient into a copy, then concatenate them
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head):
        ctx.save_for_backward(cos, sin)
        return _split_rotate(qkv, n_head, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        B, nh, T, hs = grad_q.shape
        grad = grad_q.new_empty(B, T, 3, nh, hs)  # the input's (B, T, 3C)
        heads = grad.permute(2, 0, 3, 1, 4)         # (3, B, nh, T, hs), a view
        heads[0].copy_(_rotate(grad_q.to(cos.dtype), cos, -sin))
        heads[1].copy_(_rotate(grad_k.to(cos.dtype), cos, -sin))
        heads[2].copy_(grad_v)
        return grad.view(B, T, 3 * nh * hs), None, None, None


def _split_rotate(qkv, n_head, cos, sin):
    B, T, C3 = qkv.shape
    heads = qkv.view(B, T, 3, n_head, C3 // (3 * n_head))
    heads = heads.permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs), a view
    # (2, B, nh, T, hs), laid out as (B, T, 2, nh, hs)
    qk = _rotate(heads[:2].to(cos.dtype), cos, sin).to(qkv.dtype)
    return qk[0], qk[1], heads[2]


def split_rotate(qkv, n_head, cos, sin):
    """c_attn's output qkv (B, T, 3C) -> q, k, v (B, nh, T, hs), q and k with each pair
    (x[i], x[i + hs/2]) rotated by its position's angle; cos, sin from rotary_angles. Rotated in
    float32 (the tables' dtype), returned in qkv's dtype."""
    if torch.is_grad_enabled():
        return _SplitRotate.apply(qkv, cos, sin, n_head)
    return _split_rotate(qkv, n_head, cos, sin)  # sampling: the same math without the autograd node


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, attn_mask, kv_cache, layer):
        B, T, C = x.size()
        qkv = self.c_attn(x)  # (B, T, 3C)
        if rope is not None:  # the cache stores rotated keys: a key's position never changes
            q, k, v = split_rotate(qkv, self.n_head, *rope)  # (B, nh, T, hs)
        else:
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                       for t in qkv.split(C, dim=2))  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # plain causal batch: let SDPA pick its fastest kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope, attn_mask, kv_cache, layer):
        x = x + self.attn(self.ln_1(x), rope, attn_mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.pos_emb in ("rope", "learned"), \
            f"pos_emb={config.pos_emb!r}: expected rope or learned"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **(dict(wpe=nn.Embedding(config.block_size, config.n_embd))
               if config.pos_emb == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth (Radford et al. 2019)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx, attention_mask=None, kv_cache=None, segments=None):
        """Trunk output after the final layer norm, (B, T, C).

        idx (B, T) are the new tokens. attention_mask (B, S) marks real tokens of the whole sequence
        so far (S = cached + T); None means every token is real. With a kv_cache the keys and values
        of earlier tokens come from the cache. segments (B, T), for packed rows
        (nanopost.data.pack): the example each token belongs to (1, 2, ...; 0 = padding); a token
        attends only to earlier tokens of its own example and positions restart at 0 for each, so
        every example computes what it would alone.
        """
        B, T = idx.size()
        past = kv_cache.length if kv_cache is not None else 0
        S = past + T
        if S > self.config.block_size:
            raise ValueError(
                f"sequence of {S} tokens is longer than block_size={self.config.block_size}")
        if segments is not None:
            assert attention_mask is None and kv_cache is None, \
                "packed rows are for training: no mask, no cache"
            at = torch.arange(T, device=idx.device)
            starts = torch.ones_like(segments, dtype=torch.bool)
            # (B, T) first token of each example
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            # (B, T) offset from that first token
            pos = at - torch.where(starts, at, 0).cummax(-1).values
            same = segments[:, :, None] == segments[:, None, :]      # (B, T, T)
            # (B, 1, T, T) causal within each example
            attn_mask = (same & (at[None, :] <= at[:, None]))[:, None]
        elif attention_mask is None and past == 0:
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
            attn_mask = None
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, S, dtype=torch.bool, device=idx.device)
            assert attention_mask.shape == (B, S), \
                f"attention_mask {tuple(attention_mask.shape)} != {(B, S)}"
            real = attention_mask.bool()
            # a token's position is the number of real tokens before it, so left padding does not
            # shift it
            pos = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            q_at = torch.arange(past, S, device=idx.device)[:, None]  # (T, 1) absolute query index
            k_at = torch.arange(S, device=idx.device)[None, :]        # (1, S)
            # (B, T, S) causal, real keys only
            attn_mask = (k_at <= q_at)[None] & real[:, None, :]
            # a pad query would see no key at all and SDPA would return NaN for it; let it see
            # itself: pad rows are never used, and real rows are unchanged
            attn_mask = (attn_mask | (k_at == q_at)[None])[:, None]      # (B, 1, T, S)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            # (B or 1, T, C): the same real-token positions rotary angles get
            x = x + self.transformer.wpe(pos)
        else:
            rope = rotary_angles(pos, self.config.n_embd // self.config.n_head)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, attn_mask, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length = S
        return self.transformer.ln_f(x)

    def forward(self, idx, attention_mask=None, kv_cache=None, segments=None):
        return self.lm_head(self.hidden(idx, attention_mask, kv_cache, segments))  # (B, T, V)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, eos_id=None,
                 generator=None, pad_id=0, on_token=None):
        """Sample continuations of a batch of token-id prompts of different lengths.

        Returns tokens (B, P+N): the prompts left-padded to P = the longest, then N = max_new_tokens
        response slots; mask (B, P+N) of real tokens (each row stops after it samples eos_id, which
        is real); logprobs (B, N) of each sampled token under log_softmax(logits / temperature), 0
        at pads. temperature=0 is greedy (its logprobs are at temperature 1). top_k restricts what
        can be sampled, but logprobs stay those of the full distribution, so they match a later
        recompute. on_token, if given, is called with each step's (B,) tokens as soon as they are
        sampled (streaming).
        """
        assert len(prompts) > 0 and all(len(p) > 0 for p in prompts), \
            "every prompt needs at least one token"
        device = self.lm_head.weight.device
        B = len(prompts)
        P = max(len(p) for p in prompts)
        N = max_new_tokens
        if P + N > self.config.block_size:
            raise ValueError(f"longest prompt ({P}) + max_new_tokens ({N}) > "
                             f"block_size={self.config.block_size}")
        tokens = torch.full((B, P + N), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(B, P + N, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):P] = True
        logprobs = torch.zeros(B, N, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cache = KVCache(self.config, B, P + N)
        logits = self(tokens[:, :P], mask[:, :P], cache)[:, -1].float()  # (B, V) prefill
        for t in range(N):
            logp = F.log_softmax(logits / (temperature or 1.0), dim=-1)   # (B, V)
            if temperature == 0:
                nxt = logp.argmax(-1)
            else:
                scores = logp
                if top_k is not None and top_k < scores.size(-1):
                    kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            nxt = nxt.masked_fill(done, pad_id)
            tokens[:, P + t] = nxt
            mask[:, P + t] = ~done
            logprobs[:, t] = logp.gather(1, nxt[:, None]).squeeze(1).masked_fill(done, 0.0)
            if on_token is not None:
                on_token(nxt)
            if eos_id is not None:
                done = done | (nxt == eos_id)
            if t == N - 1 or bool(done.all()):
                break
            logits = self(nxt[:, None], mask[:, :P + t + 1], cache)[:, -1].float()
        return tokens, mask, logprobs


class ValueModel(nn.Module):
    """A scalar per position: a GPT trunk (GPT.hidden, after the final layer norm) and a head
    nn.Linear(C, 1). PPO's value model V(s_t)."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        C = trunk.config.n_embd
        self.head = nn.Linear(C, 1)
        # zero init (N-details uses N(0, 1/sqrt(C+1))): a random head makes the first advantages
        # pure value noise, and whitening scales that noise up to unit size; on the tiny model the
        # first update then moved the policy by ~3 nats of KL before any reward was seen. With V = 0
        # the first advantages are the rewards themselves.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, attention_mask=None):
        h = self.trunk.hidden(idx, attention_mask=attention_mask)  # (B, T, C)
        return self.head(h).squeeze(-1)  # (B, T)


def last_real(attention_mask):
    """(B, T) mask of real tokens -> (B,) index of each row's last real token (left and right
    padding alike)."""
    T = attention_mask.size(1)
    return (attention_mask.long() * torch.arange(1, T + 1, device=attention_mask.device)).argmax(-1)


class RewardModel(ValueModel):
    """A scalar per sequence: the ValueModel's head read only at the last real token, the one
    position that has seen the whole prompt and response (Stiennon et al. 2020; Ouyang et al. 2022).
    Trained on preference pairs with the Bradley-Terry loss (nanopost.prefs.bradley_terry_loss); its
    zero-init head makes every reward 0 at the start, so the first loss is exactly log 2."""

    def forward(self, idx, attention_mask=None):
        values = super().forward(idx, attention_mask)  # (B, T)
        if attention_mask is None:
            return values[:, -1]  # (B,)
        return values.gather(1, last_real(attention_mask)[:, None]).squeeze(1)  # (B,)
