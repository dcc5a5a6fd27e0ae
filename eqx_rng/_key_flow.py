"""Static key-flow analysis behind `BroadcastKeyError`.

`eqx_rng.vmap` traces the per-call function to a jaxpr (once, at trace time) and runs
a forward dataflow analysis over it. Every variable carries two facts:

- `origins`: which unmapped keys it may be derived from (key arguments, keys of `fn`
  itself, keys closed over by `fn`, keys made inside `fn` from a fixed seed);
- `varying`: whether it may depend on per-call data (a mapped input, the per-call key
  `derive(key, i)`, or `lax.axis_index` of the mapped axis).

A primitive that *draws* bits (`random_bits`, `random_gamma`, the raw `threefry2x32`
hash) from a key operand that derives from an unmapped key while that operand varies
in no way per call draws the same numbers in every mapped call that reaches it: that
is a finding. Nothing else is: `random_split`, `random_fold_in`, `random_wrap`,
`random_unwrap`, indexing and every other primitive pass their inputs' facts on to
their outputs (the keys a split produces inherit their parent's marks), so
`fold_in(key, lax.axis_index(name))`, `fold_in(split(key)[0], example_id)` and
`split(key, n)[i]` with a mapped `i` clear the key.

The analysis recurses into sub-jaxprs (`jit`, `remat`, `custom_jvp_call`,
`custom_vjp_call`, `closed_call`, `shard_map`, ...), joins the branches of `cond`,
and iterates the carries of `scan` and `while` to a fixed point. Any other primitive
gives each output the join of all its inputs' facts. Each reported finding is a real
broadcast: `varying` over-approximates ("may vary"), so a key reported as not varying
is the same in every mapped call.
"""

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

from jax.extend import core as jex_core

from ._util import axis_names

# Primitives that draw bits from a key: for each, how many leading operands are
# the key (the raw hashes take the key words and the counts, all of which decide
# the bits). `random_split` is not here: splitting draws nothing.
_DRAWS = {
    "random_bits": 1,
    "random_gamma": 1,
    "threefry2x32": None,
    "threefry4x32": None,
    "philox2x32": None,
    "philox4x32": None,
}
SEEDED = -1
"""The origin of keys made inside the function from a seed that does not vary."""
# Collectives whose result is the same in every mapped call of the axes they reduce.
_REDUCERS = frozenset({"psum", "pmax", "pmin", "psum_invariant", "all_gather"})
_MAX_FIXED_POINT_ITERATIONS = 64


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the analysis knows about one variable."""

    origins: frozenset[int] = frozenset()
    varying: bool = False


_NOTHING = Facts()


def _join(facts: Sequence[Facts]) -> Facts:
    origins: frozenset[int] = frozenset()
    varying = False
    for f in facts:
        origins = origins | f.origins
        varying = varying or f.varying
    if not origins and not varying:
        return _NOTHING
    return Facts(origins, varying)


def _join_lists(a: list[Facts], b: list[Facts]) -> list[Facts]:
    return [_join((x, y)) for x, y in zip(a, b, strict=True)]


def _as_jaxpr(x: Any) -> Any:
    if isinstance(x, jex_core.ClosedJaxpr):
        return x.jaxpr
    return x


@dataclasses.dataclass(frozen=True)
class Finding:
    """An unmapped key (`origin`) drawn from by `primitive` with nothing per call."""

    origin: int
    primitive: str


class _Analysis:
    def __init__(self, axis_name: Hashable | None):
        self.axis_name = axis_name
        self.findings: dict[int, str] = {}
        self._cache: dict[tuple[Any, ...], list[Facts]] = {}
        self._keep_alive: list[Any] = []

    # -- jaxprs --------------------------------------------------------------

    def run(
        self,
        jaxpr: Any,
        in_facts: Sequence[Facts],
        const_facts: Sequence[Facts] = (),
    ) -> list[Facts]:
        jaxpr = _as_jaxpr(jaxpr)
        cache_key = (id(jaxpr), tuple(in_facts), tuple(const_facts))
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        env: dict[Any, Facts] = {}

        def read(v: Any) -> Facts:
            if isinstance(v, jex_core.Literal):
                return _NOTHING
            return env.get(v, _NOTHING)

        for v, f in zip(jaxpr.constvars, const_facts, strict=False):
            env[v] = f
        for v, f in zip(jaxpr.invars, in_facts, strict=True):
            env[v] = f
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, f in zip(eqn.outvars, outs, strict=True):
                env[v] = f
        result = [read(v) for v in jaxpr.outvars]
        self._keep_alive.append(jaxpr)
        self._cache[cache_key] = result
        return result

    # -- equations -----------------------------------------------------------

    def eqn(self, eqn: Any, ins: list[Facts]) -> list[Facts]:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if name in _DRAWS:
            n_key = _DRAWS[name]
            self._draw(name, ins if n_key is None else ins[:n_key])
            return [_join(ins)] * n_out
        if name == "random_seed":
            seed = _join(ins)
            if seed.varying:
                return [seed] * n_out
            return [Facts(seed.origins | {SEEDED}, False)] * n_out
        if name == "axis_index":
            mine = self.axis_name is not None and self.axis_name in axis_names(
                eqn.params.get("axis_name")
            )
            return [Facts(frozenset(), mine)] * n_out
        if name in _REDUCERS and self.axis_name is not None:
            axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
            if self.axis_name in axis_names(axes):
                joined = _join(ins)
                return [Facts(joined.origins, False)] * n_out
        if name == "cond":
            return self._cond(eqn, ins)
        if name == "scan":
            return self._scan(eqn, ins)
        if name == "while":
            return self._while(eqn, ins)
        return self._generic(eqn, ins)

    def _draw(self, name: str, keys: list[Facts]) -> None:
        joined = _join(keys)
        if joined.origins and not joined.varying:
            for origin in sorted(joined.origins):
                self.findings.setdefault(origin, name)

    def _generic(self, eqn: Any, ins: list[Facts]) -> list[Facts]:
        n_out = len(eqn.outvars)
        subs = [
            v
            for v in eqn.params.values()
            if isinstance(v, jex_core.Jaxpr | jex_core.ClosedJaxpr)
        ]
        if len(subs) == 1:
            sub = _as_jaxpr(subs[0])
            if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
                # A call-like primitive (jit, remat, custom_jvp/vjp, closed_call,
                # shard_map, ...): its inputs are the sub-jaxpr's inputs.
                return self.run(sub, ins)
        # Unknown structure: every output may depend on every input. Findings are
        # not looked for inside, so an unknown primitive never raises.
        return [_join(ins)] * n_out

    def _cond(self, eqn: Any, ins: list[Facts]) -> list[Facts]:
        index, ops = ins[0], ins[1:]
        outs: list[Facts] | None = None
        for branch in eqn.params["branches"]:
            branch_outs = self.run(branch, ops)
            outs = branch_outs if outs is None else _join_lists(outs, branch_outs)
        assert outs is not None
        # Which branch runs is itself data: outputs depend on the index too.
        return [_join((f, index)) for f in outs]

    def _scan(self, eqn: Any, ins: list[Facts]) -> list[Facts]:
        n_consts = eqn.params["num_consts"]
        n_carry = eqn.params["num_carry"]
        body = eqn.params["jaxpr"]
        consts = ins[:n_consts]
        carry = ins[n_consts : n_consts + n_carry]
        xs = ins[n_consts + n_carry :]
        ys: list[Facts] | None = None
        for _ in range(_MAX_FIXED_POINT_ITERATIONS):
            outs = self.run(body, consts + carry + xs)
            new_carry = _join_lists(carry, outs[:n_carry])
            ys = outs[n_carry:] if ys is None else _join_lists(ys, outs[n_carry:])
            if new_carry == carry:
                break
            carry = new_carry
        assert ys is not None
        return carry + ys

    def _while(self, eqn: Any, ins: list[Facts]) -> list[Facts]:
        n_cond = eqn.params["cond_nconsts"]
        n_body = eqn.params["body_nconsts"]
        cond_consts = ins[:n_cond]
        body_consts = ins[n_cond : n_cond + n_body]
        carry = ins[n_cond + n_body :]
        pred = _NOTHING
        for _ in range(_MAX_FIXED_POINT_ITERATIONS):
            pred = _join(
                (pred, *self.run(eqn.params["cond_jaxpr"], cond_consts + carry))
            )
            outs = self.run(eqn.params["body_jaxpr"], body_consts + carry)
            new_carry = _join_lists(carry, outs)
            if new_carry == carry:
                break
            carry = new_carry
        # A per-call trip count makes every carry vary per call.
        if pred.varying:
            carry = [Facts(f.origins, True) for f in carry]
        return carry


def find_broadcast_keys(
    jaxpr: Any,
    in_facts: Sequence[Facts],
    axis_name: Hashable | None,
    const_facts: Sequence[Facts] | None = None,
) -> list[Finding]:
    """Run the analysis over `jaxpr` (a `Jaxpr` or `ClosedJaxpr`).

    **Arguments:**

    - `jaxpr`: The per-call function's jaxpr.
    - `in_facts`: One `Facts` per input variable.
    - `axis_name`: The mapped axis's name (for `lax.axis_index` and collectives).
    - `const_facts`: One `Facts` per constant variable (values closed over by the
        function); by default constants carry no facts.

    **Returns:**

    One `Finding` per unmapped key origin drawn from without per-call data, sorted
    by origin (`SEEDED` first).
    """
    analysis = _Analysis(axis_name)
    inner = _as_jaxpr(jaxpr)
    if const_facts is None:
        const_facts = [_NOTHING] * len(inner.constvars)
    analysis.run(inner, list(in_facts), list(const_facts))
    return [Finding(o, p) for o, p in sorted(analysis.findings.items())]


__all__ = ["SEEDED", "Facts", "Finding", "find_broadcast_keys"]
