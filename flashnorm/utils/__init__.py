"""Utilities, one module each; the public ones:

* `export`: `unwrap_model`, the user's own module back from what `make_private` returned;
* `fast_gradient_clipping_utils`: the DP criterion of the clipping modes at Opacus's import path;
* `fsdp_utils`: `FSDP2Wrapper`, which shards a model with FSDP2 the way the `_fsdp` modes need.

None is imported here (`fsdp_utils` needs `torch.distributed`).
"""

#: Public submodules (``from flashnorm.utils import *`` imports them).
__all__ = ["export", "fast_gradient_clipping_utils", "fsdp_utils"]
