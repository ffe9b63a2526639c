"""
Start from GPT-2 (nanopost.gpt2, nanopost.sample), checked against Hugging Face's implementation: tiny random
GPT2LMHeadModels saved as model.safetensors and as pytorch_model.bin, each with a byte-level BPE trained by Hugging
Face's `tokenizers` in three vocabulary layouts, load into nanopost with HF's logits, HF's greedy generations and
HF's token ids.

transformers is never imported here: it imports Hugging Face's PyPI package `kernels`, which in this process (the
repo root on sys.path) would be nanopost's kernels/ folder. tests/hf_reference.py builds the folders and computes
HF's side in a subprocess started outside the repo; conftest.py refuses the import in-process.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import kernels
from hf_reference import LAYOUTS, PROMPTS, texts
from nanopost import sample
from nanopost.config import UserError, entry
from nanopost.loading import load_checkpoint, load_model
from nanopost.evaluate import evaluate_on_your_data
from nanopost.gpt2 import bytes_to_unicode
from nanopost.tokenizer import from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = ["safetensors", "bin"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(folder of LAYOUT, the references of LAYOUT) for each layout, and the run's own facts (hf["kernels_origin"]).
    The subprocess starts in a temporary folder with -I (no working directory, no PYTHONPATH on sys.path)."""
    out = tmp_path_factory.mktemp("hf")
    proc = subprocess.run([sys.executable, "-I", os.path.join(ROOT, "tests", "hf_reference.py"), str(out)], cwd=out,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"tests/hf_reference.py failed (pip install -r tests/requirements.txt?):\n" \
                                 f"{proc.stderr[-3000:]}"
    return out, torch.load(out / "refs.pt", weights_only=False)


def folder(hf, layout, weights="safetensors"):
    return str(hf[0] / (layout if weights == "safetensors" else f"{layout}-bin"))


def test_transformers_stays_out_of_this_process(hf):
    # what the clash looked like: transformers' `import kernels` finding ours. conftest.py refuses it here...
    with pytest.raises(ImportError, match="must not be imported in the test process"):
        importlib.import_module("transformers")
    assert "transformers" not in sys.modules
    assert os.path.dirname(kernels.__file__) == os.path.join(ROOT, "kernels")
    # ...and the reference process, which did import it, did not see ours
    assert hf[1]["kernels_origin"] != kernels.__file__


# -----------------------------------------------------------------------------
# weights and logits

@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_equal_hugging_face(hf, layout, weights):
    ref = hf[1][layout]
    model, ckpt = load_model(folder(hf, layout, weights))
    model.eval()
    V = ref["vocab_size"]
    assert ckpt["model_args"]["pos_emb"] == "learned" and ckpt["model_args"]["block_size"] == 64
    n_new = 3  # <|user|>, <|assistant|>, <|system|> added after vocab.json's ids
    assert ckpt["model_args"]["vocab_size"] == V + n_new
    with torch.no_grad():
        torch.testing.assert_close(model(ref["idx"])[..., :V], ref["logits"])
        # a left-padded batch: HF was given the positions counted over real tokens, which nanopost computes itself
        mask = ref["mask"]
        torch.testing.assert_close(model(ref["idx"], mask)[..., :V][mask], ref["padded_logits"][mask])
    # the new rows are the mean of GPT-2's rows, and the head stays tied to them
    wte = model.transformer.wte.weight
    torch.testing.assert_close(wte[V:], ref["wte"].mean(0).expand(n_new, -1))
    assert model.lm_head.weight.data_ptr() == wte.data_ptr()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokenizer_encodes_as_gpt2_tokenizer_fast(hf, layout):
    ref = hf[1][layout]
    path = folder(hf, layout)
    tok = from_checkpoint(load_checkpoint(path), path)
    assert tok.eot_id == ref["eot"]
    V = ref["vocab_size"]
    assert [tok.user_id, tok.assistant_id, tok.system_id] == [V, V + 1, V + 2]
    n_merged = 0
    for text, ids in zip(texts(), ref["encoded"], strict=True):
        assert tok.encode(text) == ids, repr(text)
        assert tok.decode(ids) == text
        n_merged += sum(len(tok.decode([i]).encode()) > 1 for i in ids)
    assert n_merged > 500  # the merges were exercised, not only single bytes
    # the layouts differ where it matters: OpenAI's numbers tokens in merge order, the others do not
    in_merge_order = "\n".join(tok.bpe.splitlines()[2:]).count(" ") == len(tok.bpe.splitlines()[2:])
    assert in_merge_order == (layout == "openai")


def test_bytes_to_unicode_is_gpt2s_alphabet(hf):
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert sorted(table.values()) == hf[1]["byte_alphabet"]  # Hugging Face's byte-level pre-tokenizer's alphabet


# -----------------------------------------------------------------------------
# the sampler

@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_sample_equals_hf_generate(hf, layout, capsys):
    path = folder(hf, layout)
    tok = from_checkpoint(load_checkpoint(path), path)
    for g in hf[1][layout]["generations"]:
        assert tok.encode(g["prompt"]) == g["ids"]
        got = sample.main([f"--init_from={path}", f"--prompt={g['prompt']}", "--temperature=0",
                           f"--max_new_tokens={len(g['new'])}", "--device=cpu"])
        assert got == [g["new"]], g["prompt"]
        # the random model writes invalid UTF-8 too (U+FFFD, as in tok.decode); a character cut at the end is left out
        assert capsys.readouterr().out == g["prompt"] + tok.decode_text(g["new"]) + "\n"
    assert len({i for g in hf[1][layout]["generations"] for i in g["new"]}) > 10  # not one token repeated


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_sample_command(hf, layout, weights):
    # the command a user types, the prompt on its stdin: exit 0, two greedy samples (equal), each HF's tokens
    path = folder(hf, layout, weights)
    tok = from_checkpoint(load_checkpoint(path), path)
    g = next(g for g in hf[1][layout]["generations"] if g["prompt"] == PROMPTS[-1][0])
    proc = subprocess.run([sys.executable, "-m", "nanopost.sample", f"--init_from={path}", "--temperature=0",
                           f"--max_new_tokens={len(g['new'])}", "--device=cpu", "--num_samples=2"],
                          input=g["prompt"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = g["prompt"] + tok.decode_text(g["new"])
    assert proc.stdout == text + "\n---------------\n" + text + "\n"


# -----------------------------------------------------------------------------
# the pipeline on a GPT-2 folder: SFT, then PPO, evaluate and the sampler on its checkpoint

def test_sft_from_gpt2_folder_then_ppo_evaluate_sample(hf, sft_main, ppo_main, tmp_path, capsys,
                                                        reference_kernels):
    path = folder(hf, "specials_first")
    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as f:
        for i in range(20):
            f.write(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": f"Say {i}."},
                                             {"role": "assistant", "content": f"{i}."}]}) + "\n")
    sft = tmp_path / "sft"
    sft_main([f"--data={chats}", f"--init_from={path}", f"--out_dir={sft}", "--max_iters=2", "--block_size=64"])
    ckpt = load_checkpoint(str(sft / "ckpt.pt"))
    assert ckpt["model_args"]["pos_emb"] == "learned"
    assert ckpt["tokenizer"] == "gpt2:specials_first" and "#pattern gpt2" in ckpt["tokenizer_bpe"].splitlines()[:2]
    tok, folder_tok = from_checkpoint(ckpt, "sft"), from_checkpoint(load_checkpoint(path), path)
    assert tok.fingerprint == folder_tok.fingerprint and tok.system_id is not None

    ppo = tmp_path / "ppo"
    ppo_main([f"--init_from={sft / 'ckpt.pt'}", f"--out_dir={ppo}", "--max_iters=1", "--eval_interval=0"])
    assert load_checkpoint(str(ppo / "ckpt.pt"))["model_args"]["pos_emb"] == "learned"
    results = evaluate_on_your_data([path, str(sft / "ckpt.pt"), str(ppo / "ckpt.pt")], data=str(chats),
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
def test_folder_missing_a_file(hf, tmp_path, remove, message):
    path = shutil.copytree(folder(hf, "specials_first"), tmp_path / "g")
    os.remove(path / remove)
    with pytest.raises(UserError, match=f"^{path}: {message}"):
        load_checkpoint(str(path))


def test_folder_errors_are_one_line(hf, tmp_path, monkeypatch, capsys):
    path = shutil.copytree(folder(hf, "specials_first"), tmp_path / "g")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--init_from={path}", "--prompt=x"])
    with pytest.raises(SystemExit) as e:
        entry(sample.main)
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {path}/config.json: activation_function='relu' is not GPT-2's "
                                       f"architecture, which nanopost's GPT computes\n")
    (path / "config.json").write_text(json.dumps(config))
    merges = (path / "merges.txt").read_text().splitlines()
    (path / "merges.txt").write_text("\n".join([merges[0], "Ā ā"] + merges[2:]))  # bytes 0 and 1: no such token
    with pytest.raises(UserError, match=r"merges.txt:2: merge 'Ā ā' should join two tokens of vocab.json into a "):
        load_checkpoint(str(path))
    (path / "merges.txt").write_text("\n".join(merges))
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    del vocab["Ā"]
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab.json: a byte-level BPE has a token for each of the 256 bytes; 1 "):
        load_checkpoint(str(path))
    # a nanopost run's folder: the error points at its ckpt.pt
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"")
    with pytest.raises(UserError, match="for a nanopost run use .*run/ckpt.pt"):
        load_checkpoint(str(run))
