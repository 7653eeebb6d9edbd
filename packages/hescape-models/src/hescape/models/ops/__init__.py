"""Fused Triton kernels, one op per module (``clip_loss``, ``siglip_loss``).

Import the op modules lazily: they import Triton, which CPU-only installs may lack. The module and
functional wrappers live in :mod:`hescape.models.losses`.
"""

from ._utils import triton_interpret_enabled, triton_usable

__all__ = ["triton_interpret_enabled", "triton_usable"]
