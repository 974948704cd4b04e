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
import math
import os
import sys
import zlib
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Tuple

import h5py
import numpy as np

from . import format as fmt
from .codecs import NONE, Codec, codec_by_id
from .errors import OutputError

log = logging.getLogger(__name__)

#: Arrays up to this size are stored as one chunk; larger ones in chunks of about
#: CHUNK_BYTES so that a slice reads only the chunks it touches.
SINGLE_CHUNK_MAX = 4 << 20
CHUNK_BYTES = 1 << 20
LIBVER = ("v110", "v112")  # readable by HDF5 1.12 and later; linear-time group growth
#: HDF5's metadata cache limit for the file being written. The default (2 MiB of on-disk
#: metadata) holds ~7,000 object headers of new datasets, which take ~5 KB each in memory:
#: ~37 MB that grows with the number of entries until then. Entries are written once, so a
#: small cache costs no speed (measured: same µs per entry at 20,000 and 60,000 entries).
METADATA_CACHE_BYTES = 256 << 10


class Packed(NamedTuple):
    """One entry ready to write, as a worker hands it to the writer."""

    key: str
    kind: int
    dtype: str
    shape: Tuple[int, ...]
    codec: int
    chunk_shape: Optional[Tuple[int, ...]]  # None: contiguous storage, ``data`` is the raw bytes
    data: object  # raw bytes (contiguous) | [(chunk offset, bytes, filter mask)] | ndarray (HDF5 compresses)
    size: int  # source file size
    crc32: int  # source file CRC-32
    nbytes: int  # decoded size
    stored_crc32: int = 0  # CRC-32 of the stored bytes, chunks concatenated in chunk-grid order
    mtime_ns: int = 0  # source file's modification time when read: a resume re-reads it if it changed
    verbatim: bool = False  # a BYTES/TEXT value that is exactly the source file's bytes


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


def chunk_shape_for(shape: Tuple[int, ...], itemsize: int) -> Tuple[int, ...]:
    """One chunk for small arrays; for large ones, halve leading axes until ~CHUNK_BYTES."""
    if math.prod(shape) * itemsize <= SINGLE_CHUNK_MAX:
        return tuple(shape)
    chunk = list(shape)
    axis = 0
    while math.prod(chunk) * itemsize > CHUNK_BYTES and axis < len(chunk):
        if chunk[axis] > 1:
            chunk[axis] = (chunk[axis] + 1) // 2
        else:
            axis += 1
    return tuple(chunk)


def iter_chunk_offsets(shape: Tuple[int, ...], chunk: Tuple[int, ...]) -> Iterator[Tuple[Tuple[int, ...], tuple]]:
    """Yield ``(offset, slices)`` of every chunk of an array, in row-major chunk-grid order:
    the order in which an entry's stored checksum runs over its chunks."""
    grid = [range(0, n, c) for n, c in zip(shape, chunk)]
    for cell in np.ndindex(*[len(g) for g in grid]):
        start = tuple(g[i] for g, i in zip(grid, cell))
        yield start, tuple(slice(s, s + c) for s, c in zip(start, chunk))


def iter_chunks(arr: np.ndarray, chunk: Tuple[int, ...]) -> Iterator[Tuple[Tuple[int, ...], np.ndarray]]:
    """Yield ``(offset, chunk data)``; edge chunks are zero-padded to the full chunk shape, as
    HDF5 stores them."""
    for start, where in iter_chunk_offsets(arr.shape, chunk):
        block = arr[where]
        if block.shape != chunk:
            padded = np.zeros(chunk, dtype=arr.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        yield start, np.ascontiguousarray(block)


def pack(key: str, kind: int, arr: np.ndarray, codec: Codec, size: int, crc32: int, mtime_ns: int = 0) -> Packed:
    """Prepare ``arr`` for the writer, compressing its chunks here (in the worker)."""
    dtype = arr.dtype.str
    shape = tuple(arr.shape)
    if codec.id == NONE or arr.nbytes == 0 or arr.ndim == 0:
        raw = arr.tobytes()
        return Packed(key, kind, dtype, shape, NONE, None, raw, size, crc32, arr.nbytes, zlib.crc32(raw), mtime_ns)
    chunk = chunk_shape_for(shape, arr.itemsize)
    if not codec.in_worker:
        return Packed(key, kind, dtype, shape, codec.id, chunk, arr, size, crc32, arr.nbytes, 0, mtime_ns)
    chunks = [(offset, *codec.compress(block.data)) for offset, block in iter_chunks(arr, chunk)]
    stored_crc = 0
    for _, data, _ in chunks:
        stored_crc = zlib.crc32(data, stored_crc)
    return Packed(key, kind, dtype, shape, codec.id, chunk, chunks, size, crc32, arr.nbytes, stored_crc, mtime_ns)


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


class FilesWriter:
    """Writes entries of the ``files`` layout and, on :meth:`close`, the index.

    With ``checkpoints`` (:class:`data2h5.partial.Checkpoints`), every entry's location is
    journaled at checkpoints, so that a resume can reuse it.
    """

    def __init__(self, f: h5py.File, codec: Optional[Codec] = None, checkpoints=None):
        self._f = f
        self._codec = codec  # the user's choice, with its level (a Packed carries only the id)
        self._lcpl = h5py.h5p.create(h5py.h5p.LINK_CREATE)
        self._lcpl.set_create_intermediate_group(True)
        self._lcpl.set_char_encoding(h5py.h5t.CSET_UTF8)
        self._dcpls = {}
        self._types = {}
        self._rows: List[tuple] = []
        self.bytes_stored = 0
        self._writeback = Writeback(f.filename)
        self._checkpoints = checkpoints
        self._pending: List[tuple] = []

    def add(self, p: Packed) -> None:
        """Create the entry's dataset, write its data and remember its index row."""
        codec = self._codec if self._codec is not None and self._codec.id == p.codec else codec_by_id(p.codec)
        dsid = h5py.h5d.create(
            self._f.id, p.key.encode("utf-8"), self._type(p.dtype), h5py.h5s.create_simple(p.shape),
            dcpl=self._dcpl(p.chunk_shape, codec), lcpl=self._lcpl,
        )
        try:
            offset, stored, codec_id, crc = self._write(dsid, p, codec)
            if self._checkpoints is not None:
                self._pending.append(_journal_row(dsid, p, offset, crc))
        finally:
            dsid.close()
        self.bytes_stored += stored
        self._writeback.poll(stored)
        self._rows.append((p.key, p.size, p.crc32, p.kind, codec_id, offset, stored, p.dtype, p.shape, crc, p.verbatim))
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
        if order is not None:
            self._rows.sort(key=lambda row: order[row[0]])
        write_index(self._f, self._rows)
        self._writeback.close()
        return self.bytes_stored


def _journal_row(dsid, p: Packed, offset: int, crc: int) -> tuple:
    """What a resume needs to rebuild the entry from the part file: its :class:`Packed`
    fields, with where its stored bytes lie in place of the data: ``(addr, size)`` when
    contiguous, ``(addr, size, filter mask)`` for one chunk, else ``[[chunk offset, addr,
    size, mask], ...]`` (a tuple per entry: this runs for every entry written)."""
    if p.chunk_shape is None:
        where = (offset, p.nbytes)
    elif offset:  # one chunk, found already
        where = (offset, len(p.data[0][1]), p.data[0][2])
    else:
        infos = (dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks()))
        where = sorted([list(i.chunk_offset), i.byte_offset, i.size, i.filter_mask] for i in infos)
    return (p.key, p.kind, p.dtype, p.shape, p.codec, p.chunk_shape, where, p.size, p.crc32, p.nbytes, crc,
            p.mtime_ns, p.verbatim)


def unjournal_row(row: list, read) -> Optional[Packed]:
    """The :class:`Packed` a journal row describes, its stored bytes fetched with
    ``read(addr, size)``; None when they are missing or fail their checksum."""
    key, kind, dtype, shape, codec, chunk_shape, where, size, crc32, nbytes, stored_crc, mtime_ns, verbatim = row
    shape = tuple(shape)
    if chunk_shape is None:
        addr, length = where
        data = read(addr, length) if length else b""
        if data is None or zlib.crc32(data) != stored_crc:
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
        if crc != stored_crc:
            return None
        chunk_shape = tuple(chunk_shape)
    return Packed(key, kind, dtype, shape, codec, chunk_shape, data, size, crc32, nbytes, stored_crc, mtime_ns,
                  bool(verbatim))


def create_index_group(f: h5py.File) -> h5py.Group:
    """A new index group that root listings do not show (see :mod:`data2h5.format`): anonymous,
    kept by a hard link to itself, found through the root attribute :data:`fmt.ATTR_INDEX`."""
    group = h5py.Group(h5py.h5g.create(f.id, None))
    group[fmt.INDEX_SELF] = group
    f.attrs[fmt.ATTR_INDEX] = group.ref
    return group


def write_index(f: h5py.File, rows: List[tuple]) -> None:
    """Store the index group (see :mod:`data2h5.format`) for ``rows`` of
    ``(key, size, crc32, kind, codec, offset, stored, dtype, shape, stored_crc32, verbatim)``."""
    group = create_index_group(f)
    n = len(rows)
    keys = [r[0].encode("utf-8") for r in rows]
    width = max((len(k) for k in keys), default=1) or 1
    columns = {
        "keys": np.array(keys, dtype=f"S{width}"),
        "size": np.fromiter((r[1] for r in rows), fmt.INDEX_FIELDS["size"], n),
        "crc32": np.fromiter((r[2] for r in rows), fmt.INDEX_FIELDS["crc32"], n),
        "kind": np.fromiter((r[3] for r in rows), fmt.INDEX_FIELDS["kind"], n),
        "codec": np.fromiter((r[4] for r in rows), fmt.INDEX_FIELDS["codec"], n),
        "offset": np.fromiter((r[5] for r in rows), fmt.INDEX_FIELDS["offset"], n),
        "stored": np.fromiter((r[6] for r in rows), fmt.INDEX_FIELDS["stored"], n),
        "dtype": np.array([r[7].encode() for r in rows], dtype=fmt.INDEX_FIELDS["dtype"]),
        "stored_crc32": np.fromiter((r[9] for r in rows), fmt.INDEX_FIELDS["stored_crc32"], n),
        "verbatim": np.fromiter((r[10] for r in rows), fmt.INDEX_FIELDS["verbatim"], n),
    }
    shape = np.full((n, fmt.MAX_NDIM), -1, dtype=fmt.INDEX_FIELDS["shape"])
    for i, r in enumerate(rows):
        dims = r[8][: fmt.MAX_NDIM]
        shape[i, : len(dims)] = dims
        if len(r[8]) > fmt.MAX_NDIM:
            columns["offset"][i] = 0  # too many dims to describe here: read through h5py
    columns["shape"] = shape
    for name, values in columns.items():
        group.create_dataset(name, data=values, compression="gzip" if n else None, chunks=True if n else None)
