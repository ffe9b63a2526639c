import json
import os
import re

import numpy as np
import pytest
import torch

import kernels
from nanopost import data
from nanopost.config import UserError
from nanopost.data import (IGNORE, collate, load_conversations, load_ppo_prompts, load_prompts, pack, sft_example,
                           sft_examples, windows)
from nanopost.tokenizer import get_tokenizer
from nanopost.world import write_world


def _write(tmp_path, content, name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(p)


def _lines(*objs):
    return "".join(json.dumps(o) + "\n" for o in objs)


def U(text):
    return dict(role="user", content=text)


def A(text):
    return dict(role="assistant", content=text)


def test_every_conversation_shape_reads_as_turns(tmp_path, capsys):
    system = dict(role="system", content="Be brief.")
    jsonl = _write(tmp_path, _lines(
        {"prompt": "What is 2+2?", "completion": "2+2=4"},
        {"messages": [U("Hi <|endoftext|>"), A("Hello")]},
        {"messages": [system, U("a"), A("b"), U("c"), dict(A("d"), weight=1)], "id": 7},  # system, 2 exchanges
        {"messages": [system, A("I speak first.")]},
        {"prompt": [system, U("p")], "completion": [A("c")], "source": "x"},  # TRL conversational
    ))
    assert load_conversations(jsonl) == [
        [("user", "What is 2+2?"), ("assistant", "2+2=4")],
        [("user", "Hi <|endoftext|>"), ("assistant", "Hello")],
        [("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")],
        [("system", "Be brief."), ("assistant", "I speak first.")],
        [("system", "Be brief."), ("user", "p"), ("assistant", "c")],
    ]
    warning = capsys.readouterr().out  # one line for the whole file, naming each ignored key and its count
    assert warning == (f"WARNING: {jsonl}: ignored key(s) id (1 records), messages[].weight (1 records), "
                       f"source (1 records)\n")
    sharegpt = tmp_path / "chats.json"  # ShareGPT: one JSON array, ids on every record
    sharegpt.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "Who are you?"},
                                      {"from": "gpt", "value": "A model."}]},
        {"id": "b", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"},
                                      {"from": "gpt", "value": "Bye!"}]},
    ], indent=2))
    assert load_conversations(str(sharegpt)) == [
        [("user", "Who are you?"), ("assistant", "A model.")],
        [("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye!")],
    ]
    assert capsys.readouterr().out == f"WARNING: {sharegpt}: ignored key(s) id (2 records)\n"


def test_tolerated_details(tmp_path):
    # no final newline, CRLF line ends, a UTF-8 byte-order mark, non-ASCII text
    path = _write(tmp_path, "\ufeff" + '{"prompt": "é?", "completion": "ü"}\r\n{"prompt": "a", "completion": "b"}')
    assert load_conversations(path) == [[("user", "é?"), ("assistant", "ü")], [("user", "a"), ("assistant", "b")]]


def test_ppo(tmp_path, tok):
    history = [U("Write an addition."), A("2+3=5"), U("Now one that equals 17.")]
    path = _write(tmp_path, _lines({"prompt": "Write an addition that equals 17."}, {"prompt": "x", "id": 3},
                                   {"prompt": history}, {"messages": history}))
    conversation = [("user", "Write an addition."), ("assistant", "2+3=5"), ("user", "Now one that equals 17.")]
    assert load_ppo_prompts(path, tok, 64) == ["Write an addition that equals 17.", "x", conversation, conversation]
    # a conversation is prompted as its turns, then <|assistant|>: the same tokens SFT trains on
    ids, _ = tok.encode_turns(conversation)
    assert tok.encode_prompt(conversation) == ids + [tok.assistant_id]
    assert tok.encode_prompt("x") == tok.encode_turns([("user", "x")])[0] + [tok.assistant_id]


def test_ppo_prompts_too_long_are_named_all_at_once(tmp_path, tok):
    # refused at load time, not when a batch happens to draw the prompt hours into a run
    long = "Write an addition that equals 17, " * 8
    path = _write(tmp_path, _lines({"prompt": "x"}, {"prompt": "y"}, {"prompt": long}, {"prompt": "z"}))
    n = len(tok.encode_prompt(long))
    limit = len(tok.encode_prompt(long)) - 1  # one token short: the boundary, not a wide margin
    with pytest.raises(UserError, match=f"^1 of 4 prompts do not fit in {limit} tokens in the chat format "
                                        f"\\(block_size minus max_new_tokens\\): {re.escape(path)}:3 \\({n} tokens\\)\\. "
                                        f"--too_long=drop leaves them out, --too_long=truncate keeps the end of each$"):
        load_ppo_prompts(path, tok, limit)
    assert load_ppo_prompts(path, tok, n)[2] == long  # exactly full is allowed
    # a dozen too long: one run names how many and the first three, not one per run
    many = _write(tmp_path, _lines(*[{"prompt": long if i % 2 else "x"} for i in range(25)]), "many.jsonl")
    with pytest.raises(UserError, match=f"^12 of 25 prompts do not fit .*: {re.escape(many)}:2 \\({n} tokens\\), "
                                        f"{re.escape(many)}:4 .*, {re.escape(many)}:6 .* and 9 more\\. --too_long"):
        load_ppo_prompts(many, tok, limit)


def test_ppo_prompts_too_long_dropped_or_truncated(tmp_path, capsys):
    from nanopost.tokenizer import TRAINED_SPECIALS, bpe_text, from_bpe_text
    from nanopost.train_tokenizer import train_bpe
    tok = from_bpe_text("t.bpe", bpe_text(train_bpe(["What is 2+2? Answer briefly."], 300, 4), TRAINED_SPECIALS),
                        "t.bpe")  # a tokenizer with a system turn
    long = "Write an addition that equals 17, " * 8
    system = [("system", "Answer briefly.")]
    exchange = [("user", "What is 2+2? " * 3), ("assistant", "4")]
    conversation = system + exchange * 3 + [("user", long)]
    path = _write(tmp_path, _lines({"prompt": "x"}, {"prompt": long},
                                   {"messages": [{"role": r, "content": c} for r, c in conversation]}))
    limit = 40
    assert load_ppo_prompts(path, tok, limit, too_long="drop") == ["x"]
    assert "data: 2 of 3 prompts do not fit in 40 tokens" in capsys.readouterr().out
    kept = load_ppo_prompts(path, tok, limit, too_long="truncate")
    assert kept[0] == "x" and long.endswith(kept[1]) and len(tok.encode_prompt(kept[1])) == limit
    # the conversation: its older exchanges go, the system turn stays, the last turn keeps its end
    assert kept[2][0] == system[0] and kept[2][-1][0] == "user" and long.endswith(kept[2][-1][1])
    assert len(tok.encode_prompt(kept[2])) <= limit and len(kept[2]) == 2
    # no room for the system turn and one character: truncation cannot help, so that prompt is left out
    tight = len(tok.encode_prompt(system + [("user", "x")])) - 1
    assert load_ppo_prompts(path, tok, tight, too_long="truncate") == ["x", long[-tight + 2:]]
    with pytest.raises(UserError, match="no prompt fits in 2 tokens"):  # and none left at all is an error
        load_ppo_prompts(path, tok, 2, too_long="drop")


GOOD = '{"prompt": "p", "completion": "c"}\n'
SYS = '{"role": "system", "content": "s"}'
USER, ASSISTANT = '{"role": "user", "content": "a"}', '{"role": "assistant", "content": "b"}'


@pytest.mark.parametrize("content,line,what", [
    ("", None, "empty file"),
    ("\n", 1, "blank line"),
    (GOOD + "\n" + GOOD, 2, "blank line"),
    (GOOD + "   \n", 2, "blank line"),
    (GOOD + GOOD + "\n", 3, "blank line"),                # a trailing empty line after the final newline
    (GOOD + '{"prompt": "p", "completion": }\n', 2, "invalid JSON"),
    ('{"prompt": "p"}\n', 1, r'expected "prompt" and "completion", "messages" or "conversations"'),
    ('{"completion": "c"}\n', 1, "expected"),
    ('{"prompt": "p", "response": "c"}\n', 1, r"got keys \['prompt', 'response'\]"),  # a typo is not metadata
    ('{"prompt": 3, "completion": "c"}\n', 1, "prompt must be a string, got int"),
    ('{"prompt": "p", "completion": null}\n', 1, "completion must be a string, got NoneType"),
    ('{"prompt": "p", "completion": ["c"]}\n', 1, r"completion\[0\] must be an object"),
    ('{"prompt": "", "completion": "c"}\n', 1, "prompt is empty"),
    ('{"prompt": "p", "completion": ""}\n', 1, "completion is empty"),  # an empty assistant turn
    ('["p", "c"]\n', 1, "expected a JSON object, got list"),
    ('"just a string"\n', 1, "expected a JSON object"),
    ('{"messages": "hi"}\n', 1, "messages must be a non-empty list"),
    ('{"messages": []}\n', 1, "messages must be a non-empty list"),
    (f'{{"messages": [{USER}]}}\n', 1, "ending with assistant"),
    (f'{{"messages": [{SYS}]}}\n', 1, "ending with assistant"),
    (f'{{"messages": [{USER}, {ASSISTANT}, {USER}]}}\n', 1, "ending with assistant"),
    (f'{{"messages": [{USER}, {USER}, {ASSISTANT}]}}\n', 1, "alternating"),
    (f'{{"messages": [{USER}, {SYS}, {ASSISTANT}]}}\n', 1, "an optional system turn"),
    ('{"messages": ["a", "b"]}\n', 1, r"messages\[0\] must be an object with 'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "b"}]}\n', 1,
     r"messages\[0\].content must be a string"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}\n', 1, "must be an object with"),
    ('{"messages": [{"role": "bot", "content": "a"}]}\n', 1, r"messages\[0\].role is 'bot'"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "bard", "value": "b"}]}\n', 1,
     r"conversations\[1\].from is 'bard'; expected system, human or gpt"),
    (f'{{"messages": [{USER}, {{"role": "assistant", "content": ""}}]}}\n', 1, r"messages\[1\].content is empty"),
    (b'{"prompt": "p", "completion": "\xff"}\n', 1, "not valid UTF-8"),
    (GOOD.encode() + b'{"prompt": "\xc3", "completion": "c"}\n', 2, "not valid UTF-8"),
])
def test_sft_errors(tmp_path, content, line, what):
    path = _write(tmp_path, content)
    where = f"{path}:{line}: " if line else f"{path}: "
    with pytest.raises(UserError, match=f"^{re.escape(where)}.*{what}"):
        load_conversations(path)


def test_json_array_errors_name_the_line(tmp_path):
    good = '  {"prompt": "p", "completion": "c"}'
    for content, line, what in [
        ('{"prompt": "p", "completion": "c"}', None, "expected one JSON array"),
        (f'[\n{good},\n{good},\n  {{"prompt": 1, "completion": "c"}}\n]', 4, "prompt must be a string"),
        (f'[\n{good},\n  {{"prompt": "p",, }}\n]', 3, "invalid JSON"),
        (f'[\n{good},\n  7\n]', 3, "expected a JSON object, got int"),
        ("[]", None, "no records"),
    ]:
        path = _write(tmp_path, content, "chats.json")
        where = f"{path}:{line}: " if line else f"{path}: "
        with pytest.raises(UserError, match=f"^{re.escape(where)}.*{what}"):
            load_conversations(path)


@pytest.mark.parametrize("content,line,what", [
    ("", None, "empty file"),
    ('{"prompt": "a"}\n\n', 2, "blank line"),
    ('{"prompt": "a"}\n{"prompt": 1}\n', 2, "prompt must be a string, got int"),
    ('{"prompt": "a", "completion": "b"}\n', 1, "ending with user"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', 1,
     "ending with user"),
    ('{"text": "a"}\n', 1, 'expected "prompt", "messages" or "conversations"'),
    ('{"prompt": "a"\n', 1, "invalid JSON"),
])
def test_ppo_errors(tmp_path, tok, content, line, what):
    path = _write(tmp_path, content)
    where = f"{path}:{line}: " if line else f"{path}: "
    with pytest.raises(UserError, match=f"^{re.escape(where)}.*{what}"):
        load_ppo_prompts(path, tok, 64)


def test_missing_file(tmp_path, tok):
    path = str(tmp_path / "nope.jsonl")
    for load in (load_conversations, lambda p: load_ppo_prompts(p, tok, 64),
                 lambda p: data.load_corpus(p, tok, str(tmp_path))):
        with pytest.raises(UserError, match=f"^{re.escape(path)}: cannot read"):
            load(path)


def test_roundtrip_with_write_world(tmp_path, world, tok):
    w = world
    write_world(str(tmp_path), seed=0)
    for split, examples in (("train", w.sft_train), ("val", w.sft_val)):
        assert load_conversations(os.path.join(tmp_path, f"sft_{split}.jsonl")) == [
            [("user", ex["prompt"]), ("assistant", ex["completion"])] for ex in examples]
    assert load_ppo_prompts(os.path.join(tmp_path, "ppo_prompts.jsonl"), tok, 64) == w.ppo_prompts
    assert load_ppo_prompts(os.path.join(tmp_path, "eval_prompts.jsonl"), tok, 64) == w.eval_prompts



def test_load_prompts_checks_the_fit_of_file_and_builtin_prompts(tmp_path, tok):
    builtin = ["x", "Write an addition that equals 17."]
    longest = len(tok.encode_prompt(builtin[1]))
    assert load_prompts("", builtin, tok, block_size=longest + 4, max_new_tokens=4) == builtin  # exactly fits
    with pytest.raises(UserError, match=rf"^--max_new_tokens=5: the longest built-in prompt is {longest} tokens, "
                                        rf"and prompt \+ response must fit block_size={longest + 4}$"):
        load_prompts("", builtin, tok, block_size=longest + 4, max_new_tokens=5)
    # a file: the same budget, and the line of the prompt that does not fit
    path = _write(tmp_path, _lines(*({"prompt": p} for p in builtin)))
    assert load_prompts(path, [], tok, block_size=longest + 4, max_new_tokens=4) == builtin
    with pytest.raises(UserError, match=f"^1 of 2 prompts do not fit .*: {re.escape(path)}:2 \\({longest} tokens"):
        load_prompts(path, [], tok, block_size=longest + 4, max_new_tokens=5)
    assert load_prompts(path, [], tok, block_size=longest + 4, max_new_tokens=5, too_long="drop") == ["x"]


# -----------------------------------------------------------------------------
# batches

def test_response_mask_only_response_tokens_count(tok):
    prompt, completion = "Write an addition that equals 12.", "1+11=12"
    x, y, dropped = sft_example(tok, [("user", prompt), ("assistant", completion)], block_size=64)
    p, r = tok.encode_prompt(prompt), tok.encode_response(completion)
    assert dropped == 0
    assert x == p + r[:-1]
    assert y == [IGNORE] * (len(p) - 1) + r  # the first response token is predicted from <|assistant|>

    # a second, shorter example forces right padding in the batch
    x2, y2, _ = sft_example(tok, [("user", "Make 20 by adding two numbers."), ("assistant", "1+19=20")], 64)
    X, Y = collate([(x, y), (x2, y2)], pad_id=tok.eot_id)  # (2, T)
    assert X.shape == Y.shape == (2, max(len(x), len(x2)))
    assert (Y[1, len(y2):] == IGNORE).all() and (X[1, len(x2):] == tok.eot_id).all()

    # the loss is the response tokens' cross-entropy, and prompt/pad positions get exactly zero gradient:
    # whatever the model predicts there, and whatever tokens sit there, the loss cannot see it
    logits = torch.randn(*X.shape, tok.vocab_size, requires_grad=True)  # (2, T, V)
    loss = kernels.cross_entropy(logits.flatten(0, 1), Y.flatten(), reduction="sum")
    logp = torch.log_softmax(logits.detach().double(), dim=-1)  # (2, T, V)
    want = -sum(logp[b, t, Y[b, t]] for b in range(2) for t in range(X.shape[1]) if Y[b, t] != IGNORE)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-4)
    loss.backward()
    masked = Y == IGNORE  # (2, T)
    assert masked.sum() > 0 and (~masked).sum() == len(r) + len(tok.encode_response("1+19=20"))
    assert (logits.grad[masked] == 0).all()
    assert (logits.grad[~masked].abs().sum(-1) > 0).all()


def test_multi_turn_loss_is_on_every_assistant_turn_and_nothing_else(tmp_path):
    from nanopost.tokenizer import TRAINED_SPECIALS, bpe_text, from_bpe_text
    from nanopost.train_tokenizer import train_bpe
    tok = from_bpe_text("t.bpe", bpe_text(train_bpe(["hello there"], 270, 4), TRAINED_SPECIALS), "t.bpe")
    turns = [("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye!")]
    x, y, dropped = sft_example(tok, turns, block_size=64)
    enc = tok.encode
    S, U, A, E = tok.system_id, tok.user_id, tok.assistant_id, tok.eot_id
    # token by token: the whole conversation, and what each position is trained to predict
    full = [S, *enc("Be kind."), U, *enc("Hi"), A, *enc("Hello!"), E, U, *enc("Bye"), A, *enc("Bye!"), E]
    learned = ([False] * (1 + len(enc("Be kind.")) + 1 + len(enc("Hi")) + 1) + [True] * (len(enc("Hello!")) + 1)
               + [False] * (1 + len(enc("Bye")) + 1) + [True] * (len(enc("Bye!")) + 1))
    assert x == full[:-1] and dropped == 0
    assert y == [t if keep else IGNORE for t, keep in zip(full[1:], learned[1:])]
    assert tok.decode([t for t in y if t != IGNORE]) == "Hello!<|endoftext|>Bye!<|endoftext|>"
    # the shipped tokenizer has no <|system|>: a system turn is refused, naming the way out
    with pytest.raises(UserError, match="has no <\\|system\\|> token"):
        sft_example(get_tokenizer("nanopost"), turns, 64)


def test_long_conversations_drop_their_oldest_exchanges_first(tok):
    turns = [("user", "first question"), ("assistant", "first answer"), ("user", "second question"),
             ("assistant", "second answer"), ("user", "third"), ("assistant", "the last answer")]
    whole, _ = tok.encode_turns(turns)
    last_two, _ = tok.encode_turns(turns[2:])
    last, _ = tok.encode_turns(turns[4:])
    assert sft_example(tok, turns, len(whole) - 1)[2] == 0  # exactly fits
    x, y, dropped = sft_example(tok, turns, len(whole) - 2)  # one token short: the oldest exchange goes
    assert dropped == 1 and x == last_two[:-1]
    x, y, dropped = sft_example(tok, turns, len(last) - 1)
    assert dropped == 2 and x == last[:-1]
    assert tok.decode([t for t in y if t != IGNORE]) == "the last answer<|endoftext|>"  # learned whole, never cut
    assert sft_example(tok, turns, len(last) - 2) is None  # the last exchange alone does not fit: dropped
    x, y, dropped = sft_example(tok, turns, 5, truncate=True)  # unless truncated: its last 6 tokens
    assert x == last[-6:-1] and y == last[-5:] and dropped == 2


def test_sft_conversations_too_long_named_dropped_or_truncated(tok, capsys):
    fits = [("user", "hi"), ("assistant", "ok")]
    long = [("user", "Write an addition that equals 17. " * 4), ("assistant", "17+0=17")]
    numbered = [(f"c.jsonl:{i + 1}", long if i in (1, 4, 5, 8) else fits) for i in range(10)]
    block_size = len(tok.encode_turns(fits)[0]) + 4
    with pytest.raises(UserError, match=r"^4 of 10 sft train conversations \(the last exchange alone\) do not fit in "
                                        r"block_size=\d+: c.jsonl:2, c.jsonl:5, c.jsonl:6 and 1 more\. --too_long=drop"):
        sft_examples(numbered, tok, block_size, "error", "sft train")
    assert len(sft_examples(numbered, tok, block_size, "drop", "sft train")) == 6
    assert "data: 4 of 10 sft train conversations (the last exchange alone) do not fit" in capsys.readouterr().out
    cut = sft_examples(numbered, tok, block_size, "truncate", "sft train")
    assert len(cut) == 10 and all(len(x) == block_size for x, _ in cut[1:2] + cut[4:6] + cut[8:9])
    assert tok.decode([t for t in cut[1][1] if t != IGNORE]) == "17+0=17<|endoftext|>"  # the answer's end learned


def test_windows_targets_are_inputs_shifted_by_one():
    stream = np.arange(100, 120, dtype=np.uint16)  # a token memmap's dtype
    X, Y = windows(stream, [0, 7, 16], block_size=3)
    assert X.dtype == Y.dtype == torch.long  # 16: the last start whose target window fits
    assert X.tolist() == [[100, 101, 102], [107, 108, 109], [116, 117, 118]]
    assert Y.tolist() == [[101, 102, 103], [108, 109, 110], [117, 118, 119]]


def test_pack_puts_every_example_once_in_rows_that_fit():
    rng = np.random.default_rng(0)
    examples = []
    for n in [9, 1, 5, 12, 3, 3, 7, 12, 2]:
        x = rng.integers(1, 50, n).tolist()
        examples.append((x, [IGNORE] * (n // 2) + x[n // 2:]))  # a prompt part without loss, like an SFT example
    X, Y, seg = pack(examples, block_size=12, pad_id=0)
    # first-fit by decreasing length: 12 | 12 | 9+3 | 7+5 | 3+2+1 -> 5 rows instead of 9, no row over 12
    assert X.shape == Y.shape == seg.shape == (5, 12)
    found = []
    for r in range(len(X)):
        ids = seg[r].tolist()
        n_real = sum(1 for s in ids if s)
        assert ids == sorted(ids, key=lambda s: s == 0), "padding only after the examples"
        assert sorted(set(ids) - {0}) == list(range(1, max(ids) + 1)), "examples numbered 1, 2, ... per row"
        assert (X[r, n_real:] == 0).all() and (Y[r, n_real:] == IGNORE).all()
        for s in range(1, max(ids) + 1):
            at = seg[r] == s
            found.append((X[r][at].tolist(), Y[r][at].tolist()))
    assert sorted(found) == sorted(examples)


# -----------------------------------------------------------------------------
# your corpus: .txt or .jsonl of {"text": ...}, tokenized once into a cached memmap

HOSTILE = ("First line.\n\nSecond  paragraph, with   spaces.\n   indented line\n" + "x" * 300 + "\n"
           "naïve café ☕ 12+34=46\r\n\tTabbed.\n") * 40


def test_corpus_blocks_tokenize_exactly_as_the_whole_file(tmp_path, tok, monkeypatch):
    path = _write(tmp_path, HOSTILE, "c.txt")
    for block in (7, 50, 333, 10_000):  # a block shorter than a line, and one longer than the file
        monkeypatch.setattr(data, "CORPUS_BLOCK", block)
        pieces = list(data.corpus_texts(path))
        assert "".join(t for t, _ in pieces) == HOSTILE
        assert [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]
        assert [i for t, _ in pieces for i in tok.encode(t)] == tok.encode(HOSTILE)


def test_corpus_is_tokenized_once_and_cached_while_nothing_changes(tmp_path, tok, monkeypatch):
    path = _write(tmp_path, HOSTILE, "c.txt")
    tokens, digest = data.load_corpus(path, tok, str(tmp_path / "fallback"))
    assert tokens.dtype == np.uint16 and tokens.tolist() == tok.encode(HOSTILE) + [tok.eot_id]
    cached = [n for n in os.listdir(tmp_path) if n.startswith("c.txt.") and n.endswith(".tokens")]
    assert cached == [f"c.txt.{tok.fingerprint}.tokens"]
    # unchanged: read back from the cache, never re-encoded
    monkeypatch.setattr(type(tok), "encode", lambda self, text: pytest.fail("re-tokenized an unchanged corpus"))
    again, digest2 = data.load_corpus(path, tok, str(tmp_path / "fallback"))
    assert digest2 == digest and np.array_equal(again, tokens)
    monkeypatch.undo()
    # the file changes: tokenized again
    with open(path, "a") as f:
        f.write("A new line.\n")
    changed, digest3 = data.load_corpus(path, tok, str(tmp_path / "fallback"))
    assert digest3 != digest and changed.tolist() == tok.encode(HOSTILE + "A new line.\n") + [tok.eot_id]


def test_corpus_cache_of_another_tokenizer_and_a_read_only_folder(tmp_path, tok):
    from nanopost.tokenizer import TRAINED_SPECIALS, bpe_text, from_bpe_text
    from nanopost.train_tokenizer import train_bpe
    mine = from_bpe_text("mine.bpe", bpe_text(train_bpe([HOSTILE], 300, 4), TRAINED_SPECIALS), "mine.bpe")
    folder = tmp_path / "shared"  # read-only, as ../shared/data is in CI: not written into, even by root
    folder.mkdir()
    path = _write(folder, HOSTILE, "c.txt")
    folder.chmod(0o555)
    try:
        a, _ = data.load_corpus(path, tok, str(tmp_path / "fallback"))
        b, _ = data.load_corpus(path, mine, str(tmp_path / "fallback"))
    finally:
        folder.chmod(0o755)
    assert os.listdir(folder) == ["c.txt"]
    assert sorted(os.listdir(tmp_path / "fallback")) == sorted(
        f"c.txt.{t.fingerprint}.tokens{ext}" for t in (tok, mine) for ext in ("", ".json"))
    assert b.tolist() == mine.encode(HOSTILE) + [mine.eot_id] and len(b) < len(a)


def test_jsonl_corpus_ends_every_document(tmp_path, tok):
    path = _write(tmp_path, "".join(json.dumps(dict(text=t, source="x")) + "\n" for t in ("one doc", "two docs")))
    assert data.is_corpus(path)
    tokens, _ = data.load_corpus(path, tok, str(tmp_path))
    assert tokens.tolist() == tok.encode("one doc") + [tok.eot_id] + tok.encode("two docs") + [tok.eot_id]
    bad = _write(tmp_path, '{"text": "fine"}\n{"text": 3}\n', "bad.jsonl")
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected an object with a \"text\" string"):
        data.load_corpus(bad, tok, str(tmp_path))
    assert not data.is_corpus(_write(tmp_path, '{"prompt": "p", "completion": "c"}\n', "sft.jsonl"))
    assert data.is_corpus("anything.txt")
