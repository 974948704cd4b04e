"""H5Dataset over archives made by data2h5.convert, in this process and in DataLoader workers."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

import data2h5
from conftest import photo_like, write_images
from data2h5.loaders import H5Dataset
from data2h5.errors import ArchiveError, ArchiveKeyError, CorruptEntryError
from data2h5.archive import read_index
from test_index import corrupt, write_plain

TREE_KEYS = ["a/b/c/img_002.png", "a/b/img_001.png", "a/img_000.png", "cat/img_003.png", "dog/img_004.png", "dog/img_005.png"]


def convert(src: Path, dst: Path, **kwargs) -> Path:
    data2h5.convert(src, dst, workers=1, **kwargs)
    return dst


@pytest.fixture
def decoded(image_tree, tmp_path) -> Path:
    """The image tree's PNGs decoded and stored with lzf (the default)."""
    return convert(image_tree[0], tmp_path / "decoded.h5", ext="png")


@pytest.fixture
def jpegs(tmp_path) -> dict:
    return write_images(tmp_path / "jpg", ["bird/j_0", "bird/j_1", "fish/j_2", "j_3"], ext=".jpg", size=20, seed=5)


@pytest.fixture
def raw(jpegs, tmp_path) -> Path:
    """JPEG files stored as their exact bytes (contiguous, no codec)."""
    return convert(tmp_path / "jpg", tmp_path / "raw.h5", ext="jpg", reader="bytes")


def expected_image(files: dict, key: str) -> np.ndarray:
    return iio.imread(files[key])


def test_decoded_archive_samples_match_sources(decoded, image_tree):
    files = image_tree[1]
    ds = H5Dataset(decoded)
    assert len(ds) == len(files) and ds.keys == sorted(files) == TREE_KEYS
    for i, key in enumerate(ds.keys):
        assert np.array_equal(ds[i], expected_image(files, key))
    assert np.array_equal(ds[-1], expected_image(files, TREE_KEYS[-1]))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_bytes_archive_decodes_or_gives_exact_bytes(raw, jpegs):
    decoded = H5Dataset(raw, return_key=True)
    exact = H5Dataset(raw, return_key=True, decode=False)
    assert len(decoded) == len(jpegs) == 4
    for (img, key), (buf, key2) in zip(decoded, exact):
        assert key == key2
        assert np.array_equal(img, expected_image(jpegs, key))
        assert buf.dtype == np.uint8 and buf.tobytes() == jpegs[key].read_bytes()


def test_decode_false_leaves_decoded_arrays_alone(decoded, image_tree):
    ds = H5Dataset(decoded, decode=False, keys=["cat/img_003.png"])
    assert np.array_equal(ds[0], expected_image(image_tree[1], "cat/img_003.png"))


def test_text_entries_are_str(tmp_path):
    src = tmp_path / "t"
    (src / "x").mkdir(parents=True)
    (src / "x" / "note.txt").write_text("héllo\nworld", encoding="utf-8")
    ds = H5Dataset(convert(src, tmp_path / "t.h5", ext="txt"))
    assert ds[0] == "héllo\nworld"


def test_several_archives_read_as_one(decoded, raw, image_tree, jpegs):
    ds = H5Dataset([decoded, raw], return_key=True)
    assert len(ds) == len(image_tree[1]) + len(jpegs)
    assert ds.keys == sorted(image_tree[1]) + sorted(jpegs)
    sources = {**image_tree[1], **jpegs}
    for img, key in ds:
        assert np.array_equal(img, expected_image(sources, key))


@pytest.mark.parametrize(
    "selection, expected",
    [
        (dict(prefix="a/"), TREE_KEYS[:3]),
        (dict(prefix=["dog/", "cat/"]), TREE_KEYS[3:]),
        (dict(prefix="a/b/"), TREE_KEYS[:2]),
        (dict(keys=["dog/img_005.png", "a/img_000.png"]), ["dog/img_005.png", "a/img_000.png"]),
        (dict(limit=2), TREE_KEYS[:2]),
        (dict(prefix="dog/", limit=1), ["dog/img_004.png"]),
        (dict(limit=100), TREE_KEYS),
        (dict(prefix="zebra/"), []),
    ],
)
def test_selection(decoded, image_tree, selection, expected):
    ds = H5Dataset(decoded, return_key=True, **selection)
    assert ds.keys == expected and len(ds) == len(expected)
    for img, key in ds:
        assert np.array_equal(img, expected_image(image_tree[1], key))


def test_unknown_key_is_an_error(decoded):
    with pytest.raises(ArchiveKeyError, match=r"'a/nope\.png'.*decoded\.h5"):
        H5Dataset(decoded, keys=["a/img_000.png", "a/nope.png"])
    with pytest.raises(ArchiveKeyError, match="prefix"):
        H5Dataset(decoded, keys=["a/img_000.png"], prefix="dog/")


@pytest.mark.parametrize("make", ["text", "missing"])
def test_not_an_archive_names_the_path(tmp_path, decoded, make):
    bad = tmp_path / "notes.h5"
    if make == "text":
        bad.write_text("plain text")
    with pytest.raises(ArchiveError, match="notes.h5"):
        H5Dataset([decoded, bad])


def test_folder_targets(decoded, raw, jpegs):
    ds = H5Dataset([decoded, raw], target="folder", return_key=True)
    assert ds.classes == [".", "a", "bird", "cat", "dog", "fish"]
    assert ds.class_to_idx == {c: i for i, c in enumerate(ds.classes)}
    seen = [(key, target) for _, target, key in ds]
    assert [ds.classes[t] for _, t in seen] == [k.split("/")[0] if "/" in k else "." for k, _ in seen]
    assert ds.targets == [t for _, t in seen]
    limited = H5Dataset([decoded, raw], target="folder", prefix=["dog/", "bird/"], limit=3)
    assert limited.classes == ["bird", "dog"]  # classes come from the selection before limit
    assert [t for _, t in limited] == [1, 1, 0]


def test_attribute_targets(decoded, raw, tmp_path):
    with h5py.File(decoded, "r+") as f:
        for i, key in enumerate(TREE_KEYS):
            f[key].attrs["score"] = i * 0.5
    ds = H5Dataset(decoded, target="attr:score")
    assert [t for _, t in ds] == [i * 0.5 for i in range(len(TREE_KEYS))]
    with pytest.raises(ArchiveError, match=r"'a/b/c/img_002\.png'.*'missing'"):
        H5Dataset(decoded, target="attr:missing")[0]


def test_callable_target_return_key_and_transform(decoded, image_tree):
    files = image_tree[1]
    shape = lambda img: img.shape  # noqa: E731
    ds = H5Dataset(decoded, target=str.upper, transform=shape, return_key=True, prefix="cat/")
    assert ds[0] == (expected_image(files, "cat/img_003.png").shape, "CAT/IMG_003.PNG", "cat/img_003.png")
    assert H5Dataset(decoded, transform=shape, prefix="cat/")[0] == expected_image(files, "cat/img_003.png").shape
    img, key = H5Dataset(decoded, return_key=True, prefix="cat/")[0]
    assert key == "cat/img_003.png" and np.array_equal(img, expected_image(files, key))


@pytest.mark.parametrize("target", ["nonsense", "attr:", 3])
def test_bad_target_is_rejected(decoded, target):
    with pytest.raises(ValueError, match="target"):
        H5Dataset(decoded, target=target)


def test_stacked_archive(tmp_path):
    rng = np.random.default_rng(3)
    names = {"cat/0.png": 0, "cat/1.png": 0, "dog/2.png": 1, "dog/3.png": 1, "dog/4.png": 1}
    for name in names:
        (tmp_path / "s" / name).parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(tmp_path / "s" / name, photo_like(rng, 9, 7))
    path = convert(tmp_path / "s", tmp_path / "s.h5", ext="png", layout="stacked")
    ds = H5Dataset(path, target="folder", return_key=True)
    assert read_index(path).layout == "stacked"
    assert ds.classes == ["cat", "dog"]
    assert [(key, t) for _, t, key in ds] == list(names.items())
    for img, _, key in ds:
        assert np.array_equal(img, iio.imread(tmp_path / "s" / key))


@pytest.mark.parametrize("split", [False, True])
def test_plain_hdf5_like_the_original_script(tmp_path, image_tree, split):
    """The fallback: an HDF5 file without a data2h5 index is walked for its datasets."""
    files = image_tree[1]
    plain = write_plain(tmp_path / "orig.h5", {key: expected_image(files, key) for key in reversed(TREE_KEYS)}, split=split)
    ds = H5Dataset(plain, target="folder", return_key=True)
    assert ds.keys == TREE_KEYS
    assert (ds.readers[0].index.offset > 0).all() != split  # one chunk each: read without h5py
    for img, target, key in ds:
        assert np.array_equal(img, expected_image(files, key))
        assert ds.classes[target] == key.split("/")[0]


@pytest.mark.parametrize("reader, compression", [("bytes", "auto"), (None, "gzip")])
def test_damaged_entry_raises(tmp_path, image_tree, reader, compression):
    path = convert(image_tree[0], tmp_path / "d.h5", ext="png", reader=reader, compression=compression)
    index = read_index(path)
    corrupt(path, index, index.position("cat/img_003.png"))
    ds = H5Dataset(path, return_key=True)
    assert np.array_equal(ds[0][0], expected_image(image_tree[1], ds[0][1]))
    with pytest.raises(CorruptEntryError, match=r"d\.h5.*'cat/img_003\.png'"):
        ds[TREE_KEYS.index("cat/img_003.png")]


def test_pickling_drops_handles(decoded, raw, tmp_path, image_tree):
    plain = write_plain(tmp_path / "orig.h5", {"k/x.png": expected_image(image_tree[1], "a/img_000.png")}, split=True)
    ds = H5Dataset([decoded, raw, plain])
    for i in (0, len(ds) - 2, len(ds) - 1):
        ds[i]
    assert ds.readers[0]._fd is not None and ds.readers[2]._h5 is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert all(r._fd is None and r._h5 is None for r in clone.readers)
    for i in range(len(ds)):
        assert np.array_equal(clone[i], ds[i])
    clone.close()
    ds.close()
    assert all(r._fd is None and r._h5 is None for r in ds.readers)
    with H5Dataset(decoded) as again:
        assert np.array_equal(again[0], ds[0])  # ds reopened after close
    assert again.readers[0]._fd is None


def test_is_a_torch_dataset_when_torch_is_there(decoded):
    torch = pytest.importorskip("torch")
    assert data2h5.H5Dataset is H5Dataset
    assert isinstance(H5Dataset(decoded), torch.utils.data.Dataset)


def test_works_as_a_plain_sequence_without_torch(decoded, image_tree):
    code = f"""
import sys
sys.modules["torch"] = None  # importing torch now fails, as if it were not installed
import numpy as np, imageio.v3 as iio
import data2h5
from data2h5.loaders import H5Dataset
ds = H5Dataset({str(decoded)!r}, target="folder")
assert type(ds).__mro__[1] is object, type(ds).__mro__
assert len(ds) == {len(TREE_KEYS)}
items = list(ds)
assert len(items) == len(ds)
assert np.array_equal(items[2][0], iio.imread({str(image_tree[1]["a/img_000.png"])!r}))
print("ok", ds.classes)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(data2h5.__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok ['a', 'cat', 'dog']"


def _read_in_child(ds: H5Dataset, queue) -> None:
    try:
        samples = [ds[i] for i in range(len(ds))]
        queue.put(([r._pid == os.getpid() for r in ds.readers if r._fd or r._h5], samples))
    except BaseException as exc:  # report, so the parent fails rather than waits
        queue.put(repr(exc))


@pytest.mark.timeout(60)
def test_forked_child_reopens_its_own_handles(decoded, tmp_path, image_tree):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method here")
    plain = write_plain(tmp_path / "orig.h5", {"p/x.png": expected_image(image_tree[1], "cat/img_003.png")}, split=True)
    ds = H5Dataset([decoded, plain])
    expected = [ds[i] for i in range(len(ds))]
    parent_handles = (ds.readers[0]._fd, ds.readers[1]._h5)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(ds, queue))
    child.start()
    result = queue.get(timeout=30)
    child.join(30)
    assert not isinstance(result, str), result
    reopened, samples = result
    assert reopened == [True, True]
    assert all(np.array_equal(a, b) for a, b in zip(samples, expected))
    # The child closed only its copies: the parent's handles are the same and still work.
    assert (ds.readers[0]._fd, ds.readers[1]._h5) == parent_handles
    assert all(np.array_equal(ds[i], expected[i]) for i in range(len(ds)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_dataloader_workers_after_parent_reads(context, decoded, raw, tmp_path, image_tree, jpegs):
    """Workers started by every method read exactly the stored samples, although the parent
    opened its handles (raw fd and h5py) before they started."""
    torch = pytest.importorskip("torch")
    if context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {context} start method here")
    sources = {**image_tree[1], **jpegs}
    plain = write_plain(tmp_path / "orig.h5", {f"p/{k}": expected_image(sources, k) for k in ("dog/img_004.png", "bird/j_1.jpg")}, split=True)
    sources.update({f"p/{k}": sources[k] for k in ("dog/img_004.png", "bird/j_1.jpg")})
    ds = H5Dataset([decoded, raw, plain], return_key=True)
    for i in range(len(ds)):  # the parent reads everything first: all its handles are open
        ds[i]
    assert all(r._fd is not None for r in ds.readers[:2]) and ds.readers[2]._h5 is not None

    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=True, num_workers=2, multiprocessing_context=context,
        generator=torch.Generator().manual_seed(0), persistent_workers=True,  # start workers once
    )
    for epoch in range(2):
        seen = []
        for img, key in loader:
            assert isinstance(img, torch.Tensor)
            assert np.array_equal(img.numpy(), expected_image(sources, key)), (epoch, key)
            seen.append(key)
        assert sorted(seen) == sorted(ds.keys)  # every sample exactly once
    del loader  # stops the workers
    assert np.array_equal(ds[0][0], expected_image(sources, ds.keys[0]))  # the parent still reads
    assert os.getpid() == ds.readers[0]._pid
