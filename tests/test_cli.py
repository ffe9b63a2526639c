"""
The command-line contract both training scripts share (nanopost.config's policy, seen from outside): bad input is
one line `error: <the knob or file>: ...` and exit 2, before anything in out_dir is touched; a busy out_dir says
who holds it; a checkpoint is resumed only by the script that wrote it.

Most cases call main() in-process (cheap); a few run the real command to prove the exit code and the one line.
That a process killed while it holds the lock releases it is in test_common.py.
"""

import os
import re

import pytest

from nanopost.config import UserError
from nanopost.checkpoint import lock_out_dir

BAD_KNOBS = [  # (script, arguments, the whole message)
    ("sft", ["--batch_size=0"], "--batch_size=0: must be >= 1"),
    ("sft", ["--grad_accum=0"], "--grad_accum=0: must be >= 1"),
    ("sft", ["--log_interval=0"], "--log_interval=0: must be >= 1"),
    ("sft", ["--eval_examples=0"], "--eval_examples=0: must be >= 1"),
    ("sft", ["--learning_rate=0"], "--learning_rate=0.0: must be > 0"),
    ("sft", ["--max_iters=-5"], "--max_iters=-5: must be >= 0"),
    ("sft", ["--beta2=1"], "--beta2=1.0: must be < 1"),
    ("sft", ["--dropout=1.5"], "--dropout=1.5: must be < 1"),
    ("sft", ["--dtype=float16"], "--dtype=float16: expected one of bfloat16, float32"),
    ("sft", ["--n_embd=12", "--n_head=4"], "--n_embd=12 --n_head=4: the head size n_embd/n_head must be even "
                                           "(rotary positions rotate pairs of channels; --pos_emb=learned does not)"),
    ("sft", ["--n_embd=10", "--n_head=4", "--pos_emb=learned"], "--n_embd=10 --n_head=4: n_embd must be a multiple "
                                                                "of n_head"),
    ("sft", ["--pos_emb=alibi"], "--pos_emb=alibi: expected one of rope, learned"),
    ("sft", ["--max_iters=ten"], "--max_iters=ten: expected int"),
    ("sft", ["--batch_siz=4"], "unknown knob --batch_siz (see --help for the list)"),
    ("sft", ["--device=tpu"], "--device=tpu: expected auto, cpu, cuda or cuda:N"),
    ("ppo", ["--batch_size=0"], "--batch_size=0: must be >= 1"),
    ("ppo", ["--num_minibatches=0"], "--num_minibatches=0: must be >= 1"),
    ("ppo", ["--ppo_epochs=0"], "--ppo_epochs=0: must be >= 1"),
    ("ppo", ["--temperature=0"], "--temperature=0.0: must be > 0"),
    ("ppo", ["--clip_coef=-0.2"], "--clip_coef=-0.2: must be > 0"),
    ("ppo", ["--kl_estimator=k2"], "--kl_estimator=k2: expected one of k1, full, k3"),
    ("ppo", ["--batch_size=6", "--num_minibatches=4"],
     "--batch_size=6: must split evenly over 1 rank(s) and then into --num_minibatches=4"),
    ("ppo", ["--batch_size=1000"], "--batch_size=1000: more than the 216 training prompts"),
    ("ppo", ["--max_new_tokens=60"], "--max_new_tokens=60: the longest built-in prompt is"),
    ("ppo", ["--reward_fn=score"], "--reward_fn=score: expected 'module:function' or 'file.py:function'"),
    ("ppo", ["--init_from=nowhere/ckpt.pt"], "checkpoint nowhere/ckpt.pt does not exist"),
]


@pytest.fixture
def mains(sft_main, ppo_main, tiny_ckpt):
    """{'sft': main, 'ppo': main}; PPO starts from the tiny checkpoint unless the arguments say otherwise."""
    return dict(sft=sft_main, ppo=lambda args: ppo_main([f"--init_from={tiny_ckpt}", *args]))


@pytest.mark.parametrize("script,args,message", BAD_KNOBS, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_KNOBS])
def test_bad_knob_names_itself_before_out_dir_is_touched(mains, tmp_path, script, args, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        mains[script]([f"--out_dir={out}", "--max_iters=1", *args])
    assert not out.exists()


def test_bad_knob_is_one_line_and_exit_2(run_sft, run_ppo, ppo_run, tiny_ckpt, copy_run, snapshot, tmp_path):
    out = tmp_path / "sft"
    proc = run_sft(["--batch_size=0", f"--out_dir={out}"], check=False)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, "error: --batch_size=0: must be >= 1\n", "")
    assert not out.exists()
    # into the out_dir of a finished run: its checkpoint and log stay as they were
    out = copy_run(ppo_run[0], tmp_path / "ppo")
    before = snapshot(out)
    proc = run_ppo([f"--init_from={tiny_ckpt}", "--temperature=0", f"--out_dir={out}"], check=False)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, "error: --temperature=0.0: must be > 0\n", "")
    assert snapshot(out) == before


def test_second_run_into_a_busy_out_dir_is_refused(run_sft, snapshot, tmp_path):
    out = tmp_path / "busy"
    lock_out_dir(str(out))  # this process holds it, as a running training would (released after the test)
    (out / "log.jsonl").write_text('{"kind": "train", "step": 1}\n')
    before = snapshot(out)
    proc = run_sft(["--data=pretrain", f"--out_dir={out}", "--max_iters=1"], check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {out} is in use by pid {os.getpid()} (one run per out_dir)\n"
    assert snapshot(out) == before  # the first run's log not truncated


def test_resume_refuses_the_other_scripts_checkpoint(base, ppo_run, mains, copy_run, snapshot, tmp_path):
    for script, run, writer in (("sft", ppo_run[0], "train_ppo.py"), ("ppo", base[0], "train_sft.py")):
        out = copy_run(run, tmp_path / script)
        before = snapshot(out)
        ckpt = os.path.join(out, "ckpt.pt")
        reader = f"train_{script}.py"
        with pytest.raises(UserError, match=f"^{re.escape(ckpt)} was written by {writer}, not {reader}; resume it "
                                            f"with that script, or start from it with --init_from={re.escape(ckpt)}$"):
            mains[script](["--init_from=resume", f"--out_dir={out}"])
        assert snapshot(out) == before
