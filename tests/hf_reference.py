"""
The Hugging Face side of tests/test_gpt2.py, run as a process of its own:

    python -I tests/hf_reference.py OUT     # -I: neither the working directory nor PYTHONPATH on sys.path

It must never run in a process that has the repo root on sys.path: transformers imports Hugging Face's PyPI
package `kernels`, and from the repo root that name finds nanopost's own kernels/ folder instead. The tests import
only the plain helpers below (no transformers there); `main` builds GPT-2 folders with Hugging Face's `tokenizers`
and `transformers` and writes what nanopost must reproduce, OUT/refs.pt, for each vocabulary layout:

- openai: a byte-level BPE as `tokenizers` trains it, then <|endoftext|> after the last merge (OpenAI's layout);
- specials_first: <|endoftext|> and <pad> as ids 0 and 1, then `tokenizers`' own alphabet order and the merges
  (what ByteLevelBPETokenizer and save_pretrained write, as many community GPT-2 checkpoints are laid out);
- shuffled: the same vocabulary with every id moved at random (vocab.json may number tokens any way at all).

Each layout has a random GPT2LMHeadModel saved as model.safetensors (folder LAYOUT) and as the original gpt2
upload's pytorch_model.bin (folder LAYOUT-bin), and its references: logits on random ids (also left-padded),
GPT2TokenizerFast's ids on random unicode text, and greedy generations.
"""

import json
import os
import random
import sys

LAYOUTS = ["openai", "specials_first", "shuffled"]
CORPUS = ["The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see what they've done.",
          "Ünïcödé text, 日本語のテキスト, emoji 🙂🙂 and numbers 12345 67890.\n\n  indented   spaces\tand tabs",
          "Write an addition that equals 42. 40+2=42. Hello world! Hello there, hello again."] * 20
WORDS = "The quick brown fox jumps over lazy dog It's isn't they've hello Hello world again 2024 12345 42".split()
CHARS = ["0123456789", "éüßñçøÜ", "日本語中文字漢テキスト", "😀🚀👍🏽\u200d🙂", "\u0301\u0308", "\t\n\r\x00\x7f\xa0\u2028\ufeff",
         "<|>/\\'\"!?.,-", "'sStTdmlrev"]
# (prompt, new tokens) greedy generations are compared on
PROMPTS = [("Hello", 30), ("The quick brown fox jumps", 30), ("日本語 🙂 12345", 30), ("Hello world", 20)]


def random_text(rng, n):
    """n pieces, each a word of the corpus (merges apply) or 1-4 random characters of one kind, then whitespace."""
    pieces = []
    for _ in range(n):
        if rng.random() < 0.5:
            pieces.append(rng.choice(WORDS))
        else:
            pool = rng.choice(CHARS)
            pieces.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 4))))
        pieces.append(rng.choice(["", " ", " ", "  ", "\n", " \n\n", "\t", "   "]))
    return "".join(pieces)


def texts():
    rng = random.Random(0)
    return [random_text(rng, rng.randrange(1, 30)) for _ in range(300)] + CORPUS[:3]


def write_vocab(folder, layout, tokenizers):
    """vocab.json and merges.txt of a BPE trained on CORPUS, numbered as `layout` says."""
    specials = [] if layout == "openai" else ["<|endoftext|>", "<pad>"]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    os.makedirs(folder)
    bpe.model.save(folder)
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    if layout == "openai":
        vocab["<|endoftext|>"] = len(vocab)
    if layout == "shuffled":
        ids = list(range(len(vocab)))
        random.Random(1).shuffle(ids)
        vocab = {token: ids[i] for token, i in vocab.items()}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    return vocab


def save_bin(model, src, folder):
    """The original gpt2 upload's pytorch_model.bin: GPT2Model names (no "transformer."), the causal-mask buffers
    that older transformers saved, torch.save's zip of tensors."""
    import torch
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    os.makedirs(folder)
    for name in ("config.json", "vocab.json", "merges.txt"):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(folder, name), "wb") as g:
            g.write(f.read())
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))


def references(folder, vocab, transformers, torch):
    """What nanopost must reproduce on one folder."""
    ref_tok = transformers.GPT2TokenizerFast.from_pretrained(folder, local_files_only=True)
    eot = vocab["<|endoftext|>"]
    torch.manual_seed(0)
    # eos_token_id=None: generate runs to max_new_tokens, as the sampler does without --chat. initializer_range
    # 0.5, not GPT-2's 0.02: a model that random at 0.02 repeats one token, and a greedy check of it proves little
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(vocab),
                                     bos_token_id=eot, eos_token_id=None, initializer_range=0.5)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)  # model.safetensors (transformers 5 writes no .bin)
    save_bin(model, folder, folder + "-bin")
    idx = torch.randint(0, len(vocab), (3, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 64, dtype=torch.bool)
    mask[1, :20] = mask[2, :63] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # counted over real tokens, as nanopost does
    generations = []
    with torch.no_grad():
        logits = model(idx).logits
        padded = model(idx, attention_mask=mask.long(), position_ids=positions).logits
        for prompt, n in PROMPTS:
            ids = ref_tok(prompt)["input_ids"]
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=n, pad_token_id=eot)[0, len(ids):].tolist()
            generations.append(dict(prompt=prompt, ids=ids, new=out))
    return dict(vocab_size=len(vocab), n_tokenizer=len(ref_tok), eot=eot, wte=model.transformer.wte.weight.clone(),
                idx=idx, logits=logits, mask=mask, padded_logits=padded, generations=generations,
                encoded=[ref_tok(t)["input_ids"] for t in texts()])


def main(out):
    import importlib.util

    import tokenizers
    import torch
    import transformers
    refs = {}
    for layout in LAYOUTS:
        folder = os.path.join(out, layout)
        refs[layout] = references(folder, write_vocab(folder, layout, tokenizers), transformers, torch)
    spec = importlib.util.find_spec("kernels")  # what `import kernels` meant to transformers in this process
    refs["kernels_origin"] = spec.origin if spec else None
    refs["byte_alphabet"] = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    refs["versions"] = dict(transformers=transformers.__version__, tokenizers=tokenizers.__version__)
    torch.save(refs, os.path.join(out, "refs.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
