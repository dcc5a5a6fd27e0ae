"""Stochastic-gradient Langevin dynamics: `sgld` (Welling & Teh 2011) and `psgld`
(Li et al. 2016), drawing their noise from the `key` extra argument."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from ._common import (
    CountState,
    add_scaled_noise,
    check_number,
    init_count,
    keyed_transformation,
    schedule_value,
    temperature_value,
)


def _check_num_data(num_data: Any, name: str) -> None:
    if num_data is None:
        raise ValueError(
            f"`eqx_rng.optim.{name}` needs `num_data=` (the size of the whole "
            "training set N): the loss is a minibatch mean, and the gradient of "
            "the log posterior is `-N` times its gradient."
        )
    check_number(num_data, name, "num_data", low=1.0)


def sgld(
    learning_rate: optax.ScalarOrSchedule,
    *,
    temperature: optax.ScalarOrSchedule = 1.0,
    num_data: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Stochastic-gradient Langevin dynamics (Welling & Teh 2011), noise from `key`.

    The loss is the minibatch mean of the per-example negative log joint,
    `mean_i(-log p(x_i | theta)) - log p(theta) / num_data`, so that `num_data`
    times it estimates the negative log posterior. With `g` its gradient and
    `eps` the learning rate at this step, the update is

    `-(eps / 2) * num_data * g + sqrt(eps * temperature) * N(0, 1)`

    (the Langevin step on the posterior; `temperature = 1` samples the posterior,
    `0` is plain SGD on `num_data * loss`). `eps` and `temperature` may each be
    a number or an optax-style schedule of the step count (`t = 0` at the first
    update), so cyclical SG-MCMC (cSG-MCMC, Zhang et al. 2020) is written with a
    cyclical step size and a temperature that is 0 in each cycle's exploration
    stage (noise-free optimisation) and 1 in its sampling stage. The noise is
    drawn from `key=`
    (`eqx_rng.make_train_step` passes `derive(step_key, "optimizer")`), never from a
    seed in the state: chains differ and a resumed run draws what an uninterrupted
    one would. Use it alone, as the whole optimizer (it already applies the step
    size and the sign).

    **Arguments:**

    - `learning_rate`: `eps`, a number `> 0` or an optax schedule of the step
        count (the paper decays it as `a * (b + t)**-gamma`).
    - `temperature`: A number `>= 0`, or a schedule of the step count whose
        values are `>= 0` (traced, so not checked: a negative value gives NaN
        noise). A constant schedule gives exactly the updates of the number.
        (Keyword only argument.)
    - `num_data`: The training set size `N >= 1`; required. (Keyword only
        argument.)

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose `update` takes `key=`.

    **Raises:**

    Here: `ValueError` for a missing or non-positive `num_data`, a negative
    `temperature` number or a non-positive `learning_rate` number. In `update`:
    `ValueError` if `key` is missing, `TypeError` if it is not one typed key.

    !!! Example

        ```python
        opt = eqx_rng.optim.sgld(1e-3, num_data=1000)
        params = {"theta": jnp.zeros(2)}
        state = opt.init(params)
        grads = {"theta": jnp.ones(2)}  # gradient of the minibatch mean loss
        updates, state = opt.update(grads, state, params, key=jr.key(0))
        assert updates["theta"].shape == (2,)
        ```

        cSG-MCMC: a cosine step size restarted every cycle, and temperature 0
        (exploration, plain SGD) for the first 80% of each cycle, 1 (sampling)
        after; keep samples from the sampling stages only.

        ```python
        cycle, explore, eps0 = 50, 0.8, 1e-3

        def step_size(t):
            r = (t % cycle) / cycle  # position in the cycle, in [0, 1)
            return eps0 / 2 * (jnp.cos(jnp.pi * r) + 1)

        def temperature(t):
            return jnp.where((t % cycle) / cycle < explore, 0.0, 1.0)

        opt = eqx_rng.optim.sgld(step_size, temperature=temperature, num_data=1000)
        params = {"theta": jnp.zeros(2)}
        state = opt.init(params)
        grads = {"theta": jnp.ones(2)}
        updates, state = opt.update(grads, state, params, key=jr.key(0))
        # t = 0 explores: no noise, the SGD step -(eps0 / 2) * num_data * g
        assert jnp.allclose(updates["theta"], -0.5 * eps0 * 1000 * grads["theta"])
        for t in range(1, 45):  # into the sampling stage (t >= 40)
            updates, state = opt.update(grads, state, params, key=jr.key(t))
        assert not jnp.allclose(updates["theta"][0], updates["theta"][1])
        ```
    """
    _check_num_data(num_data, "sgld")
    check_number(temperature, "sgld", "temperature")
    check_number(learning_rate, "sgld", "learning_rate", low=1e-300)
    n = float(num_data)  # pyright: ignore[reportArgumentType]

    def apply(updates: Any, state: Any, key: Any) -> tuple[Any, CountState]:
        eps = schedule_value(learning_rate, state.step)
        temp = temperature_value(temperature, state.step)
        drift = jtu.tree_map(
            lambda g: (-0.5 * n) * eps * g.astype(jnp.float32), updates
        )
        drift = jtu.tree_map(lambda d, g: d.astype(g.dtype), drift, updates)
        out = add_scaled_noise(key, drift, jnp.sqrt(eps * temp))
        return out, CountState(state.step + 1)

    return keyed_transformation("sgld", init_count, apply)


class PSGLDState(NamedTuple):
    """`psgld`'s state: the number of updates done, and the running mean of
    squared gradients.

    **Fields:**

    - `step`: an `int32` scalar, the number of updates applied so far.
    - `nu`: a pytree like the parameters, the exponential moving average of the
        squared gradients that preconditions the update.

    !!! Example

        ```python
        opt = eqx_rng.optim.psgld(1e-3, num_data=100)
        state = opt.init({"w": jnp.zeros(3)})
        assert isinstance(state, eqx_rng.optim.PSGLDState)
        assert int(state.step) == 0 and state.nu["w"].shape == (3,)
        ```
    """

    step: jax.Array
    nu: Any


def psgld(
    learning_rate: optax.ScalarOrSchedule,
    *,
    temperature: optax.ScalarOrSchedule = 1.0,
    num_data: int | None = None,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> optax.GradientTransformationExtraArgs:
    """Preconditioned SGLD with an RMSprop preconditioner (Li et al. 2016).

    With the loss and `g` as in `sgld` (`g` the gradient of the minibatch mean of
    the per-example negative log joint), `lr` the learning rate at this step and
    all operations element-wise, one update is

    - `nu = decay * nu + (1 - decay) * g**2` (`nu` starts at 0 and is updated
        before it is used, as in the paper's Algorithm 1),
    - `G = 1 / (eps + sqrt(nu))`,
    - `update = -(lr / 2) * G * num_data * g + sqrt(lr * temperature * G) * N(0, 1)`.

    The correction term `Gamma(theta)` (the derivative of `G`) is dropped, as the
    paper does in its experiments (its bias vanishes as `decay -> 1`): the chain
    then samples the posterior only approximately. The defaults `decay = 0.99`
    and `eps = 1e-5` are the paper's. The noise comes from `key=` as in `sgld`.

    **Arguments:**

    - `learning_rate`: A number `> 0` or an optax schedule of the step count.
    - `temperature`: A number `>= 0` or a schedule of the step count, as in
        `sgld`. (Keyword only argument.)
    - `num_data`: The training set size `N >= 1`; required. (Keyword only
        argument.)
    - `decay`: `alpha` of the paper, in `[0, 1)`. (Keyword only argument.)
    - `eps`: `lambda` of the paper, `> 0`. (Keyword only argument.)

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose `update` takes `key=`.

    **Raises:**

    Here: `ValueError` as in `sgld`, and for `decay` outside `[0, 1)` or
    `eps <= 0`. In `update`: as `sgld`.

    !!! Example

        ```python
        opt = eqx_rng.optim.psgld(1e-3, num_data=1000)
        params = {"theta": jnp.zeros(2)}
        state = opt.init(params)
        grads = {"theta": jnp.ones(2)}
        updates, state = opt.update(grads, state, params, key=jr.key(0))
        assert updates["theta"].shape == (2,) and int(state.step) == 1
        ```
    """
    _check_num_data(num_data, "psgld")
    check_number(temperature, "psgld", "temperature")
    check_number(learning_rate, "psgld", "learning_rate", low=1e-300)
    check_number(eps, "psgld", "eps", low=1e-300)
    check_number(decay, "psgld", "decay")
    if not float(decay) < 1:
        raise ValueError(
            f"`eqx_rng.optim.psgld(decay=...)` must be < 1, got {decay!r}."
        )
    n = float(num_data)  # pyright: ignore[reportArgumentType]
    alpha, lam = float(decay), float(eps)

    def init(params: Any) -> PSGLDState:
        nu = jtu.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return PSGLDState(step=jnp.zeros((), jnp.int32), nu=nu)

    def apply(updates: Any, state: Any, key: Any) -> tuple[Any, PSGLDState]:
        lr = schedule_value(learning_rate, state.step)
        temp = temperature_value(temperature, state.step)
        g32 = jtu.tree_map(lambda g: g.astype(jnp.float32), updates)
        nu = jtu.tree_map(lambda v, g: alpha * v + (1 - alpha) * g * g, state.nu, g32)
        precond = jtu.tree_map(lambda v: 1.0 / (lam + jnp.sqrt(v)), nu)
        drift = jtu.tree_map(
            lambda p, g, u: ((-0.5 * n) * lr * p * g).astype(u.dtype),
            precond,
            g32,
            updates,
        )
        scale = jtu.tree_map(lambda p: jnp.sqrt(lr * temp * p), precond)
        out = add_scaled_noise(key, drift, scale)
        return out, PSGLDState(step=state.step + 1, nu=nu)

    return keyed_transformation("psgld", init, apply)
