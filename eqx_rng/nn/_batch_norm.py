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
from jaxtyping import Array, ArrayLike, Bool, Float, Int

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
    axis: int = eqx.field(static=True)

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
        axis: int | np.integer = 0,
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
        - `axis`: The feature axis of one example: `0` for `(num_features,
            *spatial)` (the default), `-1` for channels-last `(*spatial,
            num_features)`. Static.

        **Raises:**

        `ValueError` naming the argument and the value if `num_features < 1`,
        `momentum` is outside `[0, 1)`, `eps <= 0`, or `axis_name` is empty;
        `TypeError` if `axis` is not an int.

        !!! Example

            ```python
            bn = eqx_rng.nn.BatchNorm(16, axis_name=("chains", "batch"), momentum=0.9)
            model, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(4)
            channels_last = eqx_rng.nn.BatchNorm(3, axis=-1)  # (H, W, 3) images
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
        if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"`BatchNorm(dtype=...)` must be a floating dtype (float32, "
                f"bfloat16, ...), got {dtype!r}; leave it unset for the default "
                "floating dtype."
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
        if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
            raise TypeError(
                f"`BatchNorm(axis=...)` must be an int (the feature axis of one "
                f"example), got {type(axis).__name__} {axis!r}."
            )
        self.axis = int(axis)

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

    def running_stats(
        self, state: eqx.nn.State
    ) -> tuple[Float[Array, " num_features"], Float[Array, " num_features"]]:
        """The running `(mean, var)` that inference normalises with: the averages
        divided by `1 - momentum**t` after `t` updates (bias correction), or mean 0
        and variance 1 before the first update. The variance is the running average
        of the unbiased batch variance. Both are float32 (float64 under x64).

        **Arguments:**

        - `state`: The `eqx.nn.State` holding this layer's statistics.

        **Returns:**

        `(mean, var)`, each of shape `(num_features,)`.
        """
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

    def _feature_axis(self, x: Array) -> int:
        """The feature axis of `x` as a non-negative int, or a `ValueError` naming
        the expected and received shapes."""
        ndim = x.ndim
        layout = (
            f"({self.num_features}, *spatial)"
            if self.axis == 0
            else f"(*spatial, {self.num_features})"
            if self.axis == -1
            else f"{self.num_features} features on axis {self.axis}"
        )
        axis_arg = "" if self.axis == 0 else f", axis={self.axis}"
        if not -ndim <= self.axis < ndim or x.shape[self.axis] != self.num_features:
            raise ValueError(
                f"`BatchNorm(num_features={self.num_features}{axis_arg})` expects "
                f"one example of shape {layout}, got shape {x.shape}. "
                f"BatchNorm acts on one example; batch with a vmap, and set `axis=` "
                f"to the feature axis (`axis=-1` for channels last)."
            )
        return self.axis % ndim

    def _check_state(self, state: eqx.nn.State) -> Array:
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
        return acc_mean

    def _batch_stats(self, xs: Array, mask: Array | None) -> tuple[Array, Array, Any]:
        """This batch's per-feature `(mean, biased var, n)` for `xs` of shape
        `(num_features, *spatial)`; `n` (pooled elements) is a Python int without a
        mask and a traced count with one."""
        spatial_axes = tuple(range(1, xs.ndim))
        bcast = (self.num_features,) + (1,) * (xs.ndim - 1)
        batch = self._batch_size()
        per_example = math.prod(xs.shape[1:])
        if mask is None:
            n = batch * per_example
            if n < 2:
                raise ValueError(
                    f"`BatchNorm` in training mode pools each feature over "
                    f"{n} element (batch size {batch} along axis_name="
                    f"{self.axis_name!r}, input shape {xs.shape} with no spatial "
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
            return mean, var, n
        # Masked: sums over the real examples only, divided by their element count.
        w = mask.astype(xs.dtype)
        n = lax.psum(w, self.axis_name) * per_example
        safe_n = jnp.maximum(n, jnp.ones_like(n))
        total = lax.psum(w * jnp.sum(xs, axis=spatial_axes), self.axis_name)
        mean = total / safe_n
        centred = xs - mean.reshape(bcast)
        sq = lax.psum(
            w * jnp.sum(jnp.square(centred), axis=spatial_axes), self.axis_name
        )
        return mean, sq / safe_n, n

    def _updated_state(
        self, state: eqx.nn.State, mean: Array, var: Array, n: Any
    ) -> eqx.nn.State:
        """`state` after one running-average update with this batch's statistics;
        unchanged when a masked batch has fewer than 2 real elements."""
        acc_mean, acc_var, count = state.get(self.state_index)
        m = self.momentum
        batch_mean = lax.stop_gradient(mean).astype(acc_mean.dtype)
        if isinstance(n, int):
            unbiased = lax.stop_gradient(var) * (n / (n - 1))
            new = (
                m * acc_mean + (1 - m) * batch_mean,
                m * acc_var + (1 - m) * unbiased.astype(acc_var.dtype),
                count + 1,
            )
        else:
            enough = n >= 2
            ratio = n / jnp.maximum(n - 1, jnp.ones_like(n))
            unbiased = (lax.stop_gradient(var) * ratio).astype(acc_var.dtype)
            new = (
                jnp.where(enough, m * acc_mean + (1 - m) * batch_mean, acc_mean),
                jnp.where(enough, m * acc_var + (1 - m) * unbiased, acc_var),
                jnp.where(enough, count + 1, count),
            )
        return state.set(self.state_index, new)

    @typecheck
    def __call__(
        self,
        x: Float[Array, "*shape"],
        state: eqx.nn.State,
        *,
        key: Key | None = None,
        inference: bool | None = None,
        mask: Bool[ArrayLike, ""] | None = None,
    ) -> tuple[Float[Array, "*shape"], eqx.nn.State]:
        """Normalise one example; in training mode also update the running
        statistics.

        **Arguments:**

        - `x`: One example of shape `(num_features, *spatial)` (with `axis=0`; the
            features on axis `axis` in general), any floating dtype.
        - `state`: The `eqx.nn.State` holding the running statistics (from
            `eqx.nn.make_with_state`). Unmapped under the batch vmap.
        - `key`: Ignored; accepted so that `eqx.nn.Sequential` can pass one.
            (Keyword only argument, as are the rest.)
        - `inference`: Overrides the `inference` field for this call when not
            `None`.
        - `mask`: A boolean scalar for this example (mapped with the batch), or
            `None` (every example counts). Examples with `mask=False` (padding) are
            left out of the batch statistics and of the running averages, and are
            still normalised with the statistics of the others. A batch with fewer
            than 2 real elements leaves the running averages unchanged. Ignored in
            inference mode.

        **Returns:**

        `(y, state)`: `y` of the same shape and dtype as `x`, and the updated state
        (the same `state` in inference mode).

        **Raises:**

        `ValueError` (at trace time) if `x` has no axis `axis` of size
        `num_features` or `state` holds statistics with an extra (chain or batch)
        axis; in training mode, if a name in `axis_name` is not bound by an
        enclosing vmap, or if the statistics would pool a single element (batch
        size 1 and no spatial dimensions, without a mask).

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
            mean, var = bn.running_stats(state)

            # padded batch: the last two rows are padding and do not count
            real = jnp.array([True, True, False, False])
            masked = eqx.filter_vmap(
                lambda x, m, s: bn(x, s, mask=m),
                in_axes=(0, 0, None),
                out_axes=(0, None),
                axis_name="batch",
            )
            ys, state = masked(images, real, state)
            ```
        """
        del key
        if inference is None:
            inference = self.inference
        feature_axis = self._feature_axis(x)
        acc_mean = self._check_state(state)
        dtype = _wider(x.dtype, acc_mean.dtype)
        xs = jnp.moveaxis(x, feature_axis, 0).astype(dtype)
        bcast = (self.num_features,) + (1,) * (x.ndim - 1)
        with jax.named_scope("eqx_rng.nn.BatchNorm"):
            if inference:
                mean, var = self.running_stats(state)
                mean, var = mean.astype(dtype), var.astype(dtype)
            else:
                m = None if mask is None else jnp.asarray(mask)
                mean, var, n = self._batch_stats(xs, m)
                state = self._updated_state(state, mean, var, n)
            y = (xs - mean.reshape(bcast)) * lax.rsqrt(var + self.eps).reshape(bcast)
            if self.weight is not None and self.bias is not None:
                y = y * self.weight.astype(dtype).reshape(bcast) + self.bias.astype(
                    dtype
                ).reshape(bcast)
            return jnp.moveaxis(y, 0, feature_axis).astype(x.dtype), state


__all__ = ["BatchNorm"]
