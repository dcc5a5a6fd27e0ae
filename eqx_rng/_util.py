"""Small helpers shared by several modules: key tests, value descriptions for error
messages, axis-name normalisation and installed-version lookup.

Each lives here once so that the modules that use them agree (for example on what
counts as a PRNG key).
"""

import importlib.metadata
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_typed_key(x: Any) -> bool:
    """Whether `x` (an array or a `jax.ShapeDtypeStruct`) holds typed PRNG keys."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    try:
        return jnp.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def is_legacy_key(x: Any) -> bool:
    """Whether `x` looks like legacy raw key data: a `uint32[..., 2]` array."""
    return (
        isinstance(x, jax.Array | np.ndarray)
        and not is_typed_key(x)
        and x.dtype == np.uint32
        and x.ndim >= 1
        and x.shape[-1] == 2
    )


def is_key_like(x: Any) -> bool:
    """A typed key array, or a legacy uint32 key array (`uint32[..., 2]`)."""
    if not isinstance(x, jax.Array | np.ndarray):
        return False
    return is_typed_key(x) or is_legacy_key(x)


def describe(x: Any) -> str:
    """A short description of a value for an error message."""
    if isinstance(x, jax.Array | np.ndarray):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def axis_names(axis_name: Any) -> tuple[Hashable, ...]:
    """`axis_name` (one name, or a tuple or list of names) as a tuple of names."""
    if isinstance(axis_name, tuple | list):
        return tuple(axis_name)
    return (axis_name,)


def dist_version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or `None` if not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
