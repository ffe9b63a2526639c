"""
Configuration and errors, the command-line contract of every nanopost command.

Each script declares a dataclass of `knob(default, help, ...)` fields; `parse_config` reads `--key=value` overrides
(type-checked, unknown keys refused, `--help` lists them all) and `validate` checks every knob's range before
anything in out_dir is touched. Bad input is a `UserError`: one line `error: ...`, exit 2. A non-finite loss or
model is `Diverged`: exit 1, the last good checkpoint intact. `entry` turns both into that line and exit code.
"""

import dataclasses
import math
import os
import sys


class UserError(ValueError):
    """Bad user input (a knob, a file, a checkpoint): reported as one line, no traceback, exit 2."""


class Diverged(RuntimeError):
    """Training produced a non-finite loss or model: exit 1 with out_dir/ckpt.pt still the last good one."""


def entry(main):
    """Run main(sys.argv[1:]) as a command: UserError and Diverged become one `error:` line on stderr and exit 2
    or 1; anything else is an internal bug and keeps its traceback."""
    code = 0
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 1
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # A torchrun rank skips Python's shutdown. Gloo's worker threads may still be freeing the last collectives'
        # tensors, and a thread that needs the GIL during shutdown aborts the process ("terminate called without an
        # active exception"): 1 in ~25 two-rank CPU runs, torch 2.13. Every file is closed and saved by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def knob(default, help, *, ge=None, gt=None, lt=None, choices=None):
    """A config field: its default, one line of help, and the values it accepts (checked by `validate`)."""
    return dataclasses.field(default=default, metadata=dict(help=help, ge=ge, gt=gt, lt=lt, choices=choices))


def _parse_value(key, text, kind):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key}={text}: expected a bool (true/false)")
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"--{key}={text}: expected {kind.__name__}") from None
    if kind is float and not math.isfinite(value):
        raise UserError(f"--{key}={text}: expected a finite number")
    return value


def parse_config(cls, argv=None):
    """-> (cls() with the --key=value overrides of argv, {key: value} of the overrides given); --key alone is
    --key=true for a bool knob. --help prints every knob with its default and help, then exits."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "--help" in argv or "-h" in argv:
        print(f"{os.path.basename(sys.argv[0])} knobs (override with --key=value):")
        usage = {name: f"--{name}={f.default}" for name, f in fields.items()}
        width = min(40, max(map(len, usage.values())))  # one column of help; a longer default pushes its line
        for name, f in fields.items():
            print(f"  {usage[name]:<{width}}  {f.metadata.get('help', '')}")
        sys.exit(0)
    given = {}
    for arg in argv:
        if arg.startswith("--") and "=" not in arg and isinstance(getattr(fields.get(arg[2:]), "default", None), bool):
            arg += "=true"  # a bare --flag switches a bool knob on
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"bad argument {arg!r}: expected --key=value (see --help)")
        key, text = arg[2:].split("=", 1)
        if key not in fields:
            raise UserError(f"unknown knob --{key} (see --help for the list)")
        given[key] = _parse_value(key, text, type(fields[key].default))
    return cls(**given), given


def validate(cfg):
    """Check every knob against the range its `knob(...)` declares; the error names the knob and the value."""
    for f in dataclasses.fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if m.get("choices") is not None and value not in m["choices"]:
            raise UserError(f"--{f.name}={value}: expected one of {', '.join(map(str, m['choices']))}")
        if m.get("ge") is not None and value < m["ge"]:
            raise UserError(f"--{f.name}={value}: must be >= {m['ge']}")
        if m.get("gt") is not None and value <= m["gt"]:
            raise UserError(f"--{f.name}={value}: must be > {m['gt']}")
        if m.get("lt") is not None and value >= m["lt"]:
            raise UserError(f"--{f.name}={value}: must be < {m['lt']}")


def parse_list(text, knob, kind=int, low=None):
    """--seeds=0,1,2 -> [0, 1, 2]: a comma-separated knob's values as `kind`, each >= low when given; an empty list,
    a value that is not a number or one below low is a UserError naming the knob."""
    what = "integers" if kind is int else "numbers"
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{knob}={text}: expected comma-separated {what}, e.g. {'1,2,3' if kind is int else '0,0.5'}"
                        ) from None
    if not values:
        raise UserError(f"--{knob}={text}: expected one or more {what}")
    if low is not None and any(v < low for v in values):
        raise UserError(f"--{knob}={text}: every value must be >= {low}")
    return values


def parse_steps(text, knob):
    """--snapshot_steps=10,20,40 -> {10, 20, 40}: the steps at which a script keeps a snapshot ('' = none)."""
    return set(parse_list(text, knob, int, low=1)) if text.strip() else set()
