"""nanopost.studies.thesis: the statistics (bootstrap interval, interpolation at matched accuracy, R^2) and the diversity
masses against the KL-regularised optimum on hand values; rft's accept step; the study's summary on fake runs."""

import dataclasses
import json
import math
import os
import re

import pytest
import torch

from nanopost.studies import thesis as T
from nanopost.config import UserError
from nanopost.world import task_prompt


def test_bootstrap_ci_on_fixed_samples():
    assert T.bootstrap_ci([0.3] * 7) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))
    assert T.bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)  # one value: nothing to resample
    # two values: a resampled mean is 0 (p 1/4), 0.5 (1/2) or 1 (1/4), so the 2.5th and 97.5th percentiles of
    # 10000 draws are 0 and 1 (a 1/4 tail is far past 2.5%)
    assert T.bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)
    # a 50% interval of the same: the 25th and 75th percentiles sit inside the 1/2 mass at 0.5 (or on its edge)
    m, lo, hi = T.bootstrap_ci([0.0, 1.0], level=0.5)
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0 and hi - lo <= 0.5
    xs = [0.1, 0.4, 0.35, 0.8, 0.2]
    assert T.bootstrap_ci(xs, seed=3) == T.bootstrap_ci(xs, seed=3)  # seeded: reproducible
    m, lo, hi = T.bootstrap_ci(xs)
    assert m == pytest.approx(sum(xs) / 5) and min(xs) < lo < m < hi < max(xs)


def test_value_at_interpolates_along_the_trajectory():
    curve = [(0.0, 0.0), (0.4, 0.2), (0.8, 1.0)]
    assert T.value_at(curve, 0.6) == pytest.approx(0.6)  # halfway from (0.4, 0.2) to (0.8, 1.0)
    assert T.value_at(curve, 0.4) == pytest.approx(0.2) and T.value_at(curve, 0.0) == 0.0
    assert T.value_at(curve, 0.9) is None and T.value_at(curve, -0.1) is None  # never extrapolated
    # accuracy that dips: the first crossing counts, 0.5 lies on the first segment (0 -> 0.6): 0.1 * 0.5 / 0.6
    assert T.value_at([(0.0, 0.0), (0.6, 0.1), (0.4, 0.3), (0.9, 0.5)], 0.5) == pytest.approx(0.1 * 5 / 6)
    assert T.value_at([(0.2, 0.1), (0.2, 0.3)], 0.2) == 0.1  # a flat step: its first point
    assert T.value_at([(0.2, 0.1)], 0.2) == 0.1 and T.value_at([(0.2, 0.1)], 0.3) is None


def test_optimum_masses_hand_computed():
    ref = torch.tensor([0.1, 0.05, 0.05]).log()  # the reference's mass on 3 valid answers, demonstrator first
    pi = torch.tensor([0.5, 0.3, 0.1]).log()
    m = T.optimum_masses(ref, pi, demo=0, beta=1.0)
    Z = math.e * 0.2 + 0.8  # e^(1/beta) on the valid 0.2, 1 on the rest
    assert m["pi_valid"] == pytest.approx(0.9) and m["pi_other"] == pytest.approx(0.4)
    assert m["opt_valid"] == pytest.approx(0.2 * math.e / Z) and m["opt_other"] == pytest.approx(0.1 * math.e / Z)
    # beta -> 0: pi* is the reference conditioned on valid, half of it off the demonstrator
    m = T.optimum_masses(ref, pi, demo=0, beta=1e-4)
    assert m["opt_valid"] == pytest.approx(1.0) and m["opt_other"] == pytest.approx(0.5)


def test_answer_logprobs_of_a_uniform_model(tiny_gpt, tok):
    # every next-token distribution is uniform over V: log pi(answer + eot) = -(tokens + 1) log V
    assert T.valid_answers(3) == ["0+3=3", "1+2=3", "2+1=3", "3+0=3"]
    answers = T.valid_answers(12)
    lp = T.answer_logprobs(tiny_gpt(uniform=True), tok, task_prompt(12), answers)
    want = torch.tensor([-(len(tok.encode(a)) + 1) * math.log(tok.vocab_size) for a in answers], dtype=torch.float64)
    torch.testing.assert_close(lp, want)


def test_diversity_vs_optimum_of_the_reference_itself(tiny_gpt, tok, world):
    # pi = ref: pi's share of its valid mass off N+0=N equals pi*'s (pi* keeps the reference's odds among them)
    model = tiny_gpt(seed=1)
    d = T.diversity_vs_optimum(model, model, tok, world, [task_prompt(11), task_prompt(25, 1)], beta=0.05)
    assert d["pi_other_share"] == pytest.approx(d["opt_other_share"]) and 0 < d["pi_other_share"] < 1
    assert d["opt_valid"] > d["pi_valid"]  # exp(r / beta) moves mass onto the valid answers


def test_oracle_data_samples_pi_star(tiny_gpt, save_tiny_ckpt, tok, world, tmp_path, reference_kernels):
    # every sample is a valid answer to its prompt, k per training prompt, drawn with pi*'s probabilities: the
    # mean log-prob of the samples matches its expectation under pi* within 4 standard errors
    ckpt = save_tiny_ckpt(tmp_path / "m.pt", tiny_gpt(seed=1, n_embd=32))
    n, left_out = T.write_oracle_data(ckpt, str(tmp_path / "o.jsonl"), k=8, seed=0, beta=0.05)
    rows = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
    assert n == len(rows) == 8 * len(world.ppo_prompts) and 0 <= left_out < 1
    assert all(r["completion"] in T.valid_answers(world.parse_target(r["prompt"])) for r in rows)
    model = tiny_gpt(seed=1, n_embd=32)
    got, want, var = [], 0.0, 0.0
    for prompt in world.ppo_prompts[::20]:
        answers = T.valid_answers(world.parse_target(prompt))
        logp = torch.log_softmax(T.answer_logprobs(model, tok, prompt, answers), 0)
        got += [float(logp[answers.index(r["completion"])]) for r in rows if r["prompt"] == prompt]
        mean = float((logp.exp() * logp).sum())
        want += 8 * mean
        var += 8 * float((logp.exp() * (logp - mean) ** 2).sum())
    assert abs(sum(got) - want) < 4 * math.sqrt(var)


def test_rft_keeps_only_verified_samples(world):
    p = task_prompt(7)
    prompts = [p] * 6
    responses = ["3+4=7", "3+4=7", " 7+0=7 ", "3+3=7", "03+4=7", "3+4=7."]
    ended = [True, False, True, True, True, True]
    assert T.verified(world, prompts, responses, ended) == [(p, "3+4=7"), (p, " 7+0=7 ")]


def test_summary_compares_methods_at_matched_accuracy(tmp_path):
    # two seeds, sft and ppo, hand-made trajectories: forgetting at acc 0.5 by interpolation from the base (0, 0)
    def m(acc, f, kl):
        return dict(accuracy=acc, dloss_mean=f, kl_base_pi=kl, kl_pi_base=kl / 2, distinct_valid=1.0)
    results = {"base": m(0.0, 0.0, 0.0), "a": m(1.0, 0.4, 2.0), "b": m(1.0, 0.6, 3.0), "c": m(0.5, 0.05, 0.5),
               "d": m(0.25, 0.02, 0.2), "e": m(0.75, 0.1, 0.7)}
    runs = {("sft", 0): [(10, "a")], ("sft", 1): [(10, "b")], ("ppo", 0): [(20, "c")],
            ("ppo", 1): [(10, "d"), (20, "e")]}
    cfg = T.Config(match_acc="0.5,0.9", match_kl="1,2.5")
    per_run, levels, kl_levels = T.summarize(cfg, runs, results)
    assert per_run[("sft", 0)]["forgetting@0.5"] == pytest.approx(0.2)   # half of 0.4
    assert per_run[("sft", 1)]["forgetting@0.5"] == pytest.approx(0.3)
    assert per_run[("ppo", 0)]["forgetting@0.5"] == pytest.approx(0.05)
    assert per_run[("ppo", 1)]["forgetting@0.5"] == pytest.approx(0.06)  # between 0.02 at 0.25 and 0.1 at 0.75
    assert per_run[("ppo", 1)]["forgetting@0.9"] is None
    # at matched KL(base || pi): sft seed 0 reaches KL 1 halfway to (2.0, 0.4), seed 1 a third of the way to (3, 0.6)
    assert per_run[("sft", 0)]["forgetting@kl1"] == pytest.approx(0.2)
    assert per_run[("sft", 1)]["forgetting@kl2.5"] == pytest.approx(0.5)
    assert per_run[("ppo", 1)]["forgetting@kl1"] is None  # its KL stops at 0.7
    lines = T.paired_differences(per_run, T.PAIRS, [(f"forgetting@{a}", f"acc {a}") for a in levels], [0, 1],
                                 n_boot=1000)
    # sft - ppo per seed: 0.15 and 0.24, mean 0.195; the interval of two values spans them
    assert "- sft − ppo at acc 0.5 (does PPO forget less than SFT?): +0.195 [+0.150, +0.240] nats/token, 2 seed(s)" \
        in lines
    assert any(line.startswith("- sft − ppo at acc 0.9") and "no seed where both reach it" in line for line in lines)
    lines = T.paired_differences(per_run, T.KL_PAIRS, [("forgetting@kl1", "KL 1")], [0, 1], n_boot=1000)
    assert "- sft − grpo at KL 1 (does GRPO forget less than SFT?): no seed where both reach it" in lines
    assert not any(line.startswith("- sft − ppo ") for line in lines)  # KL_PAIRS: the preference questions
    table = T.method_table(per_run, levels, kl_levels, [0, 1], n_boot=1000)
    assert table[0].startswith("| method | runs | acc | forgetting |") and table[0].endswith("forgetting@kl2.5 |")
    assert any(row.startswith("| ppo | 2 | 0.625 [0.500, 0.750] |") for row in table)
    # a start arm (base -> start -> its own points) is matched after the start: KL 1 falls in the base -> start
    # segment it shares with its sibling arm, KL 2.5 in its own training
    runs = {("dpo_start", 0): [(8, "start"), (28, "b")]}
    results["start"] = m(0.3, 0.1, 1.5)
    start_row = T.summarize(cfg, runs, results)[0][("dpo_start", 0)]
    assert start_row["curve"][0] == (0.0, 0.0) and start_row["forgetting@kl1"] is None
    assert start_row["forgetting@kl2.5"] == pytest.approx(0.1 + 0.5 * (1 / 1.5))
    assert start_row["forgetting@0.5"] == pytest.approx(0.1 + 0.5 * (0.2 / 0.7))
    json.dumps(per_run[("ppo", 1)])  # results.json holds them
    T.plot_curves(per_run, str(tmp_path / "curves.png"))  # both panels, from the same rows
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_objective_lines_score_the_shared_objective():
    # J = score - kl_coef * KL(pi || base): dpo 1.0 - 0.05 * 4 = 0.8 and 0.5 - 0.05 * 2 = 0.4, ppo_rm 2.0 - 0.05 * 10
    # = 1.5 and 1.0 - 0 = 1.0; per seed dpo - ppo_rm -0.7 and -0.6
    per_run = {("dpo", 0): dict(rm_score=1.0, kl_pi=4.0), ("dpo", 1): dict(rm_score=0.5, kl_pi=2.0),
               ("ppo_rm", 0): dict(rm_score=2.0, kl_pi=10.0), ("ppo_rm", 1): dict(rm_score=1.0, kl_pi=0.0),
               ("sft", 0): dict(kl_pi=3.0)}
    lines = T.objective_lines(per_run, {0: 0.1, 1: -0.1}, [0, 1], kl_coef=0.05, n_boot=1000)
    assert lines[0] == ("- base: reward model score +0.000 [-0.100, +0.100], KL(π‖base) +0.000 [+0.000, +0.000], "
                        "J +0.000 [-0.100, +0.100], 2 seed(s)")
    assert lines[1].startswith("- dpo: reward model score +0.750 [+0.500, +1.000], KL(π‖base) +3.000") and \
        lines[1].endswith("J +0.600 [+0.400, +0.800], 2 seed(s)")
    assert lines[2].endswith("J +1.250 [+1.000, +1.500], 2 seed(s)")
    assert lines[3] == "- dpo − ppo_rm in J, per seed: -0.650 [-0.700, -0.600], 2 seed(s)"
    assert len(lines) == 4  # sft has no reward model score: not a row


def test_run_seed_wires_each_method_to_its_knobs_and_trajectory(tmp_path, monkeypatch):
    calls = {}

    def fake_stage(cfg, name, script, args, out_dir, inputs=()):  # records the command, writes its snapshots
        calls[name] = (script, args, list(inputs))
        steps = next((a.split("=", 1)[1] for a in args if a.startswith("--snapshot_steps=")), "")
        os.makedirs(os.path.join(out_dir, "snap"), exist_ok=True)
        for s in filter(None, steps.split(",")):
            open(os.path.join(out_dir, "snap", f"step_{s}.pt"), "w").close()
        return os.path.join(out_dir, "ckpt.pt")

    def fake_rft_data(ckpt, out_path, k, seed, device="cpu"):  # 13 verified in round 0, 40 in round 1
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        kept = 13 if seed % 1000 == 0 else 40
        with open(out_path, "w") as f:
            f.write((json.dumps(dict(prompt="p", completion="c")) + "\n") * kept)
        return kept, k

    def fake_oracle_data(ckpt, out_path, k, seed, beta, device="cpu"):
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        open(out_path, "w").write(json.dumps(dict(prompt="p", completion="c")) + "\n")
        return k, 1e-9

    monkeypatch.setattr(T, "run_stage", fake_stage)
    monkeypatch.setattr(T, "write_rft_data", fake_rft_data)
    monkeypatch.setattr(T, "write_oracle_data", fake_oracle_data)
    pairs_of = {"rm": "h", "dpo": "h", "rm_start": "s", "dpo_start": "s"}  # the data hash each checkpoint records
    monkeypatch.setattr(T, "load_checkpoint", lambda p: dict(data_hash=pairs_of[p.split(os.sep)[-2]],
                                                             reward_norm=dict(mean=-0.8, std=0.5)))
    cfg = T.Config(out_dir=str(tmp_path), sft_iters=20, sft_snapshots="5,10", ppo_iters=60, dpo_iters=50,
                   snapshot_every=20, rft_rounds=2, rft_epochs=2, rft_batch=16, device="cpu")
    runs = T.run_seed(cfg, "base.pt", 3)
    d = os.path.join(str(tmp_path), "thesis", "s3")
    assert [s for s, _ in runs["sft"]] == [5, 10, 20] and runs["sft"][-1][1] == os.path.join(d, "sft", "ckpt.pt")
    for m in ("ppo", "ppo_kl0", "grpo"):
        assert [s for s, _ in runs[m]] == [20, 40, 60]
        script, args, inputs = calls[f"{m} seed=3"]
        assert script == "train_ppo.py" and "--snapshot_steps=20,40" in args and inputs == ["base.pt"]
        assert "--seed=3" in args and "--max_minutes=0" in args
    assert "--kl_coef=0.05" in calls["ppo seed=3"][1] and "--advantage=grpo" not in calls["ppo seed=3"][1]
    assert "--kl_coef=0" in calls["ppo_kl0 seed=3"][1] and "--kl_coef=0.01" in calls["ppo_weak seed=3"][1]
    assert [s for s, _ in runs["ppo_weak"]] == [20, 40, 60]
    assert {"--advantage=grpo", "--group_size=8", "--kl_coef=0.05"} <= set(calls["grpo seed=3"][1])
    # ppo_rm and dpo: one reward model's pairs; dpo's beta is ppo_rm's kl_coef in the reward model's units
    rm = os.path.join(d, "rm", "ckpt.pt")
    assert calls["rm seed=3"] == ("train_sft.py", ["--data=prefs", "--init_from=base.pt", "--seed=3", "--device=cpu"],
                                  ["base.pt"])
    script, args, inputs = calls["ppo_rm seed=3"]
    assert set(args) - set(calls["ppo seed=3"][1]) == {f"--reward_model={rm}"} and inputs == ["base.pt", rm]
    script, args, inputs = calls["dpo seed=3"]
    assert script == "train_sft.py" and inputs == ["base.pt", rm] and [s for s, _ in runs["dpo"]] == [20, 40, 50]
    assert {"--data=prefs", "--objective=dpo", "--dpo_beta=0.025", "--max_iters=50", "--snapshot_steps=20,40",
            "--seed=3"} <= set(args)
    # rft: round 1 starts from round 0's checkpoint, on its own samples; a round's steps are 2 passes over its
    # verified samples in batches of 16 (13 -> ceil(26 / 16) = 2 steps, 40 -> 5), counted on across rounds
    r0, r1 = (os.path.join(d, "rft", f"round{r}") for r in (0, 1))
    assert calls["rft seed=3 round 1"][2] == [os.path.join(r0, "ckpt.pt"), r1 + "_samples.jsonl"]
    assert f"--init_from={os.path.join(r0, 'ckpt.pt')}" in calls["rft seed=3 round 1"][1]
    assert "--max_iters=2" in calls["rft seed=3 round 0"][1] and "--max_iters=5" in calls["rft seed=3 round 1"][1]
    assert "--batch_size=16" in calls["rft seed=3 round 1"][1]
    assert runs["rft"] == [(2, os.path.join(r0, "ckpt.pt")), (7, os.path.join(r1, "ckpt.pt"))]
    # one AdamW across rft's rounds: the first starts fresh, the next continue it
    assert "--init_optimizer=false" in calls["rft seed=3 round 0"][1]
    assert "--init_optimizer=true" in calls["rft seed=3 round 1"][1]
    # sft_oracle: sft's run on pi*'s samples
    script, args, inputs = calls["sft_oracle seed=3"]
    oracle_data = os.path.join(d, "sft_oracle_samples.jsonl")
    assert script == "train_sft.py" and f"--data={oracle_data}" in args and inputs == ["base.pt", oracle_data]
    assert set(calls["sft seed=3"][1]) - set(args) == {"--data=sft"}
    assert [s for s, _ in runs["sft_oracle"]] == [5, 10, 20]
    # dpo_start and ppo_rm_start: the same two arms from the start (sft's first 8 steps), their own reward model
    # on the start's samples; their trajectories run base -> start -> their snapshots, counted on from the start
    start = os.path.join(d, "start", "ckpt.pt")
    assert calls["start seed=3"] == ("train_sft.py", ["--data=sft", "--init_from=base.pt", "--max_iters=8",
                                                      "--seed=3", "--device=cpu"], ["base.pt"])
    rm_start = os.path.join(d, "rm_start", "ckpt.pt")
    assert calls["rm_start seed=3"][1:] == (["--data=prefs", f"--init_from={start}", "--seed=3", "--device=cpu"],
                                            [start])
    for m, plain in (("ppo_rm_start", "ppo_rm"), ("dpo_start", "dpo")):
        script, args, inputs = calls[f"{m} seed=3"]
        assert script == calls[f"{plain} seed=3"][0] and inputs == [start, rm_start]
        assert [a.replace(start, "base.pt").replace(rm_start, rm) for a in args] == calls[f"{plain} seed=3"][1]
        assert runs[m] == [(8, start)] + [(8 + s, p.replace(os.sep + plain + os.sep, os.sep + m + os.sep))
                                          for s, p in runs[plain]]
    assert set(runs) == set(T.METHODS)
    pairs_of["dpo"] = "other"  # dpo's pairs must be the reward model's, or the comparison is void
    with pytest.raises(RuntimeError, match="different preference pairs"):
        T.run_seed(dataclasses.replace(cfg, out_dir=str(tmp_path / "again")), "base.pt", 3)


@pytest.mark.parametrize("arg", ["--group_size=1", "--rft_rounds=0", "--n_boot=10", "--k=0", "--match_acc=x",
                                 "--match_kl=x", "--weak_kl_coef=0", "--dpo_iters=0", "--snapshot_every=0",
                                 "--start_iters=0"])
def test_bad_knob_is_one_line_before_any_stage(arg, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "run_stage", lambda *a, **k: pytest.fail("a stage started before the knobs were checked"))
    with pytest.raises(UserError, match="^" + re.escape(arg.split("=")[0])):
        T.main([f"--out_dir={tmp_path / 'out'}", arg])
    assert not (tmp_path / "out").exists()
