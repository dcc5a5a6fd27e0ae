"""The research experiments (`experiments/uncertainty.py`, `experiments/sequence.py`)
run their `--tiny` configurations in-process and write what they promise; their
building blocks (the Bayesian heads' shared weight sample, SGLD's sampling
schedule, the pooled methods' jackknife) are checked exactly."""

import importlib
import json
import math
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from helpers import REPO

import eqx_rng

EXPERIMENTS = REPO / "experiments"


def _module(name: str):
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)


def _check_summary(out, experiment):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == experiment
    assert "jax_version" in summary["doctor"]
    records = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert records and all(math.isfinite(r["loss"]) for r in records)
    assert (out / "learning_curves.png").stat().st_size > 0
    return summary, records


def test_uncertainty_tiny(tmp_path):
    uncertainty = _module("uncertainty")
    cfg = uncertainty.Config.tiny()
    assert uncertainty.main(["--tiny", "--no-progress", "--out", str(tmp_path)]) == 0
    summary, records = _check_summary(tmp_path, "uncertainty")
    assert (tmp_path / "reliability.png").stat().st_size > 0
    methods = summary["results"]
    assert list(methods) == list(uncertainty.METHODS)
    pooled = {"deep ensemble", "SGLD"}
    networks = {
        "MAP": 1,
        "deep ensemble": cfg.chains,
        "SGLD, one chain": cfg.sgld_samples,
        "SGLD": cfg.chains * cfg.sgld_samples,
    }
    for name, r in methods.items():
        assert r["chains"] == (1 if name in pooled else cfg.chains)
        assert r["networks"] == networks.get(name, cfg.mc_samples)
        assert r["spread"].startswith("jackknife" if name in pooled else "std")
        assert 0 <= r["accuracy"][0] <= 1 and r["nll"][0] > 0
        assert 0 <= r["ece"][0] <= 1
        for metric in ("accuracy", "nll", "ece", "entropy_right"):
            assert all(math.isfinite(v) and v >= 0 for v in r[metric])
    # every head and chain logged every step; Bayesian heads carry a KL term, and
    # SGLD's loss adds the prior term to the NLL
    for head in uncertainty.HEADS:
        mine = [r for r in records if r["head"] == head]
        steps = cfg.sgld_steps if head == "sgld" else cfg.steps
        assert sorted({r["step"] for r in mine}) == list(range(1, steps + 1))
        assert len(mine) == steps * cfg.chains
        assert all((r["kl"] > 0) == (head in ("bayes", "flipout")) for r in mine)
        assert all((r["loss"] > r["nll"]) == (head != "linear") for r in mine)


def test_sgld_sampling_schedule():
    uncertainty = _module("uncertainty")
    cfg = uncertainty.Config()
    steps = range(1, cfg.sgld_steps + 1)
    kept = [t for t in steps if uncertainty.is_sample_step(cfg, t)]
    # the last 100 steps of each 500-step cycle, every 25th step
    assert kept == [c * 500 + s for c in range(4) for s in (425, 450, 475, 500)]
    assert len(kept) == cfg.sgld_samples
    n = 1437
    schedule = uncertainty.sgld_schedule(cfg, n)
    eps = np.asarray(jax.vmap(schedule)(jnp.arange(cfg.sgld_steps)))
    eps0 = 2 * cfg.sgld_lr / n
    # peak at each cycle start, cosine down to > 0 at its end, then restart
    assert np.allclose(eps[::500], eps0, rtol=1e-6)
    assert np.allclose(eps[250], eps0 / 2, rtol=1e-5)
    assert (eps > 0).all() and np.all(np.diff(eps[:500]) < 0)
    assert np.array_equal(eps[:500], eps[500:1000])


def test_bayes_heads_share_one_weight_sample():
    """`eqx_rng.vmap` with `eqx_rng.shared(weight_key)` gives the head exactly what
    the explicit form gave: the same weight draw for every example, example `i` the
    key `derive(key, i)` (Flipout's signs)."""
    uncertainty = _module("uncertainty")
    cfg = uncertainty.Config.tiny()
    feats = jr.normal(jr.key(0), (6, 2 * cfg.channels * 16))
    key, weight_key = jr.key(1), jr.key(2)

    def both(head):  # one compiled program per head, not hundreds of eager ops
        model = uncertainty.CNN(cfg, head, key=jr.key(3))
        got = model.logits(feats, key=key, weight_key=weight_key)
        keys = eqx_rng.grid_keys(key, (feats.shape[0],))
        explicit = jax.vmap(lambda f, k: model.head(f, key=k, weight_key=weight_key))(
            feats, keys
        )
        # the weight draw comes from weight_key: another one changes every output
        other = model.logits(feats, key=key, weight_key=jr.key(4))
        return got, explicit, other

    for head in ("bayes", "flipout"):
        got, explicit, other = eqx.filter_jit(both)(head)
        assert bool(jnp.all(got == explicit))
        assert bool(jnp.all(jnp.any(other != got, axis=-1)))


def test_jackknife_se_of_the_mean():
    """For the mean, the jackknife standard error equals `std(ddof=1) / sqrt(n)`."""
    common = _module("_common")
    x = np.random.default_rng(0).normal(size=7)
    loo = [np.delete(x, i).mean() for i in range(x.size)]
    assert np.isclose(common.jackknife_se(loo), x.std(ddof=1) / np.sqrt(x.size))
    assert common.jackknife_se([0.3]) == 0.0


def test_sequence_tiny(tmp_path):
    sequence = _module("sequence")
    cfg = sequence.Config.tiny()
    assert sequence.main(["--tiny", "--no-progress", "--out", str(tmp_path)]) == 0
    summary, records = _check_summary(tmp_path, "sequence")
    assert set(summary["results"]) == {"gru", "transformer"}
    for r in summary["results"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["mc_accuracy"] <= 1
        assert math.isfinite(r["nll"]) and math.isfinite(r["mc_nll"])
    for name in ("gru", "transformer"):
        assert [r["step"] for r in records if r["model"] == name] == list(
            range(1, cfg.steps + 1)
        )
