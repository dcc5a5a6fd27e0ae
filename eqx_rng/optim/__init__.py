"""Optimizers that draw their noise from the `key` extra argument.

Each is an `optax.GradientTransformationExtraArgs` whose `update` takes `key=`;
`eqx_rng.make_train_step` passes `key=derive(step_key, "optimizer")`, so chains of
an ensemble draw different noise and a resumed run draws what an uninterrupted one
would. None keeps a seed in its state.
"""

from ._noise import add_noise as add_noise
from ._sgld import PSGLDState as PSGLDState, psgld as psgld, sgld as sgld
