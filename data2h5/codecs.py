"""Compression codecs: compress chunks in worker processes, set the matching HDF5 filter.

Workers compress each chunk themselves and the writer hands the bytes to HDF5 with
``write_direct_chunk``; the chunks read back through HDF5's normal filter pipeline
(``dset[()]``) because every codec here produces exactly what its HDF5 filter stores:
``zlib.compress`` for the deflate filter, raw liblzf output for h5py's lzf filter, and
one-shot zstd frames (with content size) for hdf5plugin's Zstd filter. Blosc is the
exception: it has no worker-side compressor here, so the writer lets HDF5 compress it.
"""
from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import CompressionError
from .format import Kind

NONE, LZF, GZIP, ZSTD, BLOSC_LZ4 = 0, 1, 2, 3, 4

FILTER_LZF = 32000
FILTER_ZSTD = 32015
FILTER_BLOSC = 32001

#: The most one stored byte can decompress to, by codec id (lzf: a 3-byte back-reference
#: copies at most 264 bytes; deflate: 258 bytes per 1-bit code, about 1032:1 in practice).
#: zstd frames declare their size, which is checked instead.
MAX_RATIO = {LZF: 90.0, GZIP: 1040.0}

# Extensions whose bytes are already compressed: compressing them again costs time and saves
# next to nothing.
COMPRESSED_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .webp .avif .heic .jxl .jp2 .zip .gz .tgz .bz2 .xz .zst "
    ".7z .rar .mp3 .mp4 .m4a .mkv .webm .mov .ogg .opus .flac .npz .pdf".split()
)


@dataclass(frozen=True)
class Codec:
    """One compression choice: its id in the index, its HDF5 filter and its level."""

    name: str
    id: int
    level: Optional[int] = None

    @property
    def spec(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"

    @property
    def in_worker(self) -> bool:
        """Whether workers can compress chunks for this codec (else HDF5 compresses them)."""
        return self.id != BLOSC_LZ4

    def compress(self, raw) -> Tuple[bytes, int]:
        """Compress one chunk; returns ``(stored bytes, HDF5 filter mask)``.

        A chunk that lzf cannot shrink is stored raw with the filter skipped (mask 1), as
        HDF5 itself does for an optional filter that fails.
        """
        if self.id == NONE:
            return bytes(raw), 0
        if self.id == LZF:
            import lzf

            out = lzf.compress(bytes(raw))
            return (bytes(raw), 1) if out is None else (out, 0)
        if self.id == GZIP:
            return zlib.compress(raw, 4 if self.level is None else self.level), 0
        if self.id == ZSTD:
            return _zstd_compressor(self.level).compress(raw), 0
        raise CompressionError(f"codec {self.spec} cannot compress outside HDF5")

    def decompress(self, data: bytes, nbytes: int) -> bytes:
        """Invert :meth:`compress` for a chunk of ``nbytes`` uncompressed bytes.

        Never produces (or allocates for) more than ``nbytes``: data that would decompress
        to more, or that claims more than the codec can make of ``len(data)`` bytes, raises
        :class:`ValueError` instead, so a crafted chunk cannot exhaust memory.
        """
        if self.id == NONE:
            return data
        ratio = MAX_RATIO.get(self.id)
        if ratio is not None and nbytes > len(data) * ratio + 64:
            raise ValueError(f"{len(data)} stored bytes cannot hold {nbytes} bytes of {self.name} data")
        if self.id == LZF:
            import lzf

            out = lzf.decompress(data, nbytes)
            if out is None or len(out) != nbytes:
                raise ValueError("lzf data does not decompress to the expected size")
            return out
        if self.id == GZIP:
            inflate = zlib.decompressobj()
            out = inflate.decompress(data, nbytes)
            if inflate.unconsumed_tail:
                raise ValueError(f"deflate data decompresses to more than {nbytes} bytes")
            return out
        if self.id == ZSTD:
            import zstandard

            declared = zstandard.frame_content_size(data)
            if declared >= 0 and declared != nbytes:
                raise ValueError(f"zstd frame declares {declared} bytes where {nbytes} were expected")
            return _zstd_decompressor().decompress(data, max_output_size=nbytes)
        raise CompressionError(f"codec {self.spec} cannot decompress outside HDF5")

    def can_decompress(self) -> bool:
        """Whether :meth:`decompress` works here (its package is installed)."""
        module = {LZF: "lzf", ZSTD: "zstandard"}.get(self.id)
        if self.id == BLOSC_LZ4:
            return False
        if module is None:
            return True
        try:
            __import__(module)
        except ImportError:
            return False
        return True

    def set_filter(self, dcpl) -> None:
        """Add this codec's filter to an ``h5py.h5p`` dataset-creation property list."""
        import h5py

        if self.id == NONE:
            return
        if self.id == LZF:
            dcpl.set_filter(FILTER_LZF, h5py.h5z.FLAG_OPTIONAL)
        elif self.id == GZIP:
            dcpl.set_deflate(4 if self.level is None else self.level)
        elif self.id == ZSTD:
            _require_hdf5plugin(self.spec)
            dcpl.set_filter(FILTER_ZSTD, h5py.h5z.FLAG_OPTIONAL, (self.level or 3,))
        elif self.id == BLOSC_LZ4:
            import hdf5plugin

            opts = hdf5plugin.Blosc(cname="lz4", clevel=self.level or 5, shuffle=hdf5plugin.Blosc.SHUFFLE)
            dcpl.set_filter(FILTER_BLOSC, h5py.h5z.FLAG_OPTIONAL, tuple(opts.filter_options))


CODECS = {
    "none": Codec("none", NONE),
    "lzf": Codec("lzf", LZF),
    "gzip": Codec("gzip", GZIP, 4),
    "zstd": Codec("zstd", ZSTD, 3),
    "blosc-lz4": Codec("blosc-lz4", BLOSC_LZ4, 5),
}
_BY_ID = {c.id: c for c in CODECS.values()}
_LEVELS = {"gzip": range(0, 10), "zstd": range(1, 23), "blosc-lz4": range(0, 10)}
AUTO = "auto"


def parse_compression(spec: str) -> Optional[Codec]:
    """Parse ``auto``, ``none``, ``lzf``, ``gzip[:LEVEL]``, ``zstd[:LEVEL]`` or ``blosc-lz4[:LEVEL]``.

    Returns ``None`` for ``auto`` (chosen per entry by :func:`choose_codec`). Raises
    :class:`CompressionError` for an unknown spec or a codec whose package is missing.
    """
    name, _, level_text = spec.strip().lower().partition(":")
    if name == AUTO and not level_text:
        return None
    if name not in CODECS:
        raise CompressionError(
            f"unknown compression {spec!r}: use auto, none, lzf, gzip[:0-9], zstd[:1-22] or blosc-lz4[:0-9]"
        )
    codec = CODECS[name]
    if level_text:
        if name not in _LEVELS or not level_text.isdigit() or int(level_text) not in _LEVELS[name]:
            raise CompressionError(f"compression {spec!r}: {name} takes no such level")
        codec = Codec(codec.name, codec.id, int(level_text))
    if codec.id in (ZSTD, BLOSC_LZ4):
        _require_hdf5plugin(codec.spec)
        if codec.id == ZSTD:
            _require_module("zstandard", codec.spec)
    return codec


def choose_codec(choice: Optional[Codec], kind: Kind, ext: str) -> Codec:
    """The codec for one entry: the user's choice, or the ``auto`` rule.

    ``auto`` uses lzf for decoded arrays (fast, lossless, ~0.6 of the raw size on photos),
    nothing for bytes that are already compressed (JPEG, PNG, zip...), and gzip for text and
    other raw bytes.
    """
    if choice is not None:
        return choice
    if kind == Kind.ARRAY:
        return CODECS["lzf"]
    if kind == Kind.BYTES and ext.lower() in COMPRESSED_EXTENSIONS:
        return CODECS["none"]
    return CODECS["gzip"]


def codec_by_id(codec_id: int) -> Codec:
    """The codec recorded in an archive's index under ``codec_id``."""
    try:
        return _BY_ID[int(codec_id)]
    except KeyError:
        raise CompressionError(f"unknown codec id {codec_id} in archive index") from None


def _require_module(module: str, spec: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise CompressionError(
            f"compression {spec} needs the {module} package: pip install 'data2h5[compress]'"
        ) from None


def _require_hdf5plugin(spec: str) -> None:
    _require_module("hdf5plugin", spec)


# zstd contexts must not be shared between threads: one set per thread.
_zstd_state = threading.local()


def _zstd_compressor(level: Optional[int]):
    cache = _zstd_state.__dict__
    key = ("c", level)
    if key not in cache:
        import zstandard

        cache[key] = zstandard.ZstdCompressor(level=level or 3, write_content_size=True)
    return cache[key]


def _zstd_decompressor():
    cache = _zstd_state.__dict__
    if "d" not in cache:
        import zstandard

        cache["d"] = zstandard.ZstdDecompressor()
    return cache["d"]
