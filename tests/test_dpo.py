"""DPO (nanopost.dpo, train_sft.py --objective=dpo): the loss and its gradient by hand in float64, the response
log-probs of a padded pair batch against one sequence at a time, training on the built-in pairs, resume, data
parallel, and bad input."""

import contextlib
import json
import math
import os
import re

import pytest
import torch

from nanopost.config import UserError
from nanopost.dpo import dpo_pair_loss, pair_logprobs
from nanopost.loading import load_checkpoint
from nanopost.prefs import Pair, collate_pairs, encode_pair, response_mask

# -----------------------------------------------------------------------------
# the loss, by hand

# one pair over a 3-token vocabulary, T = 4: the prompt is token 2, chosen answers 0 1 1, rejected answers 1 (then
# two pads, token 2). Row s, column t of the logits predicts token t+1 of side s.
X = torch.tensor([[[2, 0, 1, 1], [2, 1, 2, 2]]])                                  # (1, 2, 4)
R = torch.tensor([[[0, 1, 1, 1], [0, 1, 0, 0]]], dtype=torch.bool)               # (1, 2, 4) response tokens
POLICY = [[[0.5, -1.0, 0.0], [0.0, 2.0, -0.5], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]],
          [[-0.5, 0.5, 0.0], [0.2, 0.1, 0.0], [9.0, -9.0, 0.0], [0.0, 0.0, 0.0]]]
REF = [[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]],
       [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
SCORED = {0: [(0, 0), (1, 1), (2, 1)], 1: [(0, 1)]}  # side: (column, the token it scores) of its response


def log_softmax(row, token):
    return row[token] - math.log(sum(math.exp(v) for v in row))


def softmax(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


@pytest.mark.parametrize("beta, label_smoothing, ipo", [(0.1, 0.0, False), (0.5, 0.2, False), (0.3, 0.0, True)])
def test_dpo_loss_and_gradient_by_hand(beta, label_smoothing, ipo):
    logits = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)     # (2, T, V)
    ref = torch.tensor(REF, dtype=torch.float64)
    loss, sums = dpo_pair_loss(lambda tokens: logits, X, R, None, n_loss=1, autocast=contextlib.nullcontext,
                               ref_model=lambda tokens: ref, beta=beta, label_smoothing=label_smoothing, ipo=ipo)
    loss.backward()
    # the sequence log-ratios, token by token
    lr = [sum(log_softmax(POLICY[s][t], k) - log_softmax(REF[s][t], k) for t, k in SCORED[s]) for s in (0, 1)]
    h = lr[0] - lr[1]
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    if ipo:
        expected, dh = (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))
    else:
        eps = label_smoothing
        expected = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
        dh = -beta * ((1 - eps) * sig(-beta * h) - eps * sig(beta * h))
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    # d loss / d logits[s, t] = dh * (+1 chosen, -1 rejected) * (onehot(token) - softmax) at the scored columns;
    # 0 at the prompt, the pads and the last column (it predicts no token)
    grad = torch.zeros(2, 4, 3, dtype=torch.float64)
    for s, sign in ((0, 1.0), (1, -1.0)):
        for t, k in SCORED[s]:
            p = softmax(POLICY[s][t])
            grad[s, t] = torch.tensor([sign * dh * ((j == k) - p[j]) for j in range(3)], dtype=torch.float64)
    torch.testing.assert_close(logits.grad, grad)
    # the logged sums: the implicit rewards beta * log-ratio, and whether they rank the pair right
    torch.testing.assert_close(torch.stack([sums["chosen"], sums["rejected"]]),
                               torch.tensor([beta * lr[0], beta * lr[1]], dtype=torch.float64))
    assert sums["acc"].item() == float(h > 0)


def test_pair_logprobs_score_each_response_as_one_sequence_alone(tiny_gpt, tok):
    model = tiny_gpt(n_embd=32).eval()
    pairs = [Pair([("user", "Write an addition that equals 12.")], "5+7=12", "12+0=12 12+0=12", True, False),
             Pair([("user", "Hi"), ("assistant", "Hello."), ("user", "Add 2 and 3.")], "2+3=5", "", True, True),
             Pair([("user", "A long prompt " * 4)], "a long answer that the context cuts", "no", True, True),
             Pair([("user", "Go on.")], "and on " * 20, "and on", True, True)]
    examples = [encode_pair(tok, p, 32) for p in pairs]
    # the last two lost their oldest prompt tokens; the last one's chosen response fills the context alone
    assert [ex[-1] for ex in examples] == [False, False, True, True] and examples[3][2][0] == 32
    X, M = collate_pairs(examples, pad_id=tok.eot_id)
    with torch.no_grad():
        batched = pair_logprobs(model, X, response_mask(examples, M))           # (4, 2)
        alone = torch.zeros(4, 2)
        for i, ex in enumerate(examples):
            for s in (0, 1):
                ids = torch.tensor(ex[s])
                logp = torch.log_softmax(model(ids[None])[0, :-1].float(), -1)  # (L-1, V): row j scores token j+1
                scored = range(max(len(ids) - ex[2][s], 1), len(ids))          # the response, bar a first token
                alone[i, s] = sum(logp[j - 1, ids[j]] for j in scored)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# training with it (train_sft.py --objective=dpo)

DPO = ["--data=prefs", "--objective=dpo", "--block_size=64", "--max_new_tokens=6", "--eval_interval=0"]


def test_dpo_learns_the_builtin_preferences(sft_main, read_log, tmp_path):
    # from scratch the labeler compares synthetic answers only (no policy to sample): valid ones, near misses, and
    # its taste for length. A reward model of this size reaches about 0.62 of all held-out pairs and 0.78 of the
    # decided ones in these 100 steps; DPO's implicit reward must rank them well above chance too
    out = str(tmp_path / "dpo")
    sft_main([*DPO, f"--out_dir={out}", "--batch_size=16", "--max_iters=100", "--learning_rate=3e-3",
              "--log_interval=10"])
    first, last = read_log(out, "eval")[0], read_log(out, "eval")[-1]
    assert first["acc"] == 0 and first["kl_ref"] == 0  # the policy is its reference: every reward is 0
    assert last["acc"] > 0.56 and last["acc_decided"] > 0.65, last  # of 512 pairs: chance 0.5, std 0.022
    assert last["margin"] > 0 and last["kl_ref"] > 0 and "task" in last  # it answers the task prompts too
    train = read_log(out, "train")
    assert all(set(r) >= {"loss", "acc", "chosen", "rejected"} for r in train)
    ckpt = load_checkpoint(f"{out}/ckpt.pt")
    assert ckpt["stage"] == "dpo" and "kind" not in ckpt and set(ckpt["ref_model"]) == set(ckpt["model"])


def test_dpo_resume_is_exact_and_refuses_a_new_beta(sft_main, read_log, copy_run, snapshot, tmp_path):
    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    args = [*DPO, "--lr_decay_iters=4", "--grad_accum=2", "--learning_rate=3e-3"]
    sft_main([*args, f"--out_dir={full}", "--max_iters=4"])
    sft_main([*args, f"--out_dir={half}", "--max_iters=2"])
    refused = copy_run(half, tmp_path / "refused")
    from nanopost import checkpoint
    while checkpoint._locks:  # what the end of a real run does
        checkpoint._locks.pop().close()
    sft_main([*args, "--init_from=resume", f"--out_dir={half}", "--max_iters=4"])
    keys = ("step", "loss", "acc", "chosen", "rejected", "grad_norm")
    train = [[[r[k] for k in keys] for r in read_log(d, "train")] for d in (full, half)]
    assert train[0] == train[1] and len(train[0]) == 4
    c_full, c_half = load_checkpoint(f"{full}/ckpt.pt"), load_checkpoint(f"{half}/ckpt.pt")
    for name in ("model", "ref_model"):  # the reference comes back from the checkpoint, frozen
        for k, v in c_full[name].items():
            assert torch.equal(v, c_half[name][k]), (name, k)
    before = snapshot(refused)
    ckpt = os.path.join(refused, "ckpt.pt")
    with pytest.raises(UserError, match=f"^cannot resume {re.escape(ckpt)}: dpo_beta 0.1 -> 0.2 \\(run-defining"):
        sft_main([*args, "--init_from=resume", f"--out_dir={refused}", "--max_iters=4", "--dpo_beta=0.2"])
    assert snapshot(refused) == before


def test_dpo_ddp_matches_single_process(sft_main, run_sft, read_log, tmp_path):
    # 2 ranks x 2 pairs vs 1 process x 4 pairs, two micro-steps each: the loss divides by the global pair count
    args = [*DPO, "--grad_accum=2", "--learning_rate=3e-3", "--max_iters=3", "--eval_prompts=0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    sft_main([*args, f"--out_dir={one}"])
    run_sft([*args, f"--out_dir={two}"], nproc=2)
    a, b = ([[r[k] for k in ("loss", "chosen", "rejected")] for r in read_log(d, "train")] for d in (one, two))
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)


def test_dpo_bad_input_is_one_line(run_sft, sft_main, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(dict(prompt="Say hi.", chosen="Hi!", rejected="Go away.")) + "\n"
                    + json.dumps(dict(prompt="Say hi.", chosen="Hi!")) + "\n")
    proc = run_sft([f"--data={path}", "--objective=dpo", f"--out_dir={tmp_path / 'out'}"], check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"error: {path}:2: missing key 'rejected'; "
                                                                 f"a preference pair is {{\"prompt\", \"chosen\", "
                                                                 f"\"rejected\"}} or {{\"chosen\", \"rejected\"}}; "
                                                                 f"got keys ['chosen', 'prompt']"]
    assert not os.path.exists(tmp_path / "out")
    for args, message in ((["--data=sft", "--objective=dpo"], "--objective=dpo --data=sft: DPO and IPO train on"),
                          ([*DPO, "--sft_kl_coef=0.1"], "--sft_kl_coef=0.1 --objective=dpo: DPO's reference"),
                          ([*DPO, "--objective=ipo", "--dpo_label_smoothing=0.1"], "--dpo_label_smoothing=0.1: "),
                          ([*DPO, "--dpo_beta=0"], "--dpo_beta=0")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            sft_main([*args, f"--out_dir={tmp_path / 'x'}"])
    assert not os.path.exists(tmp_path / "x")
