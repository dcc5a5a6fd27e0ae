"""Timing: first call, calibrated warm-up, interleaved rounds, compiled memory."""

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._runner import Runner, compiled_memory


@dataclasses.dataclass
class Measurement:
    """What one runner measured, in one process."""

    runner: Runner
    first_call_s: float
    per_step_s: list[float]  # one value per round
    calls_per_round: int
    first_loss: float
    final_loss: float
    memory: dict[str, int] | None = None
    ratio_per_round: list[float] | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_step_s)

    @property
    def compile_s(self) -> float:
        """First call minus a steady-state call: tracing, lowering and compiling."""
        steady = self.median_s * self.runner.steps_per_call
        return max(self.first_call_s - steady, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "impl": self.runner.impl,
            "variant": self.runner.variant,
            "steps_per_call": self.runner.steps_per_call,
            "reference": self.runner.reference,
            "first_call_s": self.first_call_s,
            "per_step_s": self.per_step_s,
            "median_step_s": self.median_s,
            "calls_per_round": self.calls_per_round,
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "compile_s": self.compile_s,
            "memory": self.memory,
            "ratio_per_round": self.ratio_per_round,
        }


def _timed_call(runner: Runner, carry, t: int) -> tuple[Any, Any, float]:
    """One call, blocked on before the clock stops.

    It blocks on the loss: every output of one XLA execution becomes ready together,
    so the loss being ready means the new carry is too (a Python loop over chains
    returns every chain's loss). Blocking on the whole carry instead would add the
    cost of flattening it, ~0.2 ms for a tree of `eqx.Module`s against ~0.03 ms for
    raw JAX's dicts, to the implementations whose carry is a Module.
    """
    start = time.perf_counter()
    carry, loss = runner.call(carry, t)
    jax.block_until_ready(loss)
    return carry, loss, time.perf_counter() - start


def _chain0_loss(runner: Runner, loss, *, last: bool) -> float:
    """The first or last step's loss of chain 0."""
    if isinstance(loss, list):
        loss = jnp.stack(loss)
    if runner.steps_per_call > 1:
        loss = loss[..., -1 if last else 0]
    return float(jnp.ravel(loss)[0])


def measure(
    runners: list[Runner],
    *,
    round_s: float,
    budget_s: float,
    min_rounds: int,
    max_rounds: int | None = None,
    memory: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> list[Measurement]:
    """Time `runners` against each other in one process, finely interleaved.

    For each runner: build the carry, time the first call (trace + compile + run),
    warm up, and choose a number of calls per round that takes about `round_s`
    (at least one). Then rounds, each timing every runner once, the order rotated by
    one each round, until `budget_s` seconds have passed (at least `min_rounds`, at
    most `max_rounds`). Short rounds and many of them: the runners compared in one
    round ran within a fraction of a second of each other, so load from other
    processes hits them alike, and the median over many rounds drops the bursts.
    Every call is blocked on (`jax.block_until_ready` of its loss) before the clock
    stops. Ratios are taken against the runner marked `reference`, round by round.
    With `memory`, XLA's memory analysis of each runner's compiled call is recorded.
    """
    carries, steps, calls, firsts, losses, first_losses = [], [], [], [], [], []
    for runner in runners:
        carry = runner.init()
        jax.block_until_ready(carry)
        carry, loss, first = _timed_call(runner, carry, 0)
        first_losses.append(_chain0_loss(runner, loss, last=False))
        t = runner.steps_per_call
        warm = []
        while len(warm) < 3 and (len(warm) < 1 or sum(warm) < 2 * round_s):
            carry, loss, dt = _timed_call(runner, carry, t)
            t += runner.steps_per_call
            warm.append(dt)
        n = max(1, round(round_s / statistics.median(warm)))
        log(
            f"  {runner.label}: first call {first:.3f} s, "
            f"{statistics.median(warm) * 1e3 / runner.steps_per_call:.3f} ms/step, "
            f"{n} call(s) a round"
        )
        carries.append(carry)
        steps.append(t)
        calls.append(n)
        firsts.append(first)
        losses.append(loss)

    per_step: list[list[float]] = [[] for _ in runners]
    start, r = time.perf_counter(), 0
    while r < min_rounds or (
        time.perf_counter() - start < budget_s
        and (max_rounds is None or r < max_rounds)
    ):
        for j in range(len(runners)):
            i = (j + r) % len(runners)
            runner = runners[i]
            total = 0.0
            for _ in range(calls[i]):
                carries[i], losses[i], dt = _timed_call(runner, carries[i], steps[i])
                steps[i] += runner.steps_per_call
                total += dt
            per_step[i].append(total / (calls[i] * runner.steps_per_call))
        r += 1

    results = [
        Measurement(
            runner,
            firsts[i],
            per_step[i],
            calls[i],
            first_losses[i],
            _chain0_loss(runner, losses[i], last=True),
        )
        for i, runner in enumerate(runners)
    ]
    refs = [m for m in results if m.runner.reference]
    if refs:
        ref = refs[0]
        for m in results:
            m.ratio_per_round = [
                a / b for a, b in zip(m.per_step_s, ref.per_step_s, strict=True)
            ]
    if memory:
        for i, m in enumerate(results):
            if m.runner.lowerable is not None:
                fn, args = m.runner.lowerable(carries[i], steps[i])
                m.memory = compiled_memory(fn, args)
    return results


def matmul_peak_flops(n: int, *, repeats: int = 5) -> float:
    """Measured FLOP/s of an `n x n` float32 matrix multiply (best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    b = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def warm_up_jax() -> None:
    """Compile and run a few throwaway steps of the raw-JAX workload at a toy size,
    so that no runner's first call pays for JAX's one-off start-up work (importing
    and registering lowering rules, building the CPU client, and the like)."""
    from ._raw_jax import make_step
    from ._workload import Size, chain_keys

    size = Size("warm-up", hidden=3, batch=2, chains=1, in_size=5, out_size=2)
    init, step, _ = make_step(size)
    x = jnp.ones((size.batch, size.in_size))
    y = jnp.zeros((size.batch,), jnp.int32)
    carry = init(chain_keys(1)[0])
    jax.block_until_ready(jax.jit(step)(carry, (x, y)))
    jax.block_until_ready(
        jax.jit(jax.vmap(step, in_axes=(0, None)))(
            jax.tree_util.tree_map(lambda a: a[None], carry), (x, y)
        )
    )
