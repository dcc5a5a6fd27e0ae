"""eqx_rng: explicit, addressable randomness for Equinox models."""

import importlib.metadata

from ._custom_types import Key as Key, KeyGrid as KeyGrid
from ._keys import (
    as_key as as_key,
    derive as derive,
    example_keys as example_keys,
    grid_keys as grid_keys,
    split_like as split_like,
    string_hash as string_hash,
    tree_normal as tree_normal,
)
from ._typecheck import typecheck as typecheck, typecheck_enabled as typecheck_enabled

# --- vectorisation (_vmap.py) ---

# --- scale (_sharding.py) ---

# --- training (_train.py) ---

# --- checkpoints (_checkpoint.py) ---

# --- submodules: eqx_rng.nn, eqx_rng.debug ---

__version__ = importlib.metadata.version("eqx_rng")
