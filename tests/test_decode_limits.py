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
MEMORY = 1 << 30  # an honest read through H5Dataset (torch loaded) needs 640-768 MiB; a bomb 324 MiB to TiBs more


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


def icon_of(inner: bytes) -> bytes:
    """An .ico whose one directory entry says 256×256 and holds ``inner`` (a PNG or bitmap)."""
    return b"\0\0\1\0\1\0" + bytes(4) + struct.pack("<HHII", 1, 32, len(inner), 22) + inner


def dib(width: int, height: int, bits: int = 32) -> bytes:
    """A bitmap info header (as in an icon: height counts the AND mask) and a few pixels."""
    return struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, bits, 0, 0, 0, 0, 0, 0) + bytes(64)


def webp_canvas(width: int, height: int, flags: int = 0x10) -> bytes:
    """A WebP whose VP8X chunk declares a ``width``×``height`` canvas (flags 0x12: animated)."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + b"VP8L" + struct.pack("<I", 13) + b"\x2f" + bytes(12)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_sof(width: int, height: int, junk: bytes = b"") -> bytes:
    """A JPEG whose baseline frame header declares ``width``×``height`` YCbCr, with no image data."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + junk + sof + b"\xff\xda\x00\x0c\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00" + bytes(64) + b"\xff\xd9"


def bmp_of(width: int, height: int, bits: int = 24) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + bytes(64)


def gif_of(screen: tuple, frame: tuple, frames: int = 1) -> bytes:
    """A GIF with a ``screen`` (w, h) and ``frames`` image descriptors of ``frame`` (w, h)."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    for _ in range(frames):
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0) + b"\x02\x02\x44\x01\x00"
    return out + b"\x3b"


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
    "vp8x.webp": lambda: webp_canvas(12000, 12000),
    "animated.webp": lambda: webp_canvas(16000, 16000, 0x12),
    "embedded-png.ico": lambda: icon_of(png_bomb(12000, 12000)),  # Pillow decodes it while opening
    "embedded-dib.ico": lambda: icon_of(dib(12000, 12000)),
    "sof.jpg": lambda: jpeg_sof(60000, 60000),
    "sof-in.png": lambda: jpeg_sof(9000, 9000),  # a JPEG under another image extension
    "fill-before-sof.jpg": lambda: jpeg_sof(9000, 9000, b"\xff\xff"),
    "bottom-up.bmp": lambda: bmp_of(9000, 9000),
    "top-down.bmp": lambda: bmp_of(9000, -9000, 32),
    "rgb.ppm": lambda: b"P6\n9000 9000\n255\n" + bytes(64),
    "grey16.pgm": lambda: b"P5\n# a comment\n9000 9000\n65535\n" + bytes(64),
    "bits.pbm": lambda: b"P4 30000 30000\n" + bytes(64),
    "rgb.tga": lambda: bytes([0, 0, 2]) + bytes(9) + struct.pack("<HHBB", 9000, 9000, 24, 0) + bytes(64),
    "screen.gif": lambda: gif_of((9000, 9000), (1, 1)),
    "frame-past-screen.gif": lambda: gif_of((8, 8), (9000, 9000)),
    "many-frames.gif": lambda: gif_of((1000, 1000), (1, 1), 500),
}
HONEST = {"a.png": ("RGB", "PNG"), "b.gif": ("P", "GIF"), "c.tif": ("RGB", "TIFF"), "d.webp": ("RGB", "WEBP"),
          "e.bmp": ("RGB", "BMP"), "f.ppm": ("RGB", "PPM"), "i.ico": ("RGBA", "ICO"), "j.tga": ("RGB", "TGA"),
          "k.jpg": ("RGB", "JPEG"), "l.pgm": ("L", "PPM"), "m.webp": ("RGBA", "WEBP")}


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
                        ext=["png", "npy", "npz", "gif", "tif", "webp", "bmp", "ppm", "pgm", "pbm", "ico", "tga",
                             "jpg", "txt"])
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
    """Each bomb in an archive of its own (a loader stops at the first refusal), read by every
    decoding loader in a process whose address space an honest read fits with ~300 MiB spare."""
    sources = archives[1].parent / "bombs"
    cases = {}
    for name in BOMBS:
        folder = tmp_path / name
        (folder / "src").mkdir(parents=True)
        (folder / "src" / name).write_bytes((sources / name).read_bytes())
        cases[name] = folder / "archive.h5"
        data2h5.convert(folder / "src", cases[name], reader="bytes", workers=1, progress=False,
                        ext=[name.rsplit(".", 1)[1]])
    cases["honest"] = archives[0]["honest"]
    (tmp_path / "runs").mkdir()
    runs = run_everything(cases, tmp_path / "runs", commands=("H5Dataset", "open"), memory=MEMORY,
                          options={"max_entry_bytes": LIMIT})
    found = failures(runs)
    assert not found, "\n".join(found)
    for run in runs:
        if run.case == "honest":
            assert run.status == 0, run
        else:
            assert run.status == 1 and "SizeLimitError" in run.stderr and run.case in run.stderr, run


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
