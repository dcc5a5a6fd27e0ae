"""The contract every layer in `eqx_rng.nn` keeps (DESIGN.md, "Layers").

Stochastic layers: same key same output, new key new output, inference is the
identity with no key (field, per-call override, `eqx.nn.inference_mode`),
`filter_jit` equals eager, independent rows under vmap with derived keys, shape and
dtype kept, the missing-key error, bad construction arguments. `BatchNorm` keeps the
parts that apply to a deterministic stateful layer.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import tree_allclose

import eqx_rng

# (name, factory, per_unit): per_unit layers draw per element; DropPath draws once
# per example.
STOCHASTIC = [
    ("Dropout", lambda **kw: eqx_rng.nn.Dropout(0.5, **kw), True),
    ("GaussianNoise", lambda **kw: eqx_rng.nn.GaussianNoise(1.0, **kw), True),
    ("GaussianDropout", lambda **kw: eqx_rng.nn.GaussianDropout(0.5, **kw), True),
    ("DropPath", lambda **kw: eqx_rng.nn.DropPath(0.5, **kw), False),
]
IDS = [name for name, _, _ in STOCHASTIC]
DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
SHAPES = [(), (7,), (2, 3, 4)]


def _x(key, shape=(4, 5), dtype=jnp.float32):
    return 1 + jr.normal(key, shape, dtype)


def _equal(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(jnp.array_equal(a, b))


def _same_draw(a, b) -> bool:
    """Equal up to float rounding (XLA fuses jitted code differently from eager), with
    the same zero pattern (the same Bernoulli draws)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and bool(jnp.array_equal(a == 0, b == 0))
        and bool(jnp.allclose(a, b, rtol=1e-6, atol=1e-6))
    )


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
def test_same_key_same_output(name, make, per_unit, getkey):
    layer, x, k = make(), _x(getkey()), getkey()
    assert _equal(layer(x, key=k), layer(x, key=k))


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
def test_new_key_new_output(name, make, per_unit, getkey):
    layer, x = make(), _x(getkey())
    outs = [np.asarray(layer(x, key=getkey())) for _ in range(16)]
    assert len({o.tobytes() for o in outs}) > 1
    if per_unit:  # per-element draws: two keys differ (probability ~1)
        assert not np.array_equal(outs[0], outs[1])


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
def test_inference_is_identity_without_key(name, make, per_unit, getkey):
    x = _x(getkey())
    assert make(inference=True)(x) is x  # the field
    assert make()(x, inference=True) is x  # the per-call override
    assert eqx.nn.inference_mode(make())(x) is x  # eqx.nn.inference_mode
    back = eqx.nn.inference_mode(eqx.nn.inference_mode(make()), value=False)
    with pytest.raises(ValueError, match="key="):
        back(x)


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
def test_per_call_override_beats_field(name, make, per_unit, getkey):
    x, k = _x(getkey()), getkey()
    assert _equal(make(inference=True)(x, key=k, inference=False), make()(x, key=k))


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
def test_inference_mode_inside_a_model(name, make, per_unit, getkey):
    model = eqx.nn.Sequential([make(), eqx.nn.Lambda(jnp.tanh), make()])
    x = _x(getkey())
    assert _equal(eqx.nn.inference_mode(model)(x), jnp.tanh(x))
    y = model(x, key=getkey())  # Sequential splits the key among its layers
    assert y.shape == x.shape


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
def test_filter_jit_equals_eager(name, make, per_unit, getkey):
    layer, x, k = make(), _x(getkey()), getkey()
    jitted = eqx.filter_jit(lambda m, x, k: m(x, key=k))
    assert _same_draw(jitted(layer, x, k), layer(x, key=k))
    # inference mode under jit, no key
    inf = eqx.filter_jit(lambda m, x: m(x))(eqx.nn.inference_mode(layer), x)
    assert _equal(inf, x)


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
@pytest.mark.parametrize("derive", ["split", "grid_keys"])
def test_vmap_rows_are_independent(name, make, per_unit, derive, getkey):
    layer, n = make(), 32
    xs = jnp.ones((n, 64))  # identical rows: any difference comes from the keys
    key = getkey()
    keys = jr.split(key, n) if derive == "split" else eqx_rng.grid_keys(key, (n,))
    ys = jax.vmap(lambda x, k: layer(x, key=k))(xs, keys)
    rows = {np.asarray(y).tobytes() for y in ys}
    assert len(rows) > 1
    if per_unit:
        assert len(rows) == n
    # row i equals the eager call with key i
    assert _same_draw(ys[3], layer(xs[3], key=keys[3]))
    ys_eqx = eqx.filter_vmap(lambda x, k: layer(x, key=k))(xs, keys)
    assert _equal(ys, ys_eqx)


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shape_and_dtype_are_kept(name, make, per_unit, dtype, shape, getkey):
    layer, x = make(), _x(getkey(), shape, dtype)
    y = layer(x, key=getkey())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(jnp.all(jnp.isfinite(y)))
    y_inf = layer(x, inference=True)
    assert y_inf.shape == x.shape and y_inf.dtype == x.dtype


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
def test_gradients_are_finite(name, make, per_unit, getkey):
    layer, x, k = make(), _x(getkey()), getkey()
    g = jax.grad(lambda x: jnp.sum(layer(x, key=k) ** 2))(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
def test_missing_key_message(name, make, per_unit, getkey):
    x = _x(getkey())
    with pytest.raises(
        ValueError, match=rf"(?s)`{name}` needs `key=`.*eqx\.nn\.inference_mode"
    ):
        make()(x)
    with pytest.raises(ValueError, match=rf"`{name}` needs `key=`"):
        make(inference=True)(x, inference=False)


@pytest.mark.parametrize("name,make,per_unit", STOCHASTIC, ids=IDS)
def test_legacy_key_points_to_as_key(name, make, per_unit, getkey):
    if not eqx_rng.typecheck_enabled():
        pytest.skip("typecheck is off")
    with pytest.raises(TypeError, match="as_key"):
        make()(_x(getkey()), key=jax.random.PRNGKey(0))


BAD_ARGS = [
    (lambda: eqx_rng.nn.Dropout(p=1.5), r"Dropout\(p=\.\.\.\).*p=1\.5"),
    (lambda: eqx_rng.nn.Dropout(p=-0.1), r"Dropout\(p=\.\.\.\).*p=-0\.1"),
    (lambda: eqx_rng.nn.Dropout(p=float("nan")), r"Dropout\(p=\.\.\.\).*p=nan"),
    (lambda: eqx_rng.nn.GaussianNoise(std=-1.0), r"GaussianNoise\(std=.*std=-1\.0"),
    (lambda: eqx_rng.nn.GaussianNoise(std=jnp.inf), r"GaussianNoise\(std=.*std=inf"),
    (lambda: eqx_rng.nn.GaussianDropout(p=1.0), r"GaussianDropout\(p=.*p=1\.0"),
    (lambda: eqx_rng.nn.GaussianDropout(p=-0.5), r"GaussianDropout\(p=.*p=-0\.5"),
    (lambda: eqx_rng.nn.DropPath(p=2), r"DropPath\(p=\.\.\.\).*p=2\.0"),
    (lambda: eqx_rng.nn.DropPath(p=jnp.array(1.5)), r"DropPath\(p=.*p=1\.5"),
    (lambda: eqx_rng.nn.BatchNorm(0), r"num_features=0"),
    (lambda: eqx_rng.nn.BatchNorm(-3), r"num_features=-3"),
    (lambda: eqx_rng.nn.BatchNorm(3, momentum=1.0), r"momentum=1\.0"),
    (lambda: eqx_rng.nn.BatchNorm(3, momentum=-0.1), r"momentum=-0\.1"),
    (lambda: eqx_rng.nn.BatchNorm(3, eps=0.0), r"eps=0\.0"),
    (lambda: eqx_rng.nn.BatchNorm(3, eps=-1e-5), r"eps=-1e-05"),
    (lambda: eqx_rng.nn.BatchNorm(3, axis_name=()), r"axis_name"),
    (lambda: eqx_rng.nn.Dropout(0.5, broadcast_dims=(0, 0)), r"broadcast_dims"),
    (lambda: eqx_rng.nn.GaussianNoise(1.0, broadcast_dims=(1, 1)), r"twice"),
    (lambda: eqx_rng.nn.GaussianDropout(0.5, broadcast_dims=(2, 2)), r"\(2, 2\)"),
    (
        lambda: eqx_rng.nn.BayesLinear(3, 0, key=jr.key(0)),
        r"BayesLinear\(out_features=\.\.\.\).*out_features=0",
    ),
    (
        lambda: eqx_rng.nn.BayesLinear(3, 2, key=jr.key(0), prior_std=-1.0),
        r"BayesLinear\(prior_std=\.\.\.\).*prior_std=-1\.0",
    ),
    (
        lambda: eqx_rng.nn.LayerStack(eqx.nn.Identity, 0, key=jr.key(0)),
        r"LayerStack\(num_layers=\.\.\.\).*num_layers=0",
    ),
]


@pytest.mark.parametrize("build,match", BAD_ARGS)
def test_bad_construction_args(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: eqx_rng.nn.Dropout("0.5"),  # type: ignore[arg-type]
        lambda: eqx_rng.nn.GaussianNoise(True),
        lambda: eqx_rng.nn.DropPath(jnp.ones(2)),
        lambda: eqx_rng.nn.BatchNorm(2.0),  # type: ignore[arg-type]
    ],
)
def test_wrong_argument_types(build):
    with pytest.raises(TypeError):
        build()


def test_gaussian_noise_has_no_default_std():
    with pytest.raises(TypeError):
        eqx_rng.nn.GaussianNoise()  # type: ignore[call-arg]


# ---------------------------------------------------------------- BatchNorm


def _bn_train(bn):
    return eqx.filter_vmap(
        lambda x, s, k: bn(x, s, key=k),
        in_axes=(0, None, 0),
        out_axes=(0, None),
        axis_name="batch",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("spatial", [(), (3, 2)], ids=str)
def test_batch_norm_contract(dtype, spatial, getkey):
    bn, state = eqx.nn.make_with_state(eqx_rng.nn.BatchNorm)(4)
    xs = _x(getkey(), (8, 4, *spatial), dtype)
    keys = jr.split(getkey(), 8)
    ys, new_state = _bn_train(bn)(xs, state, keys)
    # shape and dtype kept; the key is ignored (BatchNorm is deterministic)
    assert ys.shape == xs.shape and ys.dtype == xs.dtype
    ys2, new_state2 = _bn_train(bn)(xs, state, jr.split(getkey(), 8))
    assert _equal(ys, ys2) and tree_allclose(new_state, new_state2, rtol=0, atol=0)
    # filter_jit equals eager
    ys_jit, state_jit = eqx.filter_jit(_bn_train(bn))(xs, state, keys)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert jnp.allclose(ys_jit.astype(jnp.float32), ys.astype(jnp.float32), atol=tol)
    assert tree_allclose(state_jit, new_state, rtol=1e-6)
    # inference needs no key and no vmap; three ways to ask for it
    for model, kw in [
        (bn, {"inference": True}),
        (eqx.nn.inference_mode(bn), {}),
        (eqx.tree_at(lambda m: m.inference, bn, True), {}),  # the field
    ]:
        y, s = model(xs[0], new_state, **kw)
        assert y.shape == xs[0].shape and y.dtype == dtype and s is new_state
    # before any update inference is ~ the identity (mean 0, variance 1)
    y0, _ = bn(xs[0], state, inference=True)
    expected = xs[0].astype(jnp.float32) / np.sqrt(1 + 1e-5)
    assert jnp.allclose(y0.astype(jnp.float32), expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------- BayesLinear


def test_bayes_linear_contract(getkey):
    layer = eqx_rng.nn.BayesLinear(5, 3, key=getkey())
    x, k = _x(getkey(), (5,)), getkey()
    # same key same output, new key new output
    assert _equal(layer(x, key=k), layer(x, key=k))
    assert not _equal(layer(x, key=k), layer(x, key=getkey()))
    # inference: the mean weights, no key (field, per-call override, inference_mode)
    mean = layer(x, inference=True)
    assert _equal(eqx.nn.inference_mode(layer)(x), mean)
    assert _equal(
        eqx.nn.inference_mode(layer)(x, key=k, inference=False), layer(x, key=k)
    )
    with pytest.raises(
        ValueError, match=r"(?s)`BayesLinear` needs `key=`.*eqx\.nn\.inference_mode"
    ):
        layer(x)
    # filter_jit equals eager; vmapped rows independent and equal to eager calls
    jitted = eqx.filter_jit(lambda m, x, k: m(x, key=k))(layer, x, k)
    assert jnp.allclose(jitted, layer(x, key=k), rtol=1e-6, atol=1e-6)
    keys = eqx_rng.grid_keys(getkey(), (8,))
    ys = jax.vmap(lambda k: layer(x, key=k))(keys)
    assert len({np.asarray(y).tobytes() for y in ys}) == 8
    assert jnp.allclose(ys[3], layer(x, key=keys[3]), rtol=1e-6, atol=1e-6)
    # dtype kept; low precision computed in float32
    for dtype in DTYPES:
        y = layer(x.astype(dtype), key=k)
        assert y.shape == (3,) and y.dtype == dtype and bool(jnp.all(jnp.isfinite(y)))
