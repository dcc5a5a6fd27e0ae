"""`eqx_rng.vmap` and its parts: axes, device placement, outputs, the key check."""

from ._shared import shared as shared
from ._wrapper import vmap as vmap

__all__ = ["shared", "vmap"]
