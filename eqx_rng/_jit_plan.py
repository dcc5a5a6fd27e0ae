"""The repeated-call path of `eqx_rng.jit`: a `Plan` per compiled variant.

A call that repeats the last one's pattern (the same numbers of positional and
keyword arguments) is checked position by position against what came last time (a
concrete array, an `eqx.nn.State`, any other pytree), and `_PlanWriter` writes the
checks, the call of the compiled program and the output's rebuild as one
straight-line function, `Plan.fast`. It returns `MISS` when the arguments may not
fit the variant; the caller then takes the general path (`_jit.py`).
"""

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from ._dispatch import Dispatcher, Entry, Split
from ._rebuild import frozen

UNUSED_DONATION = "Some donated buffers were not usable*"
_NO_LEAVES: list = []
_State = eqx.nn.State
# Kinds of argument position in a `Plan`.
_ARRAY, _STATE, _TREE = 0, 1, 2


def _state_dict(x: Any) -> dict | None:
    """The dict inside an `eqx.nn.State` (`StateIndex` marker -> value), or `None`
    for a State that `State.set` has invalidated (or a future Equinox that stores it
    differently): the caller then flattens the State, which raises Equinox's own
    error for a stale State."""
    d = getattr(x, "_state", None)
    return d if type(d) is dict else None


class _Slot:
    """One positional argument of a `Plan`: its kind and split; for a State, its
    keys and the structure of its values; for a Module, the object seen last
    (`ref`), whether its containers are all immutable (`frozen`, checked when the
    same object comes a second time) and its dynamic leaves."""

    __slots__ = (
        "kind",
        "split",
        "ref",
        "frozen",
        "dyn",
        "keys",
        "layout",
        "values_td",
        "last_dict",
    )

    def __init__(self, kind: int, split: Split):
        self.kind = kind
        self.split = split
        self.ref: Callable[[], Any] = _dead
        self.frozen: bool | None = None  # None: not checked for this object yet
        self.dyn: list = []
        self.keys: tuple = ()
        # Per State value: `None` for an array, `n` for a tuple of n arrays; or
        # `()` when some value is another pytree (then `values_td` is compared).
        self.layout: tuple = ()
        self.values_td: Any = None
        # The dict of the State read last and its leaves (`dyn`): the same State
        # object holding the same dict again (an evaluation loop) is not read again.
        # A State's dict is never changed in place (`State.set` and
        # `State.update` copy it and invalidate the old object).
        self.last_dict: dict | None = None

    def state(self, x: Any, concrete: frozenset) -> list | None:
        """The leaves of `eqx.nn.State` `x` (in `State.tree_flatten`'s order), or
        `None` if it does not fit."""
        state = _state_dict(x) if type(x) is _State else None
        if state is None or tuple(state) != self.keys:
            return None
        if not self.layout:
            leaves, td = jtu.tree_flatten(tuple(state.values()))
            if td != self.values_td:
                return None
        else:
            leaves = []
            for v, n in zip(state.values(), self.layout, strict=True):
                if n is None:
                    leaves.append(v)
                elif type(v) is tuple and len(v) == n:
                    leaves.extend(v)
                else:
                    return None
        return leaves if concrete.issuperset(map(type, leaves)) else None

    def tree(self, x: Any, concrete: frozenset) -> list | None:
        """The dynamic leaves of pytree `x`, or `None` if it does not fit."""
        if self.frozen and self.ref() is x:
            return self.dyn
        leaves, treedef = jtu.tree_flatten(x)
        if not self.split.matches(leaves, treedef, concrete):
            return None
        dyn = self.split.dynamic(leaves)
        if isinstance(x, eqx.Module):
            if self.ref() is not x:
                self.ref, self.frozen = weakref.ref(x), None
            elif self.frozen is None:
                self.frozen = frozen(x)  # the second time: worth checking, once
            self.dyn = dyn
        return dyn


def _dead() -> None:
    return None


def _layout(values: Any, concrete: frozenset) -> tuple:
    """`_Slot.layout` for the values of a State: `()` unless every value is an
    array or a tuple of arrays."""
    layout = []
    for v in values:
        if type(v) in concrete:
            layout.append(None)
        elif type(v) is tuple and all(type(y) in concrete for y in v):
            layout.append(len(v))
        else:
            return ()
    return tuple(layout)


class Plan:
    """The last call's variant, what its arguments were, and `fast(args, kwargs)`: a
    function written for them (`_PlanWriter`) that returns the call's result, or
    `MISS` when the arguments may not fit the variant (the caller then takes the
    general path). `n` and `nk` are the numbers of positional and keyword arguments
    it takes; `fast` always misses where no fast path applies (a keyword argument
    that is a pytree, or a static one other than a number, string or `None`)."""

    __slots__ = ("n", "nk", "fast")

    def __init__(
        self,
        d: Dispatcher,
        e: Entry,
        args: tuple,
        kwargs: dict,
        flat: list,
        silence: bool,
    ):
        self.n, self.nk = len(args), len(kwargs)
        keywords = _keywords(e.splits[-1], kwargs)
        if keywords is None:
            self.fast = _never
            return
        concrete = d.concrete
        slots: list[_Slot] = []
        for x, split in zip(args, e.splits[1:-1], strict=True):
            if type(x) in concrete:
                slot = _Slot(_ARRAY, split)
            elif type(x) is _State and split.get_dynamic is None:
                state = _state_dict(x)
                slot = _Slot(_STATE if state is not None else _TREE, split)
                if state is not None:
                    slot.keys = tuple(state)
                    slot.values_td = jtu.tree_structure(tuple(state.values()))
                    slot.layout = _layout(state.values(), concrete)
            else:
                slot = _Slot(_TREE, split)
                slot.tree(x, concrete)
            slots.append(slot)
        writer = _PlanWriter(d, e, e.splits[0].dynamic(flat[0][0]))
        self.fast = writer.write(slots, keywords, silence)


# Static keyword values the written path compares with `==`.
_SIMPLE = (int, float, str, bool, type(None))


def _keywords(split: Split, kwargs: dict) -> list[tuple[str, Any]] | None:
    """Per keyword argument, in the order of the flattened dict (sorted names):
    `(name, DYNAMIC)` for an array, `(name, value)` for a static number, string or
    `None`; `None` if some keyword argument is anything else."""
    names = sorted(kwargs)
    if split.treedef != jtu.tree_structure(dict.fromkeys(names, 0)):
        return None  # a keyword argument that is itself a pytree
    dynamic = set(split.dynamic_idx)
    out: list[tuple[str, Any]] = []
    for i, name in enumerate(names):
        if i in dynamic:
            out.append((name, _DYNAMIC))
        elif type(split.template[i]) in _SIMPLE:
            out.append((name, split.template[i]))
        else:
            return None
    return out


_DYNAMIC = object()


def _never(args: tuple, kwargs: dict) -> Any:
    return MISS


MISS = object()


class _PlanWriter:
    """Writes `Plan.fast` as one straight-line function: per argument position the
    check that it fits (a concrete array's type; a Module's identity, else its
    flattened form; a State's keys and the layout of its values), then the call of
    the compiled variant and the output's rebuild. A loop over positions with a
    branch per kind cost several µs per call more."""

    def __init__(self, d: Dispatcher, e: Entry, fn_dyn: list):
        self.names: dict[str, Any] = {
            "MISS": MISS,
            "concrete": d.concrete,
            "efn": e.fn,
            "on_error": d.on_error or _reraise,
            "fn_dyn": fn_dyn,
            "NO": _NO_LEAVES,
            "State": _State,
            "catch_warnings": warnings.catch_warnings,
            "filterwarnings": warnings.filterwarnings,
            "UNUSED": UNUSED_DONATION,
        }
        self.lines: list[str] = []

    def _slot(self, i: int, slot: _Slot) -> str:
        """Checks argument `x{i}`; returns the expression of its dynamic leaves."""
        add = self.lines.append
        self.names[f"s{i}"] = slot
        if slot.kind is _ARRAY:
            add(f"if type(x{i}) not in concrete: return MISS")
            return f"[x{i}]"
        if slot.kind is _STATE:
            if slot.layout:
                return self._state(i, slot)
            add(f"d{i} = s{i}.state(x{i}, concrete)")
            add(f"if d{i} is None: return MISS")
            return f"d{i}"
        # A Module seen last call is not flattened again (`_Slot.tree` does the
        # same test; written out here to save the call).
        add(f"if s{i}.frozen and s{i}.ref() is x{i}: d{i} = s{i}.dyn")
        add("else:")
        add(f"    d{i} = s{i}.tree(x{i}, concrete)")
        add(f"    if d{i} is None: return MISS")
        return f"d{i}"

    def _state(self, i: int, slot: _Slot) -> str:
        """An `eqx.nn.State` whose values are each an array or a tuple of arrays:
        its keys compared, its values unpacked, every leaf's type checked."""
        add = self.lines.append
        self.names[f"k{i}"] = slot.keys
        add(f"if type(x{i}) is not State: return MISS")
        add(f"st = getattr(x{i}, '_state', None)")
        add(f"if st is s{i}.last_dict: d{i} = s{i}.dyn")
        add("else:")
        add(f"    if type(st) is not dict or tuple(st) != k{i}: return MISS")
        values = [f"v{i}_{j}" for j in range(len(slot.layout))]
        add(f"    {''.join(v + ', ' for v in values)}= st.values()")
        leaves = []
        for v, n in zip(values, slot.layout, strict=True):
            if n is None:
                leaves.append(v)
                continue
            add(f"    if type({v}) is not tuple or len({v}) != {n}: return MISS")
            parts = [f"{v}_{m}" for m in range(n)]
            add(f"    {''.join(p + ', ' for p in parts)}= {v}")
            leaves += parts
        types = ", ".join(f"type({x})" for x in leaves)
        add(f"    if not concrete.issuperset(({types},)): return MISS")
        add(f"    d{i} = s{i}.dyn = [{', '.join(leaves)}]")
        add(f"    s{i}.last_dict = st")
        return f"d{i}"

    def _keywords(self, keywords: list[tuple[str, Any]]) -> str:
        """Checks the keyword arguments (in `kw`); returns the expression of their
        dynamic leaves."""
        if not keywords:
            return "NO"
        add = self.lines.append
        leaves = []
        for j, (name, value) in enumerate(keywords):
            add(f"w{j} = kw.get({name!r}, MISS)")
            if value is _DYNAMIC:
                add(f"if type(w{j}) not in concrete: return MISS")
                leaves.append(f"w{j}")
            else:
                self.names[f"sv{j}"] = value
                add(
                    f"if w{j} is not sv{j} and not "
                    f"(type(w{j}) is type(sv{j}) and w{j} == sv{j}): return MISS"
                )
        return "[" + ", ".join(leaves) + "]"

    def write(
        self, slots: list[_Slot], keywords: list[tuple[str, Any]], silence: bool
    ) -> Callable[[tuple, dict], Any]:
        xs = "".join(f"x{i}, " for i in range(len(slots)))
        self.lines.append(f"({xs}) = args")
        parts = ["fn_dyn", *(self._slot(i, s) for i, s in enumerate(slots))]
        parts.append(self._keywords(keywords))
        call = [
            "try:",
            f"    outs, desc = efn({', '.join(parts)})",
            "except Exception as err:",
            "    new = on_error(err)",
            "    if new is None: raise",
            "    raise new from None",
        ]
        if silence:
            call = [
                "with catch_warnings():",
                "    filterwarnings('ignore', message=UNUSED)",
                *("    " + c for c in call),
            ]
        self.lines += call
        self.lines.append("return desc.first(outs)")
        source = "def fast(args, kw):\n" + "".join(f"    {b}\n" for b in self.lines)
        namespace = dict(self.names)
        exec(compile(source, "<eqx_rng.jit call>", "exec"), namespace)
        return namespace["fast"]


def _reraise(err: BaseException) -> None:
    return None
