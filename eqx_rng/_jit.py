"""`eqx_rng.jit`: `eqx.filter_jit` semantics at the dispatch cost of `jax.jit`.

The callable flattens its arguments once per call and hands them to a `Dispatcher`
(`_dispatch.py`), which checks them against the last compiled variant and calls a
`jax.jit` function of the flat array leaves. The callable itself (`fn`) is flattened
once, when it is wrapped: a Module or a bound method of a Module contributes its
arrays as traced arguments, as `eqx.filter_jit` does for a Module.

A call that repeats the last one's pattern (the same numbers of positional and
keyword arguments) takes a shorter path written once per variant (`_jit_plan.py`):
it checks only what could differ, calls the compiled program and rebuilds the
output in straight-line code.
"""

import functools
import inspect
import re
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from ._dispatch import Dispatcher, Entry
from ._jit_plan import MISS, UNUSED_DONATION, Plan, frozen
from ._typecheck import typecheck

# donate= -> (donate the first argument, donate the rest, silence JAX's warning
# about donated buffers that the program could not reuse). The options and their
# meaning are `eqx.filter_jit`'s.
_DONATE = {
    "all": (True, True, True),
    "all-except-first": (False, True, True),
    "warn": (True, True, False),
    "warn-except-first": (False, True, False),
    "none": (False, False, False),
}
_EQX_ERROR = re.compile(r"_EquinoxRuntimeError: (.*?)(?:\n\s*\n|\Z)", re.DOTALL)
_EMPTY = jtu.tree_flatten({})
_LEAF = jtu.tree_structure(0)


def _runtime_error(err: BaseException) -> BaseException | None:
    """A failed `eqx.error_if` / `eqx.branched_error_if` check as the
    `eqx.EquinoxRuntimeError` that `eqx.filter_jit` raises (JAX reports it as a
    failed callback); `None` for any other error."""
    found = _EQX_ERROR.search(str(err))
    if found is None:
        return None
    return eqx.EquinoxRuntimeError(found.group(1).strip())


def _call_parts(fn_parts: tuple, *parts: Any) -> Any:
    """Call `fn` from its parts: `(function, bound arguments)`, then each positional
    argument, then the dict of keyword arguments."""
    func, bound = fn_parts
    *args, kwargs = parts
    return func(*bound, *args, **kwargs)


def _fn_parts(fn: Callable) -> tuple[Callable, tuple]:
    """`(function, bound arguments)`: a bound method of a pytree with arrays (a
    Module's method) is split into its function and instance, so that the instance's
    arrays are traced arguments, not constants of the compiled program."""
    self = getattr(fn, "__self__", None)
    func = getattr(fn, "__func__", None)
    if (
        inspect.ismethod(fn)
        and func is not None
        and any(eqx.is_array(x) for x in jtu.tree_leaves(self))
    ):
        return func, (self,)
    return fn, ()


class _ArgCache:
    """The flattened form of the last Module passed at one argument position,
    reused while the same object comes back (a model evaluated on batch after
    batch). Only Modules whose containers are all immutable are reused, and only
    from their second call on (a model that changes every call is never checked)."""

    __slots__ = ("ref", "flat", "frozen")

    def __init__(self, x: Any, flat: tuple[list, Any]):
        self.ref = weakref.ref(x)
        self.flat = flat
        self.frozen: bool | None = None  # None: not checked yet


class _Jitted:
    """The callable that `eqx_rng.jit` returns (see its docstring).

    Fast path: `fn` was flattened once, when wrapped. Each positional argument is
    a dispatcher argument of its own: a concrete array is passed as it is, a Module
    seen at the same position last call is not flattened again, an `eqx.nn.State`
    is read from its dict, anything else is flattened; the keyword arguments are
    flattened together. One `Dispatcher` per number of positional arguments.
    """

    def __init__(self, fn: Callable, donate: str):
        self.__wrapped__ = fn
        self.donate = donate
        self._donate_first, self._donate_rest, self._silence = _DONATE[donate]
        self._fn_parts = _fn_parts(fn)
        self._fn_flat = jtu.tree_flatten(self._fn_parts)
        self._dispatchers: dict[int, Dispatcher] = {}
        self._cache: list[_ArgCache | None] = []
        self._signature: inspect.Signature | None = None
        self._checked_entry: Entry | None = None
        self._checked: list = []
        self._plan: Plan | None = None
        self._plans: dict[Entry, Plan] = {}  # written once per variant
        functools.update_wrapper(self, fn, updated=())

    def __repr__(self) -> str:
        name = getattr(self.__wrapped__, "__qualname__", repr(self.__wrapped__))
        return f"<eqx_rng.jit of {name}, donate={self.donate!r}>"

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        # Used as a method decorator: the instance becomes the first argument.
        if instance is None:
            return self
        return functools.partial(self, instance)

    def _dispatcher(self, n: int) -> Dispatcher:
        d = self._dispatchers.get(n)
        if d is None:
            # Dispatcher arguments: fn, the n positional arguments, the kwargs.
            donated = [0, *range(2, n + 2)] if self._donate_rest else []
            if self._donate_first and n >= 1:
                donated.append(1)
            d = Dispatcher(
                _call_parts,
                donate_argnums=tuple(sorted(donated)),
                on_error=_runtime_error,
            )
            self._dispatchers[n] = d
            self._cache += [None] * (n - len(self._cache))
        return d

    def _flatten(self, i: int, x: Any, concrete: frozenset) -> tuple[list, Any]:
        if type(x) in concrete:
            return [x], _LEAF
        c = self._cache[i]
        if c is not None and c.ref() is x:
            if c.frozen is None:
                c.frozen = frozen(x)
            if c.frozen:
                return c.flat
        flat = jtu.tree_flatten(x)
        if isinstance(x, eqx.Module):
            self._cache[i] = _ArgCache(x, flat)
        return flat

    def _flat(self, args: tuple, kwargs: dict) -> tuple[Dispatcher, list]:
        if kwargs and self._donate_first != self._donate_rest:
            # As `eqx.filter_jit` does: the first parameter is the first argument
            # also when it is passed by keyword.
            if self._signature is None:
                self._signature = inspect.signature(self.__wrapped__)
            bound = self._signature.bind(*args, **kwargs)
            args, kwargs = bound.args, bound.kwargs
        d = self._dispatcher(len(args))
        concrete = d.concrete
        flat = [self._fn_flat]
        for i, x in enumerate(args):
            flat.append(self._flatten(i, x, concrete))
        flat.append(jtu.tree_flatten(kwargs) if kwargs else _EMPTY)
        return d, flat

    def _fits(self, e: Entry, flat: list, concrete: frozenset) -> bool:
        """Whether `flat` fits variant `e`. A position whose flattened form is the
        very object that fitted `e` last call (`fn`, a cached Module, no kwargs)
        is not compared again."""
        checked = self._checked if self._checked_entry is e else ()
        for i, (s, f) in enumerate(zip(e.splits, flat, strict=True)):
            if i < len(checked) and checked[i] is f:
                continue
            if not s.matches(f[0], f[1], concrete):
                return False
        self._checked_entry, self._checked = e, flat
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan
        if plan is not None and len(args) == plan.n and len(kwargs) == plan.nk:
            out = plan.fast(args, kwargs)
            if out is not MISS:
                return out
        d, flat = self._flat(args, kwargs)
        e = d.last_entry
        if e is None or not self._fits(e, flat, d.concrete):
            e = d.entry(flat)
        if e is None:
            # A tracer among the leaves: inside jit / vmap / grad / scan, run inline.
            return _call_parts(*[tr.unflatten(leaves) for leaves, tr in flat])
        dynamic = [s.dynamic(lv) for s, (lv, _) in zip(e.splits, flat, strict=True)]
        if kwargs and self._donate_first != self._donate_rest:
            self._plan = None  # `_flat` bound keyword arguments to positions
        else:
            self._plan = self._plan_for(d, e, args, kwargs, flat)
        return self._run(d, e, dynamic)

    def _plan_for(
        self, d: Dispatcher, e: Entry, args: tuple, kwargs: dict, flat: list
    ) -> Plan:
        # Writing a plan costs a few hundred µs: one per variant, kept while the
        # dispatcher keeps the variant (the kinds of argument positions follow
        # from the variant's tree structures).
        plan = self._plans.get(e)
        if plan is None or (plan.n, plan.nk) != (len(args), len(kwargs)):
            if len(self._plans) >= 2 * d.max_entries:
                self._plans.clear()
            plan = self._plans[e] = Plan(d, e, args, kwargs, flat, self._silence)
        return plan

    def _run(self, d: Dispatcher, e: Entry, dynamic: list) -> Any:
        if self._silence:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=UNUSED_DONATION)
                outs, desc = d.run(e, dynamic)
        else:
            outs, desc = d.run(e, dynamic)
        return d.unflatten_outputs(desc, outs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """`jax.stages.Lowered` of the compiled variant for these arguments (its
        inputs are the flat array leaves); `.compile().memory_analysis()` and
        `.as_text()` work as for `jax.jit`."""
        d, flat = self._flat(args, kwargs)
        e = d.entry(flat)
        if e is None:
            raise TypeError(
                "`eqx_rng.jit(fn).lower(...)` needs concrete arrays, got a tracer "
                "among the arguments; call `.lower` outside `jit`, `vmap` and `grad`."
            )
        dynamic = [s.dynamic(lv) for s, (lv, _) in zip(e.splits, flat, strict=True)]
        return e.fn.lower(*dynamic)  # type: ignore[attr-defined]


@typecheck
def jit(fn: Callable, *, donate: str = "none") -> Callable:
    """Compile `fn` with `eqx.filter_jit`'s semantics at about `jax.jit`'s dispatch
    cost.

    Every JAX or NumPy array among the arguments (positional and keyword, at any
    depth of a pytree) is traced; every other leaf (a Python number, a string, a
    function, a Module's static field) is static: a new value compiles a new
    variant. Non-array leaves of the output come back as they are. `fn` may be a
    function, an `eqx.Module` (its arrays are traced arguments) or a bound method of
    one. Called inside `jit`, `vmap`, `grad` or `scan` (a tracer among the
    arguments), `fn` is traced inline.

    **Dispatch.** A call flattens the arguments once, checks them against the last
    compiled variant (tree structure, static leaves equal, array leaves concrete)
    and calls a `jax.jit` function of the flat arrays: within a few per cent of a
    hand-written `jax.jit` call, where `eqx.filter_jit` costs several times more for
    a small model. A call that repeats the last one's pattern takes a shorter path
    written for its variant (the same Module or State object is not read again);
    a keyword argument that is a pytree (not an array, number, string or `None`)
    takes the general path, so pass such arguments by position in a hot loop. New
    shapes or dtypes recompile as `jax.jit` does; up to 16 structures are cached.

    **Differences from `eqx.filter_jit`.** A bound method of a Module traces the
    Module's arrays (`eqx.filter_jit` bakes them into the program as constants), so
    a new Module of the same structure reuses the compiled code. The call does not
    wait for the result (asynchronous dispatch, as `jax.jit`); a failed
    `eqx.error_if` check still raises `eqx.EquinoxRuntimeError` with its message.
    An argument passed by keyword compiles its own variant (the same result).

    **Arguments:**

    - `fn`: The function, Module or bound method to compile.
    - `donate`: Which array buffers are donated to the outputs, as in
        `eqx.filter_jit`: `"none"` (default), `"all"`, `"all-except-first"`, and
        `"warn"` / `"warn-except-first"` (the same, without silencing JAX's warning
        about donated buffers the program could not reuse). "All" includes the
        arrays of `fn` itself when it is a Module. A donated array is deleted by the
        call (CPU donates too): use only the outputs. (Keyword only argument.)

    **Returns:**

    A callable with `fn`'s signature. It has `.lower(*args, **kwargs)` (the
    `jax.stages.Lowered` of the compiled variant) and works as a method decorator.

    **Raises:**

    `ValueError` for an unknown `donate`.

    !!! Example

        ```python
        model = eqx.nn.MLP(2, 1, 8, 2, key=jr.key(0))

        @eqx_rng.jit
        def predict(model, x, *, scale=1.0):
            return scale * jax.vmap(model)(x)

        x = jnp.ones((4, 2))
        y = predict(model, x)
        assert jnp.allclose(y, eqx.filter_jit(predict.__wrapped__)(model, x))
        y2 = predict(model, x, scale=2.0)  # a new static value: a new variant
        assert jnp.allclose(y2, 2 * y)
        ```
    """
    if donate not in _DONATE:
        raise ValueError(
            f"`eqx_rng.jit(fn, donate=...)` must be one of {tuple(_DONATE)}, got "
            f"{donate!r}; pass donate='all' to donate every array argument."
        )
    return _Jitted(fn, donate)
