"""`make_train_step`: the public constructor and the fast-dispatch callable."""

import weakref
from collections.abc import Callable
from typing import Any

import jax.tree_util as jtu
import optax

from .._dispatch import Dispatcher, Entry, Outputs
from .._typecheck import typecheck
from ._fast import MISS, write_fast_step
from ._state import TrainState, new_train_state
from ._step import NAN_POLICIES, loss_fn_name, make_multi_step, make_one_step, nan_error

_getattr = object.__getattribute__
_LEAF = jtu.tree_structure(0)


class _TrainStep:
    """The callable returned by `make_train_step` (see its docstring).

    Fast path: `(model, state, opt_state, step)`, `key` and `batch` go through a
    `Dispatcher` (flattened once, checked against the last compiled variant, arrays
    passed to a `jax.jit` function of flat lists); a `TrainState` that this step
    returned last time is recognised by identity and not flattened at all. Called on
    tracers (inside `jit`, `vmap`, `scan`, `grad`), the pure step is traced inline.
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
        self.steps_per_call = steps_per_call
        self.nan_policy = nan_policy

        def parts_step(parts: tuple, key: Any, batch: Any) -> tuple[tuple, Any]:
            model, state, opt_state, step = parts
            ts = new_train_state(model, state, opt_state, key, step)
            new_ts, metrics = pure(ts, batch)
            fields = _getattr(new_ts, "__dict__")
            out = (fields["model"], fields["state"], fields["opt_state"])
            return (*out, fields["step"]), metrics

        self._dispatch = Dispatcher(
            parts_step,
            num_outputs=2,
            flat_outputs=(0,),
            donate_argnums=(0,) if donate else (),
            on_error=nan_error,
        )
        # (weakref to the TrainState returned last, its entry, its dynamic leaves)
        self._last_out: tuple[Any, Entry, list] | None = None
        # The written fast path of the last variant (`_fast.py`), per (entry,
        # output structure) it was written for.
        self._fast: Callable[[Any, Any], Any] | None = None
        self._fasts: dict[tuple[Entry, Outputs], Callable | None] = {}
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
        fast = self._fast
        if fast is not None:
            out = fast(ts, batch)
            if out is not MISS:
                return out
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
        d = self._dispatch
        batch_leaves, batch_treedef = jtu.tree_flatten(batch)
        last = self._last_out
        if last is not None and last[0]() is ts:
            e = last[1]
            if type(key) in d.concrete and e.splits[2].matches(
                batch_leaves, batch_treedef, d.concrete
            ):
                return self._run(e, key, last[2], batch_leaves)
        parts = (fields["model"], fields["state"], fields["opt_state"], fields["step"])
        parts_flat = jtu.tree_flatten(parts)
        e = d.entry([parts_flat, ([key], _LEAF), (batch_leaves, batch_treedef)])
        if e is None:
            # Inside jit / vmap / scan / grad: trace the pure step inline.
            return self._pure(ts, batch)
        return self._run(e, key, e.splits[0].dynamic(parts_flat[0]), batch_leaves)

    def _run(
        self, e: Entry, key: Any, donated: list, batch_leaves: list
    ) -> tuple[TrainState, Any]:
        (out, metrics), desc = self._dispatch.run(
            e, [donated, [key], e.splits[2].dynamic(batch_leaves)]
        )
        result = self._finish(e, key, out, metrics, desc)
        # Writing a fast path costs about a millisecond: once per variant and
        # output structure.
        fasts = self._fasts
        if (e, desc) not in fasts:
            if len(fasts) >= 2 * self._dispatch.max_entries:
                fasts.clear()
            fasts[e, desc] = write_fast_step(self, self._dispatch, e, desc)
        self._fast = fasts[e, desc]
        return result

    def _finish(
        self, e: Entry, key: Any, out: list, metrics: Any, desc: Outputs
    ) -> tuple[TrainState, Any]:
        model, state, opt_state, step = desc.splits[0].rebuild(out)
        new_ts = new_train_state(model, state, opt_state, key, step)
        if desc.closed(0, e.splits[0]):
            self._last_out = (weakref.ref(new_ts, self._forget), e, out)
        else:
            self._last_out = None
        return new_ts, desc.output(1, metrics)


@typecheck
def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    steps_per_call: int = 1,
    nan_policy: str = "report",
    donate: bool = False,
    extra_metrics: bool = True,
    trainable: Any = None,
    check_stacked: bool = True,
) -> Callable:
    """Make `step(ts, batch) -> (ts, metrics)`: one optimizer step (or several).

    The step draws its randomness from `key = eqx_rng.derive(ts.key, ts.step)` only,
    calls `loss_fn(ts.model, ts.state, batch, key=key)` under
    `eqx.filter_value_and_grad(has_aux=True)` (gradients with respect to the
    trainable leaves of the model, see `trainable`), and applies
    `optimizer.update(grads, opt_state, params)`; the other leaves are carried
    unchanged.

    **optax extra arguments.** An optimizer that takes extra arguments
    (`optax.GradientTransformationExtraArgs`: `optax.chain`,
    `optax.contrib.reduce_on_plateau`, `optax.lbfgs`, `eqx_rng.optim`) also gets
    `value=` (the loss), `grad=` (the gradients), `value_fn=` (the loss at other
    parameters: same batch, state and key, for line searches) and
    `key=eqx_rng.derive(key, "optimizer")` (for optimizers that draw noise), each
    only if its `update` takes it (or takes `**extra_args`, as `optax.chain` does).
    `value_fn` also takes and ignores `key=`, so that the line searches inside a
    chain, which refuse unknown keywords unless `value_fn` names them, accept it.

    The new `TrainState` has `step + 1`, the same `key`, and the `state` that
    `loss_fn` returned.

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
    - `trainable`: The trained leaves, as in `TrainState.create` (a filter spec as
        in `eqx.filter`; by default every inexact array except the rates of
        `eqx_rng.nn` layers). Must be the spec that created the `TrainState`:
        the step checks, at trace time, that `ts.opt_state` has the layout of
        `optimizer.init` on these leaves. (Keyword only argument.)
    - `check_stacked`: With `K > 1`, refuse a `batch` that looks like one batch of
        `K` examples rather than `K` stacked batches (see **Raises**). `False`
        turns the check off. (Keyword only argument.)

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
    `TypeError` for a metric that is not an array or a number (a string);
    `ValueError` if `ts.opt_state` was built by another optimizer or on other
    trainable leaves, or if with `K > 1` an array of `batch` lacks the leading axis
    `K`, or (with `check_stacked`) the arrays of `batch` have the leading axis `K`
    but their per-step slices do not share a leading size: that is one batch of `K`
    examples (say `x` of shape `(K, 3)` and `y` of shape `(K, 1)`: per-step slices
    of sizes 3 and 1), not `K` batches (`(K, B, 3)` and `(K, B, 1)`). A batch
    whose per-step slices are single examples (`x` of shape `(K, D)`, `y` of shape
    `(K,)`) is valid as stacked and cannot be told apart: stack `K` batches.

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
    if nan_policy not in NAN_POLICIES:
        raise ValueError(
            f"`make_train_step(..., nan_policy=...)` must be one of {NAN_POLICIES}, "
            f"got {nan_policy!r}."
        )
    pure = make_one_step(loss_fn, optimizer, nan_policy, extra_metrics, trainable)
    if steps_per_call > 1:
        pure = make_multi_step(pure, steps_per_call, check_stacked)
    return _TrainStep(
        pure,
        donate=donate,
        steps_per_call=steps_per_call,
        nan_policy=nan_policy,
        name=loss_fn_name(loss_fn),
    )
