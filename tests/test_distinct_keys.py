"""`debug.check_distinct_keys` / `DuplicateKeyError`, and `ensemble` running it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import eqx_rng
from eqx_rng.debug import check_distinct_keys


def _noisy_train_state(model, noise_key):
    def make(*, key):
        opt = optax.chain(optax.add_noise(0.01, 0.55, key=noise_key), optax.sgd(0.1))
        return eqx_rng.TrainState.create(model, opt, key=key)

    return make


def test_ensemble_refuses_an_optimizer_seeded_with_a_fixed_key():
    model = eqx.nn.Linear(2, 2, key=jr.key(1))
    with pytest.raises(
        eqx_rng.DuplicateKeyError,
        match=r"(?s)`\.opt_state\[0\]\.rng_key` holds the same key in all 4 chains",
    ):
        eqx_rng.ensemble(_noisy_train_state(model, 0), jr.key(0), 4)


def test_ensemble_refuses_the_deprecated_seed_argument_too():
    model = eqx.nn.Linear(2, 2, key=jr.key(1))

    def make(*, key):
        with pytest.warns(DeprecationWarning):
            noise = optax.add_noise(0.01, 0.55, seed=0)
        return eqx_rng.TrainState.create(
            model, optax.chain(noise, optax.sgd(0.1)), key=key
        )

    with pytest.raises(eqx_rng.DuplicateKeyError, match="opt_state"):
        eqx_rng.ensemble(make, jr.key(0), 4)


def test_ensemble_accepts_a_noise_key_derived_per_chain():
    model = eqx.nn.Linear(2, 2, key=jr.key(1))

    def make(*, key):
        noise = optax.add_noise(0.01, 0.55, key=eqx_rng.derive(key, "noise"))
        return eqx_rng.TrainState.create(
            model, optax.chain(noise, optax.sgd(0.1)), key=eqx_rng.derive(key, "train")
        )

    states = eqx_rng.ensemble(make, jr.key(0), 4)
    assert states.key.shape == (4,)


def test_distinct_keys_pass_and_tree_is_returned():
    tree = {"k": eqx_rng.grid_keys(jr.key(0), (5, 3)), "w": jnp.zeros((5, 2))}
    assert check_distinct_keys(tree) is tree
    assert check_distinct_keys(tree, axis=1) is tree
    assert check_distinct_keys(tree, axis=-1) is tree


def test_duplicate_at_one_position_names_chains_and_position():
    keys = eqx_rng.grid_keys(jr.key(0), (4, 3))
    keys = keys.at[3, 2].set(keys[1, 2])
    with pytest.raises(
        eqx_rng.DuplicateKeyError,
        match=r"`\['k'\]` holds the same key \(key 2 of each\) in chains 1, 3 \(of 4\)",
    ):
        check_distinct_keys({"k": keys})
    # Along the other axis, the rows hold distinct keys.
    check_distinct_keys({"k": keys}, axis=1)


def test_same_key_at_different_positions_is_not_compared():
    keys = eqx_rng.grid_keys(jr.key(0), (2, 2))
    keys = keys.at[1, 0].set(keys[0, 1])
    check_distinct_keys(keys)


def test_legacy_keys_are_checked_unless_turned_off():
    legacy = np.stack([np.asarray(jax.random.PRNGKey(i)) for i in (0, 1, 2, 1)])
    with pytest.raises(eqx_rng.DuplicateKeyError, match=r"chains 1, 3 \(of 4\)"):
        check_distinct_keys({"state": [legacy]})
    check_distinct_keys({"state": [legacy]}, legacy=False)


def test_non_key_leaves_are_ignored():
    same = {"x": jnp.zeros((4, 2), jnp.uint32), "y": jnp.ones((4, 3)), "n": 3}
    check_distinct_keys(same, legacy=False)
    check_distinct_keys({"y": jnp.ones((4, 3)), "n": 3})


def test_many_chains_one_duplicate_found():
    n = 20_000
    keys = eqx_rng.grid_keys(jr.key(0), (n,))
    check_distinct_keys(keys)
    keys = keys.at[n - 1].set(keys[7])
    with pytest.raises(eqx_rng.DuplicateKeyError, match=rf"chains 7, {n - 1} \(of"):
        check_distinct_keys(keys)


def test_traced_leaves_are_skipped():
    shared = jnp.stack([jr.key(0)] * 3)
    with pytest.raises(eqx_rng.DuplicateKeyError):
        check_distinct_keys(shared)
    out = jax.jit(check_distinct_keys)(shared)  # cannot check values: skipped
    assert out.shape == (3,)


def test_leaf_without_the_axis_is_a_value_error():
    with pytest.raises(
        ValueError, match=r"`\['k'\]` has key shape \(\), with no axis 0"
    ):
        check_distinct_keys({"k": jr.key(0)})
    with pytest.raises(ValueError, match="no axis 2"):
        check_distinct_keys(eqx_rng.grid_keys(jr.key(0), (2, 2)), axis=2)


def test_single_chain_is_fine():
    check_distinct_keys(jnp.stack([jr.key(0)]))


def test_duplicate_key_error_is_a_value_error():
    assert issubclass(eqx_rng.DuplicateKeyError, ValueError)
