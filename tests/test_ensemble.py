"""`eqx_rng.ensemble`: n chains built in one vectorised call."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import tree_allclose
from jaxtyping import TypeCheckError

import eqx_rng


def _bitwise(a, b):
    return bool(eqx.tree_equal(a, b, typematch=True))


def _chain(tree, c):
    return jax.tree_util.tree_map(lambda a: a[c] if eqx.is_array(a) else a, tree)


def test_chain_c_is_make_with_derived_key(getkey):
    key = getkey()
    mlps = eqx_rng.ensemble(eqx.nn.MLP, key, 4, 3, 2, 8, 2)
    assert mlps.layers[0].weight.shape == (4, 8, 3)
    for c in range(4):
        one = eqx.nn.MLP(3, 2, 8, 2, key=eqx_rng.derive(key, c))
        assert _bitwise(_chain(mlps, c), one)


def test_chains_differ(getkey):
    models = eqx_rng.ensemble(eqx.nn.Linear, getkey(), 3, 4, 4)
    assert not jnp.array_equal(models.weight[0], models.weight[1])


def test_chain_does_not_depend_on_n(getkey):
    key = getkey()
    three = eqx_rng.ensemble(eqx.nn.MLP, key, 3, 3, 2, 8, 2)
    five = eqx_rng.ensemble(eqx.nn.MLP, key, 5, 3, 2, 8, 2)
    first3 = jax.tree_util.tree_map(lambda a: a[:3] if eqx.is_array(a) else a, five)
    assert _bitwise(three, first3)


def test_make_is_traced_once(getkey):
    calls = []

    def make(n, *, key):
        calls.append(1)
        return eqx.nn.Linear(n, n, key=key)

    models = eqx_rng.ensemble(make, getkey(), 16, 3)
    assert models.weight.shape == (16, 3, 3)
    assert calls == [1]


def test_non_array_leaves_kept(getkey):
    mlps = eqx_rng.ensemble(eqx.nn.MLP, getkey(), 2, 3, 2, 8, 1, activation=jnp.tanh)
    assert mlps.activation is jnp.tanh
    assert mlps.in_size == 3


def test_args_and_kwargs_are_shared(getkey):
    key = getkey()
    models = eqx_rng.ensemble(eqx.nn.Linear, key, 2, 3, 2, use_bias=False)
    assert models.bias is None
    one = eqx.nn.Linear(3, 2, use_bias=False, key=eqx_rng.derive(key, 1))
    assert jnp.array_equal(models.weight[1], one.weight)


def test_make_with_state_gets_chain_axis(getkey):
    key = getkey()
    make = eqx.nn.make_with_state(eqx.nn.BatchNorm)
    model, state = eqx_rng.ensemble(
        lambda *, key: make(3, axis_name="batch", mode="batch"), key, 4
    )
    assert model.weight.shape == (4, 3)
    leaves = jax.tree_util.tree_leaves(state)
    assert leaves and all(leaf.shape[0] == 4 for leaf in leaves)
    # Per chain, the State works with the chain's model.
    x = jr.normal(getkey(), (8, 3))
    y, _ = eqx_rng.vmap(_chain(model, 2), axis_name="batch")(x, _chain(state, 2))
    assert y.shape == (8, 3)


def test_make_with_state_model_with_key(getkey):
    class Net(eqx.Module):
        linear: eqx.nn.Linear
        norm: eqx.nn.BatchNorm

        def __init__(self, n, *, key):
            self.linear = eqx.nn.Linear(n, n, key=key)
            self.norm = eqx.nn.BatchNorm(n, axis_name="batch", mode="batch")

    key = getkey()
    nets, states = eqx_rng.ensemble(eqx.nn.make_with_state(Net), key, 3, 4)
    one, one_state = eqx.nn.make_with_state(Net)(4, key=eqx_rng.derive(key, 2))
    assert _bitwise(_chain(nets, 2), one)
    assert tree_allclose(_chain(states, 2), one_state)


def test_numpy_int_n(getkey):
    models = eqx_rng.ensemble(eqx.nn.Linear, getkey(), np.int64(2), 3, 3)
    assert models.weight.shape == (2, 3, 3)


@pytest.mark.parametrize("n", [0, -1])
def test_n_below_one(n, getkey):
    with pytest.raises(ValueError, match="n >= 1"):
        eqx_rng.ensemble(eqx.nn.Linear, getkey(), n, 3, 3)


@pytest.mark.parametrize(
    "bad,match",
    [(jax.random.PRNGKey(0), "as_key"), (jnp.zeros(3), "key"), (0, "key")],
)
def test_key_not_a_key(bad, match):
    with pytest.raises(TypeError, match=match):
        eqx_rng.ensemble(eqx.nn.Linear, bad, 2, 3, 3)


def test_batch_of_keys_is_type_error():
    with pytest.raises(TypeCheckError):
        eqx_rng.ensemble(eqx.nn.Linear, jr.split(jr.key(0), 2), 2, 3, 3)


def test_key_in_kwargs_is_refused(getkey):
    with pytest.raises(TypeError, match="multiple values for argument 'key'"):
        eqx_rng.ensemble(eqx.nn.Linear, getkey(), 2, 3, 3, key=getkey())  # pyright: ignore


def test_jit_matches_eager(getkey):
    key = getkey()
    eager = eqx_rng.ensemble(eqx.nn.Linear, key, 3, 2, 2)
    jitted = eqx.filter_jit(lambda k: eqx_rng.ensemble(eqx.nn.Linear, k, 3, 2, 2))(key)
    assert _bitwise(eager, jitted)


def test_chains_are_built_as_one_compiled_program(getkey):
    # Run eagerly, every operation of `make` under vmap would compile on its own
    # (18 programs for this MLP); the chains are one program instead.
    compiles = []

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    key = getkey()
    jax.block_until_ready(eqx_rng.derive(key, 0))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        models = eqx_rng.ensemble(eqx.nn.MLP, key, 3, 5, 7, 11, 2)
        jax.block_until_ready(models)
        assert len(compiles) <= 1, compiles
        compiles.clear()
        eqx_rng.ensemble(eqx.nn.MLP, key, 3, 5, 7, 11, 2)  # cached
        assert compiles == []
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    one = eqx.nn.MLP(5, 7, 11, 2, key=eqx_rng.derive(key, 2))
    assert jnp.array_equal(models.layers[0].weight[2], one.layers[0].weight)


class _Unhashable:
    __hash__ = None  # pyright: ignore

    def __init__(self, width: int):
        self.width = width


def test_unhashable_static_argument_is_built_eagerly(getkey):
    key = getkey()

    def make(spec, scale, *, key):
        return eqx.nn.Linear(spec.width, 2, key=key), scale * 2

    models, scales = eqx_rng.ensemble(make, key, 3, _Unhashable(4), jnp.float32(1.5))
    assert models.weight.shape == (3, 2, 4)
    assert jnp.array_equal(scales, jnp.full((3,), 3.0, jnp.float32))
    one = eqx.nn.Linear(4, 2, key=eqx_rng.derive(key, 1))
    assert jnp.array_equal(models.weight[1], one.weight)


def test_numpy_scalar_argument_stays_concrete(getkey):
    # A width computed with NumPy (`np.prod(shape)`) is an `np.int64`, which
    # `eqx.filter_jit` would trace as an array; `make` needs it as a number.
    key = getkey()

    def make(width, *, key):
        return eqx.nn.Linear(int(width), 2, key=key)

    width = np.prod((2, 2))
    models = eqx_rng.ensemble(make, key, 3, width)
    assert models.weight.shape == (3, 2, 4)
    one = make(width, key=eqx_rng.derive(key, 2))
    assert jnp.array_equal(models.weight[2], one.weight)
    # Same value, another NumPy type: its own build, the same chains.
    again = eqx_rng.ensemble(make, key, 3, np.int32(4))
    assert _bitwise(again, models)


def test_make_reading_an_array_argument_is_built_eagerly(getkey):
    key = getkey()

    def make(scale, *, key):
        w = jr.normal(key, (2,))
        return 2 * w if scale > 1 else w

    scale = jnp.float32(1.5)
    chains = eqx_rng.ensemble(make, key, 3, scale)
    for c in range(3):
        assert jnp.array_equal(chains[c], make(scale, key=eqx_rng.derive(key, c)))
