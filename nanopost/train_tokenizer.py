"""
Training a byte-level BPE tokenizer: the merges (train_bpe) and the command that writes them to a .bpe file, which
nanopost.tokenizer reads. The shipped tokenizer.bpe is this command's output on the seed-0 world's pretraining
corpus; your own is trained on your corpus and marks a system turn too (<|system|>).

    python -m nanopost.train_tokenizer            # retrain the shipped file (deterministic: same world, same file)
    python -m nanopost.train_tokenizer --data=corpus.txt --vocab_size=4096 --out=my.bpe   # your own
    python train_sft.py --data=corpus.txt --tokenizer=my.bpe ...                          # a scratch model that uses it
"""

import collections
import dataclasses
import heapq
import time

import regex  # a tiktoken dependency; stdlib re has no \p{L} / \p{N} classes

from nanopost.config import UserError, entry, knob, parse_config, validate
from nanopost.data import corpus_texts
from nanopost.tokenizer import BPE_PATH, PAT_STR, SPECIALS, TRAINED_SPECIALS, VOCAB_SIZE, _bpe_encoding, save_bpe
from nanopost.world import doc_text, load_world


# -----------------------------------------------------------------------------
# BPE training (pure Python; the corpus has only a few thousand distinct pre-tokens, so this takes seconds)

def train_bpe(texts, vocab_size=VOCAB_SIZE, n_special=len(SPECIALS), progress=None):
    """
    Byte-level BPE (Sennrich et al. 2016, byte-level as in GPT-2) over the counts of distinct pre-tokens.
    Returns mergeable_ranks: bytes -> rank, ranks 0..255 the single bytes, then one token per merge in merge order.
    Deterministic: ties between equally frequent pairs go to the smallest (left id, right id).
    The most frequent pair comes from a heap of (-count, pair) entries; an entry whose count is out of date is
    skipped when it surfaces (lazy deletion), so a merge costs what it changes, not a scan of every pair.
    """
    n_merges = vocab_size - 256 - n_special
    if n_merges < 0:
        raise UserError(f"--vocab_size={vocab_size}: must be at least 256 bytes + {n_special} specials")
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
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(token_bytes) < 256 + n_merges and heap:
        neg, best = heapq.heappop(heap)
        if pair_counts.get(best, 0) != -neg:
            continue  # stale: the count changed after this entry was pushed (its fresh entry is in the heap)
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
        changed = set()
        for i in sorted(where.pop(best)):
            w, f = words[i], freqs[i]
            for pair in zip(w, w[1:]):  # remove this word's old pairs ...
                pair_counts[pair] -= f
                changed.add(pair)
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
                changed.add(pair)
        pair_counts.pop(best, None)
        for pair in changed:
            if pair_counts.get(pair, 0) > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
        if progress and (new_id - 255) % 500 == 0:
            progress(new_id - 255, n_merges)
    return {b: rank for rank, b in enumerate(token_bytes)}


def training_corpus(seed=0):
    """The texts the nanopost BPE is trained on: the world's pretraining train split (chat docs as prompt+reply)."""
    w = load_world(seed)
    return [doc_text(d) for s in w.skills for d in w.pretrain[s]]


# -----------------------------------------------------------------------------
# the command

@dataclasses.dataclass
class Config:
    data: str = knob("", "corpus to train on: .txt, or .jsonl of {\"text\": ...}; '' = the built-in world's corpus")
    vocab_size: int = knob(VOCAB_SIZE, "tokens in all: 256 bytes + merges + specials", ge=256 + len(TRAINED_SPECIALS))
    out: str = knob("", "the .bpe file to write; '' = the shipped tokenizer.bpe (only without --data)")


def main(argv):
    cfg, _ = parse_config(Config, argv)
    validate(cfg)
    if cfg.data and not cfg.out:
        raise UserError("--out=PATH.bpe is required with --data (the shipped tokenizer.bpe is the built-in world's)")
    if cfg.out and not cfg.out.endswith(".bpe"):
        raise UserError(f"--out={cfg.out}: a tokenizer file ends in .bpe (that is how --tokenizer recognises one)")
    t0 = time.time()
    if cfg.data:
        texts, specials = [text for text, _ in corpus_texts(cfg.data)], TRAINED_SPECIALS
    else:
        texts, specials = training_corpus(seed=0), SPECIALS
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"training a {cfg.vocab_size}-token BPE on {n_bytes / 1e6:.2f} MB")
    ranks = train_bpe(texts, cfg.vocab_size, len(specials),
                      progress=lambda done, total: print(f"  {done}/{total} merges | {time.time() - t0:.0f}s"))
    out = cfg.out or BPE_PATH
    save_bpe(out, ranks, specials)
    enc = _bpe_encoding("check", ranks, specials)
    n_tokens = sum(len(t) for t in enc.encode_ordinary_batch(texts))
    print(f"wrote {out} | {len(ranks)} ranks + {len(specials)} specials = {enc.n_vocab} | "
          f"{n_tokens:,} tokens on {n_bytes:,} bytes ({n_bytes / n_tokens:.2f} bytes/token) | {time.time() - t0:.1f}s")


if __name__ == "__main__":
    entry(main)
