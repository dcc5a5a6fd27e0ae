"""`make_train_step`: `trainable=`, optax extra arguments, and bad input."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqx_rng


class _Net(eqx.Module):
    linear: eqx.nn.Linear
    drop: eqx_rng.nn.Dropout

    def __call__(self, x, *, key):
        return self.linear(self.drop(x, key=key))


def _net(rate=0.2):
    return _Net(
        eqx.nn.Linear(3, 1, key=jr.key(0)), eqx_rng.nn.Dropout(jnp.float32(rate))
    )


def _loss(model, state, batch, *, key):
    x, y = batch
    keys = eqx_rng.example_keys(key, jnp.arange(x.shape[0]))
    pred = jax.vmap(model)(x, key=keys)
    return jnp.mean((pred - y) ** 2), (state, {})


def _batches(k, n=8):
    x = jr.normal(jr.key(1), (k, n, 3))
    return x, jnp.sum(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------
# trainable=


def test_adamw_leaves_an_array_drop_rate_bitwise_unchanged():
    opt = optax.adamw(1e-2, weight_decay=0.1)
    ts = eqx_rng.TrainState.create(_net(), opt, key=0)
    step = eqx_rng.make_train_step(_loss, opt, steps_per_call=30)
    new, _ = step(ts, _batches(30))
    assert np.asarray(new.model.drop.p).tobytes() == np.float32(0.2).tobytes()
    assert not jnp.allclose(new.model.linear.weight, ts.model.linear.weight)
    # The optimizer state holds nothing for the rate.
    assert new.opt_state[0].mu.drop.p is None

    # Asked to, the rate is trained (and weight-decayed), as before.
    every = eqx.is_inexact_array
    ts = eqx_rng.TrainState.create(_net(), opt, key=0, trainable=every)
    step = eqx_rng.make_train_step(_loss, opt, steps_per_call=30, trainable=every)
    new, _ = step(ts, _batches(30))
    assert float(new.model.drop.p) != pytest.approx(0.2, abs=1e-6)


def test_a_pytree_spec_freezes_a_layer():
    opt = optax.sgd(0.1)
    model = _net()
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(lambda s: s.linear.bias, spec, True)
    ts = eqx_rng.TrainState.create(model, opt, key=0, trainable=spec)
    step = eqx_rng.make_train_step(_loss, opt, steps_per_call=2, trainable=spec)
    new, _ = step(ts, _batches(2))
    bias = model.linear.bias
    assert bias is not None
    assert jnp.array_equal(new.model.linear.weight, model.linear.weight)
    assert not jnp.array_equal(new.model.linear.bias, bias)


def test_a_spec_other_than_the_one_that_created_the_state_is_refused():
    opt = optax.adam(1e-2)
    ts = eqx_rng.TrainState.create(_net(), opt, key=0)
    step = eqx_rng.make_train_step(
        _loss,
        opt,
        steps_per_call=2,
        trainable=lambda x: eqx.is_array(x) and x.ndim == 2,
    )
    with pytest.raises(ValueError, match="same `trainable=`"):
        step(ts, _batches(2))


def test_a_state_built_with_another_optimizer_is_refused():
    ts = eqx_rng.TrainState.create(_net(), optax.sgd(0.1), key=0)
    step = eqx_rng.make_train_step(_loss, optax.adam(1e-2), steps_per_call=2)
    with pytest.raises(ValueError, match="another optimizer"):
        step(ts, _batches(2))


def test_an_optimizer_state_built_on_every_array_still_steps():
    # A TrainState built before rates were excluded by default (an old checkpoint):
    # it keeps working, and the rate is no longer changed.
    opt = optax.adamw(1e-2, weight_decay=0.1)
    model = _net()
    old = eqx_rng.TrainState(
        model,
        None,
        opt.init(eqx.filter(model, eqx.is_inexact_array)),
        jr.key(0),
        jnp.zeros((), jnp.int32),
    )
    new, _ = eqx_rng.make_train_step(_loss, opt, steps_per_call=3)(old, _batches(3))
    assert float(new.model.drop.p) == np.float32(0.2)
    assert not jnp.allclose(new.model.linear.weight, model.linear.weight)


def test_a_spec_that_does_not_fit_the_model():
    with pytest.raises(ValueError, match="prefix of the model"):
        eqx_rng.TrainState.create(_net(), optax.sgd(0.1), key=0, trainable=[True])


def test_declared_non_trainable_fields_of_a_user_layer():
    class Scaled(eqx.Module):
        non_trainable_fields = ("scale",)
        weight: jax.Array
        scale: jax.Array

        def __call__(self, x, *, key):
            return self.scale * jnp.dot(self.weight, x)

    def loss(model, state, batch, *, key):
        return jnp.sum(model(jnp.ones(2), key=key) ** 2), (state, {})

    opt = optax.adamw(0.1, weight_decay=0.5)
    model = Scaled(jnp.ones(2), jnp.float32(3.0))
    ts = eqx_rng.TrainState.create(model, opt, key=0)
    new, _ = eqx_rng.make_train_step(loss, opt)(ts, None)
    assert float(new.model.scale) == 3.0
    assert not jnp.allclose(new.model.weight, model.weight)


# ----------------------------------------------------------------------------------
# optax extra arguments


def _quad(model, state, batch, *, key):
    w = model["w"]
    return jnp.sum((w - jnp.arange(3.0)) ** 2 * jnp.array([1.0, 4.0, 9.0])), (state, {})


def test_lbfgs_gets_value_grad_and_value_fn():
    opt = optax.lbfgs()
    ts = eqx_rng.TrainState.create({"w": jnp.zeros(3)}, opt, key=0)
    step = eqx_rng.make_train_step(_quad, opt)
    for _ in range(6):
        ts, metrics = step(ts, None)
    # The hand-written optax loop.
    params: Any = {"w": jnp.zeros(3)}
    state = opt.init(params)
    value_fn = lambda p: _quad(p, None, None, key=None)[0]  # noqa: E731
    for _ in range(6):
        value, grad = jax.value_and_grad(value_fn)(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(
                grad, state, params, value=value, grad=grad, value_fn=value_fn
            )
        params = optax.apply_updates(params, updates)
    assert jnp.allclose(ts.model["w"], params["w"], rtol=1e-5, atol=1e-6)
    assert jnp.allclose(ts.model["w"], jnp.arange(3.0), atol=1e-4)


def test_reduce_on_plateau_gets_the_loss():
    opt = optax.chain(
        optax.sgd(0.1),
        optax.contrib.reduce_on_plateau(patience=2, factor=0.5, accumulation_size=1),
    )

    def flat(model, state, batch, *, key):  # a loss that never improves
        return jnp.sum(0.0 * model["w"]) + 1.0, (state, {})

    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    step = eqx_rng.make_train_step(flat, opt, steps_per_call=8)
    ts, _ = step(ts, jnp.zeros((8, 1)))
    assert float(ts.opt_state[1].scale) < 1.0


def test_a_chain_of_plain_noisy_and_line_search_members():
    opt = optax.chain(
        optax.clip_by_global_norm(10.0),
        eqx_rng.optim.add_noise(1e-6, 0.55),
        optax.lbfgs(),
    )
    ts = eqx_rng.TrainState.create({"w": jnp.zeros(3)}, opt, key=0)
    step = eqx_rng.make_train_step(_quad, opt)
    ts, metrics = step(ts, None)
    for _ in range(7):
        ts, metrics = step(ts, None)
    assert float(metrics["loss"]) < 1e-3


def _recorder(update) -> Any:
    """An optimizer whose state is what `update` records (a float32 scalar)."""
    init = lambda params: jnp.zeros((), jnp.float32)  # noqa: E731
    return optax.GradientTransformationExtraArgs(init, update)  # pyright: ignore


def test_extra_args_go_only_where_the_signature_takes_them():
    def update(updates, state, params=None, *, value):  # no **extra_args
        return updates, value

    opt = _recorder(update)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(3)}, opt, key=0)
    new, metrics = eqx_rng.make_train_step(_quad, opt)(ts, None)
    assert float(new.opt_state) == float(metrics["loss"])


def test_optimizer_key_is_derived_from_the_step_key():
    def update(updates, state, params=None, **extra):
        return updates, jr.uniform(extra["key"])

    opt = _recorder(update)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(3)}, opt, key=5)
    new, _ = eqx_rng.make_train_step(_quad, opt)(ts, None)
    expected = jr.uniform(eqx_rng.derive(jr.key(5), 0, "optimizer"))
    assert float(new.opt_state) == float(expected)


# ----------------------------------------------------------------------------------
# Bad input


def test_a_string_metric_is_refused():
    def loss(model, state, batch, *, key):
        return jnp.sum(model["w"] ** 2), (state, {"phase": "warmup"})

    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1), key=0)
    with pytest.raises(TypeError, match=r"metrics\['phase'\]"):
        eqx_rng.make_train_step(loss, optax.sgd(0.1))(ts, None)


def test_one_batch_of_k_examples_is_not_k_steps():
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create(_net(), opt, key=0)
    step = eqx_rng.make_train_step(_loss, opt, steps_per_call=8)
    x = jr.normal(jr.key(2), (8, 3))
    one_batch = (x, jnp.sum(x, axis=1, keepdims=True))  # 8 examples, not 8 steps
    with pytest.raises(ValueError, match="one batch of 8 examples"):
        step(ts, one_batch)
    # Stacked batches are fine.
    step(ts, _batches(8))
