"""Pytree leaves as header records, and back: dtypes, typed keys, weak types.

Each header leaf entry holds the leaf's key path (`jax.tree_util.keystr`), dtype,
shape, offset and size (and whether it is weakly typed, as `jnp.asarray(0.5)` is);
a typed PRNG key array is stored as its `jr.key_data` with the key implementation's
name (`jr.key_impl`), and becomes a typed key array again on load. Only array
leaves are stored: everything else (the tree structure, activation functions, Python
numbers, static fields) comes from the `like` tree given to `load`.
"""

import datetime as dt
import functools
import json
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer

from .._util import dist_version, is_typed_key
from ._format import FORMAT_VERSION, err

LIBRARY_KEY = "eqx_rng"


def is_like_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


@functools.lru_cache(maxsize=256)
def dtype_name(dtype: Any) -> str:
    """The name stored for `dtype` (looked up once per dtype: NumPy's `.name` and
    `issubdtype` cost tens of microseconds per call, per leaf of every save)."""
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return str(dtype)
    return np.dtype(dtype).name


def array_leaves(tree: Any, fn: str) -> list[tuple[str, Any]]:
    """`(key path, leaf)` of every array leaf of `tree`; tracers are refused."""
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


def like_leaves(like: Any) -> list[tuple[str, Any]]:
    return [
        (jtu.keystr(p), leaf)
        for p, leaf in jtu.tree_flatten_with_path(like)[0]
        if is_like_array(leaf)
    ]


@functools.lru_cache(maxsize=256)
def storable(dtype: np.dtype) -> bool:
    """A numeric dtype that JAX knows by name (bfloat16 and float8 included);
    looked up once per dtype."""
    if dtype.kind in "OUSMm" or dtype.fields is not None:
        return False
    try:
        return np.dtype(jnp.dtype(dtype.name)) == dtype.newbyteorder("=")
    except TypeError:
        return False


def is_weak(leaf: Any) -> bool:
    aval = getattr(leaf, "aval", None)
    return bool(getattr(aval, "weak_type", False))


def make_weak(x: jax.Array) -> jax.Array:
    """`x` as a weakly typed array (as `jnp.asarray(0.5)` is), so that a restored
    leaf promotes, and compiles, exactly as the saved one did.

    JAX has no public function for this (`lax.convert_element_type` always gives a
    strong type), so the private `_convert_element_type` is used, here only.
    `tests/test_checkpoint.py::test_make_weak_uses_a_jax_function_that_exists`
    fails if a JAX release removes or changes it; until it is fixed, restored leaves
    would come back strongly typed (values unchanged).
    """
    try:
        from jax._src.lax import lax as lax_internal

        convert = lax_internal._convert_element_type
    except (ImportError, AttributeError):  # pragma: no cover - tested loudly
        return x
    return convert(x, x.dtype, weak_type=True)  # type: ignore[return-value]


def record_for(name: str, leaf: Any, data: Any, impl: str | None) -> dict:
    """The header entry of an array leaf whose bytes to store are `data`."""
    record: dict[str, Any] = {
        "path": name,
        "dtype": dtype_name(leaf.dtype),
        "shape": list(leaf.shape),
    }
    if is_weak(leaf):
        record["weak_type"] = True
    if impl is not None:
        record["key_impl"] = impl
        record["data_dtype"] = dtype_name(data.dtype)
        record["data_shape"] = list(data.shape)
    return record


def host_bytes(name: str, data: np.ndarray) -> np.ndarray:
    """`data` checked to be storable, little-endian and C-contiguous."""
    if not storable(data.dtype):
        raise TypeError(
            f"`eqx_rng.save`: leaf `{name}` has dtype {data.dtype}, which is not "
            "a numeric array dtype."
        )
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return np.ascontiguousarray(data)


def to_host(leaf: Any) -> tuple[np.ndarray, str | None]:
    """The array to write for a fully addressable `leaf`, and its key
    implementation (for keys)."""
    if is_typed_key(leaf):
        return np.asarray(jr.key_data(leaf)), str(jr.key_impl(leaf))
    return np.asarray(leaf), None


@functools.cache
def _versions() -> dict[str, Any]:
    # Looked up once per process (each lookup parses package metadata).
    return {
        "eqx_rng_version": dist_version("eqx_rng"),
        "jax_version": jax.__version__,
        "jaxlib_version": dist_version("jaxlib"),
        "equinox_version": dist_version("equinox"),
        "numpy_version": np.__version__,
    }


_DOCTOR: dict[tuple, dict[str, Any]] = {}


def _doctor() -> dict[str, Any]:
    """`eqx_rng.debug.doctor()`, computed once per process for each combination of
    the settings in it that can change at run time (it takes ~0.1 s: package
    metadata and platform lookups), so that saving a small checkpoint stays cheap.
    `tests/test_checkpoint_manager.py` checks it against a fresh `doctor()`."""
    from .. import debug

    settings = (
        str(jax.default_prng_impl.value),
        bool(jax.threefry_partitionable.value),
        bool(jax.enable_x64.value),
        str(jax.legacy_prng_key.value),
        bool(jax.debug_key_reuse.value),
        str(jax.default_matmul_precision.value),
        os.environ.get("XLA_FLAGS"),
        os.environ.get("JAX_PLATFORMS"),
    )
    if settings not in _DOCTOR:
        _DOCTOR[settings] = debug.doctor()
    return json.loads(json.dumps(_DOCTOR[settings]))  # a copy


def library_entries(extra: dict[str, Any] | None) -> dict[str, Any]:
    entries: dict[str, Any] = {"format_version": FORMAT_VERSION, **_versions()}
    entries["saved_at"] = dt.datetime.now(dt.UTC).isoformat()
    entries["doctor"] = _doctor()
    entries.update(extra or {})
    return entries


def check_metadata(metadata: Any) -> Any:
    """`metadata` as JSON gives it back, after checking it."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(
            f"`eqx_rng.save(..., metadata=...)` takes a dict, got "
            f"{type(metadata).__name__}."
        )
    if LIBRARY_KEY in metadata:
        raise ValueError(
            f"`eqx_rng.save(..., metadata=...)`: the key {LIBRARY_KEY!r} is reserved "
            "for the library's own entries; rename yours."
        )
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`eqx_rng.save(..., metadata=...)` must be JSON-serialisable: {e}. "
            "Convert arrays with `.tolist()` or `float(...)` first."
        ) from None


# --------------------------------------------------------------------------------
# Matching a file's records to `like`.


def _describe_leaf(leaf: Any) -> str:
    kind = "keys" if is_typed_key(leaf) else "array"
    return f"{kind} of shape {tuple(leaf.shape)} and dtype {dtype_name(leaf.dtype)}"


def _short(paths: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(f"`{p}`" for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def match(path: Path, like: list[tuple[str, Any]], records: list) -> None:
    """Raise `CheckpointError` unless `records` describe `like`'s array leaves."""
    like_paths = [p for p, _ in like]
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
        raise err(
            path,
            "does not match the structure of `like`: it "
            + "; ".join(parts)
            + ". Build `like` the way the saved tree was built (same model, "
            "optimizer and state).",
        )
    for (name, leaf), record in zip(like, records, strict=True):
        shape = tuple(record["shape"])
        dtype = record["dtype"]
        file_is_key = "key_impl" in record
        if is_typed_key(leaf) != file_is_key or dtype_name(leaf.dtype) != dtype:
            found = (
                f"keys of dtype {dtype} (implementation {record['key_impl']!r})"
                if file_is_key
                else f"dtype {dtype}"
            )
            raise err(
                path,
                f"does not match `like` at leaf `{name}`: `like` has "
                f"{_describe_leaf(leaf)}, the file has {found}.",
            )
        if tuple(leaf.shape) != shape:
            raise err(
                path,
                f"does not match `like` at leaf `{name}`: `like` has shape "
                f"{tuple(leaf.shape)}, the file has shape {shape} (dtype {dtype}).",
            )


# --------------------------------------------------------------------------------
# Restoring a leaf.


def stored_layout(record: dict) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape of the bytes stored for `record` (key data for keys)."""
    is_key = "key_impl" in record
    name = record["data_dtype"] if is_key else record["dtype"]
    shape = tuple(record["data_shape"] if is_key else record["shape"])
    return np.dtype(jnp.dtype(name)), shape


def wrap_keys(path: Path, record: dict, data: Any, sharding: Any = None) -> Any:
    """Typed keys from their key data (`sharding`: that of the result, if given)."""
    impl = record["key_impl"]
    try:
        if sharding is None:
            return jr.wrap_key_data(data, impl=impl)
        wrap = jax.jit(partial(jr.wrap_key_data, impl=impl), out_shardings=sharding)
        return wrap(data)
    except (ValueError, TypeError, KeyError) as e:
        raise err(
            path,
            f"holds keys of an unknown implementation {impl!r} at "
            f"`{record['path']}`: {e}.",
        ) from None
