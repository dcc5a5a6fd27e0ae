"""Noise injection checked against the truth: SGLD on Bayesian linear regression.

The model `y = X w + b + noise`, `noise ~ N(0, sigma^2)`, with the conjugate prior
`w, b ~ N(0, tau^2)`, has a Gaussian posterior in closed form. C chains of
stochastic-gradient Langevin dynamics (Welling & Teh, 2011),

    theta <- theta + (eps / 2) * grad_est log p(theta | data) + sqrt(eps) * xi,

run as one vmapped program with `eqx_rng.optim.sgld` inside `eqx_rng.make_train_step`:
chain `c`'s TrainState key is `derive(key, c)` (from `eqx_rng.vmap`); step `t` draws
its minibatch from `derive(step_key, "batch")` and the optimizer draws the injected
noise `xi` from `derive(step_key, "optimizer")`, `step_key = derive(chain_key, t)`.

Checks (exit 0 when all pass):

1. the pooled posterior mean is within 3 Monte Carlo standard errors of the exact
   mean in every coordinate (MCSE = posterior sd / sqrt(ESS));
2. split R-hat <= 1.01 in every coordinate (R-hat and ESS from numpyro);
3. the chains are independent: the mean pairwise correlation of their traces is
   below 0.2 (R-hat cannot see chains that share their noise: identical chains have
   no between-chain variance and an R-hat of 1).

Why the checks are not fooled by SGLD's own bias: for a Gaussian posterior the drift
is linear and the minibatch gradient is unbiased, so the stationary mean of the chain
is the exact posterior mean for any stable step size. Only the covariance is biased,
inflated by about `step_scale / 4` from the discretisation and by `step_scale * N /
(4 * batch)` from minibatch noise (`eps = step_scale / lambda_max`). That bias is
computed exactly here (the stationary covariance of the SGLD recursion, a discrete
Lyapunov equation) and reported next to the measured covariance error.

`--broken` runs a deliberately broken variant: every chain's TrainState is built from
one key shared by all chains (an unmapped argument of `eqx_rng.vmap` consumed inside
it), so the chains draw the same minibatches and the same noise.
`eqx_rng.vmap` refuses it with `BroadcastKeyError` (printed; exit 3). The variant is
then run with the check switched off (`keys="broadcast"`) to show what it would have
produced: chains that move in lockstep, caught by check 3 (exit 1 if only the
statistics catch it).

    python experiments/sgld.py [--tiny] [--seed S] [--out DIR] [--broken]
"""

import argparse
import dataclasses
import math
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
import scipy.linalg
from jaxtyping import Array, Float, PyTree
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

import eqx_rng

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PARAM_NAMES = ("w[0]", "w[1]", "b")  # for dim == 2; other dims get generic names


@dataclasses.dataclass(frozen=True)
class Config:
    """SGLD on conjugate Bayesian linear regression.

    `eps = step_scale / lambda_max` where `lambda_max` is the largest eigenvalue of
    the posterior precision: the discretisation bias of the covariance is then about
    `step_scale / 4`, whatever the data size.
    """

    n_data: int = 1000
    dim: int = 2
    feature_corr: float = 0.3  # correlation between the features: a tilted posterior
    noise_std: float = 1.0  # sigma, known
    prior_std: float = 1.0  # tau, for every weight and the bias
    chains: int = 8
    steps: int = 150_000  # per chain, burn-in included
    burn_in: int = 15_000
    thin: int = 10  # keep every `thin`-th state
    batch_size: int = 500  # minibatch per step, drawn with replacement
    step_scale: float = 0.02
    # Welling & Teh (2011), section 5.1: the bimodal Gaussian-mixture posterior.
    mix_data: int = 100
    mix_chains: int = 512
    mix_steps: int = 20_000
    mix_burn_in: int = 4_000
    mix_thin: int = 20
    mix_batch: int = 10
    mix_step_size: float = 0.01
    mix_tol: float = 0.05  # |SGLD mass - grid mass| of each mode

    @classmethod
    def tiny(cls) -> "Config":
        """A smoke configuration of a few seconds that still passes the checks."""
        return cls(
            chains=4,
            steps=12_000,
            burn_in=1_200,
            thin=4,
            batch_size=200,
            step_scale=0.25,
            mix_chains=64,
            mix_steps=3_000,
            mix_burn_in=600,
        )

    def validate(self) -> None:
        if self.chains < 2:
            raise _common.UsageError(
                f"R-hat needs at least 2 chains, got chains={self.chains}."
            )
        if not 0 <= self.burn_in < self.steps:
            raise _common.UsageError(
                f"need 0 <= burn_in < steps, got burn_in={self.burn_in}, steps={self.steps}."
            )
        if self.steps % self.thin or self.burn_in % self.thin:
            raise _common.UsageError(
                f"steps and burn_in must be multiples of thin={self.thin}."
            )
        if not 0 < self.step_scale < 1:
            raise _common.UsageError(
                f"step_scale must be in (0, 1), got {self.step_scale}."
            )
        if not 1 <= self.batch_size <= self.n_data:
            raise _common.UsageError(
                f"batch_size must be in [1, n_data], got {self.batch_size}."
            )


# ------------------------------------------------------------------ data and the truth


class Problem(NamedTuple):
    """The data set and everything exact about its posterior (float64, NumPy)."""

    x: np.ndarray  # (n, dim) features
    y: np.ndarray  # (n,) targets
    design: np.ndarray  # (n, dim + 1): [x, 1]
    precision: np.ndarray  # posterior precision
    mean: np.ndarray  # exact posterior mean, (dim + 1,)
    cov: np.ndarray  # exact posterior covariance
    step_size: float  # eps


def make_problem(cfg: Config, key: Any) -> Problem:
    """Synthetic data from `key` and the exact conjugate posterior."""
    feat_key, noise_key, w_key = (
        eqx_rng.derive(key, name) for name in ("features", "noise", "true_w")
    )
    corr = np.full((cfg.dim, cfg.dim), cfg.feature_corr) + (
        1 - cfg.feature_corr
    ) * np.eye(cfg.dim)
    z = np.asarray(jr.normal(feat_key, (cfg.n_data, cfg.dim)), np.float64)
    x = z @ np.linalg.cholesky(corr).T
    true = np.asarray(jr.normal(w_key, (cfg.dim + 1,)), np.float64)
    design = np.concatenate([x, np.ones((cfg.n_data, 1))], axis=1)
    y = design @ true + cfg.noise_std * np.asarray(
        jr.normal(noise_key, (cfg.n_data,)), np.float64
    )
    precision = (
        design.T @ design / cfg.noise_std**2 + np.eye(cfg.dim + 1) / cfg.prior_std**2
    )
    cov = np.linalg.inv(precision)
    mean = cov @ design.T @ y / cfg.noise_std**2
    step_size = cfg.step_scale / float(np.linalg.eigvalsh(precision).max())
    return Problem(x, y, design, precision, mean, cov, step_size)


def flatten(theta: PyTree) -> Any:
    """`{"w": (..., dim), "b": (...)}` -> `(..., dim + 1)`, in the order of `design`."""
    return jnp.concatenate([theta["w"], theta["b"][..., None]], axis=-1)


def sgld_stationary_cov(cfg: Config, problem: Problem) -> np.ndarray:
    """The exact stationary covariance of the SGLD recursion used here.

    With `A = I - (eps / 2) P` (P the posterior precision) and minibatch-gradient
    noise of covariance `G(S)` at stationarity (sampling with replacement), the
    covariance solves `S = A S A^T + eps I + (eps / 2)^2 G(S)`, where
    `G(S) = (N^2 / n) Cov_i[a_i (y_i - a_i^T theta) / sigma^2]` averaged over
    `theta ~ N(mu, S)`. Solved by fixed-point iteration on discrete Lyapunov
    equations (converges fast: the noise term is small).
    """
    eps, n, big_n = problem.step_size, cfg.batch_size, cfg.n_data
    a_mat = np.eye(problem.mean.size) - 0.5 * eps * problem.precision
    design, var = problem.design, cfg.noise_std**2
    resid = problem.y - design @ problem.mean
    s = problem.cov
    for _ in range(50):
        # E_theta[g_i g_i^T] with g_i = a_i r_i / var, r_i = y_i - a_i^T theta
        quad = np.einsum("ij,jk,ik->i", design, s, design)
        second = np.einsum("i,ij,ik->jk", resid**2 + quad, design, design) / (
            var**2 * big_n
        )
        # E_theta[m m^T] with m(theta) = E_i[g_i] = m(mu) - L (theta - mu)
        mean_g = design.T @ resid / (var * big_n)
        lik = design.T @ design / (var * big_n)  # L
        first = np.outer(mean_g, mean_g) + lik @ s @ lik.T
        noise = (big_n**2 / n) * (second - first)
        q = eps * np.eye(problem.mean.size) + 0.25 * eps**2 * noise
        s_new = scipy.linalg.solve_discrete_lyapunov(a_mat, q)
        if np.allclose(s_new, s, rtol=1e-12, atol=0):
            return s_new
        s = s_new
    return s


# ------------------------------------------------------------------------------- SGLD


def sample_chains(
    loss_fn: Callable,
    optimizer: Any,
    theta0: PyTree,
    key: Any,
    *,
    n_saved: int,
    thin: int,
    shared_key: Any = None,
    broadcast_opt_in: bool = False,
    record: Callable[[PyTree], Any] = flatten,
) -> np.ndarray:
    """Run one SGLD chain per leading index of `theta0` with `make_train_step`, as
    one vmapped program; returns `(chains, n_saved, d)` draws, every `thin` steps.

    Chain `c`'s TrainState key is `derive(key, c)` (from `eqx_rng.vmap`); its step
    `t` draws the minibatch and the Langevin noise from `derive(that key, t)`. With
    `shared_key` (the BROKEN variant), every chain's TrainState is built from that
    one key instead: `eqx_rng.vmap` refuses it, unless `broadcast_opt_in`.
    """
    step = eqx_rng.make_train_step(
        loss_fn, optimizer, steps_per_call=thin, extra_metrics=False
    )

    def block(ts: Any, _: Any) -> tuple[Any, Any]:
        ts, _ = step(ts, None)  # `thin` SGLD steps
        return ts, record(ts.model)

    def run(ts: Any) -> Any:
        return eqx_rng.scan(block, length=n_saved)(ts, None)[1]

    def run_chain(theta: PyTree, *, key: Any) -> Float[Array, "kept d"]:
        return run(eqx_rng.TrainState.create(theta, optimizer, key=key))

    def run_chain_shared_noise(
        theta: PyTree, noise_key: Any, *, key: Any
    ) -> Float[Array, "kept d"]:
        # BROKEN on purpose: `noise_key` is the same for every chain and nothing
        # per-chain is folded into it, so every chain draws the same noise.
        del key
        return run(eqx_rng.TrainState.create(theta, optimizer, key=noise_key))

    if shared_key is None:
        kept = eqx.filter_jit(eqx_rng.vmap(run_chain))(theta0, key=key)
    else:
        mapped = eqx_rng.vmap(
            run_chain_shared_noise,
            in_axes=(0, None),
            keys="broadcast" if broadcast_opt_in else "derive",
        )
        kept = eqx.filter_jit(mapped)(theta0, shared_key, key=key)
    return np.asarray(jax.block_until_ready(kept), np.float64)


def make_train(
    cfg: Config, *, broken: bool = False, broadcast_opt_in: bool = False
) -> Callable[[Any], Any]:
    """`train(key) -> (problem, draws)`: `draws` is `(chains, kept, dim + 1)` NumPy.

    The sampler is `eqx_rng.optim.sgld(eps, num_data=N)` inside
    `eqx_rng.make_train_step`: the loss is the minibatch mean of the per-example
    negative log joint, so the update is `(eps / 2) * grad_est log p(theta | data) +
    sqrt(eps) * xi`. `broken=True` builds the variant whose chains share one key;
    with `broadcast_opt_in=True` it is run anyway (`keys="broadcast"`).
    """

    def train(key: Any) -> tuple[Problem, np.ndarray]:
        problem = make_problem(cfg, eqx_rng.derive(key, "data"))
        x = jnp.asarray(problem.x, jnp.float32)
        y = jnp.asarray(problem.y, jnp.float32)
        var, prior_var = cfg.noise_std**2, cfg.prior_std**2

        def loss_fn(theta: PyTree, state: Any, batch: Any, *, key: Any) -> Any:
            """Minibatch mean of `-log p(y_i | theta) - log p(theta) / N`."""
            idx = jr.randint(
                eqx_rng.derive(key, "batch"), (cfg.batch_size,), 0, cfg.n_data
            )
            resid = y[idx] - x[idx] @ theta["w"] - theta["b"]
            prior = jnp.sum(theta["w"] ** 2) + theta["b"] ** 2
            nll = jnp.mean(resid**2) / (2 * var)
            return nll + prior / (2 * prior_var * cfg.n_data), (state, None)

        def init_theta(*, key: Any) -> PyTree:
            template = {"w": jnp.zeros(cfg.dim), "b": jnp.zeros(())}
            return jax.tree.map(
                lambda z: cfg.prior_std * z, eqx_rng.tree_normal(key, template)
            )

        # Chain c starts from a prior draw keyed by derive(init_key, c): overdispersed.
        theta0 = eqx_rng.ensemble(init_theta, eqx_rng.derive(key, "init"), cfg.chains)
        optimizer = eqx_rng.optim.sgld(problem.step_size, num_data=cfg.n_data)
        draws = sample_chains(
            loss_fn,
            optimizer,
            theta0,
            eqx_rng.derive(key, "sgld"),
            n_saved=cfg.steps // cfg.thin,
            thin=cfg.thin,
            shared_key=eqx_rng.derive(key, "shared-noise") if broken else None,
            broadcast_opt_in=broadcast_opt_in,
        )
        return problem, draws

    return train


# ------------------------------------------------ Welling & Teh (2011), section 5.1

MIX_PRIOR_VAR = (10.0, 1.0)  # variances of theta1, theta2 (sigma_1^2, sigma_2^2)
MIX_X_VAR = 2.0  # sigma_x^2
MIX_TRUE = (0.0, 1.0)
MIX_GRID = ((-2.5, 3.5), (-3.5, 3.5), 601)  # theta1 range, theta2 range, points


def mixture_data(cfg: Config, key: Any) -> np.ndarray:
    """`mix_data` points from `1/2 N(theta1, 2) + 1/2 N(theta1 + theta2, 2)` at
    `theta = (0, 1)`."""
    pick = jr.bernoulli(eqx_rng.derive(key, "component"), 0.5, (cfg.mix_data,))
    z = jr.normal(eqx_rng.derive(key, "noise"), (cfg.mix_data,))
    t1, t2 = MIX_TRUE
    x = t1 + np.where(np.asarray(pick), t2, 0.0) + math.sqrt(MIX_X_VAR) * np.asarray(z)
    return np.asarray(x, np.float64)


def _mixture_loglik(x: Any, t1: Any, t2: Any, xp: Any) -> Any:
    """`log p(x | theta)` per point, for NumPy or JAX (`xp`); broadcasts."""
    c = -0.5 * math.log(2 * math.pi * MIX_X_VAR) + math.log(0.5)
    a = c - (x - t1) ** 2 / (2 * MIX_X_VAR)
    b = c - (x - t1 - t2) ** 2 / (2 * MIX_X_VAR)
    return xp.logaddexp(a, b)


def mixture_grid_posterior(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact posterior on a grid: `(theta1 axis, theta2 axis, mass)` with
    `mass[i, j]` the probability of the cell at `(theta1[i], theta2[j])`."""
    (lo1, hi1), (lo2, hi2), n = MIX_GRID
    g1, g2 = np.linspace(lo1, hi1, n), np.linspace(lo2, hi2, n)
    t1, t2 = np.meshgrid(g1, g2, indexing="ij")
    logp = -(t1**2) / (2 * MIX_PRIOR_VAR[0]) - t2**2 / (2 * MIX_PRIOR_VAR[1])
    for xi in x:
        logp = logp + _mixture_loglik(xi, t1, t2, np)
    mass = np.exp(logp - logp.max())
    return g1, g2, mass / mass.sum()


def mode_a(t1: Any, t2: Any) -> Any:
    """The half-plane of the mode near the true `(0, 1)`; the other mode, near
    `(1, -1)` (`theta1 + theta2` and `-theta2` swap the components), lies across
    the perpendicular bisector of the two points."""
    return (t1 - 0.5) - 2 * t2 < 0


def make_mixture_train(cfg: Config) -> Callable[[Any], Any]:
    """`train(key) -> (x, draws)`: `mix_chains` SGLD chains on the mixture
    posterior, one vmapped program; `draws` is `(chains, kept, 2)`."""

    def train(key: Any) -> tuple[np.ndarray, np.ndarray]:
        x_np = mixture_data(cfg, eqx_rng.derive(key, "data"))
        x = jnp.asarray(x_np, jnp.float32)

        def loss_fn(theta: PyTree, state: Any, batch: Any, *, key: Any) -> Any:
            idx = jr.randint(
                eqx_rng.derive(key, "batch"), (cfg.mix_batch,), 0, cfg.mix_data
            )
            t1, t2 = theta["t"][0], theta["t"][1]
            nll = -jnp.mean(_mixture_loglik(x[idx], t1, t2, jnp))
            prior = t1**2 / (2 * MIX_PRIOR_VAR[0]) + t2**2 / (2 * MIX_PRIOR_VAR[1])
            return nll + prior / cfg.mix_data, (state, None)

        def init_theta(*, key: Any) -> PyTree:
            sd = jnp.sqrt(jnp.asarray(MIX_PRIOR_VAR, jnp.float32))
            return {"t": sd * jr.normal(key, (2,))}  # a prior draw

        theta0 = eqx_rng.ensemble(
            init_theta, eqx_rng.derive(key, "init"), cfg.mix_chains
        )
        optimizer = eqx_rng.optim.sgld(cfg.mix_step_size, num_data=cfg.mix_data)
        draws = sample_chains(
            loss_fn,
            optimizer,
            theta0,
            eqx_rng.derive(key, "sgld"),
            n_saved=cfg.mix_steps // cfg.mix_thin,
            thin=cfg.mix_thin,
            record=lambda theta: theta["t"],
        )
        return x_np, draws

    return train


def analyse_mixture(cfg: Config, x: np.ndarray, draws: np.ndarray) -> dict[str, Any]:
    """Each mode's mass: SGLD (post-burn-in draws of all chains) against the grid."""
    g1, g2, mass = mixture_grid_posterior(x)
    t1, t2 = np.meshgrid(g1, g2, indexing="ij")
    grid_a = float(mass[mode_a(t1, t2)].sum())
    post = draws[:, cfg.mix_burn_in // cfg.mix_thin :]
    in_a = mode_a(post[..., 0], post[..., 1])
    per_chain = in_a.mean(axis=1)
    sgld_a = float(per_chain.mean())
    se = float(per_chain.std(ddof=1) / math.sqrt(cfg.mix_chains))
    switched = float(np.mean((per_chain > 0) & (per_chain < 1)))
    ok = abs(sgld_a - grid_a) <= cfg.mix_tol
    return {
        "grid_mass_mode_a": grid_a,
        "grid_mass_mode_b": 1 - grid_a,
        "sgld_mass_mode_a": sgld_a,
        "sgld_mass_mode_b": 1 - sgld_a,
        "sgld_mass_se": se,
        "chains_visiting_both_modes": switched,
        "tolerance": cfg.mix_tol,
        "checks": {f"each mode's mass within {cfg.mix_tol} of the grid": ok},
        "passed": ok,
    }


def report_mixture(res: dict[str, Any]) -> str:
    return "\n".join(
        [
            "Gaussian mixture (Welling & Teh 2011, 5.1): mass of each mode",
            f"  mode near (0, 1):  grid {res['grid_mass_mode_a']:.4f}, SGLD "
            f"{res['sgld_mass_mode_a']:.4f} (+/- {res['sgld_mass_se']:.4f} s.e.)",
            f"  mode near (1, -1): grid {res['grid_mass_mode_b']:.4f}, SGLD "
            f"{res['sgld_mass_mode_b']:.4f}",
            f"  chains that visited both modes: "
            f"{100 * res['chains_visiting_both_modes']:.0f}%",
            *(
                f"  [{'PASS' if ok else 'FAIL'}] {name}"
                for name, ok in res["checks"].items()
            ),
        ]
    )


def plot_mixture(
    path: Path, cfg: Config, x: np.ndarray, draws: np.ndarray, title: str
) -> None:
    import matplotlib.pyplot as plt

    g1, g2, mass = mixture_grid_posterior(x)
    post = draws[:, cfg.mix_burn_in // cfg.mix_thin :].reshape(-1, 2)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharex=True, sharey=True)
    for ax, label in zip(
        axes, ("exact posterior (grid)", "SGLD draws, all chains"), strict=True
    ):
        ax.set_xlabel("theta1")
        ax.set_title(label)
    axes[0].set_ylabel("theta2")
    axes[0].contourf(g1, g2, mass.T, levels=20, cmap="viridis")
    axes[1].hist2d(
        post[:, 0],
        post[:, 1],
        bins=(np.linspace(*MIX_GRID[0], 120), np.linspace(*MIX_GRID[1], 120)),
        cmap="viridis",
    )
    for ax in axes:
        ax.plot([0, 1], [1, -1], "r+", ms=10, label="modes (0, 1), (1, -1)")
        line = np.linspace(*MIX_GRID[0], 2)
        ax.plot(line, (line - 0.5) / 2, "w--", lw=1, label="mode boundary")
        ax.legend(fontsize=7, loc="lower left")
    _common.finish(fig, path, title, dpi=100)


# -------------------------------------------------------------------------- analysis


def analyse(cfg: Config, problem: Problem, draws: np.ndarray) -> dict[str, Any]:
    """Diagnostics and checks of the post-burn-in draws against the exact posterior."""
    post = draws[:, cfg.burn_in // cfg.thin :]  # (chains, kept, d)
    pooled = post.reshape(-1, post.shape[-1])
    mean = pooled.mean(axis=0)
    cov = np.cov(pooled, rowvar=False)
    ess = np.asarray(effective_sample_size(post), np.float64)
    rhat = np.asarray(split_gelman_rubin(post), np.float64)
    sd = np.sqrt(np.diag(cov))
    mcse = sd / np.sqrt(ess)
    z = (mean - problem.mean) / mcse
    # Mean pairwise correlation of the chains' traces, per coordinate.
    centred = post - post.mean(axis=1, keepdims=True)
    normed = centred / np.maximum(
        np.linalg.norm(centred, axis=1, keepdims=True), 1e-300
    )
    corr = np.einsum("ckd,ekd->dce", normed, normed)  # (d, chains, chains)
    off = ~np.eye(cfg.chains, dtype=bool)
    chain_corr = corr[:, off].mean(axis=-1)
    predicted = sgld_stationary_cov(cfg, problem)
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    checks = {
        "mean within 3 MCSE": bool(np.all(np.abs(z) <= 3.0)),
        "R-hat <= 1.01": bool(np.all(rhat <= 1.01)),
        "chains independent (mean pairwise corr < 0.2)": bool(
            np.all(np.abs(chain_corr) < 0.2)
        ),
    }
    return {
        "step_size": problem.step_size,
        "exact_mean": problem.mean,
        "sgld_mean": mean,
        "mcse": mcse,
        "z_scores": z,
        "exact_sd": np.sqrt(np.diag(problem.cov)),
        "sgld_sd": sd,
        "predicted_sgld_sd": np.sqrt(np.diag(predicted)),
        "ess": ess,
        "rhat": rhat,
        "chain_corr": chain_corr,
        "cov_rel_error_vs_exact": rel(cov, problem.cov),
        "cov_rel_error_vs_predicted_sgld": rel(cov, predicted),
        "predicted_sgld_cov_bias": rel(predicted, problem.cov),
        "checks": checks,
        "passed": all(checks.values()),
    }


def param_names(cfg: Config) -> list[str]:
    return (
        list(PARAM_NAMES)
        if cfg.dim == 2
        else [f"w[{i}]" for i in range(cfg.dim)] + ["b"]
    )


def report(cfg: Config, res: dict[str, Any]) -> str:
    names = param_names(cfg)
    rows = [
        [
            name,
            float(res["exact_mean"][j]),
            float(res["sgld_mean"][j]),
            float(res["mcse"][j]),
            f"{res['z_scores'][j]:+.2f}",
            float(res["exact_sd"][j]),
            float(res["sgld_sd"][j]),
            float(res["predicted_sgld_sd"][j]),
            f"{res['ess'][j]:.0f}",
            f"{res['rhat'][j]:.4f}",
            f"{res['chain_corr'][j]:+.3f}",
        ]
        for j, name in enumerate(names)
    ]
    table = _common.format_table(
        [
            "param",
            "exact mean",
            "SGLD mean",
            "MCSE",
            "z",
            "exact sd",
            "SGLD sd",
            "pred. SGLD sd",
            "ESS",
            "R-hat",
            "chain corr",
        ],
        rows,
    )
    lines = [
        table,
        "",
        f"step size eps = {res['step_size']:.3e}; covariance relative error vs exact "
        f"{res['cov_rel_error_vs_exact']:.4f} (SGLD's own predicted bias "
        f"{res['predicted_sgld_cov_bias']:.4f}; error vs the predicted SGLD covariance "
        f"{res['cov_rel_error_vs_predicted_sgld']:.4f})",
        "",
        *(
            f"  [{'PASS' if ok else 'FAIL'}] {name}"
            for name, ok in res["checks"].items()
        ),
    ]
    return "\n".join(lines)


def plot(
    path: Path,
    cfg: Config,
    problem: Problem,
    draws: np.ndarray,
    res: dict[str, Any],
    title: str,
) -> None:
    import matplotlib.pyplot as plt

    names = param_names(cfg)
    d = len(names)
    steps = (np.arange(draws.shape[1]) + 1) * cfg.thin
    post = draws[:, cfg.burn_in // cfg.thin :]
    fig = plt.figure(figsize=(4.2 * (d + 1), 7.5))
    grid = fig.add_gridspec(2, d + 1)
    colours = plt.get_cmap("tab10")
    for j, name in enumerate(names):
        mu, sd = problem.mean[j], math.sqrt(problem.cov[j, j])
        ax = fig.add_subplot(grid[0, j])
        for c in range(cfg.chains):
            ax.plot(
                steps,
                draws[c, :, j],
                lw=0.4,
                alpha=0.7,
                color=colours(c % 10),
                label=f"chain {c}",
            )
        ax.axvline(cfg.burn_in, color="black", ls=":", lw=1, label="end of burn-in")
        ax.axhspan(
            mu - 2 * sd,
            mu + 2 * sd,
            color="grey",
            alpha=0.25,
            label="exact mean +/- 2 sd",
        )
        ax.set_xscale("log")
        ax.set_xlabel("SGLD step (log scale)")
        ax.set_ylabel(name)
        ax.set_title(f"trace of {name} ({cfg.chains} chains)")
        if j == 0:
            ax.legend(fontsize=6, ncol=2, loc="best")
        ax = fig.add_subplot(grid[1, j])
        ax.hist(
            post[:, :, j].ravel(),
            bins=80,
            density=True,
            color="tab:blue",
            alpha=0.6,
            label="SGLD draws (all chains)",
        )
        xs = np.linspace(mu - 4.5 * sd, mu + 4.5 * sd, 400)
        ax.plot(
            xs,
            np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)),
            color="black",
            lw=1.5,
            label="exact posterior",
        )
        psd = res["predicted_sgld_sd"][j]
        ax.plot(
            xs,
            np.exp(-0.5 * ((xs - mu) / psd) ** 2) / (psd * math.sqrt(2 * math.pi)),
            color="tab:red",
            ls="--",
            lw=1.2,
            label="SGLD's predicted stationary law",
        )
        ax.set_xlim(xs[0], xs[-1])
        ax.set_xlabel(name)
        ax.set_ylabel("density")
        ax.set_title(
            f"{name}: z = {res['z_scores'][j]:+.2f}, R-hat {res['rhat'][j]:.4f}"
        )
        ax.legend(fontsize=6, loc="upper left")
    ax = fig.add_subplot(grid[:, d])
    pts = post[:, :: max(1, post.shape[1] // 400), :2].reshape(-1, 2)
    ax.scatter(
        pts[:, 0], pts[:, 1], s=2, alpha=0.3, color="tab:blue", label="SGLD draws"
    )
    angles = np.linspace(0, 2 * np.pi, 200)
    chol = np.linalg.cholesky(problem.cov[:2, :2])
    for r in (1, 2, 3):
        ring = problem.mean[:2, None] + r * chol @ np.stack(
            [np.cos(angles), np.sin(angles)]
        )
        ax.plot(
            ring[0],
            ring[1],
            color="black",
            lw=1,
            label="exact 1, 2, 3 sd" if r == 1 else None,
        )
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(f"joint posterior of {names[0]}, {names[1]}")
    ax.legend(fontsize=8, loc="upper right")
    _common.finish(fig, path, title, dpi=100)


# ------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _common.experiment_parser(
        None,
        "SGLD on Bayesian linear regression, checked against the exact posterior.",
        out="runs/sgld",
        seed_help="seed of the data and the chains (default: %(default)s)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--broken",
        action="store_true",
        help="run the variant whose noise is shared across chains; must fail",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config.tiny() if args.tiny else Config()
    try:
        cfg.validate()
        out = _common.prepare_out_dir(args.out)
    except _common.UsageError as e:
        print(f"sgld.py: error: {e}", file=sys.stderr)
        return 2
    key = eqx_rng.as_key(args.seed)
    name = "sgld-broken" if args.broken else "sgld"
    print(
        f"SGLD on Bayesian linear regression: {cfg.chains} chains x {cfg.steps} steps, batch {cfg.batch_size} of {cfg.n_data}{' (BROKEN variant)' if args.broken else ''}"
    )

    caught: str | None = None
    start = time.perf_counter()
    if args.broken:
        try:
            make_train(cfg, broken=True)(key)
        except eqx_rng.BroadcastKeyError as e:
            caught = f"{type(e).__name__}: {e}"
            print("\nCaught at trace time, before anything ran:\n")
            print("  " + caught.replace("\n", "\n  "))
            print(
                "\nRunning it anyway with the check switched off (keys='broadcast') to show what it would have done:\n"
            )
        problem, draws = make_train(cfg, broken=True, broadcast_opt_in=True)(key)
    else:
        problem, draws = make_train(cfg)(key)
    wall = time.perf_counter() - start
    res = analyse(cfg, problem, draws)
    print(report(cfg, res))
    print(f"\nwall time {wall:.1f} s (compilation included)")
    mixture: dict[str, Any] | None = None
    if not args.broken:
        print(
            f"\nSGLD on the Gaussian mixture of Welling & Teh (2011): {cfg.mix_chains} "
            f"chains x {cfg.mix_steps} steps, batch {cfg.mix_batch} of {cfg.mix_data}"
        )
        mix_start = time.perf_counter()
        x_mix, mix_draws = make_mixture_train(cfg)(eqx_rng.derive(key, "mixture"))
        mix_wall = time.perf_counter() - mix_start
        mixture = analyse_mixture(cfg, x_mix, mix_draws)
        mixture["wall_time_s"] = mix_wall
        print(report_mixture(mixture))
        print(f"\nwall time {mix_wall:.1f} s (compilation included)")
        plot_mixture(
            out / "sgld-mixture.png",
            cfg,
            x_mix,
            mix_draws,
            title=f"SGLD vs the exact bimodal posterior (Welling & Teh 2011, 5.1; seed {args.seed})",
        )
        res["checks"].update(mixture["checks"])
        res["passed"] = res["passed"] and mixture["passed"]

    plot(
        out / f"{name}.png",
        cfg,
        problem,
        draws,
        res,
        title=f"SGLD vs the exact posterior{' — BROKEN: noise shared across chains' if args.broken else ''} (seed {args.seed})",
    )
    summary = {
        "experiment": name,
        "config": _common.config_dict(cfg),
        "seed": args.seed,
        "results": res,
        "mixture": mixture,
        "broadcast_key_error": caught,
        "wall_time_s": wall,
    }
    _common.write_summary(out / f"{name}.json", summary)
    print(f"wrote {out / (name + '.png')} and {out / (name + '.json')}")

    if args.broken:
        if caught is not None:
            print(
                "\nBROKEN variant: refused by eqx_rng.vmap (BroadcastKeyError); exit 3."
            )
            return 3
        print(
            "\nBROKEN variant: BroadcastKeyError was NOT raised"
            + (
                "; the statistics caught it; exit 1."
                if not res["passed"]
                else " and the statistics missed it; exit 1."
            )
        )
        return 1
    print("\nall checks passed" if res["passed"] else "\nSOME CHECKS FAILED")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
