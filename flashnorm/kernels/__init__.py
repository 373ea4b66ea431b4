"""Per-sample gradient-norm kernels callable on tensors.

Each kernel has a PyTorch reference beside it; the dispatcher picks Triton on CUDA and the
reference elsewhere (``FLASHNORM_BACKEND=triton|torch`` forces either).
"""

from .affine_norm import affine_norm_grads, affine_norm_grads_reference
from .clipped_grad import (
    clipped_bias_grad,
    clipped_weight_grad,
    clipped_weight_grad_fused,
    clipped_weight_grad_reference,
    per_sample_weight_grads,
)
from .flash_norm import flash_norm_sq, flash_norm_sq_and_grads, flash_norm_sq_reference
from .gram_norm import gram_norm_sq, gram_norm_sq_reference
from .weighted_sum import weighted_row_sum, weighted_row_sum_reference

__all__ = [
    "affine_norm_grads",
    "affine_norm_grads_reference",
    "flash_norm_sq",
    "flash_norm_sq_reference",
    "flash_norm_sq_and_grads",
    "gram_norm_sq",
    "gram_norm_sq_reference",
    "clipped_weight_grad",
    "clipped_weight_grad_fused",
    "clipped_weight_grad_reference",
    "clipped_bias_grad",
    "per_sample_weight_grads",
    "weighted_row_sum",
    "weighted_row_sum_reference",
]
