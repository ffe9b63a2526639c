"""
Reward functions for PPO: the built-in verifier, or your own `score(prompts, responses) -> list[float]`
named as --reward_fn=module:function or --reward_fn=path/to/file.py:function; or a learned reward model
(--reward_model=PATH, trained by train_sft.py on preference pairs) that scores a whole batch in one forward.

A user's function is untrusted input like a data file: a file that does not import names its line, a call
that raises names the prompt it failed on, and a result that is not one finite float per response stops the
run with a message saying so.
"""

import importlib
import importlib.util
import math
import os
import traceback

import torch

from nanopost.config import UserError
from nanopost.loading import build_model, load_checkpoint, load_weights
from nanopost.model import RewardModel
from nanopost.prefs import collate_pairs
from nanopost.rollout import rollout
from nanopost.tokenizer import from_checkpoint


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


def setup_rewards(reward_fn, reward_model, prompts, world, tok, block_size, device):
    """--reward_fn, --reward_model and --prompts -> (reward_fn, reward_model or None, what the evaluation scores
    with: reward_fn on your prompts or with your function, else None, the verifier's own metrics). Beside a
    reward model the verifier stays reward_fn (PPO logs it as gold), except on your prompts, which have none:
    there the reward model scores."""
    if reward_model and reward_fn:
        raise UserError(f"--reward_model={reward_model} --reward_fn={reward_fn}: give one reward, not two")
    fn = load_reward_fn(reward_fn, world)
    model = load_reward_model(reward_model, tok, block_size, device) if reward_model else None
    if model is not None and prompts:
        fn = model.score_texts
    return fn, model, fn if prompts or reward_fn else None


def score_rollout(samples, reward_fn, reward_model, rt, with_gold):
    """A rollout's scores -> (B floats, gold): reward_fn's (checked by score_responses), or the reward
    model's, one forward of the whole batch read at each row's last real token. Beside a reward model,
    with_gold also scores with reward_fn (the verifier): gold, (B,) float64, where the proxy and the truth
    part; None otherwise."""
    ended = samples.ended.tolist()
    if reward_model is None:
        return score_responses(reward_fn, samples.prompts, samples.responses, ended), None
    gold = None
    if with_gold:
        gold = torch.tensor(score_responses(reward_fn, samples.prompts, samples.responses, ended),
                            dtype=torch.float64, device=rt.device)
    with torch.no_grad(), rt.autocast():
        return reward_model(samples.tokens, samples.mask).tolist(), gold


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


# -----------------------------------------------------------------------------
# a learned reward model

NORM_SAMPLES = 256  # responses the normalisation averages over: its mean is then within ~0.06 std of the truth


@torch.no_grad()
def reward_norm(rm, tok, device, lm=None, prompts=(), max_new_tokens=16, examples=(), pad_id=0):
    """Mean and std of the reward model's raw scores on the responses of lm, the policy PPO starts from, to
    NORM_SAMPLES prompts spread over `prompts` (the ones that fit the context with max_new_tokens); PPO subtracts
    and divides by them, so its start policy scores mean 0, std 1 (as InstructGPT normalises its reward model).
    Without an lm (a scratch reward model) or a prompt that fits: over both sides of the held-out pairs."""
    rm.eval()
    fits = [p for p in prompts if len(tok.encode_prompt(p)) + max_new_tokens <= rm.trunk.config.block_size]
    scores = []
    if lm is not None and fits:
        lm.eval()
        gen = torch.Generator(device=device).manual_seed(0)
        todo = [fits[i * len(fits) // NORM_SAMPLES] for i in range(NORM_SAMPLES)]
        for i in range(0, len(todo), 128):
            ro = rollout(lm, tok, todo[i:i + 128], max_new_tokens, generator=gen)
            scores.append(rm(ro.tokens, attention_mask=ro.mask).float())
        on = f"{NORM_SAMPLES} samples of the initial model"
    else:
        for i in range(0, len(examples), 64):
            X, M = collate_pairs(examples[i:i + 64], pad_id)
            scores.append(rm(X.flatten(0, 1).to(device), attention_mask=M.flatten(0, 1).to(device)).float())
        on = f"both sides of {len(examples)} held-out pairs"
    scores = torch.cat(scores)
    rm.train()
    return dict(mean=scores.mean().item(), std=max(scores.std().item(), 1e-6), on=on)


def load_reward_model(path, tok, block_size, device):
    """A reward model checkpoint -> score(tokens, attention_mask) -> (B,) normalised rewards, read at each row's
    last real token in one forward of the whole batch (no Python loop per sample). It must read the policy's
    token ids the same way (same tokenizer) and hold its whole context (block_size)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "reward_model":
        raise UserError(f"--reward_model={path}: not a reward model (train one with train_sft.py --data=prefs "
                        f"or --data=PAIRS.jsonl)")
    rm_tok = from_checkpoint(ckpt, path)
    if rm_tok.fingerprint != tok.fingerprint:
        raise UserError(f"--reward_model={path}: its tokenizer {rm_tok.name!r} is not the policy's {tok.name!r}; "
                        f"it would read the policy's token ids as other words")
    args = dict(ckpt["model_args"], dropout=0.0)
    if args["block_size"] < block_size:
        raise UserError(f"--reward_model={path}: block_size {args['block_size']} is shorter than the policy's "
                        f"{block_size}")
    rm = load_weights(RewardModel(build_model(args)), ckpt["model"]).to(device).eval().requires_grad_(False)
    mean, std = ckpt["reward_norm"]["mean"], ckpt["reward_norm"]["std"]

    def score(tokens, attention_mask):
        return (rm(tokens, attention_mask=attention_mask).float() - mean) / std  # (B,)

    def score_texts(prompts, responses, ended):
        """The same on text, for the evaluation of your prompts (reward_eval): encoded, then one forward."""
        seqs = [tok.encode_prompt(p) + tok.encode(r) + ([tok.eot_id] if e else [])
                for p, r, e in zip(prompts, responses, ended)]
        X, M = collate_pairs([(s, s) for s in seqs], tok.eot_id)  # (B, 2, T): both sides the same sequence
        return score(X[:, 0].to(device), M[:, 0].to(device)).tolist()

    score.__name__ = score_texts.__name__ = f"reward_model={path}"
    score.score_texts = score_texts
    return score
