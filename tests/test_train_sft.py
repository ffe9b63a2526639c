"""
train_sft.py: the real script, run as a subprocess on a tiny model for a few steps (cleanrl-style smoke tests),
plus the batch builders imported directly.

The subprocesses run without TRITON_INTERPRET, so the kernels take their pure-PyTorch path (the kernels' own
tests cover the Triton path); everything here runs on CPU in well under a minute and a half.
"""

import json
import os
import re
import shutil

import pytest
import torch

import kernels
from nanopost.tokenizer import get_tokenizer
from train_sft import IGNORE, collate, lr_at, sft_example
from scripts import run_script


# a ~50k-parameter model and the cheapest evaluation: these tests check the plumbing, not the learning
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--warmup_iters=2",
        "--log_interval=1", "--eval_examples=4", "--heldout_docs=2", "--eval_prompts=2", "--eval_max_new_tokens=4"]


def run(args, nproc=1, check=True):
    return run_script("train_sft.py", args, nproc=nproc, check=check)


def records(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def train_losses(out_dir):
    return [(r["step"], r["loss"]) for r in records(out_dir, "train")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base model pretrained for 4 steps from scratch: the smoke test of the pretraining stage."""
    out = str(tmp_path_factory.mktemp("base"))
    p = run(["--data=pretrain", f"--out_dir={out}", "--max_iters=4", *TINY])
    return out, p


def sft_args(base_dir):
    # grad accumulation and the KL anchor on, so the resume and DDP checks below cover them too
    return ["--data=sft", f"--init_from={base_dir}/ckpt.pt", "--lr_decay_iters=20", "--eval_interval=10",
            "--grad_accum=2", "--sft_kl_coef=0.1", *TINY]


@pytest.fixture(scope="module")
def sft(base, tmp_path_factory):
    """20 uninterrupted SFT steps from the base: the smoke test of the SFT stage and the reference run."""
    out = str(tmp_path_factory.mktemp("sft"))
    p = run([*sft_args(base[0]), f"--out_dir={out}", "--max_iters=20"])
    return out, p


# ---------------------------------------------------------------------------------------------------------------
# batch builders (imported, no subprocess)

def test_response_mask_only_response_tokens_count():
    tok = get_tokenizer("nanopost")
    prompt, completion = "Write an addition that equals 12.", "1+11=12"
    x, y, truncated = sft_example(tok, prompt, completion, block_size=64)
    p, r = tok.encode_prompt(prompt), tok.encode_response(completion)
    assert not truncated
    assert x == p + r[:-1]
    assert y == [IGNORE] * (len(p) - 1) + r  # the first response token is predicted from <|assistant|>

    # a second, shorter example forces right padding in the batch
    x2, y2, _ = sft_example(tok, "Make 20 by adding two numbers.", "1+19=20", block_size=64)
    X, Y = collate([(x, y), (x2, y2)], pad_id=tok.eot_id)  # (2, T)
    assert X.shape == Y.shape == (2, max(len(x), len(x2)))
    assert (Y[1, len(y2):] == IGNORE).all() and (X[1, len(x2):] == tok.eot_id).all()

    # the loss is the response tokens' cross-entropy, and prompt/pad positions get exactly zero gradient:
    # whatever the model predicts there, and whatever tokens sit there, the loss cannot see it
    logits = torch.randn(*X.shape, tok.vocab_size, requires_grad=True)  # (2, T, V)
    loss = kernels.cross_entropy(logits.flatten(0, 1), Y.flatten(), reduction="sum")
    logp = torch.log_softmax(logits.detach().double(), dim=-1)  # (2, T, V)
    want = -sum(logp[b, t, Y[b, t]] for b in range(2) for t in range(X.shape[1]) if Y[b, t] != IGNORE)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-4)
    loss.backward()
    masked = Y == IGNORE  # (2, T)
    assert masked.sum() > 0 and (~masked).sum() == len(r) + len(tok.encode_response("1+19=20"))
    assert (logits.grad[masked] == 0).all()
    assert (logits.grad[~masked].abs().sum(-1) > 0).all()


def test_long_examples_truncate_the_response_or_drop():
    tok = get_tokenizer("nanopost")
    prompt = "Write an addition that equals 12."
    p = tok.encode_prompt(prompt)
    block = len(p) + 3
    x, y, truncated = sft_example(tok, prompt, "1+11=12 and many more words after that", block_size=block)
    assert truncated and len(x) == len(y) == block
    assert y[len(p) - 1:] == tok.encode_response("1+11=12 and many more words after that")[:4]
    assert sft_example(tok, prompt, "x", block_size=len(p) - 1) is None  # the prompt alone does not fit
    x, y, truncated = sft_example(tok, prompt, "", block_size=len(p))  # exactly fits: only <|endoftext|> learned
    assert not truncated and y[-1] == tok.eot_id


def test_lr_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, decay=True)
    assert lr_at(5, **kw) == 0.5 and lr_at(10, **kw) == 1.0
    assert abs(lr_at(60, **kw) - 0.55) < 1e-12  # halfway through the cosine: the mean of lr and min_lr
    assert lr_at(110, **kw) == 0.1 and lr_at(500, **kw) == 0.1
    assert lr_at(500, **{**kw, "decay": False}) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# the real script

def test_pretrain_then_sft_smoke(base, sft):
    out, p = base
    assert re.search(r"step 4/4 \| loss \d+\.\d{4} \| lr \S+ \| tok/s \d+ \| eta \d+m\d\ds", p.stdout), p.stdout
    assert "before -> after" in p.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert {"model", "model_args", "optimizer", "config", "step", "rng", "tokenizer"} <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["config"]["data"] == "pretrain" and ckpt["config"]["max_iters"] == 4
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4]
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 4] and set(evals[0]["heldout"]) == set(evals[-1]["heldout"])

    out, p = sft
    assert "responses truncated" in p.stdout and "| kl " in p.stdout
    losses = train_losses(out)
    assert [s for s, _ in losses] == list(range(1, 21)) and all(0 < l < 20 for _, l in losses)
    kls = [r["kl"] for r in records(out, "train")]
    assert kls[0] == 0.0 and kls[-1] > 0  # the anchor starts at the initial model and measures the drift
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["config"]["data"] == "sft" and ckpt["model_args"]["n_embd"] == 32 and "ref_model" in ckpt
    assert [r["step"] for r in records(out, "eval")] == [0, 10, 20]
    assert "accuracy" in records(out, "eval")[-1]["task"]


def test_resume_is_exact(base, sft, tmp_path):
    split = str(tmp_path / "split")
    run([*sft_args(base[0]), f"--out_dir={split}", "--max_iters=10"])
    # the same flags with init_from=resume (the KL anchor must come back from the checkpoint, not from init_from)
    args = [a for a in sft_args(base[0]) if not a.startswith("--init_from=")]
    run([*args, "--init_from=resume", f"--out_dir={split}", "--max_iters=20"])
    want = train_losses(sft[0])
    assert train_losses(split) == want  # bit-identical, not merely close


def test_nonfinite_loss_stops_and_keeps_checkpoint(base, tmp_path):
    out = str(tmp_path / "nan")
    shutil.copytree(base[0], out)
    with open(os.path.join(out, "ckpt.pt"), "rb") as f:
        before = f.read()
    # an absurd learning rate: the first update blows the weights up, the next forward is not finite
    p = run(["--data=pretrain", "--init_from=resume", f"--out_dir={out}", "--max_iters=8", "--learning_rate=1e30",
             "--eval_interval=1000", *TINY], check=False)
    assert p.returncode != 0
    m = re.search(r"non-finite loss .* at step (\d+)", p.stderr)
    assert m and int(m.group(1)) > 4, p.stderr[-2000:]
    with open(os.path.join(out, "ckpt.pt"), "rb") as f:
        assert f.read() == before


def test_bad_user_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "Write an addition that equals 12.", "completion": "1+11=12"}\n{"prompt": 3}\n')
    p = run([f"--data={path}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1", *TINY], check=False)
    assert p.returncode != 0
    assert f"{path}:2" in p.stderr, p.stderr[-2000:]


def test_ddp_matches_single_process(base, sft, tmp_path):
    # 2 ranks x 2 rows vs 1 process x 4 rows, two micro-steps each: SFT batches have different numbers of loss
    # tokens per rank, so this also checks that the loss is normalized by the global token count
    two = str(tmp_path / "two")
    run([*sft_args(base[0]), f"--out_dir={two}", "--max_iters=3"], nproc=2)
    a, b = train_losses(sft[0])[:3], train_losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([l for _, l in b]), torch.tensor([l for _, l in a]), rtol=1e-5, atol=1e-5)
