"""Uncertainty on 8x8 digits: MAP, MC dropout, deep ensemble, Bayes by Backprop,
Flipout and SGLD, each trained as C chains in one program, compared on one test
split.

Model (one example of shape (1, 8, 8); batching is vmap):

    Conv 3x3 -> BatchNorm -> ReLU -> channel Dropout
    -> Conv 3x3 stride 2 -> BatchNorm -> ReLU -> channel Dropout -> flatten -> head

Channel dropout is `eqx_rng.nn.Dropout(p, broadcast_dims=(1, 2))` (whole feature
maps). Four heads, each trained as `--seeds` chains (`eqx_rng.ensemble` builds them,
`eqx_rng.vmap` trains them together with `make_train_step`):

- `linear`: an `eqx.nn.Linear` head. Gives MAP (inference mode), MC dropout
  (`eqx_rng.nn.mc_mode`: dropout on, BatchNorm on running statistics; T samples with
  `eqx_rng.vmap(..., in_axes=None, axis_size=T)`) and the deep ensemble (the mean of
  the chains' MAP predictions).
- `bayes`: `eqx_rng.nn.BayesLinear` (Bayes by Backprop: one weight sample per
  minibatch, its key passed to every example as `eqx_rng.shared(weight_key)`;
  loss = NLL + KL / N).
- `flipout`: `BayesLinear(flipout=True)`: the same shared weight draw, decorrelated
  per example by sign vectors drawn from each example's key.
- `sgld`: the network without dropout, sampled by `eqx_rng.optim.sgld` at
  temperature 1 (likelihood scaled to the N training examples, N(0, prior_std^2)
  prior) with the cyclical cosine step size of cSG-MCMC (Zhang et al. 2020); in the
  last `sgld_sample_steps` of each cycle one state every `sgld_thin` steps is kept
  and predicts in inference mode.

Bayesian predictions average T samples under `mc_mode` (weights and dropout both
sampled). Metrics: accuracy, NLL, ECE (15 bins) and the mean predictive entropy on
right and wrong predictions, mean +- std over chains; the pooled methods (deep
ensemble, SGLD over chains x samples) are one predictive distribution each, with
the jackknife standard error over chains.

    python experiments/uncertainty.py [--tiny] [--seed S] [--seeds C] [--temperature T]
        [--out DIR]

Writes to `--out`: `metrics.jsonl`, `summary.json`, `learning_curves.png`,
`reliability.png`.
"""

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

HEADS = ("linear", "bayes", "flipout", "sgld")
METHODS = (
    "MAP",
    "MC dropout",
    "deep ensemble",
    "Bayes by Backprop",
    "Flipout",
    "SGLD, one chain",
    "SGLD",
)


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
    # SGLD: cyclical cosine step size (cSG-MCMC, Zhang et al. 2020), `sgld_cycles`
    # cycles of `sgld_cycle_steps`; in the last `sgld_sample_steps` of each cycle
    # one posterior sample every `sgld_thin` steps.
    sgld_cycles: int = 4
    sgld_cycle_steps: int = 500
    sgld_sample_steps: int = 100
    sgld_thin: int = 25
    sgld_lr: float = 0.1  # peak step on the minibatch mean loss; eps0 = 2 lr / N
    temperature: float = 1.0  # 1: the Bayes posterior (no cold posterior)
    fast_compile: bool = False  # XLA without most optimisations (smoke runs only)

    @classmethod
    def tiny(cls) -> "Config":
        """A smoke configuration that runs in a few seconds (after compiling)."""
        return cls(
            chains=2, channels=2, batch_size=16, steps=10, steps_per_call=5,
            mc_samples=2, sgld_cycles=2, sgld_cycle_steps=10, sgld_sample_steps=10,
            sgld_thin=5, fast_compile=True,
        )  # fmt: skip

    @property
    def sgld_steps(self) -> int:
        return self.sgld_cycles * self.sgld_cycle_steps

    @property
    def sgld_samples(self) -> int:
        """Posterior samples per chain."""
        return self.sgld_cycles * (self.sgld_sample_steps // self.sgld_thin)

    def validate(self) -> None:
        """Raise `UsageError` for a configuration that cannot run."""
        problems = []
        if self.steps % self.steps_per_call:
            problems.append(
                f"steps={self.steps} must be a multiple of steps_per_call={self.steps_per_call}"
            )
        if not 0 < self.sgld_sample_steps <= self.sgld_cycle_steps:
            problems.append(
                f"sgld_sample_steps={self.sgld_sample_steps} must be in [1, sgld_cycle_steps={self.sgld_cycle_steps}]"
            )
        for name in ("sgld_cycle_steps", "sgld_sample_steps"):
            if getattr(self, name) % self.sgld_thin:
                problems.append(
                    f"{name}={getattr(self, name)} must be a multiple of sgld_thin={self.sgld_thin}"
                )
        if not self.temperature >= 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if problems:
            raise _common.UsageError("; ".join(problems) + ".")


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
        # SGLD samples the posterior of the network without dropout.
        p = 0.0 if head == "sgld" else cfg.dropout
        self.dropout = eqx_rng.nn.Dropout(p, broadcast_dims=(1, 2))
        features, head_key = 2 * c * 16, eqx_rng.derive(key, "head")
        if head in ("linear", "sgld"):
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
        # One weight sample per minibatch: `weight_key` is shared by every example on
        # purpose (`eqx_rng.shared`), while `key=` gives example i `derive(key, i)`.
        sample = lambda f, wk, *, key: head(f, key=key, weight_key=wk)
        return eqx_rng.vmap(sample)(feats, eqx_rng.shared(weight_key), key=key)


def neg_log_prior(model: CNN, prior_std: float) -> Array:
    """`-log p(theta)` up to a constant: an isotropic Gaussian `N(0, prior_std**2)` on
    every weight, bias and BatchNorm affine parameter (not the dropout rate)."""
    params = (model.conv1, model.conv2, model.norm1, model.norm2, model.head)
    leaves = jax.tree.leaves(eqx.filter(params, eqx.is_inexact_array))
    return sum((jnp.sum(leaf**2) for leaf in leaves), jnp.zeros(())) / (
        2 * prior_std**2
    )


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


def sgld_schedule(cfg: Config, num_data: int) -> Callable[[Any], Any]:
    """The cyclical cosine step size of cSG-MCMC (Zhang et al. 2020, eq. 1):
    `eps(t) = eps0 / 2 * (cos(pi * (t mod L) / L) + 1)`, `L = sgld_cycle_steps`.

    `eps0 = 2 * sgld_lr / num_data`: `eqx_rng.optim.sgld` moves by
    `(eps / 2) * num_data` times the gradient of the minibatch mean loss, so the
    first step of a cycle is a gradient step of size `sgld_lr` on that loss (plus
    noise of standard deviation `sqrt(eps0 * temperature)`).
    """
    eps0 = 2.0 * cfg.sgld_lr / num_data
    length = cfg.sgld_cycle_steps

    def schedule(t: Any) -> Any:
        position = jnp.asarray(t % length, jnp.float32) / length  # in [0, 1)
        return 0.5 * eps0 * (jnp.cos(jnp.pi * position) + 1.0)

    return schedule


def is_sample_step(cfg: Config, step: int) -> bool:
    """Whether SGLD keeps the state after `step` steps: in the sampling stage (the
    last `sgld_sample_steps` of a cycle), every `sgld_thin` steps."""
    position = (step - 1) % cfg.sgld_cycle_steps + 1  # 1 .. L within the cycle
    in_stage = position > cfg.sgld_cycle_steps - cfg.sgld_sample_steps
    return in_stage and step % cfg.sgld_thin == 0


def make_optimizer(cfg: Config, head: str, n_train: int) -> tuple[Any, int, int]:
    """The optimizer of `head`, its number of steps and steps per call."""
    if head == "sgld":
        # The tempered posterior p(theta | D)^(1 / T): likelihood scaled by the data
        # size N (the loss is a per-example mean), prior N(0, prior_std^2).
        optimizer = eqx_rng.optim.sgld(
            sgld_schedule(cfg, n_train), temperature=cfg.temperature, num_data=n_train
        )
        return optimizer, cfg.sgld_steps, cfg.sgld_thin
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    optimizer = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    return optimizer, cfg.steps, cfg.steps_per_call


def make_predictors(cfg: Config, x_test: Array) -> tuple[Callable, Callable]:
    """`predict(ts, key) -> (MAP probs (C, m, k), sampled probs (C, T, m, k))` and
    `predict_map(ts) -> (C, m, k)` on `x_test`, for chain-batched `ts`."""

    @eqx.filter_jit
    def map_probs(model: CNN, state: eqx.nn.State) -> Array:
        det, _ = batch_logits(eqx.nn.inference_mode(model), state, x_test, key=None)
        return jax.nn.softmax(det)

    @eqx.filter_jit
    def mc_probs(model: CNN, state: eqx.nn.State, *, key: Any) -> Array:
        mc = eqx_rng.nn.mc_mode(model)

        def one_sample(xs: Array, *, key: Any) -> Array:
            return jax.nn.softmax(batch_logits(mc, state, xs, key=key)[0])

        return eqx_rng.vmap(one_sample, in_axes=None, axis_size=cfg.mc_samples)(
            x_test, key=key
        )

    # Evaluation runs one chain at a time (each function compiled once): vmapping
    # convolutions over chains makes XLA's CPU compile slow, and evaluation does not
    # need it. Chain c samples with derive(key, c), as eqx_rng.vmap over chains
    # would give it.
    def chains(ts: Any) -> list[tuple[CNN, eqx.nn.State]]:
        pick = lambda c: jax.tree.map(
            lambda a: a[c] if eqx.is_array(a) else a, (ts.model, ts.state)
        )
        return [pick(c) for c in range(cfg.chains)]

    def predict_map(ts: Any) -> Array:
        return jnp.stack([map_probs(m, s) for m, s in chains(ts)])

    def predict(ts: Any, key: PRNGKeyArray) -> Any:
        sampled = [
            mc_probs(m, s, key=eqx_rng.derive(key, c))
            for c, (m, s) in enumerate(chains(ts))
        ]
        return predict_map(ts), jnp.stack(sampled)

    return predict, predict_map


def make_program(cfg: Config, data: _common.Split, head: str) -> dict[str, Any]:
    """Jitted `init(key) -> ts` and `advance(ts) -> (ts, metrics)` for the C chains
    of `head`, `predict(ts, key) -> (MAP probs (C, m, k), sampled probs (C, T, m,
    k))`, `predict_map(ts) -> (C, m, k)`, and the run's `steps` and
    `steps_per_call`."""
    x_train = jnp.asarray(data.x_train).reshape(-1, 1, 8, 8)
    y_train = jnp.asarray(data.y_train)
    x_test = jnp.asarray(data.x_test).reshape(-1, 1, 8, 8)
    n_train = x_train.shape[0]
    steps_per_epoch = n_train // cfg.batch_size
    optimizer, total, per_call = make_optimizer(cfg, head, n_train)

    def loss_fn(model: CNN, state: eqx.nn.State, batch: Any, *, key: Any) -> Any:
        xs, ys = batch
        logits, state = batch_logits(model, state, xs, key=key)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()
        kl = eqx_rng.nn.kl_divergence(model) / n_train
        loss = nll + kl
        if head == "sgld":  # the negative log joint per example
            loss = loss + neg_log_prior(model, cfg.prior_std) / n_train
        return loss, (state, {"loss": loss, "nll": nll, "kl": kl})

    step = eqx_rng.make_train_step(loss_fn, optimizer, steps_per_call=per_call)

    def init(key: PRNGKeyArray) -> Any:
        models, states = eqx_rng.ensemble(
            eqx.nn.make_with_state(CNN), eqx_rng.derive(key, "init", head), cfg.chains,
            cfg, head,
        )  # fmt: skip
        keys = eqx_rng.grid_keys(eqx_rng.derive(key, "train", head), (cfg.chains,))
        create = lambda m, s, k: eqx_rng.TrainState.create(m, optimizer, key=k, state=s)
        return eqx_rng.vmap(create)(models, states, keys)

    def advance_chain(ts: Any) -> Any:
        steps = ts.step + jnp.arange(per_call)

        def indices(t: Any) -> Any:
            epoch, pos = t // steps_per_epoch, t % steps_per_epoch
            perm = jr.permutation(eqx_rng.derive(ts.key, "data", epoch), n_train)
            return jax.lax.dynamic_slice_in_dim(
                perm, pos * cfg.batch_size, cfg.batch_size
            )

        idx = jax.vmap(indices)(steps)
        return step(ts, (x_train[idx], y_train[idx]))

    predict, predict_map = make_predictors(cfg, x_test)
    return {
        "init": eqx.filter_jit(init),
        "advance": eqx.filter_jit(eqx_rng.vmap(advance_chain)),
        "predict": predict,
        "predict_map": predict_map,
        "steps": total,
        "steps_per_call": per_call,
    }


def train_head(
    cfg: Config,
    data: _common.Split,
    head: str,
    key: PRNGKeyArray,
    on_chunk: Callable[[str, int, dict[str, np.ndarray]], None],
) -> Any:
    """Train the C chains of `head`; return `(MAP probs, sampled probs)` for the
    adamw heads and, for SGLD, each chain's mean over its posterior samples."""
    program = make_program(cfg, data, head)
    ts = program["init"](key)
    sample_sum, samples = np.zeros(()), 0
    while int(ts.step[0]) < program["steps"]:
        ts, metrics = program["advance"](ts)
        step = int(ts.step[0])
        on_chunk(head, step, jax.tree.map(np.asarray, metrics))
        if head == "sgld" and is_sample_step(cfg, step):
            sample_sum = sample_sum + np.asarray(program["predict_map"](ts), np.float64)
            samples += 1
    if head == "sgld":
        return sample_sum / samples
    det, sampled = program["predict"](ts, eqx_rng.derive(key, "predict", head))
    return np.asarray(det, np.float64), np.asarray(sampled, np.float64)


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
    """Metrics per method, and the predictive probabilities behind them.

    A per-chain method is scored on each chain's predictive distribution: mean and
    standard deviation over chains. A pooled method (deep ensemble, SGLD) averages
    the chains' predictive distributions into one and is scored once; its spread is
    the jackknife standard error over chains (leave one chain out, re-pool, re-score).
    """
    det, mc = preds["linear"]
    sgld, s = preds["sgld"], cfg.sgld_samples
    methods = {  # name: (per-chain predictive probs (C, m, k), pooled, networks)
        "MAP": (det, False, 1),
        "MC dropout": (mc.mean(axis=1), False, cfg.mc_samples),
        "deep ensemble": (det, True, cfg.chains),
        "Bayes by Backprop": (preds["bayes"][1].mean(axis=1), False, cfg.mc_samples),
        "Flipout": (preds["flipout"][1].mean(axis=1), False, cfg.mc_samples),
        "SGLD, one chain": (sgld, False, s),
        "SGLD": (sgld, True, cfg.chains * s),
    }
    results: dict[str, Any] = {}
    plotted: dict[str, list[np.ndarray]] = {}
    score = lambda p: method_metrics(p, labels, cfg.ece_bins)
    for method, (probs, pooled, networks) in methods.items():
        r: dict[str, Any]
        if pooled:
            row = score(probs.mean(axis=0))
            loo = [score(np.delete(probs, c, axis=0).mean(axis=0)) for c in range(len(probs))]  # fmt: skip
            r = {n: (v, _common.jackknife_se([x[n] for x in loo])) for n, v in row.items()}  # fmt: skip
            r.update(chains=1, spread="jackknife s.e. over chains")
            plotted[method] = [probs.mean(axis=0)]
        else:
            rows = [score(p) for p in probs]
            r = {n: _common.mean_std([x[n] for x in rows]) for n in rows[0]}
            r.update(chains=len(probs), spread="std over chains")
            plotted[method] = list(probs)
        results[method] = {**r, "networks": networks}
    return {"methods": results, "_probs": plotted}


def results_table(results: dict[str, Any]) -> str:
    headers = ["method", "chains", "networks", "accuracy", "NLL", "ECE", "H(right)", "H(wrong)"]  # fmt: skip
    rows = []
    for method, r in results["methods"].items():
        pm = lambda name, r=r: f"{r[name][0]:.4f} +/- {r[name][1]:.4f}"
        rows.append(
            [method, r["chains"], r["networks"], pm("accuracy"), pm("nll"), pm("ece"),
             pm("entropy_right"), pm("entropy_wrong")]
        )  # fmt: skip
    return _common.format_table(headers, rows)


TABLE_NOTE = (
    "+/-: std over chains; for the pooled rows (deep ensemble, SGLD) the jackknife "
    "standard error over chains. networks: predictions averaged per predictive "
    "distribution."
)


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
    """Training NLL (solid) and the regulariser per example (dashed: KL / N for the
    Bayesian heads, `-log p(theta) / N` for SGLD) per head, mean over chains, one
    point per fused call of steps."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    terms = {
        "NLL": lambda r: r["nll"],
        "KL / N": lambda r: r["kl"],
        "-log prior / N": lambda r: r["loss"] - r["nll"] - r["kl"],
    }
    for i, head in enumerate(HEADS):
        k = cfg.sgld_thin if head == "sgld" else cfg.steps_per_call
        rows = [r for r in log if r["head"] == head]
        steps = np.array(sorted({r["step"] for r in rows}))
        shown = ("NLL", "-log prior / N" if head == "sgld" else "KL / N")
        for name, style in zip(shown, ("-", "--"), strict=True):
            per_step = {s: [] for s in steps.tolist()}
            for r in rows:
                per_step[r["step"]].append(terms[name](r))
            means = np.array([np.mean(per_step[s]) for s in steps.tolist()])
            if not means.any():
                continue
            ax.plot(
                *_common.block_means(steps, means, k),
                style,
                color=f"C{i}",
                marker="o",
                ms=3,
                label=f"{head}: {name}",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss terms (mean of a call's steps and the chains)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _common.finish(
        fig,
        out / "learning_curves.png",
        f"uncertainty: training NLL and regulariser, {cfg.chains} chains per head",
    )


# ------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = _common.experiment_parser(
        "uncertainty.py",
        "MAP, MC dropout, deep ensemble, Bayes by Backprop, Flipout and SGLD on 8x8 digits, each trained as C chains in one program.",
        out="runs/uncertainty",
        seeds_help="chains per head (default: 4; 2 with --tiny)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="SGLD's posterior temperature (default: 1, the Bayes posterior; < 1 is a cold posterior)",
    )
    _common.add_no_progress(parser)
    args = parser.parse_args(argv)
    cfg = Config.tiny() if args.tiny else Config()
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, chains=args.seeds)
    if args.temperature is not None:
        cfg = dataclasses.replace(cfg, temperature=args.temperature)
    try:
        cfg.validate()
    except _common.UsageError as e:
        parser.error(str(e))
    out = _common.out_dir_or_exit(parser, args.out)
    with _common.compile_fast(cfg.fast_compile):
        return run(cfg, args.seed, out, show_progress=not args.no_progress)


def run(cfg: Config, seed: int, out: Path, *, show_progress: bool) -> int:
    key = eqx_rng.as_key(seed)
    data = _common.load_digits_split()
    labels = np.asarray(data.y_test)
    log = _common.JsonlLog(out / "metrics.jsonl")
    log.reset()
    start = time.perf_counter()
    print(
        f"uncertainty: {len(HEADS)} heads x {cfg.chains} chains, {cfg.steps} steps "
        f"(SGLD {cfg.sgld_steps}, {cfg.sgld_samples} samples per chain), seed {seed}"
    )
    total = (len(HEADS) - 1) * cfg.steps + cfg.sgld_steps
    bar = _common.progress(total, "training", disable=not show_progress)

    def on_chunk(head: str, step: int, metrics: dict[str, np.ndarray]) -> None:
        n = metrics["loss"].shape[1]
        log.append(
            {"head": head, "step": step - n + 1 + k, "chain": c,
             "loss": float(metrics["loss"][c, k]), "nll": float(metrics["nll"][c, k]),
             "kl": float(metrics["kl"][c, k])}
            for k in range(n) for c in range(cfg.chains)
        )  # fmt: skip
        loss = f"{metrics['loss'][:, -1].mean():.3f}"
        bar.set_postfix({"head": head, "loss": loss}, refresh=False)
        bar.update(n)

    preds = {head: train_head(cfg, data, head, key, on_chunk) for head in HEADS}
    bar.close()
    results = evaluate(cfg, preds, labels)
    wall = time.perf_counter() - start
    print()
    print(results_table(results))
    print(TABLE_NOTE)
    write_plots(out, cfg, log.read(), results, labels, seed)
    _common.write_summary(
        out / "summary.json",
        {
            "experiment": "uncertainty",
            "config": _common.config_dict(cfg),
            "seed": seed,
            "results": results["methods"],
            "wall_time_s": wall,
        },
    )
    print(
        f"wall time {wall:.1f} s; wrote {out}/summary.json, metrics.jsonl, learning_curves.png, reliability.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
