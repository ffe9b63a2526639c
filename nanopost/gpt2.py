"""
Start from GPT-2: a Hugging Face GPT-2 folder read as a nanopost checkpoint, with no `transformers` import and
nothing downloaded. The folder holds config.json, model.safetensors or pytorch_model.bin, vocab.json and
merges.txt; on a machine with network (pip install huggingface_hub), for any size (gpt2, gpt2-medium, -large, -xl):

    hf download openai-community/gpt2 config.json model.safetensors vocab.json merges.txt --local-dir gpt2

    python -m nanopost.sample --init_from=gpt2 --prompt="The meaning of life is"
    python train_sft.py --data=chats.jsonl --init_from=gpt2 --out_dir=out/gpt2_sft

`loading.load_checkpoint` hands every folder to `load_folder`, so each --init_from (train_sft.py, train_ppo.py,
nanopost.sample) and each checkpoint of nanopost.evaluate takes one; the checkpoints a run saves hold the model
and the tokenizer, and need the folder no more. What the mapping does:
- weights: GPT-2's Conv1D layers store (in, out), nn.Linear (out, in), so those are transposed; attn.bias and
  attn.masked_bias are the causal mask, not weights; lm_head is tied to wte, in GPT-2 as in nanopost.
- positions: GPT-2's learned table (GPTConfig.pos_emb="learned"), the same architecture, so logits are equal to
  Hugging Face's (tests/test_gpt2.py checks it against transformers).
- tokenizer: vocab.json and merges.txt become a tiktoken Encoding with GPT-2's split pattern and vocab.json's ids,
  numbered in any order (load_tokenizer). The chat specials <|user|>, <|assistant|> and <|system|> get new ids after
  vocab.json's last (50256 in GPT-2), and their embedding rows start at the mean of the trained rows. The head is
  tied, so a new token's logit is then the mean of all logits (h . mean(w) = mean(h . w)), never above the likely
  tokens, and the pretrained model's next-token distribution barely moves; a random row may outscore them (Hewitt
  2021, "Initializing New Word Embeddings for Pretrained Language Models").
"""

import dataclasses
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanopost.config import UserError
from nanopost.checkpoint import read_torch_file
from nanopost.model import GPT, GPTConfig
from nanopost.tokenizer import TRAINED_SPECIALS, bpe_text, from_bpe_text

FOLDER = "a GPT-2 folder holds config.json, model.safetensors or pytorch_model.bin, vocab.json and merges.txt"
DOWNLOAD = "hf download openai-community/gpt2 config.json model.safetensors vocab.json merges.txt --local-dir gpt2"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _file(folder, *names):
    """The first of names present in folder; an error naming the folder and what it should hold otherwise."""
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    hint = f"; for a nanopost run use {os.path.join(folder, 'ckpt.pt')}" if os.path.isfile(
        os.path.join(folder, "ckpt.pt")) else ""
    raise UserError(f"{folder}: no {' or '.join(names)} ({FOLDER}: {DOWNLOAD}){hint}")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None


# -----------------------------------------------------------------------------
# the tokenizer: vocab.json + merges.txt -> tiktoken ranks

def bytes_to_unicode():
    """GPT-2's printable stand-in for each byte, in which vocab.json and merges.txt spell tokens: the 188 bytes that
    print as themselves keep their character, the other 68 (controls, space, ...) become chr(256 + n) in byte order,
    so a space is "Ġ"."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    other = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(other)}}


def load_tokenizer(folder):
    """The folder's byte-level BPE as a nanopost Tokenizer with vocab.json's ids, in whatever order it numbers its
    tokens -> (tokenizer, number of rows vocab.json's ids need).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; Hugging Face merges the pair listed
    first in merges.txt. The two agree when a token's rank is the line of the merge that makes it, so the ranks
    follow merges.txt (the 256 bytes first, in the order of their ids) and, unless they already equal vocab.json's
    ids (OpenAI's layout), an id map turns each rank into its id. vocab.json's other entries (<|endoftext|>, a
    <pad>, ...) are special tokens, never made from text; the chat specials it lacks get the ids after its last."""
    vocab_path, merges_path = _file(folder, "vocab.json"), _file(folder, "merges.txt")
    vocab = _read_json(vocab_path)
    try:
        with open(merges_path, encoding="utf-8") as f:
            merges = [(lineno, line.split()) for lineno, line in enumerate(f.read().splitlines(), 1)
                      if line and not line.startswith("#version")]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{merges_path}: cannot read ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
        raise UserError(f"{vocab_path}: expected GPT-2's {{token: id}} map, ids from 0")
    if len(set(vocab.values())) != len(vocab):
        raise UserError(f"{vocab_path}: two tokens share an id")
    alphabet = bytes_to_unicode()
    if any(alphabet[b] not in vocab for b in range(256)):
        missing = [alphabet[b] for b in range(256) if alphabet[b] not in vocab]
        raise UserError(f"{vocab_path}: a byte-level BPE has a token for each of the 256 bytes; {len(missing)} are "
                        f"missing ({' '.join(missing[:5])} ...)")
    to_byte = {c: b for b, c in alphabet.items()}
    singles = sorted(range(256), key=lambda b: vocab[alphabet[b]])
    ranks = {bytes([b]): r for r, b in enumerate(singles)}
    ids = [vocab[alphabet[b]] for b in singles]
    for lineno, pair in merges:
        token = "".join(pair)
        if len(pair) != 2 or any(p not in vocab for p in (*pair, token)) or any(c not in to_byte for c in token):
            raise UserError(f"{merges_path}:{lineno}: merge {' '.join(pair)!r} should join two tokens of "
                            f"vocab.json into a third")
        b = bytes(to_byte[c] for c in token)
        if b not in ranks:  # a later merge making the same bytes again adds nothing tiktoken could tell apart
            ranks[b] = len(ranks)
            ids.append(vocab[token])
    made = set(ids)
    others = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i not in made]
    specials = TRAINED_SPECIALS + [t for t in others if t not in TRAINED_SPECIALS]
    if any(not t or t.split() != [t] for t in specials):
        raise UserError(f"{vocab_path}: token {next(t for t in specials if t.split() != [t])!r} is neither made by "
                        f"merges.txt nor a special token without spaces")
    n_rows = max(vocab.values()) + 1
    new = iter(range(n_rows, n_rows + len(specials)))
    ids += [vocab[t] if t in vocab else next(new) for t in specials]
    name = f"gpt2:{os.path.basename(os.path.normpath(folder))}"
    text = bpe_text(ranks, specials, "gpt2", None if ids == list(range(len(ids))) else ids)
    return from_bpe_text(name, text, vocab_path), n_rows


# -----------------------------------------------------------------------------
# the model: config.json and the weights -> model_args and a nanopost state dict

def model_args_of(c, tok, n_rows, path):
    """GPTConfig fields of a config.json's dict c; what nanopost's GPT cannot compute is refused by name."""
    if not isinstance(c, dict):
        raise UserError(f"{path}: expected a JSON object")
    if c.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type {c['model_type']!r} is not gpt2")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in c]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}")
    # nanopost's GPT computes exactly GPT-2's defaults: tanh GELU ("gelu_new"), LayerNorm eps 1e-5 (torch's
    # default), a 4x MLP, attention scaled by 1/sqrt(head size) only
    unsupported = {k: c[k] for k, ok in [("activation_function", ("gelu_new", "gelu_pytorch_tanh")),
                                          ("layer_norm_epsilon", (1e-5,)), ("n_inner", (None, 4 * c["n_embd"])),
                                          ("scale_attn_weights", (True,)),
                                          ("scale_attn_by_inverse_layer_idx", (False,)),
                                          ("add_cross_attention", (False,)), ("tie_word_embeddings", (True,))]
                   if k in c and c[k] not in ok}
    if unsupported:
        raise UserError(f"{path}: {', '.join(f'{k}={v!r}' for k, v in unsupported.items())} is not GPT-2's "
                        f"architecture, which nanopost's GPT computes")
    if c["vocab_size"] < n_rows:
        raise UserError(f"{path}: vocab_size={c['vocab_size']} is less than the {n_rows} ids vocab.json numbers")
    return dataclasses.asdict(GPTConfig(block_size=c["n_positions"], vocab_size=max(c["vocab_size"], tok.vocab_size),
                                        n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], dropout=0.0,
                                        bias=True, pos_emb="learned"))


def read_weights(path, device="cpu"):
    """A model.safetensors or pytorch_model.bin file's tensors by name, read without executing code."""
    if path.endswith(".safetensors"):
        try:
            return load_file(path, device=device)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} could not be read: {e}") from None
    return read_torch_file(path, device, "weights")


def convert(hf, model_args, tok, n_rows, path):
    """GPT-2's tensors under nanopost's names and layouts; the embedding grows to hold the new chat specials."""
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model (the original gpt2 upload) "h.0..."
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # the causal mask, saved by older versions
    head = hf.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in hf and not torch.equal(head, hf["wte.weight"]):
        raise UserError(f"{path}: lm_head.weight differs from wte.weight; nanopost ties them, as GPT-2 does")
    with torch.device("meta"):  # the shapes nanopost expects, without allocating a model
        want = {k: v.shape for k, v in GPT(GPTConfig(**model_args)).state_dict().items()}
    state = {}
    for name in want:
        key = "wte.weight" if name == "lm_head.weight" else name.removeprefix("transformer.")
        if key not in hf:
            raise UserError(f"{path}: no tensor {key!r}; is it a GPT-2 checkpoint?")
        t = hf[key].float()
        state[name] = t.t() if key.endswith(CONV1D) else t
    unused = sorted(set(hf) - {name.removeprefix("transformer.") for name in want})
    if unused:
        raise UserError(f"{path}: tensors GPT-2's architecture does not have: {', '.join(unused[:5])}")
    wte, V = state["transformer.wte.weight"], model_args["vocab_size"]
    if wte.size(0) > V:
        raise UserError(f"{path}: wte.weight has {wte.size(0)} rows, more than config.json's vocab_size={V}")
    wte = torch.cat([wte, wte.new_zeros(V - wte.size(0), wte.size(1))])  # (V, C)
    wte[n_rows:tok.vocab_size] = wte[:n_rows].mean(0)  # the new chat specials: the mean row
    state["transformer.wte.weight"] = state["lm_head.weight"] = wte
    for name, shape in want.items():
        if state[name].shape != shape:
            raise UserError(f"{path}: {name} has shape {tuple(state[name].shape)}, config.json implies {tuple(shape)}")
    return state


def load_folder(folder, device="cpu"):
    """A GPT-2 folder as a checkpoint dict, laid out like the ones nanopost saves (loading.load_checkpoint)."""
    config_path = _file(folder, "config.json")
    tok, n_rows = load_tokenizer(folder)
    weights = _file(folder, "model.safetensors", "pytorch_model.bin")
    model_args = model_args_of(_read_json(config_path), tok, n_rows, config_path)
    model = convert(read_weights(weights, device), model_args, tok, n_rows, weights)
    return dict(model=model, model_args=model_args, config={}, step=0, script="gpt2", **tok.checkpoint_entries())
