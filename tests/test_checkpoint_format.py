"""The byte format (`eqx_rng/_checkpoint/_format.py`) on its own, with NumPy arrays:
prefix, header, payload checksum (CRC-32 in version 2, sha256 in version 1)."""

import json
import os
import pathlib
import threading
import zlib

import numpy as np
import pytest

from eqx_rng._checkpoint import _files, _format

DATA = pathlib.Path(__file__).parent / "data"


def _write(path, arrays):
    offsets, offset = [], 0
    for a in arrays:
        offsets.append(offset)
        offset = _format.align(offset + a.nbytes)
    header = {"leaves": [], "payload_nbytes": offset, "metadata": {}}
    _format.write_file(path, header, list(zip(offsets, arrays, strict=True)), offset)
    return offsets, offset


def _read(path, spans):
    with _format.open_file(path) as f:
        size = path.stat().st_size
        version, header = _format.read_header(f, path, size)
        return version, header, _format.read_payload(f, path, header, spans)


def test_round_trip_and_crc32_trailer(tmp_path):
    arrays = [np.arange(10, dtype=np.float32), np.arange(3, dtype=np.int8)]
    path = tmp_path / "f"
    offsets, payload_nbytes = _write(path, arrays)
    spans = [(o, a.nbytes) for o, a in zip(offsets, arrays, strict=True)]
    version, header, buffers = _read(path, spans)
    assert version == 2 and header["payload_checksum"] == "crc32"
    for a, b in zip(arrays, buffers, strict=True):
        assert np.array_equal(b.view(a.dtype), a)
        assert b.ctypes.data % _format.ALIGN == 0  # usable in place by JAX on CPU
    data = path.read_bytes()
    payload = data[len(data) - 32 - payload_nbytes : len(data) - 32]
    assert data[-32:] == zlib.crc32(payload).to_bytes(4, "little") + bytes(28)
    assert payload[offsets[1] : offsets[1] + 3] == arrays[1].tobytes()


def test_flipped_byte_names_the_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(_format, "CHUNK", 16)  # several chunks per leaf
    path = tmp_path / "f"
    arrays = [np.arange(100, dtype=np.float64)]
    offsets, _ = _write(path, arrays)
    data = bytearray(path.read_bytes())
    data[len(data) - 32 - 50] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(_format.CheckpointError, match="crc32 checksum of its payload"):
        _read(path, [(offsets[0], 800)])
    with pytest.raises(_format.CheckpointError, match="crc32 checksum of its payload"):
        _read(path, [])  # verifying only, as `load_metadata` does


def test_version_1_files_use_sha256(tmp_path):
    path = DATA / "format_v1_step_12.ckpt"
    version, header, _ = _read(path, [])
    assert version == 1 and "payload_checksum" not in header
    assert _format.payload_checksum(path, header) == "sha256"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01  # the last payload byte
    copy = tmp_path / "v1"
    copy.write_bytes(bytes(data))
    with pytest.raises(_format.CheckpointError, match="sha256 checksum of its payload"):
        _read(copy, [])


def test_unknown_payload_checksum_is_refused(tmp_path):
    path = tmp_path / "f"
    header = {"leaves": [], "payload_nbytes": 0, "metadata": {}}
    _format.write_file(path, header, [], 0)
    data = path.read_bytes()
    text = json.loads(data[56:-32])
    assert text["payload_checksum"] == "crc32"
    with pytest.raises(_format.CheckpointError, match="payload checksum 'md5'"):
        _format.payload_checksum(path, {**text, "payload_checksum": "md5"})


def test_background_errors_reach_the_caller():
    def boom():
        raise OSError("disk")

    with pytest.raises(OSError, match="disk"):
        _files._Background(boom).result()
    assert _files._Background(lambda: 3).result() == 3


# ----------------------------------------------------------------------------------
# Writing: the same bytes by every path, short writes, the checksum beside `fsync`.

V2_FIXTURE = DATA / "format_v2_db9355d.ckpt"  # `eqx_rng.save` before the I/O rework


def _contents(path):
    """`(header, arrays, payload_nbytes)` of a file, as `write_file` takes them."""
    with _format.open_file(path) as f:
        _, header = _format.read_header(f, path, path.stat().st_size)
        spans = [(r["offset"], r["nbytes"]) for r in header["leaves"]]
        buffers = _format.read_payload(f, path, header, spans)
    arrays = [(o, b) for (o, _), b in zip(spans, buffers, strict=True)]
    return header, arrays, header["payload_nbytes"]


@pytest.mark.parametrize("overlap_min", [0, 1 << 40])
def test_rewriting_a_version_2_file_gives_the_same_bytes(
    tmp_path, monkeypatch, overlap_min
):
    # The checksum beside the `fsync` (payload >= OVERLAP_MIN) or before the write:
    # byte for byte what the earlier writer (a checksum thread) put in the file.
    monkeypatch.setattr(_format, "OVERLAP_MIN", overlap_min)
    header, arrays, payload_nbytes = _contents(V2_FIXTURE)
    path = tmp_path / "again"
    _format.write_file(path, header, arrays, payload_nbytes)
    assert path.read_bytes() == V2_FIXTURE.read_bytes()


def test_write_all_finishes_short_writes(tmp_path, monkeypatch):
    real_writev = os.writev
    calls = []

    def short_writev(fd, buffers):  # at most 5 bytes per call, as a pipe might
        calls.append(len(buffers))
        out, budget = [], 5
        for b in buffers:
            out.append(bytes(b[:budget]))
            budget -= len(out[-1])
        return real_writev(fd, out)

    monkeypatch.setattr(_files.os, "writev", short_writev)
    pieces = [b"abc", b"", np.arange(4, dtype=np.int32).data, b"0123456789xyz"]
    path = tmp_path / "f"
    with open(path, "wb") as f:
        _files.write_all(f.fileno(), pieces)
    assert path.read_bytes() == b"abc" + np.arange(4, dtype=np.int32).tobytes() + (
        b"0123456789xyz"
    )
    assert len(calls) == -(-(3 + 16 + 13) // 5)  # the empty piece is never sent


def test_checksum_is_computed_while_the_payload_is_fsynced(tmp_path, monkeypatch):
    # A payload at least OVERLAP_MIN bytes: the first `fsync` waits (here, for the
    # checksum to start); the checksum runs meanwhile, and the trailer is written
    # and `fsync`ed after both.
    monkeypatch.setattr(_format, "OVERLAP_MIN", 0)
    checksum_started = threading.Event()
    real_fsync, real_update = os.fsync, _format._Checksum.update
    seen = []

    def fsync(fd):
        size = os.fstat(fd).st_size
        seen.append(("fsync", size, checksum_started.wait(timeout=30)))
        real_fsync(fd)

    def update(self, chunk):
        checksum_started.set()
        real_update(self, chunk)

    monkeypatch.setattr(_files.os, "fsync", fsync)
    monkeypatch.setattr(_format._Checksum, "update", update)
    header, arrays, payload_nbytes = _contents(V2_FIXTURE)
    path = tmp_path / "f"
    _format.write_file(path, header, arrays, payload_nbytes)
    size = V2_FIXTURE.stat().st_size
    # The file without, then with, its 32-byte trailer; then the directory.
    assert seen[:2] == [("fsync", size - 32, True), ("fsync", size, True)]
    assert path.read_bytes() == V2_FIXTURE.read_bytes()


@pytest.mark.parametrize("failing", ["fsync", "checksum"])
def test_failure_beside_the_fsync_keeps_the_old_file(tmp_path, monkeypatch, failing):
    monkeypatch.setattr(_format, "OVERLAP_MIN", 0)
    header, arrays, payload_nbytes = _contents(V2_FIXTURE)
    path = tmp_path / "f"
    path.write_bytes(b"the previous checkpoint")
    threads = threading.active_count()

    def boom(*args):
        raise OSError(f"{failing} failed")

    if failing == "fsync":
        monkeypatch.setattr(_files.os, "fsync", boom)
    else:
        monkeypatch.setattr(_format._Checksum, "update", boom)
    with pytest.raises(OSError, match=f"{failing} failed"):
        _format.write_file(path, header, arrays, payload_nbytes)
    assert path.read_bytes() == b"the previous checkpoint"
    assert os.listdir(tmp_path) == ["f"]  # the temporary file is gone
    assert threading.active_count() == threads  # the fsync thread was joined


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_cached_pages_of_the_replaced_file_are_dropped_first(tmp_path, monkeypatch):
    real_fadvise = os.posix_fadvise
    advised = []

    def fadvise(fd, offset, length, advice):
        advised.append((os.fstat(fd).st_ino, offset, length, advice))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(_files.os, "posix_fadvise", fadvise)
    path = tmp_path / "f"
    _write(path, [np.arange(10, dtype=np.float32)])
    assert advised == []  # a first save: nothing to drop
    old_inode = path.stat().st_ino
    _write(path, [np.arange(12, dtype=np.float32)])
    assert advised == [(old_inode, 0, 0, os.POSIX_FADV_DONTNEED)]
    assert path.stat().st_ino != old_inode  # then replaced by a new file
    _files.drop_cached(tmp_path)  # not a regular file: left alone
    (tmp_path / "link").symlink_to(path)
    _files.drop_cached(tmp_path / "link")  # the rename would replace the link
    assert len(advised) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_dropping_the_cache_never_opens_a_fifo(tmp_path):
    # Opening a FIFO for reading blocks until a writer comes: a save over one must
    # not hang before it even starts.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    worker = threading.Thread(target=_files.drop_cached, args=(fifo,), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
