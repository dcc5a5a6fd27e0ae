"""Markdown tables and the target verdicts, computed from the results JSON."""

import statistics
from typing import Any

MiB = 2**20


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def is_loop(m: dict) -> bool:
    return "loop" in m["variant"]


def find(size_result: dict, impl: str, *, spc: int | None = None, loop=False):
    """The measurement of `impl` in a size (non-loop unless `loop`), or `None`."""
    for m in size_result["measurements"]:
        if m["impl"] != impl or is_loop(m) != loop:
            continue
        if spc is not None and m["steps_per_call"] != spc:
            continue
        return m
    return None


def _twin(size_result: dict, m: dict) -> dict | None:
    """The raw-JAX runner that does the same work in one call as `m` (same steps
    per call): the reference for compile time and memory."""
    if is_loop(m):
        return None
    return find(size_result, "raw JAX", spc=m["steps_per_call"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _mem(m: dict | None) -> float | None:
    if m is None or m.get("memory") is None:
        return None
    return m["memory"]["total_bytes"]


def _get(r: dict | None, key: str) -> float | None:
    return None if r is None else r[key]


def derived(size_result: dict) -> list[dict[str, Any]]:
    """Per measurement: median, spread, examples/s, ratios, compile and memory."""
    size = size_result["size"]
    examples = size["batch"] * size["chains"]
    refs = [m for m in size_result["measurements"] if m["reference"]]
    ref_best = min(refs[0]["per_step_s"]) if refs else None
    rows = []
    for m in size_result["measurements"]:
        ratios = m["ratio_per_round"] or []
        twin = _twin(size_result, m)
        mem = _mem(m)
        rows.append(
            {
                "impl": m["impl"],
                "variant": m["variant"],
                "median_s": m["median_step_s"],
                "min_s": min(m["per_step_s"]),
                "max_s": max(m["per_step_s"]),
                "examples_per_s": examples / m["median_step_s"],
                "ratio": _med(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                "ratio_best": _ratio(min(m["per_step_s"]), ref_best),
                "first_call_s": m["first_call_s"],
                "compile_s": m["compile_s"],
                "compile_ratio": _ratio(m["compile_s"], _get(twin, "compile_s")),
                "memory_mib": None if mem is None else mem / MiB,
                "memory_ratio": _ratio(mem, _mem(twin)),
                "final_loss": m["final_loss"],
            }
        )
    return rows


def size_title(size: dict) -> str:
    return (
        f"{size['name']}: hidden {size['hidden']}, batch {size['batch']}, "
        f"{size['chains']} chain{'s' if size['chains'] > 1 else ''}"
    )


def timing_table(results: dict) -> str:
    lines = [
        "| size | implementation | variant | time / step (median) | min – max | "
        "examples/s | × raw JAX (median, min – max) | best / best |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for sr in results["sizes"]:
        for r in derived(sr):
            ratio = _fmt_ratio(r["ratio"])
            if r["ratio"] is not None:
                ratio += f" ({r['ratio_min']:.2f} – {r['ratio_max']:.2f})"
            lines.append(
                f"| {sr['size']['name']} | {r['impl']} | {r['variant']} | "
                f"{_fmt_time(r['median_s'])} | {_fmt_time(r['min_s'])} – "
                f"{_fmt_time(r['max_s'])} | {r['examples_per_s']:,.0f} | {ratio} | "
                f"{_fmt_ratio(r['ratio_best'])} |"
            )
    return "\n".join(lines)


def compile_memory_table(results: dict) -> str:
    lines = [
        "| size | implementation | variant | first call | compile | "
        "× raw JAX | memory (MiB) | × raw JAX | final loss |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for sr in results["sizes"]:
        for r in derived(sr):
            mem = r["memory_mib"]
            lines.append(
                f"| {sr['size']['name']} | {r['impl']} | {r['variant']} | "
                f"{r['first_call_s']:.2f} s | "
                f"{r['compile_s']:.2f} s | "
                f"{_fmt_ratio(r['compile_ratio'])} | "
                f"{'—' if mem is None else f'{mem:.2f}'} | "
                f"{_fmt_ratio(r['memory_ratio'])} | {r['final_loss']:.3f} |"
            )
    return "\n".join(lines)


def sizes_list(results: dict) -> str:
    return "\n".join(f"- {size_title(sr['size'])}" for sr in results["sizes"])


# --- targets -------------------------------------------------------------------


def _by_role(results: dict, role: str) -> dict | None:
    name = results.get("roles", {}).get(role)
    for sr in results["sizes"]:
        if sr["size"]["name"] == name:
            return sr
    return None


def _row(
    sr: dict | None, impl: str, *, spc: int | None = None, loop=False
) -> dict | None:
    if sr is None:
        return None
    m = find(sr, impl, spc=spc, loop=loop)
    if m is None:
        return None
    for r in derived(sr):
        if r["impl"] == m["impl"] and r["variant"] == m["variant"]:
            return r
    return None


def targets(results: dict) -> list[dict[str, Any]]:
    """Each target: what, the measured value, the bound, met or not (None: no data)."""
    out = []

    def add(
        what: str,
        value: float | None,
        bound: float,
        *,
        lower_is_better=True,
        best: float | None = None,
    ):
        met = (
            None
            if value is None
            else (value <= bound if lower_is_better else value > bound)
        )
        out.append(
            {"target": what, "value": value, "best": best, "bound": bound, "met": met}
        )

    for role in ("tiny", "c1"):
        sr = _by_role(results, role)
        if sr is None:
            continue
        name = sr["size"]["name"]
        spc = sr["size"]["steps_per_call"]
        r = _row(sr, "eqx_rng", spc=1)
        add(
            f"{name}: single-call step ≤ 1.10x raw",
            _get(r, "ratio"),
            1.10,
            best=_get(r, "ratio_best"),
        )
        bound = 0.20 if role == "tiny" else 0.85
        r = _row(sr, "eqx_rng", spc=spc)
        add(
            f"{name}: steps_per_call={spc} ≤ {bound:.2f}x raw per step",
            _get(r, "ratio"),
            bound,
            best=_get(r, "ratio_best"),
        )
    sr = _by_role(results, "cmax")
    if sr is not None:
        name = sr["size"]["name"]
        spc = sr["size"]["steps_per_call"]
        vm = _row(sr, "eqx_rng", spc=1)
        add(
            f"{name}: vmapped chains ≤ 1.05x raw",
            _get(vm, "ratio"),
            1.05,
            best=_get(vm, "ratio_best"),
        )
        r = _row(sr, "eqx_rng", spc=spc)
        add(
            f"{name}: steps_per_call={spc} ≤ 0.75x raw per step",
            _get(r, "ratio"),
            0.75,
            best=_get(r, "ratio_best"),
        )
        for impl in ("eqx_rng", "raw JAX"):
            lp, v = _row(sr, impl, loop=True), _row(sr, impl, spc=1)
            add(
                f"{name}: {impl} Python loop over chains / vmapped chains > 1",
                _ratio(_get(lp, "median_s"), _get(v, "median_s")),
                1.0,
                lower_is_better=False,
                best=_ratio(_get(lp, "min_s"), _get(v, "min_s")),
            )
        add(f"{name}: memory ≤ 1.10x raw", _get(vm, "memory_ratio"), 1.10)
    for sr in results["sizes"]:
        r = _row(sr, "eqx_rng", spc=1)
        if r is not None:
            add(f"{sr['size']['name']}: compile ≤ 1.30x raw", r["compile_ratio"], 1.30)
    fw = results.get("forward")
    if fw:
        ours = next(m for m in fw["measurements"] if m["impl"] == "eqx_rng")
        same = [m for m in fw["measurements"] if m["variant"].endswith("in jit")]
        if same:
            per_round = [
                a / b
                for a, b in zip(ours["per_step_s"], same[0]["per_step_s"], strict=True)
            ]
            add(
                f"{fw['size']['name']}: chains x batch forward, nested eqx_rng.vmap "
                "≤ 1.05x jax.vmap deriving the same keys in jit",
                _med(per_round),
                1.05,
                best=_ratio(min(ours["per_step_s"]), min(same[0]["per_step_s"])),
            )
    tc = results.get("typecheck")
    if tc:
        for row in tc["rows"]:
            add(
                f"{row['size']}: {row['variant']} typecheck on vs off "
                f"(Δ ratio ≤ noise {row['noise']:.2f})",
                abs(row["ratio_on"] - row["ratio_off"]),
                row["noise"],
            )
    return out


def targets_table(rows: list[dict]) -> str:
    lines = [
        "| target | measured (median) | best / best | met |",
        "| --- | ---: | ---: | :---: |",
    ]
    for t in rows:
        v = "—" if t["value"] is None else f"{t['value']:.2f}"
        b = "—" if t.get("best") is None else f"{t['best']:.2f}"
        met = {True: "yes", False: "**no**", None: "no data"}[t["met"]]
        lines.append(f"| {t['target']} | {v} | {b} | {met} |")
    return "\n".join(lines)


def forward_table(fw: dict) -> str:
    lines = [
        f"{size_title(fw['size'])}; {fw['rounds']} rounds.",
        "",
        "| implementation | variant | time / call (min – max) | examples/s | "
        "× raw JAX, pre-split (min – max) | best / best | memory |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in derived(fw):
        mem = "—" if r["memory_mib"] is None else f"{r['memory_mib']:.1f} MiB"
        lines.append(
            f"| {r['impl']} | {r['variant']} | {_fmt_time(r['median_s'])} "
            f"({_fmt_time(r['min_s'])} – "
            f"{_fmt_time(r['max_s'])}) | {r['examples_per_s']:,.0f} | "
            f"{_fmt_ratio(r['ratio'])} ({_fmt_ratio(r['ratio_min'])} – "
            f"{_fmt_ratio(r['ratio_max'])}) | {_fmt_ratio(r['ratio_best'])} | {mem} |"
        )
    return "\n".join(lines)


def typecheck_table(tc: dict) -> str:
    lines = [
        "| size | variant | × raw, checks on | × raw, checks off | noise | "
        "first call on / off |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in tc["rows"]:
        lines.append(
            f"| {r['size']} | {r['variant']} | {r['ratio_on']:.2f}x | "
            f"{r['ratio_off']:.2f}x | ±{r['noise']:.2f} | "
            f"{r['first_on_s']:.2f} s / {r['first_off_s']:.2f} s |"
        )
    return "\n".join(lines)


def gpu_table(gpu: dict) -> str:
    lines = [
        f"Matmul peak (measured, {gpu['peak_n']}² float32): "
        f"{gpu['peak_flops'] / 1e9:,.1f} GFLOP/s.",
        "",
        "| chains | implementation | time / step | examples/s | GFLOP/s (matmuls) | "
        "% of matmul peak | × raw JAX |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in gpu["rows"]:
        lines.append(
            f"| {row['chains']} | {row['impl']} | {_fmt_time(row['median_s'])} | "
            f"{row['examples_per_s']:,.0f} | {row['flops'] / 1e9:,.1f} | "
            f"{100 * row['flops'] / gpu['peak_flops']:.1f}% | {_fmt_ratio(row['ratio'])} |"
        )
    if gpu.get("skipped"):
        lines += ["", f"Skipped (would not fit in memory): chains = {gpu['skipped']}."]
    sat = gpu.get("saturation")
    if sat:
        lines += [
            "",
            "Throughput saturates (first C reaching 90% of the best examples/s): "
            + ", ".join(f"{impl} at C = {c}" for impl, c in sat.items())
            + ".",
        ]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    env = results["env"]
    parts = [
        f"# eqx_rng benchmarks: suite `{results['suite']}`",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {env['date']}; device: {env['device']}; CPU: {env['cpu_model']} "
        f"({env['nproc']} cores); "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f"; EQX_RNG_TYPECHECK={env['typecheck']}"
        + (f"; XLA_FLAGS=`{env['xla_flags']}`" if env.get("xla_flags") else "")
        + ".",
        "",
    ]
    if results["sizes"]:
        parts += [
            "Sizes:",
            sizes_list(results),
            "",
            "## Step time",
            "",
            "Ratios: per round, time over raw JAX's time in the same round; the "
            "median (min – max) over rounds. Best / best: the runner's fastest round "
            "over raw JAX's fastest, the least disturbed estimate when other "
            "processes share the machine.",
            "",
            timing_table(results),
            "",
            "## First call, compile and memory",
            "",
            "Memory is XLA's compiled memory analysis of one call (arguments + outputs "
            "+ temporaries − aliased), not a measured peak"
            + (" (CPU has no `memory_stats()`)." if env["platform"] == "cpu" else "."),
            "Compile = first call − one steady-state call (tracing, lowering, XLA "
            "compile and any one-off Python work). Compile and memory ratios compare "
            "with the raw-JAX runner that does the same steps per call.",
            "",
            compile_memory_table(results),
            "",
        ]
    if results.get("forward"):
        parts += [
            "## chains x batch forward: `eqx_rng.vmap` vs `jax.vmap`",
            "",
            "Training-mode forward of C chains x B examples in one jitted call. "
            "eqx_rng: one key in, nested `eqx_rng.vmap` (chains outer, "
            '`axis_name="batch"` inner), keys derived inside the program. Raw JAX: '
            "`jax.jit(jax.vmap(...))` over chains, with the `(C, B)` keys split before "
            "timing (the reference) or derived inside the program from one key like "
            "eqx_rng's. Same numbers (see Checks).",
            "",
            forward_table(results["forward"]),
            "",
        ]
    if results.get("typecheck"):
        parts += [
            "## Contracts: EQX_RNG_TYPECHECK on vs off",
            "",
            typecheck_table(results["typecheck"]),
            "",
        ]
    if results.get("gpu"):
        parts += ["## Throughput (`--gpu`)", "", gpu_table(results["gpu"]), ""]
    if results.get("checks"):
        parts += ["## Checks", ""] + [f"- {c}" for c in results["checks"]] + [""]
    if results.get("targets"):
        parts += ["## Targets", "", targets_table(results["targets"]), ""]
    return "\n".join(parts)
