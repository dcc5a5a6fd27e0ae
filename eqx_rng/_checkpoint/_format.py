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
56 + H + P 32 bytes  checksum of the payload
```

Version 1 checksums the payload with sha256. Version 2 has the same layout; its
header names the payload checksum (`"payload_checksum": "crc32"`: the CRC-32,
little-endian, in the first 4 of the 32 bytes, the rest zero) and may describe a
multi-host checkpoint (an index whose arrays live in one file per process, see
`_sharded.py`), which a version-1 reader must refuse rather than misread. Both
versions are read. The header is always checked with sha256.

This module knows nothing of JAX: it lays out and reads bytes and checksums
(`_files.py` puts them on disk). On save, the payload's checksum is computed while
a thread waits for the disk to take the payload (`fsync`), so that it costs no
time of its own; on load, it is computed as each chunk is read.
"""

import hashlib
import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._files import write_atomically

MAGIC = b"EQXRNGCK"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PREFIX = struct.Struct("<8sIIQ32s")  # magic, version, reserved, header length, sha
DIGEST_SIZE = 32
ALIGN = 64
MAX_HEADER = 1 << 32
CHUNK = 1 << 22  # bytes hashed or read at a time
OVERLAP_MIN = 1 << 23  # payload bytes from which the checksum overlaps the fsync
CHECKSUMS = ("crc32", "sha256")
PAYLOAD_CHECKSUM = "crc32"  # what version 2 writes; version 1 files have sha256


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: corrupted, or not matching `like`.

    Raised by `eqx_rng.load`, `eqx_rng.load_metadata` and
    `CheckpointManager.restore` for a truncated file, a flipped byte (the checksums
    of the header, sha256, and of the payload, CRC-32, are checked), a file that is
    not an eqx_rng checkpoint, or one whose leaves do not match `like` (structure,
    shape, dtype, PRNG key implementation), and by
    `CheckpointManager.restore(step=...)` for a file whose recorded step is not the
    one asked for. The message names the
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
# Checksums.


class _Checksum:
    """The payload checksum, `kind` `"crc32"` (format version 2) or `"sha256"`
    (version 1), fed in order; `zlib` and `hashlib` release the GIL on large
    buffers, so it may run in a thread beside the I/O."""

    def __init__(self, kind: str):
        self._sha = hashlib.sha256() if kind == "sha256" else None
        self._crc = 0

    def update(self, chunk: Any) -> None:
        if self._sha is not None:
            self._sha.update(chunk)
        else:
            self._crc = zlib.crc32(chunk, self._crc)

    def digest(self) -> bytes:
        """`DIGEST_SIZE` bytes: the sha256, or the CRC-32 (little-endian) padded
        with zeros."""
        if self._sha is not None:
            return self._sha.digest()
        return self._crc.to_bytes(4, "little") + bytes(DIGEST_SIZE - 4)


def _chunks(buffer: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(buffer), CHUNK):
        yield buffer[start : start + CHUNK]


# --------------------------------------------------------------------------------
# Writing.


def _payload_pieces(
    arrays: Iterable[tuple[int, np.ndarray]], payload_nbytes: int
) -> list[Any]:
    """The payload as a list of buffers, in order: padding and array bytes."""
    pieces: list[Any] = []
    written = 0
    for offset, data in arrays:
        if offset > written:
            pieces.append(bytes(offset - written))
        pieces.append(data.reshape(-1).view(np.uint8).data)
        written = offset + data.nbytes
    if payload_nbytes > written:
        pieces.append(bytes(payload_nbytes - written))
    return pieces


def write_file(
    path: Path,
    header: dict[str, Any],
    arrays: Iterable[tuple[int, np.ndarray]],
    payload_nbytes: int,
) -> Path:
    """Write a checkpoint file atomically and durably (`_files.write_atomically`).

    `arrays` gives `(offset, contiguous array)` in increasing offset order; the gaps
    (and the tail up to `payload_nbytes`) are zero padding. The arrays are written
    from their own memory, never copied.
    """
    header = {**header, "payload_checksum": PAYLOAD_CHECKSUM}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    prefix = PREFIX.pack(
        MAGIC,
        FORMAT_VERSION,
        0,
        len(header_bytes),
        hashlib.sha256(header_bytes).digest(),
    )
    pieces = _payload_pieces(arrays, payload_nbytes)

    def checksum() -> bytes:
        digest = _Checksum(PAYLOAD_CHECKSUM)
        for piece in pieces:
            digest.update(piece)
        return digest.digest()

    body = [prefix + header_bytes, *pieces]
    return write_atomically(path, body, checksum, payload_nbytes >= OVERLAP_MIN)


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


def check_payload(
    path: Path, complete: bool, digest: bytes, stored: bytes, kind: str
) -> None:
    if not complete:
        raise err(path, "is truncated (it changed while being read?).")
    if digest != stored:
        raise err(
            path,
            f"is corrupted: the {kind} checksum of its payload does not match (a "
            "flipped or overwritten byte).",
        )


def payload_checksum(path: Path, header: dict[str, Any]) -> str:
    """The payload checksum a file's header names (version 1: always sha256)."""
    kind = header.get("payload_checksum", "sha256")
    if kind not in CHECKSUMS:
        raise err(path, f"has a payload checksum {kind!r} this eqx_rng cannot check.")
    return kind


def read_payload(
    f: Any, path: Path, header: dict[str, Any], spans: Iterable[tuple[int, int]]
) -> list[np.ndarray]:
    """Read the payload (`f` is just past `header`) and verify its checksum.

    `spans` are `(offset, nbytes)` of the leaves, in increasing offset order; each
    is read into its own 64-byte-aligned `uint8` buffer (returned in order). The
    bytes between them are streamed through the checksum in chunks, never held
    whole, so `read_payload(f, path, header, [])` verifies a file in little memory.
    """
    payload_nbytes = header["payload_nbytes"]
    kind = payload_checksum(path, header)
    digest = _Checksum(kind)
    out = []
    complete = True
    scratch = aligned_empty(min(CHUNK, payload_nbytes))

    def read_into(buffer: memoryview) -> None:
        nonlocal complete
        for chunk in _chunks(buffer):
            if f.readinto(chunk) != len(chunk):
                complete = False
                return
            digest.update(chunk)

    def skip(nbytes: int) -> None:
        while nbytes > 0 and complete:
            n = min(nbytes, CHUNK)
            read_into(scratch.data[:n])
            nbytes -= n

    position = 0
    for offset, nbytes in spans:
        skip(offset - position)
        buffer = aligned_empty(nbytes)
        read_into(buffer.data)
        out.append(buffer)
        position = offset + nbytes
    skip(payload_nbytes - position)
    stored = f.read(DIGEST_SIZE)
    complete = complete and len(stored) == DIGEST_SIZE
    check_payload(path, complete, digest.digest(), stored, kind)
    return out
