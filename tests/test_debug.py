import json
import os
import platform

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqx_rng
from eqx_rng._debug import cpu_info
from eqx_rng.debug import doctor, key_reuse


def _settings():
    return (
        jax.debug_key_reuse.value,
        jax.legacy_prng_key.value,
        jr.PRNGKey,
    )


# ---------------------------------------------------------------- key_reuse


def test_key_reuse_catches_eager_reuse():
    with key_reuse():
        key = jr.key(0)
        jr.normal(key, (3,))
        with pytest.raises(jax.errors.KeyReuseError):
            jr.normal(key, (3,))


def test_key_reuse_catches_reuse_after_split():
    with key_reuse():
        key = jr.key(0)
        jr.split(key)
        with pytest.raises(jax.errors.KeyReuseError):
            jr.uniform(key)


def test_key_reuse_catches_reuse_inside_jit():
    def twice(key):
        return jr.normal(key) + jr.normal(key)

    with key_reuse(), pytest.raises(jax.errors.KeyReuseError):
        jax.jit(twice)(jr.key(0))


def test_key_reuse_allows_legitimate_patterns():
    @jax.jit
    def grid_draws(key):
        keys = eqx_rng.grid_keys(key, (3, 4))
        return jax.vmap(jax.vmap(lambda k: jr.normal(k, (2,))))(keys)

    with key_reuse():
        key = jr.key(0)
        init_key, drop_key = jr.split(key)
        jr.normal(init_key, (3,))
        jr.bernoulli(drop_key, 0.5, (3,))
        # fold_in does not consume: many names and indices from one parent key.
        data_key = eqx_rng.derive(key, "data")
        noise_key = eqx_rng.derive(key, "noise")
        jr.normal(data_key)
        jr.normal(noise_key)
        assert grid_draws(eqx_rng.derive(key, 7)).shape == (3, 4, 2)
        eqx_rng.tree_normal(key, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})


def test_key_reuse_refuses_legacy_keys():
    legacy = jr.PRNGKey(0)
    with key_reuse():
        with pytest.raises(ValueError, match=r"jax\.random\.key\(seed\)"):
            jr.PRNGKey(0)
        with pytest.raises(ValueError, match="Legacy uint32 key"):
            jr.normal(legacy)
        # The conversion the message recommends works inside the block.
        assert jnp.isfinite(jr.normal(eqx_rng.as_key(np.asarray(legacy))))


def test_key_reuse_restores_settings():
    before = _settings()
    with key_reuse():
        assert jax.debug_key_reuse.value is True
        assert jax.legacy_prng_key.value == "error"
    assert _settings() == before
    jr.normal(jr.PRNGKey(0))  # legacy keys work again


def test_key_reuse_restores_settings_on_exception():
    before = _settings()
    with pytest.raises(RuntimeError, match="boom"), key_reuse():
        raise RuntimeError("boom")
    assert _settings() == before


def test_key_reuse_nests():
    before = _settings()
    with key_reuse():
        with key_reuse():
            pass
        # Still active after the inner block ends.
        assert jax.debug_key_reuse.value is True
        with pytest.raises(ValueError, match="key_reuse"):
            jr.PRNGKey(0)
    assert _settings() == before


def test_key_reuse_as_decorator():
    @key_reuse()
    def reuse(key):
        return jr.normal(key) + jr.normal(key)

    with pytest.raises(jax.errors.KeyReuseError):
        reuse(jr.key(0))
    assert jax.debug_key_reuse.value is False


# ---------------------------------------------------------------- doctor

_REQUIRED = (
    "jax_version",
    "jaxlib_version",
    "equinox_version",
    "prng_impl",
    "threefry_partitionable",
    "x64",
    "legacy_prng_key",
    "devices",
)


def test_doctor_is_json_serialisable_and_complete():
    info = doctor()
    assert json.loads(json.dumps(info)) == info
    for name in _REQUIRED:
        assert name in info, name
    assert info["jax_version"] == jax.__version__
    assert info["eqx_rng_version"] == eqx_rng.__version__
    assert info["prng_impl"] == jax.default_prng_impl.value
    assert info["threefry_partitionable"] is jax.threefry_partitionable.value
    assert info["x64"] is jax.enable_x64.value
    assert info["legacy_prng_key"] == "allow"
    assert info["typecheck"] is eqx_rng.typecheck_enabled()
    assert info["device_count"] == len(info["devices"]) == jax.device_count()
    assert {"id", "platform", "device_kind", "process_index"} <= set(info["devices"][0])
    assert info["process_count"] == 1


def test_doctor_reports_key_reuse_settings():
    with key_reuse():
        info = doctor()
    assert info["debug_key_reuse"] is True
    assert info["legacy_prng_key"] == "error"


# ---------------------------------------------------------------- doctor: CPU


def test_doctor_records_cpu_model_and_isa_features():
    cpu = doctor()["cpu"]
    assert json.loads(json.dumps(cpu)) == cpu
    assert set(cpu) == {"model", "machine", "count", "simd", "flags"}
    assert cpu["machine"] == (platform.machine() or None)
    assert set(cpu["simd"]) <= set(cpu["flags"])
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = [
            ln.split(":", 1)[1].strip()
            for ln in text.splitlines()
            if ln.startswith("model name")
        ]
        if model:
            assert cpu["model"] == model[0]
        if any(ln.startswith(("flags", "Features")) for ln in text.splitlines()):
            assert cpu["flags"] == sorted(cpu["flags"]) and cpu["flags"]


def test_cpu_info_parses_x86_and_arm_and_never_fails(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nmodel name\t: Test CPU @ 3GHz\n"
        "flags\t\t: fpu avx2 sse4_2 avx\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    info = cpu_info(str(x86))
    assert info["model"] == "Test CPU @ 3GHz"
    assert info["flags"] == ["avx", "avx2", "fpu", "sse4_2"]
    assert info["simd"] == ["sse4_2", "avx", "avx2"]

    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n")
    assert cpu_info(str(arm))["simd"] == ["asimd", "sve"]

    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff\xfe\x00 no colon here \x80\n:::\n")
    for path in (garbage, tmp_path / "missing", tmp_path):  # a directory too
        info = cpu_info(str(path))
        assert info["flags"] == [] and info["simd"] == []
        assert json.loads(json.dumps(info)) == info
