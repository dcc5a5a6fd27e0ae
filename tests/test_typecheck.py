from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
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
