"""
Benchmark: SFT steps on packed rows (train_sft.py --packing=true) against right-padded rows, same examples.

    python -m nanopost.studies.bench_packing FILE.jsonl [batches] [block_size]  # your conversations, shipped tokenizer

Each batch is 32 conversations drawn at random; both layouts run forward + backward of the default CPU model on
it, alternating A, B, A, B, ..., so a machine that slows down mid-run slows both. tokens/s counts real tokens.
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from nanopost.data import IGNORE, collate, load_conversations, pack, sft_example
from nanopost.model import GPT, GPTConfig
from nanopost.tokenizer import get_tokenizer


def main(path, n_batches=30, block_size=128, batch_size=32):
    tok = get_tokenizer("nanopost")
    made = (sft_example(tok, turns, block_size) for turns in load_conversations(path))
    examples = [(x, y) for x, y, _ in (m for m in made if m is not None)]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=tok.vocab_size))
    rng = np.random.default_rng(0)
    batches = [[examples[i] for i in rng.integers(0, len(examples), batch_size)] for _ in range(n_batches + 1)]
    layouts = {"padded": lambda b: (*collate(b, tok.eot_id), None), "packed": lambda b: pack(b, block_size, tok.eot_id)}
    seconds, positions = dict.fromkeys(layouts, 0.0), dict.fromkeys(layouts, 0)
    for k, batch in enumerate(batches):
        for name, layout in layouts.items():
            X, Y, segments = layout(batch)
            t0 = time.perf_counter()
            logits = model(X, segments=segments)
            F.cross_entropy(logits.flatten(0, 1), Y.flatten(), ignore_index=IGNORE).backward()
            model.zero_grad(set_to_none=True)
            if k > 0:  # the first batch warms up both
                seconds[name] += time.perf_counter() - t0
                positions[name] += X.numel()
    real = sum(len(x) for batch in batches[1:] for x, _ in batch)
    print(f"{path}: {len(examples)} conversations, {real / (n_batches * batch_size):.0f} tokens each on average | "
          f"{n_batches} batches of {batch_size} | block_size {block_size} | model {model.num_params() / 1e6:.2f}M "
          f"params | torch {torch.__version__} | {torch.get_num_threads()} threads")
    print(f"| {'layout':<7}| {'positions computed':>18} | {'real share':>10} | {'seconds':>8} "
          f"| {'real tokens/s':>13} |")
    print(f"|{'-' * 8}|{'-' * 20}|{'-' * 12}|{'-' * 10}|{'-' * 15}|")
    for name in layouts:
        print(f"| {name:<7}| {positions[name]:>18,} | {real / positions[name]:>10.2f} | {seconds[name]:>8.2f} | "
              f"{real / seconds[name]:>13.0f} |")
    print(f"speed-up of packing: {seconds['padded'] / seconds['packed']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
