"""``verify``: check an archive against its own checksums and, optionally, against its source.

Archive integrity (always):

* ``files`` layout: every entry's stored bytes against the index's ``stored_crc32`` (the one
  block at ``offset``, or every chunk as stored, in chunk-grid order); every entry is also
  decompressed, and entries holding a file's exact bytes are checked against its CRC-32
  recorded at conversion. The index and the HDF5 tree must agree: a key without its
  dataset is corrupt, a dataset the index does not list is extra.
* ``stacked`` layout: every chunk of ``data`` against the index's ``chunk_crc32``, and every
  chunk decoded; a damaged chunk names the keys of all its rows.
* any other HDF5 file: every dataset is read (HDF5 checks its own fletcher32 checksums where
  the file has them); nothing else is recorded to compare with.

With a source folder, the folder is walked with the options the archive records (or those
given) and every selected file must be in the archive, unchanged: size and CRC-32 equal to
those recorded at conversion, and for entries stored as the file's exact bytes, byte for
byte equal to what is stored.
"""
from __future__ import annotations

import logging
import math
import os
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import h5py
import numpy as np

from . import codecs, format as fmt, layouts, safety
from .display import one_line, progress_bar
from .errors import ArchiveError, CorruptEntryError, SourceError, UnsafeArchiveError
from .format import Kind
from .chunks import unpack_chunk
from .archive import ArchiveReader, Index, PathLike, read_index
from .prune import normalize_extensions
from .sources import check_folder, collect, load_prune
from .encoding import iter_chunk_offsets

log = logging.getLogger(__name__)

CORRUPT, MISSING, SKIPPED, EXTRA, CHANGED = "corrupt", "missing", "skipped", "extra", "changed"
KINDS = (CORRUPT, MISSING, SKIPPED, EXTRA, CHANGED)
"""Problem kinds, in the order they are listed."""

BATCH = 64  # entries per thread-pool task: amortises the pool's per-task cost on tiny entries
READ_BLOCK = 1 << 20  # source files are checksummed in blocks of this size

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Problem:
    """One thing wrong: its kind (:data:`KINDS`), the entry key and why."""

    kind: str
    key: str
    reason: str

    def __str__(self) -> str:  # one line, whatever a crafted key holds
        return f"{self.kind:<8} {safety.printable(self.key)}: {safety.printable(self.reason)}"


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` only when nothing is wrong."""

    archive: str
    layout: str
    entries: int = 0
    source: Optional[str] = None
    source_files: int = 0  # files the source walk selected
    unchecked: int = 0  # decoded entries whose stored bytes have no recorded checksum
    problems: List[Problem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # one line each: how the check was made, where it matters
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def of_kind(self, kind: str) -> List[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def sorted_problems(self) -> List[Problem]:
        """Problems grouped by kind (in :data:`KINDS` order), each group in key order."""
        order = {k: i for i, k in enumerate(KINDS)}
        return sorted(self.problems, key=lambda p: (order[p.kind], p.key))

    def summary(self) -> str:
        """One line: what was checked and how many problems of each kind."""
        counts = {k: len(self.of_kind(k)) for k in KINDS}
        against = f" against {self.source} ({self.source_files:,} source files)" if self.source else ""
        line = (
            f"{self.entries:,} entries verified{against}: {counts[CORRUPT]} corrupt, {counts[MISSING]} missing, "
            f"{counts[EXTRA]} extra, {counts[CHANGED]} changed"
        )
        if counts[SKIPPED]:
            line += f", {counts[SKIPPED]} skipped at conversion"
        if self.unchecked:
            line += f" ({self.unchecked:,} entries have no recorded checksum: decoded, not checksummed)"
        return line

    def as_dict(self) -> dict:
        return {
            "archive": self.archive,
            "layout": self.layout,
            "entries": self.entries,
            "source": self.source,
            "source_files": self.source_files,
            "unchecked": self.unchecked,
            "notes": self.notes,
            "ok": self.ok,
            **{kind: [{"key": p.key, "reason": p.reason} for p in self.sorted_problems() if p.kind == kind]
               for kind in KINDS},
        }


def verify(
    archive: PathLike,
    source: Optional[PathLike] = None,
    *,
    ext: Optional[Union[str, Iterable[str]]] = None,
    prune: Optional[str] = None,
    follow_symlinks: Optional[bool] = None,
    workers: Optional[int] = None,
    progress: Optional[bool] = False,
    max_entry_bytes: int = safety.MAX_ENTRY_BYTES,
    scheduler: Optional[str] = None,
) -> VerifyReport:
    """Check every entry of ``archive`` against the checksums it stores and, given ``source``,
    every file selected under that folder against the archive.

    The source is walked with the extensions and symlink choice the archive records;
    ``ext`` and ``follow_symlinks`` override them. The prune plugin the archive names is
    never run (an archive carries no code): files are selected by extension, unless
    ``prune`` names the user's own plugin (a note in the report says so when the archive
    was made with one). ``workers``: threads reading and checksumming (default: up to 8).
    ``progress``: a tqdm bar on stderr (``None``: only on a terminal).
    ``max_entry_bytes``: the most one entry may declare (see :mod:`data2h5.safety`).
    A sharded archive's shards are verified in parallel: ``workers`` local processes, or the
    Dask cluster at ``scheduler`` (``tcp://HOST:8786``).

    Problems are returned, not raised. Raises :class:`ArchiveError` when the archive cannot be
    opened or its index cannot be read, :class:`SourceError` or :class:`PluginError` when the
    source cannot be walked as asked.
    """
    started = time.perf_counter()
    archive = os.fspath(archive)
    index = read_index(archive, max_entry_bytes=max_entry_bytes)
    own = layouts.get(index.layout).verify_archive
    if own is not None:  # e.g. shard by shard
        return own(archive, index, source=source, ext=ext, prune=prune, follow_symlinks=follow_symlinks,
                   workers=workers, progress=progress, max_entry_bytes=max_entry_bytes, scheduler=scheduler)
    report = VerifyReport(os.path.abspath(archive), index.layout, len(index))
    workers = max(1, workers or min(8, os.cpu_count() or 1))

    sources: Dict[str, str] = {}
    if source is not None:
        sources = walk_source(index, Path(source), ext, prune, follow_symlinks, archive, report)

    reader = ArchiveReader(archive, index, verify=True)
    try:
        checker = _Checker(reader, sources)
        bar = progress_bar(len(index), progress, unit="entry")
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="data2h5-verify") as pool:
                tasks = layouts.get(index.layout).verify_tasks(checker, BATCH)
                for problems, unchecked, done in _ordered(pool, _run_task, tasks, 4 * workers):
                    report.problems.extend(problems)
                    report.unchecked += unchecked
                    bar.update(done)
        finally:
            bar.close()
        report.problems.extend(checker.tree_problems)
    finally:
        reader.close()

    if source is not None:
        seen, skipped = set(index.keys), recorded_skips(index)
        report.problems.extend(
            Problem(EXTRA, key, "in the archive, not in the source folder") for key in index.keys if key not in sources
        )
        report.problems.extend(
            Problem(MISSING, key, "in the source folder, not in the archive") for key in sources
            if key not in seen and key not in skipped
        )
    report.elapsed = time.perf_counter() - started
    log.info("%s: %s", archive, report.summary())
    return report


def recorded_skips(index: Index) -> Dict[str, str]:
    """The files the conversion skipped, recorded in the archive: ``{key: reason}``."""
    return dict(safety.attr_json_list(index.attrs, fmt.ATTR_SKIPPED, safety.is_text_pair, index.path))


# -- the source folder -------------------------------------------------------------------------


def walk_source(index: Index, source: Path, ext, prune: Optional[str], follow_symlinks: Optional[bool],
                 archive: str, report: VerifyReport) -> Dict[str, str]:
    """``{key: path}`` of the files the archive's options select under ``source``; adds the
    names the walk cannot store, and files skipped at conversion, to ``report``."""
    if not layouts.get(index.layout).records_source:
        raise ArchiveError(f"{archive}: not written by data2h5, so it records no source checksums to compare with")
    check_folder(source, "give the folder the archive was made from")
    attrs = index.attrs
    if ext is not None:
        exts = normalize_extensions([ext] if isinstance(ext, str) else ext)
    else:
        exts = normalize_extensions(safety.attr_json_list(attrs, fmt.ATTR_EXTENSIONS, safety.is_text, archive))
    # An archive names its prune plugin for information only: running it would run code the
    # file carries. Only a plugin the user names is loaded.
    plugin = load_prune(prune)
    recorded = safety.attr_text(attrs, fmt.ATTR_PRUNE, "ext")
    if prune is None and recorded != "ext":
        report.notes.append(f"the archive was made with prune plugin {safety.printable(recorded)!r}, which verify "
                            "never runs: source files were selected by extension; pass --prune to use your own")
    if plugin.spec == "ext" and not exts:
        if prune is None and recorded != "ext":
            raise SourceError(f"{archive} was made with prune plugin {safety.printable(recorded)!r}, which verify never "
                              "runs, and records no extension to select source files by; pass --prune or --ext")
        raise SourceError(f"{archive} records no extension to select source files with; pass --ext")
    follow = attrs.get(fmt.ATTR_FOLLOW_SYMLINKS) == 1 if follow_symlinks is None else follow_symlinks
    files, bad_names = collect(source, exts, plugin, follow_symlinks=follow, exclude=[Path(archive).absolute()])
    report.source = str(source.absolute())
    report.source_files = len(files) + len(bad_names)
    skipped = recorded_skips(index)
    for key, reason in bad_names:
        report.problems.append(Problem(SKIPPED if key in skipped else MISSING, key, f"in the source folder, not in the archive: {reason}"))
    keys = set(index.keys)
    for f in files:
        if f.key not in keys and f.key in skipped:
            report.problems.append(Problem(SKIPPED, f.key, f"in the source folder, skipped at conversion: {skipped[f.key]}"))
    return {f.key: f.path for f in files}


def compare_source(path: str, size: int, crc32: int, stored: Optional[np.ndarray] = None) -> Optional[str]:
    """Why the source file at ``path`` differs from what the archive recorded, or None.

    ``stored``: the entry's stored bytes, when they are the file's exact bytes; then the file
    must equal them byte for byte, not only by size and CRC-32.
    """
    try:
        actual = os.stat(path).st_size
        if actual != size:
            return f"the source file has {actual:,} bytes, the archive recorded {size:,}"
        crc, got, same = 0, 0, True
        view = memoryview(stored).cast("B") if stored is not None else None
        with open(path, "rb") as fh:
            while True:
                block = fh.read(READ_BLOCK)
                if not block:
                    break
                crc = zlib.crc32(block, crc)
                if view is not None and same:
                    same = view[got : got + len(block)] == block
                got += len(block)
    except OSError as exc:
        return f"cannot read the source file: {exc.strerror or exc}"
    if got != size:
        return f"the source file changed while it was read ({got:,} bytes read, {size:,} recorded)"
    if crc != crc32:
        return "the source file's CRC-32 differs from the one recorded at conversion"
    if not same:
        return "the source file's bytes differ from the bytes stored in the archive"
    return None


# -- the archive -------------------------------------------------------------------------------


def stored_crc32(dset: h5py.Dataset) -> int:
    """CRC-32 of a dataset's stored bytes: its chunks as stored (compressed), run together in
    row-major chunk-grid order, or its raw bytes when it is not chunked."""
    if dset.chunks is None:
        return zlib.crc32(np.ascontiguousarray(dset[()]))
    crc = 0
    dsid = dset.id
    for offset, _ in iter_chunk_offsets(dset.shape, dset.chunks):
        _, data = dsid.read_direct_chunk(offset)
        crc = zlib.crc32(data, crc)
    return crc


class _Checker:
    """Checks one archive in tasks that threads run, as its layout asks (see
    :meth:`data2h5.layouts.Layout.verify_tasks`); each task returns ``(problems, entries
    without a stored checksum, entries done)``."""

    def __init__(self, reader: ArchiveReader, sources: Dict[str, str]):
        self.reader = reader
        self.index = reader.index
        self.sources = sources
        self.tree_problems: List[Problem] = []
        self._present: Optional[np.ndarray] = None

    def entries(self, positions: range) -> Tuple[List[Problem], int, int]:
        """Check each entry: its stored bytes, and its source file when there is one."""
        problems: List[Problem] = []
        unchecked = 0
        for pos in positions:
            unchecked += self._check_entry(pos, problems)
        return problems, unchecked, len(positions)

    def sources_of(self, positions: range) -> Tuple[List[Problem], int, int]:
        """Check the source files of entries whose stored bytes other tasks check."""
        problems: List[Problem] = []
        for pos in positions:
            problems.extend(self._check_source(pos))
        return problems, 0, 0

    def rows(self, lo: int, hi: int, read: Callable[[], object], checksummed: bool) -> Tuple[List[Problem], int, int]:
        """Check rows ``lo`` to ``hi`` stored together by ``read()``ing them: should it raise
        :class:`CorruptEntryError`, every row's key is corrupt, for that reason."""
        try:
            read()
        except CorruptEntryError as exc:
            return [Problem(CORRUPT, self.index.keys[r], str(exc)) for r in range(lo, hi)], 0, hi - lo
        return [], 0 if checksummed else hi - lo, hi - lo

    def archive_problem(self, reason: str) -> None:
        """Something wrong with the archive as a whole (reported under the index's name)."""
        self.tree_problems.append(Problem(CORRUPT, fmt.INDEX_GROUP, reason))

    # files and plain layouts

    def walk_tree(self) -> None:
        """Mark the index's keys that have a readable dataset; datasets the index lacks are
        extra. One fast pass; should damaged metadata stop it, a slower pass that goes on."""
        index = self.index
        present = np.zeros(len(index), dtype=bool)
        extra: List[Problem] = []

        def found(key: str) -> None:
            if key in index:
                present[index.position(key)] = True
            else:
                extra.append(Problem(EXTRA, key, "a dataset in the archive that its index does not list"))

        reserved = fmt.INDEX_GROUP.encode() + b"/"

        def visit(name: bytes, info) -> None:
            if info.type == h5py.h5o.TYPE_DATASET and not name.startswith(reserved):
                found(name.decode("utf-8", "replace"))

        try:
            h5py.h5o.visit(self.reader.h5file.id, visit, info=True)
        except (RuntimeError, KeyError, OSError) as exc:
            log.info("%s: %s; walking the archive's groups one object at a time", index.path, one_line(exc))
            present[:] = False
            extra = []
            self._walk_tolerant(self.reader.h5file.id, b"", found)
        self._present = present
        self.tree_problems.extend(extra)
        entries = index.attrs.get(fmt.ATTR_ENTRIES)
        if entries is not None and safety.attr_int(index.attrs, fmt.ATTR_ENTRIES) != len(index):
            recorded = safety.attr_int(index.attrs, fmt.ATTR_ENTRIES)
            said = f"{recorded:,}" if recorded is not None else "a malformed count"
            self.tree_problems.append(Problem(CORRUPT, fmt.INDEX_GROUP, f"the index lists {len(index):,} entries, the archive records {said}"))

    def _walk_tolerant(self, gid, prefix: bytes, found: Callable[[str], None]) -> None:
        """Walk a group's links, skipping (and, unless keys lie there, reporting) what
        cannot be opened; keys under a damaged object are reported by the entry checks."""
        names: List[bytes] = []
        try:
            gid.links.iterate(lambda name: names.append(name))
        except (RuntimeError, KeyError, OSError) as exc:
            self.tree_problems.append(Problem(CORRUPT, (prefix.rstrip(b"/") or b"/").decode("utf-8", "replace"),
                                              f"the group cannot be listed: {one_line(exc)}"))
            return
        for name in names:
            path = prefix + name
            if path == fmt.INDEX_GROUP.encode():
                continue
            try:
                kind = h5py.h5o.get_info(gid, name).type
                if kind == h5py.h5o.TYPE_GROUP:
                    self._walk_tolerant(h5py.h5g.open(gid, name), path + b"/", found)
                elif kind == h5py.h5o.TYPE_DATASET:
                    found(path.decode("utf-8", "replace"))
            except (RuntimeError, KeyError, OSError, ValueError):
                continue  # its keys fail their own checks, naming the damage

    def _check_entry(self, pos: int, problems: List[Problem]) -> int:
        """Check one entry; returns 1 if its stored bytes had no checksum to check, else 0."""
        index, key = self.index, self.index.keys[pos]
        if self._present is not None and not self._present[pos]:
            problems.append(Problem(CORRUPT, key, self._absent(key)))
            return 0
        plain = not self.reader.layout.records_source
        kind = int(index.kind[pos])
        crcs = index.stored_crc32
        recorded = 0 if crcs is None or plain else int(crcs[pos])
        stored = int(index.stored[pos])
        # Entries stored as exact bytes are also checked against the source file's CRC-32.
        unchecked = int(plain or (kind == Kind.ARRAY and stored > 0 and recorded == 0))
        try:
            if int(index.offset[pos]) or plain or not stored:  # read_stored checks one block
                arr = self.reader.read_stored(pos)
            else:
                arr = self._check_chunked(pos, recorded)
        except CorruptEntryError as exc:
            problems.append(Problem(CORRUPT, key, " ".join(exc.reason.split())))
            return 0
        except (ArchiveError, OSError, ValueError, RuntimeError, KeyError) as exc:
            problems.append(Problem(CORRUPT, key, one_line(exc)))
            return 0
        if key in self.sources:
            why = compare_source(self.sources[key], int(index.size[pos]), int(index.crc32[pos]),
                                 arr if kind == Kind.BYTES and index.is_verbatim(pos) else None)
            if why:
                problems.append(Problem(CHANGED, key, why))
        return unchecked

    def _check_chunked(self, pos: int, recorded: int) -> Optional[np.ndarray]:
        """Check an entry that is not one block: its shape and dtype against the index, its
        chunks as stored against ``recorded`` (0: none recorded), each chunk decompressed
        and, for exact bytes, the bytes against the source's CRC-32. Chunks are decompressed
        here, in the calling thread, rather than by HDF5, which would hold h5py's global lock.
        Returns the stored bytes of a BYTES entry (for comparing with its source), else None.
        """
        index, key = self.index, self.index.keys[pos]
        dset = self.reader.dataset(pos)
        safety.check_chunks(dset, index.max_entry_bytes, index.path, key)
        codec = codecs.codec_by_id(int(index.codec[pos]))
        if dset.chunks is None or not codec.in_worker or not codec.can_decompress():
            if recorded and stored_crc32(dset) != recorded:
                raise CorruptEntryError("checksum of the stored bytes does not match")
            return self.reader.read_stored(pos)  # HDF5 decodes it
        kind = int(index.kind[pos])
        chunk_bytes = math.prod(dset.chunks) * dset.dtype.itemsize
        size = math.prod(dset.shape) * dset.dtype.itemsize
        crc = source_crc = done = 0
        verbatim = index.is_verbatim(pos)
        pieces: Optional[List[bytes]] = [] if verbatim and kind == Kind.BYTES and key in self.sources else None
        failure: Optional[str] = None
        decode = codec.decompress if codec.id != codecs.NONE else None
        for offset, _ in iter_chunk_offsets(dset.shape, dset.chunks):
            mask, raw = dset.id.read_direct_chunk(offset)
            crc = zlib.crc32(raw, crc)
            if failure:
                continue  # the checksum of the stored bytes, when recorded, is the better reason
            try:
                data = unpack_chunk(raw, decode, chunk_bytes, mask)
            except CorruptEntryError as exc:
                failure = f"chunk at {offset}: {exc.reason}"
                continue
            if verbatim:  # 1-D: chunks run in order, the last one padded
                piece = memoryview(data)[: size - done]
                source_crc = zlib.crc32(piece, source_crc)
                done += len(piece)
                if pieces is not None:
                    pieces.append(bytes(piece))
        if recorded and crc != recorded:
            raise CorruptEntryError("checksum of the stored bytes does not match")
        if failure:
            raise CorruptEntryError(failure)
        if verbatim and (size != int(index.size[pos]) or source_crc != int(index.crc32[pos])):
            raise CorruptEntryError("checksum of the source file's bytes does not match")
        return np.frombuffer(b"".join(pieces), np.uint8) if pieces is not None else None

    def _absent(self, key: str) -> str:
        """Why the tree walk found no dataset for ``key`` (the walk sees hard links only)."""
        f = self.reader.h5file
        try:
            safety.open_dataset(f, key)
        except KeyError:
            return "listed in the index, but the archive has no such dataset"
        except (UnsafeArchiveError, CorruptEntryError) as exc:
            return exc.reason
        except (RuntimeError, OSError, ValueError) as exc:
            return f"its dataset cannot be opened: {one_line(exc)}"
        return "listed in the index, but its dataset cannot be reached"

    def _check_source(self, pos: int) -> List[Problem]:
        key = self.index.keys[pos]
        if key not in self.sources:
            return []
        why = compare_source(self.sources[key], int(self.index.size[pos]), int(self.index.crc32[pos]))
        return [Problem(CHANGED, key, why)] if why else []




def _run_task(task: Callable[[], T]) -> T:
    return task()


def _ordered(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], inflight: int) -> Iterator[R]:
    """``map(fn, items)`` on ``pool``, in order, with at most ``inflight`` tasks queued."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= inflight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
