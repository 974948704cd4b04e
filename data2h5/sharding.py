"""Sharded conversion: shard archives written in parallel, and a master that reads them as one.

The sorted source files are cut into contiguous ranges (:mod:`data2h5.shard_plan`). Each
range becomes one complete, standalone archive beside the output, written by one task in
one process (a local pool worker or a Dask worker) with no pool of its own: it writes under
an attempt name, syncs and renames into place, so a re-run of the task never meets another
attempt's file. The output itself becomes the master (:mod:`data2h5.layouts.sharded`): the
shard table (name, size, CRC-32 of the whole file, identity, entries, key range) and the
concatenated index, optionally with an external link per key.

A shard is done once its file is renamed into place and its record (with its checksum) is in
the journal beside the master; a resume reuses the shards whose files still match their
records and runs the rest.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import h5py
import numpy as np

from . import format as fmt, layouts
from ._version import __version__
from .archive import create_index_group, read_index
from .display import progress_bar
from .engines import Task, open_engine, report_progress
from .errors import OutputError, SourceError
from .partial import Partial, create_part, publish
from .shard_plan import (ATTEMPT_TAG, BYTES, ShardPlan, ShardSize, SourceEntry, attempt_files, attempt_path,
                         plan_shards, shard_name_pattern)
from .walk import SourceFile

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".data2h5-shards"
IDENTITY_BYTES = 64 << 10  # from each end of a shard: its identity, checked at every open
_READ_BYTES = 8 << 20


class ShardRecord(NamedTuple):
    """One finished shard, as the master's table and the journal record it."""

    name: str  # file name, in the master's folder
    size: int  # bytes of the file
    crc32: int  # CRC-32 of the whole file (verify, resume)
    identity: int  # CRC-32 of its first and last IDENTITY_BYTES (every open)
    entries: int
    first_key: str
    last_key: str
    skipped: list  # [[key, reason], ...] of its files that could not be read
    bytes_in: int  # source bytes of its entries
    bytes_decoded: int


class Engines(NamedTuple):
    """Where the shard tasks run: a local pool of ``workers`` processes, or Dask (one of
    ``scheduler``, ``dask_workers``, ``client``)."""

    workers: int
    start_method: Optional[str] = None
    scheduler: Optional[str] = None
    dask_workers: Optional[int] = None
    client: Any = None

    def open(self, tasks: int):
        return open_engine(workers=max(1, min(self.workers, tasks)), scheduler=self.scheduler, client=self.client,
                           dask_workers=self.dask_workers, start_method=self.start_method)


class ShardJob(NamedTuple):
    """Everything one shard task needs, picklable."""

    plan: ShardPlan
    files: List[SourceFile]
    folder: str  # where the shard goes (the master's folder)
    layout: str
    job: Any  # convert.WorkerConfig
    options: dict
    source: str
    reader: str
    compression: str
    on_error: str


# --- checksums ----------------------------------------------------------------------------

def file_crc32(path: os.PathLike) -> int:
    """CRC-32 of a whole file (about twice as fast as SHA-256 here)."""
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            block = fh.read(_READ_BYTES)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def file_identity(path: os.PathLike, size: int) -> int:
    """CRC-32 of the first and last :data:`IDENTITY_BYTES` of a file of ``size`` bytes: cheap
    enough for every open, and different for another archive of the same size."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        head = os.pread(fd, min(size, IDENTITY_BYTES), 0)
        tail = os.pread(fd, min(size, IDENTITY_BYTES), max(0, size - IDENTITY_BYTES))
    finally:
        os.close(fd)
    return zlib.crc32(tail, zlib.crc32(head))


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- one shard, in a worker -------------------------------------------------------------------

def convert_shard(task: ShardJob) -> ShardRecord:
    """Write one shard: its files converted in this process into an attempt file, synced,
    checksummed and renamed onto the shard's name. Idempotent, so Dask may re-run it."""
    from .convert import Report, convert_files

    final = Path(task.folder) / task.plan.name
    attempt = attempt_path(final)
    report = Report(task.source, str(final), task.layout, task.reader, task.compression)
    convert_files(task.files, attempt, layout=task.layout, job=task.job, options=task.options, report=report,
                  on_error=task.on_error, on_file=report_progress)  # synced and renamed onto ``attempt``
    size = attempt.stat().st_size
    crc, identity = file_crc32(attempt), file_identity(attempt, size)
    os.replace(attempt, final)
    _sync_folder(final.parent)
    skipped = {key for key, _ in report.skipped}
    kept = [f.key for f in task.files if f.key not in skipped]
    return ShardRecord(task.plan.name, size, crc, identity, report.entries, kept[0], kept[-1],
                       [list(s) for s in report.skipped], report.bytes_in, report.bytes_decoded)


# --- the journal of done shards ------------------------------------------------------------

class ShardJournal:
    """Beside the master: a header (options and plan), then one JSON line per done shard,
    each synced before the shard counts as done."""

    def __init__(self, dst: Path):
        self.path = dst.with_name(f".{dst.name}{JOURNAL_SUFFIX}")
        self._fh = None

    def done(self, options: dict, plan: Sequence[ShardPlan]) -> Dict[str, ShardRecord]:
        """The recorded shards of the same options and plan whose files still hold what the
        record says (size and whole-file CRC-32)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return {}
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # a torn last line
        if not records or records[0] != self._header(options, plan):
            if records:
                log.warning("%s: the interrupted sharded conversion used other options or files; starting over",
                            self.path)
            return {}
        names = {p.name for p in plan}
        done = {}
        folder = self.path.parent
        for raw in records[1:]:
            try:
                record = ShardRecord(*raw)
            except TypeError:
                continue
            path = folder / record.name
            if record.name not in names or not path.is_file() or path.stat().st_size != record.size:
                continue
            if file_crc32(path) != record.crc32:
                log.info("%s no longer matches its record; writing it again", path)
                continue
            done[record.name] = record
        return done

    @staticmethod
    def _header(options: dict, plan: Sequence[ShardPlan]) -> dict:
        return {"options": options, "plan": [[p.name, p.first_key, p.last_key, p.entries] for p in plan]}

    def start(self, options: dict, plan: Sequence[ShardPlan], reused: Sequence[ShardRecord]) -> None:
        """A new journal: the header and the shards reused."""
        tmp = self.path.with_name(self.path.name + ".new")
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in [self._header(options, plan), *reused]:
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def record(self, record: ShardRecord) -> None:
        self._fh.write(json.dumps(list(record)) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


# --- the conversion ----------------------------------------------------------------------------

def own_files(dst: Path) -> Callable[[str], bool]:
    """Whether a walked path is one of the sharded output's own files (shards of any plan,
    attempts, the journal): a source folder holding the output must not convert them."""
    pattern, folder = shard_name_pattern(dst), dst.parent
    journal = f".{dst.name}{JOURNAL_SUFFIX}"

    def own(path: str) -> bool:
        path = os.path.abspath(path)
        if os.path.dirname(path) != str(folder):
            return False
        name = os.path.basename(path)
        return bool(pattern.fullmatch(name)) or ATTEMPT_TAG in name or name.startswith(journal)
    return own


def write_sharded(files: List[SourceFile], dst: Path, size: ShardSize, *, layout: str, job: Any, options: dict,
                  report: Any, resume: bool, on_error: str, progress: Optional[bool], engines: Engines,
                  links: bool = False, overwrite: bool = False) -> None:
    """Write ``files`` as shards of at most ``size`` beside ``dst`` on ``engines``, then
    ``dst`` as their master; fills ``report``. The caller holds ``dst``'s output lock. An
    interrupted run's journal is resumed (``resume``), dropped (``overwrite``), or refused."""
    own = own_files(dst)
    files = [f for f in files if not own(f.path)]
    if not files:
        raise SourceError(f"no file under {report.source} to convert besides the output's own shards")
    entries = [SourceEntry(f.key, os.stat(f.path).st_size if size.unit == BYTES else 0) for f in files]
    plan = plan_shards(entries, size, dst)
    journal = ShardJournal(dst)
    if journal.path.exists() and not (resume or overwrite):
        raise OutputError(f"an interrupted sharded conversion into {dst} was found ({journal.path.name}); rerun "
                          "with --resume to reuse its finished shards, or with --overwrite to start over")
    done = journal.done(options, plan) if resume else {}
    if not resume:
        journal.discard()
    for p in plan:  # what killed attempts left (the lock says no other conversion writes here)
        _remove_attempts(dst.parent / p.name)
    journal.start(options, plan, [list(done[p.name]) for p in plan if p.name in done])
    todo = [p for p in plan if p.name not in done]
    common = dict(folder=str(dst.parent), layout=layout, job=job, options=options, source=report.source,
                  reader=report.reader, compression=report.compression, on_error=on_error)
    tasks = [Task(f"shard {p.name}", convert_shard, (ShardJob(p, files[p.first:p.stop], **common),)) for p in todo]
    records = dict(done)
    reused_files = sum(p.entries for p in plan if p.name in done)
    try:
        if tasks:
            with engines.open(len(tasks)) as engine:
                engine.check_folders(report.source, str(dst.parent))
                log.info("writing %d of %d shards on %s", len(tasks), len(plan), engine.description)
                bar = progress_bar(len(files), progress)
                bar.update(reused_files)
                try:
                    def finished(i: int, record: ShardRecord) -> None:
                        records[record.name] = record
                        journal.record(record)
                    engine.run(tasks, on_progress=bar.update, on_done=finished)
                finally:
                    bar.close()
        for p in plan:
            _remove_attempts(dst.parent / p.name)
        ordered = [records[p.name] for p in plan]
        write_master(dst, ordered, layout=layout, options=options, report=report, links=links)
    finally:
        journal.close()
    journal.discard()
    report.reused = sum(records[p.name].entries for p in plan if p.name in done)
    report.entries = sum(r.entries for r in ordered)
    report.bytes_in = sum(r.bytes_in for r in ordered)
    report.bytes_decoded = sum(r.bytes_decoded for r in ordered)
    report.skipped.extend(tuple(s) for r in ordered for s in r.skipped)
    report.bytes_out = dst.stat().st_size + sum(r.size for r in ordered)


def _remove_attempts(final: Path) -> None:
    for path in attempt_files(final):
        try:
            path.unlink()
        except OSError as exc:
            log.debug("cannot remove %s: %s", path, exc)


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
                values = np.array([k.encode("utf-8") for k in index.keys] or [b""], dtype=bytes)[:n]
            elif name == fmt.STORED_CRC32 and index.stored_crc32 is None:
                values = np.zeros(n, np.uint32)
            elif name == fmt.VERBATIM:
                values = np.fromiter((index.is_verbatim(i) for i in range(n)), dtype=np.uint8, count=n)
            elif name == "shape":  # padded to MAX_NDIM with -1, whatever width the shard keeps
                values = np.full((n, fmt.MAX_NDIM), -1, np.int64)
                width = min(index.shape.shape[1] if index.shape.ndim == 2 else 0, fmt.MAX_NDIM)
                values[:, :width] = index.shape[:, :width]
            else:
                values = getattr(index, name)
            parts[name].append(values)
        parts[SHARD].append(np.full(n, number, np.uint32))
        parts[ROW].append(np.arange(n, dtype=np.uint64))
    data: Dict[str, np.ndarray] = {}
    for name, values in parts.items():
        dtype = fmt.INDEX_FIELDS.get(name)
        joined = np.concatenate(values) if values else np.zeros((0,) + ((fmt.MAX_NDIM,) if name == "shape" else ()))
        if name == "keys":
            joined = joined.astype(f"S{max(joined.dtype.itemsize, 1)}")
        elif dtype is not None:
            joined = joined.astype(dtype)
        else:
            joined = joined.astype(np.uint32 if name == SHARD else np.uint64)
        data[name] = joined
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
        group = create_index_group(f)
        for name, values in data.items():
            group.create_dataset(name, data=values, compression="gzip" if len(values) else None,
                                 chunks=True if len(values) else None)
        if links:
            names = [r.name for r in records]
            for raw, number in zip(data["keys"].tolist(), data[SHARD].tolist()):
                key = raw.decode("utf-8")
                f[key] = h5py.ExternalLink(names[number], key)
        attrs = f.attrs
        attrs[fmt.ATTR_FORMAT] = fmt.FORMAT_VERSION
        attrs[fmt.ATTR_VERSION] = __version__
        attrs[fmt.ATTR_LAYOUT] = layouts.SHARDED
        attrs[SHARD_LAYOUT] = layout
        attrs[fmt.ATTR_READER] = report.reader
        attrs[fmt.ATTR_PRUNE] = options["prune"]
        attrs[fmt.ATTR_EXTENSIONS] = json.dumps(options["extensions"])
        attrs[fmt.ATTR_FOLLOW_SYMLINKS] = options["follow_symlinks"]
        attrs[fmt.ATTR_SOURCE] = report.source
        attrs[fmt.ATTR_CREATED] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        attrs[fmt.ATTR_COMPRESSION] = report.compression
        attrs[fmt.ATTR_ENTRIES] = sum(r.entries for r in records)
        skipped = [list(s) for s in report.skipped] + [s for r in records for s in r.skipped]
        attrs[fmt.ATTR_SKIPPED] = json.dumps(skipped)
        attrs[fmt.ATTR_BYTES_IN] = sum(r.bytes_in for r in records)
        attrs[fmt.ATTR_BYTES_OUT] = sum(r.size for r in records)
        attrs[SHARD_LINKS] = bool(links)
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


def verify_shard(number: int, path: str, max_entry_bytes: int, threads: int) -> ShardCheck:
    """A task: verify one shard as an archive of its own and checksum the whole file."""
    from .errors import ArchiveError
    from .verify import verify

    try:
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
    import time

    import importlib

    from .engines import LocalPool, DaskEngine

    verifying = importlib.import_module("data2h5.verify")  # the package exports verify() under that name

    started = time.perf_counter()
    report = verifying.VerifyReport(os.path.abspath(archive), index.layout, len(index))
    folder = os.path.dirname(os.path.abspath(archive))
    count = len(index.shards)
    engine = DaskEngine.connect(scheduler) if scheduler else LocalPool(max(1, min(workers or os.cpu_count() or 1,
                                                                                    count)))
    threads = 2 if scheduler else max(1, (workers or os.cpu_count() or 1) // max(1, min(count, workers or 1)))
    tasks = [Task(f"shard {s.name}", verify_shard, (n, os.path.join(folder, s.name), max_entry_bytes, threads))
             for n, s in enumerate(index.shards)]
    bar = progress_bar(len(index), progress, unit="entry")
    try:
        with engine:
            engine.check_folders(folder, folder)
            checks = engine.run(tasks, on_done=lambda i, c: bar.update(index.shards[i].entries))
    finally:
        bar.close()
    Problem, CORRUPT = verifying.Problem, verifying.CORRUPT
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
        from pathlib import Path

        sources = verifying._walk_source(index, Path(source), ext, prune, follow_symlinks, archive, report)
        own = own_files(Path(archive).absolute())
        sources = {k: p for k, p in sources.items() if not own(p)}
        report.source_files = len(sources)
        skipped = verifying.recorded_skips(index)
        for key, path in sources.items():
            if key not in index:
                if key not in skipped:
                    report.problems.append(Problem(verifying.MISSING, key, "in the source folder, not in the archive"))
                continue
            pos = index.position(key)
            reason = verifying.compare_source(path, int(index.size[pos]), int(index.crc32[pos]))
            if reason is not None:
                report.problems.append(Problem(verifying.CHANGED, key, reason))
        report.problems.extend(Problem(verifying.EXTRA, key, "in the archive, not in the source folder")
                               for key in index.keys if key not in sources)
    report.notes.append(f"{count} shards verified on {engine.description}")
    report.elapsed = time.perf_counter() - started
    return report
