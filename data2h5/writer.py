"""Write archives: one dataset per entry from chunks the workers already compressed.

The writer is the only process touching the HDF5 file, so it must cost almost nothing per
entry: it uses h5py's low-level API with cached property lists and types (about 35 µs per
dataset against ~75 µs through ``create_dataset``) and hands pre-compressed chunks to HDF5
with ``write_direct_chunk``. The output lives under a temporary name beside the target until
it is complete, closed and synced; only then is it renamed into place (see
:mod:`data2h5.partial`). Each entry's location, checksum and source stamp go to the part's
journal at checkpoints, so an interrupted conversion can resume.
"""
from __future__ import annotations

import logging
import ctypes
import os
import sys
import zlib
from pathlib import Path
from array import array
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import h5py
import numpy as np

from . import format as fmt
from .codecs import NONE, Codec, codec_by_id
from .encoding import SINGLE_CHUNK_MAX, Packed, iter_chunk_offsets  # noqa: F401 - SINGLE_CHUNK_MAX: tests size entries by it
from .errors import OutputError

log = logging.getLogger(__name__)

LIBVER = ("v110", "v112")  # readable by HDF5 1.12 and later; linear-time group growth
#: HDF5's metadata cache limit for the file being written. The default (2 MiB of on-disk
#: metadata) holds ~7,000 object headers of new datasets, which take ~5 KB each in memory:
#: ~37 MB that grows with the number of entries until then. Entries are written once, so a
#: small cache costs no speed (measured: same µs per entry at 20,000 and 60,000 entries).
METADATA_CACHE_BYTES = 256 << 10


def check_output(dst: Path, overwrite: bool) -> None:
    """Raise :class:`OutputError` if ``dst`` cannot be written (checked again on opening)."""
    if dst.exists() and not overwrite:
        raise OutputError(f"{dst} already exists; pass --overwrite to replace it")
    if dst.exists() and dst.is_dir():
        raise OutputError(f"{dst} is a folder; name a file such as {dst / 'archive.h5'}")
    if not dst.parent.is_dir():
        raise OutputError(f"the folder of {dst} does not exist; create {dst.parent} first")


def create_part(path: Path) -> h5py.File:
    """Create the HDF5 file an archive is built in (a part file beside the output)."""
    try:
        f = h5py.File(path, "w", libver=LIBVER)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc}; check the folder is writable and has space") from exc
    _limit_metadata_cache(f, METADATA_CACHE_BYTES)
    return f


def publish(f: h5py.File, part: Path, dst: Path) -> None:
    """Close the finished part, make it durable and rename it to ``dst`` in one step, so that
    ``dst`` is either the old file (or nothing) or the complete new archive."""
    f.close()
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, dst)
    try:  # make the rename itself durable
        fd = os.open(dst.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _limit_metadata_cache(f: h5py.File, nbytes: int) -> None:
    config = f.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = nbytes
    config.max_size = nbytes
    config.min_size = min(config.min_size, nbytes // 2)
    f.id.set_mdc_config(config)


class Writeback:
    """Has the kernel start writing each new 32 MiB of a file to disk while the run goes on
    (Linux ``sync_file_range``), so the final fsync waits for the tail only, and dirty pages
    do not pile up on a large conversion. Elsewhere it does nothing."""

    STEP = 32 << 20
    _WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait

    def __init__(self, path: str):
        self._fd: Optional[int] = None
        self._done = 0
        self._pending = 0  # bytes written since the last look at the file's size
        self._call = _sync_file_range()
        if self._call is not None:
            self._fd = os.open(path, os.O_RDONLY)

    def poll(self, written: int) -> None:
        """Note ``written`` more bytes; start writeback once a step's worth has been written."""
        self._pending += written
        if self._fd is None or self._pending < self.STEP:
            return
        self._pending = 0
        size = os.fstat(self._fd).st_size
        if size - self._done >= self.STEP:
            self._call(self._fd, ctypes.c_int64(self._done), ctypes.c_int64(size - self._done), self._WRITE)
            self._done = size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close


def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None


class IndexRow(NamedTuple):
    """One entry's row of a ``files`` index (see :mod:`data2h5.format`)."""

    key: str
    size: int
    crc32: int
    kind: int
    codec: int
    offset: int  # 0: not one block, read through h5py
    stored: int
    dtype: str
    shape: Tuple[int, ...]
    stored_crc32: int
    verbatim: bool


class IndexColumns:
    """The rows of a ``files`` index as they are added, held column by column in typed
    arrays (a few dozen bytes an entry, not a Python object per row)."""

    _NUMERIC = ("size", "crc32", "kind", "codec", "offset", "stored", "stored_crc32", "verbatim")

    def __init__(self) -> None:
        self.keys: List[bytes] = []
        self.dtypes: List[bytes] = []
        self._columns = {name: array("Q") for name in self._NUMERIC}
        self._shapes = array("q")

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, row: IndexRow) -> None:
        self.keys.append(row.key.encode("utf-8"))
        self.dtypes.append(row.dtype.encode())
        for name in self._NUMERIC:
            self._columns[name].append(int(getattr(row, name)))
        dims = list(row.shape[: fmt.MAX_NDIM])
        self._shapes.extend(dims + [-1] * (fmt.MAX_NDIM - len(dims)))
        if len(row.shape) > fmt.MAX_NDIM:
            self._columns["offset"][-1] = 0  # too many dims to describe here: read through h5py

    def columns(self, order: Optional[Sequence[int]] = None) -> dict:
        """The index's datasets by name, rows in ``order`` (positions) when given."""
        n = len(self.keys)
        take = (lambda a: a) if order is None else (lambda a: a[np.asarray(order, dtype=np.int64)])
        width = max((len(k) for k in self.keys), default=1) or 1
        out = {"keys": take(np.array(self.keys, dtype=f"S{width}"))}
        for name in self._NUMERIC:
            if name == "stored_crc32":  # the datasets in the order archives have always had
                out["dtype"] = take(np.array(self.dtypes, dtype=fmt.INDEX_FIELDS["dtype"]))
            values = np.frombuffer(self._columns[name], dtype=np.uint64) if n else np.zeros(0, np.uint64)
            out[name] = take(values.astype(fmt.INDEX_FIELDS[name]))
        shapes = np.frombuffer(self._shapes, dtype=np.int64) if n else np.zeros(0, np.int64)
        out["shape"] = take(shapes.reshape(n, fmt.MAX_NDIM).astype(fmt.INDEX_FIELDS["shape"]))
        return out


class JournalEntry(NamedTuple):
    """What a resume needs to rebuild one ``files`` entry from a part file: its
    :class:`Packed` fields, with where its stored bytes lie in place of the data. ``where``:
    ``(addr, size)`` when contiguous, ``(addr, size, filter mask)`` for one chunk, else
    ``[[chunk offset, addr, size, mask], ...]``. Journaled as a JSON list."""

    key: str
    kind: int
    dtype: str
    shape: Sequence[int]
    codec: int
    chunk_shape: Optional[Sequence[int]]
    where: Any
    size: int
    crc32: int
    nbytes: int
    stored_crc32: int
    mtime_ns: int
    verbatim: bool
    level: Optional[int] = None  # absent from journals written before it was recorded


class FilesWriter:
    """Writes entries of the ``files`` layout and, on :meth:`close`, the index.

    With ``checkpoints`` (:class:`data2h5.partial.Checkpoints`), every entry's location is
    journaled at checkpoints, so that a resume can reuse it.
    """

    def __init__(self, f: h5py.File, checkpoints=None):
        self._f = f
        self._lcpl = h5py.h5p.create(h5py.h5p.LINK_CREATE)
        self._lcpl.set_create_intermediate_group(True)
        self._lcpl.set_char_encoding(h5py.h5t.CSET_UTF8)
        self._dcpls = {}
        self._types = {}
        self._rows = IndexColumns()
        self.bytes_stored = 0
        self._writeback = Writeback(f.filename)
        self._checkpoints = checkpoints
        self._pending: List[JournalEntry] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, p: Packed) -> None:
        """Create the entry's dataset, write its data and remember its index row."""
        codec = codec_by_id(p.codec, p.level)
        dsid = h5py.h5d.create(
            self._f.id, p.key.encode("utf-8"), self._type(p.dtype), h5py.h5s.create_simple(p.shape),
            dcpl=self._dcpl(p.chunk_shape, codec), lcpl=self._lcpl,
        )
        try:
            offset, stored, codec_id, crc = self._write(dsid, p, codec)
            if self._checkpoints is not None:
                self._pending.append(_journal_entry(dsid, p, offset, crc))
        finally:
            dsid.close()
        self.bytes_stored += stored
        self._writeback.poll(stored)
        self._rows.append(IndexRow(key=p.key, size=p.size, crc32=p.crc32, kind=p.kind, codec=codec_id, offset=offset,
                                   stored=stored, dtype=p.dtype, shape=p.shape, stored_crc32=crc,
                                   verbatim=p.verbatim))
        if self._pending and self._checkpoints.due():
            self.checkpoint()

    def skip(self, key: str, reason: str) -> None:
        """A file that could not be read: nothing to record, a resume tries it again."""

    def checkpoint(self) -> None:
        """Journal the entries added since the last checkpoint: from here on a resume can
        reuse them."""
        if self._pending:
            self._checkpoints.write({"entries": self._pending})
            self._pending = []

    def _write(self, dsid, p: Packed, codec: Codec) -> Tuple[int, int, int, int]:
        """Returns ``(offset, stored bytes, codec id, stored CRC-32)`` for the index; offset 0 =
        not one block."""
        if p.chunk_shape is None:
            if p.nbytes:
                buf = np.frombuffer(p.data, dtype=p.dtype).reshape(p.shape)
                dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, buf)
            return (dsid.get_offset() or 0), p.nbytes, NONE, p.stored_crc32
        if isinstance(p.data, np.ndarray):  # HDF5 compresses: checksum what it stored
            dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, p.data)
            dsid.flush()  # out of the chunk cache, so the chunks can be read as stored
            stored = crc = 0
            for offset, _ in iter_chunk_offsets(p.shape, p.chunk_shape):
                _, data = dsid.read_direct_chunk(offset)
                stored += len(data)
                crc = zlib.crc32(data, crc)
            return 0, stored, p.codec, crc
        for offset, data, mask in p.data:
            dsid.write_direct_chunk(offset, data, mask)
        stored = sum(len(d) for _, d, _ in p.data)
        if len(p.data) == 1:
            info = dsid.get_chunk_info(0)
            return info.byte_offset, info.size, (NONE if p.data[0][2] else p.codec), p.stored_crc32
        return 0, stored, p.codec, p.stored_crc32

    def _dcpl(self, chunk: Optional[Tuple[int, ...]], codec: Codec):
        key = (chunk, codec.spec)
        dcpl = self._dcpls.get(key)
        if dcpl is None:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            if chunk is not None:
                dcpl.set_chunk(chunk)
                codec.set_filter(dcpl)
            else:
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_LATE)
            self._dcpls[key] = dcpl
        return dcpl

    def _type(self, dtype: str):
        tid = self._types.get(dtype)
        if tid is None:
            tid = self._types[dtype] = h5py.h5t.py_create(np.dtype(dtype))
        return tid

    def close(self, order: Optional[dict] = None) -> int:
        """Write the index of every entry added, sorted by ``order[key]`` when given (a resume
        adds reused entries first); returns the bytes of entry data stored."""
        positions = None
        if order is not None:
            keys = self._rows.keys
            positions = sorted(range(len(keys)), key=lambda i: order[keys[i].decode("utf-8")])
        write_index(self._f, self._rows.columns(positions))
        self._writeback.close()
        return self.bytes_stored


def _journal_entry(dsid, p: Packed, offset: int, crc: int) -> JournalEntry:
    if p.chunk_shape is None:
        where = (offset, p.nbytes)
    elif offset:  # one chunk, found already
        where = (offset, len(p.data[0][1]), p.data[0][2])
    else:
        infos = (dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks()))
        where = sorted([list(i.chunk_offset), i.byte_offset, i.size, i.filter_mask] for i in infos)
    return JournalEntry(p.key, p.kind, p.dtype, p.shape, p.codec, p.chunk_shape, where, p.size, p.crc32, p.nbytes,
                        crc, p.mtime_ns, p.verbatim, p.level)


def unjournal(entry: JournalEntry, read) -> Optional[Packed]:
    """The :class:`Packed` a journal entry describes, its stored bytes fetched with
    ``read(addr, size)``; None when they are missing or fail their checksum."""
    shape = tuple(entry.shape)
    where = entry.where
    chunk_shape = entry.chunk_shape
    if chunk_shape is None:
        addr, length = where
        data = read(addr, length) if length else b""
        if data is None or zlib.crc32(data) != entry.stored_crc32:
            return None
    else:
        if isinstance(where[0], int):  # one chunk
            addr, length, mask = where
            where = [[[0] * len(shape), addr, length, mask]]
        data, crc = [], 0
        for offset, addr, length, mask in where:
            block = read(addr, length)
            if block is None:
                return None
            crc = zlib.crc32(block, crc)
            data.append((tuple(offset), block, mask))
        if crc != entry.stored_crc32:
            return None
        chunk_shape = tuple(chunk_shape)
    return Packed(key=entry.key, kind=entry.kind, dtype=entry.dtype, shape=shape, codec=entry.codec,
                  chunk_shape=chunk_shape, data=data, size=entry.size, crc32=entry.crc32, nbytes=entry.nbytes,
                  stored_crc32=entry.stored_crc32, mtime_ns=entry.mtime_ns, verbatim=bool(entry.verbatim),
                  level=entry.level)


def create_index_group(f: h5py.File) -> h5py.Group:
    """A new index group that root listings do not show (see :mod:`data2h5.format`): anonymous,
    kept by a hard link to itself, found through the root attribute :data:`fmt.ATTR_INDEX`."""
    group = h5py.Group(h5py.h5g.create(f.id, None))
    group[fmt.INDEX_SELF] = group
    f.attrs[fmt.ATTR_INDEX] = group.ref
    return group


def write_index(f: h5py.File, columns: dict) -> None:
    """Store the index group (see :mod:`data2h5.format`) with ``columns`` by name."""
    group = create_index_group(f)
    n = len(columns["keys"])
    for name, values in columns.items():
        group.create_dataset(name, data=values, compression="gzip" if n else None, chunks=True if n else None)
