"""Sequence models on digit rows: a GRU with locked dropout and a small transformer
built with `eqx_rng.nn.LayerStack`, to show the layers compose.

Each 8x8 digit is read as a sequence of 8 rows of 8 pixels.

- GRU: `eqx.nn.GRUCell` in a `lax.scan`. Locked (variational) dropout: one input
  mask for every time step (`Dropout(p, broadcast_dims=(0,))` on the `(T, D)`
  sequence) and one hidden-state mask drawn once with `Dropout.mask` and reused at
  every step (Gal & Ghahramani 2016).
- Transformer: a linear embedding plus learned positions, then `LayerStack` of
  pre-norm blocks (`eqx.nn.MultiheadAttention` with attention dropout, an MLP, and
  `DropPath` on both residual branches; block `l` keyed by `derive(key, l)`), mean
  pooling and a linear read-out.

Both train with `eqx_rng.make_train_step` (examples keyed by `eqx_rng.vmap`), then
report test accuracy in inference mode and with MC dropout (`eqx_rng.nn.mc_mode`,
which also switches on `MultiheadAttention`'s dropout).

    python experiments/sequence.py [--tiny] [--seed S] [--out DIR]

Writes to `--out`: `metrics.jsonl`, `summary.json`, `learning_curves.png`.
"""

import dataclasses
import sys
import time
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

T, D_IN, CLASSES = 8, 8, 10


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides the numbers a run produces (with the seed)."""

    hidden: int = 64  # GRU state size
    width: int = 32  # transformer width
    heads: int = 4
    layers: int = 2
    dropout: float = 0.1  # locked dropout (GRU), attention dropout (transformer)
    drop_path: float = 0.1
    batch_size: int = 64
    steps: int = 400
    steps_per_call: int = 50
    learning_rate: float = 3e-3
    mc_samples: int = 20
    fast_compile: bool = False  # XLA without most optimisations (smoke runs only)

    @classmethod
    def tiny(cls) -> "Config":
        """A smoke configuration that runs in a few seconds (after compiling)."""
        return cls(
            hidden=8, width=8, heads=2, layers=2, batch_size=16, steps=10,
            steps_per_call=5, mc_samples=2, fast_compile=True,
        )  # fmt: skip


def _named(key: Any, name: str) -> Any:
    return None if key is None else eqx_rng.derive(key, name)


class LockedGRU(eqx.Module):
    """GRU over the rows with locked input and hidden-state dropout."""

    cell: eqx.nn.GRUCell
    head: eqx.nn.Linear
    input_dropout: eqx_rng.nn.Dropout
    hidden_dropout: eqx_rng.nn.Dropout

    def __init__(self, cfg: Config, *, key: PRNGKeyArray):
        self.cell = eqx.nn.GRUCell(D_IN, cfg.hidden, key=eqx_rng.derive(key, "cell"))
        self.head = eqx.nn.Linear(cfg.hidden, CLASSES, key=eqx_rng.derive(key, "head"))
        self.input_dropout = eqx_rng.nn.Dropout(cfg.dropout, broadcast_dims=(0,))
        self.hidden_dropout = eqx_rng.nn.Dropout(cfg.dropout)

    def __call__(self, xs: Float[Array, "t d"], *, key: Any = None) -> Array:
        xs = self.input_dropout(xs, key=_named(key, "input"))  # one mask over time
        hidden = self.cell.hidden_size
        mask = self.hidden_dropout.mask((hidden,), key=_named(key, "hidden"))

        def step(h: Array, x: Array) -> tuple[Array, None]:
            return self.cell(x, h * mask), None  # the same mask at every step

        h, _ = jax.lax.scan(step, jnp.zeros(hidden), xs)
        return self.head(h)


class Block(eqx.Module):
    """Pre-norm transformer block with attention dropout and DropPath."""

    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    drop_path: eqx_rng.nn.DropPath

    def __init__(self, cfg: Config, *, key: PRNGKeyArray):
        w = cfg.width
        self.norm1 = eqx.nn.LayerNorm(w)
        self.attn = eqx.nn.MultiheadAttention(
            cfg.heads, w, dropout_p=cfg.dropout, key=eqx_rng.derive(key, "attn")
        )
        self.norm2 = eqx.nn.LayerNorm(w)
        self.mlp_in = eqx.nn.Linear(w, 2 * w, key=eqx_rng.derive(key, "mlp_in"))
        self.mlp_out = eqx.nn.Linear(2 * w, w, key=eqx_rng.derive(key, "mlp_out"))
        self.drop_path = eqx_rng.nn.DropPath(cfg.drop_path)

    def __call__(self, x: Float[Array, "t w"], *, key: Any = None) -> Array:
        h = jax.vmap(self.norm1)(x)
        h = self.attn(h, h, h, key=_named(key, "attn"))
        x = x + self.drop_path(h, key=_named(key, "path_attn"))
        h = jax.vmap(self.norm2)(x)
        h = jax.vmap(self.mlp_out)(jax.nn.gelu(jax.vmap(self.mlp_in)(h)))
        return x + self.drop_path(h, key=_named(key, "path_mlp"))


class Transformer(eqx.Module):
    embed: eqx.nn.Linear
    positions: Array
    blocks: eqx_rng.nn.LayerStack
    head: eqx.nn.Linear

    def __init__(self, cfg: Config, *, key: PRNGKeyArray):
        self.embed = eqx.nn.Linear(D_IN, cfg.width, key=eqx_rng.derive(key, "embed"))
        self.positions = 0.02 * jr.normal(eqx_rng.derive(key, "pos"), (T, cfg.width))
        self.blocks = eqx_rng.nn.LayerStack(
            lambda *, key: Block(cfg, key=key),
            cfg.layers,
            key=eqx_rng.derive(key, "blocks"),
        )
        self.head = eqx.nn.Linear(cfg.width, CLASSES, key=eqx_rng.derive(key, "head"))

    def __call__(self, xs: Float[Array, "t d"], *, key: Any = None) -> Array:
        h = jax.vmap(self.embed)(xs) + self.positions
        h = self.blocks(h, key=_named(key, "blocks"))
        return self.head(h.mean(axis=0))


MODELS = {"gru": LockedGRU, "transformer": Transformer}


def train_model(
    cfg: Config, name: str, data: _common.Split, key: PRNGKeyArray, on_chunk: Any
) -> dict[str, float]:
    x_train = jnp.asarray(data.x_train).reshape(-1, T, D_IN)
    y_train = jnp.asarray(data.y_train)
    x_test = jnp.asarray(data.x_test).reshape(-1, T, D_IN)
    y_test = np.asarray(data.y_test)
    n = x_train.shape[0]
    optimizer = optax.adamw(optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps))

    def loss_fn(model: Any, state: Any, batch: Any, *, key: Any) -> Any:
        xs, ys = batch
        logits = eqx_rng.vmap(model)(xs, key=key)  # example i: derive(key, i)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()
        return loss, (state, {"loss": loss})

    step = eqx_rng.make_train_step(
        loss_fn, optimizer, steps_per_call=cfg.steps_per_call
    )
    model = MODELS[name](cfg, key=eqx_rng.derive(key, "init"))
    ts = eqx_rng.TrainState.create(model, optimizer, key=eqx_rng.derive(key, "train"))

    @eqx.filter_jit
    def advance(ts: Any) -> Any:
        steps = ts.step + jnp.arange(cfg.steps_per_call)
        idx = jax.vmap(
            lambda t: jr.choice(
                eqx_rng.derive(ts.key, "data", t), n, (cfg.batch_size,), replace=False
            )
        )(steps)
        return step(ts, (x_train[idx], y_train[idx]))

    @eqx.filter_jit
    def predict(model: Any, key: PRNGKeyArray) -> Any:
        det = jax.nn.softmax(jax.vmap(eqx.nn.inference_mode(model))(x_test))
        mc = eqx_rng.nn.mc_mode(model)
        sample = lambda xs, *, key: jax.nn.softmax(eqx_rng.vmap(mc)(xs, key=key))
        mc_probs = eqx_rng.vmap(sample, in_axes=None, axis_size=cfg.mc_samples)(
            x_test, key=key
        )
        return det, mc_probs

    while int(ts.step) < cfg.steps:
        ts, metrics = advance(ts)
        on_chunk(name, int(ts.step), np.asarray(metrics["loss"]))
    det, mc = jax.tree.map(
        lambda a: np.asarray(a, np.float64),
        predict(ts.model, eqx_rng.derive(key, "mc")),
    )
    mc_mean = mc.mean(axis=0)
    params = sum(
        a.size for a in jax.tree.leaves(eqx.filter(ts.model, eqx.is_inexact_array))
    )
    return {
        "accuracy": _common.accuracy(det, y_test),
        "nll": _common.nll(det, y_test),
        "mc_accuracy": _common.accuracy(mc_mean, y_test),
        "mc_nll": _common.nll(mc_mean, y_test),
        "parameters": int(params),
    }


def main(argv: list[str] | None = None) -> int:
    parser = _common.experiment_parser(
        "sequence.py",
        "A GRU with locked dropout and a LayerStack transformer on digit rows.",
        out="runs/sequence",
    )
    _common.add_no_progress(parser)
    args = parser.parse_args(argv)
    cfg = Config.tiny() if args.tiny else Config()
    out = _common.out_dir_or_exit(parser, args.out)
    with _common.compile_fast(cfg.fast_compile):
        return run(cfg, args.seed, out, show_progress=not args.no_progress)


def run(cfg: Config, seed: int, out: Path, *, show_progress: bool) -> int:
    key = eqx_rng.as_key(seed)
    data = _common.load_digits_split()
    log = _common.JsonlLog(out / "metrics.jsonl")
    log.reset()
    start = time.perf_counter()
    bar = _common.progress(
        len(MODELS) * cfg.steps, "training", disable=not show_progress
    )

    def on_chunk(name: str, step: int, losses: np.ndarray) -> None:
        k = len(losses)
        log.append(
            {"model": name, "step": step - k + 1 + i, "loss": float(losses[i])}
            for i in range(k)
        )
        bar.set_postfix({"model": name, "loss": f"{losses[-1]:.3f}"}, refresh=False)
        bar.update(k)

    results = {
        name: train_model(cfg, name, data, eqx_rng.derive(key, name), on_chunk)
        for name in MODELS
    }
    bar.close()
    wall = time.perf_counter() - start
    rows = [
        [name, r["parameters"], r["accuracy"], r["nll"], r["mc_accuracy"], r["mc_nll"]]
        for name, r in results.items()
    ]
    print(
        _common.format_table(
            [
                "model",
                "params",
                "test acc",
                "NLL",
                f"MC acc (T={cfg.mc_samples})",
                "MC NLL",
            ],
            rows,
        )
    )
    plot_losses(out, cfg, log.read())
    _common.write_summary(
        out / "summary.json",
        {
            "experiment": "sequence",
            "config": _common.config_dict(cfg),
            "seed": seed,
            "results": results,
            "wall_time_s": wall,
        },
    )
    print(
        f"wall time {wall:.1f} s; wrote {out}/summary.json, metrics.jsonl, learning_curves.png"
    )
    return 0


def plot_losses(out: Path, cfg: Config, records: list[dict[str, Any]]) -> None:
    """Training loss per model, one point per fused call (mean of its steps)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in MODELS:
        mine = [r for r in records if r["model"] == name]
        steps = np.array([r["step"] for r in mine])
        losses = np.array([r["loss"] for r in mine])
        ax.plot(
            *_common.block_means(steps, losses, cfg.steps_per_call),
            marker="o",
            ms=3,
            label=name,
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {cfg.steps_per_call} steps)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _common.finish(
        fig,
        out / "learning_curves.png",
        "digit rows as sequences: GRU (locked dropout) and LayerStack transformer",
    )


if __name__ == "__main__":
    sys.exit(main())
