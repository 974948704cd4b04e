"""The example plugins in plugins/ work as shipped, on real files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import data2h5
from data2h5.format import Kind
from data2h5.archive import read_index
from conftest import photo_like

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"
SAMPLES = REPO / "tests" / "samples"


def spec(name: str, func: str) -> str:
    """The command-line form of a plugin: ``path/to/file.py:function``."""
    return f"{PLUGINS / name}.py:{func}"


def load_plugin(name: str) -> ModuleType:
    """Import ``plugins/<name>.py`` by path, fresh each time (it reads the environment on import)."""
    spec = importlib.util.spec_from_file_location(f"plugin_example_{name}", PLUGINS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- my_functions.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [0, 3, 4])
def test_my_read_decodes_png_exactly(tmp_path: Path, channels: int) -> None:
    img = photo_like(np.random.default_rng(channels), 20, 24, channels)
    path = tmp_path / "img.png"
    iio.imwrite(path, img)
    out = load_plugin("my_functions").my_read(str(path))
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize(
    "filename, ext, keep",
    [
        ("x.FoO0345", ".foo", True),
        ("scan.foo", ".foo", True),
        ("deep/dir/IMG_01.JPG", ".jpg", True),
        ("clip.mp4", ".mp4", True),
        ("backup.tar.gz", ".tar.gz", True),
        ("x.food", ".foo", False),
        ("x.foo.bak", ".foo", False),
        ("xfoo", ".foo", False),
        (".foo", ".foo", False),
        ("dir.foo/notes.txt", ".foo", False),
        ("x.foo0345a", ".foo", False),
    ],
)
def test_my_prune(filename: str, ext: str, keep: bool) -> None:
    assert load_plugin("my_functions").my_prune(filename, ext) is keep


# -- resize_gray.py ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape",
    [("big.jpg", (300, 410, 3)), ("small.png", (20, 30, 4)), ("grey.png", (64, 64)), ("tall.jpg", (200, 40))],
)
def test_resize_gray_gives_one_shape(tmp_path: Path, name: str, shape: tuple) -> None:
    img = photo_like(np.random.default_rng(1), shape[0], shape[1], shape[2] if len(shape) == 3 else 0)
    path = tmp_path / name
    Image.fromarray(img).save(path)
    out = load_plugin("resize_gray").read(str(path))
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert 20 < out.mean() < 235 and out.std() > 5  # an image, not a blank


def test_resize_gray_converts_colour_to_luminance(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path)
    out = load_plugin("resize_gray").read(str(path))
    expected = Image.new("RGB", (1, 1), (255, 0, 0)).convert("L").getpixel((0, 0))
    assert np.all(out == expected) and expected not in (0, 255)


def test_resize_gray_keeps_an_image_already_at_size(tmp_path: Path) -> None:
    img = photo_like(np.random.default_rng(2), 64, 64, 0)
    path = tmp_path / "exact.png"
    Image.fromarray(img).save(path)
    np.testing.assert_array_equal(load_plugin("resize_gray").read(str(path)), img)


@pytest.mark.parametrize("value, shape", [("32x16", (16, 32)), ("48", (48, 48)), (" 10 X 12 ", (12, 10))])
def test_resize_gray_size_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, shape: tuple) -> None:
    path = tmp_path / "img.jpg"
    Image.fromarray(photo_like(np.random.default_rng(3), 100, 120)).save(path)
    monkeypatch.setenv("RESIZE_GRAY_SIZE", value)
    assert load_plugin("resize_gray").read(str(path)).shape == shape


def test_resize_gray_follows_a_size_set_after_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(photo_like(np.random.default_rng(4), 50, 70)).save(path)
    monkeypatch.delenv("RESIZE_GRAY_SIZE", raising=False)
    module = load_plugin("resize_gray")
    assert module.read(str(path)).shape == (64, 64)
    monkeypatch.setenv("RESIZE_GRAY_SIZE", "20x10")
    assert module.read(str(path)).shape == (10, 20)


@pytest.mark.parametrize("value", ["0", "64x", "big", "-3x4", "3x4x5"])
def test_resize_gray_rejects_a_bad_size(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("RESIZE_GRAY_SIZE", value)
    with pytest.raises(ValueError, match="RESIZE_GRAY_SIZE"):
        load_plugin("resize_gray")


def test_resize_gray_fails_on_a_non_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(OSError):
        load_plugin("resize_gray").read(str(path))


# -- json_reader.py ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc, dtype",
    [
        ([1, 2, 3], np.int64),
        ([[1, 2], [3, 4], [5, 6]], np.int64),
        ([[[0.5]], [[2]]], np.float64),
        ([True, False, True], np.bool_),
        ([-1e300, 1e-300], np.float64),
    ],
)
def test_json_numeric_arrays_become_numpy(tmp_path: Path, doc, dtype) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    out = load_plugin("json_reader").read(str(path))
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    np.testing.assert_array_equal(out, np.array(doc))


@pytest.mark.parametrize(
    "doc, text",
    [
        ({"b": [1, 2], "a": "é"}, '{"a":"é","b":[1,2]}'),
        ([[1, 2], [3]], "[[1,2],[3]]"),
        ([1, "two"], '[1,"two"]'),
        ([True, 1], "[true,1]"),
        ([], "[]"),
        ([[], []], "[[],[]]"),
        ([2**70], "[1180591620717411303424]"),
        ("日本", '"日本"'),
        (None, "null"),
        (7, "7"),
    ],
)
def test_json_other_documents_become_canonical_text(tmp_path: Path, doc, text: str) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc, indent=4), encoding="utf-8")
    assert load_plugin("json_reader").read(str(path)) == text


def test_json_reader_fails_on_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError):
        load_plugin("json_reader").read(str(path))


# -- end to end: data2h5.convert with each plugin ----------------------------------------------


def test_samples_folder_converts(tmp_path: Path) -> None:
    """The README's first command, on the sample folder that ships in the repository."""
    out = tmp_path / "samples.h5"
    report = data2h5.convert(SAMPLES, out, ext=["png", "jpg"], workers=2)
    images = sorted(p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*") if p.suffix in (".png", ".jpg"))
    assert report.entries == len(images) >= 6
    with h5py.File(out, "r") as f:
        for key in images:
            np.testing.assert_array_equal(f[key][()], iio.imread(SAMPLES / key))
        assert "README.txt" not in f


@pytest.mark.parametrize("layout", ["files", "stacked"])
def test_convert_with_resize_gray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """Images of different sizes and channels all come out grey at the size asked for."""
    monkeypatch.setenv("RESIZE_GRAY_SIZE", "24x16")
    src = tmp_path / "src"
    shapes = {"a/big.jpg": (90, 120, 3), "a/grey.png": (30, 20), "b/rgba.png": (16, 24, 4), "b/small.jpg": (8, 8, 3)}
    rng = np.random.default_rng(5)
    for key, shape in shapes.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, shape[0], shape[1], shape[2] if len(shape) == 3 else 0)).save(src / key)
    out = tmp_path / "out.h5"
    report = data2h5.convert(src, out, ext=["jpg", "png"], reader=spec("resize_gray", "read"), layout=layout, workers=2)
    assert report.entries == len(shapes)
    reader = load_plugin("resize_gray").read
    with h5py.File(out, "r") as f:
        if layout == "stacked":
            keys = [k.decode() for k in f["keys"][()]]
            assert sorted(keys) == sorted(shapes) and f["data"].shape == (len(shapes), 16, 24)
            stored = dict(zip(keys, f["data"][()]))
        else:
            stored = {key: f[key][()] for key in shapes}
    for key in shapes:
        np.testing.assert_array_equal(stored[key], reader(str(src / key)))


def test_convert_with_template_reader_and_prune(tmp_path: Path) -> None:
    """``--ext foo`` with my_prune keeps ``x.FoO0345`` and ``y.foo``, not ``z.food`` or ``notes.txt``."""
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    rng = np.random.default_rng(6)
    kept = {"x.FoO0345": photo_like(rng, 12, 14), "deep/y.foo": photo_like(rng, 10, 10, 0)}
    for key, img in kept.items():
        iio.imwrite(src / key, img, extension=".png")
    iio.imwrite(src / "z.food", photo_like(rng, 8, 8), extension=".png")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out.h5"
    report = data2h5.convert(
        src, out, ext="foo", reader=spec("my_functions", "my_read"), prune=spec("my_functions", "my_prune"), workers=2
    )
    assert report.entries == len(kept)
    with h5py.File(out, "r") as f:
        for key, img in kept.items():
            np.testing.assert_array_equal(f[key][()], img)
        assert "z.food" not in f and "notes.txt" not in f


def test_convert_with_json_reader(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    docs = {"matrix.json": [[1, 2, 3], [4, 5, 6]], "floats.json": [0.25, -1], "meta.json": {"name": "café", "n": [1, "x"]}}
    for name, doc in docs.items():
        (src / name).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    out = tmp_path / "out.h5"
    report = data2h5.convert(src, out, ext="json", reader=spec("json_reader", "read"), workers=2)
    assert report.entries == len(docs)
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["matrix.json"][()], np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64))
        assert f["matrix.json"].dtype == np.int64
        np.testing.assert_array_equal(f["floats.json"][()], np.array([0.25, -1.0]))
        meta = f["meta.json"]
        index = read_index(f)
        assert index.kind[index.position("meta.json")] == Kind.TEXT
        assert bytes(meta[()]).decode("utf-8") == '{"n":[1,"x"],"name":"café"}'
