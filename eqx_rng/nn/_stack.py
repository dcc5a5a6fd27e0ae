"""`LayerStack`: `num_layers` layers of one kind, built in one vectorised call and
applied with `lax.scan` (one trace and one compile of the layer, however deep)."""

from collections.abc import Callable
from typing import Any, overload

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array

from .._custom_types import Key
from .._ensemble import ensemble
from .._keys import derive
from .._typecheck import typecheck


def _is_index(x: Any) -> bool:
    return isinstance(x, eqx.nn.StateIndex)


class LayerStack(eqx.nn.StatefulLayer):
    """`num_layers` layers built by `make_layer`, stored with a leading layer axis
    on every array and applied in order with `lax.scan`.

    Layer `l` is `make_layer(key=derive(key, l))`, built in one vectorised call (as
    `eqx_rng.ensemble` builds chains), so the stack's first layers do not depend on
    `num_layers`. A call gives layer `l` the key `derive(key, l)`, so the stack
    equals the unrolled loop `for l: x = layer_l(x, key=derive(key, l))`. The layer
    is traced once whatever the depth (Haiku's `layer_stack`, Flax's `nn.scan`).

    Layers that hold state (`eqx_rng.nn.BatchNorm`, any `eqx.nn.StateIndex`) make
    the stack stateful: build it with `eqx.nn.make_with_state(LayerStack)(...)` and
    call it as `y, state = stack(x, state, key=key)`; each layer reads and writes
    its own slice of the stacked state. `eqx.nn.Sequential` threads the state
    through a stateful stack.

    Every layer must map its input to an output of the same shape and dtype (the
    scan carry).

    !!! Example

        ```python
        def block(*, key):
            linear = eqx.nn.Linear(8, 8, key=key)
            drop = eqx_rng.nn.Dropout(0.1)
            return eqx.nn.Sequential([linear, eqx.nn.Lambda(jnp.tanh), drop])

        stack = eqx_rng.nn.LayerStack(block, 4, key=jr.key(0))
        y = stack(jnp.ones(8), key=jr.key(1))

        # the unrolled loop of the same layers with the same keys
        x = jnp.ones(8)
        for l in range(4):
            x = stack[l](x, key=eqx_rng.derive(jr.key(1), l))
        assert jnp.allclose(x, y, atol=1e-6)
        ```
    """

    layers: Any
    num_layers: int = eqx.field(static=True)
    stateful: bool = eqx.field(static=True)

    def __init__(
        self,
        make_layer: Callable[..., Any],
        num_layers: int | np.integer,
        *,
        key: Key,
    ):
        """**Arguments:**

        - `make_layer`: A callable taking a keyword `key` and returning one layer
            (a Module class or a function). Traced once.
        - `num_layers`: The number of layers, `>= 1`.
        - `key`: PRNG key; layer `l` is built with `derive(key, l)`. (Keyword only
            argument.)

        **Raises:**

        `ValueError` if `num_layers < 1`; `TypeError` if it is not an int.

        !!! Example

            ```python
            stack = eqx_rng.nn.LayerStack(
                lambda *, key: eqx.nn.Linear(4, 4, key=key), 3, key=jr.key(0)
            )
            assert stack.layers.weight.shape == (3, 4, 4)
            ```
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, int | np.integer):
            raise TypeError(
                f"`LayerStack(num_layers=...)` must be an int, got "
                f"{type(num_layers).__name__} {num_layers!r}."
            )
        if num_layers < 1:
            raise ValueError(
                f"`LayerStack(num_layers=...)` must be >= 1, got "
                f"num_layers={num_layers}."
            )
        self.num_layers = int(num_layers)
        self.layers = ensemble(make_layer, key, self.num_layers)
        leaves = jtu.tree_leaves(self.layers, is_leaf=_is_index)
        self.stateful = any(_is_index(x) for x in leaves)

    def is_stateful(self) -> bool:
        """Whether the layers hold state (then the stack is called with a `State`).

        !!! Example

            ```python
            make = lambda *, key: eqx.nn.Linear(2, 2, key=key)
            assert not eqx_rng.nn.LayerStack(make, 2, key=jr.key(0)).is_stateful()
            ```
        """
        return self.stateful

    def __getitem__(self, l: int) -> Any:
        """Layer `l` on its own (its arrays without the layer axis).

        !!! Example

            ```python
            stack = eqx_rng.nn.LayerStack(
                lambda *, key: eqx.nn.Linear(4, 4, key=key), 3, key=jr.key(0)
            )
            assert stack[1].weight.shape == (4, 4)
            ```
        """
        if not -self.num_layers <= l < self.num_layers:
            raise IndexError(
                f"`LayerStack` has {self.num_layers} layers, got index {l}."
            )
        return jtu.tree_map(lambda a: a[l] if eqx.is_array(a) else a, self.layers)

    def _check_carry(self, x: Array, y: Any) -> None:
        if not (
            isinstance(y, jax.Array | np.ndarray)
            and y.shape == x.shape
            and y.dtype == x.dtype
        ):
            got = (
                f"shape {y.shape} and dtype {y.dtype}"
                if isinstance(y, jax.Array | np.ndarray)
                else type(y).__name__
            )
            raise ValueError(
                f"`LayerStack` applies its layers in a `lax.scan`, so each layer must "
                f"return an array of its input's shape {x.shape} and dtype {x.dtype}; "
                f"a layer returned {got}. Keep shape-changing layers outside the "
                f"stack (for example in an `eqx.nn.Sequential` around it)."
            )

    @overload
    def __call__(
        self, x: Array, state: None = None, *, key: Key | None = None
    ) -> Array: ...

    @overload
    def __call__(
        self, x: Array, state: eqx.nn.State, *, key: Key | None = None
    ) -> tuple[Array, eqx.nn.State]: ...

    @typecheck
    def __call__(
        self,
        x: Array,
        state: eqx.nn.State | None = None,
        *,
        key: Key | None = None,
    ) -> Array | tuple[Array, eqx.nn.State]:
        """Apply the layers in order; layer `l` gets `key=derive(key, l)` (or
        `key=None` when `key` is `None`).

        **Arguments:**

        - `x`: The input of the first layer (one example, when the layers act on
            one example).
        - `state`: The `eqx.nn.State` of a stateful stack (from
            `eqx.nn.make_with_state(LayerStack)`); `None` for a stateless one.
        - `key`: PRNG key, or `None` when no layer draws (for example in inference
            mode). (Keyword only argument.)

        **Returns:**

        The last layer's output; with `state`, the pair `(y, state)` with every
        layer's slice of the state updated.

        **Raises:**

        `ValueError` if a stateful stack is called without `state`, or a layer
        changes the shape or dtype of its input.
        """
        arrays, static = eqx.partition(self.layers, eqx.is_array)
        index = jnp.arange(self.num_layers)

        def layer_key(l: Array) -> Key | None:
            return None if key is None else derive(key, l)

        if not self.stateful:

            def body(h: Array, inputs: Any) -> tuple[Array, None]:
                layer_arrays, l = inputs
                layer = eqx.combine(layer_arrays, static)
                out = layer(h, key=layer_key(l))
                self._check_carry(h, out)
                return out, None

            y, _ = lax.scan(body, x, (arrays, index))
            return y if state is None else (y, state)
        if state is None:
            raise ValueError(
                "`LayerStack` holds stateful layers, so it is called as "
                "`y, state = stack(x, state, key=key)`, with the state from "
                "`eqx.nn.make_with_state(eqx_rng.nn.LayerStack)(...)`; got no state."
            )
        sub = state.substate(self.layers)
        leaves, treedef = jtu.tree_flatten(sub)

        def stateful_body(h: Array, inputs: Any) -> tuple[Array, list]:
            layer_arrays, layer_leaves, l = inputs
            layer = eqx.combine(layer_arrays, static)
            layer_state = jtu.tree_unflatten(treedef, layer_leaves)
            out, layer_state = layer(h, layer_state, key=layer_key(l))
            self._check_carry(h, out)
            return out, jtu.tree_leaves(layer_state)

        y, new_leaves = lax.scan(stateful_body, x, (arrays, leaves, index))
        return y, state.update(jtu.tree_unflatten(treedef, new_leaves))


__all__ = ["LayerStack"]
