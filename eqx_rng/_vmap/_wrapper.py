"""`eqx_rng.vmap`: `eqx.filter_vmap` with per-call keys, State handling and a check.

Three additions to `eqx.filter_vmap`, all at trace time (nothing is left in the
compiled program but the vmap itself and one `fold_in` per call for `key=`):

1. `key=`: the caller passes one key; mapped call `i` gets `derive(key, i)`.
2. `eqx.nn.State` arguments are unmapped in and out when `axis_name` is set.
3. An unmapped key argument drawn from without per-call data folded in raises
   `BroadcastKeyError` (see `_check.py` and `_key_flow.py`).
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from .._custom_types import _legacy_key_message
from .._keys import derive
from .._typecheck import typecheck
from .._util import describe, is_typed_key
from ._axes import (
    DEFAULT_AXES,
    arg_specs,
    axis_size_from,
    flatten_inputs,
    fn_name,
    positional_names,
    state_input_axes,
    state_leaf_flags,
)
from ._check import MISSING, analysing, check_broadcast_keys
from ._outputs import (
    assemble_outputs,
    check_out_axis_range,
    check_unmapped_outputs,
    is_unmapped_output_error,
    out_leaf_axes,
    split_outputs,
    state_message,
)
from ._placement import call_index, eager_mesh_stack, mapped_split
from ._shared import unwrap_shared

_KEY_MODES = ("derive", "broadcast")


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
        raise TypeError(_legacy_key_message("eqx_rng.vmap(fn)", tuple(key.shape)))
    raise TypeError(
        f"`eqx_rng.vmap(fn)(..., key=...)` takes a typed scalar PRNG key "
        f"(`jax.random.key(seed)` or `eqx_rng.as_key(seed)`), got {describe(key)}."
    )


def _check_axes_spec(what: str, spec: Any) -> None:
    """Every entry of `in_axes` / `out_axes` is None, an int or a callable."""
    if spec is DEFAULT_AXES:
        return
    for path, entry in jtu.tree_flatten_with_path(spec)[0]:
        if isinstance(entry, bool) or not (isinstance(entry, int) or callable(entry)):
            where = jtu.keystr(path)
            raise ValueError(
                f"`eqx_rng.vmap({what}=...)`: every entry is None, an int (the axis "
                f"to map) or a callable `leaf -> int | None`, got {entry!r}"
                f"{f' at {where}' if where else ''}. For example `{what}=0`, "
                f"`{what}=(0, None)` or `{what}=eqx.if_array(0)`."
            )


@dataclasses.dataclass
class _Call:
    """One call's inputs, resolved: leaves, axes, the key and the State flags."""

    leaves: list[Any]
    treedef: Any
    axes: list[Any]
    labels: list[str]
    axis_size: int
    exempt: list[bool]
    key: Any
    per_call_key: bool
    check: bool
    state_out_unmapped: bool


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

    def _innermost_fn(self) -> Callable:
        fn = self._fn
        while isinstance(fn, _VmapWrapper):
            fn = fn._fn
        return fn

    def _unwrap_shared(
        self, args: tuple, kwargs: dict, names: list[str], name: str
    ) -> tuple[tuple, dict, list[bool]]:
        """Arguments with `eqx_rng.shared` markers removed, and a flag per leaf
        (positional arguments first, then keyword arguments) for leaves that were
        inside one."""
        exempt: list[bool] = []
        new_args = []
        for i, arg in enumerate(args):
            value, flags, whole = unwrap_shared(arg)
            if whole and self._explicit_axis(i, names[i]) is not None:
                raise ValueError(
                    f"`eqx_rng.vmap({name})`: argument '{names[i]}' is wrapped in "
                    f"`eqx_rng.shared(...)`, so it is passed unmapped, but `in_axes` "
                    f"maps it ({self._explicit_axis(i, names[i])!r}). Give it "
                    f"in_axes None, or drop `eqx_rng.shared` to map it."
                )
            new_args.append(value)
            exempt.extend(flags)
        new_kwargs = {}
        for kw_name, arg in kwargs.items():
            new_kwargs[kw_name], flags, _ = unwrap_shared(arg)
            exempt.extend(flags)
        return tuple(new_args), new_kwargs, exempt

    def _explicit_axis(self, i: int, arg_name: str) -> Any:
        """The `in_axes` entry given for positional argument `i` by a tuple or dict."""
        in_axes = self._in_axes
        if isinstance(in_axes, tuple | list) and i < len(in_axes):
            return in_axes[i]
        if isinstance(in_axes, dict):
            return in_axes.get(arg_name)
        return None

    def _resolve(self, args: tuple, kwargs: dict) -> _Call:
        """Check the call's inputs and resolve every leaf's axis."""
        name = fn_name(self._fn)
        key = kwargs.pop("key", MISSING)
        if key is not MISSING and key is not None:
            _check_key(key)
        names = positional_names(self._innermost_fn(), len(args))
        args, kwargs, exempt = self._unwrap_shared(args, kwargs, names, name)
        specs = arg_specs(self._in_axes, self._axis_name is not None, args, names, name)
        leaves, treedef, axes, labels = flatten_inputs(args, kwargs, specs, names)
        axes = [None if ex else a for a, ex in zip(axes, exempt, strict=True)]
        in_state = state_leaf_flags(args, len(leaves))
        axis_size, axes = axis_size_from(
            leaves, axes, labels, self._axis_size, in_state
        )
        if axis_size is None:
            raise ValueError(
                f"`eqx_rng.vmap({name})`: no argument is mapped, so the number of "
                f"calls is unknown; map an argument or pass `axis_size=`."
            )
        state_axes = state_input_axes(args, axes)
        state_in_mapped = any(a is not None for a in state_axes)
        derive_keys = self._keys == "derive"
        return _Call(
            leaves=leaves,
            treedef=treedef,
            axes=axes,
            labels=labels,
            axis_size=axis_size,
            exempt=exempt,
            key=key,
            per_call_key=key is not MISSING and key is not None and derive_keys,
            check=derive_keys and not analysing(),
            state_out_unmapped=not state_in_mapped
            and (self._axis_name is not None or bool(state_axes)),
        )

    def _body(self, call: _Call, mapped: list[int], layout_box: list) -> Callable:
        """The function `jax.vmap` maps: one call of `fn`, outputs split by axis."""
        name = fn_name(self._fn)

        def body(dyn: list[Any]) -> tuple[Any, Any]:
            call_leaves = list(call.leaves)
            for i, value in zip(mapped, dyn, strict=False):
                call_leaves[i] = value
            call_args, call_kwargs = jtu.tree_unflatten(call.treedef, call_leaves)
            call_kwargs = dict(call_kwargs)
            call_key: Any = call.key
            if call.per_call_key:
                call_key = derive(call.key, dyn[-1])
            if call.key is not MISSING:
                call_kwargs["key"] = call_key
            if call.check:
                check_broadcast_keys(
                    self._fn,
                    call_leaves,
                    call.axes,
                    call.labels,
                    call.exempt,
                    call.treedef,
                    call_key,
                    call.axis_size,
                    self._axis_name,
                )
            out = self._fn(*call_args, **call_kwargs)
            out_axes = out_leaf_axes(self._out_axes, out, call.state_out_unmapped)
            check_out_axis_range(out, out_axes, name)
            check_unmapped_outputs(
                out, out_axes, call.state_out_unmapped, name, self._axis_name
            )
            vmapped, unmapped, layout = split_outputs(out, out_axes)
            layout_box.append(layout)
            return vmapped, unmapped

        return body

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        name = fn_name(self._fn)
        call = self._resolve(args, dict(kwargs))
        mapped = [i for i, a in enumerate(call.axes) if a is not None]
        dynamic = [call.leaves[i] for i in mapped]
        dynamic_axes = [call.axes[i] for i in mapped]
        entry, first_label, source = mapped_split(
            call.leaves, call.axes, call.labels, name
        )
        concrete_mesh = None
        if call.per_call_key:
            index, concrete_mesh = call_index(
                entry, first_label, source, call.axis_size, name
            )
            dynamic.append(index)
            dynamic_axes.append(0)
        layout_box: list[Any] = []
        stack = eager_mesh_stack()
        if concrete_mesh is not None:
            stack.append(concrete_mesh)
        try:
            vmapped, unmapped = jax.vmap(
                self._body(call, mapped, layout_box),
                in_axes=(dynamic_axes,),
                out_axes=(0, None),
                axis_name=self._axis_name,
                axis_size=call.axis_size,
            )(dynamic)
        except ValueError as e:
            if not is_unmapped_output_error(e):
                raise
            if call.state_out_unmapped:
                raise ValueError(state_message(name, "", self._axis_name)) from e
            raise ValueError(
                f"`eqx_rng.vmap({name})`: an output with `out_axes` None differs "
                f"from one mapped call to the next; return it mapped or reduce it "
                f"over the mapped axis first."
            ) from e
        finally:
            if concrete_mesh is not None:
                stack.pop()
        return assemble_outputs(vmapped, unmapped, layout_box[-1])


@typecheck
def vmap(
    fn: Callable | None = None,
    *,
    in_axes: Any = DEFAULT_AXES,
    out_axes: Any = DEFAULT_AXES,
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
    3. **Broadcast keys.** A key that is the same in every mapped call (an
        unmapped argument, a key field of `fn` when `fn` is a Module, a key closed
        over by `fn`, or a key made inside `fn` from a fixed seed) that `fn` *draws*
        from (`jr.normal`, `jr.bernoulli`, ...) with nothing per call folded in
        raises `BroadcastKeyError`: every call would draw the same numbers.
        Splitting is not drawing: the keys a split makes inherit their parent's
        marks, so `jr.split(key, n)[i]` with a mapped `i`, or
        `jr.fold_in(jr.split(key)[0], i)`, raise nothing; neither does folding
        per-call data in (`jr.fold_in(key, lax.axis_index(axis_name))`, a mapped
        example id). The check reads the traced program (through `jit`, `scan`,
        `cond`, `while`, `checkpoint`, custom derivatives and inner vmaps) once, at
        trace time. To share an argument's randomness on purpose, wrap it in
        `eqx_rng.shared(...)`.

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
    `axis_size`, a leaf that cannot be mapped (a State mapped because `axis_name`
    is unset is named, with the fix), an `out_axes` entry out of range for an
    output, an argument wrapped in `eqx_rng.shared` that `in_axes` maps, or a
    batched State as above. Here: `ValueError` for `keys` other than `"derive"` /
    `"broadcast"`, and for `in_axes` / `out_axes` entries that are not None, an int
    or a callable.

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
    _check_axes_spec("in_axes", in_axes)
    _check_axes_spec("out_axes", out_axes)
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


__all__ = ["vmap"]
