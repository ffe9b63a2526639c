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
