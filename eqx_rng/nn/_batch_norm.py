"""`BatchNorm` on `eqx.nn.StateIndex`, with bias-corrected running averages.

Formulas (per feature `c`; `n` = elements pooled = batch size along `axis_name` times
the number of spatial positions):

- training: `mean = pmean(mean_spatial(x))`, `var = pmean(mean_spatial((x - mean)**2))`
  (two passes, so large means do not cancel; the *biased* variance, divisor `n`), and
  `y = (x - mean) / sqrt(var + eps) * weight + bias`;
- running averages, from zero: `acc = momentum * acc + (1 - momentum) * stat` for the
  mean and for the *unbiased* variance `var * n / (n - 1)`; `t += 1`;
- inference: `acc / (1 - momentum**t)` (bias correction); mean 0 and variance 1 while
  `t == 0`.
"""

import math
from collections.abc import Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._custom_types import Key
from .._typecheck import typecheck
from .._util import axis_names
from ._common import _wider

_UNBOUND_AXIS_MSG = (
    "`BatchNorm` computes batch statistics over the vmapped axis {name!r}, which is "
    "not bound here. Call it under `eqx_rng.vmap(fn, axis_name={name!r})` (or "
    "`eqx.filter_vmap(..., axis_name={name!r})`), or use "
    "`eqx.nn.inference_mode(model)` to normalise with the running statistics."
)

_Stats = tuple[
    Float[Array, " num_features"], Float[Array, " num_features"], Int[Array, ""]
]


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalisation over one or more named vmapped axes, with running
    statistics in an `eqx.nn.State`.

    Acts on one example of shape `(num_features, *spatial)`; call it under a `vmap`
    whose `axis_name` matches (`eqx_rng.vmap(..., axis_name="batch")` or
    `eqx.filter_vmap(..., axis_name="batch")` with the state unmapped). Training mode
    normalises with this batch's statistics: the mean over the spatial dimensions,
    averaged with `lax.pmean` over `axis_name`, and the biased variance computed the
    same way from `(x - mean)**2`. It updates the running averages
    `acc = momentum * acc + (1 - momentum) * stat` (accumulated from zero; the running
    variance uses the unbiased batch variance, `n / (n - 1)` times the biased one,
    where `n` is the number of pooled elements) and a step counter `t`. Inference
    mode normalises with the bias-corrected averages `acc / (1 - momentum**t)`, or
    mean 0 and variance 1 before the first update, works on a single example without
    any vmap, and returns `state` unchanged.

    `momentum` follows Equinox and Flax: the weight of the *old* average. PyTorch's
    `momentum=0.1` is `momentum=0.9` here.

    Statistics pool over exactly the named axes. Under nested vmaps over chains and
    batch, `axis_name="batch"` gives each chain its own statistics (and its own
    state, with a chain axis); `axis_name=("chains", "batch")` pools across both,
    which is what you want when one model's batch is split over two named axes (for
    example devices and examples), not for independent chains.

    Statistics and state are float32 (float64 under x64) even for float16/bfloat16
    inputs; the output has the input's dtype.

    !!! Example

        ```python
        bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
        xs = 5 + 2 * jr.normal(jr.key(0), (16, 3))
        train = eqx.filter_vmap(
            lambda x, s: bn(x, s),
            in_axes=(0, None),
            out_axes=(0, None),
            axis_name="batch",
        )
        ys, state = train(xs, state)
        assert jnp.allclose(jnp.mean(ys, axis=0), 0, atol=1e-5)
        y, same_state = eqx.nn.inference_mode(bn)(xs[0], state)  # no vmap needed
        ```
    """

    weight: Float[Array, " num_features"] | None
    bias: Float[Array, " num_features"] | None
    state_index: eqx.nn.StateIndex[_Stats]
    inference: bool
    num_features: int = eqx.field(static=True)
    axis_name: Hashable | tuple[Hashable, ...] = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    affine: bool = eqx.field(static=True)

    def __init__(
        self,
        num_features: int | np.integer,
        *,
        axis_name: Hashable | Sequence[Hashable] = "batch",
        momentum: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        inference: bool = False,
        dtype: Any = None,
    ):
        """**Arguments:**

        - `num_features`: Size of the leading (feature) dimension of an example,
            `>= 1`.
        - `axis_name`: The vmapped axis name, or a tuple of names, that statistics
            are averaged over. Static. (Keyword only argument, as are the rest.)
        - `momentum`: Weight of the old running average, `0 <= momentum < 1`.
        - `eps`: Added to the variance before the square root, `> 0`.
        - `affine`: Whether to learn a per-feature `weight` (ones) and `bias`
            (zeros); with `False` both are `None`.
        - `inference`: Whether to normalise with the running statistics. Toggled by
            `eqx.nn.inference_mode`; overridden per call by `inference=`.
        - `dtype`: Dtype of `weight` and `bias`; the default floating dtype when
            `None`. The running statistics are float32 (float64 under x64) even when
            this is float16 or bfloat16.

        **Raises:**

        `ValueError` naming the argument and the value if `num_features < 1`,
        `momentum` is outside `[0, 1)`, `eps <= 0`, or `axis_name` is empty.

        !!! Example

            ```python
            bn = eqx_rng.nn.BatchNorm(16, axis_name=("chains", "batch"), momentum=0.9)
            model, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(4)
            ```
        """
        if isinstance(num_features, np.integer):
            num_features = int(num_features)
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise TypeError(
                f"`BatchNorm(num_features=...)` must be an int, got "
                f"{type(num_features).__name__} {num_features!r}."
            )
        if num_features < 1:
            raise ValueError(
                f"`BatchNorm(num_features=...)` must be >= 1, got "
                f"num_features={num_features}."
            )
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"`BatchNorm(momentum=...)` must be in [0, 1) (the weight of the old "
                f"running average; PyTorch's momentum=0.1 is momentum=0.9 here), got "
                f"momentum={momentum}."
            )
        eps = float(eps)
        if not (eps > 0.0 and math.isfinite(eps)):
            raise ValueError(
                f"`BatchNorm(eps=...)` must be a finite number > 0, got eps={eps}."
            )
        if isinstance(axis_name, list | tuple):
            axis_name = tuple(axis_name)
            if len(axis_name) == 0:
                raise ValueError(
                    "`BatchNorm(axis_name=...)` must name at least one vmapped axis, "
                    "got an empty sequence."
                )
            if len(axis_name) == 1:
                axis_name = axis_name[0]
        if axis_name is None:
            raise ValueError(
                "`BatchNorm(axis_name=...)` must name the vmapped batch axis (for "
                "example 'batch'), got None."
            )
        param_dtype = jax.dtypes.canonicalize_dtype(
            jnp.float64 if dtype is None else dtype
        )
        stat_dtype = _wider(param_dtype, jnp.float32)
        if affine:
            self.weight = jnp.ones((num_features,), param_dtype)
            self.bias = jnp.zeros((num_features,), param_dtype)
        else:
            self.weight = None
            self.bias = None
        self.state_index = eqx.nn.StateIndex(
            (
                jnp.zeros((num_features,), stat_dtype),
                jnp.zeros((num_features,), stat_dtype),
                jnp.array(0, jnp.int32),
            )
        )
        self.inference = inference
        self.num_features = num_features
        self.axis_name = axis_name
        self.momentum = momentum
        self.eps = eps
        self.affine = affine

    def is_stateful(self) -> bool:
        """Always `True`: `eqx.nn.Sequential` calls this layer as
        `x, state = layer(x, state=state, key=key)`.

        !!! Example

            ```python
            assert eqx_rng.nn.BatchNorm(3).is_stateful()
            ```
        """
        return True

    def _batch_size(self) -> int:
        """The number of examples pooled over `axis_name` (static), or a
        `ValueError` with the recipe when a name is not bound."""
        size = 1
        for name in axis_names(self.axis_name):
            try:
                size *= lax.axis_size(name)
            except NameError:
                raise ValueError(_UNBOUND_AXIS_MSG.format(name=name)) from None
        return size

    def _running_stats(self, state: eqx.nn.State) -> tuple[Array, Array]:
        acc_mean, acc_var, count = state.get(self.state_index)
        dtype = acc_mean.dtype
        started = count > 0
        if self.momentum == 0.0:
            correction = jnp.ones((), dtype)  # 1 - 0**t for t >= 1
        else:
            # 1 - momentum**t as -expm1(t * log(momentum)): computing `1 - m**t` in
            # float32 cancels most digits when m is close to 1 (a relative error of
            # 1e-5 at m = 0.999 after one update, 2e-4 at m = 0.9999).
            correction = -jnp.expm1(
                count.astype(jnp.float32) * math.log(self.momentum)
            ).astype(dtype)
        safe = jnp.where(started, correction, jnp.ones_like(correction))
        mean = jnp.where(started, acc_mean / safe, jnp.zeros_like(acc_mean))
        var = jnp.where(started, acc_var / safe, jnp.ones_like(acc_var))
        return mean, var

    @typecheck
    def __call__(
        self,
        x: Float[Array, " features *spatial"],
        state: eqx.nn.State,
        *,
        key: Key | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, " features *spatial"], eqx.nn.State]:
        """Normalise one example; in training mode also update the running
        statistics.

        **Arguments:**

        - `x`: One example of shape `(num_features, *spatial)`, any floating dtype.
        - `state`: The `eqx.nn.State` holding the running statistics (from
            `eqx.nn.make_with_state`). Unmapped under the batch vmap.
        - `key`: Ignored; accepted so that `eqx.nn.Sequential` can pass one.
            (Keyword only argument.)
        - `inference`: Overrides the `inference` field for this call when not
            `None`. (Keyword only argument.)

        **Returns:**

        `(y, state)`: `y` of the same shape and dtype as `x`, and the updated state
        (the same `state` in inference mode).

        **Raises:**

        `ValueError` (at trace time) if `x.shape[0] != num_features` or `state`
        holds statistics with an extra (chain or batch) axis; in training
        mode, if a name in `axis_name` is not bound by an enclosing vmap, or if the
        statistics would pool a single element (batch size 1 and no spatial
        dimensions).

        !!! Example

            ```python
            bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(2)
            images = jr.normal(jr.key(0), (4, 2, 5, 5))  # batch, features, h, w
            train = eqx.filter_vmap(
                lambda x, s: bn(x, s),
                in_axes=(0, None),
                out_axes=(0, None),
                axis_name="batch",
            )
            ys, state = train(images, state)
            y, state2 = bn(images[0], state, inference=True)
            assert state2 is state
            ```
        """
        del key
        if inference is None:
            inference = self.inference
        if x.ndim == 0 or x.shape[0] != self.num_features:
            raise ValueError(
                f"`BatchNorm(num_features={self.num_features})` expects one example "
                f"of shape ({self.num_features}, *spatial), got shape {x.shape}. "
                f"BatchNorm acts on one example; batch with a vmap."
            )
        acc_mean = state.get(self.state_index)[0]
        if acc_mean.shape != (self.num_features,):
            raise ValueError(
                f"`BatchNorm(num_features={self.num_features})` got a state whose "
                f"running mean has shape {acc_mean.shape}, expected "
                f"({self.num_features},): the state carries an extra (chain or batch) "
                f"axis. Map that axis with the vmap it belongs to (`in_axes=0` for a "
                f"per-chain state, as `eqx_rng.ensemble` makes it) and keep the state "
                f"unmapped (`None`) under the batch vmap."
            )
        dtype = _wider(x.dtype, acc_mean.dtype)
        spatial_axes = tuple(range(1, x.ndim))
        bcast = (self.num_features,) + (1,) * (x.ndim - 1)
        xs = x.astype(dtype)
        with jax.named_scope("eqx_rng.nn.BatchNorm"):
            if inference:
                mean, var = self._running_stats(state)
                centred = xs - mean.astype(dtype).reshape(bcast)
                var = var.astype(dtype)
            else:
                batch = self._batch_size()
                n = batch * math.prod(x.shape[1:])
                if n < 2:
                    raise ValueError(
                        f"`BatchNorm` in training mode pools each feature over "
                        f"{n} element (batch size {batch} along axis_name="
                        f"{self.axis_name!r}, input shape {x.shape} with no spatial "
                        f"dimensions): the variance of one element is undefined. "
                        f"Train on a batch of at least 2 examples, or use "
                        f"`eqx.nn.inference_mode(model)` to normalise with the "
                        f"running statistics."
                    )
                mean = lax.pmean(jnp.mean(xs, axis=spatial_axes), self.axis_name)
                centred = xs - mean.reshape(bcast)
                var = lax.pmean(
                    jnp.mean(jnp.square(centred), axis=spatial_axes), self.axis_name
                )
                acc_mean, acc_var, count = state.get(self.state_index)
                m = self.momentum
                batch_mean = lax.stop_gradient(mean).astype(acc_mean.dtype)
                batch_var = (lax.stop_gradient(var) * (n / (n - 1))).astype(
                    acc_var.dtype
                )
                state = state.set(
                    self.state_index,
                    (
                        m * acc_mean + (1 - m) * batch_mean,
                        m * acc_var + (1 - m) * batch_var,
                        count + 1,
                    ),
                )
            y = centred * lax.rsqrt(var + self.eps).reshape(bcast)
            if self.weight is not None and self.bias is not None:
                y = y * self.weight.astype(dtype).reshape(bcast) + self.bias.astype(
                    dtype
                ).reshape(bcast)
            return y.astype(x.dtype), state


__all__ = ["BatchNorm"]
