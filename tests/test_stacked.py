"""The stacked layout: one (N, ...) array with labels, keys and classes, also an h5torch file."""
from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

import data2h5
from convert_helpers import index_group

from data2h5.codecs import CODECS, FILTER_BLOSC, FILTER_LZF, FILTER_ZSTD, parse_compression
from data2h5.errors import LayoutError
from data2h5.format import Kind
from data2h5.format import ROOT_CLASS, class_of
from data2h5.layouts.stacked import StackedWriter

from conftest import write_images

SHAPE = (6, 5, 3)


def samples(count: int, shape=SHAPE, dtype=np.uint8, seed: int = 0) -> dict:
    """``count`` distinct arrays under keys spread over three classes and the root folder."""
    rng = np.random.default_rng(seed)
    folders = ["dog", "cat", "bird/small", ""]
    out = {}
    for i in range(count):
        folder = folders[i % len(folders)]
        key = f"{folder}/s_{i:03d}.png" if folder else f"s_{i:03d}.png"
        out[key] = (rng.integers(0, 200, size=shape) + i % 50).astype(dtype)
    return out


def write(path: Path, items: dict, n=None, codec=None, chunk_bytes: int = 1 << 20) -> int:
    with h5py.File(path, "w") as f:
        writer = StackedWriter(f, len(items) if n is None else n, codec, chunk_bytes=chunk_bytes)
        for key, arr in items.items():
            writer.add(key, arr, arr.nbytes + 100, zlib.crc32(arr.tobytes()))
        return writer.close()


def expected_labels(keys):
    classes = sorted({class_of(k) for k in keys})
    return classes, [classes.index(class_of(k)) for k in keys]


def test_class_of():
    assert class_of("cat/a.png") == "cat"
    assert class_of("bird/small/a.png") == "bird"
    assert class_of("a.png") == ROOT_CLASS == "."


@pytest.mark.parametrize("shape", [(), (7,), SHAPE])
def test_content_labels_keys_classes_index(tmp_path, shape):
    items = samples(23, shape=shape)
    path = tmp_path / "s.h5"
    stored = write(path, items, chunk_bytes=5 * max(1, int(np.prod(shape))))  # 5 rows a chunk
    keys = list(items)
    classes, labels = expected_labels(keys)
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert data.shape == (23, *shape) and data.dtype == np.uint8
        np.testing.assert_array_equal(data[()], np.stack(list(items.values())))
        assert stored == data.id.get_storage_size() > 0
        assert f["labels"].dtype == np.int64
        assert f["labels"][()].tolist() == labels
        assert [k.decode() for k in f["keys"][()]] == keys
        assert [c.decode() for c in f["classes"][()]] == classes == [".", "bird", "cat", "dog"]
        index = index_group(f)
        assert [k.decode() for k in index["keys"][()]] == keys
        assert index["size"][()].tolist() == [a.nbytes + 100 for a in items.values()]
        assert index["crc32"][()].tolist() == [zlib.crc32(a.tobytes()) for a in items.values()]


def test_links_and_h5torch_attributes(tmp_path):
    items = samples(9)
    path = tmp_path / "s.h5"
    write(path, items)
    links = {
        "central": "/data",
        "0/labels": "/labels",
        "0/keys": "/keys",
        "unstructured/classes": "/classes",
    }
    with h5py.File(path, "r") as f:
        index = index_group(f)
        for group, name, target in [(f, n, t) for n, t in links.items()] + [(index, "keys", "/keys")]:
            link = group.get(name, getlink=True)
            assert isinstance(link, h5py.SoftLink) and link.path == target, name
            assert group[name] == f[target]
        for group, name in [(f, n) for n in ["data", "labels", "keys", "classes"]] + [(index, "size"), (index, "crc32")]:
            assert isinstance(group.get(name, getlink=True), h5py.HardLink), name
        for name in ["data", "labels", "keys", "classes"]:
            attrs = f[name].attrs
            assert attrs["mode"] == "N-D"
            assert attrs["shape"].tolist() == list(f[name].shape)
            assert list(attrs["dtypes"]) == [str(f[name].dtype)] * 2
            assert attrs["filled_to"] == f[name].shape[0]


@pytest.mark.parametrize("in_memory", [False, True])
def test_h5torch_yields_the_same_samples(tmp_path, in_memory):
    pytest.importorskip("torch")
    h5torch = pytest.importorskip("h5torch")
    items = samples(14)
    path = tmp_path / "s.h5"
    write(path, items, n=20, chunk_bytes=4 * int(np.prod(SHAPE)))  # trimmed, several chunks
    keys = list(items)
    _, labels = expected_labels(keys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # h5torch warns about objects not filled to their shape
        ds = h5torch.Dataset(str(path), in_memory=in_memory)
    try:
        assert len(ds) == len(items)
        for i, (key, arr) in enumerate(items.items()):
            sample = ds[i]
            assert set(sample) == {"central", "0/labels", "0/keys"}
            np.testing.assert_array_equal(sample["central"], arr)
            assert sample["central"].dtype == arr.dtype
            assert sample["0/labels"] == labels[i]
            assert sample["0/keys"].decode() == key
    finally:
        ds.close()


def test_h5torch_batches_through_a_dataloader(tmp_path):
    torch = pytest.importorskip("torch")
    h5torch = pytest.importorskip("h5torch")
    items = samples(10)
    path = tmp_path / "s.h5"
    write(path, items)
    _, labels = expected_labels(list(items))
    ds = h5torch.Dataset(str(path))
    try:
        batches = list(torch.utils.data.DataLoader(ds, batch_size=4))
    finally:
        ds.close()
    assert [tuple(b["central"].shape) for b in batches] == [(4, *SHAPE), (4, *SHAPE), (2, *SHAPE)]
    np.testing.assert_array_equal(torch.cat([b["central"] for b in batches]).numpy(), np.stack(list(items.values())))
    assert torch.cat([b["0/labels"] for b in batches]).tolist() == labels


def test_shape_mismatch_names_both_keys_shapes_and_remedy(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        writer = StackedWriter(f, 3, None)
        writer.add("cat/a.png", np.zeros((16, 16, 3), np.uint8), 1, 0)
        with pytest.raises(LayoutError) as info:
            writer.add("dog/b.png", np.zeros((17, 16, 3), np.uint8), 1, 0)
    text = str(info.value)
    assert "\n" not in text
    for part in ["cat/a.png", "dog/b.png", "(16, 16, 3)", "(17, 16, 3)", "--layout files", "plugins/resize_gray.py"]:
        assert part in text


def test_dtype_mismatch_names_both_dtypes(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        writer = StackedWriter(f, 3, None)
        writer.add("cat/a.npy", np.zeros((4,), np.float32), 1, 0)
        with pytest.raises(LayoutError) as info:
            writer.add("cat/b.npy", np.zeros((4,), np.float64), 1, 0)
    text = str(info.value)
    for part in ["cat/a.npy", "cat/b.npy", "float32", "float64", "--layout files"]:
        assert part in text


@pytest.mark.parametrize(
    "value, kind, what",
    [
        (b"\x89PNG", Kind.ARRAY, "raw bytes"),
        ("some text", Kind.ARRAY, "text"),
        (np.frombuffer(b"raw file", np.uint8), Kind.BYTES, "raw bytes"),
        (np.frombuffer(b"text", np.uint8), Kind.TEXT, "text"),
    ],
)
def test_undecoded_values_are_refused(tmp_path, value, kind, what):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        writer = StackedWriter(f, 2, None)
        with pytest.raises(LayoutError, match=f"notes/x.bin: the reader gave {what}.*--layout files"):
            writer.add("notes/x.bin", value, 4, 0, kind)


def test_non_numeric_arrays_are_refused(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        writer = StackedWriter(f, 2, None)
        with pytest.raises(LayoutError, match="a/x.npy: dtype <U3"):
            writer.add("a/x.npy", np.array(["abc"]), 4, 0)


def test_skipped_samples_trim_to_the_rows_written(tmp_path):
    items = samples(7)
    path = tmp_path / "s.h5"
    write(path, items, n=30, chunk_bytes=3 * int(np.prod(SHAPE)))
    with h5py.File(path, "r") as f:
        assert f["data"].shape == (7, *SHAPE)
        assert f["data"].attrs["shape"].tolist() == [7, *SHAPE]
        assert f["data"].attrs["filled_to"] == 7
        np.testing.assert_array_equal(f["data"][()], np.stack(list(items.values())))
        for dset in [f["labels"], f["keys"], index_group(f)["size"], index_group(f)["crc32"]]:
            assert dset.shape == (7,), dset


def test_more_rows_than_announced_grow_the_array(tmp_path):
    items = samples(9)
    path = tmp_path / "s.h5"
    write(path, items, n=4, chunk_bytes=2 * int(np.prod(SHAPE)))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][()], np.stack(list(items.values())))


def test_nothing_added_gives_an_empty_valid_archive(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        assert StackedWriter(f, 5, None).close() == 0
    with h5py.File(path, "r") as f:
        assert f["data"].shape == (0,)
        assert f["labels"].shape == f["keys"].shape == f["classes"].shape == (0,)
        assert f["central"].attrs["filled_to"] == 0


@pytest.mark.parametrize("spec", ["auto", "none", "lzf", "gzip", "gzip:9", "zstd", "blosc-lz4"])
def test_codecs_read_back_identical(tmp_path, spec):
    if spec in ("zstd", "blosc-lz4"):
        pytest.importorskip("hdf5plugin")
    codec = parse_compression(spec)
    items = samples(11, dtype=np.uint16)
    path = tmp_path / "s.h5"
    write(path, items, codec=codec, chunk_bytes=3 * SHAPE[0] * SHAPE[1] * SHAPE[2] * 2)
    filters = {"auto": [FILTER_LZF], "none": [], "lzf": [FILTER_LZF], "gzip": [h5py.h5z.FILTER_DEFLATE],
               "gzip:9": [h5py.h5z.FILTER_DEFLATE], "zstd": [FILTER_ZSTD], "blosc-lz4": [FILTER_BLOSC]}
    with h5py.File(path, "r") as f:
        data = f["data"]
        np.testing.assert_array_equal(data[()], np.stack(list(items.values())))
        dcpl = data.id.get_create_plist()
        assert [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())] == filters[spec]
        if spec == "gzip:9":
            assert data.compression_opts == 9


@pytest.mark.parametrize(
    "chunk_bytes, rows",
    [(1 << 20, 12), (10 * 90, 10), (90, 1), (1, 1), (91, 1)],
)
def test_chunks_run_along_n(tmp_path, chunk_bytes, rows):
    items = samples(12)  # 90 bytes a sample
    path = tmp_path / "s.h5"
    write(path, items, chunk_bytes=chunk_bytes)
    with h5py.File(path, "r") as f:
        assert f["data"].chunks == (rows, *SHAPE)
        np.testing.assert_array_equal(f["data"][()], np.stack(list(items.values())))


def test_unicode_keys_and_classes_round_trip(tmp_path):
    items = {"ñandú/ö.png": np.ones((2, 2), np.uint8), "ämsel/ß.png": np.zeros((2, 2), np.uint8)}
    path = tmp_path / "s.h5"
    write(path, items)
    with h5py.File(path, "r") as f:
        assert [k.decode("utf-8") for k in f["keys"][()]] == list(items)
        assert [c.decode("utf-8") for c in f["classes"][()]] == ["ämsel", "ñandú"]
        assert f["labels"][()].tolist() == [1, 0]


def test_closing_twice_is_an_error(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        writer = StackedWriter(f, 1, CODECS["lzf"])
        writer.add("a/b.png", np.ones(3, np.uint8), 3, 0)
        writer.close()
        with pytest.raises(RuntimeError):
            writer.close()
        with pytest.raises(RuntimeError):
            writer.add("a/c.png", np.ones(3, np.uint8), 3, 0)


def image_tree(root: Path, names, size: int = 16) -> dict:
    """One same-shape RGB PNG per name (``write_images`` varies the shape with the position)."""
    files = {}
    for seed, name in enumerate(names):
        files.update(write_images(root, [name], size=size, seed=seed))
    return files


CLASS_TREE = ["cat/c0", "cat/c1", "cat/deep/c2", "dog/d0", "dog/d1", "top"]


@pytest.mark.parametrize("workers", [1, 2])
def test_convert_stacked_end_to_end(tmp_path, workers):
    import imageio.v3 as iio

    from data2h5 import convert

    files = image_tree(tmp_path / "src", CLASS_TREE)
    dst = tmp_path / "out.h5"
    convert(tmp_path / "src", dst, ext="png", layout="stacked", workers=workers)
    with h5py.File(dst, "r") as f:
        assert f.attrs["layout"] == "stacked"
        keys = [k.decode() for k in f["keys"][()]]
        assert sorted(keys) == sorted(files)
        assert f["data"].shape == (6, 16, 16, 3) and f["data"].chunks[1:] == (16, 16, 3)
        for i, key in enumerate(keys):
            np.testing.assert_array_equal(f["data"][i], iio.imread(files[key]))
        classes, labels = expected_labels(keys)
        assert [c.decode() for c in f["classes"][()]] == classes == [".", "cat", "dog"]
        assert f["labels"][()].tolist() == labels
        raw = [files[k].read_bytes() for k in keys]
        assert index_group(f)["size"][()].tolist() == [len(b) for b in raw]
        assert index_group(f)["crc32"][()].tolist() == [zlib.crc32(b) for b in raw]
        data = f["data"][()]

    pytest.importorskip("torch")
    h5torch = pytest.importorskip("h5torch")
    ds = h5torch.Dataset(str(dst))
    try:
        assert len(ds) == 6
        for i in range(6):
            np.testing.assert_array_equal(ds[i]["central"], data[i])
            assert ds[i]["0/labels"] == labels[i] and ds[i]["0/keys"].decode() == keys[i]
    finally:
        ds.close()


def test_convert_stacked_skips_unreadable_files_and_trims(tmp_path):
    from data2h5 import convert

    files = image_tree(tmp_path / "src", CLASS_TREE[:4])
    (tmp_path / "src" / "dog" / "broken.png").write_bytes(b"not a png")
    dst = tmp_path / "out.h5"
    report = convert(tmp_path / "src", dst, ext="png", layout="stacked", workers=1, on_error="skip")
    assert [k for k, _ in report.skipped] == ["dog/broken.png"]
    with h5py.File(dst, "r") as f:
        assert f["data"].shape == (4, 16, 16, 3)
        assert sorted(k.decode() for k in f["keys"][()]) == sorted(files)
        assert f["central"].attrs["filled_to"] == f["central"].attrs["shape"][0] == 4


def test_convert_stacked_refuses_mixed_shapes(tmp_path):
    from data2h5 import convert

    image_tree(tmp_path / "src", ["cat/a", "cat/b"])
    write_images(tmp_path / "src", ["dog/big"], size=20)
    dst = tmp_path / "out.h5"
    with pytest.raises(LayoutError, match=r"dog/big\.png.*\(20, 20, 3\).*\(16, 16, 3\).*--layout files"):
        convert(tmp_path / "src", dst, ext="png", layout="stacked", workers=1, on_error="skip")
    assert not dst.exists()


@pytest.mark.parametrize("reader, ext, what", [("bytes", "png", "raw bytes"), ("text", "txt", "text")])
def test_convert_stacked_refuses_values_that_are_not_arrays(tmp_path, reader, ext, what):
    from data2h5 import convert

    image_tree(tmp_path / "src", ["cat/a", "cat/b"])
    for name in ("cat/a", "cat/b"):
        (tmp_path / "src" / f"{name}.txt").write_text("a line")
    dst = tmp_path / "out.h5"
    with pytest.raises(LayoutError, match=rf"cat/a\.{ext}.*{what}.*--layout files"):
        convert(tmp_path / "src", dst, ext=ext, reader=reader, layout="stacked", workers=1)
    assert not dst.exists()


@pytest.mark.parametrize("compression", ["lzf", "gzip", "none", "blosc-lz4"])
def test_each_chunk_of_data_records_the_checksum_of_its_stored_bytes(tmp_path, compression):
    if compression == "blosc-lz4":
        pytest.importorskip("hdf5plugin")
    import zlib

    src = tmp_path / "src"
    for i in range(23):  # several chunks and a partial last one
        (src / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        np.save(src / f"c{i % 3}" / f"{i:02d}.npy", np.full((256, 256, 3), i, dtype=np.uint8))
    out = tmp_path / "out.h5"
    data2h5.convert(src, out, ext="npy", layout="stacked", compression=compression, workers=1)
    with h5py.File(out, "r") as f:
        data = f["data"]
        rows = data.chunks[0]
        crcs = index_group(f)["chunk_crc32"][()]
        assert len(crcs) == -(-len(data) // rows) > 1
        for c, crc in enumerate(crcs):
            _, stored = data.id.read_direct_chunk((c * rows, 0, 0, 0))
            assert zlib.crc32(stored) == crc
        keys = [k.decode() for k in f["keys"][()]]
        for i, key in enumerate(keys):
            assert (data[i] == int(key.split("/")[1][:2])).all()


@pytest.mark.parametrize("compression", ["gzip:6", "zstd", "lzf"])
def test_chunks_compressed_by_spawned_workers_equal_those_of_one_process(tmp_path, compression):
    """With a pool, full chunks are compressed by the workers (the codec travels to spawned
    processes): the archive holds the same rows and the same stored chunks as one made in
    one process, and verifies."""
    src = tmp_path / "src"
    rng = np.random.default_rng(3)
    for i in range(60):
        (src / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        np.save(src / f"c{i % 3}/{i:03d}.npy", rng.integers(0, 30, (128, 128, 3), dtype=np.uint8))
    one, pool = tmp_path / "one.h5", tmp_path / "pool.h5"
    data2h5.convert(src, one, ext="npy", layout="stacked", compression=compression, workers=1)
    data2h5.convert(src, pool, ext="npy", layout="stacked", compression=compression, workers=2,
                    start_method="spawn")
    with h5py.File(one, "r") as a, h5py.File(pool, "r") as b:
        np.testing.assert_array_equal(a["data"][()], b["data"][()])
        assert a["data"].chunks == b["data"].chunks and a["data"].chunks[0] < 60  # several chunks
        np.testing.assert_array_equal(index_group(a)["chunk_crc32"][()], index_group(b)["chunk_crc32"][()])
    assert data2h5.verify(pool, src).ok
