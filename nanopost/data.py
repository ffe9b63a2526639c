"""
User data, and the batches both training scripts and the evaluation build from tokens (`sft_example`, `collate`,
`windows`, one `IGNORE`).

  SFT     conversations (load_conversations): .jsonl or a .json array of {"messages": [...]} with an optional
          system turn and any number of user/assistant turns, {"prompt", "completion"} (strings or message lists),
          or ShareGPT {"conversations": [{"from", "value"}, ...]}
  PPO     prompts (load_ppo_prompts): {"prompt": str}, {"prompt": [messages]} or {"messages": [...]} ending with a
          user turn
  corpus  plain text, or .jsonl of {"text": str} (load_corpus)

Strict on purpose: a training set that silently loses or misreads lines is worse than one that fails.
Every problem is a UserError "path:LINE: what is wrong". In particular
  - a blank (or whitespace-only) line is an error, not skipped: it usually means a broken concatenation;
  - a record must have the keys of one shape ({"prompt", "response"} is a typo of "completion": an error); other
    keys (metadata: id, source, ...) are ignored, with one warning for the whole file;
  - prompts, completions and every message's content must be non-empty strings;
  - a file with no records is an error.
"""

import collections
import gzip
import hashlib
import json
import os
import stat
import time

import numpy as np
import torch

from nanopost.config import UserError
from nanopost.distributed import print0

# kernels.cross_entropy's ignore_index: targets nothing learns from (prompt tokens, padding)
IGNORE = -100


def _open(path, mode, **kw):
    """open(), or gzip.open() for a .gz file: a downloaded dataset (HH-RLHF's *.jsonl.gz) is read as it is."""
    return gzip.open(path, mode, **kw) if path.endswith(".gz") else open(path, mode, **kw)


def is_json_array(path):
    """A .json file (one JSON array) rather than JSON lines, .gz or not."""
    return path.removesuffix(".gz").endswith(".json")


def _records(path):
    """Yield (lineno, dict) for each line of a JSONL file, raising UserError("path:LINE: ...") on any problem."""
    try:
        with _open(path, "rb") as f:
            raw = f.read()
    except OSError as e:  # gzip.BadGzipFile too: it has no strerror
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
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


def _text(path, lineno, value, what):
    if not isinstance(value, str):
        raise UserError(f"{path}:{lineno}: {what} must be a string, got {type(value).__name__}")
    if value == "":
        raise UserError(f"{path}:{lineno}: {what} is empty")
    return value


def _array_records(path):
    """Yield (line, dict) for each element of a file holding one JSON array of objects (ShareGPT's .json)."""
    try:
        with _open(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    decoder, i = json.JSONDecoder(), len(text) - len(text.lstrip())
    if text[i:i + 1] != "[":
        raise UserError(f"{path}: expected one JSON array of objects (a .json file); JSON lines go in a .jsonl")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if text[i:i + 1] == "]" or i >= len(text):
            return
        lineno = text.count("\n", 0, i) + 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _messages(path, lineno, value, what, ignored, role_key="role", content_key="content"):
    """A list of message objects -> [(role, content)]; keys other than role and content are counted in `ignored`."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{path}:{lineno}: {what} must be a non-empty list of messages, got {value!r:.60}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise UserError(f"{path}:{lineno}: {what}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = SHAREGPT_ROLES.get(m[role_key]) if role_key == "from" else m[role_key]
        if role not in ("system", "user", "assistant"):
            raise UserError(f"{path}:{lineno}: {what}[{i}].{role_key} is {m[role_key]!r}; expected "
                            f"{'system, human or gpt' if role_key == 'from' else 'system, user or assistant'}")
        out.append((role, _text(path, lineno, m[content_key], f"{what}[{i}].{content_key}")))
        ignored.update(f"{what}[].{k}" for k in set(m) - {role_key, content_key})
    return out


def _check_turns(path, lineno, turns, last):
    """An optional leading system turn, then user and assistant turns alternating, the last one `last`."""
    roles = [r for r, _ in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body[-1] != last or "system" in body or any(a == b for a, b in zip(body, body[1:])):
        raise UserError(f"{path}:{lineno}: turns must be an optional system turn, then user and assistant turns "
                        f"alternating, ending with {last}; got {roles}")
    return turns


def _conversation(path, lineno, obj, ignored, last="assistant"):
    """One record in any of the supported shapes -> [(role, content), ...]."""
    if "messages" in obj:
        keys, turns = {"messages"}, _messages(path, lineno, obj["messages"], "messages", ignored)
    elif "conversations" in obj:  # ShareGPT
        keys = {"conversations"}
        turns = _messages(path, lineno, obj["conversations"], "conversations", ignored, "from", "value")
    elif "prompt" in obj and ("completion" in obj or last == "user"):
        keys, turns = {"prompt", "completion"}, []
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            if key not in obj:
                continue
            value = obj[key]
            turns += ([(role, _text(path, lineno, value, key))] if not isinstance(value, list)
                      else _messages(path, lineno, value, key, ignored))
    else:
        want = '"prompt"' if last == "user" else '"prompt" and "completion"'
        raise UserError(f"{path}:{lineno}: expected {want}, \"messages\" or \"conversations\"; got keys "
                        f"{sorted(obj)}")
    ignored.update(set(obj) - keys)
    return _check_turns(path, lineno, turns, last)


_warned = set()  # files already warned about: one warning per file, however often it is read


def _warn_ignored(path, ignored):
    if ignored and path not in _warned:
        _warned.add(path)
        print(f"WARNING: {path}: ignored key(s) " + ", ".join(f"{k} ({n} records)" for k, n in sorted(ignored.items())),
              flush=True)


def load_conversations(path, last="assistant"):
    """Conversations from a .jsonl (one record per line) or a .json array -> [[(role, content), ...], ...].

    A record is {"messages": [{"role", "content"}, ...]} (an optional leading system turn, then user and
    assistant turns), {"prompt", "completion"} as strings or message lists (TRL's prompt-completion formats), or
    ShareGPT's {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}. For SFT the last turn is the
    assistant's; PPO prompts (last="user") end with the user's. Keys nanopost does not use (id, source, ...) are
    ignored with one warning for the whole file."""
    return [turns for _, turns in numbered_conversations(path, last)]


def numbered_conversations(path, last):
    """load_conversations with the line each conversation starts on: [(LINE, turns)]."""
    records = _array_records(path) if is_json_array(path) else _records(path)
    ignored = collections.Counter()
    conversations = [(lineno, _conversation(path, lineno, obj, ignored, last)) for lineno, obj in records]
    if not conversations:
        raise UserError(f"{path}: no records")
    _warn_ignored(path, ignored)
    return conversations


# what to do with a prompt or conversation longer than the context (--too_long in both training scripts)
TOO_LONG = ("error", "drop", "truncate")


def check_too_long(over, n, what, limit, too_long):
    """One error line naming how many of n records do not fit in `limit` and the first few (their path:LINE), or,
    when they are dropped or truncated, one printed line counting them."""
    if not over:
        return
    listed = ", ".join(over[:3]) + (f" and {len(over) - 3} more" if len(over) > 3 else "")
    if too_long == "error":
        raise UserError(f"{len(over)} of {n} {what} do not fit in {limit}: {listed}. --too_long=drop leaves them "
                        f"out, --too_long=truncate keeps the end of each")
    print0(f"data: {len(over)} of {n} {what} do not fit in {limit} ({listed}): "
           f"{'left out' if too_long == 'drop' else 'their last tokens kept'} (--too_long={too_long})")


def truncate_prompt(tok, prompt, max_tokens):
    """The end of a prompt that fits in max_tokens in the chat format: its oldest exchanges go first (a system turn
    stays), then the start of its last user turn. None when not even the last character of that turn fits."""
    turns = [("user", prompt)] if isinstance(prompt, str) else list(prompt)
    system, body = (turns[:1], turns[1:]) if turns[0][0] == "system" else ([], turns)

    def fits(text):
        rest = system + body[:-1] + [("user", text)]
        return len(tok.encode_prompt(rest[0][1] if len(rest) == 1 else rest)) <= max_tokens
    while len(body) > 1 and not fits(body[-1][1]):
        body = body[2:]  # the oldest user/assistant exchange
    text = body[-1][1]
    if not fits(text[-1:]):
        return None
    lo, hi = 0, len(text)  # the fewest characters cut from the front of the last turn that make it fit
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(text[mid:]) else (mid + 1, hi)
    rest = system + body[:-1] + [("user", text[lo:])]
    return rest[0][1] if len(rest) == 1 else rest


def load_ppo_prompts(path, tok, max_prompt_tokens, too_long="error"):
    """PPO prompts from a .jsonl or .json file: {"prompt": str}, {"prompt": [messages]} or {"messages": [...]}
    ending with a user turn. -> a list of prompts, each a string (one user turn) or a conversation
    [(role, content), ...]; that is what a reward function receives. Prompts that leave no room for the response
    in the context are handled here, at load time, as `too_long` says (check_too_long), never when a batch happens
    to draw one."""
    prompts, over = [], []
    numbered = numbered_conversations(path, last="user")
    for lineno, turns in numbered:
        prompt = turns[0][1] if len(turns) == 1 else turns
        n = len(tok.encode_prompt(prompt))
        if n > max_prompt_tokens:
            over.append(f"{path}:{lineno} ({n} tokens)")
            prompt = truncate_prompt(tok, prompt, max_prompt_tokens) if too_long == "truncate" else None
        if prompt is not None:
            prompts.append(prompt)
    check_too_long(over, len(numbered), "prompts", f"{max_prompt_tokens} tokens in the chat format (block_size "
                   f"minus max_new_tokens)", too_long)
    if not prompts:
        raise UserError(f"{path}: no prompt fits in {max_prompt_tokens} tokens")
    return prompts


def load_prompts(path, builtin, tok, block_size, max_new_tokens, too_long="error"):
    """Prompts to sample responses to: from a JSONL file when `path` is given (prompts too long: see
    load_ppo_prompts), else the built-in list. Either way, prompt + max_new_tokens fits the context, checked now,
    at load time, rather than when a batch happens to draw the one prompt that does not fit."""
    if path:
        return load_ppo_prompts(path, tok, block_size - max_new_tokens, too_long)
    longest = max((len(tok.encode_prompt(p)) for p in builtin), default=0)
    if longest + max_new_tokens > block_size:
        raise UserError(f"--max_new_tokens={max_new_tokens}: the longest built-in prompt is {longest} tokens, and "
                        f"prompt + response must fit block_size={block_size}")
    return list(builtin)


# -----------------------------------------------------------------------------
# batches: SFT examples, pretraining windows, and the padding both use

def sft_example(tok, turns, block_size, truncate=False):
    """One conversation as (x, y, n_dropped_turns), or None when even its last exchange does not fit.

    x = the tokens but the last, y = the tokens shifted by one with IGNORE wherever the token is not learned (see
    Tokenizer.encode_turns). A conversation longer than the context drops its oldest user/assistant exchanges first (the
    system turn stays), so the last assistant turn is always learned whole, never cut. With truncate, a last exchange
    that does not fit keeps its last block_size + 1 tokens instead (the end of the answer is always among them)."""
    system = turns[:1] if turns[0][0] == "system" else []
    body = turns[len(system):]
    starts = [i for i in range(len(body)) if i == 0 or body[i - 1][0] == "assistant"]  # where an exchange begins
    for n_dropped, start in enumerate(starts):  # drop the oldest exchange until the rest fits
        ids, learn = tok.encode_turns(system + body[start:])
        if len(ids) <= block_size + 1 or (truncate and n_dropped == len(starts) - 1):
            ids, learn = ids[-(block_size + 1):], learn[-(block_size + 1):]
            x, y = ids[:-1], [t if keep else IGNORE for t, keep in zip(ids[1:], learn[1:])]
            return x, y, n_dropped
    return None


def sft_examples(numbered, tok, block_size, too_long, what):
    """[(where, turns)] -> [(x, y)], the conversations that fit block_size (see sft_example); those whose last
    exchange alone does not fit are an error, left out or truncated, as too_long says (check_too_long)."""
    examples, over, n_short = [], [], 0
    for where, turns in numbered:
        made = sft_example(tok, turns, block_size)
        if made is None:
            over.append(where)
            made = sft_example(tok, turns, block_size, truncate=True) if too_long == "truncate" else None
        elif made[2]:
            n_short += 1
        if made is not None:
            examples.append(made[:2])
    check_too_long(over, len(numbered), f"{what} conversations (the last exchange alone)",
                   f"block_size={block_size}", too_long)
    print0(f"data: {what} {len(examples)} conversations | {n_short} lost their oldest exchanges to fit "
           f"block_size={block_size}")
    return examples


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


def pack(examples, block_size, pad_id):
    """Several (x, y) examples per row, for --packing: first-fit in order of decreasing length into rows of at most
    block_size tokens, so short chats stop paying for the longest one's padding. -> X, Y, segments (R, T) long;
    segments numbers the examples of a row 1, 2, ... (0 = padding) for GPT.hidden's block-diagonal mask.
    Targets never cross examples (each y is its own x shifted), so the loss is the unpacked batch's loss."""
    rows, room = [], []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        n = len(examples[i][0])
        r = next((r for r in range(len(rows)) if room[r] >= n), None)
        if r is None:
            rows.append([])
            room.append(block_size)
            r = len(rows) - 1
        rows[r].append(examples[i])
        room[r] -= n
    T = max(block_size - r for r in room)
    X = torch.full((len(rows), T), pad_id, dtype=torch.long)   # (R, T)
    Y = torch.full((len(rows), T), IGNORE, dtype=torch.long)   # (R, T)
    segments = torch.zeros(len(rows), T, dtype=torch.long)     # (R, T)
    for r, row in enumerate(rows):
        at = 0
        for s, (x, y) in enumerate(row, start=1):
            X[r, at:at + len(x)], Y[r, at:at + len(y)] = torch.tensor(x), torch.tensor(y)
            segments[r, at:at + len(x)] = s
            at += len(x)
    return X, Y, segments


def spread_windows(stream, n, block_size):
    """At most n windows evenly spread over the whole stream (a val loss that sees all of it) -> X, Y (n, T)."""
    n = min(n, len(stream) - block_size - 1)
    return windows(stream, np.linspace(0, len(stream) - block_size - 2, n).astype(np.int64), block_size)


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
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "text" in record


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
    # a folder without write permission is read-only for us even where root could write into it anyway
    if not (os.access(folder, os.W_OK) and os.stat(folder).st_mode & stat.S_IWUSR):
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
                print0(f"tokenizing {path}: {n_chars / 1e6:.1f}M characters -> {n_tokens / 1e6:.2f}M tokens "
                       f"| {time.time() - t0:.0f}s")
    os.replace(tmp, cache)
    with open(cache + ".json", "w") as f:
        json.dump(dict(key, n_tokens=n_tokens, sha256=h.hexdigest(), source=os.path.abspath(path)), f)
    print0(f"tokenized {path}: {n_tokens:,} tokens in {time.time() - t0:.1f}s, cached in {cache}")
    return np.memmap(cache, dtype=dtype, mode="r"), h.hexdigest()
