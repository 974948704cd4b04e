"""Chunk-level reads of one HDF5 dataset, for the batch reader's worker threads.

A *slab* is every chunk at one position along the sample axis. The loaders here return a
slab sample-first (``load(s)``) or write it into an array (``load_into(s, dst)``):
:class:`RawChunks` reads a chunk's stored bytes with ``os.pread`` at the address HDF5 reports
and decompresses them itself (``pread``, zlib and zstandard release the GIL, so threads
overlap); :class:`H5pyChunks` lets HDF5 decode them (any filter it has a plugin for);
:class:`ContiguousBlocks` reads an uncompressed contiguous dataset in blocks treated as chunks.
"""
from __future__ import annotations

import itertools
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from .codecs import Decompress
from .errors import ArchiveError, CorruptEntryError

CONTIGUOUS_BLOCK = 1 << 20  # contiguous datasets are read in blocks of this size, like chunks


def _decompress_errors() -> tuple:
    """What the codecs raise on damaged data (and nothing else, so bugs are not hidden)."""
    errors = [ValueError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


DECOMPRESS_ERRORS = _decompress_errors()


# -- one stored chunk: read, checksum, decompress ------------------------------------------------


def check_crc(raw, expected: Optional[int]) -> None:
    """Raise :class:`CorruptEntryError` when ``raw``'s CRC-32 is not ``expected`` (None: not recorded)."""
    if expected is not None and zlib.crc32(raw) != int(expected):
        raise CorruptEntryError("checksum of the stored bytes does not match")


def unpack_chunk(raw: bytes, decode: Optional[Decompress], nbytes: int, mask: int = 0) -> bytes:
    """The ``nbytes`` a stored chunk holds: decompressed by ``decode`` (never to more than
    ``nbytes``) unless the filter was skipped for it (``mask`` bit 0) or there is none.

    Raises :class:`CorruptEntryError` whose ``reason`` says what is wrong (the caller names
    where): every reader of stored chunks catches the same errors and says the same thing.
    """
    data = raw
    if decode is not None and not mask & 1:
        try:
            data = decode(raw, nbytes)
        except DECOMPRESS_ERRORS as exc:
            why = f"the stored bytes do not decompress ({type(exc).__name__}: {' '.join(str(exc).split())})"
            raise CorruptEntryError(why) from exc
    if len(data) != nbytes:
        raise CorruptEntryError(f"the stored bytes hold {len(data)} bytes where {nbytes} were expected")
    return data


def read_chunk(fd: int, addr: int, size: int, nbytes: int, decode: Optional[Decompress], *, mask: int = 0,
               crc: Optional[int] = None, where: Callable[[], str]) -> bytes:
    """Read one stored chunk with ``pread``, check its CRC-32 (when ``crc`` is given) and
    decompress it to exactly ``nbytes``. A failed read is an :class:`ArchiveError`; a short
    one, a checksum that differs or data that does not decompress a :class:`CorruptEntryError`
    whose ``reason`` says which."""
    raw = read_checked(fd, size, addr, where)
    try:
        check_crc(raw, crc)
        return unpack_chunk(raw, decode, nbytes, mask)
    except CorruptEntryError as exc:
        raise CorruptEntryError(f"{where()}: {exc.reason}; the archive is damaged", exc.reason) from exc


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Read exactly ``size`` bytes (fewer only at end of file)."""
    data = os.pread(fd, size, offset)
    while 0 < len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def pread_into(fd: int, dst: np.ndarray, offset: int) -> int:
    """Fill the C-contiguous array ``dst`` from ``offset``; returns the bytes read."""
    view = memoryview(dst).cast("B")
    got = 0
    while got < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[got:]], offset + got)
        else:  # macOS before 11: one copy more
            data = os.pread(fd, len(view) - got, offset + got)
            n = len(data)
            view[got : got + n] = data
        if not n:
            break
        got += n
    return got


def read_checked(fd: int, size: int, offset: int, where: Callable[[], str], into: Optional[np.ndarray] = None):
    """``size`` bytes at ``offset`` (as bytes, or into ``into``); a failed read is an
    :class:`ArchiveError` and a short one a :class:`CorruptEntryError`, both naming ``where()``."""
    try:
        got = pread_into(fd, into, offset) if into is not None else pread_exact(fd, size, offset)
    except OSError as exc:
        raise ArchiveError(f"{where()}: read failed: {exc}") from exc
    if (got if into is not None else len(got)) != size:
        missing = size - (got if into is not None else len(got))
        raise CorruptEntryError(f"{where()}: the file ends inside it; the archive is truncated",
                                f"file ends {missing} bytes before the entry does")
    return got


@dataclass
class Field:
    """What the readers need to know about one dataset."""

    path: str
    name: str
    dset: h5py.Dataset
    sample_axis: int

    @property
    def rows(self) -> int:
        return self.dset.shape[self.sample_axis]

    def where(self, lo: int, hi: int) -> str:
        return f"{self.path}: dataset {self.name!r} rows {lo}-{hi - 1}"

    def sample_first(self, arr: np.ndarray) -> np.ndarray:
        return np.moveaxis(arr, self.sample_axis, 0)

    def along(self, sel) -> tuple:
        return (slice(None),) * self.sample_axis + (sel,)




class RawChunks:
    """Slabs of a chunked dataset read by ``pread`` of each chunk and decompressed here."""

    def __init__(self, field: Field, fd: int, decode: Optional[Callable[[bytes, int], bytes]]):
        dset = field.dset
        self.field, self.fd, self.decode = field, fd, decode
        self.dtype, self.shape, self.chunks = dset.dtype, dset.shape, dset.chunks
        self.rows = self.chunks[field.sample_axis]
        self.nbytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self.fill_value = dset.fillvalue
        self.index: Dict[Tuple[int, ...], Tuple[int, int, int]] = {}
        try:
            dset.id.chunk_iter(self._add)
        except (AttributeError, NotImplementedError):  # HDF5 older than 1.14
            for i in range(dset.id.get_num_chunks()):
                self._add(dset.id.get_chunk_info(i))
        end = os.fstat(fd).st_size
        for offset, (_, addr, size) in self.index.items():
            if addr > end or size > end - addr:  # pread would allocate what the header claims
                raise CorruptEntryError(f"{self._where(offset)} lies past the end of the file; the archive is "
                                        "truncated or crafted")
        sa = field.sample_axis
        grids = [range(0, n, c) for d, (n, c) in enumerate(zip(self.shape, self.chunks)) if d != sa]
        self._others = [tuple(int(x) for x in o) for o in itertools.product(*grids)]
        # One chunk spans every non-sample axis (data2h5's own archives): no assembly copy.
        self._whole = all(c >= n for d, (n, c) in enumerate(zip(self.shape, self.chunks)) if d != sa)

    def _add(self, info) -> None:
        self.index[tuple(info.chunk_offset)] = (info.filter_mask, info.byte_offset, info.size)

    def _offset(self, s: int, other: Tuple[int, ...]) -> Tuple[int, ...]:
        sa = self.field.sample_axis
        return other[:sa] + (s * self.rows,) + other[sa:]

    def _where(self, offset: Tuple[int, ...]) -> str:
        sa = self.field.sample_axis
        last = min(offset[sa] + self.rows, self.shape[sa]) - 1
        return f"{self.field.path}: dataset {self.field.name!r} chunk at {offset} (rows {offset[sa]}-{last})"

    def _pread(self, offset: Tuple[int, ...], size: int, addr: int, into=None):
        return read_checked(self.fd, size, addr, lambda: self._where(offset), into)

    def chunk(self, offset: Tuple[int, ...]) -> np.ndarray:
        """One whole chunk, decoded, in file axis order."""
        found = self.index.get(offset)
        if found is None:  # never written: HDF5 returns the fill value
            return np.full(self.chunks, self.fill_value, dtype=self.dtype)
        mask, addr, size = found
        data = read_chunk(self.fd, addr, size, self.nbytes, self.decode, mask=mask, where=lambda: self._where(offset))
        return np.frombuffer(data, dtype=self.dtype).reshape(self.chunks)

    def load(self, s: int) -> np.ndarray:
        sa = self.field.sample_axis
        lo, hi = s * self.rows, min((s + 1) * self.rows, self.shape[sa])
        if self._whole:
            clip = tuple(slice(0, hi - lo) if d == sa else slice(0, n) for d, n in enumerate(self.shape))
            return self.field.sample_first(self.chunk(self._offset(s, self._others[0]))[clip])
        slab_shape = tuple(hi - lo if d == sa else n for d, n in enumerate(self.shape))
        out = np.empty(slab_shape, dtype=self.dtype)
        for other in self._others:
            offset = self._offset(s, other)
            dst = tuple(slice(o - (lo if d == sa else 0), min(o - (lo if d == sa else 0) + c, m))
                        for d, (o, c, m) in enumerate(zip(offset, self.chunks, slab_shape)))
            out[dst] = self.chunk(offset)[tuple(slice(0, x.stop - x.start) for x in dst)]
        return self.field.sample_first(out)

    def load_into(self, s: int, dst: np.ndarray) -> None:
        offset = self._offset(s, self._others[0])
        found = self.index.get(offset)
        stored_raw = found is not None and (self.decode is None or found[0] & 1)
        if self._whole and self.field.sample_axis == 0 and stored_raw and dst.flags.c_contiguous:
            self._pread(offset, dst.nbytes, found[1], into=dst)  # the rows are the chunk's first bytes
        else:
            dst[...] = self.load(s)


class H5pyChunks:
    """Slabs read through h5py: HDF5 decodes the chunks (any filter it has a plugin for)."""

    def __init__(self, field: Field):
        self.field = field
        self.rows = field.dset.chunks[field.sample_axis]

    def _read(self, s: int, into: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        f = self.field
        lo, hi = s * self.rows, min((s + 1) * self.rows, f.rows)
        try:
            if into is None:
                return f.sample_first(f.dset[f.along(slice(lo, hi))])
            f.dset.read_direct(into, np.s_[lo:hi])
        except OSError as exc:
            raise CorruptEntryError(f"{f.where(lo, hi)} cannot be read ({exc}); the archive is damaged") from exc
        return None

    def load(self, s: int) -> np.ndarray:
        return self._read(s)

    def load_into(self, s: int, dst: np.ndarray) -> None:
        if self.field.sample_axis == 0 and dst.flags.c_contiguous and dst.dtype == self.field.dset.dtype:
            self._read(s, into=dst)
        else:
            dst[...] = self._read(s)


class ContiguousBlocks:
    """An uncompressed contiguous dataset read with ``pread``, in blocks of about
    :data:`CONTIGUOUS_BLOCK` bytes treated as chunks (so shuffled reads of small rows do not
    cost one system call each); a run of rows can also be read straight into a batch."""

    def __init__(self, field: Field, fd: int, offset: int):
        dset = field.dset
        self.field, self.fd, self.offset, self.dtype = field, fd, offset, dset.dtype
        self.row_shape = dset.shape[1:]
        self.row_bytes = max(1, int(np.prod(self.row_shape)) * self.dtype.itemsize)
        self.rows = max(1, CONTIGUOUS_BLOCK // self.row_bytes)

    def read(self, lo: int, hi: int, into: Optional[np.ndarray] = None):
        size, offset = (hi - lo) * self.row_bytes, self.offset + lo * self.row_bytes
        return read_checked(self.fd, size, offset, lambda: self.field.where(lo, hi), into)

    def _span(self, s: int) -> Tuple[int, int]:
        return s * self.rows, min((s + 1) * self.rows, self.field.rows)

    def load(self, s: int) -> np.ndarray:
        lo, hi = self._span(s)
        return np.frombuffer(self.read(lo, hi), dtype=self.dtype).reshape((hi - lo, *self.row_shape))

    def load_into(self, s: int, dst: np.ndarray) -> None:
        if dst.flags.c_contiguous and dst.dtype == self.dtype:
            self.read(*self._span(s), into=dst)
        else:
            dst[...] = self.load(s)


def dataset_filters(dset: h5py.Dataset) -> List[int]:
    dcpl = dset.id.get_create_plist()
    return [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]


def require_filters(path: str, name: str, filters: Sequence[int]) -> None:
    """Make sure HDF5 can decode every filter (hdf5plugin registers zstd, blosc... on import)."""
    if all(h5py.h5z.filter_avail(f) for f in filters):
        return
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        pass
    missing = [f for f in filters if not h5py.h5z.filter_avail(f)]
    if missing:
        raise ArchiveError(
            f"{path}: dataset {name!r} needs HDF5 filter(s) {missing} that are not installed: "
            "pip install 'data2h5[compress]' (hdf5plugin)"
        )
