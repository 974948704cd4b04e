"""Walk a source folder in a deterministic order."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Tuple

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFile:
    """A file found under the source folder."""

    path: str  # the path to open
    key: str  # path relative to the source folder, '/'-separated: the entry's name in the archive

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def key_problem(self) -> Optional[str]:
        """Why this file's name cannot be an archive key, or None if it can.

        HDF5 names are UTF-8; a file name that is not valid UTF-8 (undecodable bytes show
        up as surrogate escapes) cannot round-trip, so it is reported instead of mangled.
        """
        try:
            self.key.encode("utf-8")
        except UnicodeEncodeError:
            return "file name is not valid UTF-8; rename it (e.g. with convmv) to store it"
        return None

    @property
    def shown_key(self) -> str:
        """The key for messages: undecodable bytes of the name shown as ``\\xff``."""
        return os.fsencode(self.key).decode("utf-8", "backslashreplace")


def walk(root: str, *, follow_symlinks: bool = False, exclude: Iterable[str] = ()) -> Iterator[SourceFile]:
    """Yield every file under ``root`` in sorted order of its relative path (by code point,
    which is also the order of the UTF-8 keys' bytes).

    Symlinked directories are skipped unless ``follow_symlinks``; when followed, a link back
    to a folder above it (by device and inode) is not entered, so links cannot loop, while a
    link to a folder elsewhere is walked under its own name too. Symlinks to files are
    yielded like files. Paths in ``exclude`` (e.g. the output archive and its temporary,
    when they lie inside ``root``) are never yielded.
    """
    root = os.path.abspath(root)
    excluded = {os.path.realpath(p) for p in exclude}
    names = {os.path.basename(p) for p in excluded}
    yield from _walk_dir(root, "", follow_symlinks, excluded, names, ())


def _walk_dir(
    path: str, prefix: str, follow: bool, excluded: set, names: set, ancestors: Tuple[Tuple[int, int], ...]
) -> Iterator[SourceFile]:
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino)
    if ident in ancestors:
        log.warning("not entering %s: it links back to a folder above it", path)
        return
    ancestors += (ident,)
    try:
        with os.scandir(path) as it:
            entries = [(entry, _is_dir(entry)) for entry in it]
    except PermissionError as exc:
        log.warning("cannot list %s: %s", path, exc.strerror)
        return
    # a folder sorts as "name/" so that keys come out in plain sorted order ("a.b" < "a/x")
    entries.sort(key=lambda e: e[0].name + "/" if e[1] else e[0].name)
    for entry, is_dir in entries:
        key = prefix + entry.name
        if is_dir:
            if entry.is_symlink() and not follow:
                log.debug("skipping symlinked folder %s (follow_symlinks is off)", entry.path)
                continue
            yield from _walk_dir(entry.path, key + "/", follow, excluded, names, ancestors)
        elif not _is_excluded(entry, excluded, names):
            yield SourceFile(entry.path, key)


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
