"""Where the per-call indices of `eqx_rng.vmap` live when the mapped axis is sharded.

Mapped call `i` gets `derive(key, i)` with `i` the global index along the mapped
axis. The indices are an `arange` over the whole axis, vmapped alongside the inputs;
when the inputs are split over `Explicit` mesh axes, the `arange` must be split the
same way (JAX requires every mapped input to be split alike). This module finds how
the inputs are split and places the indices to match.
"""

import threading
from typing import Any

import jax
import jax.numpy as jnp
from jax.core import Tracer
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Concrete meshes of the Explicit-sharded inputs of the `eqx_rng.vmap`s being run
# eagerly right now (innermost last): a nested `eqx_rng.vmap` sees only tracers, whose
# types name an abstract mesh, and needs the devices to place its per-call indices.
_eager_meshes = threading.local()


def _mapped_spec_entry(leaf: Any, axis: int) -> Any:
    """How the mapped axis of `leaf` is split over Explicit mesh axes (None: not)."""
    try:
        return jax.typeof(leaf).sharding.spec[axis]
    except (IndexError, TypeError, AttributeError):
        return None


def _describe_entry(entry: Any) -> str:
    if entry is None:
        return "not split over an Explicit mesh axis"
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    if len(names) == 1:
        return f"split over the Explicit mesh axis {names[0]!r}"
    return f"split over the Explicit mesh axes {' x '.join(map(repr, names))}"


def eager_mesh_stack() -> list[Mesh]:
    """The concrete meshes of the enclosing eager `eqx_rng.vmap` calls."""
    if not hasattr(_eager_meshes, "stack"):
        _eager_meshes.stack = []
    return _eager_meshes.stack


def _context_mesh() -> Mesh | None:
    """The concrete mesh of a `jax.set_mesh` context, outside `jit`; else None."""
    try:
        mesh = jax.sharding.get_mesh()
    except ValueError:  # inside `jit`: only the abstract mesh is known
        return None
    return None if mesh.empty else mesh


def mapped_split(
    leaves: list[Any], axes: list[Any], labels: list[str], name: str
) -> tuple[Any, str, Any]:
    """How the mapped inputs are split along the mapped axis over devices.

    Returns the `PartitionSpec` entry of the mapped axis (None when it is not split
    over `Explicit` mesh axes: unsharded arrays, `Auto` axes), the label of the first
    mapped leaf and the first leaf that is split (or None). `jax.vmap` requires every
    mapped input to be split alike; a mismatch is a `ValueError` naming both
    arguments.
    """
    first: tuple[Any, str] | None = None
    source = None
    for leaf, axis, where in zip(leaves, axes, labels, strict=True):
        if axis is None:
            continue
        entry = _mapped_spec_entry(leaf, axis)
        if first is None:
            first = (entry, where)
        elif entry != first[0]:
            raise ValueError(
                f"`eqx_rng.vmap({name})`: the mapped arguments must be split over "
                f"devices alike along the mapped axis, but {first[1]} is "
                f"{_describe_entry(first[0])} and {where} is "
                f"{_describe_entry(entry)}. Place them alike (for example "
                f"`eqx_rng.shard` both with the same `PartitionSpec`, or "
                f"`jax.sharding.reshard` inside `jit`), or build the mesh with "
                f"`Auto` axes (`eqx_rng.chain_mesh`), which need no match."
            )
        if source is None and entry is not None:
            source = leaf
    if first is None:
        return None, "", None
    return first[0], first[1], source


def _concrete_mesh_for(source: Any) -> Mesh | None:
    """The concrete mesh whose abstract mesh types `source`, if one is known."""
    abstract = jax.typeof(source).sharding.mesh
    concrete = None
    if not isinstance(source, Tracer):
        concrete = getattr(getattr(source, "sharding", None), "mesh", None)
    if isinstance(concrete, Mesh):
        return concrete
    candidates = [_context_mesh(), *reversed(eager_mesh_stack())]
    return next(
        (m for m in candidates if m is not None and m.abstract_mesh == abstract),
        None,
    )


def call_index(
    entry: Any, where: str, source: Any, axis_size: int, name: str
) -> tuple[jax.Array, Mesh | None]:
    """`arange(axis_size)`, split over devices like the mapped inputs.

    Not split (`entry` None: unsharded inputs, `Auto` mesh axes): a plain `arange`,
    as always. Split over `Explicit` mesh axes: the same `arange`, resharded to match
    (same values, so the same keys). Also returns the concrete mesh when the inputs
    are concrete arrays, for nested `eqx_rng.vmap`s run eagerly inside this one
    (they see only tracers).
    """
    index = jnp.arange(axis_size, dtype=jnp.uint32)
    if entry is None or source is None:
        return index, None
    concrete = _concrete_mesh_for(source)
    mesh = jax.typeof(source).sharding.mesh if concrete is None else concrete
    try:
        index = jax.sharding.reshard(index, NamedSharding(mesh, PartitionSpec(entry)))
    except ValueError as e:
        raise ValueError(
            f"`eqx_rng.vmap({name})(..., key=...)`: {where} is "
            f"{_describe_entry(entry)}, so the per-call key indices must be split the "
            f"same way, but outside `jit` the devices of that mesh are not known here "
            f"(the arguments are traced by an enclosing `jax.vmap`). Run the call "
            f"under `eqx.filter_jit` / `jax.jit`, inside `with jax.set_mesh(mesh):`, "
            f"or build the mesh with `Auto` axes (`eqx_rng.chain_mesh`)."
        ) from e
    return index, None if isinstance(source, Tracer) else concrete


__all__ = ["call_index", "eager_mesh_stack", "mapped_split"]
