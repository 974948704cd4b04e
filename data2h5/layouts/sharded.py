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

import errno
import os
import stat
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import h5py
import numpy as np

from .. import format as fmt, safety
from ..archive import ArchiveReader, Index, decode_keys, index_field, open_h5, read_index, read_keys
from ..display import progress_bar
from ..engines import DaskEngine, LocalPool, Task
from ..errors import ArchiveError, OutputError, ShardError
from ..partial import Partial, create_part, publish, write_root_attrs
from ..sharding import ShardRecord, fd_identity, file_crc32, own_files
from ..verify import (CHANGED, CORRUPT, EXTRA, MISSING, Problem, VerifyReport, compare_source, recorded_skips,
                      verify, walk_source)
from . import SHARDED as NAME, Layout, get
from .files import used_axes, write_index

REPLACE_HINT = "copy it back from where the archive was made, or convert again"
PLAIN_HINT = "data2h5 reads shards only as plain files of their own beside the master: copy them there (cp, not ln)"


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
    """Raise :class:`ShardError` unless ``shard`` is a plain file of its own in ``folder``
    (opened without following a symlink, of one hard link: nothing from another folder),
    with its recorded size and identity."""
    path = os.path.join(folder, shard.name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ShardError(master, shard.name, f"is missing (no {path}); {REPLACE_HINT}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise ShardError(master, shard.name, f"is a symbolic link; {PLAIN_HINT}") from None
        raise ShardError(master, shard.name, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ShardError(master, shard.name, f"is not a regular file; {PLAIN_HINT}")
        if st.st_nlink != 1:
            raise ShardError(master, shard.name, f"has {st.st_nlink} hard links, so it may be another folder's "
                                                 f"file; {PLAIN_HINT}")
        if st.st_size != shard.size:
            how = "truncated" if st.st_size < shard.size else "longer than recorded"
            raise ShardError(master, shard.name, f"has {st.st_size} bytes, the master records {shard.size} ({how} "
                                                 f"or replaced); {REPLACE_HINT}")
        identity = fd_identity(fd, st.st_size)
    except OSError as exc:
        raise ShardError(master, shard.name, f"cannot be read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if identity != shard.identity:
        raise ShardError(master, shard.name, f"is not the file the master records (replaced or damaged); "
                                             f"{REPLACE_HINT}")


def check_plain_shard(master: str, shard: Shard, path: str, expected: str) -> None:
    """Raise :class:`ShardError` unless the archive at ``path`` is of the ``expected`` layout,
    read from its root attributes before anything else: a shard that is itself a master (which
    may name this one) is refused, never opened in turn."""
    try:
        with open_h5(path) as f:
            layout = safety.read_attrs(f).get(fmt.ATTR_LAYOUT)
    except ArchiveError as exc:
        raise ShardError(master, shard.name, f"cannot be read: {exc}") from exc
    if layout != expected:
        shown = "a master of shards" if layout == NAME else f"a {safety.printable(repr(layout))} archive"
        raise ShardError(master, shard.name, f"is {shown}, not a {expected} shard as the master records; "
                                             "the archive is damaged or crafted")


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
        check_shard(index.path, shard, os.path.dirname(path))
        check_plain_shard(index.path, shard, path, index.shard_layout)
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
_NUMBER_BOUNDS = {"shard_size": 1 << 62, "shard_crc32": 1 << 32, "shard_identity": 1 << 32, "shard_entries": 1 << 62}

MAX_SHARDS = 1 << 20
"""Most shards a master may name: far more than any conversion writes (a shard holds at least
one entry, and usually thousands), few enough that checking each is bounded."""


def read_shard_table(path: str, table: Dict[str, Any], rows: int) -> List[Shard]:
    """The master's shard table from its columns (``shard_name``... as read), each number
    range-checked as a Python int before any sum: every shard a distinct plain name beside the
    archive, of at least one entry, together holding exactly the master's ``rows``."""
    def crafted(why: str) -> ArchiveError:
        return ArchiveError(f"{path}: the shard table {why}; the archive is damaged or crafted")

    count = len(table["shard_name"])
    if any(len(v) != count for v in table.values()):
        raise crafted("has columns of different lengths")
    if count > min(MAX_SHARDS, max(rows, 1)):
        raise crafted(f"names {count} shards for {rows} entries (a shard holds at least one)")
    numbers = {}
    for name in _NUMBER_COLUMNS:
        column = table[name]
        if column.dtype.kind not in "iu" or column.ndim != 1:
            raise crafted(f"column {name!r} holds {column.dtype} {column.shape}, not one integer per shard")
        values = column.tolist()  # Python ints: no wrapping
        bound = _NUMBER_BOUNDS[name]
        bad = next((v for v in values if not 0 <= v < bound), None)
        if bad is not None:
            raise crafted(f"records {name.replace('shard_', '')} {bad}, outside 0 to {bound - 1}")
        numbers[name] = values
    if count and min(numbers["shard_entries"]) < 1:
        raise crafted("records a shard of no entries")
    if sum(numbers["shard_entries"]) != rows:
        raise crafted(f"accounts for {sum(numbers['shard_entries'])} entries, the index holds {rows}")
    names = table["shard_name"]
    own = os.path.basename(path)
    for name in names:
        if (not name or name != os.path.basename(name) or name in (".", "..") or name == own or "\0" in name
                or "/" in name):
            raise crafted(f"names {safety.printable(repr(name))}, not a file beside the archive")
    if len(set(names)) != count:
        seen: set = set()
        twice = next(name for name in names if name in seen or seen.add(name))
        raise crafted(f"names shard {safety.printable(repr(twice))} more than once")
    return [Shard(name, size, crc, identity, entries, first, last) for name, size, crc, identity, entries, first, last
            in zip(names, numbers["shard_size"], numbers["shard_crc32"], numbers["shard_identity"],
                   numbers["shard_entries"], table["shard_first_key"], table["shard_last_key"])]


class ShardedLayout(Layout):
    """A master over shard archives (see the module's docstring)."""

    name = NAME
    indexed_datasets = False
    records_source = True

    def read_index(self, f: h5py.File, attrs: dict, limit: int) -> Optional[Index]:
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
        table.update({name: index_field(f, group, name, limit, None) for name in _NUMBER_COLUMNS})
        shards = read_shard_table(path, table, n)
        starts = np.zeros(len(shards) + 1, np.int64)
        np.cumsum([s.entries for s in shards], out=starts[1:])  # each within n, and their sum is n: no overflow
        if n and (shard.min() < 0 or shard.max() >= len(shards)):
            raise ArchiveError(f"{path}: rows name shards the table lacks; the archive is damaged or crafted")
        expected_shard = np.repeat(np.arange(len(shards), dtype=np.int64), [s.entries for s in shards])
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
        return verify_sharded

    def write_master(self, dst: Path, records: Sequence[ShardRecord], **options: Any) -> None:
        """Write the master over finished shards (see :func:`write_master`)."""
        write_master(dst, records, **options)


def _inner_layouts() -> Tuple[str, ...]:
    from . import writable

    return writable()


SHARDED = ShardedLayout()


# --- the master --------------------------------------------------------------------------------

#: Index columns the master holds beside every layout's own (see :mod:`data2h5.layouts.sharded`).
SHARD = "shard"  # per row: its shard's number
ROW = "row"  # per row: its row in that shard
TABLE = {"shard_name": "name", "shard_size": "size", "shard_crc32": "crc32", "shard_identity": "identity",
         "shard_entries": "entries", "shard_first_key": "first_key", "shard_last_key": "last_key"}


def write_master(dst: Path, records: Sequence[ShardRecord], *, layout: str, options: dict, report: Any,
                 links: bool = False) -> None:
    """Write the master archive ``dst`` over the finished shards ``records`` (in key order):
    each shard's index read back (and checked), concatenated, with the shard table; written
    in a part file, synced and renamed like every archive. ``links``: an external link per key
    to its shard, so that plain h5py finds ``f[key]``. The files skipped are ``report``'s (those
    the walk could not store) and the shards'."""
    folder = dst.parent
    parts: Dict[str, list] = {name: [] for name in (*fmt.INDEX_FIELDS, SHARD, ROW)}
    for number, record in enumerate(records):
        index = read_index(folder / record.name)
        if len(index) != record.entries or (index.keys and (index.keys[0], index.keys[-1]) !=
                                            (record.first_key, record.last_key)):
            raise OutputError(f"{folder / record.name}: holds {len(index)} entries, not the {record.entries} its "
                              "task reported; convert again with --overwrite")
        n = len(index)
        for name in fmt.INDEX_FIELDS:
            if name == "keys":
                values = index.keys.raw
            elif name == fmt.STORED_CRC32 and index.stored_crc32 is None:
                values = np.zeros(n, np.uint32)
            elif name == fmt.VERBATIM:
                values = index.verbatim_column()
            else:
                values = getattr(index, name)
            parts[name].append(values)
        parts[SHARD].append(np.full(n, number, np.uint32))
        parts[ROW].append(np.arange(n, dtype=np.uint64))
    data: Dict[str, np.ndarray] = {}
    for name, values in parts.items():
        dtype = fmt.INDEX_FIELDS.get(name)
        if name == "shape":  # each shard's as wide as its own entries need: padded to the widest with -1
            width = max((v.shape[1] for v in values), default=1)
            values = [np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=-1) for v in values]
        joined = np.concatenate(values) if values else np.zeros((0,) + ((1,) if name == "shape" else ()))
        if name == "keys":
            joined = joined.astype(f"S{max(joined.dtype.itemsize, 1)}")
        elif dtype is not None:
            joined = joined.astype(dtype)
        else:
            joined = joined.astype(np.uint32 if name == SHARD else np.uint64)
        data[name] = used_axes(joined) if name == "shape" else joined
    for column, fieldname in TABLE.items():
        values = [getattr(r, fieldname) for r in records]
        if fieldname in ("name", "first_key", "last_key"):
            encoded = [v.encode("utf-8") for v in values]
            data[column] = np.array(encoded, dtype=f"S{max(map(len, encoded), default=1) or 1}")
        else:
            data[column] = np.array(values, dtype=np.uint64)

    partial = Partial(dst)
    part = partial.part(partial.next_generation())
    f = create_part(part)
    try:
        write_index(f, data)
        if links:
            names = [r.name for r in records]
            for raw, number in zip(data["keys"].tolist(), data[SHARD].tolist()):
                key = raw.decode("utf-8")
                f[key] = h5py.ExternalLink(names[number], key)
        skipped = [list(s) for s in report.skipped] + [s for r in records for s in r.skipped]
        write_root_attrs(f, report, options, layout=NAME, entries=sum(r.entries for r in records), skipped=skipped,
                         bytes_in=sum(r.bytes_in for r in records), bytes_out=sum(r.size for r in records))
        f.attrs[SHARD_LAYOUT] = layout
        f.attrs[SHARD_LINKS] = bool(links)
    except BaseException:
        f.close()
        part.unlink(missing_ok=True)
        raise
    publish(f, part, dst)


SHARD_LAYOUT = "shard_layout"  # root attribute: the layout of every shard
SHARD_LINKS = "shard_links"  # root attribute: whether each key is an external link to its shard



# --- verify ------------------------------------------------------------------------------------

class ShardCheck(NamedTuple):
    """What verifying one shard found: its whole-file CRC-32 and its own verify report (or
    why it could not be verified)."""

    number: int
    crc32: Optional[int]
    report: Any  # verify.VerifyReport, or None
    error: Optional[str]


def verify_shard(number: int, path: str, max_entry_bytes: int, threads: int, master: str, shard: Shard,
                 layout: str) -> ShardCheck:
    """A task: verify one shard, a plain archive of ``layout``, as an archive of its own and
    checksum the whole file."""
    try:
        check_shard(master, shard, os.path.dirname(path))
        check_plain_shard(master, shard, path, layout)
        crc = file_crc32(path)
        report = verify(path, workers=threads, max_entry_bytes=max_entry_bytes)
    except (ArchiveError, OSError) as exc:
        return ShardCheck(number, None, None, str(exc))
    return ShardCheck(number, crc, report, None)


def verify_sharded(archive: str, index: Any, *, source: Optional[os.PathLike] = None, ext=None,
                   prune: Optional[str] = None, follow_symlinks: Optional[bool] = None, workers: Optional[int] = None,
                   progress: Optional[bool] = False, max_entry_bytes: int, scheduler: Optional[str] = None) -> Any:
    """Verify a master: its shards in parallel (a local pool of ``workers`` processes, or the
    Dask cluster at ``scheduler``), each against its own checksums and the master's table
    (whole-file CRC-32, entries), then, given ``source``, the source folder against the
    master's index. Problems name the shard."""
    started = time.perf_counter()
    report = VerifyReport(os.path.abspath(archive), index.layout, len(index))
    folder = os.path.dirname(os.path.abspath(archive))
    count = len(index.shards)
    engine = DaskEngine.connect(scheduler) if scheduler else LocalPool(max(1, min(workers or os.cpu_count() or 1,
                                                                                    count)))
    threads = 2 if scheduler else max(1, (workers or os.cpu_count() or 1) // max(1, min(count, workers or 1)))
    tasks = [Task(f"shard {s.name}", verify_shard, (n, os.path.join(folder, s.name), max_entry_bytes, threads,
                                                    index.path, s, index.shard_layout))
             for n, s in enumerate(index.shards)]
    bar = progress_bar(len(index), progress, unit="entry")
    try:
        with engine:
            engine.check_folders(folder, folder)
            checks = engine.run(tasks, on_done=lambda i, c: bar.update(index.shards[i].entries))
    finally:
        bar.close()
    for check in checks:
        shard = index.shards[check.number]
        if check.error is not None:
            report.problems.append(Problem(CORRUPT, shard.name, f"shard cannot be verified: {check.error}"))
            continue
        for p in check.report.problems:
            report.problems.append(Problem(p.kind, p.key, f"in shard {shard.name}: {p.reason}"))
        report.unchecked += check.report.unchecked
        if check.crc32 != shard.crc32:
            report.problems.append(Problem(CORRUPT, shard.name, "shard file's CRC-32 differs from the master's table "
                                                                "(damaged or replaced); copy or convert it again"))
        if check.report.entries != shard.entries:
            report.problems.append(Problem(CORRUPT, shard.name, f"shard holds {check.report.entries} entries, the "
                                                                f"master's table {shard.entries}"))
    if source is not None:
        sources = walk_source(index, Path(source), ext, prune, follow_symlinks, archive, report)
        own = own_files(Path(archive).absolute())
        sources = {k: p for k, p in sources.items() if not own(p)}
        report.source_files = len(sources)
        skipped = recorded_skips(index)
        for key, path in sources.items():
            if key not in index:
                if key not in skipped:
                    report.problems.append(Problem(MISSING, key, "in the source folder, not in the archive"))
                continue
            pos = index.position(key)
            reason = compare_source(path, int(index.size[pos]), int(index.crc32[pos]))
            if reason is not None:
                report.problems.append(Problem(CHANGED, key, reason))
        report.problems.extend(Problem(EXTRA, key, "in the archive, not in the source folder")
                               for key in index.keys if key not in sources)
    report.notes.append(f"{count} shards verified on {engine.description}")
    report.elapsed = time.perf_counter() - started
    return report
