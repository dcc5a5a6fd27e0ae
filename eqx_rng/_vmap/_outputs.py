"""Outputs of `eqx_rng.vmap`: which leaves come back mapped, and the State checks.

A State output (or any output at `out_axes` None) that differs from one mapped call
to the next cannot be returned unmapped; this module finds it at trace time and
names it, with the fix.
"""

from collections.abc import Hashable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ._axes import DEFAULT_AXES, is_state, leaf_axes
from ._jax_internals import is_batched

_STATE_FIX = (
    "it is the same for every mapped call only if every value written into it is "
    "reduced over the mapped axis first, e.g. `lax.pmean(value, axis_name)` "
    "(BatchNorm does this over its `axis_name`)"
)
# JAX's messages for a batched output at out_axes None (they have changed over time).
_JAX_UNMAPPED_OUT_ERRORS = ("but out_axes is None", "got axis spec None but output")


def out_leaf_axes(out_axes: Any, out: Any, state_out_unmapped: bool) -> list[Any]:
    """One axis (int or None) per leaf of `out`."""
    if out_axes is DEFAULT_AXES:
        spec = jtu.tree_map(
            lambda x: None if is_state(x) and state_out_unmapped else DEFAULT_AXES,
            out,
            is_leaf=is_state,
        )
        return leaf_axes(spec, out, "the output")
    return leaf_axes(out_axes, out, "the output (`out_axes`)")


def state_message(name: str, where: str, axis_name: Hashable | None) -> str:
    """The error for a State output that came back batched."""
    where = f" at {where}" if where else ""
    if axis_name is None:
        fix = (
            "Set `axis_name=` on `eqx_rng.vmap` and reduce what you store "
            "(`lax.pmean(value, axis_name)`), or pass `out_axes` explicitly (for "
            "example `out_axes=(0, 0)`) to return one state per call."
        )
    else:
        fix = (
            f"Reduce what you store over the batch first (`lax.pmean(value, "
            f"{axis_name!r})`), or pass `out_axes` explicitly (for example "
            f"`out_axes=(0, 0)`) to return one state per call."
        )
    return (
        f"`eqx_rng.vmap({name})`: the `eqx.nn.State` returned{where} came back "
        f"batched (different in each mapped call), but a State whose inputs were "
        f"unmapped is returned unmapped: {_STATE_FIX}. {fix}"
    )


def _enclosing_state(path: Any, state_paths: set[str]) -> str | None:
    return next(
        (
            jtu.keystr(path[:n])
            for n in range(len(path) + 1)
            if jtu.keystr(path[:n]) in state_paths
        ),
        None,
    )


def check_unmapped_outputs(
    out: Any,
    axes: list[Any],
    state_out_unmapped: bool,
    name: str,
    axis_name: Hashable | None,
) -> None:
    """Raise naming the first output at `out_axes` None that is batched."""
    with_path, _ = jtu.tree_flatten_with_path(out)
    state_paths = {
        jtu.keystr(p)
        for p, x in jtu.tree_flatten_with_path(out, is_leaf=is_state)[0]
        if is_state(x)
    }
    for (path, leaf), axis in zip(with_path, axes, strict=True):
        if axis is not None or not eqx.is_array(leaf) or not is_batched(leaf):
            continue
        state_at = _enclosing_state(path, state_paths)
        if state_at is not None and state_out_unmapped:
            raise ValueError(state_message(name, state_at, axis_name))
        raise ValueError(
            f"`eqx_rng.vmap({name})`: the output at {jtu.keystr(path) or '()'} has "
            f"`out_axes` None but differs from one mapped call to the next. Return "
            f"it mapped (an int in `out_axes`), or reduce it over the mapped axis "
            f"first (`lax.pmean(value, axis_name)` with `axis_name=` set)."
        )


def check_out_axis_range(out: Any, axes: list[Any], name: str) -> None:
    """Raise naming the output whose `out_axes` entry is out of range."""
    with_path, _ = jtu.tree_flatten_with_path(out)
    for (path, leaf), axis in zip(with_path, axes, strict=True):
        if axis is None or not eqx.is_array(leaf):
            continue
        ndim = leaf.ndim + 1
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"`eqx_rng.vmap({name}, out_axes=...)`: the output at "
                f"{jtu.keystr(path) or '()'} has shape {tuple(leaf.shape)} in each "
                f"call, so the mapped axis can go at positions {-ndim} to {ndim - 1}, "
                f"got out_axes {axis}. Pass an axis in that range (0 puts it first)."
            )


def split_outputs(out: Any, axes: list[Any]) -> tuple[list, list, tuple[Any, list]]:
    """Mapped array leaves, unmapped array leaves, and how to put `out` back."""
    out_leaves, out_def = jtu.tree_flatten(out)
    vmapped, unmapped, static = [], [], []
    for leaf, axis in zip(out_leaves, axes, strict=True):
        if axis is not None and eqx.is_array(leaf):
            vmapped.append(leaf)
            static.append(("vmapped", axis))
        elif eqx.is_array(leaf):
            unmapped.append(leaf)
            static.append(("unmapped", None))
        else:
            static.append(("static", leaf))
    return vmapped, unmapped, (out_def, static)


def assemble_outputs(vmapped: list, unmapped: list, layout: tuple[Any, list]) -> Any:
    """The output pytree, with the mapped axis moved to each leaf's `out_axes`."""
    out_def, static = layout
    vmapped_iter, unmapped_iter = iter(vmapped), iter(unmapped)
    out_leaves = []
    for kind, value in static:
        if kind == "vmapped":
            out_leaves.append(jnp.moveaxis(next(vmapped_iter), 0, value))
        elif kind == "unmapped":
            out_leaves.append(next(unmapped_iter))
        else:
            out_leaves.append(value)
    return jtu.tree_unflatten(out_def, out_leaves)


def is_unmapped_output_error(e: ValueError) -> bool:
    """Whether `e` is JAX's error for a batched output at `out_axes` None."""
    return any(m in str(e) for m in _JAX_UNMAPPED_OUT_ERRORS)


__all__ = [
    "assemble_outputs",
    "check_out_axis_range",
    "check_unmapped_outputs",
    "is_unmapped_output_error",
    "out_leaf_axes",
    "split_outputs",
    "state_message",
]
