"""Damage to a converted archive is reported, never returned as data."""
from __future__ import annotations

import numpy as np
import pytest

import data2h5
from data2h5.errors import CorruptEntryError
from data2h5.archive import read_index


@pytest.mark.parametrize("compression", ["lzf", "none", "gzip"])
def test_damaged_block_of_converted_archive_raises(tmp_path, compression):
    src = tmp_path / "src"
    src.mkdir()
    ramp = np.tile(np.arange(256, dtype=np.uint16), (64, 1))  # compresses, so lzf really runs
    for name in ("a", "b"):
        np.save(src / f"{name}.npy", ramp)
    out = tmp_path / "out.h5"
    data2h5.convert(src, out, ext="npy", compression=compression, workers=1)
    index = read_index(out)
    pos = index.position("b.npy")
    assert index.offset[pos] > 0 and index.stored_crc32[pos] != 0
    with open(out, "r+b") as fh:  # flip bytes in the middle of b.npy's stored block
        fh.seek(int(index.offset[pos] + index.stored[pos] // 2))
        fh.write(b"\x00\xff\x00\xff")
    ds = data2h5.H5Dataset(out)
    assert np.array_equal(ds[index.position("a.npy")], ramp)
    with pytest.raises(CorruptEntryError, match="b.npy"):
        ds[pos]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_plain_jpegs_skip_imageio_and_decode_identically(tmp_path, monkeypatch, mode):
    """imageio's per-call set-up costs more than half a small JPEG's decode: plain JPEGs go
    to Pillow directly, in conversion and in H5Dataset alike, with imageio's exact result."""
    import imageio.v3 as iio
    from PIL import Image

    from data2h5.readers import BUILTIN_READERS

    rng = np.random.default_rng(0)
    path = tmp_path / "a.jpg"
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).convert(mode).save(path)
    expected = iio.imread(path)

    def no_imageio(*args, **kwargs):
        raise AssertionError("a plain JPEG went through imageio")

    monkeypatch.setattr(iio, "imread", no_imageio)
    decoded = BUILTIN_READERS["image"].from_bytes(path.read_bytes(), ".jpg")
    assert decoded.dtype == expected.dtype and np.array_equal(decoded, expected)


@pytest.mark.parametrize("compression", ["lzf", "gzip", "blosc-lz4"])
def test_entries_of_several_chunks_record_the_checksum_of_their_stored_chunks(tmp_path, compression):
    """Every entry has a stored checksum, also one written as several chunks, and also when
    HDF5 (not a worker) compressed it: `verify` relies on it."""
    if compression == "blosc-lz4":
        pytest.importorskip("hdf5plugin")
    import zlib

    import h5py

    from data2h5.encoding import SINGLE_CHUNK_MAX, iter_chunk_offsets

    src = tmp_path / "src"
    src.mkdir()
    big = np.arange(SINGLE_CHUNK_MAX // 4 + 1000, dtype=np.float32).reshape(-1, 8)  # > one chunk
    np.save(src / "big.npy", big)
    out = tmp_path / "out.h5"
    data2h5.convert(src, out, ext="npy", compression=compression, workers=1)
    index = read_index(out)
    pos = index.position("big.npy")
    with h5py.File(out, "r") as f:
        dset = f["big.npy"]
        assert dset.id.get_num_chunks() > 1 and index.offset[pos] == 0
        crc = 0
        for offset, _ in iter_chunk_offsets(dset.shape, dset.chunks):
            crc = zlib.crc32(dset.id.read_direct_chunk(offset)[1], crc)
        np.testing.assert_array_equal(dset[()], big)
    assert crc == index.stored_crc32[pos] != 0


def shout(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read().upper()


@pytest.mark.parametrize("reader, verbatim, value", [
    ("text", 1, "hello, archive"),
    ("bytes", 1, "hello, archive"),  # decoded on read by its extension
    (shout, 0, "HELLO, ARCHIVE"),  # a plugin's text is not the file's bytes
])
def test_source_checksums_are_checked_only_on_entries_that_hold_the_source_bytes(tmp_path, reader, verbatim, value):
    src = tmp_path / "src"
    src.mkdir()
    (src / "note.txt").write_text("hello, archive")
    out = tmp_path / "out.h5"
    data2h5.convert(src, out, ext="txt", reader=reader, workers=1)
    index = read_index(out)
    assert index.verbatim[0] == verbatim
    assert data2h5.H5Dataset(out)[0] == value
    assert data2h5.verify(out, source=src).ok


def test_corrupt_entry_error_keeps_its_reason_across_processes():
    import pickle

    exc = CorruptEntryError("a.h5: entry 'k' is damaged (bad block); convert the source again", "bad block")
    again = pickle.loads(pickle.dumps(exc))
    assert (str(again), again.reason) == (str(exc), "bad block")
    assert CorruptEntryError("no separate reason").reason == "no separate reason"
