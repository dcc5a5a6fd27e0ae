"""Additive noise: `GaussianNoise`."""

from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
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
)


class GaussianNoise(AbstractStochasticLayer):
    """Additive Gaussian noise: `x + std * N(0, 1)`, drawn per unit.

    Acts on one example of any shape; batch with `vmap` and one key per example. The
    identity in inference mode. `broadcast_dims` shares one draw along axes of the
    example (one offset per channel of a `(C, H, W)` map with `(1, 2)`). The noise is
    drawn in float32 (float64 under x64 for float64 inputs) and the sum cast to
    `x`'s dtype, so float16/bfloat16 layers are unbiased. `std` has no default; it is
    a field (a Python float is static under `eqx.filter_jit`; a JAX scalar is traced
    and differentiable).

    !!! Example

        ```python
        noise = eqx_rng.nn.GaussianNoise(0.1)
        y = noise(jnp.zeros(1000), key=jr.key(0))
        assert abs(float(jnp.std(y)) - 0.1) < 0.02

        x = jnp.zeros(5)
        k = jr.key(3)
        y1 = eqx_rng.nn.GaussianNoise(1.0)(x, key=k)
        y2 = eqx_rng.nn.GaussianNoise(2.0)(x, key=k)
        assert jnp.allclose(y2, 2 * y1)  # same key, same standard normal draw
        ```
    """

    std: _Rate
    inference: bool
    non_trainable_fields: ClassVar[tuple[str, ...]] = ("std",)
    broadcast_dims: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        std: Rate,
        *,
        broadcast_dims: Sequence[int] = (),
        inference: bool = False,
    ):
        """**Arguments:**

        - `std`: Standard deviation of the noise, `std >= 0` and finite. A Python
            number or a JAX scalar.
        - `broadcast_dims`: Axes of one example along which one draw is shared.
            Static. (Keyword only argument, as is `inference`.)
        - `inference`: Whether to be the identity (no key needed). Toggled by
            `eqx.nn.inference_mode`; overridden per call by `inference=`.

        **Raises:**

        `ValueError` if `std` is negative or not finite, or `broadcast_dims` repeats
        an axis; `TypeError` if `std` is not a real number or `broadcast_dims` not a
        tuple of ints.

        !!! Example

            ```python
            noise = eqx_rng.nn.GaussianNoise(std=0.5)
            ```
        """
        self.std = _normalise_rate(std, "GaussianNoise", "std")
        self.broadcast_dims = _normalise_dims(broadcast_dims, "GaussianNoise")
        self.inference = inference

    def __check_init__(self):
        _check_range(self.std, "GaussianNoise", "std", low=0.0)

    def sample(self, x: Float[Array, "*shape"], *, key: Key) -> Float[Array, "*shape"]:
        """Add `std * N(0, 1)` noise to each unit of `x` (training mode; `__call__`
        checks the key first)."""
        std = self.std
        if isinstance(std, float) and std == 0.0:
            return x
        wide = _compute_dtype(x.dtype)
        std = jnp.asarray(std).astype(wide)
        draw_shape = _noise_shape(x.shape, self.broadcast_dims, "GaussianNoise")
        eps = jnp.broadcast_to(jr.normal(key, draw_shape, wide), x.shape)
        return _saturate(x.astype(wide) + std * eps, x, x.dtype)


__all__ = ["GaussianNoise"]
