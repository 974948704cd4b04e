"""Decode bombs: small files stored as bytes whose headers declare huge images or arrays are
refused in one line, before decoding, by every loader given a read limit, under a memory limit
far below what decoding them would take; honest files of each format still decode."""
from __future__ import annotations

import io
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data2h5  # noqa: E402
from command_runs import failures, run_everything  # noqa: E402
from data2h5.errors import SizeLimitError  # noqa: E402

LIMIT = 16 << 20
MEMORY = 2 << 30  # an honest read of these archives peaks well below; a bomb would take 1-8 GiB and more


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width``×``height`` RGB, with a zlib stream of zeros."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    zeros = zlib.compressobj(9)
    body = b"".join(zeros.compress(b"\0" * (1 << 20)) for _ in range(8)) + zeros.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def npy_header(shape: tuple, descr: str = "<f8") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue() + b"\0" * 64


def npz_of(member: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.npy", member)
    return out.getvalue()


def image_file(mode: str, size: tuple, ext: str, frames: int = 1) -> bytes:
    out = io.BytesIO()
    images = [Image.new(mode, size, i) for i in range(frames)]
    options = {"compression": "tiff_deflate"} if ext == "TIFF" else {}
    images[0].save(out, format=ext, save_all=frames > 1, append_images=images[1:], **options)
    return out.getvalue()


BOMBS = {
    "ihdr-20k.png": lambda: png_bomb(20000, 20000),
    "ihdr-3k.png": lambda: png_bomb(3000, 3000),
    "huge.npy": lambda: npy_header((1 << 20, 1 << 20)),
    "wide.npy": lambda: npy_header((1 << 40,), "<u1"),
    "member.npz": lambda: npz_of(npy_header((1 << 20, 1 << 20))),
    "zeros.npz": lambda: (lambda b: (np.savez_compressed(b, a=np.zeros((2048, 2048))), b.getvalue())[1])(io.BytesIO()),
    "palette.gif": lambda: image_file("P", (2600, 2600), "GIF"),
    "frames.gif": lambda: image_file("L", (600, 600), "GIF", frames=16),
    "pages.tif": lambda: image_file("L", (1200, 1200), "TIFF", frames=16),
    "canvas.webp": lambda: image_file("RGB", (4000, 4000), "WEBP"),
}
HONEST = {"a.png": ("RGB", "PNG"), "b.gif": ("P", "GIF"), "c.tif": ("RGB", "TIFF"), "d.webp": ("RGB", "WEBP"),
          "e.bmp": ("RGB", "BMP"), "f.ppm": ("RGB", "PPM")}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    base = tmp_path_factory.mktemp("bombs")
    bombs, honest = base / "bombs", base / "honest"
    for name, make in BOMBS.items():
        (bombs / name).parent.mkdir(parents=True, exist_ok=True)
        (bombs / name).write_bytes(make())
    honest.mkdir()
    for name, (mode, fmt) in HONEST.items():
        (honest / name).write_bytes(image_file(mode, (24, 16), fmt))
    np.save(honest / "g.npy", np.arange(12.0).reshape(3, 4))
    (honest / "h.txt").write_text("text")
    out = {}
    for name, src in (("bombs", bombs), ("honest", honest)):
        out[name] = base / name / "archive.h5"
        out[name].parent.mkdir(exist_ok=True)
        data2h5.convert(src, out[name], reader="bytes", workers=1, progress=False,
                        ext=["png", "npy", "npz", "gif", "tif", "webp", "bmp", "ppm", "txt"])
    return out, honest


@pytest.mark.parametrize("key", list(BOMBS))
def test_a_bomb_is_refused_before_decoding(archives, key):
    archive = archives[0]["bombs"]
    with data2h5.open(archive, max_entry_bytes=LIMIT) as view:
        with pytest.raises(SizeLimitError) as caught:
            view[key]
    message = str(caught.value)
    assert key in message and "\n" not in message and caught.value.limit == LIMIT


def test_bombs_through_every_loader_under_a_memory_limit(tmp_path, archives):
    archive = archives[0]["bombs"]
    runs = run_everything({"bombs": archive}, tmp_path, commands=("H5Dataset", "open"), memory=MEMORY,
                          options={"max_entry_bytes": LIMIT})
    found = failures(runs)
    assert not found, "\n".join(found)
    assert [r.status for r in runs] == [1, 1] and all("SizeLimitError" in r.stderr for r in runs), runs


def test_honest_files_decode_as_imageio_does(archives):
    archive, honest = archives[0]["honest"], archives[1]
    with data2h5.open(archive, max_entry_bytes=LIMIT) as view:
        for name in HONEST:
            np.testing.assert_array_equal(view[name], iio.imread(honest / name))
        np.testing.assert_array_equal(view["g.npy"], np.arange(12.0).reshape(3, 4))
        assert view["h.txt"] == "text"


def test_a_raised_limit_decodes_what_it_declares(archives):
    archive = archives[0]["bombs"]
    with data2h5.open(archive, max_entry_bytes=1 << 30) as view:
        assert view["zeros.npz"].shape == (2048, 2048)
        assert view["palette.gif"].shape[-3:-1] == (2600, 2600)
