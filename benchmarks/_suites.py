"""The suites: `full` (CPU, the default), `quick` (a short run), `gpu`, and `smoke`
(the test suite's end-to-end check: every workload once, at toy sizes)."""

import dataclasses

from ._workload import Size


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    sizes: tuple[Size, ...]
    round_s: float  # seconds of calls per runner per round (at least one call)
    budget_s: dict[str, float]  # seconds of timed rounds per size (by name)
    min_rounds: int
    roles: dict[str, str]  # "tiny" / "c1" / "cmax" -> size name, for the targets
    max_rounds: int | None = None
    typecheck_roles: tuple[str, ...] = ("tiny",)
    typecheck_variants: tuple[str, ...] = ("step", "multi")  # eqx_rng's, in the child
    # sizes whose compiled memory is recorded; None: all
    memory_sizes: tuple[str, ...] | None = None
    # implementation ("raw JAX", ...) -> the variants to run; absent: all of them
    variants: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def full() -> Suite:
    sizes = (
        Size("tiny", hidden=8, batch=8, chains=1),
        Size("C=1", hidden=256, batch=128, chains=1),
        Size("C=8", hidden=256, batch=128, chains=8),
        Size("C=32", hidden=256, batch=128, chains=32),
    )
    return Suite(
        "full",
        sizes,
        round_s=0.02,
        budget_s={"tiny": 20, "C=1": 25, "C=8": 30, "C=32": 60},
        min_rounds=9,
        roles={"tiny": "tiny", "c1": "C=1", "cmax": "C=32"},
        typecheck_roles=("tiny", "c1"),
    )


def quick() -> Suite:
    sizes = (
        Size("tiny", hidden=8, batch=8, chains=1, steps_per_call=5),
        Size("C=4", hidden=16, batch=8, chains=4, steps_per_call=5),
    )
    return Suite(
        "quick",
        sizes,
        round_s=0.005,
        budget_s={},
        min_rounds=3,
        roles={"tiny": "tiny", "cmax": "C=4"},
        typecheck_roles=("tiny",),
        typecheck_variants=("step",),
        variants={"raw JAX": ("step", "loop")},
    )


def gpu(quick: bool) -> Suite:
    """Up to 1024 chains x batch 128 at hidden 1024 (`--quick`: 1, 2, 4 chains)."""
    chains = (1, 2, 4) if quick else (1, 8, 32, 128, 256, 512, 1024)
    sizes = tuple(
        Size(
            f"C={c}",
            hidden=1024,
            batch=128,
            chains=c,
            steps_per_call=4,  # the data pool; only single-call steps are timed
            vmap_chains=True,
        )
        for c in chains
    )
    return Suite(
        "gpu-quick" if quick else "gpu",
        sizes,
        round_s=0.02 if quick else 0.1,
        budget_s={size.name: 1.0 if quick else 20.0 for size in sizes},
        min_rounds=2 if quick else 7,
        roles={},
    )


SMOKE_SIZE = Size("tiny", hidden=8, batch=4, chains=2, steps_per_call=2)


def smoke() -> Suite:
    """One toy size with two chains, one round, no compiled-memory figures: each
    workload runs end to end, nothing is compiled twice (`tests/test_benchmarks.py`).
    """
    size = SMOKE_SIZE
    return Suite(
        "smoke",
        (size,),
        round_s=0.0,
        budget_s={},
        min_rounds=1,
        max_rounds=1,
        roles={"tiny": "tiny", "cmax": "tiny"},
        typecheck_roles=("tiny",),
        typecheck_variants=("step",),
        memory_sizes=(),
        variants={"raw JAX": ("step",), "plain Equinox": ("step",)},
    )


def gpu_smoke() -> Suite:
    """The `--gpu` suite's code path at the smoke size, as `C=2` (vmapped chains):
    the smoke suite's own step programs, found in the compilation cache that
    `run.py --smoke` turns on."""
    size = dataclasses.replace(SMOKE_SIZE, name="C=2", vmap_chains=True)
    return Suite(
        "gpu-smoke",
        (size,),
        round_s=0.0,
        budget_s={},
        min_rounds=1,
        max_rounds=1,
        roles={},
        memory_sizes=(),
    )
