"""Trace-time cost of `eqx_rng.vmap`'s broadcast-key check on the digits model.

Traces (and lowers, without compiling) one `advance` call of experiments/digits.py at
its default configuration (8 chains, hidden 128, 50 fused steps) and reports the
total time and the time spent inside the check. Run each mode in a fresh process:

    python benchmarks/key_check_cost.py            # as the library runs
    python benchmarks/key_check_cost.py --force    # the analysis trace forced on
    python benchmarks/key_check_cost.py --off      # the check suspended
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import equinox as eqx
import jax.random as jr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import digits  # noqa: E402  # pyright: ignore[reportMissingImports]

from eqx_rng._vmap import _check, _wrapper  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Trace-time cost of the broadcast-key check."
    )
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--off", action="store_true")
    args = parser.parse_args()
    spent = [0.0, 0]
    original = _wrapper.check_broadcast_keys

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent[0] += time.perf_counter() - start
            spent[1] += 1

    _wrapper.check_broadcast_keys = timed
    if args.force:
        _check._may_close_over_keys = lambda fn: True
    cfg = digits.Config()
    program = digits.make_program(cfg, digits.load_data())
    ts = eqx.filter_jit(program.init)(jr.key(0))
    spent[:] = [0.0, 0]
    ctx = _check.suspended() if args.off else contextlib.nullcontext()
    with ctx:
        start = time.perf_counter()
        program.advance.lower(ts)
        total = time.perf_counter() - start
    mode = "off" if args.off else "force" if args.force else "default"
    result = {"mode": mode, "trace_s": total, "check_s": spent[0], "checks": spent[1]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
