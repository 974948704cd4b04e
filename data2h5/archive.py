"""Read an archive's index, and read single entries from it fast.

:func:`read_index` loads the index group of a data2h5 archive (see :mod:`data2h5.format`) as
numpy arrays, recognises ``stacked`` archives, and falls back to walking a plain HDF5 file
(e.g. one written by the original Data2H5 script) for the sorted list of its dataset paths.

:class:`ArchiveReader` reads entries of one archive. An entry stored as one block (its
``offset`` in the index is non-zero) is read with a single ``os.pread`` on a raw file
descriptor and decompressed in Python, without touching h5py; anything else goes through
h5py. Both handles are opened lazily, once per process, so a reader can be pickled to
spawned workers and used in forked ones.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import h5py
import numpy as np

from . import codecs, declared, format as fmt, jpeg, layouts, safety
from .chunks import check_crc, pread_into, read_chunk
from .display import one_line
from .errors import ArchiveError, ArchiveKeyError, CorruptEntryError, ReadError, SizeLimitError
from .format import Kind
from .keys import Keys
from .partial import Partial, output_of_part
from .readers import BUILTIN_READERS, reader_for_extension

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

STORED_CRC32 = fmt.STORED_CRC32
"""Optional index field: CRC-32 of each entry's stored bytes, so damage to compressed arrays
(whose ``crc32`` is that of the source file, not of what is stored) is caught on read."""

LAYOUT_PLAIN = layouts.PLAIN
"""Layout of an HDF5 file not written by data2h5: every dataset is an entry."""


@dataclass
class Index:
    """One archive's entries: ``keys`` plus per-entry arrays aligned with them.

    For ``stacked`` and ``plain`` archives the fields a data2h5 ``files`` index would hold
    are filled in so readers can treat every layout alike: ``offset`` is 0 (read through
    h5py) unless the entry's bytes could be located as one uncompressed block.
    """

    path: str
    layout: str
    keys: Keys  # given a list of str, held as Keys
    size: np.ndarray  # uint64; 0 where unknown
    crc32: np.ndarray  # uint32; 0 where unknown
    kind: np.ndarray  # uint8, a Kind
    codec: np.ndarray  # uint8, a codec id
    offset: np.ndarray  # uint64; 0: read through h5py
    stored: np.ndarray  # uint64
    dtype: np.ndarray  # S16 numpy dtype strings
    shape: np.ndarray  # int64 (n, MAX_NDIM), padded with -1
    attrs: Dict[str, Any] = field(default_factory=dict)
    stored_crc32: Optional[np.ndarray] = None  # uint32 CRC-32 of the bytes at ``offset``, if recorded
    verbatim: Optional[np.ndarray] = None  # uint8: BYTES/TEXT entry is the source's own bytes, if recorded
    labels: Optional[np.ndarray] = None  # stacked: class index of each entry
    classes: Optional[List[str]] = None  # stacked: class names
    max_entry_bytes: int = safety.MAX_ENTRY_BYTES  # the read limit the rows were checked against

    def __post_init__(self) -> None:
        self.keys = Keys.of(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def is_verbatim(self, pos: int) -> bool:
        """Whether entry ``pos`` holds exactly its source file's bytes, so that the source's
        size and CRC-32 describe it (older archives: every BYTES and TEXT entry)."""
        if int(self.kind[pos]) == Kind.ARRAY:
            return False
        return self.verbatim is None or bool(self.verbatim[pos])

    def verbatim_column(self) -> np.ndarray:
        """:meth:`is_verbatim` of every row at once, as uint8."""
        recorded = np.ones(len(self), bool) if self.verbatim is None else self.verbatim.astype(bool)
        return ((self.kind != Kind.ARRAY) & recorded).astype(np.uint8)

    def position(self, key: str) -> int:
        """The row of ``key``; raises :class:`ArchiveKeyError` naming key and archive."""
        pos = self.keys.position(key)
        if pos < 0:
            raise ArchiveKeyError(f"no entry {key!r} in archive {self.path}")
        return pos

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.keys.position(key) >= 0

    def entry_shape(self, pos: int) -> tuple:
        """The stored array's shape of entry ``pos``."""
        return tuple(d for d in self.shape[pos].tolist() if d >= 0)



def open_h5(path: PathLike, **kwargs: Any) -> h5py.File:
    """Open ``path`` read-only with h5py (``kwargs`` go to :class:`h5py.File`); raises
    :class:`ArchiveError` naming the path, and what to do, when it is missing, unreadable,
    empty, not HDF5, truncated or damaged beyond opening its root group."""
    path = os.fspath(path)
    target = output_of_part(Path(path))
    if target is not None:
        raise ArchiveError(
            f"{path}: the unfinished part of a conversion into {target.name}, not an archive; "
            "wait for the conversion to finish (or resume it with data2h5 convert ... --resume)"
        )
    if not os.path.exists(path):
        unfinished = Partial(Path(path).absolute()).generations()
        if unfinished:
            raise ArchiveError(
                f"{path}: no such file yet: a conversion into it is under way or was interrupted; "
                "wait for it to finish, or resume it with data2h5 convert ... --resume"
            )
        raise ArchiveError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ArchiveError(f"{path}: not a file; give the path of an .h5 archive")
    try:
        with open(path, "rb") as fh:
            empty = not fh.read(1)
    except OSError as exc:  # is_hdf5 would call an unreadable file "not HDF5"
        raise ArchiveError(f"{path}: cannot open ({exc.strerror or exc}); make it readable") from exc
    if empty:
        raise ArchiveError(f"{path}: the file is empty, not an archive; copy or convert it again")
    if not h5py.is_hdf5(path):
        raise ArchiveError(f"{path}: not an HDF5 file; give the path of an archive written by data2h5 convert")
    try:
        f = h5py.File(path, "r", **kwargs)
    except OSError as exc:
        raise ArchiveError(f"{path}: {_open_problem(exc)}") from exc
    try:
        f["/"]  # the root group's header: damage here would surface as a KeyError on first use
    except (KeyError, OSError, RuntimeError) as exc:
        f.close()
        raise ArchiveError(f"{path}: {_damaged(exc)}") from exc
    return f


def _open_problem(exc: OSError) -> str:
    truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
    if truncated:
        have, want = truncated.groups()
        return (f"the file is truncated ({have} of {want} bytes; an interrupted copy or conversion); "
                "copy or convert it again")
    return _damaged(exc)


def _damaged(exc: BaseException) -> str:
    return f"the archive is damaged ({one_line(exc)}); copy or convert it again"



def create_index_group(f: h5py.File) -> h5py.Group:
    """A new index group that root listings do not show (see :mod:`data2h5.format`): anonymous,
    kept by a hard link to itself, found through the root attribute :data:`fmt.ATTR_INDEX`."""
    group = h5py.Group(h5py.h5g.create(f.id, None))
    group[fmt.INDEX_SELF] = group
    f.attrs[fmt.ATTR_INDEX] = group.ref
    return group


def read_index(source: Union[PathLike, h5py.File], *, max_entry_bytes: int = safety.MAX_ENTRY_BYTES) -> Index:
    """The index of an archive given by path or by an open :class:`h5py.File`.

    A data2h5 ``files`` archive is read from its index group, a ``stacked`` one from its
    ``keys``/``labels``/``classes`` datasets, and any other HDF5 file by walking it for its
    datasets (sorted by path; slower, as it visits every object).

    The archive is untrusted (see :mod:`data2h5.safety`): nothing outside the file is
    followed, and every row is checked before it is returned, with ``max_entry_bytes`` the
    most one entry may declare. Raises :class:`ArchiveError` (or a subclass) in one line.
    """
    if isinstance(source, h5py.File):
        return _read_index(source, max_entry_bytes)
    with open_h5(source) as f:
        return _read_index(f, max_entry_bytes)


def _read_index(f: h5py.File, limit: int) -> Index:
    path = f.filename
    attrs: dict = {}
    try:
        attrs = safety.read_attrs(f)
        name = attrs.get(fmt.ATTR_LAYOUT)
        layout = layouts.get(name if isinstance(name, str) and name in layouts.recorded() else fmt.LAYOUT_FILES)
        index = layout.read_index(f, attrs, limit)
        if index is None:  # no index and no data2h5 mark: an HDF5 file data2h5 did not write
            index = layouts.get(layouts.PLAIN).read_index(f, attrs, limit)
        index.max_entry_bytes = limit
        safety.check_rows(index, os.stat(path).st_size, limit, codecs.KNOWN_IDS, codecs.MAX_RATIO,
                          strict_dtypes=layouts.get(index.layout).writable)
        return index
    except ArchiveError:
        raise
    except (KeyError, ValueError, TypeError, OSError, RuntimeError, RecursionError) as exc:  # damaged metadata
        if fmt.ATTR_FORMAT in attrs:
            raise ArchiveError(f"{path}: damaged data2h5 index ({one_line(exc)}); convert the source again") from exc
        raise ArchiveError(f"{path}: {_damaged(exc)}") from exc




def index_field(f: h5py.File, group: h5py.Group, name: str, limit: int, dtype: Optional[np.dtype]) -> np.ndarray:
    """One column of the index group, bounded in size and cast to the dtype it must have."""
    where = f"index/{name}"
    arr = safety.read_small(safety.open_child(f, group, name), limit, f.filename, where)
    expected_ndim = 2 if name == "shape" else 1
    if arr.ndim != expected_ndim or (name == "shape" and not 1 <= arr.shape[1] <= fmt.MAX_NDIM):
        raise ArchiveError(f"{f.filename}: index field {where!r} has shape {arr.shape}; the archive is damaged or crafted")
    if dtype is None:
        return arr
    if dtype.kind in "ui" and arr.dtype.kind not in "ui":
        raise ArchiveError(f"{f.filename}: index field {where!r} holds {arr.dtype}, not integers; "
                           "the archive is damaged or crafted")
    if dtype.kind == "S" and arr.dtype.kind != "S":
        raise ArchiveError(f"{f.filename}: index field {where!r} holds {arr.dtype}, not text; "
                           "the archive is damaged or crafted")
    return arr.astype(dtype, copy=False)


def read_keys(f: h5py.File, dset: h5py.Dataset, name: str, limit: int) -> np.ndarray:
    arr = safety.read_small(dset, limit, f.filename, name)
    if arr.ndim != 1 or arr.dtype.kind not in "SO":
        raise ArchiveError(f"{f.filename}: {name!r} holds {arr.dtype} {arr.shape}, not a list of keys; "
                           "the archive is damaged or crafted")
    return arr


def check_labels(labels: np.ndarray, n: int, classes: Optional[List[str]], path: str) -> np.ndarray:
    """A stacked archive's labels: ``n`` integers, each an index into ``classes`` when the
    archive names its classes. Raises :class:`ArchiveError` otherwise."""
    if labels.shape[:1] != (n,) or labels.dtype.kind not in "iu":
        raise ArchiveError(f"{path}: {fmt.STACKED_LABELS!r} holds {labels.dtype} {labels.shape}, not one integer "
                           f"label for each of {n} samples; the archive is damaged or crafted")
    if classes is not None and n and labels.ndim == 1:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= len(classes):
            bad = low if low < 0 else high
            raise ArchiveError(f"{path}: label {bad} is outside the {len(classes)} classes the archive names; "
                               "the archive is damaged or crafted")
    return labels


def blank_index(path: str, layout: str, keys: List[str], attrs: dict) -> Index:
    n = len(keys)
    return Index(
        path=path,
        layout=layout,
        keys=keys,
        size=np.zeros(n, np.uint64),
        crc32=np.zeros(n, np.uint32),
        kind=np.full(n, int(Kind.ARRAY), np.uint8),
        codec=np.full(n, codecs.NONE, np.uint8),
        offset=np.zeros(n, np.uint64),
        stored=np.zeros(n, np.uint64),
        dtype=np.zeros(n, "S16"),
        shape=np.full((n, fmt.MAX_NDIM), -1, np.int64),
        attrs=attrs,
    )


def decode_keys(raw: np.ndarray) -> List[str]:
    return [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in raw.tolist()]


def _plain(value: Any) -> Any:
    """An attribute value as plain Python (bytes → str, numpy scalars → Python scalars)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode_value(stored: np.ndarray, kind: int, key: str, decode_size: Optional[Tuple[int, int]] = None,
                 max_bytes: Optional[int] = None) -> Any:
    """Turn an entry's stored array into what it holds: BYTES are decoded by the key's
    extension (image, .npy, text; other types stay a uint8 array), TEXT becomes ``str``,
    arrays are returned as they are. ``decode_size``: JPEGs at a reduced scale (see
    :mod:`data2h5.jpeg`). ``max_bytes``: what a header may declare (see :mod:`data2h5.declared`),
    checked before decoding. Raises :class:`ReadError` when bytes do not decode and
    :class:`SizeLimitError` when they declare more than ``max_bytes``."""
    if kind == Kind.ARRAY:
        return stored
    if kind == Kind.TEXT:
        return stored.tobytes().decode("utf-8")
    ext = os.path.splitext(key)[1].lower()
    reader = reader_for_extension(ext)
    if reader is BUILTIN_READERS["bytes"]:
        return stored
    try:
        return reader.from_bytes(stored.tobytes(), ext, decode_size=decode_size, max_bytes=max_bytes)
    except jpeg.TooLarge as exc:
        raise SizeLimitError(key, f"decoded ({'×'.join(map(str, exc.shape))} samples)", exc.nbytes,
                             max_bytes) from None
    except declared.TooLarge as exc:
        raise SizeLimitError(key, f"decoded ({exc.declared.what})", exc.declared.nbytes, max_bytes) from None
    except Exception as exc:
        raise ReadError(key, f"cannot decode as {reader.name}: {type(exc).__name__}: {exc}") from exc


_FORK_LOCK = threading.Lock()


def _new_fork_lock() -> None:
    """A lock another thread held at fork time stays held in the child: replace it there."""
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_fork_lock)

@functools.lru_cache(maxsize=None)
def _dtype(text: bytes) -> np.dtype:
    return np.dtype(text.decode())


@functools.lru_cache(maxsize=None)
def _h5_type(text: bytes) -> h5py.h5t.TypeID:
    """The HDF5 type h5py stores a recorded dtype as (compared with a dataset's by HDF5)."""
    return h5py.h5t.py_create(_dtype(text))


class ArchiveReader:
    """Reads the entries of one archive, by row of its :class:`Index`.

    Handles (a raw file descriptor for the fast path, an :class:`h5py.File` for the rest)
    are opened on first use in each process: after a fork the child never touches its
    parent's handles, and pickling drops them. Safe to share between threads.

    ``verify`` checks the CRC-32 of entries stored as exact bytes (BYTES, TEXT) against the
    source file's, and, where the index records :data:`STORED_CRC32`, that of the stored
    bytes read by ``os.pread``. Without that field, damage to an lzf-compressed array is
    caught only when it breaks decompression (gzip and zstd carry their own checksums).
    """

    def __init__(self, path: PathLike, index: Optional[Index] = None, *, verify: bool = True,
                 max_entry_bytes: int = safety.MAX_ENTRY_BYTES):
        self.path = os.fspath(path)
        self.max_entry_bytes = max_entry_bytes
        # An index this reader read itself is not pickled: each process reads (and checks) it
        # again on first use, so a spawned worker gets a path, not a copy of a million rows.
        self._own_index = index is None
        self._index: Optional[Index] = read_index(self.path, max_entry_bytes=max_entry_bytes) if index is None else index
        self._rows_at_open = len(self._index)
        self.verify = verify
        self.layout = layouts.get(self.index.layout)
        # Rows of a files archive whose block has been proven to be their dataset's own
        # storage (safety.check_storage), once per row and process, on first read.
        self._proven: Optional[np.ndarray] = None
        self._entries = self.layout.entry_reader(self)  # e.g. one reader per shard; None: this one
        self._reset_handles()

    @property
    def index(self) -> Index:
        """The archive's :class:`Index` (read again, once, in a process this reader was
        pickled to)."""
        if self._index is None:
            with _FORK_LOCK:
                if self._index is None:
                    index = read_index(self.path, max_entry_bytes=self.max_entry_bytes)
                    if len(index) != self._rows_at_open:
                        raise ArchiveError(f"{self.path}: holds {len(index)} entries, not the {self._rows_at_open} "
                                           "it held when it was opened; it was replaced meanwhile: open it again")
                    self._index = index
        return self._index

    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._h5: Optional[h5py.File] = None
        self._members: Dict[str, h5py.Dataset] = {}  # datasets opened by name, for this process
        self._groups: Dict[str, Any] = {}  # opened groups by path, for resolving keys

    def __len__(self) -> int:
        return len(self.index)

    # -- handles ---------------------------------------------------------------------------

    def _own_process(self) -> None:
        if self._pid != os.getpid():
            with _FORK_LOCK:
                if self._pid != os.getpid():
                    # Forked: the handles are the parent's. Close this process's copies
                    # (the parent's stay open) so HDF5 cannot hand the parent's open file
                    # state back to us when we reopen.
                    self._close_handles()
                    self._reset_handles()

    @property
    def fd(self) -> int:
        """This process's raw read-only file descriptor of the archive."""
        self._own_process()
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    try:
                        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    except OSError as exc:
                        raise ArchiveError(f"{self.path}: cannot open: {exc.strerror}") from exc
        return self._fd

    @property
    def h5file(self) -> h5py.File:
        """This process's :class:`h5py.File` of the archive."""
        self._own_process()
        if self._h5 is None:
            with self._lock:
                if self._h5 is None:
                    self._h5 = open_h5(self.path)
        return self._h5

    def close(self) -> None:
        """Close this process's handles; they reopen on the next read."""
        if getattr(self, "_pid", None) is None:
            return  # never fully initialised
        self._close_handles()
        self._fd = self._h5 = None
        self._members = {}
        self._groups = {}
        if getattr(self, "_entries", None) is not None:
            self._entries.close()

    def _close_handles(self) -> None:
        fd, h5 = getattr(self, "_fd", None), getattr(self, "_h5", None)
        self._members = {}
        self._groups = {}
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if h5 is not None:
            try:
                h5.close()
            except Exception:  # noqa: BLE001 - closing during interpreter shutdown may fail
                pass

    def __enter__(self) -> "ArchiveReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter shutdown modules may be gone
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_pid", "_lock", "_fd", "_h5", "_members", "_groups"):
            state.pop(name, None)
        state["_proven"] = None  # proven again, once per row, by each process that reads
        if self._own_index:
            state["_index"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    # -- reading ---------------------------------------------------------------------------

    def read(self, pos: int, *, decode: bool = True, decode_size: Optional[Tuple[int, int]] = None) -> Any:
        """Entry ``pos``: decoded (see :func:`decode_value`) or, with ``decode=False``, as stored."""
        stored = self.read_stored(pos)
        if not decode:
            return stored
        kind = int(self.index.kind[pos])
        key = self.index.keys[pos]
        try:
            return decode_value(stored, kind, key, decode_size, self.max_entry_bytes)
        except ReadError as exc:
            raise ReadError(f"{self.path}::{key}", exc.reason) from exc
        except SizeLimitError as exc:
            raise SizeLimitError(self.path, f"entry {safety.printable(repr(key))}, {exc.what},", exc.size,
                                 exc.limit) from None

    def read_stored(self, pos: int) -> np.ndarray:
        """Entry ``pos`` as stored (a uint8 array for BYTES and TEXT entries).

        Raises :class:`CorruptEntryError` naming archive and entry when the stored bytes do
        not decompress to the recorded size or fail their checksum.
        """
        if self._entries is not None:
            return self._entries.read_stored(pos)
        index = self.index
        offset = int(index.offset[pos])
        codec_id = int(index.codec[pos])
        if offset and codec_id in _DIRECT_CODECS:
            if self.layout.indexed_datasets:
                self._prove(pos, offset)
            arr = self._read_direct(pos, offset, codec_id)
        else:
            arr = self._read_h5(pos)
        if self.verify and index.is_verbatim(pos) and index.size[pos]:
            if arr.nbytes != index.size[pos] or zlib.crc32(arr) != index.crc32[pos]:
                raise self._corrupt(pos, "checksum of the source file's bytes does not match")
        return arr

    def _read_direct(self, pos: int, offset: int, codec_id: int) -> np.ndarray:
        index = self.index
        stored = int(index.stored[pos])
        dtype = _dtype(index.dtype[pos])
        shape = index.entry_shape(pos)
        nbytes = math.prod(shape) * dtype.itemsize
        # A chunk lzf could not shrink is stored raw, as HDF5 does for an optional filter.
        raw = codec_id == codecs.NONE or (codec_id == codecs.LZF and stored == nbytes)
        if raw and stored != nbytes:
            raise self._corrupt(pos, f"index says {stored} bytes are stored for {nbytes} bytes of data")
        recorded = int(index.stored_crc32[pos]) if self.verify and index.stored_crc32 is not None else None
        # Samples must be writable, as h5py's and imageio's are (in-place transforms, torch):
        # raw data is read straight into a new array, decompressed data is copied once.
        if raw:
            buf = np.empty(stored, np.uint8)
            got = pread_into(self.fd, buf, offset)
            if got != stored:
                raise self._corrupt(pos, f"file ends {stored - got} bytes before the entry does")
            try:
                check_crc(buf, recorded)
            except CorruptEntryError as exc:
                raise self._corrupt(pos, exc.reason) from exc
            return buf.view(dtype).reshape(shape)
        try:
            data = read_chunk(self.fd, offset, stored, nbytes, codecs.codec_by_id(codec_id).decompress, crc=recorded,
                              where=lambda: self.path)
        except CorruptEntryError as exc:
            raise self._corrupt(pos, exc.reason) from exc
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()

    def _prove(self, pos: int, offset: int) -> None:
        """Refuse row ``pos`` unless its block is its key's own dataset storage (first read of
        the row in this process; later reads cost one array lookup)."""
        proven = self._proven
        if proven is None:
            proven = self._proven = np.zeros(len(self.index), dtype=bool)
        if proven[pos]:
            return
        dsid, dcpl = self._dataset_id(pos, plist=False)
        safety.check_storage(dsid, dcpl, offset, int(self.index.stored[pos]), self.path, self.index.keys[pos])
        proven[pos] = True

    def member(self, name: str) -> h5py.Dataset:
        """The dataset ``name`` of the archive (e.g. a stacked archive's ``data``), opened once
        per process without leaving the file."""
        self._own_process()
        dset = self._members.get(name)
        if dset is None:
            dset = self._members[name] = safety.open_dataset(self.h5file, name)
        return dset

    def dataset(self, pos: int) -> h5py.Dataset:
        """The HDF5 dataset of entry ``pos`` of a ``files`` or plain archive, reached without
        leaving the file and checked against the index's shape and dtype."""
        if self._entries is not None:
            return self._entries.dataset(pos)
        return h5py.Dataset(self._dataset_id(pos)[0])

    def _dataset_id(self, pos: int, plist: bool = True):
        index, key = self.index, self.index.keys[pos]
        try:
            dsid, dcpl = safety.open_dataset_id(self.h5file, key, groups=self._groups, path=self.path, plist=plist)
        except KeyError:
            raise ArchiveError(f"{self.path}: index lists {safety.printable(repr(key))} but the archive has no such "
                               "dataset; the archive is damaged") from None
        except (ValueError, RuntimeError, OSError) as exc:
            raise self._corrupt(pos, f"its dataset cannot be opened: {one_line(exc)}") from exc
        if not self.layout.indexed_datasets:  # e.g. a plain file's index was read off these very datasets
            return dsid, dcpl
        if dsid.shape != index.entry_shape(pos) or not _h5_type(index.dtype[pos]) == dsid.get_type():
            raise self._corrupt(pos, f"the dataset holds {dsid.dtype.str} {dsid.shape}, the index records "
                                     f"{index.dtype[pos].decode('ascii', 'replace')} {index.entry_shape(pos)}")
        return dsid, dcpl

    def _read_h5(self, pos: int) -> np.ndarray:
        try:
            return self.layout.read_h5(self, pos)
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._corrupt(pos, one_line(exc)) from exc

    def attr(self, pos: int, name: str) -> Any:
        """HDF5 attribute ``name`` of entry ``pos``'s dataset; :class:`ArchiveError` if missing."""
        if self._entries is not None:
            return self._entries.attr(pos, name)
        key = self.index.keys[pos]
        if not self.layout.entry_datasets:
            raise ArchiveError(f"{self.path}: a {self.index.layout} archive has no per-entry attributes (asked {name!r} "
                               f"of {key!r})")
        attrs = self.dataset(pos).attrs
        if name not in attrs:
            raise ArchiveError(f"{self.path}: entry {key!r} has no attribute {name!r}")
        aid = attrs.get_id(name)
        safety.check_size(safety.declared_bytes(aid.shape or (), aid.dtype.itemsize), safety.MAX_ATTR_BYTES,
                          self.path, f"attribute {name!r} of entry {key!r}")
        return _plain(attrs[name])

    def _corrupt(self, pos: int, why: str) -> CorruptEntryError:
        key = safety.printable(repr(self.index.keys[pos]))
        return CorruptEntryError(f"{self.path}: entry {key} is damaged ({why}); convert the source again", why)


_DIRECT_CODECS = frozenset(c.id for c in codecs.CODECS.values() if c.in_worker)
