"""The broadcast-key check of `eqx_rng.vmap`: trace one call, run the key-flow analysis.

Called inside the vmapped body at trace time (where the axis name is bound). The
per-call function is traced to a jaxpr whose inputs are the mapped leaves, the
unmapped key leaves (of the arguments and of `fn` itself, when `fn` is a Module) and
the per-call key; `_key_flow.find_broadcast_keys` then reports the unmapped keys
drawn from without per-call data, and `BroadcastKeyError` names them.
"""

import contextlib
import inspect
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from .._errors import BroadcastKeyError
from .._key_flow import SEEDED, Facts, Finding, find_broadcast_keys
from .._util import is_key_like
from ._axes import fn_name, label

MISSING = object()
"""`key=` was not passed at all (distinct from `key=None`)."""

# Set while a function is being traced for the key-flow analysis, so that nested
# `eqx_rng.vmap`s do not start an analysis of their own inside it (they run theirs
# when the function is traced for real).
_analysing = threading.local()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Run `eqx_rng.vmap` calls without the check (tests use it for ground truth)."""
    _analysing.depth = getattr(_analysing, "depth", 0) + 1
    try:
        yield
    finally:
        _analysing.depth -= 1


def analysing() -> bool:
    """Whether an enclosing `eqx_rng.vmap` is tracing its function for the check."""
    return getattr(_analysing, "depth", 0) > 0


_SEEDED_LABEL = (
    "a key made inside the function from a fixed seed (`jax.random.key(...)` or "
    "`PRNGKey(...)`)"
)


class _Inputs:
    """The inputs of the traced per-call function, and the unmapped keys (origins)
    the analysis tracks, each with a label for the message."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.facts: list[Facts] = []
        self._labels: dict[int, tuple[str, str]] = {}

    def add(self, value: Any, facts: Facts) -> None:
        self.values.append(value)
        self.facts.append(facts)

    def new_origin(self, where: str, kind: str = "argument") -> Facts:
        """A new tracked key; `kind` is "argument", "function" or "closure"."""
        origin = len(self._labels)
        self._labels[origin] = (where, kind)
        return Facts(frozenset({origin}), False)

    def has_origins(self) -> bool:
        return bool(self._labels)

    def label_of(self, origin: int) -> str:
        return _SEEDED_LABEL if origin == SEEDED else self._labels[origin][0]

    def kind_of(self, origin: int) -> str:
        return "seeded" if origin == SEEDED else self._labels[origin][1]


# Libraries whose functions are not searched for closed-over keys (they hold none
# that a user's function could draw from per call, and searching them is slow).
_LIBRARIES = ("jax", "jaxlib", "numpy", "equinox", "optax", "eqx_rng", "builtins")
_SEARCH_DEPTH = 3
_KEY_ATTRIBUTES = frozenset({"PRNGKey", "key", "as_key"})
_KEY_ATTRIBUTE = object()


def _code_of(fn: Any, top: bool) -> Any:
    """The Python function whose closure and globals `fn` runs with, or None (also
    for library functions below the top level)."""
    while True:
        inner = getattr(fn, "func", None)  # functools.partial, eqx.Partial
        if inner is None or inner is fn:
            break
        fn = inner
    if callable(fn):
        fn = inspect.unwrap(fn)
    if not inspect.isfunction(fn):
        fn = type(fn).__dict__.get("__call__")
    if not inspect.isfunction(fn):
        return None
    module = getattr(fn, "__module__", None) or ""
    if not top and module.split(".")[0] in _LIBRARIES:
        return None
    return fn


def _closed_over(fn: Any) -> list[tuple[str, Any]]:
    """`(name, value)` for the values `fn`'s code reads from its closure and globals,
    and, a few calls deep, those of the user functions among them; an attribute
    read named like a key (`.key`, `.PRNGKey`) comes as `(name, _KEY_ATTRIBUTE)`."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()
    todo = [(fn, 0)]
    while todo:
        current, depth = todo.pop()
        code = _code_of(current, top=depth == 0)
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        try:
            names = inspect.getclosurevars(code)
        except (TypeError, ValueError):
            continue
        # Attribute reads that may make or fetch a key (`jr.PRNGKey(0)`,
        # `self.key`): stand for "a key may be involved", named by a None value.
        for name in names.unbound & _KEY_ATTRIBUTES:
            found.append((name, _KEY_ATTRIBUTE))
        for name, value in {**names.globals, **names.nonlocals}.items():
            found.append((name, value))
            if callable(value) and depth + 1 < _SEARCH_DEPTH:
                todo.append((value, depth + 1))
    return found


def _may_close_over_keys(fn: Any) -> bool:
    """Whether `fn` may read a PRNG key from its closure (a cheap pre-check: the
    analysis is traced only when there is a key to track)."""
    for _, value in _closed_over(fn):
        if value is _KEY_ATTRIBUTE:
            return True
        if inspect.ismodule(value) or inspect.isclass(value):
            continue
        if any(is_key_like(leaf) for leaf in jtu.tree_leaves(value)):
            return True
    return False


def _closure_names(fn: Any) -> dict[int, str]:
    """`id(value) -> name` for the keys `fn` closes over (for messages)."""
    return {id(v): name for name, v in _closed_over(fn) if is_key_like(v)}


def _const_facts(closed: Any, fn: Any, inputs: _Inputs) -> list[Facts]:
    """Facts of the traced program's constants: a key-like constant is a key closed
    over by `fn`, hence the same in every mapped call (an origin)."""
    names: dict[int, str] | None = None
    facts = []
    for const in closed.consts:
        if not is_key_like(const):
            facts.append(Facts())
            continue
        if names is None:
            names = _closure_names(fn)
        name = names.get(id(const))
        where = f"the key `{name}`" if name else "a key"
        where = f"{where} closed over by `{fn_name(fn)}`"
        facts.append(inputs.new_origin(where, "closure"))
    return facts


def _trace_findings(
    fn: Callable, per_call: Callable, inputs: _Inputs, axis_name: Hashable | None
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
        const_facts = _const_facts(closed, fn, inputs)
        return find_broadcast_keys(closed, inputs.facts, axis_name, const_facts)
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
    exempt: list[bool],
    treedef: Any,
    call_key: Any,
    axis_size: int,
    axis_name: Hashable | None,
) -> None:
    """Raise `BroadcastKeyError` if an unmapped key is drawn from as is.

    `exempt[i]`: leaf `i` was wrapped in `eqx_rng.shared` (shared on purpose).
    """
    name = fn_name(fn)
    fn_leaves, fn_def = jtu.tree_flatten_with_path(fn)
    # Mapped leaves, unmapped key-like leaves of the arguments and of `fn` itself (a
    # Module), and the per-call key are inputs. Everything else stays closed over,
    # concrete where it was concrete; key-like constants of the traced program are
    # then keys closed over by `fn`.
    inputs = _Inputs()
    arg_slots: list[int] = []
    fn_slots: list[int] = []
    for i, (leaf, axis) in enumerate(zip(leaves, axes, strict=True)):
        if axis is not None:
            inputs.add(leaf, Facts(frozenset(), True))
        elif is_key_like(leaf):
            facts = Facts() if exempt[i] else inputs.new_origin(labels[i])
            inputs.add(leaf, facts)
        else:
            continue
        arg_slots.append(i)
    for j, (path, leaf) in enumerate(fn_leaves):
        if is_key_like(leaf):
            where = label("the mapped function", name, path)
            inputs.add(leaf, inputs.new_origin(where, "function"))
            fn_slots.append(j)
    if not inputs.has_origins() and not _may_close_over_keys(fn):
        return  # no key that is the same in every call: nothing to trace for
    pass_key = call_key is not MISSING
    if pass_key and call_key is not None:
        inputs.add(call_key, Facts(frozenset(), True))
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

    findings = _trace_findings(fn, per_call, inputs, axis_name)
    if findings:
        raise BroadcastKeyError(_message(name, findings, inputs, axis_size))


def _message(
    name: str, findings: list[Finding], inputs: _Inputs, axis_size: int
) -> str:
    which = [
        f"{inputs.label_of(f.origin)} (drawn by `{f.primitive}`)" for f in findings
    ]
    origins = {f.origin for f in findings}
    kinds = {inputs.kind_of(o) for o in origins}
    fixes = []
    if kinds & {"argument", "closure", "function"}:
        fixes.append(
            "pass the key as `key=` instead (mapped call i then gets `derive(key, i)`)"
        )
    if SEEDED in origins:
        fixes.append(
            "make the key from `key=` (one key per call) instead of a fixed seed"
        )
    fixes.append(
        "fold per-call data into it before drawing (`jr.fold_in(key, "
        "lax.axis_index(axis_name))`, or a mapped example id)"
    )
    if kinds & {"argument", "closure", "function"}:
        fixes.append(
            "if every call should draw the same numbers, pass the value as an "
            "argument wrapped in `eqx_rng.shared(...)`"
        )
    return (
        f"`eqx_rng.vmap({name})`: {'; '.join(which)}: "
        f"{'this key is' if len(which) == 1 else 'these keys are'} the same in "
        f"every mapped call, and `{name}` draws from "
        f"{'it' if len(which) == 1 else 'them'} with nothing "
        f"that differs per call folded in, so each of the {axis_size} mapped calls "
        f"that reaches the draw gets the same numbers. To fix: {'; or '.join(fixes)}."
    )


__all__ = ["MISSING", "analysing", "check_broadcast_keys", "suspended"]
