"""`TrainState(...)` built directly: the common mistakes get a short message naming
the fix, not the type checker's report; correct states (one run, chain-batched,
built under `jit`) are accepted as before."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest

import eqx_rng

pytestmark = pytest.mark.skipif(
    not eqx_rng.typecheck_enabled(), reason="the checks are off with typecheck"
)

_OPT = optax.sgd(0.1)


def _fields(**changes):
    model = eqx.nn.Linear(2, 1, key=jr.key(0))
    fields = dict(
        model=model,
        state=None,
        opt_state=_OPT.init(eqx.filter(model, eqx.is_inexact_array)),
        key=jr.key(1),
        step=jnp.zeros((), jnp.int32),
    )
    fields.update(changes)
    return fields


def _short_error(**changes) -> TypeError:
    with pytest.raises(TypeError) as info:
        eqx_rng.TrainState(**_fields(**changes))
    # Our message, not beartype's report chained to it.
    assert "Type-check error" not in str(info.value)
    assert info.value.__cause__ is None
    return info.value


def test_legacy_key_message_starts_with_the_fix():
    fix, received = str(_short_error(key=jr.PRNGKey(1))).splitlines()
    assert fix == (
        "Convert the key with `eqx_rng.as_key(key)`, or make a typed one with "
        "`jax.random.key(seed)`."
    )
    assert received.startswith(
        "`eqx_rng.TrainState` got a legacy `uint32[2]` key (from "
        "`jax.random.PRNGKey`) for `key`"
    )


def test_legacy_key_batch_points_to_wrap_key_data():
    keys = jr.split(jr.PRNGKey(1), 3)
    fix, received = str(_short_error(key=keys)).splitlines()
    assert fix.startswith("Convert the keys with `jax.random.wrap_key_data(keys)`")
    assert "`uint32[3, 2]`" in received


def _make_with_state():
    return eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)


@pytest.mark.parametrize(
    "changes,match",
    [
        (lambda: dict(key=1), r"takes `key` as a typed PRNG key .*got int 1.*as_key"),
        (
            lambda: dict(step=0),
            r"takes `step` as a signed integer array .*got int 0.*TrainState\.create",
        ),
        (lambda: dict(step=jnp.zeros(())), r"`step` .*dtype float32"),
        (lambda: dict(step=jnp.zeros((), jnp.uint32)), r"`step` .*dtype uint32"),
        (lambda: dict(model=eqx.nn.Linear), r"got the class `Linear`; build the model"),
        (lambda: dict(model=_make_with_state()), r"make_with_state.*unpack it"),
        (lambda: dict(opt_state=_OPT), r"optax optimizer as `opt_state`.*init"),
        (lambda: dict(model=_OPT), r"optax optimizer as `model`"),
        (lambda: dict(state=_OPT), r"optax optimizer as `state`"),
        (
            lambda: dict(opt_state=_make_with_state()[1]),
            r"`eqx.nn.State` as `opt_state`; it belongs in `state`",
        ),
    ],
    ids=[
        "int-key",
        "int-step",
        "float-step",
        "uint-step",
        "class",
        "make_with_state",
        "optimizer-as-opt_state",
        "optimizer-as-model",
        "optimizer-as-state",
        "state-as-opt_state",
    ],
)
def test_common_mistakes_name_the_fix(changes, match):
    message = str(_short_error(**changes()))
    assert message.startswith(
        "`eqx_rng.TrainState(model, state, opt_state, key, step)`"
    )
    assert len(message.splitlines()) == 1
    assert re.search(match, message), message


def test_correct_states_are_accepted():
    # One run, with a dict model and a BatchNorm state.
    model, state = _make_with_state()
    eqx_rng.TrainState(
        {"w": jnp.ones(2)}, state, (), jr.key(0), jnp.zeros((), jnp.int32)
    )
    # Chain-batched: one key and one step per chain.
    models = eqx.filter_vmap(lambda k: eqx.nn.Linear(2, 1, key=k))(
        jr.split(jr.key(0), 3)
    )
    opt_state = eqx.filter_vmap(
        lambda m: _OPT.init(eqx.filter(m, eqx.is_inexact_array))
    )(models)
    ts = eqx_rng.TrainState(
        models, None, opt_state, jr.split(jr.key(1), 3), jnp.zeros(3, jnp.int32)
    )
    # Built from traced fields, as the train step does.
    rebuilt = jax.jit(
        lambda t: eqx_rng.TrainState(t.model, t.state, t.opt_state, t.key, t.step)
    )(ts)
    assert jnp.array_equal(rebuilt.step, ts.step)
