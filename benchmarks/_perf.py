"""The performance workloads of `make bench`: forward dispatch and CNN chains.

`dispatch_suite` times one jitted forward call under `eqx_rng.jit`,
`eqx.filter_jit` and raw `jax.jit` (`_eval.py`); `cnn_suite` times a training step
of chains of a small conv net vmapped, unrolled, and looped with `lax.map` /
`lax.scan` (`_cnn_chains.py`). Each returns a JSON-able dict; `markdown` renders
both.
"""

import statistics
from collections.abc import Callable

from . import _cnn_chains, _eval, _harness, _report
from ._suites import Suite
from ._workload import make_data

# Targets: eqx_rng.jit's forward call at the tiny size against raw jax.jit; the
# fastest chain loop against the unrolled program at 8 chains.
DISPATCH_TARGET = 1.10
CNN_TARGET = 1.2


def _rows(measured: list) -> list[dict]:
    rows = []
    for m in measured:
        ratios = m.ratio_per_round or [1.0]
        rows.append(
            {
                "impl": m.runner.impl,
                "variant": m.runner.variant,
                "median_s": m.median_s,
                "min_s": min(m.per_step_s),
                "max_s": max(m.per_step_s),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "best_ratio": None,
                "first_call_s": m.first_call_s,
                "reference": m.runner.reference,
            }
        )
    ref = next(r for r in rows if r["reference"])
    for r in rows:
        r["best_ratio"] = r["min_s"] / ref["min_s"]
    return rows


def dispatch_suite(suite: Suite, log: Callable[[str], None]) -> dict:
    """The forward call at the suite's tiny and C=1 sizes."""
    names = [suite.roles[r] for r in ("tiny", "c1") if r in suite.roles]
    out = []
    for size in (s for s in suite.sizes if s.name in names):
        log(f"[dispatch] {size.name}: forward under eqx_rng.jit / eqx.filter_jit / jit")
        data = make_data(size)
        runners = _eval.runners(size, data)
        measured = _harness.measure(
            runners,
            round_s=suite.round_s,
            budget_s=suite.budget_s.get(size.name, 0.0) / 2,
            min_rounds=suite.min_rounds,
            max_rounds=suite.max_rounds,
            memory=False,
            log=log,
        )
        diff = _eval.same_numbers(runners)
        out.append(
            {
                "size": size.name,
                "rounds": len(measured[0].per_step_s),
                "max_abs_diff": diff,
                "rows": _rows(measured),
            }
        )
    return {"sizes": out}


def cnn_suite(
    suite: Suite, log: Callable[[str], None], *, batch_size: bool = False
) -> dict:
    """8 chains (2 in the quick suite) of the small CNN, every chain loop."""
    quick = suite.name.endswith("quick") or suite.name == "smoke"
    chains, batch = (2, 4) if quick else (8, 32)
    log(f"[cnn] {chains} chains x batch {batch}: vmap / unrolled / lax.map / lax.scan")
    step_fns = _cnn_chains.steps(chains, batch_size=batch_size)
    diff = _cnn_chains.same_numbers(step_fns, chains, batch)
    measured = _harness.measure(
        _cnn_chains.runners(step_fns, chains, batch),
        round_s=suite.round_s,
        budget_s=0.0 if quick else 40.0,
        min_rounds=suite.min_rounds,
        max_rounds=suite.max_rounds,
        memory=False,
        log=log,
    )
    return {
        "chains": chains,
        "batch": batch,
        "rounds": len(measured[0].per_step_s),
        "max_abs_diff": diff,
        "rows": _rows(measured),
    }


def _table(rows: list[dict], ref_name: str) -> str:
    lines = [
        f"| runner | time / call, median (min–max) | × {ref_name}, median of rounds "
        "(min–max) | best / best | first call |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        label = r["impl"] if r["variant"] == _eval.VARIANT else r["variant"]
        lines.append(
            f"| {label} | {_report._fmt_time(r['median_s'])} "
            f"({_report._fmt_time(r['min_s'])}–{_report._fmt_time(r['max_s'])}) | "
            f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | "
            f"{r['best_ratio']:.2f}x | {r['first_call_s']:.2f} s |"
        )
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    """Verdict lines for the two targets (where the suite measured them)."""
    lines = []
    for sr in results.get("dispatch", {}).get("sizes", []):
        if sr["size"] != "tiny":
            continue
        r = next(r for r in sr["rows"] if r["impl"] == _eval.EQX_RNG_JIT)
        met = "met" if r["ratio"] <= DISPATCH_TARGET else "missed"
        lines.append(
            f"forward call under `eqx_rng.jit` <= {DISPATCH_TARGET:.2f}x raw `jax.jit` "
            f"(tiny): {r['ratio']:.2f}x, best/best {r['best_ratio']:.2f}x: {met}"
        )
    cnn = results.get("cnn")
    if cnn is not None:
        loops = [r for r in cnn["rows"] if not r["reference"]]
        best = min(loops, key=lambda r: r["ratio"])
        met = "met" if best["ratio"] <= CNN_TARGET else "missed"
        lines.append(
            f"{cnn['chains']} CNN chains within {CNN_TARGET:.1f}x of unrolled: "
            f"best is {best['variant']} at {best['ratio']:.2f}x: {met}"
        )
    return lines


def markdown(results: dict) -> str:
    """The two sections (empty if neither ran)."""
    parts = []
    dispatch = results.get("dispatch")
    if dispatch:
        parts.append("## Forward call dispatch (one chain)\n")
        for sr in dispatch["sizes"]:
            parts.append(
                f"`{sr['size']}`, {sr['rounds']} rounds; logits against raw JAX: "
                f"max |Δ| = {sr['max_abs_diff']:.1e}\n\n"
                + _table(sr["rows"], "raw `jax.jit`")
                + "\n"
            )
    cnn = results.get("cnn")
    if cnn:
        parts.append(
            f"## CNN chains ({cnn['chains']} chains x batch {cnn['batch']}, one "
            f"training step per call)\n\n{cnn['rounds']} rounds; parameters and "
            f"losses against the unrolled program: max |Δ| = "
            f"{cnn['max_abs_diff']:.1e}\n\n" + _table(cnn["rows"], "unrolled") + "\n"
        )
    lines = targets(results)
    if lines:
        parts.append("Targets: " + "; ".join(lines) + ".\n")
    return "\n".join(parts)
