"""The snippet record and its registry."""

import dataclasses
from collections.abc import Callable
from typing import Any

B = 6
"""Mapped size of every snippet (small: the corpus must run in seconds)."""


@dataclasses.dataclass(frozen=True)
class Call:
    """`eqx_rng.vmap(fn, **options)(*args, **kwargs)`."""

    fn: Callable
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Snippet:
    name: str
    verdict: str  # "bug" or "ok"
    pattern: str  # where the pattern comes from
    make: Callable[[], Call]
    rows_equal: bool  # ground truth: every row of the output is the same
    miss: str | None = None  # why the check cannot see this bug


SNIPPETS: list[Snippet] = []


def snippet(
    verdict: str,
    pattern: str,
    *,
    rows_equal: bool | None = None,
    miss: str | None = None,
) -> Callable[[Callable[[], Call]], Callable[[], Call]]:
    """Register `make` as a snippet; `rows_equal` defaults to `verdict == "bug"`."""
    assert verdict in ("bug", "ok")

    def register(make: Callable[[], Call]) -> Callable[[], Call]:
        equal = verdict == "bug" if rows_equal is None else rows_equal
        SNIPPETS.append(Snippet(make.__name__, verdict, pattern, make, equal, miss))
        return make

    return register


def ones(*shape: int) -> Any:
    import jax.numpy as jnp

    return jnp.ones((B, *shape))
