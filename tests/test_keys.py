import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import keys_equal, run_python
from jaxtyping import TypeCheckError

import eqx_rng

# ---------------------------------------------------------------- as_key


def test_as_key_int_seed():
    assert keys_equal(eqx_rng.as_key(3), jr.key(3))
    assert keys_equal(eqx_rng.as_key(np.int64(3)), jr.key(3))


def test_as_key_typed_key_is_returned_unchanged():
    k = jr.key(1)
    assert eqx_rng.as_key(k) is k


@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray])
def test_as_key_legacy_keeps_bits(to_array):
    legacy = to_array(jax.random.PRNGKey(42))
    typed = eqx_rng.as_key(legacy)
    assert jnp.issubdtype(typed.dtype, jax.dtypes.prng_key)
    assert typed.shape == ()
    assert np.array_equal(np.asarray(jr.key_data(typed)), np.asarray(legacy))
    # The typed key draws the same numbers as the legacy key.
    assert jnp.array_equal(jr.normal(typed, (5,)), jr.normal(jnp.asarray(legacy), (5,)))


@pytest.mark.parametrize(
    "bad,match",
    [
        ("abc", "str 'abc'"),
        (1.5, "float 1.5"),
        (True, "bool"),
        (jnp.zeros(3), r"shape \(3,\) and dtype float32"),
        (np.zeros(2, np.int32), r"shape \(2,\) and dtype int32"),
        (None, "NoneType"),
    ],
)
def test_as_key_rejects(bad, match):
    with pytest.raises(TypeError, match=match):
        eqx_rng.as_key(bad)


def test_as_key_batch_of_keys_is_value_error():
    with pytest.raises(ValueError, match=r"batch of keys of shape \(3,\)"):
        eqx_rng.as_key(jr.split(jr.key(0), 3))
    with pytest.raises(ValueError, match=r"batch of legacy keys of shape \(3, 2\)"):
        eqx_rng.as_key(jax.random.split(jax.random.PRNGKey(0), 3))


# ---------------------------------------------------------------- derive


def test_derive_empty_path_is_identity():
    k = jr.key(0)
    assert eqx_rng.derive(k) is k


def test_derive_is_fold_in_in_order():
    k = jr.key(0)
    expect = jr.fold_in(jr.fold_in(k, 3), eqx_rng.string_hash("x"))
    assert keys_equal(eqx_rng.derive(k, 3, "x"), expect)
    assert not keys_equal(eqx_rng.derive(k, 3, 4), eqx_rng.derive(k, 4, 3))


def test_derive_traced_and_python_ints_agree():
    k = jr.key(0)
    jitted = jax.jit(lambda k, i: eqx_rng.derive(k, i, "s"))
    assert keys_equal(jitted(k, jnp.int32(5)), eqx_rng.derive(k, 5, "s"))
    assert keys_equal(eqx_rng.derive(k, np.uint8(5)), eqx_rng.derive(k, 5))
    # Negative ints wrap like int32 arrays cast to uint32.
    assert keys_equal(eqx_rng.derive(k, -1), eqx_rng.derive(k, jnp.int32(-1)))
    assert keys_equal(eqx_rng.derive(k, -1), eqx_rng.derive(k, 2**32 - 1))


def test_string_hash_is_blake2b_little_endian():
    import hashlib

    digest = hashlib.blake2b(b"dropout", digest_size=4).digest()
    assert eqx_rng.string_hash("dropout") == int.from_bytes(digest, "little")
    # Pinned forever: changing the hash would change every named draw.
    assert eqx_rng.string_hash("dropout") == int.from_bytes(digest, "little")
    assert eqx_rng.string_hash("é") != eqx_rng.string_hash("e")


def test_derive_string_stable_across_pythonhashseed():
    code = (
        "import jax.random as jr, eqx_rng;"
        "print(jr.key_data(eqx_rng.derive(jr.key(0), 'dropout')).tolist())"
    )
    outs = {
        run_python(code, env={"PYTHONHASHSEED": s}).strip() for s in ("0", "1", "999")
    }
    assert len(outs) == 1
    here = jr.key_data(eqx_rng.derive(jr.key(0), "dropout")).tolist()
    assert outs == {str(here)}


@pytest.mark.parametrize(
    "item,match",
    [
        (1.0, "float"),
        (jnp.arange(3), r"integer scalar.*shape \(3,\)"),
        (jnp.float32(1.0), "integer scalar"),
        (True, "bool"),
        (None, "NoneType"),
    ],
)
def test_derive_rejects_bad_path_items(item, match):
    with pytest.raises(TypeError, match=match):
        eqx_rng.derive(jr.key(0), 0, item)


def test_derive_rejects_out_of_range_int():
    with pytest.raises(ValueError, match="outside"):
        eqx_rng.derive(jr.key(0), 2**32)


def test_derive_legacy_key_points_to_as_key():
    with pytest.raises(TypeError, match="as_key"):
        eqx_rng.derive(jax.random.PRNGKey(0), 1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- grid_keys


def test_grid_keys_prefix_invariance():
    k = jr.key(0)
    big = eqx_rng.grid_keys(k, (4, 8))
    assert big.shape == (4, 8)
    assert keys_equal(big[:2, :3], eqx_rng.grid_keys(k, (2, 3)))


def test_grid_keys_element_is_derive():
    k = jr.key(11)
    C, B = 3, 5
    grid = eqx_rng.grid_keys(k, (C, B))
    for c in range(C):
        for b in range(B):
            assert keys_equal(grid[c, b], eqx_rng.derive(k, c, b))


def test_grid_keys_start_near_the_uint32_limit():
    k = jr.key(0)
    top = 2**32 - 1
    assert keys_equal(
        eqx_rng.grid_keys(k, (2,), start=(top - 1,))[1], eqx_rng.derive(k, top)
    )
    with pytest.raises(ValueError, match=r"below 2\*\*32.*start\[0\]"):
        eqx_rng.grid_keys(k, (3,), start=(top - 1,))


def test_grid_keys_new_offsets_do_not_recompile():
    from eqx_rng import _key_grids

    k = jr.key(0)
    cache_size = _key_grids._grid._cache_size  # pyright: ignore[reportAttributeAccessIssue]
    eqx_rng.grid_keys(k, (3, 2), start=(0, 0))
    before = cache_size()
    for s in range(1, 6):
        block = eqx_rng.grid_keys(k, (3, 2), start=(3 * s, 7))
        assert keys_equal(block[2, 1], eqx_rng.derive(k, 3 * s + 2, 8))
    assert cache_size() == before  # offsets are data, not static


def test_string_hash_refuses_non_strings():
    # Under the test suite's jaxtyping import hook the annotation is checked first;
    # without it, the function's own check raises. Both are `TypeError`s.
    for bad in (5, b"dropout"):
        with pytest.raises(TypeError, match="str"):
            eqx_rng.string_hash(bad)  # type: ignore[arg-type]


def test_grid_keys_start_offsets_give_blocks():
    k = jr.key(0)
    big = eqx_rng.grid_keys(k, (6, 8))
    block = eqx_rng.grid_keys(k, (2, 3), start=(4, 5))
    assert keys_equal(block, big[4:6, 5:8])
    traced = jax.jit(lambda s: eqx_rng.grid_keys(k, (2, 3), start=(s, 5)))(jnp.int32(4))
    assert keys_equal(traced, block)


def test_grid_keys_all_distinct():
    bits = np.asarray(jr.key_data(eqx_rng.grid_keys(jr.key(0), (16, 64))))
    assert len({tuple(row) for row in bits.reshape(-1, bits.shape[-1])}) == 16 * 64


def test_grid_keys_int_shape_and_scalar_shape():
    k = jr.key(0)
    assert eqx_rng.grid_keys(k, 3).shape == (3,)
    assert keys_equal(eqx_rng.grid_keys(k, ()), k)
    assert eqx_rng.grid_keys(k, (0, 4)).shape == (0, 4)


def test_grid_keys_is_one_program_without_element_loop():
    # The jaxpr has one fold-in per dimension, whatever the number of elements.
    k = jr.key(0)
    jaxpr = str(jax.make_jaxpr(lambda k: eqx_rng.grid_keys(k, (64, 128)))(k))
    assert jaxpr.count("random_fold_in") + jaxpr.count("threefry2x32") <= 4


@pytest.mark.parametrize("shape", [(-1, 2), (2.0, 3), "ab", (True, 2)])
def test_grid_keys_bad_shape(shape):
    with pytest.raises(ValueError, match="non-negative ints"):
        eqx_rng.grid_keys(jr.key(0), shape)


def test_grid_keys_bad_start():
    with pytest.raises(ValueError, match=r"expected 2, got 1"):
        eqx_rng.grid_keys(jr.key(0), (2, 3), start=(1,))
    with pytest.raises(ValueError, match=r">= 0"):
        eqx_rng.grid_keys(jr.key(0), (2, 3), start=(1, -1))


def test_grid_keys_independent_of_threefry_partitionable():
    code = (
        "import jax, jax.random as jr, eqx_rng;"
        "jax.config.update('jax_threefry_partitionable', {flag});"
        "print(jr.key_data(eqx_rng.grid_keys(jr.key(3), (2, 3))).tolist(),"
        " jr.key_data(eqx_rng.derive(jr.key(3), 'a', 4)).tolist())"
    )
    on = run_python(code.format(flag=True))
    off = run_python(code.format(flag=False))
    assert on == off


# ---------------------------------------------------------------- example_keys


def test_example_keys_invariant_to_batching_and_order():
    k = jr.key(0)
    ids = jnp.array([5, 1, 9, 3])
    keys = eqx_rng.example_keys(k, ids)
    for pos, i in enumerate(ids.tolist()):
        assert keys_equal(keys[pos], eqx_rng.derive(k, i))
    perm = jnp.array([2, 0, 3, 1])
    assert keys_equal(eqx_rng.example_keys(k, ids[perm]), keys[perm])
    assert keys_equal(eqx_rng.example_keys(k, ids[:2]), keys[:2])


@pytest.mark.parametrize(
    "ids",
    [np.arange(3), jnp.arange(3, dtype=jnp.uint32), np.arange(3, dtype=np.uint8)],
    ids=["numpy int", "jax uint32", "numpy uint8"],
)
def test_example_keys_takes_numpy_and_unsigned_ids(ids):
    k = jr.key(1)
    keys = eqx_rng.example_keys(k, ids)
    for i in range(3):
        assert keys_equal(keys[i], eqx_rng.derive(k, i))


def test_example_keys_shape_contract():
    with pytest.raises(TypeCheckError):
        eqx_rng.example_keys(jr.key(0), jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(TypeCheckError):
        eqx_rng.example_keys(jr.key(0), jnp.zeros((2,), jnp.float32))


# ---------------------------------------------------------------- split_like


class _Model(eqx.Module):
    w: jax.Array
    b: jax.Array
    n: int


def test_split_like_keys_follow_paths():
    k = jr.key(0)
    tree = {"a": jnp.ones(2), "b": [np.zeros(3), 1.0], "c": "text"}
    keys = eqx_rng.split_like(k, tree)
    assert keys["b"][1] is None and keys["c"] is None
    assert keys_equal(keys["a"], eqx_rng.derive(k, "['a']"))
    assert keys_equal(keys["b"][0], eqx_rng.derive(k, "['b'][0]"))


def test_split_like_stable_when_leaves_added():
    k = jr.key(0)
    small = {"a": jnp.ones(2), "c": jnp.ones(3)}
    large = {"a": jnp.ones(2), "b": jnp.ones(4), "c": jnp.ones(3), "d": jnp.ones(1)}
    ks, kl = eqx_rng.split_like(k, small), eqx_rng.split_like(k, large)
    assert keys_equal(ks["a"], kl["a"]) and keys_equal(ks["c"], kl["c"])
    assert not keys_equal(kl["a"], kl["b"])


def test_split_like_modules_and_is_leaf():
    model = _Model(jnp.ones((2, 2)), jnp.zeros(2), 3)
    keys = eqx_rng.split_like(jr.key(0), model)
    assert isinstance(keys, _Model)
    assert keys.n is None
    assert keys_equal(keys.w, eqx_rng.derive(jr.key(0), ".w"))
    # is_leaf: treat the whole list as one (non-array) leaf.
    keys = eqx_rng.split_like(
        jr.key(0), {"l": [jnp.ones(1)]}, is_leaf=lambda x: isinstance(x, list)
    )
    assert keys["l"] is None


# ---------------------------------------------------------------- tree_normal


def test_tree_normal_shapes_dtypes_and_none():
    tree = {
        "f32": jnp.zeros((3, 2)),
        "f16": jnp.zeros(4, jnp.float16),
        "bf16": np.zeros(2, np.float32),
        "i": jnp.zeros(3, jnp.int32),
        "py": 1.0,
    }
    noise = eqx_rng.tree_normal(jr.key(0), tree)
    assert noise["f32"].shape == (3, 2) and noise["f32"].dtype == jnp.float32
    assert noise["f16"].dtype == jnp.float16
    assert noise["bf16"].dtype == jnp.float32
    assert noise["i"] is None and noise["py"] is None


def test_tree_normal_numpy_float64_leaf_gets_float32_without_warning():
    # pytest turns warnings into errors: JAX's float64 truncation warning would fail.
    noise = eqx_rng.tree_normal(jr.key(0), {"w": np.zeros(3)})
    assert noise["w"].dtype == jnp.float32 and noise["w"].shape == (3,)


def test_tree_normal_matches_split_like_keys():
    k = jr.key(4)
    tree = {"a": jnp.zeros(5), "b": jnp.zeros((2, 2), jnp.float16)}
    noise = eqx_rng.tree_normal(k, tree)
    keys = eqx_rng.split_like(k, tree)
    assert jnp.array_equal(noise["a"], jr.normal(keys["a"], (5,), jnp.float32))
    assert jnp.array_equal(noise["b"], jr.normal(keys["b"], (2, 2), jnp.float16))


def test_tree_normal_independent_across_leaves():
    n = 100_000
    noise = eqx_rng.tree_normal(jr.key(0), {"a": jnp.zeros(n), "b": jnp.zeros(n)})
    a, b = noise["a"], noise["b"]
    # Sample correlation of independent N(0,1) draws has std 1/sqrt(n).
    corr = float(jnp.corrcoef(a, b)[0, 1])
    assert abs(corr) < 5 / math.sqrt(n)
    # Each leaf is standard normal.
    assert abs(float(jnp.mean(a))) < 5 / math.sqrt(n)
    assert abs(float(jnp.var(a)) - 1.0) < 5 * math.sqrt(2 / (n - 1))


def test_tree_normal_under_jit_and_vmap():
    tree = {"w": jnp.zeros(3)}
    eager = eqx_rng.tree_normal(jr.key(0), tree)
    jitted = jax.jit(eqx_rng.tree_normal)(jr.key(0), tree)
    assert jnp.array_equal(eager["w"], jitted["w"])
    keys = jr.split(jr.key(0), 4)
    batched = jax.vmap(eqx_rng.tree_normal, in_axes=(0, None))(keys, tree)
    assert batched["w"].shape == (4, 3)
    assert not jnp.array_equal(batched["w"][0], batched["w"][1])
