"""Per-sample gradient-norm kernels callable on tensors.

Each kernel has a PyTorch reference beside it; the dispatcher picks Triton on CUDA and the reference
elsewhere. Every dispatcher takes ``backend="auto"|"triton"|"torch"`` (None: ``FLASHNORM_BACKEND``,
see `resolve_backend`).

Modules: one per operation (``flash_norm``, ``gram_norm``, ``clipped_grad``, ``affine_norm``,
``weighted_sum``, ``multi_tensor``), plus ``tiles`` (Triton helpers they share), ``operands`` (input checks
and the TMA policy), ``backend`` (the backend policy and device queries), ``accumulation`` (the accumulation
dtype and the references' chunk sizes) and ``triton_support`` (Triton, or a stub where it does not import).
"""

from .affine_norm import affine_norm_grads, affine_norm_grads_reference
from .backend import resolve_backend
from .clipped_grad import (
    clipped_bias_grad,
    clipped_weight_grad,
    clipped_weight_grad_fused,
    clipped_weight_grad_reference,
    clipped_weight_grads_stacked,
    per_sample_weight_grads,
)
from .flash_norm import flash_norm_sq, flash_norm_sq_reference
from .gram_norm import gram_norm_sq, gram_norm_sq_reference
from .weighted_sum import weighted_row_sum, weighted_row_sum_reference

__all__ = [
    "affine_norm_grads",
    "affine_norm_grads_reference",
    "flash_norm_sq",
    "flash_norm_sq_reference",
    "gram_norm_sq",
    "gram_norm_sq_reference",
    "clipped_weight_grad",
    "clipped_weight_grad_fused",
    "clipped_weight_grad_reference",
    "clipped_weight_grads_stacked",
    "clipped_bias_grad",
    "per_sample_weight_grads",
    "resolve_backend",
    "weighted_row_sum",
    "weighted_row_sum_reference",
]
