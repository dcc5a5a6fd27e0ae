"""Placing chain- and batch-batched pytrees on a device mesh.

Keys in eqx_rng come from `fold_in` of indices, so a draw depends only on its index,
never on which device computes it: a sharded program draws bitwise the same numbers as
the same program on one device.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.tree_util as jtu
from jax.core import Tracer
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from ._checkpoint._records import is_weak, make_weak
from ._key_trees import _is_array
from ._typecheck import typecheck

SpecLike = PartitionSpec | str | tuple | None
"""What `shard` accepts as `spec`: a `PartitionSpec` or its shorthand."""


def _as_spec(spec: Any) -> PartitionSpec:
    if isinstance(spec, PartitionSpec):
        return spec
    if spec is None:
        return PartitionSpec()
    if isinstance(spec, str):
        return PartitionSpec(spec)
    if isinstance(spec, tuple):
        return PartitionSpec(*spec)
    raise TypeError(
        f"`shard(spec=...)` takes a `PartitionSpec`, a mesh axis name or a tuple of "
        f"them, got {type(spec).__name__} {spec!r}; for example "
        f'`jax.sharding.PartitionSpec("chains")`, `"chains"` or `("chains", "batch")`.'
    )


_TRACED_MSG = (
    "`shard` places concrete arrays, but leaf `tree{path}` is traced (`shard` was "
    "called inside `jit`, `vmap` or `grad`); call `shard` on the inputs before the "
    "jitted call, or constrain inside with `jax.lax.with_sharding_constraint` (mesh "
    "axes of type `Auto`) or `jax.sharding.reshard` (type `Explicit`)."
)


def _entry_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axis names one `PartitionSpec` entry splits a dimension over."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _repeated(names: list) -> list:
    """The names that occur more than once in `names`, sorted."""
    return sorted({name for name in names if names.count(name) > 1})


def _check_axes(spec: PartitionSpec, mesh: Mesh) -> None:
    repeated = _repeated([name for entry in spec for name in _entry_axes(entry)])
    if repeated:
        raise ValueError(
            f"`shard(spec={spec})` uses the mesh axis {repeated[0]!r} more than "
            f"once; a mesh axis can split only one dimension, once. Name each mesh "
            f'axis at most once in `spec`, e.g. `("chains", None)`, or build a mesh '
            f"with one axis per dimension to split, e.g. "
            f'`eqx_rng.chain_mesh((-1, 1), ("chains", "batch"))`.'
        )
    for entry in spec:
        for name in _entry_axes(entry):
            if name not in mesh.axis_names:
                raise ValueError(
                    f"`shard(spec={spec})` names the mesh axis {name!r}, but `mesh` "
                    f"has the axes {tuple(mesh.axis_names)}; use one of those names "
                    f"in `spec`, or build the mesh with it, e.g. "
                    f"`eqx_rng.chain_mesh(axis_names={name!r})`."
                )


def _check_divides(path: Any, x: Any, spec: PartitionSpec, mesh_shape: dict) -> None:
    for dim, entry in enumerate(spec):
        axes = _entry_axes(entry)
        parts = math.prod(mesh_shape[name] for name in axes)
        if x.shape[dim] % parts != 0:
            if len(axes) == 1:
                axes_desc = f"the mesh axis {axes[0]!r} of size {parts}"
            else:
                sizes = " x ".join(f"{name!r} ({mesh_shape[name]})" for name in axes)
                axes_desc = f"the mesh axes {sizes}, {parts} parts,"
            raise ValueError(
                f"`shard(tree, mesh, spec={spec})`: leaf `tree{jtu.keystr(path)}` of "
                f"shape {x.shape} has {x.shape[dim]} entries along dimension {dim}, "
                f"which {axes_desc} does not divide; "
                f"pad dimension {dim} to a multiple of {parts} (for example add "
                f"chains), or build `mesh` with an axis size that divides "
                f"{x.shape[dim]}."
            )


@typecheck
def shard(
    tree: PyTree, mesh: Mesh, spec: SpecLike, *, process_local: bool = False
) -> PyTree:
    """Place every array leaf of `tree` on `mesh`, split as `spec` says.

    One `PartitionSpec` is applied to every array leaf (JAX or NumPy, typed PRNG key
    arrays included) that has at least as many dimensions as `spec` has entries;
    trailing dimensions past the spec are not split. Array leaves with fewer
    dimensions (scalars, per-model constants) are replicated on every device
    (`PartitionSpec()`). Non-array leaves (Python scalars, functions, `None`) are left
    as they are.

    Random draws do not depend on the placement: keys made by `derive`, `grid_keys`
    or `eqx_rng.vmap` give bitwise the same numbers on one device and on many;
    reductions agree to float tolerance.

    Outside `jit` the leaves are placed with `jax.device_put` when every device of
    `mesh` belongs to this process. On a multi-host mesh (after
    `jax.distributed.initialize`), each leaf is taken to hold the *global* value,
    identical on every process, and each process fills its own devices with
    `jax.make_array_from_callback`; with `process_local=True` each leaf instead holds
    this process's slice of the global array (for example a per-host data batch) and
    is placed with `jax.make_array_from_process_local_data`; split such data over a
    mesh axis whose devices lie on different processes (the first axis of a
    `chain_mesh`, which lays devices out process by process).

    `shard` places concrete arrays, before they enter `jit`; a jitted function keeps
    the shardings of its inputs (pass `out_shardings=` to `jax.jit` to fix those of
    its outputs).

    **Arguments:**

    - `tree`: Any pytree, for example a chain-batched model or `TrainState`.
    - `mesh`: A `jax.sharding.Mesh`, for example `eqx_rng.chain_mesh()`.
    - `spec`: A `jax.sharding.PartitionSpec`, or its shorthand: a mesh axis name
        (`"chains"` means `PartitionSpec("chains")`), a tuple of entries
        (`("chains", "batch")`, with `None` for an unsplit dimension and a tuple of
        names to split one dimension over several mesh axes), or `None` (replicate
        everything).
    - `process_local`: Multi-host only: leaves hold this process's slice rather than
        the global value. (Keyword only argument.)

    **Returns:**

    `tree` with every array leaf a `jax.Array` with a `NamedSharding` on `mesh`.

    **Raises:**

    `ValueError` if `spec` names an axis that `mesh` does not have, or one axis
    twice, or if a mesh axis
    does not divide the dimension it splits (the message names the leaf, the
    dimension's size and the mesh axis size); `TypeError` for a `spec` of another
    type, or for a traced leaf (inside `jit`).

    !!! Example

        ```python
        mesh = eqx_rng.chain_mesh()  # every device on the axis "chains"
        tree = {"w": jnp.zeros((jax.device_count(), 3)), "lr": jnp.array(0.1)}
        tree = eqx_rng.shard(tree, mesh, "chains")
        assert tree["w"].sharding.spec == jax.sharding.PartitionSpec("chains")
        assert tree["lr"].sharding.spec == jax.sharding.PartitionSpec()
        ```
    """
    spec = _as_spec(spec)
    _check_axes(spec, mesh)
    mesh_shape = dict(mesh.shape)
    split = NamedSharding(mesh, spec)
    replicated = NamedSharding(mesh, PartitionSpec())
    fully_addressable = split.is_fully_addressable

    def place(path: Any, x: Any) -> Any:
        if not _is_array(x):
            return x
        if isinstance(x, Tracer):
            raise TypeError(_TRACED_MSG.format(path=jtu.keystr(path)))
        if x.ndim < len(spec):
            sharding = replicated
        else:
            sharding = split
            if not (process_local and not fully_addressable):
                _check_divides(path, x, spec, mesh_shape)
        if fully_addressable:
            return jax.device_put(x, sharding)
        if process_local:
            out = jax.make_array_from_process_local_data(sharding, x)
        else:
            out = jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
        # Those two drop weak types, which `device_put` keeps (`jnp.asarray(0.5)`).
        return make_weak(out) if is_weak(x) else out

    return jtu.tree_map_with_path(place, tree)


@typecheck
def chain_mesh(
    shape: int | tuple[int, ...] | None = None,
    axis_names: str | tuple[str, ...] = "chains",
    *,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """A device mesh for chains (and batch), with axes of type `Auto`.

    The same as `jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto, ...))`.
    `Auto` axes let `jit` choose how to shard what `shard` did not place, so code
    written for one device runs unchanged on the mesh. (`jax.make_mesh` alone gives
    `Explicit` axes, under which `vmap` refuses inputs sharded differently along the
    mapped axis, for example sharded chain parameters beside keys made inside `jit`.)

    **Arguments:**

    - `shape`: The number of devices along each axis; an `int` for one axis. One
        entry may be `-1`: the devices left over. `None` (the default) puts every
        device on the single axis.
    - `axis_names`: The axis names, a `str` for one axis, for example
        `("chains", "batch")`.
    - `devices`: The devices to use, every device of every process by default
        (`jax.devices()`). (Keyword only argument.)

    **Returns:**

    A `jax.sharding.Mesh`.

    **Raises:**

    `ValueError` if `shape` and `axis_names` differ in length, if an axis name is
    repeated, or if the mesh size
    is not the number of devices.

    !!! Example

        ```python
        mesh = eqx_rng.chain_mesh()  # every device on the axis "chains"
        assert mesh.axis_names == ("chains",)
        mesh = eqx_rng.chain_mesh((-1, 1), ("chains", "batch"))
        assert mesh.shape["batch"] == 1
        ```
    """
    devices = list(jax.devices() if devices is None else devices)
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    if shape is None:
        if len(names) != 1:
            raise ValueError(
                f"`chain_mesh(axis_names={names})` needs `shape=` for more than one "
                f"axis, for example `shape=(-1, 1)`."
            )
        shape = (len(devices),)
    repeated = _repeated(list(names))
    if repeated:
        raise ValueError(
            f"`chain_mesh(axis_names={names})` repeats the axis name "
            f"{repeated[0]!r}; every axis needs its own name, e.g. "
            f'`axis_names=("chains", "batch")`.'
        )
    sizes = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(sizes) != len(names):
        raise ValueError(
            f"`chain_mesh(shape={sizes}, axis_names={names})`: one size per axis "
            f"name is needed, got {len(sizes)} sizes and {len(names)} names."
        )
    known = math.prod(n for n in sizes if n != -1)
    if sizes.count(-1) == 1 and known > 0 and len(devices) % known == 0:
        sizes = tuple(len(devices) // known if n == -1 else n for n in sizes)
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise ValueError(
            f"`chain_mesh(shape={shape})` does not fit the {len(devices)} device(s) "
            f"given; pick positive sizes whose product is {len(devices)} (at most "
            f"one `-1`), or pass fewer devices, e.g. `devices=jax.devices()[:n]`."
        )
    return jax.make_mesh(
        sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices
    )
