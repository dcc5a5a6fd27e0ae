"""Reuse by derivation, made visible to JAX's key-reuse checker.

`fold_in` does not consume its key, so two calls `derive(k, "dropout1")` return two
fresh keys with the same bits, and JAX's checker never sees that drawing from both
draws the same numbers twice. Inside `eqx_rng.debug.key_reuse()` a derivation scope
is active, and `derive` goes through it: the same (parent, path item) gives back the
*same* key object, so a second draw from it is a second draw from one key, which
JAX's checker refuses (eagerly, under `jit`, and across `scan` iterations).

- A concrete parent with a concrete path item is memoised by the parent's bits, its
  PRNG implementation and the item's `uint32` value, and the derived key is computed
  concretely (`jax.ensure_compile_time_eval`), even inside a trace: a derivation made
  eagerly and one made inside `jit` share one key (a constant of the jitted program),
  and a `scan` body that draws from it draws from one key at every step.
- A traced parent or path item is memoised by object identity within the current
  trace (weakly: an entry goes when its parent tracer does). A key derived inside a
  `cond` branch or `scan` body from a key of an outer trace belongs to the inner
  trace and is never handed back to the outer one.

Outside the block `derive` only reads one thread-local attribute more.
"""

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.random as jr
import numpy as np
from jax.core import Tracer
from jax.extend.core import get_opaque_trace_state

_U32 = 2**32
_MAX_LISTED = 5

_state = threading.local()


class DerivedKeyReuseError(jax.errors.KeyReuseError):
    """A `jax.errors.KeyReuseError` raised inside `eqx_rng.debug.key_reuse()` whose
    message also names the keys that the block derived more than once by the same
    path (the likely reused ones).

    It subclasses `jax.errors.KeyReuseError`, so code that catches JAX's error
    catches this one too.

    !!! Example

        ```python
        key = jr.key(0)
        try:
            with eqx_rng.debug.key_reuse():
                a = jr.normal(eqx_rng.derive(key, "drop"))
                b = jr.normal(eqx_rng.derive(key, "drop"))  # same path again
        except eqx_rng.debug.DerivedKeyReuseError as e:
            assert "'drop'" in str(e)
        ```
    """

    def __init__(self, message: str):
        # The message keeps JAX's own text and link; JAX's constructor would add a
        # link to a page for this class, which does not exist.
        TypeError.__init__(self, message)


def active_scope() -> "DeriveScope | None":
    """The derivation scope of this thread, or `None` outside `key_reuse()`."""
    return getattr(_state, "scope", None)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, Tracer)


def _item_repr(item: Any) -> str:
    if isinstance(item, str):
        return repr(item)
    if _is_tracer(item):
        return f"<traced {item.dtype}[]>"
    if isinstance(item, jax.Array | np.ndarray | np.integer):
        return str(int(item))
    return repr(item)


@dataclasses.dataclass
class _TracedEntry:
    parent_ref: Any
    # item id -> [(trace state, derived, item kept alive)]: one per trace, since a
    # key closed over by a `cond` branch or a `scan` body is derived in that inner
    # trace, and its result must not be handed back to the outer one.
    children: dict[Any, list[tuple[Any, Any, Any]]]


@dataclasses.dataclass
class DeriveScope:
    """The memo of one outermost `key_reuse()` block (shared by nested blocks)."""

    depth: int = 0
    concrete: dict[tuple, Any] = dataclasses.field(default_factory=dict)
    traced: dict[int, _TracedEntry] = dataclasses.field(default_factory=dict)
    names: dict[int, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    repeats: dict[str, int] = dataclasses.field(default_factory=dict)

    def _name(self, key: Any) -> str:
        known = self.names.get(id(key))
        if known is not None and known[0] is key:
            return known[1]
        if _is_tracer(key):
            return "derive(<traced key>"
        with jax.ensure_compile_time_eval():
            data = np.asarray(jr.key_data(key)).tolist()
        return f"derive(<key with data {data}>"

    def _remember(self, derived: Any, name: str) -> None:
        self.names[id(derived)] = (derived, name)

    def _repeat(self, name: str) -> None:
        name += ")"
        # Newest last in the dict (listed first): pop and re-insert.
        self.repeats[name] = self.repeats.pop(name, 1) + 1

    def derive_one(self, key: Any, item: Any, item_u32: Any) -> Any:
        """`fold_in(key, item_u32)`, the same object for the same (key, item)."""
        # `name` is the call without its closing parenthesis, so that a key derived
        # from this one extends it: `derive(<key>, 'a', 3`.
        name = f"{self._name(key)}, {_item_repr(item)}"
        if not _is_tracer(key) and not _is_tracer(item_u32):
            return self._derive_concrete(key, item_u32, name)
        return self._derive_traced(key, item, item_u32, name)

    def _derive_concrete(self, key: Any, item_u32: Any, name: str) -> Any:
        with jax.ensure_compile_time_eval():
            bits = np.asarray(jr.key_data(key)).tobytes()
            memo_key = (str(jr.key_impl(key)), bits, int(item_u32) % _U32)
            derived = self.concrete.get(memo_key)
            if derived is not None:
                self._repeat(name)
                return derived
            derived = jr.fold_in(key, item_u32)
        self.concrete[memo_key] = derived
        self._remember(derived, name)
        return derived

    def _derive_traced(self, key: Any, item: Any, item_u32: Any, name: str) -> Any:
        entry = self.traced.get(id(key))
        if entry is None or entry.parent_ref() is not key:
            entry = _TracedEntry(weakref.ref(key, self._forget(id(key))), {})
            self.traced[id(key)] = entry
        if _is_tracer(item_u32):
            item_id: Any = ("traced", id(item))
        else:
            item_id = ("u32", int(item_u32) % _U32)
        trace = get_opaque_trace_state()
        derivations = entry.children.setdefault(item_id, [])
        for other_trace, derived, _ in derivations:
            if other_trace == trace:
                self._repeat(name)
                return derived
        derived = jr.fold_in(key, item_u32)
        derivations.append((trace, derived, item))
        self._remember(derived, name)
        return derived

    def _forget(self, parent_id: int) -> Callable[[Any], None]:
        def forget(_: Any) -> None:
            self.traced.pop(parent_id, None)

        return forget

    def explain(self) -> str:
        """The paths derived more than once in this block, newest first."""
        listed = list(reversed(self.repeats.items()))[:_MAX_LISTED]
        lines = "\n".join(f"  {name}: derived {n} times" for name, n in listed)
        more = len(self.repeats) - len(listed)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        return (
            "Key reuse inside `eqx_rng.debug.key_reuse()`. These keys were derived "
            "more than once by the same path, and each derivation returns the same "
            "key, so drawing from two of them draws the same numbers twice (newest "
            "first):\n"
            f"{lines}{tail}\n"
            "Give each use its own path (`derive(key, 'dropout1')`, "
            "`derive(key, 'dropout2')`), or fold in what differs (the step, the layer "
            "index)."
        )


@contextlib.contextmanager
def derive_scope() -> Iterator[DeriveScope]:
    """Activate (or re-enter) this thread's derivation scope; on exit of the
    outermost block, drop the memo. A `KeyReuseError` leaving the block is re-raised
    as `DerivedKeyReuseError` naming the repeated derivations, if there were any."""
    scope = active_scope()
    if scope is None:
        scope = DeriveScope()
        _state.scope = scope
    scope.depth += 1
    try:
        yield scope
    except jax.errors.KeyReuseError as e:
        if isinstance(e, DerivedKeyReuseError) or not scope.repeats:
            raise
        raise DerivedKeyReuseError(f"{scope.explain()}\n\nJAX's checker: {e}") from e
    finally:
        scope.depth -= 1
        if scope.depth == 0:
            _state.scope = None
