"""What a file's header says it decodes to, learned before decoding it.

A file of a few KB can declare gigapixels (a PNG's IHDR, a TIFF's tags, a GIF of many frames)
or an .npy header of terabytes. The decoders allocate what the header says, so the size is read
from the header first and refused when it exceeds the read limit (:func:`check`). Images other
than JPEG (read by :mod:`data2h5.jpeg` itself) are measured by Pillow's lazy open, which parses
only headers, counting every frame a multi-frame file holds; a TIFF that Pillow cannot parse is
measured by tifffile's page tags; any other image whose size no header tells is refused.
"""
from __future__ import annotations

import io
import re
import zipfile
from typing import NamedTuple, Optional

import numpy as np

from . import jpeg


class Declared(NamedTuple):
    """What a header declares: ``nbytes`` decoded, described as ``what`` for messages."""

    nbytes: int
    what: str


class Undeclared(ValueError):
    """The file's header does not say what it decodes to, so it is not decoded under a limit."""


class Unrecognised(Undeclared):
    """No image decoder recognises the file's bytes."""


# Bytes a pixel of each Pillow mode decodes to (palette modes: imageio returns RGB or RGBA).
_BYTES_PER_BAND = {"1": 1, "L": 1, "P": 4, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3, "LAB": 3, "HSV": 3,
                   "I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 2, "La": 2, "PA": 4,
                   "RGBa": 4, "RGBX": 4}
MAX_FRAMES_COUNTED = 1 << 16  # a file declaring more frames is refused without counting on


def image(raw: bytes, ext: str) -> Declared:
    """Bytes the image in ``raw`` decodes to, from its headers; raises :class:`Undeclared`."""
    header = jpeg.read_header(raw)
    if header is not None:
        return Declared(header.nbytes(), f"{'×'.join(map(str, header.shape()))} samples")
    for signature, measure in _OWN_PARSERS.items():
        if raw.startswith(signature):
            return measure(raw)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            per_pixel = _BYTES_PER_BAND.get(img.mode, 8)  # unknown modes: the widest Pillow makes
            frames = _frames(img)
    except Image.DecompressionBombError as exc:  # over twice Pillow's own pixel limit: refused by it too
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return Declared(pixels, f"{pixels} pixels, over Pillow's own limit")
    except Exception as exc:  # noqa: BLE001 - Pillow raises anything on bytes it cannot parse
        if isinstance(exc, Undeclared):
            raise
        if ext in (".tif", ".tiff"):
            return _tiff(raw)
        if isinstance(exc, UnidentifiedImageError):
            raise Unrecognised("no image decoder recognises its bytes") from None
        raise Undeclared(f"no header tells its decoded size ({type(exc).__name__})") from None
    nbytes = int(width) * int(height) * per_pixel * frames
    shown = f"{frames} frames of {width}×{height}" if frames > 1 else f"{width}×{height} pixels"
    return Declared(nbytes, f"{shown} ({img.mode})")


def _ico(raw: bytes) -> Declared:
    """Pillow decodes an icon's largest image while opening it, so its size is read here: the
    largest image any directory entry holds, by the embedded PNG's or bitmap's own header (the
    directory's one-byte sizes may lie), decoded to RGBA."""
    count, largest = int.from_bytes(raw[4:6], "little"), 0
    if not count or len(raw) < 6 + 16 * count:
        raise Undeclared("its icon directory is empty or cut short")
    for i in range(count):
        entry = 6 + 16 * i
        at = int.from_bytes(raw[entry + 12:entry + 16], "little")
        if raw[at:at + 8] == b"\x89PNG\r\n\x1a\n":
            if raw[at + 12:at + 16] != b"IHDR" or len(raw) < at + 24:
                raise Undeclared(f"the PNG of icon entry {i} lacks its IHDR")
            pixels = int.from_bytes(raw[at + 16:at + 20], "big") * int.from_bytes(raw[at + 20:at + 24], "big")
        else:  # a bitmap without its file header; its height counts the AND mask too
            if len(raw) < at + 12:
                raise Undeclared(f"the bitmap of icon entry {i} is cut short")
            width = abs(int.from_bytes(raw[at + 4:at + 8], "little", signed=True))
            pixels = width * (abs(int.from_bytes(raw[at + 8:at + 12], "little", signed=True)) // 2)
        largest = max(largest, pixels, (raw[entry] or 256) * (raw[entry + 1] or 256))
    return Declared(largest * 4, f"an icon of {largest} pixels (RGBA)")


def _webp(raw: bytes) -> Declared:
    """libwebp allocates the whole canvas when Pillow opens a WebP, so its size is read here,
    from the first chunk; imageio returns one frame (the first, even of an animation), RGB or
    RGBA, counted as RGBA."""
    chunk = raw[12:16]
    if raw[8:12] != b"WEBP" or len(raw) < 30:
        raise Undeclared("its RIFF header is not a WebP's, or is cut short")
    if chunk == b"VP8X":  # extended: the canvas, 24 bits a side, less one
        width, height = int.from_bytes(raw[24:27], "little") + 1, int.from_bytes(raw[27:30], "little") + 1
    elif chunk == b"VP8L" and raw[20] == 0x2F:  # lossless: 14 bits a side, less one
        bits = int.from_bytes(raw[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8 " and raw[23:26] == b"\x9d\x01\x2a":  # lossy key frame: 14 bits a side
        width, height = int.from_bytes(raw[26:28], "little") & 0x3FFF, int.from_bytes(raw[28:30], "little") & 0x3FFF
    else:
        raise Undeclared(f"its first WebP chunk ({chunk!r}) declares no size")
    return Declared(width * height * 4, f"{width}×{height} pixels (WebP, up to RGBA)")


# Formats that Pillow's lazy open cannot measure without allocating what they declare, by signature.
_OWN_PARSERS = {b"\x00\x00\x01\x00": _ico, b"RIFF": _webp}


def _frames(img) -> int:
    count = int(getattr(img, "n_frames", 1))
    if count > MAX_FRAMES_COUNTED:  # capping it instead would let a file of tiny frames under the limit
        raise Undeclared(f"it declares {count:,} frames, more than the {MAX_FRAMES_COUNTED:,} data2h5 decodes")
    return max(1, count)


def _tiff(raw: bytes) -> Declared:
    try:
        import tifffile
    except ImportError:
        raise Undeclared("a TIFF whose header Pillow cannot read (install tifffile to measure it)") from None
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            nbytes = sum(int(np.prod(p.shape, dtype=object)) * np.dtype(p.dtype).itemsize
                         for p in tif.pages[:MAX_FRAMES_COUNTED])
            pages = len(tif.pages)
    except Exception as exc:  # noqa: BLE001
        raise Undeclared(f"its TIFF tags do not parse ({type(exc).__name__})") from None
    return Declared(nbytes, f"{pages} TIFF pages")


def npy(raw: bytes) -> Declared:
    """Bytes an .npy (or each member of an .npz, together) declares in its header."""
    if raw[:2] == b"PK":
        total, count = 0, 0
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                for info in zf.infolist():
                    with zf.open(info) as member:
                        total += _npy_header(member.read(1 << 16))
                    count += 1
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise Undeclared(f"its .npz members do not parse ({type(exc).__name__})") from None
        return Declared(total, f"{count} arrays")
    return Declared(_npy_header(raw[: 1 << 16]), "an array")


def _npy_header(head: bytes) -> int:
    fh = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh, max_header_size=1 << 16)
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError... on a bad header
        raise Undeclared(f"its .npy header does not parse ({type(exc).__name__})") from None
    count = 1
    for d in shape:
        count *= int(d)
    return count * max(1, dtype.itemsize)


def text(raw: bytes) -> Declared:
    """Text decodes to at most one character a byte (Python's str then holds 1 to 4 bytes a
    character): its size is the stored size, already within the limit."""
    return Declared(len(raw), f"{len(raw)} bytes of text")


class TooLarge(ValueError):
    """A header declares more than the read limit."""

    def __init__(self, declared: Declared, limit: int):
        self.declared, self.limit = declared, limit
        super().__init__(f"its header declares {declared.what}, {declared.nbytes} bytes decoded")


def check(declared: Declared, limit: Optional[int]) -> None:
    """Raise :class:`TooLarge` when ``declared`` exceeds ``limit`` (None: no limit)."""
    if limit is not None and declared.nbytes > limit:
        raise TooLarge(declared, limit)
