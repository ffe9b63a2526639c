"""
nanopost.studies.experiment: the report (its table, statistics and plot), SFT interpolated at the RL run's accuracy, the
stage runner's skip logic and the wiring of each method to its start checkpoint and budget. The training scripts
are stood in for by fakes: their own tests run them.
"""

import math
import os
import re

import pytest

from nanopost.studies import experiment as X
from nanopost.config import UserError


def fake_runs():
    def run(acc, dloss, kl):
        return dict(accuracy=acc, distinct_valid=1.0, distinct_1=0.5, distinct_2=0.6, entropy=1.0, kl_base_pi=kl,
                    dloss_mean=dloss, **{"dloss/facts": dloss, "dprobe/facts": -dloss, "loss/facts": 2.0 + dloss,
                                         "probe/facts": 0.8 - dloss})
    return {"base": [run(0.1, 0.0, 0.0)], "sft": [run(0.5, 0.3, 2.0), run(0.7, 0.5, 3.0)],
            "grpo": [run(0.6, 0.01, 0.1), run(0.6, 0.03, 0.2)]}


def test_report_table_statistics_and_plot(tmp_path):
    runs = fake_runs()
    trajectories = [[runs["base"][0], sft] for sft in runs["sft"]]  # base -> end: the ends are the only snapshots
    table = X.write_report(str(tmp_path), runs, trajectories=trajectories)
    text = (tmp_path / "report.md").read_text()
    assert (tmp_path / "forgetting_vs_accuracy.png").stat().st_size > 1000
    assert "![forgetting vs accuracy](forgetting_vs_accuracy.png)" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert list(rows) == ["method", "base", "sft", "grpo"]
    assert r"KL(base\|\|pi)" in rows["method"]  # escaped, or the header would have one cell too many
    assert all(row.count(" | ") == rows["method"].count(" | ") for row in rows.values())
    assert table.splitlines()[0].split()[:3] == ["method", "seeds", "acc"]  # plain text for stdout
    # sft accuracy over two seeds: mean 0.6, sample std sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 1) = 0.1414
    assert "0.600 ± 0.141" in rows["sft"]
    assert "+0.4000 ± 0.1414" in rows["sft"]  # dloss_mean: mean 0.4, std 0.1414
    assert "| 0.100 |" in rows["base"]  # one seed: the value alone, no spread
    assert "held-out loss facts 2.0000; probe accuracy facts 0.800" in text
    # KL (2, 3, 0.1, 0.2) against dloss (0.3, 0.5, 0.01, 0.03) over the 4 post-trained checkpoints, base left out
    # (it starts each trajectory) and each sft end counted once (it ends its trajectory and is a run)
    kl, dl = [2.0, 3.0, 0.1, 0.2], [0.3, 0.5, 0.01, 0.03]
    mk, md = sum(kl) / 4, sum(dl) / 4
    r = sum((a - mk) * (b - md) for a, b in zip(kl, dl)) / math.sqrt(
        sum((a - mk) ** 2 for a in kl) * sum((b - md) ** 2 for b in dl))
    assert f"over 4 post-trained checkpoints (SFT's snapshots and both runs' ends): {r:+.3f}" in text
    assert X.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and X.pearson([1, 2], [1, 2]) is None


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
    os.makedirs(os.path.join(out, "snap"))
    open(os.path.join(out, "snap", "step_3.pt"), "w").close()  # the first run's trajectory
    run(["--max_iters=6"])
    assert len(calls) == 2, "changed command: rerun"
    assert not os.path.exists(os.path.join(out, "snap")), "a rerun's trajectory must not mix in the old run's"
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
    snap = tmp_path / "s3" / "sft" / "snap"  # what train_sft.py --snapshot_steps leaves; step 200 is past the end
    snap.mkdir(parents=True)
    for step in (10, 2, 200):
        (snap / f"step_{step}.pt").write_text("x")
    cfg = X.Config(out_dir=str(tmp_path), sft_iters=150, sft_args="--max_iters=40")
    ckpts, trajectories = X.run_all_stages(cfg, [3])
    assert set(ckpts) == {"base", "sft", "grpo"} and X.methods(cfg) == ["base", "sft", "sft_matched", "grpo"]
    base = ckpts["base"][None]
    assert trajectories[3] == [str(snap / "step_2.pt"), str(snap / "step_10.pt"), ckpts["sft"][3]]
    assert arg("sft seed=3", "max_iters") == "40"  # the user's --sft_args come after the knob
    assert arg("sft seed=3", "snapshot_steps") == X.SFT_SNAPSHOTS
    assert arg("grpo seed=3", "init_from") == base and arg("grpo seed=3", "max_iters") == "200"
    assert arg("grpo seed=3", "advantage") == "grpo" and arg("grpo seed=3", "group_size") == "8"
    assert all(arg(f"{m} seed=3", "seed") == "3" for m in ("sft", "grpo"))
    assert arg("grpo seed=3", "max_minutes") == "0" and calls["grpo seed=3"][2] == [base]
    ckpts, _ = X.run_all_stages(X.Config(out_dir=str(tmp_path), advantage="gae"), [3])
    assert "ppo" in ckpts and arg("ppo seed=3", "advantage") == "gae" and arg("ppo seed=3", "group_size") is None


def test_sft_matched_interpolates_every_metric_at_the_rl_accuracy():
    base = dict(accuracy=0.0, dloss_mean=0.0, kl_base_pi=0.0, name="base")
    traj = [base, dict(accuracy=0.4, dloss_mean=0.1, kl_base_pi=1.0), dict(accuracy=0.8, dloss_mean=0.5, kl_base_pi=3.0),
            dict(accuracy=0.6, dloss_mean=0.9, kl_base_pi=4.0)]  # falls back below 0.8 at the end
    m = X.matched(traj, 0.6)  # first reached between 0.4 and 0.8: halfway, not at the later 0.6 end
    assert m == pytest.approx(dict(accuracy=0.6, dloss_mean=0.3, kl_base_pi=2.0))
    assert X.matched(traj, 0.2) == pytest.approx(dict(accuracy=0.2, dloss_mean=0.05, kl_base_pi=0.5))
    assert X.matched(traj, 0.9) is None  # never reached: no extrapolation
    assert X.value_at([(0.0, 1.0), (1.0, 3.0)], 0.25) == pytest.approx(1.5)


@pytest.mark.parametrize("arg, message", [
    ("--advantage=ppo", "--advantage=ppo: expected one of gae, grpo, rloo"),
    ("--group_size=1", "--group_size=1"),
    ("--sft_iters=0", "--sft_iters=0"),  # once trained 150 steps anyway and interpolated base -> end: a wrong row
    ("--k=0", "--k=0"),
    ("--seeds=a", "--seeds=a: expected comma-separated integers"),
])
def test_bad_knob_is_one_line_before_any_stage(arg, message, tmp_path, monkeypatch):
    monkeypatch.setattr(X, "run_stage", lambda *a, **k: pytest.fail("a stage started before the knobs were checked"))
    with pytest.raises(UserError, match=re.escape(message)):
        X.main([f"--out_dir={tmp_path / 'out'}", arg])
    assert not (tmp_path / "out").exists()
