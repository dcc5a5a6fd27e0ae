"""Tests for `eqx_rng.optim`: keyed noise, SGLD, pSGLD."""

import inspect
import math
import re
import textwrap
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqx_rng

_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("name", ["add_noise", "sgld", "psgld"])
def test_docstring_examples(name):
    doc = inspect.getdoc(getattr(eqx_rng.optim, name)) or ""
    blocks = _BLOCK.findall(doc)
    assert blocks
    for block in blocks:
        ns = {"eqx_rng": eqx_rng, "eqx": eqx, "jax": jax, "jnp": jnp, "jr": jr}
        exec(compile(textwrap.dedent(block), f"<{name}>", "exec"), ns)


def _update(opt, grads, key, steps=1) -> tuple[Any, Any]:
    params = jax.tree.map(jnp.zeros_like, grads)
    state = opt.init(params)
    out, state = opt.update(grads, state, params, key=key)
    for _ in range(steps - 1):
        out, state = opt.update(grads, state, params, key=key)
    return out, state


def test_sgld_noise_term_is_exactly_sqrt_eps_t_times_normal():
    grads = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5)}
    key = jr.key(0)
    normal = eqx_rng.tree_normal(key, grads)
    for eps, temp, scale in [(0.25, 1.0, 0.5), (0.25, 4.0, 1.0), (1.0, 0.0, 0.0)]:
        out, _ = _update(
            eqx_rng.optim.sgld(eps, temperature=temp, num_data=7), grads, key
        )
        for k in grads:
            assert jnp.array_equal(out[k], scale * normal[k])


def test_sgld_drift_is_minus_half_eps_n_g():
    grads = {"w": jnp.arange(4.0)}
    opt = eqx_rng.optim.sgld(0.5, temperature=0.0, num_data=10)
    out, _ = _update(opt, grads, jr.key(1))
    assert jnp.array_equal(out["w"], -0.25 * 10 * grads["w"])
    # With temperature 1 the update is drift + the same noise as alone.
    noisy, _ = _update(eqx_rng.optim.sgld(0.5, num_data=10), grads, jr.key(1))
    noise = eqx_rng.tree_normal(jr.key(1), grads)["w"]
    assert jnp.allclose(noisy["w"], -2.5 * grads["w"] + math.sqrt(0.5) * noise)


def test_sgld_schedule_uses_the_step_count():
    grads = {"w": jnp.ones(3)}
    opt = eqx_rng.optim.sgld(
        lambda t: 1.0 / (1.0 + jnp.asarray(t, jnp.float32)), temperature=0.0, num_data=2
    )
    out, state = _update(opt, grads, jr.key(2), steps=3)  # third update: t = 2
    assert int(state.step) == 3
    assert jnp.allclose(out["w"], -(1 / 3) * jnp.ones(3))


@pytest.mark.parametrize("make", [eqx_rng.optim.sgld, eqx_rng.optim.psgld])
def test_constant_temperature_schedule_equals_the_number_bitwise(make):
    grads = {"a": jnp.linspace(-1.0, 2.0, 12).reshape(3, 4), "b": jnp.ones(5)}
    number = make(0.01, temperature=0.7, num_data=30)
    schedule = make(0.01, temperature=optax.constant_schedule(0.7), num_data=30)
    for steps in (1, 3):
        a, state_a = _update(number, grads, jr.key(6), steps=steps)
        b, state_b = _update(schedule, grads, jr.key(6), steps=steps)
        assert all(jnp.array_equal(a[k], b[k]) for k in grads)
        assert jax.tree.all(jax.tree.map(jnp.array_equal, state_a, state_b))


def _sgld_or_sgd_run(opt, loss, steps: int) -> Any:
    """`steps` updates of `opt` on the linear-regression `loss`, from zero."""
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    state = opt.init(params)
    for t in range(steps):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params, key=jr.key(t))
        params = optax.apply_updates(params, updates)
    return params


def test_temperature_zero_is_sgd_on_num_data_times_the_loss_bitwise():
    # sgld at temperature 0 (a number, or a schedule's exploration stage) is SGD
    # with step eps / 2 on num_data * loss. With num_data a power of two both sides
    # round the same real products once, so they agree bit for bit.
    x = jr.normal(jr.key(7), (16, 3))
    y = x @ jnp.array([0.5, -1.0, 2.0]) + 0.3

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    eps, n, steps = 3e-4, 1024, 6
    sgd = _sgld_or_sgd_run(optax.sgd(eps / 2), lambda p: n * loss(p), steps)
    exploring = lambda t: jnp.where(t < steps, 0.0, 1.0)  # noqa: E731
    for temperature in (0.0, exploring):
        opt = eqx_rng.optim.sgld(eps, temperature=temperature, num_data=n)
        sgld = _sgld_or_sgd_run(opt, loss, steps)
        assert all(jnp.array_equal(sgld[k], sgd[k]) for k in sgd)
    # It has moved: the comparison is not of two untouched zeros.
    assert not jnp.array_equal(sgd["w"], jnp.zeros(3))


def test_sgld_noise_variance_under_a_temperature_schedule_at_5_sigma():
    # Zero gradients: the update is the noise alone, N(0, eps * T(t)). The schedule
    # is 0 at t = 0 and 1 and T at t = 2, so it must be read at the step count.
    size, eps, temperature = 200_000, 0.02, 3.0
    schedule = lambda t: jnp.where(t < 2, 0.0, temperature)  # noqa: E731
    opt = eqx_rng.optim.sgld(eps, temperature=schedule, num_data=10)
    grads = {"w": jnp.zeros(size)}
    first, _ = _update(opt, grads, jr.key(8))
    assert jnp.array_equal(first["w"], jnp.zeros(size))
    out, _ = _update(opt, grads, jr.key(8), steps=3)
    var = eps * temperature
    x = np.asarray(out["w"], np.float64)
    assert abs(x.mean()) < 5 * math.sqrt(var / size)
    assert abs(x.var() - var) < 5 * var * math.sqrt(2 / (size - 1))


def test_add_noise_variance_at_5_sigma():
    n, eta, gamma, t = 200_000, 0.3, 0.55, 4
    grads = {"w": jnp.zeros(n)}
    out, _ = _update(eqx_rng.optim.add_noise(eta, gamma), grads, jr.key(3), steps=t + 1)
    var = eta / (1 + t) ** gamma
    x = np.asarray(out["w"], np.float64)
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    assert abs(x.var() - var) < 5 * var * math.sqrt(2 / (n - 1))


def test_add_noise_first_step_is_t0_and_couples_with_the_key():
    grads = {"w": jnp.ones(6)}
    out, _ = _update(eqx_rng.optim.add_noise(0.25, 1.0), grads, jr.key(4))
    z = eqx_rng.tree_normal(jr.key(4), grads)["w"]
    assert jnp.array_equal(out["w"], 1.0 + 0.5 * z)  # t = 0: variance 0.25


def test_psgld_update_follows_the_stated_formula():
    g = jnp.array([0.5, -2.0, 1e-3])
    lr, n, alpha, lam = 0.01, 50, 0.9, 1e-5
    opt = eqx_rng.optim.psgld(lr, num_data=n, decay=alpha, eps=lam)
    out, state = _update(opt, {"w": g}, jr.key(5))
    nu = (1 - alpha) * g**2
    G = 1 / (lam + jnp.sqrt(nu))
    z = eqx_rng.tree_normal(jr.key(5), {"w": g})["w"]
    expected = -(lr / 2) * G * n * g + jnp.sqrt(lr * G) * z
    assert jnp.allclose(state.nu["w"], nu) and int(state.step) == 1
    assert jnp.allclose(out["w"], expected, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: eqx_rng.optim.add_noise(0.1, 0.55),
        lambda: eqx_rng.optim.sgld(0.1, num_data=3),
        lambda: eqx_rng.optim.psgld(0.1, num_data=3),
    ],
)
def test_missing_or_bad_key(make):
    opt = make()
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="`key` extra argument"):
        opt.update(params, state, params)
    with pytest.raises(TypeError, match="as_key"):
        opt.update(params, state, params, key=jr.PRNGKey(0))
    with pytest.raises(TypeError, match="typed key"):
        opt.update(params, state, params, key=3)


def test_legacy_key_message_starts_with_the_fix():
    opt = eqx_rng.optim.sgld(0.1, num_data=3)
    params = {"w": jnp.zeros(2)}
    with pytest.raises(TypeError) as info:
        opt.update(params, opt.init(params), params, key=jr.PRNGKey(0))
    fix, received = str(info.value).splitlines()
    assert fix.startswith("Convert the key with `eqx_rng.as_key(key)`")
    assert received.startswith(
        "`eqx_rng.optim.sgld(...).update` got a legacy `uint32[2]` key (from "
        "`jax.random.PRNGKey`) for `key`"
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: eqx_rng.optim.sgld(0.1), "num_data"),
        (lambda: eqx_rng.optim.sgld(0.1, num_data=0), "num_data"),
        (lambda: eqx_rng.optim.sgld(0.1, num_data=-5), "num_data"),
        (lambda: eqx_rng.optim.sgld(0.1, num_data=5, temperature=-1.0), "temperature"),
        (lambda: eqx_rng.optim.sgld(0.0, num_data=5), "learning_rate"),
        (lambda: eqx_rng.optim.sgld(0.1, num_data=5, temperature=float("nan")), "temp"),
        (lambda: eqx_rng.optim.psgld(0.1), "num_data"),
        (lambda: eqx_rng.optim.psgld(0.1, num_data=5, decay=1.0), "decay"),
        (lambda: eqx_rng.optim.psgld(0.1, num_data=5, eps=0.0), "eps"),
        (lambda: eqx_rng.optim.add_noise(-0.1, 0.55), "eta"),
        (lambda: eqx_rng.optim.add_noise(0.1, -1.0), "gamma"),
    ],
)
def test_bad_input_is_a_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------
# Inside make_train_step: chains, resume.


def _quadratic(model, state, batch, *, key):
    return 0.5 * jnp.sum(model["theta"] ** 2), (state, {})


def _noisy_optimizers():
    return {
        "sgld": eqx_rng.optim.sgld(0.05, num_data=4),
        "psgld": eqx_rng.optim.psgld(0.05, num_data=4),
        "chain": optax.chain(eqx_rng.optim.add_noise(0.1, 0.55), optax.adam(0.1)),
    }


@pytest.mark.parametrize("name", ["sgld", "psgld", "chain"])
def test_chains_differ_and_a_chain_alone_equals_its_slice(name):
    opt = _noisy_optimizers()[name]
    C, T = 3, 4

    def make(key):
        model = {"theta": jnp.ones(2)}
        return eqx_rng.TrainState.create(model, opt, key=key)

    ts = eqx_rng.ensemble(make, jr.key(6), C)
    step = eqx_rng.make_train_step(_quadratic, opt, steps_per_call=T)
    batch = jnp.zeros((T, 1))
    batched, _ = eqx.filter_jit(eqx_rng.vmap(step, in_axes=(eqx.if_array(0), None)))(
        ts, batch
    )
    theta = batched.model["theta"]
    assert not jnp.allclose(theta[0], theta[1]) and not jnp.allclose(theta[1], theta[2])
    alone, _ = step(make(eqx_rng.derive(jr.key(6), 2)), batch)
    assert jnp.allclose(alone.model["theta"], theta[2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sgld", "psgld", "chain"])
def test_resume_from_a_checkpoint_is_bitwise(name, tmp_path):
    opt = _noisy_optimizers()[name]
    step = eqx_rng.make_train_step(_quadratic, opt)
    ts = eqx_rng.TrainState.create({"theta": jnp.ones(3)}, opt, key=7)
    for _ in range(3):
        ts, _ = step(ts, None)
    eqx_rng.save(tmp_path / "ckpt.eqx", ts)
    straight = ts
    for _ in range(3):
        straight, _ = step(straight, None)
    like = eqx_rng.TrainState.create({"theta": jnp.zeros(3)}, opt, key=0)
    resumed = eqx_rng.load(tmp_path / "ckpt.eqx", like)
    for _ in range(3):
        resumed, _ = step(resumed, None)
    a, b = straight.model["theta"], resumed.model["theta"]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.step) == 6


def test_ensemble_of_noisy_optimizers_has_distinct_keys():
    # No optimizer of eqx_rng.optim keeps a key in its state, so the check that
    # `ensemble` runs on what it builds has nothing to find.
    opt = eqx_rng.optim.sgld(0.1, num_data=4)
    ts = eqx_rng.ensemble(
        lambda key: eqx_rng.TrainState.create({"t": jnp.ones(2)}, opt, key=key),
        jr.key(8),
        3,
    )
    key_leaves = [x for x in jax.tree.leaves(ts.opt_state) if eqx.is_array(x)]
    assert all(not jnp.issubdtype(x.dtype, jax.dtypes.prng_key) for x in key_leaves)
