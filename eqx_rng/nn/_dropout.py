"""Dropout layers: `Dropout` (per unit), `GaussianDropout` (multiplicative Gaussian
noise) and `DropPath` (stochastic depth, the whole example).

All act on one example, take `key=` explicitly and use inverted scaling, so the
expected output equals the input and inference is the identity. Rates are fields: a
Python float is static under `eqx.filter_jit` (a new value recompiles); a JAX scalar
is traced, so an ensemble may vmap over different rates.
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from .._custom_types import Key, Rate
from ._common import (
    AbstractStochasticLayer,
    _check_range,
    _compute_dtype,
    _noise_shape,
    _normalise_dims,
    _normalise_rate,
    _Rate,
    _saturate,
    _scale_for_keep,
)


def _keep_scaled(x: Array, keep: Array, p: _Rate) -> Array:
    """`x * 1 / (1 - p)` where `keep`, else `0`. In float16/bfloat16 the product is
    formed in float32 and saturates at the dtype's largest finite value, so a rate
    close to 1 never turns a finite input into `inf`."""
    if not isinstance(p, float):
        p = lax.stop_gradient(p)
    q = 1 - p
    wide = _compute_dtype(x.dtype)
    scale = jnp.asarray(_scale_for_keep(q), wide)
    y = _saturate(x.astype(wide) * scale, x, x.dtype)
    return jnp.where(keep, y, jnp.zeros_like(x))


class Dropout(AbstractStochasticLayer):
    """Inverted dropout: each unit is zeroed with probability `p`, else scaled by
    `1 / (1 - p)`, so the expected output equals the input.

    Acts on one example of any shape; batch with `vmap` and one key per example. In
    inference mode (the `inference` field, `eqx.nn.inference_mode`, or
    `inference=True` in the call) it is the identity and needs no key. `p == 1` gives
    zeros, with finite (zero) gradients.

    `broadcast_dims` shares one keep/drop decision along axes of the example:
    `broadcast_dims=(1, 2)` on `(C, H, W)` feature maps drops whole channels
    (PyTorch's `Dropout2d`, Keras' `SpatialDropout2D`); `broadcast_dims=(0,)` on a
    `(T, D)` sequence drops the same units at every time step.

    For locked (variational) dropout in a recurrent loop, draw one mask with
    `mask(shape, key=key)` before the loop and multiply by it at every step: one
    draw, reused as data, which `eqx_rng.debug.key_reuse()` accepts.

    `p` is a field: a Python float is static under `eqx.filter_jit` (changing it
    recompiles); a JAX scalar is traced, so a vmapped ensemble may use a different
    rate per member. float16 and bfloat16 inputs are scaled in float32 and saturate
    at the dtype's largest finite value, never `inf`.

    !!! Example

        ```python
        dropout = eqx_rng.nn.Dropout(0.5)
        y = dropout(jnp.ones(8), key=jr.key(0))  # entries are 0 or 2
        assert set(np.unique(y).tolist()) <= {0.0, 2.0}
        assert jnp.all(eqx.nn.inference_mode(dropout)(jnp.ones(8)) == 1)

        channel_dropout = eqx_rng.nn.Dropout(0.5, broadcast_dims=(1, 2))
        maps = channel_dropout(jnp.ones((4, 8, 8)), key=jr.key(1))
        assert jnp.all((maps == maps[:, :1, :1]))  # constant over each channel

        # locked dropout: one mask for every step of a scan
        locked = eqx_rng.nn.Dropout(0.25)
        mask = locked.mask((16,), key=jr.key(2))  # entries 0 or 1 / 0.75
        def step(h, x):
            h = jnp.tanh(x + h * mask)
            return h, h
        _, hs = jax.lax.scan(step, jnp.zeros(16), jnp.ones((5, 16)))
        ```
    """

    p: _Rate
    inference: bool
    non_trainable_fields: ClassVar[tuple[str, ...]] = ("p",)
    broadcast_dims: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        p: Rate = 0.5,
        *,
        broadcast_dims: Sequence[int] = (),
        inference: bool = False,
    ):
        """**Arguments:**

        - `p`: Probability of zeroing each unit, `0 <= p <= 1`. A Python number or a
            JAX scalar.
        - `broadcast_dims`: Axes of one example along which one decision is shared
            (negative axes count from the end). Static. (Keyword only argument, as
            is `inference`.)
        - `inference`: Whether to be the identity (no key needed). Toggled by
            `eqx.nn.inference_mode`; overridden per call by `inference=`.

        **Raises:**

        `ValueError` if `p` is outside `[0, 1]` or `broadcast_dims` repeats an axis;
        `TypeError` if `p` is not a real number or `broadcast_dims` not a tuple of
        ints. An axis out of range for the input is a `ValueError` at call time.

        !!! Example

            ```python
            dropout = eqx_rng.nn.Dropout(p=0.1)
            frozen = eqx_rng.nn.Dropout(p=0.1, inference=True)
            per_sequence = eqx_rng.nn.Dropout(p=0.1, broadcast_dims=(0,))  # (T, D)
            ```
        """
        self.p = _normalise_rate(p, "Dropout", "p")
        self.broadcast_dims = _normalise_dims(broadcast_dims, "Dropout")
        self.inference = inference

    def __check_init__(self):
        _check_range(self.p, "Dropout", "p", low=0.0, high=1.0)

    def _keep(self, shape: tuple[int, ...], key: Key) -> Array:
        """Boolean keep decisions of `shape`, one draw per broadcast slice."""
        p = self.p
        if not isinstance(p, float):
            p = lax.stop_gradient(p)
        draw_shape = _noise_shape(shape, self.broadcast_dims, "Dropout")
        return jnp.broadcast_to(jr.bernoulli(key, 1 - p, draw_shape), shape)

    def sample(self, x: Float[Array, "*shape"], *, key: Key) -> Float[Array, "*shape"]:
        """Zero each unit of `x` with probability `p` and scale the rest by
        `1 / (1 - p)` (training mode; `__call__` checks the key first)."""
        if isinstance(self.p, float) and self.p == 0.0:
            return x
        return _keep_scaled(x, self._keep(x.shape, key), self.p)

    def mask(
        self,
        shape: Sequence[int],
        *,
        key: Key | None = None,
        dtype: Any = None,
        inference: bool | None = None,
    ) -> Array:
        """The scaled keep mask this layer would apply to an input of `shape`: each
        entry `0` with probability `p`, else `1 / (1 - p)`, shared along
        `broadcast_dims`.

        Multiplying by one mask at every step of a `lax.scan` (or
        `eqx_rng.scan`) is locked (variational) dropout (Gal & Ghahramani, 2016):
        the key is drawn from once and the mask is reused as data, so
        `eqx_rng.debug.key_reuse()` accepts it. `p == 1` gives zeros; in
        float16/bfloat16 the scale saturates at the dtype's largest finite value,
        never `inf`. In inference mode the mask is all ones and needs no key.

        **Arguments:**

        - `shape`: The shape of the input the mask multiplies (one example).
        - `key`: PRNG key; required unless in inference mode. (Keyword only
            argument, as are the rest.)
        - `dtype`: The mask's dtype; the default floating dtype when `None`.
        - `inference`: Overrides the `inference` field when not `None`.

        **Returns:**

        An array of `shape` and `dtype`.

        **Raises:**

        `ValueError` if `key` is missing in training mode, or an axis of
        `broadcast_dims` is out of range for `shape`.
        """
        shape = tuple(int(s) for s in shape)
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
        if not self._training(key, inference):
            return jnp.ones(shape, dtype)
        assert key is not None
        with jax.named_scope("eqx_rng.nn.Dropout.mask"):
            ones = jnp.ones(shape, dtype)
            return _keep_scaled(ones, self._keep(shape, key), self.p)


class GaussianDropout(AbstractStochasticLayer):
    """Gaussian dropout: `x * m` with a multiplier `m ~ N(1, p / (1 - p))` drawn per
    unit, the Gaussian with the mean and variance of `Dropout(p)`'s multiplier.

    Acts on one example of any shape; the identity in inference mode. `0 <= p < 1`.
    `broadcast_dims` shares one multiplier along axes of the example, as in
    `Dropout`. The noise is drawn in float32 (float64 under x64 for float64 inputs)
    and the result cast to `x`'s dtype, so float16/bfloat16 layers are unbiased. A
    JAX-scalar `p` is differentiable (the reparameterisation
    `1 + sqrt(p / (1 - p)) * eps`), as variational dropout needs.

    !!! Example

        ```python
        layer = eqx_rng.nn.GaussianDropout(0.2)
        y = layer(jnp.ones((3, 5)), key=jr.key(0))
        assert y.shape == (3, 5)
        y16 = eqx_rng.nn.GaussianDropout(0.5)(jnp.ones(4, jnp.bfloat16), key=jr.key(1))
        assert y16.dtype == jnp.bfloat16
        ```
    """

    p: _Rate
    inference: bool
    non_trainable_fields: ClassVar[tuple[str, ...]] = ("p",)
    broadcast_dims: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        p: Rate,
        *,
        broadcast_dims: Sequence[int] = (),
        inference: bool = False,
    ):
        """**Arguments:**

        - `p`: Dropout rate whose multiplier variance `p / (1 - p)` is matched,
            `0 <= p < 1`. A Python number or a JAX scalar.
        - `broadcast_dims`: Axes of one example along which one multiplier is
            shared. Static. (Keyword only argument, as is `inference`.)
        - `inference`: Whether to be the identity (no key needed).

        **Raises:**

        `ValueError` if `p` is outside `[0, 1)` or `broadcast_dims` repeats an
        axis; `TypeError` if `p` is not a real number or `broadcast_dims` not a
        tuple of ints.

        !!! Example

            ```python
            layer = eqx_rng.nn.GaussianDropout(p=0.5)  # multiplier N(1, 1)
            per_channel = eqx_rng.nn.GaussianDropout(p=0.5, broadcast_dims=(1, 2))
            ```
        """
        self.p = _normalise_rate(p, "GaussianDropout", "p")
        self.broadcast_dims = _normalise_dims(broadcast_dims, "GaussianDropout")
        self.inference = inference

    def __check_init__(self):
        _check_range(self.p, "GaussianDropout", "p", low=0.0, high=1.0, high_open=True)

    def sample(self, x: Float[Array, "*shape"], *, key: Key) -> Float[Array, "*shape"]:
        """Multiply each unit of `x` by an `N(1, p / (1 - p))` draw (training mode;
        `__call__` checks the key first)."""
        p = self.p
        if isinstance(p, float) and p == 0.0:
            return x
        wide = _compute_dtype(x.dtype)
        if isinstance(p, float):
            std = jnp.asarray((p / (1 - p)) ** 0.5, wide)
        else:
            std = jnp.sqrt(p / (1 - p)).astype(wide)
        draw_shape = _noise_shape(x.shape, self.broadcast_dims, "GaussianDropout")
        eps = jnp.broadcast_to(jr.normal(key, draw_shape, wide), x.shape)
        xw = x.astype(wide)
        return _saturate(xw + xw * (std * eps), x, x.dtype)


class DropPath(AbstractStochasticLayer):
    """Stochastic depth: the whole example is zeroed with probability `p`, else
    scaled by `1 / (1 - p)`.

    One Bernoulli draw per call, so under `vmap` with one key per example each
    example keeps or drops its whole path. Use it on a residual branch,
    `x + drop_path(f(x), key=k)`. The identity in inference mode. `0 <= p <= 1`;
    `p == 1` gives zeros, with finite (zero) gradients.

    !!! Example

        ```python
        drop_path = eqx_rng.nn.DropPath(0.5)
        y = drop_path(jnp.ones((2, 3)), key=jr.key(0))
        assert jnp.all(y == 0) or jnp.all(y == 2)

        branch = jnp.full((8,), 0.5)
        keys = jr.split(jr.key(0), 16)
        out = jax.vmap(lambda k: drop_path(branch, key=k))(keys)
        dropped = jnp.all(out == 0, axis=1)  # one decision per example
        ```
    """

    p: _Rate
    inference: bool
    non_trainable_fields: ClassVar[tuple[str, ...]] = ("p",)

    def __init__(self, p: Rate, *, inference: bool = False):
        """**Arguments:**

        - `p`: Probability of dropping the example, `0 <= p <= 1`. A Python number
            or a JAX scalar.
        - `inference`: Whether to be the identity (no key needed). (Keyword only
            argument.)

        **Raises:**

        `ValueError` if `p` is outside `[0, 1]`; `TypeError` if it is not a real
        number.

        !!! Example

            ```python
            drop_path = eqx_rng.nn.DropPath(p=0.1)
            ```
        """
        self.p = _normalise_rate(p, "DropPath", "p")
        self.inference = inference

    def __check_init__(self):
        _check_range(self.p, "DropPath", "p", low=0.0, high=1.0)

    def sample(self, x: Float[Array, "*shape"], *, key: Key) -> Float[Array, "*shape"]:
        """Zero all of `x` with probability `p`, else scale it by `1 / (1 - p)`
        (training mode; `__call__` checks the key first)."""
        p = self.p
        if isinstance(p, float) and p == 0.0:
            return x
        if not isinstance(p, float):
            p = lax.stop_gradient(p)
        return _keep_scaled(x, jr.bernoulli(key, 1 - p), self.p)


__all__ = ["Dropout", "DropPath", "GaussianDropout"]
