"""Compression codecs: one definition each, in the read-only registry :data:`CODECS`.

Workers compress each chunk themselves and the writer hands the bytes to HDF5 with
``write_direct_chunk``; the chunks read back through HDF5's normal filter pipeline
(``dset[()]``) because every codec here produces exactly what its HDF5 filter stores:
``zlib.compress`` for the deflate filter, raw liblzf output for h5py's lzf filter, and
one-shot zstd frames (with content size) for hdf5plugin's Zstd filter. Blosc is the
exception: it has no worker-side compressor here, so the writer lets HDF5 compress it.

A :class:`Codec` holds everything about one codec: the number the index records, its HDF5
filter and options, its levels, how to compress a chunk and decompress one with a bounded
output, and the package it needs with the command that installs it. The CLI help, the error
texts and the filter-to-codec maps are all derived from the registry, so adding a codec is
one entry in :data:`CODECS` (plus its functions).
"""
from __future__ import annotations

import dataclasses
import threading
import types
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

from .errors import CompressionError
from .format import Kind

NONE, LZF, GZIP, ZSTD, BLOSC_LZ4 = 0, 1, 2, 3, 4

FILTER_DEFLATE = 1
FILTER_LZF = 32000
FILTER_ZSTD = 32015
FILTER_BLOSC = 32001

INSTALL_COMPRESS = "pip install 'data2h5[compress]'"

# Extensions whose bytes are already compressed: compressing them again costs time and saves
# next to nothing.
COMPRESSED_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .webp .avif .heic .jxl .jp2 .zip .gz .tgz .bz2 .xz .zst "
    ".7z .rar .mp3 .mp4 .m4a .mkv .webm .mov .ogg .opus .flac .npz .pdf".split()
)

Compress = Callable[[object, Optional[int]], Tuple[bytes, int]]
Decompress = Callable[[bytes, int], bytes]


@dataclass(frozen=True)
class Codec:
    """One compression choice: its number in the index, its HDF5 filter and its level.

    Codecs travel to worker processes: their functions are module-level, so they pickle.

    ``levels``: the levels it takes (empty: none), ``level`` the one chosen (``None``: none
    taken). ``max_ratio``: the most one stored byte can decompress to, checked before
    decompressing (``None``: the format declares its size, checked instead). ``needs``: the
    Python modules it needs, each installed by :attr:`install`. ``hdf5_needs``: the module
    that registers its HDF5 filter.
    """

    name: str
    id: int
    filter_id: Optional[int] = None  # None: no HDF5 filter (stored as is)
    levels: range = range(0)
    level: Optional[int] = None
    max_ratio: Optional[float] = None
    needs: Tuple[str, ...] = ()
    hdf5_needs: Optional[str] = None
    install: str = ""
    compressor: Optional[Compress] = None  # None: only HDF5 compresses it
    decompressor: Optional[Decompress] = None
    filter_options: Optional[Callable[[Optional[int]], Tuple[int, ...]]] = None
    optional_filter: bool = True  # HDF5 may skip it for a chunk it cannot shrink

    @property
    def spec(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"

    @property
    def usage(self) -> str:
        """How the codec is named on the command line: ``gzip[:0-9]``."""
        if not self.levels:
            return self.name
        return f"{self.name}[:{self.levels.start}-{self.levels.stop - 1}]"

    @property
    def in_worker(self) -> bool:
        """Whether workers can compress chunks for this codec (else HDF5 compresses them)."""
        return self.compressor is not None or self.id == NONE

    def with_level(self, level: int) -> "Codec":
        return dataclasses.replace(self, level=level)

    def compress(self, raw) -> Tuple[bytes, int]:
        """Compress one chunk; returns ``(stored bytes, HDF5 filter mask)``.

        A chunk that lzf cannot shrink is stored raw with the filter skipped (mask 1), as
        HDF5 itself does for an optional filter that fails.
        """
        if self.id == NONE:
            return bytes(raw), 0
        if self.compressor is None:
            raise CompressionError(f"codec {self.spec} cannot compress outside HDF5")
        return self.compressor(raw, self.level)

    def decompress(self, data: bytes, nbytes: int) -> bytes:
        """Invert :meth:`compress` for a chunk of ``nbytes`` uncompressed bytes.

        Never produces (or allocates for) more than ``nbytes``: data that would decompress
        to more, or that claims more than the codec can make of ``len(data)`` bytes, raises
        :class:`ValueError` instead, so a crafted chunk cannot exhaust memory.
        """
        if self.id == NONE:
            return data
        if self.decompressor is None:
            raise CompressionError(f"codec {self.spec} cannot decompress outside HDF5")
        if self.max_ratio is not None and nbytes > len(data) * self.max_ratio + 64:
            raise ValueError(f"{len(data)} stored bytes cannot hold {nbytes} bytes of {self.name} data")
        return self.decompressor(data, nbytes)

    def can_decompress(self) -> bool:
        """Whether :meth:`decompress` works here (its package is installed)."""
        if self.id != NONE and self.decompressor is None:
            return False
        return all(_importable(module) for module in self.needs)

    def require(self) -> None:
        """Raise :class:`CompressionError` with the install hint when a package it needs is missing."""
        for module in ((self.hdf5_needs,) if self.hdf5_needs else ()) + self.needs:
            if not _importable(module):
                raise CompressionError(f"compression {self.spec} needs the {module} package: {self.install}")

    def set_filter(self, dcpl) -> None:
        """Add this codec's filter to an ``h5py.h5p`` dataset-creation property list."""
        import h5py

        if self.filter_id is None:
            return
        if self.hdf5_needs:
            self.require()
            __import__(self.hdf5_needs)  # registers the filter with HDF5
        options = self.filter_options(self.level) if self.filter_options else ()
        flags = h5py.h5z.FLAG_OPTIONAL if self.optional_filter else h5py.h5z.FLAG_MANDATORY
        dcpl.set_filter(self.filter_id, flags, options)


# -- the codecs' functions ------------------------------------------------------------------------


def _lzf_compress(raw, level: Optional[int]) -> Tuple[bytes, int]:
    import lzf

    data = bytes(raw)
    out = lzf.compress(data)
    return (data, 1) if out is None else (out, 0)


def _lzf_decompress(data: bytes, nbytes: int) -> bytes:
    import lzf

    out = lzf.decompress(data, nbytes)
    if out is None or len(out) != nbytes:
        raise ValueError("lzf data does not decompress to the expected size")
    return out


def _gzip_compress(raw, level: Optional[int]) -> Tuple[bytes, int]:
    level = 4 if level is None else level
    n = memoryview(raw).nbytes
    if n >= 1 << 15:
        return zlib.compress(raw, level), 0
    # A window no larger than the data: the same stream for any inflate, without setting up
    # 32 KB of window per call (half the cost for a file of a few hundred bytes).
    deflate = zlib.compressobj(level, zlib.DEFLATED, max(9, (n - 1).bit_length()))
    return deflate.compress(raw) + deflate.flush(), 0


def _gzip_decompress(data: bytes, nbytes: int) -> bytes:
    inflate = zlib.decompressobj()
    out = inflate.decompress(data, nbytes)
    if inflate.unconsumed_tail:
        raise ValueError(f"deflate data decompresses to more than {nbytes} bytes")
    return out


def _zstd_compress(raw, level: Optional[int]) -> Tuple[bytes, int]:
    return _zstd_compressor(level).compress(raw), 0


def _zstd_decompress(data: bytes, nbytes: int) -> bytes:
    import zstandard

    declared = zstandard.frame_content_size(data)
    if declared >= 0 and declared != nbytes:
        raise ValueError(f"zstd frame declares {declared} bytes where {nbytes} were expected")
    return _zstd_decompressor().decompress(data, max_output_size=nbytes)


def _gzip_options(level: Optional[int]) -> Tuple[int, ...]:
    return (4 if level is None else level,)


def _zstd_options(level: Optional[int]) -> Tuple[int, ...]:
    return (3 if level is None else level,)


def _blosc_options(level: Optional[int]) -> Tuple[int, ...]:
    import hdf5plugin

    opts = hdf5plugin.Blosc(cname="lz4", clevel=level or 5, shuffle=hdf5plugin.Blosc.SHUFFLE)
    return tuple(opts.filter_options)


CODECS: Mapping[str, Codec] = types.MappingProxyType({
    "none": Codec("none", NONE),
    # lzf: a 3-byte back-reference copies at most 264 bytes
    "lzf": Codec("lzf", LZF, FILTER_LZF, max_ratio=90.0, needs=("lzf",), install="pip install python-lzf",
                 compressor=_lzf_compress, decompressor=_lzf_decompress),
    # deflate: 258 bytes per 1-bit code, about 1032:1 in practice
    "gzip": Codec("gzip", GZIP, FILTER_DEFLATE, range(0, 10), 4, max_ratio=1040.0,
                  compressor=_gzip_compress, decompressor=_gzip_decompress, filter_options=_gzip_options),
    "zstd": Codec("zstd", ZSTD, FILTER_ZSTD, range(1, 23), 3, needs=("zstandard",), hdf5_needs="hdf5plugin",
                  install=INSTALL_COMPRESS, compressor=_zstd_compress, decompressor=_zstd_decompress,
                  filter_options=_zstd_options),
    "blosc-lz4": Codec("blosc-lz4", BLOSC_LZ4, FILTER_BLOSC, range(0, 10), 5, hdf5_needs="hdf5plugin",
                       install=INSTALL_COMPRESS, filter_options=_blosc_options),
})
"""Every codec by name (read-only). Each entry's ``level`` is its default level."""

_BY_ID: Mapping[int, Codec] = types.MappingProxyType({c.id: c for c in CODECS.values()})
BY_FILTER: Mapping[int, Codec] = types.MappingProxyType(
    {c.filter_id: c for c in CODECS.values() if c.filter_id is not None})
"""Codecs by the HDF5 filter id of their stored chunks."""
KNOWN_IDS = frozenset(_BY_ID)
MAX_RATIO: Mapping[int, float] = types.MappingProxyType(
    {c.id: c.max_ratio for c in CODECS.values() if c.max_ratio is not None})
"""The most one stored byte can decompress to, by codec id; zstd frames declare their size,
which is checked instead."""
AUTO = "auto"
CHOICES = ", ".join([AUTO] + [c.usage for c in CODECS.values()])
"""The compression specs, for help and error texts: ``auto, none, lzf, gzip[:0-9], ...``."""


def parse_compression(spec: str) -> Optional[Codec]:
    """Parse ``auto`` or one of :data:`CODECS`' names, with a level where it takes one.

    Returns ``None`` for ``auto`` (chosen per entry by :func:`choose_codec`). Raises
    :class:`CompressionError` for an unknown spec or a codec whose package is missing.
    """
    name, _, level_text = spec.strip().lower().partition(":")
    if name == AUTO and not level_text:
        return None
    if name not in CODECS:
        raise CompressionError(f"unknown compression {spec!r}: use {' or '.join(CHOICES.rsplit(', ', 1))}")
    codec = CODECS[name]
    if level_text:
        if not level_text.isdigit() or int(level_text) not in codec.levels:
            raise CompressionError(f"compression {spec!r}: {name} takes no such level")
        codec = codec.with_level(int(level_text))
    codec.require()
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


def codec_by_id(codec_id: int, level: Optional[int] = None) -> Codec:
    """The codec recorded in an archive's index under ``codec_id`` (at ``level``, if given)."""
    try:
        codec = _BY_ID[int(codec_id)]
    except KeyError:
        raise CompressionError(f"unknown codec id {codec_id} in archive index") from None
    return codec if level is None or level == codec.level else codec.with_level(level)


def decoder(filter_id: int) -> Optional[Decompress]:
    """The decompressor of chunks stored with one HDF5 filter, or None if none works here."""
    codec = BY_FILTER.get(filter_id)
    if codec is None or not codec.can_decompress():
        return None
    return codec.decompress


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# zstd contexts must not be shared between threads: one set per thread.
_zstd_state = threading.local()


def _zstd_compressor(level: Optional[int]):
    cache: Dict = _zstd_state.__dict__
    key = ("c", level)
    if key not in cache:
        import zstandard

        cache[key] = zstandard.ZstdCompressor(level=level or 3, write_content_size=True)
    return cache[key]


def _zstd_decompressor():
    cache: Dict = _zstd_state.__dict__
    if "d" not in cache:
        import zstandard

        cache["d"] = zstandard.ZstdDecompressor()
    return cache["d"]
