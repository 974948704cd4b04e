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
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

from . import layouts
from .display import progress_bar
from .engines import Task, open_engine
from .errors import OutputError, SourceError
from .shard_plan import (ATTEMPT_TAG, BYTES, ShardPlan, ShardSize, SourceEntry, attempt_files,
                         plan_shards, shard_name_pattern)
from .walk import SourceFiles

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
    files: SourceFiles
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
        return fd_identity(fd, size)
    finally:
        os.close(fd)


def fd_identity(fd: int, size: int) -> int:
    """:func:`file_identity` of the file open as ``fd``."""
    head = os.pread(fd, min(size, IDENTITY_BYTES), 0)
    tail = os.pread(fd, min(size, IDENTITY_BYTES), max(0, size - IDENTITY_BYTES))
    return zlib.crc32(tail, zlib.crc32(head))


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


def write_sharded(files: SourceFiles, dst: Path, size: ShardSize, *, task: Callable[[ShardJob], ShardRecord],
                  layout: str, job: Any, options: dict, report: Any, resume: bool, on_error: str,
                  progress: Optional[bool], engines: Engines, links: bool = False, overwrite: bool = False) -> None:
    """Write ``files`` as shards of at most ``size`` beside ``dst`` on ``engines``, each by
    ``task`` (a module-level function, so that it pickles to any worker), then ``dst`` as
    their master (:meth:`data2h5.layouts.sharded.ShardedLayout.write_master`); fills ``report``. The caller holds ``dst``'s output lock. An
    interrupted run's journal is resumed (``resume``), dropped (``overwrite``), or refused."""
    if os.path.join(os.path.abspath(dst.parent), "").startswith(files.root):  # the output lies in the source folder
        own = own_files(dst)
        files = files.where(lambda f: not own(f.path))
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
    tasks = [Task(f"shard {p.name}", task, (ShardJob(p, files[p.first:p.stop], **common),)) for p in todo]
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
        layouts.get(layouts.SHARDED).write_master(dst, ordered, layout=layout, options=options, report=report,
                                                  links=links)
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
