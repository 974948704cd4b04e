"""The ``files`` layout: one HDF5 dataset per entry, named by its key, and an index.

The writer is the only process touching the HDF5 file, so it must cost almost nothing per
entry: it uses h5py's low-level API with cached property lists and types (about 35 µs per
dataset against ~75 µs through ``create_dataset``) and hands the chunks workers compressed to
HDF5 with ``write_direct_chunk``. Each entry's location, checksum and source stamp go to the
part's journal at checkpoints, so an interrupted conversion can resume by copying them.
The index (see :mod:`data2h5.format`) is written on close, from columns held in typed arrays.
"""
from __future__ import annotations

import logging
import zlib
from array import array
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import h5py
import numpy as np

from .. import format as fmt
from ..codecs import NONE, Codec, codec_by_id
from ..encoding import Packed, iter_chunk_offsets
from ..format import Kind
from ..archive import ArchiveReader, Index, create_index_group, decode_keys, index_field, read_keys
from ..keys import KeyColumn, Keys
from ..partial import BlockReader, InterruptedRun, Writeback, unchanged
from ..resume import Reused
from .. import safety
from ..errors import ArchiveError
from ..safety import open_child
from ..walk import SourceFile
from . import Checker, Layout, VerifyTask

log = logging.getLogger(__name__)


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


class BlockColumn(NamedTuple):
    """An index column too large to build at once: its shape and dtype, and ``blocks()``
    yielding ``(first row, values)`` in order."""

    shape: Tuple[int, ...]
    dtype: np.dtype
    blocks: Any

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        for lo, values in self.blocks():
            out[lo : lo + len(values)] = values
        return out


class IndexColumns:
    """The rows of a ``files`` index as they are added, held column by column in typed
    arrays (a few dozen bytes an entry, not a Python object per row)."""

    #: Each numeric column and the typecode of the array holding it while rows are added.
    _NUMERIC = {"size": "Q", "crc32": "I", "kind": "B", "codec": "B", "offset": "Q", "stored": "Q",
                "stored_crc32": "I", "verbatim": "B"}

    def __init__(self) -> None:
        self.keys = KeyColumn()
        self._dtype_ids: dict = {}  # a handful of distinct dtypes: each row holds its number
        self._dtypes = array("B")
        self._columns = {name: array(code) for name, code in self._NUMERIC.items()}
        self._ndims = array("B")
        self._dims = array("q")  # each row's dimensions, one after the other

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, row: IndexRow) -> None:
        self.keys.append(row.key.encode("utf-8"))
        dtype_id = self._dtype_ids.get(row.dtype)
        if dtype_id is None:
            dtype_id = self._dtype_ids[row.dtype] = len(self._dtype_ids)
            if dtype_id > 255:
                raise ValueError("more than 256 distinct dtypes in one archive")
        self._dtypes.append(dtype_id)
        for name in self._NUMERIC:
            self._columns[name].append(int(getattr(row, name)))
        dims = row.shape[: fmt.MAX_NDIM]
        self._ndims.append(len(dims))
        self._dims.extend(dims)
        if len(row.shape) > fmt.MAX_NDIM:
            self._columns["offset"][-1] = 0  # too many dims to describe here: read through h5py

    def _width(self) -> int:
        """Axes the shape column needs: the most any row has (at least 1)."""
        return max(max(self._ndims, default=0), 1)

    def _shapes(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """The ``(rows, width)`` shape column, padded with -1 (of ``rows`` only, when given)."""
        n = len(self._ndims)
        ndims = np.frombuffer(self._ndims, dtype=np.uint8).astype(np.int64) if n else np.zeros(0, np.int64)
        dims = np.frombuffer(self._dims, dtype=np.int64) if len(self._dims) else np.zeros(0, np.int64)
        starts = np.cumsum(ndims) - ndims
        if rows is None:
            rows = np.arange(n)
        out = np.full((len(rows), self._width()), -1, dtype=np.int64)
        for axis in range(int(ndims.max()) if n else 0):
            has = ndims[rows] > axis
            out[has, axis] = dims[starts[rows[has]] + axis]
        return out

    def shape_blocks(self, order: Optional[np.ndarray] = None, rows: int = 1 << 16) -> "BlockColumn":
        """The shape column, as wide as the most axes a row has, built a block of rows at a
        time."""
        n = len(self._ndims)
        picked = np.arange(n) if order is None else np.asarray(order)
        return BlockColumn((n, self._width()), fmt.INDEX_FIELDS["shape"],
                           lambda: ((lo, self._shapes(picked[lo : lo + rows])) for lo in range(0, n, rows)))

    def iter_columns(self, order: Optional[np.ndarray] = None) -> Iterator[Tuple[str, np.ndarray]]:
        """The index's datasets, ``(name, values)`` one at a time (so that only one column is
        built at once), rows in ``order`` (positions) when given."""
        n = len(self.keys)
        take = (lambda a: a) if order is None else (lambda a: a[order])
        yield "keys", take(self.keys.array())
        names = sorted(self._dtype_ids, key=self._dtype_ids.get)
        dtypes = np.array([d.encode() for d in names] or [b""], dtype=fmt.INDEX_FIELDS["dtype"])
        for name, code in self._NUMERIC.items():
            if name == "stored_crc32":  # the datasets in the order archives have always had
                yield "dtype", take(dtypes[np.frombuffer(self._dtypes, dtype=np.uint8) if n else np.zeros(0, np.uint8)])
            values = np.frombuffer(self._columns[name], dtype=code) if n else np.zeros(0, code)
            yield name, take(values.astype(fmt.INDEX_FIELDS[name], copy=False))
        yield "shape", self.shape_blocks(order)

    def order_by(self, order: dict) -> np.ndarray:
        """Positions of the rows sorted by ``order[key]``."""
        keys = self.keys.array()
        rank = np.fromiter((order[k.decode("utf-8")] for k in keys.tolist()), dtype=np.int64, count=len(keys))
        return np.argsort(rank, kind="stable")


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
        positions = None if order is None else self._rows.order_by(order)
        write_index(self._f, self._rows.iter_columns(positions))
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


INDEX_CHUNK_ROWS = 1 << 16


def write_index(f: h5py.File, columns: Union[dict, Iterable[Tuple[str, np.ndarray]]]) -> None:
    """Store the index group (see :mod:`data2h5.format`) with ``columns``: by name, or
    ``(name, values)`` pairs, keys first; a sharded master adds its shard table's columns."""
    group = create_index_group(f)
    for name, values in (columns.items() if isinstance(columns, dict) else columns):
        shape = values.shape if isinstance(values, BlockColumn) else np.shape(values)
        # Large chunks, shuffled, deflated at level 1: a million rows' columns read back in a
        # fraction of the time HDF5's default small chunks take, and about as small.
        options = dict(compression="gzip", compression_opts=1, shuffle=True,
                       chunks=(min(shape[0], INDEX_CHUNK_ROWS),) + tuple(shape[1:])) if shape[0] else {}
        if isinstance(values, BlockColumn):
            dset = group.create_dataset(name, shape=values.shape, dtype=values.dtype, **options)
            for lo, block in values.blocks():
                dset[lo : lo + len(block)] = block
            continue
        group.create_dataset(name, data=values, **options)


def used_axes(shape: np.ndarray) -> np.ndarray:
    """The shape column without the trailing axes no row uses (each row is padded with -1
    after its dimensions): a million 1-D entries hold 8 MB of shapes, not 64 MB."""
    if not len(shape) or shape.shape[1] <= 1:
        return shape
    used = np.flatnonzero((shape != -1).any(axis=0))
    k = max(int(used[-1]) + 1 if len(used) else 1, 1)
    return shape if k == shape.shape[1] else np.ascontiguousarray(shape[:, :k])


class FilesLayout(Layout):
    """One HDF5 dataset per entry, found by its key; an index of every entry's location."""

    name = fmt.LAYOUT_FILES
    indexed_datasets = True

    def read_index(self, f: h5py.File, attrs: dict, limit: int) -> Optional[Index]:
        group = safety.open_index_group(f)
        if group is None:
            if fmt.ATTR_FORMAT in attrs:
                raise ArchiveError(f"{f.filename}: data2h5 archive without its index; convert the source again")
            return None
        raw = read_keys(f, open_child(f, group, "keys"), "index/keys", limit)
        keys = Keys(raw) if raw.dtype.kind == "S" else Keys.of(decode_keys(raw))
        n = len(keys)
        optional = {fmt.STORED_CRC32, fmt.VERBATIM}  # absent from archives written before they were recorded
        arrays = {name: index_field(f, group, name, limit, dtype) for name, dtype in fmt.INDEX_FIELDS.items()
                  if name != "keys" and (name in group or name not in optional)}
        for name, arr in arrays.items():
            if len(arr) != n:
                raise ValueError(f"index field {name!r} has {len(arr)} rows for {n} keys")
        arrays["shape"] = used_axes(arrays["shape"])
        return Index(path=f.filename, layout=self.name, keys=keys, attrs=attrs, **arrays)

    def open_writer(self, f: h5py.File, *, entries: int, codec: Optional[Codec], checkpoints=None,
                    compress=None) -> FilesWriter:
        """Workers compress each entry already: ``compress`` is not needed."""
        return FilesWriter(f, checkpoints=checkpoints)

    def reuse(self, run: InterruptedRun, files: List[SourceFile], writer: FilesWriter, blocks: BlockReader,
              reused: Reused) -> List[SourceFile]:
        """Reuse every journaled entry whose source is unchanged and whose stored bytes check out."""
        todo = []
        journaled = journaled_entries(run)
        for src in files:
            hit = journaled.get(src.key)
            packed = None
            if hit is not None:
                gen, row = hit
                entry = JournalEntry(*row)
                if unchanged(src.path, entry.size, entry.mtime_ns):
                    packed = unjournal(entry, lambda addr, n, gen=gen: blocks.read(gen, addr, n))
                    if packed is None:
                        log.info("%s: its stored bytes in the interrupted run do not check out; reading it again",
                                 src.key)
            if packed is None:
                todo.append(src)
                continue
            writer.add(packed)
            reused.entries += 1
            reused.bytes_in += packed.size
            reused.bytes_decoded += packed.nbytes
        return todo

    def kept(self, run: InterruptedRun) -> int:
        return len(journaled_entries(run))

    def verify_tasks(self, checker: Checker, batch: int) -> Iterator[VerifyTask]:
        checker.walk_tree()  # keys without their dataset, datasets the index does not list
        yield from super().verify_tasks(checker, batch)

    def extract_values(self, archive: str, index: Index, todo: Sequence[Tuple[int, str]]
                       ) -> Iterator[Tuple[str, np.ndarray, bool]]:
        return read_entries(archive, index, todo)


def journaled_entries(run: InterruptedRun) -> Dict[str, Tuple[int, list]]:
    """``{key: (generation, journal row)}`` of every entry the run journaled; an entry of a
    newer generation wins."""
    entries: Dict[str, Tuple[int, list]] = {}
    for gen, records in run.generations:
        for record in records:
            for row in record.get("entries", ()):
                entries.setdefault(row[0], (gen, row))
    return entries


def read_entries(archive: str, index: Index, todo: Sequence[Tuple[int, str]]) -> Iterator[Tuple[str, np.ndarray, bool]]:
    """Each planned entry read (and checked) on its own, as stored; decoded arrays go to .npy."""
    with ArchiveReader(archive, index, verify=True) as reader:
        for pos, rel in todo:
            yield rel, reader.read_stored(pos), int(index.kind[pos]) == Kind.ARRAY


FILES = FilesLayout()
