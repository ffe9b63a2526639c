"""
What several test files share: the tokenizer and the world, tiny GPTs and checkpoints, and the training scripts
run the way a user runs them (a subprocess, exit code and stderr included) or called in-process (`main(argv)`,
cheaper: no interpreter start, for checks that stop before or soon after the first step).
"""

import os

# Must run before anything imports triton: triton reads TRITON_INTERPRET when @triton.jit decorates a kernel,
# so setting it here makes the kernels' CPU tests run the real Triton kernels through the interpreter.
os.environ["TRITON_INTERPRET"] = "1"

import dataclasses
import importlib
import importlib.abc
import json
import shutil
import subprocess
import sys

import pytest
import torch

import kernels._dispatch
from nanopost import checkpoint
from nanopost.checkpoint import save_checkpoint
from nanopost.model import GPT, GPTConfig
from nanopost.tokenizer import get_tokenizer
from nanopost.world import load_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _RefuseHuggingFace(importlib.abc.MetaPathFinder):
    """transformers imports Hugging Face's PyPI package `kernels`; with the repo root on sys.path (as here) that name
    finds nanopost's kernels/ folder, and the import fails far from its cause. Tests that need transformers run it in
    a subprocess started outside the repo (tests/hf_reference.py); importing it here fails at once, by name."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("transformers", "trl"):
            raise ImportError(f"{name} must not be imported in the test process: run it as tests/hf_reference.py "
                              f"does, in a subprocess started outside the repo")
        return None


assert "transformers" not in sys.modules, "a plugin imported transformers before conftest.py could refuse it"
sys.meta_path.insert(0, _RefuseHuggingFace())

# the cheapest configs that still run every part of a loop: a ~50k-parameter model, a few sequences, a few
# prompts, the shortest evaluation. Later --key=value arguments override these (parse_config keeps the last)
SFT_TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
            "--warmup_iters=2", "--log_interval=1", "--eval_examples=4", "--heldout_docs=2", "--eval_prompts=2",
            "--max_new_tokens=4"]
PPO_TINY = ["--batch_size=8", "--num_minibatches=2", "--ppo_epochs=2", "--max_new_tokens=6", "--eval_prompts=4",
            "--eval_k=1", "--device=cpu", "--learning_rate=1e-3", "--value_lr=1e-3"]
TINY = {"train_sft.py": SFT_TINY, "train_ppo.py": PPO_TINY}


# -----------------------------------------------------------------------------
# the world, the tokenizer, tiny models

@pytest.fixture(scope="session")
def tok():
    return get_tokenizer("nanopost")


@pytest.fixture(scope="session")
def world():
    return load_world(0)


@pytest.fixture(scope="session")
def tiny_gpt(tok):
    """make(seed=0, uniform=False, **GPTConfig overrides) -> a ~25k-parameter GPT over the nanopost tokenizer.
    uniform=True zeroes lm_head, so every logit is 0 and the next-token distribution is uniform over V."""
    def make(seed=0, uniform=False, **kw):
        torch.manual_seed(seed)
        args = dict(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
        model = GPT(GPTConfig(**{**args, **kw}))
        if uniform:
            with torch.no_grad():
                model.lm_head.weight.zero_()
        return model
    return make


@pytest.fixture(scope="session")
def save_tiny_ckpt(tok):
    """save(path, model, **entries) -> path: a checkpoint laid out like every nanopost checkpoint."""
    def save(path, model, **entries):
        save_checkpoint(str(path), dict(model=model.state_dict(), model_args=dataclasses.asdict(model.config),
                                        config={}, step=0, tokenizer=tok.name, **entries))
        return str(path)
    return save


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_gpt, save_tiny_ckpt, tmp_path_factory):
    """A random GPT (n_embd=32, block 64) as a checkpoint: what the PPO runs start from."""
    return save_tiny_ckpt(tmp_path_factory.mktemp("tiny") / "ckpt.pt", tiny_gpt(n_embd=32))


@pytest.fixture
def reference_kernels(monkeypatch):
    """CPU kernels take the pure-PyTorch reference path instead of the Triton interpreter. The interpreter runs
    one program per row, too slow for whole documents or training steps; the kernels' own tests check that the
    two paths agree."""
    monkeypatch.setattr(kernels._dispatch, "INTERPRET", False)


@pytest.fixture(autouse=True)
def _release_out_dir_locks():
    """A script's main() called in-process locks its out_dir for the life of the process: release it after the
    test, as the end of a real run would."""
    yield
    while checkpoint._locks:
        checkpoint._locks.pop().close()


# -----------------------------------------------------------------------------
# the training scripts, as a user runs them and in-process

def _command(script, args, nproc=1):
    """argv and environment of `python script TINY args` (torchrun with nproc ranks), run from the repo root."""
    # training runs the torch references: the interpreter that this file switches on would make it crawl
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: one thread each, no oversubscription
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    return [*launch, script, *TINY[script], *args], env


def run_script(script, args, nproc=1, check=True):
    """Run a training script to its end; asserts exit 0 unless check=False. -> CompletedProcess."""
    cmd, env = _command(script, args, nproc)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, (f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                      f"stderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def start_script():
    """start_script(script, args, **Popen kwargs) -> the Popen of a training script running in the background."""
    def start(script, args, **kw):
        cmd, env = _command(script, args)
        return subprocess.Popen(cmd, cwd=ROOT, env=env, **kw)
    return start


def in_process(script):
    """main(args) -> script's main(TINY + args) in this process, the kernels on their reference path."""
    module = importlib.import_module(script.removesuffix(".py"))

    def main(args):
        saved, kernels._dispatch.INTERPRET = kernels._dispatch.INTERPRET, False
        try:
            return module.main([*TINY[script], *args])
        finally:
            kernels._dispatch.INTERPRET = saved
    return main


@pytest.fixture(scope="session")
def run_sft():
    """run_sft(args, nproc=1, check=True) -> CompletedProcess of train_sft.py with SFT_TINY then args."""
    return lambda args, **kw: run_script("train_sft.py", args, **kw)


@pytest.fixture(scope="session")
def run_ppo():
    """run_ppo(args, nproc=1, check=True) -> CompletedProcess of train_ppo.py with PPO_TINY then args."""
    return lambda args, **kw: run_script("train_ppo.py", args, **kw)


@pytest.fixture(scope="session")
def sft_main():
    """sft_main(args): train_sft.main(SFT_TINY + args) in this process."""
    return in_process("train_sft.py")


@pytest.fixture(scope="session")
def ppo_main():
    """ppo_main(args): train_ppo.main(PPO_TINY + args) in this process."""
    return in_process("train_ppo.py")


def _read_log(out_dir, kind=None):
    """The records of out_dir/log.jsonl (of one kind: "train" or "eval"), parsed as strict JSON."""
    def strict(c):
        raise AssertionError(f"log.jsonl holds the non-JSON constant {c}")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in (json.loads(line, parse_constant=strict) for line in f) if kind in (None, r["kind"])]


@pytest.fixture(scope="session")
def read_log():
    """read_log(out_dir, kind=None) -> the records of out_dir/log.jsonl, of one kind ("train", "eval") if given."""
    return _read_log


@pytest.fixture(scope="session")
def copy_run():
    """copy_run(src, dst) -> dst: a copy of a finished run's out_dir to resume or damage (its .lock left behind)."""
    def copy(src, dst):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
        return str(dst)
    return copy


@pytest.fixture(scope="session")
def snapshot():
    """snapshot(out_dir) -> {file name: bytes} of every file in it: equal before and after = nothing written."""
    def files(out_dir):
        out = {}
        for name in sorted(os.listdir(out_dir)):
            with open(os.path.join(out_dir, name), "rb") as f:
                out[name] = f.read()
        return out
    return files


# -----------------------------------------------------------------------------
# finished runs several files start from or resume

@pytest.fixture(scope="session")
def base(run_sft, tmp_path_factory):
    """A tiny base model pretrained for 4 steps from scratch (train_sft.py --data=pretrain): (out_dir, process)."""
    out = str(tmp_path_factory.mktemp("base"))
    return out, run_sft(["--data=pretrain", f"--out_dir={out}", "--max_iters=4"])


@pytest.fixture(scope="session")
def ppo_run(run_ppo, tiny_ckpt, tmp_path_factory):
    """Two PPO iterations from tiny_ckpt, saved at the end: (out_dir, process)."""
    out = str(tmp_path_factory.mktemp("ppo"))
    return out, run_ppo([f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=0"])
