"""
Every metric of nanopost.metrics against a value computed by hand: a uniform model (zeroed lm_head, so every
logit is 0) has entropy and held-out loss log V; a model has KL 0 to itself; distinct counts and verifier
accuracy on fixed lists.
"""

import itertools
import math

import pytest
import torch

from nanopost import evaluate as E
from nanopost import metrics as M
from nanopost.config import UserError
from nanopost.metrics import response_stats
from nanopost.rollout import Rollout

P10 = "Write an addition that equals 10."
P20 = "Give two numbers that add up to 20."


# -----------------------------------------------------------------------------
# pure counting, on fixed lists

def test_distinct_n_by_hand():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert M.distinct_n(seqs, 1) == pytest.approx(4 / 6)  # unigrams 1,2,3,1,2,4: 4 unique of 6
    assert M.distinct_n(seqs, 2) == pytest.approx(3 / 4)  # bigrams 12,23,12,24: 3 unique of 4
    assert M.distinct_n([[5, 5, 5, 5]], 1) == pytest.approx(1 / 4)
    assert M.distinct_n([[7]], 2) == 0.0  # no bigram at all -> 0, not a division by zero
    assert M.distinct_n([], 1) == 0.0


def test_score_samples_accuracy_and_distinct_valid_by_hand(world):
    k = 4
    prompts = [P10] * k + [P20] * k
    responses = ["1+9=10", "1+9=10", "3+7=10", "2+2=4",  # prompt 10: 3 valid, 2 distinct valid answers
                 "10+10=20", "19+1=20", "019+1=20", "5+15=20"]  # prompt 20: leading zero invalid; last truncated
    ended = [True, True, True, True, True, True, True, False]
    toks = [[1, 2], [1, 2], [3, 4], [5, 6], [1], [2], [3], [4]]
    m, verdicts = M.score_samples(world, prompts, responses, ended, k, toks)
    assert [v["correct"] for v in verdicts] == [True, True, True, False, True, True, False, False]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["pass_at_k"] == pytest.approx(1.0)
    assert m["ended"] == pytest.approx(7 / 8)
    assert m["well_formed"] == pytest.approx(1.0)  # "019+1=20" is well formed, only not canonical
    assert m["reward"] == pytest.approx(5 / 8)
    assert m["distinct_valid"] == pytest.approx((2 + 2) / 2)  # {1+9, 3+7} and {10+10, 19+1}; 5+15 did not end
    # prompt 10: unigrams 1,2,1,2,3,4,5,6 -> 6/8; bigrams 12,12,34,56 -> 3/4. prompt 20: 4/4 unigrams, no bigram
    assert m["distinct_1"] == pytest.approx((6 / 8 + 1.0) / 2)
    assert m["distinct_2"] == pytest.approx((3 / 4 + 0.0) / 2)


def test_completion_matches():
    assert M.completion_matches("42\n3+4=7", "42")
    assert M.completion_matches(" Kelmar. Zorvan", " Kelmar")
    assert not M.completion_matches("425", "42")  # the word must end where the expected text ends
    assert not M.completion_matches(" Kel", " Kelmar")
    assert M.evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert M.evenly_spaced([1, 2], 5) == [1, 2]


# -----------------------------------------------------------------------------
# model metrics on a tiny GPT

def test_uniform_model_heldout_loss_is_log_v(tok, world, tiny_gpt, reference_kernels):
    model = tiny_gpt(uniform=True)
    log_v = math.log(tok.vocab_size)
    losses = M.heldout_losses(model, tok, world, "cpu", max_docs=3)
    assert set(losses) == set(world.skills)
    for skill, loss in losses.items():
        assert loss == pytest.approx(log_v, abs=1e-4), skill

def test_uniform_model_entropy_is_log_v(tok, world, tiny_gpt):
    model = tiny_gpt(uniform=True)
    m = M.task_eval(model, tok, world, [P10, P20], k=2, max_new_tokens=4, seed=0)
    assert m["entropy"] == pytest.approx(math.log(tok.vocab_size), abs=1e-4)


def test_kl_to_itself_is_zero_and_to_another_model_positive(tok, world, tiny_gpt):
    model, other = tiny_gpt(seed=0), tiny_gpt(seed=1)
    same = M.task_eval(model, tok, world, [P10, P20], k=2, max_new_tokens=4, seed=0, base_model=model)
    assert same["kl_base_pi"] == pytest.approx(0.0, abs=1e-6)
    diff = M.task_eval(model, tok, world, [P10, P20], k=2, max_new_tokens=4, seed=0, base_model=other)
    assert diff["kl_base_pi"] > 1e-4
    # the samples come from pi alone, so the base model does not change any sample-based metric
    assert diff["distinct_1"] == same["distinct_1"] and diff["entropy"] == pytest.approx(same["entropy"])


def test_task_eval_is_deterministic_and_restores_train_mode(tok, world, tiny_gpt, reference_kernels):
    model = tiny_gpt()
    model.train()
    a = M.task_eval(model, tok, world, [P10, P20], k=3, max_new_tokens=5, seed=7, n_show=6)
    assert model.training, "task_eval must give the model back in training mode"
    b = M.task_eval(model, tok, world, [P10, P20], k=3, max_new_tokens=5, seed=7, n_show=6)
    assert [s[1] for s in a["samples"]] == [s[1] for s in b["samples"]]
    assert a == b
    c = M.task_eval(model, tok, world, [P10, P20], k=3, max_new_tokens=5, seed=8, n_show=6)
    assert [s[1] for s in a["samples"]] != [s[1] for s in c["samples"]]
    with pytest.raises(ValueError, match="k must be"):
        M.task_eval(model, tok, world, [P10], k=0)


def test_evaluate_cli_prints_table_with_zero_base_deltas(tiny_gpt, save_tiny_ckpt, tmp_path, capsys,
                                                         reference_kernels):
    paths = []
    for name, seed in (("base", 0), ("other", 1)):
        paths.append(save_tiny_ckpt(tmp_path / name / "ckpt.pt", tiny_gpt(seed=seed)))
    results = E.main([f"--base={paths[0]}", paths[1], "--k=2", "--n_prompts=2", "--max_new_tokens=4",
                      "--max_docs=2", "--max_probes=2", "--device=cpu"])
    base, other = results[paths[0]], results[paths[1]]
    assert base["kl_base_pi"] == pytest.approx(0.0, abs=1e-6) and base["dloss_mean"] == 0.0
    assert other["kl_base_pi"] > 0
    assert other["dloss/facts"] == pytest.approx(other["loss/facts"] - base["loss/facts"])
    out = capsys.readouterr().out
    assert "KL(base||pi)" in out and paths[1] in out
    with pytest.raises(UserError, match="--base=PATH is required"):
        E.main([paths[1]])


# -----------------------------------------------------------------------------
# your data: the loss on your conversations or corpus, your reward on your prompts

def test_evaluate_on_your_data_reports_your_loss_and_your_reward(tiny_ckpt, tok, tmp_path, capsys, reference_kernels):
    import json
    import torch
    from nanopost.loading import load_model
    chats = tmp_path / "chats.jsonl"
    turns = [("user", "Hi there"), ("assistant", "Hello!"), ("user", "Add 2 and 3."), ("assistant", "2+3=5")]
    chats.write_text(json.dumps(dict(messages=[dict(role=r, content=c) for r, c in turns])) + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Facts about the world. " * 40)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Write an addition that equals 12."}\n{"prompt": "Say hi."}\n')
    (tmp_path / "half.py").write_text("def score(prompts, responses):\n    return [0.5] * len(prompts)\n")
    results = E.main([f"--data={chats}", f"--prompts={prompts}", f"--reward_fn={tmp_path / 'half.py'}:score",
                      "--k=2", "--max_new_tokens=6", tiny_ckpt])
    m = results[tiny_ckpt]
    assert set(m) == {"val_loss", "reward", "ended", "resp_len"}  # no built-in world metric on your data
    assert m["reward"] == 0.5 and 0 <= m["ended"] <= 1 and 0 < m["resp_len"] <= 6
    # the loss, by hand: cross-entropy of the assistant tokens (and their <|endoftext|>) only
    model, _ = load_model(tiny_ckpt)
    ids, learn = tok.encode_turns(turns)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)  # (T, V)
    want = [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if learn[t + 1]]
    assert m["val_loss"] == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert "val_loss" in capsys.readouterr().out
    corpus_loss = E.main([f"--data={corpus}", tiny_ckpt])[tiny_ckpt]["val_loss"]
    assert 0 < corpus_loss < 2 * math.log(tok.vocab_size)


def test_table_columns_follow_the_data():
    builtin = dict(accuracy=0.5, reward=0.5, ended=1.0, resp_len=8.0, kl_base_pi=1.0)  # task_eval's keys
    yours = dict(val_loss=2.0, reward=0.25, ended=0.5, resp_len=12.0)
    assert [h for _, h, _ in E.table_columns([builtin])] == ["acc", "KL(base||pi)"]  # reward is acc there
    assert [h for _, h, _ in E.table_columns([yours])] == ["val_loss", "reward", "ended", "resp_len"]


def test_evaluate_on_your_data_bad_input_names_the_knob_or_file(tiny_ckpt, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n')
    with pytest.raises(UserError, match="^--prompts needs --reward_fn="):
        E.main([f"--prompts={prompts}", tiny_ckpt])
    missing = str(tmp_path / "nope.json")
    with pytest.raises(UserError, match=f"^{missing}: cannot read"):
        E.main([f"--data={missing}", tiny_ckpt])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(UserError, match=f"^{short}: [0-9]+ tokens, fewer than block_size\\+2=66$"):
        E.main([f"--data={short}", tiny_ckpt])


def test_both_kl_directions_are_estimated_on_the_right_samples():
    # two tokens, A and B, after a prompt token: the base is uniform; pi puts 0.99 on A, then 0.99 on A again
    # after an A (uniform after a B). Summed along sampled responses, the exact per-token KL estimates the
    # sequence-level KL when the samples come from its first argument: KL(base || pi) = 2.42 on the base's
    # samples, KL(pi || base) = 1.27 on pi's. The forward KL on pi's samples (what the evaluation used to report)
    # comes out 3.21: neither
    class Table(torch.nn.Module):  # next-token logits from the last token: 2 = the prompt, 0 = A, 1 = B
        def __init__(self, probs):
            super().__init__()
            self.logits = torch.tensor(probs).log()  # (3 states, 2 tokens)

        def forward(self, tokens, attention_mask=None):
            return self.logits[tokens]  # (B, T, 2)

    base = Table([[0.5, 0.5]] * 3)
    pi = Table([[0.99, 0.01], [0.5, 0.5], [0.99, 0.01]])

    def expected(sampler, first, second):
        """E over sampler's responses of response_stats' KL(first || second), every response enumerated."""
        total = 0.0
        for y in itertools.product(range(2), repeat=2):
            tokens = torch.tensor([[2, *y]])
            ro = Rollout([""], [""], tokens, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool),
                         torch.zeros(1, 2), torch.ones(1, dtype=torch.bool), 1)
            p = math.exp(float(torch.log_softmax(sampler(tokens)[0, :2], -1).gather(-1, tokens[0, 1:, None]).sum()))
            total += p * response_stats(first, ro, second)[1]
        return total
    assert expected(base, base, pi) == pytest.approx(2.42, abs=0.005)  # KL(base || pi), the base's samples
    assert expected(pi, pi, base) == pytest.approx(1.27, abs=0.005)    # KL(pi || base), pi's samples
    assert expected(pi, base, pi) == pytest.approx(3.21, abs=0.005)    # the old mix
