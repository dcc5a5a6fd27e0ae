"""The three suites: `full` (CPU, the default), `quick` (a smoke run) and `gpu`."""

import dataclasses

from ._workload import Size


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    sizes: tuple[Size, ...]
    rounds: int
    target_s: float  # seconds of calls per runner per round
    roles: dict[str, str]  # "tiny" / "c1" / "cmax" -> size name, for the targets
    typecheck_roles: tuple[str, ...] = ("tiny",)
    typecheck_variants: tuple[str, ...] = ("step", "multi")  # eqx_rng's, in the child
    memory_sizes: tuple[str, ...] | None = (
        None  # sizes with AOT compile + memory; None: all
    )
    variants: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # implementation ("raw JAX", ...) -> the variants to run; absent: all of them


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
        rounds=7,
        target_s=0.25,
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
        rounds=3,
        target_s=0.02,
        roles={"tiny": "tiny", "cmax": "C=4"},
        typecheck_roles=("tiny",),
        typecheck_variants=("step",),
        variants={"raw JAX": ("step", "loop")},
    )


def gpu_sizes(quick: bool) -> tuple[Size, ...]:
    """Up to 1024 chains x batch 128 at hidden 1024 (`--quick`: 1, 2, 4 chains)."""
    chains = (1, 2, 4) if quick else (1, 8, 32, 128, 256, 512, 1024)
    return tuple(
        Size(
            f"C={c}",
            hidden=1024,
            batch=128,
            chains=c,
            steps_per_call=4,
            vmap_chains=True,
        )
        for c in chains
    )
