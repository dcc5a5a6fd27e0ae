"""Fast dispatch of a jitted function of pytrees: a cached flat-leaf call.

`Dispatcher(fn)` is a callable over positional pytree arguments. Called on concrete
arrays, it flattens each argument once, checks the leaves against the structure of
the last compiled variant (tree structure, non-array leaves equal, array leaves of a
concrete array type) and calls a `jax.jit` function of the flat array leaves. This
is close to the cost of a hand-written `jax.jit` call; `eqx.filter_jit`
re-partitions and hashes the whole tree on every call, which costs several times
more for a model with many leaves.

Anything else takes the slow path: with a tracer among the leaves (the call is
inside `jit`, `vmap`, `scan` or `grad`) `fn` is traced inline; otherwise a cached
variant for the new structure is found or compiled.

Callers that feed an output back as an argument (a training loop) can skip
flattening it: `Outputs.closed(out_index, split)` says whether the output position
has the argument's structure and static leaves, and `Dispatcher.run` takes the
per-argument dynamic leaves directly.

How the outputs are put back together (`Outputs`) comes out of `jit` with them, in
the output's tree structure: a new shape or dtype retraces a variant, and each trace
may return other static leaves (a function returning `x.shape`), so the description
belongs to the trace, not to the variant.
"""

import operator
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer

from ._rebuild import DYNAMIC, rebuilder

_MAX_ENTRIES = 16

# The concrete array types, found at the first dispatch: building them at import
# would start the JAX backend (after which device settings cannot change).
_concrete: frozenset[type] | None = None


def concrete_types() -> frozenset[type]:
    """Leaf types that the fast path passes straight to `jax.jit`.

    A JAX array, a typed key array and a NumPy array. Anything else (a tracer, a
    NumPy scalar, a Python number in a new place) takes the slow path. Computed once,
    lazily (it creates two small arrays on the default device).
    """
    global _concrete
    if _concrete is None:
        _concrete = frozenset(
            {type(jax.numpy.zeros(())), type(jax.random.key(0)), np.ndarray}
        )
    return _concrete


def _getter(idx: tuple[int, ...]) -> Callable[[list], list]:
    if len(idx) == 0:
        return lambda leaves: []
    if len(idx) == 1:
        i = idx[0]
        return lambda leaves: [leaves[i]]
    get = operator.itemgetter(*idx)
    return lambda leaves: list(get(leaves))


def _same(a: tuple, b: tuple) -> bool:
    """Whether two tuples of static leaves are equal.

    A leaf whose `==` raises or returns something without a truth value (an
    array-like object among static leaves) counts as different: the caller then
    compiles a new variant, which is always correct.
    """
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


class Split:
    """Which leaves of a flattened tree are arrays (passed to `jit`) and which are
    static (compared on every call, baked into the compiled variant)."""

    __slots__ = (
        "treedef",
        "static_idx",
        "static_vals",
        "dynamic_idx",
        "get_static",
        "get_dynamic",
        "template",
        "_rebuild",
    )

    def __init__(self, leaves: list, treedef: Any):
        self.treedef = treedef
        static = [not eqx.is_array(x) for x in leaves]
        self.static_idx = tuple(i for i, s in enumerate(static) if s)
        self.static_vals = tuple(leaves[i] for i in self.static_idx)
        self.dynamic_idx = tuple(i for i, s in enumerate(static) if not s)
        self.get_static = _getter(self.static_idx)
        # With no static leaves the leaves are passed as they are.
        self.get_dynamic = _getter(self.dynamic_idx) if self.static_idx else None
        self.template = tuple(
            x if s else None for x, s in zip(leaves, static, strict=True)
        )
        self._rebuild: Callable[[list], Any] | bool = False  # False: not built

    def matches(self, leaves: list, treedef: Any, concrete: frozenset) -> bool:
        """Whether `leaves` fit this split, with every array leaf concrete."""
        if treedef != self.treedef:
            return False
        if self.get_dynamic is None:
            return concrete.issuperset(map(type, leaves))
        return concrete.issuperset(map(type, self.get_dynamic(leaves))) and _same(
            tuple(self.get_static(leaves)), self.static_vals
        )

    def same_as(self, other: "Split") -> bool:
        return self.treedef == other.treedef and _same(
            self.static_vals, other.static_vals
        )

    def dynamic(self, leaves: list) -> list:
        return leaves if self.get_dynamic is None else self.get_dynamic(leaves)

    def unflatten(self, dynamic: list) -> Any:
        if self.get_dynamic is None:
            return self.treedef.unflatten(dynamic)
        full = list(self.template)
        for i, x in zip(self.dynamic_idx, dynamic, strict=True):
            full[i] = x
        return self.treedef.unflatten(full)

    def rebuild(self, dynamic: list) -> Any:
        """`unflatten`, through a builder made for this structure on the first call
        (`_rebuild.py`: several times faster for a tree of Modules rebuilt every
        call)."""
        return self.builder()(dynamic)

    def builder(self) -> Callable[[list], Any]:
        """The function `dynamic -> tree` that `rebuild` calls."""
        build = self._rebuild
        if build is False:
            dynamic_idx = set(self.dynamic_idx)
            template = tuple(
                DYNAMIC if i in dynamic_idx else x for i, x in enumerate(self.template)
            )
            build = rebuilder(self.treedef, template) or self.unflatten
            self._rebuild = build
        return build  # type: ignore[return-value]


def _identity(x: Any) -> Any:
    return x


class Outputs:
    """How one trace's outputs come back: per output position, its split and
    whether `jit` returned it as the pytree itself (no static leaves, no Modules:
    `jit` unflattens it in C++) or as its flat dynamic leaves."""

    __slots__ = ("splits", "direct", "closed_cache", "first")

    def __init__(self, splits: tuple[Split, ...], direct: tuple[bool, ...]):
        self.splits = splits
        self.direct = direct
        self.closed_cache: dict[tuple[int, Split], bool] = {}
        # `output(0, .)` as one function (made while tracing: no JAX operations).
        self.first = _identity if direct[0] else splits[0].builder()

    def output(self, index: int, out: Any) -> Any:
        """Output position `index` as a pytree, from what the compiled function
        returned for it."""
        if self.direct[index]:
            return out
        return self.splits[index].rebuild(out)

    def closed(self, out_index: int, arg: "Split") -> bool:
        """Whether output `out_index` can be fed back as argument split `arg` with
        its dynamic leaves alone (same structure and static leaves)."""
        key = (out_index, arg)
        found = self.closed_cache.get(key)
        if found is None:
            found = self.closed_cache[key] = self.splits[out_index].same_as(arg)
        return found


# A node without children whose aux data is the `Outputs` itself: `jit` stores it
# in each trace's output structure and hands it back with every call.
jtu.register_pytree_node(Outputs, lambda o: ((), o), lambda o, _: o)


_SLOW_NODES = (eqx.Module, eqx.nn.State)


def _has_slow_node(tree: Any) -> bool:
    """Whether `tree` holds a Module or an `eqx.nn.State`: nodes that `jit`'s own
    unflattening rebuilds through a Python callback each, slower than
    `Split.rebuild`."""
    return any(
        isinstance(x, _SLOW_NODES)
        for x in jtu.tree_leaves(tree, is_leaf=lambda y: isinstance(y, _SLOW_NODES))
    )


class Entry:
    """One compiled variant: the split of every argument and the `jax.jit`
    function of their dynamic leaves, which returns `(outputs, Outputs)`."""

    __slots__ = ("splits", "fn")

    def __init__(self, splits: tuple[Split, ...]):
        self.splits = splits
        self.fn: Callable = lambda *args: None

    def matches(self, flat: Sequence[tuple[list, Any]], concrete: frozenset) -> bool:
        return all(
            s.matches(leaves, treedef, concrete)
            for s, (leaves, treedef) in zip(self.splits, flat, strict=True)
        )

    def same_as(self, splits: Sequence[Split]) -> bool:
        return all(a.same_as(b) for a, b in zip(self.splits, splits, strict=True))


class Dispatcher:
    """`fn(*args)` through a per-structure cache of `jax.jit` functions of flat
    array leaves (see the module docstring).

    **Arguments:**

    - `fn`: A pure function of positional pytree arguments.
    - `num_outputs`: `None` if `fn` returns one pytree; else `fn` returns a tuple of
        this length and each position is split on its own (so that one of them can
        be fed back with `Outputs.closed`).
    - `flat_outputs`: Output positions always returned as flat dynamic leaves
        (to be fed back with `Outputs.closed` and `run`); other positions without
        static leaves or Modules come back from `jit` as pytrees.
    - `donate_argnums`: Positions whose array leaves are donated to the output.
        Donation is turned off for a variant whose donated leaves hold the same
        buffer twice (tied weights).
    - `on_error`: Called with an exception raised by the compiled function; returns
        the exception to raise instead, or `None` to re-raise it.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        num_outputs: int | None = None,
        flat_outputs: tuple[int, ...] = (),
        donate_argnums: tuple[int, ...] = (),
        on_error: Callable[[BaseException], BaseException | None] | None = None,
        max_entries: int = _MAX_ENTRIES,
    ):
        self.fn = fn
        self.num_outputs = num_outputs
        self.flat_outputs = frozenset(flat_outputs)
        self.donate_argnums = tuple(donate_argnums)
        self.on_error = on_error
        self.max_entries = max_entries
        self.entries: list[Entry] = []
        self.last_entry: Entry | None = None
        self.concrete: frozenset[type] = frozenset()

    def __call__(self, *args: Any) -> Any:
        flat = [jtu.tree_flatten(a) for a in args]
        e = self.entry(flat)
        if e is None:
            return self.fn(*args)
        outs, desc = self.run(
            e, [s.dynamic(lv) for s, (lv, _) in zip(e.splits, flat, strict=True)]
        )
        return self.unflatten_outputs(desc, outs)

    def entry(self, flat: Sequence[tuple[list, Any]]) -> Entry | None:
        """The variant for flattened arguments; `None` if a leaf is a tracer (the
        caller then runs `fn` inline)."""
        e = self.last_entry
        if e is not None and e.matches(flat, self.concrete):
            return e
        if any(isinstance(x, Tracer) for leaves, _ in flat for x in leaves):
            return None
        self.concrete = concrete_types()
        splits = tuple(Split(leaves, treedef) for leaves, treedef in flat)
        e = self._lookup(splits, flat)
        self.last_entry = e
        return e

    def run(self, e: Entry, dynamic: list[list]) -> tuple[Any, Outputs]:
        """Call variant `e` on the dynamic leaves of each argument; returns what the
        compiled function returned for the outputs (per position: the pytree, or
        its flat dynamic leaves) and the `Outputs` that says which."""
        try:
            return e.fn(*dynamic)
        except Exception as err:
            if self.on_error is None:
                raise
            new = self.on_error(err)
            if new is None:
                raise
            raise new from None

    def unflatten_outputs(self, desc: Outputs, outs: Any) -> Any:
        if self.num_outputs is None:
            return desc.output(0, outs)
        return tuple(desc.output(i, o) for i, o in enumerate(outs))

    def _lookup(self, splits: tuple[Split, ...], flat: Sequence) -> Entry:
        for e in self.entries:
            if e.same_as(splits):
                return e
        e = self._build(splits, flat)
        self.entries.append(e)
        if len(self.entries) > self.max_entries:
            del self.entries[0]
        return e

    def _build(self, splits: tuple[Split, ...], flat: Sequence) -> Entry:
        donate = self.donate_argnums
        ids = [id(x) for i in donate for x in splits[i].dynamic(flat[i][0])]
        if len(set(ids)) != len(ids):
            donate = ()  # the same buffer twice (tied weights) cannot be donated
        e = Entry(splits)
        fn = self.fn
        num_outputs = self.num_outputs
        flat_outputs = self.flat_outputs

        def flat_fn(*dynamic: list) -> Any:
            args = [s.unflatten(d) for s, d in zip(splits, dynamic, strict=True)]
            out = fn(*args)
            parts = (out,) if num_outputs is None else tuple(out)
            out_flat = [jtu.tree_flatten(p) for p in parts]
            out_splits = tuple(Split(lv, td) for lv, td in out_flat)
            # A Module comes back faster through `Split.rebuild` than through
            # `jit`'s own unflattening (Equinox's per-Module callback).
            direct = tuple(
                i not in flat_outputs
                and s.get_dynamic is None
                and not _has_slow_node(p)
                for i, (s, p) in enumerate(zip(out_splits, parts, strict=True))
            )
            dyn = [
                p if d else s.dynamic(lv)
                for p, d, s, (lv, _) in zip(
                    parts, direct, out_splits, out_flat, strict=True
                )
            ]
            desc = Outputs(out_splits, direct)
            return (dyn[0] if num_outputs is None else dyn), desc

        e.fn = jax.jit(flat_fn, donate_argnums=donate)
        return e
