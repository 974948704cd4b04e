"""Walk a source folder in a deterministic order."""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union, overload

import numpy as np

from .errors import ReadError
from .keys import KeyColumn, Keys

log = logging.getLogger(__name__)

_NOT_REGULAR = {  # what a path named like a data file may be instead
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


@dataclass(frozen=True, slots=True)  # a million of them in a large run: no __dict__ each
class SourceFile:
    """A file found under the source folder."""

    root: str  # the source folder, ending in a separator (one string shared by every file)
    key: str  # path relative to the source folder, '/'-separated: the entry's name in the archive
    problem: Optional[str] = None  # found by the walk: why the file cannot be read, and what to do

    @property
    def path(self) -> str:
        """The path to open."""
        return self.root + self.key

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def key_problem(self) -> Optional[str]:
        """Why this file cannot be stored, or None if it can: what the walk found (a link
        loop, a broken link, a named pipe, a path too long to open), or a name that cannot
        be an archive key.

        HDF5 names are UTF-8; a file name that is not valid UTF-8 (undecodable bytes show
        up as surrogate escapes) cannot round-trip, so it is reported instead of mangled.
        """
        if self.problem:
            return self.problem
        try:
            self.key.encode("utf-8")
        except UnicodeEncodeError:
            return "file name is not valid UTF-8; rename it (e.g. with convmv) to store it"
        return None

    @property
    def shown_key(self) -> str:
        """The key for messages: undecodable bytes of the name shown as ``\\xff``."""
        return os.fsencode(self.key).decode("utf-8", "backslashreplace")


class SourceFiles(Sequence[SourceFile]):
    """Files found under one folder, in walk order, their keys held as :class:`Keys` (one
    fixed-width byte array, where a list of :class:`SourceFile` costs three Python objects
    a file: 120 MB for a million).

    Indexing gives a :class:`SourceFile`; a slice gives another ``SourceFiles`` whose keys
    are a view, so that a batch sent to a worker pickles only what it names.
    """

    __slots__ = ("root", "_keys")

    def __init__(self, root: str, keys: Optional[Keys] = None):
        self.root = root
        self._keys = Keys(np.zeros(0, "S1")) if keys is None else keys

    @classmethod
    def of(cls, root: str, keys: Iterable[str]) -> "SourceFiles":
        """The files ``root + key`` for each of ``keys`` (valid UTF-8 names), packed as they come."""
        column = KeyColumn()
        for key in keys:
            column.append(key.encode("utf-8"))
        return cls(root, Keys(column.array()))

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, i: int) -> SourceFile: ...

    @overload
    def __getitem__(self, i: slice) -> "SourceFiles": ...

    def __getitem__(self, i: Union[int, slice]) -> Union[SourceFile, "SourceFiles"]:
        if isinstance(i, slice):
            return SourceFiles(self.root, self._keys[i])
        return SourceFile(self.root, self._keys[i])

    def __iter__(self) -> Iterator[SourceFile]:
        return (SourceFile(self.root, key) for key in self._keys)

    def keys(self) -> Keys:
        """Each file's key, in order."""
        return self._keys

    def where(self, keep: Callable[[SourceFile], bool]) -> "SourceFiles":
        """The files ``keep`` accepts, in order (this very sequence when it accepts all)."""
        kept = np.fromiter((keep(f) for f in self), dtype=bool, count=len(self))
        return self if kept.all() else SourceFiles(self.root, Keys(self._keys.raw[kept]))

    def __reduce__(self):
        return SourceFiles, (self.root, self._keys)

    def __repr__(self) -> str:
        return f"<SourceFiles: {len(self)} under {self.root!r}>"


def walk(root: str, *, follow_symlinks: bool = False, exclude: Iterable[str] = ()) -> Iterator[SourceFile]:
    """Yield every file under ``root`` in sorted order of its relative path (by code point,
    which is also the order of the UTF-8 keys' bytes).

    Symlinked directories are skipped unless ``follow_symlinks``; when followed, a link back
    to a folder above it (by device and inode) is not entered, so links cannot loop, while a
    link to a folder elsewhere is walked under its own name too. Symlinks to files are
    yielded like files. Paths in ``exclude`` (e.g. the output archive and its temporary,
    when they lie inside ``root``) are never yielded.

    A file that cannot be read as a file (a link loop, a broken link, a named pipe or
    device, a path too long to open) is yielded with its ``problem`` set, so that it is
    reported or skipped like any unreadable file. A folder that cannot be listed raises
    :class:`ReadError` naming it: its files would otherwise be missing unnoticed.
    """
    root = os.path.abspath(root)
    base = os.path.join(root, "")
    excluded = {os.path.realpath(p) for p in exclude}
    names = {os.path.basename(p) for p in excluded}
    yield from _walk_dir(root, base, "", follow_symlinks, excluded, names, (), _path_max(root))


def _walk_dir(
    path: str, base: str, prefix: str, follow: bool, excluded: set, names: set, ancestors: Tuple[Tuple[int, int], ...],
    path_max: int,
) -> Iterator[SourceFile]:
    try:
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino)
        if ident in ancestors:
            log.warning("not entering %s: it links back to a folder above it", path)
            return
        with os.scandir(path) as it:
            entries = [(entry, _is_dir(entry)) for entry in it]
    except OSError as exc:
        raise ReadError(path, _folder_problem(path, exc, path_max, is_root=not prefix)) from exc
    ancestors += (ident,)
    # a folder sorts as "name/" so that keys come out in plain sorted order ("a.b" < "a/x")
    entries.sort(key=lambda e: e[0].name + "/" if e[1] else e[0].name)
    for entry, is_dir in entries:
        key = prefix + entry.name
        if is_dir:
            if entry.is_symlink() and not follow:
                log.debug("skipping symlinked folder %s (follow_symlinks is off)", entry.path)
                continue
            yield from _walk_dir(entry.path, base, key + "/", follow, excluded, names, ancestors, path_max)
        elif not _is_excluded(entry, excluded, names):
            yield SourceFile(base, key, _file_problem(entry, path_max))


def _path_max(root: str) -> int:
    """Bytes a path may not reach (the limit counts the terminating NUL): 4096 on Linux."""
    try:
        return os.pathconf(root, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 4096


def _too_long(path: str, path_max: int) -> Optional[str]:
    nbytes = len(os.fsencode(path)) if len(path) * 4 >= path_max else 0  # UTF-8: at most 4 bytes a character
    if nbytes < path_max:
        return None
    return (f"the path is {nbytes} bytes, longer than the system can open ({path_max - 1}); "
            "move the source folder higher up or shorten the folder names")


def _folder_problem(path: str, exc: OSError, path_max: int, is_root: bool) -> str:
    too_long = _too_long(path, path_max)
    if too_long or exc.errno == errno.ENAMETOOLONG:
        return too_long or f"cannot list this folder ({exc.strerror}); shorten the folder names"
    elsewhere = "" if is_root else " or move it out of the source folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot list this folder ({exc.strerror}); make it readable (chmod u+rx){elsewhere}"
    return f"cannot list this folder ({exc.strerror or exc}); fix it{elsewhere}"


def _file_problem(entry: os.DirEntry, path_max: int) -> Optional[str]:
    """Why ``entry`` cannot be opened and read to its end as a file, or None (the usual case,
    found without a system call: the folder listing says it is a regular file)."""
    too_long = _too_long(entry.path, path_max)
    if too_long:
        return too_long
    try:
        if entry.is_file(follow_symlinks=True):
            return None
    except OSError:
        pass
    try:
        mode = os.stat(entry.path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "cannot open: a symlink loop (the link leads back to itself); fix or remove the link"
        if exc.errno == errno.ENOENT and entry.is_symlink():
            return f"cannot open: a broken symlink (to {_link_target(entry.path)}); fix or remove the link"
        return None  # e.g. removed since the folder was listed: reading it says why
    what = _NOT_REGULAR.get(stat.S_IFMT(mode))
    if what is None:
        return None
    return f"not a regular file ({what}), so it cannot be read; remove it or leave it out with --ext or --prune"


def _link_target(path: str) -> str:
    try:
        return os.fsencode(os.readlink(path)).decode("utf-8", "backslashreplace")
    except OSError:
        return "?"


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:  # e.g. a link we may not follow
        return False


def _is_excluded(entry: os.DirEntry, excluded: set, names: set) -> bool:
    # realpath costs a stat per path component: only pay it for links and likely names
    if entry.name not in names and not entry.is_symlink():
        return False
    return os.path.realpath(entry.path) in excluded
