"""Debugging helpers: JAX's key-reuse checker, and a record of the environment."""

import contextlib
import functools
import os
import platform
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.random as jr

from ._derive_reuse import derive_scope
from ._typecheck import typecheck, typecheck_enabled
from ._util import dist_version

_LEGACY_KEY_MSG = (
    "Make a typed key with `jax.random.key(seed)`, or convert a legacy one with "
    "`eqx_rng.as_key(legacy_key)`.\n`jax.random.PRNGKey` was called inside "
    "`eqx_rng.debug.key_reuse()`, which refuses legacy `uint32[2]` keys because "
    "JAX's key-reuse checker cannot track them."
)

_guard_lock = threading.Lock()
_guard_depth = 0
_original_prng_key: Any = None


def _refusing_prng_key(original: Any) -> Any:
    @functools.wraps(original)
    def prng_key(*args, **kwargs):
        # The guard is installed process-wide, but it only refuses where this
        # thread's `jax_legacy_prng_key` setting (which `key_reuse` sets) says so.
        if jax.legacy_prng_key.value == "error":
            raise ValueError(_LEGACY_KEY_MSG)
        return original(*args, **kwargs)

    return prng_key


@contextlib.contextmanager
def _guard_prng_key() -> Iterator[None]:
    global _guard_depth, _original_prng_key
    with _guard_lock:
        if _guard_depth == 0:
            _original_prng_key = jr.PRNGKey
            jr.PRNGKey = _refusing_prng_key(_original_prng_key)
        _guard_depth += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_depth -= 1
            if _guard_depth == 0:
                jr.PRNGKey = _original_prng_key
                _original_prng_key = None


@contextlib.contextmanager
def key_reuse() -> Iterator[None]:
    """Turn on JAX's key-reuse checker, and refuse legacy keys, inside a `with` block.

    Inside the block:

    - `jax_debug_key_reuse` is on: passing a typed key to a second consuming
        operation (`jr.normal(k)` twice, a key used after `jr.split(k)`), eagerly or
        inside `jit`, raises `jax.errors.KeyReuseError`. `fold_in` does not consume,
        so `eqx_rng.derive`, `grid_keys` and friends are legitimate.
    - `jax_legacy_prng_key` is `"error"`: a legacy `uint32[2]` key passed to a
        `jax.random` function raises `ValueError`, and so does `jax.random.PRNGKey`
        itself, because the checker cannot see reuse of legacy keys.
    - Reuse by derivation is caught: `eqx_rng.derive` returns the same key object
        for the same parent key and path item (by value for concrete keys and
        items, by identity within a trace), so two draws from keys derived by one
        path (`derive(k, "dropout1")` handed to two layers, one step key used for
        two steps) are two draws from one key. Deriving a path twice and drawing
        once is fine; distinct paths are fine. A `KeyReuseError` that leaves the
        block is re-raised as a subclass whose message lists the paths derived
        more than once (newest first). A `scan` body that draws from
        `derive(k, "noise")` with a closed-over `k` (the same key at every step)
        raises too; fold in the step index instead.
        The block remembers every key it derived, so its memory grows with the
        number of distinct derivations: run a few steps under it, not a whole
        training run. Not seen: a key derived inside a compiled program from the
        program's arguments is new at every call, so a jitted step called twice
        with the same step number is not caught.

    Both settings are restored on exit, also when the block raises. Blocks nest. The
    settings are thread-local, as JAX's own context managers are. The checker makes
    eager code slower: use it to debug, not in production runs. Code that imported
    `PRNGKey` by name (`from jax.random import PRNGKey`) before the block is not
    refused, but its keys still are when passed to `jax.random`.

    Usable as a decorator too (`@eqx_rng.debug.key_reuse()`).

    **Raises:**

    Inside the block: `jax.errors.KeyReuseError` on reuse of a typed key (also by
    derivation); `ValueError` for a legacy key.

    !!! Example

        ```python
        with eqx_rng.debug.key_reuse():
            noise_key, drop_key = jr.split(jr.key(0))
            x = jr.normal(noise_key, (3,))
            caught = False
            try:
                jr.normal(noise_key, (3,))  # noise_key is used a second time
            except jax.errors.KeyReuseError:
                caught = True
            assert caught

        def two_layers(x, key):
            drop = eqx_rng.derive(key, "dropout1")
            again = eqx_rng.derive(key, "dropout1")  # copy-pasted path
            return jr.bernoulli(drop, 0.5, x.shape) * jr.bernoulli(again, 0.5, x.shape)

        caught = False
        try:
            with eqx_rng.debug.key_reuse():
                jax.jit(two_layers)(jnp.ones(3), jr.key(0))
        except jax.errors.KeyReuseError as e:
            caught = "'dropout1'" in str(e)
        assert caught
        ```
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.debug_key_reuse(True))
        stack.enter_context(jax.legacy_prng_key("error"))
        stack.enter_context(_guard_prng_key())
        stack.enter_context(derive_scope())
        yield


_CPUINFO = "/proc/cpuinfo"

# Instruction-set extensions that decide which kernels XLA's CPU backend emits, and
# so the last bits of float reductions (x86 and ARM names as Linux spells them).
_SIMD_FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "asimd",
    "neon",
    "sve",
    "sve2",
)


def _read_cpuinfo(path: str) -> tuple[str | None, list[str]]:
    """The first CPU's model name and feature flags from a Linux `/proc/cpuinfo`
    (`flags` on x86, `Features` on ARM); `(None, [])` where there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1_000_000)
    except OSError:
        return None, []
    model, flags = None, []
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip().lower()
        if model is None and name in ("model name", "cpu model", "hardware"):
            model = value.strip() or None
        elif not flags and name in ("flags", "features"):
            flags = sorted(set(value.split()))
    return model, flags


def cpu_info(path: str = _CPUINFO) -> dict[str, Any]:
    """The CPU model and its instruction-set features, JSON-serialisable; never
    raises (missing fields are `None` or empty)."""
    model, flags = _read_cpuinfo(path)
    return {
        "model": model or platform.processor() or None,
        "machine": platform.machine() or None,
        "count": os.cpu_count(),
        "simd": [f for f in _SIMD_FLAGS if f in flags],
        "flags": flags,
    }


def _device(d: Any) -> dict[str, Any]:
    return {
        "id": int(d.id),
        "platform": str(d.platform),
        "device_kind": str(d.device_kind),
        "process_index": int(d.process_index),
    }


@typecheck
def doctor() -> dict[str, Any]:
    """A JSON-serialisable record of everything that decides which numbers are drawn.

    Store it with every experiment's results: versions (a JAX upgrade may change the
    bits of a draw), the PRNG implementation, `jax_threefry_partitionable` (it changes
    `jr.split` and draws from one key of a large shape; eqx_rng's index-derived keys
    do not depend on it), x64, the legacy-key setting and the devices.

    **Returns:**

    A `dict` with the keys `jax_version`, `jaxlib_version`, `equinox_version`,
    `eqx_rng_version`, `optax_version`, `jaxtyping_version`, `beartype_version`,
    `numpy_version` (`None` when a package is not installed), `python`, `platform`,
    `backend`, `device_count`, `local_device_count`, `process_index`,
    `process_count`, `devices` (a list of dicts with `id`, `platform`,
    `device_kind`, `process_index`), `prng_impl`, `threefry_partitionable`, `x64`,
    `legacy_prng_key`, `debug_key_reuse`, `default_matmul_precision`, `typecheck`
    (whether `eqx_rng.typecheck` checks calls), `xla_flags` and `jax_platforms`
    (the environment variables, or `None`), and `cpu`: a dict with `model` (from
    `/proc/cpuinfo` on Linux, else `platform.processor()`, or `None`), `machine`
    (`platform.machine()`), `count` (logical CPUs), `flags` (every ISA feature flag
    Linux lists, sorted; empty elsewhere) and `simd` (the vector extensions among
    them: `avx2`, `avx512f`, `asimd`, ...). Two machines with the same versions but
    different vector extensions may differ in the last bits of float results (XLA
    picks kernels by ISA), so bitwise claims hold on the same machine type.

    !!! Example

        ```python
        import json

        info = eqx_rng.debug.doctor()
        record = json.dumps(info, indent=2)  # store it beside the results
        assert info["prng_impl"] == "threefry2x32"
        assert isinstance(info["cpu"]["simd"], list)  # e.g. ["avx2", "fma", ...]
        ```
    """
    precision = jax.default_matmul_precision.value
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": dist_version("jaxlib"),
        "equinox_version": dist_version("equinox"),
        "eqx_rng_version": dist_version("eqx_rng"),
        "optax_version": dist_version("optax"),
        "jaxtyping_version": dist_version("jaxtyping"),
        "beartype_version": dist_version("beartype"),
        "numpy_version": dist_version("numpy"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": [_device(d) for d in jax.devices()],
        "prng_impl": str(jax.default_prng_impl.value),
        "threefry_partitionable": bool(jax.threefry_partitionable.value),
        "x64": bool(jax.enable_x64.value),
        "legacy_prng_key": str(jax.legacy_prng_key.value),
        "debug_key_reuse": bool(jax.debug_key_reuse.value),
        "default_matmul_precision": None if precision is None else str(precision),
        "typecheck": typecheck_enabled(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "jax_platforms": os.environ.get("JAX_PLATFORMS"),
        "cpu": cpu_info(),
    }
