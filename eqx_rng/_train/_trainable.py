"""Which leaves of a model are trained: `trainable=` specs and the default.

The default trains every inexact array except the fields that a layer declares as
non-trainable: the rates of `eqx_rng.nn` layers stored as arrays (`p` of `Dropout`,
`GaussianDropout` and `DropPath`, `std` of `GaussianNoise`). A layer class declares
them with a class attribute `non_trainable_fields: ClassVar[tuple[str, ...]]` (field
names), so new layers (ours or a user's) opt in without a change here.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from ..nn import Dropout, DropPath, GaussianDropout, GaussianNoise

# Layers of `eqx_rng.nn` whose class does not (yet) declare `non_trainable_fields`.
_BUILTIN_NON_TRAINABLE: dict[type, tuple[str, ...]] = {
    Dropout: ("p",),
    GaussianDropout: ("p",),
    DropPath: ("p",),
    GaussianNoise: ("std",),
}


def non_trainable_fields(node: Any) -> tuple[str, ...]:
    """The field names that `node`'s class declares as never trained."""
    declared = getattr(type(node), "non_trainable_fields", None)
    if declared is not None:
        return tuple(declared)
    return _BUILTIN_NON_TRAINABLE.get(type(node), ())


def _has_frozen_fields(node: Any) -> bool:
    return isinstance(node, eqx.Module) and bool(non_trainable_fields(node))


def default_trainable(model: Any) -> Any:
    """The default spec: a pytree of bools shaped like `model`, `True` at every
    inexact array except the declared non-trainable fields of its layers."""

    def spec(node: Any) -> Any:
        if not _has_frozen_fields(node):
            return eqx.is_inexact_array(node)
        sub = jtu.tree_map(eqx.is_inexact_array, node)
        names = [
            n for n in non_trainable_fields(node) if eqx.is_array(getattr(node, n))
        ]
        if not names:
            return sub
        # Only layers whose fields are plain leaves (a rate array) are declared, so
        # each name selects one leaf of the bool tree.
        return eqx.tree_at(
            lambda s: [getattr(s, n) for n in names], sub, [False] * len(names)
        )

    return jtu.tree_map(spec, model, is_leaf=_has_frozen_fields)


def _mask(model: Any, trainable: Any) -> Any:
    """`True` at the trained leaves: selected by the spec and inexact arrays."""
    spec = default_trainable(model) if trainable is None else trainable
    try:
        chosen = eqx.filter(model, spec)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "`trainable=` (of `TrainState.create` / `make_train_step`) is a filter "
            "spec as in `eqx.filter`: a callable `leaf -> bool` or a pytree of bools "
            "(or callables) whose structure is a prefix of the model's; got "
            f"{type(trainable).__name__} that does not fit the model "
            f"({type(err).__name__}: {err}). Build one with "
            "`jax.tree.map(lambda _: False, model)` and `eqx.tree_at`."
        ) from None
    return jtu.tree_map(
        lambda c: c is not None and eqx.is_inexact_array(c),
        chosen,
        is_leaf=lambda x: x is None,
    )


def split_trainable(model: Any, trainable: Any) -> tuple[Any, Any]:
    """`(params, rest)`: the trained leaves (`None` elsewhere) and everything else
    (`None` at the trained leaves); `eqx.combine(params, rest)` is `model`."""
    return eqx.partition(model, _mask(model, trainable))


def init_opt_state(optimizer: Any, model: Any, trainable: Any) -> Any:
    params, _ = split_trainable(model, trainable)
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict-clean
        return optimizer.init(params)


def _layout(tree: Any) -> tuple[Any, list[tuple[tuple[int, ...], str] | None]]:
    leaves, treedef = jtu.tree_flatten(tree)
    shapes = [
        (tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else None for x in leaves
    ]
    return treedef, shapes


def opt_state_matches(optimizer: Any, params: Any, opt_state: Any) -> bool:
    """Whether `opt_state` has the layout of `optimizer.init(params)` (structure,
    shapes and dtypes; computed abstractly, at trace time)."""
    with jax.numpy_dtype_promotion("standard"):
        expected = eqx.filter_eval_shape(optimizer.init, params)
    return _layout(expected) == _layout(opt_state)


def check_opt_state(
    optimizer: Any, params: Any, opt_state: Any, trainable: Any, name: str
) -> None:
    """Raise the mismatch `ValueError` of `make_train_step` if `opt_state` was not
    built by `optimizer.init` on these trainable leaves."""
    if opt_state_matches(optimizer, params, opt_state):
        return
    spec = "the default" if trainable is None else f"{_describe_spec(trainable)}"
    raise ValueError(
        f"`make_train_step` ({name}): `ts.opt_state` does not match "
        "`optimizer.init` on the trainable leaves of `ts.model`. Either the "
        "TrainState was created with another optimizer than the one given to "
        "`make_train_step`, or with another `trainable=` spec (the step uses "
        f"{spec}). Pass the same optimizer and the same `trainable=` to "
        "`TrainState.create` and `make_train_step`."
    )


def _describe_spec(trainable: Any) -> str:
    if isinstance(trainable, Callable):
        name = getattr(trainable, "__qualname__", None) or type(trainable).__name__
        return f"the callable {name}"
    return f"a {type(trainable).__name__} of bools"
