"""The byte format (`eqx_rng/_checkpoint/_format.py`) on its own, with NumPy arrays:
prefix, header, payload checksum (CRC-32 in version 2, sha256 in version 1)."""

import json
import pathlib
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
