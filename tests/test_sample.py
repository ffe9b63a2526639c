"""The sampler (nanopost.sample) on nanopost checkpoints: streaming text, the chat's end, the interactive loop.
Its equality with Hugging Face's greedy generate on GPT-2 weights is in test_gpt2.py."""

import io
import sys

import pytest
import torch

from nanopost import sample
from nanopost.common import UserError
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
