"""The fast paths on models written the way Equinox's examples write them.

Every model of `tests/eqx_corpus/` goes through:

- `eqx_rng.jit` against `eqx.filter_jit` on the same function and arguments, over
  repeated calls (the State fed back, a State changed with `State.set`, a new Module
  of the same structure, the same Module again, new shapes, a keyword argument), a
  bound method, and a hand-written Adam step under `donate="all"`;
- `eqx_rng.ensemble` against building the chains one by one with the same keys,
  compiled once;
- `make_train_step` against the hand-written `eqx.filter_jit` step with the same
  keys, and an `eqx_rng.save` / `load` round trip of its TrainState.

`eqx_rng.jit` and `eqx.filter_jit` trace the same function on the same arrays, so
their results are compared bit for bit. `make_train_step` is compared bit for bit
too: its program computes the same loss, gradients and Adam update (it also computes
metrics, which do not feed into the update).
"""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from eqx_corpus import CASES, Case
from eqx_corpus._fields import Fields
from eqx_corpus._stateful import Stateful
from eqx_corpus._vision import gan_scores

import eqx_rng
from eqx_rng import _jit_plan
from eqx_rng._util import is_typed_key

_BY_NAME = {c.name: c for c in CASES}
_CHAINS = 3
_STEPS = 3


def _same(a: Any, b: Any) -> bool:
    """Same tree structure, array leaves equal bit for bit (same dtype and shape;
    typed keys by their bits), other leaves equal."""
    la, ta = jtu.tree_flatten(a)
    lb, tb = jtu.tree_flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        if eqx.is_array(x) != eqx.is_array(y):
            return False
        if not eqx.is_array(x):
            if x != y:
                return False
            continue
        if is_typed_key(x) or is_typed_key(y):
            if not (is_typed_key(x) and is_typed_key(y)):
                return False
            x, y = jr.key_data(x), jr.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def _close(a: Any, b: Any, steps: int) -> bool:
    """As `_same`, except that floating arrays may differ by float32 rounding
    accumulated over `steps` optimizer steps: `8 * steps` units of float32 epsilon,
    relative to the value (absolute below 1). Two different programs computing the
    same maths (eqx_rng's step and the hand-written one) are fused differently by
    XLA, and the test suite's compile settings (older fusion emitters) make them
    round differently in the last bits; a wrong key or gradient moves a parameter
    by the learning rate, 1e-2, five orders of magnitude more."""
    la, ta = jtu.tree_flatten(a)
    lb, tb = jtu.tree_flatten(b)
    if ta != tb:
        return False
    tol = 8 * steps * float(jnp.finfo(jnp.float32).eps)
    for x, y in zip(la, lb, strict=True):
        if not (eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)):
            if not _same(x, y):
                return False
            continue
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not np.all(np.abs(x - y) <= tol * np.maximum(1.0, np.abs(y))):
            return False
    return True


@eqx.filter_jit
def _copy(tree: Any) -> Any:
    """New buffers for every array (for calls that donate their arguments)."""
    return jtu.tree_map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, tree)


@functools.cache
def _make(name: str) -> Any:
    """`case.make` under `eqx.filter_jit`: one compile per case, where building
    eagerly would compile each of its dozens of small operations on its own."""
    return eqx.filter_jit(_BY_NAME[name].make)


@functools.cache
def _built(name: str) -> tuple[Any, Any]:
    """`(model, state)` of a case (`state` is `None` for a stateless model)."""
    out = _make(name)(key=jr.key(0))
    return out if _BY_NAME[name].stateful else (out, None)


@functools.cache
def _batch_fn(name: str, n: int) -> Any:
    return jax.jit(lambda t: _BY_NAME[name].batch(t, n))


@functools.cache
def _batch(case: Case, t: int, n: int) -> Any:
    """`case.batch(t, n)`, compiled once per case and size (built eagerly, the
    batches' dozens of small operations would each compile), and kept."""
    return _batch_fn(case.name, n)(t)


def _args(case: Case, model: Any, state: Any, x: Any, key: Any) -> tuple:
    return (model, state, x, key) if case.stateful else (model, x, key)


def _state_of(case: Case, out: Any) -> Any:
    return out[1] if case.stateful else None


def _bump(model: Any, state: Any) -> Any:
    """A new State made with `State.set`: the first entry of `model` that `state`
    holds, its floating-point arrays plus one (the first State of a tuple)."""
    if isinstance(state, tuple):
        return (_bump(model, state[0]), *state[1:])
    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)
    for index in jtu.tree_leaves(model, is_leaf=is_index):
        if is_index(index):
            try:
                value = state.get(index)
            except KeyError:
                continue  # an entry of another State
            bumped = jtu.tree_map(
                lambda v: v + 1 if eqx.is_inexact_array(v) else v, value
            )
            return state.set(index, bumped)
    raise AssertionError("no entry of `model` in `state`")


@eqx.filter_jit
def _scaled(model: Any) -> Any:
    """A new Module of the same structure with other weights."""
    return jtu.tree_map(
        lambda x: 1.5 * x if eqx.is_inexact_array(x) else x,
        model,
        is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex),
    )


class _Counted:
    """`fn`, counting its traces."""

    def __init__(self, fn):
        self.fn = fn
        self.traces = 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        self.traces += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def fast_hits(monkeypatch):
    """How many calls of `eqx_rng.jit` took the repeated-call path (the function
    that `eqx_rng._jit_plan.Plan` writes per variant) and did not miss."""
    hits = [0]
    init = _jit_plan.Plan.__init__

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        fast = self.fast

        def counted(args, kw):
            out = fast(args, kw)
            hits[0] += out is not _jit_plan.MISS
            return out

        self.fast = counted

    monkeypatch.setattr(_jit_plan.Plan, "__init__", counting_init)
    return hits


# ----------------------------------------------------------------------------------
# eqx_rng.jit against eqx.filter_jit


# Cases that also call with new shapes and with the key by keyword (each compiles
# again; the small programs only, for time).
_RECOMPILED = ("fields", "tied", "rnn")


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.name != "gan"],  # the GAN: its own test, below
    ids=lambda c: c.name,
)
def test_jit_matches_filter_jit_over_repeated_calls(case, fast_hits):
    model, state = _built(case.name)
    ours_fn, ref_fn = _Counted(case.forward), _Counted(case.forward)
    ours, ref = eqx_rng.jit(ours_fn), eqx.filter_jit(ref_fn)
    xs = [_batch(case, t, 4)[0] for t in range(3)]
    keys = [jr.key(100 + t) for t in range(10)]
    state_ours = state_ref = state

    def call(what, model, x, key, *, feed=True, by_keyword=False):
        nonlocal state_ours, state_ref
        args_ours = _args(case, model, state_ours, x, key)
        args_ref = _args(case, model, state_ref, x, key)
        if by_keyword:
            a = ours(*args_ours[:-1], key=key)
            b = ref(*args_ref[:-1], key=key)
        else:
            a, b = ours(*args_ours), ref(*args_ref)
        assert _same(a, b), f"{case.name}: {what}"
        if feed:
            state_ours, state_ref = _state_of(case, a), _state_of(case, b)
        return a

    first = call("first call", model, xs[0], keys[0])
    call("state fed back, new batch", model, xs[1], keys[1])
    call("the same Module object again", model, xs[2], keys[2])
    if case.stateful:
        state_ours, state_ref = _bump(model, state_ours), _bump(model, state_ref)
        call("a State changed with State.set", model, xs[0], keys[3])
    # An evaluation loop: the same State object (and Module) again and again.
    call("the same State object", model, xs[1], keys[4], feed=False)
    call("the same State object again", model, xs[2], keys[5], feed=False)
    scaled = call("a new Module of the same structure", _scaled(model), xs[0], keys[0])
    assert not _same(scaled, first), "the new Module's weights were not used"
    call("the first Module again", model, xs[1], keys[6])
    assert fast_hits[0] >= 6, fast_hits[0]
    if case.name not in _RECOMPILED:
        assert ref_fn.traces == ours_fn.traces == 1
        return
    call("a smaller batch (new shapes)", model, _batch(case, 0, 3)[0], keys[7])
    call("the first shapes again", model, xs[2], keys[8])
    hits = fast_hits[0]
    call("the key by keyword", model, xs[0], keys[9], by_keyword=True)
    call("the key by keyword again", model, xs[1], keys[0], by_keyword=True)
    assert fast_hits[0] == hits + 1  # the second keyword call
    # One trace per shape; `eqx_rng.jit` also traces the keyword call as a variant
    # of its own (a documented difference: the same result).
    assert ref_fn.traces == 2 and ours_fn.traces == 3


@pytest.mark.parametrize(
    "case",
    # The transformer's method is left out for time (its program is the largest).
    [c for c in CASES if c.method and c.name != "transformer"],
    ids=lambda c: c.name,
)
def test_jit_of_a_bound_method_matches_filter_jit(case, fast_hits):
    model, _ = _built(case.name)
    assert case.method is not None
    ours = eqx_rng.jit(getattr(model, case.method))
    ref = eqx.filter_jit(getattr(model, case.method))
    for t in range(3):
        x = _batch(case, t, 4)[0]
        assert _same(ours(x), ref(x)), f"{case.name}.{case.method}, call {t}"
    assert fast_hits[0] >= 2


def _adam_step(loss_fn, optimizer, model, opt_state, state, batch, key):
    """A training step as Equinox's examples write one (the optimizer passed as an
    argument, as in the DCGAN example)."""
    (loss, (state, _)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        model, state, batch, key=key
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict-clean
        updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, state, loss


_OPTIMIZER = optax.adam(1e-2)
_ref_step = eqx.filter_jit(_adam_step)


@eqx.filter_jit
def _opt_init(model: Any) -> Any:
    return _OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))


@functools.cache
def _reference_run(name: str) -> list[tuple]:
    """The hand-written `eqx.filter_jit` step, `_STEPS` times from `_built(name)`:
    `(model, opt_state, state, loss)` after each step. Step `t` uses the key
    `derive(key(1), t)`, as a TrainState with `key=1` does."""
    case = _BY_NAME[name]
    model, state = _built(name)
    opt_state = _opt_init(model)
    out = []
    for t in range(_STEPS):
        key = eqx_rng.derive(jr.key(1), t)
        model, opt_state, state, loss = _ref_step(
            case.loss_fn, _OPTIMIZER, model, opt_state, state, _batch(case, t, 4), key
        )
        out.append((model, opt_state, state, loss))
    return out


# Donation on the models where it matters most (a State fed back, weights tied with
# `eqx.nn.Shared`, non-array fields); the larger programs are left out for time.
_DONATING = [c for c in CASES if c.name in ("stateful", "tied", "fields")]


@pytest.mark.parametrize("case", _DONATING, ids=lambda c: c.name)
def test_jit_donating_training_step_matches_filter_jit(case, fast_hits):
    model, state = _built(case.name)
    opt_state = _opt_init(model)
    step = eqx_rng.jit(_adam_step, donate="all")
    model, opt_state, state = _copy((model, opt_state, state))
    for t, want in enumerate(_reference_run(case.name)):
        key = eqx_rng.derive(jr.key(1), t)
        got = step(
            case.loss_fn,
            _OPTIMIZER,
            model,
            opt_state,
            state,
            _copy(_batch(case, t, 4)),  # donated
            key,
        )
        assert _same(got, want), f"{case.name}: step {t}"
        model, opt_state, state, _ = got
    assert fast_hits[0] >= _STEPS - 1


# ----------------------------------------------------------------------------------
# eqx_rng.ensemble against the chains built one by one


def _leaves_match(a: Any, b: Any) -> bool:
    """The leaves of two builds of a model agree: arrays bit for bit, other leaves
    equal or, for objects that compare by identity (the `SharedNode` of
    `eqx.nn.Shared`, the markers of States made with `eqx.nn.State(model)`), of the
    same type: each build may make its own."""
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        if eqx.is_array(x):
            if not _same(x, y):
                return False
        elif not (x == y or (type(x).__eq__ is object.__eq__ and type(x) is type(y))):
            return False
    return True


@eqx.filter_jit
def _chain_at(tree: Any, c: Any) -> Any:
    return jtu.tree_map(lambda x: x[c] if eqx.is_array(x) else x, tree)


def _chain(tree: Any, c: int) -> Any:
    """Chain `c` of a chain-batched tree (one compile for every `c`)."""
    return _chain_at(tree, jnp.int32(c))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ensemble_matches_chains_built_one_by_one(case):
    compiles = []

    def listener(event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    key = jr.key(3)
    jax.block_until_ready(eqx_rng.derive(key, 0))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        chains = jax.block_until_ready(eqx_rng.ensemble(case.make, key, _CHAINS))
        assert len(compiles) <= 1, f"{case.name}: {len(compiles)} compiles"
        compiles.clear()
        again = jax.block_until_ready(eqx_rng.ensemble(case.make, key, _CHAINS))
        assert compiles == [], f"{case.name}: the build was compiled again"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert _same(again, chains)
    # One by one as compiled programs (`_make`). Built eagerly instead, operation
    # by operation, the SpectralNorm's power-iteration vectors in the State differ
    # by 1-3 float32 ulps: XLA rounds a compiled normalisation differently.
    for c in range(_CHAINS):
        one = _make(case.name)(key=eqx_rng.derive(key, c))
        assert _leaves_match(_chain(chains, c), one), f"{case.name}: chain {c}"


# ----------------------------------------------------------------------------------
# make_train_step against the hand-written step; checkpoints


# The GAN is left out of training (its two States are covered by the `jit` tests
# above): Equinox's PReLU slope starts weakly typed, so the hand-written reference
# step traces three times (steps 0, 1, 2), ~12 s of this file's time.
# (`TrainState.create` types it at the start: `test_train.py` tests that.)
_TRAINED = [c for c in CASES if c.name != "gan"]


@pytest.mark.parametrize("case", _TRAINED, ids=lambda c: c.name)
def test_train_step_matches_hand_written_step_and_checkpoints(case, tmp_path):
    model, state = _built(case.name)
    ts = eqx_rng.TrainState.create(model, _OPTIMIZER, key=1, state=state)
    step = eqx_rng.make_train_step(case.loss_fn, _OPTIMIZER)
    for t, (ref_model, ref_opt, ref_state, ref_loss) in enumerate(
        _reference_run(case.name)
    ):
        ts, metrics = step(ts, _batch(case, t, 4))
        n = t + 1
        assert _close(ts.model, ref_model, n), f"{case.name}: model after step {t}"
        assert _close(ts.state, ref_state, n), f"{case.name}: state after step {t}"
        assert _close(ts.opt_state, ref_opt, n), f"{case.name}: Adam after step {t}"
        assert _close(metrics["loss"], ref_loss, n)
        assert bool(metrics["finite"])
    assert int(ts.step) == _STEPS

    path = tmp_path / f"{case.name}.eqx"
    eqx_rng.save(path, ts)
    loaded = eqx_rng.load(path, ts)
    assert _same(loaded, ts)
    # A step from the loaded TrainState reuses the compiled step (the loaded
    # arrays are placed as the step's outputs are) and continues bitwise.
    batch = _batch(case, _STEPS, 4)
    resumed, resumed_metrics = step(loaded, batch)
    straight, straight_metrics = step(ts, batch)
    assert _same(resumed, straight) and _same(resumed_metrics, straight_metrics)


# ----------------------------------------------------------------------------------
# Patterns of single examples


def test_gan_states_as_separate_arguments():
    # The DCGAN example passes the generator's and the discriminator's States as
    # two arguments and gets both back.
    gan, states = _built("gan")
    case = _BY_NAME["gan"]
    ours_fn, ref_fn = _Counted(gan_scores), _Counted(gan_scores)
    ours, ref = eqx_rng.jit(ours_fn), eqx.filter_jit(ref_fn)
    states_ours = states_ref = states
    calls = [
        ("first call", gan, 4, True),
        ("States fed back", gan, 4, True),
        ("the discriminator's State changed with State.set", gan, 4, True),
        ("the same State objects", gan, 4, False),
        ("the same State objects again", gan, 4, True),
        ("a new GAN of the same structure", _scaled(gan), 4, True),
        ("the first GAN again", gan, 4, True),
        ("a smaller batch (new shapes)", gan, 3, True),
    ]
    for t, (what, model, n, feed) in enumerate(calls):
        if t == 2:
            states_ours = (states_ours[0], _bump(gan, states_ours[1]))
            states_ref = (states_ref[0], _bump(gan, states_ref[1]))
        real, key = _batch(case, t, n)[0], jr.key(t)
        a = ours(model, *states_ours, real, key)
        b = ref(model, *states_ref, real, key)
        assert _same(a, b), what
        if feed:
            states_ours, states_ref = a[1:], b[1:]
    assert ours_fn.traces == ref_fn.traces == 2
    # The two States swapped: Equinox's own error, from both.
    real, key = _batch(case, 0, 4)[0], jr.key(0)
    with pytest.raises(KeyError):
        ref(gan, states_ref[1], states_ref[0], real, key)
    with pytest.raises(KeyError):
        ours(gan, states_ours[1], states_ours[0], real, key)


def test_stateful_inference_model_as_partial():
    # The stateful example evaluates `eqx.Partial(inference_mode(model), state=...)`:
    # a Module holding a State among its keyword arguments.
    model, state = _built("stateful")
    assert isinstance(model, Stateful)
    state = _copy(state)  # `State.set` below invalidates the State it is called on

    def evaluate(model, xs):
        out, _ = jax.vmap(model)(xs)
        return out

    ours, ref = eqx_rng.jit(evaluate), eqx.filter_jit(evaluate)
    for t in range(3):
        inference = eqx.Partial(eqx.nn.inference_mode(model), state=state)
        xs = _batch(_BY_NAME["stateful"], t, 5)[0]
        assert _same(ours(inference, xs), ref(inference, xs)), f"call {t}"
        state = _bump(model, state)


def test_changed_non_array_fields_compile_new_variants():
    # A Python float, a string and a function in a Module are static: a new value
    # is a new variant, never a stale one.
    case = _BY_NAME["fields"]
    ours, ref = eqx_rng.jit(case.forward), eqx.filter_jit(case.forward)
    x, key = _batch(case, 0, 4)[0], jr.key(5)
    model_key = jr.key(0)  # the arrays of `_built("fields")`
    outs = []
    make = eqx.filter_jit(Fields)
    for variant in (
        _built("fields")[0],
        make(scale=0.25, key=model_key),
        make(name="tail", key=model_key),
        make(activation=jax.nn.relu, key=model_key),
        make(key=model_key),
    ):
        a, b = ours(variant, x, key), ref(variant, x, key)
        assert _same(a, b)
        outs.append(a)
    assert _same(outs[0], outs[-1])
    for i in range(1, 4):
        assert not _same(outs[0], outs[i]), i


@pytest.mark.parametrize("name", ["eqx_rng.jit", "eqx.filter_jit"])
def test_method_decorated_as_in_equinox_tests(name):
    # Equinox's own tests decorate a Module's `__call__` and another method with
    # `filter_jit`; `eqx_rng.jit` works the same way, with the same retracing.
    jit = eqx_rng.jit if name == "eqx_rng.jit" else eqx.filter_jit
    traces = []

    class M(eqx.Module):
        increment: int | jax.Array

        @jit
        def __call__(self, x):
            traces.append("call")
            return x + self.increment

        @jit
        def method(self, x):
            traces.append("method")
            return x * self.increment

    y = jnp.array(3)
    for increment, call, method in [
        (1, 4, 3),
        (1, 4, 3),
        (2, 5, 6),
        (jnp.array(1), 4, 3),
        (jnp.array(2), 5, 6),
    ]:
        m = M(increment)
        assert int(m(y)) == call and int(m.method(y)) == method
    # 1, 2 and an array increment: three variants of each.
    assert traces.count("call") == traces.count("method") == 3


def test_first_step_after_load_reuses_the_compiled_step(tmp_path):
    case = _BY_NAME["tied"]
    model, _ = _built("tied")
    ts = eqx_rng.TrainState.create(model, _OPTIMIZER, key=1)
    step = eqx_rng.make_train_step(case.loss_fn, _OPTIMIZER)
    batch = _batch(case, 0, 4)
    ts, _ = step(ts, batch)
    eqx_rng.save(tmp_path / "ts.eqx", ts)
    loaded = eqx_rng.load(tmp_path / "ts.eqx", ts)
    jax.block_until_ready(step(ts, batch))  # compiled for the step's own outputs
    compiles = []

    def listener(event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(step(loaded, batch))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
