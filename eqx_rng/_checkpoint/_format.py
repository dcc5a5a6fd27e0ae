"""The bytes of a checkpoint file: prefix, header, payload, checksum.

File format (versions 1 and 2; all integers little-endian):

```
offset 0   8 bytes   magic b"EQXRNGCK"
       8   uint32    format version
      12   uint32    reserved (0)
      16   uint64    H, the length of the header
      24   32 bytes  sha256 of the header
      56   H bytes   header: UTF-8 JSON (leaves, metadata, library entries)
  56 + H   P bytes   payload: each array leaf's raw bytes, C order, little-endian,
                     each starting at a multiple of 64 (zero padding between)
56 + H + P 32 bytes  sha256 of the payload
```

Version 2 has the same layout; its header may also describe a multi-host
checkpoint (an index whose arrays live in one file per process, see
`_multihost.py`), which a version-1 reader must refuse rather than misread. Both
versions are read.

This module knows nothing of JAX: it writes and reads bytes, checksums and
temporary files. The sha256 of the payload is computed in a worker thread while the
main thread writes (or reads) the next chunk, so hashing and I/O overlap.
"""

import hashlib
import json
import os
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"EQXRNGCK"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PREFIX = struct.Struct("<8sIIQ32s")  # magic, version, reserved, header length, sha
DIGEST_SIZE = 32
ALIGN = 64
MAX_HEADER = 1 << 32
CHUNK = 1 << 22  # bytes hashed, written or read at a time
TMP_SUFFIX = ".tmp"
FOREIGN_TMP_AGE = 24 * 3600  # seconds: age of another host's temporary deemed stale
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_THREADED_MIN = 1 << 20  # payloads smaller than this are hashed inline


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: corrupted, or not matching `like`.

    Raised by `eqx_rng.load`, `eqx_rng.load_metadata` and
    `CheckpointManager.restore` for a truncated file, a flipped byte (the sha256
    checksums of the header and of the payload are checked), a file that is not an
    eqx_rng checkpoint, or one whose leaves do not match `like` (structure, shape,
    dtype, PRNG key implementation), and by `CheckpointManager.restore(step=...)`
    for a file whose recorded step is not the one asked for. The message names the
    file and the mismatch. A missing file is a `FileNotFoundError` instead. A
    subclass of `ValueError`.

    !!! Example

        ```python
        import pathlib, tempfile

        path = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        eqx_rng.save(path, {"w": jnp.zeros(3)})
        try:
            eqx_rng.load(path, {"w": jnp.zeros(4)})
        except eqx_rng.CheckpointError as e:
            assert "['w']" in str(e) and "(4,)" in str(e)
        ```
    """


def err(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"Checkpoint file '{path}' {problem}")


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised `uint8` buffer whose data starts at a multiple of 64 bytes
    (so that JAX on CPU can use it in place instead of copying it)."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]


# --------------------------------------------------------------------------------
# Hashing beside I/O.


class _Hasher:
    """A sha256 fed in order from a worker thread, at most one chunk behind.

    `update(chunk)` waits for the previous chunk's hash, then hands `chunk` to the
    worker and returns at once, so the caller writes or reads the next chunk while
    this one is hashed (`hashlib` releases the GIL on large buffers). The caller
    must not modify `chunk` until the next `update` or `digest` returns.
    """

    def __init__(self, threaded: bool):
        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1) if threaded else None
        self._pending: Future | None = None

    def update(self, chunk: Any) -> None:
        if self._pool is None:
            self._sha.update(chunk)
            return
        self._wait()
        self._pending = self._pool.submit(self._sha.update, chunk)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def digest(self) -> bytes:
        self._wait()
        return self._sha.digest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "_Hasher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _chunks(buffer: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(buffer), CHUNK):
        yield buffer[start : start + CHUNK]


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


def write_file(
    path: Path,
    header: dict[str, Any],
    arrays: Iterable[tuple[int, np.ndarray]],
    payload_nbytes: int,
) -> Path:
    """Write a checkpoint file atomically: a temporary file in the same directory,
    flushed and `fsync`ed, renamed over `path`, then the directory `fsync`ed.

    `arrays` gives `(offset, contiguous array)` in increasing offset order; the gaps
    (and the tail up to `payload_nbytes`) are zero padding.
    """
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    prefix = PREFIX.pack(
        MAGIC,
        FORMAT_VERSION,
        0,
        len(header_bytes),
        hashlib.sha256(header_bytes).digest(),
    )
    directory = path.parent
    tmp = tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    try:
        with (
            os.fdopen(fd, "wb") as f,
            _Hasher(payload_nbytes >= _THREADED_MIN) as hasher,
        ):
            f.write(prefix)
            f.write(header_bytes)
            written = 0
            for offset, data in arrays:
                if offset > written:
                    pad = bytes(offset - written)
                    hasher.update(pad)
                    f.write(pad)
                raw = data.reshape(-1).view(np.uint8).data
                for chunk in _chunks(raw):
                    hasher.update(chunk)
                    f.write(chunk)
                written = offset + data.nbytes
            if payload_nbytes > written:
                pad = bytes(payload_nbytes - written)
                hasher.update(pad)
                f.write(pad)
            f.write(hasher.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(directory)
    return path


# --------------------------------------------------------------------------------
# Reading.


def open_file(path: Path) -> Any:
    if path.is_dir():
        raise err(path, "is a directory, not a checkpoint file.")
    return open(path, "rb")


def read_header(f: Any, path: Path, size: int) -> tuple[int, dict[str, Any]]:
    """Check the prefix, header checksum and file size; returns `(version, header)`
    with `f` just past the header."""
    prefix = f.read(PREFIX.size)
    if len(prefix) >= len(MAGIC) and prefix[: len(MAGIC)] != MAGIC:
        raise err(
            path,
            f"is not an eqx_rng checkpoint: it starts with {prefix[:8]!r}, not "
            f"{MAGIC!r}.",
        )
    if len(prefix) < PREFIX.size:
        raise err(
            path,
            f"is truncated: {size} bytes, shorter than the {PREFIX.size}-byte "
            "prefix of an eqx_rng checkpoint.",
        )
    _, version, _, header_len, header_sha = PREFIX.unpack(prefix)
    if version not in READABLE_VERSIONS:
        raise err(
            path,
            f"has format version {version}; this eqx_rng reads versions "
            f"{READABLE_VERSIONS} (a newer eqx_rng wrote it, or the file is "
            "corrupted).",
        )
    if header_len > MAX_HEADER or PREFIX.size + header_len > size:
        raise err(
            path,
            f"is truncated or corrupted: its header claims {header_len} bytes but "
            f"the file has {size} bytes in all.",
        )
    header_bytes = f.read(header_len)
    if hashlib.sha256(header_bytes).digest() != header_sha:
        raise err(
            path,
            "is corrupted: the sha256 checksum of its header does not match.",
        )
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        _ = header["leaves"], header["payload_nbytes"], header["metadata"]
    except (ValueError, KeyError, TypeError) as e:  # pragma: no cover - checksummed
        raise err(path, f"has an unreadable header: {e}.") from None
    expected = PREFIX.size + header_len + header["payload_nbytes"] + DIGEST_SIZE
    if size < expected:
        raise err(
            path,
            f"is truncated: {size} bytes, expected {expected} (an interrupted copy? "
            "eqx_rng.save itself never leaves a partial file).",
        )
    if size > expected:
        raise err(
            path,
            f"is corrupted: {size} bytes, expected {expected} (extra bytes at the "
            "end).",
        )
    return version, header


def check_payload(path: Path, complete: bool, digest: bytes, stored: bytes) -> None:
    if not complete:
        raise err(path, "is truncated (it changed while being read?).")
    if digest != stored:
        raise err(
            path,
            "is corrupted: the sha256 checksum of its payload does not match (a "
            "flipped or overwritten byte).",
        )


def read_payload(
    f: Any, path: Path, payload_nbytes: int, spans: Iterable[tuple[int, int]]
) -> list[np.ndarray]:
    """Read the payload (`f` is just past the header) and verify its checksum.

    `spans` are `(offset, nbytes)` of the leaves, in increasing offset order; each
    is read into its own 64-byte-aligned `uint8` buffer (returned in order). The
    bytes between them are streamed through the checksum in chunks, never held
    whole, so `read_payload(f, path, n, [])` verifies a file in constant memory.
    """
    out = []
    scratch = [aligned_empty(min(CHUNK, payload_nbytes)) for _ in range(2)]
    flip = 0
    complete = True
    with _Hasher(payload_nbytes >= _THREADED_MIN) as hasher:

        def read_into(buffer: memoryview) -> None:
            nonlocal complete
            for chunk in _chunks(buffer):
                if f.readinto(chunk) != len(chunk):
                    complete = False
                    return
                hasher.update(chunk)

        def skip(nbytes: int) -> None:
            nonlocal flip
            while nbytes > 0 and complete:
                n = min(nbytes, CHUNK)
                read_into(scratch[flip].data[:n])
                flip ^= 1  # the worker may still hash the other buffer
                nbytes -= n

        position = 0
        for offset, nbytes in spans:
            skip(offset - position)
            buffer = aligned_empty(nbytes)
            read_into(buffer.data)
            out.append(buffer)
            position = offset + nbytes
        skip(payload_nbytes - position)
        digest = hasher.digest()
    stored = f.read(DIGEST_SIZE)
    complete = complete and len(stored) == DIGEST_SIZE
    check_payload(path, complete, digest, stored)
    return out
