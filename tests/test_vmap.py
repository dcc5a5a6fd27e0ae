"""`eqx_rng.vmap`: per-call keys, State axes, and the broadcast-key check."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import keys_equal, run_python, tree_allclose
from jax import lax

import eqx_rng
from eqx_rng import BroadcastKeyError

B = 8


def add_noise(x, key):
    return x + jr.normal(key, x.shape)


def add_noise2(x, *, key):
    return x + jr.normal(key, x.shape)


@pytest.fixture
def xs():
    return jnp.zeros((B, 3))


# ------------------------------------------------------------ per-call keys


def test_seed_tutorial_pitfall_raises(xs, getkey):
    with pytest.raises(BroadcastKeyError, match="argument 'key'") as info:
        eqx_rng.vmap(add_noise, in_axes=(0, None))(xs, getkey())
    msg = str(info.value)
    assert "add_noise" in msg and "`random_bits`" in msg
    assert "key=" in msg and "eqx_rng.shared" in msg and "fold_in" in msg
    assert f"each of the {B} mapped calls that reaches the draw" in msg
    assert isinstance(info.value, ValueError)


def test_derived_keys_give_distinct_rows(xs, getkey):
    key = getkey()
    ys = eqx_rng.vmap(add_noise2)(xs, key=key)
    assert ys.shape == (B, 3)
    assert len({tuple(np.asarray(row).tolist()) for row in ys}) == B
    assert not jnp.array_equal(ys[0], ys[-1])
    for i in (0, 5, B - 1):
        assert jnp.array_equal(ys[i], add_noise2(xs[i], key=eqx_rng.derive(key, i)))


def test_key_positional_parameter_can_be_passed_as_keyword(xs, getkey):
    key = getkey()
    ys = eqx_rng.vmap(add_noise)(xs, key=key)
    assert jnp.array_equal(ys[3], add_noise(xs[3], eqx_rng.derive(key, 3)))


def test_nested_vmap_equals_grid_keys(getkey):
    key = getkey()
    C, Bn = 3, 5
    data = eqx_rng.vmap(eqx_rng.vmap(lambda x, *, key: jr.key_data(key)))(
        jnp.zeros((C, Bn)), key=key
    )
    assert jnp.array_equal(data, jr.key_data(eqx_rng.grid_keys(key, (C, Bn))))
    assert jnp.array_equal(data[2, 4], jr.key_data(eqx_rng.derive(key, 2, 4)))


def test_keys_do_not_depend_on_batch_size(getkey):
    key = getkey()
    small = eqx_rng.vmap(add_noise2)(jnp.zeros((4, 3)), key=key)
    large = eqx_rng.vmap(add_noise2)(jnp.zeros((16, 3)), key=key)
    assert jnp.array_equal(small, large[:4])


def test_key_none_is_passed_on():
    seen = []

    def f(x, *, key):
        seen.append(key)
        return x

    eqx_rng.vmap(f)(jnp.zeros((2, 3)), key=None)
    assert seen == [None]


def test_no_key_means_fn_gets_no_key(xs):
    ys = eqx_rng.vmap(lambda x, key=None: x if key is None else x + 1)(xs)
    assert jnp.array_equal(ys, xs)


def test_other_keyword_arguments_are_closed_over(xs):
    scale = jnp.arange(3.0)  # shape (3,): would map wrongly if it were mapped
    ys = eqx_rng.vmap(lambda x, *, scale: x + scale)(xs, scale=scale)
    assert jnp.array_equal(ys, xs + scale[None])


def test_broadcast_mode_shares_the_key(xs, getkey):
    key = getkey()
    ys = eqx_rng.vmap(add_noise2, keys="broadcast")(xs, key=key)
    assert jnp.array_equal(ys, jnp.broadcast_to(add_noise2(xs[0], key=key), ys.shape))
    ys2 = eqx_rng.vmap(add_noise, in_axes=(0, None), keys="broadcast")(xs, key)
    assert jnp.array_equal(ys, ys2)


def test_out_axes_and_in_axes_like_filter_vmap(getkey):
    key = getkey()
    x = jnp.zeros((3, B))
    f = eqx_rng.vmap(add_noise2, in_axes=1, out_axes=1)
    ys = f(x, key=key)
    assert ys.shape == (3, B)
    assert jnp.array_equal(ys[:, 2], add_noise2(x[:, 2], key=eqx_rng.derive(key, 2)))
    g = eqx_rng.vmap(lambda x, y: x * y, in_axes={"y": None})
    assert jnp.array_equal(g(jnp.ones((B, 3)), jnp.arange(3.0))[1], jnp.arange(3.0))


def test_non_array_leaves_pass_through(xs, getkey):
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=getkey())
    out = eqx_rng.vmap(lambda m, x: (m(x), m), in_axes=(None, 0))(mlp, xs)
    ys, ms = out
    assert ys.shape == (B, 2)
    assert ms.activation is mlp.activation
    assert ms.layers[0].weight.shape == (B, 4, 3)


def test_decorator_form(getkey):
    @eqx_rng.vmap(axis_name="batch")
    def centred(x):
        return x - lax.pmean(x, "batch")

    x = jr.normal(getkey(), (B, 3))
    assert jnp.allclose(centred(x), x - x.mean(0, keepdims=True), atol=1e-6)


def test_method_binding(getkey):
    class Scaler(eqx.Module):
        s: jax.Array

        @eqx_rng.vmap(in_axes=(None, 0))
        def __call__(self, x, *, key):
            return self.s * x + jr.normal(key, x.shape)

    m = Scaler(jnp.array(2.0))
    key = getkey()
    xs = jnp.ones((4, 3))
    ys = m(xs, key=key)
    expect = 2.0 * xs[1] + jr.normal(eqx_rng.derive(key, 1), (3,))
    assert jnp.array_equal(ys[1], expect)


# ------------------------------------------------------ broadcast keys: caught


def _scan_draw(x, key):
    def step(c, _):
        return c, jr.normal(key, x.shape)

    return x + lax.scan(step, 0.0, None, length=2)[1].sum(0)


def _while_draw(x, key):
    def body(carry):
        k, i, acc = carry
        k, sub = jr.split(k)
        return k, i + 1, acc + jr.normal(sub, x.shape)

    return lax.while_loop(lambda c: c[1] < 2, body, (key, 0, x))[2]


def _custom_jvp_draw(x, key):
    @jax.custom_jvp
    def f(x, key):
        return x + jr.normal(key, x.shape)

    f.defjvp(lambda p, t: (f(*p), t[0]))
    return f(x, key)


def _custom_vjp_draw(x, key):
    @jax.custom_vjp
    def f(x, key):
        return x + jr.normal(key, x.shape)

    f.defvjp(lambda x, key: (f(x, key), None), lambda _, g: (g, None))
    return f(x, key)


CONSUMERS = {
    "direct": add_noise,
    "split": lambda x, key: x + jr.normal(jr.split(key)[0], x.shape),
    "jax.jit": lambda x, key: x + jax.jit(lambda k: jr.normal(k, (3,)))(key),
    "eqx.filter_jit": lambda x, key: eqx.filter_jit(add_noise)(x, key),
    "lax.scan": _scan_draw,
    "lax.while_loop": _while_draw,
    "lax.cond": lambda x, key: lax.cond(
        x[0] > -1.0, lambda k: x + jr.normal(k, x.shape), lambda k: x, key
    ),
    "jax.checkpoint": lambda x, key: jax.checkpoint(add_noise)(x, key),
    "jax.grad": lambda x, key: jax.grad(lambda x: jnp.sum(add_noise(x, key)))(x),
    "inner jax.vmap": lambda x, key: jax.vmap(lambda y: y + jr.normal(key))(x),
    "inner eqx_rng.vmap": lambda x, key: eqx_rng.vmap(
        lambda y, *, key: y + jr.normal(key)
    )(x, key=key),
    "custom_jvp": _custom_jvp_draw,
    "custom_vjp": _custom_vjp_draw,
    "fold_in constant": lambda x, key: add_noise(x, jr.fold_in(key, 3)),
    "legacy key data": lambda x, key: add_noise(x, jr.wrap_key_data(jr.key_data(key))),
    "bernoulli": lambda x, key: jnp.where(jr.bernoulli(key, 0.5, x.shape), x, 0.0),
}


@pytest.mark.parametrize("name", list(CONSUMERS))
def test_broadcast_key_caught_through_nesting(name, xs, getkey):
    fn = CONSUMERS[name]
    with pytest.raises(BroadcastKeyError, match="argument 'key'"):
        eqx_rng.vmap(fn, in_axes=(0, None))(xs, getkey())


@pytest.mark.parametrize("name", list(CONSUMERS))
def test_broadcast_key_caught_under_jit(name, xs, getkey):
    fn = CONSUMERS[name]
    step = jax.jit(lambda xs, k: eqx_rng.vmap(fn, in_axes=(0, None))(xs, k))
    with pytest.raises(BroadcastKeyError, match="argument 'key'"):
        step(xs, getkey())


class Noisy(eqx.Module):
    scale: jax.Array
    key: jax.Array

    def __call__(self, x):
        return x + self.scale * jr.normal(self.key, x.shape)


def test_module_key_field_named_by_path(xs, getkey):
    model = Noisy(jnp.array(1.0), getkey())
    with pytest.raises(BroadcastKeyError, match=r"argument 'model' at \.key"):
        eqx_rng.vmap(lambda x, model: model(x), in_axes=(0, None))(xs, model)

    class Stack(eqx.Module):
        layers: list

    stack = Stack([Noisy(jnp.array(1.0), getkey())])
    with pytest.raises(
        BroadcastKeyError, match=r"argument 'net' at \.layers\[0\]\.key"
    ):
        eqx_rng.vmap(lambda x, net: net.layers[0](x), in_axes=(0, None))(xs, stack)


def test_module_as_function_with_key_field(xs, getkey):
    model = Noisy(jnp.array(1.0), getkey())
    with pytest.raises(
        BroadcastKeyError, match=r"the mapped function 'Noisy' at \.key"
    ):
        eqx_rng.vmap(model)(xs)


def test_keyword_argument_key_is_checked(xs, getkey):
    def f(x, *, other):
        return x + jr.normal(other, x.shape)

    with pytest.raises(BroadcastKeyError, match="keyword argument 'other'"):
        eqx_rng.vmap(f)(xs, other=getkey())


def test_several_broadcast_keys_are_all_named(xs, getkey):
    def f(x, k1, k2):
        return x + jr.normal(k1, x.shape) + jr.uniform(k2, x.shape)

    with pytest.raises(BroadcastKeyError, match="argument 'k1' .*; argument 'k2' "):
        eqx_rng.vmap(f, in_axes=(0, None, None))(xs, getkey(), getkey())


def test_outer_unmapped_key_given_to_inner_vmap_is_caught(getkey):
    # Every outer row would get the same grid of inner keys.
    def per_chain(x, key):
        return eqx_rng.vmap(add_noise2)(x, key=key)

    with pytest.raises(BroadcastKeyError, match="argument 'key'"):
        eqx_rng.vmap(per_chain, in_axes=(0, None))(jnp.zeros((2, 4, 3)), getkey())


# ------------------------------------------------- broadcast keys: no false alarm


def test_fold_in_axis_index_is_fine(xs, getkey):
    def f(x, key):
        return add_noise(x, jr.fold_in(key, lax.axis_index("batch")))

    key = getkey()
    ys = eqx_rng.vmap(f, in_axes=(0, None), axis_name="batch")(xs, key)
    assert jnp.array_equal(ys[2], add_noise(xs[2], jr.fold_in(key, 2)))


def test_fold_in_mapped_id_is_fine(xs, getkey):
    ids = jnp.arange(100, 100 + B)
    key = getkey()
    ys = eqx_rng.vmap(
        lambda x, i, key: add_noise(x, eqx_rng.derive(key, i)), in_axes=(0, 0, None)
    )(xs, ids, key)
    assert jnp.array_equal(ys[1], add_noise(xs[1], eqx_rng.derive(key, 101)))


def test_fold_in_loop_counter_after_per_call_fold_is_fine(xs, getkey):
    def f(x, i, key):
        k = jr.fold_in(key, i)

        def step(c, t):
            return c + jr.normal(jr.fold_in(k, t), x.shape), None

        return lax.scan(step, x, jnp.arange(3))[0]

    ys = eqx_rng.vmap(f, in_axes=(0, 0, None))(xs, jnp.arange(B), getkey())
    assert not jnp.array_equal(ys[0], ys[1])


def test_scan_carry_becomes_per_call_is_fine(xs, getkey):
    # The carried key is replaced by a per-call key before it is drawn from.
    def f(x, i, key):
        def step(k, _):
            k = jr.fold_in(k, i)
            return k, jr.normal(k, x.shape)

        return x + lax.scan(step, key, None, length=2)[1].sum(0)

    eqx_rng.vmap(f, in_axes=(0, 0, None))(xs, jnp.arange(B), getkey())


def test_unconsumed_unmapped_key_is_fine(xs, getkey):
    key = getkey()

    def f(x, key):
        return x, key, jr.key_data(key), eqx_rng.derive(key, "unused")

    ys, ks, data, _ = eqx_rng.vmap(f, in_axes=(0, None))(xs, key)
    assert ks.shape == (B,)
    assert keys_equal(ks[3], key)
    assert data.shape == (B, 2)


def test_ensemble_init_is_fine(getkey):
    models = eqx_rng.ensemble(eqx.nn.Linear, getkey(), 3, 2, 2)
    assert models.weight.shape == (3, 2, 2)


def test_broadcast_opt_out(xs, getkey):
    ys = eqx_rng.vmap(add_noise, in_axes=(0, None), keys="broadcast")(xs, getkey())
    assert jnp.array_equal(ys[0], ys[-1])


def test_mapped_keys_are_fine(xs, getkey):
    keys = jr.split(getkey(), B)
    ys = eqx_rng.vmap(add_noise)(xs, keys)
    assert jnp.array_equal(ys[4], add_noise(xs[4], keys[4]))


def test_analysis_failure_never_breaks_the_program(monkeypatch, xs, getkey):
    from eqx_rng._vmap import _check

    def boom(*args, **kwargs):
        raise KeyError("a jaxpr parameter this JAX version does not have")

    monkeypatch.setattr(_check, "find_broadcast_keys", boom)
    with pytest.warns(RuntimeWarning, match="check could not read"):
        ys = eqx_rng.vmap(add_noise, in_axes=(0, None))(xs, getkey())
    assert ys.shape == xs.shape


def test_jax_internals_used_for_output_messages_exist():
    # `eqx_rng.vmap` reads JAX private API to name a batched output at out_axes
    # None; if JAX renames it, the messages degrade: fail loudly here instead.
    from eqx_rng._vmap import _jax_internals

    assert _jax_internals.internals_available()
    seen = []
    jax.vmap(lambda x: seen.append(_jax_internals.is_batched(x)) or x)(jnp.zeros(2))
    assert seen == [True]
    assert _jax_internals.is_batched(jnp.zeros(2)) is None


def test_analysis_trace_needing_a_concrete_key_defers_to_the_real_trace(xs):
    # Outside jit the unmapped key is concrete in the real call; the analysis
    # traces it abstractly, cannot, and leaves the verdict to the real trace.
    def f(x, key):
        n = int(jr.randint(key, (), 1, 4))
        return x * n

    ys = eqx_rng.vmap(f, in_axes=(0, None))(xs, jr.key(0))
    assert ys.shape == xs.shape


def test_user_errors_are_reported_by_the_real_trace(xs, getkey):
    def f(x, key):
        raise KeyError("from the user")

    with pytest.raises(KeyError, match="from the user"):
        eqx_rng.vmap(f, in_axes=(0, None))(xs, getkey())


# ------------------------------------------------------------- argument errors


def test_in_axes_length_mismatch(xs, getkey):
    with pytest.raises(ValueError, match=r"3 entries .* 2 positional arguments"):
        eqx_rng.vmap(add_noise, in_axes=(0, None, 0))(xs, getkey())


def test_in_axes_structure_mismatch(xs):
    with pytest.raises(ValueError, match="argument 'x'"):
        eqx_rng.vmap(lambda x: x, in_axes=((0, 0),))(xs)


def test_in_axes_unknown_name(xs):
    with pytest.raises(ValueError, match=r"names \['z'\]"):
        eqx_rng.vmap(lambda x: x, in_axes={"z": None})(xs)


def test_axis_size_mismatch_names_argument(xs):
    with pytest.raises(ValueError, match=r"axis_size=5.*argument 'x' .*size 8"):
        eqx_rng.vmap(lambda x: x, axis_size=5)(xs)


def test_mapped_sizes_disagree(xs):
    with pytest.raises(ValueError, match=r"argument 'x' has size 8.*argument 'y'"):
        eqx_rng.vmap(lambda x, y: x)(xs, jnp.zeros((4, 3)))


def test_scalar_cannot_be_mapped():
    with pytest.raises(ValueError, match=r"argument 'y' has shape \(\)"):
        eqx_rng.vmap(lambda x, y: x, in_axes=(0, 0))(jnp.zeros(3), jnp.array(1.0))


def test_int_axes_map_array_leaves_only(getkey):
    # A Module's static and Python leaves (bools, functions) are passed unchanged.
    mlps = eqx_rng.ensemble(eqx.nn.MLP, getkey(), 3, 2, 2, 4, 1)
    xs = jnp.ones((3, 5, 2))
    ys = eqx_rng.vmap(lambda m, x, flag: jax.vmap(m)(x), in_axes=(0, 0, 0))(
        mlps, xs, True
    )
    assert ys.shape == (3, 5, 2)


def test_single_key_positional_points_to_key_kwarg(xs, getkey):
    with pytest.raises(ValueError, match="argument 'key' .*pass the key as `key=`"):
        eqx_rng.vmap(add_noise)(xs, getkey())


def test_no_mapped_argument_needs_axis_size():
    with pytest.raises(ValueError, match="axis_size"):
        eqx_rng.vmap(lambda *, key: jr.normal(key))(key=jr.key(0))
    out = eqx_rng.vmap(lambda *, key: jr.normal(key), axis_size=3)(key=jr.key(0))
    assert out.shape == (3,)


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (jnp.zeros(3), TypeError, "typed scalar PRNG key"),
        (jax.random.PRNGKey(0), TypeError, "as_key"),
        (jr.split(jr.key(0), 3), TypeError, r"shape \(3,\)"),
        (3, TypeError, "typed scalar PRNG key"),
    ],
)
def test_bad_key_argument(bad, error, match, xs):
    with pytest.raises(error, match=match):
        eqx_rng.vmap(add_noise2)(xs, key=bad)


def test_legacy_key_message_starts_with_the_fix(xs):
    with pytest.raises(TypeError) as info:
        eqx_rng.vmap(add_noise2)(xs, key=jax.random.PRNGKey(0))
    fix, received = str(info.value).splitlines()
    assert fix.startswith("Convert the key with `eqx_rng.as_key(key)`")
    assert received.startswith(
        "`eqx_rng.vmap(fn)` got a legacy `uint32[2]` key (from `jax.random.PRNGKey`) "
        "for `key`"
    )


def test_keys_mode_is_validated():
    with pytest.raises(ValueError, match="'derive'.*'broadcast'"):
        eqx_rng.vmap(add_noise2, keys="share")


# ------------------------------------------------------------------ State


class RunningMean(eqx.Module):
    """A tiny stateful layer: stores the batch mean (pmean over `axis_name`)."""

    index: eqx.nn.StateIndex
    axis_name: str | None = eqx.field(static=True)

    def __init__(self, n, axis_name: str | None = "batch"):
        self.index = eqx.nn.StateIndex(jnp.zeros(n))
        self.axis_name = axis_name

    def __call__(self, x, state):
        value = x if self.axis_name is None else lax.pmean(x, self.axis_name)
        state = state.set(self.index, state.get(self.index) + value)
        return x - value, state


def test_state_unmapped_in_and_out_with_axis_name(getkey):
    model, state = eqx.nn.make_with_state(RunningMean)(3)
    x = jr.normal(getkey(), (B, 3))
    ys, new_state = eqx_rng.vmap(model, axis_name="batch")(x, state)
    assert ys.shape == (B, 3)
    got = new_state.get(model.index)
    assert got.shape == (3,)
    assert jnp.allclose(got, x.mean(0), atol=1e-6)
    # The same as the explicit ritual.
    ys2, state2 = eqx.filter_vmap(
        model, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
    )(x, state)
    assert tree_allclose((ys, new_state), (ys2, state2))


def test_state_inside_a_tuple_argument(getkey):
    model, state = eqx.nn.make_with_state(RunningMean)(3)
    x = jr.normal(getkey(), (B, 3))
    ys, (new_state,) = eqx_rng.vmap(
        lambda x, s: (lambda y, s: (y, (s,)))(*model(x, s[0])), axis_name="batch"
    )(x, (state,))
    assert new_state.get(model.index).shape == (3,)


def test_explicit_axes_win_for_state(getkey):
    model, state = eqx.nn.make_with_state(RunningMean)(3)
    x = jr.normal(getkey(), (B, 3))
    _, states = eqx_rng.vmap(model, axis_name="batch", out_axes=(0, 0))(x, state)
    assert states.get(model.index).shape == (B, 3)
    per_example = jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, (B, *a.shape)), state
    )
    _, states = eqx_rng.vmap(model, axis_name="batch", in_axes=(0, 0), out_axes=0)(
        x, per_example
    )
    assert states.get(model.index).shape == (B, 3)


def test_batched_state_raises_with_fix(getkey):
    model, state = eqx.nn.make_with_state(RunningMean)(3, axis_name=None)
    x = jr.normal(getkey(), (B, 3))
    with pytest.raises(ValueError, match=r"eqx.nn.State.*batched.*pmean.*out_axes"):
        eqx_rng.vmap(model, axis_name="batch")(x, state)
    # No axis_name: the unmapped State is still returned unmapped, and the fix
    # says to set axis_name.
    with pytest.raises(ValueError, match=r"batched.*Set `axis_name=`"):
        eqx_rng.vmap(model, in_axes=(0, None))(x, state)


def test_batched_state_raises_under_jit(getkey):
    model, state = eqx.nn.make_with_state(RunningMean)(3, axis_name=None)
    x = jr.normal(getkey(), (B, 3))
    step = eqx.filter_jit(lambda x, s: eqx_rng.vmap(model, axis_name="batch")(x, s))
    with pytest.raises(ValueError, match=r"eqx.nn.State.*batched"):
        step(x, state)


def test_explicit_unmapped_output_that_varies_raises(xs):
    with pytest.raises(ValueError, match=r"output at \[1\] has `out_axes` None"):
        eqx_rng.vmap(lambda x: (x, x), out_axes=(0, None))(xs)


def test_mapped_state_stays_mapped_without_axis_name(getkey):
    # Per-chain states: an outer vmap over chains maps them.
    make = eqx.nn.make_with_state(lambda n, *, key: RunningMean(n))
    model, state = eqx_rng.ensemble(make, getkey(), 4, 3)
    x = jr.normal(getkey(), (4, B, 3))

    def chain(model, state, x):
        return eqx_rng.vmap(model, axis_name="batch")(x, state)

    ys, new_state = eqx_rng.vmap(chain)(model, state, x)
    assert ys.shape == (4, B, 3)
    assert jnp.allclose(new_state.get(model.index), x.mean(1), atol=1e-6)


def test_state_with_eqx_rng_batch_norm_if_available(getkey):
    nn = pytest.importorskip("eqx_rng.nn")
    if not hasattr(nn, "BatchNorm"):
        pytest.skip("eqx_rng.nn.BatchNorm not written yet")
    bn, state = eqx.nn.make_with_state(nn.BatchNorm)(3, axis_name="batch")
    x = jr.normal(getkey(), (B, 3))
    ys, new_state = eqx_rng.vmap(bn, axis_name="batch")(x, state)
    assert ys.shape == (B, 3)
    assert all(
        leaf.shape[:1] != (B,) or leaf.ndim == 0
        for leaf in jax.tree_util.tree_leaves(new_state)
    )
    ys2, state2 = eqx.filter_vmap(
        bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
    )(x, state)
    assert tree_allclose((ys, new_state), (ys2, state2))


# ------------------------------------------------------ composition and cost


def test_filter_jit_matches_eager(xs, getkey):
    key = getkey()
    f = eqx_rng.vmap(add_noise2)
    assert jnp.array_equal(eqx.filter_jit(f)(xs, key=key), f(xs, key=key))


def test_filter_grad_through_vmap(getkey):
    model = eqx.nn.Linear(3, 2, key=getkey())
    x = jr.normal(getkey(), (B, 3))
    key = getkey()

    def forward(m, x, *, key):
        return jnp.sum(m(x) + 0.1 * jr.normal(key, (2,)))

    @eqx.filter_grad
    def grad_ours(m):
        return jnp.sum(eqx_rng.vmap(forward, in_axes=(None, 0))(m, x, key=key))

    @eqx.filter_grad
    def grad_plain(m):
        keys = eqx_rng.example_keys(key, jnp.arange(B))
        return jnp.sum(jax.vmap(lambda x, k: forward(m, x, key=k))(x, keys))

    assert tree_allclose(grad_ours(model), grad_plain(model))


def test_checks_run_only_at_trace_time(xs, getkey):
    calls = []

    def f(x, k):
        calls.append(1)
        return x, jr.key_data(k)

    step = jax.jit(lambda xs, k: eqx_rng.vmap(f, in_axes=(0, None))(xs, k))
    step(xs, getkey())
    n_trace = len(calls)
    assert n_trace == 2  # the analysis trace and the real one, once
    step(xs, getkey())
    step(xs, getkey())
    assert len(calls) == n_trace  # nothing per call under jit

    calls.clear()
    g = jax.jit(lambda xs, key: eqx_rng.vmap(lambda x, *, key: f(x, key))(xs, key=key))
    g(xs, getkey())
    g(xs, getkey())
    assert calls == [1]  # no key the same in every call: no analysis trace at all


def test_compiled_program_is_plain_vmap(xs, getkey):
    key = getkey()
    ours = jax.make_jaxpr(lambda xs, k: eqx_rng.vmap(add_noise2)(xs, key=k))(xs, key)
    plain = jax.make_jaxpr(
        lambda xs, k: jax.vmap(lambda x, i: add_noise2(x, key=jr.fold_in(k, i)))(
            xs, jnp.arange(B, dtype=jnp.uint32)
        )
    )(xs, key)
    assert len(ours.eqns) == len(plain.eqns)
    no_key = jax.make_jaxpr(eqx_rng.vmap(jnp.sin))(xs)
    assert len(no_key.eqns) == len(jax.make_jaxpr(jax.vmap(jnp.sin))(xs).eqns)


def test_nested_analysis_is_not_exponential(getkey):
    calls = []

    def f(x, k):
        calls.append(1)
        return x, k

    def g(x, k):
        return eqx_rng.vmap(f, in_axes=(0, None))(x, k)

    def h(x, k):
        return eqx_rng.vmap(g, in_axes=(0, None))(x, k)

    eqx_rng.vmap(h, in_axes=(0, None))(jnp.zeros((2, 2, 2, 3)), getkey())
    assert len(calls) <= 4  # depth + 1 traces of the innermost function


def test_global_index_when_sharded():
    code = """
import jax, jax.numpy as jnp, jax.random as jr
from jax.sharding import NamedSharding, PartitionSpec as P
import eqx_rng

def add_noise(x, *, key):
    return x + jr.normal(key, x.shape)

key = jr.key(0)
xs = jnp.zeros((16, 3))
eager = eqx_rng.vmap(add_noise)(xs, key=key)
mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
sharded = jax.device_put(xs, NamedSharding(mesh, P("batch")))
out = jax.jit(lambda xs, k: eqx_rng.vmap(add_noise)(xs, key=k))(sharded, key)
assert len(out.sharding.device_set) == 4, out.sharding
assert jnp.array_equal(out, eager)
print("ok")
"""
    assert "ok" in run_python(code, devices=4)


def test_global_index_on_explicit_mesh():
    # `jax.make_mesh` axes are `Explicit`: the per-call indices must be split like
    # the mapped axis, and the draws stay bitwise those of one device.
    code = """
import equinox as eqx, jax, jax.numpy as jnp, jax.random as jr, numpy as np
from jax.sharding import AxisType, PartitionSpec as P
import eqx_rng

def f(x, *, key):
    return x + jr.normal(key, x.shape), jr.key_data(key)

key = jr.key(0)
mesh = jax.make_mesh((8,), ("chains",))
assert mesh.axis_types == (AxisType.Explicit,)
x = jnp.zeros((8, 3))
xs = eqx_rng.shard(x, mesh, P("chains"))
step = eqx.filter_jit(lambda x, k: eqx_rng.vmap(f)(x, key=k))
ref, ref_jit = eqx_rng.vmap(f)(x, key=key), step(x, key)
assert jnp.array_equal(ref[1], jr.key_data(eqx_rng.grid_keys(key, (8,))))
out = step(xs, key)
assert jax.typeof(out[0]).sharding.spec[0] == "chains", jax.typeof(out[0])
assert eqx.tree_equal(out, ref_jit)
assert eqx.tree_equal(eqx_rng.vmap(f)(xs, key=key), ref)
with jax.set_mesh(mesh):
    assert eqx.tree_equal(step(xs, key), ref_jit)
# Another mapped axis.
xt = eqx_rng.shard(x.T, mesh, P(None, "chains"))
g = eqx_rng.vmap(f, in_axes=1, out_axes=1)
assert eqx.tree_equal(eqx.filter_jit(g)(xt, key=key), eqx.filter_jit(g)(x.T, key=key))
# Mapped arguments split differently: our error, naming both.
try:
    eqx_rng.vmap(lambda a, b, *, key: a + b)(xs, np.zeros((8, 3), np.float32), key=key)
except ValueError as e:
    assert "argument 'a' is split over the Explicit mesh axis 'chains'" in str(e), e
    assert "argument 'b' is not split" in str(e) and "chain_mesh" in str(e), e
else:
    raise AssertionError("no error")
print("ok")
"""
    assert "ok" in run_python(code, devices=8)


def test_nested_global_index_on_explicit_2d_mesh():
    code = """
import equinox as eqx, jax, jax.numpy as jnp, jax.random as jr
from jax.sharding import PartitionSpec as P
import eqx_rng

def f(x, *, key):
    return x + jr.normal(key, x.shape), jr.key_data(key)

key = jr.key(0)
mesh = jax.make_mesh((2, 4), ("chains", "batch"))
x = jnp.zeros((2, 8, 3))
xs = eqx_rng.shard(x, mesh, P("chains", "batch"))
g = eqx_rng.vmap(eqx_rng.vmap(f))
step = eqx.filter_jit(lambda x, k: g(x, key=k))
ref = g(x, key=key)
assert jnp.array_equal(ref[1], jr.key_data(eqx_rng.grid_keys(key, (2, 8))))
out = step(xs, key)
assert jax.typeof(out[0]).sharding.spec[:2] == ("chains", "batch"), jax.typeof(out[0])
assert eqx.tree_equal(out, step(x, key))
assert eqx.tree_equal(g(xs, key=key), ref)
print("ok")
"""
    assert "ok" in run_python(code, devices=8)


# ------------------------------------------- revised rule: only draws are checked


def test_split_then_fold_in_mapped_id_is_fine(getkey):
    key = getkey()

    def f(x, i, key):
        k1, _ = jr.split(key)
        return x + jr.normal(jr.fold_in(k1, i))

    ys = eqx_rng.vmap(f, in_axes=(0, 0, None))(jnp.zeros(B), jnp.arange(B), key)
    k1 = jr.split(key)[0]
    assert jnp.array_equal(ys[3], jr.normal(jr.fold_in(k1, 3)))


def test_split_table_indexed_by_mapped_id_is_fine(getkey):
    key = getkey()
    f = lambda i, key: jr.normal(jr.split(key, B)[i])
    ys = eqx_rng.vmap(f, in_axes=(0, None))(jnp.arange(B), key)
    assert jnp.array_equal(ys[5], jr.normal(jr.split(key, B)[5]))
    assert len(set(np.asarray(ys).tolist())) == B


def test_split_without_draw_is_fine(xs, getkey):
    f = lambda x, key: (x, jr.key_data(jr.split(key, 3)))
    _, data = eqx_rng.vmap(f, in_axes=(0, None))(xs, getkey())
    assert data.shape == (B, 3, 2)


def test_draw_from_a_split_child_is_caught(xs, getkey):
    def f(x, key):
        _, k2 = jr.split(key)
        return x + jr.normal(k2, x.shape)

    with pytest.raises(BroadcastKeyError, match="argument 'key' .*`random_bits`"):
        eqx_rng.vmap(f, in_axes=(0, None))(xs, getkey())


def test_gamma_with_mapped_shape_parameter_is_still_caught(getkey):
    # The key operand decides: a per-call `alpha` does not make the draws differ
    # in their randomness (every call reads the same bits).
    f = lambda a, key: jr.gamma(key, a)
    with pytest.raises(BroadcastKeyError, match="`random_gamma`"):
        eqx_rng.vmap(f, in_axes=(0, None))(jnp.arange(1.0, 9.0), getkey())


# ------------------------------------------------------- keys closed over by fn


def test_closed_over_key_is_caught_and_named(xs):
    k = jr.key(3)
    with pytest.raises(BroadcastKeyError, match="the key `k` closed over by"):
        eqx_rng.vmap(lambda x: x + jr.normal(k, x.shape))(xs)


def test_closed_over_key_is_caught_under_jit(xs):
    def step(xs, k):
        return eqx_rng.vmap(lambda x: x + jr.normal(k, x.shape))(xs)

    with pytest.raises(BroadcastKeyError, match="closed over by"):
        jax.jit(step)(xs, jr.key(3))


def test_closed_over_key_folded_with_mapped_data_is_fine(xs):
    k = jr.key(3)
    f = lambda x, i: x + jr.normal(jr.fold_in(k, i), x.shape)
    ys = eqx_rng.vmap(f)(xs, jnp.arange(B))
    assert jnp.array_equal(ys[2], jr.normal(jr.fold_in(k, 2), (3,)))


def test_key_from_a_fixed_seed_inside_fn_is_caught(xs):
    f = lambda x: x + jr.normal(jr.PRNGKey(0), x.shape)
    with pytest.raises(BroadcastKeyError, match="from a fixed seed"):
        eqx_rng.vmap(f)(xs)


def test_key_from_a_mapped_seed_is_fine(xs):
    f = lambda x, s: x + jr.normal(jr.key(s), x.shape)
    ys = eqx_rng.vmap(f)(xs, jnp.arange(B))
    assert jnp.array_equal(ys[4], jr.normal(jr.key(4), (3,)))


# ---------------------------------------------------------------- eqx_rng.shared


def test_shared_argument_is_exempt_and_key_stays_per_call(getkey):
    wkey, key = getkey(), getkey()

    def f(x, weight_key, *, key):
        return jr.normal(weight_key, ()) + x + jr.normal(key, ())

    ys = eqx_rng.vmap(f)(jnp.zeros(B), eqx_rng.shared(wkey), key=key)
    for i in (0, 5):
        assert ys[i] == f(0.0, wkey, key=eqx_rng.derive(key, i))
    with pytest.raises(BroadcastKeyError, match="eqx_rng.shared"):
        eqx_rng.vmap(f, in_axes=(0, None))(jnp.zeros(B), wkey, key=key)


def test_shared_part_of_a_pytree_and_keyword_argument(xs, getkey):
    k1, k2 = getkey(), getkey()

    def f(x, pair, *, other):
        a, b = pair
        return x + jr.normal(a, x.shape) + b + jr.normal(other, x.shape)

    pair = (eqx_rng.shared(k1), jnp.arange(B, dtype=jnp.float32)[:, None])
    ys = eqx_rng.vmap(f)(xs, pair, other=eqx_rng.shared(k2))
    assert jnp.array_equal(ys[2], f(xs[2], (k1, jnp.full((1,), 2.0)), other=k2))


def test_shared_module_is_unmapped(xs, getkey):
    model = Noisy(jnp.array(1.0), getkey())
    ys = eqx_rng.vmap(lambda m, x: m(x))(eqx_rng.shared(model), xs)
    assert jnp.array_equal(ys[0], ys[1])


def test_shared_with_explicit_mapping_axes_is_refused(xs, getkey):
    with pytest.raises(ValueError, match="argument 'key' is wrapped in `eqx_rng"):
        eqx_rng.vmap(add_noise, in_axes=(0, 0))(xs, eqx_rng.shared(getkey()))


def test_shared_outside_eqx_rng_vmap_is_a_clear_error(getkey):
    marked = eqx_rng.shared(getkey())
    with pytest.raises(TypeError, match=r"only marks an argument"):
        np.asarray(eqx_rng.shared(jnp.zeros(2)))
    with pytest.raises(TypeError, match=r"Shared"):
        jnp.sin(eqx_rng.shared(jnp.zeros(2)))  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match=r"Shared"):
        jr.normal(marked, (2,))  # pyright: ignore[reportArgumentType]
    with pytest.raises(AttributeError, match=r"only marks an argument"):
        marked.shape  # noqa: B018
    assert "eqx_rng.shared(" in repr(marked)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("out_axes", [5, -3, (0, 5)])
def test_out_axes_out_of_range_names_the_output(out_axes):
    f = eqx_rng.vmap(lambda x: (x, x), out_axes=out_axes)
    with pytest.raises(ValueError, match=r"out_axes=\.\.\.\)`: the output at"):
        f(jnp.zeros((4, 3)))


@pytest.mark.parametrize("bad", ["a", 1.5, True, (0, "x")])
def test_invalid_axes_entries_name_the_argument(bad):
    with pytest.raises(ValueError, match=r"in_axes=\.\.\.\)`: every entry"):
        eqx_rng.vmap(lambda x: x, in_axes=bad)
    with pytest.raises(ValueError, match=r"out_axes=\.\.\.\)`: every entry"):
        eqx_rng.vmap(lambda x: x, out_axes=bad)


def test_state_mapped_without_axis_name_names_state_and_fix(getkey):
    model, state = eqx.nn.make_with_state(RunningMean)(3)
    xs = jr.normal(getkey(), (B, 3))
    with pytest.raises(ValueError, match=r"eqx\.nn\.State.*set `axis_name=`"):
        eqx_rng.vmap(model)(xs, state)
