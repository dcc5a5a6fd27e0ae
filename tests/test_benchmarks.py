"""`benchmarks/run.py --smoke` runs every workload end to end, the `--gpu` one too
(one process, toy sizes, one round: no timing is asserted)."""

import json
import math
import os
import subprocess
import sys

import pytest
from helpers import REPO


def _run(args: list[str], out_dir) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run.py"),
            *args,
            "--out",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, f"run.py failed:\n{proc.stdout}\n{proc.stderr}"
    assert (out_dir / "results.md").read_text() in proc.stdout
    return json.loads((out_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out_dir = tmp_path_factory.mktemp("smoke")
    results = _run(["--smoke"], out_dir)
    return results, (out_dir / "results.md").read_text()


def test_smoke(smoke):
    results, text = smoke
    impls = set()
    for size in results["sizes"]:
        ms = size["measurements"]
        assert sum(m["reference"] for m in ms) == 1
        for m in ms:
            impls.add(m["impl"])
            assert len(m["per_step_s"]) == 1
            assert all(t > 0 for t in m["per_step_s"])
            assert math.isfinite(m["first_loss"]) and math.isfinite(m["final_loss"])
    assert {"raw JAX", "eqx_rng", "plain Equinox"} <= impls
    assert results["typecheck"]["rows"]
    assert any(
        c.startswith("all first-step losses") and c.endswith("yes")
        for c in results["checks"]
    )
    forward = results["forward"]
    assert forward["max_abs_diff"] < 1e-4  # the same numbers, both ways
    assert [m["impl"] for m in forward["measurements"]] == ["raw JAX"] * 2 + ["eqx_rng"]
    assert results["targets"]
    assert "## Step time" in text and "## Targets" in text
    assert "## chains x batch forward" in text
    # The forward-dispatch and CNN-chains workloads: the same numbers every way.
    (tiny,) = results["dispatch"]["sizes"]
    assert tiny["max_abs_diff"] == 0.0
    assert [r["impl"] for r in tiny["rows"]] == [
        "raw JAX",
        "eqx_rng.jit",
        "eqx.filter_jit",
    ]
    cnn = results["cnn"]
    assert cnn["max_abs_diff"] < 1e-5  # vmap, lax.map, lax.scan == unrolled
    assert {r["variant"] for r in cnn["rows"]} >= {"vmap", "unrolled", "lax.map"}
    assert "## Forward call dispatch" in text and "## CNN chains" in text
    io = results["checkpoint_io"]
    assert io["rounds"] == 2 and abs(io["mb"] - 8.0) < 0.1
    for rates in io["rates"].values():
        assert len(rates["times_s"]) == 2 and rates["median_mb_s"] > 0
    assert set(io["ratio"]) == {"save", "load"}
    assert io["peak_load"]["eqx_rng"]["added"] >= 0
    assert [t["met"] in (True, False) for t in io["targets"]] == [True] * 3
    assert "## Checkpoint I/O" in text


def test_gpu_suite_runs_on_cpu(smoke):
    gpu = smoke[0]["gpu"]
    assert gpu["peak_flops"] > 0
    assert {row["chains"] for row in gpu["rows"]} == {2}
    assert set(gpu["saturation"]) == {row["impl"] for row in gpu["rows"]}
