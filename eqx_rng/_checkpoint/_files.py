"""Files on disk, knowing nothing of their contents: temporary files beside the
file they become, and atomic, durable writes.

A file is written to a temporary file in the same directory
(`.{name}.{host}.{pid}.{random}.tmp`), `fsync`ed, renamed over its path with
`os.replace` (atomic), and the directory is `fsync`ed (so that the rename itself
survives a crash): a crash at any moment leaves either the old file or the new one,
never a partial one.
"""

import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
FOREIGN_TMP_AGE = 24 * 3600  # seconds: age of another host's temporary deemed stale
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


class _Background:
    """`fn()` run in a thread from creation; `result()` joins and returns (or
    raises) what it did."""

    def __init__(self, fn: Callable[[], Any]):
        self._out: list = []
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._out.append((True, fn()))
        except BaseException as e:  # handed to the caller by `result`
            self._out.append((False, e))

    def result(self) -> Any:
        self._thread.join()
        ok, value = self._out[0]
        if not ok:
            raise value
        return value


# --------------------------------------------------------------------------------
# Temporary files: `.{name}.{host}.{pid}.{random}.tmp` beside the file they become.


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def tmp_path(path: Path) -> Path:
    """A fresh temporary file name for a save of `path`, naming this host and pid."""
    token = secrets.token_hex(6)
    return path.parent / f".{path.name}.{_host()}.{os.getpid()}.{token}{TMP_SUFFIX}"


def tmp_pattern(name_pattern: str) -> re.Pattern:
    """Temporary files of the file names matching the regex `name_pattern`: today's
    (with host and pid) and those of eqx_rng 0.1 (a random token only)."""
    return re.compile(
        r"\.(?:"
        + name_pattern
        + r")\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?[0-9a-f]+"
        + re.escape(TMP_SUFFIX)
        + r"\Z"
    )


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # pragma: no cover - os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def is_stale(name: str, match: re.Match, directory: Path) -> bool:
    """Whether the temporary file `name` was left by a writer that is gone.

    On this host: its pid no longer runs. Another host's (or an unnamed writer's)
    temporary: not modified for `FOREIGN_TMP_AGE` seconds (a live writer's file
    changes with every chunk it writes)."""
    host, pid = match.group("host"), match.group("pid")
    if host == _host() and pid is not None:
        return int(pid) != os.getpid() and not _pid_alive(int(pid))
    try:
        age = time.time() - os.stat(directory / name).st_mtime
    except FileNotFoundError:
        return False
    return age > FOREIGN_TMP_AGE


def remove_stale_temporaries(directory: Path, pattern: re.Pattern) -> list[str]:
    """Remove the stale temporary files in `directory` matching `pattern`; returns
    their names. Live writers' temporaries are left alone."""
    removed = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None or not is_stale(name, match, directory):
            continue
        try:
            os.unlink(directory / name)
        except FileNotFoundError:  # removed meanwhile by another cleaner
            continue
        removed.append(name)
    return removed


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------
# Writing.


def drop_cached(path: Path) -> None:
    """Ask the OS to drop the cached pages of the file a save will replace.

    The old file stays intact on disk until the rename; its cached copy is of no
    use once the new file exists. Dropping it first lets the new file's pages
    reuse that memory instead of holding both copies during the save (on some
    virtual machines, touching fresh memory costs far more than reusing freed
    memory). A no-op where `posix_fadvise` does not exist (macOS, Windows) and for
    anything but a regular file (a symlink, a FIFO, a device)."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:  # pragma: no cover - Linux has it
        return
    try:
        # `lstat`: a symlink at `path` is what the rename replaces, not its target;
        # a FIFO or device is never opened (opening a FIFO would block).
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK
        fd = os.open(path, flags)
    except OSError:  # absent (a first save), unreadable or replaced meanwhile
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:  # pragma: no cover - advice only
        pass
    finally:
        os.close(fd)


def _iov_max() -> int:
    """How many buffers one `os.writev` call may take (`IOV_MAX`: 1024 on Linux
    and macOS; POSIX guarantees 16)."""
    try:
        return max(16, min(1024, os.sysconf("SC_IOV_MAX")))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - no sysconf
        return 16


def write_all(fd: int, pieces: list[Any]) -> None:
    """Write the byte buffers `pieces` in order at `fd`'s position, with as few
    system calls as possible (`os.writev` where it exists) and no copies."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    writev = getattr(os, "writev", None)
    batch = _iov_max()
    i = 0
    while i < len(views):
        if writev is None:  # pragma: no cover - Windows
            written = os.write(fd, views[i])
        else:
            written = writev(fd, views[i : i + batch])
        # Skip what was written: whole buffers, then part of one (a short write).
        while i < len(views) and written >= len(views[i]):
            written -= len(views[i])
            i += 1
        if written:
            views[i] = views[i][written:]


def write_atomically(
    path: Path, body: list[Any], trailer: Callable[[], bytes], overlap: bool
) -> Path:
    """Write the buffers `body`, then the bytes `trailer()` (a checksum of the
    body), to `path` atomically and durably (see the module's docstring).

    With `overlap`, the body is written first; then a thread `fsync`s it (waiting
    for the disk) while this one calls `trailer()`, reading the same bytes from
    memory; the trailer is written last and the file `fsync`ed again (a page). The
    checksum thus costs no time of its own unless the disk is faster than it, and
    it never competes with the write for a core. Without it (small files, where a
    second `fsync` would cost more than it hides) the trailer comes first and the
    file is written in one go. The bytes are the same either way.
    """
    directory = path.parent
    drop_cached(path)
    tmp = tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    try:
        try:
            if overlap:
                write_all(fd, body)
                flushing = _Background(lambda: os.fsync(fd))
                try:
                    last = trailer()
                finally:
                    flushing.result()  # never leave a thread using `fd`
                write_all(fd, [last])
            else:
                write_all(fd, [*body, trailer()])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(directory)
    return path
