"""
The quick start's experiment: does SFT forget more than RL at the same new-task accuracy? ("RL's Razor",
Shenfeld, Pari & Agrawal 2025: RL forgets less, and forgetting tracks the forward KL(pi_base || pi) measured on
the new task.)

    python -m nanopost.studies.experiment              # 1 seed, 7.5 min on 2 idle CPU cores
    python -m nanopost.studies.experiment --seeds=0,1,2        # mean and spread over 3 seeds
    python -m nanopost.studies.experiment --advantage=gae      # RL = PPO with a value model (+2 min: a second trunk)

From ONE base model (train_sft.py --data=pretrain, trained once) it runs, per seed, the real training scripts as
subprocesses (this file never copies their loops):

    sft          train_sft.py on the narrow demonstrator (N+0=N), 150 steps, keeping snapshots along the way
    grpo         train_ppo.py --advantage=grpo from the base: PPO's clipped update, KL anchor to the base, a group
                 baseline instead of a value model (half the compute of --advantage=gae; the thesis study,
                 nanopost/studies/THESIS.md, compares the two)
    sft_matched  not a run: SFT's trajectory (the base, its snapshots, its end) interpolated linearly at the RL
                 run's final accuracy, metric by metric: SFT at matched accuracy, with no hand-picked step count

then evaluates every checkpoint with nanopost.evaluate (held-out prompts and text, fixed seed) and writes
out/report.md (table: mean and std over seeds per method), out/results.json (every number, per seed), and
out/forgetting_vs_accuracy.png (the paper's Pareto figure: x = new-task accuracy, y = forgetting, colour =
KL(base || pi); SFT's trajectories as lines).

A stage whose checkpoint exists and whose command is unchanged is skipped (out/<stage>/stage.json records the
command that made it), so an interrupted run resumes and --seeds=0,1,2 after --seeds=0 only trains seeds 1-2.
--force=true reruns everything. The five-method study with intervals is nanopost.studies.thesis.
"""

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from nanopost.config import entry, knob, parse_config, parse_list, validate
from nanopost.distributed import resolve_device
from nanopost.evaluate import evaluate_checkpoints, format_table, render_table, table_columns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: train_*.py live here

SFT_SNAPSHOTS = "2,4,6,8,10,12,16,20,30,50,100"  # dense early: SFT passes RL's accuracy within ~10 steps


@dataclass
class EvalKnobs:
    """The evaluation this experiment and the thesis study share, so their numbers compare: k samples on n_prompts
    held-out prompts. Measured ~20 CPU-s per checkpoint at 8 x 32 with 32-token responses (half in sampling, a third
    in the two forwards for entropy and KL); 8 x 24 keeps a seed's checkpoints and snapshots near a minute on 2
    cores."""
    k: int = knob(8, "evaluation: samples per held-out prompt", ge=1)
    n_prompts: int = knob(24, "evaluation: held-out task prompts, spread over the 54 of world.eval_prompts", ge=1)
    max_new_tokens: int = knob(32, "evaluation: response length limit (a valid answer is <= 9 tokens)", ge=1)
    eval_seed: int = knob(0, "evaluation: sampling seed")
    max_docs: int = knob(64, "evaluation: held-out documents per pretraining skill", ge=1)

    def eval_kwargs(self):
        """The keyword arguments of nanopost.evaluate.evaluate_checkpoints these knobs stand for."""
        return dict(k=self.k, n_prompts=self.n_prompts, max_new_tokens=self.max_new_tokens, seed=self.eval_seed,
                    max_docs=self.max_docs)


@dataclass
class Config(EvalKnobs):
    out_dir: str = knob("out", "everything goes under here: base/, s<seed>/<method>/, report.md")
    seeds: str = knob("0", "comma-separated training seeds, e.g. 0,1,2 (the base model is shared by all)")
    advantage: str = knob("grpo", "the RL run: train_ppo.py --advantage (grpo, rloo: group baseline; gae: PPO "
                                  "with a value model, ~2 min more per seed)", choices=("gae", "grpo", "rloo"))
    group_size: int = knob(8, "train_ppo.py --group_size for grpo and rloo (64 responses = 8 prompts x 8)", ge=2)
    base_iters: int = knob(0, "train_sft.py --data=pretrain --max_iters of the base; 0 = its default, 2400", ge=0)
    sft_iters: int = knob(150, "train_sft.py --max_iters for sft (150: the 98% model that collapses)", ge=1)
    # RL from the base scores ~1% for a while, then takes off (near iteration 30 in some seeds, 160 in others):
    # 200 iterations learned in every seed tried. train_ppo.py's wall-clock limit is off here, so a run does the
    # same work on any machine
    ppo_iters: int = knob(200, "train_ppo.py --max_iters for the RL run (from the base)", ge=1)
    base_args: str = knob("", "extra --key=value overrides for the base stage, space-separated")
    sft_args: str = knob("", "extra overrides for the sft stage")
    ppo_args: str = knob("", "extra overrides for the RL stage")
    device: str = knob("auto", "cpu, cuda, or auto (passed to the training scripts too)")
    force: bool = knob(False, "rerun stages whose checkpoint already exists")


def rl_name(cfg):
    return "ppo" if cfg.advantage == "gae" else cfg.advantage


def methods(cfg):
    """Rows of the report, in order: the base, the two runs, and SFT interpolated at the RL run's accuracy."""
    return ["base", "sft", "sft_matched", rl_name(cfg)]


# -----------------------------------------------------------------------------
# stages: one subprocess each

def run_stage(cfg, name, script, args, out_dir, inputs=()):
    """
    Run `python script --out_dir=... args` unless out_dir holds a checkpoint made by the same command from the
    same input checkpoints and the same script (compared by modification time: a retrained base, or an edited
    training script, makes everything after it stale).
    """
    ckpt = os.path.join(out_dir, "ckpt.pt")
    marker = os.path.join(out_dir, "stage.json")
    cmd = [sys.executable, os.path.join(ROOT, script), f"--out_dir={out_dir}"] + args
    # the script itself counts as an input: changing its defaults must retrain, not reuse a stale checkpoint
    made_from = {p: os.path.getmtime(p) for p in [*inputs, cmd[1]]}
    if not cfg.force and os.path.isfile(ckpt) and os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("args") == cmd[2:] and done.get("inputs") == made_from:
            print(f"stage {name} | skip | {ckpt} exists (same command, same inputs; --force=true reruns)",
                  flush=True)
            return ckpt
    print(f"stage {name} | run | {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    if os.path.exists(marker):
        os.remove(marker)  # a crash from here on must not leave an old marker next to a new, partial run
    shutil.rmtree(os.path.join(out_dir, "snap"), ignore_errors=True)  # the replaced run's trajectory goes with it
    # TRITON_INTERPRET would push the CPU training through the Triton interpreter (tests set it); never here
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cpu0 = _children_cpu()
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"stage {name} failed with exit code {result.returncode}: {' '.join(cmd)}")
    assert os.path.isfile(ckpt), f"stage {name} exited 0 but wrote no {ckpt}"
    wall, cpu = time.time() - t0, _children_cpu() - cpu0
    with open(marker, "w") as f:
        json.dump(dict(args=cmd[2:], inputs=made_from, seconds=round(wall, 1), cpu_seconds=round(cpu, 1)), f)
    # CPU seconds too: on a shared machine wall time says little, CPU time / cores bounds the idle wall time
    print(f"stage {name} | done | {wall:.0f}s wall | {cpu:.0f}s cpu", flush=True)
    return ckpt


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _iters(n):
    return [f"--max_iters={n}"] if n > 0 else []


def snapshots(out_dir, final_step):
    """[(step, path)] of a run's snapshots (out_dir/snap/step_<n>.pt) and its final checkpoint, in training order."""
    snap = os.path.join(out_dir, "snap")
    steps = sorted(int(n[5:-3]) for n in os.listdir(snap) if n.startswith("step_") and n.endswith(".pt")) \
        if os.path.isdir(snap) else []
    return [(s, os.path.join(snap, f"step_{s}.pt")) for s in steps if s < final_step] + \
        [(final_step, os.path.join(out_dir, "ckpt.pt"))]


def run_all_stages(cfg, seeds):
    """Train everything (or find it done) -> ({method: {seed: ckpt path}}, {seed: sft trajectory paths}); the base
    is under seed None."""
    dev = [f"--device={cfg.device}"]
    # --eval_prompts=0: an untrained model babbles to the token limit on every task prompt, the slowest eval of
    # the pipeline, and the base's task accuracy is measured by the final evaluation anyway
    base = run_stage(cfg, "base", "train_sft.py", ["--data=pretrain", "--eval_prompts=0"] + _iters(cfg.base_iters)
                     + dev + cfg.base_args.split(), os.path.join(cfg.out_dir, "base"))
    rl = rl_name(cfg)
    ckpts, sft_paths = {"base": {None: base}, "sft": {}, rl: {}}, {}
    group = [] if cfg.advantage == "gae" else [f"--group_size={cfg.group_size}"]
    for seed in seeds:
        d = os.path.join(cfg.out_dir, f"s{seed}")
        common = [f"--seed={seed}"] + dev
        ckpts["sft"][seed] = run_stage(cfg, f"sft seed={seed}", "train_sft.py",
                                       ["--data=sft", f"--init_from={base}", f"--max_iters={cfg.sft_iters}",
                                        f"--snapshot_steps={SFT_SNAPSHOTS}"] + common + cfg.sft_args.split(),
                                       os.path.join(d, "sft"), inputs=[base])
        sft_paths[seed] = [p for _, p in snapshots(os.path.join(d, "sft"), cfg.sft_iters)]
        ckpts[rl][seed] = run_stage(cfg, f"{rl} seed={seed}", "train_ppo.py",
                                    [f"--init_from={base}", f"--advantage={cfg.advantage}", *group,
                                     "--max_minutes=0"] + _iters(cfg.ppo_iters) + common + cfg.ppo_args.split(),
                                    os.path.join(d, rl), inputs=[base])
    return ckpts, sft_paths


def value_at(curve, x):
    """y where a trajectory first reaches x: curve = [(x, y), ...] in training order, linear between the two
    points whose x bracket it. None if it never does (interpolation only, never extrapolation)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if min(x0, x1) <= x <= max(x0, x1):
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(curve) == 1 and curve[0][0] == x:
        return curve[0][1]
    return None


def matched(trajectory, accuracy):
    """Every numeric metric of a run interpolated where its trajectory (a list of metric dicts in training order,
    starting at the base) first reaches `accuracy`; None if it never does."""
    curve = [m["accuracy"] for m in trajectory]
    if value_at([(a, 0.0) for a in curve], accuracy) is None:
        return None
    keys = [k for k, v in trajectory[-1].items() if isinstance(v, (int, float)) and all(k in m for m in trajectory)]
    return {k: value_at([(m["accuracy"], float(m[k])) for m in trajectory], accuracy) for k in keys}


# -----------------------------------------------------------------------------
# report

def _mean_std(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5  # sample std (n - 1)


def aggregate(per_method):
    """{method: [metrics per seed]} -> [(method, {key: (mean, std or None)}, n_seeds)] in the dict's order."""
    rows = []
    for method, runs in per_method.items():
        if not runs:
            continue
        keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and all(k in r for r in runs)]
        rows.append((method, {k: _mean_std([float(r[k]) for r in runs]) for k in keys}, len(runs)))
    return rows


def pearson(xs, ys):
    """Pearson correlation of two equal-length lists; None when undefined (< 3 points or a constant list)."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def kl_forgetting_line(points):
    """The paper's central claim in one number: across checkpoints, does forgetting track KL(base || pi)?"""
    points = [x for x in points if "kl_base_pi" in x and "dloss_mean" in x]
    r = pearson([x["kl_base_pi"] for x in points], [x["dloss_mean"] for x in points])
    if r is None:
        return f"Pearson r(KL(base||pi), mean Δ held-out loss): undefined over {len(points)} checkpoint(s)."
    return (f"Pearson r(KL(base||pi), mean Δ held-out loss) over {len(points)} post-trained checkpoints (SFT's "
            f"snapshots and both runs' ends): {r:+.3f} (RL's Razor predicts strongly positive: forgetting tracks "
            "the KL moved on the new task).")


def report_table(rows, markdown=True):
    """One row per method, each cell 'mean ± std' over seeds (just the mean for one seed)."""
    cols = table_columns([{k: v[0] for k, v in stats.items()} for _, stats, _ in rows])
    header = ["method", "seeds"] + [h for _, h, _ in cols]
    body = []
    for method, stats, n in rows:
        cells = [method, str(n)]
        for key, _, fmt in cols:
            if key not in stats:
                cells.append("-")
                continue
            mean, std = stats[key]
            cells.append(fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std).lstrip("+")))
        body.append(cells)
    return render_table(header, body, markdown)


def plot_pareto(per_method, path, trajectories=()):
    """The paper's Figure: forgetting against new-task accuracy, one point per run, coloured by KL(base||pi);
    each trajectory (a list of metric dicts along a run) as a thin grey line through its points."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    points = [(method, r) for method, runs in per_method.items() for r in runs
              if all(k in r for k in ("accuracy", "dloss_mean", "kl_base_pi"))]
    markers = dict(base="*", sft="o", sft_matched="v", ppo="^", grpo="^", rloo="^")
    kls = [r["kl_base_pi"] for _, r in points]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, traj in enumerate(trajectories):
        ax.plot([m["accuracy"] for m in traj], [m["dloss_mean"] for m in traj], color="grey", lw=0.8, marker=".",
                ms=3, zorder=1, label="sft along training" if i == 0 else None)
    for method in per_method:
        pts = [r for m, r in points if m == method]
        if not pts:
            continue
        sc = ax.scatter([r["accuracy"] for r in pts], [r["dloss_mean"] for r in pts],
                        c=[r["kl_base_pi"] for r in pts], cmap="viridis", vmin=min(kls),
                        vmax=max(max(kls), min(kls) + 1e-9), zorder=2,
                        marker=markers.get(method, "o"), s=70, edgecolors="black", label=method)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("new-task accuracy (held-out prompts)")
    ax.set_ylabel("forgetting: mean Δ held-out loss vs base (nats/token)")
    ax.set_title("forgetting vs new-task accuracy (colour = KL(base || π))")
    fig.colorbar(sc, ax=ax, label="KL(π_base || π) per response, on the base's samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir, per_method, per_run=None, config=None, notes=(), trajectories=()):
    """Write out_dir/report.md and the plot; returns the table as plain text, for stdout."""
    os.makedirs(out_dir, exist_ok=True)
    rows = aggregate(per_method)
    table = report_table(rows, markdown=True)
    png = os.path.join(out_dir, "forgetting_vs_accuracy.png")
    plot_pareto(per_method, png, trajectories)
    print(f"wrote {png}", flush=True)
    base_line = ""
    if per_method.get("base"):
        b = per_method["base"][0]
        base_line = "Base model, the zero point of every Δ: held-out loss " + ", ".join(
            f"{k[5:]} {v:.4f}" for k, v in b.items() if k.startswith("loss/")) + "; probe accuracy " + ", ".join(
            f"{k[6:]} {v:.3f}" for k, v in b.items() if k.startswith("probe/")) + "."
    # every evaluated checkpoint once: the trajectories hold sft's snapshots and end; the rest are the RL ends
    checkpoints = [m for t in trajectories for m in t[1:]] + [
        r for method, runs in per_method.items() if method not in ("base", "sft", "sft_matched") for r in runs]
    lines = [
        "# nanopost experiment: SFT vs RL, forgetting vs new-task accuracy",
        "",
        "Mean ± sample std over seeds (one seed: the value alone). sft_matched: SFT's trajectory interpolated at the "
        "RL run's final accuracy (same seed). Columns: acc = verifier accuracy over k samples "
        "per held-out prompt (valid and ended); pass@k = prompts with at least one correct sample; distinct_valid = "
        "distinct correct answers per prompt among its k samples; dist-1/2 = distinct response-token n-grams among "
        "the k samples of a prompt, mean over prompts; entropy = policy entropy per response token (nats); "
        "KL(base||pi) = KL(pi_base || pi) on the base's samples, KL(pi||base) = KL(pi || pi_base) on the policy's, "
        "both of whole responses (nats per response, the sum of exact per-token KLs); dloss = change "
        "in held-out pretraining loss vs the base (nats/token; positive = forgot); dprobe = change in greedy "
        "accuracy on the skill's probes vs the base (negative = forgot).",
        "",
        table,
        "",
        base_line,
        "",
        kl_forgetting_line(checkpoints),
        "",
        "![forgetting vs accuracy](forgetting_vs_accuracy.png)",
        "",
    ] + [line for note in notes for line in (note, "")]
    if per_run:
        lines += ["## every run", "", format_table(per_run, markdown=True), ""]
    if config:
        lines += ["## config", "", "```", json.dumps(config, indent=1), "```", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return report_table(rows, markdown=False)


# -----------------------------------------------------------------------------

def main(argv):
    cfg, _ = parse_config(Config, argv=argv)
    validate(cfg)  # every knob checked before minutes of training, not when its stage starts
    seeds = parse_list(cfg.seeds, "seeds")
    t0 = time.time()
    r = resource.getrusage(resource.RUSAGE_SELF)
    cpu_self0 = r.ru_utime + r.ru_stime
    ckpts, sft_paths = run_all_stages(cfg, seeds)
    t_train = time.time() - t0

    base, rl = ckpts["base"][None], rl_name(cfg)
    paths = [p for s in seeds for p in sft_paths[s]] + list(ckpts[rl].values())
    results = evaluate_checkpoints(base, paths, device=resolve_device(cfg.device), **cfg.eval_kwargs())
    t_eval = time.time() - t0 - t_train
    r = resource.getrusage(resource.RUSAGE_SELF)
    cpu_eval = r.ru_utime + r.ru_stime - cpu_self0
    trajectories = {s: [results[base]] + [results[p] for p in sft_paths[s]] for s in seeds}
    sft_matched = {s: matched(trajectories[s], results[ckpts[rl][s]]["accuracy"]) for s in seeds}
    per_method = {m: [results[p] for p in ckpts[m].values()] for m in ("base", "sft", rl)}
    per_method["sft_matched"] = [m for m in sft_matched.values() if m is not None]
    per_method = {m: per_method[m] for m in methods(cfg)}
    per_run = [(f"{m}" + ("" if s is None else f" s{s}"), results[p]) for m in ("base", "sft", rl)
               for s, p in ckpts[m].items()] + [(f"sft_matched s{s}", m) for s, m in sft_matched.items() if m]
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(dict(config=asdict(cfg), checkpoints={m: {str(s): p for s, p in c.items()} for m, c in ckpts.items()},
                       sft_trajectories={str(s): p for s, p in sft_paths.items()}, results=results,
                       sft_matched={str(s): m for s, m in sft_matched.items()}), f, indent=1)
    timing = (f"experiment | train {t_train:.0f}s wall {_children_cpu():.0f}s cpu | eval {t_eval:.0f}s wall "
              f"{cpu_eval:.0f}s cpu")
    table = write_report(cfg.out_dir, per_method, per_run, config=asdict(cfg), trajectories=list(trajectories.values()),
                         notes=[f"Timing (this run; a skipped stage counts 0): `{timing}`"])
    print(f"{timing} | wrote {os.path.join(cfg.out_dir, 'report.md')}")
    print(table)


if __name__ == "__main__":
    entry(main)
