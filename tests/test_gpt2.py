"""
Start from GPT-2 (nanopost.gpt2, nanopost.sample), checked against Hugging Face's implementation: a tiny random
GPT2LMHeadModel saved as model.safetensors and as pytorch_model.bin, with a byte-level BPE trained by Hugging Face's
`tokenizers`, loads into nanopost with HF's logits, HF's greedy generations and HF's token ids.
"""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="test-only dependency: pip install -r tests/requirements.txt")
tokenizers = pytest.importorskip("tokenizers", reason="installed with transformers")

from nanopost import sample  # noqa: E402
from nanopost.common import UserError, entry, load_checkpoint, load_model  # noqa: E402
from nanopost.evaluate import evaluate_on_your_data  # noqa: E402
from nanopost.gpt2 import bytes_to_unicode  # noqa: E402
from nanopost.tokenizer import from_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see what they've done.",
          "Ünïcödé text, 日本語のテキスト, emoji 🙂🙂 and numbers 12345 67890.\n\n  indented   spaces\tand tabs",
          "Write an addition that equals 42. 40+2=42. Hello world! Hello there, hello again."] * 20


def _hf_folder(folder, weights):
    """A GPT-2 folder as Hugging Face writes it: a byte-level BPE trained by `tokenizers` (vocab.json and
    merges.txt, <|endoftext|> last) and a random GPT2LMHeadModel (2 layers, width 32, 64 positions)."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    os.makedirs(folder)
    bpe.model.save(str(folder))
    with open(folder / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    vocab["<|endoftext|>"] = len(vocab)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    eot = vocab["<|endoftext|>"]
    torch.manual_seed(0)
    # eos_token_id=None: HF's generate runs to max_new_tokens, as the sampler does without --chat
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(vocab),
                                     bos_token_id=eot, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)  # always model.safetensors (transformers 5 writes no .bin)
    if weights == "bin":
        # the layout of the original gpt2 upload's pytorch_model.bin: GPT2Model names (no "transformer."), the
        # causal-mask buffers, torch.save's zip of tensors
        state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
        for i in range(config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        os.remove(folder / "model.safetensors")
        torch.save(state, folder / "pytorch_model.bin")
    return str(folder), model


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def hf(request, tmp_path_factory):
    """(folder, the HF model it holds) for each weights format."""
    return _hf_folder(tmp_path_factory.mktemp("hf") / "gpt2-tiny", request.param)


@pytest.fixture(scope="module")
def hf_st(tmp_path_factory):
    return _hf_folder(tmp_path_factory.mktemp("hf") / "gpt2-tiny", "safetensors")


WORDS = "The quick brown fox jumps over lazy dog It's isn't they've hello Hello world again 2024 12345 42".split()
CHARS = ["0123456789", "éüßñçøÜ", "日本語中文字漢テキスト", "😀🚀👍🏽\u200d🙂", "\u0301\u0308", "\t\n\r\x00\x7f\xa0\u2028\ufeff",
         "<|>/\\'\"!?.,-", "'sStTdmlrev"]


def _random_text(rng, n):
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


# -----------------------------------------------------------------------------
# weights and logits

def test_logits_equal_hugging_face(hf):
    folder, hf_model = hf
    model, ckpt = load_model(folder)
    model.eval()
    V = hf_model.config.vocab_size
    assert ckpt["model_args"]["pos_emb"] == "learned" and ckpt["model_args"]["block_size"] == 64
    assert ckpt["model_args"]["vocab_size"] == V + 3  # <|user|>, <|assistant|>, <|system|> added
    idx = torch.randint(0, V, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :V], hf_model(idx).logits)
        # a left-padded batch: HF is given the positions counted over real tokens, which nanopost computes itself
        mask = torch.ones(3, 64, dtype=torch.bool)
        mask[1, :20] = mask[2, :63] = False
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ref = hf_model(idx, attention_mask=mask.long(), position_ids=pos).logits
        torch.testing.assert_close(model(idx, mask)[..., :V][mask], ref[mask])
    # the new rows are the mean of GPT-2's rows, and the head stays tied to them
    wte = model.transformer.wte.weight
    torch.testing.assert_close(wte[V:], hf_model.transformer.wte.weight.mean(0).expand(3, -1))
    assert model.lm_head.weight.data_ptr() == wte.data_ptr()


def test_tokenizer_encodes_as_gpt2_tokenizer_fast(hf_st):
    folder, _ = hf_st
    tok = from_checkpoint(load_checkpoint(folder), folder)
    ref = transformers.GPT2TokenizerFast.from_pretrained(folder, local_files_only=True)  # vocab.json, merges.txt
    assert tok.eot_id == ref.convert_tokens_to_ids("<|endoftext|>") == len(ref) - 1
    assert [tok.user_id, tok.assistant_id, tok.system_id] == [len(ref), len(ref) + 1, len(ref) + 2]
    rng = random.Random(0)
    texts = [_random_text(rng, rng.randrange(1, 30)) for _ in range(300)] + CORPUS[:3]
    n_merged = 0
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], repr(text)
        assert tok.decode(ids) == text
        n_merged += sum(i >= 256 for i in ids)
    assert n_merged > 500  # the merges were exercised, not only single bytes


def test_bytes_to_unicode_is_gpt2s_alphabet():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    # the alphabet Hugging Face's byte-level pre-tokenizer uses
    assert set(table.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


# -----------------------------------------------------------------------------
# the sampler

@pytest.mark.parametrize("prompt", ["Hello", "The quick brown fox jumps", "日本語 🙂 12345"])
def test_greedy_sample_equals_hf_generate(hf_st, prompt, capsys):
    folder, hf_model = hf_st
    tok = from_checkpoint(load_checkpoint(folder), folder)
    ids = tok.encode(prompt)
    ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=30, pad_token_id=tok.eot_id)[0, len(ids):].tolist()
    assert len(ref) == 30
    got = sample.main([f"--init_from={folder}", f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=30",
                       "--device=cpu"])
    assert got == [ref]
    # the random model writes invalid UTF-8 too (U+FFFD, as in tok.decode); a character cut at the end is left out
    assert capsys.readouterr().out == prompt + tok.decode_text(ref) + "\n"


def test_sample_command(hf_st):
    # the command a user types, the prompt on its stdin: exit 0, two greedy samples (equal), each HF's tokens
    folder, hf_model = hf_st
    tok = from_checkpoint(load_checkpoint(folder), folder)
    ids = tok.encode("Hello world")
    ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=20, pad_token_id=tok.eot_id)[0, len(ids):].tolist()
    proc = subprocess.run([sys.executable, "-m", "nanopost.sample", f"--init_from={folder}", "--temperature=0",
                           "--max_new_tokens=20", "--device=cpu", "--num_samples=2"], input="Hello world",
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = "Hello world" + tok.decode_text(ref)
    assert proc.stdout == text + "\n---------------\n" + text + "\n"


# -----------------------------------------------------------------------------
# the pipeline on a GPT-2 folder: SFT, then PPO, evaluate and the sampler on its checkpoint

def test_sft_from_gpt2_folder_then_ppo_evaluate_sample(hf_st, sft_main, ppo_main, tmp_path, capsys,
                                                        reference_kernels):
    folder, _ = hf_st
    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as f:
        for i in range(20):
            f.write(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": f"Say {i}."},
                                             {"role": "assistant", "content": f"{i}."}]}) + "\n")
    sft = tmp_path / "sft"
    sft_main([f"--data={chats}", f"--init_from={folder}", f"--out_dir={sft}", "--max_iters=2", "--block_size=64"])
    ckpt = load_checkpoint(str(sft / "ckpt.pt"))
    assert ckpt["model_args"]["pos_emb"] == "learned"
    assert ckpt["tokenizer"] == "gpt2:gpt2-tiny" and "#pattern gpt2" in ckpt["tokenizer_bpe"].splitlines()[:2]
    tok, folder_tok = from_checkpoint(ckpt, "sft"), from_checkpoint(load_checkpoint(folder), folder)
    assert tok.fingerprint == folder_tok.fingerprint and tok.system_id is not None

    ppo = tmp_path / "ppo"
    ppo_main([f"--init_from={sft / 'ckpt.pt'}", f"--out_dir={ppo}", "--max_iters=1", "--eval_interval=0"])
    assert load_checkpoint(str(ppo / "ckpt.pt"))["model_args"]["pos_emb"] == "learned"
    results = evaluate_on_your_data([folder, str(sft / "ckpt.pt"), str(ppo / "ckpt.pt")], data=str(chats),
                                    log=lambda *a: None)
    assert all(0 < m["val_loss"] < 20 for m in results.values())
    capsys.readouterr()
    out = sample.main([f"--init_from={ppo / 'ckpt.pt'}", "--chat", "--prompt=Say 3.", "--max_new_tokens=5",
                       "--device=cpu"])
    assert len(out) == 1 and capsys.readouterr().out == tok.decode_text(out[0]) + "\n"


# -----------------------------------------------------------------------------
# errors: one line naming the folder and what it lacks

@pytest.mark.parametrize("remove, message", [
    ("config.json", r"no config.json \(a GPT-2 folder holds"),
    ("model.safetensors", "no model.safetensors or pytorch_model.bin"),
    ("vocab.json", "no vocab.json"),
    ("merges.txt", "no merges.txt"),
])
def test_folder_missing_a_file(hf_st, tmp_path, remove, message):
    folder = shutil.copytree(hf_st[0], tmp_path / "g")
    os.remove(folder / remove)
    with pytest.raises(UserError, match=f"^{folder}: {message}"):
        load_checkpoint(str(folder))


def test_folder_errors_are_one_line(hf_st, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(hf_st[0], tmp_path / "g")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--init_from={folder}", "--prompt=x"])
    with pytest.raises(SystemExit) as e:
        entry(sample.main)
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {folder}/config.json: activation_function='relu' is not GPT-2's "
                                       f"architecture, which nanopost's GPT computes\n")
    (folder / "config.json").write_text(json.dumps(config))
    merges = (folder / "merges.txt").read_text().splitlines()
    (folder / "merges.txt").write_text("\n".join([merges[0], merges[2], merges[1]] + merges[3:]))
    with pytest.raises(UserError, match=r"merges.txt:2: merge .* should make token 256"):
        load_checkpoint(str(folder))
    # a nanopost run's folder: the error points at its ckpt.pt
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"")
    with pytest.raises(UserError, match="for a nanopost run use .*run/ckpt.pt"):
        load_checkpoint(str(run))
