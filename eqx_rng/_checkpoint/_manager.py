"""`CheckpointManager` and `latest_checkpoint`: numbered checkpoints in a directory."""

import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .._typecheck import typecheck
from ._files import drop_cached, remove_stale_temporaries, tmp_pattern
from ._format import err
from ._io import load_file, save_file
from ._records import LIBRARY_KEY, array_leaves
from ._sharded import needs_multihost, remove_checkpoints

_SUFFIX = ".ckpt"


def _step_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"(\d+)" + re.escape(_SUFFIX) + r"\Z")


def _steps(directory: Path, prefix: str) -> list[tuple[int, Path]]:
    pattern = _step_pattern(prefix)
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        m = pattern.match(name)
        if m is not None:
            found.append((int(m.group(1)), directory / name))
    found.sort()
    return found


@typecheck
def latest_checkpoint(
    directory: str | os.PathLike, *, prefix: str = "step_"
) -> Path | None:
    """The checkpoint of the highest step in `directory`, or `None`.

    Looks for files named `{prefix}{step}.ckpt` (as `CheckpointManager` writes them);
    anything else, such as the temporary files of a save interrupted by a crash, is
    ignored. Since `save` is atomic, every file it finds is complete.

    **Arguments:**

    - `directory`: The directory (a missing one has no checkpoints).
    - `prefix`: The file name prefix. (Keyword only argument.)

    **Returns:**

    A `pathlib.Path`, or `None` when there is no checkpoint.

    !!! Example

        ```python
        import tempfile

        directory = tempfile.mkdtemp()
        assert eqx_rng.latest_checkpoint(directory) is None
        manager = eqx_rng.CheckpointManager(directory)
        manager.save(10, {"w": jnp.zeros(2)})
        assert eqx_rng.latest_checkpoint(directory).name == "step_0000000010.ckpt"
        ```
    """
    steps = _steps(Path(directory), prefix)
    return steps[-1][1] if steps else None


class CheckpointManager:
    """Numbered checkpoints in one directory: save every so often, keep the last few.

    Files are named `{prefix}{step:010d}.ckpt` and written with `eqx_rng.save`
    (atomic, checksummed); the step is also recorded inside each file. After each
    save only the `keep` newest are kept. One writer per directory; any number of
    readers (an evaluator polling `latest()`) may come and go.

    **Roll-back.** After `restore` (of the newest checkpoint or of an earlier
    `step=`), the next `save(step)` first removes every checkpoint with a higher
    step than `step`: they belong to the run that was abandoned, and keeping them
    would make `latest()` (and a restart) resume that run. So `latest()` is always
    the newest write of this run. Without a `restore`, checkpoints are ordered by
    step only (saving a lower step leaves higher ones in place, as before).

    **Temporary files.** A save writes `.{name}.{host}.{pid}.{random}.tmp` and
    renames it. Creating a manager removes the temporaries that crashed saves left:
    those of this host whose process is gone, and those of other hosts (or of
    eqx_rng 0.1, which named no process) not modified for 24 hours. A live writer's
    temporary is never touched.

    A run that resumes from `restore` is bitwise identical to one that never stopped:
    a `TrainState` holds everything a step depends on.

    !!! Example

        ```python
        import tempfile, optax

        directory = tempfile.mkdtemp()
        manager = eqx_rng.CheckpointManager(directory, keep=2)
        model = eqx.nn.Linear(2, 1, key=jr.key(0))
        ts = eqx_rng.TrainState.create(model, optax.sgd(0.1), key=1)
        for step in (0, 5, 10):
            manager.save(step, ts)
        assert manager.steps() == [5, 10]

        # Resuming: build a fresh state (or its shapes), then restore into it.
        if manager.latest() is not None:
            ts = manager.restore(ts)

        # Rolling back: restore step 5; the next save removes step 10.
        ts = manager.restore(ts, step=5)
        manager.save(6, ts)
        assert manager.steps() == [5, 6]
        ```
    """

    @typecheck
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int | None = 3,
        prefix: str = "step_",
    ):
        """**Arguments:**

        - `directory`: Where the checkpoints go; created (with parents) if missing.
        - `keep`: How many of the newest checkpoints to keep (`>= 1`), or `None` to
            keep all. (Keyword only argument.)
        - `prefix`: The file name prefix. (Keyword only argument.)

        **Raises:**

        `ValueError` for `keep < 1`, a prefix containing a path separator or an
        empty `directory`; `NotADirectoryError` when `directory` is a file.
        """
        if keep is not None and (isinstance(keep, bool) or keep < 1):
            raise ValueError(
                f"`CheckpointManager(keep=...)` must be an int >= 1 or None, got "
                f"{keep!r}."
            )
        if not prefix or os.sep in prefix or (os.altsep and os.altsep in prefix):
            raise ValueError(
                f"`CheckpointManager(prefix=...)` must be a non-empty file name "
                f"prefix without path separators, got {prefix!r}."
            )
        if os.fspath(directory) == "":
            raise ValueError(
                "`CheckpointManager(directory=...)` got an empty path; pass the "
                "directory for the checkpoints, e.g. `'checkpoints'` (or `'.'`)."
            )
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(
                f"`CheckpointManager(directory=...)` takes a directory, but "
                f"'{self.directory}' is a file. To load that one checkpoint use "
                f"`eqx_rng.load('{self.directory}', like)`; for numbered "
                f"checkpoints pass a directory, e.g. '{self.directory.parent}'."
            )
        self.keep = keep
        self.prefix = prefix
        self._restored: int | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, keep={self.keep}, "
            f"prefix={self.prefix!r})"
        )

    def _remove_leftovers(self) -> None:
        names = re.escape(self.prefix) + r"\d+" + re.escape(_SUFFIX)
        remove_stale_temporaries(self.directory, tmp_pattern(names))

    def path(self, step: int) -> Path:
        """The file for `step`: `directory / f"{prefix}{step:010d}.ckpt"`."""
        return self.directory / f"{self.prefix}{int(step):010d}{_SUFFIX}"

    def steps(self) -> list[int]:
        """The steps that have a checkpoint, in increasing order."""
        return [s for s, _ in _steps(self.directory, self.prefix)]

    def latest(self) -> Path | None:
        """The newest checkpoint's path, or `None` when there is none."""
        return latest_checkpoint(self.directory, prefix=self.prefix)

    def save(self, step: Any, tree: PyTree, *, metadata: dict | None = None) -> Path:
        """Save `tree` as the checkpoint of `step`, then drop all but the `keep` newest.

        After a `restore`, checkpoints of steps above `step` (an abandoned run's) are
        removed first, so that `latest()` is this write.

        **Arguments:**

        - `step`: A non-negative int (or integer scalar array, e.g. `ts.step`).
        - `tree`: The pytree to save.
        - `metadata`: As for `eqx_rng.save`; `load_metadata` also reports the step
            under `["eqx_rng"]["step"]`. (Keyword only argument.)

        **Returns:**

        The path written.
        """
        step = _as_step(step)
        # Several processes saving one multi-host checkpoint: process 0 removes.
        multihost = needs_multihost(array_leaves(tree, "CheckpointManager.save"))
        if self._restored is not None:
            # Before the write: a crash in between must not leave the abandoned
            # run's checkpoints (above the restored step) as the latest.
            abandoned = [
                old_path
                for old_step, old_path in _steps(self.directory, self.prefix)
                if old_step > step or self._restored < old_step == step
            ]
            remove_checkpoints(abandoned, multihost, f"eqx_rng roll-back {step}")
        if self.keep is not None:
            # The checkpoints this save will prune: their cached pages are dropped
            # first, so that the new file reuses that memory (as `save` does with a
            # file it replaces). Advice only: the files stay until after the write.
            existing = _steps(self.directory, self.prefix)
            for _, old_path in existing[: max(0, len(existing) + 1 - self.keep)]:
                drop_cached(old_path)
        path = save_file(self.path(step), tree, metadata, {"step": step})
        if self.keep is not None:
            old = _steps(self.directory, self.prefix)[: -self.keep]
            pruned = [old_path for old_step, old_path in old if old_step != step]
            remove_checkpoints(pruned, multihost, f"eqx_rng prune {step}")
        return path

    def restore(self, like: PyTree, *, step: Any = None) -> PyTree:
        """Load the newest checkpoint (or that of `step`) into the structure of `like`.

        The step recorded in the file must be the one its name says (a file renamed
        or copied over another step's is refused). The next `save` of a lower step
        than the newest on disk then rolls back (see the class documentation).

        **Arguments:**

        - `like`: As for `eqx_rng.load`.
        - `step`: A step to load instead of the newest. (Keyword only argument.)

        **Raises:**

        `FileNotFoundError` when there is no checkpoint (or none for `step`);
        `CheckpointError` as for `eqx_rng.load`, and when the file records another
        step.
        """
        if step is None:
            found = _steps(self.directory, self.prefix)
            if not found:
                raise FileNotFoundError(
                    f"No checkpoint named '{self.prefix}<step>{_SUFFIX}' in "
                    f"'{self.directory}'; check `manager.latest() is not None` "
                    "before restoring."
                )
            step, path = found[-1]
        else:
            step = _as_step(step)
            path = self.path(step)
        tree, header = load_file(path, like)
        recorded = header.get(LIBRARY_KEY, {}).get("step")
        if recorded is not None and recorded != step:
            raise err(
                path,
                f"records step {recorded}, not the step {step} its name says (was it "
                f"renamed or copied?); restore `step={recorded}` from its own file, "
                "or save that state again under the step you want.",
            )
        self._restored = step
        return tree


def _as_step(step: Any) -> int:
    if isinstance(step, bool | np.bool_):
        raise TypeError(f"A checkpoint step must be an int, got {step!r}.")
    if isinstance(step, jax.Array | np.ndarray | np.integer):
        if np.shape(step) != () or not jnp.issubdtype(step.dtype, jnp.integer):
            raise TypeError(
                f"A checkpoint step must be an integer scalar, got shape "
                f"{np.shape(step)} and dtype {step.dtype}."
            )
        step = int(step)
    if not isinstance(step, int):
        raise TypeError(f"A checkpoint step must be an int, got {type(step).__name__}.")
    if step < 0:
        raise ValueError(f"A checkpoint step must be >= 0, got {step}.")
    return step
