"""
Sample from a model: a nanopost ckpt.pt or a Hugging Face GPT-2 folder (nanopost.gpt2), tokens printed as they
are generated.

    python -m nanopost.sample --init_from=out/ppo/ckpt.pt --chat --prompt="Write an addition that equals 42."
    python -m nanopost.sample --init_from=gpt2 --prompt="The meaning of life is" --num_samples=3
    python -m nanopost.sample --init_from=out/sft/ckpt.pt --chat            # no --prompt, a terminal: a chat
    python -m nanopost.sample --init_from=out/sft/ckpt.pt --chat --prompts=prompts.jsonl --num_samples=4

--chat wraps the prompt in the chat format (<|user|>prompt<|assistant|>) and stops at <|endoftext|>; without it the
prompt is continued as plain text (an empty prompt starts from <|endoftext|>, GPT-2's unconditional samples).
With no --prompt, a terminal on stdin starts an interactive loop (with --chat the conversation is kept, oldest
exchanges dropped when it outgrows the context); otherwise stdin is read as the prompt.
--num_samples samples of each prompt (of --prompt, or of every line of --prompts) are drawn as one batch, in one
generate call: the KV cache makes a batch of B cost far less than B calls. A single sample streams its tokens; a
batch prints each sample when the batch is done.
"""

import os
import sys
from dataclasses import dataclass

import torch

from nanopost.config import UserError, entry, knob, parse_config, validate
from nanopost.distributed import setup_runtime
from nanopost.loading import load_model
from nanopost.data import load_ppo_prompts
from nanopost.tokenizer import from_checkpoint


@dataclass
class Config:
    init_from: str = knob("", "a nanopost ckpt.pt or a GPT-2 folder (config.json, weights, vocab.json, merges.txt)")
    prompt: str = knob("", "text to continue (or, with --chat, the user turn); '' = read stdin or chat interactively")
    prompts: str = knob("", "a file of prompts sampled as one batch: .txt, one per line; else train_ppo.py --prompts' "
                            "JSONL ({\"prompt\": ...} or messages)")
    chat: bool = knob(False, "chat format: <|user|>prompt<|assistant|>, stop at <|endoftext|>")
    num_samples: int = knob(1, "samples per prompt, all drawn in one batch", ge=1)
    max_new_tokens: int = knob(200, "tokens per sample, at most what the context leaves after the prompt", ge=1)
    temperature: float = knob(0.8, "sampling temperature; 0 = greedy", ge=0)
    top_k: int = knob(200, "sample among the k most likely tokens; 0 = all", ge=0)
    seed: int = knob(1337, "seeds the sampling")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = knob("bfloat16", "autocast dtype on CUDA (CPU always runs float32)", choices=("bfloat16", "float32"))


def sample(model, tok, ids, cfg, generator):
    """Generate after ids, printing each token's text as soon as it is sampled -> the new ids (no <|endoftext|>
    in chat mode)."""
    room = model.config.block_size - len(ids)
    if room < 1:
        raise UserError(f"the prompt is {len(ids)} tokens; the model's context is {model.config.block_size}")
    text = tok.text_stream()
    new = []

    def on_token(nxt):
        t = int(nxt[0])
        if not (cfg.chat and t == tok.eot_id):  # the chat's end marker ends the sample; it is not text
            new.append(t)
            sys.stdout.write(text(t))
            sys.stdout.flush()

    model.generate([ids], min(cfg.max_new_tokens, room), temperature=cfg.temperature, top_k=cfg.top_k or None,
                   eos_id=tok.eot_id if cfg.chat else None, generator=generator, on_token=on_token)
    return new


def sample_batch(model, tok, prompts, cfg, generator):
    """num_samples samples of each prompt (strings, or conversations with --chat) in one generate call -> their new
    ids, prompt by prompt (no <|endoftext|> in chat mode)."""
    ids = [tok.encode_prompt(p) if cfg.chat else tok.encode(p) or [tok.eot_id] for p in prompts]
    P = max(len(i) for i in ids)
    room = model.config.block_size - P
    if room < 1:
        raise UserError(f"the longest prompt is {P} tokens; the model's context is {model.config.block_size}")
    batch = [i for i in ids for _ in range(cfg.num_samples)]
    tokens, mask, _ = model.generate(batch, min(cfg.max_new_tokens, room), temperature=cfg.temperature,
                                     top_k=cfg.top_k or None, eos_id=tok.eot_id if cfg.chat else None,
                                     generator=generator)  # (B, P+N) each, prompts left-padded to P
    new = [row[P:][real[P:]].tolist() for row, real in zip(tokens, mask)]
    return [n[:-1] if cfg.chat and n[-1:] == [tok.eot_id] else n for n in new]


def read_prompts(path, tok, block_size, chat):
    """--prompts: a .txt holds one prompt per line (blank lines skipped); any other file is read as train_ppo.py
    --prompts (nanopost.data.load_ppo_prompts), whose errors name the line."""
    if not path.endswith(".txt"):
        prompts = load_ppo_prompts(path, tok, block_size - 1)
        if not chat and not all(isinstance(p, str) for p in prompts):
            raise UserError(f"--prompts={path} holds conversations: sample them with --chat")
        return prompts
    if not os.path.isfile(path):
        raise UserError(f"--prompts={path}: no such file")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line)")
    return prompts


def show(tok, prompt, new, cfg):
    """A finished sample as the streaming path prints it: plain text after its prompt, a chat reply alone (after
    its user turn, when there are several prompts)."""
    text = tok.decode_text(new)
    if not cfg.chat:
        return prompt + text
    return text if prompt is None else f"> {prompt if isinstance(prompt, str) else prompt[-1][1]}\n{text}"


def fit(tok, turns, block_size):
    """The chat's prompt ids, dropping the oldest exchanges until it leaves room for a reply."""
    while len(turns) > 1 and len(tok.encode_prompt(turns)) >= block_size:
        turns = turns[2:]
    return tok.encode_prompt(turns), turns


def main(argv):
    cfg, given = parse_config(Config, argv)
    validate(cfg)
    if not cfg.init_from:
        raise UserError("--init_from=PATH is required: a nanopost ckpt.pt or a GPT-2 folder")
    rt = setup_runtime(cfg.device, cfg.dtype)
    model, ckpt = load_model(cfg.init_from, rt.device)
    model.eval()
    tok = from_checkpoint(ckpt, cfg.init_from)
    generator = torch.Generator(rt.device).manual_seed(cfg.seed)
    interactive = "prompt" not in given and sys.stdin.isatty()
    results = []
    with rt.autocast():
        if cfg.prompts or (not interactive and cfg.num_samples > 1):
            prompts = (read_prompts(cfg.prompts, tok, model.config.block_size, cfg.chat) if cfg.prompts else
                       [cfg.prompt if "prompt" in given else sys.stdin.read()])
            results = sample_batch(model, tok, prompts, cfg, generator)
            shown = [show(tok, p if cfg.prompts or not cfg.chat else None, new, cfg)
                     for p, new in zip((p for p in prompts for _ in range(cfg.num_samples)), results)]
            sys.stdout.write("\n---------------\n".join(shown) + "\n")
            return results
        if not interactive:
            prompt = cfg.prompt if "prompt" in given else sys.stdin.read()
            ids = tok.encode_prompt(prompt) if cfg.chat else tok.encode(prompt) or [tok.eot_id]
            if not cfg.chat:
                sys.stdout.write(prompt)
            results.append(sample(model, tok, ids, cfg, generator))
            sys.stdout.write("\n")
            return results
        print(f"{cfg.init_from}: {'chat' if cfg.chat else 'text to continue'}; Ctrl-D to quit", file=sys.stderr)
        turns = []
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return results
            if cfg.chat:
                ids, turns = fit(tok, turns + [("user", line)], model.config.block_size)
                new = sample(model, tok, ids, cfg, generator)
                turns = turns + [("assistant", tok.decode_text(new))]
            else:
                new = sample(model, tok, tok.encode(line) or [tok.eot_id], cfg, generator)
            results.append(new)
            sys.stdout.write("\n")


if __name__ == "__main__":
    entry(main)
