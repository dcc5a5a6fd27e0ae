"""A corpus of real-code patterns for the broadcast-key check of `eqx_rng.vmap`.

Each snippet is written in the style of public JAX code (Equinox's examples and
layers, numpyro/blackjax-style sampler kernels, optax noise, Flax patterns ported to
Equinox) and marked `"bug"` (every mapped call draws the same numbers somewhere) or
`"ok"` (legitimate). `tests/test_key_corpus.py` runs every snippet through
`eqx_rng.vmap`, compares the check's verdict with the mark, and confirms the mark by
running the snippet with the check suspended: a bug's draws are identical in every
row, a legitimate snippet's are not (unless it shares on purpose).

A snippet whose bug the analysis cannot see carries `miss="why"`; the test asserts
that exactly those are missed.
"""

from . import _equinox, _flax_optax, _misses, _samplers  # noqa: F401  (register)
from ._base import SNIPPETS, Call, Snippet

__all__ = ["SNIPPETS", "Call", "Snippet"]
