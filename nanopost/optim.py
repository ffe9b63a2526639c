"""
One update of several models from one loss: gradients summed over ranks, each model's clipped, the non-finite stop
before any weight moves, then every optimizer's step.
"""

import math

import torch.nn as nn

from nanopost.checkpoint import check_finite
from nanopost.distributed import sum_over_ranks, sync_grads


def update_models(loss, models, optimizers, grad_clip, losses, step, ckpt_path):
    """Backward `loss` into `models` ({name: model}, disjoint parameters), sum the gradients over ranks (each rank's
    loss is divided by the global token count, so the sum is the gradient of one process holding every batch), clip
    each model's norm to grad_clip (0: only measured), and step `optimizers`. A non-finite loss in `losses` ({name:
    this rank's scalar}, summed over ranks) or gradient norm stops the run first (Diverged), so the weights stay the
    last good ones. optimizers: {name: optimizer}."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    sync_grads([p for m in models.values() for p in m.parameters()])
    max_norm = grad_clip or math.inf  # clip_grad_norm_ with inf only measures the norm
    norms = {f"{name}_grad_norm": nn.utils.clip_grad_norm_(m.parameters(), max_norm) for name, m in models.items()}
    check_finite(step, ckpt_path, **sum_over_ranks(losses), **norms)
    for opt in optimizers.values():
        opt.step()
