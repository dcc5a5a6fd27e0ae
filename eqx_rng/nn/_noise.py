"""Additive noise: `GaussianNoise`."""

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from .._custom_types import Key
from .._typecheck import typecheck
from ._common import (
    AbstractStochasticLayer,
    _check_range,
    _normalise_rate,
    _Rate,
    _RateLike,
)


class GaussianNoise(AbstractStochasticLayer):
    """Additive Gaussian noise: `x + std * N(0, 1)`, drawn per unit.

    Acts on one example of any shape; batch with `vmap` and one key per example. The
    identity in inference mode. The noise is drawn in `x`'s dtype. `std` has no
    default; it is a field (a Python float is static under `eqx.filter_jit`; a JAX
    scalar is traced and differentiable).

    !!! Example

        ```python
        noise = eqx_rng.nn.GaussianNoise(0.1)
        y = noise(jnp.zeros(1000), key=jr.key(0))
        assert abs(float(jnp.std(y)) - 0.1) < 0.02
        ```
    """

    std: _Rate
    inference: bool

    def __init__(self, std: _RateLike, *, inference: bool = False):
        """**Arguments:**

        - `std`: Standard deviation of the noise, `std >= 0` and finite. A Python
            number or a JAX scalar.
        - `inference`: Whether to be the identity (no key needed). Toggled by
            `eqx.nn.inference_mode`; overridden per call by `inference=`. (Keyword
            only argument.)

        **Raises:**

        `ValueError` if `std` is negative or not finite; `TypeError` if it is not a
        real number.

        !!! Example

            ```python
            noise = eqx_rng.nn.GaussianNoise(std=0.5)
            ```
        """
        self.std = _normalise_rate(std, "GaussianNoise", "std")
        self.inference = inference

    def __check_init__(self):
        _check_range(self.std, "GaussianNoise", "std", low=0.0)

    @typecheck
    def __call__(
        self,
        x: Float[Array, "*shape"],
        *,
        key: Key | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "*shape"]:
        """Add `std * N(0, 1)` noise to each unit of `x`.

        **Arguments:**

        - `x`: One example, of any shape and floating dtype.
        - `key`: PRNG key; required unless in inference mode. (Keyword only
            argument.)
        - `inference`: Overrides the `inference` field for this call when not
            `None`. (Keyword only argument.)

        **Returns:**

        An array of the same shape and dtype as `x`.

        **Raises:**

        `ValueError` if `key` is missing in training mode.

        !!! Example

            ```python
            x = jnp.zeros(5)
            k = jr.key(3)
            y1 = eqx_rng.nn.GaussianNoise(1.0)(x, key=k)
            y2 = eqx_rng.nn.GaussianNoise(2.0)(x, key=k)
            assert jnp.allclose(y2, 2 * y1)  # same key, same standard normal draw
            ```
        """
        if not self._training(key, inference):
            return x
        assert key is not None
        std = self.std
        if isinstance(std, float) and std == 0.0:
            return x
        with jax.named_scope("eqx_rng.nn.GaussianNoise"):
            std = jnp.asarray(std).astype(x.dtype)
            return x + std * jr.normal(key, x.shape, x.dtype)


__all__ = ["GaussianNoise"]
