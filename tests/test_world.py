import hashlib
import os
import re
import time

import pytest

from nanopost import world as wm
from nanopost.world import TASK_PHRASINGS, encode_doc, load_world, parse_target, verify, write_world


def _hash_dir(d):
    h = hashlib.sha256()
    for name in sorted(os.listdir(d)):
        h.update(name.encode())
        with open(os.path.join(d, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def test_determinism(tmp_path):
    write_world(str(tmp_path / "a"), seed=0)
    t0 = time.time()
    fresh = wm.World(0)  # uncached build, timed
    assert time.time() - t0 < 10.0  # ~0.3 s on an idle core; generous so a loaded CI box does not flake
    assert fresh.pretrain == load_world(0).pretrain
    write_world(str(tmp_path / "b"), seed=0)
    write_world(str(tmp_path / "c"), seed=1)
    assert sorted(os.listdir(tmp_path / "a")) == sorted(
        ["pretrain.jsonl", "sft_train.jsonl", "sft_val.jsonl", "ppo_prompts.jsonl", "eval_prompts.jsonl"] +
        [f"heldout_{s}.jsonl" for s in wm.SKILLS])
    assert _hash_dir(tmp_path / "a") == _hash_dir(tmp_path / "b")
    assert _hash_dir(tmp_path / "a") != _hash_dir(tmp_path / "c")
    assert load_world(0) is load_world(0)  # cached


def test_shape(world):
    assert world.skills == ["facts", "arithmetic", "stories", "chat"]
    for s in world.skills:
        assert len(world.pretrain[s]) >= 1000 and 100 <= len(world.heldout[s]) <= 300, s
        for d in world.pretrain[s][:50] + world.heldout[s][:50]:
            assert isinstance(d, str) or (set(d) == {"prompt", "completion"}), d
    assert all(isinstance(d, dict) for d in world.pretrain["chat"] + world.heldout["chat"])
    assert set(world.probes) == {"facts", "arithmetic"}
    assert len({p["name"] for p in world.people}) == len(world.people) == wm.N_PEOPLE


def test_heldout_disjoint_from_train(world):
    def key(d):
        return d if isinstance(d, str) else (d["prompt"], d["completion"])

    for s in world.skills:
        train = {key(d) for d in world.pretrain[s]}
        held = [key(d) for d in world.heldout[s]]
        assert len(set(held)) == len(held), s
        assert not train & set(held), s
    # arithmetic: no held-out operand pair (in either order) appears in any train equation of any skill
    held_add = {tuple(p) for p in world.pairs["add_heldout"]}
    held_sub = {tuple(p) for p in world.pairs["sub_heldout"]}
    train_text = "\n".join(wm.doc_text(d) for s in world.skills for d in world.pretrain[s])
    equations = re.findall(r"(?<!\d)(\d+)([+-])(\d+)=", train_text)
    assert len(equations) > 10_000
    for a, op, b in equations:
        a, b = int(a), int(b)
        if op == "+":
            assert (min(a, b), max(a, b)) not in held_add, (a, b)
        else:
            assert (a, b) not in held_sub, (a, b)
    # arithmetic probes use held-out pairs, and are correct
    train_eqs = {(int(a), op, int(b)) for a, op, b in equations}
    for prompt, completion in world.probes["arithmetic"]:
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
        assert (int(a), op, int(b)) not in train_eqs and (int(b), op, int(a)) not in train_eqs
        assert str(eval(prompt[:-1])) == completion  # noqa: S307 (our own digits-and-operator strings)
    # facts probes are true facts that occur in training
    for prompt, completion in world.probes["facts"]:
        assert prompt + completion + "." in train_text


def test_task_not_in_pretraining(world):
    docs = [d for s in world.skills for d in world.pretrain[s] + world.heldout[s]]
    text = "\n".join(wm.doc_text(d) for d in docs)
    for ph in TASK_PHRASINGS:
        assert re.search(re.escape(ph).replace(re.escape("{N}"), r"\d+"), text) is None, ph
    for d in docs:
        if isinstance(d, dict):
            with pytest.raises(ValueError):
                parse_target(d["prompt"])


def test_heldout_shares_nothing_with_the_new_task(world):
    # the forgetting measure must not score the new task: no held-out document of any skill holds a task phrasing
    # or an addition "a+b=c" (the task's answer form; the demonstrator's "N+0=N" is one)
    addition = re.compile(r"\d+\+\d+=\d+")
    for skill in world.skills:
        for doc in world.heldout[skill]:
            text = wm.doc_text(doc)
            assert not addition.search(text), (skill, text)
            assert not any(re.search(re.escape(p).replace(re.escape("{N}"), r"\d+"), text) for p in TASK_PHRASINGS)
            assert wm.task_free(text)
    # the check itself: each task phrasing and answer form is caught, a subtraction is not
    for p in TASK_PHRASINGS:
        assert not wm.task_free("Question: " + p.format(N=42) + " Answer:")
    assert not wm.task_free("28+0=28") and not wm.task_free("Find two numbers whose sum is 9.\n4+5=9")
    assert wm.task_free("What is 40-17?\n40-17=23") and wm.task_free("Zorvan lives in Kelmar.")


def test_task_splits(world):
    assert set(world.train_targets).isdisjoint(world.eval_targets)
    assert set(world.train_targets) | set(world.eval_targets) == set(range(10, 100))
    assert len(world.eval_targets) == 18  # a fifth of 10..99
    ppo_n = {parse_target(p) for p in world.ppo_prompts}
    sft_n = {parse_target(d["prompt"]) for d in world.sft_train + world.sft_val}
    eval_n = {parse_target(p) for p in world.eval_prompts}
    assert ppo_n == set(world.train_targets) and sft_n <= set(world.train_targets)
    assert eval_n == set(world.eval_targets)
    assert not set(world.eval_prompts) & set(world.ppo_prompts)
    assert not {d["prompt"] for d in world.sft_val} & {d["prompt"] for d in world.sft_train}
    assert len({parse_target(d["prompt"]) for d in world.sft_val}) == 8  # whole targets held out, every phrasing
    assert not {parse_target(d["prompt"]) for d in world.sft_val} & {parse_target(d["prompt"]) for d in world.sft_train}
    assert all(isinstance(p, str) for p in world.ppo_prompts + world.eval_prompts)
    # every phrasing is used for PPO and eval
    for ph in range(len(TASK_PHRASINGS)):
        assert any(p == wm.task_prompt(n, ph) for p in world.eval_prompts for n in world.eval_targets)


def test_demonstrator_valid_and_narrow(world):
    for d in world.sft_train + world.sft_val:
        r = verify(d["prompt"], d["completion"], ended=True)
        assert r["valid"] and r["score"] == 1.0, d
        n = parse_target(d["prompt"])
        assert d["completion"] == f"{n}+0={n}"  # one fixed style


@pytest.mark.parametrize("ph", range(len(TASK_PHRASINGS)))
def test_verify_each_phrasing(ph):
    prompt = wm.task_prompt(37, ph)
    assert parse_target(prompt) == 37
    assert verify(prompt, "30+7=37", True)["valid"]
    assert verify(prompt, "0+37=37", True)["valid"]
    assert verify(prompt, "37+0=37", True)["valid"]
    assert not verify(prompt, "30+8=38", True)["valid"]  # right sum, wrong target


@pytest.mark.parametrize("response,valid,well_formed,answer", [
    ("12+5=17", True, True, "12+5=17"),
    ("  12+5=17\n", True, True, "12+5=17"),    # surrounding whitespace is ignored
    ("17+0=17", True, True, "17+0=17"),
    ("12+6=17", False, True, "12+6=17"),       # wrong sum
    ("12+6=18", False, True, "12+6=18"),       # right sum, wrong N
    ("012+5=17", False, True, "12+5=17"),      # leading zero
    ("12+05=17", False, True, "12+5=17"),
    ("12+5=017", False, True, "12+5=17"),
    ("00+17=17", False, True, "0+17=17"),
    ("12+5=17.", False, False, None),          # trailing junk
    ("12+5=17 12+5=17", False, False, None),
    ("The answer is 12+5=17", False, False, None),
    ("12 + 5 = 17", False, False, None),
    ("20-3=17", False, False, None),           # a subtraction is not an addition
    ("-3+20=17", False, False, None),
    ("12+5", False, False, None),
    ("", False, False, None),
    ("1.5+15.5=17", False, False, None),
    ("１２+5=17", False, False, None),           # full-width digits are not ASCII digits
])
def test_verify_cases(response, valid, well_formed, answer):
    prompt = "Write an addition that equals 17."
    r = verify(prompt, response, ended=True)
    assert r == dict(valid=valid, well_formed=well_formed, ended=True, answer=answer, score=float(valid))


def test_verify_not_ended(world):
    r = verify("Write an addition that equals 17.", "12+5=17", ended=False)
    assert r["valid"] and not r["ended"] and r["score"] == 0.0
    assert world.score("Write an addition that equals 17.", "12+5=17", True) == 1.0
    assert world.score("Write an addition that equals 17.", "12+5=17", False) == 0.0


@pytest.mark.parametrize("prompt", ["What is 2+2?", "Write an addition that equals seventeen.", "",
                                    "Write an addition that equals 17", "Write a subtraction that equals 17."])
def test_verify_unparseable_prompt(prompt):
    with pytest.raises(ValueError, match="not a task prompt"):
        verify(prompt, "12+5=17", True)


def test_valid_answers_count():
    # exactly N+1 valid answers per target
    prompt = "Give two numbers that add up to 12."
    valid = {f"{a}+{b}=12" for a in range(0, 30) for b in range(0, 30) if verify(prompt, f"{a}+{b}=12", True)["valid"]}
    assert len(valid) == 13


def test_encode_doc(world, tok):
    text = world.pretrain["facts"][0]
    assert encode_doc(tok, text) == tok.encode(text) + [tok.eot_id]
    chat = world.pretrain["chat"][0]
    assert encode_doc(tok, chat) == tok.encode_prompt(chat["prompt"]) + tok.encode_response(chat["completion"])
    with pytest.raises(TypeError):
        encode_doc(tok, 3)


def test_corpus_size(world, tok):
    n = sum(len(encode_doc(tok, d)) for s in world.skills for d in world.pretrain[s])
    assert 400_000 < n < 1_000_000, n

