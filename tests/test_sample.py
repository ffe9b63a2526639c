"""The sampler (nanopost.sample) on nanopost checkpoints: streaming text, the chat's end, the interactive loop.
Its equality with Hugging Face's greedy generate on GPT-2 weights is in test_gpt2.py."""

import io
import sys

import pytest
import torch

from nanopost import sample
from nanopost.config import UserError
from nanopost.model import GPT
from nanopost.sample import fit


def test_text_stream_holds_back_a_split_character(tok):
    # "é" (2 bytes), "日" (3 bytes) and "🙂" (4 bytes) are single-byte tokens in the nanopost BPE: each arrives in
    # pieces, and nothing may be printed until the piece that completes it
    text = "a é 日 🙂 b"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # some character really is split across tokens
    stream = tok.text_stream()
    pieces = [stream(i) for i in ids]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[ids.index(tok.encode("🙂")[0])] == ""  # the first byte of the emoji printed nothing yet


def test_chat_sample_stops_at_endoftext(tiny_gpt, save_tiny_ckpt, tok, tmp_path, capsys):
    # a model whose every logit favours <|endoftext|>: the chat reply is empty and printed as such; plain text
    # runs on to max_new_tokens and shows the marker
    model = tiny_gpt(uniform=True)
    with torch.no_grad():
        model.lm_head.weight[tok.eot_id] = 1.0
        model.transformer.ln_f.bias.fill_(1.0)
    path = save_tiny_ckpt(tmp_path / "ckpt.pt", model)
    assert sample.main([f"--init_from={path}", "--prompt=hi", "--chat", "--device=cpu"]) == [[]]
    assert capsys.readouterr().out == "\n"
    got = sample.main([f"--init_from={path}", "--prompt=hi", "--max_new_tokens=3", "--device=cpu"])
    assert got == [[tok.eot_id] * 3] and capsys.readouterr().out == "hi" + "<|endoftext|>" * 3 + "\n"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_interactive_chat_keeps_the_conversation(tiny_ckpt, tok, monkeypatch, capsys):
    # no --prompt and a terminal on stdin: one reply per line, each prompt holding the turns before it
    seen = []
    monkeypatch.setattr(sample, "fit", lambda tok_, turns, n: seen.append(turns) or fit(tok_, turns, n))
    monkeypatch.setattr(sys, "stdin", _Terminal("hi\nand again\n"))
    got = sample.main([f"--init_from={tiny_ckpt}", "--chat", "--temperature=0", "--max_new_tokens=4", "--device=cpu"])
    assert len(got) == 2
    first = tok.decode_text(got[0])
    assert seen == [[("user", "hi")], [("user", "hi"), ("assistant", first), ("user", "and again")]]
    assert capsys.readouterr().out.startswith("> " + first + "\n> ")


def test_fit_drops_the_oldest_exchanges(tok):
    turns = [("user", "a" * 20), ("assistant", "b" * 20), ("user", "c" * 20), ("assistant", "d" * 20), ("user", "e")]
    ids, kept = fit(tok, turns, block_size=100)
    assert kept == turns and ids == tok.encode_prompt(turns)
    n_last_two = len(tok.encode_prompt(turns[2:]))
    ids, kept = fit(tok, turns, block_size=n_last_two + 1)  # room for the last exchange and one reply token
    assert kept == turns[2:] and ids == tok.encode_prompt(turns[2:])
    assert fit(tok, turns, block_size=5)[1] == turns[4:]  # the last user turn stays, even when it alone is too long



def test_bad_input_is_one_line(tmp_path):
    for argv, message in [([], "--init_from=PATH is required"),
                          ([f"--init_from={tmp_path}"], f"{tmp_path}: no config.json"),
                          ([f"--init_from={tmp_path}", "--temperature=-1"], "--temperature=-1")]:
        with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
            sample.main(argv)


def _count_generate(monkeypatch):
    """-> list of the batch size of every GPT.generate call from now on."""
    calls, real = [], GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, prompts, *a, **kw: calls.append(len(prompts))
                        or real(self, prompts, *a, **kw))
    return calls


def test_num_samples_are_one_batch(tiny_ckpt, monkeypatch, capsys):
    calls = _count_generate(monkeypatch)
    got = sample.main([f"--init_from={tiny_ckpt}", "--prompt=hi", "--num_samples=3", "--max_new_tokens=5",
                       "--device=cpu"])
    assert calls == [3] and len(got) == 3 and all(len(g) == 5 for g in got)
    out = capsys.readouterr().out
    assert out.count("---------------") == 2 and out.count("hi") >= 3  # each sample after its prompt


def test_a_prompt_file_is_one_batch_equal_to_one_prompt_at_a_time(tiny_ckpt, tok, tmp_path, monkeypatch, capsys):
    # greedy: a left-padded batch samples what each prompt samples alone (positions count real tokens only)
    lines = ["a short one", "and a rather longer prompt than the first", "3"]
    (tmp_path / "p.txt").write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    args = [f"--init_from={tiny_ckpt}", "--temperature=0", "--max_new_tokens=6", "--device=cpu"]
    calls = _count_generate(monkeypatch)
    got = sample.main(args + [f"--prompts={tmp_path / 'p.txt'}", "--num_samples=2"])
    assert calls == [6]
    alone = [sample.main(args + [f"--prompt={p}"])[0] for p in lines]
    assert got == [a for a in alone for _ in range(2)]
    out = capsys.readouterr().out
    assert out.startswith("a short one" + tok.decode_text(alone[0]) + "\n---------------\n")


def test_a_chat_prompt_file_shows_each_user_turn(tiny_ckpt, tok, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Say 3."}\n{"messages": [{"role": "user", "content": "Say 1."}, '
                    '{"role": "assistant", "content": "1+0=1"}, {"role": "user", "content": "Say 4."}]}\n')
    got = sample.main([f"--init_from={tiny_ckpt}", "--chat", f"--prompts={path}", "--temperature=0",
                       "--max_new_tokens=4", "--device=cpu"])
    assert len(got) == 2 and all(tok.eot_id not in g for g in got)
    out = capsys.readouterr().out
    assert out.startswith("> Say 3.\n") and "\n---------------\n> Say 4.\n" in out
    with pytest.raises(UserError, match="holds conversations: sample them with --chat"):
        sample.main([f"--init_from={tiny_ckpt}", f"--prompts={path}", "--device=cpu"])
    with pytest.raises(UserError, match="no prompts"):
        (tmp_path / "empty.txt").write_text("\n\n")
        sample.main([f"--init_from={tiny_ckpt}", f"--prompts={tmp_path / 'empty.txt'}", "--device=cpu"])
