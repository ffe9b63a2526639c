"""The plumbing both training scripts share (nanopost.config, distributed, checkpoint, loading, runlog): knobs and
their ranges, the one-line error policy, the out_dir lock, checkpoints (atomic writes, loads that run no code), the
non-finite stops, the resume policy, the run log, and train_ppo's masked statistics. The scripts' own tests check
that each script uses these."""

import builtins
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass

import pytest
import torch

from conftest import ROOT
from nanopost import checkpoint, config
from nanopost.config import Diverged, UserError, entry, knob, parse_config, validate
from nanopost.checkpoint import check_finite, check_model_finite, lock_out_dir, save_checkpoint, weight_limits
from nanopost.loading import get_rng_state, load_checkpoint, load_model, resume_config, set_rng_state
from nanopost.runlog import RunLog, append_jsonl
from train_ppo import masked_mean, masked_whiten


@dataclass
class Knobs:
    name: str = knob("run", "a string")
    steps: int = knob(10, "an int", ge=0)
    batch_size: int = knob(4, "an int, at least 1", ge=1)
    lr: float = knob(0.1, "a float above 0", gt=0)
    beta: float = knob(0.9, "a float in [0, 1)", ge=0, lt=1)
    flag: bool = knob(False, "a bool")
    mode: str = knob("a", "one of a, b", choices=("a", "b"))


# -----------------------------------------------------------------------------
# config

def test_parse_config_returns_the_config_and_the_knobs_given():
    cfg, given = parse_config(Knobs, ["--steps=3", "--lr=2e-3", "--flag=yes", "--name=x=y"])
    assert cfg == Knobs(steps=3, lr=2e-3, flag=True, name="x=y")  # the first '=' splits key from value
    assert given == dict(steps=3, lr=2e-3, flag=True, name="x=y")  # only what the command line said
    assert parse_config(Knobs, ["--steps=3", "--steps=5"])[1] == dict(steps=5)  # the last one wins
    assert parse_config(Knobs, []) == (Knobs(), {})
    assert parse_config(Knobs, ["--flag"]) == (Knobs(flag=True), dict(flag=True))  # a bare bool knob is on


def test_help_lists_every_knob_with_its_default_and_the_help_in_one_column(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Knobs, ["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["--name=run", "--steps=10", "--batch_size=4", "--lr=0.1",
                                                    "--beta=0.9", "--flag=False", "--mode=a"]
    helps = ("a string", "an int", "an int, at least", "a float above", "a float in", "a bool", "one of a")
    assert {line.index(h) for line, h in zip(lines, helps)} == {len("  --batch_size=4  ")}


@pytest.mark.parametrize("arg,message", [
    ("--stepz=3", "unknown knob --stepz (see --help for the list)"),
    ("steps=3", "bad argument 'steps=3': expected --key=value (see --help)"),
    ("--steps", "bad argument '--steps': expected --key=value (see --help)"),
    ("--steps=3.5", "--steps=3.5: expected int"),
    ("--lr=fast", "--lr=fast: expected float"),
    ("--lr=nan", "--lr=nan: expected a finite number"),
    ("--lr=inf", "--lr=inf: expected a finite number"),
    ("--flag=maybe", "--flag=maybe: expected a bool (true/false)"),
])
def test_parse_config_refuses_naming_the_argument(arg, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        parse_config(Knobs, [arg])


@pytest.mark.parametrize("override,message", [
    (dict(batch_size=0), "--batch_size=0: must be >= 1"),
    (dict(steps=-1), "--steps=-1: must be >= 0"),
    (dict(lr=0.0), "--lr=0.0: must be > 0"),
    (dict(beta=1.0), "--beta=1.0: must be < 1"),
    (dict(beta=-0.5), "--beta=-0.5: must be >= 0"),
    (dict(mode="c"), "--mode=c: expected one of a, b"),
])
def test_validate_names_the_knob_and_its_range(override, message):
    validate(Knobs())  # the defaults pass
    validate(Knobs(batch_size=1, steps=0, beta=0.0, lr=1e-12))  # the boundaries that are allowed
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        validate(Knobs(**override))


def test_entry_turns_user_errors_into_one_line_and_exit_codes(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["script.py", "--steps=3"])
    seen = []

    def ok(argv):
        seen.append(argv)
    entry(ok)
    assert seen == [["--steps=3"]]

    def failing(exc):
        def main(argv):
            raise exc
        return main

    for exc, code in ((UserError("--steps=3: too many"), 2), (Diverged("non-finite loss=nan at step 1"), 1)):
        with pytest.raises(SystemExit) as e:
            entry(failing(exc))
        assert e.value.code == code
        captured = capsys.readouterr()
        assert captured.err == f"error: {exc}\n" and captured.out == ""
    # an internal bug is not a user error: it keeps its exception (and traceback)
    with pytest.raises(KeyError):
        entry(failing(KeyError("bug")))


def test_entry_ends_a_torchrun_rank_with_its_exit_code_and_no_interpreter_shutdown(monkeypatch, capsys):
    # the shutdown it skips aborts a gloo rank now and then (see entry); what must survive is the exit code
    monkeypatch.setattr(sys, "argv", ["script.py"])
    monkeypatch.setenv("WORLD_SIZE", "2")

    def os_exit(code):
        raise SystemExit(f"os._exit({code})")
    monkeypatch.setattr(os, "_exit", os_exit)

    def bad_knob(argv):
        raise UserError("--steps=0: too few")
    for main, code in ((lambda argv: print("trained"), 0), (bad_knob, 2)):
        with pytest.raises(SystemExit, match=rf"os\._exit\({code}\)"):
            entry(main)
    assert capsys.readouterr() == ("trained\n", "error: --steps=0: too few\n")


# -----------------------------------------------------------------------------
# one run per out_dir

def test_lock_out_dir_admits_one_holder(tmp_path):
    out = str(tmp_path / "run")
    lock_out_dir(out)  # creates out_dir
    assert os.path.isdir(out)
    with open(os.path.join(out, ".lock")) as f:
        assert f.read() == str(os.getpid())
    # a second lock on the same directory (another open file: what another process would hold) is refused
    with pytest.raises(UserError, match=f"^{re.escape(out)} is in use by pid {os.getpid()} \\(one run per out_dir\\)$"):
        lock_out_dir(out)
    checkpoint._locks.pop().close()  # the first run ends
    lock_out_dir(out)  # the directory is free again


@pytest.mark.parametrize("writer", ["save_checkpoint(ckpt, dict(step=2))", "save_snapshot(out, 2)"])
def test_a_save_killed_midway_leaves_nothing_once_the_next_run_locks(tmp_path, writer):
    # a real kill -9 in the middle of torch.save, for a checkpoint and for a snapshot: the half-written temp file
    # stays behind (nothing runs after SIGKILL), and the next run into that out_dir removes it at its lock
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from nanopost.checkpoint import save_checkpoint, save_snapshot
        out = {str(out)!r}
        ckpt = os.path.join(out, "ckpt.pt")
        save_checkpoint(ckpt, dict(step=1))  # the last good one
        def dies_midway(obj, f):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dies_midway
        {writer}
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = list(out.rglob("*.tmp"))
    assert len(left) == 1 and left[0].read_bytes() == b"half a checkpoint"
    (out / "notes.tmp").write_text("the user's")  # not a checkpoint's temp file: kept
    lock_out_dir(str(out))
    assert sorted(p.name for p in out.rglob("*.tmp")) == ["notes.tmp"]
    assert torch.load(out / "ckpt.pt")["step"] == 1


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from nanopost.checkpoint import lock_out_dir
        lock_out_dir({out!r})
        print("locked", flush=True)
        time.sleep(60)
    """)], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=f"is in use by pid {holder.pid} "):
            lock_out_dir(out)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock
        holder.wait()
        holder.stdout.close()
    lock_out_dir(out)


# -----------------------------------------------------------------------------
# checkpoints

def test_checkpoint_round_trip_holds_tensors_plain_data_and_rng_state(tmp_path, tiny_gpt):
    path = str(tmp_path / "ckpt.pt")
    model = tiny_gpt()
    torch.manual_seed(5)
    rng = get_rng_state()
    want = torch.rand(3)
    save_checkpoint(path, dict(model=model.state_dict(), model_args=vars(model.config), step=7, rng=rng,
                               config=dict(lr=1e-3, name="x"), opt=torch.optim.AdamW(model.parameters()).state_dict()))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    loaded, ckpt = load_model(path)
    assert ckpt["step"] == 7 and ckpt["config"] == dict(lr=1e-3, name="x")
    for name, w in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], w, rtol=0, atol=0)
    set_rng_state(ckpt["rng"])  # every RNG, through a weights_only load and back
    torch.testing.assert_close(torch.rand(3), want, rtol=0, atol=0)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, dict(model={}, model_args={}, step=1))
    before = open(path, "rb").read()
    (tmp_path / "ckpt.pt.tmp").write_text("another writer's file")  # a fixed temp name would be clobbered

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, dict(model={}, model_args={}, step=2))
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.tmp"]  # its own temp file removed, no other
    assert (tmp_path / "ckpt.pt.tmp").read_text() == "another writer's file"


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a malicious checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_checkpoint_holding_code_is_refused_before_it_runs(tmp_path):
    evil = str(tmp_path / "evil.pt")
    torch.save({"model": {}, "model_args": {}, "evil": os.system}, evil)
    with pytest.raises(UserError, match=f"^checkpoint {re.escape(evil)} holds posix.system, not only tensors and "
                                        "plain data: refused, since loading it could run code$"):
        load_checkpoint(evil)

    marker = tmp_path / "marker"
    payload = str(tmp_path / "payload.pt")
    torch.save({"model": {}, "model_args": {}, "x": RunsCode(str(marker))}, payload)
    with pytest.raises(UserError, match=f"^checkpoint {re.escape(payload)} holds io.open, .* refused"):
        load_checkpoint(payload)
    assert not marker.exists(), "loading the checkpoint ran its code"
    torch.load(payload, weights_only=False)  # the payload is live: a full unpickler does run it
    assert marker.exists()


def test_load_checkpoint_refuses_what_is_not_a_checkpoint(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(UserError, match=f"^checkpoint {re.escape(missing)} does not exist$"):
        load_checkpoint(missing)
    cut = tmp_path / "cut.pt"  # a copy that stopped halfway
    save_checkpoint(str(cut), dict(model={"w": torch.zeros(1000)}, model_args={}))
    cut.write_bytes(cut.read_bytes()[:2000])
    with pytest.raises(UserError, match=f"^checkpoint {re.escape(str(cut))} could not be read: RuntimeError: "):
        load_checkpoint(str(cut))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=f"^checkpoint {re.escape(str(garbage))} could not be read: "):
        load_checkpoint(str(garbage))
    other = str(tmp_path / "other.pt")
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="has no 'model' and 'model_args' entries; is it a nanopost checkpoint"):
        load_checkpoint(other)


def test_a_checkpoint_from_before_pos_emb_loads_with_rotary_positions(tmp_path, tiny_gpt):
    # model_args saved before GPTConfig had pos_emb: the model is the rotary one it was trained as
    model = tiny_gpt().eval()
    args = {k: v for k, v in asdict(model.config).items() if k != "pos_emb"}
    save_checkpoint(str(tmp_path / "old.pt"), dict(model=model.state_dict(), model_args=args))
    loaded, _ = load_model(str(tmp_path / "old.pt"))
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    assert loaded.config.pos_emb == "rope" and torch.equal(loaded(idx), model(idx))


# -----------------------------------------------------------------------------
# the non-finite stops

def test_check_finite_names_every_bad_value_and_the_step(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    check_finite(3, str(ckpt), loss=1.5, grad_norm=torch.tensor(2.0))
    with pytest.raises(Diverged, match=r"^non-finite loss=nan, grad_norm=inf at step 3; no checkpoint was written\."):
        check_finite(3, str(ckpt), loss=float("nan"), kl=0.0, grad_norm=torch.tensor(float("inf")))
    ckpt.write_bytes(b"an earlier save")
    with pytest.raises(Diverged, match=f"^non-finite loss=nan at step 3; {re.escape(str(ckpt))} keeps the last good "
                                       r"checkpoint\."):
        check_finite(3, str(ckpt), loss=float("nan"))


def test_check_model_finite_refuses_huge_or_nan_weights(tiny_gpt):
    model = tiny_gpt(dropout=0.5)
    model.train()
    rng = torch.get_rng_state()
    limits = weight_limits(dict(policy=model, value_model=model))
    assert limits == dict(policy=1e4, value_model=1e4)  # a fresh model's weights are below 100: the floor
    check_model_finite(4, "out/ckpt.pt", dict(policy=model), limits)
    assert model.training, "the check gives the model back in the mode it found it"
    assert torch.equal(torch.get_rng_state(), rng), "the probe drew from the RNG a resumed run replays"
    with torch.no_grad():
        huge, big, nan = tiny_gpt(), tiny_gpt(), tiny_gpt()
        for p in huge.parameters():
            p.mul_(1e30)  # every weight finite, every forward pass inf or NaN: what lr=1e30 leaves behind
        assert all(torch.isfinite(p).all() for p in huge.parameters())
        big.transformer.h[0].mlp.c_fc.weight[0, 0] = 2e4  # finite outputs, one weight past the limit
        assert torch.isfinite(big(torch.arange(8)[None])).all()
        nan.lm_head.weight[0, 0] = float("nan")
    for bad in (huge, nan):
        with pytest.raises(Diverged, match=r"^the value_model is non-finite after step 4 \(weights or outputs\); "
                                           r"not saving, no checkpoint was written\. Try a lower value_lr\.$"):
            check_model_finite(4, "out/ckpt.pt", dict(policy=model, value_model=bad), limits)
    with pytest.raises(Diverged, match=r"^the policy blew up after step 4: a weight of 2e\+04, over the limit 1e\+04 "
                                       r"\(100x its largest at the start, at least 10000\); not saving, no checkpoint "
                                       r"was written\. Try a lower learning_rate\.$"):
        check_model_finite(4, "out/ckpt.pt", dict(policy=big), limits)
    # the limit follows the start: a model that starts with a weight of 2e4 may grow to 2e6
    check_model_finite(4, "out/ckpt.pt", dict(policy=big), weight_limits(dict(policy=big)))


# -----------------------------------------------------------------------------
# resume: what the command line may change

def saved(script="train_x.py", **config):
    return dict(model={}, model_args={}, script=script, config={**vars(Knobs()), "init_from": "base.pt", **config})


@dataclass
class ResumeKnobs(Knobs):
    init_from: str = knob("scratch", "where the run starts")


def test_resume_takes_the_checkpoint_config_and_applies_what_changed(capsys):
    ckpt = saved(steps=20, lr=0.5)
    cfg = resume_config(ResumeKnobs, dict(init_from="resume", lr=0.25, steps=20), ckpt, "out/ckpt.pt",
                        "train_x.py", fixed=("name", "batch_size"))
    assert cfg == ResumeKnobs(steps=20, lr=0.25, init_from="base.pt")  # what it started from stays recorded
    assert capsys.readouterr().out == "changed: lr 0.5 -> 0.25\n"  # steps was given, but with its saved value


def test_resume_refuses_a_changed_run_defining_knob():
    ckpt = saved(name="a", batch_size=4)
    with pytest.raises(UserError, match=r"^cannot resume out/ckpt.pt: name 'a' -> 'b'; batch_size 4 -> 8 "
                                        r"\(run-defining; start a new run in another out_dir\)$"):
        resume_config(ResumeKnobs, dict(name="b", batch_size=8, lr=1.0), ckpt, "out/ckpt.pt", "train_x.py",
                      fixed=("name", "batch_size"))


def test_resume_refuses_another_scripts_checkpoint():
    with pytest.raises(UserError, match=r"^out/ckpt.pt was written by train_y.py, not train_x.py; resume it with "
                                        r"that script, or start from it with --init_from=out/ckpt.pt$"):
        resume_config(ResumeKnobs, {}, saved(script="train_y.py"), "out/ckpt.pt", "train_x.py", fixed=())


# -----------------------------------------------------------------------------
# the run log

def strict_lines(path):
    def refuse(c):
        raise AssertionError(f"non-JSON constant {c}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_nan_at_any_depth_is_written_as_null(tmp_path):
    path = str(tmp_path / "log.jsonl")
    log = RunLog(path)
    nan, inf = float("nan"), float("inf")
    log.write(dict(kind="eval", step=1, loss=0.5, explained_var=nan, task=dict(accuracy=0.25, kl=-inf),
                   per_phrasing=[1.0, nan, [inf, 2]], pair=(nan, 3)))
    append_jsonl(path, dict(step=2, ev=nan))
    assert strict_lines(path) == [
        dict(kind="eval", step=1, loss=0.5, explained_var=None, task=dict(accuracy=0.25, kl=None),
             per_phrasing=[1.0, None, [None, 2]], pair=[None, 3]),
        dict(step=2, ev=None)]


def test_run_log_fresh_run_truncates_and_resume_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = str(tmp_path / "log.jsonl")
    old = [dict(kind="eval", step=0, acc=0.1)] + [dict(kind="train", step=s, loss=1.0 / s) for s in range(1, 8)] + \
          [dict(kind="eval", step=5, acc=0.2)]
    for r in old:
        append_jsonl(path, r)
    # a resume from step 5 (the crash came after step 7 was logged): steps 6, 7 will be logged again
    log = RunLog(path, resume_step=5)
    assert strict_lines(path) == [r for r in old if r["step"] <= 5] == log.kept
    assert log.first("eval") == dict(kind="eval", step=0, acc=0.1) and log.first("nothing") is None
    log.write(dict(kind="train", step=6, loss=0.0))
    assert [r["step"] for r in strict_lines(path)] == [0, 1, 2, 3, 4, 5, 5, 6]
    # a non-master rank neither reads nor writes
    RunLog(path, master=False).write(dict(kind="train", step=99))
    assert len(strict_lines(path)) == 8
    # a fresh run into the same out_dir starts an empty log
    RunLog(path)
    assert strict_lines(path) == []


def test_run_log_resume_drops_the_line_a_killed_run_was_writing(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "eval", "step": 2}\n{"kind": "train", "st')
    log = RunLog(str(path), resume_step=2)
    assert strict_lines(str(path)) == log.kept == [dict(kind="train", step=1), dict(kind="eval", step=2)]


# -----------------------------------------------------------------------------
# masked statistics over the real tokens

def test_masked_mean_and_whiten_match_torch_on_the_real_tokens():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64) * 3 + 1
    mask = torch.rand(4, 6) < 0.6
    mask[0, 0] = True
    x_pads = torch.where(mask, x, torch.tensor(float("nan"), dtype=torch.float64))  # pads must not leak
    real = x[mask]
    torch.testing.assert_close(masked_mean(x_pads, mask), real.mean())
    torch.testing.assert_close(masked_mean(x_pads, mask, n=100), real.sum() / 100)
    white, scale = masked_whiten(x_pads, mask)
    torch.testing.assert_close(white[mask], (real - real.mean()) / torch.sqrt(real.var() + 1e-8))
    assert scale == pytest.approx(1 / math.sqrt(real.var() + 1e-8), rel=1e-12)  # what it divided by
    assert (white[~mask] == 0).all()
    kept, _ = masked_whiten(x_pads, mask, shift_mean=False)  # scaled, not centred
    torch.testing.assert_close(kept[mask], (real - real.mean()) / torch.sqrt(real.var() + 1e-8) + real.mean())
    assert math.isclose(float(white[mask].std()), 1.0, rel_tol=1e-6)


def test_parse_list_reads_comma_separated_knobs_and_names_the_bad_one():
    assert config.parse_list("0, 1,2,", "seeds") == [0, 1, 2]
    assert config.parse_list("0,0.05", "kl_coefs", float, low=0) == [0.0, 0.05]
    assert config.parse_steps("", "snapshot_steps") == set() and config.parse_steps("20,10,20", "s") == {10, 20}
    for text, kind, low, message in [("1,x", int, None, "--k=1,x: expected comma-separated integers"),
                                     (" , ", float, None, "--k= , : expected one or more numbers"),
                                     ("0.1,-2", float, 0, "--k=0.1,-2: every value must be >= 0")]:
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            config.parse_list(text, "k", kind, low)
