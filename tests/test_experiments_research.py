"""The research experiments (`experiments/uncertainty.py`, `experiments/sequence.py`)
run their `--tiny` configurations in-process and write what they promise."""

import importlib
import json
import math
import sys

import pytest
from helpers import REPO

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


# About 2 minutes of CPU (mostly compiling three heads x init/step/predict).
@pytest.mark.slow
def test_uncertainty_tiny(tmp_path):
    uncertainty = _module("uncertainty")
    cfg = uncertainty.Config.tiny()
    assert uncertainty.main(["--tiny", "--no-progress", "--out", str(tmp_path)]) == 0
    summary, records = _check_summary(tmp_path, "uncertainty")
    assert (tmp_path / "reliability.png").stat().st_size > 0
    methods = summary["results"]
    assert set(methods) == set(uncertainty.METHODS)
    for name, r in methods.items():
        chains = 1 if name == "deep ensemble" else cfg.chains
        assert r["chains"] == chains
        assert 0 <= r["accuracy"][0] <= 1 and r["nll"][0] > 0
        assert 0 <= r["ece"][0] <= 1
    # every head and chain logged every step; Bayesian heads carry a KL term
    for head in uncertainty.HEADS:
        mine = [r for r in records if r["head"] == head]
        assert len(mine) == cfg.steps * cfg.chains
        assert all((r["kl"] > 0) == (head != "linear") for r in mine)


def test_sequence_tiny(tmp_path):
    sequence = _module("sequence")
    cfg = sequence.Config.tiny()
    assert sequence.main(["--tiny", "--no-progress", "--out", str(tmp_path)]) == 0
    summary, records = _check_summary(tmp_path, "sequence")
    assert set(summary["results"]) == {"gru", "transformer"}
    for r in summary["results"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["mc_accuracy"] <= 1
    for name in ("gru", "transformer"):
        assert [r["step"] for r in records if r["model"] == name] == list(
            range(1, cfg.steps + 1)
        )
