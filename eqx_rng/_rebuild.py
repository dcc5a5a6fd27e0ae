"""A faster `treedef.unflatten` for a tree that is rebuilt on every call.

A compiled step returns the same structure every call (the model, the optimizer's
moments, the BatchNorm state) with new arrays. `jtu.tree_unflatten` rebuilds it
through one Python callback per node; for an `eqx.Module` that callback (Equinox's
generated `unflatten`) sets every field one by one and costs about 1-2 µs, so a tiny
model and Adam's two copies of it took ~40-80 µs per step.

`rebuilder(treedef, template)` walks the tree once and returns a function of the
dynamic leaves that builds the same tree:

- a Module is `object.__new__(cls)` given a copy of its `__dict__` with the new
  children put in (its static fields, and children without array leaves, are
  already in the copied dict);
- a subtree without array leaves whose containers are all immutable (Modules,
  tuples, `None`) is reused as it is: it is the same value every call;
- a tuple or list is built directly; any other node (`eqx.nn.State`, a dict, a
  namedtuple, an optax state) is unflattened by its own registered function.

The result is checked against `treedef.unflatten` on the template once; where they
differ (a Module class that stores a field outside `__dict__`, for example), or the
tree holds a node type not covered above, `rebuilder` returns `None` and the caller
keeps `treedef.unflatten`.
"""

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

_new = object.__new__
_setattr = object.__setattr__

# Builds one node from an iterator over the dynamic leaves.
_Build = Callable[[Iterator], Any]


class _Dynamic:
    """Marks a dynamic (array) leaf in the template."""

    __slots__ = ()


DYNAMIC = _Dynamic()


def _is_frozen_static(x: Any) -> bool:
    """Whether `x` holds no dynamic leaf and every container in it is immutable, so
    one object can stand for it in every rebuilt tree."""
    if any(leaf is DYNAMIC for leaf in jtu.tree_leaves(x)):
        return False
    parts = jtu.tree_leaves(x, is_leaf=lambda y: not _frozen_node(y))
    return all(jtu.treedef_is_leaf(jtu.tree_structure(p)) for p in parts)


def _frozen_node(x: Any) -> bool:
    return x is None or isinstance(x, eqx.Module | tuple)


def _one_level(x: Any) -> tuple[list, Any]:
    """The children of node `x` and the treedef of `x` with them as leaves."""
    return jtu.tree_flatten(x, is_leaf=lambda y: y is not x)


def _module(x: eqx.Module, children: list, node_td: Any) -> _Build | None:
    """Build `type(x)` from a copy of its `__dict__`, or `None` if its children
    do not each sit in one `__dict__` entry."""
    markers = [object() for _ in children]
    probe = node_td.unflatten(markers)
    fields = object.__getattribute__(probe, "__dict__")
    slots = {id(m): i for i, m in enumerate(markers)}
    where = {slots[id(v)]: k for k, v in fields.items() if id(v) in slots}
    if type(probe) is not type(x) or len(where) != len(markers):
        return None
    template = dict(fields)
    dynamic = []
    for i, child in enumerate(children):
        build = _build(child)
        if build is None:
            return None
        if isinstance(build, _Fixed):
            template[where[i]] = build.value
        else:
            dynamic.append((where[i], build))
    cls = type(x)
    if all(b is next for _, b in dynamic):
        # Every changing child is an array leaf (a Linear's weight and bias): take
        # them in one go. `zip` stops at the names, so no extra leaf is consumed.
        names = tuple(name for name, _ in dynamic)

        def module_of_leaves(it: Iterator) -> Any:
            d = template.copy()
            d.update(zip(names, it, strict=False))
            obj = _new(cls)
            _setattr(obj, "__dict__", d)
            return obj

        return module_of_leaves

    def module(it: Iterator) -> Any:
        d = template.copy()
        for name, b in dynamic:
            d[name] = b(it)
        obj = _new(cls)
        _setattr(obj, "__dict__", d)
        return obj

    return module


class _Fixed:
    """A child that is the same object in every rebuilt tree."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __call__(self, it: Iterator) -> Any:
        return self.value


def _build(x: Any) -> Any:
    """A builder for subtree `x` of the template (a `_Fixed` for a constant), or
    `None` where the subtree cannot be rebuilt this way."""
    if x is DYNAMIC:
        return next
    children, node_td = _one_level(x)
    if jtu.treedef_is_leaf(node_td):
        return _Fixed(x)  # a static leaf
    if _is_frozen_static(x):
        return _Fixed(x)
    if isinstance(x, eqx.Module):
        return _module(x, children, node_td)
    builds = [_build(c) for c in children]
    if any(b is None for b in builds):
        return None
    if type(x) is tuple:
        if all(b is next for b in builds):
            n = len(builds)
            return lambda it: tuple(islice(it, n))
        return lambda it: tuple([b(it) for b in builds])
    if type(x) is list:
        return lambda it: [b(it) for b in builds]
    unflatten = node_td.unflatten
    return lambda it: unflatten([b(it) for b in builds])


def rebuilder(treedef: Any, template: tuple) -> Callable[[list], Any] | None:
    """A function `dynamic -> tree` equal to unflattening `treedef` with the static
    leaves of `template` and the dynamic leaves `dynamic` in the `DYNAMIC` places;
    `None` if the tree cannot be rebuilt faster (see the module docstring).

    **Arguments:**

    - `treedef`: The tree's structure.
    - `template`: One entry per leaf: the static leaf, or `DYNAMIC`.
    """
    skeleton = treedef.unflatten(list(template))
    try:
        build = _build(skeleton)
    except (TypeError, ValueError, AttributeError):
        return None  # a node that cannot be taken apart one level at a time
    if build is None:
        return None
    if isinstance(build, _Fixed):
        return None  # nothing dynamic: the caller's path is already cheap

    def rebuild(dynamic: list) -> Any:
        return build(iter(dynamic))

    # Check once, on stand-in leaves, that the two ways give the same tree.
    probes = [object() for x in template if x is DYNAMIC]
    it = iter(probes)
    full = [next(it) if x is DYNAMIC else x for x in template]
    want = treedef.unflatten(full)
    try:
        got = rebuild(probes)
        got_leaves, got_td = jtu.tree_flatten(got)
    except (TypeError, ValueError, AttributeError, StopIteration):
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
