"""The experiments with their tiny configs: outputs, bitwise resume, bad input.

Each script runs as a subprocess, as a user runs it (`python experiments/x.py`), so
the test suite's strict JAX settings and warning filters do not apply to it.
"""

import atexit
import dataclasses
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import pytest
from helpers import REPO

import eqx_rng

EXPERIMENTS = REPO / "experiments"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(
    name: str, *args: str, timeout: float = 900
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # No device-count or other flags from the caller's XLA_FLAGS; the suite's
    # faster-compile flag (conftest.py) is kept.
    flags = env.pop("XLA_FLAGS", "").split()
    flags = [f for f in flags if f.startswith("--xla_cpu_use_fusion_emitters")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    # The digits runs (straight, stopped, resumed) compile the same programs: JAX's
    # persistent cache, one per test process, compiles each once.
    env["JAX_COMPILATION_CACHE_DIR"] = str(_compile_cache())
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return subprocess.run(
        [sys.executable, str(EXPERIMENTS / name), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


_CACHE: list[Path] = []


def _compile_cache() -> Path:
    if not _CACHE:
        _CACHE.append(Path(tempfile.mkdtemp(prefix="eqx_rng_jax_cache_")))
        atexit.register(shutil.rmtree, _CACHE[0], True)
    return _CACHE[0]


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and modification time."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def digits_module() -> Any:
    """`experiments/digits.py` imported in-process (for its Config, main and load)."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module("digits")


# ------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits_straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_straight")
    stdout = ok(run_script("digits.py", "--tiny", "--no-progress", "--out", str(out)))
    return out, stdout


@pytest.fixture(scope="module")
def digits_resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_resumed")
    first = ok(
        run_script(
            "digits.py",
            "--tiny",
            "--no-progress",
            "--out",
            str(out),
            "--stop-after",
            "30",
        )
    )
    assert "stopped at step 30" in first
    assert not (out / "summary.json").exists()
    assert (out / "checkpoints" / "step_0000000030.ckpt").exists()
    second = ok(
        run_script(
            "digits.py", "--tiny", "--no-progress", "--out", str(out), "--resume"
        )
    )
    assert "resuming from" in second
    return out, second


def test_digits_tiny_outputs(digits_straight):
    out, stdout = digits_straight
    cfg = digits_module().Config.tiny()
    assert "mean +/- std" in stdout and "ensemble" in stdout
    for name in (
        "metrics.jsonl",
        "summary.json",
        "learning_curves.png",
        "reliability.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for name in ("learning_curves.png", "reliability.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    records = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(records) == cfg.chains * cfg.steps  # one per step and chain
    assert sorted({r["step"] for r in records}) == list(range(1, cfg.steps + 1))
    assert all(math.isfinite(r["grad_norm"]) for r in records)
    assert {r["chain"] for r in records} == set(range(cfg.chains))
    assert max(r["step"] for r in records) == cfg.steps
    assert all(math.isfinite(r["train_loss"]) for r in records)
    evals = [r for r in records if "test_accuracy" in r]
    assert len(evals) == cfg.chains * cfg.steps // cfg.eval_every

    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["chains"] == cfg.chains
    assert summary["seed"] == 0
    assert {"jax_version", "prng_impl", "devices"} <= set(summary["doctor"])
    results = summary["results"]
    assert len(results["per_chain"]) == cfg.chains
    for r in results["per_chain"]:
        assert 0.5 < r["accuracy"] <= 1.0  # 10 classes: chance is 0.1
        assert 0.0 <= r["ece"] <= 1.0
        assert math.isfinite(r["nll"]) and r["nll"] > 0
        mc = r["mc_dropout"]
        assert 0.5 < mc["accuracy"] <= 1.0
        assert mc["entropy_correct"] >= 0
    # chains differ (each has its own key), but train on the same data
    accs = [r["accuracy"] for r in results["per_chain"]]
    nlls = [r["nll"] for r in results["per_chain"]]
    assert len(set(nlls)) == len(nlls), (accs, nlls)
    checkpoints = sorted((out / "checkpoints").glob("step_*.ckpt"))
    assert checkpoints and checkpoints[-1].name == f"step_{cfg.steps:010d}.ckpt"


def test_digits_resume_is_bitwise(digits_straight, digits_resumed):
    straight, _ = digits_straight
    resumed, _ = digits_resumed
    # Logged metrics and final results: equal as text, so every float bit matches.
    assert (straight / "metrics.jsonl").read_text() == (
        resumed / "metrics.jsonl"
    ).read_text()
    a = json.loads((straight / "summary.json").read_text())["results"]
    b = json.loads((resumed / "summary.json").read_text())["results"]
    assert a == b
    # Final TrainStates (parameters, BatchNorm state, optimiser state, key, step).
    digits = digits_module()
    cfg = digits.Config.tiny()
    program = digits.make_program(cfg, digits.load_data())
    like = eqx.filter_eval_shape(program.init, eqx_rng.as_key(0))
    name = f"checkpoints/step_{cfg.steps:010d}.ckpt"
    ts_a = eqx_rng.load(straight / name, like)
    ts_b = eqx_rng.load(resumed / name, like)
    assert bool(eqx.tree_equal(ts_a, ts_b))


def test_digits_resume_with_other_config_refused(digits_straight, capsys):
    out, _ = digits_straight
    before = snapshot(out)
    main = digits_module().main
    with pytest.raises(SystemExit) as exc:
        main(["--tiny", "--no-progress", "--out", str(out), "--resume", "--seeds", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "chains: 2 -> 3" in err
    with pytest.raises(SystemExit) as exc:
        main(["--tiny", "--no-progress", "--out", str(out), "--resume", "--seed", "1"])
    assert exc.value.code == 2 and "seed: 0 -> 1" in capsys.readouterr().err
    assert snapshot(out) == before  # nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--seeds", "0"], "--seeds: must be >= 1"),
        (["--seeds", "two"], "expected a positive integer"),
        (["--stop-after", "15"], "multiple of steps_per_call"),
    ],
)
def test_digits_bad_flags(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        digits_module().main(["--tiny", "--out", str(out), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_digits_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exc:
        digits_module().main(["--tiny", "--out", str(blocker / "out")])
    assert exc.value.code == 2
    assert "cannot write there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        digits_module().main(["--tiny", "--out", str(blocker)])
    assert "not a directory" in capsys.readouterr().err


def test_digits_resume_without_checkpoint(tmp_path, capsys):
    out = tmp_path / "empty"
    with pytest.raises(SystemExit) as exc:
        digits_module().main(["--tiny", "--out", str(out), "--resume"])
    assert exc.value.code == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not out.exists()


# -------------------------------------------------------------------------------- sgld


def test_sgld_tiny_matches_exact_posterior(tmp_path):
    stdout = ok(run_script("sgld.py", "--tiny", "--out", str(tmp_path)))
    assert "all checks passed" in stdout
    summary = json.loads((tmp_path / "sgld.json").read_text())
    res = summary["results"]
    assert res["passed"] is True
    assert all(abs(z) <= 3 for z in res["z_scores"])
    assert all(r <= 1.01 for r in res["rhat"])
    assert (tmp_path / "sgld.png").read_bytes()[:8] == PNG_MAGIC
    # Welling & Teh (2011, 5.1): each mode's SGLD mass near the grid posterior's.
    mix = summary["mixture"]
    assert mix["passed"] is True
    assert abs(mix["sgld_mass_mode_a"] - mix["grid_mass_mode_a"]) <= mix["tolerance"]
    assert 0.2 < mix["grid_mass_mode_a"] < 0.8  # both modes carry mass
    assert (tmp_path / "sgld-mixture.png").read_bytes()[:8] == PNG_MAGIC


def test_sgld_broken_fails_loudly(tmp_path):
    proc = run_script("sgld.py", "--tiny", "--broken", "--out", str(tmp_path))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "BroadcastKeyError" in proc.stdout and "noise_key" in proc.stdout
    # The run forced through with keys="broadcast": chains move in lockstep.
    res = json.loads((tmp_path / "sgld-broken.json").read_text())["results"]
    assert res["passed"] is False
    assert min(res["chain_corr"]) > 0.9


# ---------------------------------------------------------------------------- pitfalls


def test_pitfalls_all_caught(tmp_path):
    stdout = ok(run_script("pitfalls.py", "--out", str(tmp_path)))
    report = json.loads((tmp_path / "pitfalls.json").read_text())
    outcomes = report["outcomes"]
    assert len(outcomes) >= 6
    assert all(o["caught"] for o in outcomes), [
        o["name"] for o in outcomes if not o["caught"]
    ]
    assert f"{len(outcomes)} of {len(outcomes)} pitfalls caught" in stdout


def test_digits_chain_draws_do_not_depend_on_chain_count():
    """Chain c's initial TrainState (parameters drawn from derive(key, c), its key)
    is bitwise the same whether 1 or 3 chains are built together. (The training
    arithmetic itself agrees only to float rounding: XLA may choose other kernels
    for other batch shapes.)"""
    digits = digits_module()
    data = digits.load_data()
    key = eqx_rng.as_key(0)
    firsts = []
    for chains in (1, 3):
        cfg = dataclasses.replace(digits.Config.tiny(), chains=chains)
        firsts.append(chain(digits.make_program(cfg, data).init(key), 0))
    assert bool(eqx.tree_equal(firsts[0], firsts[1]))


def chain(tree: Any, c: int) -> Any:
    return jax.tree.map(lambda a: a[c] if eqx.is_array(a) else a, tree)
