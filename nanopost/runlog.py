"""
The run log, out_dir/log.jsonl: one strict JSON object per logged step, kept consistent across a resume.
"""

import json
import math
import os


def _strict(value):
    """NaN and inf become null, at any depth: they are not JSON, and strict readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(_strict(record), allow_nan=False) + "\n")


def _parse(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # the line a killed run was writing when it died
        return None


class RunLog:
    """out_dir/log.jsonl. A fresh run starts an empty log; a resume from step S keeps the records at or before
    S and drops the rest (written after the last save, then lost to a crash), so every step appears once."""

    def __init__(self, path, resume_step=None, master=True):
        self.path, self.master, self.kept = path, master, []
        if not master:
            return
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                records = [_parse(line) for line in f]
            self.kept = [r for r in records if r is not None and r.get("step", 0) <= resume_step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in self.kept)

    def write(self, record):
        if self.master:
            append_jsonl(self.path, record)

    def first(self, kind):
        """The first kept record of this kind (a resumed run's 'before'), or None."""
        return next((r for r in self.kept if r.get("kind") == kind), None)


def format_eta(seconds):
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m}m{s:02d}s"


TASK_SHOWN = ("accuracy", "ended", "well_formed", "distinct_valid")  # printed; log.jsonl has all


def train_line(record, max_iters, show_kl):
    """train_sft.py's train record as the line it prints; the KL when anchored, a reward model's
    pairwise accuracy when the record has it, DPO's implicit rewards of chosen and rejected too."""
    line = (f"step {record['step']}/{max_iters} | loss {record['loss']:.4f} "
            f"| lr {record['lr']:.1e} | tok/s {record['tok_per_s']:.0f} "
            f"| eta {format_eta(record['eta_s'])}")
    if show_kl:
        line += f" | kl {record['kl']:.4f}"
    if "acc" in record:
        line += f" | acc {record['acc']:.3f}"
    if "chosen" in record:
        line += (f" | rewards {record['chosen']:+.3f} {record['rejected']:+.3f} "
                 f"margin {record['chosen'] - record['rejected']:.3f}")
    return line


def eval_line(record, max_iters):
    """train_sft.py's eval record as the line it prints: the val loss, a reward model's or DPO's
    accuracies, DPO's margin and KL(pi || ref), the held-out loss per skill, the task eval's
    TASK_SHOWN, a sample on the next line."""
    line = f"eval {record['step']}/{max_iters} | val {record['val_loss']:.4f}"
    line += "".join(f" | {k} {v:.3f}" for k, v in record.items()
                    if k.startswith("acc") or k in ("margin", "kl_ref"))
    if "heldout" in record:
        line += " | heldout " + " ".join(f"{s} {v:.4f}" for s, v in record["heldout"].items())
    if "task" in record:
        line += " | task " + " ".join(f"{k} {record['task'][k]:.3f}" for k in TASK_SHOWN)
    if "sample" in record:
        line += f"\nsample {record['step']}: {record['sample']!r}"
    return line


def print_before_after(first, last, seconds, n_prompts):
    """The summary of a train_sft.py run from its first and last eval records: the val loss, the
    held-out loss per pretraining skill (forgetting) and the task accuracy, before -> after."""
    print(f"done in {format_eta(seconds)}. before -> after: val loss {first['val_loss']:.4f} -> "
          f"{last['val_loss']:.4f}"
          + ("; held-out loss per pretraining skill:" if "heldout" in first else ""))
    for s, before in first.get("heldout", {}).items():
        print(f"  {s:12s} {before:.4f} -> {last['heldout'][s]:.4f}")
    if "task" in first and "task" in last:
        print(f"task accuracy on {n_prompts} held-out prompts: {first['task']['accuracy']:.3f} -> "
              f"{last['task']['accuracy']:.3f}")
