"""`TrainState`: everything a training run carries from one step to the next."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, Int, PyTree

from .._custom_types import Key, KeyGrid
from .._keys import as_key
from .._typecheck import typecheck
from ._trainable import init_opt_state

_getattr = object.__getattribute__


@typecheck
class TrainState(eqx.Module):
    """Everything a training run carries from one step to the next.

    A pytree (an `eqx.Module`): save it with `eqx_rng.save`, map it over chains with
    `eqx_rng.vmap`. `key` never changes; the key of step `t` is
    `eqx_rng.derive(key, t)`, so a run is reproducible from `(key, step)` alone and a
    resumed run draws what an uninterrupted one would.

    **Fields:**

    - `model`: The model (any pytree, usually an `eqx.Module`).
    - `state`: An `eqx.nn.State` (BatchNorm statistics and the like), or `None`.
    - `opt_state`: The optax optimizer state, built on the trainable leaves of
        the model (see `TrainState.create`).
    - `key`: The run's typed PRNG key.
    - `step`: The number of steps taken, an `int32` scalar array.

    Make one with `TrainState.create`.

    !!! Example

        ```python
        import optax

        model = eqx.nn.Linear(2, 1, key=jr.key(0))
        ts = eqx_rng.TrainState.create(model, optax.sgd(0.1), key=1)
        assert int(ts.step) == 0 and ts.step.dtype == jnp.int32
        ```
    """

    model: PyTree
    state: PyTree
    opt_state: PyTree
    # Scalars for one run; a chain-batched TrainState (from `eqx_rng.ensemble`, or
    # built directly) has a leading chain axis here too.
    key: KeyGrid
    step: Int[Array, "*chains"]

    @classmethod
    @typecheck
    def create(
        cls,
        model: PyTree,
        optimizer: optax.GradientTransformation,
        *,
        key: Key | int | np.integer,
        state: PyTree = None,
        trainable: Any = None,
    ) -> "TrainState":
        """The state of a run at step 0.

        The model's and the state's arrays are copied, so a step that donates its
        input buffers (`make_train_step(..., donate=True)`) never deletes the arrays
        of the `model` passed in here.

        **Arguments:**

        - `model`: The model, usually an `eqx.Module`.
        - `optimizer`: An optax optimizer; its state is built with
            `optimizer.init(params)`, `params` the trainable leaves of `model`
            (`None` elsewhere).
        - `key`: The run's typed key, or an `int` seed (`eqx_rng.as_key`). Use a key
            that did not also build the model: for example
            `derive(key, "init")` for the model, `derive(key, "train")` here.
            (Keyword only argument.)
        - `state`: An `eqx.nn.State`, or `None` for a stateless model. (Keyword
            only argument.)
        - `trainable`: Which leaves are trained: a filter spec as in `eqx.filter`
            (a callable `leaf -> bool`, or a pytree of bools or callables that is a
            prefix of `model`); only inexact arrays among the chosen leaves are
            trained. The default trains every inexact array except the rates of
            `eqx_rng.nn` layers stored as arrays (`p` of `Dropout`,
            `GaussianDropout`, `DropPath`; `std` of `GaussianNoise`), and except any
            field a layer class lists in its class attribute
            `non_trainable_fields`. Pass the same spec to `make_train_step`.
            (Keyword only argument.)

        **Returns:**

        A `TrainState` with `step == 0` (`int32`).

        **Raises:**

        `ValueError` if `trainable` does not fit the model's structure.

        !!! Example

            ```python
            import optax

            key = jr.key(0)
            model, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(3)
            ts = eqx_rng.TrainState.create(
                model, optax.adam(1e-3), key=eqx_rng.derive(key, "train"),
                state=state,
            )
            ```
        """
        key = as_key(key)
        model = _copy_arrays(model)
        state = _copy_arrays(state)
        opt_state = init_opt_state(optimizer, model, trainable)
        return cls(
            model=model,
            state=state,
            opt_state=opt_state,
            key=key,
            step=jnp.zeros((), jnp.int32),
        )


def _copy_arrays(tree: Any) -> Any:
    """Copy the JAX arrays of `tree` (NumPy arrays are never donated)."""
    return jtu.tree_map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)


def new_train_state(model, state, opt_state, key, step) -> TrainState:
    """Build a `TrainState` as `tree_unflatten` does (no `__init__`, no checks)."""
    ts = object.__new__(TrainState)
    fields = _getattr(ts, "__dict__")
    fields["model"] = model
    fields["state"] = state
    fields["opt_state"] = opt_state
    fields["key"] = key
    fields["step"] = step
    return ts
