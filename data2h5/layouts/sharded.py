"""The ``sharded`` layout: a master archive over shard archives, read as one archive.

The master (written by :mod:`data2h5.sharding`) holds, in its index group, the concatenated
index of its shards with each row's shard number and row in that shard, and the shard table:
file name (in the master's folder), size, CRC-32 of the whole file, identity (CRC-32 of its
first and last 64 KiB), entries and key range. Reading the index checks every shard against
the table (it exists, with the recorded size and identity): a missing, truncated or
replaced shard is refused in one line naming it, never read as zeros. Entries are read by a
reader per shard, opened on first use, whose own index is checked against the master's rows.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import h5py
import numpy as np

from .. import format as fmt, safety
from ..archive import ArchiveReader, Index, decode_keys, index_field, read_keys
from ..errors import ArchiveError, ShardError
from . import SHARDED as NAME, Layout, get

REPLACE_HINT = "copy it back from where the archive was made, or convert again"


class Shard(NamedTuple):
    """One row of a master's shard table."""

    name: str
    size: int
    crc32: int
    identity: int
    entries: int
    first_key: str
    last_key: str


@dataclass
class ShardedIndex(Index):
    """A master's index: every shard's rows in key order, ``shard[pos]`` and ``row[pos]``
    saying where each lies. ``offset`` is 0 here: the shards' own indexes locate the bytes."""

    shard: Optional[np.ndarray] = None  # uint32, per row
    row: Optional[np.ndarray] = None  # uint64, per row
    shards: List[Shard] = field(default_factory=list)
    starts: Optional[np.ndarray] = None  # first row of each shard, and the row count last
    shard_layout: str = fmt.LAYOUT_FILES

    def shard_path(self, number: int) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), self.shards[number].name)


def check_shard(master: str, shard: Shard, folder: str) -> None:
    """Raise :class:`ShardError` unless ``shard`` lies in ``folder`` with its recorded size and
    identity."""
    from ..sharding import file_identity

    path = os.path.join(folder, shard.name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardError(master, shard.name, f"is missing (no {path}); {REPLACE_HINT}") from None
    except OSError as exc:
        raise ShardError(master, shard.name, f"cannot be read ({exc.strerror or exc})") from exc
    if st.st_size != shard.size:
        how = "truncated" if st.st_size < shard.size else "longer than recorded"
        raise ShardError(master, shard.name, f"has {st.st_size} bytes, the master records {shard.size} ({how} or "
                                             f"replaced); {REPLACE_HINT}")
    try:
        identity = file_identity(path, st.st_size)
    except OSError as exc:
        raise ShardError(master, shard.name, f"cannot be read ({exc.strerror or exc})") from exc
    if identity != shard.identity:
        raise ShardError(master, shard.name, f"is not the file the master records (replaced or damaged); "
                                             f"{REPLACE_HINT}")


class ShardReaders:
    """Reads a master's entries from its shards: one :class:`ArchiveReader` per shard, opened
    on first use (each reads the shard's own, checked index once per process). Picklable."""

    def __init__(self, index: ShardedIndex, verify: bool, max_entry_bytes: int):
        self.index, self.verify, self.max_entry_bytes = index, verify, max_entry_bytes
        self._readers: List[Optional[ArchiveReader]] = [None] * len(index.shards)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def shard_reader(self, number: int) -> ArchiveReader:
        """The reader of shard ``number``, its index proven to hold the master's rows."""
        reader = self._readers[number]
        if reader is None:
            with self._lock:
                reader = self._readers[number]
                if reader is None:
                    reader = self._readers[number] = self._open(number)
        return reader

    def _open(self, number: int) -> ArchiveReader:
        index, shard = self.index, self.index.shards[number]
        path = index.shard_path(number)
        try:
            reader = ArchiveReader(path, verify=self.verify, max_entry_bytes=self.max_entry_bytes)
        except ArchiveError as exc:
            raise ShardError(index.path, shard.name, f"cannot be read: {exc}") from exc
        lo, hi = int(index.starts[number]), int(index.starts[number + 1])
        if reader.index.keys != index.keys[lo:hi]:
            reader.close()
            raise ShardError(index.path, shard.name, f"does not hold the keys the master lists for it (replaced?); "
                                                     f"{REPLACE_HINT}")
        return reader

    def _where(self, pos: int) -> Tuple[ArchiveReader, int]:
        return self.shard_reader(int(self.index.shard[pos])), int(self.index.row[pos])

    def read_stored(self, pos: int) -> np.ndarray:
        reader, row = self._where(pos)
        return reader.read_stored(row)

    def dataset(self, pos: int) -> h5py.Dataset:
        reader, row = self._where(pos)
        return reader.dataset(row)

    def attr(self, pos: int, name: str) -> Any:
        reader, row = self._where(pos)
        return reader.attr(row, name)

    def close(self) -> None:
        for reader in self._readers:
            if reader is not None:
                reader.close()


_TEXT_COLUMNS = ("shard_name", "shard_first_key", "shard_last_key")
_NUMBER_COLUMNS = ("shard_size", "shard_crc32", "shard_identity", "shard_entries")


class ShardedLayout(Layout):
    """A master over shard archives (see the module's docstring)."""

    name = NAME
    indexed_datasets = False
    records_source = True

    def read_index(self, f: h5py.File, attrs: dict, limit: int) -> Optional[Index]:
        from ..sharding import ROW, SHARD, SHARD_LAYOUT

        path = f.filename
        group = safety.open_index_group(f)
        if group is None:
            raise ArchiveError(f"{path}: sharded archive without its index; convert the source again")
        keys = decode_keys(read_keys(f, safety.open_child(f, group, "keys"), "index/keys", limit))
        n = len(keys)
        optional = {fmt.STORED_CRC32, fmt.VERBATIM}
        arrays = {name: index_field(f, group, name, limit, dtype) for name, dtype in fmt.INDEX_FIELDS.items()
                  if name != "keys" and (name in group or name not in optional)}
        shard = index_field(f, group, SHARD, limit, np.dtype(np.int64))
        row = index_field(f, group, ROW, limit, np.dtype(np.int64))
        for name, arr in [*arrays.items(), (SHARD, shard), (ROW, row)]:
            if len(arr) != n:
                raise ArchiveError(f"{path}: index field {name!r} has {len(arr)} rows for {n} keys; the archive is "
                                   "damaged or crafted")
        table = {name: decode_keys(read_keys(f, safety.open_child(f, group, name), f"index/{name}", limit))
                 for name in _TEXT_COLUMNS}
        table.update({name: index_field(f, group, name, limit, np.dtype(np.int64)).tolist()
                      for name in _NUMBER_COLUMNS})
        count = len(table["shard_name"])
        if any(len(v) != count for v in table.values()):
            raise ArchiveError(f"{path}: the shard table's columns differ in length; the archive is damaged or crafted")
        shards = [Shard(*values) for values in zip(*(table[c] for c in (
            "shard_name", "shard_size", "shard_crc32", "shard_identity", "shard_entries", "shard_first_key",
            "shard_last_key")))]
        starts = np.concatenate([[0], np.cumsum([s.entries for s in shards], dtype=np.int64)]).astype(np.int64)
        for s in shards:
            if (not s.name or s.name != os.path.basename(s.name) or s.name in (".", "..")
                    or s.name == os.path.basename(path) or "\0" in s.name):
                raise ArchiveError(f"{path}: shard name {safety.printable(repr(s.name))} is not a file beside the "
                                   "archive; the archive is damaged or crafted")
            if min(s.size, s.entries) < 0:
                raise ArchiveError(f"{path}: shard {s.name} records a negative size; the archive is damaged or crafted")
        if int(starts[-1]) != n or (n and (shard.min() < 0 or shard.max() >= count)):
            raise ArchiveError(f"{path}: the shard table does not account for the {n} rows; the archive is damaged "
                               "or crafted")
        expected_shard = np.repeat(np.arange(count, dtype=np.int64), [s.entries for s in shards])
        if not np.array_equal(shard, expected_shard) or not np.array_equal(row, np.arange(n) - starts[shard]):
            raise ArchiveError(f"{path}: rows do not lie in their shards in order; the archive is damaged or crafted")
        inner = attrs.get(SHARD_LAYOUT)
        if inner not in (fmt.LAYOUT_FILES, fmt.LAYOUT_STACKED) and not (isinstance(inner, str)
                                                                         and inner in _inner_layouts()):
            raise ArchiveError(f"{path}: unknown shard layout {safety.printable(repr(inner))}; the archive is damaged "
                               "or crafted")
        folder = os.path.dirname(os.path.abspath(path))
        for s in shards:
            check_shard(path, s, folder)
        arrays["offset"] = np.zeros(n, np.uint64)  # the shards' own indexes locate the bytes
        return ShardedIndex(path=path, layout=self.name, keys=keys, attrs=attrs, shard=shard.astype(np.uint32),
                            row=row.astype(np.uint64), shards=shards, starts=starts, shard_layout=inner, **arrays)

    def entry_reader(self, reader: ArchiveReader) -> ShardReaders:
        return ShardReaders(reader.index, reader.verify, reader.index.max_entry_bytes)

    def read_h5(self, reader: ArchiveReader, pos: int) -> np.ndarray:
        return reader.read_stored(pos)

    def extract_values(self, archive: str, index: ShardedIndex, todo: Sequence[Tuple[int, str]]
                       ) -> Iterator[Tuple[str, np.ndarray, bool]]:
        """Each shard's planned entries, extracted by its own layout, shard after shard."""
        readers = ShardReaders(index, True, index.max_entry_bytes)
        try:
            start = 0
            while start < len(todo):
                number = int(index.shard[todo[start][0]])
                stop = start
                while stop < len(todo) and int(index.shard[todo[stop][0]]) == number:
                    stop += 1
                shard = readers.shard_reader(number)
                rows = [(int(index.row[pos]), rel) for pos, rel in todo[start:stop]]
                yield from get(shard.index.layout).extract_values(shard.path, shard.index, rows)
                start = stop
        finally:
            readers.close()

    @property
    def verify_archive(self):
        from ..sharding import verify_sharded

        return verify_sharded


def _inner_layouts() -> Tuple[str, ...]:
    from . import writable

    return writable()


SHARDED = ShardedLayout()
