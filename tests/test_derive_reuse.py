"""`debug.key_reuse()` catches reuse by derivation: two draws from keys derived from
the same parent by the same path, eagerly and under jit, vmap and scan."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from jax import lax

import eqx_rng
from eqx_rng import derive
from eqx_rng._derive_reuse import active_scope
from eqx_rng.debug import key_reuse

_NAMED = r"(?s)derived more than once.*derive\(<.*key.*>, 'dropout1'\): derived 2 times"


def _copy_pasted(x, key):
    # Two "layers" given the same derived key by a copy-paste.
    a = x * jr.normal(derive(key, "dropout1"), x.shape)
    return a * jr.normal(derive(key, "dropout1"), x.shape)


def _distinct(x, key):
    unused = derive(key, "dropout1")  # derived twice, drawn once: fine
    del unused
    a = x * jr.normal(derive(key, "dropout1"), x.shape)
    return a * jr.normal(derive(key, "dropout2"), x.shape)


def _scanned(layer):
    def run(x, key):
        def body(carry, t):
            return layer(carry, derive(key, t)), None

        return lax.scan(body, x, jnp.arange(3))[0]

    return run


def _while(layer):
    def run(x, key):
        def body(carry):
            t, h = carry
            return t + 1, layer(h, derive(key, t))

        return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    return run


def _vmapped(layer):
    return lambda xs, key: jax.vmap(layer)(xs, jr.split(key, xs.shape[0]))


_TRANSFORMS = {
    "eager": lambda f: f,
    "jit": jax.jit,
    "vmap": _vmapped,
    "jit_vmap": lambda f: jax.jit(_vmapped(f)),
    "scan": _scanned,
    "jit_scan": lambda f: jax.jit(_scanned(f)),
    "while_loop": _while,
    "eqx_rng_vmap": lambda f: (
        lambda xs, key: eqx_rng.vmap(lambda x, *, key: f(x, key))(xs, key=key)
    ),
    "filter_jit": eqx.filter_jit,
}


def _input(name):
    return jnp.ones((4, 3)) if "vmap" in name else jnp.ones(3)


@pytest.mark.parametrize("name", list(_TRANSFORMS))
def test_same_path_drawn_twice_raises_naming_the_path(name):
    f = _TRANSFORMS[name](_copy_pasted)
    with pytest.raises(jax.errors.KeyReuseError, match=_NAMED):
        with key_reuse():
            f(_input(name), jr.key(0))


@pytest.mark.parametrize("name", list(_TRANSFORMS))
def test_distinct_paths_and_one_draw_per_path_are_fine(name):
    f = _TRANSFORMS[name](_distinct)
    with key_reuse():
        y = f(_input(name), jr.key(0))
    assert y.shape == _input(name).shape


def test_without_key_reuse_nothing_is_memoised():
    k = jr.key(0)
    assert derive(k, "a") is not derive(k, "a")
    assert jnp.array_equal(_copy_pasted(jnp.ones(3), k), _copy_pasted(jnp.ones(3), k))


def test_memo_is_by_value_for_concrete_keys_and_items():
    with key_reuse():
        a = derive(jr.key(3), "layer", 2)
        b = derive(jr.key(3), "layer", jnp.int32(2))  # another object, same bits
        c = derive(derive(jr.key(3), "layer"), 2)
        assert a is b is c
        assert derive(jr.key(3), "layer", 3) is not a


def test_one_step_key_used_for_two_steps():
    root = jr.key(0)
    draw = jax.jit(lambda k: jr.normal(k, (2,)))
    with pytest.raises(jax.errors.KeyReuseError, match=r"derive\(<key .*>, 1\)"):
        with key_reuse():
            for step in [0, 1, 1]:  # the step counter was not advanced
                draw(derive(root, step))
    with key_reuse():
        for step in [0, 1, 2]:
            draw(derive(root, step))


def test_eager_derivation_and_jit_derivation_share_one_key():
    root = jr.key(0)
    with pytest.raises(jax.errors.KeyReuseError, match="'noise'"):
        with key_reuse():
            jr.normal(derive(root, "noise"))
            jax.jit(lambda: jr.normal(derive(root, "noise")))()


def test_scan_body_drawing_from_a_constant_path_every_step():
    root = jr.key(0)

    def same_noise_every_step(carry, _):
        return carry + jr.normal(derive(root, "noise")), None

    with pytest.raises(jax.errors.KeyReuseError, match="scan body"):
        with key_reuse():
            lax.scan(same_noise_every_step, 0.0, None, length=3)


def test_one_mask_drawn_once_and_multiplied_at_every_step_is_fine():
    # Locked dropout: one draw, many uses.
    def run(x, key):
        mask = jr.normal(derive(key, "mask"), x.shape)

        def body(h, _):
            return jnp.tanh(h * mask), None

        return lax.scan(body, x, None, length=5)[0]

    def locked_dropout(x, key):
        mask = eqx_rng.nn.Dropout(0.5).mask(x.shape, key=derive(key, "mask"))

        def body(h, _):
            return h * mask, None

        return lax.scan(body, x, None, length=5)[0]

    with key_reuse():
        run(jnp.ones(3), jr.key(0))
        jax.jit(run)(jnp.ones(3), jr.key(1))
        locked_dropout(jnp.ones(3), jr.key(2))
        jax.jit(locked_dropout)(jnp.ones(3), jr.key(3))


def test_tree_normal_twice_with_one_key_is_reuse():
    params = {"w": jnp.zeros((2, 2))}
    with pytest.raises(jax.errors.KeyReuseError, match=r"\"\['w'\]\""):
        with key_reuse():
            eqx_rng.tree_normal(jr.key(0), params)
            eqx_rng.tree_normal(jr.key(0), params)


def test_plain_reuse_keeps_jax_error_unchanged():
    with pytest.raises(jax.errors.KeyReuseError) as info:
        with key_reuse():
            k = jr.key(0)
            jr.normal(k)
            jr.normal(k)
    assert "derived more than once" not in str(info.value)


def test_memo_is_dropped_when_the_block_ends():
    k = jr.key(0)
    with key_reuse():
        jr.normal(derive(k, "a"))
    with key_reuse():
        jr.normal(derive(k, "a"))  # a new block starts afresh
    assert active_scope() is None


def test_derive_reuse_error_is_a_key_reuse_error_with_a_readable_message():
    with pytest.raises(jax.errors.KeyReuseError) as info:
        with key_reuse():
            _copy_pasted(jnp.ones(3), jr.key(0))
    message = str(info.value)
    assert message.startswith("Key reuse inside `eqx_rng.debug.key_reuse()`")
    assert "Previously-consumed key" in message  # JAX's own diagnosis is kept
    assert "DerivedKeyReuseError" not in message  # no link to a missing page


class _Net(eqx.Module):
    layer: eqx.nn.Linear
    drop: eqx_rng.nn.Dropout
    second_path: str = eqx.field(static=True)

    def __call__(self, x, *, key):
        h = self.drop(self.layer(x), key=derive(key, "dropout1"))
        return self.drop(h, key=derive(key, self.second_path))


def _train_two_steps(second_path):
    def loss_fn(model, state, batch, *, key):
        out = eqx_rng.vmap(lambda x, *, key: model(x, key=key))(batch, key=key)
        return jnp.mean(out**2), (state, {})

    model = _Net(
        eqx.nn.Linear(3, 3, key=jr.key(1)), eqx_rng.nn.Dropout(0.2), second_path
    )
    opt = optax.sgd(0.1)
    ts = eqx_rng.TrainState.create(model, opt, key=jr.key(2))
    step = eqx_rng.make_train_step(loss_fn, opt)
    for _ in range(2):
        ts, _ = step(ts, jnp.ones((4, 3)))


def test_a_model_trained_with_make_train_step():
    with key_reuse():
        _train_two_steps("dropout2")  # distinct paths: no false alarm
    with pytest.raises(jax.errors.KeyReuseError, match="'dropout1'\\): derived 2"):
        with key_reuse():
            _train_two_steps("dropout1")  # the copy-paste bug, caught in training


def test_keys_derived_in_a_branch_or_checkpoint_stay_in_that_trace():
    # The same path derived from a closed-over traced key inside `cond` or
    # `checkpoint` and again outside: each trace gets its own key (no tracer leaks
    # out of the inner trace), and one draw per trace is fine.
    @jax.jit
    def f(x, key):
        noisy = lambda: x * jr.normal(derive(key, "d"), x.shape)  # noqa: E731
        y = lax.cond(x[0] > 0, noisy, lambda: x)
        y = jax.checkpoint(lambda x: x * jr.normal(derive(key, "d"), x.shape))(y)
        return y, derive(key, "d")

    with key_reuse():
        y, k = f(jnp.ones(3), jr.key(0))
    assert y.shape == (3,) and k.shape == ()
