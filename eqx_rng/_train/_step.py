"""The pure training step: loss, gradients, optimizer update, NaN policy, and the
`lax.scan` over several steps per call."""

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array

from .._keys import derive
from ._extra_args import make_value_fn, optimizer_update
from ._state import TrainState
from ._trainable import check_opt_state, opt_state_matches, split_trainable

NAN_POLICIES = ("report", "skip", "error")
_NAN_TAG = "eqx_rng.make_train_step: non-finite"
_NAN_MSG_RE = re.compile(re.escape(_NAN_TAG) + r"[^\n]*")
_ADDED_METRICS = ("loss", "grad_norm", "finite")


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


def loss_fn_name(loss_fn: Callable) -> str:
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__


def _check_output(out: Any, name: str) -> tuple[Array, tuple[Any, Any]]:
    """`loss_fn`'s output as `(loss, (state, metrics))`, or a clear error."""
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
    for path, leaf in jtu.tree_leaves_with_path(metrics):
        if not isinstance(leaf, jax.Array | np.ndarray | bool | int | float | complex):
            raise TypeError(
                f"`make_train_step`: `loss_fn` ({name}) returned the metric "
                f"`metrics{jtu.keystr(path)}` = {leaf!r} ({type(leaf).__name__}); "
                "metrics are arrays or numbers (they come back from a compiled "
                "step). Log strings and other Python objects outside the step."
            )
    loss = jnp.asarray(loss)
    if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(
            f"`make_train_step`: `loss_fn` ({name}) must return a floating "
            f"scalar loss, got shape {loss.shape} and dtype {loss.dtype}."
        )
    return loss, (new_state, metrics)


def _step_params(
    model: Any, trainable: Any, optimizer: Any, opt_state: Any, name: str
) -> tuple[Any, Any, Any]:
    """`(params, rest, frozen)`: the leaves the optimizer sees, the others, and
    (only for a TrainState built before rates were excluded by default) the default
    trainable leaves, outside of which updates are dropped."""
    params, rest = split_trainable(model, trainable)
    if opt_state_matches(optimizer, params, opt_state):
        return params, rest, None
    if trainable is None:
        # An optimizer state built on every inexact array (the default before
        # layer rates were excluded, e.g. from an older checkpoint) still steps;
        # the rates keep their values.
        legacy, legacy_rest = split_trainable(model, eqx.is_inexact_array)
        if opt_state_matches(optimizer, legacy, opt_state):
            return legacy, legacy_rest, params
    check_opt_state(optimizer, params, opt_state, trainable, name)
    raise AssertionError("unreachable: check_opt_state raises on a mismatch")


def make_one_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    nan_policy: str,
    extra_metrics: bool,
    trainable: Any = None,
) -> Callable:
    name = loss_fn_name(loss_fn)

    def loss_and_aux(params, rest, state, batch, key):
        out = loss_fn(eqx.combine(params, rest), state, batch, key=key)
        return _check_output(out, name)

    grad_fn = eqx.filter_value_and_grad(loss_and_aux, has_aux=True)
    messages = _StepMessages("loss or gradient (NaN or inf)")

    def one_step(ts: TrainState, batch: Any) -> tuple[TrainState, Any]:
        step_key = derive(ts.key, ts.step)
        params, rest, frozen = _step_params(
            ts.model, trainable, optimizer, ts.opt_state, name
        )
        (loss, (state, metrics)), grads = grad_fn(
            params, rest, ts.state, batch, step_key
        )
        value_fn = make_value_fn(
            lambda p: loss_and_aux(p, rest, ts.state, batch, step_key)[0]
        )
        with jax.numpy_dtype_promotion("standard"):
            # optax relies on implicit promotion (adam's `decay**count` mixes a
            # Python float and an int32), which `jax_numpy_dtype_promotion="strict"`
            # refuses; the user's own code (`loss_fn`) keeps their setting.
            updates, opt_state = optimizer_update(
                optimizer,
                grads,
                ts.opt_state,
                params,
                value=loss,
                value_fn=value_fn,
                key=derive(step_key, "optimizer"),
            )
        if frozen is not None:
            updates = jtu.tree_map(
                lambda f, u: None if f is None else u,
                frozen,
                updates,
                is_leaf=lambda x: x is None,
            )
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


def _check_stacked(batch: Any, k: int, check_stacked: bool) -> None:
    """The `steps_per_call=K` batch checks (see `make_train_step`'s Raises)."""
    arrays = [(p, x) for p, x in jtu.tree_leaves_with_path(batch) if eqx.is_array(x)]
    for path, leaf in arrays:
        if leaf.ndim == 0 or leaf.shape[0] != k:
            raise ValueError(
                f"`make_train_step(..., steps_per_call={k})` takes a batch with a "
                f"leading axis of {k} (one batch per step) on every array; "
                f"`batch{jtu.keystr(path)}` has shape {tuple(leaf.shape)}. Stack "
                f"{k} batches with `jnp.stack` or reshape to "
                f"`({k}, batch_size, ...)`."
            )
    sizes = {x.shape[1] for _, x in arrays if x.ndim >= 2}
    if check_stacked and len(sizes) > 1:
        shapes = ", ".join(f"batch{jtu.keystr(p)}: {tuple(x.shape)}" for p, x in arrays)
        raise ValueError(
            f"`make_train_step(..., steps_per_call={k})`: every array of `batch` has "
            f"the leading axis {k}, but the per-step slices have different leading "
            f"sizes {sorted(sizes)} ({shapes}). This looks like one batch of {k} "
            f"examples, not {k} stacked batches: stack {k} batches with "
            f"`jnp.stack` (shapes `({k}, batch_size, ...)`), or pass "
            "`check_stacked=False` if the slices are right as they are."
        )


def make_multi_step(
    one_step: Callable, steps_per_call: int, check_stacked: bool = True
) -> Callable:
    def multi_step(ts: TrainState, batch: Any) -> tuple[TrainState, Any]:
        _check_stacked(batch, steps_per_call, check_stacked)
        dynamic, static = eqx.partition(ts, eqx.is_array)

        def body(dynamic, batch_t):
            new_ts, metrics = one_step(eqx.combine(dynamic, static), batch_t)
            new_dynamic, _ = eqx.partition(new_ts, eqx.is_array)
            return new_dynamic, metrics

        dynamic, metrics = lax.scan(body, dynamic, batch, length=steps_per_call)
        return eqx.combine(dynamic, static), metrics

    return multi_step


def nan_error(err: BaseException) -> BaseException | None:
    """The `nan_policy="error"` failure as an `eqx.EquinoxRuntimeError` naming the
    step (JAX wraps the callback's error in various types), or `None` for any other
    error."""
    found = _NAN_MSG_RE.search(str(err))
    if found is None:
        return None
    return eqx.EquinoxRuntimeError(found.group(0))
