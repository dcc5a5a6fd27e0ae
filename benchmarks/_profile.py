"""cProfile of the Python side of a runner's calls (where dispatch time goes)."""

import cProfile
import io
import pstats
import time

import jax

from ._runner import Runner


def profile(runner: Runner, n_calls: int, *, top: int = 30) -> tuple[str, float]:
    """Profile `n_calls` blocked calls after a warm-up.

    Returns the `pstats` listing (sorted by cumulative time) and the wall time per
    call measured under the profiler.
    """
    carry = runner.init()
    t = 0
    for _ in range(3):
        carry, loss = runner.call(carry, t)
        jax.block_until_ready(loss)
        t += runner.steps_per_call
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(n_calls):
        carry, loss = runner.call(carry, t)
        jax.block_until_ready(loss)
        t += runner.steps_per_call
    prof.disable()
    per_call = (time.perf_counter() - start) / n_calls
    stream = io.StringIO()
    stats = pstats.Stats(prof, stream=stream)
    stats.sort_stats("cumulative").print_stats(top)
    header = f"{runner.label}: {n_calls} calls, {per_call * 1e6:.0f} µs per call\n"
    return header + stream.getvalue(), per_call
