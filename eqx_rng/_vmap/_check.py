"""The broadcast-key check of `eqx_rng.vmap`: trace one call, run the key-flow analysis.

Called inside the vmapped body at trace time (where the axis name is bound). The
per-call function is traced to a jaxpr whose inputs are the mapped leaves, the
unmapped key leaves (of the arguments and of `fn` itself, when `fn` is a Module) and
the per-call key; `_key_flow.find_broadcast_keys` then reports the unmapped keys
drawn from without per-call data, and `BroadcastKeyError` names them.
"""

import threading
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from .._errors import BroadcastKeyError
from .._key_flow import Facts, Finding, find_broadcast_keys
from .._util import is_key_like
from ._axes import fn_name, label

MISSING = object()
"""`key=` was not passed at all (distinct from `key=None`)."""

# Set while a function is being traced for the key-flow analysis, so that nested
# `eqx_rng.vmap`s do not start an analysis of their own inside it (they run theirs
# when the function is traced for real).
_analysing = threading.local()


def analysing() -> bool:
    """Whether an enclosing `eqx_rng.vmap` is tracing its function for the check."""
    return getattr(_analysing, "depth", 0) > 0


class _Inputs:
    """The inputs of the traced per-call function and what is known of each."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.facts: list[Facts] = []
        self.origin_label: dict[int, str] = {}

    def add_varying(self, value: Any) -> None:
        self.facts.append(Facts(frozenset(), True))
        self.values.append(value)

    def add_origin(self, value: Any, where: str) -> None:
        self.origin_label[len(self.values)] = where
        self.facts.append(Facts(frozenset({len(self.values)}), False))
        self.values.append(value)


def _trace_findings(
    per_call: Callable, inputs: _Inputs, axis_name: Hashable | None
) -> list[Finding]:
    _analysing.depth = getattr(_analysing, "depth", 0) + 1
    try:
        # A function that needs a concrete value of an unmapped key (`int(...)` of
        # bits drawn from it, say) cannot be traced with the key abstract; the real
        # trace that follows runs it, so the check is skipped. Any other error is
        # the user's own and is raised here as it would be by the real trace.
        closed = jax.make_jaxpr(per_call)(*inputs.values)
    except jax.errors.JAXTypeError:
        return []
    finally:
        _analysing.depth -= 1
    try:
        return find_broadcast_keys(closed, inputs.facts, axis_name)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # The jaxpr is not shaped as the analysis expects (a JAX change): say so
        # rather than break a working program. A test runs the analysis on this
        # JAX version's jaxprs, so this does not pass silently here.
        warnings.warn(
            f"`eqx_rng.vmap`: the broadcast-key check could not read the traced "
            f"program ({type(e).__name__}: {e}) and was skipped. Please report this "
            f"with your JAX version ({jax.__version__}).",
            RuntimeWarning,
            stacklevel=4,
        )
        return []


def check_broadcast_keys(
    fn: Callable,
    leaves: list[Any],
    axes: list[Any],
    labels: list[str],
    treedef: Any,
    call_key: Any,
    axis_size: int,
    axis_name: Hashable | None,
) -> None:
    """Raise `BroadcastKeyError` if an unmapped key argument is drawn from as is."""
    name = fn_name(fn)
    fn_leaves, fn_def = jtu.tree_flatten_with_path(fn)
    # Mapped leaves, unmapped key-like leaves of the arguments and of `fn` itself (a
    # Module), and the per-call key are inputs. Everything else stays closed over,
    # concrete where it was concrete.
    inputs = _Inputs()
    arg_slots: list[int] = []
    fn_slots: list[int] = []
    for i, (leaf, axis) in enumerate(zip(leaves, axes, strict=True)):
        if axis is not None:
            inputs.add_varying(leaf)
        elif is_key_like(leaf):
            inputs.add_origin(leaf, labels[i])
        else:
            continue
        arg_slots.append(i)
    for j, (path, leaf) in enumerate(fn_leaves):
        if is_key_like(leaf):
            inputs.add_origin(leaf, label("the mapped function", name, path))
            fn_slots.append(j)
    if not inputs.origin_label:
        return
    pass_key = call_key is not MISSING
    if pass_key and call_key is not None:
        inputs.add_varying(call_key)
    n_args, n_fn = len(arg_slots), len(fn_slots)

    def per_call(*arrays: Any) -> list[Any]:
        new_leaves = list(leaves)
        for i, a in zip(arg_slots, arrays[:n_args], strict=True):
            new_leaves[i] = a
        new_fn_leaves = [leaf for _, leaf in fn_leaves]
        for j, a in zip(fn_slots, arrays[n_args : n_args + n_fn], strict=True):
            new_fn_leaves[j] = a
        call_fn = jtu.tree_unflatten(fn_def, new_fn_leaves) if n_fn else fn
        args, kwargs = jtu.tree_unflatten(treedef, new_leaves)
        if pass_key:
            kwargs = dict(kwargs)
            kwargs["key"] = arrays[-1] if call_key is not None else None
        out = call_fn(*args, **kwargs)
        return [x for x in jtu.tree_leaves(out) if eqx.is_array(x)]

    findings = _trace_findings(per_call, inputs, axis_name)
    if findings:
        raise BroadcastKeyError(
            _message(
                name,
                [inputs.origin_label[f.origin] for f in findings],
                findings,
                axis_size,
            )
        )


def _message(
    name: str, which: list[str], findings: list[Finding], axis_size: int
) -> str:
    prims = ", ".join(sorted({f"`{f.primitive}`" for f in findings}))
    if len(which) == 1:
        subject = f"{which[0]} is a PRNG key that is not mapped"
        obj = "it"
    else:
        subject = f"{', '.join(which)} are PRNG keys that are not mapped"
        obj = "them"
    return (
        f"`eqx_rng.vmap({name})`: {subject}, and `{name}` draws from {obj} "
        f"({prims}) without folding in anything that differs per call, so all "
        f"{axis_size} mapped calls would draw the same numbers. Pass the key as "
        f"`key=` instead, so that `eqx_rng.vmap` derives one key per call "
        f"(`derive(key, i)`); or fold per-call data into it first "
        f"(`jr.fold_in(key, lax.axis_index(axis_name))`, or a mapped example "
        f'id). To share one key on purpose, pass `keys="broadcast"`.'
    )


__all__ = ["MISSING", "analysing", "check_broadcast_keys"]
