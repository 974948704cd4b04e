"""Damage to a converted archive is reported, never returned as data."""
from __future__ import annotations

import numpy as np
import pytest

import data2h5
from data2h5.errors import CorruptEntryError
from data2h5.index import read_index


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
