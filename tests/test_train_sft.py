"""
train_sft.py on a tiny model for a few steps (cleanrl-style smoke tests): the pretraining and SFT stages, an exact
resume, 2-process data parallel, and the run-file policy: what a resume may change, what it refuses, a crash
(kill -9) and its resume, a diverging run. The batch builders' tests are in test_data.py.

Subprocesses run without TRITON_INTERPRET and in-process runs set the kernels' reference path (conftest), so the
kernels take their pure-PyTorch path here; the kernels' own tests cover the Triton path.
"""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from nanopost.config import Diverged, UserError
from train_sft import lr_at


def sft_args(base_dir):
    # grad accumulation and the KL anchor on, so the resume and DDP checks below cover them too
    return ["--data=sft", f"--init_from={base_dir}/ckpt.pt", "--lr_decay_iters=20", "--eval_interval=10",
            "--grad_accum=2", "--sft_kl_coef=0.1"]


def resume_args(base_dir):
    # the same knobs with init_from=resume: the KL anchor must come back from the checkpoint, not from init_from
    return [a for a in sft_args(base_dir) if not a.startswith("--init_from=")] + ["--init_from=resume"]


def train_losses(read_log, out_dir):
    return [(r["step"], r["loss"]) for r in read_log(out_dir, "train")]


@pytest.fixture(scope="module")
def sft(base, run_sft, tmp_path_factory):
    """20 uninterrupted SFT steps from the base: the smoke test of the SFT stage and the reference run."""
    out = str(tmp_path_factory.mktemp("sft"))
    return out, run_sft([*sft_args(base[0]), f"--out_dir={out}", "--max_iters=20"])


@pytest.fixture(scope="module")
def half(base, run_sft, tmp_path_factory):
    """The same run stopped (and saved) at step 10 of 20: the tests below resume copies of it."""
    out = str(tmp_path_factory.mktemp("half"))
    run_sft([*sft_args(base[0]), f"--out_dir={out}", "--max_iters=10"])
    return out


def test_lr_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, decay=True)
    assert lr_at(5, **kw) == 0.5 and lr_at(10, **kw) == 1.0
    assert abs(lr_at(60, **kw) - 0.55) < 1e-12  # halfway through the cosine: the mean of lr and min_lr
    assert lr_at(110, **kw) == 0.1 and lr_at(500, **kw) == 0.1
    assert lr_at(500, **{**kw, "decay": False}) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# the stages

def test_pretrain_then_sft_smoke(base, sft, read_log):
    out, p = base
    assert re.search(r"step 4/4 \| loss \d+\.\d{4} \| lr \S+ \| tok/s \d+ \| eta \d+m\d\ds", p.stdout), p.stdout
    assert "before -> after" in p.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert {"model", "model_args", "optimizer", "config", "step", "rng", "tokenizer", "script"} <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["config"]["data"] == "pretrain" and ckpt["config"]["max_iters"] == 4
    assert ckpt["script"] == "train_sft.py"
    assert [s for s, _ in train_losses(read_log, out)] == [1, 2, 3, 4]
    evals = read_log(out, "eval")
    assert [r["step"] for r in evals] == [0, 4] and set(evals[0]["heldout"]) == set(evals[-1]["heldout"])

    out, p = sft
    assert "lost their oldest exchanges" in p.stdout and "| kl " in p.stdout
    losses = train_losses(read_log, out)
    assert [s for s, _ in losses] == list(range(1, 21)) and all(0 < l < 20 for _, l in losses)
    kls = [r["kl"] for r in read_log(out, "train")]
    assert kls[0] == 0.0 and kls[-1] > 0  # the anchor starts at the initial model and measures the drift
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["config"]["data"] == "sft" and ckpt["model_args"]["n_embd"] == 32 and "ref_model" in ckpt
    assert [r["step"] for r in read_log(out, "eval")] == [0, 10, 20]
    assert "accuracy" in read_log(out, "eval")[-1]["task"]


def test_pretrain_from_scratch_with_learned_positions(sft_main, tmp_path):
    # --pos_emb=learned: GPT-2's position table, nanoGPT's model, from scratch; its head size need not be even
    out = tmp_path / "learned"
    sft_main(["--data=pretrain", f"--out_dir={out}", "--max_iters=2", "--pos_emb=learned", "--n_embd=12",
              "--n_head=4"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["pos_emb"] == ckpt["config"]["pos_emb"] == "learned"
    assert ckpt["model"]["transformer.wpe.weight"].shape == (32, 12)  # (block_size, n_embd)


def test_ddp_matches_single_process(base, sft, run_sft, read_log, tmp_path):
    # 2 ranks x 2 rows vs 1 process x 4 rows, two micro-steps each: SFT batches have different numbers of loss
    # tokens per rank, so this also checks that the loss is normalized by the global token count
    two = str(tmp_path / "two")
    run_sft([*sft_args(base[0]), f"--out_dir={two}", "--max_iters=3"], nproc=2)
    a, b = train_losses(read_log, sft[0])[:3], train_losses(read_log, two)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([l for _, l in b]), torch.tensor([l for _, l in a]), rtol=1e-5, atol=1e-5)


def test_packing_trains_like_the_padded_batch(base, sft, sft_main, read_log, tmp_path, capsys):
    # the same examples per step, several per row: losses (CE and the KL anchor, two micro-steps) match the
    # unpacked run's
    packed = str(tmp_path / "packed")
    sft_main([*sft_args(base[0]), f"--out_dir={packed}", "--max_iters=3", "--packing=true"])
    a, b = train_losses(read_log, sft[0])[:3], train_losses(read_log, packed)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor([l for _, l in b]), torch.tensor([l for _, l in a]), rtol=1e-5, atol=1e-5)
    kl = [r["kl"] for r in read_log(sft[0], "train")[:3]], [r["kl"] for r in read_log(packed, "train")]
    torch.testing.assert_close(torch.tensor(kl[1]), torch.tensor(kl[0]), rtol=1e-4, atol=1e-6)
    capsys.readouterr()
    with pytest.raises(UserError, match="^--packing=true --data=pretrain: packing is for conversations"):
        sft_main(["--data=pretrain", "--packing=true", f"--out_dir={tmp_path / 'p'}"])


def test_bad_user_jsonl_names_file_and_line(sft_main, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "Write an addition that equals 12.", "completion": "1+11=12"}\n{"prompt": 3}\n')
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: "):
        sft_main([f"--data={path}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1"])
    assert not os.path.exists(tmp_path / "out"), "refused before anything was written"


# ---------------------------------------------------------------------------------------------------------------
# resume: exact, with new knobs, refused

def test_resume_is_exact(base, sft, half, run_sft, read_log, copy_run, tmp_path):
    split = copy_run(half, tmp_path / "split")
    run_sft([*resume_args(base[0]), f"--out_dir={split}", "--max_iters=20"])
    assert train_losses(read_log, split) == train_losses(read_log, sft[0])  # bit-identical, not merely close
    assert [r["step"] for r in read_log(split, "eval")] == [0, 10, 20]  # the resumed step-10 eval logged once


def test_resume_with_a_new_learning_rate_follows_the_new_schedule(base, half, sft_main, read_log, copy_run,
                                                                   tmp_path, capsys):
    out = copy_run(half, tmp_path / "new_lr")
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["config"]
    assert saved["learning_rate"] == 1e-3 and saved["min_lr"] == 1e-4  # the stage default, resolved and saved
    before = read_log(out)
    sft_main([*resume_args(base[0]), f"--out_dir={out}", "--max_iters=12", "--learning_rate=2e-3"])
    printed = capsys.readouterr().out
    assert "changed: learning_rate 0.001 -> 0.002" in printed
    assert "changed: min_lr 0.0001 -> 0.0002" in printed  # the default floor (lr / 10) follows the new peak
    log = read_log(out)
    assert log[:len(before)] == before  # the first run's records, kept as they were
    new = [r for r in log[len(before):] if r["kind"] == "train"]
    assert [r["step"] for r in new] == [11, 12]
    for r in new:  # the same cosine (warmup and decay end from the checkpoint), with the new peak and floor
        assert r["lr"] == pytest.approx(lr_at(r["step"], 2e-3, 2e-4, 2, 20, True), rel=1e-12)
        assert r["lr"] != pytest.approx(lr_at(r["step"], 1e-3, 1e-4, 2, 20, True))
    config = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["config"]
    assert (config["learning_rate"], config["min_lr"]) == (2e-3, 2e-4)


@pytest.mark.parametrize("change,refused", [
    ("--data=pretrain", "data 'sft' -> 'pretrain'"),
    ("--seed=7", "seed 1337 -> 7"),
    ("--batch_size=8", "batch_size 4 -> 8"),
    ("--n_embd=64", "n_embd 32 -> 64"),
    ("--pos_emb=learned", "pos_emb 'rope' -> 'learned'"),
])
def test_resume_refuses_a_changed_run_defining_knob(half, base, sft_main, copy_run, snapshot, tmp_path, change,
                                                    refused):
    out = copy_run(half, tmp_path / "refused")
    before = snapshot(out)
    ckpt = os.path.join(out, "ckpt.pt")
    with pytest.raises(UserError, match=f"^cannot resume {re.escape(ckpt)}: {re.escape(refused)} \\(run-defining"):
        sft_main([*resume_args(base[0]), f"--out_dir={out}", "--max_iters=12", change])
    assert snapshot(out) == before  # ckpt.pt and log.jsonl byte-identical, nothing added


# ---------------------------------------------------------------------------------------------------------------
# crashes: kill -9, a diverging run

def complete_records(path):
    """The records of the lines a running process has finished writing (a line is done when its newline is)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    return [json.loads(line) for line in text.split("\n")[:-1]]


def test_kill_9_then_resume_logs_every_step_once(base, start_script, run_sft, read_log, tmp_path):
    out, k = str(tmp_path / "crash"), 3
    knobs = ["--data=sft", f"--eval_interval={k}", f"--out_dir={out}"]
    log_path, ckpt_path = os.path.join(out, "log.jsonl"), os.path.join(out, "ckpt.pt")
    # far more steps than it can take before the kill: the kill, not the end of the run, stops it
    proc = start_script("train_sft.py", [*knobs, f"--init_from={base[0]}/ckpt.pt", "--max_iters=100000"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:  # freeze it once it has logged steps past a saved checkpoint, then kill it frozen
            assert proc.poll() is None, f"the run ended on its own:\n{proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint after 120 s"
            if max((r["step"] for r in complete_records(log_path)), default=0) > k:
                os.kill(proc.pid, signal.SIGSTOP)
                saved = torch.load(ckpt_path, weights_only=False)["step"] if os.path.exists(ckpt_path) else 0
                logged = max(r["step"] for r in complete_records(log_path))
                if saved >= k and logged > saved:
                    break
                os.kill(proc.pid, signal.SIGCONT)  # frozen between a save and the next record: once more
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL, also of a frozen process: no cleanup code runs
        proc.wait()
        proc.stderr.close()
    assert complete_records(log_path)[-1]["step"] > saved, "records past the checkpoint, or this proves nothing"

    end = saved + k + 1  # past one more save, ending off the eval grid
    run_sft([*knobs, "--init_from=resume", f"--max_iters={end}"])
    train = [r["step"] for r in read_log(out, "train")]
    evals = [r["step"] for r in read_log(out, "eval")]
    assert train == list(range(1, end + 1)), "every train step logged exactly once, in order"
    assert evals == sorted({*range(0, end + 1, k), end}), "every eval logged exactly once"
    assert torch.load(ckpt_path, weights_only=False)["step"] == end


def test_nonfinite_loss_stops_and_keeps_checkpoint(base, half, sft_main, copy_run, snapshot, tmp_path):
    out = copy_run(half, tmp_path / "nan")
    ckpt = snapshot(out)["ckpt.pt"]
    # an absurd peak learning rate (the cosine still has 10 steps to go): the first update blows the weights up,
    # the next forward is not finite
    with pytest.raises(Diverged, match=r"^non-finite loss=(nan|inf).* at step 12; .*ckpt.pt keeps the last good"):
        sft_main([*resume_args(base[0]), f"--out_dir={out}", "--max_iters=14", "--learning_rate=1e30"])
    assert snapshot(out)["ckpt.pt"] == ckpt


def test_update_that_blows_up_is_not_saved(sft_main, tmp_path):
    # one Adam step at lr 1e6 moves every weight by about 1e6: finite weights and finite outputs (LayerNorm), which
    # only the weight limit refuses, before the first save
    out = tmp_path / "huge"
    with pytest.raises(Diverged, match=r"^the model blew up after step 1: a weight of .*; not saving, no checkpoint "
                                       r"was written\. Try a lower learning_rate\.$"):
        sft_main(["--data=pretrain", f"--out_dir={out}", "--max_iters=1", "--learning_rate=1e6", "--warmup_iters=0"])
    assert not (out / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# your corpus, your tokenizer

def test_pretrain_on_your_corpus_with_your_tokenizer(sft_main, ppo_main, read_log, snapshot, tmp_path, capsys):
    from nanopost import train_tokenizer
    corpus = tmp_path / "sonnet.txt"
    corpus.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n" * 30)
    bpe = tmp_path / "my.bpe"
    train_tokenizer.main([f"--data={corpus}", "--vocab_size=300", f"--out={bpe}"])
    out = tmp_path / "base"
    knobs = [f"--data={corpus}", f"--tokenizer={bpe}", "--max_iters=4", "--eval_interval=2"]
    capsys.readouterr()
    sft_main(knobs + [f"--out_dir={out}"])
    printed = capsys.readouterr().out
    assert "tokenized" in printed and "sample 4: " in printed
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["vocab_size"] == 300 and ckpt["tokenizer_bpe"] == bpe.read_text()
    assert ckpt["stage"] == "pretrain" and len(ckpt["data_hash"]) == 64
    evals = read_log(out, "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all("sample" in r and "heldout" not in r and "task" not in r for r in evals), "built-in metrics"
    # a second run reuses the cached tokens
    sft_main(knobs + [f"--out_dir={tmp_path / 'again'}"])
    assert "tokenized" not in capsys.readouterr().out
    # the corpus changes: a resume refuses it, and nothing in out_dir is written
    with open(corpus, "a") as f:
        f.write("Rough winds do shake the darling buds of May,\n")
    before = snapshot(out)
    with pytest.raises(UserError, match="is not the data it started with"):
        sft_main(["--init_from=resume", f"--out_dir={out}", "--max_iters=6"])
    assert snapshot(out) == before
    # the checkpoint carries the tokenizer: PPO from it needs neither the flag nor the file
    bpe.unlink()
    # (the built-in prompts take 30 of the 32 positions in this tokenizer, trained on a sonnet)
    ppo_main([f"--init_from={out / 'ckpt.pt'}", f"--out_dir={tmp_path / 'ppo'}", "--max_iters=1", "--max_new_tokens=2"])
    assert torch.load(tmp_path / "ppo" / "ckpt.pt", weights_only=True)["tokenizer_bpe"] == ckpt["tokenizer_bpe"]


def test_init_optimizer_continues_the_adam_state_on_new_data(base, ppo_run, sft_main, tmp_path):
    # rft's rounds: each a new run on new data, one AdamW state across them. The base ran 4 steps: with the flag
    # the new run's Adam has taken 4 + 2 steps, without it 2
    for flag, steps in (("true", 6), ("false", 2)):
        out = tmp_path / flag
        sft_main(["--data=sft", f"--init_from={base[0]}/ckpt.pt", f"--out_dir={out}", "--max_iters=2",
                  f"--init_optimizer={flag}"])
        state = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["state"]
        assert {int(s["step"]) for s in state.values()} == {steps}
    with pytest.raises(UserError, match=r"^--init_optimizer=true: --init_from=.* is not a train_sft.py checkpoint"):
        sft_main(["--data=sft", f"--init_from={ppo_run[0]}/ckpt.pt", f"--out_dir={tmp_path / 'p'}",
                  "--init_optimizer=true"])


def test_snapshot_steps_keep_the_model_along_training(base, sft_main, tmp_path):
    out = tmp_path / "snaps"
    sft_main(["--data=sft", f"--init_from={base[0]}/ckpt.pt", f"--out_dir={out}", "--max_iters=3",
              "--snapshot_steps=2,3,9", "--eval_prompts=0"])
    assert sorted(os.listdir(out / "snap")) == ["step_2.pt", "step_3.pt"]  # 9 is past the end
    final, snap = (torch.load(p, weights_only=True) for p in (out / "ckpt.pt", out / "snap" / "step_3.pt"))
    assert snap["step"] == 3 and snap["script"] == "train_sft.py" and "optimizer" not in snap
    for name, w in final["model"].items():
        torch.testing.assert_close(snap["model"][name], w, rtol=0, atol=0, msg=name)
    step2 = torch.load(out / "snap" / "step_2.pt", weights_only=True)["model"]
    assert any(not torch.equal(step2[n], w) for n, w in final["model"].items()), "step 2 is not step 3"
