"""Bayesian linear layers: `BayesLinear` (mean-field Gaussian weights, trained with
the reparameterisation trick or Flipout) and `kl_divergence` (the sum of every
`BayesLinear`'s KL to its prior, for the ELBO).

Parameterisation: each weight is `N(mean, softplus(rho)**2)`; the prior is
`N(0, prior_std**2)` on every weight and bias. The KL of one weight is
`log(prior_std / s) + (s**2 + mean**2) / (2 * prior_std**2) - 1/2` with
`s = softplus(rho)`.
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree

from .._custom_types import Key
from .._typecheck import typecheck
from ._common import _MISSING_KEY_MSG, _compute_dtype


def _positive_int(value: Any, call: str, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{call}({arg}=...)` must be an int, got {type(value).__name__} {value!r}."
        )
    if value < 1:
        raise ValueError(f"`{call}({arg}=...)` must be >= 1, got {arg}={value}.")
    return int(value)


def _positive_float(value: Any, call: str, arg: str) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"`{call}({arg}=...)` must be a finite number > 0, got {arg}={value}."
        )
    return value


class BayesLinear(eqx.Module):
    """A linear layer with a mean-field Gaussian posterior over its weights and
    bias (Bayes by Backprop, Blundell et al. 2015), acting on one example.

    Each weight is `N(weight_mean, softplus(weight_rho)**2)`. In training mode a
    call draws one weight sample with the reparameterisation trick
    (`w = mean + std * eps`), so gradients reach `mean` and `rho`. Under `vmap` with
    one key per example each example gets its own weight sample. To share one weight
    sample across a batch (the usual minibatch estimator), pass the same
    `weight_key=` to every example and a per-example `key=`.

    With `flipout=True` (Wen et al. 2018) the layer computes
    `mean @ x + s_out * ((std * eps) @ (s_in * x))`, with random sign vectors
    `s_in`, `s_out` drawn from the call's `key`: with a shared `weight_key` the
    examples of a batch get pseudo-independent perturbations from one weight draw,
    each with the same marginal variance as the reparameterised layer's.

    In inference mode (`inference=True`, `eqx.nn.inference_mode`) the layer uses the
    mean weights and needs no key; `eqx_rng.nn.mc_mode` switches it back to sampling.
    Add `eqx_rng.nn.kl_divergence(model)` (divided by the number of training
    examples) to the loss.

    !!! Example

        ```python
        layer = eqx_rng.nn.BayesLinear(3, 2, key=jr.key(0), prior_std=1.0)
        x = jnp.ones(3)
        y = layer(x, key=jr.key(1))  # one weight sample
        assert y.shape == (2,)
        mean_out = layer.weight_mean @ x + layer.bias_mean
        assert jnp.allclose(layer(x, inference=True), mean_out)
        kl = eqx_rng.nn.kl_divergence(layer)  # scalar, for the ELBO

        # Flipout: one weight draw for the batch, per-example sign flips
        flip = eqx_rng.nn.BayesLinear(3, 2, key=jr.key(0), flipout=True)
        xs = jnp.ones((8, 3))
        keys = jr.split(jr.key(2), 8)
        ys = jax.vmap(lambda x, k: flip(x, key=k, weight_key=jr.key(3)))(xs, keys)
        ```
    """

    weight_mean: Float[Array, "out_features in_features"]
    weight_rho: Float[Array, "out_features in_features"]
    bias_mean: Float[Array, " out_features"] | None
    bias_rho: Float[Array, " out_features"] | None
    inference: bool
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    prior_std: float = eqx.field(static=True)
    flipout: bool = eqx.field(static=True)

    def __init__(
        self,
        in_features: int | np.integer,
        out_features: int | np.integer,
        *,
        key: Key,
        prior_std: float = 1.0,
        flipout: bool = False,
        use_bias: bool = True,
        init_std: float = 1e-2,
        inference: bool = False,
        dtype: Any = None,
    ):
        """**Arguments:**

        - `in_features`, `out_features`: Input and output sizes, `>= 1`.
        - `key`: PRNG key for the initial means. (Keyword only argument, as are
            the rest.)
        - `prior_std`: Standard deviation of the `N(0, prior_std**2)` prior on every
            weight and bias, `> 0`. Static.
        - `flipout`: Whether to use Flipout perturbations. Static.
        - `use_bias`: Whether to have a (Bayesian) bias.
        - `init_std`: Initial posterior standard deviation of every weight, `> 0`.
            The means start as in `eqx.nn.Linear` (uniform in
            `+-1/sqrt(in_features)`).
        - `inference`: Whether to use the mean weights (no key needed).
        - `dtype`: Dtype of the parameters; the default floating dtype when `None`.

        **Raises:**

        `ValueError` naming the argument and the value if a size is `< 1` or
        `prior_std`/`init_std` is not a finite number `> 0`.

        !!! Example

            ```python
            head = eqx_rng.nn.BayesLinear(16, 10, key=jr.key(0), prior_std=0.5)
            ```
        """
        call = "BayesLinear"
        in_features = _positive_int(in_features, call, "in_features")
        out_features = _positive_int(out_features, call, "out_features")
        self.prior_std = _positive_float(prior_std, call, "prior_std")
        init_std = _positive_float(init_std, call, "init_std")
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
        w_key, b_key = jr.split(key)
        bound = 1 / math.sqrt(in_features)
        rho = math.log(math.expm1(init_std))  # softplus(rho) == init_std
        shape = (out_features, in_features)
        self.weight_mean = jr.uniform(w_key, shape, dtype, -bound, bound)
        self.weight_rho = jnp.full(shape, rho, dtype)
        if use_bias:
            self.bias_mean = jr.uniform(b_key, (out_features,), dtype, -bound, bound)
            self.bias_rho = jnp.full((out_features,), rho, dtype)
        else:
            self.bias_mean = None
            self.bias_rho = None
        self.inference = inference
        self.in_features = in_features
        self.out_features = out_features
        self.flipout = bool(flipout)

    @property
    def weight_std(self) -> Array:
        """The posterior standard deviations of the weights, `softplus(weight_rho)`."""
        return jax.nn.softplus(self.weight_rho)

    def kl(self) -> Array:
        """The KL divergence of this layer's posterior to its prior (weights and
        bias), summed over every array entry (and over any leading chain axis)."""
        total = jnp.zeros((), _compute_dtype(self.weight_mean.dtype))
        pairs = [(self.weight_mean, self.weight_rho)]
        if self.bias_mean is not None and self.bias_rho is not None:
            pairs.append((self.bias_mean, self.bias_rho))
        prior_var = self.prior_std**2
        for mean, rho in pairs:
            mean = mean.astype(total.dtype)
            std = jax.nn.softplus(rho.astype(total.dtype))
            kl = (
                math.log(self.prior_std)
                - jnp.log(std)
                + (jnp.square(std) + jnp.square(mean)) / (2 * prior_var)
                - 0.5
            )
            total = total + jnp.sum(kl)
        return total

    def _mean_output(self, x: Array, dtype: Any) -> Array:
        y = self.weight_mean.astype(dtype) @ x
        if self.bias_mean is not None:
            y = y + self.bias_mean.astype(dtype)
        return y

    @typecheck
    def __call__(
        self,
        x: Float[Array, " in_features"],
        *,
        key: Key | None = None,
        inference: bool | None = None,
        weight_key: Key | None = None,
    ) -> Float[Array, " out_features"]:
        """Apply the layer to one example.

        **Arguments:**

        - `x`: One example of shape `(in_features,)`.
        - `key`: PRNG key; required unless in inference mode. Draws the weight
            sample (without `weight_key`) and Flipout's sign vectors. (Keyword only
            argument, as are the rest.)
        - `inference`: Overrides the `inference` field for this call when not
            `None`.
        - `weight_key`: When given, the weight noise is drawn from it instead of
            `key`: pass the same `weight_key` to every example of a batch to share
            one weight sample (with `flipout=True`, one perturbation decorrelated by
            each example's signs).

        **Returns:**

        An array of shape `(out_features,)` and `x`'s dtype.

        **Raises:**

        `ValueError` if `key` is missing in training mode.
        """
        if inference is None:
            inference = self.inference
        wide = _compute_dtype(x.dtype)
        xw = x.astype(wide)
        if inference:
            return self._mean_output(xw, wide).astype(x.dtype)
        if key is None:
            raise ValueError(_MISSING_KEY_MSG.format(name="BayesLinear"))
        return self._sample(xw, key, weight_key).astype(x.dtype)

    def _sample(self, xw: Array, key: Key, weight_key: Key | None) -> Array:
        """The training-mode output for `xw` (already in the compute dtype)."""
        wide = xw.dtype
        with jax.named_scope("eqx_rng.nn.BayesLinear"):
            if weight_key is None:
                noise_key, sign_key = jr.split(key)
            else:
                noise_key, sign_key = weight_key, key
            w_key, b_key = jr.split(noise_key)
            w_noise = self.weight_std.astype(wide) * jr.normal(
                w_key, self.weight_mean.shape, wide
            )
            b_noise = None
            if self.bias_rho is not None:
                b_std = jax.nn.softplus(self.bias_rho).astype(wide)
                b_noise = b_std * jr.normal(b_key, (self.out_features,), wide)
            y = self._mean_output(xw, wide)
            if self.flipout:
                in_key, out_key = jr.split(sign_key)
                s_in = jr.rademacher(in_key, (self.in_features,), wide)
                s_out = jr.rademacher(out_key, (self.out_features,), wide)
                pert = w_noise @ (s_in * xw)
                if b_noise is not None:
                    pert = pert + b_noise
                y = y + s_out * pert
            else:
                y = y + w_noise @ xw
                if b_noise is not None:
                    y = y + b_noise
            return y


def _is_bayes(x: Any) -> bool:
    return isinstance(x, BayesLinear)


@typecheck
def kl_divergence(model: PyTree) -> Float[Array, ""]:
    """The KL divergence of the variational posterior to the prior, summed over
    every `BayesLinear` in `model` (0 when there is none).

    For the ELBO of a dataset of `N` examples, minimise
    `mean_nll(batch) + kl_divergence(model) / N`. Call it on one model: for a
    chain-batched ensemble, call it inside the vmap over chains (on the whole
    ensemble it sums over the chains).

    **Arguments:**

    - `model`: Any pytree (usually an `eqx.Module`).

    **Returns:**

    A scalar (float32, or float64 under x64).

    !!! Example

        ```python
        layer = eqx_rng.nn.BayesLinear(4, 3, key=jr.key(0), prior_std=1.0)
        model = eqx.nn.Sequential([layer, eqx.nn.Lambda(jax.nn.relu)])
        assert jnp.allclose(eqx_rng.nn.kl_divergence(model), layer.kl())
        assert eqx_rng.nn.kl_divergence(eqx.nn.Linear(2, 2, key=jr.key(0))) == 0
        ```
    """
    layers = [x for x in jtu.tree_leaves(model, is_leaf=_is_bayes) if _is_bayes(x)]
    total = jnp.zeros((), jax.dtypes.canonicalize_dtype(jnp.float64))
    for layer in layers:
        total = total + layer.kl().astype(total.dtype)
    return total


__all__ = ["BayesLinear", "kl_divergence"]
