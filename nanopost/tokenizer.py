"""
Tokenizers: the built-in "nanopost" byte-level BPE (offline, shipped with the package) and GPT-2's (tiktoken).

Both run on tiktoken's fast encoder; we only supply the merge ranks. The "nanopost" ranks are a small BPE
(1024 tokens in all: 256 byte tokens, 765 merges, 3 specials) trained by train_bpe() on the pretraining
corpus of the seed-0 world and shipped as tokenizer.bpe next to this file. To retrain and rewrite it:

    python -m nanopost.tokenizer            # ~seconds; deterministic, so the file only changes if the world does

Chat format: <|user|>{prompt}<|assistant|>{response}<|endoftext|>; pretraining documents end with <|endoftext|>.
Special-token strings that occur in text are always encoded as plain text (encode_ordinary): a prompt that
contains "<|endoftext|>" must not be able to end a response or forge a turn.
"""

import base64
import collections
import functools
import hashlib
import os
import socket
import tempfile
import urllib.parse

import regex  # a tiktoken dependency; stdlib re has no \p{L} / \p{N} classes
import tiktoken

from nanopost.common import UserError, entry

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
# 1024 = 256 bytes + 765 merges + 3 specials. The world's corpus has only ~850 possible merges (a few hundred
# distinct words; digits are never merged), so a 2048 vocabulary would leave ~1000 rows of the embedding and of
# the output layer that no training token ever uses. 1024 keeps every merge frequent and the output layer small.
VOCAB_SIZE = 1024
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.bpe")

# Pre-tokenization: GPT-4's (cl100k) split pattern, except that every digit is its own pre-token (\p{N}, not
# \p{N}{1,3}). With multi-digit tokens "42" and "4"+"2" would be unrelated symbols and a tiny model would have to
# memorize every sum; with one token per digit, column arithmetic is learnable (as in LLaMA and PaLM, which also
# split digits). A number never takes the preceding space, so the ten digit tokens are the only digit tokens.
PAT_STR = "|".join([
    r"""'(?i:[sdmt]|ll|ve|re)""",       # English contractions
    r"""[^\r\n\p{L}\p{N}]?+\p{L}+""",   # a word, with at most one leading non-letter (usually a space)
    r"""\p{N}""",                        # one digit
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*""",  # punctuation run
    r"""\s*[\r\n]""",                    # newlines (with the whitespace before them)
    r"""\s+(?!\S)""",                    # trailing whitespace
    r"""\s+""",
])


# -----------------------------------------------------------------------------
# BPE training (pure Python; the corpus has only a few thousand distinct pre-tokens, so this takes seconds)

def train_bpe(texts, vocab_size=VOCAB_SIZE, n_special=len(SPECIALS)):
    """
    Byte-level BPE (Sennrich et al. 2016, byte-level as in GPT-2) over the counts of distinct pre-tokens.
    Returns mergeable_ranks: bytes -> rank, ranks 0..255 the single bytes, then one token per merge in merge order.
    Deterministic: ties between equally frequent pairs go to the smallest (left id, right id).
    """
    n_merges = vocab_size - 256 - n_special
    assert n_merges >= 0, f"vocab_size {vocab_size} is smaller than 256 bytes + {n_special} specials"
    pat = regex.compile(PAT_STR)
    counts = collections.Counter()
    for text in texts:
        counts.update(pat.findall(text))
    words = [list(w.encode("utf-8")) for w in counts]  # each word as a list of token ids
    freqs = list(counts.values())
    token_bytes = [bytes([i]) for i in range(256)]

    pair_counts = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of words that contain it
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(i)

    for _ in range(n_merges):
        if not pair_counts:
            break  # every pre-token is already a single token
        best = max(pair_counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
        for i in sorted(where.pop(best)):
            w, f = words[i], freqs[i]
            for pair in zip(w, w[1:]):  # remove this word's old pairs ...
                pair_counts[pair] -= f
                if pair_counts[pair] == 0:
                    del pair_counts[pair]
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for pair in zip(merged, merged[1:]):  # ... and add its new ones
                pair_counts[pair] += f
                where[pair].add(i)
        pair_counts.pop(best, None)
    return {b: rank for rank, b in enumerate(token_bytes)}


def training_corpus(seed=0):
    """The texts the nanopost BPE is trained on: the world's pretraining train split (chat docs as prompt+reply)."""
    from nanopost.world import doc_text, load_world  # lazy: world does not need the tokenizer
    w = load_world(seed)
    return [doc_text(d) for s in w.skills for d in w.pretrain[s]]


def save_bpe(path, mergeable_ranks):
    # tiktoken's own file format: one "base64(token bytes) rank" per line, so the file is diffable and readable
    # by tiktoken.load.load_tiktoken_bpe too
    lines = [f"{base64.b64encode(b).decode('ascii')} {r}\n" for b, r in sorted(mergeable_ranks.items(),
                                                                              key=lambda kv: kv[1])]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def load_bpe(path):
    ranks = {}
    with open(path, encoding="ascii") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 2:
                raise UserError(f"{path}:{lineno}: expected 'base64 rank', got {line.rstrip()!r}")
            try:
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: {e}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


# -----------------------------------------------------------------------------
# the tokenizer object

class Tokenizer:
    """A tiktoken Encoding plus the chat conventions of nanopost (see the module docstring)."""

    def __init__(self, name, enc):
        self.name = name
        self.enc = enc
        self.eot_id = enc.encode_single_token("<|endoftext|>")
        self.user_id = enc.encode_single_token("<|user|>")
        self.assistant_id = enc.encode_single_token("<|assistant|>")
        self.vocab_size = enc.n_vocab
        self.special_ids = {self.eot_id, self.user_id, self.assistant_id}

    def encode(self, text):
        # encode_ordinary: special-token strings in text are plain text, never specials (see module docstring)
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def encode_prompt(self, prompt):
        return [self.user_id] + self.encode(prompt) + [self.assistant_id]

    def encode_response(self, response):
        return self.encode(response) + [self.eot_id]

    def encode_chat(self, prompt, response):
        """Token ids of a full chat example and the number of prompt tokens (loss is usually on the rest)."""
        p = self.encode_prompt(prompt)
        return p + self.encode_response(response), len(p)

    def __repr__(self):
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def _nanopost_encoding(path=BPE_PATH):
    if not os.path.exists(path):
        raise RuntimeError(f"missing {path}; regenerate it with `python -m nanopost.tokenizer`")
    ranks = load_bpe(path)
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
    return tiktoken.Encoding("nanopost", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


# the two files tiktoken.get_encoding("gpt2") downloads once and then reads from its cache (tiktoken_ext.openai_public)
GPT2_URLS = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]


def _tiktoken_cache_dir():
    # mirrors tiktoken.load.read_file_cached: "" disables the cache
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _gpt2_cached():
    cache_dir = _tiktoken_cache_dir()
    return bool(cache_dir) and all(
        os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())) for url in GPT2_URLS)


def _gpt2_encoding():
    cache_dir = _tiktoken_cache_dir() or "(disabled: TIKTOKEN_CACHE_DIR is empty)"
    try:
        if not _gpt2_cached():
            # tiktoken downloads without a timeout: behind a firewall that drops packets it would hang for
            # minutes. A 5 s connection attempt first turns that into a quick, clear error.
            host = urllib.parse.urlparse(GPT2_URLS[0]).hostname
            socket.create_connection((host, 443), timeout=5).close()
        base = tiktoken.get_encoding("gpt2")
    except OSError as e:  # socket errors and requests' ConnectionError/Timeout are all OSErrors
        raise RuntimeError(
            f"the gpt2 tokenizer is not in tiktoken's cache ({cache_dir}) and could not be downloaded "
            f"({type(e).__name__}: {e}). Either run once with network access (tiktoken then caches it), "
            "or set TIKTOKEN_CACHE_DIR to a folder that holds the cached gpt2 files (copied from a machine "
            "that has them), or use the built-in offline tokenizer: --tokenizer=nanopost") from None
    # our chat specials go right after GPT-2's own <|endoftext|> (50256)
    specials = dict(base._special_tokens)
    specials["<|user|>"] = base.n_vocab
    specials["<|assistant|>"] = base.n_vocab + 1
    return tiktoken.Encoding("gpt2-nanopost", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens=specials)


@functools.lru_cache(maxsize=None)
def get_tokenizer(name="nanopost"):
    """"nanopost": the shipped offline BPE (vocab 2048). "gpt2": GPT-2's BPE + our two chat specials (50259)."""
    if name == "nanopost":
        return Tokenizer("nanopost", _nanopost_encoding())
    if name == "gpt2":
        return Tokenizer("gpt2", _gpt2_encoding())
    raise UserError(f"unknown tokenizer {name!r}; choose 'nanopost' (built-in, offline) or 'gpt2'")


def main(argv):
    import time
    out = BPE_PATH
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key == "--out" and eq:
            out = value
        else:
            raise UserError(f"unknown argument {arg!r} (usage: python -m nanopost.tokenizer [--out=PATH])")
    t0 = time.time()
    texts = training_corpus(seed=0)
    ranks = train_bpe(texts)
    assert len(ranks) + len(SPECIALS) == VOCAB_SIZE, f"corpus ran out of merges at {len(ranks)} ranks"
    save_bpe(out, ranks)
    enc = tiktoken.Encoding("check", pat_str=PAT_STR, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(SPECIALS)})
    n_tokens = sum(len(t) for t in enc.encode_ordinary_batch(texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"wrote {out} | {len(ranks)} ranks + {len(SPECIALS)} specials = {enc.n_vocab} | "
          f"{n_tokens} tokens on {n_bytes} bytes ({n_bytes / n_tokens:.2f} bytes/token) | {time.time() - t0:.1f}s")


if __name__ == "__main__":
    entry(main)
