import json
import re
import os

import pytest

from nanopost.data import load_docs_jsonl, load_ppo_jsonl, load_sft_jsonl
from nanopost.world import load_world, write_world


def _write(tmp_path, content, name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(p)


def _lines(*objs):
    return "".join(json.dumps(o) + "\n" for o in objs)


def test_sft_both_formats(tmp_path):
    path = _write(tmp_path, _lines(
        {"prompt": "What is 2+2?", "completion": "2+2=4"},
        {"messages": [{"role": "user", "content": "Hi <|endoftext|>"}, {"role": "assistant", "content": "Hello"}]},
    ))
    assert load_sft_jsonl(path) == [dict(prompt="What is 2+2?", completion="2+2=4"),
                                    dict(prompt="Hi <|endoftext|>", completion="Hello")]


def test_tolerated_details(tmp_path):
    # no final newline, CRLF line ends, a UTF-8 byte-order mark, non-ASCII text
    path = _write(tmp_path, "\ufeff" + '{"prompt": "é?", "completion": "ü"}\r\n{"prompt": "a", "completion": "b"}')
    assert load_sft_jsonl(path) == [dict(prompt="é?", completion="ü"), dict(prompt="a", completion="b")]


def test_ppo(tmp_path):
    path = _write(tmp_path, _lines({"prompt": "Write an addition that equals 17."}, {"prompt": "x"}))
    assert load_ppo_jsonl(path) == ["Write an addition that equals 17.", "x"]


GOOD = '{"prompt": "p", "completion": "c"}\n'


@pytest.mark.parametrize("content,line,what", [
    ("", None, "empty file"),
    ("\n", 1, "blank line"),
    (GOOD + "\n" + GOOD, 2, "blank line"),
    (GOOD + "   \n", 2, "blank line"),
    (GOOD + GOOD + "\n", 3, "blank line"),                # a trailing empty line after the final newline
    (GOOD + '{"prompt": "p", "completion": }\n', 2, "invalid JSON"),
    ('{"prompt": "p"}\n', 1, r"missing key\(s\) \['completion'\]"),
    ('{"completion": "c"}\n', 1, "missing key"),
    ('{"prompt": "p", "response": "c"}\n', 1, r"unknown key\(s\) \['response'\]"),
    ('{"prompt": 3, "completion": "c"}\n', 1, "prompt must be a string, got int"),
    ('{"prompt": "p", "completion": null}\n', 1, "completion must be a string, got NoneType"),
    ('{"prompt": "p", "completion": ["c"]}\n', 1, "completion must be a string, got list"),
    ('{"prompt": "", "completion": "c"}\n', 1, "prompt is empty"),
    ('["p", "c"]\n', 1, "expected a JSON object, got list"),
    ('"just a string"\n', 1, "expected a JSON object"),
    ('{"messages": "hi"}\n', 1, "messages must be a list, got str"),
    ('{"messages": []}\n', 1, r"exactly \[user, assistant\]"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', 1, "exactly"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, '
     '{"role": "assistant", "content": "b"}]}\n', 1, "no system"),
    ('{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}\n', 1, "exactly"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}\n', 1, "exactly"),
    ('{"messages": ["a", "b"]}\n', 1, "exactly"),
    ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "b"}]}\n', 1,
     r"messages\[0\].content must be a string"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}\n', 1, "exactly the keys"),
    ('{"messages": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]}\n', 1,
     "exactly the keys"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "prompt": "p"}\n', 1,
     "unknown key"),
    (b'{"prompt": "p", "completion": "\xff"}\n', 1, "not valid UTF-8"),
    (GOOD.encode() + b'{"prompt": "\xc3", "completion": "c"}\n', 2, "not valid UTF-8"),
])
def test_sft_errors(tmp_path, content, line, what):
    path = _write(tmp_path, content)
    where = f"{path}:{line}: " if line else f"{path}: "
    with pytest.raises(ValueError, match=f"^{re.escape(where)}.*{what}"):
        load_sft_jsonl(path)


@pytest.mark.parametrize("content,line,what", [
    ("", None, "empty file"),
    ('{"prompt": "a"}\n\n', 2, "blank line"),
    ('{"prompt": "a"}\n{"prompt": 1}\n', 2, "prompt must be a string, got int"),
    ('{"prompt": "a", "completion": "b"}\n', 1, "unknown key"),
    ('{"text": "a"}\n', 1, "unknown key"),
    ('{"prompt": "a"\n', 1, "invalid JSON"),
])
def test_ppo_errors(tmp_path, content, line, what):
    path = _write(tmp_path, content)
    where = f"{path}:{line}: " if line else f"{path}: "
    with pytest.raises(ValueError, match=f"^{re.escape(where)}.*{what}"):
        load_ppo_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sft_jsonl(str(tmp_path / "nope.jsonl"))


def test_roundtrip_with_write_world(tmp_path):
    w = load_world(0)
    write_world(str(tmp_path), seed=0)
    assert load_sft_jsonl(os.path.join(tmp_path, "sft_train.jsonl")) == w.sft_train
    assert load_sft_jsonl(os.path.join(tmp_path, "sft_val.jsonl")) == w.sft_val
    assert load_ppo_jsonl(os.path.join(tmp_path, "ppo_prompts.jsonl")) == w.ppo_prompts
    assert load_ppo_jsonl(os.path.join(tmp_path, "eval_prompts.jsonl")) == w.eval_prompts
    assert load_docs_jsonl(os.path.join(tmp_path, "pretrain.jsonl")) == w.pretrain
    for s in w.skills:
        assert load_docs_jsonl(os.path.join(tmp_path, f"heldout_{s}.jsonl")) == {s: w.heldout[s]}


def test_append_jsonl_writes_strict_json(tmp_path):
    from nanopost.common import append_jsonl
    path = os.path.join(tmp_path, "log.jsonl")
    append_jsonl(path, dict(step=1, ev=float("nan"), kl=float("inf"), loss=0.5))
    with open(path) as f:
        line = f.readline()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        dict(step=1, ev=None, kl=None, loss=0.5)
