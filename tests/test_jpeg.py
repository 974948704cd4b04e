"""The JPEG path: simplejpeg where it gives imageio's exact array, Pillow for the rest, on a
matrix of JPEGs generated here; decode_size; truncated files; declared sizes over the limit.

Every test runs with each decoder the fast path can use: simplejpeg (when installed) and Pillow
alone (as without the ``jpeg`` extra), switched the way users switch it, not mocked.
"""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import data2h5
from conftest import photo_like
from convert_helpers import error_line, run_cli
from data2h5 import jpeg
from data2h5.errors import ReadError
from data2h5.readers import BUILTIN_READERS, read_source

HEIGHT, WIDTH = 37, 53  # odd, and not a multiple of any MCU: edge blocks and scaled sizes round


def rgb(seed: int = 0) -> Image.Image:
    return Image.fromarray(photo_like(np.random.default_rng(seed), HEIGHT, WIDTH))


def encoded(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=88, **options)
    return buf.getvalue()


def with_orientation(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° to display: imageio does not apply it, so neither do we
    return encoded(image, exif=exif.tobytes())


def as_arithmetic(raw: bytes) -> bytes:
    """The frame marked arithmetic-coded (SOF9); Pillow cannot write a real one, and no
    decoder here can tell: what matters is that such frames go to Pillow, as imageio does."""
    at = raw.index(b"\xff\xc0")
    return raw[:at] + b"\xff\xc9" + raw[at + 2 :]


def png_named_jpg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# name → (bytes of the file, whether simplejpeg decodes it)
FORMATS = {
    "grey": (lambda: encoded(rgb().convert("L")), True),
    "grey-progressive": (lambda: encoded(rgb().convert("L"), progressive=True), True),
    "rgb-420": (lambda: encoded(rgb(), subsampling="4:2:0"), True),
    "rgb-422": (lambda: encoded(rgb(), subsampling="4:2:2"), True),
    "rgb-444": (lambda: encoded(rgb(), subsampling="4:4:4"), True),
    "rgb-coded-as-rgb": (lambda: encoded(rgb(), keep_rgb=True), True),  # Adobe transform 0, no YCbCr
    "progressive": (lambda: encoded(rgb(), progressive=True), True),
    "restart-markers": (lambda: encoded(rgb(), restart_marker_blocks=2), True),
    "exif-orientation": (lambda: with_orientation(rgb()), True),
    "cmyk": (lambda: encoded(rgb().convert("CMYK")), False),
    "arithmetic": (lambda: as_arithmetic(encoded(rgb())), False),
    "png-named-jpg": (lambda: png_named_jpg(rgb()), False),
}


@pytest.fixture(params=["simplejpeg", "pillow"])
def backend(request, monkeypatch) -> str:
    """The decoder the fast path uses, in this process and in the workers it starts (forked
    ones inherit the switch, spawned ones read the environment)."""
    if request.param == "simplejpeg":
        pytest.importorskip("simplejpeg")
    monkeypatch.setattr(jpeg, "USE_SIMPLEJPEG", request.param == "simplejpeg")
    monkeypatch.setenv("DATA2H5_JPEG", request.param)
    assert jpeg.backend() == request.param
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Every format of the matrix as a file, in a class folder of its own."""
    root = tmp_path_factory.mktemp("jpegs")
    for name, (make, _) in FORMATS.items():
        (root / name).mkdir()
        (root / name / "photo.jpg").write_bytes(make())
    return root


def fallbacks(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == jpeg.__name__ and "with Pillow" in r.getMessage()]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_image_reader_gives_imageios_array(backend, folder, name, caplog):
    path = folder / name / "photo.jpg"
    raw = path.read_bytes()
    header = jpeg.read_header(raw)
    assert (header is not None and header.fast) == FORMATS[name][1]
    if name == "restart-markers":
        assert b"\xff\xdd" in raw  # a DRI segment: the file really has restart intervals
    expected = iio.imread(path)
    with caplog.at_level(logging.DEBUG, logger=jpeg.__name__):
        got = BUILTIN_READERS["image"].from_bytes(raw, ".jpg")
    assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected)
    assert got.flags.c_contiguous and got.flags.writeable
    assert fallbacks(caplog) == []  # what simplejpeg takes on, it decodes


def test_conversion_and_h5dataset_in_workers_give_imageios_arrays(backend, folder, tmp_path):
    torch = pytest.importorskip("torch")
    decoded, raw = tmp_path / "decoded.h5", tmp_path / "bytes.h5"
    data2h5.convert(folder, decoded, ext="jpg", workers=2)
    data2h5.convert(folder, raw, ext="jpg", reader="bytes", workers=2)
    expected = {f"{name}/photo.jpg": iio.imread(folder / name / "photo.jpg") for name in FORMATS}
    with h5py.File(decoded, "r") as f:
        for key, want in expected.items():
            assert np.array_equal(f[key][()], want), key
    loader = torch.utils.data.DataLoader(data2h5.H5Dataset(raw, return_key=True), batch_size=None, num_workers=2,
                                         shuffle=True, collate_fn=lambda sample: sample)
    seen = {key: sample for sample, key in loader}
    assert seen.keys() == expected.keys()
    for key, want in expected.items():
        assert np.array_equal(seen[key], want), key


def test_without_simplejpeg_installed_pillow_decodes_silently(folder):
    """As after ``pip install data2h5`` without the jpeg extra: no warning, the same arrays."""
    code = (
        "import sys; sys.modules['simplejpeg'] = None\n"  # makes `import simplejpeg` raise ImportError
        "import numpy as np, imageio.v3 as iio\n"
        "from data2h5 import jpeg\n"
        "from data2h5.readers import BUILTIN_READERS\n"
        "print(jpeg.backend())\n"
        f"path = {str(folder / 'rgb-420' / 'photo.jpg')!r}\n"
        "print(np.array_equal(BUILTIN_READERS['image'](path), iio.imread(path)))\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pillow", "True"] and done.stderr == ""


def test_the_environment_switches_simplejpeg_off():
    code = "from data2h5 import jpeg; print(jpeg.backend())"
    env = {**os.environ, "DATA2H5_JPEG": "pillow"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.stdout.strip() == "pillow", done.stderr


# -- decode_size ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size, shape", [
    ((18, 26), (19, 27)),  # 1/2: ceil(37/2) × ceil(53/2)
    ((9, 13), (10, 14)),  # 1/4
    ((4, 6), (5, 7)),  # 1/8
    ((4, 26), (19, 27)),  # the width allows only 1/2
    ((19, 26), (37, 53)),  # 2 × 19 > 37: full size
    ((100, 100), (37, 53)),  # larger than the photo: full size, never upscaled
])
@pytest.mark.parametrize("name", ["rgb-420", "rgb-444", "grey", "progressive", "cmyk"])
def test_decode_size_picks_the_smallest_dct_scale_still_covering_it(backend, folder, name, size, shape):
    raw = (folder / name / "photo.jpg").read_bytes()
    got = BUILTIN_READERS["image"].from_bytes(raw, ".jpg", decode_size=size)
    channels = iio.imread(raw, extension=".jpg").shape[2:]
    assert got.shape == shape + channels and got.dtype == np.uint8
    if shape == (HEIGHT, WIDTH):
        assert np.array_equal(got, iio.imread(raw, extension=".jpg"))


@pytest.mark.parametrize("name", ["rgb-420", "rgb-422", "grey", "progressive"])
def test_decode_size_gives_the_same_array_with_either_decoder(folder, name, monkeypatch):
    """Both run libjpeg-turbo's scaled IDCT: an archive reads the same with or without the extra."""
    pytest.importorskip("simplejpeg")
    raw = (folder / name / "photo.jpg").read_bytes()
    arrays = []
    for fast in (True, False):
        monkeypatch.setattr(jpeg, "USE_SIMPLEJPEG", fast)
        arrays.append(jpeg.decode(raw, decode_size=(9, 13)))
    assert arrays[0].shape == arrays[1].shape and np.array_equal(*arrays)


def test_h5dataset_decode_size_in_workers(backend, folder, tmp_path):
    torch = pytest.importorskip("torch")
    raw = tmp_path / "bytes.h5"
    Image.fromarray(photo_like(np.random.default_rng(1), 40, 40)).save(folder / "extra.png")
    try:
        data2h5.convert(folder, raw, ext=["jpg", "png"], reader="bytes", workers=1)
    finally:
        (folder / "extra.png").unlink()
    ds = data2h5.H5Dataset(raw, decode_size=(18, 26), return_key=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda sample: sample)
    shapes = {key: sample.shape[:2] for sample, key in loader}
    assert shapes["extra.png"] == (40, 40)  # not a JPEG: decoded at full size
    assert {shapes[f"{name}/photo.jpg"] for name in ("grey", "rgb-420", "progressive", "cmyk")} == {(19, 27)}


@pytest.mark.parametrize("size", [(0, 10), (10,), ("a", 3), (2.5, 3), None])
def test_decode_size_must_be_two_positive_ints(size):
    with pytest.raises(ValueError, match="decode_size must be \\(height, width\\)"):
        jpeg.check_decode_size(size)


def test_conversion_decode_size_stores_smaller_arrays_and_says_so(backend, folder, tmp_path):
    out = tmp_path / "small.h5"
    report = data2h5.convert(folder, out, ext="jpg", decode_size=(18, 26), workers=2)
    assert report.reader == "auto (decode size 18x26)"
    with h5py.File(out, "r") as f:
        assert f["rgb-420/photo.jpg"].shape == (19, 27, 3) and f["grey/photo.jpg"].shape == (19, 27)
        assert f["png-named-jpg/photo.jpg"].shape == (HEIGHT, WIDTH, 3)  # not a JPEG: full size
        assert f.attrs["reader"] == "auto (decode size 18x26)"


@pytest.mark.parametrize("args, words", [
    (["--decode-size", "18x26"], None),
    (["--decode-size", "18"], "is not HEIGHTxWIDTH in pixels such as 224x224"),
    (["--decode-size", "0x26"], "is not HEIGHTxWIDTH"),
    (["--decode-size", "18x26", "--reader", "bytes"], "--decode-size applies to --reader auto or image"),
])
def test_cli_decode_size(folder, tmp_path, args, words):
    out = tmp_path / "out.h5"
    done = run_cli("convert", "--path-images", folder, "--path-output", out, "--ext", "jpg", "-q", *args, cwd=tmp_path)
    if words is None:
        assert done.returncode == 0, done.stderr
        with h5py.File(out, "r") as f:
            assert f["rgb-444/photo.jpg"].shape == (19, 27, 3)
    else:
        assert done.returncode == 2 and words in done.stderr and not out.exists()


@pytest.mark.parametrize("reader", ["bytes", "npy"])
def test_decode_size_is_for_the_image_reader(folder, tmp_path, reader):
    with pytest.raises(ValueError, match="decode_size applies to the image reader"):
        data2h5.convert(folder, tmp_path / "out.h5", ext="jpg", reader=reader, decode_size=(18, 26))


# -- bad files ------------------------------------------------------------------------------------


def truncated(folder: Path, name: str) -> bytes:
    raw = (folder / name / "photo.jpg").read_bytes()
    return raw[: len(raw) * 2 // 3]


@pytest.mark.parametrize("name", ["rgb-420", "progressive", "grey"])
def test_a_truncated_jpeg_is_one_clear_line(backend, folder, tmp_path, name):
    src = tmp_path / "src"
    src.mkdir()
    (src / "cut.jpg").write_bytes(truncated(folder, name))
    done = run_cli("convert", "--path-images", src, "--path-output", tmp_path / "out.h5", "--ext", "jpg", "-q", cwd=tmp_path)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = error_line(done.stderr)
    assert str(src / "cut.jpg") in line and "the JPEG is truncated" in line and "copy the file again" in line


def test_a_truncated_jpeg_in_a_bytes_archive_names_archive_and_entry(backend, folder, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "cut.jpg").write_bytes(truncated(folder, "rgb-420"))
    out = tmp_path / "bytes.h5"
    data2h5.convert(src, out, ext="jpg", reader="bytes", workers=1)
    with pytest.raises(ReadError, match=r"bytes\.h5::cut\.jpg: .*the JPEG is truncated"):
        data2h5.H5Dataset(out)[0]


def huge(folder: Path, height: int, width: int) -> bytes:
    """A real JPEG whose frame header declares another size."""
    raw = (folder / "rgb-420" / "photo.jpg").read_bytes()
    at = raw.index(b"\xff\xc0") + 5  # marker, length, precision
    return raw[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + raw[at + 4 :]


def test_declared_dimensions_over_the_limit_are_refused_before_decoding(backend, folder):
    raw = huge(folder, 4000, 4000)  # 48 MB decoded
    tracemalloc.start()
    try:
        with pytest.raises(ReadError) as caught:
            read_source(None, "/photos/huge.jpg", raw, ".jpg", max_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # numpy's allocations are traced: no output array was made
    assert str(caught.value) == (
        "/photos/huge.jpg: its header declares 4000×4000×3 samples (45.8 MiB decoded), over the 1.0 MiB limit "
        "per file; pass a larger --max-entry-size if that is expected")
    # decoded at 1/8 it fits: the limit applies to what decode_size makes of it
    with pytest.raises(ReadError, match=r"declares 500×500×3 samples \(732\.4 KiB decoded\), over the 512\.0 KiB"):
        read_source(None, "/photos/huge.jpg", raw, ".jpg", max_bytes=512 << 10, decode_size=(400, 400))


def test_declared_dimensions_over_the_default_limit_stop_the_conversion(backend, folder, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "huge.jpg").write_bytes(huge(folder, 65000, 65000))  # 11.8 GiB decoded
    done = run_cli("convert", "--path-images", src, "--path-output", tmp_path / "out.h5", "--ext", "jpg", "-q", cwd=tmp_path)
    line = error_line(done.stderr)
    assert done.returncode == 1 and str(src / "huge.jpg") in line
    assert "declares 65000×65000×3 samples (11.8 GiB decoded), over the 4.0 GiB limit" in line
