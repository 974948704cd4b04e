"""The files beside an archive being written, which make a conversion safe and resumable.

The archive is built in a part file (:func:`create_part`), made durable as it grows
(:class:`Writeback`), and renamed to the output only when complete (:func:`publish`).

Nothing is written at the output's own name until the archive is complete. Beside it lie:

- ``.OUT.data2h5-lock``: held (``flock``) by the one conversion writing ``OUT``;
- ``.OUT.data2h5-part<N>``: the HDF5 file being written (generation ``N``);
- ``.OUT.data2h5-part<N>.journal``: what that part safely holds: where each entry's stored
  bytes lie, their CRC-32, and the size and modification time of the source file read.

The journal is appended at checkpoints, after HDF5 has handed the entries' data to the
kernel. A writer killed mid-write can leave an HDF5 file that HDF5 refuses to open, so a
resume never opens it: it reads the journaled byte ranges directly, checks each against its
CRC-32 and copies it into the next generation. A torn last record, or a block that fails its
checksum (the machine went down before the kernel wrote it), is simply converted again.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import struct
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import h5py

from . import format as fmt
from ._version import __version__
from .errors import OutputError

log = logging.getLogger(__name__)

MAGIC = b"data2h5 journal 1\n"
_FRAME = struct.Struct("<II")  # payload length, CRC-32 of the payload
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)
#: At most this long between checkpoints: what a kill can cost, in conversion time.
CHECKPOINT_SECONDS = 2.0
#: Options that decide what an archive holds: a resume must use the same ones.
CONTENT_OPTIONS = ("source", "extensions", "prune", "reader", "compression", "layout", "follow_symlinks")


LIBVER = ("v110", "v112")  # readable by HDF5 1.12 and later; linear-time group growth
#: HDF5's metadata cache limit for the file being written. The default (2 MiB of on-disk
#: metadata) holds ~7,000 object headers of new datasets, which take ~5 KB each in memory:
#: ~37 MB that grows with the number of entries until then. Entries are written once, so a
#: small cache costs no speed (measured: same µs per entry at 20,000 and 60,000 entries).
METADATA_CACHE_BYTES = 256 << 10


def check_output(dst: Path, overwrite: bool) -> None:
    """Raise :class:`OutputError` if ``dst`` cannot be written (checked again on opening)."""
    if dst.exists() and not overwrite:
        raise OutputError(f"{dst} already exists; pass --overwrite to replace it")
    if dst.exists() and dst.is_dir():
        raise OutputError(f"{dst} is a folder; name a file such as {dst / 'archive.h5'}")
    if not dst.parent.is_dir():
        raise OutputError(f"the folder of {dst} does not exist; create {dst.parent} first")


def create_part(path: Path) -> h5py.File:
    """Create the HDF5 file an archive is built in (a part file beside the output)."""
    try:
        f = h5py.File(path, "w", libver=LIBVER)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc}; check the folder is writable and has space") from exc
    _limit_metadata_cache(f, METADATA_CACHE_BYTES)
    return f


def publish(f: h5py.File, part: Path, dst: Path) -> None:
    """Close the finished part, make it durable and rename it to ``dst`` in one step, so that
    ``dst`` is either the old file (or nothing) or the complete new archive."""
    f.close()
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, dst)
    sync_folder(dst.parent)  # make the rename itself durable


def write_root_attrs(f: h5py.File, report: Any, options: dict, *, layout: str, entries: int, skipped: list,
                     bytes_in: int, bytes_out: int) -> None:
    """The root attributes every archive carries (see :mod:`data2h5.format`): how it was made
    (``report``: a :class:`data2h5.Report`; ``options``: the conversion's content options)
    and what it holds."""
    attrs = f.attrs
    attrs[fmt.ATTR_FORMAT] = fmt.FORMAT_VERSION
    attrs[fmt.ATTR_VERSION] = __version__
    attrs[fmt.ATTR_LAYOUT] = layout
    attrs[fmt.ATTR_READER] = report.reader
    attrs[fmt.ATTR_PRUNE] = options["prune"]
    attrs[fmt.ATTR_EXTENSIONS] = json.dumps(options["extensions"])
    attrs[fmt.ATTR_FOLLOW_SYMLINKS] = options["follow_symlinks"]
    attrs[fmt.ATTR_SOURCE] = report.source
    attrs[fmt.ATTR_CREATED] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    attrs[fmt.ATTR_COMPRESSION] = report.compression
    attrs[fmt.ATTR_ENTRIES] = entries
    attrs[fmt.ATTR_SKIPPED] = json.dumps(skipped)
    attrs[fmt.ATTR_BYTES_IN] = bytes_in
    attrs[fmt.ATTR_BYTES_OUT] = bytes_out


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a crash (where the system allows)."""
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


def _limit_metadata_cache(f: h5py.File, nbytes: int) -> None:
    config = f.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = nbytes
    config.max_size = nbytes
    config.min_size = min(config.min_size, nbytes // 2)
    f.id.set_mdc_config(config)


class Writeback:
    """Has the kernel start writing each new 32 MiB of a file to disk while the run goes on
    (Linux ``sync_file_range``), so the final fsync waits for the tail only, and dirty pages
    do not pile up on a large conversion. Elsewhere it does nothing."""

    STEP = 32 << 20
    _WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait

    def __init__(self, path: str):
        self._fd: Optional[int] = None
        self._done = 0
        self._pending = 0  # bytes written since the last look at the file's size
        self._call = _sync_file_range()
        if self._call is not None:
            self._fd = os.open(path, os.O_RDONLY)

    def poll(self, written: int) -> None:
        """Note ``written`` more bytes; start writeback once a step's worth has been written."""
        self._pending += written
        if self._fd is None or self._pending < self.STEP:
            return
        self._pending = 0
        size = os.fstat(self._fd).st_size
        if size - self._done >= self.STEP:
            self._call(self._fd, ctypes.c_int64(self._done), ctypes.c_int64(size - self._done), self._WRITE)
            self._done = size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close


def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None


class Journal:
    """Append-only record of what one part file safely holds: a header, then records, each
    framed with its length and CRC-32 so that a torn or damaged tail is recognised."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        try:
            self._fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create {path}: {exc.strerror or exc}; choose a writable folder") from exc
        self._write(MAGIC)
        self.append(header)

    def append(self, record: dict) -> None:
        payload = _ENCODER.encode(record).encode()
        self._write(_FRAME.pack(len(payload), zlib.crc32(payload)) + payload)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Checkpoints:
    """When and how a writer journals what it wrote: at most ``every`` seconds apart, and
    only after HDF5 has handed the data to the kernel, so that the journal never vouches for
    bytes still in HDF5's buffers."""

    def __init__(self, f, journal: Journal, every: float = CHECKPOINT_SECONDS):
        self._f = f
        self._journal = journal
        self.every = every
        self._next = time.monotonic() + every

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def write(self, record: dict) -> None:
        """Flush the HDF5 file, then journal ``record``."""
        self._next = time.monotonic() + self.every
        self._f.flush()
        self._journal.append(record)


def read_journal(path: Path) -> Tuple[Optional[dict], List[dict]]:
    """``(header, records)`` up to the first torn or damaged record; ``(None, [])`` if the
    file is not a journal."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, []
    if not data.startswith(MAGIC):
        return None, []
    pos, records = len(MAGIC), []
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        payload = data[pos + _FRAME.size : pos + _FRAME.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            log.info("%s: ignoring a torn record at byte %d", path, pos)
            break
        try:
            records.append(json.loads(payload))
        except ValueError:
            break
        pos += _FRAME.size + length
    if not records or not isinstance(records[0], dict):
        return None, []
    return records[0], records[1:]


class Partial:
    """Names and state of the partial files of one output."""

    PREFIX = ".data2h5-part"

    def __init__(self, dst: Path):
        self.dst = dst
        self.lock_path = self._beside(".data2h5-lock")

    def _beside(self, suffix: str) -> Path:
        return self.dst.with_name(f".{self.dst.name}{suffix}")

    def part(self, gen: int) -> Path:
        return self._beside(f"{self.PREFIX}{gen}")

    def journal(self, gen: int) -> Path:
        return self._beside(f"{self.PREFIX}{gen}.journal")

    def generations(self) -> List[int]:
        """Generations with a part file or a journal, oldest first."""
        head = f".{self.dst.name}{self.PREFIX}"
        try:
            names = os.listdir(self.dst.parent)
        except OSError:
            return []
        gens = set()
        for name in names:
            if name.startswith(head):
                rest = name[len(head) :].removesuffix(".journal")
                if rest.isdigit():
                    gens.add(int(rest))
        return sorted(gens)

    def files(self) -> List[Path]:
        """Every partial file beside the output (parts and journals; not the lock)."""
        out = []
        for gen in self.generations():
            out += [p for p in (self.part(gen), self.journal(gen)) if p.exists()]
        return out

    def discard(self, gens: Optional[Sequence[int]] = None) -> None:
        for gen in self.generations() if gens is None else gens:
            for path in (self.part(gen), self.journal(gen)):
                path.unlink(missing_ok=True)

    def next_generation(self) -> int:
        gens = self.generations()
        return gens[-1] + 1 if gens else 1


def output_of_part(path: Path) -> Optional[Path]:
    """The output that ``path`` is a part file of (None if it is not one)."""
    name = path.name
    head, sep, gen = name.rpartition(Partial.PREFIX)
    if sep and gen.isdigit() and head.startswith(".") and len(head) > 1:
        return path.with_name(head[1:])
    return None


class OutputLock:
    """Only one conversion writes an output at a time: an ``flock`` on the lock file, which
    the kernel releases however the holder ends (SIGKILL included). Forked children (pool
    workers) close their copy at once (:func:`_drop_locks_in_child`): an ``flock`` lasts while
    any process holds the file open, and workers outliving a killed writer by a moment would
    keep the next run out."""

    def __init__(self, partial: Partial):
        self.partial = partial
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        import fcntl

        path = self.partial.lock_path
        for _ in range(10):  # the holder may be unlinking the file just as we open it
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(
                    f"cannot write {self.partial.dst} in {path.parent}: {exc.strerror or exc}; "
                    "choose a folder you can write to"
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(
                    f"{self.partial.dst} is being written by another data2h5 convert (pid {holder}); "
                    "wait for it to finish, or stop it and rerun with --resume"
                ) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                _lock_fds.add(fd)
                return
            os.close(fd)
        raise OutputError(f"cannot lock {path}: it keeps being replaced; is another conversion starting?")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.partial.lock_path).st_ino == os.fstat(self._fd).st_ino:
                self.partial.lock_path.unlink()
        except OSError:
            pass
        _lock_fds.discard(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_lock_fds: set = set()  # the lock files this process holds open


def _drop_locks_in_child() -> None:
    """In a forked child: close the parent's lock files without releasing or removing them
    (the lock stays the parent's alone)."""
    for fd in _lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _lock_fds.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


# -- what earlier generations hold -------------------------------------------------------------


class InterruptedRun:
    """What the journals of earlier generations hold: the first run's header, and the records
    of each generation made with its options, newest first. The run's layout (see
    :mod:`data2h5.layouts`) reads what its records mean."""

    def __init__(self) -> None:
        self.header: Optional[dict] = None
        self.generations: List[Tuple[int, List[dict]]] = []  # (generation, records), newest first

    @property
    def layout(self) -> Optional[str]:
        """The layout the interrupted run wrote (None: no header)."""
        layout = None if self.header is None else _options(self.header)["layout"]
        return layout if isinstance(layout, str) else None

    def __len__(self) -> int:
        """Entries a resume could reuse."""
        from . import layouts

        if self.layout not in layouts.LAYOUTS:  # no header, or a layout this version does not know
            return 0
        return layouts.get(self.layout).kept(self)


def load_previous(partial: Partial) -> InterruptedRun:
    """Read every generation's journal that has its part file, keeping those made with the
    newest one's options."""
    prev = InterruptedRun()
    for gen in reversed(partial.generations()):
        if not partial.part(gen).exists():
            continue
        header, records = read_journal(partial.journal(gen))
        if header is None:
            continue
        if prev.header is None:
            prev.header = header
        elif _options(header) != _options(prev.header):
            continue  # an older generation made with other options is of no use
        prev.generations.append((gen, records))
    return prev


def _options(header: dict) -> dict:
    return {name: header.get("options", {}).get(name) for name in CONTENT_OPTIONS}


def differing_options(header: dict, options: dict) -> List[str]:
    """``name: was X, now Y`` for each content option that differs from the first run's."""
    old = _options(header)
    out = []
    for name in CONTENT_OPTIONS:
        if old[name] != options.get(name):
            out.append(f"{name} was {old[name]!r}, now {options.get(name)!r}")
    return out


class BlockReader:
    """Reads journaled byte ranges out of earlier part files, one descriptor per file."""

    def __init__(self, partial: Partial):
        self.partial = partial
        self._fds: Dict[int, int] = {}

    def read(self, gen: int, addr: int, size: int) -> Optional[bytes]:
        """The ``size`` bytes at ``addr`` in generation ``gen``'s part; None if short."""
        fd = self._fds.get(gen)
        if fd is None:
            fd = self._fds[gen] = os.open(self.partial.part(gen), os.O_RDONLY)
        data = os.pread(fd, size, addr) if size else b""
        return data if len(data) == size else None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def unchanged(path: str, size: int, mtime_ns: int) -> bool:
    """Whether the source file still has the size and modification time it was read with."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime_ns
