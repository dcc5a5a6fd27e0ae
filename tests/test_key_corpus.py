"""The broadcast-key check on a corpus of real-code patterns (`tests/key_corpus/`).

Every snippet is marked "bug" or "ok". For each, the check's verdict must match the
mark (bugs the analysis cannot see are listed with the reason, and must be exactly
the misses), and the mark itself is confirmed by running the snippet with the check
suspended: a bug's rows are identical, a legitimate snippet's differ.
"""

import re

import jax
import numpy as np
import pytest
from helpers import REPO
from key_corpus import SNIPPETS, Snippet

import eqx_rng
from eqx_rng._util import is_typed_key
from eqx_rng._vmap._check import suspended


def _run(s: Snippet):
    call = s.make()
    return eqx_rng.vmap(call.fn, **call.options)(*call.args, **call.kwargs)


def _flagged(s: Snippet) -> bool:
    try:
        _run(s)
    except eqx_rng.BroadcastKeyError:
        return True
    return False


def _rows_equal(out) -> bool:
    leaves = [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array)]
    assert leaves
    for leaf in leaves:
        if is_typed_key(leaf):
            leaf = jax.random.key_data(leaf)
        rows = np.asarray(leaf)
        if not all(np.array_equal(rows[0], rows[i]) for i in range(1, len(rows))):
            return False
    return True


@pytest.mark.parametrize("s", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_snippet(s: Snippet):
    with suspended():
        truth_rows_equal = _rows_equal(_run(s))
    assert truth_rows_equal == s.rows_equal, "the snippet's mark is wrong"
    flagged = _flagged(s)
    if s.verdict == "ok":
        assert not flagged, "false alarm"
    elif s.miss is None:
        assert flagged, "missed bug"
    else:
        assert not flagged, (
            f"a documented miss is now caught: update its entry ({s.miss})"
        )


def _score() -> dict[str, int]:
    bugs = [s for s in SNIPPETS if s.verdict == "bug"]
    oks = [s for s in SNIPPETS if s.verdict == "ok"]
    caught = [s for s in bugs if s.miss is None]
    return {
        "snippets": len(SNIPPETS),
        "bugs": len(bugs),
        "ok": len(oks),
        "caught": len(caught),
        "false_alarms": 0,  # test_snippet asserts none
    }


def test_corpus_size_and_documented_score():
    score = _score()
    assert score["snippets"] >= 30
    styles = {s.pattern.split(":")[0] for s in SNIPPETS}
    assert {"Equinox", "numpyro", "blackjax", "optax", "Flax"} <= styles
    # docs/key-check.md states these numbers; keep them in step.
    page = (REPO / "docs" / "key-check.md").read_text()
    line = (
        f"{score['snippets']} snippets: {score['bugs']} buggy, {score['ok']} "
        f"legitimate. Caught {score['caught']} of {score['bugs']} bugs (recall "
        f"{score['caught'] / score['bugs']:.0%}), with 0 false alarms (precision "
        f"100%)."
    )
    assert line in re.sub(r"\s+", " ", page), line
