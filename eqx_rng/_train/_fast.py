"""The repeated-call path of a train step, written as one function per variant.

A training loop calls `step(ts, batch)` with the `TrainState` the step returned last
time and a batch of the same structure. For that call `write_fast_step` writes one
straight-line function: recognise `ts` by identity, check the batch's structure and
array types, call the compiled variant on the leaves kept from the last call, and
build the new `TrainState` with the output's rebuild (`_rebuild.py`) written inline
(no call per node, no intermediate tuple). Anything unexpected returns `MISS` before
any work is done, and the caller takes the general path.
"""

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import jax.tree_util as jtu

from .._dispatch import Dispatcher, Entry, Outputs
from ._state import TrainState

MISS = object()

# The TrainState's fields, in the order Equinox (and `new_train_state`) store them.
_FIELDS = tuple(f.name for f in dataclasses.fields(TrainState))


def write_fast_step(
    owner: Any, d: Dispatcher, e: Entry, desc: Outputs
) -> Callable[[Any, Any], Any] | None:
    """The fast path of `owner` (a `_TrainStep`) for variant `e` and the output
    structure `desc`, or `None` where it does not apply (the parts output cannot be
    fed back as the next call's argument, the batch has static leaves, or the
    output cannot be rebuilt by written code).

    `owner._last_out` is `(weakref to the TrainState returned last, entry, its
    dynamic leaves)`; `owner._forget` is the weak reference's callback; `owner._finish
    (e, key, out, metrics, desc)` finishes a call whose outputs came back in another
    structure.
    """
    batch_split = e.splits[2]
    source = getattr(desc.splits[0].builder(), "source", None)
    if source is None or batch_split.get_dynamic is not None:
        return None
    if not desc.closed(0, e.splits[0]):
        return None
    names = dict(source.names)
    names.update(
        S_MISS=MISS,
        S_owner=owner,
        S_entry=e,
        S_desc=desc,
        S_efn=e.fn,
        S_on_error=d.on_error or _no_replacement,
        S_concrete=d.concrete,
        S_flatten=jtu.tree_flatten,
        S_batch_td=batch_split.treedef,
        S_getattr=object.__getattribute__,
        S_TrainState=TrainState,
        S_weakref=weakref.ref,
        S_forget=owner._forget,
        S_metrics=desc.splits[1].builder() if not desc.direct[1] else None,
    )
    unpack = "".join(f"a{i}, " for i in range(source.leaves))
    fields = ", ".join(f"{f!r}: S_{f}" for f in _FIELDS)
    metrics = "S_metrics(S_m)" if not desc.direct[1] else "S_m"
    body = [
        "S_last = S_owner._last_out",
        "if S_last is None or S_last[0]() is not ts: return S_MISS",
        "S_key = S_getattr(ts, '__dict__')['key']",
        "if type(S_key) not in S_concrete: return S_MISS",
        "S_leaves, S_td = S_flatten(batch)",
        "if S_td != S_batch_td: return S_MISS",
        "if not S_concrete.issuperset(map(type, S_leaves)): return S_MISS",
        "try:",
        "    (S_out, S_m), S_d = S_efn(S_last[2], [S_key], S_leaves)",
        "except Exception as err:",
        "    new = S_on_error(err)",
        "    if new is None: raise",
        "    raise new from None",
        "if S_d is not S_desc:",
        "    return S_owner._finish(S_entry, S_key, S_out, S_m, S_d)",
        f"({unpack}) = S_out",
        *source.lines,
        f"(S_model, S_state, S_opt_state, S_step) = {source.result}",
        "S_ts = _new(S_TrainState)",
        f"_set(S_ts, '__dict__', {{{fields}}})",
        "S_owner._last_out = (S_weakref(S_ts, S_forget), S_entry, S_out)",
        f"return S_ts, {metrics}",
    ]
    text = "def fast(ts, batch):\n" + "".join(f"    {b}\n" for b in body)
    exec(compile(text, "<eqx_rng train step>", "exec"), names)
    return names["fast"]


def _no_replacement(err: BaseException) -> None:
    return None
