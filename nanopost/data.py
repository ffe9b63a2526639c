"""
Loading user data from JSONL (one JSON object per line, UTF-8).

  SFT   {"prompt": str, "completion": str}
        or {"messages": [{"role": "user", "content": str}, {"role": "assistant", "content": str}]}
  PPO   {"prompt": str}
  pretraining docs (what nanopost.world.write_world writes): {"skill": str, "text": str}
        or {"skill": str, "prompt": str, "completion": str}

Strict on purpose: a training set that silently loses or misreads lines is worse than one that fails.
Every problem is a ValueError "path:LINE: what is wrong". In particular
  - a blank (or whitespace-only) line is an error, not skipped: it usually means a broken concatenation;
  - unknown keys are an error ({"prompt", "response"} is a typo of "completion", not extra metadata);
  - prompts and completions must be non-empty strings;
  - a file with no records is an error.
"""

import json


def _records(path):
    """Yield (lineno, dict) for each line of a JSONL file, raising ValueError("path:LINE: ...") on any problem."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # tolerate a UTF-8 byte-order mark (some editors write one)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another one
    if not lines:
        raise ValueError(f"{path}: empty file (expected one JSON object per line)")
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")  # Windows line ends
        if not line.strip():
            raise ValueError(f"{path}:{lineno}: blank line (blank lines are not allowed; remove it)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _check_keys(path, lineno, obj, allowed):
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ValueError(f"{path}:{lineno}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
    missing = [k for k in allowed if k not in obj]
    if missing:
        raise ValueError(f"{path}:{lineno}: missing key(s) {missing}")


def _text(path, lineno, value, what):
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: {what} must be a string, got {type(value).__name__}")
    if value == "":
        raise ValueError(f"{path}:{lineno}: {what} is empty")
    return value


def _from_messages(path, lineno, messages):
    # exactly one user turn then one assistant turn: that is all the chat format
    # <|user|>{prompt}<|assistant|>{response}<|endoftext|> can express (no system turn, no multi-turn history)
    if not isinstance(messages, list):
        raise ValueError(f"{path}:{lineno}: messages must be a list, got {type(messages).__name__}")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles != ["user", "assistant"]:
        raise ValueError(f"{path}:{lineno}: messages must be exactly [user, assistant] (one turn each, no system "
                         f"message: the chat format has one prompt and one response), got roles {roles}")
    out = []
    for i, m in enumerate(messages):
        unknown = sorted(set(m) - {"role", "content"})
        if unknown or "content" not in m:
            raise ValueError(f"{path}:{lineno}: messages[{i}] must have exactly the keys 'role' and 'content', "
                             f"got {sorted(m)}")
        out.append(_text(path, lineno, m["content"], f"messages[{i}].content"))
    return out


def load_sft_jsonl(path):
    """SFT examples -> list of dict(prompt=str, completion=str). See the module docstring for the format."""
    examples = []
    for lineno, obj in _records(path):
        if "messages" in obj:
            _check_keys(path, lineno, obj, ["messages"])
            prompt, completion = _from_messages(path, lineno, obj["messages"])
        else:
            _check_keys(path, lineno, obj, ["prompt", "completion"])
            prompt = _text(path, lineno, obj["prompt"], "prompt")
            completion = _text(path, lineno, obj["completion"], "completion")
        examples.append(dict(prompt=prompt, completion=completion))
    return examples


def load_ppo_jsonl(path):
    """PPO prompts -> list[str]; each line is {"prompt": str}."""
    prompts = []
    for lineno, obj in _records(path):
        _check_keys(path, lineno, obj, ["prompt"])
        prompts.append(_text(path, lineno, obj["prompt"], "prompt"))
    return prompts


def load_docs_jsonl(path):
    """Docs as written by write_world (pretrain, heldout_*) -> {skill: [Doc]}; Doc: str or dict(prompt, completion)."""
    docs = {}
    for lineno, obj in _records(path):
        if "text" in obj:
            _check_keys(path, lineno, obj, ["skill", "text"])
            doc = _text(path, lineno, obj["text"], "text")
        else:
            _check_keys(path, lineno, obj, ["skill", "prompt", "completion"])
            doc = dict(prompt=_text(path, lineno, obj["prompt"], "prompt"),
                       completion=_text(path, lineno, obj["completion"], "completion"))
        docs.setdefault(_text(path, lineno, obj["skill"], "skill"), []).append(doc)
    return docs
