"""The main job: a stochastic MLP trained as C seeds at once on 8x8 digits.

Model (one example; batching is vmap):

    Linear -> BatchNorm -> ReLU -> Dropout -> GaussianNoise   (twice)
    -> Linear

on scikit-learn's bundled `load_digits` (1797 images, no download), with a fixed,
stratified 80/20 split (independent of `--seed`) and standardised features.

All C chains train together in one jitted program: `eqx_rng.vmap` over chains
(each chain its own `TrainState`: parameters, BatchNorm statistics, optimiser state
and key), and inside it `eqx_rng.vmap(..., axis_name="batch")` over the minibatch, so
BatchNorm averages over the batch of its own chain only. Keys are never split by
call order: the draws of example `b` at step `t` of chain `c` come from
`derive(derive(chain_key[c], t), b)`, names below that; chain `c`'s minibatch order
in epoch `e` is a permutation keyed by `derive(chain_key[c], "data", e)`. A chain's
random draws (initialisation, data order, dropout masks, noise) therefore do not
depend on how many chains run beside it; its arithmetic agrees to float rounding
only (XLA may pick other kernels for another number of chains, and training
amplifies last-bit differences). Steps are fused `steps_per_call` at a time
(`make_train_step(..., steps_per_call=K)`).

After training: per-chain test accuracy, NLL and expected calibration error (15
bins) in inference mode; MC dropout (T stochastic passes with dropout and noise on,
BatchNorm on its running statistics): accuracy and the mean predictive entropy of
right and wrong predictions; and the ensemble of all chains.

    python experiments/digits.py [--tiny] [--seed S] [--seeds C] [--out DIR] [--resume]

Writes to `--out`: `metrics.jsonl` (per step and chain), `summary.json`,
`learning_curves.png`, `reliability.png` and `checkpoints/`.
"""

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

import eqx_rng

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

CHECKPOINT_DIR = "checkpoints"
OUTPUT_FILES = (
    "metrics.jsonl",
    "summary.json",
    "learning_curves.png",
    "reliability.png",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides the numbers a run produces (with the seed)."""

    chains: int = 8
    hidden: int = 128
    dropout: float = 0.2
    noise_std: float = 0.1
    bn_momentum: float = 0.95
    batch_size: int = 64
    steps: int = 1_500
    steps_per_call: int = 50  # K steps fused into one dispatch
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    eval_every: int = 100  # steps between test evaluations (learning curves)
    checkpoint_every: int = 500
    mc_samples: int = 50  # T stochastic passes for MC dropout
    ece_bins: int = 15

    @classmethod
    def tiny(cls) -> "Config":
        """A smoke configuration that runs in a few seconds."""
        return cls(
            chains=2,
            hidden=32,
            batch_size=32,
            steps=60,
            steps_per_call=10,
            eval_every=20,
            checkpoint_every=20,
            mc_samples=4,
        )

    def validate(self) -> None:
        """Raise `UsageError` for a configuration that cannot run."""
        problems = []
        if self.chains < 1:
            problems.append(f"--seeds (chains) must be >= 1, got {self.chains}")
        for name in (
            "hidden",
            "batch_size",
            "steps",
            "steps_per_call",
            "mc_samples",
            "ece_bins",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "steps"):
            value = getattr(self, name)
            if self.steps_per_call >= 1 and value % self.steps_per_call:
                problems.append(
                    f"{name}={value} must be a multiple of steps_per_call={self.steps_per_call}"
                )
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.noise_std < 0:
            problems.append(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0 <= self.bn_momentum < 1:
            problems.append(f"bn_momentum must be in [0, 1), got {self.bn_momentum}")
        if problems:
            raise _common.UsageError("; ".join(problems) + ".")


# ------------------------------------------------------------------------------ model


class Block(eqx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> GaussianNoise, on one example."""

    linear: eqx.nn.Linear
    norm: eqx_rng.nn.BatchNorm
    dropout: eqx_rng.nn.Dropout
    noise: eqx_rng.nn.GaussianNoise

    def __init__(self, cfg: Config, in_features: int, *, key: PRNGKeyArray):
        self.linear = eqx.nn.Linear(in_features, cfg.hidden, key=key)
        self.norm = eqx_rng.nn.BatchNorm(
            cfg.hidden, axis_name="batch", momentum=cfg.bn_momentum
        )
        self.dropout = eqx_rng.nn.Dropout(cfg.dropout)
        self.noise = eqx_rng.nn.GaussianNoise(cfg.noise_std)

    def __call__(
        self,
        x: Float[Array, " d"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None,
        stochastic: bool,
        batch_stats: bool,
    ) -> tuple[Float[Array, " h"], eqx.nn.State]:
        x, state = self.norm(self.linear(x), state, inference=not batch_stats)
        x = jax.nn.relu(x)
        # Each draw has a name: never "the next key in the split".
        drop_key = None if key is None else eqx_rng.derive(key, "dropout")
        noise_key = None if key is None else eqx_rng.derive(key, "noise")
        x = self.dropout(x, key=drop_key, inference=not stochastic)
        x = self.noise(x, key=noise_key, inference=not stochastic)
        return x, state


class StochasticMLP(eqx.Module):
    """Two stochastic blocks and a linear read-out.

    Modes: training (`stochastic=True, batch_stats=True`: dropout and noise on,
    BatchNorm on this batch's statistics, which needs the `"batch"` axis bound);
    inference (`False, False`); MC dropout (`True, False`: dropout and noise on,
    BatchNorm on its running statistics, no batch axis needed).
    """

    blocks: tuple[Block, Block]
    head: eqx.nn.Linear

    def __init__(
        self, cfg: Config, in_features: int, num_classes: int, *, key: PRNGKeyArray
    ):
        self.blocks = (
            Block(cfg, in_features, key=eqx_rng.derive(key, "block", 0)),
            Block(cfg, cfg.hidden, key=eqx_rng.derive(key, "block", 1)),
        )
        self.head = eqx.nn.Linear(
            cfg.hidden, num_classes, key=eqx_rng.derive(key, "head")
        )

    def __call__(
        self,
        x: Float[Array, " d"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        stochastic: bool = True,
        batch_stats: bool = True,
    ) -> tuple[Float[Array, " k"], eqx.nn.State]:
        for i, block in enumerate(self.blocks):
            block_key = None if key is None else eqx_rng.derive(key, "block", i)
            x, state = block(
                x, state, key=block_key, stochastic=stochastic, batch_stats=batch_stats
            )
        return self.head(x), state


# -------------------------------------------------------------------------- programme


class Data(NamedTuple):
    x_train: Float[Array, "n d"]
    y_train: Int[Array, " n"]
    x_test: Float[Array, "m d"]
    y_test: Int[Array, " m"]
    num_classes: int


def load_data() -> Data:
    split = _common.load_digits_split()
    return Data(
        jnp.asarray(split.x_train),
        jnp.asarray(split.y_train),
        jnp.asarray(split.x_test),
        jnp.asarray(split.y_test),
        split.num_classes,
    )


class Program(NamedTuple):
    """The jitted pieces of a run; `train` and `main` drive them."""

    init: Callable[[PRNGKeyArray], Any]  # key -> chain-batched TrainState
    advance: Callable[[Any], tuple[Any, dict[str, Array]]]  # ts -> (ts, metrics (C, K))
    test_eval: Callable[[Any], dict[str, Array]]  # ts -> {"accuracy", "nll"} (C,)
    predict: Callable[
        [Any, PRNGKeyArray], tuple[Array, Array]
    ]  # -> probs (C, m, k), MC probs (C, T, m, k)


def make_program(cfg: Config, data: Data) -> Program:
    """Build the jitted init / K-step / evaluation functions for `cfg`."""
    n_train, in_features = data.x_train.shape
    steps_per_epoch = n_train // cfg.batch_size
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    optimizer = optax.adamw(schedule, weight_decay=cfg.weight_decay)

    def loss_fn(
        model: StochasticMLP, state: eqx.nn.State, batch: Any, *, key: PRNGKeyArray
    ) -> Any:
        x, y = batch

        def per_example(
            x: Any, y: Any, state: eqx.nn.State, *, key: PRNGKeyArray
        ) -> Any:
            logits, state = model(x, state, key=key)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return loss, jnp.argmax(logits) == y, state

        # Inner axis: the minibatch. Example b gets derive(key, b); BatchNorm's
        # statistics are averaged over "batch", i.e. within this chain only; the
        # State is threaded unmapped automatically.
        losses, correct, state = eqx_rng.vmap(per_example, axis_name="batch")(
            x, y, state, key=key
        )
        loss = jnp.mean(losses)
        return loss, (state, {"loss": loss, "accuracy": jnp.mean(correct)})

    train_step = eqx_rng.make_train_step(
        loss_fn, optimizer, steps_per_call=cfg.steps_per_call
    )

    def init(key: PRNGKeyArray) -> Any:
        # One vectorised build of all chains; chain c is made from derive(init_key, c)
        # and does not depend on how many chains there are.
        models, states = eqx_rng.ensemble(
            eqx.nn.make_with_state(StochasticMLP),
            eqx_rng.derive(key, "init"),
            cfg.chains,
            cfg,
            in_features,
            data.num_classes,
        )
        chain_keys = eqx_rng.grid_keys(eqx_rng.derive(key, "train"), (cfg.chains,))
        make_ts = lambda model, state, chain_key: eqx_rng.TrainState.create(
            model, optimizer, key=chain_key, state=state
        )
        return eqx_rng.vmap(make_ts)(models, states, chain_keys)

    def chain_batches(ts: Any, x_train: Any, y_train: Any) -> Any:
        """This chain's next K minibatches, a pure function of (chain key, step)."""
        steps = ts.step + jnp.arange(cfg.steps_per_call)

        def indices(step: Any) -> Any:
            epoch, pos = step // steps_per_epoch, step % steps_per_epoch
            perm = jr.permutation(eqx_rng.derive(ts.key, "data", epoch), n_train)
            return jax.lax.dynamic_slice_in_dim(
                perm, pos * cfg.batch_size, cfg.batch_size
            )

        idx = jax.vmap(indices)(steps)  # (K, B)
        return x_train[idx], y_train[idx]

    def advance_chain(ts: Any, x_train: Any, y_train: Any) -> Any:
        return train_step(ts, chain_batches(ts, x_train, y_train))

    # Outer axis: the chains. Everything per chain (parameters, BatchNorm state,
    # optimiser state, key, step) has a leading chain axis; the data does not.
    advance_all = eqx_rng.vmap(advance_chain, in_axes=(eqx.if_array(0), None, None))

    @eqx.filter_jit
    def advance(ts: Any) -> Any:
        return advance_all(ts, data.x_train, data.y_train)

    def chain_logits(model: StochasticMLP, state: eqx.nn.State, x: Any) -> Any:
        model = eqx.nn.inference_mode(model)
        return jax.vmap(
            lambda xi: model(xi, state, stochastic=False, batch_stats=False)[0]
        )(x)

    @eqx.filter_jit
    def test_eval(ts: Any) -> Any:
        logits = eqx_rng.vmap(
            chain_logits, in_axes=(eqx.if_array(0), eqx.if_array(0), None)
        )(ts.model, ts.state, data.x_test)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.mean(
            jnp.take_along_axis(logp, data.y_test[None, :, None], axis=-1), axis=(1, 2)
        )
        acc = jnp.mean(jnp.argmax(logits, axis=-1) == data.y_test[None], axis=1)
        return {"accuracy": acc, "nll": nll}

    def chain_mc(
        model: StochasticMLP, state: eqx.nn.State, x: Any, *, key: PRNGKeyArray
    ) -> Any:
        # T passes x m examples: a 2-D grid of keys, keys[t, i] = derive(key, t, i).
        keys = eqx_rng.grid_keys(key, (cfg.mc_samples, x.shape[0]))
        one = lambda xi, k: model(xi, state, key=k, stochastic=True, batch_stats=False)[
            0
        ]
        return jax.nn.softmax(
            jax.vmap(jax.vmap(one))(
                jnp.broadcast_to(x, (cfg.mc_samples, *x.shape)), keys
            )
        )

    @eqx.filter_jit
    def predict(ts: Any, key: PRNGKeyArray) -> Any:
        logits = eqx_rng.vmap(
            chain_logits, in_axes=(eqx.if_array(0), eqx.if_array(0), None)
        )(ts.model, ts.state, data.x_test)
        mc = eqx_rng.vmap(chain_mc, in_axes=(eqx.if_array(0), eqx.if_array(0), None))(
            ts.model, ts.state, data.x_test, key=key
        )
        return jax.nn.softmax(logits), mc

    return Program(
        init=eqx.filter_jit(init), advance=advance, test_eval=test_eval, predict=predict
    )


def fit(
    program: Program,
    cfg: Config,
    ts: Any,
    *,
    stop: int | None = None,
    on_chunk: Callable[[Any, dict[str, np.ndarray]], None] | None = None,
) -> Any:
    """Advance `ts` in chunks of `steps_per_call` until step `stop` (default
    `cfg.steps`); `on_chunk(ts, metrics)` is called after every chunk."""
    stop = cfg.steps if stop is None else min(stop, cfg.steps)
    while int(ts.step[0]) < stop:
        ts, metrics = program.advance(ts)
        if on_chunk is not None:
            on_chunk(ts, jax.tree.map(np.asarray, metrics))
    return ts


def evaluate(
    program: Program, cfg: Config, data: Data, ts: Any, key: PRNGKeyArray
) -> dict[str, Any]:
    """Per-chain, MC-dropout and ensemble results on the test set (NumPy)."""
    probs, mc = jax.tree.map(
        np.asarray, program.predict(ts, eqx_rng.derive(key, "mc-dropout"))
    )
    probs = probs.astype(np.float64)
    mc = mc.astype(np.float64)
    labels = np.asarray(data.y_test)
    per_chain = []
    for c in range(cfg.chains):
        rel = _common.reliability(probs[c], labels, n_bins=cfg.ece_bins)
        per_chain.append(
            {
                "chain": c,
                "accuracy": _common.accuracy(probs[c], labels),
                "nll": _common.nll(probs[c], labels),
                "ece": rel.ece,
                "mc_dropout": _common.mc_dropout_stats(mc[c], labels),
            }
        )
    ensemble_probs = probs.mean(axis=0)
    summary: dict[str, Any] = {}
    for name in ("accuracy", "nll", "ece"):
        summary[name] = _common.mean_std([r[name] for r in per_chain])
    for name in ("accuracy", "nll", "ece", "entropy_correct", "entropy_wrong"):
        summary[f"mc_{name}"] = _common.mean_std(
            [r["mc_dropout"][name] for r in per_chain]
        )
    return {
        "per_chain": per_chain,
        "mean_std": summary,
        "ensemble": {
            "accuracy": _common.accuracy(ensemble_probs, labels),
            "nll": _common.nll(ensemble_probs, labels),
            "ece": _common.expected_calibration_error(
                ensemble_probs, labels, n_bins=cfg.ece_bins
            ),
        },
        "_probs": probs,
        "_mc_probs": mc,
        "_labels": labels,
    }


def make_train(cfg: Config) -> Callable[[PRNGKeyArray], tuple[Any, dict[str, Any]]]:
    """`train(key) -> (final TrainState, results)`: the whole run, no files written."""
    data = load_data()
    program = make_program(cfg, data)

    def train(key: PRNGKeyArray) -> tuple[Any, dict[str, Any]]:
        ts = fit(program, cfg, program.init(key))
        return ts, evaluate(program, cfg, data, ts, key)

    return train


# ------------------------------------------------------------------------ reporting


def results_table(cfg: Config, results: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    for r in results["per_chain"]:
        mc = r["mc_dropout"]
        rows.append(
            [
                f"seed {r['chain']}",
                r["accuracy"],
                r["nll"],
                r["ece"],
                mc["accuracy"],
                mc["nll"],
                mc["entropy_correct"],
                mc["entropy_wrong"],
            ]
        )
    s = results["mean_std"]
    pm = lambda name: f"{s[name][0]:.4f} +/- {s[name][1]:.4f}"
    rows.append(
        [
            "mean +/- std",
            pm("accuracy"),
            pm("nll"),
            pm("ece"),
            pm("mc_accuracy"),
            pm("mc_nll"),
            pm("mc_entropy_correct"),
            pm("mc_entropy_wrong"),
        ]
    )
    e = results["ensemble"]
    rows.append(
        [f"ensemble of {cfg.chains}", e["accuracy"], e["nll"], e["ece"], "", "", "", ""]
    )
    headers = [
        "",
        "test acc",
        "NLL",
        f"ECE ({cfg.ece_bins} bins)",
        f"MC acc (T={cfg.mc_samples})",
        "MC NLL",
        "H(right)",
        "H(wrong)",
    ]
    return _common.format_table(headers, rows)


def write_plots(
    out: Path,
    cfg: Config,
    log: list[dict[str, Any]],
    results: dict[str, Any],
    seed: int,
) -> None:
    by = {(r["step"], r["chain"]): r for r in log}
    steps = np.array(sorted({r["step"] for r in log}))
    e_steps = np.array(sorted({r["step"] for r in log if "test_accuracy" in r}))

    def grid(steps: np.ndarray, name: str) -> np.ndarray:  # (chains, len(steps))
        return np.array(
            [[by[(int(s), c)][name] for s in steps] for c in range(cfg.chains)]
        )

    # The training loss is plotted as its mean over each fused call's steps (one
    # point per `steps_per_call` steps): a minibatch's loss alone is too noisy to read.
    train_steps, train_loss = _common.block_means(
        steps, grid(steps, "train_loss"), cfg.steps_per_call
    )
    _common.plot_learning_curves(
        out / "learning_curves.png",
        train_steps=train_steps,
        train_loss=train_loss,
        eval_steps=e_steps,
        test_accuracy=grid(e_steps, "test_accuracy"),
        test_nll=grid(e_steps, "test_nll"),
        title=f"digits: {cfg.chains} chains trained as one program (seed {seed}); thin lines = chains",
    )
    labels = results["_labels"]
    probs, mc = results["_probs"], results["_mc_probs"]
    pooled = lambda p: (p.reshape(-1, p.shape[-1]), np.tile(labels, p.shape[0]))
    det_p, det_y = pooled(probs)
    mc_p, mc_y = pooled(mc.mean(axis=1))
    ens = probs.mean(axis=0)
    panels = [
        (
            f"single models ({cfg.chains} chains pooled)",
            _common.reliability(det_p, det_y, n_bins=cfg.ece_bins),
            _common.accuracy(det_p, det_y),
        ),
        (
            f"MC dropout, T={cfg.mc_samples} (pooled)",
            _common.reliability(mc_p, mc_y, n_bins=cfg.ece_bins),
            _common.accuracy(mc_p, mc_y),
        ),
        (
            f"ensemble of {cfg.chains} chains",
            _common.reliability(ens, labels, n_bins=cfg.ece_bins),
            _common.accuracy(ens, labels),
        ),
    ]
    _common.plot_reliability(
        out / "reliability.png",
        panels,
        title=f"digits test set: reliability diagrams ({cfg.ece_bins} bins, seed {seed})",
    )


# ---------------------------------------------------------------------- checkpoints


def run_identity(cfg: Config, seed: int) -> dict[str, Any]:
    return {
        "config": _common.config_dict(cfg),
        "seed": seed,
        "config_hash": _common.config_hash(cfg, seed=seed),
    }


def check_resumable(out: Path, cfg: Config, seed: int) -> Path:
    """The checkpoint to resume from; `UsageError` when there is none or it belongs to
    another configuration or seed."""
    path = eqx_rng.latest_checkpoint(out / CHECKPOINT_DIR)
    if path is None:
        raise _common.UsageError(
            f"--resume: no checkpoint in {out / CHECKPOINT_DIR}; run without --resume to start."
        )
    try:
        meta = eqx_rng.load_metadata(path)
    except (OSError, eqx_rng.CheckpointError) as e:
        raise _common.UsageError(f"--resume: cannot read {path}: {e}") from e
    mine = run_identity(cfg, seed)
    theirs = meta.get("run", {})
    if theirs.get("config_hash") != mine["config_hash"]:
        diff = _common.config_diff(
            {**theirs.get("config", {}), "seed": theirs.get("seed")},
            {**mine["config"], "seed": seed},
        )
        raise _common.UsageError(
            f"--resume: the checkpoint {path} was written by a different configuration "
            f"(config hash {theirs.get('config_hash')} != {mine['config_hash']}): "
            + ("; ".join(diff) if diff else "unknown difference")
            + ". Resume with the same flags, or start a new run in another --out."
        )
    return path


# ------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = _common.experiment_parser(
        "digits.py",
        "Train C seeds of a stochastic MLP on 8x8 digits as one program; report accuracy, NLL, ECE and MC dropout.",
        out="runs/digits",
        seed_help="base seed; chain c uses derive(seed, ..., c) (default: %(default)s)",
        seeds_help="number of seeds (chains) trained at once (default: 8; 2 with --tiny)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --out (same flags required)",
    )
    parser.add_argument(
        "--stop-after",
        type=_common.positive_int,
        default=None,
        metavar="STEP",
        help="checkpoint and stop once STEP steps are done (continue later with --resume)",
    )
    _common.add_no_progress(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = Config.tiny() if args.tiny else Config()
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, chains=args.seeds)
    # Validate everything before writing anything.
    try:
        cfg.validate()
        if args.stop_after is not None and args.stop_after % cfg.steps_per_call:
            raise _common.UsageError(
                f"--stop-after {args.stop_after} must be a multiple of steps_per_call={cfg.steps_per_call}."
            )
        out = Path(args.out)
        resume_from = check_resumable(out, cfg, args.seed) if args.resume else None
        out = _common.prepare_out_dir(out)
    except _common.UsageError as e:
        parser.error(str(e))  # exits 2
    return run(
        cfg,
        args.seed,
        out,
        resume_from=resume_from,
        stop_after=args.stop_after,
        show_progress=not args.no_progress,
    )


def run(
    cfg: Config,
    seed: int,
    out: Path,
    *,
    resume_from: Path | None,
    stop_after: int | None,
    show_progress: bool,
) -> int:
    key = eqx_rng.as_key(seed)
    data = load_data()
    program = make_program(cfg, data)
    log = _common.JsonlLog(out / "metrics.jsonl")
    start = time.perf_counter()

    ts = program.init(key)
    if resume_from is None:
        # A fresh run replaces any earlier run's files in --out.
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        log.reset()
    else:
        ts = eqx_rng.load(resume_from, ts)
        log.truncate_after(int(ts.step[0]))
        print(f"resuming from {resume_from} (step {int(ts.step[0])})")
    checkpoints = eqx_rng.CheckpointManager(out / CHECKPOINT_DIR, keep=2)
    metadata = {"run": run_identity(cfg, seed)}

    print(
        f"digits: {cfg.chains} chains x {cfg.steps} steps, batch {cfg.batch_size}, {cfg.steps_per_call} steps per dispatch, seed {seed}"
    )
    bar = _common.progress(
        cfg.steps, "training", initial=int(ts.step[0]), disable=not show_progress
    )

    def on_chunk(ts: Any, metrics: dict[str, np.ndarray]) -> None:
        step = int(ts.step[0])
        # One record per step and chain: the fused call's metrics come back stacked,
        # `(chains, steps_per_call)`, at no extra cost.
        n = metrics["loss"].shape[1]
        records = [
            {
                "step": step - n + 1 + k,
                "chain": c,
                "train_loss": float(metrics["loss"][c, k]),
                "train_accuracy": float(metrics["accuracy"][c, k]),
                "grad_norm": float(metrics["grad_norm"][c, k]),
            }
            for k in range(n)
            for c in range(cfg.chains)
        ]
        postfix = {"loss": f"{metrics['loss'][:, -1].mean():.3f}"}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = jax.tree.map(np.asarray, program.test_eval(ts))
            for c, r in enumerate(records[-cfg.chains :]):
                r["test_accuracy"] = float(ev["accuracy"][c])
                r["test_nll"] = float(ev["nll"][c])
            postfix["test acc"] = f"{ev['accuracy'].mean():.4f}"
        log.append(records)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or step == stop_after:
            checkpoints.save(step, ts, metadata=metadata)
        bar.set_postfix(postfix, refresh=False)
        bar.update(cfg.steps_per_call)

    ts = fit(program, cfg, ts, stop=stop_after, on_chunk=on_chunk)
    bar.close()
    train_time = time.perf_counter() - start
    if int(ts.step[0]) < cfg.steps:
        print(
            f"stopped at step {int(ts.step[0])} of {cfg.steps}; continue with --resume --out {out}"
        )
        return 0

    results = evaluate(program, cfg, data, ts, key)
    wall = time.perf_counter() - start
    print()
    print(results_table(cfg, results))
    s = results["mean_std"]
    print(
        f"\nmean test accuracy {s['accuracy'][0]:.4f} +/- {s['accuracy'][1]:.4f} over {cfg.chains} seeds; "
        f"MC dropout: entropy {s['mc_entropy_correct'][0]:.3f} on right vs {s['mc_entropy_wrong'][0]:.3f} nats on wrong predictions"
    )
    write_plots(out, cfg, log.read(), results, seed)
    summary = {
        "experiment": "digits",
        **run_identity(cfg, seed),
        "results": {k: v for k, v in results.items() if not k.startswith("_")},
        "wall_time_s": {"train": train_time, "total": wall},
    }
    _common.write_summary(out / "summary.json", summary)
    print(
        f"wall time {wall:.1f} s; wrote {out}/summary.json, metrics.jsonl, learning_curves.png, reliability.png, {CHECKPOINT_DIR}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
