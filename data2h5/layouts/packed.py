"""The ``packed`` layout: entries appended, as stored, to a few large byte blocks.

Each entry's stored bytes (as a worker packed them: raw, or compressed by ``--compression``)
are appended to a block buffer; a full block becomes one contiguous 1-D uint8 dataset
(``packed/000000``, ...), so a million tiny files make a few dozen HDF5 objects instead of a
million, and the writer's cost per entry is a copy. The index is the ``files`` index (offset,
stored size, codec, CRC-32s, kind, dtype and shape of every entry) plus the block each entry
lies in: a read is one ``pread`` at the recorded offset.

What is given up: an entry is not an HDF5 dataset, so ``h5py.File(out)[key]`` does not find
it; read it with :func:`data2h5.open`, :class:`~data2h5.loaders.H5Dataset` or ``extract``.

The archive is untrusted: at open, every block must be a contiguous, unfiltered 1-D uint8
dataset, and every row must lie inside the storage HDF5 reports for its block.
"""
from __future__ import annotations

import zlib
from array import array
from typing import Iterator, List, Optional, Tuple

import h5py
import numpy as np

from .. import safety
from ..codecs import NONE, Codec, codec_by_id
from ..encoding import Packed, iter_chunk_offsets
from ..errors import ArchiveError
from ..archive import ArchiveReader, Index
from ..partial import Writeback
from ..safety import open_child
from . import Checker, Layout, VerifyTask
from .files import FilesLayout, IndexColumns, IndexRow, JournalEntry, write_index

NAME = "packed"
GROUP = "packed"  # the blocks: packed/000000, packed/000001, ...
BLOCK_FIELD = "block"  # index column: the block each entry lies in
#: A block is written once it holds this much (an entry larger than it has a block of its own).
BLOCK_BYTES = 4 << 20


class PackedColumns(IndexColumns):
    """A ``files`` index's columns plus each entry's block."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = array("I")

    def iter_columns(self, order: Optional[np.ndarray] = None) -> Iterator[Tuple[str, np.ndarray]]:
        yield from super().iter_columns(order)
        blocks = np.frombuffer(self.blocks, dtype=np.uint32) if len(self.blocks) else np.zeros(0, np.uint32)
        yield BLOCK_FIELD, blocks.copy() if order is None else blocks[order]

    def shift_offsets(self, first: int, by: int) -> None:
        """Add ``by`` (the block's place in the file) to the offsets of rows ``first`` on."""
        offsets = np.frombuffer(self._columns["offset"], dtype=np.uint64)
        stored = np.frombuffer(self._columns["stored"], dtype=np.uint64)
        live = stored[first:] > 0  # empty entries keep offset 0: nothing to read
        offsets[first:][live] += np.uint64(by)
        del offsets, stored  # the arrays may grow again


class PackedWriter:
    """Appends entries to block buffers, writes each full block as one dataset, and the
    index on :meth:`close`. With ``checkpoints``, the entries of every written block are
    journaled so that a resume can reuse them."""

    def __init__(self, f: h5py.File, checkpoints=None, block_bytes: Optional[int] = None):
        self._f = f
        self._group = f.require_group(GROUP)
        self._rows = PackedColumns()
        self._buffer = bytearray()
        self._block_first = 0  # first row of the block being filled
        self._blocks = 0
        self._block_bytes = block_bytes or BLOCK_BYTES
        self._journal_rows: List[Tuple[Packed, int, int, int, int]] = []  # (entry, offset in block, stored, codec, CRC)
        self._pending: List[JournalEntry] = []
        self._checkpoints = checkpoints
        self._writeback = Writeback(f.filename)
        self.bytes_stored = 0

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, p: Packed) -> None:
        """Append the entry's stored bytes to the block being filled."""
        data, codec_id, crc = _one_block(p)
        data = memoryview(data).cast("B")  # bytes, or a view of the shared slot it arrived in
        if self._buffer and len(self._buffer) + len(data) > self._block_bytes:
            self._flush_block()
        where = len(self._buffer)
        self._buffer += data
        self._rows.append(IndexRow(key=p.key, size=p.size, crc32=p.crc32, kind=p.kind, codec=codec_id, offset=where if len(data) else 0,
                                   stored=len(data), dtype=p.dtype, shape=p.shape, stored_crc32=crc,
                                   verbatim=p.verbatim))
        self._rows.blocks.append(self._blocks)
        if self._checkpoints is not None:
            self._journal_rows.append((p._replace(data=None), where, len(data), codec_id, crc))
        self.bytes_stored += len(data)
        if len(self._buffer) >= self._block_bytes:
            self._flush_block()
        if self._checkpoints is not None and self._checkpoints.due():
            self.checkpoint()

    def skip(self, key: str, reason: str) -> None:
        """A file that could not be read: nothing to record, a resume tries it again."""

    def _flush_block(self) -> None:
        """Write the block being filled as its own contiguous dataset."""
        if not self._buffer:
            return
        name = f"{self._blocks:06d}"
        dset = self._group.create_dataset(name, data=np.frombuffer(self._buffer, dtype=np.uint8))
        start = dset.id.get_offset()
        if start is None:
            raise ArchiveError(f"{self._f.filename}: block {name} has no place in the file")
        self._rows.shift_offsets(self._block_first, start)
        for p, where, stored, codec_id, crc in self._journal_rows:
            if codec_id == NONE:
                chunk_shape, place = None, (start + where, stored)
            else:
                chunk_shape, place = tuple(p.shape), (start + where, stored, 0)
            self._pending.append(JournalEntry(p.key, p.kind, p.dtype, p.shape, codec_id, chunk_shape, place, p.size,
                                              p.crc32, p.nbytes, crc, p.mtime_ns, p.verbatim, p.level))
        self._journal_rows = []
        self._writeback.poll(len(self._buffer))
        self._buffer = bytearray()
        self._block_first = len(self._rows)
        self._blocks += 1

    def checkpoint(self) -> None:
        """Write the block being filled, then journal every entry written since the last
        checkpoint: from here on a resume can reuse them."""
        if self._checkpoints is None:
            return
        self._flush_block()
        if self._pending:
            self._checkpoints.write({"entries": self._pending})
            self._pending = []

    def close(self, order: Optional[dict] = None) -> int:
        """Write the last block and the index, rows sorted by ``order[key]`` when given."""
        self._flush_block()
        positions = None if order is None else self._rows.order_by(order)
        write_index(self._f, self._rows.iter_columns(positions))
        self._writeback.close()
        return self.bytes_stored


def _one_block(p: Packed) -> Tuple[bytes, int, int]:
    """``(stored bytes, codec id, their CRC-32)`` of an entry as one block: as the worker
    packed it when it is one chunk (or raw), else its array compressed here in one piece."""
    if p.chunk_shape is None:
        return p.data, NONE, p.stored_crc32
    codec = codec_by_id(p.codec, p.level)
    if isinstance(p.data, list) and len(p.data) == 1 and tuple(p.chunk_shape) == tuple(p.shape):
        _, data, mask = p.data[0]
        return data, (NONE if mask else p.codec), p.stored_crc32
    arr = p.data if isinstance(p.data, np.ndarray) else _assemble(p, codec)
    raw = np.ascontiguousarray(arr).tobytes()
    if codec.in_worker:
        data, mask = codec.compress(raw)
        if not mask:
            return data, p.codec, zlib.crc32(data)
    return raw, NONE, zlib.crc32(raw)


def _assemble(p: Packed, codec: Codec) -> np.ndarray:
    """An entry's array from its compressed chunks (HDF5's edge chunks are padded)."""
    dtype = np.dtype(p.dtype)
    chunk = tuple(p.chunk_shape)
    out = np.empty(p.shape, dtype)
    chunk_bytes = int(np.prod(chunk)) * dtype.itemsize
    for (_, data, mask), (_, where) in zip(p.data, iter_chunk_offsets(p.shape, chunk)):
        raw = data if mask else codec.decompress(data, chunk_bytes)
        block = np.frombuffer(raw, dtype).reshape(chunk)
        out[where] = block[tuple(slice(0, s.stop - s.start) for s in where)] if out[where].shape != chunk else block
    return out


class PackedLayout(FilesLayout):
    """Entries appended to a few large byte blocks; the index says where each lies."""

    name = NAME
    indexed_datasets = False
    entry_datasets = False

    def read_index(self, f: h5py.File, attrs: dict, limit: int) -> Optional[Index]:
        index = super().read_index(f, attrs, limit)
        if index is None:
            raise ArchiveError(f"{f.filename}: packed archive without its index; convert the source again")
        group = safety.open_index_group(f)
        blocks = safety.read_small(open_child(f, group, BLOCK_FIELD), limit, f.filename, f"index/{BLOCK_FIELD}")
        if blocks.shape != (len(index),) or blocks.dtype.kind not in "ui":
            raise ArchiveError(f"{f.filename}: index field {BLOCK_FIELD!r} holds {blocks.dtype} {blocks.shape}, not "
                               f"one block number for each of {len(index)} entries; the archive is damaged or crafted")
        check_blocks(f, index, blocks.astype(np.int64))
        return index

    def open_writer(self, f: h5py.File, *, entries: int, codec: Optional[Codec], checkpoints=None,
                    compress=None) -> PackedWriter:
        return PackedWriter(f, checkpoints=checkpoints)

    def read_h5(self, reader: ArchiveReader, pos: int) -> np.ndarray:
        """Only an empty entry is read without its block: there is nothing to read."""
        index = reader.index
        if int(index.stored[pos]) == 0:
            return np.zeros(index.entry_shape(pos), dtype=np.dtype(index.dtype[pos].decode("ascii")))
        raise ArchiveError(f"{reader.path}: entry {safety.printable(repr(index.keys[pos]))} of a packed archive "
                           "records no place to read it from; the archive is damaged or crafted")

    def verify_tasks(self, checker: Checker, batch: int) -> Iterator[VerifyTask]:
        return Layout.verify_tasks(self, checker, batch)


def check_blocks(f: h5py.File, index: Index, blocks: np.ndarray) -> None:
    """Prove that every row with stored bytes lies inside the storage of the block it names:
    each block a contiguous, unfiltered 1-D uint8 dataset of the file, its place and size as
    HDF5 reports them (not as the index says)."""
    path = f.filename
    live = index.stored > 0
    every = bool(live.all())
    if not every and not live.any():
        return
    named = blocks if every else blocks[live]
    if (named[1:] >= named[:-1]).all():  # as written: block numbers only grow
        used = named[np.concatenate(([True], named[1:] != named[:-1]))]
    else:
        used = np.unique(named)
    group = f.get(GROUP, getlink=True)
    if not isinstance(group, h5py.HardLink):
        raise ArchiveError(f"{path}: packed archive without its {GROUP!r} group; the archive is damaged or crafted")
    parent = f[GROUP]
    if not isinstance(parent, h5py.Group):
        raise ArchiveError(f"{path}: {GROUP!r} is not a group; the archive is damaged or crafted")
    if used[0] < 0 or used[-1] >= parent.id.get_num_objs():  # blocks are numbered from 0, one link each
        bad = int(used[0]) if used[0] < 0 else int(used[-1])
        raise ArchiveError(f"{path}: index names block {bad}, and the archive has {parent.id.get_num_objs()}; the "
                           "archive is damaged or crafted")
    # Arrays as long as the blocks used, not as the largest number named.
    starts = np.zeros(len(used), np.uint64)
    ends = np.zeros(len(used), np.uint64)
    for j, b in enumerate(used.tolist()):
        name = f"{b:06d}"
        try:
            block = safety.open_child(f, parent, name)
        except KeyError:
            block = None
        if not isinstance(block, h5py.Dataset):
            raise ArchiveError(f"{path}: index names block {name}, which the archive lacks; the archive is damaged "
                               "or crafted")
        dsid = block.id
        dcpl = dsid.get_create_plist()
        offset = dsid.get_offset()
        if (dcpl.get_layout() != h5py.h5d.CONTIGUOUS or dcpl.get_nfilters() or offset is None
                or dsid.dtype != np.uint8 or len(dsid.shape) != 1):
            raise ArchiveError(f"{path}: block {name} is not a contiguous array of bytes; the archive is damaged "
                               "or crafted")
        size = dsid.get_storage_size()
        if size < dsid.shape[0]:
            raise ArchiveError(f"{path}: block {name} has less storage than its length; the archive is damaged or "
                               "crafted")
        starts[j], ends[j] = offset, offset + dsid.shape[0]
    rows = None if every else np.flatnonzero(live)
    lo, stored = (index.offset, index.stored) if every else (index.offset[rows], index.stored[rows])
    hi = lo + stored
    at = np.searchsorted(used, named)
    outside = (lo < starts[at]) | (hi > ends[at]) | (hi < lo)
    if outside.any():
        first = int(np.argmax(outside)) if every else int(rows[int(np.argmax(outside))])
        raise ArchiveError(f"{path}: entry {safety.printable(repr(index.keys[first]))} lies outside its block; the "
                           "archive is damaged or crafted")


PACKED = PackedLayout()
