import dataclasses, importlib, sys
import equinox as eqx, jax, jax.numpy as jnp
import eqx_rng
from helpers import REPO

def test_dbg():
    sys.path.insert(0, str(REPO / "experiments"))
    digits = importlib.import_module("digits")
    data = digits.load_data(); key = eqx_rng.as_key(0)
    res = {}
    for chains in (1, 3):
        cfg = dataclasses.replace(digits.Config.tiny(), chains=chains)
        res[chains] = digits.make_program(cfg, data).init(key)
    c = lambda t: jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, t)
    print("1 vs 3", eqx.tree_equal(c(res[1]), c(res[3])))
    print(res[1].model.blocks[0].linear.weight[0, 0, :4], res[3].model.blocks[0].linear.weight[:, 0, :4])
    assert False
