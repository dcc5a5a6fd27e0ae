"""What every implementation hands the harness: a `Runner`."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax


@dataclasses.dataclass
class Runner:
    """One timed thing: an implementation, a variant and a size.

    - `init()` builds the training carry (on device, not timed).
    - `call(carry, t)` does one dispatch starting at step `t` and returns
      `(carry, loss)`: the mean loss of each step, shaped `(chains?, steps)` when
      `steps_per_call > 1`, `(chains?,)` otherwise; a list of per-chain losses for a
      Python loop over chains.
      It advances `steps_per_call` steps.
    - `lowerable(carry, t)` gives `(fn, args)` whose compiled memory analysis
      describes one call, or `None` to skip (Python loops over chains).
    """

    impl: str
    variant: str
    steps_per_call: int
    init: Callable[[], Any]
    call: Callable[[Any, int], tuple[Any, Any]]
    lowerable: Callable[[Any, int], tuple[Callable, tuple]] | None = None
    reference: bool = False

    @property
    def label(self) -> str:
        return f"{self.impl} | {self.variant}"


def compiled_memory(fn: Callable, args: tuple) -> dict[str, int] | None:
    """Argument, output and temporary bytes of `fn(*args)` as compiled by XLA.

    `fn` is the runner's own jitted function (`jax.jit` or `eqx.filter_jit`), so
    `fn.lower(*args).compile()` finds the executable that the timed calls used in
    JAX's caches and costs next to nothing. Anything else (or a `lower` that fails) is
    traced, lowered and compiled afresh inside a new `jax.jit`.
    """
    compiled = None
    if hasattr(fn, "lower"):
        try:
            compiled = fn.lower(*args).compile()  # type: ignore[attr-defined]
        except Exception:
            compiled = None
        # `eqx.filter_jit(...).lower(...).compile()` wraps `jax.stages.Compiled`.
        compiled = getattr(compiled, "compiled", compiled)
    if compiled is None:
        dynamic, static = eqx.partition(args, eqx.is_array)

        def flat(dyn):
            return eqx.filter(fn(*eqx.combine(dyn, static)), eqx.is_array)

        compiled = jax.jit(flat).lower(dynamic).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    arg = int(analysis.argument_size_in_bytes)
    out = int(analysis.output_size_in_bytes)
    temp = int(analysis.temp_size_in_bytes)
    alias = int(analysis.alias_size_in_bytes)
    return {
        "argument_bytes": arg,
        "output_bytes": out,
        "temp_bytes": temp,
        "alias_bytes": alias,
        "total_bytes": arg + out + temp - alias,
    }


def max_output_diff(runners: list[Runner]) -> float:
    """Largest absolute difference between the first output (logits) of the
    first runner's call and of each other runner's, on their initial carries."""
    outs = []
    for runner in runners:
        assert runner.lowerable is not None
        fn, args = runner.lowerable(runner.init(), 0)
        outs.append(fn(*args)[0])
    return max(float(abs(outs[0] - out).max()) for out in outs[1:])
