"""The index reader and single-entry reads, on archives written here by hand with h5py."""
from __future__ import annotations

import io
import os
import pickle
import zlib
from pathlib import Path
from typing import Dict, Union

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

from conftest import photo_like
from data2h5 import codecs
from data2h5 import format as fmt
from data2h5.errors import ArchiveError, ArchiveKeyError, CorruptEntryError, ReadError
from data2h5.format import Kind
from data2h5.archive import LAYOUT_PLAIN, STORED_CRC32, ArchiveReader, Index, decode_value, read_index

Value = Union[np.ndarray, bytes, str]
H5_COMPRESSION = {"none": None, "lzf": "lzf", "gzip": "gzip"}


def write_archive(
    path: Path, entries: Dict[str, Value], *, codec: str = "lzf", chunks=None, stored_crc: bool = True
) -> Path:
    """Write a data2h5 ``files`` archive by hand: one dataset per entry plus the index group.

    Arrays are stored as ARRAY entries, ``bytes`` as BYTES and ``str`` as TEXT. Each entry is
    one HDF5 chunk (or contiguous with ``codec='none'``) so its offset goes in the index;
    ``chunks`` forces a chunk shape (entries split over several chunks get offset 0).
    ``stored_crc`` records the optional CRC-32 of each entry's stored bytes.
    """
    n = len(entries)
    keys = list(entries)
    fields = {name: np.zeros(n, dt) for name, dt in fmt.INDEX_FIELDS.items() if dt is not None and name != STORED_CRC32}
    fields["dtype"] = np.zeros(n, "S16")
    fields["shape"] = np.full((n, fmt.MAX_NDIM), -1, np.int64)
    stored_crc32 = np.zeros(n, np.uint32)
    with h5py.File(path, "w") as f:
        f.attrs[fmt.ATTR_FORMAT] = fmt.FORMAT_VERSION
        f.attrs[fmt.ATTR_LAYOUT] = fmt.LAYOUT_FILES
        for i, (key, value) in enumerate(entries.items()):
            if isinstance(value, np.ndarray):
                kind, arr, source = Kind.ARRAY, value, value.tobytes()
            else:
                kind = Kind.TEXT if isinstance(value, str) else Kind.BYTES
                source = value.encode() if isinstance(value, str) else value
                arr = np.frombuffer(source, np.uint8)
            compression = H5_COMPRESSION[codec]
            chunk_shape = chunks or (arr.shape if compression else None)
            dset = f.create_dataset(key, data=arr, compression=compression, chunks=chunk_shape)
            if compression is None and chunks is None:
                offset, stored = dset.id.get_offset() or 0, arr.nbytes
                stored_crc32[i] = zlib.crc32(arr.tobytes())
            elif dset.id.get_num_chunks() == 1:
                info = dset.id.get_chunk_info(0)
                offset, stored = info.byte_offset, info.size
                stored_crc32[i] = zlib.crc32(dset.id.read_direct_chunk((0,) * arr.ndim)[1])
            else:
                offset, stored = 0, 0
            row = dict(size=len(source), crc32=zlib.crc32(source), kind=kind, codec=codecs.CODECS[codec].id,
                       offset=offset, stored=stored, dtype=arr.dtype.str.encode(), verbatim=int(kind != Kind.ARRAY))
            for name, v in row.items():
                fields[name][i] = v
            fields["shape"][i, : arr.ndim] = arr.shape
        group = f.create_group(fmt.INDEX_GROUP)
        group.create_dataset("keys", data=np.array([k.encode() for k in keys]), compression="gzip")
        for name, arr in fields.items():
            group.create_dataset(name, data=arr)
        if stored_crc:
            group.create_dataset(STORED_CRC32, data=stored_crc32)
    return path


def write_plain(path: Path, entries: Dict[str, np.ndarray], *, split: bool = False) -> Path:
    """An HDF5 file like the original Data2H5 script's: datasets by relative path, lzf, no index.

    Each dataset is one chunk, unless ``split`` cuts it into several (then only h5py reads it).
    """
    with h5py.File(path, "w") as f:
        for key, arr in entries.items():
            chunks = tuple(max(1, (d + 1) // 2) for d in arr.shape) if split else arr.shape
            f.create_dataset(key, data=arr, compression="lzf", chunks=chunks)
    return path


def write_stacked(path: Path, data: np.ndarray, labels, classes, keys) -> Path:
    """A ``stacked`` archive: data/labels/keys/classes at the root, contiguous data."""
    with h5py.File(path, "w") as f:
        f.attrs[fmt.ATTR_FORMAT] = fmt.FORMAT_VERSION
        f.attrs[fmt.ATTR_LAYOUT] = fmt.LAYOUT_STACKED
        f.create_dataset(fmt.STACKED_DATA, data=data)
        f.create_dataset(fmt.STACKED_LABELS, data=np.asarray(labels, np.int64))
        f.create_dataset(fmt.STACKED_KEYS, data=np.array([k.encode() for k in keys]))
        f.create_dataset(fmt.STACKED_CLASSES, data=np.array([c.encode() for c in classes]))
        group = f.create_group(fmt.INDEX_GROUP)
        group.create_dataset("keys", data=np.array([k.encode() for k in keys]))
        group.create_dataset("size", data=np.full(len(keys), data[0].nbytes, np.uint64))
        group.create_dataset("crc32", data=np.zeros(len(keys), np.uint32))
    return path


def png_bytes(arr: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", arr, extension=".png")


@pytest.fixture
def arrays() -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "a/img_0.png": photo_like(rng, 12, 9),
        "a/b/img_1.png": photo_like(rng, 7, 5, 0),
        "c/img_2.png": rng.integers(0, 255, (6, 4, 4), dtype=np.uint8),  # lzf cannot shrink it
        "d/vec.npy": rng.normal(size=(3, 5)).astype("<f4"),
        "e/flat.png": np.full((20, 16, 3), 7, np.uint8),  # compresses well with any codec
    }


@pytest.mark.parametrize("codec", ["none", "lzf", "gzip"])
def test_index_rows_match_entries_and_reads_skip_h5py(tmp_path, arrays, codec):
    path = write_archive(tmp_path / "a.h5", arrays, codec=codec)
    index = read_index(path)
    assert index.layout == fmt.LAYOUT_FILES
    assert index.keys == list(arrays)
    assert len(index) == 5
    assert (index.offset > 0).all()
    assert (index.stored[-1] < 20 * 16 * 3) == (codec != "none")
    assert index.position("c/img_2.png") == 2
    assert index.entry_shape(1) == (7, 5)
    with ArchiveReader(path, index) as reader:
        for pos, expected in enumerate(arrays.values()):
            got = reader.read(pos)
            assert got.dtype == expected.dtype and np.array_equal(got, expected)
            assert got.flags.writeable  # as h5py's arrays are: in-place transforms work
        # The first read of each row proves, through HDF5, that its block is its dataset's
        # storage; once proven, rows are read by os.pread alone.
        reader.close()
        for pos, expected in enumerate(arrays.values()):
            assert np.array_equal(reader.read(pos), expected)
        assert reader._h5 is None


def test_entry_over_several_chunks_reads_through_h5py(tmp_path):
    arr = np.arange(64 * 10, dtype=np.uint16).reshape(64, 10)
    path = write_archive(tmp_path / "a.h5", {"big.npy": arr}, chunks=(16, 10))
    with ArchiveReader(path) as reader:
        assert reader.index.offset[0] == 0
        assert np.array_equal(reader.read(0), arr)
        assert reader._h5 is not None


def test_bytes_and_text_entries_decode_or_stay_exact(tmp_path, arrays):
    img = arrays["a/img_0.png"]
    buf = io.BytesIO()
    np.save(buf, arrays["d/vec.npy"])
    entries = {"x/img.png": png_bytes(img), "x/vec.npy": buf.getvalue(), "x/blob.bin": b"\x00\x01\x02", "x/t.txt": "héllo"}
    path = write_archive(tmp_path / "b.h5", entries, codec="none")
    with ArchiveReader(path) as reader:
        assert np.array_equal(reader.read(0), img)
        assert np.array_equal(reader.read(1), arrays["d/vec.npy"])
        assert reader.read(2).tolist() == [0, 1, 2]
        assert reader.read(3) == "héllo"
        for pos, raw in enumerate(entries.values()):
            exact = reader.read(pos, decode=False)
            assert exact.dtype == np.uint8
            assert exact.tobytes() == (raw.encode() if isinstance(raw, str) else raw)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imageio's legacy plugins, tried on the junk
def test_bytes_that_do_not_decode(tmp_path, arrays):
    img = arrays["a/img_0.png"]
    entries = {"png_named.jpg": png_bytes(img), "grey.jpg": iio.imwrite("<bytes>", img[..., 0], extension=".jpg"),
               "junk.jpg": b"not an image at all"}
    path = write_archive(tmp_path / "b.h5", entries, codec="none")
    with ArchiveReader(path) as reader:
        assert np.array_equal(reader.read(0), img)  # not a JPEG after all: imageio finds it is a PNG
        grey = reader.read(1)
        assert grey.ndim == 2 and np.array_equal(grey, iio.imread(entries["grey.jpg"], extension=".jpg"))
        with pytest.raises(ReadError, match=r"b\.h5::junk\.jpg"):
            reader.read(2)


def test_decode_value_leaves_arrays_alone():
    arr = np.arange(6, dtype=np.uint8)
    assert decode_value(arr, Kind.ARRAY, "x.png") is arr
    assert decode_value(arr, Kind.BYTES, "x.unknown") is arr


def test_unknown_key_names_key_and_archive(tmp_path, arrays):
    path = write_archive(tmp_path / "a.h5", arrays)
    index = read_index(path)
    with pytest.raises(ArchiveKeyError, match=r"'nope\.png'.*a\.h5"):
        index.position("nope.png")
    assert "nope.png" not in index and "a/img_0.png" in index


@pytest.mark.parametrize("split", [False, True])
def test_plain_hdf5_is_walked_in_sorted_order(tmp_path, arrays, split):
    plain = {"z/last.jpg": arrays["a/img_0.png"], "a/b/deep.jpg": arrays["a/b/img_1.png"], "m.jpg": arrays["c/img_2.png"]}
    path = write_plain(tmp_path / "orig.h5", plain, split=split)
    with h5py.File(path, "r+") as f:
        f["raw/contiguous.npy"] = arrays["d/vec.npy"]
        f.create_dataset("raw/gzip.npy", data=arrays["d/vec.npy"], compression="gzip", chunks=(3, 5))
        f.create_dataset("raw/text", data="not an array")
    plain.update({"raw/contiguous.npy": arrays["d/vec.npy"], "raw/gzip.npy": arrays["d/vec.npy"]})
    index = read_index(path)
    assert index.layout == LAYOUT_PLAIN
    assert index.keys == sorted([*plain, "raw/text"])
    assert index.entry_shape(0) == plain["a/b/deep.jpg"].shape
    direct = {k for k, o in zip(index.keys, index.offset) if o}
    expected_direct = {"raw/contiguous.npy", "raw/gzip.npy"} | (set() if split else {"z/last.jpg", "a/b/deep.jpg", "m.jpg"})
    assert direct == expected_direct
    with ArchiveReader(path, index) as reader:
        for key, arr in plain.items():
            assert np.array_equal(reader.read(index.position(key)), arr)
        assert reader.read(index.position("raw/text")) == b"not an array"  # as h5py gives it


def test_stacked_archive_is_recognised(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 255, (5, 4, 3, 3), dtype=np.uint8)
    keys = [f"{c}/img_{i}.png" for i, c in enumerate("aabbb")]
    path = write_stacked(tmp_path / "s.h5", data, [0, 0, 1, 1, 1], ["a", "b"], keys)
    index = read_index(path)
    assert index.layout == fmt.LAYOUT_STACKED
    assert index.keys == keys
    assert index.classes == ["a", "b"] and index.labels.tolist() == [0, 0, 1, 1, 1]
    with ArchiveReader(path, index) as reader:
        assert [np.array_equal(reader.read(i), data[i]) for i in range(5)] == [True] * 5


@pytest.mark.parametrize("make", ["missing", "folder", "text", "empty"])
def test_not_an_archive_names_the_path(tmp_path, make):
    path = tmp_path / "thing.h5"
    if make == "folder":
        path.mkdir()
    elif make == "text":
        path.write_text("hello, not HDF5")
    elif make == "empty":
        path.write_bytes(b"")
    with pytest.raises(ArchiveError, match="thing.h5"):
        read_index(path)


def test_data2h5_archive_without_index_is_an_error(tmp_path):
    path = tmp_path / "broken.h5"
    with h5py.File(path, "w") as f:
        f.attrs[fmt.ATTR_FORMAT] = fmt.FORMAT_VERSION
        f["a.png"] = np.zeros(3)
    with pytest.raises(ArchiveError, match=r"broken\.h5.*index"):
        read_index(path)


def corrupt(path: Path, index: Index, pos: int, nbytes: int = 16) -> None:
    """Overwrite ``nbytes`` in the middle of entry ``pos``'s stored bytes."""
    start = int(index.offset[pos]) + int(index.stored[pos]) // 2 - nbytes // 2
    with open(path, "r+b") as fh:
        fh.seek(start)
        old = fh.read(nbytes)
        fh.seek(start)
        fh.write(bytes(b ^ 0xFF for b in old))


@pytest.mark.parametrize("codec, value, stored_crc", [
    ("lzf", "array", True),  # caught by the stored bytes' checksum
    ("gzip", "array", False),  # caught by zlib's own checksum
    ("none", "png", False),  # caught by the source file's checksum
    ("gzip", "png", True),
])
def test_damaged_entry_raises_corrupt_entry_error(tmp_path, arrays, codec, value, stored_crc):
    img = arrays["a/img_0.png"]
    entries = {"ok.png": img, "bad/one.png": img} if value == "array" else {"ok.png": png_bytes(img), "bad/one.png": png_bytes(img)}
    path = write_archive(tmp_path / "a.h5", entries, codec=codec, stored_crc=stored_crc)
    index = read_index(path)
    corrupt(path, index, 1)
    with ArchiveReader(path, index) as reader:
        assert np.array_equal(reader.read(0), img)
        with pytest.raises(CorruptEntryError, match=r"a\.h5.*'bad/one\.png'"):
            reader.read(1)


def test_damage_found_by_hdf5_raises_corrupt_entry_error(tmp_path):
    """Entries read through h5py (here: several gzip chunks) report damage the same way."""
    arr = np.tile(np.arange(64, dtype=np.uint16), (32, 1))
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("ok.npy", data=arr, compression="gzip", chunks=(8, 64))
        dset = f.create_dataset("bad.npy", data=arr, compression="gzip", chunks=(8, 64))
        chunk = dset.id.get_chunk_info(1)
    with open(path, "r+b") as fh:
        fh.seek(chunk.byte_offset + chunk.size // 2)
        fh.write(b"\xff" * 8)
    with ArchiveReader(path) as reader:
        assert reader.index.offset.tolist() == [0, 0]
        assert np.array_equal(reader.read(reader.index.position("ok.npy")), arr)
        with pytest.raises(CorruptEntryError, match=r"plain\.h5.*'bad\.npy'"):
            reader.read(reader.index.position("bad.npy"))


def test_truncated_archive_raises_corrupt_entry_error(tmp_path, arrays):
    path = write_archive(tmp_path / "a.h5", {"k.png": png_bytes(arrays["a/img_0.png"])}, codec="none")
    index = read_index(path)
    os.truncate(path, int(index.offset[0]) + 10)
    with ArchiveReader(path, index) as reader, pytest.raises(ArchiveError, match="truncated"):
        reader.read(0)


def test_reader_pickles_without_handles(tmp_path, arrays):
    plain = write_plain(tmp_path / "plain.h5", arrays, split=True)  # read through h5py
    packed = write_archive(tmp_path / "a.h5", arrays)  # read through os.pread
    for path in (plain, packed):
        reader = ArchiveReader(path)
        reader.read(0)
        assert (reader._h5, reader._fd) != (None, None)
        clone = pickle.loads(pickle.dumps(reader))
        assert clone._h5 is None and clone._fd is None
        key = clone.index.keys[1]
        assert np.array_equal(clone.read(1), arrays[key])
        reader.close()
        clone.close()
        assert reader._h5 is None and reader._fd is None
        assert np.array_equal(reader.read(1), arrays[key])  # reopens after close
        reader.close()
