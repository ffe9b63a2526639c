"""
Tokenizers: the built-in "nanopost" byte-level BPE (offline, shipped with the package), GPT-2's (tiktoken, or the
vocab.json and merges.txt of a GPT-2 folder: nanopost.gpt2), and your own, trained on your corpus into a .bpe file
(python -m nanopost.train_tokenizer --data=corpus.txt --out=my.bpe; then train_sft.py --tokenizer=my.bpe).

All run on tiktoken's fast encoder; we only supply the merge ranks. The "nanopost" ranks are a small BPE
(1024 tokens in all: 256 byte tokens, 765 merges, 3 specials) trained by nanopost.train_tokenizer on the
pretraining corpus of the seed-0 world and shipped as tokenizer.bpe next to this file.

A trained file holds tiktoken's format (one "base64(token bytes) rank" line per token) after one header line
naming its special tokens, which include <|system|>. A checkpoint stores the whole file, so later stages need no
--tokenizer flag and the file may move.

Chat format: <|user|>{prompt}<|assistant|>{response}<|endoftext|>, turn after turn, after an optional
<|system|>{system} (Tokenizer.encode_turns); pretraining documents end with <|endoftext|>.
Special-token strings that occur in text are always encoded as plain text (encode_ordinary): a prompt that
contains "<|endoftext|>" must not be able to end a response or forge a turn.
"""

import base64
import codecs
import functools
import hashlib
import os
import socket
import tempfile
import urllib.parse

import tiktoken

from nanopost.config import UserError

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]  # the shipped tokenizer's
TRAINED_SPECIALS = SPECIALS + ["<|system|>"]  # a tokenizer trained on your corpus also marks a system turn
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
# GPT-2's own split (a GPT-2 folder's vocab.json and merges.txt were made with it, nanopost.gpt2): digits in runs,
# contractions lowercase only. A .bpe file names it in a "#pattern gpt2" header line.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PATTERNS = {"nanopost": PAT_STR, "gpt2": GPT2_PAT_STR}


def bpe_text(mergeable_ranks, specials=SPECIALS, pattern="nanopost", ids=None):
    """The .bpe file: tiktoken's own format (one "base64(token bytes) rank" per line, diffable and readable by
    tiktoken.load.load_tiktoken_bpe), after a "#specials" header when the specials are not the shipped three and a
    "#pattern" header when the split pattern is not nanopost's. `ids` (a GPT-2 folder whose vocab.json numbers its
    tokens in another order than its merges, nanopost.gpt2) maps each rank, then each special in order, to the id
    the model uses: a third column on every line, and "name=id" in the header."""
    if ids is not None:
        specials = [f"{name}={ids[len(mergeable_ranks) + i]}" for i, name in enumerate(specials)]
    header = "" if specials == SPECIALS else "#specials " + " ".join(specials) + "\n"
    header += "" if pattern == "nanopost" else f"#pattern {pattern}\n"
    return header + "".join(f"{base64.b64encode(b).decode('ascii')} {r}" + ("" if ids is None else f" {ids[r]}") + "\n"
                            for b, r in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]))


def save_bpe(path, mergeable_ranks, specials=SPECIALS):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.write(bpe_text(mergeable_ranks, specials))
    os.replace(tmp, path)


def parse_bpe(text, path):
    """-> (mergeable_ranks, specials, pattern name, ids) of a .bpe file's text, ids None unless the file maps ranks
    to other ids (see bpe_text); errors name path:LINE."""
    ranks, specials, pattern, ids, special_ids = {}, SPECIALS, "nanopost", {}, []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not ranks and line.startswith("#specials "):
            specials = [name.rpartition("=")[0] or name for name in line.split()[1:]]
            special_ids = [name.rpartition("=")[2] if "=" in name else "" for name in line.split()[1:]]
            if specials[:3] != SPECIALS:
                raise UserError(f"{path}:{lineno}: the specials must start with {' '.join(SPECIALS)}")
            continue
        if not ranks and line.startswith("#pattern "):
            pattern = line.split()[1]
            if pattern not in PATTERNS:
                raise UserError(f"{path}:{lineno}: unknown pattern {pattern!r}; expected one of {', '.join(PATTERNS)}")
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or (ranks and len(parts) != (3 if ids else 2)):
            raise UserError(f"{path}:{lineno}: expected 'base64 rank' or, on every line, 'base64 rank id'; got "
                            f"{line.rstrip()!r}")
        try:
            rank = ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            if len(parts) == 3:
                ids[rank] = int(parts[2])
        except ValueError as e:
            raise UserError(f"{path}:{lineno}: {e}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    if not ids:
        if any(special_ids):
            raise UserError(f"{path}: specials carry ids but the ranks do not")
        return ranks, specials, pattern, None
    if not all(special_ids):
        raise UserError(f"{path}: the ranks carry ids, so every special needs one (name=id)")
    try:
        ids = [ids[r] for r in range(len(ranks))] + [int(i) for i in special_ids]
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise UserError(f"{path}: the ids repeat or are negative")
    return ranks, specials, pattern, ids


def load_bpe(path):
    """-> (mergeable_ranks, specials, pattern name, ids) of a .bpe file."""
    try:
        with open(path, encoding="ascii") as f:
            return parse_bpe(f.read(), path)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read a tokenizer ({e})") from None


# -----------------------------------------------------------------------------
# the tokenizer object

class Tokenizer:
    """A tiktoken Encoding plus the chat conventions of nanopost (see the module docstring).
    `bpe` is the .bpe file's text for a trained tokenizer (what a checkpoint stores), None for a built-in one.
    `ids` maps tiktoken's ids (the ranks, then the specials) to the model's when they differ (nanopost.gpt2)."""

    def __init__(self, name, enc, bpe=None, ids=None):
        self.name = name
        self.enc = enc
        self.bpe = bpe
        self.ids = ids
        self._from_model = None if ids is None else {i: r for r, i in enumerate(ids)}
        self.eot_id = self._model_id(enc.encode_single_token("<|endoftext|>"))
        self.user_id = self._model_id(enc.encode_single_token("<|user|>"))
        self.assistant_id = self._model_id(enc.encode_single_token("<|assistant|>"))
        system = enc._special_tokens.get("<|system|>")
        self.system_id = None if system is None else self._model_id(system)  # None: no system turn
        self.vocab_size = enc.n_vocab if ids is None else max(ids) + 1

    def _model_id(self, rank):
        return rank if self.ids is None else self.ids[rank]

    def _ranks(self, ids):
        """Model ids -> tiktoken's; an id no token has is a KeyError."""
        return list(ids) if self._from_model is None else [self._from_model[i] for i in ids]

    @functools.cached_property
    def fingerprint(self):
        """A hash of the merge ranks and the specials: what token ids mean (a token cache is valid for it)."""
        h = hashlib.sha256()
        for b, r in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(len(b).to_bytes(2, "little") + b)
        h.update(repr(sorted(self.enc._special_tokens.items())).encode())
        if self.enc._pat_str != PAT_STR:  # the same ranks split another way mean other ids for the same text
            h.update(self.enc._pat_str.encode())
        if self.ids is not None:
            h.update(repr(self.ids).encode())
        return h.hexdigest()[:16]

    def checkpoint_entries(self):
        """What a checkpoint records to rebuild this tokenizer (see from_checkpoint)."""
        return dict(tokenizer=self.name) if self.bpe is None else dict(tokenizer=self.name, tokenizer_bpe=self.bpe)

    def encode(self, text):
        # encode_ordinary: special-token strings in text are plain text, never specials (see module docstring)
        ranks = self.enc.encode_ordinary(text)
        return ranks if self.ids is None else [self.ids[r] for r in ranks]

    def decode(self, ids):
        return self.enc.decode(self._ranks(ids))

    def decode_text(self, ids):
        """Text of ids that may end inside a multi-byte character (a length limit cut it): the incomplete tail is
        left out, never shown as U+FFFD."""
        return codecs.getincrementaldecoder("utf-8")("replace").decode(self.enc.decode_bytes(self._ranks(ids)))

    def text_stream(self):
        """A function id -> the text that id completes, for printing tokens as they are sampled: the bytes of a
        character split across tokens are held back until the token that completes it, never shown as U+FFFD."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return lambda i: decoder.decode(self.enc.decode_single_token_bytes(self._ranks([i])[0]))

    def encode_prompt(self, prompt):
        """A prompt to answer: a string (one user turn) or a conversation ending with a user turn."""
        if isinstance(prompt, str):
            return [self.user_id] + self.encode(prompt) + [self.assistant_id]
        return self.encode_turns(prompt)[0] + [self.assistant_id]

    def encode_turns(self, turns):
        """Token ids of a conversation [(role, content), ...] and, per id, whether SFT learns it: every assistant
        turn's tokens and the <|endoftext|> that ends it (TRL's assistant-only loss), nothing else.
            [<|system|> s] <|user|> u1 <|assistant|> a1 <|endoftext|> <|user|> u2 <|assistant|> a2 <|endoftext|>"""
        ids, learn = [], []
        for role, content in turns:
            if role == "system" and self.system_id is None:
                raise UserError(f"tokenizer {self.name!r} has no <|system|> token, so it cannot encode a system "
                                f"turn: train one (python -m nanopost.train_tokenizer --data=... --out=my.bpe) or drop "
                                f"the system turns")
            role_id = dict(system=self.system_id, user=self.user_id, assistant=self.assistant_id)[role]
            content = self.encode(content) + ([self.eot_id] if role == "assistant" else [])
            ids += [role_id] + content
            learn += [False] + [role == "assistant"] * len(content)
        return ids, learn

    def encode_response(self, response):
        return self.encode(response) + [self.eot_id]

    def __repr__(self):
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def _bpe_encoding(name, ranks, specials, pattern="nanopost"):
    return tiktoken.Encoding(name, pat_str=PATTERNS[pattern], mergeable_ranks=ranks,
                             special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})


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
    """"nanopost": the shipped offline BPE (1024 tokens). "gpt2": GPT-2's BPE + our two chat specials (50259).
    A path to a .bpe file: a tokenizer trained with `python -m nanopost.train_tokenizer --data=...`."""
    if name == "nanopost":
        ranks, specials, pattern, _ = load_bpe(BPE_PATH)
        return Tokenizer("nanopost", _bpe_encoding("nanopost", ranks, specials, pattern))
    if name == "gpt2":
        return Tokenizer("gpt2", _gpt2_encoding())
    if name.endswith(".bpe"):
        if not os.path.isfile(name):
            raise UserError(f"--tokenizer={name}: file not found")
        with open(name, encoding="ascii") as f:
            return from_bpe_text(os.path.basename(name), f.read(), name)
    raise UserError(f"unknown tokenizer {name!r}; choose 'nanopost' (built-in, offline), 'gpt2' or a .bpe file")


def from_bpe_text(name, text, path):
    ranks, specials, pattern, ids = parse_bpe(text, path)
    return Tokenizer(name, _bpe_encoding(name, ranks, specials, pattern), bpe=text, ids=ids)


def from_checkpoint(ckpt, path="checkpoint"):
    """The tokenizer a checkpoint was trained with (a trained one travels inside the checkpoint)."""
    if ckpt.get("tokenizer_bpe"):
        return from_bpe_text(ckpt["tokenizer"], ckpt["tokenizer_bpe"], f"{path} (tokenizer_bpe)")
    return get_tokenizer(ckpt.get("tokenizer", "nanopost"))
