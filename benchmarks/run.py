"""Benchmark eqx_rng against plain Equinox and hand-written raw JAX (and Flax NNX).

The workload (`benchmarks/_workload.py`) is a stochastic MLP (BatchNorm, dropout and
Gaussian noise, fresh per-example randomness every step) trained with Adam, as one
chain or as many independent chains. All implementations run in one process,
interleaved round by round; ratios are to raw JAX in the same round.

```
python benchmarks/run.py               # full CPU suite (5-8 minutes on 2 cores)
python benchmarks/run.py --quick       # smoke run, well under a minute
python benchmarks/run.py --gpu         # throughput: up to 1024 chains, hidden 1024
python benchmarks/run.py --gpu --quick # the same, 1-4 chains (a CPU smoke check)
python benchmarks/run.py --profile     # also cProfile the dispatch path (tiny size)
python benchmarks/run.py --smoke       # every workload once at toy sizes (the tests)
```
`--out DIR` (default `benchmarks/results/`; `-` to only print) receives
`results.json` and `results.md`. `make bench ARGS="--quick"` runs it through make.
"""

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from benchmarks import (  # noqa: E402
    _checkpoint_io,
    _eqx_rng,
    _flax_nnx,
    _forward,
    _harness,
    _perf,
    _plain_eqx,
    _raw_jax,
    _report,
    _suites,
)
from benchmarks._workload import Size, make_data  # noqa: E402

# Display order. Runners are built and first called in the reverse order, so that
# any cache that warms on first use (JAX's tracing caches for `jax.random`'s inner
# jitted functions, say) favours raw JAX, not eqx_rng: compile ratios err against us.
IMPLEMENTATIONS = (_raw_jax, _eqx_rng, _plain_eqx, _flax_nnx)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- environment ------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version(module)
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        return out.stdout.strip()
    except Exception:
        return None


def environment() -> dict:
    device = jax.devices()[0]
    versions = {
        name: _version(name)
        for name in ("jax", "jaxlib", "equinox", "optax", "eqx_rng", "flax")
    }
    return {
        "date": dt.date.today().isoformat(),
        "platform": device.platform,
        "device": f"{device.platform}: {getattr(device, 'device_kind', str(device))}",
        "device_count": jax.device_count(),
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {k: v for k, v in versions.items() if v is not None},
        "typecheck": os.environ.get("EQX_RNG_TYPECHECK", "1 (default)"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "commit": _git_commit(),
    }


# --- the main suites -------------------------------------------------------------


ALL_VARIANTS = ("step", "multi", "loop")


def runners_for(size: Size, data, impls=IMPLEMENTATIONS, variants=None):
    """Every implementation's runners; `variants` maps an implementation's name to
    the variants to run (absent: all)."""
    out = []
    for impl in reversed(impls):
        out += impl.runners(size, data, (variants or {}).get(impl.NAME, ALL_VARIANTS))
    return out


def run_sizes(
    sizes,
    suite: _suites.Suite,
    *,
    memory_sizes=None,
    impls=IMPLEMENTATIONS,
    variants=None,
    budget_scale: float = 1.0,
):
    """Measure every size with the suite's timing; compiled memory only for
    `memory_sizes` (None: all)."""
    results = []
    for size in sizes:
        log(
            f"[{size.name}] hidden {size.hidden}, batch {size.batch}, chains {size.chains}"
        )
        data = make_data(size)
        runners = runners_for(size, data, impls, variants)
        memory = memory_sizes is None or size.name in memory_sizes
        measured = _harness.measure(
            runners,
            round_s=suite.round_s,
            budget_s=budget_scale * suite.budget_s.get(size.name, 0.0),
            min_rounds=suite.min_rounds,
            max_rounds=suite.max_rounds,
            memory=memory,
            log=log,
        )
        order = [impl.NAME for impl in IMPLEMENTATIONS]
        measured.sort(key=lambda m: order.index(m.runner.impl))  # stable
        results.append(
            {
                "size": {**size.__dict__, "examples_per_step": size.examples_per_step},
                "rounds": len(measured[0].per_step_s),
                "measurements": [m.to_json() for m in measured],
            }
        )
    return results


def sanity_checks(sizes: list[dict]) -> tuple[list[str], bool]:
    """Every runner's first-step loss (chain 0) matches raw JAX's: same maths.

    Raw JAX, plain Equinox and eqx_rng derive the same keys from the same seed, so
    they should agree to float tolerance (bitwise, when the layers draw the way the
    raw code does); Flax NNX draws from its own `Rngs` streams and only has to be
    finite and in the same ballpark.
    """
    lines, ok = [], True
    for sr in sizes:
        ms = sr["measurements"]
        ref = next(m for m in ms if m["reference"])["first_loss"]
        worst = {}
        for m in ms:
            loss = m["first_loss"]
            finite = loss == loss and abs(loss) != float("inf")
            close = abs(loss - ref) <= 0.1 + 0.1 * abs(ref)
            ok = ok and finite and close
            worst[m["impl"]] = max(worst.get(m["impl"], 0.0), abs(loss - ref))
        parts = ", ".join(
            f"{impl} {'bitwise equal' if d == 0 else f'|Δ| = {d:.1e}'}"
            for impl, d in worst.items()
            if impl != _raw_jax.NAME
        )
        lines.append(
            f"`{sr['size']['name']}` first-step loss (chain 0): raw JAX {ref:.6f}; {parts}"
        )
    lines.append(
        "all first-step losses finite and within 0.1 + 10% of raw JAX: "
        + ("yes" if ok else "NO")
    )
    return lines, ok


def typecheck_child(suite: _suites.Suite, path: str) -> None:
    """In the child: time raw JAX and eqx_rng (single call and multi-step)."""
    wanted = {suite.roles[r] for r in suite.typecheck_roles}
    sizes = [s for s in suite.sizes if s.name in wanted]
    results = run_sizes(
        sizes,
        suite,
        budget_scale=0.5,
        memory_sizes=(),
        impls=(_raw_jax, _eqx_rng),
        variants={_raw_jax.NAME: ("step",), _eqx_rng.NAME: suite.typecheck_variants},
    )
    Path(path).write_text(json.dumps(results))


def typecheck_compare(suite: _suites.Suite, args, main_sizes: list[dict]) -> dict:
    """Run the child with the opposite `EQX_RNG_TYPECHECK` and compare ratios."""
    on_now = os.environ.get("EQX_RNG_TYPECHECK", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "child.json")
        cmd = [sys.executable, __file__, "--child-typecheck", path]
        if args.quick:
            cmd.append("--quick")
        if args.smoke:
            cmd.append("--smoke")
        if args.rounds:
            cmd += ["--rounds", str(args.rounds)]
        if args.sizes:
            cmd += ["--sizes", args.sizes]
        env = {**os.environ, "EQX_RNG_TYPECHECK": "0" if on_now else "1"}
        log(
            f"[typecheck] child process with EQX_RNG_TYPECHECK={env['EQX_RNG_TYPECHECK']}"
        )
        subprocess.run(cmd, check=True, env=env)
        child = json.loads(Path(path).read_text())
    rows = []
    for other in child:
        name = other["size"]["name"]
        mine = next(sr for sr in main_sizes if sr["size"]["name"] == name)
        for m_other in other["measurements"]:
            if m_other["impl"] != "eqx_rng":
                continue
            m_mine = next(
                m
                for m in mine["measurements"]
                if m["impl"] == "eqx_rng" and m["variant"] == m_other["variant"]
            )
            on, off = (m_mine, m_other) if on_now else (m_other, m_mine)
            r_on, r_off = on["ratio_per_round"], off["ratio_per_round"]
            noise = max(
                0.03,
                (max(r_on) - min(r_on)) / 2,
                (max(r_off) - min(r_off)) / 2,
            )
            rows.append(
                {
                    "size": name,
                    "variant": m_other["variant"],
                    "ratio_on": _report._med(r_on),
                    "ratio_off": _report._med(r_off),
                    "noise": noise,
                    "first_on_s": on["first_call_s"],
                    "first_off_s": off["first_call_s"],
                }
            )
    return {"rows": rows, "child": child}


def forward_suite(suite: _suites.Suite) -> dict:
    """Chains x batch forward at the suite's largest chain count: nested
    `eqx_rng.vmap` with one key in against `jax.vmap` with pre-split keys."""
    size = next(s for s in suite.sizes if s.name == suite.roles["cmax"])
    log(f"[forward] {size.name}: chains x batch forward, eqx_rng.vmap vs jax.vmap")
    data = make_data(size)
    runners = _forward.runners(size, data)
    measured = _harness.measure(
        runners,
        round_s=suite.round_s,
        budget_s=suite.budget_s.get(size.name, 0.0) / 2,
        min_rounds=suite.min_rounds,
        max_rounds=suite.max_rounds,
        memory=suite.memory_sizes is None or size.name in suite.memory_sizes,
        log=log,
    )
    diff = _forward.same_numbers(runners)
    return {
        "size": {**size.__dict__, "examples_per_step": size.examples_per_step},
        "rounds": len(measured[0].per_step_s),
        "max_abs_diff": diff,
        "measurements": [m.to_json() for m in measured],
    }


def profile(size: Size, out_dir: Path | None, n_calls: int) -> list[str]:
    """cProfile of the Python dispatch path of each single-call step at `size`."""
    from benchmarks import _profile

    data = make_data(size)
    lines = []
    single = {impl.NAME: ("step",) for impl in IMPLEMENTATIONS}
    for runner in runners_for(size, data, variants=single):
        text, per_call = _profile.profile(runner, n_calls)
        lines.append(f"{runner.label}: {per_call * 1e6:.0f} µs per call under cProfile")
        if out_dir is not None:
            slug = runner.impl.lower().replace(" ", "_")
            (out_dir / f"profile_{size.name}_{slug}.txt").write_text(text)
        else:
            print(text)
    return lines


def gpu_suite(args, suite: _suites.Suite) -> dict:
    platform_ = jax.devices()[0].platform
    small = 256 if args.smoke else 512 if args.quick else 1024
    peak_n = 4096 if platform_ != "cpu" else small
    peak = _harness.matmul_peak_flops(peak_n)
    log(f"[gpu] matmul peak {peak / 1e9:.1f} GFLOP/s ({peak_n}^2 float32)")
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        avail = stats["bytes_limit"]
    else:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows, skipped, sizes_out = [], [], []
    for size in suite.sizes:
        # two carries alive (params + Adam) and one step's temporaries (grads, new
        # params, activations) for the running one.
        per_chain = 4 * (11 * size.n_params() + 24 * size.batch * size.hidden)
        if per_chain * size.chains > 0.8 * avail:
            skipped.append(size.chains)
            log(
                f"[gpu] skipping C={size.chains}: ~{per_chain * size.chains / 2**30:.0f} GiB"
            )
            continue
        sr = run_sizes(
            [size],
            suite,
            memory_sizes=suite.memory_sizes,
            impls=(_raw_jax, _eqx_rng),
            variants={_raw_jax.NAME: ("step",), _eqx_rng.NAME: ("step",)},
        )[0]
        sizes_out.append(sr)
        for r in _report.derived(sr):
            rows.append(
                {
                    "chains": size.chains,
                    "impl": r["impl"],
                    "median_s": r["median_s"],
                    "examples_per_s": r["examples_per_s"],
                    "flops": size.matmul_flops_per_step() / r["median_s"],
                    "ratio": r["ratio"],
                    "memory_mib": r["memory_mib"],
                }
            )
    saturation = {}
    for impl in sorted({r["impl"] for r in rows}):
        mine = [r for r in rows if r["impl"] == impl]
        best = max(r["examples_per_s"] for r in mine)
        saturation[impl] = min(
            r["chains"] for r in mine if r["examples_per_s"] >= 0.9 * best
        )
    stats = jax.devices()[0].memory_stats()
    return {
        "peak_n": peak_n,
        "peak_flops": peak,
        "rows": rows,
        "skipped": skipped,
        "saturation": saturation,
        "device_peak_bytes": stats.get("peak_bytes_in_use") if stats else None,
        "sizes": sizes_out,
    }


def _checkpoint_io_text(results: dict) -> str:
    if "checkpoint_io" not in results:
        return ""
    return "\n" + _checkpoint_io.markdown(results["checkpoint_io"])


def _compilation_cache() -> None:
    """For `--smoke`: programs that several workloads compile alike (the training
    steps again in the typecheck child and in the `--gpu` code path) are compiled
    once, through a compilation cache for this run only (the child inherits it)."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-cache-")
    jax.config.update(
        "jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"]
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 minute)")
    parser.add_argument("--gpu", action="store_true", help="chains x batch throughput")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every workload (the --gpu one too) once at toy sizes: a test, no timings",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--sizes", default=None, help="comma-separated size names to run (default: all)"
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--no-typecheck", action="store_true", help="skip the on/off child"
    )
    parser.add_argument(
        "--no-perf",
        action="store_true",
        help="skip the forward-dispatch and CNN-chains workloads",
    )
    parser.add_argument(
        "--cnn-batch-size",
        action="store_true",
        help="also time lax.map(..., batch_size=chains // 4) in the CNN workload",
    )
    parser.add_argument(
        "--report", default=None, help="print the tables of a results.json and exit"
    )
    parser.add_argument(
        "--checkpoint-mb",
        type=float,
        default=None,
        help="checkpoint I/O tree size in MB (default 256; 8 with --quick; 0: skip)",
    )
    parser.add_argument("--child-typecheck", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        if results.get("sizes"):
            results["targets"] = _report.targets(results)
        text = _report.markdown(results) + _checkpoint_io_text(results)
        text += "\n" + _perf.markdown(results)
        print(text + f"\nWall time: {results['wall_s']:.0f} s.")
        return 0

    if args.smoke and args.gpu:
        parser.error("--smoke runs the --gpu code path too; pass one of them")
    if args.smoke:
        _compilation_cache()
    if (
        args.quick or args.smoke
    ) and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # A smoke run: compile ~3x faster with XLA's backend optimisations off (read
        # when the backend starts, which nothing has done yet). Its timings are not
        # representative and are not reported anywhere.
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        os.environ["XLA_FLAGS"] = flags.strip()
    if args.gpu:
        suite = _suites.gpu(args.quick)
    elif args.smoke:
        suite = _suites.smoke()
    else:
        suite = _suites.quick() if args.quick else _suites.full()
    if args.rounds:
        suite = _suites.dataclasses.replace(
            suite, min_rounds=args.rounds, max_rounds=args.rounds
        )
    if args.sizes:
        names = args.sizes.split(",")
        unknown = set(names) - {s.name for s in suite.sizes}
        if unknown:
            parser.error(
                f"unknown sizes {sorted(unknown)}; the suite has {suite.sizes}"
            )
        sizes = tuple(s for s in suite.sizes if s.name in names)
        suite = _suites.dataclasses.replace(suite, sizes=sizes)
    start = time.perf_counter()
    if not args.smoke:  # a smoke run compares no first calls
        _harness.warm_up_jax()
    if args.child_typecheck:
        typecheck_child(suite, args.child_typecheck)
        return 0

    out_dir = None if args.out == "-" else Path(args.out)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results: dict = {
        "suite": suite.name,
        "command": command.strip(),
        "env": environment(),
        "roles": suite.roles,
        "sizes": [],
    }
    ok = True
    if args.gpu:
        results["gpu"] = gpu_suite(args, suite)
    else:
        results["sizes"] = run_sizes(
            suite.sizes,
            suite,
            memory_sizes=suite.memory_sizes,
            variants=suite.variants,
        )
        checks, ok = sanity_checks(results["sizes"])
        results["checks"] = checks
        for line in checks:
            log(line)
        if "cmax" in suite.roles and suite.roles["cmax"] in {
            s.name for s in suite.sizes
        }:
            results["forward"] = forward_suite(suite)
            results["checks"].append(
                "chains x batch forward: logits against raw JAX with pre-split keys, max |Δ| = "
                f"{results['forward']['max_abs_diff']:.1e}"
            )
        if not args.no_perf:
            results["dispatch"] = _perf.dispatch_suite(suite, log)
            results["cnn"] = _perf.cnn_suite(suite, log, batch_size=args.cnn_batch_size)
            results["checks"] += _perf.targets(results)
        wanted = {suite.roles[r] for r in suite.typecheck_roles}
        if not args.no_typecheck and wanted & {s.name for s in suite.sizes}:
            results["typecheck"] = typecheck_compare(suite, args, results["sizes"])
        results["targets"] = _report.targets(results)
        if args.profile:
            tiny = suite.sizes[0]
            results["profile"] = profile(tiny, out_dir, 200 if args.quick else 2000)
            results["checks"] += results["profile"]
        mb = args.checkpoint_mb
        if mb is None:
            mb = 8.0 if args.quick or args.smoke else 256.0
        if mb > 0:
            rounds = 2 if args.quick or args.smoke else 5
            results["checkpoint_io"] = _checkpoint_io.run(mb, rounds, log=log)
        if args.smoke:
            results["gpu"] = gpu_suite(args, _suites.gpu_smoke())
    results["wall_s"] = time.perf_counter() - start
    text = _report.markdown(results) + _checkpoint_io_text(results)
    text += "\n" + _perf.markdown(results)
    text += f"\nWall time: {results['wall_s']:.0f} s.\n"
    print(text)
    if out_dir is not None:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        (out_dir / "results.md").write_text(text)
        log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
