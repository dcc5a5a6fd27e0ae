"""optax's extra arguments: `value`, `grad`, `value_fn` and `key`.

An `optax.GradientTransformationExtraArgs` takes keyword arguments beyond
`(updates, state, params)`. optax names them per transformation:
`reduce_on_plateau` and `polyak_sgd` read `value`; the line searches
(`scale_by_backtracking_linesearch`, `scale_by_zoom_linesearch`, used by `lbfgs`)
require `value`, `grad` and `value_fn` and refuse any other keyword unless
`value_fn`'s signature names it (they route such keywords to `value_fn`).
`optax.chain` passes every extra argument to each member that takes extra
arguments, and none to plain members.

So `make_train_step` passes the four arguments, filtered by the top-level
optimizer's signature (all of them when it takes `**extra_args`, as a chain does),
and gives `value_fn` a keyword `key` that it ignores: a line search inside a chain
then accepts the `key` meant for noisy transformations (`eqx_rng.optim`).
"""

import inspect
from collections.abc import Callable
from typing import Any

import optax

_EXTRA_ARGS = ("value", "grad", "value_fn", "key")


def _accepted(update: Callable) -> frozenset[str] | None:
    """The extra keyword arguments `update` takes; `None` means any."""
    try:
        params = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return frozenset(
        p.name
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name in _EXTRA_ARGS
    )


def make_value_fn(loss_of_params: Callable[[Any], Any]) -> Callable[..., Any]:
    """`value_fn(params, *, key=None) -> loss` for line searches.

    It evaluates the step's loss (same batch, state and step key) at other
    parameters. `key` is accepted and ignored, so that a line search routes the
    optimizer key to it instead of refusing it.
    """

    def value_fn(params: Any, *, key: Any = None) -> Any:
        del key
        return loss_of_params(params)

    return value_fn


def optimizer_update(
    optimizer: optax.GradientTransformation,
    grads: Any,
    opt_state: Any,
    params: Any,
    *,
    value: Any,
    value_fn: Callable[..., Any],
    key: Any,
) -> tuple[Any, Any]:
    """`optimizer.update`, with the extra arguments it takes (see the module
    docstring); a plain `GradientTransformation` is called as
    `update(grads, opt_state, params)`."""
    if not isinstance(optimizer, optax.GradientTransformationExtraArgs):
        return optimizer.update(grads, opt_state, params)
    extra = {"value": value, "grad": grads, "value_fn": value_fn, "key": key}
    names = _accepted(optimizer.update)
    if names is not None:
        extra = {k: v for k, v in extra.items() if k in names}
    return optimizer.update(grads, opt_state, params, **extra)
