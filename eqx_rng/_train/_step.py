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
import optax
from jaxtyping import Array

from .._keys import derive
from ._state import TrainState

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


def make_one_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    nan_policy: str,
    extra_metrics: bool,
) -> Callable:
    name = loss_fn_name(loss_fn)

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


def make_multi_step(one_step: Callable, steps_per_call: int) -> Callable:
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


def nan_error(err: BaseException) -> BaseException | None:
    """The `nan_policy="error"` failure as an `eqx.EquinoxRuntimeError` naming the
    step (JAX wraps the callback's error in various types), or `None` for any other
    error."""
    found = _NAN_MSG_RE.search(str(err))
    if found is None:
        return None
    return eqx.EquinoxRuntimeError(found.group(0))
