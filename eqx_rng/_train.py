"""Training: `TrainState`, and `make_train_step` with low dispatch overhead.

A training run is reproducible from its seed and its step number alone: the key of
step `t` is `derive(ts.key, t)`, and `TrainState.key` never changes. So a run resumed
from a checkpoint of `(model, state, opt_state, key, step)` draws exactly the numbers
an uninterrupted run would have drawn.

`make_train_step` returns a callable that, called on concrete arrays, flattens its
arguments once, checks them against a cached structure and calls a `jax.jit`-compiled
function of the flat array leaves: close to the cost of a hand-written `jax.jit` step
(`eqx.filter_jit` re-partitions and hashes the whole tree on every call). Called
inside a transformation (`jit`, `vmap`, `scan`), it traces the pure step inline.
"""

import dataclasses
import operator
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jax.core import Tracer
from jaxtyping import Array, Int, PyTree

from ._custom_types import Key, KeyGrid
from ._keys import as_key, derive
from ._typecheck import typecheck

_NAN_POLICIES = ("report", "skip", "error")
_NAN_TAG = "eqx_rng.make_train_step: non-finite"
_NAN_MSG_RE = re.compile(re.escape(_NAN_TAG) + r"[^\n]*")
_ADDED_METRICS = ("loss", "grad_norm", "finite")

# Leaf types that the fast path passes straight to `jax.jit`. Anything else (a
# tracer, a NumPy scalar, a Python number in a new place) takes the slow path.
_CONCRETE_TYPES = frozenset({type(jnp.zeros(())), type(jax.random.key(0)), np.ndarray})
_MAX_ENTRIES = 16
_getattr = object.__getattribute__


@typecheck
class TrainState(eqx.Module):
    """Everything a training run carries from one step to the next.

    A pytree (an `eqx.Module`): save it with `eqx_rng.save`, map it over chains with
    `eqx_rng.vmap`. `key` never changes; the key of step `t` is
    `eqx_rng.derive(key, t)`, so a run is reproducible from `(key, step)` alone and a
    resumed run draws what an uninterrupted one would.

    **Fields:**

    - `model`: The model (any pytree, usually an `eqx.Module`).
    - `state`: An `eqx.nn.State` (BatchNorm statistics and the like), or `None`.
    - `opt_state`: The optax optimizer state, built on
        `eqx.filter(model, eqx.is_inexact_array)`.
    - `key`: The run's typed PRNG key.
    - `step`: The number of steps taken, an `int32` scalar array.

    Make one with `TrainState.create`.

    !!! Example

        ```python
        import optax

        model = eqx.nn.Linear(2, 1, key=jr.key(0))
        ts = eqx_rng.TrainState.create(model, optax.sgd(0.1), key=1)
        assert int(ts.step) == 0 and ts.step.dtype == jnp.int32
        ```
    """

    model: PyTree
    state: PyTree
    opt_state: PyTree
    # Scalars for one run; a chain-batched TrainState (from `eqx_rng.ensemble`, or
    # built directly) has a leading chain axis here too.
    key: KeyGrid
    step: Int[Array, "*chains"]

    @classmethod
    @typecheck
    def create(
        cls,
        model: PyTree,
        optimizer: optax.GradientTransformation,
        *,
        key: Key | int | np.integer,
        state: PyTree = None,
    ) -> "TrainState":
        """The state of a run at step 0.

        The model's and the state's arrays are copied, so a step that donates its
        input buffers (`make_train_step(..., donate=True)`) never deletes the arrays
        of the `model` passed in here.

        **Arguments:**

        - `model`: The model, usually an `eqx.Module`.
        - `optimizer`: An optax optimizer; its state is built with
            `optimizer.init(eqx.filter(model, eqx.is_inexact_array))`.
        - `key`: The run's typed key, or an `int` seed (`eqx_rng.as_key`). Use a key
            that did not also build the model: for example
            `derive(key, "init")` for the model, `derive(key, "train")` here.
            (Keyword only argument.)
        - `state`: An `eqx.nn.State`, or `None` for a stateless model. (Keyword
            only argument.)

        **Returns:**

        A `TrainState` with `step == 0` (`int32`).

        !!! Example

            ```python
            import optax

            key = jr.key(0)
            model, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
            ts = eqx_rng.TrainState.create(
                model, optax.adam(1e-3), key=eqx_rng.derive(key, "train"),
                state=state,
            )
            ```
        """
        key = as_key(key)
        model = _copy_arrays(model)
        state = _copy_arrays(state)
        with jax.numpy_dtype_promotion("standard"):  # optax is not strict-clean
            opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        return cls(
            model=model,
            state=state,
            opt_state=opt_state,
            key=key,
            step=jnp.zeros((), jnp.int32),
        )


def _copy_arrays(tree: Any) -> Any:
    """Copy the JAX arrays of `tree` (NumPy arrays are never donated)."""
    return jtu.tree_map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)


def _new_train_state(model, state, opt_state, key, step) -> TrainState:
    """Build a `TrainState` as `tree_unflatten` does (no `__init__`, no checks)."""
    ts = object.__new__(TrainState)
    fields = _getattr(ts, "__dict__")
    fields["model"] = model
    fields["state"] = state
    fields["opt_state"] = opt_state
    fields["key"] = key
    fields["step"] = step
    return ts


# --------------------------------------------------------------------------------
# The pure step.


@dataclasses.dataclass(frozen=True)
class _StepMessages(Sequence[str]):
    """The NaN error message for each step: `msgs[t]` names step `t`.

    `eqx.branched_error_if` picks `msgs[index]` at run time; with `index` the step
    number this names the failing step without a host sync.
    """

    what: str

    def __getitem__(self, step: int) -> str:  # type: ignore[override]
        return (
            f"{_NAN_TAG} {self.what} at step {step} (nan_policy='error'). The "
            f"TrainState passed in is at step {step}; the step's key is "
            f"`eqx_rng.derive(ts.key, {step})`. To find the cause, reproduce that "
            "step with `nan_policy='report'` and `jax.config.update("
            "'jax_debug_nans', True)`, or skip such steps with nan_policy='skip'."
        )

    def __len__(self) -> int:
        return 2**31


def _global_norm(tree: Any) -> Array:
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    wide = any(x.dtype in (jnp.float64, jnp.complex128) for x in leaves)
    acc_dtype = jnp.float64 if wide else jnp.float32
    total = jnp.zeros((), acc_dtype)
    for x in leaves:
        if jnp.iscomplexobj(x):
            sq = jnp.real(x * jnp.conj(x)).astype(acc_dtype)
        else:
            sq = jnp.square(x.astype(acc_dtype))
        total = total + jnp.sum(sq)
    return jnp.sqrt(total)


def _apply_updates(model: Any, updates: Any) -> Any:
    """`eqx.apply_updates`, keeping each parameter's dtype.

    A bfloat16 parameter with a float32 update is updated in float32 and cast back
    (as `optax.apply_updates` does), explicitly, so strict dtype promotion is fine.
    """

    def apply(u, p):
        if u is None:
            return p
        if u.dtype == p.dtype:
            return p + u
        with jax.numpy_dtype_promotion("standard"):
            common = jnp.promote_types(p.dtype, u.dtype)
        return (p.astype(common) + u.astype(common)).astype(p.dtype)

    return jtu.tree_map(apply, updates, model, is_leaf=lambda x: x is None)


def _where(pred: Array, new: Any, old: Any) -> Any:
    def pick(n, o):
        if eqx.is_array(n):
            return lax.select(jnp.broadcast_to(pred, n.shape), n, o)
        return n

    return jtu.tree_map(pick, new, old)


def _loss_fn_name(loss_fn: Callable) -> str:
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__


def _make_one_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    nan_policy: str,
    extra_metrics: bool,
) -> Callable:
    name = _loss_fn_name(loss_fn)

    def loss_and_aux(model, state, batch, key):
        out = loss_fn(model, state, batch, key=key)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"`make_train_step`: `loss_fn` ({name}) must return "
                f"`(loss, (state, metrics))`, got {type(out).__name__}; return "
                "for example `loss, (state, {'acc': acc})` (state may be None)."
            )
        loss, aux = out
        if not (isinstance(aux, tuple) and len(aux) == 2):
            raise TypeError(
                f"`make_train_step`: `loss_fn` ({name}) must return "
                f"`(loss, (state, metrics))`; the second element is "
                f"{type(aux).__name__}, not a `(state, metrics)` pair. Return "
                "`loss, (state, metrics)` with state None for a stateless model."
            )
        new_state, metrics = aux
        if metrics is None:
            metrics = {}
        loss = jnp.asarray(loss)
        if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
            raise TypeError(
                f"`make_train_step`: `loss_fn` ({name}) must return a floating "
                f"scalar loss, got shape {loss.shape} and dtype {loss.dtype}."
            )
        return loss, (new_state, metrics)

    grad_fn = eqx.filter_value_and_grad(loss_and_aux, has_aux=True)
    messages = _StepMessages("loss or gradient (NaN or inf)")

    def one_step(ts: TrainState, batch: Any) -> tuple[TrainState, Any]:
        step_key = derive(ts.key, ts.step)
        (loss, (state, metrics)), grads = grad_fn(ts.model, ts.state, batch, step_key)
        params = eqx.filter(ts.model, eqx.is_inexact_array)
        with jax.numpy_dtype_promotion("standard"):
            # optax relies on implicit promotion (adam's `decay**count` mixes a
            # Python float and an int32), which `jax_numpy_dtype_promotion="strict"`
            # refuses; the user's own code (`loss_fn`) keeps their setting.
            updates, opt_state = optimizer.update(grads, ts.opt_state, params)
        model = _apply_updates(ts.model, updates)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        step = ts.step + 1
        if nan_policy == "skip":
            model, state, opt_state = _where(
                finite, (model, state, opt_state), (ts.model, ts.state, ts.opt_state)
            )
        elif nan_policy == "error":
            step = eqx.branched_error_if(step, ~finite, ts.step, messages)
        if isinstance(metrics, dict):
            metrics = dict(metrics)
            added = (loss, grad_norm, finite) if extra_metrics else (loss,)
            for k, v in zip(_ADDED_METRICS, added, strict=False):
                metrics.setdefault(k, v)
        # Any other pytree of metrics is returned as `loss_fn` made it.
        new_ts = TrainState(
            model=model, state=state, opt_state=opt_state, key=ts.key, step=step
        )
        return new_ts, metrics

    return one_step


def _make_multi_step(one_step: Callable, steps_per_call: int) -> Callable:
    def multi_step(ts: TrainState, batch: Any) -> tuple[TrainState, Any]:
        for path, leaf in jtu.tree_leaves_with_path(batch):
            if not eqx.is_array(leaf):
                continue
            if leaf.ndim == 0 or leaf.shape[0] != steps_per_call:
                raise ValueError(
                    f"`make_train_step(..., steps_per_call={steps_per_call})` "
                    f"takes a batch with a leading axis of {steps_per_call} (one "
                    f"batch per step) on every array; `batch{jtu.keystr(path)}` "
                    f"has shape {tuple(leaf.shape)}. Stack {steps_per_call} "
                    "batches with `jnp.stack` or reshape to "
                    f"`({steps_per_call}, batch_size, ...)`."
                )
        dynamic, static = eqx.partition(ts, eqx.is_array)

        def body(dynamic, batch_t):
            new_ts, metrics = one_step(eqx.combine(dynamic, static), batch_t)
            new_dynamic, _ = eqx.partition(new_ts, eqx.is_array)
            return new_dynamic, metrics

        dynamic, metrics = lax.scan(body, dynamic, batch, length=steps_per_call)
        return eqx.combine(dynamic, static), metrics

    return multi_step


# --------------------------------------------------------------------------------
# Fast dispatch.


def _getter(idx: tuple[int, ...]) -> Callable[[list], list]:
    if len(idx) == 0:
        return lambda leaves: []
    if len(idx) == 1:
        i = idx[0]
        return lambda leaves: [leaves[i]]
    get = operator.itemgetter(*idx)
    return lambda leaves: list(get(leaves))


def _same(a: tuple, b: tuple) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


class _Split:
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

    def matches(self, leaves: list, treedef: Any) -> bool:
        if treedef != self.treedef:
            return False
        if self.get_dynamic is None:
            return _CONCRETE_TYPES.issuperset(map(type, leaves))
        return _CONCRETE_TYPES.issuperset(
            map(type, self.get_dynamic(leaves))
        ) and _same(tuple(self.get_static(leaves)), self.static_vals)

    def same_as(self, other: "_Split") -> bool:
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


class _Entry:
    """One compiled variant: the structure and static leaves of the train state's
    `(model, state, opt_state, step)` and of the batch."""

    __slots__ = ("ts_split", "batch_split", "fn", "out_split", "closed")

    def __init__(self, ts_split: _Split, batch_split: _Split):
        self.ts_split = ts_split
        self.batch_split = batch_split
        self.fn: Callable = lambda *args: None
        self.out_split: _Split | None = None
        # Whether the output `(model, state, opt_state, step)` has the structure and
        # static leaves of the input, so that the returned TrainState can be fed back
        # without being flattened again.
        self.closed = False


class _TrainStep:
    """The callable returned by `make_train_step` (see its docstring).

    Fast path: `(model, state, opt_state, step)` and `batch` are flattened and
    checked against the last compiled variant (tree structure, non-array leaves equal,
    array leaves concrete); a `TrainState` that this step returned last time is
    recognised by identity and not flattened at all. The arrays go to a `jax.jit`
    function of flat lists. Anything else (a tracer, a new structure) takes the slow
    path: the pure step inline under a transformation, else a new or cached variant.
    """

    def __init__(
        self,
        pure: Callable,
        *,
        donate: bool,
        steps_per_call: int,
        nan_policy: str,
        name: str,
    ):
        self._pure = pure
        self._donate = donate
        self.steps_per_call = steps_per_call
        self.nan_policy = nan_policy
        self._entries: list[_Entry] = []
        self._last_entry: _Entry | None = None
        # (weakref to the TrainState returned last, its entry, its dynamic leaves)
        self._last_out: tuple[Any, _Entry, list] | None = None
        self.__name__ = self.__qualname__ = f"train_step[{name}]"

    def __repr__(self) -> str:
        return (
            f"<eqx_rng train step: steps_per_call={self.steps_per_call}, "
            f"nan_policy={self.nan_policy!r}>"
        )

    def _forget(self, ref: Any) -> None:
        last = self._last_out
        if last is not None and last[0] is ref:
            self._last_out = None

    def __call__(self, ts: Any, batch: Any) -> tuple[Any, Any]:
        # `ts` is checked here, not annotated: a type checker's message would hide
        # ours, and a per-call check would cost more than the dispatch.
        if type(ts) is not TrainState:
            raise TypeError(
                "The step made by `eqx_rng.make_train_step` takes `(ts, batch)` with "
                f"`ts` an `eqx_rng.TrainState`, got {type(ts).__name__}; make one "
                "with `eqx_rng.TrainState.create(model, optimizer, key=...)`."
            )
        # Fields are read with `object.__getattribute__`: `eqx.Module` overrides
        # `__getattribute__` in Python, which would cost more than the rest.
        fields = _getattr(ts, "__dict__")
        key = fields["key"]
        batch_leaves, batch_treedef = jtu.tree_flatten(batch)
        last = self._last_out
        if last is not None and last[0]() is ts:
            e = last[1]
            if e.batch_split.matches(batch_leaves, batch_treedef):
                return self._run(e, key, last[2], batch_leaves)
        ts_leaves, ts_treedef = jtu.tree_flatten(
            (fields["model"], fields["state"], fields["opt_state"], fields["step"])
        )
        e = self._last_entry
        if not (
            e is not None
            and e.ts_split.matches(ts_leaves, ts_treedef)
            and e.batch_split.matches(batch_leaves, batch_treedef)
            and type(key) in _CONCRETE_TYPES
        ):
            if any(isinstance(x, Tracer) for x in (*ts_leaves, key, *batch_leaves)):
                # Inside jit / vmap / scan / grad: trace the pure step inline.
                return self._pure(ts, batch)
            e = self._lookup(ts_leaves, ts_treedef, batch_leaves, batch_treedef)
            self._last_entry = e
        return self._run(e, key, e.ts_split.dynamic(ts_leaves), batch_leaves)

    def _run(
        self, e: _Entry, key: Any, donated: list, batch_leaves: list
    ) -> tuple[TrainState, Any]:
        try:
            out, metrics = e.fn(donated, key, e.batch_split.dynamic(batch_leaves))
        except Exception as err:  # JAX wraps the callback's error in various types
            found = _NAN_MSG_RE.search(str(err))
            if found is None:
                raise
            raise eqx.EquinoxRuntimeError(found.group(0)) from None
        out_split = e.out_split
        assert out_split is not None
        model, state, opt_state, step = out_split.unflatten(out)
        new_ts = _new_train_state(model, state, opt_state, key, step)
        if e.closed:
            self._last_out = (weakref.ref(new_ts, self._forget), e, out)
        else:
            self._last_out = None
        return new_ts, metrics

    def _lookup(
        self, ts_leaves: list, ts_treedef: Any, batch_leaves: list, batch_treedef: Any
    ) -> _Entry:
        ts_split = _Split(ts_leaves, ts_treedef)
        batch_split = _Split(batch_leaves, batch_treedef)
        for e in self._entries:
            if e.ts_split.same_as(ts_split) and e.batch_split.same_as(batch_split):
                return e
        e = self._build(ts_split, batch_split, ts_leaves)
        self._entries.append(e)
        if len(self._entries) > _MAX_ENTRIES:
            del self._entries[0]
        return e

    def _build(self, ts_split: _Split, batch_split: _Split, ts_leaves: list) -> _Entry:
        donate = self._donate
        ids = [id(x) for x in ts_split.dynamic(ts_leaves)]
        if len(set(ids)) != len(ids):
            donate = False  # the same buffer twice (tied weights) cannot be donated
        e = _Entry(ts_split, batch_split)
        pure = self._pure

        def flat_step(donated: list, key: Any, batch_dynamic: list) -> tuple:
            model, state, opt_state, step = ts_split.unflatten(donated)
            batch = batch_split.unflatten(batch_dynamic)
            ts = _new_train_state(model, state, opt_state, key, step)
            new_ts, metrics = pure(ts, batch)
            out_leaves, out_treedef = jtu.tree_flatten(
                (new_ts.model, new_ts.state, new_ts.opt_state, new_ts.step)
            )
            out_split = _Split(out_leaves, out_treedef)
            e.out_split = out_split
            e.closed = out_split.same_as(ts_split)
            return out_split.dynamic(out_leaves), metrics

        e.fn = jax.jit(flat_step, donate_argnums=(0,) if donate else ())
        return e


@typecheck
def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    steps_per_call: int = 1,
    nan_policy: str = "report",
    donate: bool = False,
    extra_metrics: bool = True,
) -> Callable:
    """Make `step(ts, batch) -> (ts, metrics)`: one optimizer step (or several).

    The step draws its randomness from `key = eqx_rng.derive(ts.key, ts.step)` only,
    calls `loss_fn(ts.model, ts.state, batch, key=key)` under
    `eqx.filter_value_and_grad(has_aux=True)` (gradients with respect to the
    floating-point arrays of the model), and applies
    `optimizer.update(grads, opt_state, params)`. The new `TrainState` has
    `step + 1`, the same `key`, and the `state` that `loss_fn` returned.

    **Dispatch.** Called on concrete arrays, the step flattens `ts` and `batch` once,
    checks them against a cached structure and calls a `jax.jit`-compiled function of
    the flat arrays: about the cost of a hand-written `jax.jit` step, well below
    `eqx.filter_jit`. A new structure or new non-array leaves (an activation function,
    a Python float in the model) compile a new variant; new shapes recompile as
    `jax.jit` does. Called inside `jit`, `vmap` (`eqx_rng.vmap(step)` over a
    chain-batched `TrainState` trains chains together), `scan` or `grad`, the step is
    traced inline.

    **Donation.** With donation on, the arrays of the `ts` passed in are consumed
    (deleted) by the call, also when it raises: use only the returned `TrainState`.
    `TrainState.create` copies the model, so the model you built stays usable.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, state, batch, *, key) -> (loss, (state, metrics))`:
        a floating scalar loss, the new `state` (`None` for a stateless model) and
        the metrics: a dict (usually), `None`, or any other pytree of arrays.
    - `optimizer`: An optax optimizer (the one that built `ts.opt_state`).
    - `steps_per_call`: `K >= 1`. With `K > 1`, every array in `batch` has a leading
        axis `K` (one batch per step) and the `K` steps run in one dispatch
        (`lax.scan`), giving the same result as `K` single steps. (Keyword only
        argument.)
    - `nan_policy`: What a step with a non-finite loss or gradient does.
        `"report"` (default): nothing special, `metrics["finite"]` is `False`.
        `"skip"`: the model, state and optimizer state are left unchanged (the step
        counter still advances, so the next step gets a new key). `"error"`: raise
        `eqx.EquinoxRuntimeError` naming the step (checked on device: no host sync).
        (Keyword only argument.)
    - `donate`: Donate the input `TrainState`'s model, state, optimizer state and
        step buffers to the output (`jax.jit(donate_argnums=...)`), saving memory
        on GPU and TPU (CPU ignores donation). Off by default, so that the `ts`
        passed in stays usable (to compare runs, or to keep the state of an earlier
        step); turn it on in a training loop that only keeps the returned state.
        (Keyword only argument.)
    - `extra_metrics`: Add `"grad_norm"` and `"finite"` to the metrics (default).
        `False` adds only `"loss"`: two outputs and a reduction less per step, which
        shows only for tiny models (about 5% of a step of a 50-parameter MLP on
        CPU). `nan_policy` works either way. (Keyword only argument.)

    **Returns:**

    `step(ts, batch) -> (ts, metrics)`. `metrics` is `loss_fn`'s dict plus, unless
    `loss_fn` set them itself, `"loss"`, `"grad_norm"` (the global L2 norm of the
    gradients, float32, or float64 for float64 parameters) and `"finite"` (bool:
    the loss and every gradient are finite); `None` becomes a dict of those alone;
    metrics of any other pytree type come back as `loss_fn` returned them. With
    `K > 1` every metric is stacked along a leading axis `K`.

    **Raises:**

    Here: `ValueError` for `steps_per_call < 1` or an unknown `nan_policy`. At the
    first call (trace time): `TypeError` if `ts` is not a `TrainState` or `loss_fn`
    does not return `(loss, (state, metrics))` with a scalar loss and a dict;
    `ValueError` if with `K > 1` an array of `batch` lacks the leading axis `K`.

    !!! Example

        ```python
        import optax

        def loss_fn(model, state, batch, *, key):
            x, y = batch
            pred = jax.vmap(model)(x)
            return jnp.mean((pred - y) ** 2), (state, {})

        optimizer = optax.sgd(0.1)
        model = eqx.nn.Linear(2, 1, key=jr.key(0))
        ts = eqx_rng.TrainState.create(model, optimizer, key=1)
        step = eqx_rng.make_train_step(loss_fn, optimizer)
        batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
        ts, metrics = step(ts, batch)
        assert int(ts.step) == 1 and bool(metrics["finite"])

        step4 = eqx_rng.make_train_step(loss_fn, optimizer, steps_per_call=4)
        batches = jax.tree.map(lambda a: jnp.stack([a] * 4), batch)
        ts, metrics = step4(ts, batches)  # 4 steps, one dispatch
        assert int(ts.step) == 5 and metrics["loss"].shape == (4,)
        ```
    """
    if isinstance(steps_per_call, bool) or steps_per_call < 1:
        raise ValueError(
            f"`make_train_step(..., steps_per_call=...)` must be an int >= 1, got "
            f"{steps_per_call!r}."
        )
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(
            f"`make_train_step(..., nan_policy=...)` must be one of {_NAN_POLICIES}, "
            f"got {nan_policy!r}."
        )
    pure = _make_one_step(loss_fn, optimizer, nan_policy, extra_metrics)
    if steps_per_call > 1:
        pure = _make_multi_step(pure, steps_per_call)
    return _TrainStep(
        pure,
        donate=donate,
        steps_per_call=steps_per_call,
        nan_policy=nan_policy,
        name=_loss_fn_name(loss_fn),
    )


__all__ = ["TrainState", "make_train_step"]
