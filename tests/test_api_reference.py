"""Every public name has an entry in the API reference (docs/api/*.md), and every
entry there names a public object.

Public names are those re-exported by `eqx_rng` and its public submodules
(`eqx_rng.nn`, `eqx_rng.debug`, and `eqx_rng.optim` where it exists): their
`__all__` where defined, else every name without a leading underscore. An entry is
a mkdocstrings line `::: eqx_rng.<path>`.
"""

import importlib
import inspect
import re
from pathlib import Path

import eqx_rng

REPO = Path(__file__).resolve().parent.parent
_ENTRY = re.compile(r"^:::\s+(eqx_rng(?:\.\w+)*)\s*$", re.MULTILINE)
_SUBMODULES = ("nn", "debug", "optim")


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return [n for n in names if not inspect.ismodule(getattr(module, n))]


def public_names() -> set[str]:
    """Qualified names of the public API, e.g. `eqx_rng.nn.Dropout`."""
    names = {f"eqx_rng.{n}" for n in _public_names(eqx_rng)}
    for sub in _SUBMODULES:
        try:
            module = importlib.import_module(f"eqx_rng.{sub}")
        except ModuleNotFoundError:
            continue
        names |= {f"eqx_rng.{sub}.{n}" for n in _public_names(module)}
    return names


def reference_entries() -> dict[str, str]:
    """`{qualified name: page}` for every `::: ` entry under docs/api/."""
    entries = {}
    for page in sorted((REPO / "docs" / "api").glob("*.md")):
        for name in _ENTRY.findall(page.read_text(encoding="utf-8")):
            entries[name] = page.name
    return entries


def _resolve(qualified: str):
    obj = eqx_rng
    for part in qualified.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def test_every_public_name_has_a_reference_entry():
    missing = sorted(public_names() - set(reference_entries()))
    assert missing == [], f"public names without a `::: ` entry in docs/api/: {missing}"


def test_every_reference_entry_is_public():
    public = public_names()
    stale = sorted(name for name in reference_entries() if name not in public)
    assert stale == [], f"docs/api/ entries that are not public names: {stale}"
    for name in reference_entries():
        _resolve(name)  # an AttributeError here names the stale entry


def test_public_names_are_found():
    # The collection above must see the names a user imports.
    names = public_names()
    assert {"eqx_rng.derive", "eqx_rng.vmap", "eqx_rng.nn.Dropout"} <= names
    assert "eqx_rng.debug.doctor" in names
    assert not any(n.endswith((".nn", ".debug")) for n in names)
