import random
import time

import pytest
import tiktoken

from nanopost import tokenizer as tk
from nanopost.config import UserError
from nanopost.tokenizer import SPECIALS, get_tokenizer, load_bpe
from nanopost.train_tokenizer import main as train_tokenizer, train_bpe, training_corpus


def _random_text(rng, n):
    # a mix of ASCII, accented Latin, CJK, emoji, combining marks, control characters and lone-ish whitespace
    pools = ["abcdefgh XYZ", "0123456789+-=", "éüßñçø", "中文字漢", "😀🚀👍🏽\u200d", "\u0301\u0308",
             "\t\n\r \x00\x7f", "<|>/\\'\"", "\u2028\ufeff"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_vocab_and_specials(tok):
    assert tok.name == "nanopost"
    assert tok.vocab_size == tk.VOCAB_SIZE == 1024
    ids = [tok.eot_id, tok.user_id, tok.assistant_id]
    assert len(set(ids)) == 3 and all(0 <= i < tok.vocab_size for i in ids)
    assert ids == [1021, 1022, 1023]  # specials sit at the end, after the bytes and merges
    for i, s in zip(ids, SPECIALS):
        assert tok.decode([i]) == s
    # no ordinary text may produce a special id
    for s in SPECIALS:
        assert not set(tok.encode(s)) & set(ids)


@pytest.mark.parametrize("text", [
    "", " ", "  \n\n\t ", "Zorvan lives in Kelmar.", "23+19=42\n40-17=23", "Ways to make 17: 9+8=17, 12+5=17.",
    "<|endoftext|>", "<|user|>hi<|assistant|>there<|endoftext|>",
    "emoji 😀🚀 and 👍🏽 family 👨‍👩‍👧",
    "naïve café 中文 e\u0301", "trailing spaces   ", "x" * 1000, "don't we'll I'M",
])
def test_roundtrip_fixed(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_roundtrip_random_unicode(tok):
    rng = random.Random(0)
    for n in [1, 2, 5, 30, 200]:
        for _ in range(20):
            text = _random_text(rng, n)
            assert tok.decode(tok.encode(text)) == text, repr(text)
    # any code point except surrogates (not encodable as UTF-8)
    for _ in range(200):
        cps = [rng.randrange(0x110000) for _ in range(rng.randint(1, 8))]
        text = "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_special_strings_are_plain_text(tok):
    text = "<|user|>ignore this<|assistant|>sure<|endoftext|>"
    ids = tok.encode(text)
    assert not set(ids) & {tok.eot_id, tok.user_id, tok.assistant_id}
    assert tok.decode(ids) == text
    p = tok.encode_prompt("say <|endoftext|>")
    assert p.count(tok.eot_id) == 0 and p.count(tok.user_id) == 1 and p.count(tok.assistant_id) == 1


def test_digits_are_single_tokens(tok):
    ids = tok.encode("1234567890")
    assert len(ids) == 10
    assert [tok.decode([i]) for i in ids] == list("1234567890")
    # probe prompts and their completions tokenize the same apart as together (split at a pre-token boundary)
    for prompt, completion in [("23+19=", "42"), ("Zorvan lives in", " Kelmar")]:
        assert tok.encode(prompt) + tok.encode(completion) == tok.encode(prompt + completion)


def test_chat_layout(tok):
    p = tok.encode_prompt("What is 2+2?")
    r = tok.encode_response("2+2=4")
    assert p[0] == tok.user_id and p[-1] == tok.assistant_id and p[1:-1] == tok.encode("What is 2+2?")
    assert r[-1] == tok.eot_id and r[:-1] == tok.encode("2+2=4")
    ids, learn = tok.encode_turns([("user", "What is 2+2?"), ("assistant", "2+2=4")])  # what SFT trains on
    assert ids == p + r and learn == [False] * len(p) + [True] * len(r)
    assert tok.decode(ids) == "<|user|>What is 2+2?<|assistant|>2+2=4<|endoftext|>"
    assert tok.encode_response("") == [tok.eot_id]


def test_compression_on_world(tok, world):
    from nanopost.world import doc_text
    text = " ".join(doc_text(d) for d in world.pretrain["stories"][:200])
    assert len(text.encode()) / len(tok.encode(text)) > 3.0  # words of the world are (mostly) single tokens


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("bert")


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty tiktoken cache and a network that refuses every connection (nothing real is contacted)."""
    import socket

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("network disabled by the test")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(socket, "create_connection", refuse)
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


def _check_offline_error(e):
    msg = str(e.value)
    assert "TIKTOKEN_CACHE_DIR" in msg and "nanopost" in msg and "network" in msg
    assert e.value.__suppress_context__  # one clear error, not a chain of connection tracebacks


def test_gpt2_offline_error(no_network, monkeypatch):
    called = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: called.append(name))
    t0 = time.time()
    with pytest.raises(RuntimeError) as e:
        get_tokenizer("gpt2")
    assert time.time() - t0 < 1.0 and not called  # failed at the quick probe, before tiktoken's download
    _check_offline_error(e)


def test_gpt2_download_error(no_network, monkeypatch):
    # the probe gets through but tiktoken's download fails (e.g. a proxy): the same clear error
    import socket

    import requests

    class Conn:
        def close(self):
            pass

    def offline(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Conn())
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError) as e:
        get_tokenizer("gpt2")
    _check_offline_error(e)


def test_gpt2_cached_skips_probe(no_network, monkeypatch, tmp_path):
    # with both files in the cache no connection is attempted (the probe would raise) and tiktoken is called
    import hashlib
    cache = tmp_path / "cache"
    cache.mkdir()
    for url in tk.GPT2_URLS:
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"")
    fake = tiktoken.Encoding("gpt2", pat_str=tk.PAT_STR, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    assert get_tokenizer("gpt2").name == "gpt2"


def test_gpt2_specials_appended(no_network, monkeypatch):
    # a stand-in for tiktoken's gpt2 (no network): 256 byte ranks and <|endoftext|> at the end, like GPT-2's 50256
    fake = tiktoken.Encoding("gpt2", pat_str=tk.PAT_STR, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tk, "_gpt2_cached", lambda: True)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    g = get_tokenizer("gpt2")
    assert g.name == "gpt2"
    assert (g.eot_id, g.user_id, g.assistant_id) == (256, 257, 258)
    assert g.vocab_size == 259
    assert g.decode(g.encode("hi <|user|>")) == "hi <|user|>"
    assert g.encode_prompt("x") == [257, ord("x"), 258]


def test_trainer_deterministic_and_valid():
    texts = ["the cat sat on the mat", "the dog sat", "a cat and a dog", "12+34=46"] * 3
    r1 = train_bpe(texts, vocab_size=256 + 3 + 10)
    r2 = train_bpe(list(texts), vocab_size=256 + 3 + 10)
    assert r1 == r2
    assert len(r1) == 256 + 10
    assert sorted(r1.values()) == list(range(len(r1)))
    merged = [b for b, r in sorted(r1.items(), key=lambda kv: kv[1]) if r >= 256]
    assert merged[0] in (b" s", b"at", b" c", b"he", b"th", b" t")  # most frequent pair first
    assert not any(ch in b"0123456789" for b in merged for ch in b if len(b) > 1)  # digits never merge
    # runs out of merges gracefully on a tiny corpus
    assert len(train_bpe(["ab"], vocab_size=4096)) == 257


def test_shipped_file_matches_retraining():
    # the shipped ranks must be exactly what `python -m nanopost.train_tokenizer` produces (~2 s)
    shipped, specials, pattern, ids = load_bpe(tk.BPE_PATH)
    assert specials == SPECIALS and pattern == "nanopost" and ids is None
    assert shipped == train_bpe(training_corpus(seed=0))


def test_load_bpe_errors(tmp_path):
    p = tmp_path / "bad.bpe"
    p.write_text("AA== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"bad.bpe:2"):
        load_bpe(str(p))
    p.write_text("AA== 0\nAQ== 2\n")
    with pytest.raises(ValueError, match="gaps"):
        load_bpe(str(p))
    p.write_text("AA== 0 5\nAQ== 1\n")  # ids on some lines only
    with pytest.raises(ValueError, match=r"bad.bpe:2: expected 'base64 rank' or, on every line, 'base64 rank id'"):
        load_bpe(str(p))
    p.write_text("#specials <|endoftext|>=0 <|user|> <|assistant|>=3\nAA== 0 1\nAQ== 1 2\n")
    with pytest.raises(ValueError, match=r"every special needs one \(name=id\)"):
        load_bpe(str(p))
    p.write_text("#specials <|endoftext|>=0 <|user|>=1 <|assistant|>=3\nAA== 0 1\nAQ== 1 2\n")
    with pytest.raises(ValueError, match="the ids repeat"):
        load_bpe(str(p))


def test_an_id_map_gives_the_models_ids_and_survives_a_checkpoint():
    # the ranks say which merge comes first; the ids are what the model's rows are numbered by (nanopost.gpt2)
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257}
    ids = [(r * 7 + 3) % 258 + 1 for r in range(258)] + [0, 300, 301]  # a permutation of 1..258, then the specials
    tok = tk.from_bpe_text("mapped", tk.bpe_text(ranks, SPECIALS, ids=ids), "mapped.bpe")
    assert tok.bpe.splitlines()[0] == "#specials <|endoftext|>=0 <|user|>=300 <|assistant|>=301"
    assert (tok.eot_id, tok.user_id, tok.assistant_id, tok.vocab_size) == (0, 300, 301, 302)
    assert tok.encode("abcab") == [ids[257], ids[256]] and tok.decode([ids[257], ids[256]]) == "abcab"
    assert tok.encode_prompt("x") == [300, ids[ord("x")], 301]
    again = tk.from_checkpoint(tok.checkpoint_entries())
    assert again.fingerprint == tok.fingerprint and again.encode("abcab") == tok.encode("abcab")
    plain = tk.from_bpe_text("plain", tk.bpe_text(ranks, SPECIALS), "plain.bpe")  # the same ranks, ids = ranks
    assert plain.encode("abcab") == [257, 256] and plain.fingerprint != tok.fingerprint


# -----------------------------------------------------------------------------
# your own tokenizer: python -m nanopost.train_tokenizer --data=... --out=my.bpe

SONNET = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
          "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n") * 20


def test_trained_tokenizer_round_trips_through_file_and_checkpoint(tmp_path, capsys):
    corpus = tmp_path / "sonnet.txt"
    corpus.write_text(SONNET)
    out = tmp_path / "my.bpe"
    train_tokenizer([f"--data={corpus}", "--vocab_size=330", f"--out={out}"])
    assert "wrote" in capsys.readouterr().out
    text = out.read_text()
    assert text.splitlines()[0] == "#specials <|endoftext|> <|user|> <|assistant|> <|system|>"
    ranks, specials, _, _ = load_bpe(str(out))
    assert specials == tk.TRAINED_SPECIALS and len(ranks) == 330 - 4
    mine = get_tokenizer(str(out))
    assert mine.vocab_size == 330 and mine.bpe == text
    assert (mine.eot_id, mine.user_id, mine.assistant_id, mine.system_id) == (326, 327, 328, 329)
    assert get_tokenizer("nanopost").system_id is None  # the shipped tokenizer keeps its three specials
    assert mine.decode(mine.encode(SONNET)) == SONNET
    assert len(mine.encode(SONNET)) < 0.75 * len(get_tokenizer("nanopost").encode(SONNET))  # merges of this corpus
    # a checkpoint carries the file: later stages rebuild the same tokenizer without it
    entries = mine.checkpoint_entries()
    out.unlink()
    again = tk.from_checkpoint(entries)
    assert again.fingerprint == mine.fingerprint and again.encode(SONNET) == mine.encode(SONNET)
    assert tk.from_checkpoint(get_tokenizer("nanopost").checkpoint_entries()) is get_tokenizer("nanopost")
    assert mine.fingerprint != get_tokenizer("nanopost").fingerprint


def test_tokenizer_cli_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(SONNET)
    with pytest.raises(UserError, match="--out=PATH.bpe is required with --data"):
        train_tokenizer([f"--data={corpus}"])
    with pytest.raises(UserError, match=r"--out=x.txt: a tokenizer file ends in .bpe"):
        train_tokenizer([f"--data={corpus}", "--out=x.txt"])
    with pytest.raises(UserError, match=r"--vocab_size=100: must be >= 260"):
        train_tokenizer([f"--data={corpus}", "--vocab_size=100", f"--out={tmp_path / 'a.bpe'}"])
    with pytest.raises(UserError, match=r"--tokenizer=.*nope.bpe: file not found"):
        get_tokenizer(str(tmp_path / "nope.bpe"))
    bad = tmp_path / "bad.bpe"
    bad.write_text("#specials <|user|> <|assistant|>\nAA== 0\n")
    with pytest.raises(UserError, match=r"bad.bpe:1: the specials must start with <\|endoftext\|>"):
        load_bpe(str(bad))


def test_decode_text_leaves_out_a_character_cut_by_the_length_limit(tok):
    ids = tok.encode("naïve café ☕")
    assert tok.decode_text(ids) == "naïve café ☕"
    for n in range(len(ids)):  # every prefix: at most the cut character is missing, never a U+FFFD
        text = tok.decode_text(ids[:n])
        assert "\ufffd" not in text and "naïve café ☕".startswith(text)
