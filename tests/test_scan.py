"""Tests for `eqx_rng.scan`."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import pytest

import eqx_rng


def _noisy(h, x, *, key):
    h = 0.5 * h + x + jr.normal(key, h.shape)
    return h, h


def _by_hand(h, xs, key, order):
    ys = [None] * xs.shape[0]
    for t in order:
        h, ys[t] = _noisy(h, xs[t], key=eqx_rng.derive(key, t))
    return h, jnp.stack(ys)


@pytest.mark.parametrize("reverse", [False, True])
def test_step_t_gets_derive_key_t(reverse):
    key, xs, h0 = jr.key(0), jr.normal(jr.key(1), (6, 3)), jnp.zeros(3)
    h, ys = eqx_rng.scan(_noisy, reverse=reverse)(h0, xs, key=key)
    order = range(5, -1, -1) if reverse else range(6)
    h_ref, ys_ref = _by_hand(h0, xs, key, order)
    assert jnp.allclose(h, h_ref, atol=1e-6) and jnp.allclose(ys, ys_ref, atol=1e-6)


def test_key_of_a_step_does_not_depend_on_the_number_of_steps():
    key, xs, h0 = jr.key(2), jnp.zeros((8, 2)), jnp.zeros(2)
    # h = 0.5 h + noise; with h0 = 0 the first 3 steps are the same in both runs.
    _, ys8 = eqx_rng.scan(_noisy)(h0, xs, key=key)
    _, ys3 = eqx_rng.scan(_noisy)(h0, xs[:3], key=key)
    assert jnp.array_equal(ys8[:3], ys3)


def test_without_key_and_with_key_none():
    def plain(c, x):
        return c + x, 2 * x

    c, ys = eqx_rng.scan(plain)(jnp.float32(0), jnp.arange(4.0))
    assert float(c) == 6.0 and jnp.array_equal(ys, 2 * jnp.arange(4.0))

    seen = []

    def takes_key(c, x, *, key):
        seen.append(key)
        return c, x

    eqx_rng.scan(takes_key)(jnp.float32(0), jnp.arange(2.0), key=None)
    assert seen == [None]


def test_length_without_xs():
    def step(c, _, *, key):
        return c, jr.uniform(key)

    _, ys = eqx_rng.scan(step, length=4)(jnp.float32(0), None, key=jr.key(3))
    expected = jnp.stack([jr.uniform(eqx_rng.derive(jr.key(3), t)) for t in range(4)])
    assert jnp.array_equal(ys, expected)


def test_vmap_over_chains_gives_grid_keys():
    C, T = 3, 4

    def step(c, _, *, key):
        return c, jr.key_data(key)

    scanned = eqx_rng.scan(step, length=T)
    chains = eqx_rng.vmap(scanned, in_axes=(None, None), axis_size=C)
    _, data = chains(jnp.float32(0), None, key=jr.key(4))
    grid = jr.key_data(eqx_rng.grid_keys(jr.key(4), (C, T)))
    assert data.shape == grid.shape and jnp.array_equal(data, grid)


def test_jit_grad_and_checkpoint_agree():
    key, xs = jr.key(5), jr.normal(jr.key(6), (5, 3))

    def loss(w, step):
        h, _ = eqx_rng.scan(step)(w, xs, key=key)
        return jnp.sum(h**2)

    eager = jax.grad(loss)(jnp.ones(3), _noisy)
    jitted = jax.jit(jax.grad(loss), static_argnums=1)(jnp.ones(3), _noisy)
    remat = jax.grad(loss)(jnp.ones(3), jax.checkpoint(_noisy))
    # Reference: d h_T / d h_0 = 0.5**5 for this linear recursion.
    h, _ = eqx_rng.scan(_noisy)(jnp.ones(3), xs, key=key)
    assert jnp.allclose(eager, 2 * h * 0.5**5, rtol=1e-5)
    assert jnp.allclose(jitted, eager, rtol=1e-6) and jnp.allclose(remat, eager)


def test_model_carry_with_static_leaves():
    # An Equinox module holds a function (static); arrays are carried.
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jr.key(7))

    def step(m, x, *, key):
        m = eqx.tree_at(lambda m: m.layers[0].bias, m, m.layers[0].bias + x[0])
        return m, m(x + jr.normal(key, x.shape))

    m, ys = eqx_rng.scan(step)(mlp, jnp.ones((3, 2)), key=jr.key(8))
    bias0 = mlp.layers[0].bias
    assert bias0 is not None
    assert jnp.allclose(m.layers[0].bias, bias0 + 3)
    assert ys.shape == (3, 2)


def test_matches_lax_scan_with_a_hand_written_key():
    key, xs = jr.key(9), jr.normal(jr.key(10), (4, 2))

    def body(h, t_x):
        t, x = t_x
        return _noisy(h, x, key=eqx_rng.derive(key, t))

    ref = lax.scan(body, jnp.zeros(2), (jnp.arange(4), xs), unroll=2)
    out = eqx_rng.scan(_noisy, unroll=2)(jnp.zeros(2), xs, key=key)
    assert jnp.array_equal(out[0], ref[0]) and jnp.array_equal(out[1], ref[1])


def test_bad_keys():
    scanned = eqx_rng.scan(_noisy)
    xs = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="as_key"):
        scanned(jnp.zeros(3), xs, key=jr.PRNGKey(0))
    with pytest.raises(TypeError, match="shape \\(2,\\)"):
        scanned(jnp.zeros(3), xs, key=jr.split(jr.key(0)))
    with pytest.raises(TypeError, match="typed key"):
        scanned(jnp.zeros(3), xs, key=0)

    def no_key(c, x):
        return c, x

    with pytest.raises(TypeError, match="takes no keyword `key`"):
        eqx_rng.scan(no_key)(jnp.zeros(3), xs, key=jr.key(0))


def test_bad_lengths_and_xs():
    xs = {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match="disagree"):
        eqx_rng.scan(_noisy)(jnp.zeros(3), xs, key=jr.key(0))
    with pytest.raises(ValueError, match="length"):
        eqx_rng.scan(_noisy, length=5)(jnp.zeros(3), jnp.ones((2, 3)), key=jr.key(0))
    with pytest.raises(ValueError, match="length=T"):
        eqx_rng.scan(_noisy)(jnp.zeros(3), None, key=jr.key(0))
    with pytest.raises(ValueError, match="scalar"):
        eqx_rng.scan(_noisy)(jnp.zeros(3), jnp.float32(1), key=jr.key(0))
    with pytest.raises(ValueError, match="length"):
        eqx_rng.scan(_noisy, length=-1)
    with pytest.raises(ValueError, match="unroll"):
        eqx_rng.scan(_noisy, unroll=0)


def test_step_must_keep_the_carry_structure():
    def grows(c, x, *, key):
        return (c, c), x

    with pytest.raises(ValueError, match="structure"):
        eqx_rng.scan(grows)(jnp.zeros(3), jnp.ones((2, 3)), key=jr.key(0))
