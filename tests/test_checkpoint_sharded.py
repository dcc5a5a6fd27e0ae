"""Checkpoints of sharded arrays: one process with 8 CPU devices, and two processes
with 4 CPU devices each under `jax.distributed` (multi-host: each process writes only
its own shards; `load` gives `like`'s sharding)."""

import json

from _multiprocess import run_processes
from helpers import run_python

# Shared by both scripts: a chain-batched state (typed keys, a weak scalar, a
# replicated step), its global values computed the same way on every process.
_TREE = """
import json, os, sys
import jax, jax.numpy as jnp, jax.random as jr, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import eqx_rng

C = 8
def global_tree():
    return {
        "w": jnp.arange(C * 4 * 5, dtype=jnp.float32).reshape(C, 4, 5),
        "b": jnp.arange(C * 4, dtype=jnp.int32).reshape(C, 4),
        "keys": eqx_rng.grid_keys(jr.key(0), (C, 4)),
        "lr": jnp.asarray(0.5),
        "step": jnp.int32(7),
        "act": jax.nn.relu,
    }

def bits(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jr.key_data(x)
    return x

def local_equal(got, want):
    # Every addressable shard of `got` equals the same box of the global `want`.
    g, w = bits(got), np.asarray(bits(want))
    return all(
        np.array_equal(np.asarray(s.data), w[s.index]) for s in g.addressable_shards)

KEYS = ("w", "b", "keys", "lr", "step")

def spec(x):
    # Key arrays built from key data carry an equivalent spec with trailing Nones.
    return [str(e) for e in x.sharding.spec if e is not None]

def same_sharding(back, like):
    return all(
        back[k].sharding.is_equivalent_to(like[k].sharding, back[k].ndim)
        for k in KEYS)

def like_with(mesh, tree, chains_spec):
    split = NamedSharding(mesh, chains_spec)
    rep = NamedSharding(mesh, P())
    def one(x):
        if not isinstance(x, jax.Array):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split if x.ndim else rep)
    return jax.tree.map(one, tree)
"""

_ONE_PROCESS = (
    _TREE
    + """
directory = sys.argv[1]
mesh = eqx_rng.chain_mesh((4, 2), ("chains", "batch"))
tree = global_tree()
sharded = eqx_rng.shard(tree, mesh, "chains")
path = eqx_rng.save(os.path.join(directory, "ckpt"), sharded)
report = {"files": sorted(os.listdir(directory))}
for name, chains_spec in [("same", P("chains")), ("other", P("batch", "chains")),
                          ("replicated", P())]:
    like = like_with(mesh, tree, chains_spec)
    back = eqx_rng.load(path, like)
    report[name] = {
        "same_sharding": same_sharding(back, like),
        "specs": {k: spec(back[k]) for k in ("w", "b", "keys", "lr")},
        "equal": all(local_equal(back[k], tree[k]) for k in KEYS),
        "weak": bool(back["lr"].aval.weak_type),
        "act": back["act"] is jax.nn.relu,
        "devices": len(back["w"].sharding.device_set),
    }
# A sharded array saved and loaded into a plain (unsharded) `like`.
plain = eqx_rng.load(path, tree)
report["plain_equal"] = all(local_equal(plain[k], tree[k]) for k in ("w", "keys"))
print(json.dumps(report))
"""
)


def test_load_into_like_sharding_on_eight_devices(tmp_path):
    out = run_python(
        _ONE_PROCESS.replace("sys.argv[1]", repr(str(tmp_path))), devices=8
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report["files"] == ["ckpt"]  # one process: one ordinary file
    assert report["plain_equal"]
    expected = {
        "same": ["chains"],
        "other": ["batch", "chains"],
        "replicated": [],
    }
    for name, chains in expected.items():
        got = report[name]
        assert got["equal"] and got["weak"] and got["act"], (name, got)
        assert got["same_sharding"]
        assert got["specs"] == {"w": chains, "b": chains, "keys": chains, "lr": []}
        assert got["devices"] == 8


_TWO_PROCESSES = (
    """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
"""
    + _TREE
    + """
directory = sys.argv[3]
me = jax.process_index()
mesh = eqx_rng.chain_mesh((4, 2), ("chains", "batch"))
tree = global_tree()
sharded = eqx_rng.shard(tree, mesh, "chains")
manager = eqx_rng.CheckpointManager(directory, keep=1)
for step in (1, 2):
    path = manager.save(step, sharded, metadata={"note": "two hosts"})
shards = os.path.join(directory, os.path.basename(path) + ".shards")
files = sorted(os.listdir(shards))
report = {
    "fully_addressable": sharded["w"].is_fully_addressable,
    "steps": manager.steps(),
    "top": sorted(n for n in os.listdir(directory)),
    "shard_files": [f.split("-", 1)[1] for f in files],
    "shard_sizes": [os.path.getsize(os.path.join(shards, f)) for f in files],
    "meta": eqx_rng.load_metadata(path)["note"],
}
for name, chains_spec in [("same", P("chains")), ("other", P("batch", "chains")),
                          ("replicated", P())]:
    like = like_with(mesh, tree, chains_spec)
    back = manager.restore(like)
    report[name] = {
        "same_sharding": same_sharding(back, like),
        "specs": {k: spec(back[k]) for k in ("w", "b", "keys", "lr")},
        "equal": all(local_equal(back[k], tree[k]) for k in KEYS),
        "weak": bool(back["lr"].aval.weak_type),
        "addressable": back["w"].is_fully_addressable,
    }
# A like without shardings: each process assembles the whole array on its host.
plain = eqx_rng.load(path, tree)
report["plain_equal"] = all(
    np.array_equal(np.asarray(bits(plain[k])), np.asarray(bits(tree[k])))
    for k in ("w", "b", "keys")
)
print(json.dumps(report))
"""
)


def test_multi_host_save_and_load_two_processes(tmp_path):
    """2 processes x 4 CPU devices: each writes its own shards, no gather."""
    reports = run_processes(_TWO_PROCESSES, tmp_path, str(tmp_path / "run"))
    for report in reports:
        assert report["fully_addressable"] is False
        assert report["steps"] == [2]  # pruning removed step 1 and its shards
        assert report["top"] == ["step_0000000002.ckpt", "step_0000000002.ckpt.shards"]
        assert report["shard_files"] == ["00000-of-00002", "00001-of-00002"]
        # Each process wrote only its half of the chain-sharded arrays.
        small, large = sorted(report["shard_sizes"])
        assert large - small < 512
        assert report["meta"] == "two hosts"
        assert report["plain_equal"]
        for name, chains in [
            ("same", ["chains"]),
            ("other", ["batch", "chains"]),
            ("replicated", []),
        ]:
            got = report[name]
            assert got["equal"] and got["weak"] and got["same_sharding"], (name, got)
            assert got["specs"] == {"w": chains, "b": chains, "keys": chains, "lr": []}
            assert got["addressable"] is False
