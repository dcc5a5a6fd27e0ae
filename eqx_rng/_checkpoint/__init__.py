"""Checkpoints: atomic, checksummed files of a pytree's arrays, typed keys included.

- `_format.py`: the bytes of a file (prefix, header, payload, checksums); no JAX.
- `_files.py`: atomic, durable writes through temporary files; no JAX.
- `_records.py`: pytree leaves as header records and back (dtypes, typed keys,
  weak types); matching a file to `like`.
- `_io.py`: `save`, `load`, `load_metadata`.
- `_sharded.py`: loading into `like`'s sharding; multi-host checkpoints.
- `_manager.py`: `CheckpointManager`, `latest_checkpoint`.
"""

# `os` is an attribute of this package on purpose: tests patch `_checkpoint.os`
# (the one `os` module every submodule uses) to simulate crashes.
import os as os

from ._format import CheckpointError as CheckpointError
from ._io import load as load, load_metadata as load_metadata, save as save
from ._manager import (
    CheckpointManager as CheckpointManager,
    latest_checkpoint as latest_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "latest_checkpoint",
    "load",
    "load_metadata",
    "save",
]
