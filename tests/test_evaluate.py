"""
Every metric of nanopost.evaluate against a value computed by hand: a uniform model (zeroed lm_head, so every
logit is 0) has entropy and held-out loss log V; a model has KL 0 to itself; distinct counts and verifier
accuracy on fixed lists. Plus the report writer with matplotlib made unimportable.
"""

import math
import os
import sys

import pytest
import torch

from nanopost import evaluate as E
from nanopost import experiment as X
from nanopost.common import save_checkpoint
from nanopost.model import GPT, GPTConfig
from nanopost.tokenizer import get_tokenizer
from nanopost.world import load_world

P10 = "Write an addition that equals 10."
P20 = "Give two numbers that add up to 20."


@pytest.fixture
def reference_kernels(monkeypatch):
    """CPU kernels take the pure-PyTorch reference path instead of the Triton interpreter. The interpreter runs
    one program per row, too slow for held-out losses over whole documents; the kernels' own tests check that the
    two paths agree, and the small KL and entropy tests below still go through the interpreter."""
    import kernels._dispatch
    monkeypatch.setattr(kernels._dispatch, "INTERPRET", False, raising=False)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("nanopost")


@pytest.fixture(scope="module")
def world():
    return load_world(0)


def tiny_gpt(tok, seed=0, uniform=False):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
    model = GPT(cfg)
    if uniform:
        with torch.no_grad():
            model.lm_head.weight.zero_()  # logits = h @ 0 = 0 for every token: softmax is uniform over V
    return model


# -----------------------------------------------------------------------------
# pure counting, on fixed lists

def test_distinct_n_by_hand():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert E.distinct_n(seqs, 1) == pytest.approx(4 / 6)  # unigrams 1,2,3,1,2,4: 4 unique of 6
    assert E.distinct_n(seqs, 2) == pytest.approx(3 / 4)  # bigrams 12,23,12,24: 3 unique of 4
    assert E.distinct_n([[5, 5, 5, 5]], 1) == pytest.approx(1 / 4)
    assert E.distinct_n([[7]], 2) == 0.0  # no bigram at all -> 0, not a division by zero
    assert E.distinct_n([], 1) == 0.0


def test_score_samples_accuracy_and_distinct_valid_by_hand(world):
    k = 4
    prompts = [P10] * k + [P20] * k
    responses = ["1+9=10", "1+9=10", "3+7=10", "2+2=4",  # prompt 10: 3 valid, 2 distinct valid answers
                 "10+10=20", "19+1=20", "019+1=20", "5+15=20"]  # prompt 20: leading zero invalid; last truncated
    ended = [True, True, True, True, True, True, True, False]
    toks = [[1, 2], [1, 2], [3, 4], [5, 6], [1], [2], [3], [4]]
    m, verdicts = E.score_samples(world, prompts, responses, ended, k, toks)
    assert [v["correct"] for v in verdicts] == [True, True, True, False, True, True, False, False]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["pass_at_k"] == pytest.approx(1.0)
    assert m["ended"] == pytest.approx(7 / 8)
    assert m["well_formed"] == pytest.approx(1.0)  # "019+1=20" is well formed, only not canonical
    assert m["reward"] == pytest.approx(5 / 8)
    assert m["distinct_valid"] == pytest.approx((2 + 2) / 2)  # {1+9, 3+7} and {10+10, 19+1}; 5+15 did not end
    # prompt 10: unigrams 1,2,1,2,3,4,5,6 -> 6/8; bigrams 12,12,34,56 -> 3/4. prompt 20: 4/4 unigrams, no bigram
    assert m["distinct_1"] == pytest.approx((6 / 8 + 1.0) / 2)
    assert m["distinct_2"] == pytest.approx((3 / 4 + 0.0) / 2)


def test_completion_matches():
    assert E.completion_matches("42\n3+4=7", "42")
    assert E.completion_matches(" Kelmar. Zorvan", " Kelmar")
    assert not E.completion_matches("425", "42")  # the word must end where the expected text ends
    assert not E.completion_matches(" Kel", " Kelmar")
    assert E.spread(list(range(10)), 3) == [0, 3, 6]
    assert E.spread([1, 2], 5) == [1, 2]


# -----------------------------------------------------------------------------
# model metrics on a tiny GPT

def test_uniform_model_heldout_loss_is_log_v(tok, world, reference_kernels):
    model = tiny_gpt(tok, uniform=True)
    log_v = math.log(tok.vocab_size)
    losses = E.heldout_losses(model, tok, world, "cpu", max_docs=3)
    assert set(losses) == set(world.skills)
    for skill, loss in losses.items():
        assert loss == pytest.approx(log_v, abs=1e-4), skill

def test_uniform_model_entropy_is_log_v(tok, world):
    model = tiny_gpt(tok, uniform=True)
    m = E.task_eval(model, tok, world, [P10, P20], k=2, max_new_tokens=4, seed=0)
    assert m["entropy"] == pytest.approx(math.log(tok.vocab_size), abs=1e-4)


def test_kl_to_itself_is_zero_and_to_another_model_positive(tok, world):
    model, other = tiny_gpt(tok, seed=0), tiny_gpt(tok, seed=1)
    same = E.task_eval(model, tok, world, [P10, P20], k=2, max_new_tokens=4, seed=0, base_model=model)
    assert same["kl_base"] == pytest.approx(0.0, abs=1e-6)
    diff = E.task_eval(model, tok, world, [P10, P20], k=2, max_new_tokens=4, seed=0, base_model=other)
    assert diff["kl_base"] > 1e-4
    # the samples come from pi alone, so the base model does not change any sample-based metric
    assert diff["distinct_1"] == same["distinct_1"] and diff["entropy"] == pytest.approx(same["entropy"])


def test_task_eval_is_deterministic_and_restores_train_mode(tok, world, reference_kernels):
    model = tiny_gpt(tok)
    model.train()
    a = E.task_eval(model, tok, world, [P10, P20], k=3, max_new_tokens=5, seed=7, n_show=6)
    assert model.training, "task_eval must give the model back in training mode"
    b = E.task_eval(model, tok, world, [P10, P20], k=3, max_new_tokens=5, seed=7, n_show=6)
    assert [s[1] for s in a["samples"]] == [s[1] for s in b["samples"]]
    assert a == b
    c = E.task_eval(model, tok, world, [P10, P20], k=3, max_new_tokens=5, seed=8, n_show=6)
    assert [s[1] for s in a["samples"]] != [s[1] for s in c["samples"]]
    with pytest.raises(ValueError, match="k must be"):
        E.task_eval(model, tok, world, [P10], k=0)


def test_evaluate_cli_prints_table_with_zero_base_deltas(tok, tmp_path, capsys, reference_kernels):
    paths = []
    for name, seed in (("base", 0), ("other", 1)):
        model = tiny_gpt(tok, seed=seed)
        path = str(tmp_path / name / "ckpt.pt")
        save_checkpoint(path, dict(model=model.state_dict(), model_args=vars(model.config), tokenizer=tok.name))
        paths.append(path)
    results = E.main([f"--base={paths[0]}", paths[1], "--k=2", "--n_prompts=2", "--max_new_tokens=4",
                      "--max_docs=2", "--max_probes=2", "--device=cpu"])
    base, other = results[paths[0]], results[paths[1]]
    assert base["kl_base"] == pytest.approx(0.0, abs=1e-6) and base["dloss_mean"] == 0.0
    assert other["kl_base"] > 0
    assert other["dloss/facts"] == pytest.approx(other["loss/facts"] - base["loss/facts"])
    out = capsys.readouterr().out
    assert "KL(base||pi)" in out and paths[1] in out
    with pytest.raises(ValueError, match="--base"):
        E.main([paths[1]])


# -----------------------------------------------------------------------------
# the experiment's report

def fake_runs():
    def run(acc, dloss, kl):
        return dict(accuracy=acc, distinct_valid=1.0, distinct_1=0.5, distinct_2=0.6, entropy=1.0, kl_base=kl,
                    dloss_mean=dloss, **{"dloss/facts": dloss, "dprobe/facts": -dloss,
                                                       "loss/facts": 2.0 + dloss, "probe/facts": 0.8 - dloss})
    return {"base": [run(0.1, 0.0, 0.0)], "sft": [run(0.5, 0.3, 2.0), run(0.7, 0.5, 3.0)],
            "ppo": [run(0.6, 0.01, 0.1), run(0.6, 0.03, 0.2)]}


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    table = X.write_report(str(tmp_path), fake_runs())
    text = (tmp_path / "report.md").read_text()
    assert "matplotlib not installed" in text and "matplotlib not installed" in capsys.readouterr().out
    assert not (tmp_path / "forgetting_vs_accuracy.png").exists()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert list(rows) == ["method", "base", "sft", "ppo"]
    assert r"KL(base\|\|pi)" in rows["method"]  # escaped, or the header would have one cell too many
    assert all(row.count(" | ") == rows["method"].count(" | ") for row in rows.values())
    assert table.splitlines()[0].split()[:3] == ["method", "seeds", "acc"]  # plain text for stdout
    # sft accuracy over two seeds: mean 0.6, sample std sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 1) = 0.1414
    assert "0.600 ± 0.141" in rows["sft"]
    assert "+0.4000 ± 0.1414" in rows["sft"]  # dloss_mean: mean 0.4, std 0.1414
    assert "| 0.100 |" in rows["base"]  # one seed: the value alone, no spread
    assert "held-out loss facts 2.0000; probe accuracy facts 0.800" in text
    # KL (2, 3, 0.1, 0.2) against dloss (0.3, 0.5, 0.01, 0.03) over the 4 post-trained runs, base left out
    kl, dl = [2.0, 3.0, 0.1, 0.2], [0.3, 0.5, 0.01, 0.03]
    mk, md = sum(kl) / 4, sum(dl) / 4
    r = sum((a - mk) * (b - md) for a, b in zip(kl, dl)) / math.sqrt(
        sum((a - mk) ** 2 for a in kl) * sum((b - md) ** 2 for b in dl))
    assert f"over 4 post-trained runs: {r:+.3f}" in text
    assert X.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and X.pearson([1, 2], [1, 2]) is None


def test_report_with_matplotlib_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    X.write_report(str(tmp_path), fake_runs())
    assert (tmp_path / "forgetting_vs_accuracy.png").stat().st_size > 1000
    assert "forgetting_vs_accuracy.png" in (tmp_path / "report.md").read_text()


def test_run_stage_skips_only_when_command_and_inputs_are_unchanged(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd, env):  # stands in for the training script: records the call, writes a checkpoint
        assert "TRITON_INTERPRET" not in env, "training must not run through the Triton interpreter"
        calls.append(cmd)
        out_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--out_dir="))
        (tmp_path / out_dir).mkdir(parents=True, exist_ok=True)
        (tmp_path / out_dir / "ckpt.pt").write_text("x")
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(X.subprocess, "run", fake_run)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = X.Config(out_dir=str(tmp_path))
    base = tmp_path / "base.pt"
    base.write_text("b")
    out = str(tmp_path / "sft")
    run = lambda args: X.run_stage(cfg, "sft", "train_sft.py", args, out, inputs=[str(base)])
    assert run(["--max_iters=5"]) == out + "/ckpt.pt" and len(calls) == 1
    run(["--max_iters=5"])
    assert len(calls) == 1, "same command, same input: skipped"
    run(["--max_iters=6"])
    assert len(calls) == 2, "changed command: rerun"
    os.utime(base, (base.stat().st_mtime + 10,) * 2)  # the base model was retrained
    run(["--max_iters=6"])
    assert len(calls) == 3, "changed input checkpoint: rerun"
    X.run_stage(X.Config(out_dir=str(tmp_path), force=True), "sft", "train_sft.py", ["--max_iters=6"], out,
                inputs=[str(base)])
    assert len(calls) == 4, "--force=true: rerun"


def test_stages_wire_each_method_to_its_start_and_budget(tmp_path, monkeypatch):
    calls = {}

    def fake_stage(cfg, name, script, args, out_dir, inputs=()):  # records the command instead of training
        calls[name] = (script, args, list(inputs))
        return os.path.join(out_dir, "ckpt.pt")

    def arg(name, key):  # the value the script sees: parse_config keeps the last --key=value
        values = [a.split("=", 1)[1] for a in calls[name][1] if a.startswith(f"--{key}=")]
        return values[-1] if values else None

    monkeypatch.setattr(X, "run_stage", fake_stage)
    cfg = X.Config(out_dir=str(tmp_path), sft_iters=150, sft_args="--max_iters=40")
    ckpts = X.run_all_stages(cfg, [3])
    assert set(ckpts) == set(X.METHODS) and all(3 in ckpts[m] for m in X.METHODS[1:])
    base = ckpts["base"][None]
    # sft_short is the sft command (same data, seed, start) with the short budget last, so it wins
    assert calls["sft_short seed=3"][1][:-1] == calls["sft seed=3"][1] and arg("sft_short seed=3", "max_iters") == "8"
    assert arg("sft seed=3", "max_iters") == "40"  # the user's --sft_args come after the knob
    assert arg("sft_kl seed=3", "sft_kl_coef") == "0.1"
    assert arg("ppo seed=3", "init_from") == base and arg("ppo seed=3", "max_iters") == "200"
    assert arg("ppo_sft_short seed=3", "init_from") == ckpts["sft_short"][3]
    assert calls["ppo_sft_short seed=3"][2] == [ckpts["sft_short"][3]]  # retrained sft_short -> rerun
    assert arg("ppo_sft_short seed=3", "max_iters") == "100"
    assert all(arg(f"{m} seed=3", "max_minutes") == "0" for m in ("ppo", "ppo_sft_short"))
    assert all(arg(f"{m} seed=3", "seed") == "3" for m in X.METHODS[1:])
