"""Every public name has an entry in the API reference (docs/api/*.md), and every
entry there names a public object.

Public names are those re-exported by `eqx_rng` and its public submodules
(`eqx_rng.nn`, `eqx_rng.debug`, and `eqx_rng.optim` where it exists): their
`__all__` where defined, else every name without a leading underscore. An entry is
a mkdocstrings line `::: eqx_rng.<path>`.

The rendered signatures name only public things: the annotations and defaults
mkdocstrings shows (read with griffe, as mkdocstrings reads them) contain no private
name such as `_RateLike` or `eqx_rng._util`.
"""

import importlib
import inspect
import re
from pathlib import Path

import pytest

import eqx_rng

REPO = Path(__file__).resolve().parent.parent
_ENTRY = re.compile(r"^:::\s+(eqx_rng(?:\.\w+)*)\s*$", re.MULTILINE)
_SUBMODULES = ("nn", "debug", "optim")
# A private name: a leading underscore and a letter, not inside another word
# (`DEFAULT_AXES` is public) and not a dunder.
_PRIVATE = re.compile(r"(?<!\w)_[A-Za-z]\w*")
# Private names still rendered, each with the change that removes it. An entry that
# no longer matches fails `test_rendered_signatures_name_no_private_type`: delete it.
_PENDING: set[tuple[str, str]] = set()


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


def _signature_texts(obj, qualified: str):
    """`(where, text)` for every annotation, default and value that mkdocstrings
    renders for the griffe object `obj`: a function's parameters and return, a
    class's signature and the members its page shows (public ones, `__init__` and
    `__call__`; attributes only with a docstring, as in mkdocs.yml), an attribute's
    annotation and value."""
    obj = obj.final_target if obj.is_alias else obj
    if obj.is_function or obj.is_class:
        for param in obj.parameters:
            for part in (param.annotation, param.default):
                if part is not None:
                    yield f"{qualified}({param.name})", str(part)
        if obj.is_function and obj.returns is not None:
            yield f"{qualified} -> ", str(obj.returns)
    if obj.is_attribute:
        for part in (obj.annotation, obj.value):
            if part is not None:
                yield qualified, str(part)
    if obj.is_class:
        for name, member in obj.members.items():
            if name.startswith("_") and name not in ("__init__", "__call__"):
                continue
            if member.is_alias or (member.is_attribute and not member.docstring):
                continue
            yield from _signature_texts(member, f"{qualified}.{name}")


def private_names_in_signatures(entries) -> set[tuple[str, str, str]]:
    """`(entry, where, name)` for each private name in the rendered signatures of
    each reference entry."""
    griffe = pytest.importorskip("griffe", reason="griffe comes with the docs extra")
    package = griffe.load("eqx_rng", search_paths=[str(REPO)], resolve_aliases=False)
    found = set()
    for entry in entries:
        obj = package[entry.removeprefix("eqx_rng.")]
        for where, text in _signature_texts(obj, entry):
            found |= {(entry, where, name) for name in _PRIVATE.findall(text)}
    return found


def test_rendered_signatures_name_no_private_type():
    found = private_names_in_signatures(reference_entries())
    new = sorted((w, n) for e, w, n in found if (e, n) not in _PENDING)
    assert new == [], (
        f"private names in rendered signatures of the API reference: {new}; give "
        f"each a public name (a re-exported alias such as `eqx_rng.Rate`) and use "
        f"that in the signature."
    )
    stale = _PENDING - {(e, n) for e, _, n in found}
    assert stale == set(), f"fixed, so delete from `_PENDING`: {sorted(stale)}"


def test_private_name_check_sees_a_private_alias(tmp_path):
    # The check must catch what it exists for: a constructor annotated with a
    # private alias, as `Dropout(p: _RateLike)` once was.
    griffe = pytest.importorskip("griffe", reason="griffe comes with the docs extra")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(
        "_Alias = float\n"
        "class Layer:\n"
        "    def __init__(self, p: _Alias = 0.5, q: float = 1.0): ...\n"
        "    def public(self) -> '_Alias': ...\n"
        "    def _hidden(self, r: _Alias): ...\n"
    )
    package = griffe.load("pkg", search_paths=[str(tmp_path)])
    names = {
        (where, name)
        for where, text in _signature_texts(package["Layer"], "pkg.Layer")
        for name in _PRIVATE.findall(text)
    }
    assert names == {
        ("pkg.Layer(p)", "_Alias"),
        ("pkg.Layer.__init__(p)", "_Alias"),
        ("pkg.Layer.public -> ", "_Alias"),
    }
