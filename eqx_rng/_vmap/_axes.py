"""Axis resolution for `eqx_rng.vmap`: which leaf of which argument is mapped.

Turns `in_axes` (an int, None, a callable, a tuple per positional argument or a dict
of parameter names, each a prefix pytree) into one axis per input leaf, with State
arguments unmapped by default when `axis_name` is set, and finds the mapped size.
Every problem is a `ValueError` naming the argument (and the path inside it).
"""

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._util import is_typed_key

DEFAULT_AXES = eqx.if_array(0)
"""The default `in_axes` / `out_axes`. Compared by identity: passing
`eqx.if_array(0)` yourself is an explicit choice, and explicit choices win."""


def is_state(x: Any) -> bool:
    return isinstance(x, eqx.nn.State)


def _is_none(x: Any) -> bool:
    return x is None


def fn_name(fn: Any) -> str:
    """A readable name of `fn` for messages."""
    fn = inspect.unwrap(fn) if callable(fn) else fn
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None or not isinstance(name, str):
        name = type(fn).__name__
    return name


def positional_names(fn: Callable, n: int) -> list[str]:
    """A name for each of `n` positional arguments of `fn` (for messages)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [
        p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    var = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    names: list[str] = []
    for i in range(n):
        if i < len(positional):
            names.append(positional[i])
        elif var is not None:
            names.append(f"{var}[{i - len(positional)}]")
        else:
            names.append(f"#{i}")
    return names


def label(kind: str, name: str, path: Any) -> str:
    """`argument 'x' at .layers[0].key`, for messages."""
    where = jtu.keystr(tuple(path))
    return f"{kind} '{name}'" + (f" at {where}" if where else "")


def _resolve_axis(spec: Any, subtree: Any) -> Any:
    if spec is None or isinstance(spec, int):
        return jtu.tree_map(lambda _: spec, subtree)
    if callable(spec):
        return jtu.tree_map(spec, subtree)
    raise ValueError(
        f"`in_axes` and `out_axes` entries must be None, ints or callables, got "
        f"{spec!r}."
    )


def leaf_axes(spec: Any, tree: Any, what: str) -> list[Any]:
    """One resolved axis (int or None) per leaf of `tree`, from prefix `spec`."""
    try:
        resolved = jtu.tree_map(_resolve_axis, spec, tree, is_leaf=_is_none)
        return jtu.tree_structure(tree).flatten_up_to(resolved)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`eqx_rng.vmap`: the axes given for {what} do not match it: {e}. "
            f"Axes must be a prefix of the argument's pytree (an int, None or "
            f"callable for the whole argument, or a tree of them)."
        ) from None


def default_arg_spec(arg: Any, state_unmapped: bool) -> Any:
    """The default axes of one argument: `if_array(0)`, or None for State."""
    if not state_unmapped:
        return DEFAULT_AXES
    return jtu.tree_map(
        lambda x: None if is_state(x) else DEFAULT_AXES, arg, is_leaf=is_state
    )


def arg_specs(
    in_axes: Any, state_unmapped: bool, args: tuple, names: list[str], name: str
) -> list[Any]:
    """The axes prefix of each positional argument, from `in_axes`."""
    if in_axes is DEFAULT_AXES:
        return [default_arg_spec(a, state_unmapped) for a in args]
    if isinstance(in_axes, dict):
        remaining = dict(in_axes)
        specs = []
        for arg, arg_name in zip(args, names, strict=True):
            if arg_name in remaining:
                specs.append(remaining.pop(arg_name))
            else:
                specs.append(default_arg_spec(arg, state_unmapped))
        if remaining:
            raise ValueError(
                f"`eqx_rng.vmap(in_axes=...)` names {sorted(map(str, remaining))} "
                f"but `{name}` was called with the positional arguments {names}."
            )
        return specs
    if isinstance(in_axes, tuple | list):
        if len(in_axes) != len(args):
            raise ValueError(
                f"`eqx_rng.vmap(in_axes=...)` has {len(in_axes)} entries but "
                f"`{name}` was called with {len(args)} positional arguments "
                f"{names}; give one entry per positional argument (keyword "
                f"arguments are never mapped)."
            )
        return list(in_axes)
    return [in_axes] * len(args)


def flatten_inputs(
    args: tuple, kwargs: dict, specs: list[Any], names: list[str]
) -> tuple[list[Any], Any, list[Any], list[str]]:
    """Leaves of `(args, kwargs)`, their treedef, axes and labels."""
    leaves: list[Any] = []
    axes: list[Any] = []
    labels: list[str] = []
    for arg, spec, arg_name in zip(args, specs, names, strict=True):
        arg_axes = leaf_axes(spec, arg, f"argument '{arg_name}'")
        with_path, _ = jtu.tree_flatten_with_path(arg)
        for (path, leaf), axis in zip(with_path, arg_axes, strict=True):
            leaves.append(leaf)
            axes.append(axis)
            labels.append(label("argument", arg_name, path))
    for kw_name, value in kwargs.items():
        with_path, _ = jtu.tree_flatten_with_path(value)
        for path, leaf in with_path:
            leaves.append(leaf)
            axes.append(None)
            labels.append(label("keyword argument", kw_name, path))
    treedef = jtu.tree_structure((args, kwargs))
    return leaves, treedef, axes, labels


def _unmappable_hint(leaf: Any, shape: tuple[int, ...]) -> str:
    if is_typed_key(leaf) and shape == ():
        return (
            " To give every call its own key, pass the key as `key=` (mapped call "
            "i gets `derive(key, i)`); to share it, give it in_axes None and "
            '`keys="broadcast"`.'
        )
    if shape == ():
        return " If it is shared by every call, give it in_axes None."
    return ""


def state_leaf_flags(args: tuple, n_leaves: int) -> list[bool]:
    """A flag per input leaf (positional arguments first): inside an `eqx.nn.State`."""
    flags: list[bool] = []
    for arg in args:
        for item in jtu.tree_flatten(arg, is_leaf=is_state)[0]:
            flags.extend([is_state(item)] * len(jtu.tree_leaves(item)))
    return flags + [False] * (n_leaves - len(flags))


def _mapped_state_message(where: str, problem: str) -> str:
    return (
        f"`eqx_rng.vmap`: {where} is inside an `eqx.nn.State` argument, which is "
        f"mapped like any other argument when `axis_name` is not set, and {problem}. "
        f"To share one State across the mapped calls (inference, BatchNorm "
        f"statistics), set `axis_name=` on `eqx_rng.vmap` (State arguments are then "
        f"unmapped in and out) or give the State in_axes None; to map one State per "
        f"call, give every array in it a leading axis of the mapped size "
        f"(`eqx_rng.ensemble` builds such States)."
    )


def axis_size_from(
    leaves: list[Any],
    axes: list[Any],
    labels: list[str],
    axis_size: int | None,
    in_state: list[bool] | None = None,
) -> tuple[int | None, list[Any]]:
    """Check every mapped leaf; return the mapped size and normalised axes.

    `in_state[i]`: leaf `i` is inside an `eqx.nn.State` (for the messages).
    """
    sizes: dict[int, str] = {}
    normalised = list(axes)
    in_state = in_state or [False] * len(leaves)
    for i, (leaf, axis, where) in enumerate(zip(leaves, axes, labels, strict=True)):
        if axis is None:
            continue
        if not eqx.is_array(leaf):
            # Python numbers, bools, functions, strings have no axis to map:
            # an int applies to the array leaves under it only.
            normalised[i] = None
            continue
        shape = tuple(leaf.shape)
        if not -len(shape) <= axis < len(shape):
            if in_state[i]:
                problem = f"it has shape {shape}, with no axis {axis} to map over"
                raise ValueError(_mapped_state_message(where, problem))
            raise ValueError(
                f"`eqx_rng.vmap`: {where} has shape {shape} and cannot be mapped "
                f"over axis {axis}.{_unmappable_hint(leaf, shape)}"
            )
        axis = axis % len(shape)
        normalised[i] = axis
        if in_state[i] and sizes and shape[axis] not in sizes:
            first_size, first = next(iter(sizes.items()))
            problem = (
                f"its mapped axis has size {shape[axis]} where {first} has size "
                f"{first_size}"
            )
            raise ValueError(_mapped_state_message(where, problem))
        sizes.setdefault(shape[axis], where)
    if axis_size is not None:
        for size, where in sizes.items():
            if size != axis_size:
                raise ValueError(
                    f"`eqx_rng.vmap(axis_size={axis_size})`: {where} is mapped "
                    f"over an axis of size {size}."
                )
        return axis_size, normalised
    if len(sizes) > 1:
        listed = ", ".join(f"{where} has size {s}" for s, where in sizes.items())
        raise ValueError(
            f"`eqx_rng.vmap`: mapped arguments disagree on the size of the mapped "
            f"axis: {listed}. Map arguments of one size, or give the odd ones "
            f"in_axes None."
        )
    if not sizes:
        return None, normalised
    return next(iter(sizes)), normalised


def state_input_axes(args: tuple, axes: list[Any]) -> list[Any]:
    """The axes of the leaves of every State found in the positional arguments."""
    result: list[Any] = []
    start = 0
    for arg in args:
        with_states, _ = jtu.tree_flatten(arg, is_leaf=is_state)
        for item in with_states:
            n = len(jtu.tree_leaves(item))
            if is_state(item):
                result.extend(axes[start : start + n])
            start += n
    return result


__all__ = [
    "DEFAULT_AXES",
    "arg_specs",
    "axis_size_from",
    "default_arg_spec",
    "flatten_inputs",
    "fn_name",
    "is_state",
    "label",
    "leaf_axes",
    "positional_names",
    "state_input_axes",
    "state_leaf_flags",
]
