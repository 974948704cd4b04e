"""JPEG decoding: libjpeg-turbo through simplejpeg where it gives Pillow's exact array, Pillow otherwise.

Decoding is most of what reading a bytes archive costs. simplejpeg (``pip install
'data2h5[jpeg]'``) decodes a 256-pixel photo in about half the time Pillow takes, to the same
array: both run libjpeg-turbo with the same integer IDCT and upsampling. It is used for the
files where that holds (8-bit Huffman-coded baseline or progressive JPEGs, grey or YCbCr/RGB);
everything else, and anything simplejpeg refuses (it stops at what libjpeg only warns about),
is decoded by Pillow as before, so the result is always ``imageio.v3.imread``'s array.
EXIF orientation is not applied on either path, as imageio does not apply it.

``decode_size=(H, W)`` decodes at the smallest of the DCT scales 1, 1/2, 1/4, 1/8 whose output
is still at least H×W (Pillow's ``draft`` rule), inside libjpeg: several times less work for
photos larger than what training resizes them to. Both decoders give the same array at a
given scale, but it is not the array of a full decode followed by a resize.

Set ``DATA2H5_JPEG=pillow`` in the environment (read at import) or :data:`USE_SIMPLEJPEG` to
False to decode with Pillow only.
"""
from __future__ import annotations

import functools
import io
import logging
import operator
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

USE_SIMPLEJPEG = os.environ.get("DATA2H5_JPEG", "").strip().lower() != "pillow"
"""Whether to decode with simplejpeg where it is installed and gives Pillow's array."""

SCALES = (8, 4, 2, 1)  # the DCT scales both libjpeg-turbo bindings decode at, as denominators
_FAST_SOF = frozenset({0xC0, 0xC1, 0xC2})  # Huffman-coded baseline, extended and progressive frames
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every start-of-frame marker
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length field


class JpegError(ValueError):
    """A JPEG that does not decode, in words fit for a one-line message."""


class TooLarge(JpegError):
    """The frame header declares an image over the size limit; nothing was decoded."""

    def __init__(self, header: "Header", shape: Tuple[int, ...], nbytes: int):
        self.header, self.shape, self.nbytes = header, shape, nbytes
        super().__init__(f"its header declares {'×'.join(map(str, shape))} samples ({nbytes:,} bytes)")


@dataclass(frozen=True)
class Header:
    """What a JPEG's start-of-frame segment declares."""

    marker: int  # 0xC0 baseline, 0xC2 progressive, 0xC9 arithmetic...
    precision: int  # bits per sample
    height: int
    width: int
    components: int
    end: int  # offset just past the frame header: the image data's end marker lies beyond it

    def scale(self, decode_size: Optional[Tuple[int, int]]) -> int:
        """The largest of :data:`SCALES` (a denominator) whose output is still at least
        ``decode_size`` (height, width); 1 without one."""
        if decode_size is None:
            return 1
        h, w = decode_size
        return next(s for s in SCALES if s == 1 or (s * h <= self.height and s * w <= self.width))

    def shape(self, scale: int = 1) -> Tuple[int, ...]:
        """The decoded array's shape at ``scale``, as Pillow and imageio give it."""
        size = (-(-self.height // scale), -(-self.width // scale))
        return size if self.components == 1 else size + (self.components,)

    def nbytes(self, scale: int = 1) -> int:
        return int(np.prod(self.shape(scale), dtype=np.int64)) * (1 if self.precision <= 8 else 2)

    @property
    def fast(self) -> bool:
        """Whether simplejpeg decodes this kind of file to Pillow's exact array (tested)."""
        return (self.marker in _FAST_SOF and self.precision == 8 and self.components in (1, 3)
                and self.height > 0 and self.width > 0)


def check_decode_size(size: Sequence[int]) -> Tuple[int, int]:
    """``size`` as ``(height, width)``, two positive ints; ValueError naming it otherwise."""
    try:
        height, width = (operator.index(v) for v in size)
    except (TypeError, ValueError):
        height = width = 0
    if height < 1 or width < 1:
        raise ValueError(f"decode_size must be (height, width) in pixels, both positive, not {size!r}")
    return height, width


def read_header(raw: bytes) -> Optional[Header]:
    """The frame header of the JPEG in ``raw``, read from its markers without decoding; None
    when ``raw`` does not start like a JPEG or ends before its frame header."""
    if raw[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(raw)
    while pos + 4 <= n:
        if raw[pos] != 0xFF:
            return None  # not a marker where one must be: let the decoder say what is wrong
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        length = int.from_bytes(raw[pos + 2 : pos + 4], "big")
        if marker in _SOF:
            if length < 8 or pos + 2 + length > n:
                return None
            p = pos + 4
            return Header(marker, raw[p], int.from_bytes(raw[p + 1 : p + 3], "big"),
                          int.from_bytes(raw[p + 3 : p + 5], "big"), raw[p + 5], pos + 2 + length)
        pos += 2 + length
    return None


def backend() -> str:
    """The decoder the fast path uses now: ``simplejpeg``, or ``pillow`` when it is switched
    off or not installed."""
    return "simplejpeg" if USE_SIMPLEJPEG and _simplejpeg() is not None else "pillow"


@functools.lru_cache(maxsize=None)
def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        log.debug("simplejpeg is not installed: JPEGs are decoded with Pillow")
        return None
    return simplejpeg


def decode(raw: bytes, *, decode_size: Optional[Tuple[int, int]] = None,
           max_bytes: Optional[int] = None) -> Optional[np.ndarray]:
    """The JPEG in ``raw`` as ``imageio.v3.imread`` decodes it (at full size), or at the
    reduced scale ``decode_size`` asks for; None when it is not a JPEG Pillow opens as L, RGB
    or CMYK (the caller lets imageio try).

    Raises :class:`TooLarge` before decoding anything when the header declares more than
    ``max_bytes`` of samples, and :class:`JpegError` when the file does not decode.
    """
    header = read_header(raw)
    scale = 1
    if header is not None:
        scale = header.scale(decode_size)
        if max_bytes is not None and header.nbytes(scale) > max_bytes:
            raise TooLarge(header, header.shape(scale), header.nbytes(scale))
        if header.fast and backend() == "simplejpeg" and _within_pillow_limit(header):
            decoded = _decode_simplejpeg(raw, header, scale)
            if decoded is not None:
                return decoded
    return _decode_pillow(raw, header, scale)


def _within_pillow_limit(header: Header) -> bool:
    """Pillow refuses (or warns about) images over its decompression-bomb limit; those go to
    Pillow, so that the fast path never allocates what Pillow would not."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS is None or header.height * header.width <= Image.MAX_IMAGE_PIXELS


def _decode_simplejpeg(raw: bytes, header: Header, scale: int) -> Optional[np.ndarray]:
    expected = header.shape(scale)
    sized = {"min_height": expected[0], "min_width": expected[1]} if scale > 1 else {}
    try:
        out = _simplejpeg().decode_jpeg(raw, colorspace="GRAY" if header.components == 1 else "RGB", **sized)
    except Exception as exc:  # noqa: BLE001 - strict mode raises on what libjpeg only warns about
        log.debug("simplejpeg did not decode a JPEG (%s); decoding it with Pillow", " ".join(str(exc).split()))
        return None
    if header.components == 1:
        out = out.reshape(out.shape[:2])
    if out.shape != expected:  # a scale other than Pillow's: Pillow's array is the reference
        log.debug("simplejpeg decoded %s where %s was expected; decoding with Pillow", out.shape, expected)
        return None
    return out


def _decode_pillow(raw: bytes, header: Optional[Header], scale: int) -> Optional[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(raw), formats=("JPEG",))
    except UnidentifiedImageError:
        return None  # not a JPEG after all: imageio finds out what it is
    with image:
        if image.mode not in ("L", "RGB", "CMYK"):
            return None
        if scale > 1:
            image.draft(image.mode, (image.width // scale, image.height // scale))
        try:
            return np.array(image)
        except OSError as exc:
            if header is not None and b"\xff\xd9" not in raw[header.end :]:
                raise JpegError(f"the JPEG is truncated (its data ends after {len(raw):,} bytes, before the "
                                "image does); copy the file again") from exc
            raise
