"""`save`, `load` and `load_metadata`: a pytree's arrays to one file and back.

A file is written atomically (`_files.write_atomically`): a crash at any moment
leaves either the old file or the new one at `path`, never a partial one. A later
`save` of the same path removes the temporaries that killed saves of it left.
"""

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from .._typecheck import typecheck
from ._files import remove_stale_temporaries, tmp_pattern
from ._format import align, err, open_file, read_header, read_payload, write_file
from ._records import (
    LIBRARY_KEY,
    array_leaves,
    check_metadata,
    host_bytes,
    is_like_array,
    library_entries,
    like_leaves,
    make_weak,
    match,
    record_for,
    stored_layout,
    to_host,
    wrap_keys,
)
from ._sharded import (
    SHARD_FORMAT,
    block_reader,
    needs_multihost,
    place,
    read_index,
    remove_shards,
    save_multihost,
)


def check_path(path: Any, fn: str) -> Path:
    """`path` as a `Path` naming a file, or a clear error."""
    if os.fspath(path) == "":
        raise ValueError(
            f"`eqx_rng.{fn}(path=...)` got an empty path; pass the file to write, "
            "for example `'checkpoints/step_100.ckpt'`."
        )
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"`eqx_rng.{fn}(path=...)` names the directory '{path}', but a "
            f"checkpoint is one file; pass a file inside it, for example "
            f"'{path / 'checkpoint.ckpt'}', or use `eqx_rng.CheckpointManager"
            f"('{path}')` for numbered checkpoints."
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"`eqx_rng.{fn}(path=...)`: the directory '{path.parent}' of '{path}' "
            "does not exist; create it first (`os.makedirs(..., exist_ok=True)`)."
        )
    return path


def save_file(
    path: Path, tree: Any, metadata: Any, library: dict[str, Any] | None = None
) -> Path:
    """`save` without the argument checks on `path` (also used by the manager)."""
    metadata = check_metadata(metadata)
    leaves = array_leaves(tree, "save")
    entries = library_entries(library)
    if needs_multihost(leaves):
        return save_multihost(path, leaves, metadata, entries)
    remove_stale_temporaries(path.parent, tmp_pattern(re.escape(path.name)))
    records, arrays = [], []
    offset = 0
    for name, leaf in leaves:
        data, impl = to_host(leaf)
        data = host_bytes(name, data)
        record = record_for(name, leaf, data, impl)
        record["offset"], record["nbytes"] = offset, int(data.nbytes)
        records.append(record)
        arrays.append((offset, data))
        offset = align(offset + data.nbytes)
    header = {
        "format": "eqx_rng checkpoint",
        "leaves": records,
        "payload_nbytes": offset,
        "metadata": metadata,
        LIBRARY_KEY: entries,
    }
    write_file(path, header, arrays, offset)
    remove_shards(path)  # of a multi-host checkpoint this file replaced
    return path


@typecheck
def save(
    path: str | os.PathLike,
    tree: PyTree,
    *,
    metadata: dict | None = None,
) -> Path:
    """Write the arrays of `tree` to the file `path`, atomically.

    Every array leaf (JAX or NumPy; typed PRNG keys included) is stored with its key
    path, dtype and shape; other leaves are not stored (`load` takes them from its
    `like` tree). The file carries checksums of its header (sha256) and payload
    (CRC-32, computed while a thread waits for the disk to take the payload). The
    write is atomic: a temporary file in the same directory, named after this host
    and process, is written and `fsync`ed, then renamed over `path` (`os.replace`)
    and the directory `fsync`ed, so a crash leaves either the previous file or the
    new one at `path`. The cached pages of the file being replaced are dropped
    first (the file itself is untouched until the rename).
    Temporaries of `path` left by killed saves (their process is gone) are removed.

    Multi-host: when some array is spread over several processes (not fully
    addressable, under `jax.distributed`), every process must call `save` with the
    same `path` and tree. Each process then writes only the pieces its own devices
    hold to `{path}.shards/`, and process 0 writes the index at `path` last; the
    directory must be shared by all processes. Fully addressable leaves are taken
    from process 0.

    **Arguments:**

    - `path`: The file to write (its directory must exist). Replaced if present.
    - `tree`: Any pytree, e.g. a `TrainState`. Arrays must not be tracers.
    - `metadata`: A JSON-serialisable dict stored in the header (read it back with
        `load_metadata`). The key `"eqx_rng"` is reserved. (Keyword only argument.)

    **Returns:**

    `path`, as a `pathlib.Path`.

    **Raises:**

    `TypeError` for non-JSON metadata, a tracer or a non-numeric array;
    `ValueError` for the reserved metadata key or an empty `path`;
    `IsADirectoryError` when `path` is a directory; `FileNotFoundError` when its
    directory does not exist; `OSError` from the filesystem.

    !!! Example

        ```python
        import pathlib, tempfile

        path = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        tree = {"w": jnp.arange(3.0), "key": jr.key(0), "act": jax.nn.relu}
        eqx_rng.save(path, tree, metadata={"lr": 0.1})
        back = eqx_rng.load(path, tree)
        assert jnp.array_equal(back["w"], tree["w"]) and back["act"] is jax.nn.relu
        assert eqx_rng.load_metadata(path)["lr"] == 0.1
        ```
    """
    return save_file(check_path(path, "save"), tree, metadata)


# --------------------------------------------------------------------------------
# Reading.


def restore_leaf(
    path: Path, record: dict, like: Any, read_block: Callable[[Any], np.ndarray]
) -> Any:
    """The leaf of `like`'s kind from `read_block(index)`, the stored array's box
    `index` (a tuple of slices)."""
    _, shape = stored_layout(record)
    full = tuple(slice(None) for _ in shape)
    if isinstance(like, np.ndarray):
        return read_block(full)
    if isinstance(like, np.generic):
        return read_block(full)[()].copy()
    sharding = getattr(like, "sharding", None)
    if sharding is not None and getattr(like, "committed", True):
        return place(path, record, like, sharding, read_block)
    # An array that JAX placed by default (not committed to a device by
    # `device_put` or a sharding) is loaded the same way: a committed copy would
    # make a jitted step compile again for its first resumed call.
    # `device_put` of an aligned NumPy array on CPU uses its memory in place.
    value = jax.device_put(read_block(full))
    if "key_impl" in record:
        return wrap_keys(path, record, value)
    if record.get("weak_type", False):
        value = make_weak(value)
    return value


def load_file(path: Path, like: Any) -> tuple[Any, dict[str, Any]]:
    """`load`, also returning the file's header."""
    leaves = like_leaves(like)
    with open_file(path) as f:
        _, header = read_header(f, path, os.fstat(f.fileno()).st_size)
        if header.get("format") == SHARD_FORMAT:
            raise err(
                path,
                "is one process's part of a multi-host checkpoint; load the index "
                "file it belongs to (the path given to `eqx_rng.save`).",
            )
        records = header["leaves"]
        match(path, leaves, records)
        if "shards" in header:
            reader = read_index(f, path, header, records)
        else:
            spans = [(r["offset"], r["nbytes"]) for r in records]
            buffers = read_payload(f, path, header, spans)
            reader = block_reader(records, buffers)

    flat, treedef = jtu.tree_flatten(like)
    records_iter = iter(records)
    out = []
    for leaf in flat:
        if is_like_array(leaf):
            record = next(records_iter)
            out.append(restore_leaf(path, record, leaf, reader(record)))
        else:
            out.append(leaf)
    return jtu.tree_unflatten(treedef, out), header


@typecheck
def load(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Read a checkpoint written by `save` into the structure of `like`.

    The file's array leaves are matched to the array leaves of `like` by key path;
    every shape, dtype and PRNG key implementation must agree. Everything that is not
    an array in `like` (the structure, functions, Python numbers, static fields) is
    taken from `like` unchanged. Both checksums are verified before anything is
    returned: a corrupted file is never read as garbage. The file is read once,
    each leaf into its own buffer while the checksum is computed beside the read; on
    CPU the returned arrays use those buffers in place, so a load needs about as much
    memory as the data. Files of format versions 1 and 2 are read.

    A multi-host checkpoint (see `save`) is loaded by every process with the same
    `like`, whose leaves carry the global shardings: each process reads only the
    pieces its own devices need, each checked against its own sha256.

    **Arguments:**

    - `path`: The checkpoint file.
    - `like`: A pytree shaped like the saved one. Its array leaves may be arrays or
        `jax.ShapeDtypeStruct`s, e.g. from `eqx.filter_eval_shape(make_state)`, so a
        resumed run need not build the real thing first.

    **Returns:**

    A pytree with `like`'s structure. A leaf that is a NumPy array in `like` comes
    back as a NumPy array; a JAX array or `ShapeDtypeStruct` as a JAX array, placed
    with `like`'s sharding when it has one (else on the default device).

    **Raises:**

    `FileNotFoundError` if `path` does not exist. `CheckpointError` (naming the file
    and the problem) for a truncated, corrupted or foreign file, or one whose leaves
    do not match `like`: a missing or extra leaf path, a shape, dtype or key
    implementation that differs.

    !!! Example

        ```python
        import pathlib, tempfile

        path = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        model = eqx.nn.Linear(2, 3, key=jr.key(0))
        eqx_rng.save(path, model)
        like = eqx.filter_eval_shape(eqx.nn.Linear, 2, 3, key=jr.key(1))
        back = eqx_rng.load(path, like)
        assert jnp.array_equal(back.weight, model.weight)
        ```
    """
    return load_file(Path(path), like)[0]


@typecheck
def load_metadata(path: str | os.PathLike) -> dict:
    """The metadata stored in a checkpoint, with the library's entries.

    Checks the whole file as `load` does (its size and the checksums of the
    header and of the payload), so a corrupted file is never reported as readable;
    the arrays are streamed through the checksum in chunks, never held in memory.

    **Arguments:**

    - `path`: The checkpoint file.

    **Returns:**

    A new dict: the `metadata` given to `save` (as JSON gives it back: tuples become
    lists, keys strings) plus the key `"eqx_rng"`, a dict with `format_version`,
    `eqx_rng_version`, `jax_version`, `jaxlib_version`, `equinox_version`,
    `numpy_version`, `saved_at` (ISO 8601, UTC), `doctor` (`eqx_rng.debug.doctor()`
    at save time) and, for files written by `CheckpointManager`, `step`.

    **Raises:**

    `FileNotFoundError` if `path` does not exist; `CheckpointError` for a truncated,
    corrupted or foreign file.

    !!! Example

        ```python
        import pathlib, tempfile

        path = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        eqx_rng.save(path, {"w": jnp.zeros(2)}, metadata={"epoch": 3})
        meta = eqx_rng.load_metadata(path)
        assert meta["epoch"] == 3 and meta["eqx_rng"]["format_version"] == 2
        ```
    """
    path = Path(path)
    with open_file(path) as f:
        _, header = read_header(f, path, os.fstat(f.fileno()).st_size)
        read_payload(f, path, header, [])
    metadata = dict(header["metadata"])
    metadata[LIBRARY_KEY] = header.get(LIBRARY_KEY, {})
    return metadata
