"""``convert``: a folder of loose files → one HDF5 archive, decoded and compressed on every core."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import h5py

from . import format as fmt
from ._version import __version__
from .codecs import Codec, choose_codec, parse_compression
from .errors import PluginError, ReadError, SourceError, WorkerError
from .format import Kind
from .plugins import Plugin, PluginSpec, load
from .prune import keeps, match_extension, normalize_extensions
from .readers import AUTO, BUILTIN_READERS, read_source
from .transport import Slots, share
from .walk import SourceFile, walk
from .writer import FilesWriter, Packed, check_output, open_output, pack, temp_path

log = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
LAYOUTS = (fmt.LAYOUT_FILES, fmt.LAYOUT_STACKED)
#: Source bytes one task should carry: big enough to amortise the pool's traffic, small
#: enough that bounded in-flight work keeps memory flat.
TASK_BYTES = 4 << 20
MAX_TASK_FILES = 256  # many tiny files per task: each submission costs the writer ~2 ms of GIL hand-offs
INFLIGHT_PER_WORKER = 4
SLOT_BYTES = 2 * TASK_BYTES


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

    @property
    def ratio(self) -> float:
        """Archive size over source size."""
        return self.bytes_out / self.bytes_in if self.bytes_in else 0.0

    def summary(self) -> str:
        """One line for the end of a run."""
        rate = self.entries / self.elapsed if self.elapsed else 0.0
        line = (
            f"{self.entries} files, {_mb(self.bytes_in)} → {_mb(self.bytes_out)} ({self.ratio:.2f}×), "
            f"{len(self.skipped)} skipped, {self.elapsed:.1f} s ({rate:.0f} files/s) → {self.output}"
        )
        if self.skipped:
            shown = "; ".join(f"{k}: {r}" for k, r in self.skipped[:3])
            line += f"\nskipped: {shown}" + (f" (and {len(self.skipped) - 3} more)" if len(self.skipped) > 3 else "")
        if self.bytes_in and self.bytes_decoded > 3 * self.bytes_in and self.reader != "bytes":
            line += (
                f"\nnote: decoded data is {self.bytes_decoded / self.bytes_in:.1f}× the source; "
                "--reader bytes stores the files as they are (about the source size) and decodes on read"
            )
        return line


def _mb(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            break
    return f"{n:.1f} {unit}"


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, picklable: plugin specs travel, not functions."""

    reader: Optional[PluginSpec]
    codec: Optional[Codec]
    stacked: bool


_worker_reader: Optional[Plugin] = None
_worker_job: Optional[_Job] = None


def _init_worker(job: _Job, ignore_sigint: bool = True) -> None:
    global _worker_reader, _worker_job
    if ignore_sigint:  # a pool worker (not the in-process path)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler inherited through fork
        _exit_with_parent()
    _worker_job = job
    _worker_reader = _resolve_reader(job.reader)


def _exit_with_parent() -> None:
    """Linux: have the kernel kill this worker when the writer dies however it dies (SIGKILL,
    out of memory). Forked pool workers would not notice: each holds the task pipe's write
    end too, so they never read EOF and would wait as orphans forever."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(1)


def _resolve_reader(spec: Optional[PluginSpec]) -> Optional[Plugin]:
    if spec is None or spec == AUTO:
        return None
    return load(spec, "reader", BUILTIN_READERS)


def _process(files: Sequence[SourceFile], slot: Optional[str] = None, slot_size: int = 0) -> list:
    """Worker task: read, checksum, decode and compress each file.

    Returns a list of ``Packed``, or ``(key, error)`` for a file that failed: errors are
    reported, not raised, so one bad file does not lose the batch. Payloads go into the
    shared ``slot`` when one is given.
    """
    out = []
    for src in files:
        try:
            out.append(_process_one(src))
        except (ReadError, PluginError) as exc:
            out.append((src.key, exc))
    return share(out, slot, slot_size)


def _process_one(src: SourceFile) -> Packed:
    try:
        with open(src.path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ReadError(src.path, f"cannot open: {exc.strerror or exc}") from exc
    ext = os.path.splitext(src.name)[1].lower()
    kind, arr = read_source(_worker_reader, src.path, raw, ext)
    crc = zlib.crc32(raw)
    if _worker_job.stacked:
        return Packed(src.key, int(kind), arr.dtype.str, arr.shape, 0, None, arr, len(raw), crc, arr.nbytes)
    codec = choose_codec(_worker_job.codec, kind, ext)
    return pack(src.key, int(kind), arr, codec, len(raw), crc)


def collect(
    src: Path,
    exts: Tuple[str, ...],
    prune: Plugin,
    *,
    follow_symlinks: bool = False,
    exclude: Iterable[Path] = (),
) -> Tuple[List[SourceFile], List[Tuple[str, str]]]:
    """Walk ``src`` and keep what ``prune`` accepts; returns (files, unusable names with reasons)."""
    kept, bad = [], []
    for f in walk(str(src), follow_symlinks=follow_symlinks, exclude=[str(p) for p in exclude]):
        try:
            keep = keeps(prune.func, f.name, exts)
        except Exception as exc:
            raise PluginError(f"prune plugin {prune.spec!r} failed on {f.path}: {type(exc).__name__}: {exc}") from exc
        if not keep:
            continue
        problem = f.key_problem()
        if problem is None and (f.key == fmt.INDEX_GROUP or f.key.startswith(fmt.INDEX_GROUP + "/")):
            problem = f"the name {fmt.INDEX_GROUP} is reserved for the archive's index; rename it"
        if problem:
            bad.append((f.shown_key, problem))
        else:
            kept.append(f)
    return kept, bad


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
    on_error: str = "fail",
    follow_symlinks: bool = False,
    progress: Optional[bool] = False,
    start_method: Optional[str] = None,
) -> Report:
    """Convert every file under ``src`` that ``prune`` keeps into the HDF5 archive ``dst``.

    ``ext``: extensions to keep (case-insensitive, with or without the dot). ``reader``: a
    built-in name (``auto``, ``image``, ``bytes``, ``npy``, ``text``), a plugin spec
    (``module:function``, ``file.py:function``, an entry-point name) or a function;
    ``None`` picks per file by extension. ``prune``: ``prune(filename, ext) -> bool``, same
    forms. ``workers``: processes (default: every core; 1 works in this process).
    ``compression``: ``auto``, ``none``, ``lzf``, ``gzip[:L]``, ``zstd[:L]``, ``blosc-lz4[:L]``.
    ``on_error``: ``fail`` stops at the first bad file, ``skip`` records it and goes on.
    ``progress``: a tqdm bar on stderr; ``None`` shows it only when stderr is a terminal.

    Nothing is written at ``dst`` unless the whole conversion succeeds.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst).absolute()
    exts = normalize_extensions([ext] if isinstance(ext, str) else ext)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if not src.exists():
        raise SourceError(f"{src} does not exist; give the folder holding your files")
    if not src.is_dir():
        raise SourceError(f"{src} is not a folder; give the folder holding your files")
    check_output(dst, overwrite)  # before walking: a large tree takes a while
    codec = parse_compression(compression)
    prune_plugin = load(prune if prune is not None else "ext", "prune", {"ext": match_extension})
    if prune is None and not exts:
        raise SourceError("no extension given: pass --ext (e.g. --ext jpg) or a --prune plugin")
    _resolve_reader(reader)  # fail fast, in this process, on a plugin that does not load
    workers = max(1, workers or os.cpu_count() or 1)

    files, bad_names = collect(src, exts, prune_plugin, follow_symlinks=follow_symlinks, exclude=[dst, temp_path(dst)])
    if bad_names and on_error == "fail":
        key, reason = bad_names[0]
        raise ReadError(str(src / key), reason + " (or pass --on-error skip)")
    if not files:
        what = f"--ext {' '.join(exts)}" if exts else f"--prune {prune_plugin.spec}"
        raise SourceError(f"no file under {src} matched {what}; check the extension or the prune plugin")

    reader_name = _spec_name(reader)
    report = Report(str(src.absolute()), str(dst), layout, reader_name, codec.spec if codec else "auto")
    report.skipped.extend(bad_names)
    job = _Job(reader, codec, layout == fmt.LAYOUT_STACKED)
    log.info("converting %d files from %s with %d workers", len(files), src, workers)

    with open_output(dst, overwrite) as f:
        if job.stacked:
            from .stacked import StackedWriter

            writer = StackedWriter(f, len(files), codec)
        else:
            writer = FilesWriter(f, codec)
        bar = _progress_bar(len(files), progress)
        try:
            for item in _run(files, job, workers, start_method):
                if not isinstance(item, Packed):
                    key, error = item
                    if on_error == "fail":
                        raise error
                    log.warning("skipping %s", error)
                    report.skipped.append((key, getattr(error, "reason", str(error))))
                else:
                    _add(writer, item, job.stacked)
                    report.entries += 1
                    report.bytes_in += item.size
                    report.bytes_decoded += item.nbytes
                bar.update(1)
                if not bar.disable and bar.n % 64 == 0:
                    bar.set_postfix_str(f"{report.bytes_in / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s", refresh=False)
            if report.entries == 0:
                raise SourceError(f"every matching file under {src} failed; nothing to write ({report.skipped[0][1]})")
            stored = writer.close()
        finally:
            bar.close()
        _write_attrs(f, report, exts, prune_plugin.spec, follow_symlinks, stored)
    report.bytes_out = dst.stat().st_size
    report.elapsed = time.perf_counter() - started
    log.info("%s", report.summary())
    return report


def _add(writer, item: Packed, stacked: bool) -> None:
    if stacked:  # the stacked writer refuses what is not a decoded array, naming the remedy
        writer.add(item.key, item.data, item.size, item.crc32, Kind(item.kind))
    else:
        writer.add(item)


def _run(files: List[SourceFile], job: _Job, workers: int, start_method: Optional[str]):
    """Yield each file's result in walk order, with bounded work in flight."""
    if workers == 1:
        _init_worker(job, ignore_sigint=False)
        for src in files:
            yield from _process([src])
        return
    ctx = multiprocessing.get_context(start_method)
    limit = workers * INFLIGHT_PER_WORKER
    slots = Slots(limit, SLOT_BYTES)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(job,))
    finished = False
    try:
        pending: deque = deque()
        batch = 4  # grows once the size of results is known
        pos, done_files, done_bytes = 0, 0, 0
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
                raise WorkerError(
                    "a worker process died (out of memory, or a crash in a decoder); "
                    "rerun with --workers 1 to see which file"
                ) from exc
            for item in slots.resolve(slot, results):
                done_files += 1
                done_bytes += item.nbytes if isinstance(item, Packed) else 0
                yield item
            slots.free.append(slot)  # its items are written: the slot can take the next task
            per_file = max(done_bytes / max(done_files, 1), 1)
            batch = int(min(MAX_TASK_FILES, max(1, TASK_BYTES // per_file)))
        finished = True
    finally:
        if not finished:  # stop now: do not let workers finish the queue
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        slots.close()


def _progress_bar(total: int, enabled: Optional[bool]):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", disable=None if enabled is None else not enabled, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _spec_name(spec: Optional[PluginSpec]) -> str:
    if spec is None:
        return AUTO
    return spec if isinstance(spec, str) else load(spec, "reader", {}).spec


def _write_attrs(f: h5py.File, report: Report, exts: Tuple[str, ...], prune_spec: str, follow_symlinks: bool,
                 stored: int) -> None:
    attrs = f.attrs
    attrs[fmt.ATTR_FORMAT] = fmt.FORMAT_VERSION
    attrs[fmt.ATTR_VERSION] = __version__
    attrs[fmt.ATTR_LAYOUT] = report.layout
    attrs[fmt.ATTR_READER] = report.reader
    attrs[fmt.ATTR_PRUNE] = prune_spec
    attrs[fmt.ATTR_EXTENSIONS] = json.dumps(list(exts))
    attrs[fmt.ATTR_FOLLOW_SYMLINKS] = bool(follow_symlinks)
    attrs[fmt.ATTR_SOURCE] = report.source
    attrs[fmt.ATTR_CREATED] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    attrs[fmt.ATTR_COMPRESSION] = report.compression
    attrs[fmt.ATTR_ENTRIES] = report.entries
    attrs[fmt.ATTR_SKIPPED] = json.dumps(report.skipped)
    attrs[fmt.ATTR_BYTES_IN] = report.bytes_in
    attrs[fmt.ATTR_BYTES_OUT] = stored
