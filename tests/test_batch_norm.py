"""`eqx_rng.nn.BatchNorm`: NumPy reference, chains x batch, running statistics,
dtypes, composition with `eqx.nn.Sequential`, and errors."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import mean_tol, tree_allclose, var_tol

import eqx_rng

# ---------------------------------------------------------------- helpers


def _train_fn(bn):
    """One training step over a batch: `(xs, state) -> (ys, state)`."""
    return eqx.filter_vmap(
        lambda x, s: bn(x, s),
        in_axes=(0, None),
        out_axes=(0, None),
        axis_name="batch",
    )


def _stats(bn, state):
    acc_mean, acc_var, count = state.get(bn.state_index)
    return np.asarray(acc_mean), np.asarray(acc_var), int(count)


class _NumpyBatchNorm:
    """The documented formulas in float64 NumPy, on a whole batch `(B, C, *spatial)`."""

    def __init__(self, num_features, momentum, eps, weight, bias):
        self.m, self.eps = momentum, eps
        self.w = np.asarray(weight, np.float64)
        self.b = np.asarray(bias, np.float64)
        self.acc_mean = np.zeros(num_features)
        self.acc_var = np.zeros(num_features)
        self.t = 0

    def _bcast(self, v, ndim):
        return v.reshape((1, -1) + (1,) * (ndim - 2))

    def train(self, xs):
        xs = np.asarray(xs, np.float64)
        axes = (0,) + tuple(range(2, xs.ndim))
        mean = xs.mean(axis=axes)
        var = ((xs - self._bcast(mean, xs.ndim)) ** 2).mean(axis=axes)
        n = xs.size // xs.shape[1]
        self.acc_mean = self.m * self.acc_mean + (1 - self.m) * mean
        self.acc_var = self.m * self.acc_var + (1 - self.m) * var * n / (n - 1)
        self.t += 1
        return self._norm(xs, mean, var)

    def running(self):
        if self.t == 0:
            return np.zeros_like(self.acc_mean), np.ones_like(self.acc_var)
        c = 1 - self.m**self.t
        return self.acc_mean / c, self.acc_var / c

    def infer(self, xs):
        xs = np.asarray(xs, np.float64)
        return self._norm(xs, *self.running())

    def _norm(self, xs, mean, var):
        nd = xs.ndim
        y = (xs - self._bcast(mean, nd)) / np.sqrt(self._bcast(var, nd) + self.eps)
        return y * self._bcast(self.w, nd) + self._bcast(self.b, nd)


# ---------------------------------------------------------------- NumPy reference


@pytest.mark.parametrize("spatial", [(), (4,), (3, 2)], ids=str)
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_matches_numpy_reference(spatial, momentum):
    c, b, steps, eps = 3, 8, 5, 1e-3
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(
        c, momentum=momentum, eps=eps
    )
    weight = jnp.array([0.5, 2.0, -1.0])
    bias = jnp.array([0.1, -0.3, 2.0])
    bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (weight, bias))
    ref = _NumpyBatchNorm(c, momentum, eps, weight, bias)
    step = eqx.filter_jit(_train_fn(bn))
    keys = jr.split(jr.key(0), steps + 1)
    scales = jnp.array([1.0, 10.0, 0.1]).reshape((1, c) + (1,) * len(spatial))
    for i in range(steps):
        xs = 3.0 + scales * jr.normal(keys[i], (b, c, *spatial))
        ys, state = step(xs, state)
        np.testing.assert_allclose(ys, ref.train(xs), rtol=1e-5, atol=1e-5)
        acc_mean, acc_var, count = _stats(bn, state)
        assert count == i + 1
        np.testing.assert_allclose(acc_mean, ref.acc_mean, rtol=1e-5)
        np.testing.assert_allclose(acc_var, ref.acc_var, rtol=1e-5)
        # the bias-corrected running statistics, as inference uses them
        run_mean, run_var = bn.running_stats(state)
        exp_mean, exp_var = ref.running()
        np.testing.assert_allclose(run_mean, exp_mean, rtol=1e-5)
        np.testing.assert_allclose(run_var, exp_var, rtol=1e-5)
    # inference on fresh data, one example at a time and without any vmap
    xs = 3.0 + scales * jr.normal(keys[-1], (b, c, *spatial))
    expected = ref.infer(xs)
    inf_bn = eqx.nn.inference_mode(bn)
    for i in range(b):
        y, same = inf_bn(xs[i], state)
        np.testing.assert_allclose(y, expected[i], rtol=1e-5, atol=1e-5)
        assert same is state


def test_inference_before_any_update_is_identity():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(4, eps=1e-5)
    x = jr.normal(jr.key(0), (4, 3))
    y, _ = bn(x, state, inference=True)
    np.testing.assert_allclose(y, x / math.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.99, 0.999, 0.9999])
def test_bias_correction_after_one_step_is_the_batch_statistics(momentum):
    # At momentum near 1, `1 - momentum**t` in float32 would lose most digits.
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(2, momentum=momentum)
    xs = jnp.array([[1.0, 10.0], [3.0, 20.0], [5.0, 60.0]])
    _, state = _train_fn(bn)(xs, state)
    mean, var = bn.running_stats(state)
    np.testing.assert_allclose(mean, [3.0, 30.0], rtol=1e-5)
    np.testing.assert_allclose(var, np.var(np.asarray(xs), axis=0, ddof=1), rtol=1e-5)


def test_numpy_integer_num_features_is_accepted():
    assert eqx_rng.nn.BatchNorm(np.int64(3)).num_features == 3


def test_gradients_match_batched_formula():
    c, b = 3, 6
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(c)
    xs = jr.normal(jr.key(1), (b, c, 2))
    r = jr.normal(jr.key(2), (b, c, 2))

    def loss(bn, xs):
        ys, _ = _train_fn(bn)(xs, state)
        return jnp.sum(ys * r)

    def loss_ref(bn, xs):
        mean = jnp.mean(xs, axis=(0, 2), keepdims=True)
        var = jnp.mean((xs - mean) ** 2, axis=(0, 2), keepdims=True)
        assert bn.weight is not None and bn.bias is not None
        y = (xs - mean) / jnp.sqrt(var + bn.eps)
        y = y * bn.weight[None, :, None] + bn.bias[None, :, None]
        return jnp.sum(y * r)

    params, static = eqx.partition(bn, eqx.is_inexact_array)
    grad = jax.grad(lambda p, x: loss(eqx.combine(p, static), x), argnums=(0, 1))
    grad_ref = jax.grad(
        lambda p, x: loss_ref(eqx.combine(p, static), x), argnums=(0, 1)
    )
    assert tree_allclose(grad(params, xs), grad_ref(params, xs), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- chains x batch


def _chains_step(bn, state_in_axes):
    inner = eqx.filter_vmap(
        lambda x, s: bn(x, s),
        in_axes=(0, None),
        out_axes=(0, None),
        axis_name="batch",
    )
    return eqx.filter_vmap(
        inner, in_axes=(0, state_in_axes), out_axes=(0, 0), axis_name="chains"
    )


def test_chains_get_their_own_statistics_and_state():
    n_chains, b, c = 4, 64, 2
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(c, momentum=0.5)
    means = jnp.array([-100.0, 0.0, 7.0, 1000.0]).reshape(n_chains, 1, 1)
    stds = jnp.array([0.5, 1.0, 5.0, 300.0]).reshape(n_chains, 1, 1)
    xs = means + stds * jr.normal(jr.key(0), (n_chains, b, c))
    # the first call broadcasts the state to every chain; it comes back per chain
    ys, chain_state = _chains_step(bn, None)(xs, state)
    assert ys.shape == xs.shape
    acc_mean, acc_var, count = chain_state.get(bn.state_index)
    assert acc_mean.shape == (n_chains, c) and acc_var.shape == (n_chains, c)
    assert count.shape == (n_chains,)
    # every chain is normalised with its own statistics
    np.testing.assert_allclose(jnp.mean(ys, axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(jnp.std(ys, axis=1), 1.0, rtol=1e-3)
    # and its running mean is its own
    np.testing.assert_allclose(
        acc_mean / 0.5, jnp.mean(xs, axis=1), rtol=1e-5, atol=1e-6
    )
    # later calls map the per-chain state
    ys2, chain_state2 = _chains_step(bn, 0)(xs, chain_state)
    np.testing.assert_allclose(ys2, ys, rtol=1e-6, atol=1e-6)
    assert chain_state2.get(bn.state_index)[2].tolist() == [2] * n_chains


def test_tuple_axis_name_pools_across_chains():
    n_chains, b, c = 3, 16, 2
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(
        c, axis_name=("chains", "batch")
    )
    means = jnp.array([-10.0, 0.0, 10.0]).reshape(n_chains, 1, 1)
    xs = means + jr.normal(jr.key(0), (n_chains, b, c))
    ys, chain_state = _chains_step(bn, None)(xs, state)
    # pooled: mean 0 and std 1 over chains and batch together, not per chain
    np.testing.assert_allclose(jnp.mean(ys, axis=(0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(ys, axis=(0, 1)), 1.0, rtol=1e-4)
    chain_means = jnp.mean(ys, axis=1)
    assert bool(jnp.all(chain_means[0] < -0.5)) and bool(jnp.all(chain_means[2] > 0.5))
    ref = _NumpyBatchNorm(c, 0.99, 1e-5, np.ones(c), np.zeros(c))
    expected = ref.train(xs.reshape(n_chains * b, c)).reshape(n_chains, b, c)
    np.testing.assert_allclose(ys, expected, rtol=1e-5, atol=1e-5)
    # every chain holds the same, pooled, running statistics
    acc_mean = chain_state.get(bn.state_index)[0]
    np.testing.assert_allclose(
        acc_mean, np.broadcast_to(ref.acc_mean, (3, c)), rtol=1e-5
    )


# ---------------------------------------------------------------- running stats


def test_running_statistics_converge_to_the_data():
    c, b, steps, momentum = 3, 64, 300, 0.9
    mu = np.array([-2.0, 0.5, 40.0])
    sigma = np.array([0.5, 1.0, 8.0])
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(c, momentum=momentum)
    step = eqx.filter_jit(_train_fn(bn))
    keys = jr.split(jr.key(0), steps)
    for k in keys:
        xs = jnp.asarray(mu)[None] + jnp.asarray(sigma)[None] * jr.normal(k, (b, c))
        _, state = step(xs, state)
    mean, var = map(np.asarray, bn.running_stats(state))
    # an EMA with weight (1 - m) on each batch averages ~ b * (1 + m) / (1 - m) draws
    n_eff = int(b * (1 + momentum) / (1 - momentum))
    assert np.all(np.abs(mean - mu) < [mean_tol(s, n_eff) for s in sigma])
    assert np.all(np.abs(var - sigma**2) < [var_tol(s**2, n_eff) for s in sigma])


def test_inference_leaves_state_unchanged_bitwise():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(2)
    xs = jr.normal(jr.key(0), (8, 2, 3))
    _, state = _train_fn(bn)(xs, state)
    before = jax.tree.map(np.array, jax.tree.leaves(state))
    infer = eqx.filter_jit(
        eqx.filter_vmap(
            lambda x, s: bn(x, s, inference=True),
            in_axes=(0, None),
            out_axes=(0, None),
            axis_name="batch",
        )
    )
    _, after = infer(xs, state)
    for a, b in zip(before, jax.tree.leaves(after), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, np.asarray(b))
    _, same = bn(xs[0], state, inference=True)
    assert same is state


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_keeps_float32_state(dtype):
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
    xs = (5 + 2 * jr.normal(jr.key(0), (16, 3, 4))).astype(dtype)
    ys, state = _train_fn(bn)(xs, state)
    assert ys.dtype == dtype
    for leaf in state.get(bn.state_index)[:2]:
        assert leaf.dtype == jnp.float32
    # statistics in float32 from the rounded inputs, output rounded once
    ref = _NumpyBatchNorm(3, 0.99, 1e-5, np.ones(3), np.zeros(3))
    expected = ref.train(np.asarray(xs.astype(jnp.float32)))
    np.testing.assert_allclose(ys.astype(jnp.float32), expected, atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(_stats(bn, state)[0], ref.acc_mean, rtol=1e-5)
    y, _ = bn(xs[0], state, inference=True)
    assert y.dtype == dtype


def test_dtype_argument_sets_parameters_not_statistics():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3, dtype=jnp.bfloat16)
    assert bn.weight is not None and bn.weight.dtype == jnp.bfloat16
    assert state.get(bn.state_index)[0].dtype == jnp.float32
    ys, _ = _train_fn(bn)(jnp.ones((4, 3)) + jnp.arange(4.0)[:, None], state)
    assert ys.dtype == jnp.float32


def test_affine_false_has_no_parameters():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(2, affine=False)
    assert bn.weight is None and bn.bias is None
    xs = jr.normal(jr.key(0), (8, 2))
    ys, _ = _train_fn(bn)(xs, state)
    np.testing.assert_allclose(jnp.mean(ys, axis=0), 0, atol=1e-6)


# ---------------------------------------------------------------- composition


def test_sequential_mixes_stochastic_layers_and_batch_norm():
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(4, 8, key=jr.key(1)),
            eqx_rng.nn.BatchNorm(8),
            eqx.nn.Lambda(jax.nn.relu),
            eqx_rng.nn.Dropout(0.3),
            eqx_rng.nn.GaussianNoise(0.1),
            eqx.nn.Linear(8, 2, key=jr.key(2)),
        ]
    )
    assert model.is_stateful()
    xs = jr.normal(jr.key(3), (16, 4))
    keys = jr.split(jr.key(4), 16)
    train = eqx.filter_jit(
        eqx.filter_vmap(
            lambda x, s, k: model(x, s, key=k),
            in_axes=(0, None, 0),
            out_axes=(0, None),
            axis_name="batch",
        )
    )
    ys, new_state = train(xs, state, keys)
    assert ys.shape == (16, 2)
    assert int(new_state.get(model[1].state_index)[2]) == 1  # type: ignore[attr-defined]
    ys_again, _ = train(xs, state, keys)
    assert jnp.array_equal(ys, ys_again)
    assert not jnp.array_equal(ys, train(xs, state, jr.split(jr.key(5), 16))[0])
    # inference: deterministic, no key, no vmap, state untouched
    inf = eqx.nn.inference_mode(model)
    y0, s0 = inf(xs[0], new_state)
    assert s0 is new_state
    assert jnp.array_equal(y0, inf(xs[0], new_state)[0])
    # training without a key names the stochastic layer
    with pytest.raises(ValueError, match="`Dropout` needs `key=`"):
        eqx.filter_vmap(
            lambda x, s: model(x, s),
            in_axes=(0, None),
            out_axes=(0, None),
            axis_name="batch",
        )(xs, state)


def test_grad_through_training_step():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
    xs = jr.normal(jr.key(0), (8, 3))

    @eqx.filter_grad
    def grad(bn):
        ys, _ = _train_fn(bn)(xs, state)
        return jnp.sum(ys[:, 0] * jnp.arange(8.0))

    g = grad(bn)
    assert g.weight is not None and bool(jnp.all(jnp.isfinite(g.weight)))
    assert g.bias is not None and bool(jnp.all(jnp.isfinite(g.bias)))


# ---------------------------------------------------------------- errors

_RECIPE = (
    r"`BatchNorm` computes batch statistics over the vmapped axis '{name}', which is "
    r"not bound here\. Call it under `eqx_rng\.vmap\(fn, axis_name='{name}'\)` \(or "
    r"`eqx\.filter_vmap\(\.\.\., axis_name='{name}'\)`\), or use "
    r"`eqx\.nn\.inference_mode\(model\)`"
)


def test_unbound_axis_without_vmap():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
    x = jnp.ones((3, 4))
    with pytest.raises(ValueError, match=_RECIPE.format(name="batch")):
        bn(x, state)
    with pytest.raises(ValueError, match=_RECIPE.format(name="batch")):
        eqx.filter_jit(lambda x, s: bn(x, s))(x, state)
    bn(x, state, inference=True)  # inference needs no vmap


@pytest.mark.parametrize("vmap_name", [None, "examples"])
def test_unbound_axis_under_a_vmap_with_another_name(vmap_name):
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
    fn = eqx.filter_vmap(
        lambda x, s: bn(x, s),
        in_axes=(0, None),
        out_axes=(0, None),
        axis_name=vmap_name,
    )
    with pytest.raises(ValueError, match=_RECIPE.format(name="batch")):
        fn(jnp.ones((4, 3)), state)


def test_unbound_axis_names_the_missing_one_of_a_tuple():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(
        3, axis_name=("chains", "batch")
    )
    with pytest.raises(ValueError, match=_RECIPE.format(name="chains")):
        _train_fn(bn)(jnp.ones((4, 3)), state)


def test_single_element_statistics_are_an_error():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
    with pytest.raises(ValueError, match=r"(?s)pools each feature over 1 element.*"):
        _train_fn(bn)(jnp.ones((1, 3)), state)
    # one example with spatial positions, or two examples, are fine
    _train_fn(bn)(jnp.ones((1, 3, 2)), state)
    _train_fn(bn)(jnp.ones((2, 3)), state)


def test_wrong_feature_count():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
    match = (
        r"BatchNorm\(num_features=3\)` expects .*\(3, \*spatial\), got shape \(4, 5\)"
    )
    with pytest.raises(ValueError, match=match):
        _train_fn(bn)(jnp.ones((2, 4, 5)), state)
    with pytest.raises(ValueError, match=match):
        bn(jnp.ones((4, 5)), state, inference=True)


def test_state_with_an_unmapped_chain_axis_is_an_error():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
    chain_state = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    match = r"running mean has shape \(2, 3\), expected \(3,\).*in_axes=0"
    with pytest.raises(ValueError, match=match):
        _train_fn(bn)(jnp.ones((4, 3)), chain_state)
    with pytest.raises(ValueError, match=match):
        bn(jnp.ones(3), chain_state, inference=True)


def test_make_with_state_and_state_roundtrip_under_jit():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(2)
    xs = jr.normal(jr.key(0), (4, 2))
    eager = _train_fn(bn)(xs, state)
    jitted = eqx.filter_jit(_train_fn(bn))(xs, state)
    assert tree_allclose(eager, jitted, rtol=1e-6)


# ---------------------------------------------------------------- axis, mask


def test_channels_last_matches_numpy_reference():
    c, b, eps = 3, 6, 1e-3
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(c, eps=eps, axis=-1)
    weight, bias = jnp.array([0.5, 2.0, -1.0]), jnp.array([0.1, -0.3, 2.0])
    bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (weight, bias))
    xs = 3.0 + jr.normal(jr.key(0), (b, 4, 5, c))  # (batch, h, w, channels)
    ref = _NumpyBatchNorm(c, 0.99, eps, weight, bias)
    expected = np.moveaxis(ref.train(np.moveaxis(np.asarray(xs), -1, 1)), 1, -1)
    ys, state = _train_fn(bn)(xs, state)
    np.testing.assert_allclose(ys, expected, rtol=1e-5, atol=1e-5)
    acc_mean, acc_var, _ = _stats(bn, state)
    np.testing.assert_allclose(acc_mean, ref.acc_mean, rtol=1e-5)
    np.testing.assert_allclose(acc_var, ref.acc_var, rtol=1e-5)
    # channels last equals channels first on the transposed input (exact coupling)
    bn0, state0 = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(c, eps=eps)
    bn0 = eqx.tree_at(lambda m: (m.weight, m.bias), bn0, (weight, bias))
    ys0, _ = _train_fn(bn0)(jnp.moveaxis(xs, -1, 1), state0)
    np.testing.assert_allclose(jnp.moveaxis(ys0, 1, -1), ys, rtol=1e-6, atol=1e-6)


def test_axis_errors():
    with pytest.raises(TypeError, match="axis"):
        eqx_rng.nn.BatchNorm(3, axis=1.0)  # type: ignore[arg-type]
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3, axis=2)
    with pytest.raises(ValueError, match=r"axis=2\)` expects .*got shape \(3, 4\)"):
        bn(jnp.ones((3, 4)), state, inference=True)


def _masked_train_fn(bn):
    return eqx.filter_vmap(
        lambda x, m, s: bn(x, s, mask=m),
        in_axes=(0, 0, None),
        out_axes=(0, None),
        axis_name="batch",
    )


@pytest.mark.parametrize("spatial", [(), (3, 2)], ids=str)
def test_mask_leaves_padding_out_of_the_statistics(spatial):
    c, real, pad = 3, 5, 3
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(c, momentum=0.9)
    xs = 2.0 + jr.normal(jr.key(1), (real, c, *spatial))
    padding = 100.0 * jnp.ones((pad, c, *spatial))  # far off: it would shift stats
    padded = jnp.concatenate([xs, padding])
    mask = jnp.arange(real + pad) < real
    ys, masked_state = _masked_train_fn(bn)(padded, mask, state)
    # NumPy float64 on the real rows only
    ref = _NumpyBatchNorm(c, 0.9, bn.eps, np.ones(c), np.zeros(c))
    expected = ref.train(xs)
    np.testing.assert_allclose(ys[:real], expected, rtol=1e-5, atol=1e-5)
    acc_mean, acc_var, count = _stats(bn, masked_state)
    np.testing.assert_allclose(acc_mean, ref.acc_mean, rtol=1e-5)
    np.testing.assert_allclose(acc_var, ref.acc_var, rtol=1e-5)
    assert count == 1
    # padded rows no longer shift the real rows: equal to the unpadded batch
    ys_real, real_state = _train_fn(bn)(xs, state)
    np.testing.assert_allclose(ys[:real], ys_real, rtol=1e-5, atol=1e-5)
    assert tree_allclose(masked_state, real_state, rtol=1e-6)
    # padded rows are still normalised, with the real rows' statistics
    mean = xs.mean(axis=(0, *range(2, xs.ndim)))
    var = jnp.var(jnp.moveaxis(xs, 1, 0).reshape(c, -1), axis=1)
    bcast = (1, c) + (1,) * len(spatial)
    np.testing.assert_allclose(
        ys[real:],
        (padding - mean.reshape(bcast)) / jnp.sqrt(var.reshape(bcast) + bn.eps),
        rtol=1e-4,
    )
    # all True equals no mask
    ys_all, all_state = _masked_train_fn(bn)(xs, jnp.ones(real, bool), state)
    np.testing.assert_allclose(ys_all, ys_real, rtol=1e-5, atol=1e-5)
    assert tree_allclose(all_state, real_state, rtol=1e-6)


def test_mask_with_fewer_than_two_real_elements_keeps_the_state():
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(2)
    xs = jr.normal(jr.key(2), (4, 2))
    for mask in ([False] * 4, [True, False, False, False]):
        ys, new_state = _masked_train_fn(bn)(xs, jnp.array(mask), state)
        assert bool(jnp.all(jnp.isfinite(ys)))
        assert tree_allclose(new_state, state, rtol=0, atol=0)
    # gradients through a masked batch are finite too
    grads = jax.grad(
        lambda xs: jnp.sum(_masked_train_fn(bn)(xs, jnp.zeros(4, bool), state)[0])
    )(xs)
    assert bool(jnp.all(jnp.isfinite(grads)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_floating_dtype_is_refused_naming_the_argument(dtype):
    with pytest.raises(
        ValueError, match=r"`BatchNorm\(dtype=...\)` must be a floating"
    ):
        eqx_rng.nn.BatchNorm(3, dtype=dtype)
