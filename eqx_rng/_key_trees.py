"""Keys and noise for the leaves of a pytree, derived from each leaf's key path:
`split_like` and `tree_normal`."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._custom_types import Key
from ._keys import derive
from ._typecheck import typecheck


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


@typecheck
def split_like(
    key: Key,
    tree: PyTree,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
) -> PyTree:
    """One key per array leaf of `tree`, derived from the leaf's key path.

    The key of a leaf at path `p` is `derive(key, jax.tree_util.keystr(p))`, so it
    does not change when other leaves are added, removed or reordered. Array leaves
    are JAX and NumPy arrays; every other leaf (Python scalars, functions, `None`
    subtrees) gets `None`.

    **Arguments:**

    - `key`: A typed scalar key.
    - `tree`: Any pytree, for example an `eqx.Module`.
    - `is_leaf`: Optional, as in `jax.tree_util.tree_flatten`. (Keyword only
        argument.)

    **Returns:**

    A pytree of the same structure with a key or `None` at each leaf.

    !!! Example

        ```python
        keys = eqx_rng.split_like(jr.key(0), {"w": jnp.ones(3), "n": 2})
        assert keys["n"] is None
        ```
    """
    leaves_with_path, treedef = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
    keys = [
        derive(key, jtu.keystr(path)) if _is_array(leaf) else None
        for path, leaf in leaves_with_path
    ]
    return jtu.tree_unflatten(treedef, keys)


@typecheck
def tree_normal(key: Key, tree: PyTree) -> PyTree:
    """Standard normal noise shaped and typed like each floating-point leaf.

    Leaf `x` with `split_like` key `k` gets `jax.random.normal(k, x.shape, x.dtype)`
    (complex leaves get complex normal noise; a NumPy float64 leaf gets float32
    noise unless x64 is on, as JAX would make of it); other leaves get `None`. Draws for
    different leaves are independent, and a leaf's draw does not change when other
    leaves are added.

    **Arguments:**

    - `key`: A typed scalar key.
    - `tree`: Any pytree.

    **Returns:**

    A pytree of the same structure: noise for inexact array leaves, else `None`.

    !!! Example

        ```python
        params = {"w": jnp.ones((2, 3)), "step": jnp.array(0)}
        noise = eqx_rng.tree_normal(jr.key(0), params)
        assert noise["w"].shape == (2, 3) and noise["step"] is None
        ```
    """
    keys = split_like(key, tree)

    def draw(leaf: Any, k: Any) -> Any:
        if k is None or not jnp.issubdtype(leaf.dtype, jnp.inexact):
            return None
        # A NumPy float64 leaf without x64 gets float32 noise, as `jnp.asarray(leaf)`
        # would, without JAX's truncation warning.
        return jr.normal(k, leaf.shape, jax.dtypes.canonicalize_dtype(leaf.dtype))

    leaves, treedef = jtu.tree_flatten(tree)
    key_leaves = treedef.flatten_up_to(keys)
    return jtu.tree_unflatten(
        treedef, [draw(leaf, k) for leaf, k in zip(leaves, key_leaves, strict=True)]
    )


__all__ = ["split_like", "tree_normal"]
