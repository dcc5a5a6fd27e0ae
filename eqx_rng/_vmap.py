"""`eqx_rng.vmap`: `eqx.filter_vmap` with per-call keys, State handling and a check.

Three additions to `eqx.filter_vmap`, all at trace time (nothing is left in the
compiled program but the vmap itself and one `fold_in` per call for `key=`):

1. `key=`: the caller passes one key; mapped call `i` gets `derive(key, i)`.
2. `eqx.nn.State` arguments are unmapped in and out when `axis_name` is set.
3. An unmapped key argument drawn from without per-call data folded in raises
   `BroadcastKeyError` (see `_key_flow.py`).
"""

import functools
import inspect
import threading
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._custom_types import _LEGACY_KEY_HINT
from ._errors import BroadcastKeyError
from ._key_flow import Facts, find_broadcast_keys
from ._keys import derive
from ._typecheck import typecheck
from ._util import describe, is_key_like, is_typed_key

_DEFAULT_AXES = eqx.if_array(0)
"""The default `in_axes` / `out_axes`. Compared by identity: passing
`eqx.if_array(0)` yourself is an explicit choice, and explicit choices win."""

_KEY_MODES = ("derive", "broadcast")
_MISSING = object()
# JAX's messages for a batched output at out_axes None (they have changed over time).
_JAX_UNMAPPED_OUT_ERRORS = ("but out_axes is None", "got axis spec None but output")

# Set while a function is being traced for the key-flow analysis, so that nested
# `eqx_rng.vmap`s do not start an analysis of their own inside it (they run theirs
# when the function is traced for real).
_analysing = threading.local()

# Concrete meshes of the Explicit-sharded inputs of the `eqx_rng.vmap`s being run
# eagerly right now (innermost last): a nested `eqx_rng.vmap` sees only tracers, whose
# types name an abstract mesh, and needs the devices to place its per-call indices.
_eager_meshes = threading.local()


def _is_state(x: Any) -> bool:
    return isinstance(x, eqx.nn.State)


def _is_none(x: Any) -> bool:
    return x is None


def _fn_name(fn: Any) -> str:
    fn = inspect.unwrap(fn) if callable(fn) else fn
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None or not isinstance(name, str):
        name = type(fn).__name__
    return name


def _positional_names(fn: Callable, n: int) -> list[str]:
    """A name for each of `n` positional arguments of `fn` (for messages)."""
    while isinstance(fn, _VmapWrapper):
        fn = fn._fn
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    positional = [
        p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    var = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    for i in range(n):
        if i < len(positional):
            names.append(positional[i])
        elif var is not None:
            names.append(f"{var}[{i - len(positional)}]")
        else:
            names.append(f"#{i}")
    return names


def _label(kind: str, name: str, path: Any) -> str:
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


def _leaf_axes(spec: Any, tree: Any, what: str) -> list[Any]:
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


def _default_arg_spec(arg: Any, state_unmapped: bool) -> Any:
    """The default axes of one argument: `if_array(0)`, or None for State."""
    if not state_unmapped:
        return _DEFAULT_AXES
    return jtu.tree_map(
        lambda x: None if _is_state(x) else _DEFAULT_AXES, arg, is_leaf=_is_state
    )


def _check_key(key: Any) -> None:
    if is_typed_key(key):
        if key.shape != ():
            raise TypeError(
                f"`eqx_rng.vmap(fn)(..., key=...)` takes one typed key, got an array "
                f"of keys of shape {tuple(key.shape)}. Mapped call i gets "
                f"`derive(key, i)` from the one key. To hand each call a key of "
                f"your own, pass the key array as a positional (mapped) argument."
            )
        return
    if isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32:
        raise TypeError(
            f"`eqx_rng.vmap(fn)(..., key=...)` got a legacy uint32 key of shape "
            f"{tuple(key.shape)}. {_LEGACY_KEY_HINT}"
        )
    raise TypeError(
        f"`eqx_rng.vmap(fn)(..., key=...)` takes a typed scalar PRNG key "
        f"(`jax.random.key(seed)` or `eqx_rng.as_key(seed)`), got {describe(key)}."
    )


def _is_batched(x: Any) -> bool | None:
    """Whether `x` carries the batch axis of the vmap being traced right now.

    Uses JAX internals; returns None (unknown) if they are not as expected, in which
    case JAX's own error is converted instead.
    """
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters import batching

        trace = jax_core.trace_ctx.trace
        if not isinstance(trace, batching.BatchTrace):
            return None
        return (
            isinstance(x, batching.BatchTracer)
            and x._trace is trace
            and getattr(x, "batch_dim", None) is not None
        )
    except Exception:
        return None


def _mapped_spec_entry(leaf: Any, axis: int) -> Any:
    """How the mapped axis of `leaf` is split over Explicit mesh axes (None: not)."""
    try:
        return jax.typeof(leaf).sharding.spec[axis]
    except (IndexError, TypeError, AttributeError):
        return None


def _describe_entry(entry: Any) -> str:
    if entry is None:
        return "not split over an Explicit mesh axis"
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    if len(names) == 1:
        return f"split over the Explicit mesh axis {names[0]!r}"
    return f"split over the Explicit mesh axes {' x '.join(map(repr, names))}"


def _eager_mesh_stack() -> list[Mesh]:
    if not hasattr(_eager_meshes, "stack"):
        _eager_meshes.stack = []
    return _eager_meshes.stack


def _context_mesh() -> Mesh | None:
    """The concrete mesh of a `jax.set_mesh` context, outside `jit`; else None."""
    try:
        mesh = jax.sharding.get_mesh()
    except ValueError:  # inside `jit`: only the abstract mesh is known
        return None
    return None if mesh.empty else mesh


_STATE_FIX = (
    "it is the same for every mapped call only if every value written into it is "
    "reduced over the mapped axis first, e.g. `lax.pmean(value, axis_name)` "
    "(BatchNorm does this over its `axis_name`)"
)


class _VmapWrapper(eqx.Module):
    _fn: Callable
    _in_axes: Any
    _out_axes: Any
    _axis_name: Hashable | None
    _axis_size: int | None
    _keys: str

    # Callers such as `eqx.filter_jit` bind arguments to the signature: ours takes
    # `key=` as a keyword whatever `fn`'s own signature says.
    __signature__ = inspect.Signature(
        [
            inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    )

    @property
    def __wrapped__(self) -> Callable:
        return self._fn

    def __get__(self, instance: Any, owner: Any) -> Any:
        del owner
        if instance is None:
            return self
        return eqx.Partial(self, instance)

    # -- inputs ----------------------------------------------------------------

    def _arg_specs(self, args: tuple, names: list[str]) -> list[Any]:
        in_axes = self._in_axes
        state_unmapped = self._axis_name is not None
        if in_axes is _DEFAULT_AXES:
            return [_default_arg_spec(a, state_unmapped) for a in args]
        if isinstance(in_axes, dict):
            remaining = dict(in_axes)
            specs = []
            for arg, name in zip(args, names, strict=True):
                if name in remaining:
                    specs.append(remaining.pop(name))
                else:
                    specs.append(_default_arg_spec(arg, state_unmapped))
            if remaining:
                raise ValueError(
                    f"`eqx_rng.vmap(in_axes=...)` names {sorted(map(str, remaining))} "
                    f"but `{_fn_name(self._fn)}` was called with the positional "
                    f"arguments {names}."
                )
            return specs
        if isinstance(in_axes, tuple | list):
            if len(in_axes) != len(args):
                raise ValueError(
                    f"`eqx_rng.vmap(in_axes=...)` has {len(in_axes)} entries but "
                    f"`{_fn_name(self._fn)}` was called with {len(args)} positional "
                    f"arguments {names}; give one entry per positional argument "
                    f"(keyword arguments are never mapped)."
                )
            return list(in_axes)
        return [in_axes] * len(args)

    def _flatten_inputs(
        self, args: tuple, kwargs: dict
    ) -> tuple[list[Any], Any, list[Any], list[str]]:
        """Leaves of `(args, kwargs)`, their treedef, axes and labels."""
        names = _positional_names(self._fn, len(args))
        specs = self._arg_specs(args, names)
        leaves: list[Any] = []
        axes: list[Any] = []
        labels: list[str] = []
        for arg, spec, name in zip(args, specs, names, strict=True):
            arg_axes = _leaf_axes(spec, arg, f"argument '{name}'")
            with_path, _ = jtu.tree_flatten_with_path(arg)
            for (path, leaf), axis in zip(with_path, arg_axes, strict=True):
                leaves.append(leaf)
                axes.append(axis)
                labels.append(_label("argument", name, path))
        for kw_name, value in kwargs.items():
            with_path, _ = jtu.tree_flatten_with_path(value)
            for path, leaf in with_path:
                leaves.append(leaf)
                axes.append(None)
                labels.append(_label("keyword argument", kw_name, path))
        treedef = jtu.tree_structure((args, kwargs))
        return leaves, treedef, axes, labels

    def _axis_size_from(
        self, leaves: list[Any], axes: list[Any], labels: list[str]
    ) -> tuple[int | None, list[Any]]:
        """Check every mapped leaf; return the mapped size and normalised axes."""
        sizes: dict[int, str] = {}
        normalised = list(axes)
        for i, (leaf, axis, label) in enumerate(zip(leaves, axes, labels, strict=True)):
            if axis is None:
                continue
            if not eqx.is_array(leaf):
                # Python numbers, bools, functions, strings have no axis to map:
                # an int applies to the array leaves under it only.
                normalised[i] = None
                continue
            shape = tuple(leaf.shape)
            if not -len(shape) <= axis < len(shape):
                hint = ""
                if is_typed_key(leaf) and shape == ():
                    hint = (
                        " To give every call its own key, pass the key as `key=` "
                        "(mapped call i gets `derive(key, i)`); to share it, give it "
                        'in_axes None and `keys="broadcast"`.'
                    )
                elif shape == ():
                    hint = " If it is shared by every call, give it in_axes None."
                raise ValueError(
                    f"`eqx_rng.vmap`: {label} has shape {shape} and cannot be mapped "
                    f"over axis {axis}.{hint}"
                )
            axis = axis % len(shape)
            normalised[i] = axis
            sizes.setdefault(shape[axis], label)
        if self._axis_size is not None:
            for size, label in sizes.items():
                if size != self._axis_size:
                    raise ValueError(
                        f"`eqx_rng.vmap(axis_size={self._axis_size})`: {label} is "
                        f"mapped over an axis of size {size}."
                    )
            return self._axis_size, normalised
        if len(sizes) > 1:
            listed = ", ".join(f"{label} has size {s}" for s, label in sizes.items())
            raise ValueError(
                f"`eqx_rng.vmap`: mapped arguments disagree on the size of the mapped "
                f"axis: {listed}. Map arguments of one size, or give the odd ones "
                f"in_axes None."
            )
        if not sizes:
            return None, normalised
        return next(iter(sizes)), normalised

    # -- the per-call index ----------------------------------------------------

    def _mapped_split(
        self, leaves: list[Any], axes: list[Any], labels: list[str]
    ) -> tuple[Any, str, Any]:
        """How the mapped inputs are split along the mapped axis over devices.

        Returns the `PartitionSpec` entry of the mapped axis (None when it is not
        split over `Explicit` mesh axes: unsharded arrays, `Auto` axes), the label of
        the first mapped leaf and the first leaf that is split (or None). `jax.vmap`
        requires every mapped input to be split alike; a mismatch is a `ValueError`
        naming both arguments.
        """
        first: tuple[Any, str] | None = None
        source = None
        for leaf, axis, label in zip(leaves, axes, labels, strict=True):
            if axis is None:
                continue
            entry = _mapped_spec_entry(leaf, axis)
            if first is None:
                first = (entry, label)
            elif entry != first[0]:
                raise ValueError(
                    f"`eqx_rng.vmap({_fn_name(self._fn)})`: the mapped arguments "
                    f"must be split over devices alike along the mapped axis, but "
                    f"{first[1]} is {_describe_entry(first[0])} and {label} is "
                    f"{_describe_entry(entry)}. Place them alike (for example "
                    f"`eqx_rng.shard` both with the same `PartitionSpec`, or "
                    f"`jax.sharding.reshard` inside `jit`), or build the mesh with "
                    f"`Auto` axes (`eqx_rng.chain_mesh`), which need no match."
                )
            if source is None and entry is not None:
                source = leaf
        if first is None:
            return None, "", None
        return first[0], first[1], source

    def _call_index(
        self, entry: Any, label: str, source: Any, axis_size: int
    ) -> tuple[jax.Array, Mesh | None]:
        """`arange(axis_size)`, split over devices like the mapped inputs.

        Not split (`entry` None: unsharded inputs, `Auto` mesh axes): a plain
        `arange`, as always. Split over `Explicit` mesh axes: the same `arange`,
        resharded to match (same values, so the same keys). Also returns the
        concrete mesh when the inputs are concrete arrays, for nested
        `eqx_rng.vmap`s run eagerly inside this one (they see only tracers).
        """
        index = jnp.arange(axis_size, dtype=jnp.uint32)
        if entry is None or source is None:
            return index, None
        abstract = jax.typeof(source).sharding.mesh
        concrete = None
        if not isinstance(source, Tracer):
            concrete = getattr(getattr(source, "sharding", None), "mesh", None)
        if not isinstance(concrete, Mesh):
            candidates = [_context_mesh(), *reversed(_eager_mesh_stack())]
            concrete = next(
                (
                    m
                    for m in candidates
                    if m is not None and m.abstract_mesh == abstract
                ),
                None,
            )
        mesh = abstract if concrete is None else concrete
        try:
            index = jax.sharding.reshard(
                index, NamedSharding(mesh, PartitionSpec(entry))
            )
        except ValueError as e:
            raise ValueError(
                f"`eqx_rng.vmap({_fn_name(self._fn)})(..., key=...)`: {label} is "
                f"{_describe_entry(entry)}, so the per-call key indices must be "
                f"split the same way, but outside `jit` the devices of that mesh "
                f"are not known here (the arguments are traced by an enclosing "
                f"`jax.vmap`). Run the call under `eqx.filter_jit` / `jax.jit`, "
                f"inside `with jax.set_mesh(mesh):`, or build the mesh with `Auto` "
                f"axes (`eqx_rng.chain_mesh`)."
            ) from e
        return index, None if isinstance(source, Tracer) else concrete

    # -- the key-flow check ----------------------------------------------------

    def _check_broadcast_keys(
        self,
        leaves: list[Any],
        axes: list[Any],
        labels: list[str],
        treedef: Any,
        call_key: Any,
        axis_size: int,
    ) -> None:
        """Raise `BroadcastKeyError` if an unmapped key argument is consumed as is.

        Called inside the vmapped body, at trace time, where the axis name is bound.
        Internal failures of the analysis turn the check off rather than breaking
        the program (the real trace that follows reports the user's own errors).
        """
        fn = self._fn
        name = _fn_name(fn)
        fn_leaves, fn_def = jtu.tree_flatten_with_path(fn)
        # Inputs of the traced per-call function: mapped leaves, unmapped key-like
        # leaves of the arguments and of `fn` itself (a Module), and the per-call key.
        # Everything else stays closed over, concrete where it was concrete.
        inputs: list[Any] = []
        facts: list[Facts] = []
        origin_label: dict[int, str] = {}
        arg_slots: list[int] = []
        fn_slots: list[int] = []
        for i, (leaf, axis) in enumerate(zip(leaves, axes, strict=True)):
            if axis is not None:
                facts.append(Facts(frozenset(), True))
            elif is_key_like(leaf):
                origin_label[len(inputs)] = labels[i]
                facts.append(Facts(frozenset({len(inputs)}), False))
            else:
                continue
            arg_slots.append(i)
            inputs.append(leaf)
        for j, (path, leaf) in enumerate(fn_leaves):
            if is_key_like(leaf):
                origin_label[len(inputs)] = _label("the mapped function", name, path)
                facts.append(Facts(frozenset({len(inputs)}), False))
                fn_slots.append(j)
                inputs.append(leaf)
        if not origin_label:
            return
        pass_key = call_key is not _MISSING
        if pass_key and call_key is not None:
            facts.append(Facts(frozenset(), True))
            inputs.append(call_key)
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

        _analysing.depth = getattr(_analysing, "depth", 0) + 1
        try:
            closed = jax.make_jaxpr(per_call)(*inputs)
            findings = find_broadcast_keys(closed, facts, self._axis_name)
        except Exception:
            return
        finally:
            _analysing.depth -= 1
        if not findings:
            return
        which = [origin_label[f.origin] for f in findings]
        prims = ", ".join(sorted({f"`{f.primitive}`" for f in findings}))
        if len(which) == 1:
            subject = f"{which[0]} is a PRNG key that is not mapped"
            obj = "it"
        else:
            subject = f"{', '.join(which)} are PRNG keys that are not mapped"
            obj = "them"
        raise BroadcastKeyError(
            f"`eqx_rng.vmap({name})`: {subject}, and `{name}` draws from {obj} "
            f"({prims}) without folding in anything that differs per call, so all "
            f"{axis_size} mapped calls would draw the same numbers. Pass the key as "
            f"`key=` instead, so that `eqx_rng.vmap` derives one key per call "
            f"(`derive(key, i)`); or fold per-call data into it first "
            f"(`jr.fold_in(key, lax.axis_index(axis_name))`, or a mapped example "
            f'id). To share one key on purpose, pass `keys="broadcast"`.'
        )

    # -- outputs ---------------------------------------------------------------

    def _out_leaf_axes(self, out: Any, state_out_unmapped: bool) -> list[Any]:
        if self._out_axes is _DEFAULT_AXES:
            spec = jtu.tree_map(
                lambda x: (
                    None if _is_state(x) and state_out_unmapped else _DEFAULT_AXES
                ),
                out,
                is_leaf=_is_state,
            )
            return _leaf_axes(spec, out, "the output")
        return _leaf_axes(self._out_axes, out, "the output (`out_axes`)")

    def _check_unmapped_outputs(
        self, out: Any, out_axes: list[Any], state_out_unmapped: bool
    ) -> None:
        name = _fn_name(self._fn)
        with_path, _ = jtu.tree_flatten_with_path(out)
        state_paths = {
            jtu.keystr(p)
            for p, x in jtu.tree_flatten_with_path(out, is_leaf=_is_state)[0]
            if _is_state(x)
        }
        for (path, leaf), axis in zip(with_path, out_axes, strict=True):
            if axis is not None or not eqx.is_array(leaf) or not _is_batched(leaf):
                continue
            state_at = next(
                (
                    jtu.keystr(path[:n])
                    for n in range(len(path) + 1)
                    if jtu.keystr(path[:n]) in state_paths
                ),
                None,
            )
            if state_at is not None and state_out_unmapped:
                raise ValueError(self._state_message(name, state_at))
            raise ValueError(
                f"`eqx_rng.vmap({name})`: the output at {jtu.keystr(path) or '()'} "
                f"has `out_axes` None but differs from one mapped call to the next. "
                f"Return it mapped (an int in `out_axes`), or reduce it over the "
                f"mapped axis first (`lax.pmean(value, axis_name)` with `axis_name=` "
                f"set)."
            )

    def _state_message(self, name: str, where: str) -> str:
        where = f" at {where}" if where else ""
        if self._axis_name is None:
            fix = (
                "Set `axis_name=` on `eqx_rng.vmap` and reduce what you store "
                "(`lax.pmean(value, axis_name)`), or pass `out_axes` explicitly (for "
                "example `out_axes=(0, 0)`) to return one state per call."
            )
        else:
            fix = (
                f"Reduce what you store over the batch first (`lax.pmean(value, "
                f"{self._axis_name!r})`), or pass `out_axes` explicitly (for example "
                f"`out_axes=(0, 0)`) to return one state per call."
            )
        return (
            f"`eqx_rng.vmap({name})`: the `eqx.nn.State` returned{where} came back "
            f"batched (different in each mapped call), but a State whose inputs "
            f"were unmapped is returned unmapped: {_STATE_FIX}. {fix}"
        )

    # -- the call --------------------------------------------------------------

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        key = kwargs.pop("key", _MISSING)
        if key is not _MISSING and key is not None:
            _check_key(key)
        leaves, treedef, axes, labels = self._flatten_inputs(args, kwargs)
        axis_size, axes = self._axis_size_from(leaves, axes, labels)
        if axis_size is None:
            raise ValueError(
                f"`eqx_rng.vmap({_fn_name(self._fn)})`: no argument is mapped, so the "
                f"number of calls is unknown; map an argument or pass `axis_size=`."
            )

        state_leaf_axes = [
            axis
            for arg_leaves_axes in self._state_input_axes(args, leaves, axes)
            for axis in arg_leaves_axes
        ]
        has_state_in = bool(state_leaf_axes)
        state_in_mapped = any(a is not None for a in state_leaf_axes)
        state_out_unmapped = not state_in_mapped and (
            self._axis_name is not None or has_state_in
        )

        derive_keys = self._keys == "derive"
        per_call_key = key is not _MISSING and key is not None and derive_keys
        check = derive_keys and getattr(_analysing, "depth", 0) == 0

        mapped = [i for i, a in enumerate(axes) if a is not None]
        dynamic = [leaves[i] for i in mapped]
        dynamic_axes = [axes[i] for i in mapped]
        entry, first_label, source = self._mapped_split(leaves, axes, labels)
        concrete_mesh = None
        if per_call_key:
            index, concrete_mesh = self._call_index(
                entry, first_label, source, axis_size
            )
            dynamic.append(index)
            dynamic_axes.append(0)
        static_box: list[Any] = []

        def body(dyn: list[Any]) -> tuple[Any, Any]:
            call_leaves = list(leaves)
            for i, value in zip(mapped, dyn, strict=False):
                call_leaves[i] = value
            call_args, call_kwargs = jtu.tree_unflatten(treedef, call_leaves)
            call_kwargs = dict(call_kwargs)
            call_key: Any = key
            if per_call_key:
                call_key = derive(key, dyn[-1])  # pyright: ignore[reportArgumentType]
            if key is not _MISSING:
                call_kwargs["key"] = call_key
            if check:
                self._check_broadcast_keys(
                    call_leaves, axes, labels, treedef, call_key, axis_size
                )
            out = self._fn(*call_args, **call_kwargs)
            out_axes = self._out_leaf_axes(out, state_out_unmapped)
            self._check_unmapped_outputs(out, out_axes, state_out_unmapped)
            out_leaves, out_def = jtu.tree_flatten(out)
            vmapped, unmapped = [], []
            static = []
            for leaf, axis in zip(out_leaves, out_axes, strict=True):
                if axis is not None and eqx.is_array(leaf):
                    vmapped.append(leaf)
                    static.append(("vmapped", axis))
                elif eqx.is_array(leaf):
                    unmapped.append(leaf)
                    static.append(("unmapped", None))
                else:
                    static.append(("static", leaf))
            static_box.append((out_def, static))
            return vmapped, unmapped

        stack = _eager_mesh_stack()
        if concrete_mesh is not None:
            stack.append(concrete_mesh)
        try:
            vmapped, unmapped = jax.vmap(
                body,
                in_axes=(dynamic_axes,),
                out_axes=(0, None),
                axis_name=self._axis_name,
                axis_size=axis_size,
            )(dynamic)
        except ValueError as e:
            if not any(m in str(e) for m in _JAX_UNMAPPED_OUT_ERRORS):
                raise
            name = _fn_name(self._fn)
            if state_out_unmapped:
                raise ValueError(self._state_message(name, "")) from e
            raise ValueError(
                f"`eqx_rng.vmap({name})`: an output with `out_axes` None differs "
                f"from one mapped call to the next; return it mapped or reduce it "
                f"over the mapped axis first."
            ) from e
        finally:
            if concrete_mesh is not None:
                stack.pop()

        out_def, static = static_box[-1]
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

    def _state_input_axes(
        self, args: tuple, leaves: list[Any], axes: list[Any]
    ) -> list[list[Any]]:
        """The axes of the leaves of every State found in the positional arguments."""
        result: list[list[Any]] = []
        start = 0
        for arg in args:
            with_states, _ = jtu.tree_flatten(arg, is_leaf=_is_state)
            for item in with_states:
                n = len(jtu.tree_leaves(item))
                if _is_state(item):
                    result.append(axes[start : start + n])
                start += n
        return result


@typecheck
def vmap(
    fn: Callable | None = None,
    *,
    in_axes: Any = _DEFAULT_AXES,
    out_axes: Any = _DEFAULT_AXES,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    keys: str = "derive",
) -> Callable:
    """`eqx.filter_vmap` with one key per call, automatic State axes and a key check.

    Maps `fn` like `eqx.filter_vmap` (by default every array argument over its
    leading axis, everything else broadcast; `in_axes` may also be a dict of
    parameter names), plus:

    1. **Keys.** `fn` may take a keyword `key`. The caller passes one typed key,
        `vmap(fn)(xs, key=key)`, and mapped call `i` gets `derive(key, i)`. `i` is the
        global index along the mapped axis, also when that axis is sharded over
        devices under `jit` (the index is an `arange` over the whole axis), so a
        call's key does not depend on the number of devices. Nested
        `vmap(vmap(f))(xs, key=key)` gives element `(c, b)` exactly
        `grid_keys(key, (C, B))[c, b]`. `key=None` is passed on as `None`. Other
        keyword arguments are passed unchanged to every call (never mapped).
    2. **State.** With `axis_name` set, `eqx.nn.State` arguments at positions left
        at the default `in_axes` are not mapped, and State outputs at default
        `out_axes` are returned unmapped (the `in_axes=(0, None), out_axes=(0, None)`
        ritual is automatic). Without `axis_name`, a State output is returned
        unmapped when every State argument was unmapped, and mapped otherwise
        (one State per chain, say). An explicit `in_axes` / `out_axes` is obeyed as
        given. A State returned unmapped that differs per call (a per-example
        value was written into it) is a `ValueError` naming the fix.
    3. **Broadcast keys.** An argument that is not mapped and holds a PRNG key that
        `fn` draws from (or splits), without first folding in per-call data, raises
        `BroadcastKeyError`: every call would draw the same numbers. The check reads
        the traced program (through `jit`, `scan`, `cond`, `while`, `checkpoint`,
        custom derivatives and inner vmaps) once, at trace time. Folding per-call
        data in first (`jr.fold_in(key, lax.axis_index(axis_name))`, or a mapped
        example id) raises nothing. Keys captured by a closure are not checked.

    The checks run at trace time: under `jit` the compiled program is the vmap
    itself (plus one `fold_in` per call when `key=` is given).

    **Arguments:**

    - `fn`: The function to map. When omitted, `vmap(...)` returns a decorator.
    - `in_axes`: As in `eqx.filter_vmap`: `None`, an int, a callable
        `leaf -> int | None`, a tuple with one entry per positional argument (each a
        prefix pytree of its argument), or a dict from parameter names to axes.
        Default `eqx.if_array(0)`, with State handling as above.
    - `out_axes`: As in `eqx.filter_vmap`, a prefix pytree of the output. Default
        `eqx.if_array(0)`, with State handling as above.
    - `axis_name`: Name of the mapped axis, for collectives (`lax.pmean`) and
        `lax.axis_index`.
    - `axis_size`: The number of calls; needed only when no argument is mapped.
    - `keys`: `"derive"` (default: call `i` gets `derive(key, i)` and broadcast keys
        are checked) or `"broadcast"` (`key=` is passed unchanged to every call and
        nothing is checked).

    **Returns:**

    The mapped function. It takes `fn`'s positional arguments, optional `key=` and
    other keyword arguments, and returns `fn`'s output with the mapped axis at
    `out_axes` on every mapped array leaf.

    **Raises:**

    At call (trace) time: `BroadcastKeyError`; `TypeError` when `key=` is not one
    typed key (a legacy key points to `eqx_rng.as_key`); `ValueError` for `in_axes`
    that do not match the arguments, mapped arguments of different sizes or not
    `axis_size`, a leaf that cannot be mapped, or a batched State as above. Here:
    `ValueError` for `keys` other than `"derive"` / `"broadcast"`.

    !!! Example

        ```python
        def add_noise(x, *, key):
            return x + jr.normal(key, x.shape)

        xs = jnp.zeros((8, 3))
        key = jr.key(0)
        ys = eqx_rng.vmap(add_noise)(xs, key=key)  # row i: derive(key, i)
        assert jnp.array_equal(ys[5], add_noise(xs[5], key=eqx_rng.derive(key, 5)))
        ```
    """
    if keys not in _KEY_MODES:
        raise ValueError(
            f"`eqx_rng.vmap(keys=...)` is 'derive' (one key per call) or 'broadcast' "
            f"(one key shared by every call), got {keys!r}."
        )
    if axis_size is not None and axis_size < 0:
        raise ValueError(
            f"`eqx_rng.vmap(axis_size=...)` must be >= 0, got {axis_size}."
        )
    if fn is None:
        return functools.partial(
            vmap,
            in_axes=in_axes,
            out_axes=out_axes,
            axis_name=axis_name,
            axis_size=axis_size,
            keys=keys,
        )
    wrapper = _VmapWrapper(
        _fn=fn,
        _in_axes=in_axes,
        _out_axes=out_axes,
        _axis_name=axis_name,
        _axis_size=axis_size,
        _keys=keys,
    )
    return eqx.module_update_wrapper(wrapper)


__all__ = ["BroadcastKeyError", "vmap"]
