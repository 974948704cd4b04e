"""The ``stacked`` layout: every sample in one N-D array, readable by data2h5 and by h5torch.

When every source decodes to one shape and dtype, :class:`StackedWriter` stores them as rows
of one chunked dataset and writes, aligned on axis 0::

    /data                 real   (N, *shape) sample dtype, chunked (k, *shape), codec filter
    /labels               real   (N,) int64: index into /classes of each key's class
    /keys                 real   (N,) S<n>: each key, UTF-8, gzip
    /classes              real   (C,) S<n>: sorted class names, UTF-8, gzip
    /__data2h5__/keys     soft link -> /keys
    /__data2h5__/size     real   (N,) uint64: source file sizes
    /__data2h5__/crc32    real   (N,) uint32: source file CRC-32s
    /__data2h5__/chunk_crc32 real (C,) uint32: CRC-32 of each chunk of /data as stored
    /central              soft link -> /data      (h5torch's central object)
    /0/labels             soft link -> /labels    (h5torch's objects aligned to axis 0)
    /0/keys               soft link -> /keys
    /unstructured/classes soft link -> /classes

``data``, ``labels``, ``keys`` and ``classes`` carry h5torch's attributes (``mode`` "N-D",
``shape``, ``dtypes`` [save, load], ``filled_to``), so ``h5torch.Dataset(path)`` yields
``{"central": data[i], "0/labels": labels[i], "0/keys": keys[i]}``; h5torch only inspects
``central`` and the digit-named groups, so the other root members do not disturb it.

A key's class is its first path component (``cat/x/1.png`` → ``cat``); files directly in the
source folder have the class :data:`ROOT_CLASS` (``"."``, a name no folder can have).
"""
from __future__ import annotations

import functools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import math
import zlib
from typing import Deque, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import h5py
import numpy as np

from .. import safety
from ..chunks import check_crc
from ..codecs import Codec, choose_codec
from ..display import one_line
from ..encoding import Packed
from ..errors import ArchiveError, CorruptEntryError, LayoutError
from ..format import (
    CHUNK_CRC32,
    INDEX_FIELDS,
    LAYOUT_STACKED,
    MAX_NDIM,
    ROOT_CLASS,  # noqa: F401 - part of this layout's description
    STACKED_CLASSES,
    STACKED_DATA,
    STACKED_KEYS,
    STACKED_LABELS,
    Kind,
    class_of,
)
from ..archive import Index, open_h5, blank_index, check_labels, create_index_group, decode_keys, index_field, read_keys
from ..partial import BlockReader, InterruptedRun, unchanged
from ..resume import Reused
from ..walk import SourceFile
from . import Checker, Layout, VerifyTask

log = logging.getLogger(__name__)

H5TORCH_CENTRAL = "central"
H5TORCH_AXIS0 = "0"
H5TORCH_UNSTRUCTURED = "unstructured"
LABEL_DTYPE = np.dtype("<i8")  # what torch's cross-entropy wants, without a cast

_REMEDY = "use --layout files, or a reader plugin that gives every sample one shape and dtype (e.g. plugins/resize_gray.py)"


class RowRecord(NamedTuple):
    """One row of a chunk, as journaled: what a resume checks its source against."""

    key: str
    size: int
    crc32: int
    mtime_ns: int


class ChunkRecord(NamedTuple):
    """Where one chunk of ``data`` lies in a part file, as journaled."""

    start: int  # its first row
    addr: int
    size: int
    mask: int  # HDF5 filter mask
    crc: int  # CRC-32 of its stored bytes


class _InFlight(NamedTuple):
    start: int
    rows: List[RowRecord]
    skipped: list
    future: object  # result(): (stored bytes, filter mask)


MAX_IN_FLIGHT = 8  # chunks being compressed at once; past it the writer waits for the oldest


class StackedWriter:
    """Write samples of one shape and dtype as rows of ``/data`` in an open, writable file.

    ``n`` is an upper bound on the rows (skipped sources make it fewer; :meth:`close` trims).
    ``codec`` None means ``auto`` (lzf for arrays). Rows are buffered and written one chunk
    of about ``chunk_bytes`` at a time, compressed here and handed to HDF5 as stored, so that
    each chunk's checksum (``chunk_crc32``) is taken on exactly the bytes in the file.
    """

    def __init__(self, f: h5py.File, n: int, codec: Optional[Codec], chunk_bytes: int = 1 << 20,
                 checkpoints=None, compress=None):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.f = f
        self.n = n
        self.codec = choose_codec(codec, Kind.ARRAY, "")
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.keys: List[str] = []
        self.sizes: List[int] = []
        self.crcs: List[int] = []
        self.chunk_crcs: List[int] = []
        self.mtimes: List[int] = []
        self._checkpoints = checkpoints  # a data2h5.partial.Checkpoints, to journal each chunk
        self._pending: dict = {}
        self._skipped: List[list] = []  # since the last chunk: journaled with the next one
        self._dset: Optional[h5py.Dataset] = None
        self._buf: Optional[np.ndarray] = None
        self._fill = 0  # rows in the buffer
        self._written = 0  # rows already written to the dataset
        self._closed = False
        self._compress = compress  # has the conversion's workers compress a chunk (None: a thread here)
        self._thread: Optional[ThreadPoolExecutor] = None  # compresses chunks off the writer's thread
        self._inflight: Deque[_InFlight] = deque()  # chunks being compressed, in row order

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, value, size: int, crc32: int, kind: Kind = Kind.ARRAY, mtime_ns: int = 0) -> None:
        """Append one sample. Raises :class:`LayoutError` if it is not a decoded numeric array,
        or if its shape or dtype differs from the first sample's."""
        if self._closed:
            raise RuntimeError("StackedWriter is closed")
        arr = self._check(key, value, kind)
        if self._dset is None:
            self._create(arr)
        elif arr.shape != self._buf.shape[1:] or arr.dtype != self._buf.dtype:
            first = self.keys[0]
            raise LayoutError(
                f"{key}: shape {arr.shape} {arr.dtype} differs from {first}: shape "
                f"{self._buf.shape[1:]} {self._buf.dtype}; the stacked layout needs one shape "
                f"and dtype for all samples: {_REMEDY}"
            )
        self._buf[self._fill] = arr
        self._fill += 1
        self.keys.append(key)
        self.sizes.append(int(size))
        self.crcs.append(int(crc32))
        self.mtimes.append(int(mtime_ns))
        if self._fill == len(self._buf):
            self._flush()
        if self._pending and self._checkpoints.due():
            self.checkpoint()

    def skip(self, key: str, reason: str) -> None:
        """A file that could not be read: journaled with the next chunk, so that a resume
        reusing that chunk knows the file was skipped, and why."""
        self._skipped.append([key, reason])

    def checkpoint(self) -> None:
        """Journal every full chunk since the last checkpoint, with its rows (waiting for
        those still being compressed)."""
        self._write_ready(keep=0)
        if self._pending:
            self._checkpoints.write(self._pending)
            self._pending = {}

    def start(self, dtype: str, shape: Sequence[int], rows: int) -> None:
        """Create ``/data`` for samples of ``shape`` and ``dtype``, ``rows`` to a chunk (a resume
        keeps the first run's chunking, so that its chunks can be reused as they are)."""
        self._create(np.empty(tuple(shape), dtype=np.dtype(dtype)), rows)

    def put_chunk(self, data: bytes, mask: int, crc: int, rows: Sequence[list], skipped: Sequence[list]) -> None:
        """Append a chunk as stored by an earlier run: ``rows`` of ``[key, size, crc32, mtime_ns]``."""
        self._write_ready(keep=0)
        start = self._written
        self._dset.id.write_direct_chunk((start,) + (0,) * (self._buf.ndim - 1), data, mask)
        self._record_chunk(start, data, mask, crc, rows, skipped)
        for key, size, crc32, mtime_ns in map(RowRecord._make, rows):
            self.keys.append(key)
            self.sizes.append(size)
            self.crcs.append(crc32)
            self.mtimes.append(mtime_ns)
        self._written += len(rows)

    def _record_chunk(self, start: int, data: bytes, mask: int, crc: int, rows, skipped) -> None:
        self.chunk_crcs.append(crc)
        if self._checkpoints is None:
            return
        addr = self._dset.id.get_chunk_info_by_coord((start,) + (0,) * (self._buf.ndim - 1)).byte_offset
        if not self._pending:
            self._pending = {"stacked": self._layout(), "chunks": []}
        self._pending["chunks"].append([ChunkRecord(start, addr, len(data), mask, crc), rows, skipped])

    def close(self) -> int:
        """Write the buffered rows, trim ``/data`` to the rows written, then write labels,
        classes, keys, the index and the h5torch links. Returns the bytes ``/data`` stores."""
        if self._closed:
            raise RuntimeError("StackedWriter is already closed")
        self._closed = True
        if self._dset is None:  # nothing was added: an empty, still valid archive
            self._dset = self.f.create_dataset(STACKED_DATA, shape=(0,), dtype="u1", maxshape=(None,), chunks=(1,))
        else:
            self._flush()
            self._write_ready(keep=0)
            self._dset.resize(len(self.keys), axis=0)
        if self._thread is not None:
            self._thread.shutdown()
        count = len(self.keys)
        classes = sorted({class_of(k) for k in self.keys})
        lookup = {name: i for i, name in enumerate(classes)}
        labels = np.fromiter((lookup[class_of(k)] for k in self.keys), dtype=LABEL_DTYPE, count=count)

        f = self.f
        _h5torch_attrs(self._dset)
        _h5torch_attrs(_write_1d(f, STACKED_LABELS, labels))
        _h5torch_attrs(_write_1d(f, STACKED_KEYS, _utf8_array(self.keys)))
        _h5torch_attrs(_write_1d(f, STACKED_CLASSES, _utf8_array(classes)))
        index = create_index_group(f)
        index[STACKED_KEYS] = h5py.SoftLink(f"/{STACKED_KEYS}")
        _write_1d(index, "size", np.asarray(self.sizes, dtype="<u8"))
        _write_1d(index, "crc32", np.asarray(self.crcs, dtype="<u4"))
        _write_1d(index, CHUNK_CRC32, np.asarray(self.chunk_crcs, dtype="<u4"))
        f[H5TORCH_CENTRAL] = h5py.SoftLink(f"/{STACKED_DATA}")
        axis0 = f.require_group(H5TORCH_AXIS0)
        axis0[STACKED_LABELS] = h5py.SoftLink(f"/{STACKED_LABELS}")
        axis0[STACKED_KEYS] = h5py.SoftLink(f"/{STACKED_KEYS}")
        f.require_group(H5TORCH_UNSTRUCTURED)[STACKED_CLASSES] = h5py.SoftLink(f"/{STACKED_CLASSES}")

        stored = self._dset.id.get_storage_size()
        log.debug("stacked %d samples of %s %s in %d classes: %d bytes stored", count,
                  self._dset.shape[1:], self._dset.dtype, len(classes), stored)
        return stored

    def _check(self, key: str, value, kind: Kind) -> np.ndarray:
        if isinstance(value, (bytes, bytearray, memoryview, str)) or kind != Kind.ARRAY:
            what = "text" if isinstance(value, str) or kind == Kind.TEXT else "raw bytes"
            raise LayoutError(
                f"{key}: the reader gave {what}, not a decoded array; the stacked layout stores "
                "decoded arrays only: use --layout files, or a reader that decodes this file type"
            )
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc":
            raise LayoutError(f"{key}: dtype {arr.dtype} cannot be stacked, only numeric arrays: {_REMEDY}")
        return arr

    def _layout(self) -> list:
        return [self._buf.dtype.str, list(self._buf.shape[1:]), len(self._buf)]

    def _create(self, arr: np.ndarray, rows: Optional[int] = None) -> None:
        if rows is None:
            rows = max(1, self.chunk_bytes // max(1, arr.nbytes))
            rows = min(rows, max(1, self.n))
        chunks = (rows, *arr.shape)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        self.codec.set_filter(dcpl)  # h5py sets the chunk shape on it, then adds no filter
        self._dset = self.f.create_dataset(
            STACKED_DATA, shape=(self.n, *arr.shape), dtype=arr.dtype, maxshape=(None, *arr.shape),
            chunks=chunks, dcpl=dcpl,
        )
        self._buf = np.empty(chunks, dtype=arr.dtype)
        log.debug("stacking %s %s, %d rows per chunk, codec %s", arr.shape, arr.dtype, rows, self.codec.spec)

    def _flush(self) -> None:
        if not self._fill:
            return
        start, stop = self._written, self._written + self._fill
        if stop > self._dset.shape[0]:  # more rows than n promised: grow rather than fail
            self._dset.resize(stop, axis=0)
        if self._fill < len(self._buf):  # HDF5 stores whole chunks: make the tail deterministic
            self._buf[self._fill :] = 0
        rows = [RowRecord(self.keys[i], self.sizes[i], self.crcs[i], self.mtimes[i]) for i in range(start, stop)]
        skipped, self._skipped = self._skipped, []
        self._written, self._fill = stop, 0
        if not self.codec.in_worker:  # HDF5 compresses; read back what it stored
            offset = (start,) + (0,) * (self._buf.ndim - 1)
            self._dset[start:stop] = self._buf[: stop - start]
            self._dset.id.flush()
            mask, data = self._dset.id.read_direct_chunk(offset)
            self._record_chunk(start, data, mask, zlib.crc32(data), rows, skipped)
            return
        # Compressed elsewhere (the conversion's workers, or a thread) while the next chunks
        # fill; written in row order as they come back.
        full, self._buf = self._buf, np.empty_like(self._buf)
        future = self._compress(self.codec, full) if self._compress is not None else None
        if future is None:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="data2h5-stacked")
            future = self._thread.submit(self.codec.compress, full.data)
        self._inflight.append(_InFlight(start, rows, skipped, future))
        self._write_ready(keep=MAX_IN_FLIGHT)

    def _write_ready(self, keep: Optional[int] = None) -> None:
        """Write the chunks whose compression is done, in row order, waiting for the oldest
        while more than ``keep`` are in flight (None: never wait)."""
        while self._inflight and ((keep is not None and len(self._inflight) > keep)
                                  or self._inflight[0].future.done()):
            start, rows, skipped, future = self._inflight.popleft()
            data, mask = future.result()
            self._dset.id.write_direct_chunk((start,) + (0,) * (self._buf.ndim - 1), data, mask)
            self._record_chunk(start, data, mask, zlib.crc32(data), rows, skipped)


def _utf8_array(texts: Sequence[str]) -> np.ndarray:
    encoded = [t.encode("utf-8") for t in texts]
    width = max([1, *map(len, encoded)])
    return np.array(encoded, dtype=f"S{width}")


def _write_1d(group: h5py.Group, name: str, values: np.ndarray) -> h5py.Dataset:
    """A gzip-compressed 1-D dataset (shuffled for numbers, which then compress far better)."""
    if not len(values):
        return group.create_dataset(name, shape=(0,), dtype=values.dtype, maxshape=(None,), chunks=(1,))
    return group.create_dataset(name, data=values, compression="gzip", shuffle=values.dtype.kind != "S")


def _h5torch_attrs(dset: h5py.Dataset) -> None:
    """The attributes h5torch reads from an ``N-D`` object: its mode, shape, dtypes, fill."""
    dset.attrs["mode"] = "N-D"
    dset.attrs["shape"] = np.asarray(dset.shape, dtype=np.int64)
    dset.attrs["dtypes"] = [str(dset.dtype)] * 2
    dset.attrs["filled_to"] = dset.shape[0]


def _read_index(f: h5py.File, attrs: dict, limit: int) -> Index:
    path = f.filename
    data = safety.open_dataset(f, STACKED_DATA)
    if data.ndim == 0:
        raise ArchiveError(f"{path}: dataset {STACKED_DATA!r} is a scalar, not rows of samples")
    safety.check_chunks(data, limit, path, STACKED_DATA)
    n = len(data)
    group = safety.open_index_group(f)
    if group is not None and STACKED_KEYS in group:
        keys_dset = safety.open_child(f, group, STACKED_KEYS)
    else:
        keys_dset = safety.open_dataset(f, STACKED_KEYS) if safety.has(f, STACKED_KEYS) else None
    keys = decode_keys(read_keys(f, keys_dset, "keys", limit)) if keys_dset else [str(i) for i in range(n)]
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} samples")
    index = blank_index(path, LAYOUT_STACKED, keys, attrs)
    if group is not None:
        for name in ("size", "crc32"):
            if name in group:
                column = index_field(f, group, name, limit, INDEX_FIELDS[name])
                if len(column) != n:
                    raise ValueError(f"index field {name!r} has {len(column)} rows for {n} samples")
                getattr(index, name)[:] = column
    index.dtype[:] = safety.safe_dtype(data.dtype.str, path, f"dataset {STACKED_DATA!r}").str.encode()
    row_shape = data.shape[1:]
    if len(row_shape) > MAX_NDIM:
        raise ArchiveError(f"{path}: dataset {STACKED_DATA!r} has {data.ndim} axes, more than data2h5 reads")
    index.shape[:, : len(row_shape)] = row_shape
    # Contiguous, unfiltered data: each row is one block at a computable offset.
    base = data.id.get_offset()
    if base is not None and n:
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * data.dtype.itemsize
        index.offset[:] = base + np.arange(n, dtype=np.uint64) * np.uint64(row_bytes)
        index.stored[:] = row_bytes
    if safety.has(f, STACKED_CLASSES):
        index.classes = decode_keys(read_keys(f, safety.open_dataset(f, STACKED_CLASSES), STACKED_CLASSES,
                                                limit))
    if safety.has(f, STACKED_LABELS):
        labels = safety.read_small(safety.open_dataset(f, STACKED_LABELS), limit, path, STACKED_LABELS)
        index.labels = check_labels(labels, n, index.classes, path)
    return index


UNCHUNKED_BLOCK = 16 << 20  # an unchunked stacked ``data`` is read in blocks of about this size


def block_rows(data: h5py.Dataset) -> int:
    """Rows of a stacked archive's ``data`` read together: a chunk's, or for unchunked data,
    the rows in :data:`UNCHUNKED_BLOCK` bytes (never the whole dataset at once)."""
    if data.chunks:
        return data.chunks[0]
    row_bytes = int(np.prod(data.shape[1:], dtype=np.float64)) * data.dtype.itemsize
    return max(1, UNCHUNKED_BLOCK // max(1, row_bytes))


def read_stacked_chunk(data: h5py.Dataset, crcs: Optional[np.ndarray], i: int) -> np.ndarray:
    """Rows of chunk ``i`` of a stacked archive's ``data``, decoded; its stored bytes are first
    checked against ``crcs[i]`` when the archive records them. Raises
    :class:`CorruptEntryError` (without naming keys: the caller knows the rows)."""
    rows = block_rows(data)
    lo, hi = i * rows, min(len(data), (i + 1) * rows)
    try:
        if crcs is not None:
            _, raw = data.id.read_direct_chunk((lo,) + (0,) * (data.ndim - 1))
            try:
                check_crc(raw, crcs[i])
            except CorruptEntryError:
                raise CorruptEntryError(f"checksum of the stored chunk of rows {lo}-{hi - 1} does not match") from None
        return data[lo:hi]
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CorruptEntryError(f"chunk of rows {lo}-{hi - 1} cannot be read: {one_line(exc)}") from exc


def stacked_chunks(f: h5py.File, limit: int = safety.MAX_ENTRY_BYTES
                   ) -> Tuple[h5py.Dataset, int, Optional[np.ndarray], Optional[str]]:
    """``(data, chunk count, chunk CRC-32s or None, problem or None)`` of an open stacked
    archive; the problem says why recorded checksums cannot be used."""
    data = safety.open_dataset(f, STACKED_DATA)
    safety.check_chunks(data, limit, f.filename, STACKED_DATA)
    rows = block_rows(data)
    count = math.ceil(len(data) / rows)
    group = safety.open_index_group(f)
    if group is None or CHUNK_CRC32 not in group:
        return data, count, None, None  # written before chunks had checksums
    at = f"index/{CHUNK_CRC32}"
    crcs = safety.read_small(safety.open_child(f, group, CHUNK_CRC32), limit, f.filename, at)
    if crcs.ndim != 1 or crcs.dtype.kind not in "ui":
        return data, count, None, f"the index's chunk checksums are {crcs.dtype} {crcs.shape}, not one per chunk"
    if len(crcs) != count or data.chunks is None:
        return data, count, None, f"the index records {len(crcs)} chunk checksums for {count} chunks of data"
    return data, count, crcs, None


def _reuse_chunks(previous: InterruptedRun, files: List[SourceFile], writer: "StackedWriter", blocks: BlockReader,
                  reused: Reused) -> List[SourceFile]:
    """Stacked: reuse the longest run of chunks whose rows are still the first files, in
    order and unchanged (rows are positional, so reuse stops at the first difference)."""
    chunking, chunks = journaled_chunks(previous)
    if chunking is None:
        return files
    dtype, shape, rows_per_chunk = chunking
    writer.start(dtype, shape, rows_per_chunk)
    pos = 0
    for gen, chunk, rows, skipped in chunks:
        start, addr, size, mask, crc = ChunkRecord(*chunk)
        rows = [RowRecord(*r) for r in rows]
        end = _match_rows(files, pos, rows, skipped)
        if start != len(writer) or end is None:
            break
        if len(rows) < rows_per_chunk and end != len(files):  # a last, partial chunk: only at the end
            break
        data = blocks.read(gen, addr, size)
        if data is None or zlib.crc32(data) != crc:
            log.info("chunk at row %d of the interrupted run does not check out; reading from there again", start)
            break
        writer.put_chunk(data, mask, crc, rows, skipped)
        reused.skipped.extend((key, reason) for key, reason in skipped)
        reused.entries += len(rows)
        reused.bytes_in += sum(r.size for r in rows)
        reused.bytes_decoded += len(rows) * int(np.prod(shape)) * np.dtype(dtype).itemsize
        pos = end
    return files[pos:]


def journaled_chunks(run: InterruptedRun) -> Tuple[Optional[list], List[Tuple[int, list, list, list]]]:
    """``(chunking, chunks)`` of the generation that journaled the longest run of chunks:
    chunking is ``[dtype, sample shape, rows per chunk]`` (None: no chunk journaled), each
    chunk ``(generation, ChunkRecord fields, rows, skipped)``, in row order."""
    best: Tuple[Optional[list], List[Tuple[int, list, list, list]]] = (None, [])
    for gen, records in run.generations:
        chunking, chunks = None, []
        for record in records:
            if "stacked" in record:
                chunking = record["stacked"]
            for chunk, rows, skipped in record.get("chunks", ()):
                chunks.append((gen, chunk, rows, skipped))
        if chunking is not None and len(chunks) > len(best[1]):
            best = (chunking, chunks)
    return best


def _match_rows(files: List[SourceFile], pos: int, rows: List[RowRecord], skipped: list) -> Optional[int]:
    """Where ``files[pos:]`` ends after the chunk's rows and skipped files (interleaved in walk
    order), or None if they are not the next files or a row's source changed."""
    want_rows = {r.key: r for r in rows}
    want_skipped = {key for key, _ in skipped}
    left = len(rows) + len(skipped)
    while left:
        if pos >= len(files):
            return None
        src = files[pos]
        row = want_rows.get(src.key)
        if row is not None:
            if not unchanged(src.path, row.size, row.mtime_ns):
                return None
        elif src.key not in want_skipped:
            return None
        pos += 1
        left -= 1
    return pos


class StackedEntries:
    """A :class:`StackedWriter` behind the writer protocol of every layout (one entry at a time)."""

    def __init__(self, rows: StackedWriter):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, item: Packed) -> None:
        value = item.data
        if isinstance(value, np.ndarray) and (value.dtype.str != item.dtype or value.shape != tuple(item.shape)):
            value = value.view(np.dtype(item.dtype)).reshape(item.shape)  # its bytes, from a shared slot
        # the stacked writer refuses what is not a decoded array, naming the remedy
        self.rows.add(item.key, value, item.size, item.crc32, Kind(item.kind), item.mtime_ns)

    def skip(self, key: str, reason: str) -> None:
        self.rows.skip(key, reason)

    def checkpoint(self) -> None:
        self.rows.checkpoint()

    def close(self, order: Optional[dict] = None) -> int:
        """Rows stay in the order they were added (a resume reuses a prefix of them)."""
        return self.rows.close()


class StackedLayout(Layout):
    """Every sample a row of one array; its chunks are checked and read whole."""

    name = LAYOUT_STACKED
    packed_by_workers = False
    entry_datasets = False

    def read_index(self, f: h5py.File, attrs: dict, limit: int) -> Index:
        return _read_index(f, attrs, limit)

    def open_writer(self, f: h5py.File, *, entries: int, codec: Optional[Codec], checkpoints=None,
                    compress=None) -> StackedEntries:
        return StackedEntries(StackedWriter(f, entries, codec, checkpoints=checkpoints, compress=compress))

    def reuse(self, run: InterruptedRun, files: List[SourceFile], writer: StackedEntries, blocks: BlockReader,
              reused: Reused) -> List[SourceFile]:
        return _reuse_chunks(run, files, writer.rows, blocks, reused)


    def kept(self, run: InterruptedRun) -> int:
        return sum(len(rows) for _, _, rows, _ in journaled_chunks(run)[1])

    def read_h5(self, reader, pos: int) -> np.ndarray:
        return reader.member(STACKED_DATA)[pos]

    def verify_tasks(self, checker: Checker, batch: int) -> Iterator[VerifyTask]:
        """Every chunk of ``data`` against its recorded CRC-32, and decoded; a damaged chunk
        names the keys of all its rows. Then, given sources, every source file."""
        index = checker.index
        data, count, crcs, problem = stacked_chunks(checker.reader.h5file, index.max_entry_bytes)
        if problem:
            checker.archive_problem(problem)
        rows = block_rows(data)
        for i in range(count):
            lo, hi = i * rows, min(len(data), (i + 1) * rows)
            yield functools.partial(checker.rows, lo, hi, functools.partial(read_stacked_chunk, data, crcs, i),
                                    crcs is not None)
        if checker.sources:
            n = len(index)
            for lo in range(0, n, batch):
                yield functools.partial(checker.sources_of, range(lo, min(n, lo + batch)))

    def extract_values(self, archive: str, index: Index, todo: Sequence[Tuple[int, str]]
                       ) -> Iterator[Tuple[str, np.ndarray, bool]]:
        """Chunk by chunk, each checked once, yielding the planned rows it holds."""
        wanted = dict(todo)
        with open_h5(archive) as f:
            data, count, crcs, problem = stacked_chunks(f, index.max_entry_bytes)
            if problem:
                raise ArchiveError(f"{archive}: {problem}; convert the source again")
            rows = block_rows(data)
            for i in range(count):
                lo, hi = i * rows, min(len(data), (i + 1) * rows)
                if not any(r in wanted for r in range(lo, hi)):
                    continue
                try:
                    block = read_stacked_chunk(data, crcs, i)
                except ArchiveError as exc:
                    keys = index.keys[lo:hi]
                    raise exc.add_context(f"in {archive}, entries {safety.printable(repr(keys[0]))} to "
                                          f"{safety.printable(repr(keys[-1]))}; convert the source again")
                for r in range(lo, hi):
                    if r in wanted:
                        yield wanted[r], block[r - lo], True


STACKED = StackedLayout()
