"""Fused GPU kernels. `triplet_loss` dispatches between the Triton kernel and the torch reference.

triton is imported only when the Triton backend is used, so importing this package is cheap and
works without triton.
"""

from crl.kernels.dispatch import BACKENDS, resolve_backend, triplet_loss, triton_available

__all__ = ["BACKENDS", "resolve_backend", "triplet_loss", "triton_available"]
