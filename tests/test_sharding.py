"""`shard` and `chain_mesh`.

Multi-device behaviour runs on 8 CPU devices in one subprocess
(`--xla_force_host_platform_device_count=8`), which reports JSON; the tests here
check its report. Everything else runs in-process on one device.
"""

import hashlib
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _multiprocess import run_processes
from helpers import keys_equal, run_python
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_rng

C, B, D = 8, 4, 3  # chains, examples per batch, features


def _draws(key):
    """One N(0, 1) vector per (chain, example), from `grid_keys`."""
    keys = eqx_rng.grid_keys(key, (C, B))
    return jax.vmap(jax.vmap(lambda k: jr.normal(k, (D,))))(keys)


def _digest(x) -> str:
    return hashlib.sha256(np.asarray(x).tobytes()).hexdigest()


# ---------------------------------------------------------------- one device


def test_shard_one_device_places_and_keeps_values():
    mesh = eqx_rng.chain_mesh()
    keys = eqx_rng.grid_keys(jr.key(0), (C, B))
    tree = {
        "w": np.ones((C, 2), np.float32),
        "keys": keys,
        "lr": jnp.array(0.1),
        "name": "model",
        "scale": 2.0,
        "none": None,
    }
    out = eqx_rng.shard(tree, mesh, "chains")
    assert isinstance(out["w"], jax.Array)
    assert out["w"].sharding == NamedSharding(mesh, P("chains"))
    assert out["keys"].sharding == NamedSharding(mesh, P("chains"))
    assert keys_equal(out["keys"], keys)
    assert out["lr"].sharding == NamedSharding(mesh, P())
    assert out["name"] == "model" and out["scale"] == 2.0 and out["none"] is None
    assert np.array_equal(out["w"], tree["w"])


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("chains", P("chains")),
        (("chains",), P("chains")),
        ((None, "chains"), P(None, "chains")),
        (P("chains", None), P("chains", None)),
        (None, P()),
    ],
)
def test_shard_spec_shorthand(spec, expected):
    mesh = eqx_rng.chain_mesh()
    out = eqx_rng.shard(jnp.zeros((2, 2)), mesh, spec)
    assert out.sharding.spec == expected


def test_shard_leaves_with_fewer_dims_than_spec_are_replicated():
    mesh = eqx_rng.chain_mesh((1, 1), ("chains", "batch"))
    out = eqx_rng.shard(
        (jnp.zeros((2, 3, 4)), jnp.zeros(5), jr.key(0)), mesh, ("chains", "batch")
    )
    assert [x.sharding.spec for x in out] == [P("chains", "batch"), P(), P()]


def test_shard_works_on_modules():
    mesh = eqx_rng.chain_mesh()
    models = eqx.filter_vmap(lambda k: eqx.nn.MLP(2, 1, 4, 1, key=k))(
        jr.split(jr.key(0), 2)
    )
    out = eqx_rng.shard(models, mesh, "chains")
    assert eqx.tree_equal(out, models)
    assert out.layers[0].weight.sharding.spec == P("chains")


def test_shard_unknown_axis_name():
    mesh = eqx_rng.chain_mesh()
    with pytest.raises(ValueError, match=r"spec=.*'batch'.*axes \('chains',\)"):
        eqx_rng.shard(jnp.zeros(2), mesh, P("chains", "batch"))


def test_shard_bad_spec_type():
    with pytest.raises(TypeError, match="spec"):
        eqx_rng.shard(jnp.zeros(2), eqx_rng.chain_mesh(), 3)  # type: ignore[arg-type]


def test_shard_inside_jit_is_a_clear_error():
    mesh = eqx_rng.chain_mesh()
    with pytest.raises(TypeError, match=r"tree\['w'\].*before the jitted call"):
        jax.jit(lambda t: eqx_rng.shard(t, mesh, "chains"))({"w": jnp.zeros(2)})


def test_chain_mesh():
    n = jax.device_count()
    mesh = eqx_rng.chain_mesh()
    assert mesh.axis_names == ("chains",) and mesh.shape["chains"] == n
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    mesh = eqx_rng.chain_mesh((-1, 1), ("chains", "batch"))
    assert dict(mesh.shape) == {"chains": n, "batch": 1}
    with pytest.raises(ValueError, match="needs `shape=`"):
        eqx_rng.chain_mesh(axis_names=("chains", "batch"))
    with pytest.raises(ValueError, match="one size per axis"):
        eqx_rng.chain_mesh((1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        eqx_rng.chain_mesh(n + 1)


# ---------------------------------------------------------------- eight devices

_EIGHT_DEVICES = f"""
import hashlib, json
import equinox as eqx
import jax, jax.numpy as jnp, jax.random as jr, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import eqx_rng

C, B, D = {C}, {B}, {D}
assert jax.device_count() == 8
report = {{}}
def digest(x):
    return hashlib.sha256(np.asarray(x).tobytes()).hexdigest()
def spec(x):  # without trailing Nones: a key array's spec may end in one
    entries = [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]
    while entries and entries[-1] is None:
        entries.pop()
    return entries

# 1. Placement.
chains = eqx_rng.chain_mesh()
grid = eqx_rng.chain_mesh((4, 2), ("chains", "batch"))
keys = eqx_rng.grid_keys(jr.key(0), (C, B))
tree = {{"w": jnp.ones((C, B, D)), "b": jnp.ones(()), "c": jnp.ones(C), "keys": keys,
        "n": 3}}
out = eqx_rng.shard(tree, chains, P("chains"))
report["chains"] = {{k: spec(out[k]) for k in ("w", "b", "c", "keys")}}
report["chains_devices"] = len(out["w"].sharding.device_set)
same = jr.key_data(out["keys"]) == jr.key_data(keys)
report["chains_keys_equal"] = bool(same.all())
report["chains_shard_shape"] = list(out["w"].addressable_shards[0].data.shape)
out = eqx_rng.shard(tree, grid, P("chains", "batch"))
report["grid"] = {{k: spec(out[k]) for k in ("w", "b", "c", "keys")}}
report["grid_shard_shape"] = list(out["keys"].addressable_shards[0].data.shape)
report["grid_n"] = out["n"]

# 4. Errors.
def error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None
report["indivisible"] = error(
    lambda: eqx_rng.shard({{"params": {{"w": jnp.ones((6, 2))}}}}, chains, "chains"))
report["indivisible_grid"] = error(
    lambda: eqx_rng.shard([jnp.ones((4, 3))], grid, (None, "batch")))
report["unknown_axis"] = error(lambda: eqx_rng.shard(jnp.ones(8), chains, "batch"))

# 2. Draws: one device vs eight, threefry_partitionable on (the default) and off.
def draws(key):
    keys = eqx_rng.grid_keys(key, (C, B))
    return jax.vmap(jax.vmap(lambda k: jr.normal(k, (D,))))(keys)
def big(key):
    return jr.normal(key, (C, B, 16))
on_grid = NamedSharding(grid, P("chains", "batch"))
for partitionable in (True, False):
    with jax.threefry_partitionable(partitionable):
        key = jr.key(0)
        one = jax.jit(draws)(key)
        eight = jax.jit(draws, out_shardings=on_grid)(key)
        eight_in = jax.jit(jax.vmap(jax.vmap(lambda k: jr.normal(k, (D,)))))(
            eqx_rng.shard(eqx_rng.grid_keys(key, (C, B)), grid, ("chains", "batch")))
        big_one = jax.jit(big)(key)
        big_eight = jax.jit(big, out_shardings=on_grid)(key)
        report[f"draws_{{partitionable}}"] = {{
            "devices": [len(one.sharding.device_set), len(eight.sharding.device_set),
                        len(eight_in.sharding.device_set),
                        len(big_eight.sharding.device_set)],
            "one": digest(one), "eight": digest(eight), "eight_in": digest(eight_in),
            "big_one": digest(big_one), "big_eight": digest(big_eight),
        }}

# 3. chains x batch MLP with dropout per (chain, example): forward and gradient.
models = eqx.filter_vmap(lambda k: eqx.nn.MLP(D, 1, 8, 2, key=k))(
    jr.split(jr.key(1), C))
xs = jr.normal(jr.key(2), (B, D))
ys = jr.normal(jr.key(3), (B, 1))

def loss(models, xs, ys, key):
    keys = eqx_rng.grid_keys(key, (C, B))
    def one(model, x, y, k):
        keep = jr.bernoulli(k, 0.75, x.shape)
        x = jnp.where(keep, x / 0.75, 0.0)
        return jnp.sum((model(x) - y) ** 2)
    def chain(model, chain_keys):
        return jax.vmap(lambda x, y, k: one(model, x, y, k))(xs, ys, chain_keys)
    per_example = eqx.filter_vmap(chain)(models, keys)
    return jnp.mean(per_example), per_example

step = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
(l1, per1), g1 = step(models, xs, ys, jr.key(4))
xs8, ys8 = eqx_rng.shard((xs, ys), grid, "batch")
(l8, per8), g8 = step(eqx_rng.shard(models, grid, "chains"), xs8, ys8, jr.key(4))
leaves1 = jax.tree.leaves(eqx.filter(g1, eqx.is_array))
leaves8 = jax.tree.leaves(eqx.filter(g8, eqx.is_array))
report["mlp"] = {{
    "devices": len(per8.sharding.device_set),
    "specs": [spec(per8), spec(leaves8[0])],
    "loss": [float(l1), float(l8)],
    "per_example_close": bool(np.allclose(per1, per8, rtol=1e-5, atol=1e-6)),
    "grad_close": all(np.allclose(a, b, rtol=1e-5, atol=1e-6)
                      for a, b in zip(leaves1, leaves8)),
    "grad_nonzero": all(bool(np.any(a != 0)) for a in leaves1),
}}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def eight():
    return json.loads(run_python(_EIGHT_DEVICES, devices=8).strip().splitlines()[-1])


def test_shard_places_chains_over_eight_devices(eight):
    assert eight["chains"] == {
        "w": ["chains"],
        "b": [],
        "c": ["chains"],
        "keys": ["chains"],
    }
    assert eight["chains_devices"] == 8
    assert eight["chains_shard_shape"] == [1, B, D]
    assert eight["chains_keys_equal"]


def test_shard_places_chains_by_batch_grid(eight):
    assert eight["grid"] == {
        "w": ["chains", "batch"],
        "b": [],
        "c": [],  # fewer dimensions than the spec: replicated
        "keys": ["chains", "batch"],
    }
    assert eight["grid_shard_shape"] == [C // 4, B // 2]
    assert eight["grid_n"] == 3  # non-array leaf untouched


def test_shard_indivisible_dimension_names_leaf_sizes_and_fix(eight):
    msg = eight["indivisible"]
    assert msg is not None
    for part in ("tree['params']['w']", "(6, 2)", "6 entries", "'chains' of size 8"):
        assert part in msg, (part, msg)
    assert "pad" in msg and "mesh" in msg
    msg = eight["indivisible_grid"]
    assert msg is not None
    assert "tree[0]" in msg and "dimension 1" in msg and "'batch' of size 2" in msg


def test_shard_unknown_axis_over_eight_devices(eight):
    msg = eight["unknown_axis"]
    assert msg is not None and "'batch'" in msg and "('chains',)" in msg


@pytest.mark.parametrize("partitionable", [True, False])
def test_draws_bitwise_equal_on_one_and_eight_devices(eight, partitionable):
    report = eight[f"draws_{partitionable}"]
    assert report["devices"] == [1, 8, 8, 8]
    assert report["one"] == report["eight"] == report["eight_in"]
    assert report["big_one"] == report["big_eight"]
    # And equal to what this single-device process draws.
    with jax.threefry_partitionable(partitionable):
        assert _digest(jax.jit(_draws)(jr.key(0))) == report["one"]


def test_chains_by_batch_forward_and_gradient_match_one_device(eight):
    report = eight["mlp"]
    assert report["devices"] == 8
    assert report["specs"] == [["chains", "batch"], ["chains"]]
    loss1, loss8 = report["loss"]
    assert abs(loss1 - loss8) <= 1e-5 * abs(loss1)
    assert report["per_example_close"]
    assert report["grad_close"]
    assert report["grad_nonzero"]


# ------------------------------------- eqx_rng.vmap + eqx_rng.nn on eight devices

_HAS_VMAP_AND_NN = all(
    hasattr(mod, name)
    for mod, name in (
        (eqx_rng, "vmap"),
        (eqx_rng, "ensemble"),
        (getattr(eqx_rng, "nn", None), "Dropout"),
        (getattr(eqx_rng, "nn", None), "BatchNorm"),
    )
)

_EIGHT_DEVICES_NN = f"""
import json
import equinox as eqx
import jax, jax.numpy as jnp, jax.random as jr, numpy as np
import eqx_rng

C, B, D, H = {C}, {B}, {D}, 6

class Net(eqx.Module):
    lin1: eqx.nn.Linear
    norm: eqx_rng.nn.BatchNorm
    drop: eqx_rng.nn.Dropout
    lin2: eqx.nn.Linear

    def __init__(self, *, key):
        key1, key2 = jr.split(key)
        self.lin1 = eqx.nn.Linear(D, H, key=key1)
        self.norm = eqx_rng.nn.BatchNorm(H, axis_name="batch")
        self.drop = eqx_rng.nn.Dropout(0.25)
        self.lin2 = eqx.nn.Linear(H, 1, key=key2)

    def __call__(self, x, state, *, key):
        h = jax.nn.relu(self.lin1(x))
        h, state = self.norm(h, state)
        h = self.drop(h, key=key)
        return self.lin2(h), state

def chain_loss(model, state, xs, ys, *, key):
    def example(x, y, state, *, key):
        pred, state = model(x, state, key=key)
        return jnp.sum((pred - y) ** 2), state
    losses, state = eqx_rng.vmap(example, axis_name="batch")(xs, ys, state, key=key)
    return jnp.mean(losses), state

def loss(models, states, xs, ys, key):
    losses, states = eqx_rng.vmap(
        chain_loss, in_axes=(eqx.if_array(0), eqx.if_array(0), None, None)
    )(models, states, xs, ys, key=key)
    return jnp.sum(losses), (losses, states)

step = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
models, states = eqx_rng.ensemble(eqx.nn.make_with_state(Net), jr.key(0), C)
xs = jr.normal(jr.key(1), (B, D))
ys = jr.normal(jr.key(2), (B, 1))
(l1, (per1, s1)), g1 = step(models, states, xs, ys, jr.key(3))

mesh = eqx_rng.chain_mesh((4, 2), ("chains", "batch"))
models8, states8 = eqx_rng.shard((models, states), mesh, "chains")
xs8, ys8 = eqx_rng.shard((xs, ys), mesh, "batch")
(l8, (per8, s8)), g8 = step(models8, states8, xs8, ys8, jr.key(3))

def close(a, b):
    a = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    b = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    return len(a) == len(b) and all(
        np.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b))

state_leaves = jax.tree.leaves(eqx.filter(s8, eqx.is_array))
print(json.dumps({{
    "loss_close": bool(np.allclose(l1, l8, rtol=1e-5)),
    "per_chain_close": close(per1, per8),
    "state_close": close(s1, s8),
    "grad_close": close(g1, g8),
    "chains_differ": bool(np.unique(np.asarray(per1)).size == C),
    "per_chain_state": [x.shape[0] for x in state_leaves] == [C] * len(state_leaves),
    "sharded": len(per8.sharding.device_set) == 8
    and per8.sharding.spec[0] == "chains",
}}))
"""


@pytest.mark.skipif(
    not _HAS_VMAP_AND_NN, reason="eqx_rng.vmap / eqx_rng.nn not available yet"
)
def test_chains_by_batch_with_eqx_rng_vmap_batchnorm_and_dropout():
    """Outer `eqx_rng.vmap` over chains (sharded), inner over the batch with
    `axis_name="batch"`; per-chain BatchNorm state; dropout per (chain, example)."""
    out = run_python(_EIGHT_DEVICES_NN, devices=8)
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {name: True for name in report}, report
    assert len(report) == 7


# ---------------------------------------------------------------- two processes

_TWO_PROCESSES = f"""
import hashlib, json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp, jax.random as jr, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import eqx_rng

C, B, D = {C}, {B}, {D}
mesh = eqx_rng.chain_mesh((4, 2), ("chains", "batch"))
replicated = NamedSharding(mesh, P())
# Global values, the same on every process (keys derived from one seed).
tree = {{"keys": eqx_rng.grid_keys(jr.key(0), (C, B)),
        "w": jnp.arange(C * B * D, dtype=jnp.float32).reshape(C, B, D)}}
out = eqx_rng.shard(tree, mesh, ("chains", "batch"))
draw = jax.jit(jax.vmap(jax.vmap(lambda k: jr.normal(k, (D,)))),
               out_shardings=replicated)(out["keys"])
total = jax.jit(jnp.sum, out_shardings=replicated)(out["w"])
# Per-process data: each process holds 4 of the 8 rows.
local = np.full((4, 2), 1.0 + jax.process_index(), np.float32)
rows = eqx_rng.shard(local, mesh, "chains", process_local=True)
local_total = jax.jit(jnp.sum, out_shardings=replicated)(rows)
print(json.dumps({{
    "devices": [jax.device_count(), jax.local_device_count()],
    "fully_addressable": out["w"].is_fully_addressable,
    "spec": [str(e) for e in out["w"].sharding.spec],
    "draw": hashlib.sha256(np.asarray(draw).tobytes()).hexdigest(),
    "total": float(total),
    "rows_shape": list(rows.shape),
    "local_total": float(local_total),
}}))
"""


def test_shard_two_processes(tmp_path):
    """Multi-host `shard` (`jax.distributed.initialize`), 2 processes x 4 CPUs."""
    reports = run_processes(_TWO_PROCESSES, tmp_path)
    one_device = _digest(jax.jit(_draws)(jr.key(0)))
    for report in reports:
        assert report["devices"] == [8, 4]
        assert report["fully_addressable"] is False
        assert report["spec"] == ["chains", "batch"]
        assert report["draw"] == one_device
        assert report["total"] == float(np.arange(C * B * D).sum())
        assert report["rows_shape"] == [8, 2]
        assert report["local_total"] == 4 * 2 * 1.0 + 4 * 2 * 2.0
