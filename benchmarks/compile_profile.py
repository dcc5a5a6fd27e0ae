"""Where the first call's time goes: cProfile of trace + compile + one step.

Each implementation runs in a fresh child process (fresh JAX caches, after the same
throwaway warm-up step as `run.py`), and its first blocked call is profiled. The
time is attributed to phases by the cumulative time of the functions that own
them (nested phases are reported inside their parent):

```
python benchmarks/compile_profile.py                  # C=1, single step
python benchmarks/compile_profile.py --size C=32 --steps 50
python benchmarks/compile_profile.py --repeat 9       # first-call ratio, no profiler
```

`--repeat N` measures the first call without cProfile (which slows Python-heavy
tracing more than XLA's compile): N rounds, each a fresh process per implementation
in alternating order, reporting wall time and the process's CPU time
(`time.process_time`: every thread, not the time spent waiting for a core on a
shared machine), the median and range of each and of the per-round ratios.
"""

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# phase -> (file substring, function name) pairs; the largest cumulative time of
# any match is the phase's time (an outer frame includes its inner ones).
PHASES = {
    "trace (jaxpr)": [
        ("interpreters/partial_eval.py", "trace_to_jaxpr_dynamic"),
        ("interpreters/partial_eval.py", "trace_to_jaxpr"),
    ],
    "lower (StableHLO)": [("interpreters/mlir.py", "lower_jaxpr_to_module")],
    "XLA compile": [("_src/compiler.py", "backend_compile_and_load")],
    "eqx_rng.vmap key-flow analysis": [
        ("eqx_rng/_vmap/_check.py", "check_broadcast_keys")
    ],
    # A checked call (its body included) on a signature not seen before; a
    # remembered signature skips it (see `eqx_rng/_typecheck.py`).
    "typecheck (jaxtyping/beartype)": [("jaxtyping/_decorator.py", "wrapped_fn")],
    "typecheck signatures (cache keys)": [("eqx_rng/_typecheck.py", "_signature")],
    "eqx_rng.vmap wrapper (all)": [("eqx_rng/_vmap/_wrapper.py", "__call__")],
    "loss and step body (traced)": [
        ("eqx_rng/_train/_step.py", "one_step"),
        ("benchmarks/_raw_jax.py", "step"),
    ],
}


def _child(impl: str, size_name: str, steps: int, profile: bool = True) -> dict:
    import jax

    from benchmarks import _eqx_rng, _harness, _raw_jax
    from benchmarks._workload import Size, make_data

    chains = int(size_name.split("=")[1]) if size_name.startswith("C=") else 1
    size = Size(size_name, hidden=256, batch=128, chains=chains, steps_per_call=steps)
    data = make_data(size)
    _harness.warm_up_jax()
    mod = _eqx_rng if impl == "eqx_rng" else _raw_jax
    variant = "multi" if steps > 1 else "step"
    (runner,) = mod.runners(size, data, (variant,))
    carry = runner.init()
    jax.block_until_ready(carry)
    prof = cProfile.Profile()
    start, cpu = time.perf_counter(), time.process_time()
    if profile:
        prof.enable()
    carry, loss = runner.call(carry, 0)
    jax.block_until_ready(loss)
    prof.disable()
    first = time.perf_counter() - start
    first_cpu = time.process_time() - cpu
    start = time.perf_counter()
    carry, loss = runner.call(carry, steps)
    jax.block_until_ready(loss)
    steady = time.perf_counter() - start
    out = {"impl": impl, "first_s": first, "first_cpu_s": first_cpu}
    out["steady_s"] = steady
    if not profile:
        return out
    stats = pstats.Stats(prof).stats  # pyright: ignore[reportAttributeAccessIssue]
    phases = {}
    for phase, targets in PHASES.items():
        best = 0.0
        for (filename, _, func), (_, _, _, cum, _) in stats.items():
            if any(f in filename and func == name for f, name in targets):
                best = max(best, cum)
        phases[phase] = best
    return {**out, "phases": phases}


def _run_child(impl: str, args, profile: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--size", args.size]
    cmd += ["--steps", str(args.steps)] + ([] if profile else ["--no-profile"])
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    return (
        f"{fmt.format(statistics.median(xs))} "
        f"({fmt.format(min(xs))}–{fmt.format(max(xs))})"
    )


def repeat(args) -> int:
    """`--repeat N`: first-call time in fresh processes, interleaved."""
    impls = ("raw JAX", "eqx_rng")
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for r in range(args.repeat):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            runs[impl].append(_run_child(impl, args, profile=False))
        print(
            f"round {r + 1}: "
            + ", ".join(
                f"{i} {runs[i][-1]['first_s']:.2f} s (CPU {runs[i][-1]['first_cpu_s']:.2f})"
                for i in impls
            ),
            file=sys.stderr,
            flush=True,
        )
    print(
        f"{args.size}, {args.steps} step(s) per call; first call (trace + compile + "
        f"one step) in a fresh process, {args.repeat} interleaved rounds; seconds, "
        "median (min–max)"
    )
    print("| measure | raw JAX | eqx_rng | eqx_rng / raw JAX, per round |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in (("first_s", "wall"), ("first_cpu_s", "CPU (process)")):
        a = [x[key] for x in runs["raw JAX"]]
        b = [x[key] for x in runs["eqx_rng"]]
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        print(
            f"| first call, {label} | {_spread(a)} | {_spread(b)} | "
            f"{_spread(ratios, '{:.2f}x')} |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", default="C=1", help="C=1 (default) or C=N chains")
    parser.add_argument("--steps", type=int, default=1, help="steps per call")
    parser.add_argument(
        "--repeat", type=int, default=0, help="first-call ratio over N fresh rounds"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child = _child(args.child, args.size, args.steps, not args.no_profile)
        print(json.dumps(child))
        return 0
    if args.repeat:
        return repeat(args)
    rows = {
        impl: _run_child(impl, args, profile=True) for impl in ("raw JAX", "eqx_rng")
    }
    raw, ours = rows["raw JAX"], rows["eqx_rng"]
    print(
        f"{args.size}, {args.steps} step(s) per call; seconds, first call (cProfile on)"
    )
    print("| phase | raw JAX | eqx_rng | difference |")
    print("| --- | ---: | ---: | ---: |")
    for name, a, b in [
        ("first call", raw["first_s"], ours["first_s"]),
        (
            "first − steady call",
            raw["first_s"] - raw["steady_s"],
            ours["first_s"] - ours["steady_s"],
        ),
        *[(p, raw["phases"][p], ours["phases"][p]) for p in PHASES],
    ]:
        print(f"| {name} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
