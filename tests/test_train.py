"""Tests for `TrainState` and `make_train_step`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import keys_equal, tree_allclose

import eqx_rng

D, H, B = 3, 8, 8


def _mlp(key):
    return eqx.nn.MLP(D, 1, H, 1, key=key)


def _mse(model, state, batch, *, key):
    x, y = batch
    pred = jax.vmap(model)(x)
    return jnp.mean((pred - y) ** 2), (state, {})


def _batch(t, n=B):
    k = eqx_rng.derive(jr.key(99), t)
    x = jr.normal(k, (n, D))
    return x, jnp.sum(x, axis=1, keepdims=True)


def _bits_equal(a, b) -> bool:
    """Bitwise equality of two pytrees' arrays (typed keys by their bits)."""
    la, ta = jax.tree.flatten(eqx.filter(a, eqx.is_array))
    lb, tb = jax.tree.flatten(eqx.filter(b, eqx.is_array))
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jr.key_data(x), jr.key_data(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True):
            return False
    return True


# ----------------------------------------------------------------------------------
# TrainState.create


def test_create_fields():
    model = _mlp(jr.key(0))
    opt = optax.adam(1e-2)
    ts = eqx_rng.TrainState.create(model, opt, key=7)
    assert ts.step.shape == () and ts.step.dtype == jnp.int32 and int(ts.step) == 0
    assert keys_equal(ts.key, jr.key(7))
    assert ts.state is None
    expected = opt.init(eqx.filter(model, eqx.is_inexact_array))
    assert tree_allclose(ts.opt_state, expected)
    # The model is copied: equal values, distinct buffers.
    assert _bits_equal(ts.model, model)
    assert ts.model.layers[0].weight is not model.layers[0].weight


def test_create_takes_a_typed_key_and_rejects_a_legacy_one():
    model = _mlp(jr.key(0))
    key = jr.key(3)
    ts = eqx_rng.TrainState.create(model, optax.sgd(0.1), key=key)
    assert keys_equal(ts.key, key)
    if not eqx_rng.typecheck_enabled():
        return  # the legacy key is refused by the type check
    with pytest.raises(TypeError, match="as_key"):
        eqx_rng.TrainState.create(model, optax.sgd(0.1), key=jr.PRNGKey(0))


# ----------------------------------------------------------------------------------
# One step


def test_one_step_matches_a_hand_written_step():
    model = _mlp(jr.key(0))
    opt = optax.adam(1e-2)
    ts = eqx_rng.TrainState.create(model, opt, key=1)
    step = eqx_rng.make_train_step(_mse, opt)
    batch = _batch(0)
    new_ts, metrics = step(ts, batch)

    @eqx.filter_jit
    def reference(model, opt_state):
        def loss(m):
            return _mse(m, None, batch, key=jr.key(0))[0]

        value, grads = eqx.filter_value_and_grad(loss)(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        with jax.numpy_dtype_promotion("standard"):  # optax is not strict-clean
            updates, opt_state = opt.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, value, grads

    ref_model, ref_opt, ref_loss, grads = reference(model, ts.opt_state)
    assert tree_allclose(new_ts.model, ref_model, rtol=1e-6, atol=1e-7)
    assert tree_allclose(new_ts.opt_state, ref_opt, rtol=1e-6, atol=1e-7)
    assert jnp.allclose(metrics["loss"], ref_loss, rtol=1e-6)
    grad_norm = optax.tree.norm(eqx.filter(grads, eqx.is_array))
    assert jnp.allclose(metrics["grad_norm"], grad_norm, rtol=1e-5)
    assert metrics["finite"].dtype == jnp.bool_ and bool(metrics["finite"])
    assert int(new_ts.step) == 1 and new_ts.step.dtype == jnp.int32
    assert new_ts.key is ts.key
    assert set(metrics) == {"loss", "grad_norm", "finite"}


def test_step_key_is_derived_from_key_and_step():
    def loss_fn(model, state, batch, *, key):
        loss = jnp.sum(model["w"] ** 2)
        return loss, (state, {"draw": jr.uniform(key, (2,))})

    opt = optax.sgd(0.0)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=5)
    step = eqx_rng.make_train_step(loss_fn, opt)
    for t in range(3):
        ts, metrics = step(ts, None)
        expected = jr.uniform(eqx_rng.derive(jr.key(5), t), (2,))
        assert jnp.array_equal(metrics["draw"], expected)
    assert keys_equal(ts.key, jr.key(5))


def test_user_metrics_are_kept_and_win():
    def loss_fn(model, state, batch, *, key):
        loss = jnp.sum(model["w"] ** 2)
        return loss, (state, {"acc": jnp.float32(0.5), "loss": jnp.float32(-1.0)})

    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    _, metrics = eqx_rng.make_train_step(loss_fn, opt)(ts, None)
    assert float(metrics["acc"]) == 0.5
    assert float(metrics["loss"]) == -1.0
    assert "grad_norm" in metrics and "finite" in metrics


def test_extra_metrics_false():
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    step = eqx_rng.make_train_step(_nan_at(0), opt, extra_metrics=False)
    _, metrics = step(ts, jnp.int32(0))
    assert set(metrics) == {"loss"}
    skip = eqx_rng.make_train_step(
        _nan_at(0), opt, extra_metrics=False, nan_policy="skip"
    )
    ts1, _ = skip(ts, jnp.int32(0))
    assert _bits_equal(ts1.model, ts.model) and int(ts1.step) == 1


def test_metrics_none_is_allowed():
    def loss_fn(model, state, batch, *, key):
        return jnp.sum(model["w"] ** 2), (state, None)

    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    _, metrics = eqx_rng.make_train_step(loss_fn, opt)(ts, None)
    assert set(metrics) == {"loss", "grad_norm", "finite"}


class _Counter(eqx.Module):
    """A tiny stateful model: counts its calls in an `eqx.nn.State`."""

    linear: eqx.nn.Linear
    count: eqx.nn.StateIndex

    def __init__(self, key):
        self.linear = eqx.nn.Linear(D, 1, key=key)
        self.count = eqx.nn.StateIndex(jnp.zeros((), jnp.int32))

    def __call__(self, x, state):
        state = state.set(self.count, state.get(self.count) + 1)
        return self.linear(x), state


def test_state_is_threaded():
    def loss_fn(model, state, batch, *, key):
        x, y = batch
        pred, state = model(x[0], state)
        return jnp.mean((pred - y[0]) ** 2), (state, {})

    model, state = eqx.nn.make_with_state(_Counter)(jr.key(0))
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create(model, opt, key=0, state=state)
    step = eqx_rng.make_train_step(loss_fn, opt)
    for _ in range(3):
        ts, _ = step(ts, _batch(0))
    assert int(ts.state.get(ts.model.count)) == 3


def test_non_array_leaves_are_not_stale():
    """A changed Python float in the model gives a new compiled variant."""

    class Scaled(eqx.Module):
        w: jax.Array
        scale: float

    def loss_fn(model, state, batch, *, key):
        return model.scale * jnp.sum(model.w**2), (state, {})

    opt = optax.sgd(0.1)
    step = eqx_rng.make_train_step(loss_fn, opt)
    for scale in (1.0, 3.0, 1.0):
        ts = eqx_rng.TrainState.create(Scaled(jnp.ones(2), scale), opt, key=0)
        _, metrics = step(ts, None)
        assert float(metrics["loss"]) == pytest.approx(2.0 * scale)


def test_new_batch_shape_recompiles():
    model = _mlp(jr.key(0))
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create(model, opt, key=0)
    step = eqx_rng.make_train_step(_mse, opt)
    ts, m8 = step(ts, _batch(0, 8))
    ts, m5 = step(ts, _batch(1, 5))
    assert int(ts.step) == 2 and bool(m5["finite"])


def test_numpy_batch():
    model = _mlp(jr.key(0))
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create(model, opt, key=0)
    step = eqx_rng.make_train_step(_mse, opt)
    x, y = _batch(0)
    ts_np, m_np = step(ts, (np.asarray(x), np.asarray(y)))
    ts_jx, m_jx = step(ts, (x, y))
    assert _bits_equal(ts_np, ts_jx)


def test_bfloat16_params_with_float32_updates():
    def loss_fn(model, state, batch, *, key):
        return jnp.sum(model["w"].astype(jnp.float32) ** 2), (state, {})

    # An optimizer whose updates are float32 whatever the parameters' dtype.
    to_f32 = optax.stateless(
        lambda u, p: jax.tree.map(lambda a: a.astype(jnp.float32), u)
    )
    opt = optax.chain(optax.sgd(0.25), to_f32)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(4, jnp.bfloat16)}, opt, key=0)
    ts, _ = eqx_rng.make_train_step(loss_fn, opt)(ts, None)
    assert ts.model["w"].dtype == jnp.bfloat16
    assert jnp.array_equal(ts.model["w"], jnp.full(4, 0.5, jnp.bfloat16))


def test_bfloat16_params_keep_their_dtype():
    def loss_fn(model, state, batch, *, key):
        return jnp.sum(model["w"].astype(jnp.float32) ** 2), (state, {})

    opt = optax.adam(1e-2)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(4, jnp.bfloat16)}, opt, key=0)
    step = eqx_rng.make_train_step(loss_fn, opt, steps_per_call=2)
    ts, metrics = step(ts, jnp.zeros((2, 1)))
    assert ts.model["w"].dtype == jnp.bfloat16
    assert metrics["grad_norm"].dtype == jnp.float32


# ----------------------------------------------------------------------------------
# steps_per_call


@pytest.mark.parametrize("k", [1, 4])
def test_steps_per_call_equals_single_steps(k):
    model = _mlp(jr.key(0))
    opt = optax.adam(1e-2)
    ts0 = eqx_rng.TrainState.create(model, opt, key=1)

    def loss_fn(model, state, batch, *, key):
        x, y = batch
        noise = 0.1 * jr.normal(key, x.shape)  # uses the step key
        pred = jax.vmap(model)(x + noise)
        return jnp.mean((pred - y) ** 2), (state, {"noise": jnp.sum(noise)})

    single = eqx_rng.make_train_step(loss_fn, opt)
    multi = eqx_rng.make_train_step(loss_fn, opt, steps_per_call=k)
    batches = [_batch(t) for t in range(2 * k)]

    ts, singles = ts0, []
    for b in batches:
        ts, m = single(ts, b)
        singles.append(m)
    ts_multi, multis = ts0, []
    for c in range(2):
        if k == 1:
            ts_multi, m = multi(ts_multi, batches[c])
            m = jax.tree.map(lambda a: a[None], m)
        else:
            chunk = batches[c * k : (c + 1) * k]
            ts_multi, m = multi(ts_multi, jax.tree.map(lambda *a: jnp.stack(a), *chunk))
        assert m["loss"].shape == (k,) and m["finite"].shape == (k,)
        multis.append(m)
    assert int(ts_multi.step) == 2 * k
    assert tree_allclose(ts_multi, ts, rtol=1e-6, atol=1e-7)
    if jax.default_backend() == "cpu":  # observed bitwise on XLA:CPU
        assert _bits_equal(ts_multi, ts)
    got = jnp.concatenate([m["loss"] for m in multis])
    want = jnp.stack([m["loss"] for m in singles])
    assert jnp.allclose(got, want, rtol=1e-6)
    got_noise = jnp.concatenate([m["noise"] for m in multis])
    assert jnp.allclose(got_noise, jnp.stack([m["noise"] for m in singles]))


def test_steps_per_call_needs_the_leading_axis():
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create(_mlp(jr.key(0)), opt, key=0)
    step = eqx_rng.make_train_step(_mse, opt, steps_per_call=4)
    with pytest.raises(ValueError, match=r"leading axis of 4.*batch\[0\].*\(8, 3\)"):
        step(ts, _batch(0))


@pytest.mark.parametrize("bad", [0, -1, True])
def test_steps_per_call_must_be_positive(bad):
    with pytest.raises((ValueError, TypeError), match="steps_per_call"):
        eqx_rng.make_train_step(_mse, optax.sgd(0.1), steps_per_call=bad)


def test_unknown_nan_policy():
    with pytest.raises(ValueError, match="nan_policy"):
        eqx_rng.make_train_step(_mse, optax.sgd(0.1), nan_policy="ignore")


# ----------------------------------------------------------------------------------
# Errors in loss_fn and arguments


def test_loss_fn_must_return_state_and_metrics():
    def bad(model, state, batch, *, key):
        return jnp.sum(model["w"] ** 2), {"acc": 1.0}

    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    with pytest.raises(TypeError, match=r"\(loss, \(state, metrics\)\)"):
        eqx_rng.make_train_step(bad, opt)(ts, None)


def test_loss_must_be_a_scalar():
    def bad(model, state, batch, *, key):
        return model["w"] ** 2, (state, {})

    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    with pytest.raises(TypeError, match="scalar loss"):
        eqx_rng.make_train_step(bad, opt)(ts, None)


def test_step_takes_a_train_state():
    step = eqx_rng.make_train_step(_mse, optax.sgd(0.1))
    with pytest.raises(TypeError, match="TrainState.create"):
        step(_mlp(jr.key(0)), _batch(0))


# ----------------------------------------------------------------------------------
# NaN / inf


def _nan_at(t_bad):
    """A loss that is NaN at step `t_bad` only (the batch says which step it is)."""

    def loss_fn(model, state, batch, *, key):
        poison = jnp.where(batch == t_bad, jnp.nan, 1.0)
        return poison * jnp.sum(model["w"] ** 2), (state, {})

    return loss_fn


def test_nan_policy_report():
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    step = eqx_rng.make_train_step(_nan_at(1), opt)
    finite = []
    for t in range(3):
        ts, m = step(ts, jnp.int32(t))
        finite.append(bool(m["finite"]))
    assert finite == [True, False, False]  # the NaN stays in the model
    assert int(ts.step) == 3
    assert bool(jnp.all(jnp.isnan(ts.model["w"])))  # reported, not prevented


def test_nan_policy_skip():
    opt = optax.adam(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    step = eqx_rng.make_train_step(_nan_at(1), opt, nan_policy="skip")
    ts1, m0 = step(ts, jnp.int32(0))
    ts2, m1 = step(ts1, jnp.int32(1))
    assert bool(m0["finite"]) and not bool(m1["finite"])
    assert _bits_equal(ts2.model, ts1.model)
    assert _bits_equal(ts2.opt_state, ts1.opt_state)
    assert int(ts2.step) == 2
    ts3, m2 = step(ts2, jnp.int32(2))
    assert bool(m2["finite"]) and bool(jnp.all(jnp.isfinite(ts3.model["w"])))


def test_nan_policy_error_names_the_step():
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    step = eqx_rng.make_train_step(_nan_at(2), opt, nan_policy="error")
    ts, _ = step(ts, jnp.int32(0))
    ts, _ = step(ts, jnp.int32(1))
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"not finite|non-finite") as e:
        step(ts, jnp.int32(2))
    assert "at step 2" in str(e.value)
    assert "nan_policy" in str(e.value)


def test_nan_policy_error_in_scan_names_the_step():
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    step = eqx_rng.make_train_step(
        _nan_at(5), opt, nan_policy="error", steps_per_call=4
    )
    ts, m = step(ts, jnp.arange(4, dtype=jnp.int32))
    with pytest.raises(eqx.EquinoxRuntimeError, match="at step 5"):
        step(ts, jnp.arange(4, 8, dtype=jnp.int32))


def test_nan_policy_error_under_filter_jit():
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.ones(2)}, opt, key=0)
    step = eqx.filter_jit(eqx_rng.make_train_step(_nan_at(0), opt, nan_policy="error"))
    with pytest.raises(eqx.EquinoxRuntimeError, match="at step 0"):
        step(ts, jnp.int32(0))


def test_infinite_gradient_is_not_finite():
    def loss_fn(model, state, batch, *, key):
        return jnp.sum(jnp.sqrt(model["w"])), (state, {})  # d/dw sqrt(0) = inf

    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create({"w": jnp.zeros(2)}, opt, key=0)
    _, m = eqx_rng.make_train_step(loss_fn, opt)(ts, None)
    assert jnp.isfinite(m["loss"]) and not bool(m["finite"])


# ----------------------------------------------------------------------------------
# Dispatch: fast path, transformations, donation


def test_inside_filter_jit_and_scan_matches_fast_path():
    model = _mlp(jr.key(0))
    opt = optax.adam(1e-2)
    ts0 = eqx_rng.TrainState.create(model, opt, key=1)
    step = eqx_rng.make_train_step(_mse, opt)
    batch = _batch(0)
    fast, m_fast = step(ts0, batch)
    jitted, m_jit = eqx.filter_jit(step)(ts0, batch)
    assert tree_allclose(fast, jitted, rtol=1e-6, atol=1e-7)
    assert jnp.allclose(m_fast["loss"], m_jit["loss"])

    @eqx.filter_jit
    def three_steps(ts):
        dynamic, static = eqx.partition(ts, eqx.is_array)

        def body(dynamic, t):
            ts, m = step(eqx.combine(dynamic, static), _batch(t))
            return eqx.filter(ts, eqx.is_array), m["loss"]

        dynamic, losses = jax.lax.scan(body, dynamic, jnp.arange(3))
        return eqx.combine(dynamic, static), losses

    ts_scan, losses = three_steps(ts0)
    ts_loop = ts0
    for t in range(3):
        ts_loop, _ = step(ts_loop, _batch(t))
    assert tree_allclose(ts_scan, ts_loop, rtol=1e-6, atol=1e-7)
    assert losses.shape == (3,)


def test_fast_path_is_reused():
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create(_mlp(jr.key(0)), opt, key=0)
    step = eqx_rng.make_train_step(_mse, opt)
    for t in range(4):
        ts, _ = step(ts, _batch(t))
    entries = step._dispatch.entries  # type: ignore[attr-defined]
    assert len(entries) == 1
    assert entries[0].fn._cache_size() == 1
    # The returned state is recognised, and forgotten once it is gone.
    last_out = step._last_out  # type: ignore[attr-defined]
    assert last_out is not None and last_out[0]() is ts
    del ts, last_out
    assert step._last_out is None  # type: ignore[attr-defined]


def test_default_does_not_donate():
    # On every backend: the `ts` passed in stays usable unless `donate=True`.
    opt = optax.sgd(0.1)
    ts0 = eqx_rng.TrainState.create(_mlp(jr.key(0)), opt, key=0)
    step = eqx_rng.make_train_step(_mse, opt)
    step(ts0, _batch(0))
    ts_again, _ = step(ts0, _batch(0))  # ts0 is still usable
    assert int(ts_again.step) == 1


def test_donate_consumes_the_input_but_not_the_built_model():
    model = _mlp(jr.key(0))
    opt = optax.adam(1e-2)
    ts0 = eqx_rng.TrainState.create(model, opt, key=0)
    reference, _ = eqx_rng.make_train_step(_mse, opt, donate=False)(ts0, _batch(0))
    step = eqx_rng.make_train_step(_mse, opt, donate=True)
    ts1, _ = step(ts0, _batch(0))
    assert _bits_equal(ts1, reference)
    assert ts0.model.layers[0].weight.is_deleted()
    assert not ts0.key.is_deleted()  # the key is never donated
    assert not model.layers[0].weight.is_deleted()  # `create` copied it
    ts2, _ = step(ts1, _batch(1))
    assert int(ts2.step) == 2


def test_tied_weights_are_not_donated_twice():
    w = jnp.ones(3)
    opt = optax.sgd(0.1)

    def loss_fn(model, state, batch, *, key):
        return jnp.sum(model["a"] * model["b"]), (state, {})

    ts = eqx_rng.TrainState.create({"a": w, "b": w}, opt, key=0)
    # `create` copies leaf by leaf; tie them again by hand.
    ts = eqx.tree_at(lambda t: t.model["b"], ts, ts.model["a"])
    ts, m = eqx_rng.make_train_step(loss_fn, opt, donate=True)(ts, None)
    assert bool(m["finite"])


# ----------------------------------------------------------------------------------
# Chains


def _chain_state(key, n_chains, opt):
    def make(*, key):
        model = _mlp(eqx_rng.derive(key, "init"))
        return eqx_rng.TrainState.create(model, opt, key=eqx_rng.derive(key, "train"))

    return eqx_rng.ensemble(make, key, n_chains), make


def _noisy_mse(model, state, batch, *, key):
    x, y = batch
    pred = jax.vmap(model)(x + 0.1 * jr.normal(key, x.shape))
    return jnp.mean((pred - y) ** 2), (state, {})


@pytest.mark.parametrize("k", [1, 3])
def test_vmap_trains_chains_like_single_runs(k):
    opt = optax.adam(1e-2)
    key = jr.key(4)
    chains, make = _chain_state(key, 3, opt)
    step = eqx_rng.make_train_step(_noisy_mse, opt, steps_per_call=k)
    batch = _batch(0)
    if k > 1:
        batch = jax.tree.map(lambda a: jnp.stack([a] * k), batch)
    chain_step = eqx.filter_jit(eqx_rng.vmap(step, in_axes=(0, None)))
    chains, metrics = chain_step(chains, batch)
    chains, metrics = chain_step(chains, batch)
    expected_shape = (3,) if k == 1 else (3, k)
    assert metrics["loss"].shape == expected_shape
    assert chains.step.shape == (3,) and bool(jnp.all(chains.step == 2 * k))
    for c in range(3):
        ts = make(key=eqx_rng.derive(key, c))
        ts, m = step(ts, batch)
        ts, m = step(ts, batch)
        one = jax.tree.map(lambda a, c=c: a[c], eqx.filter(chains, eqx.is_array))
        assert tree_allclose(one.model, eqx.filter(ts.model, eqx.is_array), rtol=1e-5)
        assert jnp.allclose(metrics["loss"][c], m["loss"], rtol=1e-5)
    # The chains differ from one another.
    assert not jnp.allclose(metrics["loss"][0], metrics["loss"][1])


def test_vmap_chains_with_dropout_and_per_chain_data():
    dropout = eqx_rng.nn.Dropout(0.5)

    def loss_fn(model, state, batch, *, key):
        x, y = batch
        keys = jr.split(key, x.shape[0])
        h = jax.vmap(lambda xi, k: dropout(xi, key=k))(x, keys)
        pred = jax.vmap(model)(h)
        return jnp.mean((pred - y) ** 2), (state, {})

    opt = optax.sgd(0.05)
    key = jr.key(8)
    chains, make = _chain_state(key, 2, opt)
    step = eqx_rng.make_train_step(loss_fn, opt)
    batches = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), _batch(0))
    chains, metrics = eqx.filter_jit(eqx_rng.vmap(step))(chains, batches)
    assert metrics["loss"].shape == (2,)
    for c in range(2):
        batch = jax.tree.map(lambda a, c=c: a[c], batches)
        ts, m = step(make(key=eqx_rng.derive(key, c)), batch)
        assert jnp.allclose(metrics["loss"][c], m["loss"], rtol=1e-5)


@pytest.mark.parametrize("kind", ["tuple", "array"])
def test_metrics_of_any_pytree_come_back_as_loss_fn_made_them(kind):
    def loss_fn(model, state, batch, *, key):
        loss, (state, _) = _mse(model, state, batch, key=key)
        metrics = (loss, 2 * loss) if kind == "tuple" else jnp.stack([loss, 2 * loss])
        return loss, (state, metrics)

    opt = optax.sgd(0.1)
    ts0 = eqx_rng.TrainState.create(_mlp(jr.key(0)), opt, key=0)
    _, metrics = eqx_rng.make_train_step(loss_fn, opt)(ts0, _batch(0))
    _, ref = eqx_rng.make_train_step(_mse, opt)(ts0, _batch(0))
    loss, double = metrics
    assert float(double) == 2 * float(loss) and float(loss) == float(ref["loss"])
    _, stacked = eqx_rng.make_train_step(loss_fn, opt, steps_per_call=3)(
        ts0, jax.tree.map(lambda *a: jnp.stack(a), *[_batch(t) for t in range(3)])
    )
    assert jax.tree.structure(stacked) == jax.tree.structure(metrics)
    assert jax.tree.leaves(stacked)[0].shape[0] == 3


def test_chain_batched_train_state_can_be_built_directly():
    opt = optax.sgd(0.1)
    chains = 3
    models = eqx.filter_vmap(_mlp)(jr.split(jr.key(0), chains))
    opt_state = eqx.filter_vmap(
        lambda m: opt.init(eqx.filter(m, eqx.is_inexact_array))
    )(models)
    ts = eqx_rng.TrainState(
        models,
        None,
        opt_state,
        jr.split(jr.key(1), chains),
        jnp.zeros(chains, jnp.int32),
    )
    step = eqx_rng.make_train_step(_mse, opt)
    new, metrics = eqx.filter_jit(eqx_rng.vmap(step, in_axes=(eqx.if_array(0), None)))(
        ts, _batch(0)
    )
    assert metrics["loss"].shape == (chains,)
    assert jnp.array_equal(new.step, jnp.ones(chains, jnp.int32))


def _outline(tree) -> list:
    """Every node's type and, for a Module, its `__dict__` keys in order."""
    out: list = []

    def visit(x):
        out.append(type(x))
        if isinstance(x, eqx.Module):
            out.append(tuple(vars(x)))
        children, node = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
        if not jax.tree_util.treedef_is_leaf(node):
            for c in children:
                visit(c)

    visit(tree)
    return out


def test_returned_train_state_is_rebuilt_bitwise_as_unflattening_does():
    # The fast path rebuilds the returned TrainState with a per-structure builder
    # (`eqx_rng._rebuild`) instead of `jax.tree_util.tree_unflatten`. The result is
    # the same tree: the same arrays bit for bit, the same Modules with the same
    # fields, also after feeding it back and after a structure change.
    class Net(eqx.Module):
        mlp: eqx.nn.MLP
        bn: eqx_rng.nn.BatchNorm
        drop: eqx_rng.nn.Dropout

        def __init__(self, key):
            self.mlp = eqx.nn.MLP(D, 1, H, 1, key=key)
            self.bn = eqx_rng.nn.BatchNorm(D)
            self.drop = eqx_rng.nn.Dropout(0.1)

        def __call__(self, x, state, *, key):
            h, state = self.bn(x, state)
            return self.mlp(self.drop(h, key=key)), state

    def loss_fn(model, state, batch, *, key):
        x, y = batch
        keys = jr.split(key, x.shape[0])
        pred, state = eqx_rng.vmap(
            lambda x, k, s: model(x, s, key=k), axis_name="batch"
        )(x, keys, state)
        return jnp.mean((pred - y) ** 2), (state, {})

    model, state = eqx.nn.make_with_state(Net)(jr.key(0))
    opt = optax.adam(1e-2)
    ts_fast = ts_ref = eqx_rng.TrainState.create(model, opt, key=1, state=state)
    step = eqx_rng.make_train_step(loss_fn, opt)
    reference = eqx.filter_jit(step)  # traced inline: the old unflattening path
    for t in range(3):
        ts_fast, m_fast = step(ts_fast, _batch(t))
        ts_ref, m_ref = reference(ts_ref, _batch(t))
        assert _bits_equal(ts_fast, ts_ref) and _bits_equal(m_fast, m_ref)
        assert _outline(ts_fast) == _outline(ts_ref)
        assert jax.tree.structure(ts_fast) == jax.tree.structure(ts_ref)
        # Fields are ordinary Modules: updating one is plain Equinox.
        assert isinstance(ts_fast.model.mlp.layers[0], eqx.nn.Linear)
    assert step._fast is not None  # type: ignore[attr-defined]  # the written path
    bumped = eqx.tree_at(lambda ts: ts.model.drop, ts_fast, eqx_rng.nn.Dropout(0.2))
    ts_fast, _ = step(bumped, _batch(3))
    ts_ref, _ = reference(
        eqx.tree_at(lambda ts: ts.model.drop, ts_ref, eqx_rng.nn.Dropout(0.2)),
        _batch(3),
    )
    assert _bits_equal(ts_fast, ts_ref) and _outline(ts_fast) == _outline(ts_ref)


def test_weakly_typed_parameters_are_typed_once_at_create():
    # `eqx.nn.PReLU`'s slope starts weakly typed; the first update returns it
    # strongly typed, so a step built on the raw model was traced three times.
    # `TrainState.create` types trained leaves at the start: one trace, and the
    # same float32 numbers as training the weakly typed model.
    class Net(eqx.Module):
        linear: eqx.nn.Linear
        act: eqx.nn.PReLU

        def __call__(self, x):
            return self.act(self.linear(x))

    model = Net(eqx.nn.Linear(D, 1, key=jr.key(0)), eqx.nn.PReLU())
    assert model.act.negative_slope.aval.weak_type
    traces = []

    def loss_fn(model, state, batch, *, key):
        traces.append(1)
        x, y = batch
        return jnp.mean((jax.vmap(model)(x) - y) ** 2), (state, {})

    opt = optax.adam(1e-2)
    ts = eqx_rng.TrainState.create(model, opt, key=1)
    weak = [x for x in jax.tree.leaves(ts) if eqx.is_array(x) and x.aval.weak_type]
    assert weak == []
    step = eqx_rng.make_train_step(loss_fn, opt)
    raw = eqx_rng.TrainState(model, None, opt.init(model), ts.key, ts.step)  # type: ignore[arg-type]
    raw_step = eqx.filter_jit(eqx_rng.make_train_step(loss_fn, opt))
    for t in range(3):
        ts, metrics = step(ts, _batch(t))
        raw, raw_metrics = raw_step(raw, _batch(t))
        assert _bits_equal(ts.model, raw.model)
        assert _bits_equal(metrics["loss"], raw_metrics["loss"])
    assert len(traces) == 1 + 3  # one for `step`; the raw model's step: three
