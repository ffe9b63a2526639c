"""
Preference pairs for a reward model or DPO: your file, or the built-in world's simulated labeler; their batches; and
the Bradley-Terry loss (train_sft.py --data=prefs or --data=PAIRS.jsonl trains on them; DPO: nanopost.dpo).

Your data (load_preferences), a .jsonl or a .json array, gzipped or not (HH-RLHF's *.jsonl.gz is read as it is):
  explicit prompt  {"prompt": str | [messages ending with a user turn],
                    "chosen": str | [one assistant message], "rejected": str | [one assistant message]}
  implicit prompt  {"chosen": transcript, "rejected": transcript}: two whole conversations that differ only in the
                   last assistant turn, as HH-RLHF strings ("\n\nHuman: ...\n\nAssistant: ...") or message lists;
                   the shared prompt is everything before that turn (TRL's two preference formats)
Strict like nanopost.data: every problem is "path:LINE: what is wrong"; a pair whose chosen equals its rejected is
an error (it teaches nothing and usually means a broken export); keys nanopost does not use are warned about once.
An empty response is allowed: four HH-RLHF test pairs prefer (or reject) saying nothing at all.

The built-in world's preferences (world_preferences): a simulated labeler compares two responses to a task prompt.
Its hidden score is the verifier's 0/1 plus a deliberate bias a real labeler might have, a taste for longer answers
(labeler_score), and it picks A over B with the Bradley-Terry probability sigmoid(BETA * (s_A - s_B)) (Bradley &
Terry 1952; the labeler model of Christiano et al. 2017). The responses are samples of the policy the reward model
starts from and programmatic ones from the task's answer space (synthetic_response): valid answers and near misses.
The reward model so learns a proxy of the verifier, which stays the gold reward (nanopost.studies.overopt measures the gap).
"""

import collections
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanopost.config import UserError
from nanopost.data import (_array_records, _check_turns, _messages, _open, _records, _text, _warn_ignored,
                           is_json_array)
from nanopost.rollout import rollout


@dataclass
class Pair:
    prompt: list            # [(role, content), ...] ending with a user turn
    chosen: str             # the preferred response (the last assistant turn), may be ""
    rejected: str
    chosen_ended: bool = True   # the response ended (gets <|endoftext|>); a policy sample cut at the limit did not
    rejected_ended: bool = True
    decided: bool = True    # built-in labeler: |s_A - s_B| >= DECIDED_MARGIN; always True for your data


# -----------------------------------------------------------------------------
# your preference pairs

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_turns(path, lineno, text, what):
    """An HH-RLHF transcript "\n\nHuman: q\n\nAssistant: a ..." -> [(role, content), ...] (content stripped).
    Two turns of one role in a row (8 of the 2,312 HH-RLHF harmless test pairs) are read as one turn."""
    parts = _HH_TURN.split(text)  # [before, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3:
        raise UserError(f"{path}:{lineno}: {what} must start with {HUMAN!r} (an HH-RLHF transcript), "
                        f"got {text[:40]!r}")
    turns = []
    for role, content in zip(parts[1::2], parts[2::2]):
        role = "user" if role == "Human" else "assistant"
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + content.strip())
        else:
            turns.append((role, content.strip()))
    return turns


def _split_hh(path, lineno, chosen, rejected):
    """Two HH transcripts -> (shared prompt turns, chosen response, rejected response): the prompt ends at the
    last "\n\nAssistant:" inside their common prefix, the responses are what follows it in each. Two transcripts
    that part before their last assistant turn (1 of the 2,312 HH-RLHF harmless test pairs) keep the later turns
    inside the responses, as text: the pair still says which continuation is preferred (TRL's extract_prompt)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)
    if cut < 0:
        raise UserError(f"{path}:{lineno}: chosen and rejected share no prompt ending with {ASSISTANT!r}; "
                        f"an implicit-prompt pair is two transcripts that differ only in the last assistant turn")
    responses = chosen[cut + len(ASSISTANT):], rejected[cut + len(ASSISTANT):]
    prompt = hh_turns(path, lineno, chosen[:cut], "chosen")
    return _check_turns(path, lineno, prompt, "user"), responses[0].strip(), responses[1].strip()


def _split_messages(path, lineno, chosen, rejected, ignored):
    """Two message lists -> (shared prompt turns, chosen response, rejected response)."""
    c = _messages(path, lineno, chosen, "chosen", ignored)
    r = _messages(path, lineno, rejected, "rejected", ignored)
    if len(c) != len(r) or c[:-1] != r[:-1]:
        raise UserError(f"{path}:{lineno}: chosen and rejected must share every turn but the last (the prompt)")
    for turns in (c, r):
        _check_turns(path, lineno, turns, "assistant")
    return c[:-1], c[-1][1], r[-1][1]


def _response(path, lineno, value, what, ignored):
    """An explicit-prompt response: a string, or a list of one assistant message."""
    if isinstance(value, str):
        return value
    turns = _messages(path, lineno, value, what, ignored)
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise UserError(f"{path}:{lineno}: {what} must be a string or one assistant message, got roles "
                        f"{[r for r, _ in turns]}")
    return turns[0][1]


def _pair(path, lineno, obj, ignored):
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise UserError(f"{path}:{lineno}: missing key {key!r}; a preference pair is {{\"prompt\", \"chosen\", "
                            f"\"rejected\"}} or {{\"chosen\", \"rejected\"}}; got keys {sorted(obj)}")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if "prompt" in obj:
        prompt = obj["prompt"]
        turns = ([("user", _text(path, lineno, prompt, "prompt"))] if not isinstance(prompt, list)
                 else _check_turns(path, lineno, _messages(path, lineno, prompt, "prompt", ignored), "user"))
        pair = (turns, _response(path, lineno, chosen, "chosen", ignored),
                _response(path, lineno, rejected, "rejected", ignored))
    elif isinstance(chosen, str) and isinstance(rejected, str):
        pair = _split_hh(path, lineno, chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        pair = _split_messages(path, lineno, chosen, rejected, ignored)
    else:
        raise UserError(f"{path}:{lineno}: chosen and rejected must both be strings (HH transcripts) or both "
                        f"message lists, got {type(chosen).__name__} and {type(rejected).__name__}")
    if pair[1] == pair[2]:
        raise UserError(f"{path}:{lineno}: chosen and rejected are the same response ({pair[1][:60]!r}): the pair "
                        f"prefers nothing")
    ignored.update(set(obj) - {"prompt", "chosen", "rejected"})
    return Pair(*pair)


def load_preferences(path):
    """Preference pairs from a .jsonl, a .json array, or either gzipped -> [Pair]. See the module docstring."""
    records = _array_records(path) if is_json_array(path) else _records(path)
    ignored = collections.Counter()
    pairs = [_pair(path, lineno, obj, ignored) for lineno, obj in records]
    if not pairs:
        raise UserError(f"{path}: no records")
    _warn_ignored(path, ignored)
    return pairs


def is_preferences(path):
    """A data file whose first record has "chosen": preference pairs, for a reward model."""
    try:
        first = next(iter(_array_records(path) if is_json_array(path) else _first_line(path)), (0, {}))[1]
    except UserError:
        return False  # not readable as records: let the loader that owns the format report it
    return "chosen" in first


def _first_line(path):
    try:
        with _open(path, "rt", encoding="utf-8", errors="replace") as f:
            yield 1, json.loads(f.readline())
    except (OSError, ValueError):
        return


def pairs_hash(pairs):
    """sha256 of the pairs' contents: a resume must train on the same pairs."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected, p.chosen_ended, p.rejected_ended]).encode())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# batches and the loss

def encode_pair(tok, pair, block_size):
    """-> (chosen ids, rejected ids, (n chosen, n rejected) response tokens kept, truncated): prompt + response
    (+ <|endoftext|> if it ended). A sequence longer than the context keeps its last block_size tokens: the reward
    is read at the end, which must stay; the oldest prompt tokens go first."""
    prompt = tok.encode_prompt(pair.prompt)
    responses = [tok.encode(r) + ([tok.eot_id] if ended else [])
                 for r, ended in ((pair.chosen, pair.chosen_ended), (pair.rejected, pair.rejected_ended))]
    truncated = any(len(prompt) + len(r) > block_size for r in responses)
    return ((prompt + responses[0])[-block_size:], (prompt + responses[1])[-block_size:],
            tuple(min(len(r), block_size) for r in responses), truncated)


def collate_pairs(examples, pad_id):
    """[(chosen ids, rejected ids)] -> X (B, 2, T) long right-padded with pad_id, M (B, 2, T) bool real tokens.
    Row [:, 0] is the chosen response, [:, 1] the rejected one: slicing pairs keeps both sides together."""
    T = max(len(ids) for ex in examples for ids in ex[:2])
    X = torch.full((len(examples), 2, T), pad_id, dtype=torch.long)  # (B, 2, T)
    M = torch.zeros((len(examples), 2, T), dtype=torch.bool)          # (B, 2, T)
    for i, ex in enumerate(examples):
        for j in range(2):
            X[i, j, :len(ex[j])] = torch.tensor(ex[j])
            M[i, j, :len(ex[j])] = True
    return X, M


def response_mask(examples, M):
    """(B, 2, T) bool: each side's response tokens, which DPO scores (nanopost.dpo): the last n_response of its real
    tokens M (B, 2, T), counted from the end because a pair longer than the context lost its oldest prompt tokens."""
    n_real = M.sum(-1, keepdim=True)                                               # (B, 2, 1)
    n_response = torch.tensor([ex[2] for ex in examples]).view(-1, 2, 1)           # (B, 2, 1)
    return M & (torch.arange(M.size(-1)) >= n_real - n_response)                   # (B, 2, T)


def pair_rewards(model, X, M):
    """A RewardModel's rewards of a pair batch, in one forward of all 2B sequences -> (B, 2)."""
    return model(X.flatten(0, 1), attention_mask=M.flatten(0, 1)).view(X.size(0), 2)


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(r_chosen - r_rejected) per pair: the negative log-likelihood of the label under the
    Bradley-Terry model P(chosen > rejected) = sigmoid(r_c - r_r) (Stiennon et al. 2020 eq. 1; Ouyang et al. 2022).
    Gradient: d/dr_c = -sigmoid(r_r - r_c) = -(1 - P), d/dr_r = +(1 - P): pairs already ranked right by a wide
    margin push little. logsigmoid, not log(sigmoid()): finite where sigmoid rounds to 0."""
    return -F.logsigmoid(r_chosen - r_rejected)


@torch.no_grad()
def pair_metrics(model, examples, decided, batch_size, pad_id, device):
    """Held-out Bradley-Terry loss, pairwise accuracy (chosen scored higher), and the accuracy on the pairs the
    labeler decided by its hidden score (built-in world; all pairs for your data)."""
    loss, right = [], []
    for i in range(0, len(examples), batch_size):
        X, M = collate_pairs(examples[i:i + batch_size], pad_id)
        r = pair_rewards(model, X.to(device), M.to(device)).float()  # (b, 2)
        loss.append(bradley_terry_loss(r[:, 0], r[:, 1]))
        right.append(r[:, 0] > r[:, 1])
    loss, right = torch.cat(loss), torch.cat(right).float()
    decided = torch.tensor(decided, dtype=torch.bool, device=right.device)
    return dict(val_loss=loss.mean().item(), acc=right.mean().item(),
                acc_decided=right[decided].mean().item() if decided.any() else float("nan"))


# -----------------------------------------------------------------------------
# the built-in world's labeler

# The labeler's bias: up to +LENGTH_TASTE for an answer of LENGTH_CAP characters or more (valid answers are 6 to 8).
# Below 1 on purpose: between a valid and an invalid answer the hidden score still prefers the valid one, so the
# labeler is a fair judge of the task; but between two invalid answers (or two valid ones) it likes the longer, and
# a reward model learns length as a feature that a policy can push far past anything a labeler compared.
LENGTH_TASTE = 0.6
LENGTH_CAP = 24
BETA = 5.0             # Bradley-Terry sharpness: a score gap of 1 (valid vs invalid) is chosen right 99.3% of the time
DECIDED_MARGIN = 0.5   # |s_A - s_B| at least this: P(the higher one chosen) >= 92%; "decided by the hidden score"
POLICY_SHARE = 0.5     # each side of a pair is a policy sample with this probability, else a synthetic answer
SAMPLES_PER_PROMPT = 4


def labeler_score(world, prompt, response, ended):
    """The simulated labeler's hidden score: the verifier's 0/1 plus its taste for longer answers."""
    return world.score(prompt, response, ended) + LENGTH_TASTE * min(len(response.strip()), LENGTH_CAP) / LENGTH_CAP


def synthetic_response(rng, n, chat_answers):
    """A programmatic answer to "an addition that equals n": valid ones in several styles and the near misses a
    labeler sees (wrong sums, subtractions, extra words around a valid answer, other chat answers)."""
    a = rng.randint(0, n)
    valid = f"{a}+{n - a}={n}"
    kind = rng.choice(["valid", "valid", "demo", "wrong_sum", "other_target", "subtraction", "decorated", "repeat",
                       "chat"])
    if kind == "valid":
        return valid
    if kind == "demo":
        return f"{n}+0={n}"
    if kind == "wrong_sum":
        return f"{a}+{max(n - a + rng.choice([-3, -2, -1, 1, 2, 3]), 0)}={n}"
    if kind == "other_target":
        b = rng.randint(0, 59)
        return f"{a}+{b}={a + b}" if a + b != n else f"{a}+{b + 1}={a + b + 1}"
    if kind == "subtraction":
        b = rng.randint(1, 40)
        return f"{n + b}-{b}={n}"
    if kind == "decorated":
        return rng.choice([f"{valid}.", f"The answer is {valid}.", f"{valid} and {n - a}+{a}={n}", f"Sure: {valid}",
                           f"{valid}, since {a} plus {n - a} is {n}."])
    if kind == "repeat":
        return " ".join([valid] * rng.randint(2, 3))
    return rng.choice(chat_answers)


def sample_responses(lm, tok, prompts, k, max_new_tokens, seed, device, batch_size=128):
    """k samples of lm per prompt at temperature 1 -> {prompt: [(response, ended), ...]} (its own generator:
    the global RNG that training replays on resume is untouched)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    todo = [p for p in prompts for _ in range(k)]
    out = collections.defaultdict(list)
    lm.eval()
    for i in range(0, len(todo), batch_size):
        ro = rollout(lm, tok, todo[i:i + batch_size], max_new_tokens, generator=gen)
        for p, r, e in zip(ro.prompts, ro.responses, ro.ended.tolist()):
            out[p].append((r, e))
    return out


def label(world, rng, prompt, a, b):
    """The labeler's choice between responses a and b, each (text, ended) -> Pair."""
    sa, sb = (labeler_score(world, prompt, *x) for x in (a, b))
    a_wins = rng.random() < 1.0 / (1.0 + math.exp(-BETA * (sa - sb)))
    (chosen, chosen_ended), (rejected, rejected_ended) = (a, b) if a_wins else (b, a)
    return Pair([("user", prompt)], chosen, rejected, chosen_ended, rejected_ended,
                decided=abs(sa - sb) >= DECIDED_MARGIN)


def world_preferences(world, tok, lm, n_pairs, prompts, seed, max_new_tokens, device):
    """n_pairs labeled pairs on the given task prompts. lm: the policy whose samples the labeler compares
    (the checkpoint the reward model starts from), or None for synthetic answers only. Deterministic in seed."""
    rng = random.Random(f"nanopost-prefs:{seed}")
    samples = (sample_responses(lm, tok, prompts, SAMPLES_PER_PROMPT, max_new_tokens, seed, device)
               if lm is not None else {})
    chat_answers = sorted({d["completion"] for d in world.pretrain["chat"] if isinstance(d, dict)})
    pairs = []
    while len(pairs) < n_pairs:
        prompt = rng.choice(prompts)
        n = world.parse_target(prompt)

        def draw():
            if samples and rng.random() < POLICY_SHARE:
                return rng.choice(samples[prompt])
            return synthetic_response(rng, n, chat_answers), True

        a, b = draw(), draw()
        if a != b:
            pairs.append(label(world, rng, prompt, a, b))
    return pairs
