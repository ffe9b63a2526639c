"""nanopost.reward: a user's reward function is untrusted input, so every way it can fail names where (the file and
line it does not import at, the prompt it failed on), and the built-in verifier is the default."""

import re
import textwrap

import pytest

from nanopost.config import UserError
from nanopost.reward import load_reward_fn, score_responses

PROMPTS, RESPONSES, ENDED = ["p one", "p two", "p three"], ["a", "b", "c"], [True, True, False]


def write(tmp_path, source, name="my_reward.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_default_is_the_builtin_verifier(world):
    fn = load_reward_fn("", world)
    prompts = ["Write an addition that equals 17."] * 3
    assert fn(prompts, ["12+5=17", "12+5=18", "12+5=17"], [True, True, False]) == [1.0, 0.0, 0.0]
    assert "verifier" in fn.__name__


def test_file_reward_is_called_with_prompts_and_responses(tmp_path, world):
    path = write(tmp_path, """
        def reward(prompts, responses):
            return [len(p) + len(r) for p, r in zip(prompts, responses)]
    """)
    fn = load_reward_fn(f"{path}:reward", world)
    assert score_responses(fn, PROMPTS, RESPONSES, ENDED) == [6.0, 6.0, 8.0]
    assert fn.__name__ == f"reward_fn={path}:reward"  # what the error messages call it


def test_syntax_error_names_file_and_line(tmp_path, world):
    path = write(tmp_path, """
        def reward(prompts, responses):
            scores = [1.0 for p in prompts
            return scores
    """)  # the unclosed bracket is reported at line 3, where it opens
    with pytest.raises(UserError, match=rf"^{re.escape(path)}:3: .* \(reward_fn={re.escape(path)}:reward\)$"):
        load_reward_fn(f"{path}:reward", world)


def test_import_time_exception_names_file_and_line(tmp_path, world):
    path = write(tmp_path, """
        import math

        TABLE = {"a": 1}
        SCALE = TABLE["b"]
    """)
    with pytest.raises(UserError, match=rf"^{re.escape(path)}:5: KeyError: 'b' \(while importing reward_fn="):
        load_reward_fn(f"{path}:reward", world)


@pytest.mark.parametrize("spec,what", [
    ("no_colon_here", "expected 'module:function'"),
    ("missing_file.py:reward", "file missing_file.py not found"),
    ("no_such_module_xyz:reward", "cannot import no_such_module_xyz"),
    ("math:no_such_fn", "math has no callable 'no_such_fn'"),
    ("math:pi", "math has no callable 'pi'"),  # there, but not callable
])
def test_bad_spec_names_the_knob(spec, what, world):
    with pytest.raises(UserError, match=f"^--reward_fn={re.escape(spec)}: {re.escape(what)}"):
        load_reward_fn(spec, world)


def test_errors_name_the_prompt():
    def raises_on_two(ps, rs, es):
        if "p two" in ps:
            raise KeyError("boom")
        return [1.0] * len(ps)

    with pytest.raises(UserError, match="^raises_on_two raised KeyError: 'boom' on prompt 'p two'"):
        score_responses(raises_on_two, PROMPTS, RESPONSES, ENDED)

    def nan_on_three(ps, rs, es):
        return [0.0, 1.0, float("nan")]
    with pytest.raises(UserError, match="^nan_on_three returned nan for prompt 'p three'"):
        score_responses(nan_on_three, PROMPTS, RESPONSES, ENDED)

    def two_scores(ps, rs, es):
        return [0.0, 1.0]
    with pytest.raises(UserError, match="^two_scores returned 2 scores for 3 responses.*'p one'"):
        score_responses(two_scores, PROMPTS, RESPONSES, ENDED)

    def not_numbers(ps, rs, es):
        return ["good", "bad", "ok"]
    with pytest.raises(UserError, match="^not_numbers must return a list of floats"):
        score_responses(not_numbers, PROMPTS, RESPONSES, ENDED)

    def ints(ps, rs, es):
        return [0, 1, 2]
    assert score_responses(ints, PROMPTS, RESPONSES, ENDED) == [0.0, 1.0, 2.0]
