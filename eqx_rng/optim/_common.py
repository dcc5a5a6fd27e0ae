"""What the noisy optimizers of `eqx_rng.optim` share: the key check, the step
counter state and the noise draw."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jax.core import Tracer

from .._custom_types import _legacy_key_message
from .._key_trees import tree_normal
from .._util import describe, is_typed_key


class CountState(NamedTuple):
    """The state of a noisy transformation: the number of updates done (`int32`)."""

    step: jax.Array


def check_key(key: Any, name: str) -> None:
    """`key` must be one typed key; a missing one means the caller did not pass
    optax's extra arguments."""
    if key is None:
        raise ValueError(
            f"`eqx_rng.optim.{name}` draws its noise from the `key` extra argument, "
            "and none was given. `eqx_rng.make_train_step` passes "
            "`key=derive(step_key, 'optimizer')`; when calling `update` yourself, "
            "pass `optimizer.update(grads, state, params, key=key)` with a new key "
            "for every step (for example `eqx_rng.derive(run_key, step)`)."
        )
    if is_typed_key(key) and key.shape == ():
        return
    if isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32:
        raise TypeError(
            _legacy_key_message(f"eqx_rng.optim.{name}(...).update", tuple(key.shape))
        )
    raise TypeError(
        f"`eqx_rng.optim.{name}` takes `key=` as one typed key "
        f"(`jax.random.key(seed)`), got {describe(key)}."
    )


def check_number(value: Any, name: str, arg: str, *, low: float = 0.0) -> None:
    """A Python or NumPy number `>= low` (a schedule or traced value is not
    checked)."""
    if callable(value) or isinstance(value, Tracer):
        return
    if isinstance(value, bool) or not isinstance(
        value, int | float | np.number | np.ndarray | jax.Array
    ):
        raise ValueError(
            f"`eqx_rng.optim.{name}({arg}=...)` is a number, got {describe(value)}."
        )
    if not float(value) >= low:  # also refuses NaN
        raise ValueError(
            f"`eqx_rng.optim.{name}({arg}=...)` must be >= {low}, got {value!r}."
        )


def init_count(params: Any) -> CountState:
    del params
    return CountState(step=jnp.zeros((), jnp.int32))


def add_scaled_noise(key: Any, updates: Any, scale: Any) -> Any:
    """`updates + scale * N(0, 1)`, leaf by leaf, in float32 and cast back.

    The noise of a leaf is `eqx_rng.tree_normal(key, updates)`'s (keyed by the
    leaf's path, so it does not change when other leaves are added); `scale` is a
    scalar or a pytree of arrays shaped like `updates`.
    """
    noise = tree_normal(key, updates)
    if not isinstance(scale, jax.Array | float):
        return jtu.tree_map(_add, updates, noise, scale)
    return jtu.tree_map(lambda u, z: _add(u, z, scale), updates, noise)


def _add(u: Any, z: Any, s: Any) -> Any:
    f32 = jnp.float32
    return (u.astype(f32) + s * z.astype(f32)).astype(u.dtype)


def schedule_value(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> Any:
    if callable(learning_rate):
        return jnp.asarray(learning_rate(count), jnp.float32)
    return jnp.asarray(learning_rate, jnp.float32)


def temperature_value(temperature: optax.ScalarOrSchedule, count: jax.Array) -> Any:
    """The temperature at update `count`: a schedule's value as a float32 array, a
    number as a Python float (so a number gives the same program as before
    schedules were accepted)."""
    if callable(temperature):
        return schedule_value(temperature, count)
    return float(temperature)


def keyed_transformation(
    name: str, init: Any, apply: Callable[[Any, Any, Any], Any]
) -> optax.GradientTransformationExtraArgs:
    """An optax transformation whose `update(updates, state, params=None, *,
    key, **extra_args)` checks `key` and returns `apply(updates, state, key)`."""

    def update(
        updates: Any, state: Any, params: Any = None, *, key: Any = None, **extra: Any
    ) -> tuple[Any, Any]:
        del params, extra
        check_key(key, name)
        return apply(updates, state, key)

    return optax.GradientTransformationExtraArgs(init, update)
