"""nanopost.studies.bench_peers without any peer installed: what it skips and says, the pretraining row against a
stand-in for nanoGPT's train.py (the real train_sft.py on our side), and nanopost's sampling worker. The peers themselves are
never imported here: the benchmark runs them in their own processes."""

import json
import os
import subprocess
import sys

import pytest

from nanopost.studies import bench_peers
from nanopost.config import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# prints what nanoGPT's train.py prints per iteration, 0 .. max_iters, step i taking 5 + i ms; fails as train.py would
# without the data folder and configurator.py it reads from its working folder
STAND_IN = """
import os, pickle, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
assert os.path.isfile("configurator.py")
with open(os.path.join("data", args["dataset"], "meta.pkl"), "rb") as f:
    assert pickle.load(f)["vocab_size"] == 1024
assert os.path.getsize(os.path.join("data", args["dataset"], "train.bin")) > 2 * int(args["block_size"])
assert (args["bias"], args["compile"], args["device"]) == ("True", "False", "cpu")
for i in range(int(args["max_iters"]) + 1):
    print(f"iter {i}: loss 6.9000, time {5 + i:.2f}ms, mfu -100.00%")
"""


@pytest.fixture
def nanogpt(tmp_path):
    folder = tmp_path / "nanoGPT"
    folder.mkdir()
    (folder / "train.py").write_text(STAND_IN)
    (folder / "model.py").write_text("")
    (folder / "configurator.py").write_text("")
    return folder


def test_missing_peers_are_skipped_with_the_reason(tmp_path, capsys):
    lines = bench_peers.main(["--rows=pretrain,sample,grpo", "--peer_python=/nowhere/python",
                              f"--work_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert lines == []
    assert "skipped nanoGPT: no --nanogpt=PATH" in out
    assert "skipped transformers: /nowhere/python cannot import transformers" in out
    assert "skipped trl: /nowhere/python cannot import trl" in out
    assert "skipped row pretrain: needs nanoGPT" in out and "skipped row grpo: needs trl" in out


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_pretrain_row_interleaves_and_reads_both_sides(nanogpt, tmp_path, capsys, clock):
    lines = bench_peers.main(["--rows=pretrain", f"--nanogpt={nanogpt}", "--peer_python=/nowhere/python",
                              "--rounds=2", "--steps=2", "--warmup=1", f"--clock={clock}", f"--work_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "round 1/2" in out and "round 2/2" in out
    assert len(lines) == 1 and lines[0].startswith("| pretrain | nanoGPT | ms per step |")
    cells = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert cells[5:7] == ["6.0", "6.5"]  # the stand-in's steps 1 and 2 of each round, its warm-up step 0 left out
    ours = [float(c) for c in cells[3:5]]
    assert 0 < ours[0] <= ours[1]  # train_sft.py's steps, from its log.jsonl
    assert float(cells[7].strip("*")) == pytest.approx(ours[1] / 6.5, rel=0.01)  # nanopost / peer of the medians
    assert len(os.listdir(tmp_path / "np_pretrain_128_1")) > 0  # each round a fresh run of the real script


def test_sample_worker_times_greedy_generate(tiny_gpt, save_tiny_ckpt, tmp_path):
    model = tiny_gpt(block_size=96).eval()
    path = save_tiny_ckpt(tmp_path / "ckpt.pt", model)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "nanopost.studies.bench_peers", "--worker=sample", "cpu", path,
                           str(tmp_path / "p.json"), "1", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got["times"]) == 2 and all(t > 0 for t in got["times"])
    tokens, mask, _ = model.generate(prompts, 64, temperature=0)  # no <|endoftext|> in a random model's argmax
    assert got["responses"] == [row[5:].tolist() for row in tokens]


def test_bad_rows():
    with pytest.raises(UserError, match=r"^--rows=pretrain,tpu: expected some of pretrain, pretrain_64, sample"):
        bench_peers.main(["--rows=pretrain,tpu"])
