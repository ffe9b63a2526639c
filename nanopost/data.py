"""
User data from JSONL (one JSON object per line, UTF-8), and the batches both training scripts and the evaluation
build from tokens (`sft_example`, `collate`, `windows`, one `IGNORE`).

  SFT   {"prompt": str, "completion": str}
        or {"messages": [{"role": "user", "content": str}, {"role": "assistant", "content": str}]}
  PPO   {"prompt": str}
  pretraining docs (what nanopost.world.write_world writes): {"skill": str, "text": str}
        or {"skill": str, "prompt": str, "completion": str}

Strict on purpose: a training set that silently loses or misreads lines is worse than one that fails.
Every problem is a UserError "path:LINE: what is wrong". In particular
  - a blank (or whitespace-only) line is an error, not skipped: it usually means a broken concatenation;
  - unknown keys are an error ({"prompt", "response"} is a typo of "completion", not extra metadata);
  - prompts and completions must be non-empty strings;
  - a file with no records is an error.
"""

import hashlib
import json
import os
import time

import numpy as np
import torch

from nanopost.common import UserError

# kernels.cross_entropy's ignore_index: targets nothing learns from (prompt tokens, padding)
IGNORE = -100


def _records(path):
    """Yield (lineno, dict) for each line of a JSONL file, raising UserError("path:LINE: ...") on any problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # tolerate a UTF-8 byte-order mark (some editors write one)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another one
    if not lines:
        raise UserError(f"{path}: empty file (expected one JSON object per line)")
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")  # Windows line ends
        if not line.strip():
            raise UserError(f"{path}:{lineno}: blank line (blank lines are not allowed; remove it)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _check_keys(path, lineno, obj, allowed):
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise UserError(f"{path}:{lineno}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
    missing = [k for k in allowed if k not in obj]
    if missing:
        raise UserError(f"{path}:{lineno}: missing key(s) {missing}")


def _text(path, lineno, value, what):
    if not isinstance(value, str):
        raise UserError(f"{path}:{lineno}: {what} must be a string, got {type(value).__name__}")
    if value == "":
        raise UserError(f"{path}:{lineno}: {what} is empty")
    return value


def _from_messages(path, lineno, messages):
    # exactly one user turn then one assistant turn: that is all the chat format
    # <|user|>{prompt}<|assistant|>{response}<|endoftext|> can express (no system turn, no multi-turn history)
    if not isinstance(messages, list):
        raise UserError(f"{path}:{lineno}: messages must be a list, got {type(messages).__name__}")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles != ["user", "assistant"]:
        raise UserError(f"{path}:{lineno}: messages must be exactly [user, assistant] (one turn each, no system "
                         f"message: the chat format has one prompt and one response), got roles {roles}")
    out = []
    for i, m in enumerate(messages):
        unknown = sorted(set(m) - {"role", "content"})
        if unknown or "content" not in m:
            raise UserError(f"{path}:{lineno}: messages[{i}] must have exactly the keys 'role' and 'content', "
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


def load_ppo_jsonl(path, tok, max_prompt_tokens):
    """PPO prompts -> list[str]; each line is {"prompt": str}. A prompt that leaves no room for the response
    in the context is an error here, at load time, not when a batch happens to draw it hours into a run."""
    prompts = []
    for lineno, obj in _records(path):
        _check_keys(path, lineno, obj, ["prompt"])
        prompt = _text(path, lineno, obj["prompt"], "prompt")
        n = len(tok.encode_prompt(prompt))
        if n > max_prompt_tokens:
            raise UserError(f"{path}:{lineno}: prompt is {n} tokens in the chat format; at most "
                            f"{max_prompt_tokens} fit (block_size minus max_new_tokens)")
        prompts.append(prompt)
    return prompts


def load_prompts(path, builtin, tok, block_size, max_new_tokens):
    """Prompts to sample responses to: from a JSONL file when `path` is given (a prompt too long names its
    line), else the built-in list. Either way, prompt + max_new_tokens fits the context, checked now, at load
    time, rather than when a batch happens to draw the one prompt that does not fit."""
    if path:
        return load_ppo_jsonl(path, tok, block_size - max_new_tokens)
    longest = max((len(tok.encode_prompt(p)) for p in builtin), default=0)
    if longest + max_new_tokens > block_size:
        raise UserError(f"--max_new_tokens={max_new_tokens}: the longest built-in prompt is {longest} tokens, and "
                        f"prompt + response must fit block_size={block_size}")
    return list(builtin)


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


# -----------------------------------------------------------------------------
# batches: SFT examples, pretraining windows, and the padding both use

def sft_example(tok, prompt, completion, block_size):
    """Tokens of one chat example as (x, y, truncated), or None when the prompt alone fills the context.

    x = <|user|> prompt <|assistant|> response (without its last token), y = x shifted by one with every
    position that predicts a prompt token set to IGNORE, so only the response (and its <|endoftext|>) is learned.
    """
    p = tok.encode_prompt(prompt)
    r = tok.encode_response(completion)
    if len(p) > block_size:
        return None
    keep = block_size + 1 - len(p)  # >= 1: x holds len(p) + len(r) - 1 tokens
    truncated = len(r) > keep
    r = r[:keep]
    x = p + r[:-1]
    y = [IGNORE] * (len(p) - 1) + r  # y[len(p)-1] is predicted from <|assistant|>: the first response token
    assert len(x) == len(y) <= block_size, (len(x), len(y), block_size)
    return x, y, truncated


def collate(examples, pad_id):
    """Right-pad a list of (x, y) to the longest: X with pad_id, Y with IGNORE. -> X, Y (B, T) long.

    No attention mask is needed for right padding: attention is causal, so a real token never sees the pads
    after it, and positions 0..len-1 are the same with or without them.
    """
    T = max(len(x) for x, _ in examples)
    X = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    Y = torch.full((len(examples), T), IGNORE, dtype=torch.long)  # (B, T)
    for i, (x, y) in enumerate(examples):
        X[i, : len(x)] = torch.tensor(x)
        Y[i, : len(y)] = torch.tensor(y)
    return X, Y


def windows(stream, starts, block_size):
    """Pretraining batch: X = stream[s : s+T], Y = stream[s+1 : s+T+1] for each start s. -> (B, T) long each.
    stream: a 1-D numpy array or memmap (only the rows read leave the disk)."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(block_size)  # (B, T)
    return torch.from_numpy(stream[idx].astype(np.int64)), torch.from_numpy(stream[idx + 1].astype(np.int64))


# -----------------------------------------------------------------------------
# a pretraining corpus: plain text, or JSONL of {"text": ...}, tokenized once into a cached memmap

CORPUS_BLOCK = 1 << 20  # characters of a .txt tokenized at a time: memory stays flat however large the file


def is_corpus(path):
    """A .txt file, or a .jsonl whose first line has a "text" key (SFT lines have prompt/completion/messages)."""
    if path.endswith(".txt"):
        return True
    if not path.endswith(".jsonl") or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        return isinstance(json.loads(first), dict) and "text" in json.loads(first)
    except json.JSONDecodeError:
        return False


def corpus_texts(path):
    """The corpus as pieces of text: each document of a .jsonl (its tokens get an <|endoftext|> after them), or
    blocks of about CORPUS_BLOCK characters of a .txt, each cut after a newline that a non-space follows: no
    pre-token spans such a cut, so the blocks tokenize exactly as the whole file would. Yields (text, ends_doc)."""
    try:
        f = open(path, encoding="utf-8", newline="")  # newline="": the text exactly as stored, \r\n included
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        if path.endswith(".jsonl"):
            for lineno, line in enumerate(f, 1):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UserError(f"{path}:{lineno}: expected an object with a \"text\" string")
                yield obj["text"], True
            return
        carry = ""
        while True:
            try:
                block = f.read(CORPUS_BLOCK)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not valid UTF-8 ({e.reason})") from None
            text = carry + block
            if not block:
                yield text, True  # a .txt is one document
                return
            cut = text.rfind("\n", 0, len(text) - 1)  # the last newline that a non-space follows
            while cut >= 0 and text[cut + 1].isspace():
                cut = text.rfind("\n", 0, cut)
            if cut < 0:
                carry = text  # no safe cut yet: read on (only a file without line breaks is read whole)
                continue
            yield text[:cut + 1], False
            carry = text[cut + 1:]


def load_corpus(path, tok, fallback_dir):
    """-> (tokens, sha256 of the tokens): the corpus tokenized with `tok` as a read-only np.memmap (uint16 when
    the vocabulary fits, else uint32). The tokens are cached beside the corpus (in fallback_dir when that folder
    is read-only) and reused while the file's size and modification time and the tokenizer are unchanged."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: cannot read (no such file)")
    st = os.stat(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(folder, os.W_OK):
        folder = fallback_dir
        os.makedirs(folder, exist_ok=True)
    cache = os.path.join(folder, f"{os.path.basename(path)}.{tok.fingerprint}.tokens")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    key = dict(size=st.st_size, mtime_ns=st.st_mtime_ns, tokenizer=tok.fingerprint, dtype=np.dtype(dtype).name)
    try:
        with open(cache + ".json") as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in key} == key and os.path.getsize(cache) == meta["n_tokens"] * dtype().itemsize:
            return np.memmap(cache, dtype=dtype, mode="r"), meta["sha256"]
    except (OSError, ValueError, KeyError):
        pass  # no cache, or a stale or broken one: tokenize again
    t0, n_tokens, n_chars, h = time.time(), 0, 0, hashlib.sha256()
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "wb") as out:
        for text, ends in corpus_texts(path):
            ids = np.asarray(tok.encode(text) + ([tok.eot_id] if ends else []), dtype=dtype)
            out.write(ids.tobytes())
            h.update(ids.tobytes())
            n_tokens, n_chars = n_tokens + len(ids), n_chars + len(text)
            if n_chars // CORPUS_BLOCK != (n_chars - len(text)) // CORPUS_BLOCK:
                print(f"tokenizing {path}: {n_chars / 1e6:.1f}M characters -> {n_tokens / 1e6:.2f}M tokens "
                      f"| {time.time() - t0:.0f}s", flush=True)
    os.replace(tmp, cache)
    with open(cache + ".json", "w") as f:
        json.dump(dict(key, n_tokens=n_tokens, sha256=h.hexdigest(), source=os.path.abspath(path)), f)
    print(f"tokenized {path}: {n_tokens:,} tokens in {time.time() - t0:.1f}s, cached in {cache}", flush=True)
    return np.memmap(cache, dtype=dtype, mode="r"), h.hexdigest()
