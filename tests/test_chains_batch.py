"""chains × batch: nested `eqx_rng.vmap` over chains and batch, per-chain BatchNorm.

The recipe of the documentation page docs/chains-batch.md is run as is; the tests below
check its promises one by one.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from helpers import REPO

import eqx_rng

nn = pytest.importorskip("eqx_rng.nn")

C, B, D_IN, WIDTH, D_OUT = 4, 32, 8, 16, 2


def make_net(*, key, axis_name: str | tuple[str, ...] = "batch", p=0.2, std=0.1):
    key1, key2 = jr.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(D_IN, WIDTH, key=key1),
            nn.BatchNorm(WIDTH, axis_name=axis_name),
            eqx.nn.Lambda(jax.nn.relu),
            nn.Dropout(p),
            nn.GaussianNoise(std),
            eqx.nn.Linear(WIDTH, D_OUT, key=key2),
        ]
    )


def one_chain(model, state, xs, *, key):
    return eqx_rng.vmap(model, axis_name="batch")(xs, state, key=key)


@eqx.filter_jit
def forward(models, states, xs, key):
    return eqx_rng.vmap(one_chain, in_axes=(0, 0, None))(models, states, xs, key=key)


@eqx.filter_jit
def forward_per_chain_data(models, states, xs, key):
    return eqx_rng.vmap(one_chain)(models, states, xs, key=key)


def _chain(tree, c):
    return jax.tree_util.tree_map(lambda a: a[c] if eqx.is_array(a) else a, tree)


def _allclose(a, b, tol=1e-6):
    return bool(eqx.tree_equal(a, b, rtol=tol, atol=tol))


def _bitwise(a, b):
    return bool(eqx.tree_equal(a, b))


def _setup(n_chains=C, batch=B, seed=0):
    key = jr.key(seed)
    init_key, data_key, step_key = (
        eqx_rng.derive(key, name) for name in ("init", "data", "step")
    )
    models, states = eqx_rng.ensemble(
        eqx.nn.make_with_state(make_net), init_key, n_chains
    )
    xs = jr.normal(data_key, (batch, D_IN))
    return models, states, xs, step_key


def test_docs_recipe_runs():
    # The recipe moved from README.md to the documentation page chains-batch.md.
    text = (REPO / "docs" / "chains-batch.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert block is not None
    exec(compile(block.group(1), "<docs/chains-batch.md>", "exec"), {})


def test_equals_each_chain_alone():
    models, states, xs, key = _setup()
    ys, new_states = forward(models, states, xs, key)
    assert ys.shape == (C, B, D_OUT)
    for c in range(C):
        y_c, s_c = one_chain(
            _chain(models, c), _chain(states, c), xs, key=eqx_rng.derive(key, c)
        )
        assert _allclose(ys[c], y_c)
        assert _allclose(_chain(new_states, c), s_c)


def test_per_chain_state_and_statistics():
    models, states, xs, key = _setup()
    _, new_states = forward(models, states, xs, key)
    leaves = jax.tree_util.tree_leaves(new_states)
    assert leaves and all(leaf.shape[0] == C for leaf in leaves)
    # Different chains (different first layers) see different batch statistics.
    means = [leaf for leaf in leaves if leaf.ndim == 2]
    assert not jnp.allclose(means[0][0], means[0][1])


def test_all_dropout_masks_distinct():
    dropout = nn.Dropout(0.5)
    masks = eqx_rng.vmap(eqx_rng.vmap(lambda x, *, key: dropout(x, key=key)))(
        jnp.ones((C, B, 64)), key=jr.key(0)
    )
    rows = {tuple((masks[c, b] > 0).tolist()) for c in range(C) for b in range(B)}
    assert len(rows) == C * B


def test_example_keys_are_the_grid():
    key = jr.key(3)
    seen = eqx_rng.vmap(
        lambda x, *, key: eqx_rng.vmap(lambda y, *, key: jr.key_data(key))(x, key=key)
    )(jnp.zeros((C, B)), key=key)
    assert jnp.array_equal(seen, jr.key_data(eqx_rng.grid_keys(key, (C, B))))


def test_chain_results_unchanged_when_chains_grow():
    models4, states4, xs, key = _setup(n_chains=4)
    models6, states6, _, _ = _setup(n_chains=6)
    first4 = jax.tree_util.tree_map(lambda a: a[:4] if eqx.is_array(a) else a, models6)
    assert _bitwise(models4, first4)
    ys4, s4 = forward(models4, states4, xs, key)
    ys6, s6 = forward(models6, states6, xs, key)
    assert _allclose(ys4, ys6[:4])
    assert _allclose(s4, jax.tree_util.tree_map(lambda a: a[:4], s6))


def test_example_draws_unchanged_when_batch_grows():
    # BatchNorm statistics change with the batch; the example's draws must not.
    probe = nn.Dropout(0.5)

    def masks(batch):
        return eqx_rng.vmap(eqx_rng.vmap(lambda x, *, key: probe(x, key=key)))(
            jnp.ones((C, batch, 32)), key=jr.key(1)
        )

    assert jnp.array_equal(masks(32), masks(48)[:, :32])
    # The whole network without BatchNorm: example b's output is unchanged.
    models, _, xs, key = _setup()
    no_bn = jax.tree_util.tree_map(lambda a: a, models)
    no_bn = eqx.tree_at(lambda m: m.layers[1], no_bn, eqx.nn.Identity())

    def run(xs):
        return eqx_rng.vmap(
            lambda m, xs, *, key: eqx_rng.vmap(lambda x, *, key: m(x, key=key))(
                xs, key=key
            ),
            in_axes=(0, None),
        )(no_bn, xs, key=key)

    big = jnp.concatenate([xs, jr.normal(jr.key(9), (16, D_IN))])
    assert _allclose(run(xs), run(big)[:, :B])


def test_batch_norm_never_pools_across_chains():
    models, states, _, key = _setup()
    xs = jr.normal(jr.key(5), (C, B, D_IN))
    ys, s = forward_per_chain_data(models, states, xs, key)
    xs2 = xs.at[0].multiply(10.0).at[0].add(3.0)
    ys2, s2 = forward_per_chain_data(models, states, xs2, key)
    assert not jnp.allclose(ys[0], ys2[0])
    assert _bitwise(ys[1:], ys2[1:])
    assert _bitwise(_chain(s, 1), _chain(s2, 1))


def test_naming_both_axes_pools_across_chains():
    key = jr.key(0)
    make = eqx.nn.make_with_state(
        lambda *, key: make_net(key=key, axis_name=("chains", "batch"))
    )
    models, states = eqx_rng.ensemble(make, key, C)
    state = _chain(states, 0)  # one shared State (initial states are identical)
    xs = jr.normal(jr.key(5), (C, B, D_IN))

    @eqx.filter_jit
    def pooled(models, state, xs, key):
        return eqx_rng.vmap(one_chain, in_axes=(0, None, 0), axis_name="chains")(
            models, state, xs, key=key
        )

    ys, new_state = pooled(models, state, xs, key)
    assert all(leaf.shape[:1] != (C,) for leaf in jax.tree_util.tree_leaves(new_state))
    xs2 = xs.at[0].multiply(10.0).at[0].add(3.0)
    ys2, _ = pooled(models, state, xs2, key)
    assert not jnp.allclose(ys[1], ys2[1])  # chain 0's data moved chain 1's output
    # The running mean is the mean over all C * B pre-BatchNorm activations.
    hidden = eqx.filter_vmap(lambda m, x: jax.vmap(m.layers[0])(x))(models, xs)
    acc_mean = jax.tree_util.tree_leaves(new_state)[0]
    momentum = models.layers[1].momentum
    assert jnp.allclose(acc_mean, (1 - momentum) * hidden.mean((0, 1)), atol=1e-5)


def test_inference_mode_needs_no_key():
    models, states, xs, _ = _setup()
    frozen = eqx.nn.inference_mode(models)

    @eqx.filter_jit
    def predict(models, states, xs):
        return eqx_rng.vmap(
            lambda m, s, xs: eqx_rng.vmap(m, axis_name="batch")(xs, s),
            in_axes=(0, 0, None),
        )(models, states, xs)

    ys, same = predict(frozen, states, xs)
    assert ys.shape == (C, B, D_OUT)
    assert _bitwise(same, states)


def test_gradients_per_chain():
    models, states, xs, key = _setup()
    targets = jnp.zeros((B, D_OUT))

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(models):
        ys, _ = forward(models, states, xs, key)
        return jnp.sum((ys - targets[None]) ** 2)

    g = grads(models)
    for c in (0, C - 1):

        @eqx.filter_grad
        def grad_c(model, c=c):
            y, _ = one_chain(model, _chain(states, c), xs, key=eqx_rng.derive(key, c))
            return jnp.sum((y - targets) ** 2)

        assert _allclose(_chain(g, c), grad_c(_chain(models, c)), tol=1e-5)
