"""BatchReader: real HDF5 files, real worker threads; content, order, buffers, shutdown, errors."""
from __future__ import annotations

import gc
import threading
import traceback
import weakref
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from data2h5.codecs import CODECS
from data2h5.errors import ArchiveError, CorruptEntryError, PluginError
from data2h5.loaders.batch_reader import THREAD_PREFIX, BatchReader
from data2h5.layouts.stacked import StackedWriter

pytestmark = pytest.mark.timeout(60)

N, SHAPE = 103, (6, 5, 3)  # NHWC rows; 103 = 6 batches of 16 + 7


def rows(n: int = N, shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Distinct, somewhat compressible rows: row i is offset by i so every row differs."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 4, size=(n, *shape)).astype(np.uint16)
    return ((base + np.arange(n).reshape((n,) + (1,) * len(shape)) * 3) % 251).astype(np.uint8)


def write(path: Path, data: np.ndarray, labels=None, **dataset_kw) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data, **dataset_kw)
        f["labels"] = np.arange(len(data)) if labels is None else labels
    return path


def workers() -> list:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def zstd_kw():
    hdf5plugin = pytest.importorskip("hdf5plugin")
    return dict(hdf5plugin.Zstd(clevel=3))


def blosc_kw():
    hdf5plugin = pytest.importorskip("hdf5plugin")
    return dict(hdf5plugin.Blosc(cname="lz4"))


# name: (h5py create_dataset options, expected reader method)
STORAGES = {
    "none": (lambda: dict(chunks=(10, *SHAPE)), "direct-chunks"),
    "lzf": (lambda: dict(chunks=(10, *SHAPE), compression="lzf"), "direct-chunks"),
    "gzip": (lambda: dict(chunks=(10, *SHAPE), compression="gzip"), "direct-chunks"),
    "zstd": (lambda: dict(chunks=(10, *SHAPE), **zstd_kw()), "direct-chunks"),
    "gzip-split-chunks": (lambda: dict(chunks=(7, 4, 2, 2), compression="gzip"), "direct-chunks"),
    "contiguous": (lambda: {}, "direct-contiguous"),
    "shuffle+gzip": (lambda: dict(chunks=(10, *SHAPE), compression="gzip", shuffle=True), "h5py-chunks"),
    "fletcher32": (lambda: dict(chunks=(10, *SHAPE), fletcher32=True), "h5py-chunks"),
    "blosc": (lambda: dict(chunks=(10, *SHAPE), **blosc_kw()), "h5py-chunks"),
}


@pytest.fixture(params=list(STORAGES))
def stored(request, tmp_path):
    make_kw, method = STORAGES[request.param]
    data = rows()
    return write(tmp_path / "d.h5", data, **make_kw()), data, method


def read_epoch(reader) -> tuple[list, list]:
    datas, labels = [], []
    for d, l in reader:
        datas.append(np.array(d))
        labels.append(np.array(l))
    return datas, labels


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_hold_the_stored_rows(stored, shuffle):
    path, data, method = stored
    with BatchReader(path, 16, shuffle=shuffle, seed=3, shuffle_window=25) as reader:
        assert reader.method == method
        datas, labels = read_epoch(reader)
    assert [len(l) for l in labels] == [16] * 6 + [7]
    for d, l in zip(datas, labels):
        np.testing.assert_array_equal(d, data[l])
    order = np.concatenate(labels)
    assert sorted(order) == list(range(N))
    assert (not np.array_equal(order, np.arange(N))) == shuffle


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("storage", ["gzip", "contiguous"])
def test_nhwc_file_read_as_nchw(tmp_path, storage, direct):
    data = rows()
    kw = STORAGES[storage][0]()
    path = write(tmp_path / "d.h5", data, **kw)
    with BatchReader(path, 32, shuffle=True, seed=0, file_layout="NHWC", layout="NCHW", direct=direct) as reader:
        for d, l in reader:
            assert d.shape == (len(l), 3, 6, 5)
            np.testing.assert_array_equal(d, data[l].transpose(0, 3, 1, 2))


@pytest.mark.parametrize("chunks", [(6, 5, 3, 10), None])
def test_samples_on_the_last_axis(tmp_path, chunks):
    data = rows()
    path = write(tmp_path / "d.h5", np.ascontiguousarray(data.transpose(1, 2, 3, 0)), labels=np.arange(N),
                 chunks=chunks, compression="gzip" if chunks else None)
    with BatchReader(path, 16, shuffle=True, seed=1, file_layout="HWCN", layout="NCHW") as reader:
        assert reader.method == ("direct-chunks" if chunks else "h5py")
        datas, labels = read_epoch(reader)
    for d, l in zip(datas, labels):
        np.testing.assert_array_equal(d, data[l].transpose(0, 3, 1, 2))
    assert sorted(np.concatenate(labels)) == list(range(N))


@pytest.mark.parametrize("shape", [(), SHAPE])
@pytest.mark.parametrize("codec", ["lzf", "gzip", "none"])
def test_data2h5_stacked_archive(tmp_path, shape, codec):
    data = rows(shape=shape)
    path = tmp_path / "stacked.h5"
    with h5py.File(path, "w") as f:
        writer = StackedWriter(f, N, CODECS[codec], chunk_bytes=9 * max(1, int(np.prod(shape))))
        for i, arr in enumerate(data):
            writer.add(f"c{i % 3}/{i:04d}.npy", arr, arr.nbytes, zlib.crc32(arr.tobytes()))
        writer.close()
    seen = []
    with BatchReader(path, 10, shuffle=True, seed=0, labels_field="keys") as reader:
        assert reader.method == "direct-chunks"
        for d, keys in reader:
            idx = [int(k.decode()[-8:-4]) for k in keys]
            np.testing.assert_array_equal(d, data[idx])
            seen += idx
    assert sorted(seen) == list(range(N))
    with BatchReader(path, 10) as reader:  # the default labels: class ids, c0 c1 c2
        labels = np.concatenate([np.array(l) for _, l in reader])
    assert labels.tolist() == [i % 3 for i in range(N)]


def test_drop_last(tmp_path):
    path = write(tmp_path / "d.h5", rows(), chunks=(10, *SHAPE), compression="gzip")
    with BatchReader(path, 16, shuffle=True, seed=0, drop_last=True) as reader:
        assert len(reader) == 6
        _, labels = read_epoch(reader)
    assert [len(l) for l in labels] == [16] * 6
    assert len(set(np.concatenate(labels).tolist())) == 96
    with BatchReader(path, 200, drop_last=True) as reader:
        assert len(reader) == 0 and list(reader) == []
        with pytest.raises(ValueError, match="no batch"):
            reader.next_batch()


def test_postprocess_runs_in_a_worker_thread(tmp_path):
    data = rows()
    path = write(tmp_path / "d.h5", data, chunks=(10, *SHAPE), compression="gzip")
    where = set()

    def scale(d, l):
        where.add(threading.current_thread().name)
        return d.astype(np.float32) / 255, l * 2

    with BatchReader(path, 16, postprocess=scale) as reader:
        for d, l in reader:
            assert d.dtype == np.float32
            np.testing.assert_allclose(d, data[l // 2] / np.float32(255))
    assert where and all(name.startswith(THREAD_PREFIX) for name in where)


def test_without_labels(tmp_path):
    data = rows()
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=data, chunks=(8, *SHAPE), compression="lzf")
    with BatchReader(path, 40, data_field="images", labels_field=None, copy=True) as reader:
        batches = list(reader)
    assert [l for _, l in batches] == [None] * 3
    np.testing.assert_array_equal(np.concatenate([np.array(d) for d, _ in batches]), data)


def test_epochs_and_seeds(tmp_path):
    path = write(tmp_path / "d.h5", rows(), chunks=(10, *SHAPE), compression="gzip")

    def orders(seed):
        with BatchReader(path, 16, shuffle=True, seed=seed, shuffle_window=30) as reader:
            out = {}
            for epoch, _, l in reader.epochs(3):
                out.setdefault(epoch, []).extend(l.tolist())
            return out

    first = orders(7)
    assert list(first) == [0, 1, 2]
    assert all(sorted(o) == list(range(N)) for o in first.values())
    assert first[0] != first[1] != first[2]
    assert orders(7) == first
    assert orders(8) != first


def test_loop_left_early_starts_a_fresh_epoch(tmp_path):
    path = write(tmp_path / "d.h5", rows(), chunks=(10, *SHAPE))
    with BatchReader(path, 16) as reader:
        for _, l in reader:
            assert workers()
            break
        assert workers() == []
        assert reader.epoch == 0
        _, labels = read_epoch(reader)
        assert reader.epoch == 1
        np.testing.assert_array_equal(np.concatenate(labels), np.arange(N))


def test_explicit_fetch_and_next_batch(tmp_path):
    data = rows()
    path = write(tmp_path / "d.h5", data, chunks=(10, *SHAPE), compression="gzip")
    with BatchReader(path, 50, prefetch=2) as reader:  # 3 batches an epoch: 50, 50, 3
        reader.fetch()
        reader.fetch()
        with pytest.raises(RuntimeError, match="already fetched"):
            reader.fetch()
        got = []
        for _ in range(5):
            d, l = reader.next_batch()
            np.testing.assert_array_equal(d, data[l])
            got.append((reader.epoch, l[0], len(l)))
            reader.fetch()
        assert got == [(0, 0, 50), (0, 50, 50), (0, 100, 3), (1, 0, 50), (1, 50, 50)]
        # next_batch() alone fetches what it needs
        d, l = reader.next_batch()
        assert (reader.epoch, l[0]) == (1, 100)
        d, l = reader.next_batch()
        assert (reader.epoch, l[0]) == (2, 0)


@pytest.mark.parametrize("copy", [False, True])
def test_buffer_reuse(tmp_path, copy):
    data = rows()
    path = write(tmp_path / "d.h5", data, chunks=(10, *SHAPE), compression="gzip")
    with BatchReader(path, 8, prefetch=2, copy=copy) as reader:
        it = iter(reader)
        d0, l0 = next(it)
        kept = d0.copy()
        batches = [next(it) for _ in range(3)]  # the ring has prefetch + 1 = 3 buffers
    d3 = batches[-1][0]
    np.testing.assert_array_equal(d3, data[24:32])
    if copy:
        np.testing.assert_array_equal(d0, kept)
        assert not np.shares_memory(d0, d3)
    else:
        assert np.shares_memory(d0, d3)
        np.testing.assert_array_equal(d0, data[24:32])


def test_torch_cpu_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    data = rows()
    path = write(tmp_path / "d.h5", data, chunks=(10, *SHAPE), compression="gzip")
    seen_in_worker = []

    def to_float(d, l):
        seen_in_worker.append(type(d))
        return d.float().div_(255), l

    with BatchReader(path, 16, device="cpu", file_layout="NHWC", layout="NCHW", postprocess=to_float) as reader:
        for d, l in reader:
            assert isinstance(d, torch.Tensor) and isinstance(l, torch.Tensor)
            assert d.dtype == torch.float32 and d.shape == (len(l), 3, 6, 5)
            expected = torch.from_numpy(data[l.numpy()].transpose(0, 3, 1, 2)).float() / 255
            assert torch.equal(d, expected)
    assert set(seen_in_worker) == {torch.Tensor}
    with BatchReader(path, 8, device="cpu", copy=True) as reader:
        it = iter(reader)
        d0, _ = next(it)
        for _ in range(4):
            next(it)
        assert torch.equal(d0, torch.from_numpy(data[:8]))


def test_pin_memory_without_cuda_warns(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: memory would be pinned")
    data = rows()
    path = write(tmp_path / "d.h5", data, chunks=(10, *SHAPE))
    with pytest.warns(UserWarning, match="CUDA is not available"):
        reader = BatchReader(path, 16, pin_memory=True, device="cpu")
    with reader:
        d, l = next(iter(reader))
        assert torch.equal(d, torch.from_numpy(data[:16]))


# ---------------------------------------------------------------- shutdown


def test_threads_stop_on_close_and_with(tmp_path):
    path = write(tmp_path / "d.h5", rows(), chunks=(10, *SHAPE))
    reader = BatchReader(path, 16, threads=2)
    it = iter(reader)
    next(it)
    assert workers()
    reader.close()
    assert workers() == [] and reader.closed
    reader.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        reader.next_batch()
    with BatchReader(path, 16) as reader:
        reader.fetch()
        reader.next_batch()
        assert workers()
    assert workers() == []


def test_threads_stop_when_the_reader_is_collected(tmp_path):
    path = write(tmp_path / "d.h5", rows(), chunks=(10, *SHAPE))
    reader = BatchReader(path, 16, postprocess=lambda d, l: (d, l))
    it = iter(reader)
    next(it)
    assert workers()
    ref = weakref.ref(reader)
    del reader, it
    gc.collect()
    assert ref() is None
    assert workers() == []


def test_threads_stop_when_the_loop_raises(tmp_path):
    path = write(tmp_path / "d.h5", rows(), chunks=(10, *SHAPE))
    reader = BatchReader(path, 16)

    def train():
        for i, _ in enumerate(reader):
            if i == 2:
                raise KeyError("from the training loop")

    with pytest.raises(KeyError, match="training loop"):
        train()
    assert workers() == []
    assert len(list(reader)) == len(reader)  # still usable: a fresh epoch
    reader.close()


def test_postprocess_error_reaches_the_caller(tmp_path):
    path = write(tmp_path / "d.h5", rows(), chunks=(10, *SHAPE))

    def broken(d, l):
        if l[0] >= 32:
            raise ZeroDivisionError("bad batch")
        return d, l

    with BatchReader(path, 16, postprocess=broken) as reader:
        with pytest.raises(PluginError, match="broken raised ZeroDivisionError: bad batch") as info:
            for _ in reader:
                pass
        assert workers() == []
    cause = info.value.__cause__
    assert isinstance(cause, ZeroDivisionError)
    assert "broken" in [frame.name for frame in traceback.extract_tb(cause.__traceback__)]


# ---------------------------------------------------------------- bad input


def corrupt_chunk(path: Path, offset=(20, 0, 0, 0)) -> None:
    with h5py.File(path, "r") as f:
        info = f["data"].id.get_chunk_info_by_coord(offset)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(bytes(range(7, 7 + min(info.size, 200))))


@pytest.mark.parametrize("storage", ["gzip", "lzf", "zstd", "shuffle+gzip"])
def test_corrupt_chunk(tmp_path, storage):
    data = np.zeros((N, *SHAPE), np.uint8)  # compresses well: the chunk holds real codec output
    path = write(tmp_path / "d.h5", data, **STORAGES[storage][0]())
    corrupt_chunk(path)
    with BatchReader(path, 16, threads=2) as reader:
        where = r"d\.h5: dataset 'data'.* (rows 20-29|chunk at \(20, 0, 0, 0\))"
        with pytest.raises(CorruptEntryError, match=where):
            read_epoch(reader)
    assert workers() == []


def test_batches_after_a_corrupt_chunk_raise_or_are_right(tmp_path):
    data = rows()
    path = write(tmp_path / "d.h5", data, chunks=(10, *SHAPE), compression="gzip")
    corrupt_chunk(path)
    errors = 0
    with BatchReader(path, 16, shuffle=True, seed=0, threads=2) as reader:  # one window: all rows
        for _ in range(len(reader)):
            try:
                d, l = reader.next_batch()
            except CorruptEntryError:
                errors += 1
                continue
            assert not set(l.tolist()) & set(range(20, 30))
            np.testing.assert_array_equal(d, data[l])
    assert errors >= 1


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("storage", ["gzip", "shuffle+gzip"])
def test_shuffled_windows_are_decoded_ahead(tmp_path, storage, drop_last):
    data = rows()
    path = write(tmp_path / "d.h5", data, **STORAGES[storage][0]())  # 11 chunks of 10 rows
    # One thread, and next_batch() alone: each batch is read, whole, before the next is fetched.
    with BatchReader(path, 16, shuffle=True, seed=5, shuffle_window=20, threads=1, prefetch=1,
                     drop_last=drop_last) as reader:
        rows_reader = reader._data_rows
        assert len(reader._epoch_plan(0).windows) == 6  # 5 of 2 chunks, 1 of 1
        first_read = {part.window.key: len(part.window.slabs) for part in reader._epoch_plan(0).batch(0)[1]}
        for epoch in range(3):
            plan, labels = reader._epoch_plan(epoch), []
            for b in range(len(reader)):
                keys = {part.window.key for part in plan.batch(b)[1]}
                if b or epoch:  # every window this batch reads is decoded before it is asked for
                    assert keys <= set(rows_reader._windows)
                    assert all((rows_reader._windows[k].state == 2).all() for k in keys)
                d, l = reader.next_batch()
                assert reader.epoch == epoch
                np.testing.assert_array_equal(d, data[l])
                labels.extend(l.tolist())
            if drop_last:
                assert len(labels) == 96 == len(set(labels))
            else:
                assert sorted(labels) == list(range(N))  # every row once, in a new order
                assert labels != list(range(N))
        # Only the windows the very first batch reads were decoded by a batch that reads them;
        # the last batch decoded the next epoch's first window, and no other window is held.
        assert rows_reader.decoded["on demand"] == sum(first_read.values())
        assert set(rows_reader._windows) == {(3, 0)}
        if not drop_last:  # each chunk decoded once an epoch
            next_first = len(reader._epoch_plan(3).windows[0].slabs)
            assert rows_reader.decoded["ahead"] == 3 * 11 - sum(first_read.values()) + next_first


@pytest.mark.parametrize("threads", [1, 2])
def test_a_corrupt_chunk_fails_only_the_batches_that_read_it(tmp_path, threads):
    data = rows()
    clean = write(tmp_path / "clean.h5", data, chunks=(10, *SHAPE), compression="gzip")
    path = write(tmp_path / "d.h5", data, chunks=(10, *SHAPE), compression="gzip")
    corrupt_chunk(path)  # rows 20-29, decoded ahead by a batch that does not read them
    kw = dict(shuffle=True, seed=1, shuffle_window=20, threads=threads)
    with BatchReader(clean, 16, **kw) as reader:
        expected = [l.tolist() for _, _, l in reader.epochs(2)]
    failed = []
    with BatchReader(path, 16, **kw) as reader:
        for b in range(len(expected)):  # two epochs
            try:
                d, l = reader.next_batch()
            except CorruptEntryError:
                failed.append(b)
                continue
            assert l.tolist() == expected[b]
            np.testing.assert_array_equal(d, data[l])
    reading = [b for b, l in enumerate(expected) if set(l) & set(range(20, 30))]
    assert reading and failed == reading


def test_truncated_file(tmp_path):
    path = write(tmp_path / "d.h5", rows(), chunks=(10, *SHAPE), compression="gzip")
    with h5py.File(path, "r") as f:
        last = max(f["data"].id.get_chunk_info(i).byte_offset for i in range(f["data"].id.get_num_chunks()))
    size = path.stat().st_size
    reader = BatchReader(path, 16)
    with open(path, "r+b") as fh:  # cut the file inside the last chunk once HDF5 has opened it
        fh.truncate(last + 3)
    with reader, pytest.raises(CorruptEntryError, match="truncated"):
        read_epoch(reader)
    assert size > last + 3


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(ArchiveError, match=r"nope\.h5: no such file"):
        BatchReader(tmp_path / "nope.h5")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(ArchiveError, match=r"text\.h5: not an HDF5 file"):
        BatchReader(text)
    path = write(tmp_path / "d.h5", rows(), chunks=(10, *SHAPE))
    with pytest.raises(ArchiveError, match=r"d\.h5: no dataset 'images' \(datasets at the root: data, labels\)"):
        BatchReader(path, data_field="images")
    with pytest.raises(ArchiveError, match=r"d\.h5: no dataset 'targets'"):
        BatchReader(path, labels_field="targets")
    short = write(tmp_path / "short.h5", rows(), labels=np.arange(N - 1))
    with pytest.raises(ArchiveError, match=r"short\.h5: dataset 'labels' has shape \(102,\)"):
        BatchReader(short)
    assert workers() == []


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(layout="NCHW"), "needs file_layout"),
        (dict(file_layout="NHW"), "must name each of the 4 axes"),
        (dict(file_layout="NHWC", layout="NCHX"), "letters of file_layout"),
        (dict(batch_size=0), "batch_size must be at least 1"),
        (dict(prefetch=0), "prefetch must be at least 1"),
    ],
)
def test_bad_options(tmp_path, kw, match):
    path = write(tmp_path / "d.h5", rows())
    with pytest.raises(ValueError, match=match):
        BatchReader(path, **kw)


def test_unwritten_chunks_read_as_fill_value_and_userblock_offsets(tmp_path):
    path = tmp_path / "d.h5"
    data = rows()
    with h5py.File(path, "w", userblock_size=1024) as f:
        d = f.create_dataset("data", shape=data.shape, dtype=np.uint8, chunks=(10, *SHAPE),
                             compression="gzip", fillvalue=9)
        d[:50] = data[:50]
        f["labels"] = np.arange(N)
    expected = np.concatenate([data[:50], np.full((N - 50, *SHAPE), 9, np.uint8)])
    with BatchReader(path, 25, shuffle=True, seed=0) as reader:
        assert reader.method == "direct-chunks"
        for d, l in reader:
            np.testing.assert_array_equal(d, expected[l])
