"""`TrainState`: everything a training run carries from one step to the next."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, Int, PyTree

from .._custom_types import Key, KeyGrid, _legacy_key_message
from .._keys import as_key
from .._typecheck import typecheck, typecheck_enabled
from .._util import describe, is_legacy_key, is_typed_key
from ._trainable import init_opt_state, split_trainable

_getattr = object.__getattribute__


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

    Make one with `TrainState.create`. Built directly, `TrainState(model, state,
    opt_state, key, step)` checks its fields and refuses the common mistakes (a
    legacy or missing key, a Python `int` step, the optimizer or an `eqx.nn.State`
    in the wrong field) with a short message naming the fix.

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

    def __init__(
        self, model: PyTree, state: PyTree, opt_state: PyTree, key: Any, step: Any
    ):
        """**Arguments:**

        - `model`: The model, usually an `eqx.Module` (chain-batched: a leading
            chain axis on its arrays).
        - `state`: An `eqx.nn.State`, or `None`.
        - `opt_state`: The optimizer's state,
            `optimizer.init(eqx.filter(model, eqx.is_inexact_array))` by default.
        - `key`: A typed PRNG key (chain-batched: an array of keys, one per chain).
        - `step`: An integer array: `jnp.zeros((), jnp.int32)` for a new run (one
            entry per chain when chain-batched).

        **Raises:**

        `TypeError` for a legacy `uint32` key (the message starts with the fix,
        `eqx_rng.as_key`), a `key` that is not a typed key array, a `step` that is
        not a signed integer array (the annotations of the fields `key` and
        `step`), a class instead of a model, or an optax optimizer or
        `eqx.nn.State` in the wrong field. These checks are off when
        `EQX_RNG_TYPECHECK=0` was set before import, like the type checks.

        !!! Example

            ```python
            import optax

            model = eqx.nn.Linear(2, 1, key=jr.key(0))
            optimizer = optax.sgd(0.1)
            opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
            ts = eqx_rng.TrainState(
                model, None, opt_state, jr.key(1), jnp.zeros((), jnp.int32)
            )
            try:
                eqx_rng.TrainState(model, None, opt_state, jr.PRNGKey(1), ts.step)
            except TypeError as e:
                assert str(e).startswith("Convert the key with `eqx_rng.as_key(key)`")
            ```
        """
        if typecheck_enabled():  # off with `EQX_RNG_TYPECHECK=0`, as before
            _check_fields(model, state, opt_state, key, step)
        self.model = model
        self.state = state
        self.opt_state = opt_state
        self.key = key
        self.step = step

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
        of the `model` passed in here. Trained leaves that are weakly typed (the
        slope of `eqx.nn.PReLU`, a parameter made from a Python float) are made
        strongly typed, as the first update would make them: the step is then
        compiled once, not again for its second and third calls.

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
        model = _strong_trained(_copy_arrays(model), trainable)
        state = _copy_arrays(state)
        opt_state = init_opt_state(optimizer, model, trainable)
        return cls(
            model=model,
            state=state,
            opt_state=opt_state,
            key=key,
            step=jnp.zeros((), jnp.int32),
        )


_CREATE = (
    "`eqx_rng.TrainState.create(model, optimizer, key=...)` builds `opt_state`, the "
    "key (from an int seed too) and `step` for you"
)


def _check_fields(model: Any, state: Any, opt_state: Any, key: Any, step: Any) -> None:
    """Short `TypeError`s for the common mistakes in `TrainState(...)`. The key and
    step checks are those of the annotations `KeyGrid` and `Int[Array, "*chains"]`
    (a typed key array; a signed integer array), with a message naming the fix
    instead of the type checker's report."""
    call = "eqx_rng.TrainState(model, state, opt_state, key, step)"
    if is_legacy_key(key):
        raise TypeError(_legacy_key_message("eqx_rng.TrainState", tuple(key.shape)))
    if not is_typed_key(key) or not isinstance(key, jax.Array):
        raise TypeError(
            f"`{call}` takes `key` as a typed PRNG key (`jax.random.key(seed)`, or "
            f"one key per chain), got {describe(key)}. Convert a seed with "
            f"`eqx_rng.as_key(seed)`; {_CREATE}."
        )
    if not (
        isinstance(step, jax.Array) and jnp.issubdtype(step.dtype, jnp.signedinteger)
    ):
        raise TypeError(
            f"`{call}` takes `step` as a signed integer array "
            f"(`jnp.zeros((), jnp.int32)` for a new run, one entry per chain), got "
            f"{describe(step)}; {_CREATE}."
        )
    if isinstance(model, type):
        raise TypeError(
            f"`{call}` takes a model instance, got the class `{model.__name__}`; "
            f"build the model first, for example `{model.__name__}(..., key=key)`."
        )
    if isinstance(model, tuple) and any(isinstance(x, eqx.nn.State) for x in model):
        raise TypeError(
            f"`{call}` got a tuple holding an `eqx.nn.State` as `model` (what "
            f"`eqx.nn.make_with_state` returns); unpack it: `model, state = "
            f"eqx.nn.make_with_state(...)(...)`, then pass `model` and `state`."
        )
    for name, value in (("model", model), ("state", state), ("opt_state", opt_state)):
        if isinstance(value, optax.GradientTransformation):
            raise TypeError(
                f"`{call}` got an optax optimizer as `{name}`; `opt_state` is the "
                f"optimizer's state, `optimizer.init(eqx.filter(model, "
                f"eqx.is_inexact_array))`, and the optimizer itself goes to "
                f"`make_train_step`; {_CREATE}."
            )
        if name != "state" and isinstance(value, eqx.nn.State):
            raise TypeError(
                f"`{call}` got an `eqx.nn.State` as `{name}`; it belongs in `state` "
                f"(the fields are in the order model, state, opt_state, key, step)."
            )


def _strong_trained(model: Any, trainable: Any) -> Any:
    """`model` with its trained leaves strongly typed. A parameter that starts
    weakly typed (`eqx.nn.PReLU`'s slope, a parameter made from a Python float)
    comes out of the first update strongly typed, so the step would be traced
    again for its second and third calls; typing it now keeps one program from
    step 0 on (float32 values are the same either way)."""
    params, rest = split_trainable(model, trainable)
    params = jtu.tree_map(_strong, params)
    return eqx.combine(params, rest)


def _strong(x: Any) -> Any:
    if isinstance(x, jax.Array) and x.aval.weak_type:  # type: ignore[attr-defined]
        return jnp.asarray(x, dtype=x.dtype)
    return x


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
