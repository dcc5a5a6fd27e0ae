"""The randomness bugs of JAX tutorials, each run, shown and caught.

For every pitfall this script runs the buggy code and shows the symptom, then shows
what eqx_rng does about it (the error it raises, or the invariant it guarantees,
checked here), then runs the fixed code. It prints the code of each, a summary
table, and exits non-zero if any pitfall goes uncaught.

    python experiments/pitfalls.py [--seed S] [--out DIR] [--tiny]

`--tiny` is accepted for uniformity with the other experiments (everything here
already runs in seconds).
"""

import dataclasses
import inspect
import sys
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import eqx_rng

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


@dataclasses.dataclass
class Outcome:
    """What happened to one pitfall."""

    name: str
    symptom: str  # what the buggy code did
    guard: str  # what eqx_rng did: the error caught or the invariant checked
    fixed: str  # what the fixed code did
    caught: bool  # the bug is shown, eqx_rng caught it and the fix works
    code: dict[str, str] = dataclasses.field(default_factory=dict)
    how: str = ""  # one phrase for the summary table


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _source(*fns: Callable) -> str:
    return "\n".join(textwrap.dedent(inspect.getsource(f)).rstrip() for f in fns)


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of two arrays (typed keys compared by their bits)."""
    a, b = (
        jr.key_data(x)
        if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key)
        else x
        for x in (a, b)
    )
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


# ---------------------------------------------------------------------------------------
# 1. The same noise on every vmapped row


def add_noise(x, key):
    return x + jr.normal(key, x.shape)


def buggy_same_noise(xs, key):
    # `in_axes=None` for the key: every row gets the same key, so the same noise.
    return jax.vmap(add_noise, in_axes=(0, None))(xs, key)


def guarded_same_noise(xs, key):
    return eqx_rng.vmap(add_noise, in_axes=(0, None))(xs, key)


def fixed_same_noise(xs, key):
    # One key in; mapped call i gets derive(key, i).
    return eqx_rng.vmap(lambda x, *, key: add_noise(x, key))(xs, key=key)


def pitfall_same_noise(key) -> Outcome:
    xs = jnp.zeros((4, 3))
    bad = buggy_same_noise(xs, key)
    rows_equal = all(_same(bad[0], bad[i]) for i in range(1, 4))
    symptom = (
        f"all {len(bad)} rows got identical noise"
        if rows_equal
        else "rows differ (bug not reproduced)"
    )
    try:
        guarded_same_noise(xs, key)
        guard, raised = "no error raised", False
    except eqx_rng.BroadcastKeyError as e:
        guard, raised = _first_line(e), True
    good = fixed_same_noise(xs, key)
    distinct = len({np.asarray(r).tobytes() for r in good}) == len(good)
    addressable = _same(good[2], add_noise(xs[2], eqx_rng.derive(key, 2)))
    fixed = f"rows distinct: {distinct}; row 2 == add_noise(x[2], derive(key, 2)): {addressable}"
    return Outcome(
        "same noise on every vmapped row",
        symptom,
        guard,
        fixed,
        rows_equal and raised and distinct and addressable,
        {
            "buggy": _source(add_noise, buggy_same_noise),
            "eqx_rng": _source(guarded_same_noise),
            "fixed": _source(fixed_same_noise),
        },
        how="BroadcastKeyError from eqx_rng.vmap",
    )


# ---------------------------------------------------------------------------------------
# 2. A reused key


def buggy_reuse(key):
    w1 = jr.normal(key, (4, 4))
    w2 = jr.normal(key, (4, 4))  # the same key again: w2 == w1
    return w1, w2


def fixed_reuse(key):
    # Role-named keys, each used once; `derive` (fold_in) does not consume `key`.
    w1 = jr.normal(eqx_rng.derive(key, "w1"), (4, 4))
    w2 = jr.normal(eqx_rng.derive(key, "w2"), (4, 4))
    return w1, w2


def pitfall_reuse(key) -> Outcome:
    w1, w2 = buggy_reuse(key)
    symptom = (
        "the two 'independent' weight matrices are identical"
        if _same(w1, w2)
        else "differ (bug not reproduced)"
    )
    raised = False
    guard = "no error raised"
    try:
        with eqx_rng.debug.key_reuse():
            buggy_reuse(key)
    except jax.errors.KeyReuseError as e:
        guard, raised = f"with eqx_rng.debug.key_reuse(): {_first_line(e)}", True
    try:
        with eqx_rng.debug.key_reuse():
            g1, g2 = fixed_reuse(key)
        fixed_ok = not _same(g1, g2)
        fixed = f"passes the key-reuse checker; w1 != w2: {fixed_ok}"
    except Exception as e:  # noqa: BLE001 - report anything the checker says
        fixed_ok, fixed = False, f"fixed code failed: {_first_line(e)}"
    return Outcome(
        "a reused key",
        symptom,
        guard,
        fixed,
        _same(w1, w2) and raised and fixed_ok,
        {
            "buggy": _source(buggy_reuse),
            "eqx_rng": "with eqx_rng.debug.key_reuse():\n    buggy_reuse(key)",
            "fixed": _source(fixed_reuse),
        },
        how="KeyReuseError under eqx_rng.debug.key_reuse()",
    )


# ---------------------------------------------------------------------------------------
# 3. Keys that shift when the batch size changes


def buggy_batch_keys(key, xs, batch_size):
    # The usual loop: one key per batch, split by position within the batch.
    out = []
    for start in range(0, xs.shape[0], batch_size):
        keys = jr.split(jr.fold_in(key, start // batch_size), batch_size)
        out.append(jax.vmap(add_noise)(xs[start : start + batch_size], keys))
    return jnp.concatenate(out)


def fixed_batch_keys(key, xs, batch_size):
    # Key each example by its global id: derive(key, id), whatever the batching.
    ids = jnp.arange(xs.shape[0])
    out = []
    for start in range(0, xs.shape[0], batch_size):
        keys = eqx_rng.example_keys(key, ids[start : start + batch_size])
        out.append(jax.vmap(add_noise)(xs[start : start + batch_size], keys))
    return jnp.concatenate(out)


def pitfall_batch_size(key) -> Outcome:
    xs = jnp.zeros((64, 3))
    # (jit only to run faster; batch_size is static)
    buggy = jax.jit(buggy_batch_keys, static_argnums=2)
    b16, b32 = buggy(key, xs, 16), buggy(key, xs, 32)
    changed = int(np.sum(np.any(np.asarray(b16) != np.asarray(b32), axis=1)))
    symptom = f"{changed} of 64 examples got different noise at batch size 16 vs 32"
    fixed = jax.jit(fixed_batch_keys, static_argnums=2)
    f16, f32, f64 = (fixed(key, xs, b) for b in (16, 32, 64))
    invariant = _same(f16, f32) and _same(f16, f64)
    guard = f"invariant checked: example_keys(key, ids) gives bitwise the same noise at batch sizes 16, 32, 64: {invariant}"
    return Outcome(
        "keys that shift when the batch size changes",
        symptom,
        guard,
        "noise depends on (key, example id) only",
        changed > 0 and invariant,
        {
            "buggy": _source(buggy_batch_keys),
            "eqx_rng": "eqx_rng.example_keys(key, ids)  # == derive(key, id) per id",
            "fixed": _source(fixed_batch_keys),
        },
        how="invariant: example_keys by global id",
    )


# ---------------------------------------------------------------------------------------
# 4. BatchNorm statistics pooled across chains

CHAINS, BATCH, FEATURES = 3, 8, 4


class LinearBN(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx_rng.nn.BatchNorm

    def __init__(self, features, *, key):
        self.linear = eqx.nn.Linear(features, features, key=key)
        self.norm = eqx_rng.nn.BatchNorm(features, axis_name="batch")

    def __call__(self, x, state):
        return self.norm(self.linear(x), state)


def make_bn_chains(key):
    # One model (and State) per chain, built as one vectorised program.
    return eqx_rng.ensemble(eqx.nn.make_with_state(LinearBN), key, CHAINS, FEATURES)


def buggy_pooled_bn(bn, state, xs):
    # Merge chains x batch into one axis "to make it one big batch": BatchNorm then
    # averages over every chain's examples, and all chains share one State.
    flat = xs.reshape(CHAINS * BATCH, FEATURES)
    ys, state = jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(
        flat, state
    )
    return ys.reshape(CHAINS, BATCH, FEATURES), state


def guarded_shared_state(bn, state, xs):
    # One State for all chains: each chain would write its own statistics into it.
    per_chain = lambda x, state: eqx_rng.vmap(bn, axis_name="batch")(x, state)
    return eqx_rng.vmap(per_chain, in_axes=(0, None))(xs, state)


def fixed_per_chain_bn(bns, states, xs):
    # Chains outside, "batch" inside: statistics and State per chain.
    per_chain = lambda bn, state, x: eqx_rng.vmap(bn, axis_name="batch")(x, state)
    return eqx_rng.vmap(per_chain)(bns, states, xs)


def pitfall_pooled_bn(key) -> Outcome:
    bns, states = eqx.filter_jit(make_bn_chains)(eqx_rng.derive(key, "init"))
    xs = jr.normal(eqx_rng.derive(key, "x"), (CHAINS, BATCH, FEATURES))
    # Perturb chain 2's inputs only: chain 0's outputs must not move.
    xs2 = xs.at[2].add(10.0)
    bn0, state0 = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, (bns, states))
    buggy, fixed = eqx.filter_jit(buggy_pooled_bn), eqx.filter_jit(fixed_per_chain_bn)
    bad_a, _ = buggy(bn0, state0, xs)
    bad_b, _ = buggy(bn0, state0, xs2)
    leaked = not _same(bad_a[0], bad_b[0])
    symptom = (
        "changing chain 2's data changed chain 0's outputs"
        if leaked
        else "chain 0 unaffected (bug not reproduced)"
    )
    good_a, new_states = fixed(bns, states, xs)
    good_b, _ = fixed(bns, states, xs2)
    independent = _same(good_a[0], good_b[0]) and _same(good_a[1], good_b[1])
    shapes_ok = all(
        a.shape == b.shape
        for a, b in zip(
            jax.tree.leaves(states), jax.tree.leaves(new_states), strict=True
        )
    )
    # And the guard: sharing one State across chains under eqx_rng.vmap is refused,
    # because each chain would write different statistics into it.
    try:
        guarded_shared_state(bn0, state0, xs)
        guard, raised = "no error for one State shared by all chains", False
    except ValueError as e:
        guard, raised = f"one State shared by all chains: {_first_line(e)}", True
    guard += f"; invariant checked: per-chain statistics, chain 0 unaffected by chain 2: {independent}"
    fixed = f"per-chain State keeps its shape {jax.tree.leaves(new_states)[0].shape}: {shapes_ok}"
    return Outcome(
        "BatchNorm statistics pooled across chains",
        symptom,
        guard,
        fixed,
        leaked and independent and shapes_ok and raised,
        {
            "buggy": _source(buggy_pooled_bn),
            "eqx_rng": _source(guarded_shared_state),
            "fixed": _source(make_bn_chains, fixed_per_chain_bn),
        },
        how="ValueError (shared State) + per-chain invariant",
    )


# ---------------------------------------------------------------------------------------
# 5. A State that silently grows a batch axis


class RunningMean(eqx.Module):
    """A stateful layer that keeps a running mean of its inputs."""

    index: eqx.nn.StateIndex
    reduce: bool = eqx.field(static=True)

    def __init__(self, features, *, reduce):
        self.index = eqx.nn.StateIndex(jnp.zeros(features))
        self.reduce = reduce

    def __call__(self, x, state):
        # The bug when reduce=False: a per-example value is written into the State.
        value = jax.lax.pmean(x, "batch") if self.reduce else x
        return x, state.set(self.index, 0.9 * state.get(self.index) + 0.1 * value)


def buggy_state_axis(layer, state, xs):
    # eqx.filter_vmap's default out_axes map every output: the State comes back
    # with a leading batch axis, silently.
    return eqx.filter_vmap(layer, in_axes=(0, None), axis_name="batch")(xs, state)


def guarded_state_axis(layer, state, xs):
    # State in and out unmapped by default; a State that differs per example raises.
    return eqx_rng.vmap(layer, axis_name="batch")(xs, state)


def fixed_state_axis(xs):
    # Reduce over "batch" (pmean) before storing; eqx_rng.vmap threads the State.
    layer, state = eqx.nn.make_with_state(RunningMean)(FEATURES, reduce=True)
    return eqx_rng.vmap(layer, axis_name="batch")(xs, state)


def pitfall_state_axis(key) -> Outcome:
    layer, state = eqx.nn.make_with_state(RunningMean)(FEATURES, reduce=False)
    xs = jr.normal(key, (BATCH, FEATURES))
    before = [a.shape for a in jax.tree.leaves(state)]
    _, bad_state = buggy_state_axis(layer, state, xs)
    after = [a.shape for a in jax.tree.leaves(bad_state)]
    grew = before != after
    symptom = (
        f"State leaf shape {before[0]} -> {after[0]}, no error"
        if grew
        else "State kept its shape (bug not reproduced)"
    )
    try:
        guarded_state_axis(layer, state, xs)
        guard, raised = "no error raised", False
    except ValueError as e:
        guard, raised = _first_line(e), True
    _, good_state = fixed_state_axis(xs)
    kept = [a.shape for a in jax.tree.leaves(good_state)] == before
    bn, bn_state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(FEATURES)
    _, bn_state2 = eqx_rng.vmap(bn, axis_name="batch")(xs, bn_state)
    bn_kept = [a.shape for a in jax.tree.leaves(bn_state)] == [
        a.shape for a in jax.tree.leaves(bn_state2)
    ]
    fixed = (
        f"State keeps its shape {before[0]}: {kept}; BatchNorm's State too: {bn_kept}"
    )
    return Outcome(
        "a State that grows a batch axis",
        symptom,
        guard,
        fixed,
        grew and raised and kept and bn_kept,
        {
            "buggy": _source(RunningMean.__call__, buggy_state_axis),
            "eqx_rng": _source(guarded_state_axis),
            "fixed": _source(fixed_state_axis),
        },
        how="ValueError: State came back batched",
    )


# ---------------------------------------------------------------------------------------
# 6. Flax-style named streams: rngs={"dropout": key} -> derive(key, "dropout")


class TwoDropouts(eqx.Module):
    """Two dropout layers, optionally after a noise layer added later in a project."""

    with_noise: bool = eqx.field(static=True)

    def masks_by_call_order(self, x, key):
        # Like a counter-based stream: each stochastic layer takes "the next key".
        n = 3 if self.with_noise else 2
        keys = iter(jr.split(key, n))
        if self.with_noise:
            x = x + jr.normal(next(keys), x.shape)
        return [jr.bernoulli(next(keys), 0.5, x.shape) for _ in range(2)]

    def masks_by_name(self, x, key):
        # rngs={"dropout": key} becomes derive(key, "dropout"), one index per layer.
        if self.with_noise:
            x = x + jr.normal(eqx_rng.derive(key, "noise", 0), x.shape)
        return [
            jr.bernoulli(eqx_rng.derive(key, "dropout", i), 0.5, x.shape)
            for i in range(2)
        ]


def pitfall_named_streams(key) -> Outcome:
    x = jnp.ones(16)
    old, new = TwoDropouts(with_noise=False), TwoDropouts(with_noise=True)
    shifted = not all(
        _same(a, b)
        for a, b in zip(
            old.masks_by_call_order(x, key),
            new.masks_by_call_order(x, key),
            strict=True,
        )
    )
    symptom = (
        "adding a noise layer changed both dropout masks"
        if shifted
        else "masks unchanged (bug not reproduced)"
    )
    stable = all(
        _same(a, b)
        for a, b in zip(
            old.masks_by_name(x, key), new.masks_by_name(x, key), strict=True
        )
    )
    streams_differ = not _same(
        eqx_rng.derive(key, "dropout"), eqx_rng.derive(key, "noise")
    )
    layer = eqx_rng.nn.Dropout(0.5)
    same_as_layer = _same(
        layer(x, key=eqx_rng.derive(key, "dropout")),
        layer(x, key=eqx_rng.derive(key, "dropout")),
    )
    guard = f"invariant checked: with derive(key, 'dropout', i) the dropout masks are bitwise unchanged after adding a layer: {stable}"
    fixed = f"streams 'dropout' and 'noise' are distinct keys: {streams_differ}; the same name gives the same draw: {same_as_layer}"
    mapping = textwrap.dedent(
        """\
        # Flax linen:  model.apply(variables, x, rngs={"dropout": key})
        #              inside a layer: self.make_rng("dropout")   (a per-call counter)
        # Flax NNX:    nnx.Rngs(dropout=key); rngs.dropout()      (fold_in(key, count); count += 1)
        # eqx_rng:     model(x, state, key=key)
        #              inside a layer: eqx_rng.derive(key, "dropout", layer_index)   (no counter)
        """
    )
    return Outcome(
        "Flax-style named streams by call order",
        symptom,
        guard,
        fixed,
        shifted and stable and streams_differ and same_as_layer,
        {
            "buggy": _source(TwoDropouts.masks_by_call_order),
            "eqx_rng": mapping.rstrip(),
            "fixed": _source(TwoDropouts.masks_by_name),
        },
        how="invariant: derive(key, name, index)",
    )


# ---------------------------------------------------------------------------------------
# 7. Legacy uint32 keys


def buggy_legacy(seed):
    key = jr.PRNGKey(
        seed
    )  # a raw uint32[2] array: no key type, invisible to the checker
    return eqx_rng.derive(key, "dropout")


def fixed_legacy(seed):
    return eqx_rng.derive(eqx_rng.as_key(seed), "dropout")  # or jr.key(seed)


def pitfall_legacy(key) -> Outcome:
    del key
    try:
        buggy_legacy(0)
        guard, raised = "no error raised", False
    except TypeError as e:
        text = str(e)
        raised = "as_key" in text
        guard = f"{type(e).__name__} pointing to as_key: {raised}"
    fixed_key = fixed_legacy(0)
    ok = jnp.issubdtype(fixed_key.dtype, jax.dtypes.prng_key)
    return Outcome(
        "legacy uint32 keys",
        "a uint32[2] array, not a key: invisible to the key-reuse checker",
        guard,
        f"typed key: {ok}",
        raised and bool(ok),
        {
            "buggy": _source(buggy_legacy),
            "eqx_rng": "eqx_rng.derive(jr.PRNGKey(0), ...)  # TypeError -> as_key",
            "fixed": _source(fixed_legacy),
        },
        how="TypeError pointing to as_key",
    )


PITFALLS: tuple[Callable[[Any], Outcome], ...] = (
    pitfall_same_noise,
    pitfall_reuse,
    pitfall_batch_size,
    pitfall_pooled_bn,
    pitfall_state_axis,
    pitfall_named_streams,
    pitfall_legacy,
)


def run_all(key: Any) -> list[Outcome]:
    outcomes = []
    for i, fn in enumerate(PITFALLS):
        try:
            outcomes.append(fn(eqx_rng.derive(key, i)))
        except Exception as e:  # noqa: BLE001 - an unexpected failure is an uncaught pitfall
            outcomes.append(
                Outcome(
                    fn.__name__,
                    "crashed",
                    _first_line(e),
                    traceback.format_exc(limit=3),
                    False,
                )
            )
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = _common.experiment_parser(
        None,
        "Run the classic JAX randomness bugs and show eqx_rng catching each.",
        out="runs/pitfalls",
        out_help="output directory for pitfalls.json (default: %(default)s)",
        seed_help="seed of the demonstration data (default: %(default)s)",
        tiny_help="accepted for uniformity; everything here is tiny",
    )
    args = parser.parse_args(argv)
    out = _common.out_dir_or_exit(parser, args.out)

    outcomes = run_all(eqx_rng.as_key(args.seed))
    for i, o in enumerate(outcomes, 1):
        print(
            f"\n{'=' * 88}\n{i}. {o.name}  [{'CAUGHT' if o.caught else 'NOT CAUGHT'}]\n{'=' * 88}"
        )
        for part in ("buggy", "eqx_rng", "fixed"):
            if part in o.code:
                print(f"--- {part} ---\n{o.code[part]}")
        print(f"--- symptom of the bug: {o.symptom}")
        print(f"--- eqx_rng:            {o.guard}")
        print(f"--- the fix:            {o.fixed}")
    print()
    print(
        _common.format_table(
            ["pitfall", "what the bug does", "what catches it", "caught"],
            [
                [
                    o.name,
                    textwrap.shorten(o.symptom, 70),
                    o.how or textwrap.shorten(o.guard, 50),
                    "yes" if o.caught else "NO",
                ]
                for o in outcomes
            ],
        )
    )
    _common.write_summary(
        out / "pitfalls.json",
        {"seed": args.seed, "outcomes": [dataclasses.asdict(o) for o in outcomes]},
    )
    uncaught = [o.name for o in outcomes if not o.caught]
    print(
        f"\n{len(outcomes) - len(uncaught)} of {len(outcomes)} pitfalls caught"
        + (f"; NOT caught: {', '.join(uncaught)}" if uncaught else "")
    )
    return 1 if uncaught else 0


if __name__ == "__main__":
    sys.exit(main())
