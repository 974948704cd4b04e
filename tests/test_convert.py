"""``data2h5.convert`` on real trees: content, readers, plugins, compression, index, report."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import zlib
from datetime import datetime, timezone
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd and blosc filters for reading)
import imageio.v3 as iio
import numpy as np
import pytest

import data2h5
from data2h5 import format as fmt
from data2h5.codecs import BLOSC_LZ4, FILTER_BLOSC, FILTER_LZF, FILTER_ZSTD, GZIP, LZF, NONE, ZSTD
from data2h5.errors import CompressionError, PluginError, ReadError
from convert_helpers import build_tree, entry_kind, filter_ids, index, stored_value, index_group
from data2h5.format import Kind

FILTER_DEFLATE = 1
EXTS = ["png", "jpg"]
RUNNERS = [  # (workers, start method): spawn starts slowly, so it appears sparingly
    pytest.param(1, None, id="in-process"),
    pytest.param(2, "fork", id="fork"),
    pytest.param(2, "spawn", id="spawn"),
]


@pytest.fixture
def tree(tmp_path):
    return build_tree(tmp_path)


def convert(src, dst, **kw):
    kw.setdefault("workers", 1)
    return data2h5.convert(src, dst, **kw)


# -- every file, under its relative path, with its exact content ----------------------------


@pytest.mark.parametrize(
    "reader, workers, start_method",
    [pytest.param(None, *r.values, id=f"image-{r.id}") for r in RUNNERS]
    + [pytest.param("bytes", *r.values, id=f"bytes-{r.id}") for r in RUNNERS[:2]],
)
def test_every_matching_file_is_stored_under_its_relative_path(tmp_path, tree, reader, workers, start_method):
    out = tmp_path / "out.h5"
    report = convert(tree.root, out, ext=EXTS, reader=reader, workers=workers, start_method=start_method)

    assert report.entries == len(tree.images)
    assert index(out)["keys"] == sorted(tree.images)
    with h5py.File(out, "r") as f:
        for key, src in tree.images.items():
            if reader == "bytes":
                assert f[key].dtype == np.uint8 and f[key].ndim == 1
                assert f[key][()].tobytes() == src.read_bytes(), key
                assert entry_kind(f[key]) == Kind.BYTES
                assert key.endswith(src.suffix)  # the key carries the extension
            else:
                expected = iio.imread(src)
                assert (f[key].shape, f[key].dtype) == (expected.shape, expected.dtype), key
                np.testing.assert_array_equal(f[key][()], expected, err_msg=key)


def test_the_tree_has_grey_rgb_and_rgba_icons_of_several_sizes(tree):
    """Guards the fixture: the cases above must stay varied."""
    shapes = [iio.imread(p).shape for p in tree.images.values()]
    assert {len(s) for s in shapes} == {2, 3}
    assert {s[2] for s in shapes if len(s) == 3} == {3, 4}
    assert len({s[0] for s in shapes}) >= 5
    assert {p.suffix for p in tree.images.values()} >= {".png", ".jpg", ".JPG"}


def test_symlinked_folders_are_walked_only_when_asked(tmp_path, tree):
    out = tmp_path / "out.h5"
    convert(tree.root, out, ext=EXTS, follow_symlinks=True, workers=2)
    expected = {**tree.images, **tree.linked}
    assert index(out)["keys"] == sorted(expected)
    with h5py.File(out, "r") as f:
        for key, src in tree.linked.items():
            np.testing.assert_array_equal(f[key][()], iio.imread(src), err_msg=key)
        assert not any("loop" in k for k in index_group(f)["keys"].asstr()[()])


# -- readers ----------------------------------------------------------------------------------


NPY_ARRAYS = {
    "f32.npy": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4),
    "i64.npy": np.arange(24, dtype=np.int64).reshape(2, 3, 4) - 7,
    "bool.npy": np.array([True, False, True]),
    "c64.npy": np.array([1 + 2j, -3j], dtype=np.complex64),
    "be.npy": np.arange(5, dtype=">i4"),
    "fortran.npy": np.asfortranarray(np.arange(6, dtype=np.uint16).reshape(2, 3)),
    "scalar.npy": np.array(3.5),
    "one.npz": np.arange(4, dtype=np.int8),
}


@pytest.mark.parametrize("reader", [None, "npy"])
def test_npy_reader_stores_arrays_exactly(tmp_path, reader):
    src = tmp_path / "src"
    src.mkdir()
    for name, arr in NPY_ARRAYS.items():
        if name.endswith(".npz"):
            np.savez(src / name, only=arr)
        else:
            np.save(src / name, arr)
    convert(src, tmp_path / "out.h5", ext=["npy", "npz"], reader=reader)
    with h5py.File(tmp_path / "out.h5", "r") as f:
        for name, arr in NPY_ARRAYS.items():
            got = f[name][()]
            assert got.shape == arr.shape and got.dtype == arr.dtype, name
            np.testing.assert_array_equal(got, arr, err_msg=name)


@pytest.mark.parametrize(
    "name, write, reader, reason",
    [
        ("two.npz", lambda p: np.savez(p, a=np.zeros(2), b=np.ones(2)), "npy", "holds 2 arrays"),
        ("text.npy", lambda p: np.save(p, np.array(["ab", "cd"])), "npy", "<U2"),
        ("junk.npy", lambda p: p.write_bytes(b"not numpy"), "npy", "cannot read as npy"),
        ("latin1.txt", lambda p: p.write_bytes("café".encode("latin-1")), "text", "UnicodeDecodeError"),
        ("junk.png", lambda p: p.write_bytes(b"\x89PNG garbage"), None, "cannot read as image"),
    ],
)
def test_unreadable_file_is_a_read_error_naming_it(tmp_path, name, write, reader, reason):
    src = tmp_path / "src"
    src.mkdir()
    write(src / name)
    with pytest.raises(ReadError) as exc:
        convert(src, tmp_path / "out.h5", ext=Path(name).suffix, reader=reader)
    message = str(exc.value)
    assert "\n" not in message
    assert str(src / name) in message and reason in message
    assert exc.value.path == str(src / name)
    assert not (tmp_path / "out.h5").exists()


def test_text_and_bytes_readers(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    text = "héllo ✓\nsecond line\n"
    (src / "note.txt").write_text(text, encoding="utf-8")
    (src / "blob.bin").write_bytes(bytes(range(256)) * 3)
    convert(src, tmp_path / "auto.h5", ext=["txt", "bin"])
    convert(src, tmp_path / "text.h5", ext="txt", reader="text")
    convert(src, tmp_path / "bytes.h5", ext=["txt", "bin"], reader="bytes")
    with h5py.File(tmp_path / "auto.h5", "r") as auto, h5py.File(tmp_path / "text.h5", "r") as as_text, \
            h5py.File(tmp_path / "bytes.h5", "r") as as_bytes:
        for f in (auto, as_text):
            assert entry_kind(f["note.txt"]) == Kind.TEXT
            assert stored_value(f["note.txt"]) == text
        assert stored_value(auto["blob.bin"]) == bytes(range(256)) * 3
        assert stored_value(as_bytes["note.txt"]) == text.encode("utf-8")
        assert entry_kind(as_bytes["note.txt"]) == Kind.BYTES


# -- plugins ----------------------------------------------------------------------------------


PLUGIN_SOURCE = '''
import os
import numpy as np

def reversed_bytes(path):
    with open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8)[::-1].copy()

def pid(path):
    return np.array([os.getpid()], dtype=np.int64)

def keep_numbered(filename, ext):
    """Keep NAME.EXT followed by digits, any case: scan.FoO0345 for ext '.foo'."""
    if "/" in filename or not ext.startswith("."):
        raise ValueError(f"called with {filename!r}, {ext!r}: expected a file name and '.ext'")
    stem, dot, suffix = filename.lower().rpartition(".")
    return bool(dot) and suffix.rstrip("0123456789") == ext[1:]
'''


def plugin_files(tmp_path: Path, name: str = "myplug") -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(PLUGIN_SOURCE)
    return folder


def small_tree(root: Path, n: int = 6) -> dict:
    rng = np.random.default_rng(1)
    files = {}
    for i in range(n):
        path = root / f"d{i % 2}" / f"f{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, photo(rng, 10 + i))
        files[path.relative_to(root).as_posix()] = path
    return files


def photo(rng, size):
    return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("workers, start_method", RUNNERS)
@pytest.mark.parametrize("form", ["file", "module"])
def test_reader_plugin_runs_in_the_workers(tmp_path, monkeypatch, form, workers, start_method):
    name = f"plug_{form}_{workers}_{start_method}"  # a module name of its own per case
    folder = plugin_files(tmp_path, name)
    if form == "module":
        monkeypatch.syspath_prepend(str(folder))  # spawned workers get the parent's sys.path
        spec = f"{name}:reversed_bytes"
    else:
        spec = f"{folder / name}.py:reversed_bytes"
    files = small_tree(tmp_path / "src")
    out = tmp_path / "out.h5"
    report = convert(tmp_path / "src", out, ext="png", reader=spec, workers=workers, start_method=start_method)
    assert report.reader == spec
    with h5py.File(out, "r") as f:
        assert f.attrs[fmt.ATTR_READER] == spec
        for key, src in files.items():
            assert f[key][()].tobytes() == src.read_bytes()[::-1]
    pid_spec = spec.replace("reversed_bytes", "pid")
    convert(tmp_path / "src", tmp_path / "pid.h5", ext="png", reader=pid_spec, workers=workers, start_method=start_method)
    with h5py.File(tmp_path / "pid.h5", "r") as f:
        pids = {int(f[key][0]) for key in files}
    assert (pids == {os.getpid()}) == (workers == 1)


def test_reader_can_be_a_function(tmp_path):
    files = small_tree(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out.h5", ext="png", reader=_shape_of, workers=2, start_method="fork")
    with h5py.File(tmp_path / "out.h5", "r") as f:
        for key, src in files.items():
            np.testing.assert_array_equal(f[key][()], iio.imread(src).shape)


def _shape_of(path):
    return np.array(iio.imread(path).shape)


BAD_PLUGINS = {
    "syntax": ("def read(:\n", "read", "SyntaxError"),
    "import": ("raise ImportError('needs the frobnicate package')\n", "read", "frobnicate"),
    "missing": ("def other(path):\n    return b''\n", "read", "has no function 'read'"),
    "raises": ("def read(path):\n    raise ValueError('cannot parse ' + path[-6:])\n", "read", "ValueError: cannot parse"),
    "dict": ("def read(path):\n    return {'a': 1}\n", "read", "returned dict"),
    "strings": ("import numpy as np\ndef read(path):\n    return np.array(['x'])\n", "read", "array of <U1"),
}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_plugin_errors_are_one_line_naming_plugin_and_file(tmp_path, case, workers):
    source, func, reason = BAD_PLUGINS[case]
    plugin = tmp_path / f"bad_{case}.py"
    plugin.write_text(source)
    spec = f"{plugin}:{func}"
    files = small_tree(tmp_path / "src", 3)
    with pytest.raises(PluginError) as exc:
        convert(tmp_path / "src", tmp_path / "out.h5", ext="png", reader=spec, workers=workers, start_method="fork")
    message = str(exc.value)
    assert "\n" not in message
    assert spec in message and reason in message
    if case in ("raises", "dict", "strings"):  # failed on a file: the first one, named
        assert str(files["d0/f0.png"]) in message
    assert not (tmp_path / "out.h5").exists()


def test_plugin_failing_on_some_files_can_skip_them(tmp_path):
    plugin = tmp_path / "picky.py"
    plugin.write_text("def read(path):\n    if path.endswith('f1.png'):\n        raise OSError('no f1')\n"
                      "    return open(path, 'rb').read()\n")
    files = small_tree(tmp_path / "src", 4)
    report = convert(tmp_path / "src", tmp_path / "out.h5", ext="png", reader=f"{plugin}:read",
                     on_error="skip", workers=2)
    assert report.entries == 3
    assert [k for k, _ in report.skipped] == ["d1/f1.png"]
    assert "OSError: no f1" in report.skipped[0][1]
    assert index(tmp_path / "out.h5")["keys"] == sorted(set(files) - {"d1/f1.png"})


def test_prune_plugin_keeps_the_original_signature(tmp_path):
    folder = plugin_files(tmp_path)
    src = tmp_path / "src"
    for rel in ["scan.FoO0345", "a/b/scan.foo", "a/x.food", "a/x.foo.bak", "y.FOO", "z.bar7"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    prune = f"{folder / 'myplug'}.py:keep_numbered"
    report = convert(src, tmp_path / "out.h5", ext=["foo", "BAR"], prune=prune, reader="bytes")
    assert index(tmp_path / "out.h5")["keys"] == ["a/b/scan.foo", "scan.FoO0345", "y.FOO", "z.bar7"]
    assert report.entries == 4
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert f.attrs[fmt.ATTR_PRUNE] == prune
        assert json.loads(f.attrs[fmt.ATTR_EXTENSIONS]) == [".foo", ".bar"]


def test_prune_plugin_that_raises_is_named(tmp_path):
    plugin = tmp_path / "prune_bad.py"
    plugin.write_text("def prune(filename, ext):\n    raise KeyError(filename)\n")
    small_tree(tmp_path / "src", 2)
    with pytest.raises(PluginError, match=r"prune plugin '.*prune_bad.py:prune' failed on .*f0.png: KeyError"):
        convert(tmp_path / "src", tmp_path / "out.h5", ext="png", prune=f"{plugin}:prune")


# -- compression ------------------------------------------------------------------------------


def compressible_tree(root: Path) -> dict:
    """Arrays that every codec shrinks, text, and other bytes."""
    root.mkdir(parents=True)
    y, x = np.mgrid[0:40, 0:50]
    img = np.stack([x // 10 * 50, y // 10 * 60, np.full_like(x, 9)], axis=-1).astype(np.uint8)  # flat blocks
    iio.imwrite(root / "img.png", img)
    iio.imwrite(root / "img.jpg", img)
    np.save(root / "arr.npy", np.repeat(np.arange(100, dtype=np.float32), 20).reshape(40, 50))
    (root / "note.txt").write_text("the same words again and again " * 40)
    (root / "blob.bin").write_bytes(b"\x00\x01\x02\x03" * 500)
    (root / "noise.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize(
    "reader, expected",
    [  # key -> (codec id in the index, HDF5 filters)
        (None, {"img.png": (LZF, [FILTER_LZF]), "img.jpg": (LZF, [FILTER_LZF]), "arr.npy": (LZF, [FILTER_LZF]),
                "note.txt": (GZIP, [FILTER_DEFLATE]), "blob.bin": (GZIP, [FILTER_DEFLATE]), "noise.bin": (NONE, [])}),
        ("bytes", {"img.png": (NONE, []), "img.jpg": (NONE, []), "arr.npy": (GZIP, [FILTER_DEFLATE]),
                   "note.txt": (GZIP, [FILTER_DEFLATE]), "blob.bin": (GZIP, [FILTER_DEFLATE]), "noise.bin": (NONE, [])}),
    ],
)  # noise.bin: gzip would grow it, so it is stored as it is
def test_auto_compression_per_kind(tmp_path, reader, expected):
    files = compressible_tree(tmp_path / "src")
    out = tmp_path / "out.h5"
    convert(tmp_path / "src", out, ext=["png", "jpg", "npy", "txt", "bin"], reader=reader, workers=2)
    cols = index(out)
    with h5py.File(out, "r") as f:
        for key, (codec, filters) in expected.items():
            row = cols["keys"].index(key)
            assert (cols["codec"][row], filter_ids(f[key])) == (codec, filters), key
            if reader == "bytes" or key.endswith(".bin"):
                assert f[key][()].tobytes() == files[key].read_bytes()


CODEC_CASES = [  # spec, as recorded, codec id, HDF5 filter id, the filter's level (None: not checked)
    ("lzf", "lzf", LZF, FILTER_LZF, None),
    ("gzip", "gzip:4", GZIP, FILTER_DEFLATE, 4),
    ("GZIP:1", "gzip:1", GZIP, FILTER_DEFLATE, 1),
    ("gzip:9", "gzip:9", GZIP, FILTER_DEFLATE, 9),
    ("none", "none", NONE, None, None),
    ("zstd", "zstd:3", ZSTD, FILTER_ZSTD, 3),
    ("zstd:12", "zstd:12", ZSTD, FILTER_ZSTD, 12),
    ("blosc-lz4", "blosc-lz4:5", BLOSC_LZ4, FILTER_BLOSC, None),
    ("blosc-lz4:9", "blosc-lz4:9", BLOSC_LZ4, FILTER_BLOSC, None),
]


@pytest.mark.parametrize("spec, recorded, codec, filter_id, level", CODEC_CASES)
def test_each_compression_reads_back_identical(tmp_path, spec, recorded, codec, filter_id, level):
    files = compressible_tree(tmp_path / "src")
    out = tmp_path / "out.h5"
    report = convert(tmp_path / "src", out, ext=["png", "npy", "txt"], compression=spec, workers=2)
    assert report.compression == recorded
    cols = index(out)
    with h5py.File(out, "r") as f:
        assert f.attrs[fmt.ATTR_COMPRESSION] == recorded
        np.testing.assert_array_equal(f["img.png"][()], iio.imread(files["img.png"]))
        np.testing.assert_array_equal(f["arr.npy"][()], np.load(files["arr.npy"]))
        assert stored_value(f["note.txt"]) == files["note.txt"].read_text()
        for key in ("img.png", "arr.npy", "note.txt"):
            assert cols["codec"][cols["keys"].index(key)] == codec, key
            plist = f[key].id.get_create_plist()
            filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
            assert [flt[0] for flt in filters] == ([] if filter_id is None else [filter_id]), key
            if level is not None:  # what the worker compressed with is what HDF5 records
                assert filters[0][2][0] == level
            if codec == BLOSC_LZ4:  # HDF5 compresses these itself, at the level asked for
                assert filters[0][2][4] == int(recorded.rpartition(":")[2])


@pytest.mark.parametrize("spec", ["brotli", "gzip:12", "zstd:0", "lzf:3", "gzip:x", ""])
def test_unknown_compression_is_refused_before_any_work(tmp_path, spec):
    small_tree(tmp_path / "src", 1)
    with pytest.raises(CompressionError, match="compression"):
        convert(tmp_path / "src", tmp_path / "out.h5", ext="png", compression=spec)
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("spec", ["auto", "gzip:1", "zstd", "blosc-lz4", "none"])
def test_large_array_is_chunked_and_slices_read_back(tmp_path, spec):
    rng = np.random.default_rng(3)
    big = (np.arange(3000 * 2000 * 3, dtype=np.uint32) % 251).astype(np.uint8).reshape(3000, 2000, 3)
    big[::7] = rng.integers(0, 255, big[::7].shape, dtype=np.uint8)  # not trivially compressible
    small = np.arange(300, dtype=np.float32).reshape(10, 30)
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "big.npy", big)
    np.save(src / "small.npy", small)
    out = tmp_path / "out.h5"
    convert(src, out, ext="npy", compression=spec, workers=2)
    with h5py.File(out, "r") as f:
        ds = f["big.npy"]
        if spec == "none":
            assert ds.chunks is None  # contiguous: any slice reads only its bytes
        else:
            assert ds.chunks is not None and ds.chunks != ds.shape
            assert math.prod(ds.chunks) < math.prod(ds.shape) // 8
            assert f["small.npy"].chunks == small.shape  # one chunk
        np.testing.assert_array_equal(ds[1234:1301, 17:1990:3, 1], big[1234:1301, 17:1990:3, 1])
        np.testing.assert_array_equal(ds[()], big)
        np.testing.assert_array_equal(f["small.npy"][()], small)


# -- index and attributes ---------------------------------------------------------------------


@pytest.mark.parametrize("reader", [None, "bytes"])
def test_index_columns_match_the_sources(tmp_path, tree, reader):
    out = tmp_path / "out.h5"
    convert(tree.root, out, ext=EXTS, reader=reader, workers=2)
    cols = index(out)
    assert cols["keys"] == sorted(tree.images)
    raw = out.read_bytes()
    with h5py.File(out, "r") as f:
        for row, key in enumerate(cols["keys"]):
            data = tree.images[key].read_bytes()
            assert cols["size"][row] == len(data), key
            assert cols["crc32"][row] == zlib.crc32(data), key
            assert cols["kind"][row] == (fmt.Kind.BYTES if reader else fmt.Kind.ARRAY)
            ds = f[key]
            assert cols["dtype"][row].decode() == ds.dtype.str
            assert tuple(int(n) for n in cols["shape"][row] if n >= 0) == ds.shape
            if reader == "bytes":  # stored as is, in one block where the index says
                offset, stored = int(cols["offset"][row]), int(cols["stored"][row])
                assert raw[offset : offset + stored] == data, key


def test_root_attributes_record_how_the_archive_was_made(tmp_path, tree):
    out = tmp_path / "out.h5"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    report = convert(tree.root, out, ext=["PNG", ".jpg"], workers=2)
    after = datetime.now(timezone.utc)
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
    assert attrs[fmt.ATTR_VERSION] == data2h5.__version__
    assert attrs[fmt.ATTR_FORMAT] == fmt.FORMAT_VERSION
    assert attrs[fmt.ATTR_LAYOUT] == "files"
    assert attrs[fmt.ATTR_READER] == "auto"
    assert attrs[fmt.ATTR_PRUNE] == "ext"
    assert json.loads(attrs[fmt.ATTR_EXTENSIONS]) == [".png", ".jpg"]
    assert attrs[fmt.ATTR_SOURCE] == str(tree.root) == report.source
    created = datetime.fromisoformat(attrs[fmt.ATTR_CREATED])
    assert created.utcoffset().total_seconds() == 0 and before <= created <= after
    assert attrs[fmt.ATTR_ENTRIES] == len(tree.images)
    assert json.loads(attrs[fmt.ATTR_SKIPPED]) == []
    assert attrs[fmt.ATTR_BYTES_IN] == sum(p.stat().st_size for p in tree.images.values())


# -- the report -------------------------------------------------------------------------------


def test_report_counts_bytes_and_skipped_files(tmp_path, tree):
    broken = tree.root / "icons" / "32" / "broken.png"
    broken.write_bytes(tree.images["icons/32/app.png"].read_bytes()[:60])
    out = tmp_path / "out.h5"
    report = convert(tree.root, out, ext=EXTS, on_error="skip", workers=2)
    assert report.entries == len(tree.images)
    assert report.bytes_in == sum(p.stat().st_size for p in tree.images.values())
    assert report.bytes_decoded == sum(iio.imread(p).nbytes for p in tree.images.values())
    assert report.bytes_out == out.stat().st_size
    assert report.ratio == pytest.approx(report.bytes_out / report.bytes_in)
    assert report.elapsed > 0
    assert report.output == str(out) and report.source == str(tree.root)
    assert [k for k, _ in report.skipped] == ["icons/32/broken.png"]
    reason = report.skipped[0][1]
    assert "cannot read as image" in reason and str(broken) not in reason
    summary = report.summary()
    assert f"{len(tree.images)} files" in summary and "1 skipped" in summary
    assert "icons/32/broken.png: cannot read as image" in summary
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs[fmt.ATTR_SKIPPED]) == [["icons/32/broken.png", reason]]


@pytest.mark.parametrize(
    "make, reader, hint",
    [
        ("flat_png", None, True),  # 49 KB decoded from a few hundred bytes
        ("flat_png", "bytes", False),  # already the source size
        ("npy", None, False),  # decoded is the source size
    ],
)
def test_summary_points_to_reader_bytes_when_decoding_inflates(tmp_path, make, reader, hint):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        if make == "flat_png":
            iio.imwrite(src / f"{i}.png", np.full((128, 128, 3), i * 40, dtype=np.uint8))
        else:
            np.save(src / f"{i}.npy", np.full((128, 128, 3), i, dtype=np.uint8))
    report = convert(src, tmp_path / "out.h5", ext=["png", "npy"], reader=reader)
    assert ("--reader bytes" in report.summary()) == hint
    if hint:
        assert report.bytes_decoded > 10 * report.bytes_in


# -- memory -----------------------------------------------------------------------------------


# The writer's peak is VmHWM, not RUSAGE_SELF: Linux carries ru_maxrss across exec, so the
# latter would report the peak of the forking pytest process.
RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import data2h5
    # Checkpoints every 0.25 s: the entries journaled at each are held until then (a few
    # seconds' worth, whatever the run's length), which would read as per-entry growth here.
    report = data2h5.convert(sys.argv[1], sys.argv[2], ext="bin", reader="bytes", workers=2, layout=sys.argv[3],
                             checkpoint_seconds=0.25)
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    print(json.dumps({
        "entries": report.entries,
        "self": int(hwm.split()[1]) * 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }))
    """
)

#: Writer memory an entry may add, 2,000 → 20,000 tiny files, by layout (measured 40-110 B for
#: files, 40-470 B for packed, whose 4 MB block buffer is a step at these counts; the writer
#: before index columns grew by 1.1 kB an entry from 10k to 1M).
SLOPE_BYTES = {"files": 400, "packed": 800}
#: Steps that do not grow with entries (an allocator arena, a pool result in flight on a busy
#: machine).
NOISE_BYTES = 4 << 20


@pytest.mark.parametrize("layout", sorted(SLOPE_BYTES))
def test_writer_memory_per_entry_is_bounded(tmp_path, layout):
    """The writer's peak grows by at most SLOPE_BYTES an entry from 2,000 to 20,000 tiny
    files (index rows held in typed columns, the file list compact); workers stay flat."""
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    peaks = {}
    for n in (2000, 20000):
        src = tmp_path / f"src{n}"
        for d in range(n // 1000):
            folder = src / f"{d:02d}"
            folder.mkdir(parents=True)
            for i in range(1000):
                (folder / f"{i:04d}.bin").write_bytes(blob[i : i + 64 + (i * 7) % 448])
        done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(tmp_path / f"out{n}.h5"), layout],
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        peaks[n] = json.loads(done.stdout)
        assert peaks[n]["entries"] == n
    per_entry = (peaks[20000]["self"] - peaks[2000]["self"] - NOISE_BYTES) / 18000
    assert per_entry <= SLOPE_BYTES[layout], (per_entry, peaks)
    assert peaks[20000]["children"] <= 1.2 * peaks[2000]["children"] + NOISE_BYTES, peaks
