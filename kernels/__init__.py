"""Fused Triton kernels for the losses of post-training, each next to its pure-PyTorch reference.

CUDA tensors run the compiled kernels; CPU tensors run the references, or the same kernels through the Triton
interpreter when TRITON_INTERPRET=1 (how the tests check them without a GPU). See kernels/_dispatch.py.
"""

from kernels.cross_entropy import cross_entropy, cross_entropy_ref
from kernels.logprobs import token_logprobs, token_logprobs_ref
from kernels.kl import token_kl, token_kl_ref

__all__ = ["cross_entropy", "cross_entropy_ref", "token_logprobs", "token_logprobs_ref", "token_kl", "token_kl_ref"]
