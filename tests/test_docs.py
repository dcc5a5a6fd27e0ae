"""Runs every ```python block of every documentation page and of README.md.

A page's blocks run in order in one namespace, as a reader would paste them into one
session, so a later block may use what an earlier one defined. Every page starts from
an empty namespace (its own imports included). A block that cannot run here (it needs
several processes, say) is marked by an HTML comment on the line just above its fence,
`<!-- not run: <reason> -->`; the reason is required, and such blocks are rare.

All pages run in one subprocess with 8 CPU devices
(`--xla_force_host_platform_device_count=8`), so that the pages about sharding run as
written, and with warnings turned into errors as in the rest of the suite. The
subprocess reports, per page, the blocks run, the time taken and the traceback of a
failure; one test here checks every page and names each page that failed.
"""

import json
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_FENCE = re.compile(
    r"^(?P<indent>[ ]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ ]*$",
    re.DOTALL | re.MULTILINE,
)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>\S.*?)\s*-->")


def doc_pages() -> list[Path]:
    """README.md and every Markdown page under docs/, relative to the repository."""
    pages = [Path("README.md")]
    pages += sorted(p.relative_to(REPO) for p in (REPO / "docs").rglob("*.md"))
    return pages


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """`(first line, code, reason not run or None)` of each ```python block."""
    blocks = []
    for m in _FENCE.finditer(text):
        if m.group("lang").strip().split(" ")[0] != "python":
            continue
        before = text[: m.start()].rstrip("\n").splitlines()
        marker = _NOT_RUN.search(before[-1]) if before else None
        first_line = text.count("\n", 0, m.start("body")) + 1
        indent = len(m.group("indent"))
        code = "\n".join(line[indent:] for line in m.group("body").splitlines())
        blocks.append((first_line, code, marker.group("reason") if marker else None))
    return blocks


def _run_page(page: str) -> dict:
    text = (REPO / page).read_text(encoding="utf-8")
    namespace: dict = {"__name__": "__main__"}
    start = time.perf_counter()
    ran = 0
    for first_line, code, not_run in python_blocks(text):
        if not_run is not None:
            continue
        # Pad with newlines so that tracebacks show the page's own line numbers.
        source = "\n" * (first_line - 1) + code
        try:
            exec(compile(source, page, "exec"), namespace)
        except BaseException:
            return {
                "ok": False,
                "blocks": ran,
                "seconds": time.perf_counter() - start,
                "error": traceback.format_exc(),
            }
        ran += 1
    return {"ok": True, "blocks": ran, "seconds": time.perf_counter() - start}


def _main(pages: list[str]) -> None:
    warnings.simplefilter("error")
    results = {page: _run_page(page) for page in pages}
    sys.stdout.write("\n@@RESULTS@@" + json.dumps(results))


_RESULTS: dict = {}


def _results() -> dict:
    if not _RESULTS:
        from helpers import xla_flags_with_devices  # not in the runner process

        env = dict(os.environ)
        env["XLA_FLAGS"] = xla_flags_with_devices(8)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
        )
        proc = subprocess.run(
            [sys.executable, __file__, *map(str, doc_pages())],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        out, sep, payload = proc.stdout.rpartition("@@RESULTS@@")
        assert sep, f"the docs runner died:\n{proc.stdout}\n{proc.stderr}"
        _RESULTS.update(json.loads(payload))
    return _RESULTS


def test_every_page_blocks_run():
    # One test for all pages (their blocks run in one subprocess): a test per page
    # would, under pytest-xdist, run that subprocess once in every worker.
    results = _results()
    assert sorted(results) == sorted(map(str, doc_pages()))
    failed = [
        f"{page}: a python block failed:\n{result['error']}"
        for page, result in results.items()
        if not result["ok"]
    ]
    assert not failed, "\n\n".join(failed)


def test_pages_have_python_blocks_and_few_skips():
    skipped = []
    for page in doc_pages():
        for line, _, reason in python_blocks((REPO / page).read_text("utf-8")):
            if reason is not None:
                skipped.append(f"{page}:{line} ({reason})")
    assert len(skipped) <= 3, f"too many blocks marked not run: {skipped}"
    assert python_blocks((REPO / "README.md").read_text("utf-8")), "README: no code"


def test_block_parser():
    text = (
        "# t\n\n```python\na = 1\n```\n\n<!-- not run: needs a cluster -->\n"
        "```python\nraise SystemExit\n```\n\n!!! Example\n\n    ```python\n"
        "    b = a + 1\n    ```\n\n```bash\nmake test\n```\n"
    )
    assert python_blocks(text) == [
        (4, "a = 1", None),
        (9, "raise SystemExit", "needs a cluster"),
        (15, "b = a + 1", None),
    ]


if __name__ == "__main__":
    _main(sys.argv[1:])
