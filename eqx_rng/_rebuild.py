"""A faster `treedef.unflatten` for a tree that is rebuilt on every call.

A compiled step returns the same structure every call (the model, the optimizer's
moments, the BatchNorm state) with new arrays. `jtu.tree_unflatten` rebuilds it
through one Python callback per node; for an `eqx.Module` that callback (Equinox's
generated `unflatten`) sets every field one by one and costs about 1-2 µs, so a tiny
model and Adam's two copies of it took ~70 µs per step.

`rebuilder(treedef, template)` walks the tree once and writes the source of one
straight-line Python function of the dynamic leaves that builds the same tree, with
no loop and no call per node:

- a Module is `object.__new__(cls)` given a dict literal as its `__dict__`: the new
  children, and its static fields and children without array leaves as constants;
- a subtree without array leaves whose containers are all immutable (Modules,
  tuples, `None`) is a constant: it is the same value every call;
- a tuple or list is a literal; an `eqx.nn.State` gets its dict literal (its keys
  are constants); any other node (a dict, a namedtuple, an optax state) is
  unflattened by its own registered function.

The result is checked against `treedef.unflatten` on stand-in leaves once; where
they differ (a Module class that stores a field outside `__dict__`, for example), or
the tree holds a node that cannot be taken apart one level at a time, `rebuilder`
returns `None` and the caller keeps `treedef.unflatten`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

_State = eqx.nn.State


class _Dynamic:
    """Marks a dynamic (array) leaf in the template."""

    __slots__ = ()


DYNAMIC = _Dynamic()


def _is_frozen_static(x: Any) -> bool:
    """Whether `x` holds no dynamic leaf and every container in it is immutable, so
    one object can stand for it in every rebuilt tree."""
    if any(leaf is DYNAMIC for leaf in jtu.tree_leaves(x)):
        return False
    return frozen(x)


def _not_frozen_node(x: Any) -> bool:
    return not (x is None or isinstance(x, eqx.Module | tuple))


def frozen(tree: Any) -> bool:
    """Whether every container node of `tree` is immutable (Modules, tuples,
    `None`), so that an unchanged object identity means unchanged leaves. A list or
    dict inside could be changed in place."""
    parts = jtu.tree_leaves(tree, is_leaf=_not_frozen_node)
    return all(jtu.treedef_is_leaf(jtu.tree_structure(x)) for x in parts)


def _one_level(x: Any) -> tuple[list, Any]:
    """The children of node `x` and the treedef of `x` with them as leaves."""
    return jtu.tree_flatten(x, is_leaf=lambda y: y is not x)


class _Writer:
    """Writes the builder's source: `lines` of statements, constants in `names`
    (the function's globals), the dynamic leaves unpacked into `a0, a1, ...`."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.names: dict[str, Any] = {
            "_new": object.__new__,
            "_set": object.__setattr__,
        }
        self.leaves = 0
        self.temps = 0

    def const(self, value: Any) -> str:
        name = f"c{len(self.names)}"
        self.names[name] = value
        return name

    def temp(self) -> str:
        self.temps += 1
        return f"t{self.temps}"

    def expr(self, x: Any) -> str | None:
        """An expression for subtree `x` of the template, or `None` where it cannot
        be rebuilt this way."""
        if x is DYNAMIC:
            self.leaves += 1
            return f"a{self.leaves - 1}"
        children, node_td = _one_level(x)
        if jtu.treedef_is_leaf(node_td) or _is_frozen_static(x):
            return "None" if x is None else self.const(x)
        if isinstance(x, eqx.Module):
            return self._module(x, children, node_td)
        parts = self.exprs(children)
        if parts is None:
            return None
        if type(x) is tuple:
            return "(" + "".join(p + ", " for p in parts) + ")"
        if type(x) is list:
            return "[" + ", ".join(parts) + "]"
        if type(x) is _State:
            return self._state(x, parts)
        return f"{self.const(node_td.unflatten)}([{', '.join(parts)}])"

    def exprs(self, children: list) -> list[str] | None:
        """Expressions for `children`, in order (the order of the leaves)."""
        parts = []
        for c in children:
            part = self.expr(c)
            if part is None:
                return None
            parts.append(part)
        return parts

    def _module(self, x: eqx.Module, children: list, node_td: Any) -> str | None:
        """A new `type(x)` from a dict literal, or `None` if its children do not
        each sit in one `__dict__` entry."""
        markers = [object() for _ in children]
        probe = node_td.unflatten(markers)
        fields = object.__getattribute__(probe, "__dict__")
        slots = {id(m): i for i, m in enumerate(markers)}
        where = {k: slots[id(v)] for k, v in fields.items() if id(v) in slots}
        if type(probe) is not type(x) or len(where) != len(markers):
            return None
        parts = self.exprs(children)
        if parts is None:
            return None
        template, changing = {}, []
        for name, value in fields.items():
            part = parts[where[name]] if name in where else None
            if part is None or part == "None" or part in self.names:
                template[name] = value if part is None else self.names.get(part)
            else:
                template[name] = None
                changing.append((name, part))
        obj = self.temp()
        add = self.lines.append
        add(f"{obj} = _new({self.const(type(x))})")
        if len(template) - len(changing) >= 3:
            # Mostly constant fields (a BatchNorm's settings): copying the template
            # and putting the new children in costs less than a dict literal.
            add(f"d = {self.const(template)}.copy()")
            add("".join(f"d[{name!r}] = {part}; " for name, part in changing))
            add(f"_set({obj}, '__dict__', d)")
        else:
            new = dict(changing)
            items = [
                f"{name!r}: {new[name] if name in new else self.const(value)}"
                for name, value in template.items()
            ]
            add(f"_set({obj}, '__dict__', {{{', '.join(items)}}})")
        return obj

    def _state(self, x: Any, parts: list[str]) -> str | None:
        """An `eqx.nn.State` from a dict literal of its markers and values (the
        layout `State.tree_unflatten` makes; the result is checked once)."""
        state = getattr(x, "_state", None)
        if type(state) is not dict or len(state) != len(parts):
            return None
        obj = self.temp()
        items = ", ".join(
            f"{self.const(k)}: {p}" for k, p in zip(state, parts, strict=True)
        )
        self.lines.append(f"{obj} = _new({self.const(_State)})")
        self.lines.append(f"{obj}._state = {{{items}}}")
        return obj

    def function(self, result: str) -> Callable[[list], Any]:
        unpack = "".join(f"a{i}, " for i in range(self.leaves))
        body = [f"({unpack}) = dynamic", *self.lines, f"return {result}"]
        source = "def rebuild(dynamic):\n" + "".join(f"    {b}\n" for b in body)
        namespace = dict(self.names)
        exec(compile(source, "<eqx_rng rebuild>", "exec"), namespace)
        rebuild = namespace["rebuild"]
        rebuild.source = Source(self.lines, self.names, result, self.leaves)
        return rebuild


class Source:
    """The pieces of a written rebuild, for a caller that writes them into a
    function of its own: the statements (`lines`) build the tree into the expression
    `result` from the dynamic leaves in local names `a0 ... a{leaves-1}`; `names` are
    the globals they use (constants `c...`, `_new`, `_set`); temporaries are `t...`
    and `d`."""

    __slots__ = ("lines", "names", "result", "leaves")

    def __init__(self, lines: list[str], names: dict, result: str, leaves: int):
        self.lines, self.names, self.result, self.leaves = lines, names, result, leaves


def rebuilder(treedef: Any, template: tuple) -> Callable[[list], Any] | None:
    """A function `dynamic -> tree` equal to unflattening `treedef` with the static
    leaves of `template` and the dynamic leaves `dynamic` in the `DYNAMIC` places;
    `None` if the tree cannot be rebuilt faster (see the module docstring).

    **Arguments:**

    - `treedef`: The tree's structure.
    - `template`: One entry per leaf: the static leaf, or `DYNAMIC`.
    """
    skeleton = treedef.unflatten(list(template))
    writer = _Writer()
    try:
        result = writer.expr(skeleton)
    except (TypeError, ValueError, AttributeError):
        return None  # a node that cannot be taken apart one level at a time
    if result is None or writer.leaves == 0:
        return None  # nothing dynamic: the caller's path is already cheap
    rebuild = writer.function(result)

    # Check once, on stand-in leaves, that the two ways give the same tree.
    probes = [object() for x in template if x is DYNAMIC]
    it = iter(probes)
    full = [next(it) if x is DYNAMIC else x for x in template]
    want = treedef.unflatten(full)
    try:
        got = rebuild(probes)
        got_leaves, got_td = jtu.tree_flatten(got)
    except (TypeError, ValueError, AttributeError):
        return None
    want_leaves = jtu.tree_leaves(want)
    if got_td != treedef or len(got_leaves) != len(want_leaves):
        return None
    if any(a is not b for a, b in zip(got_leaves, want_leaves, strict=True)):
        return None
    if _outline(got) != _outline(want):
        return None
    return rebuild


def _outline(x: Any) -> list:
    """Every node's type, and a Module's field names, depth first."""
    out: list = [type(x)]
    if isinstance(x, eqx.Module):
        out.append(tuple(object.__getattribute__(x, "__dict__")))
    children, node_td = _one_level(x)
    if not jtu.treedef_is_leaf(node_td):
        for c in children:
            out += _outline(c)
    return out
