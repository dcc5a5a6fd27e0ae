"""Sharded arrays: loading into `like`'s sharding, and multi-host checkpoints.

A multi-host checkpoint (written when some array is not fully addressable, under
`jax.distributed`) is:

- one *shard file* per process, `{path}.shards/{token}-{process:05d}-of-{n:05d}`,
  in the ordinary file format, holding the pieces (`addressable_shards` with
  `replica_id == 0`) that this process's devices own, each with its box in the
  global array and its own sha256, so a reader checks exactly the bytes it reads;
- the *index* at `path`, written last by process 0, atomically, once every process
  has written its shard file: the global leaves (key path, dtype, global shape, key
  implementation), the names of the shard files, the metadata, and the fully
  addressable leaves (process 0's values) in its own payload.

`token` is random per save, shared by all processes, so an index never names the
shard files of another save. Nothing is gathered to one host: each process writes
and reads only its own pieces (on a filesystem shared by all processes).
"""

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.random as jr
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from .._util import is_typed_key
from ._files import remove_stale_temporaries, tmp_pattern
from ._format import (
    PREFIX,
    align,
    aligned_empty,
    err,
    open_file,
    read_header,
    read_payload,
    write_file,
)
from ._records import (
    host_bytes,
    make_weak,
    record_for,
    stored_layout,
    to_host,
    wrap_keys,
)

SHARDS_SUFFIX = ".shards"
_SHARD_NAME = r"[0-9a-f]+-\d{5}-of-\d{5}"  # {token}-{process}-of-{count}
SHARD_FORMAT = "eqx_rng checkpoint shard"

Box = tuple[tuple[int, ...], tuple[int, ...]]  # start, stop


def shards_dir(path: Path) -> Path:
    return path.parent / f"{path.name}{SHARDS_SUFFIX}"


def remove_checkpoint(path: Path) -> None:
    """Remove the checkpoint file `path` and, for a multi-host one, its shards."""
    try:
        os.unlink(path)
    except FileNotFoundError:  # removed meanwhile (another process of the run)
        pass
    remove_shards(path)


def remove_checkpoints(paths: list[Path], multihost: bool, name: str) -> None:
    """Remove checkpoints (`remove_checkpoint`); under `multihost`, process 0 alone
    removes them and every process waits until it has (barrier `name`)."""
    if not multihost or jax.process_index() == 0:
        for path in paths:
            remove_checkpoint(path)
    if multihost:
        _barrier(name)


def remove_shards(path: Path, keep_token: str | None = None) -> None:
    directory = shards_dir(path)
    if not directory.is_dir():
        return
    if keep_token is None:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for name in os.listdir(directory):
        if not name.startswith(keep_token) and not name.startswith("."):
            try:
                os.unlink(directory / name)
            except FileNotFoundError:  # removed meanwhile
                pass


def _box(index: tuple, shape: tuple[int, ...]) -> Box:
    start, stop = [], []
    for s, n in zip(index, shape, strict=False):
        lo, hi, step = s.indices(n)
        if step != 1:  # pragma: no cover - JAX's shard indices are contiguous
            raise ValueError(f"a strided shard index {index} cannot be stored")
        start.append(lo)
        stop.append(hi)
    for n in shape[len(index) :]:
        start.append(0)
        stop.append(n)
    return tuple(start), tuple(stop)


# --------------------------------------------------------------------------------
# Placing a leaf with a sharding.


def place(
    path: Path,
    record: dict,
    like: Any,
    sharding: Any,
    read_block: Callable[[Any], np.ndarray],
) -> Any:
    """The leaf for `record` with `sharding`; `read_block(index)` gives the stored
    bytes (key data for keys) of the box `index` (a tuple of slices) as an array."""
    _, shape = stored_layout(record)
    is_key = "key_impl" in record
    full = tuple(slice(None) for _ in shape)
    if isinstance(sharding, SingleDeviceSharding):
        value = jax.device_put(read_block(full), sharding)
    elif not is_key or isinstance(sharding, NamedSharding):
        # A `NamedSharding` of a key array also shards its key data (one more dim).
        value = jax.make_array_from_callback(shape, sharding, read_block)
    elif sharding.is_fully_addressable:
        keys = wrap_keys(path, record, jax.device_put(read_block(full)))
        return jax.device_put(keys, sharding)
    else:
        raise err(
            path,
            f"cannot place the keys of `{record['path']}` with `like`'s "
            f"{type(sharding).__name__}; give that leaf of `like` a "
            "`jax.sharding.NamedSharding`.",
        )
    if is_key:
        return wrap_keys(path, record, value, sharding)
    if record.get("weak_type", False):
        value = make_weak(value)
    return value


# --------------------------------------------------------------------------------
# Writing a multi-host checkpoint.


def needs_multihost(leaves: list[tuple[str, Any]]) -> bool:
    return any(
        isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        for _, leaf in leaves
    )


def _shared_token() -> str:
    from jax.experimental import multihost_utils

    mine = np.frombuffer(secrets.token_bytes(8), np.uint32)
    token = multihost_utils.broadcast_one_to_all(mine)
    return np.asarray(token, np.uint32).tobytes().hex()


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _own_pieces(name: str, leaf: jax.Array) -> tuple[dict, list[tuple[dict, Any]]]:
    impl = None
    if is_typed_key(leaf):
        impl = str(jr.key_impl(leaf))
        data = jr.key_data(leaf)
    else:
        data = leaf
    record = record_for(name, leaf, data, impl)
    record["sharded"] = True
    pieces = []
    for shard in data.addressable_shards:
        if shard.replica_id != 0:
            continue
        block = host_bytes(name, np.asarray(shard.data))
        start, stop = _box(shard.index, data.shape)
        piece = {"path": name, "start": list(start), "stop": list(stop)}
        piece["nbytes"] = int(block.nbytes)
        piece["sha256"] = hashlib.sha256(block.data).hexdigest()
        pieces.append((piece, block))
    return record, pieces


def save_multihost(
    path: Path, leaves: list[tuple[str, Any]], metadata: Any, library: dict
) -> Path:
    """Every process calls this with the same `path` and the same global arrays."""
    process, count = jax.process_index(), jax.process_count()
    token = _shared_token()
    directory = shards_dir(path)
    directory.mkdir(exist_ok=True)
    # What killed saves of this process's host left (their pids are gone).
    remove_stale_temporaries(directory, tmp_pattern(_SHARD_NAME))
    records, local, pieces = [], [], []
    offset = index_offset = 0
    for name, leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            record, own = _own_pieces(name, leaf)
            for piece, block in own:
                piece["offset"] = offset
                pieces.append((piece, block))
                offset = align(offset + block.nbytes)
        else:
            data, impl = to_host(leaf)
            data = host_bytes(name, data)
            record = record_for(name, leaf, data, impl)
            record["offset"], record["nbytes"] = index_offset, int(data.nbytes)
            local.append((index_offset, data))
            index_offset = align(index_offset + data.nbytes)
        records.append(record)
    file_names = [f"{token}-{p:05d}-of-{count:05d}" for p in range(count)]
    shard_header = {
        "format": SHARD_FORMAT,
        "leaves": [piece for piece, _ in pieces],
        "payload_nbytes": offset,
        "metadata": {},
        "eqx_rng": {"process": process, "processes": count, "token": token},
    }
    arrays = [(piece["offset"], block) for piece, block in pieces]
    write_file(directory / file_names[process], shard_header, arrays, offset)
    _barrier(f"eqx_rng.save shards {token}")
    if process == 0:
        header = {
            "format": "eqx_rng checkpoint",
            "leaves": records,
            "payload_nbytes": index_offset,
            "metadata": metadata,
            "eqx_rng": library,
            "shards": {"directory": directory.name, "files": file_names},
        }
        write_file(path, header, local, index_offset)
        remove_shards(path, keep_token=token)
    _barrier(f"eqx_rng.save index {token}")
    return path


# --------------------------------------------------------------------------------
# Reading a multi-host checkpoint.


class _Pieces:
    """The pieces of every shard file of an index, read on demand and verified."""

    def __init__(self, path: Path, shards: dict):
        self.path = path
        self.by_leaf: dict[str, list[tuple[Path, dict]]] = {}
        self._cache: dict[tuple[Path, int], np.ndarray] = {}
        directory = path.parent / shards["directory"]
        for name in shards["files"]:
            shard_path = directory / name
            try:
                f = open_file(shard_path)
            except FileNotFoundError:
                raise err(
                    path,
                    f"names the shard file '{shard_path}', which is missing (copy "
                    "the whole `.shards` directory with the index).",
                ) from None
            with f:
                _, header = read_header(f, shard_path, os.fstat(f.fileno()).st_size)
            if header.get("format") != SHARD_FORMAT:
                raise err(shard_path, "is not a shard file of a multi-host index.")
            for piece in header["leaves"]:
                self.by_leaf.setdefault(piece["path"], []).append((shard_path, piece))

    def _read(self, shard_path: Path, piece: dict, dtype: np.dtype) -> np.ndarray:
        key = (shard_path, piece["offset"])
        if key not in self._cache:
            buffer = aligned_empty(piece["nbytes"])
            with open(shard_path, "rb") as f:
                f.seek(_payload_start(f, shard_path) + piece["offset"])
                complete = f.readinto(buffer.data) == piece["nbytes"]
            if (
                not complete
                or hashlib.sha256(buffer.data).hexdigest() != piece["sha256"]
            ):
                raise err(
                    shard_path,
                    f"is corrupted: the sha256 checksum of a piece of "
                    f"`{piece['path']}` does not match.",
                )
            shape = tuple(np.subtract(piece["stop"], piece["start"]).tolist())
            self._cache[key] = buffer.view(dtype).reshape(shape)
        return self._cache[key]

    def block(self, record: dict, index: tuple) -> np.ndarray:
        dtype, shape = stored_layout(record)
        start, stop = (np.array(b, np.int64) for b in _box(index, shape))
        out = np.empty(tuple((stop - start).tolist()), dtype)
        covered = 0
        for shard_path, piece in self.by_leaf.get(record["path"], []):
            lo = np.maximum(start, piece["start"])
            hi = np.minimum(stop, piece["stop"])
            if np.any(hi <= lo):
                continue
            data = self._read(shard_path, piece, dtype)
            dst = tuple(map(slice, (lo - start).tolist(), (hi - start).tolist()))
            src_lo, src_hi = lo - piece["start"], hi - piece["start"]
            out[dst] = data[tuple(map(slice, src_lo.tolist(), src_hi.tolist()))]
            covered += int(np.prod(hi - lo))
        if covered != out.size:
            raise err(
                self.path,
                f"lacks part of leaf `{record['path']}`: its shard files cover "
                f"{covered} of the {out.size} elements asked for.",
            )
        return out


def _payload_start(f: Any, shard_path: Path) -> int:
    prefix = f.read(PREFIX.size)
    return PREFIX.size + PREFIX.unpack(prefix)[3]


Reader = Callable[[dict], Callable[[Any], np.ndarray]]


def block_reader(
    records: list[dict], buffers: list[np.ndarray], pieces: "_Pieces | None" = None
) -> Reader:
    """For each record, its `read_block(index)`: from `buffers` (the stored bytes of
    `records`, in order), else from the shard files' `pieces`."""
    arrays = {}
    for record, buffer in zip(records, buffers, strict=True):
        dtype, shape = stored_layout(record)
        arrays[record["path"]] = buffer.view(dtype).reshape(shape)

    def reader(record: dict) -> Callable[[Any], np.ndarray]:
        if record["path"] in arrays:
            data = arrays[record["path"]]
            return lambda index: data[index]
        if pieces is None:  # pragma: no cover - `match` checked every path
            raise KeyError(record["path"])
        shards = pieces
        return lambda index: shards.block(record, index)

    return reader


def read_index(f: Any, path: Path, header: dict, records: list) -> Reader:
    """`block_reader` of an index file (`f` just past its header)."""
    local = [r for r in records if not r.get("sharded", False)]
    spans = [(r["offset"], r["nbytes"]) for r in local]
    buffers = read_payload(f, path, header, spans)
    return block_reader(local, buffers, _Pieces(path, header["shards"]))
