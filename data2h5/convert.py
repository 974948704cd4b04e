"""``convert``: a folder of loose files → one HDF5 archive, decoded and compressed on every core."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
import warnings
import zlib
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import format as fmt, layouts
from .codecs import Codec, choose_codec, parse_compression
from .display import decimal_size, progress_bar
from .errors import Data2H5Error, Interrupted, LayoutError, OutputError, PluginError, ReadError, SourceError, WorkerError
from .format import Kind
from .archive import open_h5
from .jpeg import check_decode_size
from .partial import (CHECKPOINT_SECONDS, Checkpoints, InterruptedRun, Journal, OutputLock, Partial, check_output,
                      create_part, load_previous, publish, sync_folder, write_root_attrs)
from .resume import previous_work, reuse
from .plugins import Plugin, PluginSpec, load
from .prune import normalize_extensions
from .sources import check_folder, collect, load_prune
from .readers import AUTO, BUILTIN_READERS, BuiltinReader, read_source, reader_for_extension
from .transport import Slots, compress_in_slot, share
from .walk import SourceFile
from .engines import exit_with_parent, report_progress, stop_processes
from .shard_plan import attempt_path, parse_shard_size
from .sharding import Engines, ShardJob, ShardRecord, file_crc32, file_identity, write_sharded
from .encoding import Failed, Packed, pack

log = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
LAYOUTS = layouts.writable()
#: Source bytes one task should carry: big enough to amortise the pool's traffic, small
#: enough that bounded in-flight work keeps memory flat.
TASK_BYTES = 4 << 20
MAX_TASK_FILES = 256  # many tiny files per task: each submission costs the writer ~2 ms of GIL hand-offs
INFLIGHT_PER_WORKER = 4
#: ... and little enough work that a task with a slow reader comes back within this time:
#: results keep flowing to the writer and its checkpoints, so a kill loses little.
TASK_SECONDS = 0.25
SLOT_BYTES = 2 * TASK_BYTES
CHUNKS_IN_FLIGHT = 4  # a layout's chunks being compressed by workers at once
#: Default cap on one file's value as read: a reader gone wrong must not take the machine.
MAX_ENTRY_BYTES = 4 << 30


@dataclass
class Report:
    """What a conversion did."""

    source: str
    output: str
    layout: str
    reader: str
    compression: str
    entries: int = 0
    bytes_in: int = 0  # source bytes of the stored files
    bytes_decoded: int = 0  # size of the values as read, before compression
    bytes_out: int = 0  # size of the archive file
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    elapsed: float = 0.0
    reused: int = 0  # entries a resume took from the interrupted run instead of reading them again

    @property
    def ratio(self) -> float:
        """Archive size over source size."""
        return self.bytes_out / self.bytes_in if self.bytes_in else 0.0

    def summary(self) -> str:
        """One line for the end of a run."""
        rate = self.entries / self.elapsed if self.elapsed else 0.0
        line = (
            f"{self.entries} files, {decimal_size(self.bytes_in)} → {decimal_size(self.bytes_out)} ({self.ratio:.2f}×), "
            f"{len(self.skipped)} skipped, {self.elapsed:.1f} s ({rate:.0f} files/s) → {self.output}"
        )
        if self.reused:
            line += f"\nresumed: {self.reused} files reused from the interrupted run, {self.entries - self.reused} read"
        if self.skipped:
            shown = "; ".join(f"{k}: {r}" for k, r in self.skipped[:3])
            line += f"\nskipped: {shown}" + (f" (and {len(self.skipped) - 3} more)" if len(self.skipped) > 3 else "")
        if self.bytes_in and self.bytes_decoded > 3 * self.bytes_in and self.reader != "bytes":
            line += (
                f"\nnote: decoded data is {self.bytes_decoded / self.bytes_in:.1f}× the source; "
                "--reader bytes stores the files as they are (about the source size) and decodes on read"
            )
        return line



@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, picklable: plugin specs travel, not functions."""

    reader: Optional[PluginSpec]
    codec: Optional[Codec]
    pack: bool  # compress each entry (the layout's writer stores chunks as they come)
    timeout: Optional[float] = None  # seconds per file
    max_bytes: Optional[int] = MAX_ENTRY_BYTES
    decode_size: Optional[Tuple[int, int]] = None  # JPEGs read as images: decode at the DCT scale covering it


_worker_reader: Optional[Plugin] = None
_worker_builtin = True  # the reader is a built-in one (or the auto rule)
_worker_job: Optional[WorkerConfig] = None


def _init_worker(job: WorkerConfig, ignore_sigint: bool = True) -> None:
    global _worker_reader, _worker_builtin, _worker_job
    if ignore_sigint:  # a pool worker (not the in-process path)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler inherited through fork
        exit_with_parent()
    _worker_job = job
    _worker_reader = _resolve_reader(job.reader)
    _worker_builtin = _worker_reader is None or isinstance(_worker_reader.func, BuiltinReader)


def _resolve_reader(spec: Optional[PluginSpec]) -> Optional[Plugin]:
    if spec is None or spec == AUTO:
        return None
    return load(spec, "reader", BUILTIN_READERS)


def _process(files: Sequence[SourceFile], slot: Optional[str] = None, slot_size: int = 0) -> list:
    """Worker task: read, checksum, decode and compress each file.

    Returns a list of :class:`Packed`, or :class:`Failed` for a file that failed: errors are
    reported, not raised, so one bad file does not lose the batch. Payloads go into the
    shared ``slot`` when one is given.
    """
    out = []
    for src in files:
        try:
            out.append(_process_one(src))
        except (ReadError, PluginError) as exc:
            out.append(Failed(src.key, exc))
    return share(out, slot, slot_size)


def _process_one(src: SourceFile) -> Packed:
    job = _worker_job
    with _deadline(job.timeout, src.path):
        try:
            with open(src.path, "rb") as fh:
                mtime_ns = os.fstat(fh.fileno()).st_mtime_ns
                raw = fh.read()
        except OSError as exc:
            raise ReadError(src.path, f"cannot open: {exc.strerror or exc}") from exc
        ext = os.path.splitext(src.name)[1].lower()
        func = reader_for_extension(ext) if _worker_reader is None else _worker_reader.func
        if not getattr(func, "warns", True):
            kind, arr = read_source(_worker_reader, src.path, raw, ext, job.max_bytes, job.decode_size)
        else:
            with warnings.catch_warnings(record=True) as caught:  # a decoder's remarks on one file: -v shows them
                warnings.simplefilter("always")
                kind, arr = read_source(_worker_reader, src.path, raw, ext, job.max_bytes, job.decode_size)
            for warning in caught:
                log.info("%s: %s", src.path, " ".join(str(warning.message).split()))
    crc = zlib.crc32(raw)
    if not job.pack:
        return Packed(key=src.key, kind=int(kind), dtype=arr.dtype.str, shape=arr.shape, codec=0, chunk_shape=None,
                      data=arr, size=len(raw), crc32=crc, nbytes=arr.nbytes, mtime_ns=mtime_ns)
    codec = choose_codec(job.codec, kind, ext)
    packed = pack(src.key, int(kind), arr, codec, len(raw), crc, mtime_ns)
    if kind != Kind.ARRAY and (_worker_builtin or (arr.nbytes == len(raw) and arr.tobytes() == raw)):
        packed = packed._replace(verbatim=True)  # built-in readers store text and bytes as read
    return packed


class _TimedOut(BaseException):
    """Raised by the per-file alarm; a BaseException so that no reader's ``except Exception``
    swallows it."""


@contextmanager
def _deadline(seconds: Optional[float], path: str) -> Iterator[None]:
    """Raise :class:`ReadError` for ``path`` if the block takes longer than ``seconds`` (a
    SIGALRM timer: it interrupts Python code and blocking calls, not a C loop that never
    returns to the interpreter)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise _TimedOut()

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _TimedOut:
        raise ReadError(
            path, f"still reading after {seconds:g} s (--timeout); the file or the reader hangs: check it"
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def convert(
    src: Union[str, os.PathLike],
    dst: Union[str, os.PathLike],
    *,
    ext: Union[str, Iterable[str]] = (),
    reader: Optional[PluginSpec] = None,
    prune: Optional[PluginSpec] = None,
    workers: Optional[int] = None,
    compression: str = "auto",
    layout: str = fmt.LAYOUT_FILES,
    overwrite: bool = False,
    resume: bool = False,
    on_error: str = "fail",
    follow_symlinks: bool = False,
    timeout: Optional[float] = None,
    max_entry_bytes: Optional[int] = MAX_ENTRY_BYTES,
    decode_size: Optional[Tuple[int, int]] = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    progress: Optional[bool] = False,
    start_method: Optional[str] = None,
    shard_size: Optional[str] = None,
    scheduler: Optional[str] = None,
    dask_workers: Optional[int] = None,
    client: Optional[object] = None,
    shard_links: bool = False,
) -> Report:
    """Convert every file under ``src`` that ``prune`` keeps into the HDF5 archive ``dst``.

    ``ext``: extensions to keep (case-insensitive, with or without the dot). ``reader``: a
    built-in name (``auto``, ``image``, ``bytes``, ``npy``, ``text``), a plugin spec
    (``module:function``, ``file.py:function``, an entry-point name) or a function;
    ``None`` picks per file by extension. ``prune``: ``prune(filename, ext) -> bool``, same
    forms. ``workers``: processes (default: every core; 1 works in this process).
    ``compression``: ``auto``, ``none``, ``lzf``, ``gzip[:L]``, ``zstd[:L]``, ``blosc-lz4[:L]``.
    ``on_error``: ``fail`` stops at the first bad file, ``skip`` records it and goes on.
    ``timeout``: seconds one file may take to read and decode. ``max_entry_bytes``: the
    largest value one file may decode to. ``decode_size``: ``(height, width)``; the image reader
    decodes JPEGs at the smallest DCT scale (1, 1/2, 1/4, 1/8) still at least that large (not
    the array of a full decode and a resize). ``checkpoint_seconds``: at most this long between
    journal checkpoints, so at most this much work is lost to a kill. ``progress``: a tqdm bar on stderr; ``None`` shows
    it only when stderr is a terminal.

    Nothing is written at ``dst`` unless the whole conversion succeeds. Until then the work
    lives in part files beside it (:mod:`data2h5.partial`); an interrupted run keeps them,
    and ``resume=True`` continues from them, reading again only what they do not hold
    safely or what changed since. Only one conversion may write ``dst`` at a time.

    ``shard_size`` (``"2G"`` of source bytes, ``"50000files"``): write shard archives beside
    ``dst``, each a contiguous range of the sorted keys, in parallel (``workers`` local
    processes, or a Dask cluster: ``scheduler`` address, a ``client``, or ``dask_workers``
    local Dask processes), and ``dst`` as the master that reads them as one archive (see
    :mod:`data2h5.sharding`). ``resume`` then reuses the shards already done. ``shard_links``:
    an HDF5 external link per key in the master, so plain h5py finds ``f[key]`` (2 s and 7 MB
    more for 100,000 keys, 76 s and 83 MB for a million: off by default).
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst).absolute()
    exts = normalize_extensions([ext] if isinstance(ext, str) else ext)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    kept_as = layouts.get(layout)
    if shard_size is None and (scheduler, dask_workers, client) != (None, None, None):
        raise ValueError("scheduler, dask_workers and client write shards: give shard_size too")
    shards = None
    if shard_size is not None:
        shards = parse_shard_size(shard_size)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    check_folder(src, "give the folder holding your files")
    check_output(dst, overwrite=True)  # the folder: before walking, as a large tree takes a while
    codec = parse_compression(compression)
    prune_plugin = load_prune(prune)
    if prune is None and not exts:
        raise SourceError("no extension given: pass --ext (e.g. --ext jpg) or a --prune plugin")
    _resolve_reader(reader)  # fail fast, in this process, on a plugin that does not load
    workers = max(1, workers or os.cpu_count() or 1)
    reader_name = _spec_name(reader)
    if decode_size is not None:
        if reader_name not in (AUTO, "image"):
            raise ValueError(f"decode_size applies to the image reader (auto or image), not {reader_name!r}; leave it out")
        decode_size = check_decode_size(decode_size)
        reader_name += f" (decode size {decode_size[0]}x{decode_size[1]})"  # recorded, and a resume must match it
    report = Report(str(src.absolute()), str(dst), layout, reader_name, codec.spec if codec else "auto")
    options = {
        "source": report.source, "extensions": list(exts), "prune": prune_plugin.spec, "reader": report.reader,
        "compression": report.compression, "layout": layout, "follow_symlinks": bool(follow_symlinks),
    }
    if shards is not None:
        options["shard_size"] = list(shards)
    partial = Partial(dst)
    with OutputLock(partial):
        previous = previous_work(partial, options, resume, overwrite)
        if resume and previous is None and dst.exists():
            log.warning("nothing to resume: %s is complete", dst)
            return _report_of(dst, report, started)
        check_output(dst, overwrite)
        gen = partial.next_generation()
        files, bad_names = collect(
            src, exts, prune_plugin, follow_symlinks=follow_symlinks,
            exclude=[dst, partial.lock_path, *partial.files(), partial.part(gen), partial.journal(gen)],
        )
        if bad_names and on_error == "fail":
            key, reason = bad_names[0]
            raise ReadError(str(src / key), reason, skippable=True).add_context(
                _skip_hint(len(previous) if previous is not None else 0))
        if not files:
            what = f"--ext {' '.join(exts)}" if exts else f"--prune {prune_plugin.spec}"
            raise SourceError(f"no file under {src} matched {what}; check the extension or the prune plugin")
        report.skipped.extend(bad_names)
        job = WorkerConfig(reader, codec, kept_as.packed_by_workers, timeout, max_entry_bytes, decode_size)
        if shards is not None:
            write_sharded(files, dst, shards, task=convert_shard, layout=layout, job=job, options=options,
                          report=report, resume=resume, on_error=on_error, progress=progress, links=shard_links,
                          overwrite=overwrite,
                          engines=Engines(workers, start_method, scheduler, dask_workers, client))
            report.elapsed = time.perf_counter() - started
            log.info("%s", report.summary())
            return report
        log.info("converting %d files from %s with %d workers", len(files), src, workers)
        _write(files, kept_as, job, previous, partial, gen, options, report, workers, start_method, progress,
               on_error, checkpoint_seconds)
    report.bytes_out = dst.stat().st_size
    report.elapsed = time.perf_counter() - started
    log.info("%s", report.summary())
    return report


def convert_files(files: Sequence[SourceFile], dst: Path, *, layout: str, job: WorkerConfig, options: dict,
                  report: Report, on_error: str = "fail", on_file: Optional[Callable[[int], None]] = None) -> Report:
    """Convert ``files`` (part of a walk, in key order) into the complete archive ``dst``, in this
    process (no pool: it may run where processes cannot have children, e.g. a Dask worker).
    ``on_file(n)`` is called as files are done. Used to write each shard of a sharded archive."""
    partial = Partial(Path(dst))
    _write(files, layouts.get(layout), job, None, partial, partial.next_generation(), options, report, 1, None, False,
           on_error, CHECKPOINT_SECONDS, on_file=on_file)
    report.bytes_out = Path(dst).stat().st_size
    return report


def convert_shard(task: ShardJob) -> ShardRecord:
    """Write one shard: its files converted in this process into an attempt file, synced,
    checksummed and renamed onto the shard's name. Idempotent, so Dask may re-run it."""
    final = Path(task.folder) / task.plan.name
    attempt = attempt_path(final)
    report = Report(task.source, str(final), task.layout, task.reader, task.compression)
    convert_files(task.files, attempt, layout=task.layout, job=task.job, options=task.options, report=report,
                  on_error=task.on_error, on_file=report_progress)  # synced and renamed onto ``attempt``
    size = attempt.stat().st_size
    crc, identity = file_crc32(attempt), file_identity(attempt, size)
    os.replace(attempt, final)
    sync_folder(final.parent)
    skipped = {key for key, _ in report.skipped}
    kept = [f.key for f in task.files if f.key not in skipped]
    return ShardRecord(task.plan.name, size, crc, identity, report.entries, kept[0], kept[-1],
                       [list(s) for s in report.skipped], report.bytes_in, report.bytes_decoded)


def _write(files: Sequence[SourceFile], layout: layouts.Layout, job: WorkerConfig, previous: Optional[InterruptedRun], partial: Partial, gen: int, options: dict,
           report: Report, workers: int, start_method: Optional[str], progress: Optional[bool], on_error: str,
           checkpoint_s: float, on_file: Optional[Callable[[int], None]] = None) -> None:
    """Build the archive in part ``gen``, reusing ``previous`` work, and publish it."""
    dst = partial.dst
    older = partial.generations()
    part = partial.part(gen)
    journal = Journal(partial.journal(gen), {"options": options, "pid": os.getpid()})
    f = writer = None
    pool = _Workers(job, workers if files else 1, start_method)
    finished = False
    try:
        f = create_part(part)
        writer = layout.open_writer(f, entries=len(files), codec=job.codec,
                                    checkpoints=Checkpoints(f, journal, checkpoint_s), compress=pool.compress)
        bar = progress_bar(len(files), progress)
        try:
            todo = files
            if previous is not None:
                reused = reuse(previous, files, writer, partial, layout)
                todo = reused.todo
                report.reused = report.entries = reused.entries
                report.bytes_in, report.bytes_decoded = reused.bytes_in, reused.bytes_decoded
                report.skipped.extend(reused.skipped)
                bar.update(len(files) - len(todo))
                writer.checkpoint()
                partial.discard(older)  # what they held is in this generation now
            for item in pool.results(todo) if todo else ():
                if isinstance(item, Failed):
                    key, error = item
                    if on_error == "fail":
                        if isinstance(error, ReadError):
                            raise ReadError(error.path, error.reason, skippable=True) from error
                        raise error
                    log.warning("skipping %s", error)
                    reason = getattr(error, "reason", str(error))
                    report.skipped.append((key, reason))
                    writer.skip(key, reason)
                else:
                    writer.add(item)
                    report.entries += 1
                    report.bytes_in += item.size
                    report.bytes_decoded += item.nbytes
                bar.update(1)
                if on_file is not None:
                    on_file(1)
                if not bar.disable and bar.n % 64 == 0:
                    bar.set_postfix_str(f"{report.bytes_in / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s", refresh=False)
            if report.entries == 0:
                raise SourceError(f"every matching file under {report.source} failed; nothing to write ({report.skipped[0][1]})")
            order = {src.key: i for i, src in enumerate(files)} if report.reused else None
            stored = writer.close(order)
            finished = True
        finally:
            bar.close()
        write_root_attrs(f, report, options, layout=report.layout, entries=report.entries, skipped=report.skipped,
                         bytes_in=report.bytes_in, bytes_out=stored)
        publish(f, part, dst)
    except BaseException as exc:
        kept = _keep_partial(exc, f, writer, partial)
        skippable = isinstance(exc, ReadError) and exc.skippable
        if skippable:  # the way on that works from here, kept work included
            exc.add_context(_skip_hint(kept))
        if isinstance(exc, OSError):  # a full disk, a file-size limit: say it in one line
            exc = OutputError(f"cannot write {dst}: {_os_reason(exc)}; free space, or raise the file-size limit")
        if kept and not skippable:  # the CLI says how to go on
            if isinstance(exc, (Data2H5Error, Interrupted)):
                exc.kept = kept
            elif isinstance(exc, KeyboardInterrupt):
                raise Interrupted(kept) from exc
        raise exc
    finally:
        pool.close(stop=not finished)
        journal.close()
    partial.discard()


def _skip_hint(kept: int) -> str:
    """How to go on without a file that stopped a run: with ``kept`` entries kept for a
    resume, the command must resume too, or it is refused."""
    if kept:
        return (f"the {kept} files converted so far are kept: to go on without this one, rerun with "
                "--resume --on-error skip (resume=True, on_error='skip')")
    return "or pass --on-error skip to go on without it"


def _os_reason(exc: OSError) -> str:
    """The system's words for a failed write; HDF5's own message spans lines and names a buffer."""
    if exc.errno:
        return os.strerror(exc.errno)
    found = re.search(r"error message = '([^']+)'", str(exc))
    return found.group(1) if found else str(exc).splitlines()[0]


def _keep_partial(exc: BaseException, f, writer, partial: Partial) -> int:
    """After a failure: journal what can be, close the part, and keep the partial files if
    a resume could use them; returns the number of entries kept (0: all removed)."""
    useless = isinstance(exc, (LayoutError, SourceError))  # resuming would meet them again
    if writer is not None and not useless:
        try:
            writer.checkpoint()
        except Exception as err:  # a full disk, most likely: what is journaled already stays
            log.debug("no final checkpoint: %s", err)
    if f is not None:
        try:
            f.close()
        except Exception as err:
            log.debug("closing the part file failed: %s", err)
    kept = 0 if useless else len(load_previous(partial))
    if not kept:
        partial.discard()
    return kept


def _report_of(dst: Path, report: Report, started: float) -> Report:
    """The report of a conversion already complete (a resume with nothing left to do)."""
    with open_h5(dst) as f:
        report.entries = int(f.attrs.get(fmt.ATTR_ENTRIES, 0))
        report.bytes_in = int(f.attrs.get(fmt.ATTR_BYTES_IN, 0))
        report.skipped = [tuple(s) for s in json.loads(f.attrs.get(fmt.ATTR_SKIPPED, "[]"))]
    report.bytes_out = dst.stat().st_size
    report.elapsed = time.perf_counter() - started
    return report


class _Workers:
    """The processes that read, decode and compress: a pool with shared slots for their
    results (none with one worker: then this process does the work as it goes)."""

    def __init__(self, job: WorkerConfig, workers: int, start_method: Optional[str]):
        self.job, self.workers = job, workers
        self.pool: Optional[ProcessPoolExecutor] = None
        if workers == 1:
            return
        self.slots = Slots(workers * INFLIGHT_PER_WORKER, SLOT_BYTES)
        self.chunk_slots = Slots(CHUNKS_IN_FLIGHT, SLOT_BYTES)  # a layout's chunks, to compress here
        self._others = set(multiprocessing.active_children())  # children not the pool's: never stopped here
        ctx = multiprocessing.get_context(start_method)
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(job,))

    def compress(self, codec: Codec, chunk: np.ndarray) -> Optional["_CompressedChunk"]:
        """Have a worker compress ``chunk`` (copied into a shared slot); None when there is no
        pool, no free slot or the chunk does not fit one: the caller compresses it itself."""
        if self.pool is None or not self.chunk_slots.free or chunk.nbytes > self.chunk_slots.size:
            return None
        slot = self.chunk_slots.free.pop()
        self.chunk_slots.view(slot)[: chunk.nbytes] = chunk.reshape(-1).view(np.uint8)
        future = self.pool.submit(compress_in_slot, self.chunk_slots.paths[slot], self.chunk_slots.size, chunk.nbytes,
                                  codec)
        return _CompressedChunk(self.chunk_slots, slot, future)

    def results(self, files: Sequence[SourceFile]) -> Iterator[Union[Packed, Failed]]:
        """Yield each file's result in walk order, with bounded work in flight."""
        if self.pool is None:
            _init_worker(self.job, ignore_sigint=False)
            for src in files:
                yield from _process([src])
            return
        slots, pool, workers = self.slots, self.pool, self.workers
        pending: deque = deque()
        batch = 4  # grows once the size of results is known
        pos, done_files, done_bytes = 0, 0, 0
        began = time.monotonic()
        while pos < len(files) or pending:
            while pos < len(files) and slots.free:
                slot = slots.free.pop()
                task = (files[pos : pos + batch], slots.paths[slot], slots.size)
                pending.append((slot, pool.submit(_process, *task)))
                pos += batch
            slot, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool as exc:
                raise _worker_died() from exc
            for item in slots.resolve(slot, results):
                done_files += 1
                done_bytes += item.nbytes if isinstance(item, Packed) else 0
                yield item
            slots.free.append(slot)  # its items are written: the slot can take the next task
            per_file = max(done_bytes / max(done_files, 1), 1)
            seconds_per_file = (time.monotonic() - began) * workers / max(done_files, 1)
            batch = int(min(MAX_TASK_FILES, TASK_BYTES // per_file, TASK_SECONDS / max(seconds_per_file, 1e-6)))
            batch = max(1, batch)

    def close(self, stop: bool) -> None:
        """Shut the pool down; ``stop``: end the workers now, without letting them finish the queue."""
        if self.pool is None:
            return
        if stop:
            stop_processes([p for p in multiprocessing.active_children() if p not in self._others])
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.slots.close()
        self.chunk_slots.close()


class _CompressedChunk:
    """A chunk a worker is compressing in a shared slot: ``result()`` is ``(stored bytes, mask)``."""

    def __init__(self, slots: Slots, slot: int, future):
        self._slots, self._slot, self._future = slots, slot, future

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Tuple[bytes, int]:
        try:
            length, mask, inline = self._future.result()
            return (inline if inline is not None else bytes(self._slots.view(self._slot)[:length])), mask
        except BrokenProcessPool as exc:
            raise _worker_died() from exc
        finally:
            self._slots.free.append(self._slot)


def _worker_died() -> WorkerError:
    return WorkerError("a worker process died (out of memory, or a crash in a decoder); "
                       "rerun with --workers 1 to see which file")


def _spec_name(spec: Optional[PluginSpec]) -> str:
    if spec is None:
        return AUTO
    return spec if isinstance(spec, str) else load(spec, "reader", {}).spec
