"""Per-call cost of the tiny forward and training step, against raw `jax.jit`.

The two dispatch-bound calls of the targets, at the tiny size (hidden 8, batch 8,
one chain), where a call is almost all Python and dispatch:

- **forward**: `eqx_rng.jit` and `eqx.filter_jit` against raw `jax.jit` on
  parameter dicts (`_eval.py`: the model, its `eqx.nn.State`, a batch, a key);
- **step**: `make_train_step` against raw JAX's single-call step.

Rounds of `--calls` calls per runner, the runners' order rotated each round; every
round's last call is blocked on. Each call is timed by the wall clock and by the main
thread's CPU clock (`time.thread_time`: the Python and dispatch work of the call,
without the time spent waiting for a core on a shared machine, and without XLA's
own threads). Reported: the median per call over rounds (min–max), and the median
of the per-round ratios to raw JAX (min–max).

```
python benchmarks/dispatch_cost.py                 # 40 rounds of 200 calls
python benchmarks/dispatch_cost.py --rounds 80 --json out.json
```
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from benchmarks import _eqx_rng, _eval, _raw_jax, _suites  # noqa: E402
from benchmarks._workload import make_data  # noqa: E402


def _runners(which: str) -> list:
    size = _suites.full().sizes[0]  # tiny
    data = make_data(size)
    if which == "forward":
        return _eval.runners(size, data)
    return [
        _raw_jax.runners(size, data, ("step",))[0],
        _eqx_rng.runners(size, data, ("step",))[0],
    ]


def measure(which: str, rounds: int, calls: int) -> dict:
    runners = _runners(which)
    carries, steps = [], []
    for r in runners:
        carry, loss = r.call(r.init(), 0)  # compile
        for t in range(1, 20):  # warm up
            carry, loss = r.call(carry, t)
        jax.block_until_ready(loss)
        carries.append(carry)
        steps.append(20)
    wall = [[] for _ in runners]
    cpu = [[] for _ in runners]
    for k in range(rounds):
        for j in range(len(runners)):
            i = (j + k) % len(runners)
            r, carry, t = runners[i], carries[i], steps[i]
            w0, c0 = time.perf_counter(), time.thread_time()
            carry, loss = r.call(carry, t)
            for _ in range(calls - 1):
                t += 1
                carry, loss = r.call(carry, t)
            t += 1
            jax.block_until_ready(loss)
            wall[i].append((time.perf_counter() - w0) / calls)
            cpu[i].append((time.thread_time() - c0) / calls)
            carries[i], steps[i] = carry, t
    ref = next(i for i, r in enumerate(runners) if r.reference)
    rows = []
    for i, r in enumerate(runners):
        rows.append(
            {
                "impl": r.impl,
                "wall_s": wall[i],
                "cpu_s": cpu[i],
                "wall_ratio": [a / b for a, b in zip(wall[i], wall[ref], strict=True)],
                "cpu_ratio": [a / b for a, b in zip(cpu[i], cpu[ref], strict=True)],
            }
        )
    return {"which": which, "rounds": rounds, "calls": calls, "rows": rows}


def _spread(xs: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    med, lo, hi = (f(xs) * scale for f in (statistics.median, min, max))
    return f"{fmt.format(med)} ({fmt.format(lo)}–{fmt.format(hi)})"


def table(result: dict) -> str:
    lines = [
        f"{result['which']}, tiny: {result['rounds']} rounds of {result['calls']} calls",
        "",
        "| runner | wall µs/call | × raw, wall | CPU µs/call (main thread) | × raw, CPU |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['impl']} | {_spread(row['wall_s'], 1e6)} | "
            f"{_spread(row['wall_ratio'], fmt='{:.2f}x')} | "
            f"{_spread(row['cpu_s'], 1e6)} | {_spread(row['cpu_ratio'], fmt='{:.2f}x')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--only", choices=("forward", "step"), default=None)
    parser.add_argument("--json", default=None, help="also write the rounds here")
    args = parser.parse_args(argv)
    results = []
    for which in ("forward", "step"):
        if args.only in (None, which):
            results.append(measure(which, args.rounds, args.calls))
            print(table(results[-1]) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
