"""Where the first call's time goes: cProfile of trace + compile + one step.

Each implementation runs in a fresh child process (fresh JAX caches, after the same
throwaway warm-up step as `run.py`), and its first blocked call is profiled. The
time is attributed to phases by the cumulative time of the functions that own
them (nested phases are reported inside their parent):

```
python benchmarks/compile_profile.py                  # C=1, single step
python benchmarks/compile_profile.py --size C=32 --steps 50
```
"""

import argparse
import cProfile
import json
import os
import pstats
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
    "eqx_rng.vmap key-flow analysis": [("eqx_rng/_vmap.py", "_check_broadcast_keys")],
    "typecheck (jaxtyping/beartype)": [("jaxtyping/_decorator.py", "wrapped_fn")],
    "eqx_rng.vmap wrapper (all)": [("eqx_rng/_vmap.py", "__call__")],
    "loss and step body (traced)": [
        ("eqx_rng/_train/_step.py", "one_step"),
        ("benchmarks/_raw_jax.py", "step"),
    ],
}


def _child(impl: str, size_name: str, steps: int) -> dict:
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
    start = time.perf_counter()
    prof.enable()
    carry, loss = runner.call(carry, 0)
    jax.block_until_ready(loss)
    prof.disable()
    first = time.perf_counter() - start
    start = time.perf_counter()
    carry, loss = runner.call(carry, steps)
    jax.block_until_ready(loss)
    steady = time.perf_counter() - start
    stats = pstats.Stats(prof).stats  # pyright: ignore[reportAttributeAccessIssue]
    phases = {}
    for phase, targets in PHASES.items():
        best = 0.0
        for (filename, _, func), (_, _, _, cum, _) in stats.items():
            if any(f in filename and func == name for f, name in targets):
                best = max(best, cum)
        phases[phase] = best
    return {"impl": impl, "first_s": first, "steady_s": steady, "phases": phases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", default="C=1", help="C=1 (default) or C=N chains")
    parser.add_argument("--steps", type=int, default=1, help="steps per call")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.size, args.steps)))
        return 0
    rows = {}
    for impl in ("raw JAX", "eqx_rng"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", impl, "--size", args.size]
            + ["--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        rows[impl] = json.loads(out.stdout.strip().splitlines()[-1])
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
