"""eqx_rng: explicit, addressable randomness for Equinox models."""

import importlib.metadata as _metadata

from ._custom_types import Key as Key, KeyGrid as KeyGrid, Rate as Rate
from ._distinct import DuplicateKeyError as DuplicateKeyError
from ._key_grids import (
    example_keys as example_keys,
    grid_keys as grid_keys,
    id_halves as id_halves,
)
from ._key_trees import split_like as split_like, tree_normal as tree_normal
from ._keys import as_key as as_key, derive as derive, string_hash as string_hash
from ._typecheck import typecheck as typecheck, typecheck_enabled as typecheck_enabled

# --- vectorisation (_vmap/) ---
# isort: split
from ._ensemble import ensemble as ensemble
from ._errors import BroadcastKeyError as BroadcastKeyError
from ._vmap import shared as shared, vmap as vmap

# --- scale (_sharding.py) ---
# isort: split
from ._sharding import chain_mesh as chain_mesh, shard as shard

# --- training (_train/, _scan.py, optim/) ---
# isort: split
from ._scan import scan as scan
from ._train import TrainState as TrainState, make_train_step as make_train_step

# isort: split
from . import optim as optim

# --- performance (_jit.py) ---
# isort: split
from ._jit import jit as jit

# --- checkpoints (_checkpoint.py) ---
# isort: split
from ._checkpoint import (
    CheckpointError as CheckpointError,
    CheckpointManager as CheckpointManager,
    latest_checkpoint as latest_checkpoint,
    load as load,
    load_metadata as load_metadata,
    save as save,
)

# --- submodules: eqx_rng.nn, eqx_rng.debug ---
# isort: split
from . import debug as debug, nn as nn

__version__ = _metadata.version("eqx_rng")
