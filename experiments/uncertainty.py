"""Uncertainty on 8x8 digits: MAP, MC dropout, deep ensemble, Bayes by Backprop and
Flipout, each trained as C chains in one program, compared on one test split.

Model (one example of shape (1, 8, 8); batching is vmap):

    Conv 3x3 -> BatchNorm -> ReLU -> channel Dropout
    -> Conv 3x3 stride 2 -> BatchNorm -> ReLU -> channel Dropout -> flatten -> head

Channel dropout is `eqx_rng.nn.Dropout(p, broadcast_dims=(1, 2))` (whole feature
maps). Three heads, each trained as `--seeds` chains (`eqx_rng.ensemble` builds them,
`eqx_rng.vmap` trains them together with `make_train_step`):

- `linear`: an `eqx.nn.Linear` head. Gives MAP (inference mode), MC dropout
  (`eqx_rng.nn.mc_mode`: dropout on, BatchNorm on running statistics; T samples with
  `eqx_rng.vmap(..., in_axes=None, axis_size=T)`) and the deep ensemble (the mean of
  the chains' MAP predictions).
- `bayes`: `eqx_rng.nn.BayesLinear` (Bayes by Backprop: one weight sample per
  minibatch, drawn from `weight_key=`; loss = NLL + KL / N).
- `flipout`: `BayesLinear(flipout=True)`: the same shared weight draw, decorrelated
  per example by sign vectors drawn from each example's key.

Bayesian predictions average T samples under `mc_mode` (weights and dropout both
sampled). Metrics: accuracy, NLL, ECE (15 bins) and the mean predictive entropy on
right and wrong predictions, mean +- std over chains (the ensemble is one number).

    python experiments/uncertainty.py [--tiny] [--seed S] [--seeds C] [--out DIR]

Writes to `--out`: `metrics.jsonl`, `summary.json`, `learning_curves.png`,
`reliability.png`.
"""

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

import eqx_rng

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

HEADS = ("linear", "bayes", "flipout")
METHODS = ("MAP", "MC dropout", "deep ensemble", "Bayes by Backprop", "Flipout")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides the numbers a run produces (with the seed)."""

    chains: int = 4
    channels: int = 8
    dropout: float = 0.1
    bn_momentum: float = 0.9
    batch_size: int = 64
    steps: int = 400
    steps_per_call: int = 50
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    prior_std: float = 1.0
    mc_samples: int = 20
    ece_bins: int = 15

    @classmethod
    def tiny(cls) -> "Config":
        """A smoke configuration that runs in a few seconds."""
        return cls(
            chains=2,
            channels=2,
            batch_size=16,
            steps=20,
            steps_per_call=10,
            mc_samples=3,
        )


# ------------------------------------------------------------------------------ model


class CNN(eqx.Module):
    """A two-layer CNN trunk with BatchNorm and channel dropout, and a head."""

    conv1: eqx.nn.Conv2d
    norm1: eqx_rng.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx_rng.nn.BatchNorm
    dropout: eqx_rng.nn.Dropout
    head: eqx.nn.Linear | eqx_rng.nn.BayesLinear

    def __init__(self, cfg: Config, head: str, *, key: PRNGKeyArray):
        c = cfg.channels
        self.conv1 = eqx.nn.Conv2d(1, c, 3, padding=1, key=eqx_rng.derive(key, "conv1"))
        self.conv2 = eqx.nn.Conv2d(
            c, 2 * c, 3, stride=2, padding=1, key=eqx_rng.derive(key, "conv2")
        )
        self.norm1 = eqx_rng.nn.BatchNorm(c, momentum=cfg.bn_momentum)
        self.norm2 = eqx_rng.nn.BatchNorm(2 * c, momentum=cfg.bn_momentum)
        self.dropout = eqx_rng.nn.Dropout(cfg.dropout, broadcast_dims=(1, 2))
        features, head_key = 2 * c * 16, eqx_rng.derive(key, "head")
        if head == "linear":
            self.head = eqx.nn.Linear(features, 10, key=head_key)
        else:
            self.head = eqx_rng.nn.BayesLinear(
                features,
                10,
                key=head_key,
                prior_std=cfg.prior_std,
                flipout=head == "flipout",
            )

    def features(
        self, x: Float[Array, "1 8 8"], state: eqx.nn.State, *, key: Any
    ) -> tuple[Float[Array, " f"], eqx.nn.State]:
        """The trunk on one example; each dropout draw has its own name."""
        k1 = None if key is None else eqx_rng.derive(key, "drop1")
        k2 = None if key is None else eqx_rng.derive(key, "drop2")
        h, state = self.norm1(self.conv1(x), state)
        h = self.dropout(jax.nn.relu(h), key=k1)
        h, state = self.norm2(self.conv2(h), state)
        h = self.dropout(jax.nn.relu(h), key=k2)
        return h.ravel(), state

    def logits(self, feats: Array, *, key: Any, weight_key: Any) -> Array:
        """The head on a batch of features: one weight draw (`weight_key`) shared by
        the batch, per-example keys `derive(key, i)` (Flipout's signs)."""
        head = self.head
        if isinstance(head, eqx.nn.Linear):
            return jax.vmap(head)(feats)
        if key is None:  # inference mode: the mean weights
            return jax.vmap(lambda f: head(f))(feats)
        keys = eqx_rng.grid_keys(key, (feats.shape[0],))
        # weight_key is shared on purpose (one weight sample per minibatch): plain
        # jax.vmap, the per-example keys are explicit.
        return jax.vmap(lambda f, k: head(f, key=k, weight_key=weight_key))(feats, keys)


def batch_logits(
    model: CNN, state: eqx.nn.State, xs: Array, *, key: Any
) -> tuple[Array, eqx.nn.State]:
    """Logits of a batch: the trunk per example under `eqx_rng.vmap` (example `i`
    gets `derive(key, "trunk", i)`; BatchNorm pools over "batch"), then the head."""
    trunk_key = None if key is None else eqx_rng.derive(key, "trunk")
    head_key = None if key is None else eqx_rng.derive(key, "head")
    weight_key = None if key is None else eqx_rng.derive(key, "weights")
    feats, state = eqx_rng.vmap(model.features, axis_name="batch")(
        xs, state, key=trunk_key
    )
    return model.logits(feats, key=head_key, weight_key=weight_key), state


# -------------------------------------------------------------------------- programme


def make_program(cfg: Config, data: _common.Split, head: str) -> dict[str, Callable]:
    """Jitted `init(key) -> ts`, `advance(ts) -> (ts, metrics)` and
    `predict(ts, key) -> (MAP probs (C, m, k), sampled probs (C, T, m, k))`."""
    x_train = jnp.asarray(data.x_train).reshape(-1, 1, 8, 8)
    y_train = jnp.asarray(data.y_train)
    x_test = jnp.asarray(data.x_test).reshape(-1, 1, 8, 8)
    n_train = x_train.shape[0]
    steps_per_epoch = n_train // cfg.batch_size
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    optimizer = optax.adamw(schedule, weight_decay=cfg.weight_decay)

    def loss_fn(model: CNN, state: eqx.nn.State, batch: Any, *, key: Any) -> Any:
        xs, ys = batch
        logits, state = batch_logits(model, state, xs, key=key)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()
        kl = eqx_rng.nn.kl_divergence(model) / n_train
        loss = nll + kl
        return loss, (state, {"loss": loss, "nll": nll, "kl": kl})

    step = eqx_rng.make_train_step(
        loss_fn, optimizer, steps_per_call=cfg.steps_per_call
    )

    def init(key: PRNGKeyArray) -> Any:
        models, states = eqx_rng.ensemble(
            eqx.nn.make_with_state(CNN), eqx_rng.derive(key, "init", head), cfg.chains,
            cfg, head,
        )  # fmt: skip
        keys = eqx_rng.grid_keys(eqx_rng.derive(key, "train", head), (cfg.chains,))
        create = lambda m, s, k: eqx_rng.TrainState.create(m, optimizer, key=k, state=s)
        return eqx_rng.vmap(create)(models, states, keys)

    def advance_chain(ts: Any) -> Any:
        steps = ts.step + jnp.arange(cfg.steps_per_call)

        def indices(t: Any) -> Any:
            epoch, pos = t // steps_per_epoch, t % steps_per_epoch
            perm = jr.permutation(eqx_rng.derive(ts.key, "data", epoch), n_train)
            return jax.lax.dynamic_slice_in_dim(
                perm, pos * cfg.batch_size, cfg.batch_size
            )

        idx = jax.vmap(indices)(steps)
        return step(ts, (x_train[idx], y_train[idx]))

    def predict_chain(model: CNN, state: eqx.nn.State, *, key: Any) -> Any:
        det, _ = batch_logits(eqx.nn.inference_mode(model), state, x_test, key=None)
        mc = eqx_rng.nn.mc_mode(model)

        def one_sample(xs: Array, *, key: Any) -> Array:
            return jax.nn.softmax(batch_logits(mc, state, xs, key=key)[0])

        samples = eqx_rng.vmap(one_sample, in_axes=None, axis_size=cfg.mc_samples)(
            x_test, key=key
        )
        return jax.nn.softmax(det), samples

    predict_one = eqx.filter_jit(predict_chain)

    def predict(ts: Any, key: PRNGKeyArray) -> Any:
        # One chain at a time (compiled once): vmapping convolutions over chains
        # makes XLA's CPU compile slow, and evaluation does not need it. Chain c
        # samples with derive(key, c), as eqx_rng.vmap over chains would give it.
        outs = []
        for c in range(cfg.chains):
            model, state = jax.tree.map(
                lambda a, c=c: a[c] if eqx.is_array(a) else a, (ts.model, ts.state)
            )
            outs.append(predict_one(model, state, key=eqx_rng.derive(key, c)))
        return tuple(jnp.stack(parts) for parts in zip(*outs, strict=True))

    return {
        "init": eqx.filter_jit(init),
        "advance": eqx.filter_jit(eqx_rng.vmap(advance_chain)),
        "predict": predict,
    }


# ------------------------------------------------------------------------- evaluation


def method_metrics(
    probs: np.ndarray, labels: np.ndarray, bins: int
) -> dict[str, float]:
    """Accuracy, NLL, ECE and entropy on right/wrong predictions of `probs` (m, k)."""
    correct = np.argmax(probs, axis=-1) == labels
    ent = _common.entropy(probs)
    return {
        "accuracy": _common.accuracy(probs, labels),
        "nll": _common.nll(probs, labels),
        "ece": _common.expected_calibration_error(probs, labels, n_bins=bins),
        "entropy_right": float(ent[correct].mean()) if correct.any() else float("nan"),
        "entropy_wrong": float(ent[~correct].mean())
        if (~correct).any()
        else float("nan"),
    }


def evaluate(cfg: Config, preds: dict[str, Any], labels: np.ndarray) -> dict[str, Any]:
    """Per-method predictive probabilities (one array per chain) and metrics."""
    det, mc = preds["linear"]
    per_chain = {
        "MAP": list(det),
        "MC dropout": list(mc.mean(axis=1)),
        "deep ensemble": [det.mean(axis=0)],
        "Bayes by Backprop": list(preds["bayes"][1].mean(axis=1)),
        "Flipout": list(preds["flipout"][1].mean(axis=1)),
    }
    results: dict[str, Any] = {}
    for method, probs in per_chain.items():
        rows = [method_metrics(p, labels, cfg.ece_bins) for p in probs]
        results[method] = {
            name: _common.mean_std([r[name] for r in rows]) for name in rows[0]
        }
        results[method]["chains"] = len(probs)
    return {"methods": results, "_probs": per_chain}


def results_table(results: dict[str, Any]) -> str:
    headers = ["method", "chains", "accuracy", "NLL", "ECE", "H(right)", "H(wrong)"]
    rows = []
    for method, r in results["methods"].items():
        pm = lambda name, r=r: (
            f"{r[name][0]:.4f}"
            if r["chains"] == 1
            else f"{r[name][0]:.4f} +/- {r[name][1]:.4f}"
        )
        rows.append(
            [method, r["chains"], pm("accuracy"), pm("nll"), pm("ece"),
             pm("entropy_right"), pm("entropy_wrong")]
        )  # fmt: skip
    return _common.format_table(headers, rows)


def write_plots(
    out: Path,
    cfg: Config,
    log: list[dict[str, Any]],
    results: dict[str, Any],
    labels: np.ndarray,
    seed: int,
) -> None:
    panels = []
    for method, probs in results["_probs"].items():
        pooled = np.concatenate(probs)
        pooled_labels = np.tile(labels, len(probs))
        rel = _common.reliability(pooled, pooled_labels, n_bins=cfg.ece_bins)
        panels.append(
            (
                f"{method} ({len(probs)} pooled)" if len(probs) > 1 else method,
                rel,
                _common.accuracy(pooled, pooled_labels),
            )
        )
    _common.plot_reliability(
        out / "reliability.png",
        panels,
        title=f"uncertainty on digits: reliability per method ({cfg.ece_bins} bins, seed {seed})",
    )
    plot_losses(out, cfg, log)


def plot_losses(out: Path, cfg: Config, log: list[dict[str, Any]]) -> None:
    """Training NLL (solid) and KL / N (dashed) per head, mean over chains, one point
    per `steps_per_call` steps."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    k = cfg.steps_per_call
    for i, head in enumerate(HEADS):
        rows = [r for r in log if r["head"] == head]
        steps = np.array(sorted({r["step"] for r in rows}))
        blocks = len(steps) // k
        for name, style in (("nll", "-"), ("kl", "--")):
            per_step = {s: [] for s in steps.tolist()}
            for r in rows:
                per_step[r["step"]].append(r[name])
            means = np.array([np.mean(per_step[s]) for s in steps.tolist()])
            if name == "kl" and not means.any():
                continue
            label = f"{head}: {'NLL' if name == 'nll' else 'KL / N'}"
            ax.plot(
                steps[k - 1 : blocks * k : k],
                means[: blocks * k].reshape(blocks, k).mean(1),
                style,
                color=f"C{i}",
                marker="o",
                ms=3,
                label=label,
            )
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss terms (mean of {k} steps and the chains)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _common.finish(
        fig,
        out / "learning_curves.png",
        f"uncertainty: training NLL and KL / N, {cfg.chains} chains per head",
    )


# ------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uncertainty.py",
        description="MAP, MC dropout, deep ensemble, Bayes by Backprop and Flipout on 8x8 digits, each trained as C chains in one program.",
    )
    parser.add_argument(
        "--out",
        default="runs/uncertainty",
        help="output directory (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="base seed (default: %(default)s)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="chains per head (default: 4; 2 with --tiny)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="smoke configuration of a few seconds"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = Config.tiny() if args.tiny else Config()
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        cfg = dataclasses.replace(cfg, chains=args.seeds)
    try:
        out = _common.prepare_out_dir(args.out)
    except _common.UsageError as e:
        parser.error(str(e))
    return run(cfg, args.seed, out, show_progress=not args.no_progress)


def run(cfg: Config, seed: int, out: Path, *, show_progress: bool) -> int:
    key = eqx_rng.as_key(seed)
    data = _common.load_digits_split()
    labels = np.asarray(data.y_test)
    log = _common.JsonlLog(out / "metrics.jsonl")
    log.reset()
    start = time.perf_counter()
    print(
        f"uncertainty: {len(HEADS)} heads x {cfg.chains} chains x {cfg.steps} steps, seed {seed}"
    )
    bar = _common.progress(
        len(HEADS) * cfg.steps, "training", disable=not show_progress
    )
    preds = {}
    for head in HEADS:
        program = make_program(cfg, data, head)
        ts = program["init"](key)
        while int(ts.step[0]) < cfg.steps:
            ts, metrics = program["advance"](ts)
            metrics = jax.tree.map(np.asarray, metrics)
            step = int(ts.step[0])
            log.append(
                {"head": head, "step": step - cfg.steps_per_call + 1 + k, "chain": c,
                 "loss": float(metrics["loss"][c, k]), "nll": float(metrics["nll"][c, k]),
                 "kl": float(metrics["kl"][c, k])}
                for k in range(cfg.steps_per_call) for c in range(cfg.chains)
            )  # fmt: skip
            bar.set_postfix(
                {"head": head, "loss": f"{metrics['loss'][:, -1].mean():.3f}"},
                refresh=False,
            )
            bar.update(cfg.steps_per_call)
        det, sampled = program["predict"](ts, eqx_rng.derive(key, "predict", head))
        preds[head] = (np.asarray(det, np.float64), np.asarray(sampled, np.float64))
    bar.close()
    results = evaluate(cfg, preds, labels)
    wall = time.perf_counter() - start
    print()
    print(results_table(results))
    write_plots(out, cfg, log.read(), results, labels, seed)
    summary = {
        "experiment": "uncertainty",
        "config": _common.config_dict(cfg),
        "seed": seed,
        "results": results["methods"],
        "wall_time_s": wall,
        "git_commit": _common.git_commit(),
        "doctor": eqx_rng.debug.doctor(),
    }
    _common.write_json(out / "summary.json", summary)
    print(
        f"wall time {wall:.1f} s; wrote {out}/summary.json, metrics.jsonl, learning_curves.png, reliability.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
