"""
Reward-model over-optimization (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization"):
PPO against a learned reward model (the proxy) at several KL coefficients, 0 included, with the built-in verifier
as the gold reward, both recorded along training against KL(pi || pi_start).

    python -m nanopost.studies.overopt               # needs out/base/ckpt.pt (python -m nanopost.studies.experiment,
                                                     # or python train_sft.py --data=pretrain --out_dir=out/base)

Stages, each a real script run as a subprocess (skipped when done with the same command, as in the experiment):
    start   train_sft.py --data=sft, start_iters steps from the base: a policy that answers about half the time
            and still varies its answers (SFT at about RL's accuracy), so there is room to improve and to exploit
    rm      train_sft.py --data=prefs from start: the simulated labeler (nanopost.prefs) compares samples of start
            and programmatic answers; the reward model is normalised to mean 0, std 1 on start's samples
    ppo_kl<c>  train_ppo.py --reward_model=rm from start, one run per kl_coef c; every iteration logs the proxy
            (score), the gold (the verifier on the same responses) and kl_full (KL(pi || pi_start) per response)
Then out_dir/overopt.md (table and verdict), overopt.json (every logged point) and overopt.png (both scores
against sqrt(KL), Gao et al.'s axis: their fitted gold curves are functions of d = sqrt(KL)).

Curves are smoothed with a trailing mean over `smooth` iterations: one batch of 64 responses scores with a
standard error near 0.06 on gold.
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass

from nanopost.config import UserError, entry, knob, parse_config, parse_list, validate
from nanopost.studies.experiment import _children_cpu, run_stage


@dataclass
class Config:
    out_dir: str = knob("out/overopt", "start/, rm/, ppo_kl<c>/, overopt.md, overopt.json, overopt.png go here")
    base: str = knob("out/base/ckpt.pt", "the base model (train_sft.py --data=pretrain, or the experiment's)")
    kl_coefs: str = knob("0,0.05,0.2", "comma-separated PPO kl_coef values, one run each")
    start_iters: int = knob(8, "SFT steps from the base to the start policy (54 to 63% accurate over 3 seeds)", ge=1)
    rm_iters: int = knob(200, "reward model training steps (batches of 32 pairs)", ge=1)
    ppo_iters: int = knob(40, "PPO iterations per kl_coef", ge=1)
    smooth: int = knob(5, "trailing mean over this many iterations for the table, plot and verdict", ge=1)
    seed: int = knob(0, "seed of every stage")
    device: str = knob("auto", "passed to every stage")
    rm_args: str = knob("", "extra --key=value overrides for the reward model stage, space-separated")
    ppo_args: str = knob("", "extra overrides for the PPO stages")
    force: bool = knob(False, "rerun stages whose checkpoint already exists")


def smoothed(xs, n):
    """Trailing mean over the last n values (fewer at the start)."""
    return [sum(xs[max(0, i - n + 1):i + 1]) / (i + 1 - max(0, i - n + 1)) for i in range(len(xs))]


def read_curve(out_dir, n):
    """The PPO run's per-iteration proxy, gold and KL(pi || pi_start), raw and smoothed."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if r.get("kind") == "train"]
    curve = dict(step=[r["step"] for r in recs], proxy=[r["score"] for r in recs], gold=[r["gold"] for r in recs],
                 kl=[max(r["kl_full"], 0.0) for r in recs])
    curve.update({f"{k}_smooth": smoothed(curve[k], n) for k in ("proxy", "gold", "kl")})
    return curve


def verdict(c):
    """Did gold rise and then fall while the proxy kept rising? Numbers from the smoothed curves."""
    gold, proxy = c["gold_smooth"], c["proxy_smooth"]
    peak = max(range(len(gold)), key=gold.__getitem__)
    rose = gold[peak] - gold[0]
    fell = gold[peak] - gold[-1]
    proxy_on = proxy[-1] - proxy[peak]
    both = rose > 0.05 and fell > 0.05 and proxy_on > 0
    return dict(gold_start=gold[0], gold_peak=gold[peak], peak_step=c["step"][peak], gold_end=gold[-1],
                proxy_start=proxy[0], proxy_at_peak=proxy[peak], proxy_end=proxy[-1], kl_at_peak=c["kl_smooth"][peak],
                kl_end=c["kl_smooth"][-1], overoptimized=both)


def table(curves, n_points=5):
    """Per kl_coef, the smoothed proxy, gold and KL at n_points iterations spread over the run."""
    lines = ["| kl_coef | iteration | proxy (RM, std units) | gold (verifier) | KL(π‖π_start) | sqrt(KL) |",
             "|---|---|---|---|---|---|"]
    for coef, c in curves.items():
        m = len(c["step"])
        for i in sorted({round(j * (m - 1) / (n_points - 1)) for j in range(n_points)}):
            lines.append(f"| {coef} | {c['step'][i]} | {c['proxy_smooth'][i]:+.2f} | {c['gold_smooth'][i]:.3f} | "
                         f"{c['kl_smooth'][i]:.2f} | {math.sqrt(c['kl_smooth'][i]):.2f} |")
    return "\n".join(lines)


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_g) = plt.subplots(1, 2, figsize=(10, 4))
    for (coef, c), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        d = [math.sqrt(k) for k in c["kl_smooth"]]
        ax_p.plot(d, c["proxy_smooth"], color=color, label=f"kl_coef {coef}")
        ax_g.plot(d, c["gold_smooth"], color=color, label=f"kl_coef {coef}")
    ax_p.set_title("proxy: the reward model's score (normalised)")
    ax_g.set_title("gold: the verifier (fraction correct)")
    for ax in (ax_p, ax_g):
        ax.set_xlabel("sqrt(KL(π || π_start)), nats^½ per response")
        ax.legend(fontsize=8)
    fig.suptitle("PPO against a learned reward model: proxy vs gold (trailing means)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    cfg, _ = parse_config(Config, argv=argv)
    validate(cfg)  # every knob checked before minutes of training, not when its stage starts
    coefs = parse_list(cfg.kl_coefs, "kl_coefs", float, low=0)
    if not os.path.isfile(cfg.base):
        raise UserError(f"--base={cfg.base}: no such checkpoint; train one with python train_sft.py --data=pretrain "
                        f"--out_dir=out/base (or run python -m nanopost.studies.experiment)")
    t0 = time.time()
    common = [f"--seed={cfg.seed}", f"--device={cfg.device}"]
    d = cfg.out_dir
    start = run_stage(cfg, "start", "train_sft.py", ["--data=sft", f"--init_from={cfg.base}",
                                                     f"--max_iters={cfg.start_iters}", *common],
                      os.path.join(d, "start"), inputs=[cfg.base])
    # max_new_tokens as PPO's: the labeler compares, and the normalisation scores, responses PPO would sample
    rm = run_stage(cfg, "rm", "train_sft.py", ["--data=prefs", f"--init_from={start}", f"--max_iters={cfg.rm_iters}",
                                               "--max_new_tokens=16", *common, *cfg.rm_args.split()],
                   os.path.join(d, "rm"), inputs=[start])
    curves = {}
    for coef in coefs:
        out = os.path.join(d, f"ppo_kl{coef:g}")
        run_stage(cfg, f"ppo kl_coef={coef:g}", "train_ppo.py",
                  [f"--init_from={start}", f"--reward_model={rm}", f"--kl_coef={coef}", f"--max_iters={cfg.ppo_iters}",
                   "--max_minutes=0", "--eval_interval=0", *common, *cfg.ppo_args.split()], out, inputs=[start, rm])
        curves[f"{coef:g}"] = read_curve(out, cfg.smooth)
    wall = time.time() - t0

    with open(os.path.join(d, "rm", "log.jsonl")) as f:
        rm_eval = [r for r in map(json.loads, f) if r.get("kind") == "eval"][-1]
    verdicts = {coef: verdict(c) for coef, c in curves.items()}
    png = os.path.join(d, "overopt.png")
    plot(curves, png)
    lines = [f"# Reward-model over-optimization (python -m nanopost.studies.overopt, {wall / 60:.1f} min wall, "
             f"{_children_cpu() / 60:.1f} min CPU of its stages; a skipped stage counts 0)", "",
             f"Reward model: held-out pairwise accuracy {rm_eval['acc']:.3f} on {cfg.out_dir}/rm's held-out "
             f"pairs, {rm_eval['acc_decided']:.3f} on those the labeler decided by its hidden score.", "",
             f"Trailing means over {cfg.smooth} iterations; proxy in the reward model's normalised units (0 = the "
             f"start policy), gold = fraction of responses the verifier accepts, KL per response in nats.", "",
             table(curves), "", "| kl_coef | gold start → peak (iteration) → end | proxy at the gold peak → end "
             "| KL at the peak → end | gold rose, then fell, proxy still rising |", "|---|---|---|---|---|"]
    for coef, v in verdicts.items():
        lines.append(f"| {coef} | {v['gold_start']:.3f} → {v['gold_peak']:.3f} ({v['peak_step']}) → "
                     f"{v['gold_end']:.3f} | {v['proxy_at_peak']:+.2f} → {v['proxy_end']:+.2f} | "
                     f"{v['kl_at_peak']:.2f} → {v['kl_end']:.2f} | {'yes' if v['overoptimized'] else 'no'} |")
    lines += ["", "![proxy and gold against sqrt(KL)](overopt.png)", ""]
    with open(os.path.join(d, "overopt.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(d, "overopt.json"), "w") as f:
        json.dump(dict(config=asdict(cfg), wall_s=wall, rm_eval=rm_eval, verdicts=verdicts, curves=curves), f)
    print("\n".join(lines))
    print(f"wrote {d}/overopt.md, overopt.json, {png}")


if __name__ == "__main__":
    entry(main)
