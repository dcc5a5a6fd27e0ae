"""Shared pieces of the `eqx_rng.nn` layers: the missing-key message, argument
checks, and `AbstractStochasticLayer` (inference and key resolution)."""

import abc
import math
import numbers
from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._custom_types import Key

_Rate: TypeAlias = float | Float[Array, ""]
"""A rate or scale field: a Python float (static under `eqx.filter_jit`), or a JAX
scalar (traced, so it may differ across a vmapped ensemble)."""

_RateLike: TypeAlias = float | int | np.floating | np.integer | Array
"""What a constructor accepts for a rate or scale; normalised to `_Rate`."""

_MISSING_KEY_MSG = (
    "`{name}` needs `key=` in training mode: pass a PRNG key, `layer(x, key=key)` "
    "(`eqx.nn.Sequential` splits its own `key=` among its layers), or switch to "
    "inference with `eqx.nn.inference_mode(model)` (or `inference=True` for one call)."
)


def _normalise_rate(value: Any, call: str, arg: str) -> Any:
    """A Python or NumPy number becomes a `float`; a JAX scalar array is kept (traced
    values allowed, for example a rate vmapped inside `eqx_rng.ensemble`). Anything
    else is a `TypeError` naming the call and the argument."""
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"`{call}({arg}=...)` must be a real number, got {value!r}.")
    if isinstance(value, numbers.Real):  # Python and NumPy scalars
        return float(value)
    if isinstance(value, np.ndarray) and value.shape == ():
        return _normalise_rate(value.item(), call, arg)
    if isinstance(value, jax.Array):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(
                f"`{call}({arg}=...)` must be a real scalar, got an array of shape "
                f"{value.shape} and dtype {value.dtype}."
            )
        return value
    raise TypeError(
        f"`{call}({arg}=...)` must be a real number, got {type(value).__name__} "
        f"{value!r}."
    )


def _concrete(value: Any) -> float | None:
    """`value` as a Python float when it is known at trace time, else `None`."""
    if isinstance(value, float):
        return value
    try:
        return float(np.asarray(value))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_range(
    value: Any,
    call: str,
    arg: str,
    *,
    low: float,
    high: float = math.inf,
    high_open: bool = False,
) -> None:
    """`ValueError` unless `low <= value <= high` (`< high` with `high_open`) and
    `value` is finite. Traced values cannot be checked and pass."""
    v = _concrete(value)
    if v is None:
        return
    upper_ok = v < high if high_open else v <= high
    if not (math.isfinite(v) and low <= v and upper_ok):
        bracket = ")" if high_open else "]"
        allowed = f"in [{low}, {high}{bracket}" if math.isfinite(high) else f">= {low}"
        raise ValueError(
            f"`{call}({arg}=...)` must be a finite number {allowed}, got {arg}={v!r}."
        )


def _scale_for_keep(q: Any) -> Any:
    """`1 / q`, or `0` where `q == 0`, with a safe denominator so that neither the
    value nor its gradient is ever `inf` or `NaN`."""
    if isinstance(q, float):
        return 1.0 / q if q > 0 else 0.0
    positive = q > 0
    safe_q = jnp.where(positive, q, jnp.ones_like(q))
    return jnp.where(positive, 1 / safe_q, jnp.zeros_like(q))


class AbstractStochasticLayer(eqx.Module):
    """Base class of the stochastic layers in `eqx_rng.nn`.

    A subclass has a field `inference: bool` and a method
    `__call__(x, *, key=None, inference=None)` acting on one example. It starts
    `__call__` with `if not self._training(key, inference): return x`, which resolves
    the per-call override against the field (so `eqx.nn.inference_mode` works) and
    raises the standard missing-key `ValueError` in training mode.

    !!! Example

        ```python
        class SignFlip(eqx_rng.nn.AbstractStochasticLayer):
            inference: bool = False

            def __call__(self, x, *, key=None, inference=None):
                if not self._training(key, inference):
                    return x
                return jnp.where(jr.bernoulli(key, 0.5, x.shape), -x, x)

        layer = SignFlip()
        y = layer(jnp.ones(4), key=jr.key(0))
        assert jnp.all(eqx.nn.inference_mode(layer)(jnp.ones(4)) == 1)
        ```
    """

    inference: eqx.AbstractVar[bool]

    def _training(self, key: Key | None, inference: bool | None) -> bool:
        """Whether this call draws: `False` in inference mode (the per-call
        `inference` wins over the field); in training mode a missing `key` raises."""
        if inference is None:
            inference = self.inference
        if inference:
            return False
        if key is None:
            raise ValueError(_MISSING_KEY_MSG.format(name=type(self).__name__))
        return True

    @abc.abstractmethod
    def __call__(
        self,
        x: Float[Array, "*shape"],
        *,
        key: Key | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "*shape"]:
        """Apply the layer to one example `x`; see the subclass."""
        raise NotImplementedError


__all__ = ["AbstractStochasticLayer"]
