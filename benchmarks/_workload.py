"""The benchmark workload: a stochastic MLP trained with Adam, in several sizes.

Every implementation computes the same thing:

    Linear(in -> H) -> BatchNorm -> ReLU -> Dropout(p) -> GaussianNoise(std)
    -> Linear(H -> H) -> BatchNorm -> ReLU -> Dropout(p) -> GaussianNoise(std)
    -> Linear(H -> out),  softmax cross-entropy,  optax.adam(lr)

- BatchNorm normalises with this batch's mean and biased variance,
  `(h - mean) / sqrt(var + eps) * weight + bias`, and keeps running averages
  (`running = momentum * running + (1 - momentum) * batch_stat`) as state.
- Randomness: chain `c` has key `fold_in(seed_key, c)`, split into an init key and a
  train key; step `t` uses `fold_in(train_key, t)`; example `b` of that step uses
  `fold_in(step_key, b)` (plain Equinox: `split(step_key, batch)[b]`, the same numbers
  under `jax_threefry_partitionable`), split into 4 role keys (dropout 1, noise 1,
  dropout 2, noise 2). Every example draws its own numbers and every step fresh ones.
- Linear layers are initialised like `eqx.nn.Linear` (uniform in +-1/sqrt(fan_in)).
- Data: a fixed pool of `steps_per_call` synthetic batches, on device before timing;
  single-step runners use batch `t % pool` at step `t`, multi-step runners take the
  whole pool in one call. All chains see the same data.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import jax.random as jr

SEED = 0


@dataclasses.dataclass(frozen=True)
class Size:
    """One benchmark size."""

    name: str
    hidden: int
    batch: int
    chains: int
    in_size: int = 64
    out_size: int = 10
    p: float = 0.1
    std: float = 0.1
    lr: float = 1e-3
    momentum: float = 0.99
    eps: float = 1e-5
    steps_per_call: int = 50
    vmap_chains: bool = False  # vmap over a chain axis even when chains == 1

    @property
    def vmapped(self) -> bool:
        return self.chains > 1 or self.vmap_chains

    @property
    def examples_per_step(self) -> int:
        return self.batch * self.chains

    def matmul_flops_per_step(self) -> float:
        """Matrix-multiply FLOPs of one training step over all chains.

        Forward `2 * (in*H + H*H + H*out)` per example; backward the same again for the
        weight gradients plus `2 * (H*H + H*out)` for the input gradients (the data
        needs none). Elementwise work (BatchNorm, RNG, Adam) is not counted.
        """
        i, h, o = self.in_size, self.hidden, self.out_size
        fwd = 2 * (i * h + h * h + h * o)
        bwd = fwd + 2 * (h * h + h * o)
        return float((fwd + bwd) * self.examples_per_step)

    def n_params(self) -> int:
        i, h, o = self.in_size, self.hidden, self.out_size
        return i * h + h + 2 * h + h * h + h + 2 * h + h * o + o


@dataclasses.dataclass(frozen=True)
class Data:
    """A pool of synthetic batches, on device."""

    xs: jax.Array  # (pool, batch, in_size) float32
    ys: jax.Array  # (pool, batch) int32
    x_list: list  # xs[t] as separate device arrays (no slicing while timing)
    y_list: list

    def batch(self, t: int) -> tuple[jax.Array, jax.Array]:
        i = t % len(self.x_list)
        return self.x_list[i], self.y_list[i]


def make_data(size: Size) -> Data:
    """Fixed random inputs and labels, already on device."""
    x_key, y_key = jr.split(jr.fold_in(jr.key(SEED), 10_000))
    shape = (size.steps_per_call, size.batch)
    xs = jr.normal(x_key, (*shape, size.in_size), jnp.float32)
    ys = jr.randint(y_key, shape, 0, size.out_size, jnp.int32)
    x_list = [xs[t] for t in range(size.steps_per_call)]
    y_list = [ys[t] for t in range(size.steps_per_call)]
    jax.block_until_ready((xs, ys, x_list, y_list))
    return Data(xs, ys, x_list, y_list)


def seed_key() -> jax.Array:
    return jr.key(SEED)


def chain_keys(chains: int) -> jax.Array:
    """`fold_in(seed_key, c)` for every chain (`eqx_rng.ensemble`'s convention)."""
    return jax.vmap(jr.fold_in, in_axes=(None, 0))(seed_key(), jnp.arange(chains))


def linear_bound(fan_in: int) -> float:
    return 1 / math.sqrt(fan_in)
