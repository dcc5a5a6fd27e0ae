"""`mc_mode`: MC dropout, sampling layers on and BatchNorm on running statistics."""

from typing import Any

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._batch_norm import BatchNorm
from ._bayes import BayesLinear
from ._common import AbstractStochasticLayer

_SAMPLING = (AbstractStochasticLayer, BayesLinear, eqx.nn.Dropout)
_NORMALISING = (BatchNorm, eqx.nn.BatchNorm)


def _is_target(x: Any) -> bool:
    return isinstance(x, _SAMPLING + _NORMALISING)


def _switch(node: Any) -> Any:
    if isinstance(node, _SAMPLING):
        node = eqx.tree_at(lambda m: m.inference, node, False)
    elif isinstance(node, _NORMALISING):
        node = eqx.tree_at(lambda m: m.inference, node, True)
    # layers nested inside a switched layer are switched too
    return jtu.tree_map(
        lambda x: _switch(x) if _is_target(x) else x,
        node,
        is_leaf=lambda x: x is not node and _is_target(x),
    )


def mc_mode(model: PyTree) -> PyTree:
    """A copy of `model` set up for Monte Carlo dropout: every stochastic layer
    samples and every BatchNorm normalises with its running statistics.

    Stochastic layers are `eqx_rng.nn`'s (`Dropout`, `GaussianDropout`,
    `GaussianNoise`, `DropPath`, any `AbstractStochasticLayer`, `BayesLinear`) and
    Equinox's `eqx.nn.Dropout`, including the dropout inside
    `eqx.nn.MultiheadAttention`: their `inference` is set to `False`. BatchNorm
    layers (`eqx_rng.nn.BatchNorm` and `eqx.nn.BatchNorm`) get `inference=True`:
    they use the running statistics, need no batch axis and return the state
    unchanged, so predictive sampling never updates it. Other layers are left as
    they are. (`eqx.nn.inference_mode` switches both kinds together, which is not
    MC dropout.)

    Draw `T` predictive samples for one input with
    `eqx_rng.vmap(f, in_axes=None, axis_size=T)(x, key=key)`: sample `t` uses
    `derive(key, t)`.

    **Arguments:**

    - `model`: Any pytree of layers.

    **Returns:**

    A copy of `model` with the `inference` fields changed.

    !!! Example

        ```python
        model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
            [
                eqx.nn.Linear(4, 8, key=jr.key(0)),
                eqx_rng.nn.BatchNorm(8),
                eqx_rng.nn.Dropout(0.5),
                eqx.nn.Linear(8, 3, key=jr.key(1)),
            ]
        )
        mc = eqx_rng.nn.mc_mode(model)

        def predict(x, *, key):
            logits, _ = mc(x, state, key=key)
            return jax.nn.softmax(logits)

        x = jnp.ones(4)
        probs = eqx_rng.vmap(predict, in_axes=None, axis_size=20)(x, key=jr.key(2))
        assert probs.shape == (20, 3)
        mean_prediction = probs.mean(axis=0)
        ```
    """
    return jtu.tree_map(
        lambda x: _switch(x) if _is_target(x) else x, model, is_leaf=_is_target
    )


__all__ = ["mc_mode"]
