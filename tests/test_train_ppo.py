"""train_ppo.py: the PPO pieces against hand-computed values, then the real script on a tiny model (smoke run, exact
resume, 2-process data parallel, a failing reward function, diverging runs, what a resume may change)."""

import json
import math
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
import nanopost.loading
import train_ppo
from nanopost.config import Diverged, UserError
from nanopost.loading import load_model
from train_ppo import masked_whiten


# -----------------------------------------------------------------------------
# helpers


def prefix_mask(lengths, N):
    return torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]  # (B, N) bool


def gae_double_loop(rewards, values, lengths, gamma, lam):
    """The textbook definition, one row and one time step at a time: A_t = sum_l (gamma lam)^l delta_{t+l}."""
    B, N = rewards.shape
    adv = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        L = lengths[b]
        for t in range(L):
            total = 0.0
            for k in range(t, L):
                v_next = values[b, k + 1].item() if k + 1 < L else 0.0  # terminal after the last real token
                delta = rewards[b, k].item() + gamma * v_next - values[b, k].item()
                total += (gamma * lam) ** (k - t) * delta
            adv[b, t] = total
    return adv


TIMING = ("tok_per_s", "t_rollout", "t_learn")

# -----------------------------------------------------------------------------
# the pieces


def test_compute_gae_matches_double_loop():
    torch.manual_seed(0)
    B, N = 5, 7
    lengths = [7, 1, 4, 6, 2]
    rewards = torch.randn(B, N, dtype=torch.float64)
    values = torch.randn(B, N, dtype=torch.float64)
    mask = prefix_mask(lengths, N)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)]:
        adv, ret = train_ppo.compute_gae(rewards, values, mask, gamma, lam)
        ref = gae_double_loop(rewards, values, lengths, gamma, lam)
        torch.testing.assert_close(adv, ref)
        torch.testing.assert_close(ret, torch.where(mask, ref + values, torch.zeros_like(ref)))


def test_policy_loss_hand_computed():
    ratio = torch.tensor([[1.5, 0.5, 1.1]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    pg_loss, approx_kl, clipfrac, _ = train_ppo.policy_loss(old + ratio.log(), old, adv, mask, clip_coef=0.2)
    # token 0: A>0, ratio 1.5 clipped to 1.2 -> -1.2 ; token 1: A<0, ratio 0.5 clipped to 0.8 -> +0.8 ;
    # token 2: inside the clip range -> -2 * 1.1 = -2.2
    torch.testing.assert_close(pg_loss, torch.tensor((-1.2 + 0.8 - 2.2) / 3, dtype=torch.float64))
    torch.testing.assert_close(clipfrac, torch.tensor(2 / 3, dtype=torch.float64))
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    torch.testing.assert_close(approx_kl, torch.tensor(sum(k3) / 3, dtype=torch.float64))
    # the clipped side has no gradient: only token 2 moves the loss
    logp = (old + ratio.log()).requires_grad_()
    train_ppo.policy_loss(logp, old, adv, mask, clip_coef=0.2)[0].backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.0 * 1.1 / 3]], dtype=torch.float64))


def test_value_loss_hand_computed():
    new = torch.tensor([[0.5, -0.1]], dtype=torch.float64)
    old = torch.zeros(1, 2, dtype=torch.float64)
    returns = torch.ones(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    v_loss, vf_clipfrac = train_ppo.value_loss(new, old, returns, mask, clip_coef=0.2)
    # token 0: unclipped (0.5-1)^2 = 0.25, clipped (0.2-1)^2 = 0.64 -> 0.64 ; token 1: inside the range -> 1.21
    torch.testing.assert_close(v_loss, torch.tensor(0.5 * (0.64 + 1.21) / 2, dtype=torch.float64))
    torch.testing.assert_close(vf_clipfrac, torch.tensor(0.5, dtype=torch.float64))


def test_pads_change_nothing():
    torch.manual_seed(1)
    B, N, extra = 4, 5, 3
    lengths = [5, 2, 3, 1]
    mask = prefix_mask(lengths, N)
    rewards, values, old_values, returns = (torch.randn(B, N) for _ in range(4))
    logp, old_logp, adv = torch.randn(B, N) - 1, torch.randn(B, N) - 1, torch.randn(B, N)

    def pad(x, fill):
        # extra columns AND an extra row, all pads, holding garbage (even NaN/inf must not leak)
        x = torch.cat([x, torch.full((B, extra), fill)], dim=1)
        return torch.cat([x, torch.full((1, N + extra), fill)], dim=0)

    pmask = torch.cat([torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], 1),
                       torch.zeros(1, N + extra, dtype=torch.bool)], 0)
    for fill in (7.0, float("nan"), float("inf")):
        a, r = train_ppo.compute_gae(rewards, values, mask, 1.0, 0.95)
        pa, pr = train_ppo.compute_gae(pad(rewards, fill), pad(values, fill), pmask, 1.0, 0.95)
        torch.testing.assert_close(pa[:B, :N], a)
        torch.testing.assert_close(pr[:B, :N], r)
        assert (pa[~pmask] == 0).all() and (pr[~pmask] == 0).all()
        for shift in (True, False):
            torch.testing.assert_close(masked_whiten(pad(adv, fill), pmask, shift)[0][:B, :N],
                                       masked_whiten(adv, mask, shift)[0])
        ref = train_ppo.policy_loss(logp, old_logp, adv, mask, 0.2)
        got = train_ppo.policy_loss(pad(logp, fill), pad(old_logp, fill), pad(adv, fill), pmask, 0.2)
        for x, y in zip(got[:3], ref[:3]):
            torch.testing.assert_close(x, y)
        ref = train_ppo.value_loss(values, old_values, returns, mask, 0.2)
        got = train_ppo.value_loss(pad(values, fill), pad(old_values, fill), pad(returns, fill), pmask, 0.2)
        for x, y in zip(got, ref):
            torch.testing.assert_close(x, y)


def test_global_token_count_makes_split_batches_equal_one_batch():
    # what data parallel relies on: each rank divides by the global token count and the gradients are summed,
    # so two half-batches give exactly the gradient of the whole batch
    torch.manual_seed(2)
    B, N = 6, 4
    mask = prefix_mask([4, 1, 3, 2, 4, 1], N)
    old_logp, adv = torch.randn(B, N, dtype=torch.float64), torch.randn(B, N, dtype=torch.float64)
    logp = (old_logp + 0.3 * torch.randn(B, N, dtype=torch.float64)).requires_grad_()
    train_ppo.policy_loss(logp, old_logp, adv, mask, 0.2)[0].backward()
    full_grad, logp.grad = logp.grad.clone(), None
    n = mask.sum()
    for rows in (slice(0, 3), slice(3, 6)):
        train_ppo.policy_loss(logp[rows], old_logp[rows], adv[rows], mask[rows], 0.2, n)[0].backward()
    torch.testing.assert_close(logp.grad, full_grad)


def test_kl_estimators_and_adaptive_controller():
    torch.manual_seed(3)
    logits, ref_logits = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(train_ppo.kl_estimate(logp, ref_logp, "k1"), logp - ref_logp)
    k3 = train_ppo.kl_estimate(logp, ref_logp, "k3")
    assert (k3 >= 0).all(), "k3 is non-negative by construction"
    torch.testing.assert_close(k3, (ref_logp - logp).exp() - 1 - (ref_logp - logp))
    # Ziegler et al.: the error is clipped to +-0.2 and scaled by n_steps / horizon
    assert train_ppo.adaptive_kl_coef(0.1, 100.0, 1.0, 1000, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert train_ppo.adaptive_kl_coef(0.1, 0.0, 1.0, 1000, 100) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert train_ppo.adaptive_kl_coef(0.1, 1.1, 1.0, 1000, 100) == pytest.approx(0.1 * (1 + 0.1 * 0.1))


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_the_exact_kls_gradient_reaches_the_policy_through_token_kl(advantage, tiny_ckpt, ppo_main, monkeypatch,
                                                                     tmp_path):
    # --kl_estimator=full: the update's loss holds kernels.token_kl of the policy's logits, and its backward runs
    calls = []
    real = kernels.token_kl

    def recording(logits, ref_logits, **kw):
        out = real(logits, ref_logits, **kw)
        calls.append(dict(grad=logits.requires_grad, backward=False))
        if out.requires_grad:
            out.register_hook(lambda g, c=calls[-1]: c.update(backward=bool(g.abs().sum() > 0)))
        return out
    monkeypatch.setattr(kernels, "token_kl", recording)
    ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'o'}", "--max_iters=1", "--eval_prompts=0",
              "--kl_estimator=full", f"--advantage={advantage}", "--group_size=2", "--kl_coef=0.5"])
    in_loss = [c for c in calls if c["grad"]]
    assert len(in_loss) == 2 * 2  # ppo_epochs x num_minibatches
    assert all(c["backward"] for c in in_loss)


# -----------------------------------------------------------------------------
# the real script

def test_smoke_and_exact_resume(tiny_ckpt, run_ppo, read_log, tmp_path):
    # full-vocab KL, adaptive controller and reward whitening on, so their state is part of what must resume
    knobs = [f"--init_from={tiny_ckpt}", "--kl_estimator=full", "--adaptive_kl=true", "--kl_target=0.01",
             "--kl_horizon=100", "--whiten_rewards=true", "--missing_eos_penalty=0.5", "--ent_coef=0.01",
             "--eval_interval=2", "--ckpt_interval=0"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    proc = run_ppo(knobs + [f"--out_dir={straight}", "--max_iters=4"])
    assert re.search(r"^step 4/4 \| score ", proc.stdout, re.M) and "eval before -> after" in proc.stdout
    recs = read_log(straight, "train")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["step"] for r in read_log(straight, "eval")] == [0, 2, 4]
    for r in recs:
        for key in ("score", "kl", "kl_full", "entropy", "approx_kl", "clipfrac", "ratio_mean", "ratio_var",
                    "pg_loss", "v_loss", "explained_var", "resp_len", "ended", "kl_coef", "logprob_diff"):
            assert math.isfinite(r[key]), f"{key} = {r[key]} at step {r['step']}"
        assert r["n_responses"] == 8 and r["logprob_diff"] < 1e-4
    assert recs[1]["kl_coef"] != recs[0]["kl_coef"], "the adaptive controller never moved"
    # the checkpoint loads like any other nanopost checkpoint
    model, ckpt = load_model(os.path.join(straight, "ckpt.pt"))
    assert ckpt["step"] == 4 and ckpt["script"] == "train_ppo.py" and "value_model" in ckpt and "ref_model" in ckpt

    run_ppo(knobs + [f"--out_dir={split}", "--max_iters=2"])
    run_ppo(knobs + [f"--out_dir={split}", "--max_iters=4"] + ["--init_from=resume"])
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}
    assert [strip(r) for r in read_log(split, "train")] == [strip(r) for r in recs]
    assert [strip(r) for r in read_log(split, "eval")] == [strip(r) for r in read_log(straight, "eval")]
    resumed = torch.load(os.path.join(split, "ckpt.pt"), weights_only=False)
    for key in ("model", "value_model"):
        for name, w in ckpt[key].items():
            torch.testing.assert_close(resumed[key][name], w, rtol=0, atol=0, msg=f"{key}.{name}")
    assert resumed["kl_coef"] == ckpt["kl_coef"]


@pytest.mark.parametrize("extra, per_rank", [([], "4 prompts/rank/iter x 1 samples"),
                                              (["--advantage=grpo", "--group_size=2"], "2 prompts/rank/iter x 2")])
def test_ddp_two_processes(extra, per_rank, tiny_ckpt, run_ppo, read_log, tmp_path):
    # Compared: both ranks finish with identical policy (and value) weights (train_ppo asserts it after every
    # update), and the logged aggregates cover the global batch of 8 responses, 4 sampled per rank (grpo: two
    # whole groups of 2 per rank, never split). The gradient identity DDP relies on is
    # test_global_token_count_makes_split_batches_equal_one_batch.
    out = str(tmp_path / "ddp")
    proc = run_ppo([f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--max_iters=2", *extra], nproc=2)
    assert f"2 rank(s) | {per_rank}" in proc.stdout
    recs = read_log(out, "train")
    assert [r["step"] for r in recs] == [1, 2] and all(r["n_responses"] == 8 for r in recs)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["step"] == 2 and len(ckpt["rank_rng"]) == 2


def prompts_file(path, prompts):
    path.write_text("".join(json.dumps(dict(prompt=p)) + "\n" for p in prompts))
    return str(path)


def test_too_long_prompts_named_before_training_or_dropped(tiny_ckpt, ppo_main, tok, tmp_path, capsys):
    long = "Write an addition that equals 17, and then " * 6
    n = len(tok.encode_prompt(long))
    path = prompts_file(tmp_path / "prompts.jsonl", [f"Write an addition that equals {k}." for k in range(11, 20)]
                        + [long])
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"^1 of 10 prompts do not fit in {64 - 6} tokens in the chat format .*: "
                                        f"{re.escape(path)}:10 \\({n} tokens\\)"):
        ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={out}", f"--prompts={path}", "--max_iters=1"])
    assert not out.exists(), "refused before anything was written"
    ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={out}", f"--prompts={path}", "--max_iters=1",
              "--too_long=drop", "--eval_interval=0"])
    assert "data: 1 of 10 prompts do not fit in 58 tokens" in capsys.readouterr().out


def test_reward_fn_raising_stops_the_run(tiny_ckpt, ppo_main, tmp_path):
    (tmp_path / "bad_reward.py").write_text(textwrap.dedent("""
        def reward(prompts, responses):
            for p in prompts:
                if p.endswith("equals 13."):
                    raise ZeroDivisionError("cannot score this one")
            return [0.0] * len(prompts)
    """))
    # a prompts file whose batch must contain the failing prompt
    prompts = prompts_file(tmp_path / "prompts.jsonl", [f"Write an addition that equals {n}." for n in range(11, 19)])
    with pytest.raises(UserError, match="raised ZeroDivisionError: cannot score this one on prompt "
                                        "'Write an addition that equals 13.'"):
        ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'bad'}", "--max_iters=1",
                  f"--reward_fn={tmp_path / 'bad_reward.py'}:reward", f"--prompts={prompts}"])
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


def test_non_finite_loss_stops_before_the_step(tiny_ckpt, ppo_main, tmp_path):
    # 1e30 is finite for the reward check, but its square overflows float32 in the value loss
    (tmp_path / "huge_reward.py").write_text("def reward(prompts, responses):\n    return [1e30] * len(prompts)\n")
    out = tmp_path / "nan"
    with pytest.raises(Diverged, match=r"^non-finite v_loss=inf.* at step 1; no checkpoint was written"):
        ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--max_iters=2",
                  f"--reward_fn={tmp_path / 'huge_reward.py'}:reward"])
    assert not (out / "ckpt.pt").exists(), "a diverged run must not write a checkpoint"


def test_update_to_1e30_is_not_saved(tiny_ckpt, run_ppo, tmp_path):
    # one minibatch, one epoch, one iteration: the only update makes the policy's weights ~1e30 (finite) and the
    # losses it was computed from were finite, so only the check before saving can catch it. The random model
    # scores 0 everywhere and starts at KL 0, so without the eos penalty every advantage (and gradient) is 0
    out = tmp_path / "huge"
    proc = run_ppo([f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--max_iters=1", "--ppo_epochs=1",
                    "--num_minibatches=1", "--learning_rate=1e30", "--missing_eos_penalty=1"], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr == ("error: the policy is non-finite after step 1 (weights or outputs); not saving, "
                           "no checkpoint was written. Try a lower learning_rate.\n")
    assert not (out / "ckpt.pt").exists()


def test_value_update_that_blows_up_is_not_saved(tiny_ckpt, run_ppo, tmp_path):
    # --value_lr=1e30 leaves the value model's weights finite (~1e30) and its outputs finite too (LayerNorm), so
    # only the weight limit catches it: exit 1 before any save. One update only (a second would meet an inf loss);
    # the eos penalty gives the value loss a target (the random model scores 0, starts at KL 0, its value head at 0)
    out = tmp_path / "huge_value"
    proc = run_ppo([f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--max_iters=1", "--value_lr=1e30",
                    "--missing_eos_penalty=1", "--ppo_epochs=1", "--num_minibatches=1"], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: the value_model blew up after step 1: a weight of "), proc.stderr
    assert proc.stderr.endswith("not saving, no checkpoint was written. Try a lower value_lr.\n")
    assert not (out / "ckpt.pt").exists()


def test_resume_with_new_learning_rate_and_kl_coef_uses_them(ppo_run, ppo_main, copy_run, read_log, tmp_path,
                                                            capsys):
    out = copy_run(ppo_run[0], tmp_path / "resumed")
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert saved["optimizer"]["param_groups"][0]["lr"] == 1e-3 and saved["kl_coef"] == 0.05
    ppo_main(["--init_from=resume", f"--out_dir={out}", "--max_iters=3", "--learning_rate=5e-4", "--kl_coef=0.2"])
    printed = capsys.readouterr().out
    assert "changed: learning_rate 0.001 -> 0.0005" in printed and "changed: kl_coef 0.05 -> 0.2" in printed
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["step"] == 3 and ckpt["config"]["learning_rate"] == 5e-4
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 5e-4  # the policy's AdamW stepped at the new rate
    assert ckpt["value_optimizer"]["param_groups"][0]["lr"] == 1e-3  # value_lr was not given: unchanged
    assert [(r["step"], r["kl_coef"]) for r in read_log(out, "train")] == [(1, 0.05), (2, 0.05), (3, 0.2)]


@pytest.mark.parametrize("change,refused", [
    ("--prompts=PROMPTS", "prompts '' -> 'PROMPTS'"),
    ("--seed=7", "seed 1337 -> 7"),
    ("--max_new_tokens=8", "max_new_tokens 6 -> 8"),
])
def test_resume_refuses_a_changed_run_defining_knob(ppo_run, ppo_main, copy_run, snapshot, tmp_path, change,
                                                    refused):
    path = prompts_file(tmp_path / "prompts.jsonl", [f"Write an addition that equals {n}." for n in range(11, 19)])
    change, refused = change.replace("PROMPTS", path), refused.replace("PROMPTS", path)
    out = copy_run(ppo_run[0], tmp_path / "refused")
    before = snapshot(out)
    ckpt = os.path.join(out, "ckpt.pt")
    with pytest.raises(UserError, match=f"^cannot resume {re.escape(ckpt)}: {re.escape(refused)} \\(run-defining"):
        ppo_main(["--init_from=resume", f"--out_dir={out}", "--max_iters=3", change])
    assert snapshot(out) == before  # ckpt.pt and log.jsonl byte-identical, nothing added


def test_your_prompts_and_reward_are_what_the_evaluation_scores(tiny_ckpt, ppo_main, read_log, tmp_path, capsys):
    # 18 one-turn prompts, then 2 conversations: the held-out tenth is the last 2, and the reward (1 for a
    # conversation, 0 for a string) shows which prompts the evaluation scored, and that a conversation reaches the
    # reward function as its turns
    (tmp_path / "is_conversation.py").write_text(
        "def reward(prompts, responses):\n    return [float(isinstance(p, list)) for p in prompts]\n")
    history = [dict(role="user", content="Write an addition."), dict(role="assistant", content="1+2=3")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            [dict(prompt=f"Write an addition that equals {n}.") for n in range(10, 28)]
                            + [dict(messages=history + [dict(role="user", content=f"Now {n}.")]) for n in (28, 29)]))
    out = tmp_path / "mine"
    ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--max_iters=2", f"--prompts={path}",
              f"--reward_fn={tmp_path / 'is_conversation.py'}:reward"])
    printed = capsys.readouterr().out
    assert "18 train prompts | 2 eval prompts | reward reward_fn=" in printed
    evals = read_log(out, "eval")
    assert [r["step"] for r in evals] == [0, 2]
    assert all(r["reward"] == 1.0 and "accuracy" not in r for r in evals)  # your reward, not the verifier's
    assert all(r["score"] == 0.0 for r in read_log(out, "train"))  # training drew only the 18 strings
    assert "eval before -> after: reward 1.0000 -> 1.0000" in printed


# -----------------------------------------------------------------------------
# critic-free advantages: GRPO and RLOO


def test_grpo_and_rloo_advantages_hand_computed():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    # group 1: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735; group 2: all equal -> no signal
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(train_ppo.grpo_advantages(scores, 4),
                               torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    # leave-one-out: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3; a constant group -> 0
    torch.testing.assert_close(train_ppo.rloo_advantages(scores, 4),
                               torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0, 0.0]))
    # groups of 3: 3 - mean(1, 2) = 1.5; 1 - mean(3, 2) = -1.5; 2 - mean(3, 1) = 0; 0 - mean(0, 6) = -3
    torch.testing.assert_close(train_ppo.rloo_advantages(torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 6.0]), 3),
                               torch.tensor([1.5, -1.5, 0.0, -3.0, -3.0, 6.0]))


E_REWARD = "def reward(prompts, responses):\n    return [float(r.count('e')) for r in responses]\n"


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_critic_free_builds_no_value_model_and_learns(advantage, tiny_ckpt, ppo_main, read_log, tmp_path,
                                                      monkeypatch):
    # a reward the random model can climb (the letter e, ~2 per response at the start): 20 iterations at lr 1e-2
    # took the mean from ~2 to 5.8 (rloo) and 8.8 (grpo); the same run at lr 1e-3 does not move
    (tmp_path / "e_reward.py").write_text(E_REWARD)

    def no_value_model(*args, **kw):
        raise AssertionError("a value model was built for a critic-free run")
    monkeypatch.setattr(nanopost.loading, "ValueModel", no_value_model)
    out = tmp_path / advantage
    ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=0",
              "--batch_size=16", "--learning_rate=1e-2", f"--advantage={advantage}", "--group_size=4",
              f"--reward_fn={tmp_path / 'e_reward.py'}:reward"])
    recs = read_log(out, "train")
    first, last = (sum(r["score"] for r in rs) / 5 for rs in (recs[:5], recs[-5:]))
    assert last > 1.5 * first, f"mean score {first:.2f} -> {last:.2f}"
    assert all("v_loss" not in r and "explained_var" not in r for r in recs)
    assert all("kl_loss" not in r and "kl_penalised" in r for r in recs)  # k1: the whole KL in the reward
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert not {"value_model", "value_model_args", "value_optimizer"} & set(ckpt)
    assert ckpt["config"]["advantage"] == advantage and ckpt["config"]["group_size"] == 4


def test_groups_are_adjacent_samples_of_one_prompt(tiny_ckpt, ppo_main, read_log, tmp_path):
    # the reward function records the prompts it is shown: batch_size counts responses, so 12 responses in
    # groups of 3 are 4 distinct prompts per iteration, each three times in a row
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "record.py").write_text(
        "import json\ndef reward(prompts, responses):\n"
        f"    open({str(seen)!r}, 'a').write(json.dumps(prompts) + '\\n')\n    return [0.0] * len(prompts)\n")
    ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'g'}", "--max_iters=2", "--eval_prompts=0",
              "--batch_size=12", "--advantage=rloo", "--group_size=3", f"--reward_fn={tmp_path / 'record.py'}:reward"])
    batches = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(batches) == 2
    for prompts in batches:
        groups = [prompts[i:i + 3] for i in range(0, 12, 3)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 4
    assert all(r["n_responses"] == 12 for r in read_log(tmp_path / "g", "train"))


def test_grpo_resumes_exactly_and_keeps_snapshots(tiny_ckpt, ppo_main, read_log, copy_run, tmp_path):
    knobs = [f"--init_from={tiny_ckpt}", "--eval_interval=0", "--ckpt_interval=0", "--advantage=grpo",
             "--group_size=4", "--missing_eos_penalty=0.5", "--kl_coef=0.1", "--snapshot_steps=1,3",
             "--eval_prompts=0"]
    straight, half = tmp_path / "straight", tmp_path / "half"
    ppo_main(knobs + [f"--out_dir={straight}", "--max_iters=4"])
    ppo_main(knobs + [f"--out_dir={half}", "--max_iters=2"])
    split = Path(copy_run(half, tmp_path / "split"))  # this process still holds half's lock
    ppo_main(knobs + [f"--out_dir={split}", "--max_iters=4", "--init_from=resume"])
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}
    assert [strip(r) for r in read_log(split, "train")] == [strip(r) for r in read_log(straight, "train")]
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, split))
    for name, w in a["model"].items():
        torch.testing.assert_close(b["model"][name], w, rtol=0, atol=0, msg=name)
    assert sorted(os.listdir(straight / "snap")) == ["step_1.pt", "step_3.pt"]
    snap_model, snap = load_model(str(straight / "snap" / "step_3.pt"))  # loads like any checkpoint
    assert snap["step"] == 3 and "optimizer" not in snap
    with pytest.raises(UserError, match="advantage 'grpo' -> 'gae'"):  # the value model is not there to resume
        ppo_main(knobs + [f"--out_dir={split}", "--max_iters=5", "--init_from=resume", "--advantage=gae"])


@pytest.mark.parametrize("args, message", [
    (["--advantage=rloo"], "--advantage=rloo: needs --group_size >= 2"),
    (["--group_size=3"], "into groups of --group_size=3 (a group stays on one rank)"),
    (["--advantage=grpo", "--group_size=2", "--whiten_rewards=true"], "only for --advantage=gae"),
    (["--snapshot_steps=5,x"], "--snapshot_steps=5,x: expected comma-separated integers"),
])
def test_critic_free_bad_knobs_are_one_line(args, message, tiny_ckpt, ppo_main, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'x'}", "--max_iters=1"] + args)
    assert not (tmp_path / "x").exists()
