"""The corpus record and its registry."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.random as jr

import eqx_rng

N = 4
"""Batch size of every case (tiny: the corpus must run in seconds)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the corpus.

    - `make(*, key)`: the model, or `(model, state)` when `stateful`. One object
      per case (a Module class, or `eqx.nn.make_with_state(Model)` made once), so
      that `eqx_rng.ensemble` can reuse its compiled build.
    - `forward(model, [state,] x, key)`: a forward pass over a batch, written as
      an Equinox user writes an evaluation function (the key positional);
      returns the output, or `(output, state)` when `stateful`.
    - `loss_fn(model, state, batch, *, key) -> (loss, (state, metrics))`: for
      `make_train_step`.
    - `batch(t, n)`: the pair `(x, y)` number `t`, with `n` examples.
    - `method`: the name of a method of the model taking one batch `x` (for the
      bound-method checks), or `None`.
    """

    name: str
    pattern: str
    make: Callable[..., Any]
    forward: Callable[..., Any]
    loss_fn: Callable[..., Any]
    batch: Callable[[int, int], tuple[Any, Any]]
    stateful: bool = False
    method: str | None = None


CASES: list[Case] = []


def register(case: Case) -> Case:
    CASES.append(case)
    return case


def data_key(name: str, t: int) -> Any:
    """The key of batch `t` of case `name` (fixed: the corpus is deterministic)."""
    return eqx_rng.derive(jr.key(2024), name, t)
