"""The stochastic layers of `eqx_rng.nn`: exact couplings first, then statistics at
pinned keys with 5-sigma tolerances derived from the sample size."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import mean_tol, var_tol

import eqx_rng

N = 200_000

# ---------------------------------------------------------------- exact couplings


def test_dropout_mask_is_bernoulli_keep_draw():
    k = jr.key(0)
    y = eqx_rng.nn.Dropout(0.3)(jnp.ones((50, 4)), key=k)
    assert jnp.array_equal(y != 0, jr.bernoulli(k, 0.7, (50, 4)))


def test_gaussian_noise_scales_with_std():
    x, k = jnp.zeros((1000,)), jr.key(1)
    y1 = eqx_rng.nn.GaussianNoise(1.0)(0 * x, key=k)
    y2 = eqx_rng.nn.GaussianNoise(2.0)(0 * x, key=k)
    assert jnp.array_equal(y2, 2 * y1)
    assert jnp.array_equal(y1, jr.normal(k, x.shape))


def test_gaussian_noise_is_additive():
    k = jr.key(2)
    x = jr.normal(jr.key(3), (1000,))
    noise = eqx_rng.nn.GaussianNoise(0.5)
    np.testing.assert_allclose(noise(x, key=k) - x, noise(0 * x, key=k), atol=1e-6)


def test_gaussian_dropout_is_gaussian_noise_times_x():
    p, k = 0.3, jr.key(4)
    x = jr.normal(jr.key(5), (1000,))
    y = eqx_rng.nn.GaussianDropout(p)(x, key=k)
    eps = eqx_rng.nn.GaussianNoise(1.0)(0 * x, key=k)
    # Rounding of `1 + s * eps` (one float32 ulp of 1, where it nearly cancels) times
    # |x|, twice over: an absolute tolerance, not a relative one.
    atol = 2 * float(np.finfo(np.float32).eps) * float(jnp.max(jnp.abs(x)))
    np.testing.assert_allclose(
        y, x * (1 + math.sqrt(p / (1 - p)) * eps), rtol=1e-6, atol=atol
    )


def test_array_rate_equals_float_rate():
    x, k = jr.normal(jr.key(6), (100,)), jr.key(7)
    for cls in (eqx_rng.nn.Dropout, eqx_rng.nn.GaussianDropout, eqx_rng.nn.DropPath):
        a = cls(0.3)(x, key=k)
        b = cls(jnp.array(0.3))(x, key=k)
        assert jnp.array_equal(a == 0, b == 0)
        np.testing.assert_allclose(a, b, rtol=1e-6)
    a = eqx_rng.nn.GaussianNoise(0.3)(x, key=k)
    b = eqx_rng.nn.GaussianNoise(jnp.array(0.3))(x, key=k)
    np.testing.assert_allclose(a, b, rtol=1e-6)


# ---------------------------------------------------------------- statistics


def test_dropout_keep_rate():
    p = 0.3
    y = eqx_rng.nn.Dropout(p)(jnp.ones(N), key=jr.key(0))
    q = 1 - p
    assert abs(float(jnp.mean(y != 0)) - q) < 5 * math.sqrt(q * (1 - q) / N)
    assert jnp.allclose(y[y != 0], 1 / q)


def test_gaussian_noise_moments():
    std = 0.7
    x = jr.uniform(jr.key(1), (N,))
    d = eqx_rng.nn.GaussianNoise(std)(x, key=jr.key(2)) - x
    assert abs(float(jnp.mean(d))) < mean_tol(std, N)
    assert abs(float(jnp.var(d)) - std**2) < var_tol(std**2, N)


def test_gaussian_dropout_multiplier_moments():
    p = 0.3
    m = eqx_rng.nn.GaussianDropout(p)(jnp.ones(N), key=jr.key(3))
    var = p / (1 - p)
    assert abs(float(jnp.mean(m)) - 1) < mean_tol(math.sqrt(var), N)
    assert abs(float(jnp.var(m)) - var) < var_tol(var, N)


def test_drop_path_drops_whole_examples_at_rate_p():
    p, n = 0.25, 20_000
    layer = eqx_rng.nn.DropPath(p)
    keys = eqx_rng.grid_keys(jr.key(4), (n,))
    ys = jax.vmap(lambda k: layer(jnp.ones(8), key=k))(keys)
    dropped = jnp.all(ys == 0, axis=1)
    kept = jnp.all(ys == jnp.float32(1 / (1 - p)), axis=1)
    assert bool(jnp.all(dropped | kept))  # one decision per example
    assert abs(float(jnp.mean(dropped)) - p) < 5 * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- edge rates


@pytest.mark.parametrize("cls", [eqx_rng.nn.Dropout, eqx_rng.nn.DropPath])
@pytest.mark.parametrize("as_array", [False, True])
def test_p_one_gives_zeros_and_finite_gradients(cls, as_array):
    layer = cls(jnp.array(1.0) if as_array else 1.0)
    x, k = jr.normal(jr.key(0), (5, 3)), jr.key(1)
    y = layer(x, key=k)
    assert jnp.array_equal(y, jnp.zeros_like(x))
    g = jax.grad(lambda x: jnp.sum(layer(x, key=k) ** 2 + layer(x, key=k)))(x)
    assert jnp.array_equal(g, jnp.zeros_like(x))
    gj = eqx.filter_jit(eqx.filter_grad(lambda x: jnp.sum(layer(x, key=k))))(x)
    assert bool(jnp.all(jnp.isfinite(gj)))
    if as_array:  # the gradient with respect to a traced rate is finite too
        gp = jax.grad(lambda p: jnp.sum(cls(p)(x, key=k)))(jnp.array(1.0))
        assert bool(jnp.isfinite(gp))


@pytest.mark.parametrize(
    "layer",
    [
        eqx_rng.nn.Dropout(0.0),
        eqx_rng.nn.GaussianNoise(0.0),
        eqx_rng.nn.GaussianDropout(0.0),
        eqx_rng.nn.DropPath(0.0),
    ],
    ids=type,
)
def test_rate_zero_is_identity_but_still_needs_a_key(layer):
    x = jr.normal(jr.key(0), (4,))
    assert jnp.array_equal(layer(x, key=jr.key(1)), x)
    with pytest.raises(ValueError, match="needs `key=`"):
        layer(x)


def test_gradients_flow_through_kept_units():
    p, k = 0.4, jr.key(2)
    x = jr.normal(jr.key(3), (200,))
    layer = eqx_rng.nn.Dropout(p)
    g = jax.grad(lambda x: jnp.sum(layer(x, key=k)))(x)
    keep = jr.bernoulli(k, 1 - p, x.shape)
    np.testing.assert_allclose(g, jnp.where(keep, 1 / (1 - p), 0.0), rtol=1e-6)


def test_gaussian_noise_std_is_differentiable():
    x, k = jnp.zeros(100), jr.key(4)
    g = jax.grad(lambda s: jnp.sum(eqx_rng.nn.GaussianNoise(s)(x, key=k)))(
        jnp.array(0.5)
    )
    np.testing.assert_allclose(g, jnp.sum(jr.normal(k, (100,))), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dropout_keeps_dtype_and_scale(dtype):
    p = 0.3
    y = eqx_rng.nn.Dropout(p)(jnp.ones(1000, dtype), key=jr.key(0))
    assert y.dtype == dtype
    kept = np.unique(np.asarray(y[y != 0].astype(jnp.float32)))
    assert kept.tolist() == [float(jnp.asarray(1 / (1 - p), dtype))]


# ---------------------------------------------------------------- ensembles of rates


def test_vmapped_ensemble_of_rates():
    rates = jnp.array([0.1, 0.5, 0.9])
    layers = eqx.filter_vmap(lambda p: eqx_rng.nn.Dropout(p))(rates)
    assert isinstance(layers.p, jax.Array) and layers.p.shape == (3,)
    n = 50_000
    keys = eqx_rng.grid_keys(jr.key(0), (3,))
    ys = eqx.filter_vmap(lambda m, k: m(jnp.ones(n), key=k))(layers, keys)
    for i, p in enumerate(rates.tolist()):
        q = 1 - p
        assert abs(float(jnp.mean(ys[i] != 0)) - q) < 5 * math.sqrt(q * (1 - q) / n)


def test_float_rate_is_static_array_rate_is_traced():
    traces = []

    @eqx.filter_jit
    def apply(layer, x, key):
        traces.append(1)
        return layer(x, key=key)

    x, k = jnp.ones(4), jr.key(0)
    apply(eqx_rng.nn.Dropout(jnp.array(0.1)), x, k)
    apply(eqx_rng.nn.Dropout(jnp.array(0.2)), x, k)
    assert len(traces) == 1  # a JAX-scalar rate is traced: no recompilation
    apply(eqx_rng.nn.Dropout(0.1), x, k)
    apply(eqx_rng.nn.Dropout(0.2), x, k)
    assert len(traces) == 3  # a Python float is static: one trace per value


# ---------------------------------------------------------------- errors and types


def test_missing_key_under_jit_raises_at_trace_time():
    layer = eqx_rng.nn.GaussianNoise(1.0)
    with pytest.raises(ValueError, match="`GaussianNoise` needs `key=`"):
        eqx.filter_jit(lambda m, x: m(x))(layer, jnp.ones(3))


def test_integer_input_is_a_type_error():
    if not eqx_rng.typecheck_enabled():
        pytest.skip("typecheck is off")
    with pytest.raises(TypeError):
        eqx_rng.nn.Dropout(0.5)(jnp.ones(3, jnp.int32), key=jr.key(0))


def test_rate_error_names_argument_and_value():
    with pytest.raises(
        ValueError, match=r"`Dropout\(p=\.\.\.\)` .*\[0\.0, 1\.0\].*p=1\.5"
    ):
        eqx_rng.nn.Dropout(p=1.5)
    with pytest.raises(ValueError, match=r"\[0\.0, 1\.0\).*p=1\.0"):
        eqx_rng.nn.GaussianDropout(p=1.0)
    with pytest.raises(ValueError, match=r"std.*>= 0\.0.*std=-1\.0"):
        eqx_rng.nn.GaussianNoise(std=-1.0)


def test_numpy_scalars_become_floats():
    assert eqx_rng.nn.Dropout(np.float32(0.25)).p == 0.25
    assert isinstance(eqx_rng.nn.DropPath(np.int64(0)).p, float)


def test_abstract_stochastic_layer():
    for cls in (
        eqx_rng.nn.Dropout,
        eqx_rng.nn.GaussianNoise,
        eqx_rng.nn.GaussianDropout,
        eqx_rng.nn.DropPath,
    ):
        assert issubclass(cls, eqx_rng.nn.AbstractStochasticLayer)
    assert not issubclass(eqx_rng.nn.BatchNorm, eqx_rng.nn.AbstractStochasticLayer)
    assert issubclass(eqx_rng.nn.BatchNorm, eqx.nn.StatefulLayer)
    with pytest.raises(TypeError):
        eqx_rng.nn.AbstractStochasticLayer()  # type: ignore[abstract]
