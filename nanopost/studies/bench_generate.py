"""
Benchmark: batched sampling with the KV cache against recomputing the whole sequence every step.

    python -m nanopost.studies.bench_generate    # CPU default model, 64 prompts x 64 new tokens

Both paths sample the same way; the recompute path runs the full padded sequence through the model
for every new token (O(T^2) work), the cache path only the new token (O(T)).
"""

import sys
import time

import torch
import torch.nn.functional as F

from nanopost.model import GPT, GPTConfig


@torch.no_grad()
def generate_recompute(model, prompts, max_new_tokens, generator):
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, P + max_new_tokens, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):P] = torch.tensor(p)
        mask[i, P - len(p):P] = True
    for t in range(max_new_tokens):
        logits = model(tokens[:, :P + t], mask[:, :P + t])[:, -1]  # (B, V)
        tokens[:, P + t] = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
        mask[:, P + t] = True
    return tokens


def main(n_prompts=64, new_tokens=64, repeats=3):
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, GPTConfig().vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 33, (n_prompts,), generator=g)]
    rows = []
    for name, fn in [("kv cache", lambda: model.generate(prompts, new_tokens, generator=g)),
                     ("full recompute", lambda: generate_recompute(model, prompts, new_tokens, g))]:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        rows.append((name, t, n_prompts * new_tokens / t))
    print(f"model {model.num_params() / 1e6:.2f}M params | {n_prompts} prompts (8-32 tokens) x {new_tokens} new tokens"
          f" | torch {torch.__version__} | {torch.get_num_threads()} threads")
    print(f"| {'path':<15}| {'median s':>9} | {'tokens/s':>9} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 11}|")
    for name, t, tps in rows:
        print(f"| {name:<15}| {t:>9.3f} | {tps:>9.0f} |")
    print(f"speed-up of the cache: {rows[0][2] / rows[1][2]:.1f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
