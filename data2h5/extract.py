"""``extract``: write an archive's entries back as files under a destination folder.

What each entry becomes, at ``DEST/<key>``:

* an entry stored as the file's exact bytes (``--reader bytes``, or files the ``auto``
  reader keeps as bytes): those bytes, identical to the original file;
* a text entry: its UTF-8 bytes;
* a decoded array (images, .npy, a plugin's arrays, every row of a ``stacked`` archive, every
  dataset of a plain HDF5 file): a NumPy ``.npy`` file at ``DEST/<key>.npy`` (at
  ``DEST/<key>`` when the key already ends in ``.npy``); ``numpy.load`` gives back the very
  array, dtype and shape included.

Archives can come from strangers, so before anything is written every selected key is
checked: a key that is absolute, has an empty, ``.`` or ``..`` component, a NUL or a
backslash, two keys that would land on one path, or one key's file where another needs a
folder, refuses the whole extraction; so do two names (paths or folders) that differ only in
case or Unicode normalisation (:func:`find_collisions`), unless ``allow_collisions``. Folders are then walked one component at a time
relative to an open folder descriptor, never following a symbolic link, so a link planted
inside the destination cannot lead a file outside it. Existing files are never replaced
unless ``overwrite`` is given (and then only regular files, never a link or a folder).
Each file is written under a temporary name and renamed into place once complete.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import shutil
import stat
import time
import unicodedata
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import layouts, safety
from .display import decimal_size, progress_bar
from .errors import ArchiveKeyError, Data2H5Error, NameCollisionError, OutputError, SizeLimitError, UnsafeKeyError
from .format import Kind
from .archive import Index, PathLike, read_index

log = logging.getLogger(__name__)

NPY_SUFFIX = ".npy"
PART_SUFFIX = ".data2h5-part"
SHOWN_CONFLICTS = 3
NPY_HEADER_BYTES = 256  # at most, for the shapes an index records
MAX_EXPANSION = 100
"""An extraction may write at most this many times the archive's size unless allowed: a
decoded archive expands about 1.6 times, a crafted one (fill values, shared blocks) much more."""

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_NEW_FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                   | getattr(os, "O_BINARY", 0))


@dataclass
class ExtractReport:
    """What :func:`extract` wrote."""

    archive: str
    dest: str
    files: int = 0
    bytes: int = 0
    planned_bytes: int = 0  # what the entries declare, stated before anything is written
    elapsed: float = 0.0

    def summary(self) -> str:
        return f"{self.files:,} files ({decimal_size(self.bytes)}) extracted from {self.archive} to {self.dest} in {self.elapsed:.1f} s"


def output_path(key: str, kind: int) -> str:
    """The relative path an entry is written to: the key for bytes and text; for a decoded
    array the key plus ``.npy`` (the key alone when it already ends in ``.npy``)."""
    if kind == Kind.ARRAY and not key.lower().endswith(NPY_SUFFIX):
        return key + NPY_SUFFIX
    return key


def unsafe_reason(key: str) -> Optional[str]:
    """Why ``key`` cannot be a path inside the destination folder, or None if it can."""
    if not key:
        return "is empty"
    if "\x00" in key:
        return "contains a NUL character"
    if key.startswith("/"):
        return "is an absolute path"
    if "\\" in key:
        return "contains a backslash (a path separator on Windows)"
    for part in key.split("/"):
        if part in (".", ".."):
            return f"has a {part!r} path component"
        if not part:
            return "has an empty path component"
    return None


def select(keys: Sequence[str], prefixes: Iterable[str], archive: str = "the archive") -> List[int]:
    """Positions of the keys equal to one of ``prefixes`` or under it as a folder (``cats``
    selects ``cats/1.jpg``, not ``catsup.jpg``); every key when no prefix is given. Raises
    :class:`ArchiveKeyError` for a prefix that selects nothing."""
    wanted = [p.strip("/") for p in prefixes]
    if not wanted or "" in wanted:
        return list(range(len(keys)))
    hits = {p: 0 for p in wanted}
    out = []
    for pos, key in enumerate(keys):
        for p in wanted:
            if key == p or key.startswith(p + "/"):
                hits[p] += 1
                out.append(pos)
                break
    empty = [p for p, n in hits.items() if not n]
    if empty:
        raise ArchiveKeyError(f"{archive}: no entry is or lies under {empty[0]!r}; list the keys with: data2h5 ls {archive}")
    return out


def plan(index: Index, positions: Sequence[int]) -> List[Tuple[int, str]]:
    """``(position, relative output path)`` of each selected entry, after refusing unsafe
    keys and keys whose paths collide. Raises :class:`UnsafeKeyError` naming the key."""
    out: List[Tuple[int, str]] = []
    files: Dict[str, str] = {}
    folders: Dict[str, str] = {}
    for pos in positions:
        key = index.keys[pos]
        why = unsafe_reason(key)
        if why:
            raise UnsafeKeyError(f"{index.path}: entry {key!r} {why}; refusing to extract anything from this archive")
        rel = output_path(key, int(index.kind[pos]))
        if rel in files:
            raise UnsafeKeyError(f"{index.path}: entries {files[rel]!r} and {key!r} would both be written to {rel!r}; "
                                 "nothing was extracted")
        files[rel] = key
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folders.setdefault("/".join(parts[:i]), key)
        out.append((pos, rel))
    for rel, key in files.items():
        if rel in folders:
            raise UnsafeKeyError(f"{index.path}: entry {key!r} would be written to {rel!r}, where entry "
                                 f"{folders[rel]!r} needs a folder; nothing was extracted")
    return out


class Collisions(NamedTuple):
    """What :func:`find_collisions` found: the first two names that collide and how many
    paths collide with an earlier one."""

    first: str
    second: str
    count: int


def portable_name(path: str) -> str:
    """``path`` as a case-insensitive, normalisation-insensitive file system compares it
    (macOS APFS and HFS+, Windows NTFS and FAT, SMB shares): Unicode canonical caseless
    matching, NFD(casefold(NFD(path))), so ``Cat`` and ``cat``, and ``é`` composed and
    decomposed, fold alike. Compatibility forms (NFKC: ``①`` and ``1``, ``Ａ`` and ``A``) stay
    apart, as on those file systems; full case folding joins a few that some of them keep
    apart (``ß`` and ``ss``): such a pair is refused, never lost."""
    if path.isascii():
        return path.lower()
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", path).casefold())


def find_collisions(paths: Iterable[str]) -> Optional[Collisions]:
    """The names among ``paths`` (relative, ``/``-separated, distinct) that differ only in
    case or Unicode normalisation (:func:`portable_name`): one file's path against
    another's, and each folder against every other folder and file (``A/x`` and ``a/y``,
    ``a`` and ``A/b``). None when there are none. One pass with one dict: each path and each
    folder (once) is folded and looked up once."""
    claimed: Dict[str, str] = {}  # folded name -> the first spelling met
    folders: Dict[str, bool] = {}  # folder met -> whether it, or a folder above it, collides
    first: Optional[Tuple[str, str]] = None
    count = 0
    for path in paths:
        other = claimed.setdefault(portable_name(path), path)
        bad = other != path
        if bad and first is None:
            first = (other, path)
        new: List[str] = []
        folder = path.rpartition("/")[0]
        while folder and folder not in folders:
            new.append(folder)
            folder = folder.rpartition("/")[0]
        above = folders.get(folder, False)
        for name in reversed(new):  # outermost first
            other = claimed.setdefault(portable_name(name), name)
            if other != name:
                above = True
                if first is None:
                    first = (other, name)
            folders[name] = above
        count += bad or above
    return None if first is None else Collisions(first[0], first[1], count)


def planned_bytes(index: Index, positions: Sequence[int]) -> int:
    """Bytes the selected entries will take as files, from the shapes the (checked) index
    declares: their values, plus a .npy header for each decoded array."""
    rows = np.asarray(positions, dtype=np.int64)
    if not len(rows):
        return 0
    itemsize = safety.row_itemsizes(index.dtype[rows], index.path, lambda i: index.keys[int(rows[i])],
                                    layouts.get(index.layout).writable)
    headers = (index.kind[rows] == Kind.ARRAY) * NPY_HEADER_BYTES
    total = float((safety.row_bytes(index.shape[rows], itemsize) + headers).sum())
    return int(total) if math.isfinite(total) else 1 << 62


def check_room(archive: str, dest: str, total: int, allow_expansion: bool) -> None:
    """Refuse an extraction of ``total`` bytes that ``dest``'s file system has no room for, or
    that expands the archive more than :data:`MAX_EXPANSION` times unless allowed."""
    limit = MAX_EXPANSION * max(os.path.getsize(archive), 1)
    if total > limit and not allow_expansion:
        raise SizeLimitError(archive, "the extraction", total, limit,
                             f"more than {MAX_EXPANSION} times the archive's size; pass --allow-expansion "
                             "(allow_expansion=True) only if you trust this archive")
    here = dest
    while not os.path.isdir(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    free = shutil.disk_usage(here).free
    if total > free:
        raise OutputError(f"{dest}: the extraction writes {decimal_size(total)}, but its file system has "
                          f"{decimal_size(free)} free; free space or extract elsewhere")


def check_dest(dest: str, paths: Iterable[str], overwrite: bool) -> None:
    """Refuse, before anything is written, paths that lead through a link or a non-folder in
    ``dest``, and existing files unless ``overwrite`` (never links, folders or devices)."""
    if not os.path.isdir(dest):
        return  # created empty: nothing in the way
    checked: Dict[str, bool] = {}  # folder -> whether it exists (a real folder, then)
    existing: List[str] = []
    for rel in paths:
        parts = rel.split("/")
        here = dest
        for i, part in enumerate(parts):
            here = os.path.join(here, part)
            last = i == len(parts) - 1
            sub = "/".join(parts[: i + 1])
            if not last and sub in checked:
                if checked[sub]:
                    continue
                break
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                if not last:
                    checked[sub] = False
                break
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeKeyError(f"{here} is a symbolic link; refusing to write {'through' if not last else 'over'} "
                                     "it (extract to an empty folder)")
            if not last:
                if not stat.S_ISDIR(st.st_mode):
                    raise OutputError(f"{here} exists and is not a folder, but {rel!r} needs it to be one; "
                                      "extract to an empty folder")
                checked[sub] = True
            elif not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{here} exists and is not a regular file; it is never replaced (extract to an empty folder)")
            elif not overwrite:
                existing.append(rel)
    if existing:
        shown = ", ".join(existing[:SHOWN_CONFLICTS])
        more = f" and {len(existing) - SHOWN_CONFLICTS:,} more" if len(existing) > SHOWN_CONFLICTS else ""
        raise OutputError(f"{len(existing):,} files already exist in {dest} ({shown}{more}); "
                          "pass --overwrite to replace them, or extract to an empty folder")


def extract(
    archive: PathLike,
    dest: PathLike,
    prefixes: Iterable[str] = (),
    *,
    overwrite: bool = False,
    progress: Optional[bool] = False,
    allow_expansion: bool = False,
    allow_collisions: bool = False,
    max_entry_bytes: int = safety.MAX_ENTRY_BYTES,
) -> ExtractReport:
    """Write the entries of ``archive`` (those equal to or under one of ``prefixes``; all
    when none is given) as files under ``dest``, creating it if needed. See the module's
    docstring for what each entry becomes and for the checks that come first.

    ``overwrite``: replace existing regular files (never links or folders). ``progress``: a
    tqdm bar on stderr, in bytes, stating the total first (``None``: only on a terminal).
    ``max_entry_bytes``: the most one entry may declare. ``allow_expansion``: write more than
    :data:`MAX_EXPANSION` times the archive's size. ``allow_collisions``: write names that
    differ only in case or Unicode normalisation (they overwrite each other on macOS and
    Windows); files always get the keys' exact names.

    Raises, before writing anything, :class:`UnsafeKeyError` (:class:`NameCollisionError` for
    names that collide) or :class:`OutputError` when the keys or the folder are unsafe or in the way or the folder's file system lacks the room,
    and :class:`SizeLimitError` past the limits above; :class:`CorruptEntryError` when an
    entry fails its checksum (files written until then are complete).
    """
    started = time.perf_counter()
    if not os.supports_dir_fd >= {os.open, os.mkdir, os.rename, os.stat, os.unlink} or not hasattr(os, "O_NOFOLLOW"):
        raise OutputError("extract needs a system that can open files relative to a folder without following links (POSIX)")
    archive, dest = os.fspath(archive), os.path.abspath(os.fspath(dest))
    index = read_index(archive, max_entry_bytes=max_entry_bytes)
    todo = plan(index, select(index.keys, prefixes, archive))
    if not allow_collisions:
        collisions = find_collisions(rel for _, rel in todo)
        if collisions:
            raise NameCollisionError(archive, collisions.first, collisions.second, collisions.count)
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise OutputError(f"{dest} exists and is not a folder; name a folder to extract into")
    check_dest(dest, (rel for _, rel in todo), overwrite)
    report = ExtractReport(os.path.abspath(archive), dest, planned_bytes=planned_bytes(index, [p for p, _ in todo]))
    check_room(archive, dest, report.planned_bytes, allow_expansion)
    log.info("%s: extracting %d files (%s) to %s", archive, len(todo), decimal_size(report.planned_bytes), dest)
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {dest}: {exc.strerror or exc}") from exc

    bar = progress_bar(report.planned_bytes, progress, unit="B")
    writer = _Writer(dest, overwrite)
    try:
        for rel, value, as_npy in layouts.get(index.layout).extract_values(archive, index, todo):
            written = writer.write(rel, value, as_npy)
            report.bytes += written
            report.files += 1
            bar.update(written)
    except Data2H5Error as exc:  # say what was done: the files written so far are complete
        raise exc.add_context(f"extraction stopped: {report.files:,} of {len(todo):,} files were written to {dest}")
    finally:
        writer.close()
        bar.close()
    report.elapsed = time.perf_counter() - started
    log.info("%s", report.summary())
    return report


class _Writer:
    """Writes files under one folder through folder descriptors, never following a link."""

    def __init__(self, dest: str, overwrite: bool):
        self.dest = dest
        self.overwrite = overwrite
        self._root = os.open(dest, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        self._chain: List[Tuple[str, int]] = []  # open descriptors of the last file's folders

    def close(self) -> None:
        for _, fd in self._chain:
            os.close(fd)
        self._chain = []
        if self._root is not None:
            os.close(self._root)
            self._root = None

    def write(self, rel: str, value: np.ndarray, as_npy: bool) -> int:
        """Write one entry at ``rel``: as a .npy file, or its bytes as they are; returns the
        bytes written."""
        *folders, name = rel.split("/")
        parent = self._folder(folders)
        tmp = f".{secrets.token_hex(8)}{PART_SUFFIX}"
        try:
            fd = os.open(tmp, _NEW_FILE_FLAGS, 0o666, dir_fd=parent)
        except OSError as exc:
            raise OutputError(f"cannot create a file in {self._shown(folders)}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                if as_npy:
                    np.lib.format.write_array(fh, value, allow_pickle=False)
                else:
                    fh.write(memoryview(np.ascontiguousarray(value)).cast("B"))
                written = fh.tell()
            self._place(tmp, name, parent, rel)
        except BaseException as exc:
            try:
                os.unlink(tmp, dir_fd=parent)
            except FileNotFoundError:
                pass
            if isinstance(exc, ValueError):  # np.save of what .npy cannot hold without pickle
                raise OutputError(f"{rel}: cannot be written as .npy ({exc})") from exc
            if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
                raise OutputError(f"cannot write {os.path.join(self.dest, rel)}: {exc.strerror or exc}") from exc
            raise
        return written

    def _place(self, tmp: str, name: str, parent: int, rel: str) -> None:
        """Rename the complete temporary file to ``name``: without replacing anything unless
        overwriting, and never replacing a link or a folder."""
        target = os.path.join(self.dest, rel)
        if self.overwrite:
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise UnsafeKeyError(f"{target} is {'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'not a regular file'}; "
                                     "it is never replaced")
            os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            return
        try:  # a hard link fails if the name exists: no window in which a new file is replaced
            os.link(tmp, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            raise OutputError(f"{target} appeared while extracting; it was left as it is (pass --overwrite to replace it)") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            try:  # no hard links on this file system
                os.stat(name, dir_fd=parent, follow_symlinks=False)
                raise OutputError(f"{target} appeared while extracting; it was left as it is (pass --overwrite to replace it)")
            except FileNotFoundError:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
                return
        os.unlink(tmp, dir_fd=parent)

    def _folder(self, folders: List[str]) -> int:
        """Descriptor of ``dest/folders``, creating folders as needed, following no link."""
        keep = 0
        while keep < min(len(self._chain), len(folders)) and self._chain[keep][0] == folders[keep]:
            keep += 1
        for _, fd in self._chain[keep:]:
            os.close(fd)
        del self._chain[keep:]
        for i in range(keep, len(folders)):
            parent = self._chain[-1][1] if self._chain else self._root
            name = folders[i]
            try:
                os.mkdir(name, 0o777, dir_fd=parent)
            except FileExistsError:
                pass
            except OSError as exc:
                raise OutputError(f"cannot create {self._shown(folders[: i + 1])}: {exc.strerror or exc}") from exc
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise UnsafeKeyError(f"{self._shown(folders[: i + 1])} is a symbolic link or not a folder; "
                                         "refusing to write through it") from exc
                raise OutputError(f"cannot open {self._shown(folders[: i + 1])}: {exc.strerror or exc}") from exc
            self._chain.append((name, fd))
        return self._chain[-1][1] if self._chain else self._root

    def _shown(self, folders: List[str]) -> str:
        return os.path.join(self.dest, *folders)
