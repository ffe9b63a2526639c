"""
The built-in task world: a small, made-up, fully deterministic universe that the whole experiment runs in.

Why a synthetic world: the question nanopost measures (does SFT on narrow demonstrations collapse output
diversity and erode pretraining skills, and does PPO with a KL anchor avoid that?) needs
  1. a base model with several *measurable* pretraining skills (held-out loss per skill, greedy probes),
  2. a NEW task with many valid answers per prompt and an exact verifier (reward, accuracy, diversity),
  3. everything small enough to pretrain, fine-tune and evaluate on 2 CPU cores in minutes, with no downloads.

Pretraining skills (w.skills), each with a train split (w.pretrain) and a held-out split (w.heldout) that
never shares a document with train:
  facts       paragraphs of fact sentences about made-up people ("Zorvan lives in Kelmar. Zorvan likes green.")
              held-out: new paragraphs (same facts, new orders/combinations). probes: ("Zorvan lives in", " Kelmar")
  arithmetic  lines of equations "23+19=42", "40-17=23" (operands 0..59) and "Ways to make 17: 9+8=17, ..." docs.
              held-out: equations whose operand pair never appears anywhere in train. probes: ("23+19=", "42")
  stories     templated short stories about the people, their pets and cities. held-out: new stories (loss only)
  chat        chat-format docs dict(prompt, completion): "What is 23+19?" -> "23+19=42", "Add 23 and 19.",
              "Write the addition of 23 and 19.", "What is 40 minus 17?", "Write an addition." -> any true
              "a+b=c", "Is 23+19=42 an addition or a subtraction?", fact questions ("Where does Zorvan live?"),
              "Find two numbers whose sum is 17." -> a random valid "a+b=17" and "Find two numbers whose
              difference is 17." -> a random valid "a-b=17". They teach the base the chat format, the words
              for "+", and to copy a target number from the prompt into an equation, so that on the new task
              the base already produces some valid answers (PPO needs non-zero reward at the start).
              Deliberately no "Write a subtraction that equals N.": the base then answered the new task's
              "Write an addition that equals N." with subtractions, the nearest wording it had seen.
              held-out: questions on held-out operand pairs, 20% of the (person, attribute) questions (the
              facts themselves stay in the facts paragraphs) and sum/difference answers from held-out pairs.

The NEW task (never in pretraining): "Write an addition that equals N." (and two other phrasings, TASK_PHRASINGS),
N in 10..99. Any "a+b=N" with non-negative a, b written without leading zeros is valid: N+1 valid answers.
  - a seeded random 20% of the N's are held out: they appear only in w.eval_prompts (unseen targets).
  - w.sft_train: the NARROW demonstrator, always "{N}+0={N}", on every phrasing of the training N's but 8:
    one answer in one style out of N+1 valid ones, and one SFT can fit exactly, also for the held-out N's.
  - w.sft_val: the same demonstrator on those 8 training N's (SFT's validation loss). Neither SFT nor PPO
    (w.ppo_prompts: every phrasing of the training N's) ever sees an eval N. SFT and PPO see the same
    phrasings, so held-out accuracy compares them on the same thing: unseen targets. (An earlier version held
    phrasing 2 out of SFT only; SFT then answered "Make 14 by adding two numbers." with "14+0=13" half the
    time, which measured paraphrase transfer, not the task.)
  - pretraining ("Ways to make N", equations) covers every N, eval N's included: that is knowledge the base
    brings along; what eval measures is whether the post-trained *behavior* carries over to unseen targets.
Other seeds give other people, facts, pairs and documents; the shipped tokenizer is trained on seed 0, so their
names may take a token or two more.

write_world(out_dir, seed) writes the world as JSONL files; its SFT conversations and prompts are in the formats
nanopost.data reads.
"""

import functools
import json
import os
import random
import re


# -----------------------------------------------------------------------------
# sizes (documents per skill). Chosen so that the train split is ~0.5M tokens under the 1024-token
# nanopost BPE: enough to teach a ~1M-parameter GPT every skill, small enough to pretrain on 2 CPU cores.

N_PEOPLE = 64             # 64 people x 4 attributes = 256 facts, each seen ~85 times in the facts paragraphs
MAX_OPERAND = 59          # equations use operands 0..59: 1830 unordered addition pairs, 1830 subtraction pairs
HELDOUT_PAIR_FRAC = 0.1   # fraction of operand pairs reserved for held-out arithmetic (never in any train doc)
HELDOUT_QUESTION_FRAC = 0.2  # fraction of (person, attribute) chat questions reserved for held-out chat
N_TRAIN_DOCS = dict(facts=4000, arithmetic=2500, stories=2400, chat=8000)
N_HELDOUT_DOCS = 200      # per skill: enough for a stable mean loss, cheap to evaluate on CPU
N_ARITH_PROBES = 200      # greedy probes on held-out equations (100 additions, 100 subtractions)
TASK_MIN_N, TASK_MAX_N = 10, 99
# a random fifth of the targets is eval-only. Not N % 5 == 0: then no training answer ever ends in 0 or 5, and a
# small model that learned to copy N still never writes those digits there (0% on every held-out prompt)
EVAL_FRAC = 0.2

# The new task's phrasings. The verifier parses N from any of them; none of them appears in pretraining.
TASK_PHRASINGS = (
    "Write an addition that equals {N}.",
    "Give two numbers that add up to {N}.",
    "Make {N} by adding two numbers.",
)
SFT_VAL_TARGETS = 8  # training targets whose demonstrations are SFT's validation split, not its training data
SKILLS = ["facts", "arithmetic", "stories", "chat"]

# -----------------------------------------------------------------------------
# vocabulary of the world. Fixed tables; the seed chooses which combinations exist and who has what.

PERSON_HEADS = ["zor", "ka", "li", "mer", "tho", "ven", "sa", "dru", "fel", "ni", "bra", "quo", "yel", "ri",
                "gan", "ol", "pim", "esk"]
PERSON_TAILS = ["van", "ra", "dun", "mir", "sel", "tek", "ba", "lo", "nis", "dra", "wen", "ko", "zu", "phin"]
CITY_HEADS = ["Kel", "Bar", "Ost", "Vel", "Mor", "Tam", "Sil", "Dre", "Hap", "Nor", "Ul", "Fen", "Crag", "Lun"]
CITY_TAILS = ["mar", "dor", "heim", "wick", "vale", "port", "ford", "mere", "holt", "gard"]
N_CITIES = 12
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown", "gray", "silver"]
PETS = ["cat", "dog", "fox", "goat", "hen", "frog", "rabbit", "parrot", "turtle", "pony", "lizard", "hamster"]
JOBS = ["baker", "painter", "farmer", "sailor", "teacher", "miner", "tailor", "doctor", "potter", "singer",
        "weaver", "fisher"]
ATTRIBUTES = ["city", "color", "pet", "job"]
# fact sentence = prefix + " " + value + "."; the probe prompt is the prefix, the expected completion " value"
# (a leading-space word is one pre-token, so prompt and completion tokenize the same apart as together).
FACT_PREFIX = dict(city="{name} lives in", color="{name} likes", pet="{name} has a", job="{name} works as a")
OPERAND_QUESTIONS = {"+": ["Add {a} and {b}.", "Write the addition of {a} and {b}.", "What is the sum of {a} and {b}?",
                           "Find {a} plus {b}."],
                     "-": ["Subtract {b} from {a}.", "Write the subtraction of {b} from {a}.",
                           "What is {a} minus {b}?", "Find {a} minus {b}."]}
FACT_QUESTION = dict(city="Where does {name} live?", color="What color does {name} like?",
                     pet="What pet does {name} have?", job="What is the job of {name}?")

PLACES = ["market", "river", "bridge", "tower", "garden", "harbor", "library", "mill", "forest", "square",
          "bakery", "castle", "meadow", "lake", "station", "temple", "orchard", "workshop", "beach", "hill",
          "fountain", "stable", "lighthouse", "canyon", "vineyard", "quarry", "school", "theater"]
OBJECTS = ["a kite", "a basket of apples", "an old map", "a wooden box", "a letter", "a lantern", "a small boat",
           "a bag of flour", "a broken clock", "a jar of honey", "a blue stone", "a loaf of bread", "a drum",
           "a pair of boots", "a book of songs", "a rope", "a silver key", "a bundle of sticks", "a cake", "a net",
           "a copper kettle", "a feather", "a painted shell", "a sack of grain", "a violin", "a blanket",
           "a compass", "a mirror", "a bucket of paint", "a tiny bell"]
DEEDS = ["painted", "carried", "found", "sold", "fixed", "counted", "hid", "cleaned", "bought", "lost",
         "wrapped", "opened", "dropped", "shared", "measured", "borrowed", "returned", "polished",
         "weighed", "traded", "repaired", "decorated", "guarded", "noticed"]
FEELINGS = ["happy", "tired", "proud", "quiet", "hungry", "calm", "cheerful", "sleepy", "curious", "grateful",
            "worried", "brave", "lonely", "excited", "thoughtful"]
WEATHER = ["The sun was bright.", "It was raining.", "A cold wind blew.", "The sky was gray.",
           "Snow covered the roads.", "The air was warm.", "Fog hid the hills."]
TIMES = ["One morning", "One evening", "Last spring", "On a quiet day", "Early one day", "After lunch",
         "In the autumn", "Late at night"]
PET_ACTIONS = ["ran ahead", "fell asleep", "chased a leaf", "made a loud noise", "found a shiny coin",
               "jumped into the water", "sat by the door", "followed them everywhere"]


def _rng(seed, component):
    # one independent stream per component: resizing one split never reshuffles another.
    # random.Random(str) hashes the string with sha512, so this is stable across processes and platforms.
    return random.Random(f"nanopost-world:{seed}:{component}")


# -----------------------------------------------------------------------------
# the new task: prompts and verifier

# [0-9], not \d: \d also matches other scripts' digits ("１２" full-width), which int() would happily accept
_ANSWER_SHAPE = re.compile(r"([0-9]+)\+([0-9]+)=([0-9]+)")  # the a+b=c shape
_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")                # no leading zeros, no sign
_PROMPT_PATTERNS = [re.compile(re.escape(p).replace(re.escape("{N}"), r"([0-9]+)")) for p in TASK_PHRASINGS]


def task_prompt(n, phrasing=0):
    return TASK_PHRASINGS[phrasing].format(N=n)


def parse_target(prompt):
    """The target N of a task prompt in any of TASK_PHRASINGS (surrounding whitespace ignored)."""
    for pat in _PROMPT_PATTERNS:
        m = pat.fullmatch(prompt.strip())
        if m:
            return int(m.group(1))
    raise ValueError(f"not a task prompt (expected one of {list(TASK_PHRASINGS)}): {prompt!r}")


def verify(prompt, response, ended):
    """
    Check a response to a task prompt. Rules:
      - surrounding whitespace is ignored; anything else around the equation (a period, a second equation,
        words) makes it invalid: the task asks for one equation and we reward exactly that.
      - well_formed: the response is "digits+digits=digits" (leading zeros allowed here).
      - valid: well_formed, a, b, c written without leading zeros, a+b == c and c == N.
      - ended: the model emitted eot before the token limit (a truncated answer is never rewarded).
      - answer: the normalized "a+b=c" (ints re-printed) when well_formed, else None; used to count distinct answers.
      - score: 1.0 if valid and ended else 0.0. No partial credit: a shaped reward (e.g. for well_formed) would be
        easy to hack and would blur the accuracy-vs-diversity picture the experiment is about.
    Raises ValueError if N cannot be parsed from the prompt.
    """
    n = parse_target(prompt)
    m = _ANSWER_SHAPE.fullmatch(response.strip())
    well_formed = m is not None
    answer, valid = None, False
    if well_formed:
        a, b, c = m.groups()
        answer = f"{int(a)}+{int(b)}={int(c)}"
        canonical = all(_CANONICAL_INT.fullmatch(x) for x in (a, b, c))
        valid = canonical and int(a) + int(b) == int(c) == n
    ended = bool(ended)
    return dict(valid=valid, well_formed=well_formed, ended=ended, answer=answer,
                score=1.0 if (valid and ended) else 0.0)


def demonstrate(prompt):
    """The narrow demonstrator: one fixed valid answer per target, always in the same style."""
    n = parse_target(prompt)
    return f"{n}+0={n}"


# -----------------------------------------------------------------------------
# building blocks of the pretraining corpus

def _make_people(seed):
    rng = _rng(seed, "people")
    names = sorted({(h + t).capitalize() for h in PERSON_HEADS for t in PERSON_TAILS})
    names = rng.sample(names, N_PEOPLE)
    cities = rng.sample(sorted({h + t for h in CITY_HEADS for t in CITY_TAILS}), N_CITIES)
    people = []
    for name in names:
        people.append(dict(name=name, city=rng.choice(cities), color=rng.choice(COLORS),
                           pet=rng.choice(PETS), job=rng.choice(JOBS)))
    return people, cities


def _fact_sentence(person, attr):
    return FACT_PREFIX[attr].format(name=person["name"]) + " " + person[attr] + "."


def _split_pairs(seed):
    """Operand pairs for + (unordered, so neither a+b nor b+a of a held-out pair is trained) and - (a >= b)."""
    rng = _rng(seed, "pairs")
    add = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(a, MAX_OPERAND + 1)]
    sub = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(a + 1)]
    rng.shuffle(add)
    rng.shuffle(sub)
    n_add, n_sub = int(len(add) * HELDOUT_PAIR_FRAC), int(len(sub) * HELDOUT_PAIR_FRAC)
    return dict(add_train=sorted(add[n_add:]), add_heldout=sorted(add[:n_add]),
                sub_train=sorted(sub[n_sub:]), sub_heldout=sorted(sub[:n_sub]))


def _equation(rng, add_pairs, sub_pairs):
    if rng.random() < 0.5:
        a, b = rng.choice(add_pairs)
        if rng.random() < 0.5:
            a, b = b, a
        return f"{a}+{b}", str(a + b)
    a, b = rng.choice(sub_pairs)
    return f"{a}-{b}", str(a - b)


def _ways_doc(rng, n, add_train_set):
    # every pair a + (n-a) with both operands in range and the unordered pair not held out
    options = [(a, n - a) for a in range(max(0, n - MAX_OPERAND), min(n, MAX_OPERAND) + 1)
               if (min(a, n - a), max(a, n - a)) in add_train_set]
    assert options, f"no train pair sums to {n}"
    k = min(len(options), rng.randint(2, 5))
    picks = rng.sample(options, k)
    return f"Ways to make {n}: " + ", ".join(f"{a}+{b}={n}" for a, b in picks) + "."


def _story(rng, people):
    a, b = rng.sample(people, 2)
    place, place2 = rng.sample(PLACES, 2)
    obj = rng.choice(OBJECTS)
    s = [f"{rng.choice(TIMES)}, {a['name']} left {a['city']} with the {a['pet']}."]
    middle = [
        rng.choice(WEATHER),
        f"At the {place}, {a['name']} met {b['name']}.",
        f"{b['name']} {rng.choice(DEEDS)} {obj}.",
        f"The {a['pet']} {rng.choice(PET_ACTIONS)}.",
        f"Together they walked to the {place2}.",
        f"{a['name']} gave {rng.choice(OBJECTS)} to {b['name']}.",
        f"Nobody knew why {b['name']} {rng.choice(DEEDS)} {rng.choice(OBJECTS)}.",
        f"{b['name']} told a story about {b['city']}.",
    ]
    s += rng.sample(middle, rng.randint(2, 4))
    s.append(f"In the end, {a['name']} felt {rng.choice(FEELINGS)}.")
    return " ".join(s)


def _difference_is_doc(rng, n, sub_heldout_set, heldout):
    """'Find two numbers whose difference is n.' -> a random valid a-b=n (a up to 99), from the train or held-out
    pairs."""
    options = [(n + b, b) for b in range(TASK_MAX_N - n + 1) if ((n + b, b) in sub_heldout_set) == heldout]
    if not options:
        return None
    a, b = rng.choice(options)
    return dict(prompt=f"Find two numbers whose difference is {n}.", completion=f"{a}-{b}={n}")


def _sum_is_doc(rng, n, add_heldout_set, heldout):
    """'Find two numbers whose sum is n.' -> a random valid a+b=n, from the train or held-out pairs."""
    options = [(a, n - a) for a in range(n + 1) if ((min(a, n - a), max(a, n - a)) in add_heldout_set) == heldout]
    if not options:
        return None
    a, b = rng.choice(options)
    return dict(prompt=f"Find two numbers whose sum is {n}.", completion=f"{a}+{b}={n}")


# -----------------------------------------------------------------------------
# the world

class World:
    """See the module docstring. Build with load_world(seed); treat the result as read-only (it is cached)."""

    def __init__(self, seed=0):
        self.seed = seed
        self.skills = list(SKILLS)
        self.task_phrasings = list(TASK_PHRASINGS)
        self.people, self.cities = _make_people(seed)
        self.pairs = _split_pairs(seed)
        self.pretrain, self.heldout, self.probes = {}, {}, {}
        self._build_facts()
        self._build_arithmetic()
        self._build_stories()
        self._build_chat()
        self._build_task()

    # --- pretraining skills

    def _build_facts(self):
        facts = [_fact_sentence(p, attr) for p in self.people for attr in ATTRIBUTES]

        def paragraph(rng):
            return " ".join(rng.sample(facts, rng.randint(3, 8)))

        rng = _rng(self.seed, "facts")
        self.pretrain["facts"] = [paragraph(rng) for _ in range(N_TRAIN_DOCS["facts"])]
        self.heldout["facts"] = _fresh(lambda: paragraph(rng), set(self.pretrain["facts"]), N_HELDOUT_DOCS)
        self.probes["facts"] = [(FACT_PREFIX[attr].format(name=p["name"]), " " + p[attr])
                                for p in self.people for attr in ATTRIBUTES]

    def _build_arithmetic(self):
        rng = _rng(self.seed, "arithmetic")
        pr = self.pairs
        add_train_set = set(pr["add_train"])

        def lines(add_pairs, sub_pairs):
            return "\n".join("=".join(_equation(rng, add_pairs, sub_pairs)) for _ in range(rng.randint(6, 12)))

        docs = []
        for _ in range(N_TRAIN_DOCS["arithmetic"]):
            if rng.random() < 0.25:
                docs.append(_ways_doc(rng, rng.randint(2, TASK_MAX_N), add_train_set))
            else:
                docs.append(lines(pr["add_train"], pr["sub_train"]))
        self.pretrain["arithmetic"] = docs
        def subtractions():  # held out: no addition, the new task's answer form (see task_free)
            pairs = [rng.choice(pr["sub_heldout"]) for _ in range(rng.randint(6, 12))]
            return "\n".join(f"{a}-{b}={a - b}" for a, b in pairs)
        self.heldout["arithmetic"] = _fresh(subtractions, set(docs), N_HELDOUT_DOCS)
        # probes: held-out pairs only, so a correct probe is skill, not memorization
        add = rng.sample(pr["add_heldout"], N_ARITH_PROBES // 2)
        sub = rng.sample(pr["sub_heldout"], N_ARITH_PROBES // 2)
        self.probes["arithmetic"] = ([(f"{a}+{b}=", str(a + b)) for a, b in add] +
                                     [(f"{a}-{b}=", str(a - b)) for a, b in sub])

    def _build_stories(self):
        rng = _rng(self.seed, "stories")
        docs = [_story(rng, self.people) for _ in range(N_TRAIN_DOCS["stories"])]
        self.pretrain["stories"] = docs
        self.heldout["stories"] = _fresh(lambda: _story(rng, self.people), set(docs), N_HELDOUT_DOCS)

    def _build_chat(self):
        rng = _rng(self.seed, "chat")
        pr = self.pairs
        questions = [(p, attr) for p in self.people for attr in ATTRIBUTES]
        rng.shuffle(questions)
        n_held = int(len(questions) * HELDOUT_QUESTION_FRAC)
        q_heldout, q_train = questions[:n_held], questions[n_held:]
        sub_heldout_set = set(pr["sub_heldout"])
        add_heldout_set = set(pr["add_heldout"])

        def doc(heldout):
            add_pairs = pr["add_heldout" if heldout else "add_train"]
            sub_pairs = pr["sub_heldout" if heldout else "sub_train"]
            r = rng.random()
            if r < 0.2:
                q, ans = _equation(rng, add_pairs, sub_pairs)
                return dict(prompt=f"What is {q}?", completion=f"{q}={ans}")
            if r < 0.3:
                # the words for + and - *before* the symbols (LMs learn "A then B" far better than the reverse):
                # they link "add", "addition", "sum" and "plus" to "+". The operands are given, so this is not the
                # new task. The task's other words ("adding", "add up to", "equals", "Give", "Make") appear nowhere
                # in pretraining; templates carrying them were tried and made the base worse (it answered
                # "Write an addition that equals N." with subtractions, 0.4% right instead of 0.9%).
                q, ans = _equation(rng, add_pairs, sub_pairs)
                a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", q).groups()
                templates = OPERAND_QUESTIONS["+" if op == "+" else "-"]
                return dict(prompt=rng.choice(templates).format(a=a, b=b), completion=f"{q}={ans}")
            if r < 0.4:
                # "Write an addition." -> any true a+b=c: the instruction's first half, without a target. The new
                # task composes it with "... that equals N" (the subtraction docs below), which is how the base
                # can answer it at all before any post-training
                q, ans = _equation(rng, add_pairs, sub_pairs)
                kind = "an addition" if "+" in q else "a subtraction"
                return dict(prompt=f"Write {kind}.", completion=f"{q}={ans}")
            if r < 0.45:
                q, ans = _equation(rng, add_pairs, sub_pairs)
                kind = "an addition" if "+" in q else "a subtraction"
                return dict(prompt=f"Is {q}={ans} an addition or a subtraction?", completion=f"It is {kind}.")
            if r < 0.6:
                p, attr = rng.choice(q_heldout if heldout else q_train)
                return dict(prompt=FACT_QUESTION[attr].format(name=p["name"]), completion=_fact_sentence(p, attr))
            if r < 0.85:
                # the old skill the new task builds on, in other words: a pretrained model has seen "find two
                # numbers whose sum is N" with many different answers, so the base starts with a broad, partly
                # valid distribution on the new task's phrasings (PPO needs non-zero reward at the start)
                while True:
                    d = _sum_is_doc(rng, rng.randint(TASK_MIN_N, TASK_MAX_N), add_heldout_set, heldout)
                    if d is not None:
                        return d
            while True:  # a target with at least one option in the requested split
                d = _difference_is_doc(rng, rng.randint(1, TASK_MAX_N), sub_heldout_set, heldout)
                if d is not None:
                    return d

        docs = [doc(False) for _ in range(N_TRAIN_DOCS["chat"])]
        self.pretrain["chat"] = docs
        seen = {(d["prompt"], d["completion"]) for d in docs}
        held = []
        while len(held) < N_HELDOUT_DOCS:
            d = doc(True)
            if task_free(doc_text(d)) and (d["prompt"], d["completion"]) not in seen:
                seen.add((d["prompt"], d["completion"]))
                held.append(d)
        self.heldout["chat"] = held

    # --- the new task

    def _build_task(self):
        all_n = range(TASK_MIN_N, TASK_MAX_N + 1)
        shuffled = list(all_n)
        _rng(self.seed, "targets").shuffle(shuffled)
        n_eval = int(len(shuffled) * EVAL_FRAC)
        self.eval_targets = sorted(shuffled[:n_eval])
        self.train_targets = sorted(shuffled[n_eval:])
        val = set(_rng(self.seed, "sft_val").sample(self.train_targets, SFT_VAL_TARGETS))

        def demos(targets):
            return [dict(prompt=task_prompt(n, ph), completion=demonstrate(task_prompt(n, ph)))
                    for ph in range(len(TASK_PHRASINGS)) for n in targets]

        self.sft_train = demos([n for n in self.train_targets if n not in val])
        self.sft_val = demos(sorted(val))
        self.ppo_prompts = [task_prompt(n, ph) for ph in range(len(TASK_PHRASINGS)) for n in self.train_targets]
        self.eval_prompts = [task_prompt(n, ph) for ph in range(len(TASK_PHRASINGS)) for n in self.eval_targets]

    # --- API

    def verify(self, prompt, response, ended):
        return verify(prompt, response, ended)

    def score(self, prompt, response, ended):
        """The default reward: 1.0 if the answer is valid and the response ended, else 0.0 (see verify)."""
        return verify(prompt, response, ended)["score"]

    def parse_target(self, prompt):
        return parse_target(prompt)


TASK_TEXT = re.compile("|".join(re.escape(p).replace(re.escape("{N}"), r"\d+") for p in TASK_PHRASINGS)
                       + r"|\d+\+\d+=\d+")


def task_free(text):
    """Whether a text shares nothing with the new task: no task phrasing and no addition "a+b=c" (the task's answer
    form, the demonstrator's "N+0=N" included). Every held-out document is, so forgetting is measured on skills the
    new task neither trains nor tests."""
    return TASK_TEXT.search(text) is None


def _fresh(make, exclude, n, max_tries=100_000):
    """n new distinct documents from make() that are not in exclude (held-out must never appear in train)."""
    out, seen = [], set(exclude)
    for _ in range(max_tries):
        d = make()
        if d not in seen:
            seen.add(d)
            out.append(d)
            if len(out) == n:
                return out
    raise AssertionError(f"could only make {len(out)} of {n} fresh held-out documents")


@functools.lru_cache(maxsize=8)
def load_world(seed=0):
    """The world for a seed, built once per process (shared object: do not mutate)."""
    return World(seed)


def encode_doc(tok, doc):
    """A pretraining document as token ids: plain text ends with eot; a chat doc uses the chat format."""
    if isinstance(doc, str):
        return tok.encode(doc) + [tok.eot_id]
    if isinstance(doc, dict):
        return tok.encode_prompt(doc["prompt"]) + tok.encode_response(doc["completion"])
    raise TypeError(f"a document is a str or a dict(prompt, completion), got {type(doc).__name__}")


def doc_text(doc):
    """The raw text of a document (for tokenizer training and inspection)."""
    return doc if isinstance(doc, str) else doc["prompt"] + "\n" + doc["completion"]


# -----------------------------------------------------------------------------
# JSONL export (the same files can be loaded back with nanopost.data)

def _doc_record(skill, doc):
    if isinstance(doc, str):
        return dict(skill=skill, text=doc)
    return dict(skill=skill, prompt=doc["prompt"], completion=doc["completion"])


def _write_jsonl(path, records):
    # ensure_ascii=False + fixed key order + "\n" line ends: identical bytes for an identical world
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_world(out_dir, seed=0):
    """Write the world as JSONL files into out_dir; returns the list of paths written."""
    w = load_world(seed)
    os.makedirs(out_dir, exist_ok=True)
    files = {"pretrain.jsonl": [_doc_record(s, d) for s in w.skills for d in w.pretrain[s]]}
    for s in w.skills:
        files[f"heldout_{s}.jsonl"] = [_doc_record(s, d) for d in w.heldout[s]]
    files["sft_train.jsonl"] = [dict(prompt=d["prompt"], completion=d["completion"]) for d in w.sft_train]
    files["sft_val.jsonl"] = [dict(prompt=d["prompt"], completion=d["completion"]) for d in w.sft_val]
    files["ppo_prompts.jsonl"] = [dict(prompt=p) for p in w.ppo_prompts]
    files["eval_prompts.jsonl"] = [dict(prompt=p) for p in w.eval_prompts]
    paths = []
    for name, records in files.items():
        path = os.path.join(out_dir, name)
        _write_jsonl(path, records)
        paths.append(path)
    return paths

