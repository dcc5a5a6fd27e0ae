from typing import Annotated, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from beartype.vale import Is
from helpers import run_python
from jaxtyping import Array, Float, TypeCheckError

import eqx_rng


@eqx_rng.typecheck
def _pair_sum(x: Float[Array, " n"], y: Float[Array, " n"]) -> Float[Array, " n"]:
    return x + y


def test_shape_violation_names_argument_and_dimension():
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'y'.*n=3"):
        _pair_sum(jnp.ones(3), jnp.ones(4))


def test_check_runs_once_at_trace_time():
    calls = []

    @eqx_rng.typecheck
    def f(x: Float[Array, " n"]) -> Float[Array, " n"]:
        calls.append(1)
        return 2 * x

    jf = jax.jit(f)
    for _ in range(3):
        jf(jnp.ones(3))
    assert len(calls) == 1


def test_legacy_key_error_points_to_as_key():
    with pytest.raises(TypeError, match=r"as_key"):
        eqx_rng.grid_keys(jax.random.PRNGKey(0), (2,))  # type: ignore[arg-type]


def test_key_alias_rejects_legacy_and_batches():
    key_type: Any = eqx_rng.Key
    assert isinstance(jr.key(0), key_type)
    assert not isinstance(jax.random.PRNGKey(0), key_type)
    assert not isinstance(jr.split(jr.key(0), 2), key_type)


def test_env_var_turns_checking_off():
    code = (
        "import jax.numpy as jnp, eqx_rng;"
        "from jaxtyping import Array, Float\n"
        "@eqx_rng.typecheck\n"
        "def f(x: Float[Array, ' n'], y: Float[Array, ' n']): return x\n"
        "f(jnp.ones(2), jnp.ones(3)); print(eqx_rng.typecheck_enabled())"
    )
    assert run_python(code, env={"EQX_RNG_TYPECHECK": "0"}).strip() == "False"


_LEGACY_CALLS = {
    "derive": lambda k: eqx_rng.derive(k, "a"),
    "grid_keys": lambda k: eqx_rng.grid_keys(k, (2,)),
    "example_keys": lambda k: eqx_rng.example_keys(k, jnp.arange(2)),
    "split_like": lambda k: eqx_rng.split_like(k, {"w": jnp.ones(2)}),
    "tree_normal": lambda k: eqx_rng.tree_normal(k, {"w": jnp.ones(2)}),
    "Dropout.__call__": lambda k: eqx_rng.nn.Dropout(0.5)(jnp.ones(3), key=k),
    "GaussianNoise.__call__": lambda k: eqx_rng.nn.GaussianNoise(0.1)(
        jnp.ones(3), key=k
    ),
    "ensemble": lambda k: eqx_rng.ensemble(eqx.nn.Linear, k, 2, 2, 2),
}


@pytest.mark.parametrize("name", list(_LEGACY_CALLS))
def test_legacy_key_error_is_short_and_starts_with_the_fix(name):
    with pytest.raises(TypeError) as info:
        _LEGACY_CALLS[name](jax.random.PRNGKey(0))
    lines = str(info.value).splitlines()
    assert lines[0].startswith("Convert the key with `eqx_rng.as_key(key)`")
    assert "jax.random.key(seed)" in lines[0]
    assert len(lines) <= 3, lines
    assert f"`{name}` got a legacy `uint32[2]` key" in lines[1]
    assert "for `key`" in lines[1]
    # No chained type-checker report either.
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_uint32_pair_that_is_not_a_key_is_not_blamed():
    # A uint32[2] array passed as data, with an unrelated failure: the type
    # checker's own report, not the legacy-key message.
    ids = jnp.array([3, 4], dtype=jnp.uint32)
    with pytest.raises(TypeCheckError, match="Type-check error") as info:
        eqx_rng.example_keys("not a key", ids)  # type: ignore[arg-type]
    assert "as_key" not in str(info.value).splitlines()[0]


# A parameter annotated `_Tag` records every check of it.
_CHECKS: list[str] = []
_Tag = Annotated[str, Is[lambda s: _CHECKS.append(s) is None]]


def test_each_signature_is_checked_once():
    @eqx_rng.typecheck
    def f(x: Float[Array, " n"], tag: _Tag) -> Float[Array, " n"]:
        return 2 * x

    _CHECKS.clear()
    f(jnp.ones(3), "a")
    first = len(_CHECKS)
    assert first >= 1
    f(jnp.zeros(3), "a")  # new values, same signature: not checked again
    assert len(_CHECKS) == first
    f(jnp.ones(4), "a")  # a new shape: checked
    f(jnp.ones(3), "b")  # a new non-array value: checked
    f(jnp.ones(3, jnp.float16), "a")  # a new dtype: checked
    assert len(_CHECKS) == 4 * first
    # A layer called twice in one trace (and in a retrace) is checked once.
    jax.jit(lambda x: f(f(x, "a"), "a"))(jnp.ones(3))
    jax.jit(lambda x: f(f(x, "a"), "a") + 1)(jnp.ones(3))
    assert len(_CHECKS) == 5 * first


def test_a_remembered_signature_does_not_hide_a_failing_call():
    @eqx_rng.typecheck
    def pair(x: Float[Array, " n"], y: Float[Array, " n"]) -> Float[Array, " n"]:
        return x + y

    pair(jnp.ones(3), jnp.ones(3))
    pair(jnp.ones(3), jnp.ones(3))
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'y'.*n=3"):
        pair(jnp.ones(3), jnp.ones(4))
    with pytest.raises(TypeCheckError):
        pair(jnp.ones(3), jnp.ones(3, jnp.int32))  # type: ignore[arg-type]

    @eqx_rng.typecheck
    def bad_return(x: Float[Array, " n"]) -> Float[Array, " n"]:
        return x[:1] if x.shape[0] > 1 else x

    bad_return(jnp.ones(1))
    with pytest.raises(TypeCheckError, match="return"):
        bad_return(jnp.ones(2))  # the return value is checked for a new signature


def test_unhashable_arguments_are_checked_every_time():
    @eqx_rng.typecheck
    def f(x: Float[Array, " n"], tag: _Tag, extra: Any) -> Float[Array, " n"]:
        return x

    _CHECKS.clear()
    f(jnp.ones(2), "a", {1})
    first = len(_CHECKS)
    f(jnp.ones(2), "a", {1})  # a set leaf: no signature, checked again
    assert len(_CHECKS) == 2 * first
