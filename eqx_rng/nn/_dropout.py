"""Dropout layers: `Dropout` (per unit), `GaussianDropout` (multiplicative Gaussian
noise) and `DropPath` (stochastic depth, the whole example).

All act on one example, take `key=` explicitly and use inverted scaling, so the
expected output equals the input and inference is the identity. Rates are fields: a
Python float is static under `eqx.filter_jit` (a new value recompiles); a JAX scalar
is traced, so an ensemble may vmap over different rates.
"""

import jax
import jax.lax as lax
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
    _scale_for_keep,
)


class Dropout(AbstractStochasticLayer):
    """Inverted dropout: each unit is zeroed with probability `p`, else scaled by
    `1 / (1 - p)`, so the expected output equals the input.

    Acts on one example of any shape; batch with `vmap` and one key per example. In
    inference mode (the `inference` field, `eqx.nn.inference_mode`, or
    `inference=True` in the call) it is the identity and needs no key. `p == 1` gives
    zeros, with finite (zero) gradients.

    `p` is a field: a Python float is static under `eqx.filter_jit` (changing it
    recompiles); a JAX scalar is traced, so a vmapped ensemble may use a different
    rate per member.

    !!! Example

        ```python
        dropout = eqx_rng.nn.Dropout(0.5)
        y = dropout(jnp.ones(8), key=jr.key(0))  # entries are 0 or 2
        assert set(np.unique(y).tolist()) <= {0.0, 2.0}
        assert jnp.all(eqx.nn.inference_mode(dropout)(jnp.ones(8)) == 1)
        ```
    """

    p: _Rate
    inference: bool

    def __init__(self, p: _RateLike = 0.5, *, inference: bool = False):
        """**Arguments:**

        - `p`: Probability of zeroing each unit, `0 <= p <= 1`. A Python number or a
            JAX scalar.
        - `inference`: Whether to be the identity (no key needed). Toggled by
            `eqx.nn.inference_mode`; overridden per call by `inference=`. (Keyword
            only argument.)

        **Raises:**

        `ValueError` if `p` is outside `[0, 1]`; `TypeError` if it is not a real
        number.

        !!! Example

            ```python
            dropout = eqx_rng.nn.Dropout(p=0.1)
            frozen = eqx_rng.nn.Dropout(p=0.1, inference=True)
            ```
        """
        self.p = _normalise_rate(p, "Dropout", "p")
        self.inference = inference

    def __check_init__(self):
        _check_range(self.p, "Dropout", "p", low=0.0, high=1.0)

    @typecheck
    def __call__(
        self,
        x: Float[Array, "*shape"],
        *,
        key: Key | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "*shape"]:
        """Zero each unit of `x` with probability `p`; scale the rest by `1 / (1 - p)`.

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
        p = self.p
        if isinstance(p, float) and p == 0.0:
            return x
        with jax.named_scope("eqx_rng.nn.Dropout"):
            if not isinstance(p, float):
                p = lax.stop_gradient(p)
            q = 1 - p
            keep = jr.bernoulli(key, q, x.shape)
            scale = jnp.asarray(_scale_for_keep(q), x.dtype)
            return jnp.where(keep, x * scale, jnp.zeros_like(x))


class GaussianDropout(AbstractStochasticLayer):
    """Gaussian dropout: `x * m` with a multiplier `m ~ N(1, p / (1 - p))` drawn per
    unit, the Gaussian with the mean and variance of `Dropout(p)`'s multiplier.

    Acts on one example of any shape; the identity in inference mode. `0 <= p < 1`.
    The noise is drawn in `x`'s dtype. A JAX-scalar `p` is differentiable (the
    reparameterisation `1 + sqrt(p / (1 - p)) * eps`), as variational dropout needs.

    !!! Example

        ```python
        layer = eqx_rng.nn.GaussianDropout(0.2)
        y = layer(jnp.ones((3, 5)), key=jr.key(0))
        assert y.shape == (3, 5)
        ```
    """

    p: _Rate
    inference: bool

    def __init__(self, p: _RateLike, *, inference: bool = False):
        """**Arguments:**

        - `p`: Dropout rate whose multiplier variance `p / (1 - p)` is matched,
            `0 <= p < 1`. A Python number or a JAX scalar.
        - `inference`: Whether to be the identity (no key needed). (Keyword only
            argument.)

        **Raises:**

        `ValueError` if `p` is outside `[0, 1)`; `TypeError` if it is not a real
        number.

        !!! Example

            ```python
            layer = eqx_rng.nn.GaussianDropout(p=0.5)  # multiplier N(1, 1)
            ```
        """
        self.p = _normalise_rate(p, "GaussianDropout", "p")
        self.inference = inference

    def __check_init__(self):
        _check_range(self.p, "GaussianDropout", "p", low=0.0, high=1.0, high_open=True)

    @typecheck
    def __call__(
        self,
        x: Float[Array, "*shape"],
        *,
        key: Key | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "*shape"]:
        """Multiply each unit of `x` by an independent `N(1, p / (1 - p))` draw.

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
            layer = eqx_rng.nn.GaussianDropout(0.5)
            y = layer(jnp.ones(4, jnp.bfloat16), key=jr.key(1))
            assert y.dtype == jnp.bfloat16
            ```
        """
        if not self._training(key, inference):
            return x
        assert key is not None
        p = self.p
        if isinstance(p, float) and p == 0.0:
            return x
        with jax.named_scope("eqx_rng.nn.GaussianDropout"):
            if isinstance(p, float):
                std = jnp.asarray((p / (1 - p)) ** 0.5, x.dtype)
            else:
                std = jnp.sqrt(p / (1 - p)).astype(x.dtype)
            eps = jr.normal(key, x.shape, x.dtype)
            return x + x * (std * eps)


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
        ```
    """

    p: _Rate
    inference: bool

    def __init__(self, p: _RateLike, *, inference: bool = False):
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

    @typecheck
    def __call__(
        self,
        x: Float[Array, "*shape"],
        *,
        key: Key | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "*shape"]:
        """Zero all of `x` with probability `p`, else scale it by `1 / (1 - p)`.

        **Arguments:**

        - `x`: One example (the output of a residual branch), of any shape and
            floating dtype.
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
            drop_path = eqx_rng.nn.DropPath(0.2)
            branch = jnp.full((8,), 0.5)
            keys = jr.split(jr.key(0), 16)
            out = jax.vmap(lambda k: drop_path(branch, key=k))(keys)
            dropped = jnp.all(out == 0, axis=1)  # one decision per example
            ```
        """
        if not self._training(key, inference):
            return x
        assert key is not None
        p = self.p
        if isinstance(p, float) and p == 0.0:
            return x
        with jax.named_scope("eqx_rng.nn.DropPath"):
            if not isinstance(p, float):
                p = lax.stop_gradient(p)
            q = 1 - p
            keep = jr.bernoulli(key, q)
            scale = jnp.asarray(_scale_for_keep(q), x.dtype)
            return jnp.where(keep, x * scale, jnp.zeros_like(x))


__all__ = ["Dropout", "DropPath", "GaussianDropout"]
