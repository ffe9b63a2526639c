"""
Benchmark: nanopost against its peers on CPU, the same work on both sides, side by side in one run.

    python -m nanopost.studies.bench_peers --nanogpt=../nanoGPT       # git clone https://github.com/karpathy/nanoGPT
    python -m nanopost.studies.bench_peers --nanogpt=../nanoGPT --peer_python=../peers/bin/python --clock=cpu

The rows, each nanopost's own code against the peer's:
  pretrain     train_sft.py --data=pretrain against nanoGPT's train.py: the built-in corpus (vocab 1024) as tokens,
               4 layers, 4 heads, 128 wide, biases, block 128 x batch 8 (the quick start's base), AdamW, clip 1.0;
               time per optimizer step. nanopost keeps its defaults (rotary positions, tanh GELU); nanoGPT its own
               (learned positions, exact GELU) with --bias=True, since nanopost's layers have biases.
  pretrain_64  the same at block 64 x batch 12, the shape of nanoGPT's README recipe for a CPU.
  sample       GPT.generate against transformers' generate: a 4-layer GPT-2 folder (128 wide, vocab 1024), 32
               prompts of 8-32 tokens, 64 new tokens, KV cache, greedy; time per call. Both must give the same
               tokens (a note says when they do not).
  grpo         train_ppo.py --advantage=grpo against trl's GRPOTrainer on that folder and the built-in task's
               prompts: 16 completions (4 prompts x 4) of up to 16 tokens at temperature 1, k3 KL in the loss (beta
               0.05) against a frozen reference, 2 epochs x 2 minibatches; time per iteration.

Each side runs in its own process with one thread (OMP_NUM_THREADS=1), fp32, eager, started A B A B ... for --rounds
rounds, so a machine that slows down slows both. Per row: the min and median of the times (steps, calls or
iterations after the warm-up ones) pooled over the rounds, and nanopost / peer of the medians: below 1, nanopost is
faster. --clock=cpu points each side's own stopwatch at its process's CPU seconds (the training scripts' time.time,
the workers' timers): on a machine others share, the time a process waits for a core then does not count.

transformers and trl run in `python -I` from the scratch folder, never in a process that imports nanopost: our
top-level `kernels/` package shadows Hugging Face's `kernels`, which transformers imports. nanoGPT runs its own
train.py from the scratch folder (it reads configurator.py and data/ from there). A peer that is not there (no
--nanogpt, a Python without transformers or trl) is skipped, and the output says which and why.
"""

import json
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from nanopost.config import UserError, entry, knob, parse_config, parse_list, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: train_*.py live here
PEER = {"pretrain": "nanoGPT", "pretrain_64": "nanoGPT", "sample": "transformers", "grpo": "trl"}  # row -> peer
PRETRAIN_SHAPES = {"pretrain": (128, 8), "pretrain_64": (64, 12)}  # row -> (block_size, batch_size)
SHAPE = dict(n_layer=4, n_head=4, n_embd=128)  # nanopost's default GPTConfig, the model of every row
SAMPLE = dict(prompts=32, min_len=8, max_len=32, new_tokens=64)
GRPO = dict(prompts=4, group_size=4, new_tokens=16, beta=0.05, epochs=2, minibatches=2, learning_rate=1e-4)


@dataclass
class Config:
    nanogpt: str = knob("", "path to a nanoGPT checkout (train.py, model.py, configurator.py); '' = skip its rows")
    peer_python: str = knob("", "the Python that has transformers and trl; '' = this one")
    rows: str = knob(",".join(PEER), f"comma-separated rows to run, of {', '.join(PEER)}")
    rounds: int = knob(3, "A B rounds per row", ge=1)
    steps: int = knob(20, "timed optimizer steps per pretraining process", ge=1)
    calls: int = knob(5, "timed generate calls per sampling process", ge=1)
    iters: int = knob(6, "timed GRPO iterations per process", ge=1)
    warmup: int = knob(5, "untimed first steps, calls or iterations of every process", ge=1)
    clock: str = knob("wall", "wall: elapsed seconds | cpu: the process's CPU seconds (steadier on a shared machine)",
                      choices=("wall", "cpu"))
    work_dir: str = knob("", "scratch folder (runs, the corpus as tokens, the GPT-2 folder); '' = a temporary one")


# -----------------------------------------------------------------------------
# one measurement, one process

def run(cmd, cwd, what):
    """Run cmd with one thread -> its stdout; a failure raises with the tail of its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)  # the tests set it; the benchmark measures the real CPU path
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


# a training script whose stopwatch (time.time) reads its process's CPU seconds: --clock=cpu. The script's folder
# goes first on sys.path, as `python script.py` would put it (nanoGPT's train.py imports its model.py)
CPU_CLOCK = r"""
import os, runpy, sys, time
time.time = time.process_time
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def script(cfg, path, *args):
    """The command running a training script (ours or nanoGPT's) with --clock's stopwatch."""
    return [sys.executable, path, *args] if cfg.clock == "wall" else [sys.executable, "-c", CPU_CLOCK, path, *args]


def peer(python, code, args, cwd, what):
    """Run a peer's code in `python -I` from cwd (not the repo): isolated mode puts neither the working folder nor a
    script's folder on sys.path, so transformers finds Hugging Face's `kernels`. -> the JSON its last line prints."""
    return last_json(run([python, "-I", "-c", code, *map(str, args)], cwd, what))


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# pretraining: train_sft.py against nanoGPT's train.py, on the same tokens

def pretrain_nanopost(cfg, work, block, batch, k):
    out = os.path.join(work, f"np_pretrain_{block}_{k}")
    shutil.rmtree(out, ignore_errors=True)
    run(script(cfg, "train_sft.py", "--data=pretrain", "--device=cpu", f"--out_dir={out}", f"--block_size={block}",
               f"--batch_size={batch}", f"--max_iters={cfg.warmup + cfg.steps}", "--log_interval=1",
               "--eval_interval=0", "--eval_prompts=0", "--eval_examples=8", "--heldout_docs=1"), ROOT, "train_sft.py")
    steps = [r for r in jsonl(os.path.join(out, "log.jsonl")) if r["kind"] == "train"]
    return [block * batch / r["tok_per_s"] for r in steps[cfg.warmup:]]  # tok_per_s = the step's tokens / its time


NANOGPT_STEP = re.compile(r"^iter (\d+): loss \S+, time ([\d.]+)ms", re.M)


def pretrain_nanogpt(cfg, work, block, batch, k):
    n = cfg.warmup + cfg.steps  # nanoGPT's loop runs iterations 0 .. max_iters
    stdout = run(script(cfg, os.path.join(os.path.abspath(cfg.nanogpt), "train.py"), "--dataset=nanopost",
                        "--device=cpu", "--compile=False", "--dtype=float32", f"--out_dir=out_{block}_{k}",
                        *(f"--{key}={value}" for key, value in SHAPE.items()), f"--block_size={block}",
                        f"--batch_size={batch}", "--gradient_accumulation_steps=1", "--bias=True", "--dropout=0.0",
                        "--learning_rate=0.0015", "--min_lr=0.00015", "--warmup_iters=20", f"--max_iters={n - 1}",
                        f"--lr_decay_iters={n}", "--weight_decay=0.1", "--beta2=0.95", "--grad_clip=1.0",
                        f"--eval_interval={10 * n}", "--eval_iters=1", "--log_interval=1",
                        "--always_save_checkpoint=False"), os.path.join(work, "nanogpt"), "nanoGPT's train.py")
    times = {int(i): float(ms) / 1000 for i, ms in NANOGPT_STEP.findall(stdout)}
    assert sorted(times) == list(range(n)), f"nanoGPT printed steps {sorted(times)}, expected 0..{n - 1}"
    return [times[i] for i in range(cfg.warmup, n)]  # iteration 0 also timed its evaluation


def prepare_nanogpt(cfg, work):
    """The built-in pretraining corpus, tokenized as train_sft.py tokenizes it, as nanoGPT's
    data/nanopost/{train,val}.bin (uint16) and meta.pkl, with its configurator.py beside data/."""
    from nanopost.tokenizer import get_tokenizer
    from nanopost.world import encode_doc, load_world
    tok, world = get_tokenizer("nanopost"), load_world(0)
    folder = os.path.join(work, "nanogpt", "data", "nanopost")
    os.makedirs(folder, exist_ok=True)
    for split, docs in (("train", world.pretrain), ("val", world.heldout)):
        ids = [t for s in world.skills for d in docs[s] for t in encode_doc(tok, d)]
        np.array(ids, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:
        pickle.dump(dict(vocab_size=tok.vocab_size), f)
    shutil.copy(os.path.join(cfg.nanogpt, "configurator.py"), os.path.join(work, "nanogpt"))


# -----------------------------------------------------------------------------
# the GPT-2 folder of the sample and grpo rows, made by the peers' own libraries

# a byte-level BPE trained by `tokenizers` on the corpus (vocab.json, merges.txt, <|endoftext|> last as in GPT-2) and
# a seeded random GPT2LMHeadModel of nanopost's default shape
MAKE_FOLDER = r"""
import json, sys, torch, tokenizers, transformers
folder, text_file, vocab_size, n_layer, n_head, n_embd, n_positions = sys.argv[1:3] + [int(a) for a in sys.argv[3:]]
bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.train([text_file], tokenizers.trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                                      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
bpe.model.save(folder)
with open(folder + "/vocab.json", encoding="utf-8") as f:
    vocab = json.load(f)
eot = vocab["<|endoftext|>"] = len(vocab)
with open(folder + "/vocab.json", "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                                 vocab_size=len(vocab), bos_token_id=eot, eos_token_id=eot)
transformers.GPT2LMHeadModel(config).save_pretrained(folder)
print(json.dumps(dict(vocab_size=len(vocab))))
"""


def prepare_folder(work, python):
    from nanopost.world import doc_text, load_world
    world = load_world(0)
    folder, text = os.path.join(work, "gpt2_4layer"), os.path.join(work, "corpus.txt")
    os.makedirs(folder, exist_ok=True)
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n".join(doc_text(d) for s in world.skills for d in world.pretrain[s]))
    peer(python, MAKE_FOLDER, [folder, text, 1024, *SHAPE.values(), 128], work, "making the GPT-2 folder")
    with open(os.path.join(work, "prompts.json"), "w") as f:
        json.dump(world.ppo_prompts, f)
    g = np.random.default_rng(0)
    lengths = g.integers(SAMPLE["min_len"], SAMPLE["max_len"] + 1, size=SAMPLE["prompts"])
    with open(os.path.join(work, "sample_prompts.json"), "w") as f:
        json.dump([g.integers(0, 1023, size=n).tolist() for n in lengths], f)  # any id but <|endoftext|>
    return folder


# -----------------------------------------------------------------------------
# sampling: GPT.generate against transformers' generate

HF_SAMPLE = r"""
import json, sys, time, torch, transformers
clock, folder, prompts_file, new_tokens, warmup, calls = sys.argv[1:4] + [int(a) for a in sys.argv[4:]]
timer = time.process_time if clock == "cpu" else time.perf_counter
torch.set_num_threads(1)
model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
prompts = json.load(open(prompts_file))
eot, P = model.config.eos_token_id, max(len(p) for p in prompts)
ids = torch.tensor([[eot] * (P - len(p)) + p for p in prompts])  # left-padded, as nanopost's generate pads
mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
times = []
for _ in range(warmup + calls):
    t0 = timer()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=eot)
    times.append(timer() - t0)
responses = [r[:r.index(eot) + 1] if eot in r else r for r in out[:, P:].tolist()]
print(json.dumps(dict(times=times[warmup:], responses=responses)))
"""


def sample_worker(clock, folder, prompts_file, warmup, calls):
    """nanopost's side of the sample row, in its own process (python -m nanopost.studies.bench_peers
    --worker=sample ...): prints the JSON HF_SAMPLE prints."""
    import torch

    from nanopost.loading import load_model
    from nanopost.tokenizer import from_checkpoint
    torch.set_num_threads(1)
    model, ckpt = load_model(folder)
    model.eval()
    with open(prompts_file) as f:
        prompts = json.load(f)
    eot, times = from_checkpoint(ckpt, folder).eot_id, []
    timer = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup + calls):
        t0 = timer()
        tokens, mask, _ = model.generate(prompts, SAMPLE["new_tokens"], temperature=0, eos_id=eot, pad_id=eot)
        times.append(timer() - t0)
    P = max(len(p) for p in prompts)
    responses = [row[P:][real[P:]].tolist() for row, real in zip(tokens, mask)]
    print(json.dumps(dict(times=times[warmup:], responses=responses)))


def sample_round(cfg, work, python, folder):
    """-> (nanopost's times, transformers' times, whether their greedy tokens agree)."""
    args = [cfg.clock, folder, os.path.join(work, "sample_prompts.json"), cfg.warmup, cfg.calls]
    a = last_json(run([sys.executable, "-m", "nanopost.studies.bench_peers", "--worker=sample", *map(str, args)], ROOT,
                      "nanopost's generate"))
    b = peer(python, HF_SAMPLE, args[:3] + [SAMPLE["new_tokens"]] + args[3:], work, "transformers' generate")
    return a["times"], b["times"], a["responses"] == b["responses"]


# -----------------------------------------------------------------------------
# GRPO: train_ppo.py --advantage=grpo against trl's GRPOTrainer

def grpo_nanopost(cfg, work, folder, k):
    out = os.path.join(work, f"np_grpo_{k}")
    shutil.rmtree(out, ignore_errors=True)
    run(script(cfg, "train_ppo.py", f"--init_from={folder}", f"--out_dir={out}", "--device=cpu", "--advantage=grpo",
               "--kl_estimator=k3", f"--group_size={GRPO['group_size']}",
               f"--batch_size={GRPO['prompts'] * GRPO['group_size']}",
               f"--max_new_tokens={GRPO['new_tokens']}", f"--kl_coef={GRPO['beta']}", f"--ppo_epochs={GRPO['epochs']}",
               f"--num_minibatches={GRPO['minibatches']}", f"--learning_rate={GRPO['learning_rate']}",
               f"--max_iters={cfg.warmup + cfg.iters}", "--max_minutes=0", "--eval_prompts=0", "--eval_interval=0",
               "--ckpt_interval=0"), ROOT, "train_ppo.py")
    iters = [r for r in jsonl(os.path.join(out, "log.jsonl")) if r["kind"] == "train"]
    return [r["t_rollout"] + r["t_learn"] for r in iters[cfg.warmup:]]


# One iteration = one generation batch (prompts x group completions) and the optimizer steps that use it:
# generation_batch_size / per_device_train_batch_size minibatches times num_iterations epochs, timed from the end of
# the step before it to the end of its last step. The reward is the verifier's shape check (a+b=N): its cost is nil
# on both sides.
TRL_GRPO = r"""
import json, re, sys, time, torch, datasets, transformers, trl
clock, folder, prompts_file, out_dir = sys.argv[1:5]
n_prompts, group, new_tokens, epochs, minibatches, warmup, iters = (int(a) for a in sys.argv[5:12])
beta, lr = (float(a) for a in sys.argv[12:14])
timer = time.process_time if clock == "cpu" else time.perf_counter
torch.set_num_threads(1)
tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
tok.pad_token = tok.eos_token
model = transformers.GPT2LMHeadModel.from_pretrained(folder)
prompts = json.load(open(prompts_file))

def reward(completions, **kw):
    return [float(re.fullmatch(r"\s*\d+\+\d+=\d+\s*", c) is not None) for c in completions]

class StepEnds(transformers.TrainerCallback):
    def __init__(self):
        self.ends = []
    def on_train_begin(self, args, state, control, **kw):
        self.ends.append(timer())
    def on_step_end(self, args, state, control, **kw):
        self.ends.append(timer())

per_iter = epochs * minibatches
args = trl.GRPOConfig(output_dir=out_dir, per_device_train_batch_size=n_prompts * group // minibatches,
                      gradient_accumulation_steps=1, num_generations=group, generation_batch_size=n_prompts * group,
                      num_iterations=epochs, max_completion_length=new_tokens, temperature=1.0, beta=beta,
                      learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=1.0,
                      max_steps=per_iter * (warmup + iters), logging_steps=10 ** 6, save_strategy="no",
                      report_to="none", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                      dataloader_num_workers=0, disable_tqdm=True, seed=1337)
step_ends = StepEnds()
trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tok, callbacks=[step_ends],
                          train_dataset=datasets.Dataset.from_list([dict(prompt=p) for p in prompts]))
trainer.train()
ends = step_ends.ends[::per_iter]  # the start, then the end of each iteration's last step
times = [b - a for a, b in zip(ends, ends[1:])]
assert len(times) == warmup + iters, (len(step_ends.ends), per_iter)
print(json.dumps(dict(times=times[warmup:])))
"""


def grpo_trl(cfg, work, python, folder, k):
    g = GRPO
    return peer(python, TRL_GRPO, [cfg.clock, folder, os.path.join(work, "prompts.json"),
                                   os.path.join(work, f"trl_grpo_{k}"), g["prompts"], g["group_size"],
                                   g["new_tokens"], g["epochs"], g["minibatches"], cfg.warmup, cfg.iters, g["beta"],
                                   g["learning_rate"]], work, "trl's GRPOTrainer")["times"]


# -----------------------------------------------------------------------------
# which peers are here, and the table

def find_peers(cfg, python, work):
    """-> ({peer: its versions}, {peer: why it is skipped})."""
    found, missing = {}, {}
    if not cfg.nanogpt:
        missing["nanoGPT"] = "no --nanogpt=PATH (git clone https://github.com/karpathy/nanoGPT)"
    elif not all(os.path.isfile(os.path.join(cfg.nanogpt, f)) for f in ("train.py", "model.py", "configurator.py")):
        missing["nanoGPT"] = f"--nanogpt={cfg.nanogpt} has no train.py, model.py and configurator.py"
    else:
        rev = subprocess.run(["git", "-C", cfg.nanogpt, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        found["nanoGPT"] = dict(nanoGPT=rev.stdout.strip() if rev.returncode == 0 else "(not a git checkout)")
    for name, modules in (("transformers", "transformers, tokenizers"), ("trl", "trl, datasets, transformers")):
        code = (f"import json, torch, {modules}\n"
                f"print(json.dumps(dict(torch=torch.__version__, {name}={name}.__version__)))")
        try:
            found[name] = peer(python, code, [], work, f"import {modules}")
        except (RuntimeError, OSError) as e:
            missing[name] = f"{python} cannot import {modules} ({str(e).strip().splitlines()[-1]})"
    return found, missing


def table_row(row, unit, ours, theirs):
    (a_min, a_med), (b_min, b_med) = (min(ours), statistics.median(ours)), (min(theirs), statistics.median(theirs))
    return (f"| {row} | {PEER[row]} | {unit} | {a_min * 1e3:.1f} | {a_med * 1e3:.1f} | {b_min * 1e3:.1f} | "
            f"{b_med * 1e3:.1f} | **{a_med / b_med:.2f}** |")


def main(argv):
    if argv[:1] == ["--worker=sample"]:
        return sample_worker(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
    cfg, _ = parse_config(Config, argv)
    validate(cfg)
    rows = parse_list(cfg.rows, "rows", kind=str)
    if set(rows) - set(PEER):
        raise UserError(f"--rows={cfg.rows}: expected some of {', '.join(PEER)}")
    python = cfg.peer_python or sys.executable
    work = os.path.abspath(cfg.work_dir) if cfg.work_dir else tempfile.mkdtemp(prefix="nanopost_bench_")
    os.makedirs(work, exist_ok=True)
    import torch
    print(f"nanopost bench_peers | {time.strftime('%Y-%m-%d')} | {platform.machine()}, {os.cpu_count()} cores, one "
          f"thread per process | {cfg.clock} clock | torch {torch.__version__} | python {platform.python_version()} "
          f"| {work}")
    found, missing = find_peers(cfg, python, work)
    for name, versions in found.items():
        print(f"peer {name}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for name, why in missing.items():
        print(f"skipped {name}: {why}")
    lines, folder = [], None
    for row in rows:
        if PEER[row] in missing:
            print(f"skipped row {row}: needs {PEER[row]}")
            continue
        ours, theirs = [], []
        if row in PRETRAIN_SHAPES:
            block, batch = PRETRAIN_SHAPES[row]
            if not os.path.isfile(os.path.join(work, "nanogpt", "configurator.py")):
                prepare_nanogpt(cfg, work)
        elif folder is None:
            folder = prepare_folder(work, python)
        for k in range(cfg.rounds):
            if row in PRETRAIN_SHAPES:
                ours += pretrain_nanopost(cfg, work, block, batch, k)
                theirs += pretrain_nanogpt(cfg, work, block, batch, k)
            elif row == "sample":
                a, b, same = sample_round(cfg, work, python, folder)
                ours, theirs = ours + a, theirs + b
                if not same:
                    print(f"note: round {k + 1}: nanopost's and transformers' greedy tokens differ")
            else:
                ours += grpo_nanopost(cfg, work, folder, k)
                theirs += grpo_trl(cfg, work, python, folder, k)
            print(f"{row} round {k + 1}/{cfg.rounds}: median nanopost {statistics.median(ours) * 1e3:.1f} ms, "
                  f"{PEER[row]} {statistics.median(theirs) * 1e3:.1f} ms", flush=True)
        unit = "ms per step" if row in PRETRAIN_SHAPES else "ms per call" if row == "sample" else "ms per iteration"
        lines.append(table_row(row, unit, ours, theirs))
    print("\n| row | peer | unit | nanopost min | nanopost median | peer min | peer median | nanopost / peer |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    entry(main)
