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
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, Int, PyTree

from ._custom_types import Key
from ._keys import as_key, derive
from ._typecheck import typecheck

_NAN_POLICIES = ("report", "skip", "error")
_NAN_TAG = "eqx_rng.make_train_step: non-finite"
_NAN_MSG_RE = re.compile(re.escape(_NAN_TAG) + r"[^\n]*")
_ADDED_METRICS = ("loss", "grad_norm", "finite")

# Leaf types that the fast path passes straight to `jax.jit`. Anything else (a
# tracer, a NumPy scalar, a Python number in a new place) takes the slow path.
_CONCRETE_TYPES = frozenset(
    {type(jnp.zeros(())), type(jax.random.key(0)), np.ndarray}
)
_MAX_ENTRIES = 16


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
    key: Key
    step: Int[Array, ""]

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
        input buffers (the default on GPU and TPU, see `make_train_step`) never
        deletes the arrays of the `model` passed in here.

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
            model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
                3, "batch"
            )
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
    return jtu.tree_map(lambda x: jnp.array(x) if eqx.is_array(x) else x, tree)


def _new_train_state(model, state, opt_state, key, step) -> TrainState:
    """Build a `TrainState` as `tree_unflatten` does (no `__init__`, no checks)."""
    ts = object.__new__(TrainState)
    object.__setattr__(ts, "model", model)
    object.__setattr__(ts, "state", state)
    object.__setattr__(ts, "opt_state", opt_state)
    object.__setattr__(ts, "key", key)
    object.__setattr__(ts, "step", step)
    return ts


# --------------------------------------------------------------------------------
# The pure step.


@dataclasses.dataclass(frozen=True)
class _StepMessages:
    """The NaN error message for each step: `msgs[t]` names step `t`.

    `eqx.branched_error_if` picks `msgs[index]` at run time; with `index` the step
    number this names the failing step without a host sync.
    """

    what: str

    def __getitem__(self, step: int) -> str:
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
        sq = jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else jnp.square(x)
        total = total + jnp.sum(sq.astype(acc_dtype))
    return jnp.sqrt(total)


def _apply_updates(model: Any, updates: Any) -> Any:
    """`eqx.apply_updates`, keeping each parameter's dtype."""

    def apply(u, p):
        if u is None:
            return p
        return (p + u).astype(p.dtype)

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
    loss_fn: Callable, optimizer: optax.GradientTransformation, nan_policy: str
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
        if not isinstance(metrics, dict):
            raise TypeError(
                f"`make_train_step`: `loss_fn` ({name}) must return its metrics as "
                f"a dict (or None), got {type(metrics).__name__}."
            )
        loss = jnp.asarray(loss)
        if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
            raise TypeError(
                f"`make_train_step`: `loss_fn` ({name}) must return a floating "
                f"scalar loss, got shape {loss.shape} and dtype {loss.dtype}."
            )
        return loss, (new_state, metrics)

    grad_fn = eqx.filter_value_and_grad(loss_and_aux, has_aux=True)
    messages = _StepMessages("loss or gradient (NaN or inf)")

    def one_step(ts: TrainState, batch: Any) -> tuple[TrainState, dict]:
        step_key = derive(ts.key, ts.step)
        (loss, (state, metrics)), grads = grad_fn(
            ts.model, ts.state, batch, step_key
        )
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
        metrics = dict(metrics)
        for k, v in zip(_ADDED_METRICS, (loss, grad_norm, finite), strict=True):
            metrics.setdefault(k, v)
        new_ts = TrainState(
            model=model, state=state, opt_state=opt_state, key=ts.key, step=step
        )
        return new_ts, metrics

    return one_step


def _make_multi_step(one_step: Callable, steps_per_call: int) -> Callable:
    def multi_step(ts: TrainState, batch: Any) -> tuple[TrainState, dict]:
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


def _getter(idx: tuple[int, ...]) -> Callable[[list], tuple]:
    if len(idx) == 0:
        return lambda leaves: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda leaves: (leaves[i],)
    return operator.itemgetter(*idx)


def _same(a: tuple, b: tuple) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


class _Entry:
    """One compiled variant: an input structure and the values of its static leaves."""

    __slots__ = (
        "treedef",
        "static_idx",
        "static_vals",
        "get_static",
        "get_donated",
        "get_kept",
        "all_dynamic",
        "fn",
        "out_treedef",
        "out_template",
        "out_dyn_idx",
    )


class _TrainStep:
    """The callable returned by `make_train_step` (see its docstring)."""

    def __init__(
        self,
        pure: Callable,
        *,
        donate: bool | None,
        steps_per_call: int,
        nan_policy: str,
        name: str,
    ):
        self._pure = pure
        self._donate = donate
        self.steps_per_call = steps_per_call
        self.nan_policy = nan_policy
        self._entries: list[_Entry] = []
        self._last: _Entry | None = None
        self.__name__ = self.__qualname__ = f"train_step[{name}]"

    def __repr__(self) -> str:
        return (
            f"<eqx_rng train step: steps_per_call={self.steps_per_call}, "
            f"nan_policy={self.nan_policy!r}>"
        )

    def __call__(self, ts: TrainState, batch: Any) -> tuple[TrainState, Any]:
        if type(ts) is not TrainState:
            raise TypeError(
                "The step made by `eqx_rng.make_train_step` takes `(ts, batch)` with "
                f"`ts` an `eqx_rng.TrainState`, got {type(ts).__name__}; make one "
                "with `eqx_rng.TrainState.create(model, optimizer, key=...)`."
            )
        args = (ts.model, ts.state, ts.opt_state, ts.step, ts.key, batch)
        leaves, treedef = jtu.tree_flatten(args)
        e = self._last
        if (
            e is None
            or treedef != e.treedef
            or not (
                _CONCRETE_TYPES.issuperset(map(type, leaves))
                if e.all_dynamic
                else (
                    _CONCRETE_TYPES.issuperset(map(type, e.get_donated(leaves)))
                    and _CONCRETE_TYPES.issuperset(map(type, e.get_kept(leaves)))
                    and _same(e.get_static(leaves), e.static_vals)
                )
            )
        ):
            if any(isinstance(x, jax.core.Tracer) for x in leaves):
                # Inside jit / vmap / scan / grad: trace the pure step inline.
                return self._pure(ts, batch)
            e = self._lookup(leaves, treedef)
            self._last = e
        try:
            out_leaves, metrics = e.fn(e.get_donated(leaves), e.get_kept(leaves))
        except jax.errors.JaxRuntimeError as err:
            found = _NAN_MSG_RE.search(str(err))
            if found is None:
                raise
            raise eqx.EquinoxRuntimeError(found.group(0)) from None
        if e.out_template is not None:
            full = list(e.out_template)
            for i, x in zip(e.out_dyn_idx, out_leaves, strict=True):
                full[i] = x
            out_leaves = full
        model, state, opt_state, step = e.out_treedef.unflatten(out_leaves)
        return _new_train_state(model, state, opt_state, ts.key, step), metrics

    def _lookup(self, leaves: list, treedef: Any) -> _Entry:
        static_idx = tuple(i for i, x in enumerate(leaves) if not eqx.is_array(x))
        static_vals = tuple(leaves[i] for i in static_idx)
        for e in self._entries:
            if e.treedef == treedef and _same(e.static_vals, static_vals):
                return e
        e = self._build(leaves, treedef, static_idx, static_vals)
        self._entries.append(e)
        if len(self._entries) > _MAX_ENTRIES:
            del self._entries[0]
        return e

    def _build(self, leaves, treedef, static_idx, static_vals) -> _Entry:
        # Leaves of (model, state, opt_state, step) are donated; key and batch kept.
        n_donatable = treedef.children()[3].num_leaves + sum(
            c.num_leaves for c in treedef.children()[:3]
        )
        dynamic = [i for i in range(len(leaves)) if i not in set(static_idx)]
        donated_idx = tuple(i for i in dynamic if i < n_donatable)
        kept_idx = tuple(i for i in dynamic if i >= n_donatable)
        donate = self._donate
        if donate is None:
            donate = jax.default_backend() != "cpu"
        ids = [id(leaves[i]) for i in donated_idx]
        if len(set(ids)) != len(ids):
            donate = False  # the same buffer twice (tied weights) cannot be donated

        e = _Entry()
        e.treedef = treedef
        e.static_idx = static_idx
        e.static_vals = static_vals
        e.get_static = _getter(static_idx)
        e.get_donated = _getter(donated_idx)
        e.get_kept = _getter(kept_idx)
        e.all_dynamic = len(static_idx) == 0
        e.out_treedef = None
        e.out_template = None
        e.out_dyn_idx = ()
        template = list(leaves)
        for i in dynamic:
            template[i] = None
        pure = self._pure

        def flat_step(donated, kept):
            full = list(template)
            for i, x in zip(donated_idx, donated, strict=True):
                full[i] = x
            for i, x in zip(kept_idx, kept, strict=True):
                full[i] = x
            model, state, opt_state, step, key, batch = treedef.unflatten(full)
            ts = _new_train_state(model, state, opt_state, key, step)
            new_ts, metrics = pure(ts, batch)
            out = (new_ts.model, new_ts.state, new_ts.opt_state, new_ts.step)
            out_leaves, out_treedef = jtu.tree_flatten(out)
            out_dyn_idx = tuple(
                i for i, x in enumerate(out_leaves) if eqx.is_array(x)
            )
            e.out_treedef = out_treedef
            e.out_dyn_idx = out_dyn_idx
            if len(out_dyn_idx) == len(out_leaves):
                e.out_template = None
            else:
                e.out_template = tuple(
                    None if eqx.is_array(x) else x for x in out_leaves
                )
            return [out_leaves[i] for i in out_dyn_idx], metrics

        e.fn = jax.jit(flat_step, donate_argnums=(0,) if donate else ())
        return e


@typecheck
def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    steps_per_call: int = 1,
    nan_policy: str = "report",
    donate: bool | None = None,
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
        a floating scalar loss, the new `state` (`None` for a stateless model) and a
        dict of metrics (or `None`).
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
        step buffers to the output (`jax.jit(donate_argnums=...)`), saving memory.
        `None` (default): on GPU and TPU, not on CPU. (Keyword only argument.)

    **Returns:**

    `step(ts, batch) -> (ts, metrics)`. `metrics` is `loss_fn`'s dict plus, unless
    `loss_fn` set them itself, `"loss"`, `"grad_norm"` (the global L2 norm of the
    gradients, float32) and `"finite"` (bool: loss and gradients all finite). With
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
    pure = _make_one_step(loss_fn, optimizer, nan_policy)
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
