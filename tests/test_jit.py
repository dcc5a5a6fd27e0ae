"""`eqx_rng.jit`: `eqx.filter_jit`'s results and retracing, at `jax.jit`'s dispatch."""

import collections
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


def test_static_outputs_follow_the_shapes_of_each_call():
    # A new shape retraces the same variant; each trace's static outputs come back
    # with its own calls (the shape of an earlier call is not returned later).
    fast = eqx_rng.jit(lambda x: (x * 2, x.shape, len(x)))
    for n in (3, 4, 3, 5, 4):
        y, shape, length = fast(jnp.ones(n))
        assert shape == (n,) and length == n and y.shape == (n,)


class _Counter(eqx.Module):
    index: eqx.nn.StateIndex

    def __init__(self):
        self.index = eqx.nn.StateIndex((jnp.zeros(2), jnp.zeros(())))

    def __call__(self, x, state):
        total, count = state.get(self.index)
        return x + total, state.set(self.index, (total + x, count + 1))


def test_state_fast_path_follows_state_set():
    counter, state = eqx.nn.make_with_state(_Counter)()
    fast, ref = eqx_rng.jit(counter), eqx.filter_jit(counter)
    ref_state = jax.tree.map(jnp.copy, state)
    x = jnp.array([1.0, 2.0])
    for _ in range(4):  # the returned State is fed back: new values every call
        y, state = fast(x, state)
        want, ref_state = ref(x, ref_state)
        assert tree_allclose(y, want)
        assert tree_allclose(state, ref_state)
    # A State changed with `State.set` outside the jitted call is read afresh.
    state = state.set(counter.index, (jnp.full(2, 10.0, jnp.float32), jnp.zeros(())))
    y, _ = fast(x, state)
    assert jnp.array_equal(y, jnp.full(2, 10.0) + x)


def test_state_of_another_structure_or_dtype_is_not_mixed_up():
    counter, state = eqx.nn.make_with_state(_Counter)()
    f = Counted(lambda x, state: counter(x, state))
    fast = eqx_rng.jit(f)
    x = jnp.ones(2)
    fast(x, state)
    fast(x, state)
    assert f.traces == 1
    # The same keys with values of another dtype: a new trace, the right numbers.
    wide = eqx.nn.State.tree_unflatten(
        tuple(state._state),  # type: ignore[arg-type]  # noqa: SLF001
        ((jnp.ones(2, jnp.float16), jnp.zeros((), jnp.float16)),),
    )
    y, new = fast(x.astype(jnp.float16), wide)
    assert f.traces == 2 and y.dtype == jnp.float16
    assert jnp.array_equal(y, jnp.full(2, 2.0, jnp.float16))
    # A State with other keys (another model's): compiled separately.
    other, other_state = eqx.nn.make_with_state(lambda: [_Counter(), _Counter()])()
    g = eqx_rng.jit(lambda x, s: other[1](x, s))
    y, _ = g(x, other_state)
    assert jnp.array_equal(y, x)
    three = (jnp.full(2, 3.0, jnp.float32), jnp.zeros(()))
    y, _ = g(x, other_state.set(other[1].index, three))
    assert jnp.array_equal(y, x + 3.0)
    # `state` (one Counter's keys) where `other_state` (two) was: refused by the
    # model, as without `eqx_rng.jit`, not read as the other structure.
    with pytest.raises(KeyError):
        g(x, state)


def test_same_state_object_again_and_states_alternating():
    # An evaluation loop passes one State object again and again: its leaves are
    # read once. Two States of the same keys, alternating, must each be read as
    # themselves, and a State made with `State.set` from the first is read afresh.
    counter, state = eqx.nn.make_with_state(_Counter)()
    fast = eqx_rng.jit(counter)
    x = jnp.array([1.0, 2.0])
    three = (jnp.full(2, 3.0, jnp.float32), jnp.zeros(()))
    other = eqx.nn.State.tree_unflatten(
        tuple(state._state),  # type: ignore[arg-type]  # noqa: SLF001
        (three,),
    )
    for _ in range(3):
        y, _ = fast(x, state)
        assert jnp.array_equal(y, x)
        y, _ = fast(x, other)
        assert jnp.array_equal(y, x + 3.0)
    five = (jnp.full(2, 5.0, jnp.float32), jnp.zeros(()))
    newer = other.set(counter.index, five)
    assert jnp.array_equal(fast(x, newer)[0], x + 5.0)
    with pytest.raises(ValueError, match="Attempted to use old state"):
        fast(x, other)  # `set` invalidated it


def test_alternating_structures_each_keep_their_variant():
    # Each variant has its own written fast path; alternating between two
    # structures (and two static values) gives each call its own numbers.
    f = Counted(lambda tree, scale: scale * sum(jax.tree.leaves(tree)))
    fast = eqx_rng.jit(f)
    a = (jnp.ones(2), jnp.ones(2))
    b = {"u": jnp.ones(2), "v": jnp.ones(2), "w": jnp.ones(2)}
    for _ in range(3):
        assert jnp.array_equal(fast(a, 2.0), jnp.full(2, 4.0))
        assert jnp.array_equal(fast(b, 2.0), jnp.full(2, 6.0))
        assert jnp.array_equal(fast(b, 3.0), jnp.full(2, 9.0))
    assert f.traces == 3


def test_keyword_arguments_take_the_written_path_too():
    # `key=` by keyword is how eqx_rng code calls everything: such calls repeat on
    # the written path; a static keyword value that changes, or a keyword argument
    # that is a pytree, still gets its own variant and the right numbers.
    model = eqx.nn.MLP(2, 2, 8, 1, key=jr.key(0))
    f = Counted(
        lambda model, x, *, key, scale=1.0: (
            scale * jax.vmap(model)(x) + jr.normal(key, (x.shape[0], 2))
        )
    )
    fast, ref = eqx_rng.jit(f), eqx.filter_jit(f.fn)
    x = jnp.ones((3, 2))
    for i in range(3):
        k = jr.key(i)
        assert tree_allclose(fast(model, x, key=k), ref(model, x, key=k))
        want = ref(model, x, key=k, scale=2.0)
        assert tree_allclose(fast(model, x, key=k, scale=2.0), want)
    assert f.traces == 2  # one variant per value of the static `scale`
    from eqx_rng._jit_plan import _never

    plan = fast._plan  # type: ignore[attr-defined]
    assert plan.nk == 2 and plan.fast is not _never  # the written path is in use
    g = eqx_rng.jit(lambda x, *, shift: x + sum(jax.tree.leaves(shift)))
    for shift in ((jnp.ones(2), 1.0), jnp.array(2.0), 3.0, jnp.array(4.0)):
        want = jnp.ones(2) + sum(jax.tree.leaves(shift))
        assert jnp.array_equal(g(jnp.ones(2), shift=shift), want)
        assert jnp.array_equal(g(jnp.ones(2), shift=shift), want)


def test_donated_fast_path_feeds_outputs_back():
    # The written fast path with donation (warnings silenced): every call deletes
    # its inputs and the outputs fed back are the next inputs.
    step = eqx_rng.jit(lambda x, y: (x + 1, y * 2), donate="all")
    x, y = jnp.zeros(3), jnp.ones(3)
    for i in range(1, 5):
        old = (x, y)
        x, y = step(x, y)
        assert old[0].is_deleted() and old[1].is_deleted()
        assert jnp.array_equal(x, jnp.full(3, float(i)))
        assert jnp.array_equal(y, jnp.full(3, 2.0**i))


def test_stale_state_is_refused_as_equinox_refuses_it():
    counter, state = eqx.nn.make_with_state(_Counter)()
    fast = eqx_rng.jit(counter)
    x = jnp.ones(2)
    fast(x, state)
    fast(x, state)  # the shorter path is in use
    state.set(counter.index, (jnp.ones(2), jnp.zeros(())))  # invalidates `state`
    with pytest.raises(ValueError, match="Attempted to use old state"):
        fast(x, state)
    with pytest.raises(ValueError, match="Attempted to use old state"):
        eqx.filter_jit(counter)(x, state)


def test_equinox_state_layout_that_the_fast_path_reads():
    # `eqx_rng.jit` reads an `eqx.nn.State`'s leaves from its private dict
    # (`State._state`, values in `State.tree_flatten`'s order). If Equinox changes
    # that, this test fails; `eqx_rng.jit` itself falls back to flattening.
    counter, state = eqx.nn.make_with_state(_Counter)()
    inner = state._state  # noqa: SLF001
    assert type(inner) is dict
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert leaves == jax.tree_util.tree_leaves(tuple(inner.values()))
    assert treedef.node_data()[1] == tuple(inner)  # type: ignore[index]
    new = state.set(counter.index, (jnp.ones(2), jnp.ones(())))
    assert type(state._state) is not dict  # noqa: SLF001
    assert type(new._state) is dict  # noqa: SLF001


def test_module_outputs_are_rebuilt_as_equinox_does():
    # A Module returned by the jitted function is rebuilt by a per-structure
    # builder; it equals what `eqx.filter_jit` returns, field by field.
    model = _scaled()

    def shifted(model, x):
        linear = eqx.tree_at(lambda l: l.bias, model.linear, model.linear.bias + x)
        return eqx.tree_at(lambda m: m.linear, model, linear), model.depth

    fast, ref = eqx_rng.jit(shifted), eqx.filter_jit(shifted)
    x = jnp.arange(3.0)
    for _ in range(3):
        got, want = fast(model, x), ref(model, x)
        assert tree_allclose(got, want)
        assert type(got[0]) is Scaled and vars(got[0]).keys() == vars(want[0]).keys()
        assert got[0].act is jax.nn.tanh and got[0].depth == 2


def test_rebuilder_matches_unflatten_on_mixed_trees():
    # The per-structure builder behind rebuilt outputs: every node kind gives what
    # `tree_unflatten` gives; subtrees without arrays that could be changed in
    # place (a list) are built anew each time, immutable ones may be shared.
    from eqx_rng._rebuild import DYNAMIC, rebuilder

    counter, state = eqx.nn.make_with_state(_Counter)()
    Pair = collections.namedtuple("Pair", "a b")
    tree = {
        "model": _scaled(),
        "state": state,
        "pair": Pair(jnp.ones(2), [None, 3, "s"]),
        "empty": [],
        "static": (eqx_rng.nn.Dropout(0.5), None),
        # Mostly constant fields: rebuilt from a copy of its template dict.
        "bn": eqx.nn.BatchNorm(3, "batch", mode="batch"),
    }
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    template = tuple(DYNAMIC if eqx.is_array(x) else x for x in leaves)
    rebuild = rebuilder(treedef, template)
    assert rebuild is not None
    new = [jnp.full(jnp.shape(x), 7.0) for x in leaves if eqx.is_array(x)]
    it = iter(new)
    want = treedef.unflatten([next(it) if eqx.is_array(x) else x for x in leaves])
    got, again = rebuild(new), rebuild(new)
    assert jax.tree.structure(got) == treedef
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert all(a is b for a, b in zip(got_leaves, want_leaves, strict=True))
    assert vars(got["model"]).keys() == vars(want["model"]).keys()
    assert list(vars(got["bn"]).items()) == list(vars(want["bn"]).items())
    assert got["pair"].b is not again["pair"].b  # a list: never shared
    assert got["state"] is not again["state"]  # a State: never shared
    assert got["state"].get(counter.index)[0] is want["state"].get(counter.index)[0]
    # Nothing dynamic: the caller's own path is kept.
    static_leaves, static_def = jax.tree_util.tree_flatten((1, "a"))
    assert rebuilder(static_def, tuple(static_leaves)) is None
