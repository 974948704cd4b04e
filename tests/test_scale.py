"""What keeps a million entries cheap: keys as one byte array, a dataset that pickles to a
path and its options whatever its size, a worker that reads (and checks) the index itself,
and a listing streamed in blocks. Timing goals live in ``benchmark.py --scale``."""
from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

import data2h5
from convert_helpers import index_group
from data2h5.archive import Keys
from data2h5.errors import ArchiveError
from data2h5.info import listing
from data2h5.loaders import H5Dataset
from data2h5.walk import SourceFile, SourceFiles


def tiny_tree(root: Path, n: int, per_folder: int = 500) -> Path:
    rng = np.random.default_rng(n)
    for i in range(n):
        folder = root / f"{i // per_folder:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i % per_folder:04d}.bin").write_bytes(rng.integers(0, 256, 64 + i % 448, np.uint8).tobytes())
    return root


def test_keys_behave_as_a_list_of_str():
    names = ["b/2", "a.b", "a/1", "caf\u00e9/x", "a/0", "bad\udcff/y"]
    keys = Keys.of(names)
    assert len(keys) == 6 and list(keys) == names and keys == names and keys[-1] == names[-1]
    assert keys[1:3] == names[1:3] and keys.tolist() == names
    for pos, name in enumerate(names):
        assert keys.position(name) == pos
    assert keys.position("a") == -1 and keys.position("a/1/") == -1 and keys.position("x" * 99) == -1
    assert sorted(keys.prefixed("a/").tolist()) == [2, 4]  # unsorted keys: sorted once, rows in row order
    assert keys.prefixed("a/").tolist() == [2, 4] and keys.prefixed("a").tolist() == [1, 2, 4]
    assert keys.prefixed("caf\u00e9/").tolist() == [3] and keys.prefixed("zz").tolist() == []
    assert pickle.loads(pickle.dumps(keys)) == keys


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    base = tmp_path_factory.mktemp("scale")
    out = {}
    for n in (1000, 10000):
        src = tiny_tree(base / f"src{n}", n)
        out[n] = data2h5.convert(src, base / f"packed{n}.h5", ext="bin", reader="bytes", layout="packed",
                                 workers=2).output
    return out


def test_a_dataset_pickles_to_the_same_size_whatever_its_length(archives):
    sizes = {}
    for n, path in archives.items():
        for target in (None, "folder"):
            ds = H5Dataset(path, decode=False, target=target)
            assert len(ds) == n and (target is None or len(ds.classes) == n // 500)
            sizes[n, target] = len(pickle.dumps(ds))
            back = pickle.loads(pickle.dumps(ds))
            assert len(back) == n and back.keys == ds.keys and back.targets == ds.targets
            assert np.array_equal(np.asarray(back[n - 1][0] if target else back[n - 1]), ds[n - 1][0] if target else ds[n - 1])
    for target in (None, "folder"):
        assert sizes[10000, target] < 2 * sizes[1000, target] + 1000, sizes
    assert max(sizes.values()) < 20_000, sizes


def test_a_prefix_selects_by_binary_search(archives):
    ds = H5Dataset(archives[10000], decode=False, prefix=["003/", "010/"], return_key=True)
    assert len(ds) == 1000 and [k[:4] for k in ds.keys][::500] == ["003/", "010/"]
    assert all(key.startswith(("003/", "010/")) for _, key in (ds[i] for i in range(0, 1000, 97)))


def test_a_worker_reads_and_checks_the_index_itself(tmp_path, archives):
    """The pickled dataset carries no index: the unpickled one reads the archive's again,
    and refuses a row that no longer proves out."""
    path = tmp_path / "archive.h5"
    path.write_bytes(Path(archives[1000]).read_bytes())
    payload = pickle.dumps(H5Dataset(path, decode=False))
    with h5py.File(path, "r+") as f:
        index_group(f)["offset"][0] = 1 << 40  # now points past the end of the file
    worker = pickle.loads(payload)
    with pytest.raises(ArchiveError, match="lies outside its block"):
        worker[0]


def test_listing_streams_blocks_and_escapes_keys(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for name in ("x\x1b[31m.bin", "y\n.bin", "z.bin"):
        (src / "a" / name).write_bytes(b"1")
    (src / "b.bin").write_bytes(b"2")
    out = data2h5.convert(src, tmp_path / "out.h5", ext="bin", reader="bytes", layout="packed", workers=1).output
    monkeypatch.setattr("data2h5.info.LISTING_BLOCK", 2)
    blocks = list(listing(out))
    assert len(blocks) == 2
    assert "".join(blocks).splitlines() == ["a/x\\x1b[31m.bin", "a/y\\x0a.bin", "a/z.bin", "b.bin"]
    assert "".join(listing(out, "a/")).splitlines() == ["a/x\\x1b[31m.bin", "a/y\\x0a.bin", "a/z.bin"]


def test_source_files_are_one_buffer_that_acts_as_a_list(tmp_path):
    """A walk's files as SourceFiles: what a list of SourceFile gives, from one buffer of
    keys; a slice (a batch for a worker) pickles only its own keys."""
    names = [f"{i // 100:02d}/caf\u00e9-{i:04d}.bin" for i in range(1000)]
    files = SourceFiles.of(str(tmp_path) + "/", names)
    listed = [SourceFile(str(tmp_path) + "/", name) for name in names]
    assert len(files) == 1000 and list(files) == listed and list(files.keys()) == names
    assert files[0] == listed[0] and files[-1] == listed[-1] and files[999].path == str(tmp_path) + "/" + names[-1]
    with pytest.raises(IndexError):
        files[1000]
    for cut in (slice(0, 0), slice(5, 3), slice(0, 1), slice(990, 2000), slice(-10, None), slice(1, 20, 3)):
        assert list(files[cut]) == listed[cut], cut
    batch = files[100:110]
    assert list(pickle.loads(pickle.dumps(batch))) == listed[100:110]
    assert len(pickle.dumps(batch)) < len(pickle.dumps(files)) / 20
    odd = files.where(lambda f: f.key.endswith(("1.bin", "3.bin")))
    assert list(odd) == [f for f in listed if f.key.endswith(("1.bin", "3.bin"))] and len(odd) == 200


@pytest.mark.parametrize("layout", ["files", "packed"])
def test_shape_column_is_as_wide_as_the_entries_need(tmp_path, layout):
    """One-dimensional entries need one column of shape, not eight: a million rows read
    8 MB, not 64 MB. The widest entry sets the width."""
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "a.npy", np.arange(6, dtype=np.int16))
    (src / "b.bin").write_bytes(b"tiny")
    one = data2h5.convert(src, tmp_path / "one.h5", ext=["npy", "bin"], layout=layout, workers=1).output
    np.save(src / "c.npy", np.zeros((2, 3, 4), np.uint8))
    three = data2h5.convert(src, tmp_path / "three.h5", ext=["npy", "bin"], layout=layout, workers=1).output
    for path, width in ((one, 1), (three, 3)):
        with h5py.File(path) as f:
            assert index_group(f)["shape"].shape[1] == width
        with data2h5.open(path) as archive:
            assert archive["a.npy"].tolist() == list(range(6)) and np.asarray(archive["b.bin"]).tobytes() == b"tiny"
            if width == 3:
                assert archive["c.npy"].shape == (2, 3, 4)
        assert data2h5.verify(path).ok
