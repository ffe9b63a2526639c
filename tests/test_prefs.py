"""Preference pairs and the reward model: the Bradley-Terry loss by hand, the reward read at the last real token,
both preference formats and every error, the built-in labeler, exact resume of reward-model training, and PPO
against a reward model that is a known function."""

import gzip
import json
import math
import random
import re

import pytest
import torch

from nanopost import checkpoint, loading
from nanopost.config import UserError
from nanopost.loading import load_checkpoint
from nanopost.model import RewardModel
from nanopost.prefs import (BETA, DECIDED_MARGIN, Pair, bradley_terry_loss, collate_pairs, encode_pair,
                            is_preferences, label, labeler_score, load_preferences, world_preferences)
from nanopost.reward import load_reward_model


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# -----------------------------------------------------------------------------
# the loss and the reward model


def test_bradley_terry_loss_and_gradient_by_hand():
    r_c = torch.tensor([1.0, 0.0, -2.0, 40.0], dtype=torch.float64, requires_grad=True)
    r_r = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(r_c, r_r)
    # -log sigmoid(d) = log(1 + e^-d): d = 1, 0, -3, 40
    expected = torch.tensor([math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(3)), 4.248354255291589e-18],
                            dtype=torch.float64)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    # d/dr_c = -(1 - sigmoid(d)) = -1 / (1 + e^d); d/dr_r is its negative
    g = torch.tensor([-1 / (1 + math.exp(1)), -0.5, -1 / (1 + math.exp(-3)), -1 / (1 + math.exp(40))],
                     dtype=torch.float64)
    torch.testing.assert_close(r_c.grad, g)
    torch.testing.assert_close(r_r.grad, -g)


def random_reward_model(tiny_gpt, seed=0):
    rm = RewardModel(tiny_gpt(seed=seed, n_embd=32)).eval()
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # a zero head would score everything 0, equal whatever we read
    return rm


def test_reward_is_read_at_the_last_real_token_padded_as_one_by_one(tiny_gpt):
    rm = random_reward_model(tiny_gpt)
    torch.manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,)).tolist() for n in (5, 9, 1, 7)]
    alone = torch.stack([rm(torch.tensor([s]))[0] for s in seqs])  # (4,) no padding, no mask
    # right padding (the pair batches)
    X, M = collate_pairs([(s, s) for s in seqs], pad_id=0)
    torch.testing.assert_close(rm(X[:, 0], attention_mask=M[:, 0]), alone)
    # left-padded prompt, right-padded response (the rollout layout PPO scores): the same tokens, other pads
    P, N = 3, 6
    tokens, mask = torch.zeros(4, P + N, dtype=torch.long), torch.zeros(4, P + N, dtype=torch.bool)
    for i, s in enumerate(seqs):
        p, r = s[:min(len(s), 3)], s[min(len(s), 3):]
        tokens[i, P - len(p):P], mask[i, P - len(p):P] = torch.tensor(p), True
        tokens[i, P:P + len(r)], mask[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long), True
    torch.testing.assert_close(rm(tokens, attention_mask=mask), alone)
    # and it is the last position's value, not any other
    values = super(RewardModel, rm).forward(torch.tensor([seqs[1]]))[0]  # (T,)
    assert rm(torch.tensor([seqs[1]]))[0] == values[-1] and not torch.allclose(values[:-1], values[-1])


def test_encode_pair_ends_with_eot_and_keeps_the_end_of_a_long_pair(tok):
    pair = Pair([("user", "Write an addition that equals 12.")], "5+7=12", "12+0=12 12+0=12", True, False)
    c, r, n_response, truncated = encode_pair(tok, pair, 64)
    assert c == tok.encode_prompt("Write an addition that equals 12.") + tok.encode("5+7=12") + [tok.eot_id]
    assert r[-1] != tok.eot_id and not truncated  # a response cut at the length limit has no end token
    assert n_response == (len(tok.encode("5+7=12")) + 1, len(tok.encode("12+0=12 12+0=12")))
    c8, r8, n_response8, truncated = encode_pair(tok, pair, 8)
    assert truncated and c8 == c[-8:] and r8 == r[-8:] and n_response8 == (min(n_response[0], 8), 8)


# -----------------------------------------------------------------------------
# your preference files

HH_CHOSEN = ("\n\nHuman: What is 2+2?\n\nAssistant: Why do you ask?\n\nHuman: Homework.\n\nAssistant: It is 4, "
             "since two and two make four.")
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: Why do you ask?\n\nHuman: Homework.\n\nAssistant: It is 5."
HH_PROMPT = [("user", "What is 2+2?"), ("assistant", "Why do you ask?"), ("user", "Homework.")]


def test_hh_transcripts_share_their_prompt(tmp_path):
    pairs = load_preferences(write(tmp_path / "hh.jsonl", [dict(chosen=HH_CHOSEN, rejected=HH_REJECTED)]))
    # the common prefix runs into the last answer ("It is "), the prompt still ends at its last Assistant turn
    assert pairs == [Pair(HH_PROMPT, "It is 4, since two and two make four.", "It is 5.")]


def test_hh_quirks_of_real_transcripts(tmp_path):
    records = [dict(chosen="\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
                    rejected="\n\nHuman: a\n\nHuman: b\n\nAssistant: d"),
               dict(chosen="\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                    rejected="\n\nHuman: a\n\nAssistant: x")]
    assert load_preferences(write(tmp_path / "hh.jsonl", records)) == [
        Pair([("user", "a\n\nb")], "c", "d"),  # two human turns in a row: one turn
        Pair([("user", "a")], "b\n\nHuman: c\n\nAssistant: d", "x")]  # parted early: the rest is the response


def test_every_preference_shape_and_gzip(tmp_path, capsys):
    msgs = [dict(role=r, content=c) for r, c in HH_PROMPT]
    records = [
        dict(prompt="Say hi.", chosen="Hi!", rejected="Go away."),                       # explicit, strings
        dict(prompt=msgs, chosen=[dict(role="assistant", content="It is 4.")],           # explicit, messages
             rejected=[dict(role="assistant", content="It is 5.")], id=7),
        dict(chosen=msgs + [dict(role="assistant", content="It is 4.")],                 # implicit, messages
             rejected=msgs + [dict(role="assistant", content="It is 5.")], source="x"),
        dict(chosen=HH_CHOSEN, rejected=HH_REJECTED),                                    # implicit, HH strings
        dict(chosen="\n\nHuman: Hi\n\nAssistant:", rejected="\n\nHuman: Hi\n\nAssistant: Hello"),  # empty answer
    ]
    expected = [Pair([("user", "Say hi.")], "Hi!", "Go away."), Pair(HH_PROMPT, "It is 4.", "It is 5."),
                Pair(HH_PROMPT, "It is 4.", "It is 5."),
                Pair(HH_PROMPT, "It is 4, since two and two make four.", "It is 5."),
                Pair([("user", "Hi")], "", "Hello")]
    path = write(tmp_path / "p.jsonl", records)
    assert load_preferences(path) == expected and is_preferences(path)
    assert capsys.readouterr().out.count("WARNING") == 1  # id and source: one warning for the file
    load_preferences(path)
    assert "WARNING" not in capsys.readouterr().out  # and only once, however often it is read
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "p.jsonl").read_bytes()))
    assert load_preferences(str(gz)) == expected and is_preferences(str(gz))
    arr = tmp_path / "p.json"
    arr.write_text(json.dumps(records, indent=1))
    assert load_preferences(str(arr)) == expected and is_preferences(str(arr))
    assert not is_preferences(write(tmp_path / "sft.jsonl", [dict(prompt="a", completion="b")]))


@pytest.mark.parametrize("record, what", [
    (dict(prompt="Say hi.", chosen="Hi!"), "missing key 'rejected'"),
    (dict(prompt="Say hi.", chosen="Hi!", rejected="Hi!"), "chosen and rejected are the same response"),
    (dict(chosen=HH_CHOSEN, rejected=HH_CHOSEN), "chosen and rejected are the same response"),
    (dict(prompt="", chosen="a", rejected="b"), "prompt is empty"),
    (dict(prompt=3, chosen="a", rejected="b"), "prompt must be a string"),
    (dict(prompt="Hi", chosen=[dict(role="user", content="a")], rejected="b"),
     "chosen must be a string or one assistant message"),
    (dict(prompt=[dict(role="assistant", content="a")], chosen="a", rejected="b"), "ending with user"),
    (dict(chosen="Hi there", rejected="Hi you"), "share no prompt ending with"),
    (dict(chosen="Why?\n\nAssistant: a", rejected="Why?\n\nAssistant: b"), "must start with '\\\\n\\\\nHuman:'"),
    (dict(chosen=[dict(role="user", content="a"), dict(role="assistant", content="b")],
          rejected=[dict(role="user", content="x"), dict(role="assistant", content="c")]), "share every turn but"),
    (dict(chosen="\n\nHuman: a\n\nAssistant: b", rejected=[dict(role="user", content="a")]),
     "both be strings .* or both message lists"),
])
def test_every_error_names_its_line(tmp_path, record, what):
    path = write(tmp_path / "p.jsonl", [dict(prompt="ok", chosen="a", rejected="b"), record])
    with pytest.raises(UserError, match=f"^{tmp_path / 'p.jsonl'}:2: .*{what}"):
        load_preferences(path)


def test_file_level_errors(tmp_path):
    (tmp_path / "blank.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n')
    with pytest.raises(UserError, match=r"blank.jsonl:2: blank line"):
        load_preferences(str(tmp_path / "blank.jsonl"))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"bad.jsonl.gz: cannot read"):
        load_preferences(str(tmp_path / "bad.jsonl.gz"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match=r"empty.json: no records"):
        load_preferences(str(tmp_path / "empty.json"))


# -----------------------------------------------------------------------------
# the built-in labeler


def test_labeler_prefers_valid_answers_and_follows_bradley_terry(world):
    prompt = "Write an addition that equals 12."
    assert labeler_score(world, prompt, "5+7=12", True) == pytest.approx(1 + 0.6 * 6 / 24)
    assert labeler_score(world, prompt, "5+7=12", False) == pytest.approx(0.6 * 6 / 24)  # never ended: invalid
    assert labeler_score(world, prompt, "x" * 40, True) == pytest.approx(0.6)  # the taste is capped
    # an invalid answer however long scores below every valid one: the bias never flips valid vs invalid
    long_invalid = labeler_score(world, prompt, "The answer is 5+7=12, truly.", True)
    assert long_invalid < labeler_score(world, prompt, "5+7=12", True)
    # the choice frequency is the Bradley-Terry probability of the score gap
    a, b = ("5+7=12 5+7=12", True), ("5+7=12.", True)  # both invalid; a is longer by 6 characters
    gap = labeler_score(world, prompt, *a) - labeler_score(world, prompt, *b)
    rng = random.Random(0)
    picks = [label(world, rng, prompt, a, b) for _ in range(4000)]
    p = sum(pk.chosen == a[0] for pk in picks) / len(picks)
    assert p == pytest.approx(1 / (1 + math.exp(-BETA * gap)), abs=0.025)
    assert all(pk.decided == (abs(gap) >= DECIDED_MARGIN) for pk in picks)


def test_world_preferences_are_deterministic_and_mixed(world, tok, tiny_gpt):
    lm = tiny_gpt(n_embd=32)
    make = lambda: world_preferences(world, tok, lm, 200, world.ppo_prompts, 3, 6, "cpu")  # noqa: E731
    pairs = make()
    assert pairs == make() and len(pairs) == 200
    assert all(p.chosen != p.rejected or p.chosen_ended != p.rejected_ended for p in pairs)
    assert any(not p.rejected_ended for p in pairs)  # policy samples cut at the limit are in the mix
    verdicts = [world.score(p.prompt[0][1], r, e) for p in pairs for r, e in ((p.chosen, p.chosen_ended),
                                                                              (p.rejected, p.rejected_ended))]
    assert 0.1 < sum(verdicts) / len(verdicts) < 0.9  # both valid and invalid answers


# -----------------------------------------------------------------------------
# training it (train_sft.py) and scoring with it (train_ppo.py)

RM = ["--data=prefs", "--block_size=64", "--max_new_tokens=6", "--batch_size=8", "--eval_interval=0",
      "--lr_decay_iters=6",  # the full run's schedule, so the half run's resume continues the same curve
      "--learning_rate=3e-3", "--warmup_iters=1"]


def release_locks():
    """What the end of a real run does: in-process runs keep their out_dir locked until released."""
    while checkpoint._locks:
        checkpoint._locks.pop().close()


def test_reward_model_training_resume_is_exact(sft_main, tiny_ckpt, read_log, copy_run, tmp_path):
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    sft_main([*RM, f"--init_from={tiny_ckpt}", f"--out_dir={full}", "--max_iters=6"])
    sft_main([*RM, f"--init_from={tiny_ckpt}", f"--out_dir={half}", "--max_iters=3"])
    release_locks()
    sft_main([*RM, "--init_from=resume", f"--out_dir={half}", "--max_iters=6"])
    keys = ("step", "loss", "acc", "grad_norm")
    train = [[[r[k] for k in keys] for r in read_log(d, "train")] for d in (full, half)]
    assert train[0] == train[1] and len(train[0]) == 6
    final = [{k: r[k] for k in ("step", "val_loss", "acc", "acc_decided")} for r in
             (read_log(d, "eval")[-1] for d in (full, half))]
    assert final[0] == final[1] and final[0]["step"] == 6
    assert read_log(full, "train")[-1]["loss"] < math.log(2)  # it learned something: the first loss is log 2
    c_full, c_half = load_checkpoint(f"{full}/ckpt.pt"), load_checkpoint(f"{half}/ckpt.pt")
    assert c_full["kind"] == "reward_model" and c_full["reward_norm"] == c_half["reward_norm"]
    for k, v in c_full["model"].items():
        assert torch.equal(v, c_half["model"][k]), k
    assert set(c_full["model"]) >= {"head.weight", "head.bias", "trunk.lm_head.weight"}


def test_reward_model_on_your_file_and_its_errors(sft_main, ppo_main, tiny_ckpt, tmp_path):
    pairs = [dict(prompt=f"Say {i}.", chosen=f"{i} yes", rejected=f"{i} no") for i in range(20)]
    path = write(tmp_path / "p.jsonl", pairs)
    out = str(tmp_path / "rm")
    sft_main([f"--data={path}", f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--max_iters=2", "--block_size=64"])
    with pytest.raises(UserError, match=r"is a reward model; --data=sft trains a language model"):
        sft_main(["--data=sft", f"--init_from={out}/ckpt.pt", f"--out_dir={tmp_path / 'x'}", "--max_iters=1"])
    with pytest.raises(UserError, match=r"--reward_model=.*: not a reward model"):
        ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'p'}", f"--reward_model={tiny_ckpt}"])
    with pytest.raises(UserError, match=r"give one reward, not two"):
        ppo_main([f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'p'}", f"--reward_model={out}/ckpt.pt",
                  "--reward_fn=x.py:f"])


def one_token_reward_model(tiny_gpt, tok, rewarded):
    """A reward model that is a known function of the last token: its blocks add nothing (c_proj = 0), so the
    trunk's output at a position is h = ln_f(wte[token]), and the head is h[rewarded] / |h[rewarded]|^2: the reward
    is 1 for that token and the overlap of the two unit-variance vectors (|r| ~ 1/sqrt(C)) for any other."""
    rm = RewardModel(tiny_gpt(seed=5, n_embd=32))
    with torch.no_grad():
        for name, p in rm.trunk.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("c_proj.bias"):
                p.zero_()
        h = rm.trunk.transformer.ln_f(rm.trunk.transformer.wte.weight)  # (V, C): every token's output
        rm.head.weight.copy_(h[rewarded][None] / h[rewarded].square().sum())
        scores = h @ rm.head.weight[0]  # (V,) the reward of each token at the end
    return rm, scores


def test_ppo_raises_a_known_reward_model_and_logs_gold(tiny_gpt, tok, save_tiny_ckpt, ppo_main, read_log, tmp_path):
    rewarded = tok.encode("7")[0]
    rm, scores = one_token_reward_model(tiny_gpt, tok, rewarded)
    assert scores[rewarded] == pytest.approx(1.0, abs=1e-4)
    norm = dict(mean=scores.mean().item(), std=scores.std().item())  # over tokens: a uniform policy's mean 0, std 1
    path = save_tiny_ckpt(tmp_path / "rm.pt", rm.trunk, kind="reward_model", reward_norm=norm)
    ckpt = load_checkpoint(path)
    ckpt["model"] = rm.state_dict()
    torch.save(ckpt, path)
    score = load_reward_model(path, tok, 64, "cpu")
    one = torch.tensor([[tok.user_id, rewarded]])
    assert score(one, torch.ones_like(one, dtype=torch.bool)).item() == pytest.approx((1 - norm["mean"]) / norm["std"])
    policy = save_tiny_ckpt(tmp_path / "policy.pt", tiny_gpt(seed=1, n_embd=32))  # near uniform over V
    out = str(tmp_path / "ppo")
    ppo_main([f"--init_from={policy}", f"--out_dir={out}", f"--reward_model={path}", "--max_new_tokens=1",
              "--batch_size=64", "--num_minibatches=1", "--learning_rate=3e-2", "--kl_coef=0", "--max_iters=12",
              "--eval_interval=0", "--eval_prompts=0"])
    log = read_log(out, "train")
    assert all("gold" in r for r in log)  # the built-in prompts: the verifier is logged beside the proxy
    first, last = sum(r["score"] for r in log[:3]) / 3, sum(r["score"] for r in log[-3:]) / 3
    assert abs(first) < 0.5 and last > first + 0.7, (first, last)  # a batch mean has std ~1/8 here


def test_a_reward_model_where_a_language_model_is_expected_is_one_line(tiny_gpt, save_tiny_ckpt, ppo_main, tmp_path):
    rm = save_tiny_ckpt(tmp_path / "rm.pt", tiny_gpt(), kind="reward_model")  # refused before its weights are read
    lm = save_tiny_ckpt(tmp_path / "lm.pt", tiny_gpt())
    message = f"^{re.escape(rm)} is a reward model, not a language model; use it as train_ppo.py --reward_model="
    for load in (lambda: loading.load_model(rm),  # nanopost.sample and nanopost.evaluate
                 lambda: ppo_main([f"--init_from={rm}", f"--out_dir={tmp_path / 'a'}"]),
                 lambda: ppo_main([f"--init_from={lm}", f"--value_init={rm}", f"--out_dir={tmp_path / 'b'}"])):
        with pytest.raises(UserError, match=message):
            load()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ppo_with_a_reward_model_on_your_prompts(tiny_gpt, tok, save_tiny_ckpt, ppo_main, read_log, tmp_path):
    # your prompts have no verifier: no gold is logged, and the held-out tenth is scored by the reward model itself
    rewarded = tok.encode("7")[0]
    rm, scores = one_token_reward_model(tiny_gpt, tok, rewarded)
    norm = dict(mean=scores.mean().item(), std=scores.std().item())
    path = save_tiny_ckpt(tmp_path / "rm.pt", rm.trunk, kind="reward_model", reward_norm=norm)
    ckpt = load_checkpoint(path)
    ckpt["model"] = rm.state_dict()
    torch.save(ckpt, path)
    prompts = write(tmp_path / "prompts.jsonl", [dict(prompt=f"Pick a number, {i}.") for i in range(80)])
    policy = save_tiny_ckpt(tmp_path / "policy.pt", tiny_gpt(seed=1, n_embd=32))
    out = str(tmp_path / "ppo")
    ppo_main([f"--init_from={policy}", f"--out_dir={out}", f"--reward_model={path}", f"--prompts={prompts}",
              "--max_new_tokens=1", "--batch_size=64", "--num_minibatches=1", "--learning_rate=3e-2", "--kl_coef=0",
              "--max_iters=12", "--eval_interval=0", "--eval_prompts=8", "--eval_k=8"])
    train, evals = read_log(out, "train"), read_log(out, "eval")
    assert not any("gold" in r for r in train)
    assert [e["step"] for e in evals] == [0, 12] and all(set(e) >= {"reward", "ended"} for e in evals)
    # the same reward model scores training and evaluation: both rise from ~0 (a uniform policy) toward 1
    first, last = sum(r["score"] for r in train[:3]) / 3, sum(r["score"] for r in train[-3:]) / 3
    assert abs(first) < 0.5 and last > first + 0.7, (first, last)
    assert abs(evals[0]["reward"]) < 0.5 and evals[1]["reward"] > evals[0]["reward"] + 0.7, evals
