"""The second set of layers: `broadcast_dims`, `Dropout.mask` (locked dropout),
float32 sampling for float16/bfloat16, `mc_mode`, `LayerStack`, `BayesLinear` and
`kl_divergence`. Exact couplings first; statistics at pinned keys, 5 sigma."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import mean_tol, tree_allclose, var_tol

import eqx_rng

nn = eqx_rng.nn

# ---------------------------------------------------------------- broadcast_dims


def test_channel_dropout_mask_is_constant_per_channel():
    # torch.nn.Dropout2d semantics: one decision per (example, channel).
    p, n, c = 0.3, 1_000, 16
    layer = nn.Dropout(p, broadcast_dims=(1, 2))
    keys = eqx_rng.grid_keys(jr.key(0), (n,))
    ys = jax.vmap(lambda k: layer(jnp.ones((c, 4, 5)), key=k))(keys)
    assert bool(jnp.all(ys == ys[:, :, :1, :1]))  # constant over (H, W)
    kept = np.asarray(ys[:, :, 0, 0] != 0)
    q = 1 - p
    assert abs(kept.mean() - q) < 5 * math.sqrt(q * (1 - q) / (n * c))
    assert bool(jnp.all((ys == 0) | (ys == jnp.float32(1 / q))))
    # channels differ within an example (not one decision for everything)
    assert 0 < kept.sum(axis=1).min() or kept.sum(axis=1).max() < c


def test_sequence_dropout_shares_the_mask_over_time():
    layer = nn.Dropout(0.5, broadcast_dims=(0,))
    y = layer(jnp.ones((7, 64)), key=jr.key(1))
    assert bool(jnp.all(y == y[:1]))
    assert 0 < int(jnp.sum(y[0] == 0)) < 64


def test_broadcast_is_the_reduced_draw_broadcast():
    # Exact coupling: the draw is made on the reduced shape and broadcast.
    k, p = jr.key(2), 0.4
    y = nn.Dropout(p, broadcast_dims=(1, 2))(jnp.ones((3, 4, 5)), key=k)
    keep = jr.bernoulli(k, 1 - p, (3, 1, 1))
    assert jnp.array_equal(y != 0, jnp.broadcast_to(keep, (3, 4, 5)))
    eps = jr.normal(k, (3, 1, 1))
    y = nn.GaussianNoise(1.0, broadcast_dims=(1, 2))(jnp.zeros((3, 4, 5)), key=k)
    assert jnp.array_equal(y, jnp.broadcast_to(eps, (3, 4, 5)))
    y = nn.GaussianDropout(0.5, broadcast_dims=(-2, -1))(jnp.ones((3, 4, 5)), key=k)
    np.testing.assert_allclose(y, jnp.broadcast_to(1 + eps, (3, 4, 5)), rtol=1e-6)


@pytest.mark.parametrize(
    "make", [nn.Dropout, nn.GaussianDropout, nn.GaussianNoise], ids=lambda c: c.__name__
)
def test_negative_axes_equal_positive_axes(make):
    x, k = jr.normal(jr.key(3), (3, 4, 5)), jr.key(4)
    a = make(0.3, broadcast_dims=(1, 2))(x, key=k)
    b = make(0.3, broadcast_dims=(-2, -1))(x, key=k)
    assert jnp.array_equal(a, b)
    # broadcast_dims=() is bitwise the layer without it
    assert jnp.array_equal(make(0.3, broadcast_dims=())(x, key=k), make(0.3)(x, key=k))


@pytest.mark.parametrize(
    "make", [nn.Dropout, nn.GaussianDropout, nn.GaussianNoise], ids=lambda c: c.__name__
)
def test_broadcast_dims_errors(make):
    name = make.__name__
    with pytest.raises(ValueError, match=rf"`{name}\(broadcast_dims=\(3,\)\)`.*axis 3"):
        make(0.5, broadcast_dims=(3,))(jnp.ones((2, 3, 4)), key=jr.key(0))
    with pytest.raises(ValueError, match=r"axis -3, out of range .* shape \(2, 3\)"):
        make(0.5, broadcast_dims=(-3,))(jnp.ones((2, 3)), key=jr.key(0))
    with pytest.raises(ValueError, match="same axis twice"):
        make(0.5, broadcast_dims=(1, -1))(jnp.ones((2, 3)), key=jr.key(0))
    with pytest.raises(ValueError, match=r"names an axis twice.*\(1, 1\)"):
        make(0.5, broadcast_dims=(1, 1))
    with pytest.raises(TypeError, match="broadcast_dims"):
        make(0.5, broadcast_dims=(1.0,))  # type: ignore[arg-type]
    # inference needs no key and ignores the axes
    x = jnp.ones((2, 3))
    assert make(0.5, broadcast_dims=(5,))(x, inference=True) is x


# ---------------------------------------------------------------- Dropout.mask


def test_mask_is_what_dropout_multiplies_by():
    layer, k = nn.Dropout(0.3, broadcast_dims=(0,)), jr.key(5)
    x = jr.normal(jr.key(6), (6, 10))
    mask = layer.mask(x.shape, key=k, dtype=jnp.float32)
    assert mask.shape == x.shape and mask.dtype == jnp.float32
    np.testing.assert_allclose(x * mask, layer(x, key=k), rtol=1e-6)
    assert set(np.unique(mask).tolist()) <= {0.0, float(jnp.float32(1 / 0.7))}
    assert jnp.array_equal(layer.mask((3,), inference=True), jnp.ones(3))
    with pytest.raises(ValueError, match="`Dropout` needs `key=`"):
        layer.mask((3,))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_mask_at_p_one_is_zeros(dtype):
    mask = nn.Dropout(1.0).mask((100,), key=jr.key(0), dtype=dtype)
    assert mask.dtype == dtype and bool(jnp.all(mask == 0))
    traced = nn.Dropout(jnp.array(1.0)).mask((100,), key=jr.key(0), dtype=dtype)
    assert bool(jnp.all(traced == 0))


def _locked_rnn(layer, mask, hs0, xs):
    def step(h, x):
        h = jnp.tanh(x + h * mask)
        return h, h

    return jax.lax.scan(step, hs0, xs)[1]


def test_locked_dropout_passes_key_reuse_and_reusing_a_key_does_not():
    layer = nn.Dropout(0.5)
    xs = jr.normal(jr.key(7), (6, 16))
    with eqx_rng.debug.key_reuse():
        k = jr.key(8)
        mask = layer.mask((16,), key=k)
        hs = jax.jit(_locked_rnn, static_argnums=0)(layer, mask, jnp.ones(16), xs)
        assert hs.shape == (6, 16)
    # the same mask at every step: a dropped unit never sees its previous state
    dropped = np.asarray(mask == 0)
    assert 0 < dropped.sum() < 16
    np.testing.assert_allclose(
        np.asarray(hs)[:, dropped], np.tanh(np.asarray(xs)[:, dropped]), rtol=1e-6
    )

    # The naive version draws from one key at every step: the checker refuses it.
    def naive(h, x, key):
        def step(h, x):
            h = jnp.tanh(x + layer(h, key=key))
            return h, h

        return jax.lax.scan(step, h, x)

    with eqx_rng.debug.key_reuse(), pytest.raises(jax.errors.KeyReuseError):
        jax.jit(naive)(jnp.ones(16), xs, jr.key(9))


# ---------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_noise_is_drawn_in_float32_and_cast(dtype):
    # Exact coupling: the low-precision output is the float32 draw, rounded once.
    k = jr.key(10)
    y = nn.GaussianNoise(1.0)(jnp.zeros(1000, dtype), key=k)
    assert jnp.array_equal(y, jr.normal(k, (1000,), jnp.float32).astype(dtype))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_noise_is_unbiased(dtype):
    # bfloat16 draws had mean -0.0116 sigma (z = -48 over 2**24 samples); at
    # n = 1e6 the 5-sigma tolerance is 0.005.
    n = 1_000_000
    y = nn.GaussianNoise(1.0)(jnp.zeros(n, dtype), key=jr.key(11))
    assert abs(float(jnp.mean(y.astype(jnp.float32)))) < mean_tol(1.0, n)
    # GaussianDropout(0.5): multiplier N(1, 1), was mean 0.987 in bfloat16
    m = nn.GaussianDropout(0.5)(jnp.ones(n, dtype), key=jr.key(12))
    assert abs(float(jnp.mean(m.astype(jnp.float32))) - 1) < mean_tol(1.0, n)


def test_dropout_scale_never_overflows_in_float16():
    p = 0.99999  # 1 / (1 - p) = 1e5 > float16's largest finite value 65504
    # 10**6 one-unit examples: about 10 kept (no kept unit has probability 5e-5)
    keys = eqx_rng.grid_keys(jr.key(13), (1_000_000,))
    x = jnp.full(1, 0.25, jnp.float16)
    for layer in (nn.Dropout(p), nn.DropPath(p), nn.Dropout(jnp.array(p))):
        ys = jax.vmap(lambda k, layer=layer: layer(x, key=k))(keys)
        assert bool(jnp.all(jnp.isfinite(ys)))
        kept = np.unique(np.asarray(ys[ys != 0], np.float32))
        # 0.25 * 1e5 = 25000 is representable: formed in float32, rounded once (a
        # traced rate computes 1 - p in float32: 1e-3 relative)
        assert len(kept) == 1 and abs(kept[0] / 25_000 - 1) < 2e-3
    big = nn.Dropout(p)(jnp.ones(200_000, jnp.float16), key=jr.key(14))
    assert bool(jnp.all(jnp.isfinite(big)))
    assert set(np.unique(np.asarray(big, np.float32)).tolist()) <= {0.0, 65504.0}
    mask = nn.Dropout(p).mask((200_000,), key=jr.key(14), dtype=jnp.float16)
    assert bool(jnp.all(jnp.isfinite(mask)))


# ---------------------------------------------------------------- mc_mode


class _Attn(eqx.Module):
    attn: eqx.nn.MultiheadAttention

    def __call__(self, x, *, key=None):
        return self.attn(x, x, x, key=key)


def _mixed_model():
    keys = jr.split(jr.key(15), 4)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(4, 8, key=keys[0]),
            nn.BatchNorm(8),
            eqx.nn.BatchNorm(8, axis_name="batch", mode="ema"),
            nn.Dropout(0.5),
            eqx.nn.Dropout(0.5),
            nn.GaussianNoise(0.1),
            eqx.nn.Lambda(lambda x: x.reshape(2, 4)),
            _Attn(eqx.nn.MultiheadAttention(2, 4, dropout_p=0.5, key=keys[1])),
            eqx.nn.Lambda(jnp.ravel),
            nn.BayesLinear(8, 3, key=keys[2]),
        ]
    )


def test_mc_mode_switches_every_kind_of_layer():
    model, state = eqx.nn.make_with_state(_mixed_model)()
    for start in (model, eqx.nn.inference_mode(model)):
        mc = nn.mc_mode(start)
        layers = mc.layers
        assert layers[1].inference is True and layers[2].inference is True
        assert layers[3].inference is False and layers[4].inference is False
        assert layers[5].inference is False
        assert layers[7].attn.dropout.inference is False
        assert layers[9].inference is False
        # parameters untouched
        assert tree_allclose(
            eqx.filter(mc, eqx.is_array), eqx.filter(model, eqx.is_array), rtol=0
        )
    del state


def test_mc_predictive_samples_use_derived_keys_and_keep_the_state():
    k1, k2 = jr.split(jr.key(15))
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(4, 8, key=k1),
            nn.BatchNorm(8),
            nn.Dropout(0.5),
            eqx.nn.Linear(8, 3, key=k2),
        ]
    )
    xs = jr.normal(jr.key(16), (16, 4))
    train = eqx.filter_jit(eqx_rng.vmap(model, axis_name="batch"))
    _, state = train(xs, state, key=jr.key(17))  # some running statistics
    mc = nn.mc_mode(model)
    before = jax.tree.map(jnp.copy, state)

    def predict(x, *, key):
        return mc(x, state, key=key)

    x, key, t = xs[0], jr.key(18), 8
    sample = eqx_rng.vmap(predict, in_axes=None, axis_size=t, out_axes=(0, None))
    ys, states = eqx.filter_jit(sample)(x, key=key)
    assert ys.shape == (t, 3)
    assert len({np.asarray(y).tobytes() for y in ys}) == t  # every sample differs
    expected = mc(x, state, key=eqx_rng.derive(key, 5))[0]
    np.testing.assert_allclose(ys[5], expected, rtol=1e-5, atol=1e-6)
    assert tree_allclose(states, before, rtol=0, atol=0)  # never updated
    # inference_mode would switch the dropout off too: one deterministic output
    y_inf, _ = eqx.nn.inference_mode(model)(x, state)
    assert not bool(jnp.allclose(ys.mean(axis=0), y_inf, atol=1e-6))


# ---------------------------------------------------------------- LayerStack


def _block(*, key):
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(6, 6, key=key),
            eqx.nn.Lambda(jnp.tanh),
            nn.Dropout(0.3),
            nn.GaussianNoise(0.1),
        ]
    )


def test_layer_stack_equals_the_unrolled_loop():
    key, num = jr.key(19), 4
    stack = nn.LayerStack(_block, num, key=key)
    for l in range(num):  # layer l is built from derive(key, l)
        one = _block(key=eqx_rng.derive(key, l))
        assert jnp.array_equal(stack[l].layers[0].weight, one.layers[0].weight)
    x, call_key = jr.normal(jr.key(20), (6,)), jr.key(21)
    y = stack(x, key=call_key)
    h = x
    for l in range(num):
        h = stack[l](h, key=eqx_rng.derive(call_key, l))
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-6)
    # first layers do not depend on the depth
    deeper = nn.LayerStack(_block, num + 2, key=key)
    assert jnp.array_equal(deeper[1].layers[0].weight, stack[1].layers[0].weight)
    # inference mode reaches the stacked layers; no key needed
    inf = eqx.nn.inference_mode(stack)
    h = x
    for l in range(num):
        h = jnp.tanh(stack[l].layers[0](h))
    np.testing.assert_allclose(inf(x), h, rtol=1e-5, atol=1e-6)


def test_layer_stack_under_vmap_jit_and_grad():
    stack = nn.LayerStack(_block, 3, key=jr.key(22))
    xs, key = jr.normal(jr.key(23), (5, 6)), jr.key(24)
    ys = eqx.filter_jit(eqx_rng.vmap(stack))(xs, key=key)
    np.testing.assert_allclose(
        ys[2], stack(xs[2], key=eqx_rng.derive(key, 2)), rtol=1e-5, atol=1e-6
    )

    def loss(model):
        return jnp.sum(eqx_rng.vmap(model)(xs, key=key) ** 2)

    def unrolled_loss(model):
        def one(x, *, key):
            for l in range(3):
                x = model[l](x, key=eqx_rng.derive(key, l))
            return x

        return jnp.sum(eqx_rng.vmap(one)(xs, key=key) ** 2)

    g = eqx.filter_jit(eqx.filter_grad(loss))(stack)
    g_unrolled = eqx.filter_jit(eqx.filter_grad(unrolled_loss))(stack)
    assert tree_allclose(g, g_unrolled, rtol=1e-4, atol=1e-6)


def _bn_block(*, key):
    return eqx.nn.Sequential(
        [eqx.nn.Linear(5, 5, key=key), nn.BatchNorm(5, momentum=0.5), nn.DropPath(0.2)]
    )


def test_stateful_layer_stack_has_a_state_slice_per_layer():
    key, num = jr.key(25), 3
    stack, state = eqx.nn.make_with_state(nn.LayerStack)(_bn_block, num, key=key)
    assert stack.is_stateful()
    xs, call_key = 2 + jr.normal(jr.key(26), (8, 5)), jr.key(27)
    train = eqx.filter_jit(eqx_rng.vmap(stack, axis_name="batch"))
    ys, new_state = train(xs, state, key=call_key)
    # the unrolled loop: each layer its own module, its own state, derived keys
    hs = xs
    for l in range(num):
        layer, layer_state = eqx.nn.make_with_state(_bn_block)(
            key=eqx_rng.derive(key, l)
        )

        def one(x, s, *, key, layer=layer, l=l):
            return layer(x, s, key=eqx_rng.derive(key, l))

        hs, layer_state = eqx_rng.vmap(one, axis_name="batch")(
            hs, layer_state, key=call_key
        )
        bn = stack[l].layers[1]
        stacked = new_state.get(bn.state_index)
        mine = layer_state.get(layer.layers[1].state_index)
        for a, b in zip(stacked, mine, strict=True):
            np.testing.assert_allclose(a[l], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys, hs, rtol=1e-5, atol=1e-5)
    # composes with Sequential, which threads the state
    seq, seq_state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [nn.LayerStack(_bn_block, num, key=key), eqx.nn.Lambda(jnp.tanh)]
    )
    ys2, seq_state2 = eqx_rng.vmap(seq, axis_name="batch")(xs, seq_state, key=call_key)
    assert ys2.shape == xs.shape and bool(jnp.all(jnp.abs(ys2) <= 1))
    # layer 0 saw the same data (later layers differ: Sequential splits its key)
    for a, b in zip(
        jax.tree.leaves(seq_state2), jax.tree.leaves(new_state), strict=True
    ):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)


def test_layer_stack_errors():
    with pytest.raises(ValueError, match=r"LayerStack\(num_layers=\.\.\.\).*=0"):
        nn.LayerStack(_block, 0, key=jr.key(0))
    grow = nn.LayerStack(lambda *, key: eqx.nn.Linear(3, 4, key=key), 2, key=jr.key(0))
    with pytest.raises(ValueError, match=r"input's shape \(3,\).*shape \(4,\)"):
        grow(jnp.ones(3))
    stack, _ = eqx.nn.make_with_state(nn.LayerStack)(_bn_block, 2, key=jr.key(0))
    with pytest.raises(ValueError, match="got no state"):
        stack(jnp.ones(5), key=jr.key(1))
    with pytest.raises(ValueError, match="`Dropout` needs `key=`"):
        nn.LayerStack(_block, 2, key=jr.key(0))(jnp.ones(6))


# ---------------------------------------------------------------- BayesLinear


def _random_posterior(layer, key):
    k1, k2, k3, k4 = jr.split(key, 4)
    return eqx.tree_at(
        lambda m: (m.weight_mean, m.weight_rho, m.bias_mean, m.bias_rho),
        layer,
        (
            jr.normal(k1, layer.weight_mean.shape),
            -2 + jr.normal(k2, layer.weight_rho.shape),
            jr.normal(k3, layer.bias_mean.shape),
            -1 + jr.normal(k4, layer.bias_rho.shape),
        ),
    )


def test_kl_matches_the_closed_form():
    prior = 0.7
    layer = _random_posterior(
        nn.BayesLinear(5, 3, key=jr.key(0), prior_std=prior), jr.key(1)
    )
    expected = 0.0
    for mean, rho in [
        (layer.weight_mean, layer.weight_rho),
        (layer.bias_mean, layer.bias_rho),
    ]:
        mu = np.asarray(mean, np.float64)
        s = np.log1p(np.exp(np.asarray(rho, np.float64)))
        expected += np.sum(np.log(prior / s) + (s**2 + mu**2) / (2 * prior**2) - 0.5)
    np.testing.assert_allclose(float(nn.kl_divergence(layer)), expected, rtol=1e-5)
    two = eqx.nn.Sequential([layer, eqx.nn.Lambda(jnp.tanh), layer])
    np.testing.assert_allclose(float(nn.kl_divergence(two)), 2 * expected, rtol=1e-5)
    # the KL is zero exactly when the posterior is the prior
    at_prior = eqx.tree_at(
        lambda m: (m.weight_mean, m.weight_rho, m.bias_mean, m.bias_rho),
        layer,
        (
            jnp.zeros((3, 5)),
            jnp.full((3, 5), math.log(math.expm1(prior))),
            jnp.zeros(3),
            jnp.full(3, math.log(math.expm1(prior))),
        ),
    )
    assert abs(float(nn.kl_divergence(at_prior))) < 1e-5


@pytest.mark.parametrize("flipout", [False, True])
def test_perturbation_variance_matches_the_posterior(flipout):
    # Var of output unit i over weight draws: sum_j s_ij^2 x_j^2 + s_b,i^2, the same
    # for Flipout as for the reparameterised layer.
    n = 20_000
    layer = nn.BayesLinear(4, 3, key=jr.key(2), flipout=flipout)
    layer = _random_posterior(layer, jr.key(3))
    x = jnp.array([1.0, -0.5, 2.0, 0.25])
    keys = eqx_rng.grid_keys(jr.key(4), (n,))
    pert = jax.vmap(lambda k: layer(x, key=k))(keys) - layer(x, inference=True)[None]
    s_w = np.log1p(np.exp(np.asarray(layer.weight_rho, np.float64)))
    s_b = np.log1p(np.exp(np.asarray(layer.bias_rho, np.float64)))
    var = (s_w**2) @ np.asarray(x, np.float64) ** 2 + s_b**2
    for i in range(3):
        assert abs(float(jnp.mean(pert[:, i]))) < mean_tol(math.sqrt(var[i]), n)
        assert abs(float(jnp.var(pert[:, i])) - var[i]) < var_tol(var[i], n)


def test_flipout_decorrelates_examples_sharing_one_weight_draw():
    n = 20_000
    x = jnp.array([1.0, -0.5, 2.0, 0.25])
    reparam = _random_posterior(nn.BayesLinear(4, 3, key=jr.key(5)), jr.key(6))
    flip = _random_posterior(
        nn.BayesLinear(4, 3, key=jr.key(5), flipout=True), jr.key(6)
    )
    assert jnp.array_equal(flip.weight_rho, reparam.weight_rho)
    w_keys = eqx_rng.grid_keys(jr.key(7), (n,))
    a_keys, b_keys = eqx_rng.grid_keys(jr.key(8), (2, n))
    mean = reparam(x, inference=True)

    def pair(layer):
        f = lambda wk, ka, kb: (
            layer(x, key=ka, weight_key=wk) - mean,
            layer(x, key=kb, weight_key=wk) - mean,
        )
        return jax.vmap(f)(w_keys, a_keys, b_keys)

    ra, rb = pair(reparam)
    assert jnp.array_equal(ra, rb)  # one shared weight sample: identical outputs
    fa, fb = pair(flip)
    var = jnp.var(fa, axis=0)
    corr = jnp.mean(fa * fb, axis=0)
    # independent sign flips: E[a b] = 0, the product's std is var
    assert bool(jnp.all(jnp.abs(corr) < 5 * var / math.sqrt(n)))
    np.testing.assert_allclose(var, jnp.var(ra, axis=0), rtol=10 * math.sqrt(2 / n))


def test_bayes_linear_modes_and_errors():
    layer = nn.BayesLinear(3, 2, key=jr.key(9))
    x = jnp.ones(3)
    assert layer.bias_mean is not None
    np.testing.assert_allclose(
        eqx.nn.inference_mode(layer)(x), layer.weight_mean @ x + layer.bias_mean
    )
    with pytest.raises(ValueError, match="`BayesLinear` needs `key=`"):
        layer(x)
    g = eqx.filter_grad(lambda m: jnp.sum(m(x, key=jr.key(1))) + nn.kl_divergence(m))(
        layer
    )
    assert bool(jnp.all(jnp.isfinite(g.weight_rho))) and bool(
        jnp.any(g.weight_rho != 0)
    )
    no_bias = nn.BayesLinear(3, 2, key=jr.key(9), use_bias=False)
    assert no_bias.bias_mean is None and no_bias(x, key=jr.key(1)).shape == (2,)
    for kwargs, match in [
        ({"in_features": 0}, r"BayesLinear\(in_features=\.\.\.\).*in_features=0"),
        ({"prior_std": 0.0}, r"prior_std=0\.0"),
        ({"init_std": -1.0}, r"init_std=-1\.0"),
    ]:
        args = {"in_features": 3, "out_features": 2, **kwargs}
        with pytest.raises(ValueError, match=match):
            nn.BayesLinear(**args, key=jr.key(0))


# ---------------------------------------------------------------- composition


def test_new_layers_train_as_chains_and_checkpoint(tmp_path):
    import optax

    def make(*, key):
        k1, k2 = jr.split(key)
        return eqx.nn.Sequential(
            [
                eqx.nn.Linear(4, 5, key=k1),
                nn.LayerStack(_bn_block, 2, key=k2),
                nn.Dropout(0.2, broadcast_dims=(0,)),
                nn.BayesLinear(5, 3, key=k2, flipout=True),
            ]
        )

    optimizer = optax.adam(1e-2)

    def loss_fn(model, state, batch, *, key):
        xs, ys = batch
        out, state = eqx_rng.vmap(model, axis_name="batch")(xs, state, key=key)
        nll = optax.softmax_cross_entropy_with_integer_labels(out, ys).mean()
        loss = nll + nn.kl_divergence(model) / 100
        return loss, (state, {})

    step = eqx_rng.make_train_step(loss_fn, optimizer)
    models, states = eqx_rng.ensemble(eqx.nn.make_with_state(make), jr.key(0), 2)
    ts = eqx_rng.vmap(
        lambda m, s, k: eqx_rng.TrainState.create(m, optimizer, key=k, state=s)
    )(models, states, eqx_rng.grid_keys(jr.key(1), (2,)))
    batch = (jr.normal(jr.key(2), (8, 4)), jnp.arange(8) % 3)
    run = eqx.filter_jit(eqx_rng.vmap(step, in_axes=(eqx.if_array(0), None)))
    ts, metrics = run(ts, batch)
    ts, metrics = run(ts, batch)
    assert bool(jnp.all(jnp.isfinite(metrics["loss"])))
    assert not jnp.array_equal(
        ts.model.layers[3].weight_rho[0], ts.model.layers[3].weight_rho[1]
    )
    path = tmp_path / "ts.eqx"
    eqx_rng.save(path, ts)
    back = eqx_rng.load(path, ts)
    assert tree_allclose(
        eqx.filter(back, eqx.is_inexact_array),
        eqx.filter(ts, eqx.is_inexact_array),
        rtol=0,
        atol=0,
    )


def test_layers_declare_their_rates_non_trainable():
    assert nn.Dropout.non_trainable_fields == ("p",)
    assert nn.GaussianDropout.non_trainable_fields == ("p",)
    assert nn.DropPath.non_trainable_fields == ("p",)
    assert nn.GaussianNoise.non_trainable_fields == ("std",)
    for cls in (nn.Dropout, nn.GaussianDropout, nn.DropPath, nn.GaussianNoise):
        for name in cls.non_trainable_fields:
            assert name in cls.__dataclass_fields__


def test_first_version_subclass_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match="implement `sample"):

        class OldStyle(nn.AbstractStochasticLayer):
            inference: bool = False

            def __call__(self, x, *, key=None, inference=None):
                if not self._training(key, inference):
                    return x
                return -x

    layer = OldStyle()  # pyright: ignore[reportAbstractUsage]
    x = jnp.ones(3)
    assert jnp.array_equal(layer(x, key=jr.key(0)), -x)
    assert layer(x, inference=True) is x
    assert jnp.array_equal(
        nn.mc_mode(eqx.nn.inference_mode(layer))(x, key=jr.key(0)), -x
    )
