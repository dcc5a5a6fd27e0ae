"""Runs every ```python example in the docstrings of the public API."""

import inspect
import re
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqx_rng

_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _public_modules():
    mods = [eqx_rng]
    for name in ("nn", "debug", "optim"):
        mod = getattr(eqx_rng, name, None)
        if mod is not None:
            mods.append(mod)
    return mods


def _documented():
    seen = set()
    for mod in _public_modules():
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            if getattr(obj, "__module__", "").split(".")[0] != "eqx_rng":
                continue
            qual = f"{mod.__name__}.{name}"
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            yield qual, obj
            if inspect.isclass(obj):
                for meth in ("__init__", "__call__"):
                    fn = obj.__dict__.get(meth)
                    if fn is not None and getattr(fn, "__doc__", None):
                        yield f"{qual}.{meth}", fn


_ITEMS = list(_documented())


def test_every_public_name_has_an_example():
    missing = [
        qual
        for qual, obj in _ITEMS
        if not qual.endswith(("__init__", "__call__"))
        and not _BLOCK.search(inspect.getdoc(obj) or "")
    ]
    assert missing == [], f"public names without a docstring example: {missing}"


@pytest.mark.parametrize("qual,obj", _ITEMS, ids=[q for q, _ in _ITEMS])
def test_docstring_examples_run(qual, obj):
    doc = inspect.getdoc(obj) or ""
    blocks = _BLOCK.findall(doc)
    for block in blocks:
        namespace = {
            "eqx_rng": eqx_rng,
            "eqx": eqx,
            "jax": jax,
            "jnp": jnp,
            "jr": jr,
            "np": np,
        }
        exec(
            compile(textwrap.dedent(block), f"<docstring of {qual}>", "exec"), namespace
        )
