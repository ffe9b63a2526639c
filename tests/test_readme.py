"""
The README's commands, run the way a reader runs them: every ```bash block, in the README's order, each command
verbatim in a copy of the repository, with knobs appended that make it tiny (every nanopost parser keeps the last
--key=value). A command that drifts from the code (a renamed knob or module, an input nothing creates) fails here:
it must exit 0, a python command must print something (`python -m` of a module with no command exits 0 in silence),
and every file or out_dir it names with --out, --out_dir or `>` must exist afterwards.

The copy has `../shared/data` beside it, as the README assumes; the test writes small files of the same names and
formats there (a fresh clone has no such folder). Each command runs in its own `bash -c` in the copy's root, after
the block's variable assignments (`D=...`), with `python` the interpreter running this test, one thread, and
without TRITON_INTERPRET (training on CPU takes the kernels' torch references) unless the command sets it.

Not run, by rule (SKIP_RULES; each one a pytest skip with its reason, and their number pinned in EXPECTED_SKIPS so
a new skip is a decision, not an accident): setting up the environment (this test runs in the installed one), the
test suite itself, a peer checkout, CUDA. Commands that can never run here (they need the network) are not in a
bash block: the README shows them as `$ ` lines in a text block.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import kernels._dispatch
from conftest import PPO_TINY, ROOT, SFT_TINY

README = os.path.join(ROOT, "README.md")

# (reason, predicate on one command's words); the first rule that matches skips the command
SKIP_RULES = [
    ("environment setup: this test runs in the installed environment",
     lambda w: w[:3] == ["python3", "-m", "venv"] or w[:1] in (["."], ["source"]) or w[:2] == ["pip", "install"]),
    ("the test suite itself", lambda w: w[:3] == ["python", "-m", "pytest"]),
    ("needs a peer checkout (nanoGPT)", lambda w: any(a.startswith("--nanogpt=") for a in w)),
    ("needs CUDA", lambda w: "kernels/gpu_check.sh" in w),
    ("needs triton (Linux wheels only)", lambda w: "kernels.aot" in w and not kernels._dispatch.HAS_TRITON),
]
EXPECTED_SKIPS = {  # rule -> how many README commands it skips today
    "environment setup: this test runs in the installed environment": 6,
    "the test suite itself": 1,
    "needs a peer checkout (nanoGPT)": 1,
    "needs CUDA": 1,
    **({} if kernels._dispatch.HAS_TRITON else {"needs triton (Linux wheels only)": 1}),
}

# what makes each program tiny, appended after the README's own arguments; the model shape matches SFT_TINY's but
# with room for a chat prompt and its answer
SFT = [*SFT_TINY, "--block_size=64", "--max_iters=2"]
EVAL = ["--device=cpu", "--k=1", "--n_prompts=2", "--max_docs=2", "--max_new_tokens=4"]
TINY = {
    "train_sft.py": SFT,
    "train_ppo.py": [*PPO_TINY, "--max_iters=2"],
    "nanopost.evaluate": [*EVAL, "--max_probes=2"],
    "nanopost.train_tokenizer": ["--vocab_size=300"],
    "nanopost.studies.experiment": [*EVAL, "--base_iters=2", "--sft_iters=2", "--ppo_iters=2", "--ppo_args=" + " ".join(
        PPO_TINY), "--base_args=" + " ".join(SFT), "--sft_args=" + " ".join(SFT)],
    "nanopost.studies.bench_generate": ["2", "4", "1"],  # prompts, new tokens, repeats
    "kernels.bench": ["--n=4", "--vocab=64", "--reps=1"],
    "kernels.aot": ["--arch=80", "--dtype=float32", "--vocab=64", "--layout=contiguous", "--jobs=1"],
    "-c": [],
}
RESUMED_ITERS = "--max_iters=4"  # a resume must run past the tiny run it continues


# -----------------------------------------------------------------------------
# the README's commands

def _unquoted(line):
    """(index, char) of line outside single and double quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        else:
            yield i, c


def _strip_comment(line):
    for i, c in _unquoted(line):
        if c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _split_and(line):
    cuts = [i for i, c in _unquoted(line) if c == "&" and line[i + 1:i + 2] == "&"]
    starts = [0] + [i + 2 for i in cuts]
    return [line[a:b].strip() for a, b in zip(starts, cuts + [len(line)])]


def readme_commands(text):
    """The README's bash blocks as a list of commands, in order: comments dropped, `\\` continuations joined,
    `a && b` split, a heredoc kept with its command. -> [(block number, command)]"""
    commands = []
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    for n, block in enumerate(blocks):
        lines = block.splitlines()
        while lines:
            line = lines.pop(0)
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            line = _strip_comment(line)
            while line.endswith("\\"):
                line = line[:-1].rstrip() + " " + _strip_comment(lines.pop(0)).strip()
            heredoc = re.search(r"<<-?\s*'?(\w+)'?", line)
            if heredoc:
                body = []
                while lines[0] != heredoc.group(1):
                    body.append(lines.pop(0))
                line = "\n".join([line, *body, lines.pop(0)])
                commands.append((n, line))
            else:
                commands.extend((n, part) for part in _split_and(line))
    return commands


def program(command):
    """The script or module a command runs ('train_sft.py', 'nanopost.evaluate', '-c'), or None."""
    words = shlex.split(command.splitlines()[0])
    while words and re.match(r"^\w+=", words[0]):  # VAR=value before the command
        words.pop(0)
    if words[:1] not in (["python"], ["python3"]) or len(words) < 2:
        return None
    return words[2] if words[1] == "-m" else words[1]


def skip_reason(command):
    words = shlex.split(command.splitlines()[0])
    return next((reason for reason, match in SKIP_RULES if match(words)), None)


COMMANDS = readme_commands(open(README).read())


# -----------------------------------------------------------------------------
# a fresh copy of the repository with ../shared/data beside it

def _repo_files():
    """Tracked and untracked-but-not-ignored files: what a clone of the working tree would hold (without git, e.g.
    an unpacked archive: every file but the ignored kinds)."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
        files = out.split("\0")
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", "out", "data", "__pycache__", ".pytest_cache")]
            files += [os.path.relpath(os.path.join(folder, name), ROOT) for name in names]
    return [f for f in files if f and os.path.isfile(os.path.join(ROOT, f))]


def _write_shared_data(folder):
    """Small files named and shaped like the README's public samples (../shared/data/README.md of the workplace):
    plain text; ShareGPT conversations with ids and several turns; OpenAI chats with a system turn."""
    os.makedirs(folder)
    words = "the king and queen of a far land spoke to all who came, and none could tell them no".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 9)).capitalize() + "." for i in range(600)]
    with open(os.path.join(folder, "tinyshakespeare.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    chats = [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"Who are you, number {i}?"}, {"from": "gpt", "value": f"I am helper {i}."},
        {"from": "human", "value": "And what do you do?"}, {"from": "gpt", "value": "I answer questions."}]}
        for i in range(40)]
    with open(os.path.join(folder, "fastchat_dummy_conversation.json"), "w") as f:
        json.dump(chats, f)
    with open(os.path.join(folder, "openai_toy_chat_fine_tuning.jsonl"), "w") as f:
        for i in range(5):
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}."}]}) + "\n")


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """{'repo': the copy's root, 'env': the commands' environment, 'assignments': the block's VAR=value so far}"""
    top = tmp_path_factory.mktemp("readme")
    repo = top / "repo"
    for rel in _repo_files():
        os.makedirs(repo / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), repo / rel)
    _write_shared_data(str(top / "shared" / "data"))
    bin_dir = top / "bin"  # `python` is this interpreter, whatever PATH says (a wrapper: a symlink loses the venv)
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return dict(repo=str(repo), env=env, assignments={})


# -----------------------------------------------------------------------------
# the tests

def test_every_command_is_run_or_skipped_by_a_counted_rule():
    skipped = {}
    for _, command in COMMANDS:
        reason = skip_reason(command)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            prog = program(command)
            assert prog is None or prog in TINY, f"no tiny knobs for {prog} (add them to TINY): {command}"
    assert skipped == EXPECTED_SKIPS, f"README commands skipped by rule changed: {skipped}"
    assert len(COMMANDS) - sum(skipped.values()) >= 20, "most README commands must run"


@pytest.mark.parametrize("block,command", COMMANDS, ids=[f"{b}:{c.splitlines()[0][:60]}" for b, c in COMMANDS])
def test_readme_command_runs(clone, block, command):
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    assignments = clone["assignments"].setdefault(block, [])
    if re.fullmatch(r"\w+=\S*", command):
        assignments.append(command)
        return
    prog = program(command)
    extra = list(TINY.get(prog, []))
    if "--init_from=resume" in command:
        extra.append(RESUMED_ITERS)
    lines = command.split("\n")
    lines[0] += "".join(" " + shlex.quote(a) for a in extra)
    script = "\n".join(["set -e", *assignments, *lines])
    proc = subprocess.run(["bash", "-c", script], cwd=clone["repo"], env=clone["env"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (f"README command failed (exit {proc.returncode}):\n{script}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    assert prog in (None, "-c") or proc.stdout.strip(), f"README command printed nothing:\n{script}"
    for out in re.findall(r"(?:--out(?:_dir)?=|> )(\S+)", command.splitlines()[0]):  # what it says it writes
        assert os.path.exists(os.path.join(clone["repo"], out)), f"{out} was not written:\n{script}"
