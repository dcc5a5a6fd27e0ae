"""Training: `TrainState`, and `make_train_step` with low dispatch overhead.

A training run is reproducible from its seed and its step number alone: the key of
step `t` is `derive(ts.key, t)`, and `TrainState.key` never changes. So a run resumed
from a checkpoint of `(model, state, opt_state, key, step)` draws exactly the numbers
an uninterrupted run would have drawn.

- `_state.py`: `TrainState` and `TrainState.create`.
- `_step.py`: the pure step (loss, gradients, update, NaN policy, several steps per
  call).
- `_make.py`: `make_train_step` and its fast-dispatch callable (built on
  `eqx_rng._dispatch`).
"""

from ._make import make_train_step as make_train_step
from ._state import TrainState as TrainState

__all__ = ["TrainState", "make_train_step"]
