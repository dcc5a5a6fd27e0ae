"""Integer ranges: out-of-range concrete integers are refused, never wrapped, and
64-bit ids go in as their two 32-bit halves."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import keys_equal

import eqx_rng

# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [2**32 + 5, 2**40, 2**64, -(2**31) - 1, -(2**63)])
def test_as_key_refuses_out_of_range_seeds(seed):
    with pytest.raises(ValueError, match=rf"(?s)`as_key` seed is {seed}.*id_halves"):
        eqx_rng.as_key(seed)


def test_as_key_refuses_out_of_range_numpy_seed():
    with pytest.raises(ValueError, match="outside"):
        eqx_rng.as_key(np.uint64(2**33))


def test_as_key_edge_seeds_and_negative_rule():
    assert keys_equal(eqx_rng.as_key(2**32 - 1), jr.key(2**32 - 1))
    assert keys_equal(eqx_rng.as_key(2**31), jr.key(2**31))
    # A negative seed is an int32 read as two's complement.
    assert keys_equal(eqx_rng.as_key(-1), eqx_rng.as_key(2**32 - 1))
    assert keys_equal(eqx_rng.as_key(-(2**31)), eqx_rng.as_key(2**31))


def test_sixty_four_bit_seed_recipe_keeps_seeds_apart():
    def key64(seed):
        return eqx_rng.derive(eqx_rng.as_key(0), *eqx_rng.id_halves(seed))

    assert not keys_equal(key64(2**32 + 5), key64(5))
    assert not keys_equal(key64(2**40), key64(0))


# ---------------------------------------------------------------- derive


@pytest.mark.parametrize(
    "item",
    [2**32, 2**40, -(2**31) - 1, np.int64(2**40), np.array(2**40), np.uint64(2**32)],
)
def test_derive_refuses_out_of_range_concrete_items(item):
    with pytest.raises(ValueError, match=r"`derive` path item 1 is .*outside"):
        eqx_rng.derive(jr.key(0), "a", item)


def test_derive_concrete_jax_scalar_checked_inside_jit():
    big = jnp.array(2**31 - 1, dtype=jnp.int32)  # in range: works, eagerly and traced
    k = jr.key(0)
    assert keys_equal(jax.jit(lambda: eqx_rng.derive(k, big))(), eqx_rng.derive(k, big))


def test_derive_traced_items_wrap_modulo_2_32():
    k = jr.key(0)
    traced = jax.jit(eqx_rng.derive)(k, jnp.int32(-1))
    assert keys_equal(traced, eqx_rng.derive(k, 2**32 - 1))


# ---------------------------------------------------------------- grid_keys


@pytest.mark.parametrize(
    "start", [2**32, 2**32 - 1, np.int64(2**32), np.array(2**32), np.array(-1)]
)
def test_grid_keys_refuses_starts_past_the_range(start):
    with pytest.raises(ValueError, match=r"`grid_keys` `?start\[0\]|below 2\*\*32"):
        eqx_rng.grid_keys(jr.key(0), (2,), start=start)


def test_grid_keys_concrete_array_start_in_range_works():
    k = jr.key(0)
    keys = eqx_rng.grid_keys(k, (2,), start=np.array(2**32 - 2, dtype=np.uint32))
    assert keys_equal(keys[1], eqx_rng.derive(k, 2**32 - 1))


# ---------------------------------------------------------------- example_keys


def test_example_keys_refuses_ids_that_would_wrap():
    with pytest.raises(ValueError, match=r"(?s)got 4294967296.*bits=64"):
        eqx_rng.example_keys(jr.key(0), np.array([0, 2**32], dtype=np.int64))
    with pytest.raises(ValueError, match=r"got -2147483649"):
        eqx_rng.example_keys(jr.key(0), np.array([-(2**31) - 1, 0], dtype=np.int64))


def test_example_keys_in_range_wide_dtype_matches_derive():
    k = jr.key(0)
    keys = eqx_rng.example_keys(k, np.array([2**32 - 1, -1, 5], dtype=np.int64))
    assert keys_equal(keys[0], eqx_rng.derive(k, 2**32 - 1))
    assert keys_equal(keys[1], eqx_rng.derive(k, -1))


def test_example_keys_bits_64_folds_both_halves():
    k = jr.key(0)
    ids = np.array([2**32, 0, 2**40 + 7, -5, 2**63 - 1], dtype=np.int64)
    keys = eqx_rng.example_keys(k, ids, bits=64)
    for i, x in enumerate(ids.tolist()):
        assert keys_equal(keys[i], eqx_rng.derive(k, *eqx_rng.id_halves(x)))
    assert not keys_equal(keys[0], keys[1])  # 2**32 and 0 no longer collide
    unsigned = np.array([2**64 - 5], dtype=np.uint64)
    wide = eqx_rng.example_keys(k, unsigned, bits=64)
    assert keys_equal(wide[0], keys[3])  # -5 is 2**64 - 5 as two's complement


def test_example_keys_bits_64_on_int32_jax_ids_and_traced():
    k = jr.key(0)
    ids = jnp.array([3, -5], dtype=jnp.int32)
    eager = eqx_rng.example_keys(k, ids, bits=64)
    traced = jax.jit(lambda i: eqx_rng.example_keys(k, i, bits=64))(ids)
    assert keys_equal(eager, traced)
    assert keys_equal(eager[1], eqx_rng.derive(k, *eqx_rng.id_halves(-5)))


def test_example_keys_bits_other_than_32_or_64():
    with pytest.raises(ValueError, match="32 or 64"):
        eqx_rng.example_keys(jr.key(0), jnp.arange(2), bits=16)


# ---------------------------------------------------------------- id_halves


def test_id_halves_values_and_errors():
    assert eqx_rng.id_halves(0) == (0, 0)
    assert eqx_rng.id_halves(2**32 + 5) == (1, 5)
    assert eqx_rng.id_halves(-1) == (2**32 - 1, 2**32 - 1)
    assert eqx_rng.id_halves(np.int64(-(2**63))) == (2**31, 0)
    hi, lo = eqx_rng.id_halves(np.array(2**40 + 3, dtype=np.int64))
    assert (int(hi), int(lo)) == (2**8, 3)
    with pytest.raises(ValueError, match=r"\[-2\*\*63, 2\*\*64\)"):
        eqx_rng.id_halves(2**64)
    with pytest.raises(TypeError, match="integer id"):
        eqx_rng.id_halves(1.5)
    with pytest.raises(TypeError, match="bool"):
        eqx_rng.id_halves(True)
