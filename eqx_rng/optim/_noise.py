"""`add_noise`: annealed Gaussian gradient noise (Neelakantan et al. 2015)."""

from typing import Any

import jax.numpy as jnp
import optax

from ._common import (
    CountState,
    add_scaled_noise,
    check_number,
    init_count,
    keyed_transformation,
)


def add_noise(eta: float, gamma: float) -> optax.GradientTransformationExtraArgs:
    """Add annealed Gaussian noise to the gradients, drawn from the `key` extra
    argument.

    At step `t` (the first update is `t = 0`) the update is
    `g + N(0, eta / (1 + t)**gamma)`, independently per element (Neelakantan et al.
    2015, "Adding Gradient Noise Improves Learning for Very Deep Networks"; they use
    `gamma = 0.55` and `eta` in `{0.01, 0.3, 1.0}`). Unlike `optax.add_noise`,
    which keeps a seed in its state (the same noise in every chain of an ensemble),
    the noise comes from `key=`: `eqx_rng.make_train_step` passes
    `derive(step_key, "optimizer")`, so chains draw different noise and a resumed
    run draws what an uninterrupted one would. Put it before the step size:
    `optax.chain(eqx_rng.optim.add_noise(0.01, 0.55), optax.sgd(lr))`.

    **Arguments:**

    - `eta`: The noise variance at step 0, `>= 0`.
    - `gamma`: The decay exponent, `>= 0`.

    **Returns:**

    An `optax.GradientTransformationExtraArgs`; its `update` takes `key=` (a typed
    key, required) and ignores other extra arguments.

    **Raises:**

    Here: `ValueError` for a negative `eta` or `gamma`. In `update`: `ValueError`
    if `key` is missing, `TypeError` if it is not one typed key.

    !!! Example

        ```python
        import optax

        opt = eqx_rng.optim.add_noise(eta=0.01, gamma=0.55)
        params = {"w": jnp.zeros(3)}
        state = opt.init(params)
        grads = {"w": jnp.ones(3)}
        noisy, state = opt.update(grads, state, params, key=jr.key(0))
        assert noisy["w"].shape == (3,) and int(state.step) == 1
        ```
    """
    check_number(eta, "add_noise", "eta")
    check_number(gamma, "add_noise", "gamma")

    def apply(updates: Any, state: Any, key: Any) -> tuple[Any, CountState]:
        t = state.step.astype(jnp.float32)
        std = jnp.sqrt(jnp.float32(eta) / (1.0 + t) ** jnp.float32(gamma))
        return add_scaled_noise(key, updates, std), CountState(state.step + 1)

    return keyed_transformation("add_noise", init_count, apply)
