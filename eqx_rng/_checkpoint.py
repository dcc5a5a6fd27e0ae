"""Checkpoints: atomic, checksummed files of a pytree's arrays, typed keys included.

File format (version 1), all integers little-endian:

```
offset 0   8 bytes   magic b"EQXRNGCK"
       8   uint32    format version (1)
      12   uint32    reserved (0)
      16   uint64    H, the length of the header
      24   32 bytes  sha256 of the header
      56   H bytes   header: UTF-8 JSON (leaves, metadata, library entries)
  56 + H   P bytes   payload: each array leaf's raw bytes, C order, little-endian,
                     each starting at a multiple of 64 (zero padding between)
56 + H + P 32 bytes  sha256 of the payload
```

Each header leaf entry holds the leaf's key path (`jax.tree_util.keystr`), dtype,
shape, offset and size (and whether it is weakly typed, as `jnp.asarray(0.5)` is);
a typed PRNG key array is stored as its `jr.key_data` with the key implementation's
name (`jr.key_impl`), and becomes a typed key array again on load. Only array
leaves are stored: everything else (the tree structure, activation functions, Python
numbers, static fields) comes from the `like` tree given to `load`.

A file is written to a temporary file in the same directory (`.{name}.{random}.tmp`),
flushed and `fsync`ed, renamed over `path` with `os.replace` (atomic), and the
directory is `fsync`ed: a crash at any moment leaves either the old file or the new
one at `path`, never a partial one.
"""

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer
from jaxtyping import PyTree

from ._typecheck import typecheck
from ._util import dist_version, is_typed_key

_MAGIC = b"EQXRNGCK"
_FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIQ32s")  # magic, version, reserved, header length, sha
_DIGEST_SIZE = 32
_ALIGN = 64
_MAX_HEADER = 1 << 32
_CHUNK = 1 << 20  # bytes read at a time when only verifying the payload
_TMP_SUFFIX = ".tmp"
_LIBRARY_KEY = "eqx_rng"
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: corrupted, or not matching `like`.

    Raised by `eqx_rng.load`, `eqx_rng.load_metadata` and
    `CheckpointManager.restore` for a truncated file, a flipped byte (the sha256
    checksums of the header and of the payload are checked), a file that is not an
    eqx_rng checkpoint, or one whose leaves do not match `like` (structure, shape,
    dtype, PRNG key implementation). The message names the file and the mismatch.
    A missing file is a `FileNotFoundError` instead. A subclass of `ValueError`.

    !!! Example

        ```python
        import pathlib, tempfile

        path = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        eqx_rng.save(path, {"w": jnp.zeros(3)})
        try:
            eqx_rng.load(path, {"w": jnp.zeros(4)})
        except eqx_rng.CheckpointError as e:
            assert "['w']" in str(e) and "(4,)" in str(e)
        ```
    """


# --------------------------------------------------------------------------------
# Leaves.


def _is_like_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _dtype_name(dtype: Any) -> str:
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return str(dtype)
    return np.dtype(dtype).name


def _array_leaves(tree: Any, fn: str) -> list[tuple[str, Any]]:
    out = []
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, Tracer):
            raise TypeError(
                f"`eqx_rng.{fn}` reads arrays from the host and cannot run inside "
                f"`jit`, `vmap` or `grad`; leaf `{jtu.keystr(path)}` is a tracer. "
                "Call it outside the transformed function."
            )
        if eqx.is_array(leaf):
            out.append((jtu.keystr(path), leaf))
    return out


def _to_host(name: str, leaf: Any) -> tuple[np.ndarray, str | None]:
    """The array to write for `leaf`, and its key implementation (for keys)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise ValueError(
            f"`eqx_rng.save`: leaf `{name}` is spread over several hosts (not fully "
            "addressable); gather it first with "
            "`jax.experimental.multihost_utils.process_allgather`, or save each "
            "host's part to its own file."
        )
    if is_typed_key(leaf):
        return np.asarray(jr.key_data(leaf)), str(jr.key_impl(leaf))
    return np.asarray(leaf), None


def _storable(dtype: np.dtype) -> bool:
    """A numeric dtype that JAX knows by name (bfloat16 and float8 included)."""
    if dtype.kind in "OUSMm" or dtype.fields is not None:
        return False
    try:
        return np.dtype(jnp.dtype(dtype.name)) == dtype.newbyteorder("=")
    except TypeError:
        return False


def _is_weak(leaf: Any) -> bool:
    aval = getattr(leaf, "aval", None)
    return bool(getattr(aval, "weak_type", False))


def _make_weak(x: jax.Array) -> jax.Array:
    """`x` as a weakly typed array (as `jnp.asarray(0.5)` is), so that a restored
    leaf promotes, and compiles, exactly as the saved one did. JAX has no public
    function for this; without the private one the array stays strongly typed."""
    try:
        from jax._src.lax import lax as lax_internal

        return lax_internal._convert_element_type(x, x.dtype, weak_type=True)  # type: ignore[return-value]
    except Exception:  # pragma: no cover - a JAX version without it
        return x


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


# --------------------------------------------------------------------------------
# Writing.


def _library_entries(extra: dict[str, Any] | None) -> dict[str, Any]:
    entries: dict[str, Any] = {
        "format_version": _FORMAT_VERSION,
        "eqx_rng_version": dist_version("eqx_rng"),
        "jax_version": jax.__version__,
        "jaxlib_version": dist_version("jaxlib"),
        "equinox_version": dist_version("equinox"),
        "numpy_version": np.__version__,
        "saved_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    try:
        from . import debug

        entries["doctor"] = debug.doctor()
    except Exception:  # pragma: no cover - doctor is best effort
        pass
    entries.update(extra or {})
    return entries


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse
        pass
    finally:
        os.close(fd)


def _save(
    path: Path,
    tree: Any,
    metadata: dict | None,
    library: dict[str, Any] | None = None,
) -> Path:
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(
            f"`eqx_rng.save(..., metadata=...)` takes a dict, got "
            f"{type(metadata).__name__}."
        )
    if _LIBRARY_KEY in metadata:
        raise ValueError(
            f"`eqx_rng.save(..., metadata=...)`: the key {_LIBRARY_KEY!r} is reserved "
            "for the library's own entries; rename yours."
        )
    try:
        metadata_json = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`eqx_rng.save(..., metadata=...)` must be JSON-serialisable: {e}. "
            "Convert arrays with `.tolist()` or `float(...)` first."
        ) from None

    leaves = _array_leaves(tree, "save")
    host = []
    records = []
    offset = 0
    for name, leaf in leaves:
        data, impl = _to_host(name, leaf)
        if not _storable(data.dtype):
            raise TypeError(
                f"`eqx_rng.save`: leaf `{name}` has dtype {data.dtype}, which is not "
                "a numeric array dtype."
            )
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        data = np.ascontiguousarray(data)
        record: dict[str, Any] = {
            "path": name,
            "dtype": _dtype_name(leaf.dtype),
            "shape": list(leaf.shape),
            "offset": offset,
            "nbytes": int(data.nbytes),
        }
        if _is_weak(leaf):
            record["weak_type"] = True
        if impl is not None:
            record["key_impl"] = impl
            record["data_dtype"] = _dtype_name(data.dtype)
            record["data_shape"] = list(data.shape)
        records.append(record)
        host.append(data)
        offset = _align(offset + data.nbytes)
    payload_nbytes = offset

    header = {
        "format": "eqx_rng checkpoint",
        "leaves": records,
        "payload_nbytes": payload_nbytes,
        "metadata": metadata_json,
        _LIBRARY_KEY: _library_entries(library),
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    prefix = _PREFIX.pack(
        _MAGIC,
        _FORMAT_VERSION,
        0,
        len(header_bytes),
        hashlib.sha256(header_bytes).digest(),
    )

    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix)
            f.write(header_bytes)
            digest = hashlib.sha256()
            written = 0
            for record, data in zip(records, host, strict=True):
                pad = record["offset"] - written
                if pad:
                    f.write(bytes(pad))
                    digest.update(bytes(pad))
                raw = data.reshape(-1).view(np.uint8)
                f.write(raw)
                digest.update(raw)
                written = record["offset"] + record["nbytes"]
            pad = payload_nbytes - written
            if pad:
                f.write(bytes(pad))
                digest.update(bytes(pad))
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)
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
    `like` tree). The file carries sha256 checksums of its header and payload. The
    write is atomic: a temporary file in the same directory is written, flushed and
    `fsync`ed, then renamed over `path` (`os.replace`) and the directory `fsync`ed,
    so a crash leaves either the previous file or the new one at `path`.

    **Arguments:**

    - `path`: The file to write (its directory must exist). Replaced if present.
    - `tree`: Any pytree, e.g. a `TrainState`. Arrays must be on this host (not
        spread over several processes) and not tracers.
    - `metadata`: A JSON-serialisable dict stored in the header (read it back with
        `load_metadata`). The key `"eqx_rng"` is reserved. (Keyword only argument.)

    **Returns:**

    `path`, as a `pathlib.Path`.

    **Raises:**

    `TypeError` for non-JSON metadata, a tracer or a non-numeric array;
    `ValueError` for the reserved metadata key; `OSError` from the filesystem.

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
    return _save(Path(path), tree, metadata)


# --------------------------------------------------------------------------------
# Reading.


def _err(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"Checkpoint file '{path}' {problem}")


def _read_header(f: Any, path: Path, size: int) -> dict[str, Any]:
    prefix = f.read(_PREFIX.size)
    if len(prefix) >= len(_MAGIC) and prefix[: len(_MAGIC)] != _MAGIC:
        raise _err(
            path,
            f"is not an eqx_rng checkpoint: it starts with {prefix[:8]!r}, not "
            f"{_MAGIC!r}.",
        )
    if len(prefix) < _PREFIX.size:
        raise _err(
            path,
            f"is truncated: {size} bytes, shorter than the {_PREFIX.size}-byte "
            "prefix of an eqx_rng checkpoint.",
        )
    magic, version, _, header_len, header_sha = _PREFIX.unpack(prefix)
    if version != _FORMAT_VERSION:
        raise _err(
            path,
            f"has format version {version}; this eqx_rng reads version "
            f"{_FORMAT_VERSION} (a newer eqx_rng wrote it, or the file is corrupted).",
        )
    if header_len > _MAX_HEADER or _PREFIX.size + header_len > size:
        raise _err(
            path,
            f"is truncated or corrupted: its header claims {header_len} bytes but "
            f"the file has {size} bytes in all.",
        )
    header_bytes = f.read(header_len)
    if hashlib.sha256(header_bytes).digest() != header_sha:
        raise _err(
            path,
            "is corrupted: the sha256 checksum of its header does not match.",
        )
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        _ = header["leaves"], header["payload_nbytes"], header["metadata"]
    except (ValueError, KeyError, TypeError) as e:  # pragma: no cover - checksummed
        raise _err(path, f"has an unreadable header: {e}.") from None
    expected = _PREFIX.size + header_len + header["payload_nbytes"] + _DIGEST_SIZE
    if size < expected:
        raise _err(
            path,
            f"is truncated: {size} bytes, expected {expected} (an interrupted copy? "
            "eqx_rng.save itself never leaves a partial file).",
        )
    if size > expected:
        raise _err(
            path,
            f"is corrupted: {size} bytes, expected {expected} (extra bytes at the "
            "end).",
        )
    return header


def _open(path: Path) -> Any:
    if path.is_dir():
        raise _err(path, "is a directory, not a checkpoint file.")
    return open(path, "rb")


def _describe_leaf(leaf: Any) -> str:
    kind = "keys" if is_typed_key(leaf) else "array"
    return f"{kind} of shape {tuple(leaf.shape)} and dtype {_dtype_name(leaf.dtype)}"


def _match(path: Path, like_leaves: list[tuple[str, Any]], records: list) -> None:
    like_paths = [p for p, _ in like_leaves]
    file_paths = [r["path"] for r in records]
    if like_paths != file_paths:
        only_like = [p for p in like_paths if p not in set(file_paths)]
        only_file = [p for p in file_paths if p not in set(like_paths)]
        parts = [f"has {len(file_paths)} array leaves and `like` has {len(like_paths)}"]
        if only_like:
            parts.append(f"in `like` only: {_short(only_like)}")
        if only_file:
            parts.append(f"in the file only: {_short(only_file)}")
        if not only_like and not only_file:
            parts.append("the same leaf paths in another order")
        raise _err(
            path,
            "does not match the structure of `like`: it "
            + "; ".join(parts)
            + ". Build `like` the way the saved tree was built (same model, "
            "optimizer and state).",
        )
    for (name, leaf), record in zip(like_leaves, records, strict=True):
        shape = tuple(record["shape"])
        dtype = record["dtype"]
        file_is_key = "key_impl" in record
        if is_typed_key(leaf) != file_is_key or _dtype_name(leaf.dtype) != dtype:
            found = (
                f"keys of dtype {dtype} (implementation {record['key_impl']!r})"
                if file_is_key
                else f"dtype {dtype}"
            )
            raise _err(
                path,
                f"does not match `like` at leaf `{name}`: `like` has "
                f"{_describe_leaf(leaf)}, the file has {found}.",
            )
        if tuple(leaf.shape) != shape:
            raise _err(
                path,
                f"does not match `like` at leaf `{name}`: `like` has shape "
                f"{tuple(leaf.shape)}, the file has shape {shape} (dtype {dtype}).",
            )


def _short(paths: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(f"`{p}`" for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _check_payload(path: Path, complete: bool, digest: bytes, stored: bytes) -> None:
    if not complete:
        raise _err(path, "is truncated (it changed while being read?).")
    if digest != stored:
        raise _err(
            path,
            "is corrupted: the sha256 checksum of its payload does not match (a "
            "flipped or overwritten byte).",
        )


def _read_payload(f: Any, path: Path, header: dict[str, Any]) -> bytes:
    """The payload, read whole (`f` is just past the header), its checksum verified."""
    nbytes = header["payload_nbytes"]
    payload = f.read(nbytes)
    stored = f.read(_DIGEST_SIZE)
    complete = len(payload) == nbytes and len(stored) == _DIGEST_SIZE
    _check_payload(path, complete, hashlib.sha256(payload).digest(), stored)
    return payload


def _verify_payload(f: Any, path: Path, header: dict[str, Any]) -> None:
    """Verify the payload's checksum (`f` is just past the header), reading it in
    chunks of `_CHUNK` bytes rather than all at once."""
    remaining = header["payload_nbytes"]
    digest = hashlib.sha256()
    while remaining > 0:
        chunk = f.read(min(remaining, _CHUNK))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)
    stored = f.read(_DIGEST_SIZE)
    complete = remaining == 0 and len(stored) == _DIGEST_SIZE
    _check_payload(path, complete, digest.digest(), stored)


def _restore_leaf(path: Path, payload: bytes, record: dict, like: Any) -> Any:
    is_key = "key_impl" in record
    dtype_name = record["data_dtype"] if is_key else record["dtype"]
    shape = tuple(record["data_shape"] if is_key else record["shape"])
    try:
        dtype = np.dtype(jnp.dtype(dtype_name))
        count = int(np.prod(shape, dtype=np.int64))
        data = np.frombuffer(payload, dtype, count, record["offset"]).reshape(shape)
    except (TypeError, ValueError) as e:  # pragma: no cover - checksummed
        raise _err(path, f"has an unreadable leaf `{record['path']}`: {e}.") from None
    if isinstance(like, np.ndarray):
        return data.copy()
    if isinstance(like, np.generic):
        return data[()].copy()
    sharding = getattr(like, "sharding", None)
    if is_key:
        try:
            value = jr.wrap_key_data(jnp.asarray(data), impl=record["key_impl"])
        except Exception as e:
            raise _err(
                path,
                f"holds keys of an unknown implementation {record['key_impl']!r} at "
                f"`{record['path']}`: {e}.",
            ) from None
        if sharding is not None:
            value = jax.device_put(value, sharding)
        return value
    value = jnp.asarray(data)
    if record.get("weak_type", False):
        value = _make_weak(value)
    if sharding is not None:
        value = jax.device_put(value, sharding)
    return value


@typecheck
def load(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Read a checkpoint written by `save` into the structure of `like`.

    The file's array leaves are matched to the array leaves of `like` by key path;
    every shape, dtype and PRNG key implementation must agree. Everything that is not
    an array in `like` (the structure, functions, Python numbers, static fields) is
    taken from `like` unchanged. Both checksums are verified before anything is
    returned: a corrupted file is never read as garbage.

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
    path = Path(path)
    like_leaves = [
        (jtu.keystr(p), leaf)
        for p, leaf in jtu.tree_flatten_with_path(like)[0]
        if _is_like_array(leaf)
    ]
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        header = _read_header(f, path, size)
        records = header["leaves"]
        _match(path, like_leaves, records)
        payload = _read_payload(f, path, header)
    leaves, treedef = jtu.tree_flatten(like)
    records_iter = iter(records)
    out = []
    for leaf in leaves:
        if _is_like_array(leaf):
            out.append(_restore_leaf(path, payload, next(records_iter), leaf))
        else:
            out.append(leaf)
    return jtu.tree_unflatten(treedef, out)


@typecheck
def load_metadata(path: str | os.PathLike) -> dict:
    """The metadata stored in a checkpoint, with the library's entries.

    Checks the whole file as `load` does (its size and the sha256 checksums of the
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
        assert meta["epoch"] == 3 and meta["eqx_rng"]["format_version"] == 1
        ```
    """
    path = Path(path)
    with _open(path) as f:
        header = _read_header(f, path, os.fstat(f.fileno()).st_size)
        _verify_payload(f, path, header)
    metadata = dict(header["metadata"])
    metadata[_LIBRARY_KEY] = header.get(_LIBRARY_KEY, {})
    return metadata


# --------------------------------------------------------------------------------
# A directory of checkpoints.

_SUFFIX = ".ckpt"


def _step_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"(\d+)" + re.escape(_SUFFIX) + r"\Z")


def _steps(directory: Path, prefix: str) -> list[tuple[int, Path]]:
    pattern = _step_pattern(prefix)
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        m = pattern.match(name)
        if m is not None:
            found.append((int(m.group(1)), directory / name))
    found.sort()
    return found


@typecheck
def latest_checkpoint(
    directory: str | os.PathLike, *, prefix: str = "step_"
) -> Path | None:
    """The checkpoint of the highest step in `directory`, or `None`.

    Looks for files named `{prefix}{step}.ckpt` (as `CheckpointManager` writes them);
    anything else, such as the temporary files of a save interrupted by a crash, is
    ignored. Since `save` is atomic, every file it finds is complete.

    **Arguments:**

    - `directory`: The directory (a missing one has no checkpoints).
    - `prefix`: The file name prefix. (Keyword only argument.)

    **Returns:**

    A `pathlib.Path`, or `None` when there is no checkpoint.

    !!! Example

        ```python
        import tempfile

        directory = tempfile.mkdtemp()
        assert eqx_rng.latest_checkpoint(directory) is None
        manager = eqx_rng.CheckpointManager(directory)
        manager.save(10, {"w": jnp.zeros(2)})
        assert eqx_rng.latest_checkpoint(directory).name == "step_0000000010.ckpt"
        ```
    """
    steps = _steps(Path(directory), prefix)
    return steps[-1][1] if steps else None


class CheckpointManager:
    """Numbered checkpoints in one directory: save every so often, keep the last few.

    Files are named `{prefix}{step:010d}.ckpt` and written with `eqx_rng.save`
    (atomic, checksummed). After each save only the `keep` newest are kept. On
    creation, temporary files left in the directory by a save that a crash
    interrupted are removed (they never hold the only copy of anything: the rename
    that would have published them did not happen). One writer per directory.

    A run that resumes from `restore` is bitwise identical to one that never stopped:
    a `TrainState` holds everything a step depends on.

    !!! Example

        ```python
        import tempfile, optax

        directory = tempfile.mkdtemp()
        manager = eqx_rng.CheckpointManager(directory, keep=2)
        model = eqx.nn.Linear(2, 1, key=jr.key(0))
        ts = eqx_rng.TrainState.create(model, optax.sgd(0.1), key=1)
        for step in (0, 5, 10):
            manager.save(step, ts)
        assert manager.steps() == [5, 10]

        # Resuming: build a fresh state (or its shapes), then restore into it.
        if manager.latest() is not None:
            ts = manager.restore(ts)
        ```
    """

    @typecheck
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int | None = 3,
        prefix: str = "step_",
    ):
        """**Arguments:**

        - `directory`: Where the checkpoints go; created (with parents) if missing.
        - `keep`: How many of the newest checkpoints to keep (`>= 1`), or `None` to
            keep all. (Keyword only argument.)
        - `prefix`: The file name prefix. (Keyword only argument.)

        **Raises:**

        `ValueError` for `keep < 1` or a prefix containing a path separator.
        """
        if keep is not None and (isinstance(keep, bool) or keep < 1):
            raise ValueError(
                f"`CheckpointManager(keep=...)` must be an int >= 1 or None, got "
                f"{keep!r}."
            )
        if not prefix or os.sep in prefix or (os.altsep and os.altsep in prefix):
            raise ValueError(
                f"`CheckpointManager(prefix=...)` must be a non-empty file name "
                f"prefix without path separators, got {prefix!r}."
            )
        self.directory = Path(directory)
        self.keep = keep
        self.prefix = prefix
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, keep={self.keep}, "
            f"prefix={self.prefix!r})"
        )

    def _remove_leftovers(self) -> None:
        pattern = re.compile(
            r"\."
            + re.escape(self.prefix)
            + r"\d+"
            + re.escape(_SUFFIX)
            + r"\.[0-9a-f]+"
            + re.escape(_TMP_SUFFIX)
            + r"\Z"
        )
        for name in os.listdir(self.directory):
            if pattern.match(name):
                try:
                    os.unlink(self.directory / name)
                except OSError:  # pragma: no cover - raced or not ours to remove
                    pass

    def path(self, step: int) -> Path:
        """The file for `step`: `directory / f"{prefix}{step:010d}.ckpt"`."""
        return self.directory / f"{self.prefix}{int(step):010d}{_SUFFIX}"

    def steps(self) -> list[int]:
        """The steps that have a checkpoint, in increasing order."""
        return [s for s, _ in _steps(self.directory, self.prefix)]

    def latest(self) -> Path | None:
        """The newest checkpoint's path, or `None` when there is none."""
        return latest_checkpoint(self.directory, prefix=self.prefix)

    def save(self, step: Any, tree: PyTree, *, metadata: dict | None = None) -> Path:
        """Save `tree` as the checkpoint of `step`, then drop all but the `keep` newest.

        **Arguments:**

        - `step`: A non-negative int (or integer scalar array, e.g. `ts.step`).
        - `tree`: The pytree to save.
        - `metadata`: As for `eqx_rng.save`; `load_metadata` also reports the step
            under `["eqx_rng"]["step"]`. (Keyword only argument.)

        **Returns:**

        The path written.
        """
        step = _as_step(step)
        path = _save(self.path(step), tree, metadata, {"step": step})
        if self.keep is not None:
            for old_step, old_path in _steps(self.directory, self.prefix)[: -self.keep]:
                if old_step == step:
                    continue
                try:
                    os.unlink(old_path)
                except FileNotFoundError:  # pragma: no cover - raced
                    pass
        return path

    def restore(self, like: PyTree, *, step: Any = None) -> PyTree:
        """Load the newest checkpoint (or that of `step`) into the structure of `like`.

        **Arguments:**

        - `like`: As for `eqx_rng.load`.
        - `step`: A step to load instead of the newest. (Keyword only argument.)

        **Raises:**

        `FileNotFoundError` when there is no checkpoint (or none for `step`);
        `CheckpointError` as for `eqx_rng.load`.
        """
        if step is None:
            path = self.latest()
            if path is None:
                raise FileNotFoundError(
                    f"No checkpoint named '{self.prefix}<step>{_SUFFIX}' in "
                    f"'{self.directory}'; check `manager.latest() is not None` "
                    "before restoring."
                )
        else:
            path = self.path(_as_step(step))
        return load(path, like)


def _as_step(step: Any) -> int:
    if isinstance(step, bool | np.bool_):
        raise TypeError(f"A checkpoint step must be an int, got {step!r}.")
    if isinstance(step, jax.Array | np.ndarray | np.integer):
        if np.shape(step) != () or not jnp.issubdtype(step.dtype, jnp.integer):
            raise TypeError(
                f"A checkpoint step must be an integer scalar, got shape "
                f"{np.shape(step)} and dtype {step.dtype}."
            )
        step = int(step)
    if not isinstance(step, int):
        raise TypeError(f"A checkpoint step must be an int, got {type(step).__name__}.")
    if step < 0:
        raise ValueError(f"A checkpoint step must be >= 0, got {step}.")
    return step


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "latest_checkpoint",
    "load",
    "load_metadata",
    "save",
]
