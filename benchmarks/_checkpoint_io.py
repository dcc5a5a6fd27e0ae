"""Checkpoint I/O: `eqx_rng.save`/`load` against `eqx.tree_serialise_leaves` +
`fsync` and `eqx.tree_deserialise_leaves`, on the same tree, interleaved by round.

Save and load throughput in MB/s (median and min-max over rounds; the ratio is the
median of per-round time ratios), and the peak resident memory a load adds (and the
time of that load), measured in a fresh subprocess per loader (the peak resident size, `VmHWM`, after the load
minus the resident size before it), as a multiple of the data's size. Loads read from the page cache for
both libraries (the files were just written): the numbers compare the libraries'
own work, not the disk.

```
python benchmarks/_checkpoint_io.py --mb 256 --rounds 5   # standalone
python benchmarks/_checkpoint_io.py --mb 25 --leaves 200 --spread 50  # many small leaves
python benchmarks/run.py                                  # part of the full suite
```
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import eqx_rng  # noqa: E402

LEAVES = 16  # default number of float32 leaves
TARGET_RATIO = 1.3  # eqx_rng time / Equinox time, save and load
TARGET_PEAK = 1.2  # peak memory added by a load / data size


def sizes(mb: float, leaves: int = LEAVES, spread: float = 1.0) -> list[int]:
    """The element counts of `leaves` float32 arrays of about `mb` MB in all, in
    geometric progression from the smallest to `spread` times the smallest (equal
    sizes when `spread` is 1; a transformer's ~200 leaves of 10-500 KB are about
    `sizes(25, 200, 50)`)."""
    weights = np.geomspace(1.0, spread, leaves) if leaves > 1 else np.ones(1)
    total = mb * 1e6 / 4
    return [max(1, int(total * w / weights.sum())) for w in weights]


def _names(leaves: int) -> list[str]:
    width = max(2, len(str(leaves - 1)))
    return [f"w{i:0{width}d}" for i in range(leaves)]


def make_tree(mb: float, leaves: int = LEAVES, spread: float = 1.0) -> dict:
    """Float32 arrays of `mb` MB in all (see `sizes`), and a key and a step."""
    rng = np.random.default_rng(0)
    counts = sizes(mb, leaves, spread)
    tree = {
        name: jnp.asarray(rng.standard_normal(n, dtype=np.float32))
        for name, n in zip(_names(leaves), counts, strict=True)
    }
    tree["key"] = jr.key(0)
    tree["step"] = jnp.int32(0)
    return tree


def like_tree(mb: float, leaves: int = LEAVES, spread: float = 1.0) -> dict:
    """`make_tree(mb, leaves, spread)` as `jax.ShapeDtypeStruct`s, without the data."""
    counts = sizes(mb, leaves, spread)
    like: dict = {
        name: jax.ShapeDtypeStruct((n,), jnp.float32)
        for name, n in zip(_names(leaves), counts, strict=True)
    }
    like["key"] = jax.eval_shape(lambda: jr.key(0))
    like["step"] = jax.ShapeDtypeStruct((), jnp.int32)
    return like


def _nbytes(tree: dict) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _like(tree: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def eqx_save(path: Path, tree: dict) -> None:
    with open(path, "wb") as f:
        eqx.tree_serialise_leaves(f, tree)
        f.flush()
        os.fsync(f.fileno())


def eqx_load(path: Path, like: dict) -> dict:
    with open(path, "rb") as f:
        return eqx.tree_deserialise_leaves(f, like)


def _for_eqx(tree: dict) -> dict:
    """The same tree with the typed key as its raw key data (Equinox's serialiser
    refuses typed keys)."""
    return {**tree, "key": jr.key_data(tree["key"])}


def _timed(fn) -> float:
    start = time.perf_counter()
    out = fn()
    if out is not None:
        jax.block_until_ready(jax.tree.leaves(out))
    return time.perf_counter() - start


def _peak_child(
    loader: str, path: str, mb: float, leaves: int = LEAVES, spread: float = 1.0
) -> dict:
    """Run in a fresh process: the resident memory one load adds."""
    cmd = [sys.executable, __file__, "--child", loader, path, "--mb", str(mb)]
    cmd += ["--leaves", str(leaves), "--spread", str(spread)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    if out.returncode != 0:
        raise RuntimeError(f"{loader} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(loader: str, path: str, mb: float, leaves: int, spread: float) -> None:
    like = like_tree(mb, leaves, spread)
    nbytes = 4 * sum(sizes(mb, leaves, spread))
    if loader == "eqx":  # Equinox reads into real arrays (in the baseline below)
        like["key"] = jax.ShapeDtypeStruct((2,), jnp.uint32)
        like = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), like)
    # Warm up (backend start, the key-wrapping compile) on a small file of the same
    # structure, so that the baseline holds everything but the load's own memory.
    small = Path(tempfile.mkdtemp()) / "small"
    tiny = make_tree(1e-3, leaves, spread)
    if loader == "eqx":
        eqx_save(small, _for_eqx(tiny))
        eqx_load(small, _for_eqx(tiny))
    else:
        eqx_rng.save(small, tiny)
        eqx_rng.load(small, _like(tiny))
    before = _rss_now()
    start = time.perf_counter()
    if loader == "eqx":
        out = eqx_load(Path(path), like)
    else:
        out = eqx_rng.load(path, like)
    jax.block_until_ready(jax.tree.leaves(out))
    load_s = time.perf_counter() - start
    # The peak resident size of this process's memory (`VmHWM`; not `ru_maxrss`,
    # which Linux carries over from the parent across `exec`): `peak - before` is
    # an upper bound of what the load added (exact unless the warm-up peaked higher).
    peak = _peak_rss()
    added = max(peak - before, 0)
    result = {"added": added, "nbytes": nbytes, "ratio": added / nbytes}
    print(json.dumps({**result, "load_s": load_s}))


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _summary(times: list[float], nbytes: int) -> dict:
    rates = [nbytes / t / 1e6 for t in times]
    return {
        "median_mb_s": statistics.median(rates),
        "min_mb_s": min(rates),
        "max_mb_s": max(rates),
        "times_s": times,
    }


def run(
    mb: float,
    rounds: int,
    directory: str | None = None,
    log=print,
    *,
    leaves: int = LEAVES,
    spread: float = 1.0,
    pause: float = 0.0,
) -> dict:
    """The whole measurement; `log` receives progress lines. `pause` seconds are
    slept before each timed operation (see `--pause`)."""
    tree = make_tree(mb, leaves, spread)
    nbytes = _nbytes(tree)
    like = _like(tree)
    eqx_tree = _for_eqx(tree)
    times: dict[str, list[float]] = {
        k: [] for k in ("eqx save", "eqx_rng save", "eqx load", "eqx_rng load")
    }
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        eqx_path, ours_path = Path(tmp) / "tree.eqx", Path(tmp) / "tree.ckpt"
        ops = {
            "eqx save": lambda: eqx_save(eqx_path, eqx_tree),
            "eqx_rng save": lambda: eqx_rng.save(ours_path, tree),
            "eqx load": lambda: eqx_load(eqx_path, eqx_tree),
            "eqx_rng load": lambda: eqx_rng.load(ours_path, like),
        }
        for r in range(rounds):
            # Alternate which library goes first, so neither always gets a warm
            # (or a cold) page cache.
            order = ("eqx", "eqx_rng") if r % 2 == 0 else ("eqx_rng", "eqx")
            for op in ("save", "load"):
                for lib in order:
                    time.sleep(pause)
                    times[f"{lib} {op}"].append(_timed(ops[f"{lib} {op}"]))
            log(
                f"[checkpoint io] round {r + 1}/{rounds}: "
                + ", ".join(
                    f"{k} {nbytes / v[-1] / 1e6:.0f} MB/s" for k, v in times.items()
                )
            )
        peak = {
            lib: _peak_child(lib, str(path), mb, leaves, spread)
            for lib, path in (("eqx", eqx_path), ("eqx_rng", ours_path))
        }
    results = {
        "mb": nbytes / 1e6,
        "rounds": rounds,
        "leaves": leaves,
        "spread": spread,
        "pause": pause,
        "rates": {k: _summary(v, nbytes) for k, v in times.items()},
        "ratio": {
            op: statistics.median(
                a / b
                for a, b in zip(times[f"eqx_rng {op}"], times[f"eqx {op}"], strict=True)
            )
            for op in ("save", "load")
        },
        "peak_load": peak,
    }
    results["targets"] = [
        {
            "target": f"{op} within {TARGET_RATIO}x of Equinox + fsync",
            "result": f"{results['ratio'][op]:.2f}x",
            "met": results["ratio"][op] <= TARGET_RATIO,
        }
        for op in ("save", "load")
    ] + [
        {
            "target": f"peak memory added by a load <= {TARGET_PEAK}x the data",
            "result": f"{peak['eqx_rng']['ratio']:.2f}x "
            f"(Equinox {peak['eqx']['ratio']:.2f}x)",
            "met": peak["eqx_rng"]["ratio"] <= TARGET_PEAK,
        }
    ]
    return results


def _fresh_load_text(results: dict) -> list[str]:
    """One load each in a fresh process (the peak-memory children): a resumed
    run's load, whose memory is all new to the process."""
    peak = results["peak_load"]
    if "load_s" not in peak["eqx_rng"]:
        return []
    ours, theirs = peak["eqx_rng"]["load_s"], peak["eqx"]["load_s"]
    return [
        f"Load in a fresh process (one each): eqx_rng {ours:.2f} s, Equinox "
        f"{theirs:.2f} s ({ours / theirs:.2f}x).",
        "",
    ]


def _pause_text(results: dict) -> str:
    pause = results.get("pause", 0.0)
    return f", {pause:g} s pause before each operation" if pause else ""


def _spread_text(results: dict) -> str:
    spread = results.get("spread", 1.0)
    return "" if spread == 1.0 else f" (sizes spread {spread:g}x)"


def markdown(results: dict) -> str:
    lines = [
        f"## Checkpoint I/O ({results['mb']:.0f} MB, {results['leaves']} float32 "
        f"leaves{_spread_text(results)} + a key, {results['rounds']} rounds"
        f"{_pause_text(results)})",
        "",
        "| operation | median MB/s | min-max MB/s |",
        "| --- | ---: | ---: |",
    ]
    for name, r in results["rates"].items():
        lines.append(
            f"| {name} | {r['median_mb_s']:.0f} | "
            f"{r['min_mb_s']:.0f}-{r['max_mb_s']:.0f} |"
        )
    lines += [
        "",
        f"eqx_rng / Equinox time, median of rounds: save "
        f"{results['ratio']['save']:.2f}x, load {results['ratio']['load']:.2f}x.",
        "",
        *_fresh_load_text(results),
        "| target | result | met |",
        "| --- | --- | :---: |",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['target']} | {t['result']} | {'yes' if t['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=256.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--leaves", type=int, default=LEAVES)
    parser.add_argument(
        "--spread", type=float, default=1.0, help="largest / smallest leaf size"
    )
    parser.add_argument("--dir", default=None, help="where to write (default: tmp)")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds slept before each operation: memory another operation "
        "freed just before is then no longer at hand (a virtual machine that "
        "reports free pages to its host takes them back after ~2 s), as for the "
        "periodic saves of a training run",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.mb, args.leaves, args.spread)
        return 0
    results = run(
        args.mb,
        args.rounds,
        args.dir,
        log=lambda m: print(m, file=sys.stderr),
        leaves=args.leaves,
        spread=args.spread,
        pause=args.pause,
    )
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
