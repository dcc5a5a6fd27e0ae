"""Helpers shared by the experiments: configs, output files, data, metrics, plots.

Nothing here draws random numbers: every experiment derives its keys itself, from
names and indices, with the public `eqx_rng` API.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import matplotlib as mpl

mpl.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eqx_rng  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_UMASK = os.umask(0)
os.umask(_UMASK)


class UsageError(Exception):
    """Bad input found before anything was written: the CLI prints it and exits 2."""


# ----------------------------------------------------------------------------- config


def config_dict(cfg: Any) -> dict[str, Any]:
    """A frozen-dataclass config as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any, **extra: Any) -> str:
    """A short, stable hash of a config (and extra run settings such as the seed)."""
    blob = json.dumps(
        {"config": config_dict(cfg), **extra}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable lines `name: a -> b` for the entries where two dicts differ."""
    lines = []
    for name in sorted(set(a) | set(b)):
        if a.get(name, "<missing>") != b.get(name, "<missing>"):
            lines.append(
                f"{name}: {a.get(name, '<missing>')!r} -> {b.get(name, '<missing>')!r}"
            )
    return lines


def git_commit() -> str | None:
    """`git rev-parse --short HEAD` of this repository (with `+dirty` when the tree
    has uncommitted changes), or `None` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


# -------------------------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    """An argparse type: an integer `>= 1`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def experiment_parser(
    prog: str | None,
    description: str,
    *,
    out: str,
    seed_help: str = "base seed (default: %(default)s)",
    seeds_help: str | None = None,
    out_help: str = "output directory (default: %(default)s)",
    tiny_help: str = "smoke configuration of a few seconds",
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """The flags every experiment takes: `--out` (default `out`), `--seed`, `--seeds
    N` (only with `seeds_help`) and `--tiny`. Add the script's own flags after."""
    parser = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    if seeds_help is not None:
        parser.add_argument(
            "--seeds", type=positive_int, default=None, metavar="N", help=seeds_help
        )
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    return parser


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    """The `--no-progress` flag (no progress bar)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def out_dir_or_exit(parser: argparse.ArgumentParser, path: str) -> Path:
    """`prepare_out_dir(path)`; on a `UsageError` the parser prints it and exits 2."""
    try:
        return prepare_out_dir(path)
    except UsageError as e:
        parser.error(str(e))


@contextlib.contextmanager
def compile_fast(enabled: bool) -> Iterator[None]:
    """With `enabled`, XLA skips most optimisations (`jax_disable_most_optimizations`)
    inside the block: smoke runs (`--tiny`) spend most of their time compiling.

    That setting is not part of JAX's compilation cache key, so on leaving the block
    the setting is restored and `jax.clear_caches()` drops what was compiled, so
    that no later computation in the process reuses a less-optimised executable.
    """
    if not enabled:
        yield
        return
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
        jax.clear_caches()


# ------------------------------------------------------------------------ output files


def prepare_out_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and check that files can be written there.

    Raises `UsageError` naming the directory and the reason when it cannot.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e}).") from e
    return out


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a temporary file in the same directory, then rename."""
    write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file, then `os.replace`)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "tolist"):  # jax arrays
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_summary(path: Path, fields: dict[str, Any]) -> None:
    """Write `fields` as JSON, followed by `git_commit` (see `git_commit`) and
    `doctor` (`eqx_rng.debug.doctor()`: versions and PRNG settings of the run)."""
    write_json(
        path,
        {**fields, "git_commit": git_commit(), "doctor": eqx_rng.debug.doctor()},
    )


class JsonlLog:
    """An append-only JSON-lines log, one record per line.

    `truncate_after(step)` drops records with `record["step"] > step`: a resumed run
    first rewinds its log to the checkpoint it continues from, so the log of a
    resumed run equals the log of an uninterrupted one.
    """

    def __init__(self, path: Path):
        self.path = path

    def reset(self) -> None:
        write_text(self.path, "")

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.read() if r["step"] <= step]
        write_text(self.path, "".join(_jsonl_line(r) for r in kept))

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        text = "".join(_jsonl_line(r) for r in records)
        with open(self.path, "a") as f:
            f.write(text)
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a crash: drop it and what follows
        return records


def _jsonl_line(record: dict[str, Any]) -> str:
    return json.dumps(record, default=_json_default, separators=(",", ":")) + "\n"


# ------------------------------------------------------------------------------- data


class Split(NamedTuple):
    """A train/test split; features standardised with the training statistics."""

    x_train: np.ndarray  # float32 (n_train, d)
    y_train: np.ndarray  # int32 (n_train,)
    x_test: np.ndarray  # float32 (n_test, d)
    y_test: np.ndarray  # int32 (n_test,)
    num_classes: int


def load_digits_split(*, test_fraction: float = 0.2, random_state: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), split 80/20.

    The split is stratified by class with a fixed `random_state`, independent of any
    experiment seed, so every run and every chain sees the same test set. Features
    are standardised with the training mean and standard deviation (pixels that are
    constant in the training set keep scale 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float64)  # pyright: ignore[reportAttributeAccessIssue]
    y = np.asarray(data.target, dtype=np.int32)  # pyright: ignore[reportAttributeAccessIssue]
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=random_state
    )
    x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    return Split(
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=np.asarray(y_train, np.int32),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=np.asarray(y_test, np.int32),
        num_classes=int(y.max()) + 1,
    )


# ---------------------------------------------------------------------------- metrics


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of argmax predictions equal to `labels`; `probs` is `(n, classes)`."""
    return float(np.mean(np.argmax(probs, axis=-1) == labels))


def nll(probs: np.ndarray, labels: np.ndarray, *, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of `labels` under predictive `probs`."""
    p = probs[np.arange(labels.shape[0]), labels]
    return float(-np.mean(np.log(np.maximum(p, eps))))


def entropy(probs: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Entropy (nats) of each predictive distribution along the last axis."""
    return -np.sum(probs * np.log(np.maximum(probs, eps)), axis=-1)


class Reliability(NamedTuple):
    """Per-bin statistics of a reliability diagram (equal-width confidence bins)."""

    edges: np.ndarray  # (n_bins + 1,)
    confidence: np.ndarray  # (n_bins,) mean confidence; NaN in empty bins
    accuracy: np.ndarray  # (n_bins,) accuracy; NaN in empty bins
    counts: np.ndarray  # (n_bins,) int
    ece: float


def reliability(
    probs: np.ndarray, labels: np.ndarray, *, n_bins: int = 15
) -> Reliability:
    """Confidence-binned accuracy and the expected calibration error.

    Confidence is the top predicted probability; bin `b` holds confidences in
    `(b / n_bins, (b + 1) / n_bins]` (bin 0 also takes 0). ECE is
    `sum_b (n_b / n) * |accuracy_b - confidence_b|` (Guo et al., 2017).
    """
    conf = np.max(probs, axis=-1)
    correct = (np.argmax(probs, axis=-1) == labels).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        mean_acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    n = max(int(count.sum()), 1)
    ece = float(np.sum(np.abs(acc_sum - conf_sum)) / n)
    return Reliability(
        np.linspace(0.0, 1.0, n_bins + 1), mean_conf, mean_acc, count, ece
    )


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, *, n_bins: int = 15
) -> float:
    """ECE with `n_bins` equal-width confidence bins; see `reliability`."""
    return reliability(probs, labels, n_bins=n_bins).ece


def mc_dropout_stats(mc_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Results of MC dropout from `T` stochastic passes, `mc_probs` of shape `(T, n, k)`.

    The predictive distribution is the mean over passes. Returns its accuracy, NLL,
    ECE and the mean predictive entropy over correctly and wrongly classified
    examples (a useful uncertainty is higher on the wrong ones; `nan` when there
    are none).
    """
    pred = mc_probs.mean(axis=0)
    correct = np.argmax(pred, axis=-1) == labels
    ent = entropy(pred)
    return {
        "accuracy": accuracy(pred, labels),
        "nll": nll(pred, labels),
        "ece": expected_calibration_error(pred, labels),
        "entropy_correct": float(ent[correct].mean()) if correct.any() else math.nan,
        "entropy_wrong": float(ent[~correct].mean()) if (~correct).any() else math.nan,
    }


def jackknife_se(values: Sequence[float] | np.ndarray) -> float:
    """The jackknife standard error from leave-one-out values `x_i`:
    `sqrt((n - 1) / n * sum_i (x_i - mean(x))**2)` (0 for fewer than two)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return 0.0
    return float(np.sqrt((v.size - 1) / v.size * np.sum((v - v.mean()) ** 2)))


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (`ddof=1`; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# ----------------------------------------------------------------------------- tables


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns; floats get 4 decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    numeric = [
        all(isinstance(row[i], int | float) or row[i] == "" for row in rows)
        for i in range(len(headers))
    ]
    numeric = [
        n or all(_looks_numeric(r[i]) for r in body) for i, n in enumerate(numeric)
    ]
    fmt = lambda r: "  ".join(
        c.rjust(w) if numeric[i] else c.ljust(w)
        for i, (c, w) in enumerate(zip(r, widths, strict=True))
    )
    return "\n".join(s.rstrip() for s in [fmt(headers), line, *(fmt(r) for r in body)])


def _looks_numeric(text: str) -> bool:
    head = text.split(" ")[0].lstrip("+-")
    return text == "" or head.replace(".", "", 1).isdigit() or head == "nan"


# ------------------------------------------------------------------------------ plots


def block_means(
    steps: np.ndarray, values: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Means of consecutive blocks of `k` entries along the last axis of `values`
    (an incomplete last block is dropped), and the last step of each block.

    Per-step training losses are too noisy to read; experiments plot one point per
    fused call of `k` steps.
    """
    blocks = values.shape[-1] // k
    means = values[..., : blocks * k].reshape(*values.shape[:-1], blocks, k).mean(-1)
    return steps[k - 1 : blocks * k : k], means


def plot_learning_curves(
    path: Path,
    *,
    train_steps: np.ndarray,
    train_loss: np.ndarray,
    eval_steps: np.ndarray,
    test_accuracy: np.ndarray,
    test_nll: np.ndarray,
    title: str,
) -> None:
    """Three panels (training loss, test accuracy, test NLL against the step), one
    thin line per chain plus the mean over chains in black.

    `train_loss` is `(chains, len(train_steps))`; `test_*` are `(chains,
    len(eval_steps))`.
    """
    chains = train_loss.shape[0]
    colours = plt.get_cmap("tab10" if chains <= 10 else "viridis")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = [
        (axes[0], train_steps, train_loss, "training loss (cross-entropy)", True),
        (axes[1], eval_steps, test_accuracy, "test accuracy", False),
        (axes[2], eval_steps, test_nll, "test NLL (nats)", True),
    ]
    for ax, steps, values, label, log in panels:
        for c in range(chains):
            colour = (
                colours(c % 10) if chains <= 10 else colours(c / max(chains - 1, 1))
            )
            ax.plot(
                steps, values[c], lw=0.9, alpha=0.75, color=colour, label=f"chain {c}"
            )
        ax.plot(
            steps, values.mean(axis=0), lw=2.0, color="black", label="mean over chains"
        )
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(
        max(0.0, float(np.nanmin(test_accuracy[:, len(eval_steps) // 4 :])) - 0.02)
        if len(eval_steps) > 3
        else 0.0,
        1.0,
    )
    handles, labels = axes[0].get_legend_handles_labels()
    if chains > 10:  # one entry per chain would swamp the plot
        handles, labels = handles[-1:], labels[-1:]
    axes[0].legend(
        handles, labels, fontsize=7, ncol=2 if chains > 4 else 1, loc="upper right"
    )
    finish(fig, path, title)


def plot_reliability(
    path: Path,
    panels: Sequence[tuple[str, Reliability, float]],
    *,
    title: str,
) -> None:
    """Reliability diagrams side by side: accuracy against confidence per bin (bars),
    the diagonal of perfect calibration, and the share of predictions per bin.

    `panels` holds `(name, reliability, accuracy)` triples.
    """
    fig, axes = plt.subplots(
        2,
        len(panels),
        figsize=(4.6 * len(panels), 5.6),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        sharex=True,
    )
    for j, (name, rel, acc) in enumerate(panels):
        ax, hist = axes[0, j], axes[1, j]
        width = rel.edges[1] - rel.edges[0]
        centres = rel.edges[:-1] + width / 2
        filled = rel.counts > 0
        bin_acc, bin_conf = rel.accuracy[filled], rel.confidence[filled]
        ax.bar(
            centres[filled],
            bin_acc,
            width=width * 0.95,
            color="tab:blue",
            alpha=0.8,
            edgecolor="black",
            lw=0.5,
            label="accuracy in bin",
        )
        ax.bar(
            centres[filled],
            np.abs(bin_conf - bin_acc),
            bottom=np.minimum(bin_acc, bin_conf),
            width=width * 0.95,
            facecolor=(1.0, 0.0, 0.0, 0.15),
            edgecolor="tab:red",
            hatch="//",
            lw=0.8,
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(
            f"{name}\naccuracy {acc:.3f}, ECE {rel.ece:.4f}, n = {int(rel.counts.sum())}"
        )
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        share = rel.counts / max(int(rel.counts.sum()), 1)
        hist.bar(
            centres, share, width=width * 0.95, color="grey", edgecolor="black", lw=0.5
        )
        hist.set_yscale("log")
        hist.set_ylim(1e-4, 1.5)
        hist.set_xlabel("confidence (top predicted probability)")
        hist.set_ylabel("share of predictions")
        hist.grid(alpha=0.3)
    finish(fig, path, title)


def finish(fig: Any, path: Path, title: str, *, dpi: int = 110) -> None:
    """Title, tight layout (much cheaper than constrained layout), save, close."""
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def progress(total: int, desc: str, *, initial: int = 0, disable: bool = False) -> Any:
    """A tqdm progress bar on stderr, counting training steps."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stderr,
        disable=disable,
    )
