"""Shared pieces of the `eqx_rng.nn` layers: the missing-key message, argument
checks, broadcast axes, low-precision arithmetic, and `AbstractStochasticLayer`
(inference and key resolution in one final `__call__`)."""

import abc
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._custom_types import Key, Rate
from .._typecheck import typecheck

_Rate: TypeAlias = float | Float[Array, ""]
"""A rate or scale field: a Python float (static under `eqx.filter_jit`), or a JAX
scalar (traced, so it may differ across a vmapped ensemble)."""

_RateLike: TypeAlias = Rate
"""Former private name of `eqx_rng.Rate` (what a constructor accepts for a rate or
scale; normalised to `_Rate`), kept importable for code that used it."""

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


def _wider(a: Any, b: Any) -> Any:
    """The wider of two floating dtypes (`jnp.promote_types` refuses bfloat16 and
    float32 under `jax_numpy_dtype_promotion="strict"`)."""
    a, b = jnp.dtype(a), jnp.dtype(b)
    return a if jnp.finfo(a).bits >= jnp.finfo(b).bits else b


def _compute_dtype(dtype: Any) -> Any:
    """The dtype noise is drawn and combined in: float32 for float16 and bfloat16
    (drawing in those dtypes is biased), else `dtype` itself."""
    return _wider(dtype, jnp.float32)


def _saturate(y: Array, x: Array, dtype: Any) -> Array:
    """`y` (computed in a wider dtype from `x`) cast to `dtype`; finite inputs give
    finite outputs, values beyond `dtype`'s range saturate at its largest finite
    value instead of becoming `inf`."""
    if jnp.dtype(y.dtype) == jnp.dtype(dtype):
        return y
    limit = float(jnp.finfo(dtype).max)
    y = jnp.where(jnp.isfinite(x), jnp.clip(y, -limit, limit), y)
    return y.astype(dtype)


def _normalise_dims(dims: Any, call: str) -> tuple[int, ...]:
    """`broadcast_dims` as a tuple of Python ints, or a `TypeError`/`ValueError`
    naming the call, the argument and the value."""
    if isinstance(dims, int | np.integer) and not isinstance(dims, bool | np.bool_):
        dims = (dims,)
    if not isinstance(dims, Sequence) or any(
        isinstance(d, bool | np.bool_) or not isinstance(d, int | np.integer)
        for d in dims
    ):
        raise TypeError(
            f"`{call}(broadcast_dims=...)` must be a tuple of ints (axes of one "
            f"example), got {dims!r}."
        )
    dims = tuple(int(d) for d in dims)
    if len(set(dims)) != len(dims):
        raise ValueError(
            f"`{call}(broadcast_dims=...)` names an axis twice, got "
            f"broadcast_dims={dims}."
        )
    return dims


def _noise_shape(shape: tuple[int, ...], dims: tuple[int, ...], call: str) -> tuple:
    """`shape` with the axes in `dims` set to 1 (one draw shared along each), or a
    `ValueError` when an axis is out of range for `shape`."""
    ndim = len(shape)
    axes = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(
                f"`{call}(broadcast_dims={dims})` names axis {d}, out of range for "
                f"one example of shape {shape} ({ndim} dimensions). The axes are "
                f"those of one example, without the batch axis: for `(C, H, W)` "
                f"images, `broadcast_dims=(1, 2)` drops whole channels."
            )
        axes.append(d % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"`{call}(broadcast_dims={dims})` names the same axis twice for one "
            f"example of shape {shape}; give each axis once."
        )
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


class AbstractStochasticLayer(eqx.Module):
    """Base class of the stochastic layers in `eqx_rng.nn` (`Dropout`,
    `GaussianDropout`, `GaussianNoise`, `DropPath`).

    Its `__call__(x, *, key=None, inference=None)` is final: it resolves the
    per-call `inference` against the `inference` field (so `eqx.nn.inference_mode`
    and `eqx_rng.nn.mc_mode` work), returns `x` unchanged in inference mode, raises
    the standard missing-key `ValueError` in training mode without a key, and
    otherwise returns `self.sample(x, key=key)`. A subclass declares the field
    `inference: bool` and implements `sample(x, *, key)`, the training-mode
    computation on one example; rate fields it stores as arrays go in the class
    attribute `non_trainable_fields` so that training leaves them alone.

    !!! Example

        ```python
        class SignFlip(eqx_rng.nn.AbstractStochasticLayer):
            inference: bool = False

            def sample(self, x, *, key):
                return jnp.where(jr.bernoulli(key, 0.5, x.shape), -x, x)

        layer = SignFlip()
        y = layer(jnp.ones(4), key=jr.key(0))
        assert jnp.all(jnp.abs(y) == 1)
        assert jnp.all(eqx.nn.inference_mode(layer)(jnp.ones(4)) == 1)
        ```
    """

    inference: eqx.AbstractVar[bool]

    non_trainable_fields: ClassVar[tuple[str, ...]] = ()
    """Names of fields (rates stored as arrays) that training never updates: the
    default `trainable=` of `eqx_rng.TrainState.create` and `make_train_step`
    leaves them out."""

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        # First-version subclasses overrode `__call__` and started it with
        # `self._training(key, inference)`; they keep working, with a warning.
        if "__call__" in cls.__dict__ and "sample" not in cls.__dict__:
            warnings.warn(
                f"`{cls.__name__}` overrides `AbstractStochasticLayer.__call__`; "
                f"implement `sample(self, x, *, key)` instead (the base's `__call__` "
                f"resolves `inference` and the key, then calls it).",
                DeprecationWarning,
                stacklevel=2,
            )

            def sample(self: Any, x: Any, *, key: Any) -> Any:
                return type(self).__call__(self, x, key=key, inference=False)

            cls.sample = sample  # pyright: ignore[reportAttributeAccessIssue]

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

    @typecheck
    def __call__(
        self,
        x: Float[Array, "*shape"],
        *,
        key: Key | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "*shape"]:
        """Apply the layer to one example: `self.sample(x, key=key)` in training
        mode, `x` unchanged in inference mode.

        **Arguments:**

        - `x`: One example, of any shape and floating dtype.
        - `key`: PRNG key; required unless in inference mode. (Keyword only
            argument.)
        - `inference`: Overrides the `inference` field for this call when not
            `None`. (Keyword only argument.)

        **Returns:**

        An array of the same shape and dtype as `x`.

        **Raises:**

        `ValueError` if `key` is missing in training mode (the message names the
        layer, `key=` and `eqx.nn.inference_mode`).

        !!! Example

            ```python
            dropout = eqx_rng.nn.Dropout(0.25)
            xs = jnp.ones((4, 16))
            keys = jr.split(jr.key(0), 4)  # one key per example
            ys = jax.vmap(lambda x, k: dropout(x, key=k))(xs, keys)
            assert ys.shape == xs.shape
            assert jnp.all(dropout(xs[0], inference=True) == xs[0])
            ```
        """
        if not self._training(key, inference):
            return x
        assert key is not None
        with jax.named_scope(f"eqx_rng.nn.{type(self).__name__}"):
            return self.sample(x, key=key)

    @abc.abstractmethod
    def sample(self, x: Array, *, key: Key) -> Array:
        """The training-mode output for one example `x`, drawn with `key`.

        Called by `__call__` once it has resolved `inference` and checked the key;
        call it directly only to bypass those checks.
        """
        raise NotImplementedError


__all__ = ["AbstractStochasticLayer"]
