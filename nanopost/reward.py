"""
Reward functions for PPO: the built-in verifier, or your own `score(prompts, responses) -> list[float]`
named as --reward_fn=module:function or --reward_fn=path/to/file.py:function.

A user's function is untrusted input like a data file: a file that does not import names its line, a call
that raises names the prompt it failed on, and a result that is not one finite float per response stops the
run with a message saying so.
"""

import importlib
import importlib.util
import math
import os
import traceback

from nanopost.common import UserError


def _import_file(path, spec):
    mspec = importlib.util.spec_from_file_location("nanopost_user_reward", path)
    module = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"{e.filename}:{e.lineno}: {e.msg} (reward_fn={spec})") from None
    except Exception as e:  # the user's module may raise anything while it imports; name where it did
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise UserError(f"{frame.filename}:{frame.lineno}: {type(e).__name__}: {e} "
                        f"(while importing reward_fn={spec})") from None
    return module


def load_reward_fn(spec, world):
    """'' -> the built-in verifier; 'module:function' or 'path/to/file.py:function' -> that callable.
    Every reward fn returned here takes (prompts, responses, ended), returns a list of floats and has a __name__
    for error messages."""
    if spec == "":
        def verifier(prompts, responses, ended):
            return [world.score(p, r, e) for p, r, e in zip(prompts, responses, ended)]
        verifier.__name__ = "the built-in verifier (world.score)"
        return verifier
    if ":" not in spec:
        raise UserError(f"--reward_fn={spec}: expected 'module:function' or 'file.py:function'")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise UserError(f"--reward_fn={spec}: file {mod_name} not found")
        module = _import_file(mod_name, spec)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise UserError(f"--reward_fn={spec}: cannot import {mod_name}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"--reward_fn={spec}: {mod_name} has no callable {fn_name!r}")
    def user_reward(prompts, responses, ended):
        return fn(prompts, responses)
    user_reward.__name__ = f"reward_fn={spec}"
    return user_reward


def score_responses(reward_fn, prompts, responses, ended):
    """Call reward_fn and check what comes back: a finite float for every response, in order.
    Anything else stops the run with a message that names the prompt at fault."""
    name = reward_fn.__name__
    try:
        scores = reward_fn(prompts, responses, ended)
    except Exception as exc:  # a user function may raise anything; re-raise with the prompt named
        # find the first prompt that fails on its own, so the message points at the data, not the batch
        for p, r, e in zip(prompts, responses, ended):
            try:
                reward_fn([p], [r], [e])
            except Exception:
                raise UserError(f"{name} raised {type(exc).__name__}: {exc} on prompt {p!r} "
                                f"(response {r!r})") from exc
        raise UserError(f"{name} raised {type(exc).__name__}: {exc} on a batch starting with prompt "
                        f"{prompts[0]!r} (no single prompt fails alone)") from exc
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must return a list of floats, got {type(scores).__name__} for the batch "
                        f"starting with prompt {prompts[0]!r}: {exc}") from exc
    if len(scores) != len(prompts):
        raise UserError(f"{name} returned {len(scores)} scores for {len(prompts)} responses "
                        f"(batch starting with prompt {prompts[0]!r})")
    for p, r, s in zip(prompts, responses, scores):
        if not math.isfinite(s):
            raise UserError(f"{name} returned {s} for prompt {p!r} (response {r!r})")
    return scores
