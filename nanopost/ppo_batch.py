"""
A PPO iteration's batch: which prompts the run samples (and which it holds out for evaluation), how one
iteration draws them, and how the global batch splits over ranks, groups and minibatches, with the knob checks
that shape needs.
"""

import torch

from nanopost.config import UserError
from nanopost.data import load_prompts
from nanopost.metrics import evenly_spaced


def train_eval_prompts(path, builtin, builtin_eval, n_eval, tok, block_size, max_new_tokens, too_long):
    """-> (the prompts PPO samples, the held-out prompts its evaluation scores), each checked against the
    context now, not when a batch happens to draw one: from your file, its held-out tail (n_eval, a tenth at
    most); else the built-in lists, n_eval held-out prompts spread evenly over builtin_eval."""
    train = load_prompts(path, builtin, tok, block_size, max_new_tokens, too_long)
    if not path:
        return train, load_prompts("", evenly_spaced(builtin_eval, n_eval), tok, block_size, max_new_tokens)
    n_train = len(train) - min(n_eval, len(train) // 10)
    return train[:n_train], train[n_train:]


def draw_prompts(prompts, n_prompts, local_prompts, group_size, rank, generator):
    """An iteration's prompts: n_prompts drawn without replacement (the same draw on every rank: `generator` is
    shared), this rank's share of local_prompts, each repeated group_size times in a row (a group)."""
    global_idx = torch.randperm(len(prompts), generator=generator)[:n_prompts]
    local_idx = global_idx[rank * local_prompts:(rank + 1) * local_prompts].tolist()
    return [prompts[i] for i in local_idx for _ in range(group_size)]


def check_groups(advantage, group_size, whiten_rewards):
    """The knobs a critic-free run (--advantage=grpo|rloo, a group baseline) cannot use, each a one-line error."""
    if advantage != "gae" and group_size < 2:
        raise UserError(f"--advantage={advantage}: needs --group_size >= 2 (a group baseline), got {group_size}")
    if advantage != "gae" and whiten_rewards:
        raise UserError("--whiten_rewards: only for --advantage=gae (a group baseline compares raw scores)")


def split_batch(batch_size, group_size, num_minibatches, world_size):
    """A global batch of batch_size responses in groups of group_size samples of one prompt, over ranks
    (a group stays on one rank) -> (prompts per iteration, prompts per rank, rows per minibatch)."""
    local_bs = batch_size // world_size
    if batch_size % world_size or local_bs % num_minibatches or local_bs % group_size:
        raise UserError(f"--batch_size={batch_size}: must split evenly over {world_size} rank(s) and then "
                        f"into --num_minibatches={num_minibatches} and into groups of --group_size="
                        f"{group_size} (a group stays on one rank)")
    return batch_size // group_size, local_bs // group_size, local_bs // num_minibatches


def check_fill(n_prompts, n_train, batch_size, group_size):
    """An iteration draws n_prompts distinct prompts: the training prompts must hold that many."""
    if n_prompts > n_train:
        raise UserError(f"--batch_size={batch_size}: more than the {n_train} training prompts can fill "
                        f"({n_prompts} prompts per iteration at --group_size={group_size})")
