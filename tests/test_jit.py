"""`eqx_rng.jit`: `eqx.filter_jit`'s results and retracing, at `jax.jit`'s dispatch."""

import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import tree_allclose

import eqx_rng


class Scaled(eqx.Module):
    """A Module with a static field, a Python float and an activation."""

    linear: eqx.nn.Linear
    scale: float
    depth: int = eqx.field(static=True)
    act: Callable = jax.nn.tanh

    def __call__(self, x):
        for _ in range(self.depth):
            x = self.act(self.linear(x))
        return self.scale * x


def _scaled(seed=0, scale=2.0, depth=2):
    return Scaled(eqx.nn.Linear(3, 3, key=jr.key(seed)), scale, depth)


class Counted:
    """A function that counts how often it is traced."""

    def __init__(self, fn):
        self.fn = fn
        self.traces = 0

    def __call__(self, *args, **kwargs):
        self.traces += 1
        return self.fn(*args, **kwargs)


def test_module_with_static_fields_matches_filter_jit():
    model, x = _scaled(), jnp.arange(3.0)

    def f(model, x, shift):
        return model(x) + shift

    for shift in (1.0, jnp.array(1.0)):
        assert tree_allclose(
            eqx_rng.jit(f)(model, x, shift), eqx.filter_jit(f)(model, x, shift)
        )
    # The Module itself as `fn`: its arrays are traced arguments.
    assert tree_allclose(eqx_rng.jit(model)(x), eqx.filter_jit(model)(x))


def test_bound_method_and_method_decorator():
    model, x = _scaled(), jnp.arange(3.0)
    fast = eqx_rng.jit(model.__call__)
    assert tree_allclose(fast(x), eqx.filter_jit(model.__call__)(x))

    class WithJit(eqx.Module):
        w: jax.Array

        @eqx_rng.jit
        def apply(self, x, *, power=1):
            return (self.w * x) ** power

    m = WithJit(jnp.full(3, 2.0))
    assert tree_allclose(m.apply(x, power=2), (2.0 * x) ** 2)


def test_keyword_arguments_and_pytree_outputs():
    def f(x, *, y, mode="sum"):
        out = x + y if mode == "sum" else x * y
        return {"out": out, "mode": mode, "n": 3, "none": None}

    fast, ref = eqx_rng.jit(f), eqx.filter_jit(f)
    x, y = jnp.arange(3.0), jnp.ones(3)
    for mode in ("sum", "prod"):
        got = fast(x, y=y, mode=mode)
        assert tree_allclose(got, ref(x, y=y, mode=mode))
        assert got["mode"] == mode and got["n"] == 3 and got["none"] is None


def test_retraces_on_new_static_shape_or_dtype_only():
    f = Counted(lambda model, x, n, z: model(x) * n + jnp.sum(z).astype(jnp.float32))
    fast = eqx_rng.jit(f)
    model, x, z = _scaled(), jnp.arange(3.0), jnp.ones(2)
    fast(model, x, 2, z)
    fast(model, x, 2, z)
    fast(model, x + 1, 2, z + 1)  # new values: no retrace
    fast(_scaled(seed=1), x, 2, z)  # a new Module of the same structure: no retrace
    assert f.traces == 1
    fast(model, x, 3, z)  # a new static value
    assert f.traces == 2
    fast(model, x, 3, jnp.ones((2, 5)))  # a new shape
    assert f.traces == 3
    fast(model, x, 3, z.astype(jnp.float16))  # a new dtype
    assert f.traces == 4
    fast(_scaled(depth=3), x, 2, z)  # a new static field
    assert f.traces == 5
    fast(model, x, 2, z)  # back to the first variant: cached
    fast(model, x, 2, np.ones(2, np.float32))  # NumPy: traced as an array
    assert f.traces == 5


def test_composes_with_jit_vmap_and_grad():
    model, x = _scaled(), jnp.arange(3.0)
    fast, ref = eqx_rng.jit(model), eqx.filter_jit(model)
    xs = jnp.arange(12.0).reshape(4, 3)
    assert tree_allclose(jax.vmap(fast)(xs), jax.vmap(ref)(xs))
    assert tree_allclose(jax.jit(fast)(x), ref(x))

    def loss(model, x):
        return jnp.sum(eqx_rng.jit(lambda m, x: m(x))(model, x))

    got = eqx.filter_grad(loss)(model, x)
    want = eqx.filter_grad(lambda m, x: jnp.sum(m(x)))(model, x)
    assert tree_allclose(got, want)


def test_typed_keys_as_arguments():
    def sample(x, key, *, noise_key=None):
        y = x + jr.normal(key, x.shape)
        if noise_key is not None:
            y = y + jr.uniform(noise_key, x.shape)
        return y, key

    x, key = jnp.zeros(4), jr.key(0)
    fast, ref = eqx_rng.jit(sample), eqx.filter_jit(sample)
    got, key_out = fast(x, key, noise_key=jr.key(1))
    want, _ = ref(x, key, noise_key=jr.key(1))
    assert jnp.array_equal(got, want)
    assert jnp.array_equal(jr.key_data(key_out), jr.key_data(key))
    # A new key draws new numbers from the same compiled code.
    assert not jnp.array_equal(fast(x, jr.key(2), noise_key=jr.key(1))[0], got)


def test_donation():
    # CPU donates too: a donated input is deleted by the call.
    def f(x, y):
        return x + 1, y + 1

    x, y = jnp.ones(3), jnp.ones(3)
    eqx_rng.jit(f)(x, y)
    assert not x.is_deleted() and not y.is_deleted()
    out = eqx_rng.jit(f, donate="all")(x, y)
    assert x.is_deleted() and y.is_deleted()
    assert tree_allclose(out, (jnp.full(3, 2.0), jnp.full(3, 2.0)))
    x, y = jnp.ones(3), jnp.ones(3)
    eqx_rng.jit(f, donate="all-except-first")(x, y)
    assert not x.is_deleted() and y.is_deleted()
    # The first parameter passed by keyword is still "the first".
    x, y = jnp.ones(3), jnp.ones(3)
    eqx_rng.jit(f, donate="all-except-first")(x=x, y=y)
    assert not x.is_deleted() and y.is_deleted()


def test_unusable_donation_warns_only_with_warn():
    def total(x):
        return jnp.sum(x)  # a scalar cannot reuse x's buffer

    eqx_rng.jit(total, donate="all")(jnp.ones(5))  # silenced (warnings are errors)
    with pytest.warns(UserWarning, match="donated buffers were not usable"):
        eqx_rng.jit(total, donate="warn")(jnp.ones(5))


def test_module_reused_across_calls_sees_in_place_changes():
    # Modules made of immutable containers are not re-flattened while the same
    # object comes back; a list inside could change in place, so it is re-read.
    class Holder(eqx.Module):
        ws: list

    h = Holder([jnp.ones(2)])
    fast = eqx_rng.jit(lambda h: h.ws[0] * 2)
    assert jnp.array_equal(fast(h), jnp.full(2, 2.0))
    assert jnp.array_equal(fast(h), jnp.full(2, 2.0))
    h.ws[0] = jnp.full(2, 5.0)
    assert jnp.array_equal(fast(h), jnp.full(2, 10.0))
    h.ws.append(jnp.ones(3))
    assert jnp.array_equal(fast(h), jnp.full(2, 10.0))


def test_error_if_raises_equinox_runtime_error():
    def checked(x):
        return eqx.error_if(x, x < 0, "x must be non-negative")

    fast = eqx_rng.jit(checked)
    assert jnp.array_equal(fast(jnp.ones(2)), jnp.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(eqx.EquinoxRuntimeError, match="x must be non-negative"):
            jax.block_until_ready(fast(-jnp.ones(2)))


def test_errors():
    with pytest.raises(ValueError, match=r"eqx_rng.jit\(fn, donate=...\).*'sideways'"):
        eqx_rng.jit(lambda x: x, donate="sideways")
    with pytest.raises(TypeError, match="x"):
        eqx_rng.jit(lambda x: x)()


def test_lower_gives_the_compiled_program():
    model, x = _scaled(), jnp.arange(3.0)
    fast = eqx_rng.jit(model)
    compiled = fast.lower(x).compile()  # type: ignore[attr-defined]
    assert compiled.memory_analysis() is not None
    assert "eqx_rng.jit" in repr(fast)
