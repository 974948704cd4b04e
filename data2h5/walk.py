"""Walk a source folder in a deterministic order."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

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


def walk(root: str, *, follow_symlinks: bool = False, exclude: Iterable[str] = ()) -> Iterator[SourceFile]:
    """Yield every file under ``root`` in sorted order of its relative path.

    Symlinked directories are skipped unless ``follow_symlinks``; when followed, a directory
    already visited (by device and inode) is never entered again, so links cannot loop.
    Symlinks to files are yielded like files. Paths in ``exclude`` (e.g. the output archive
    and its temporary, when they lie inside ``root``) are never yielded.
    """
    root = os.path.abspath(root)
    excluded = {os.path.realpath(p) for p in exclude}
    seen = set()
    yield from _walk_dir(root, "", follow_symlinks, excluded, seen)


def _walk_dir(path: str, prefix: str, follow: bool, excluded: set, seen: set) -> Iterator[SourceFile]:
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino)
    if ident in seen:
        log.warning("not entering %s again: it links back to a folder already walked", path)
        return
    seen.add(ident)
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except PermissionError as exc:
        log.warning("cannot list %s: %s", path, exc.strerror)
        return
    for entry in entries:
        key = prefix + entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            if entry.is_symlink() and not follow:
                log.debug("skipping symlinked folder %s (follow_symlinks is off)", entry.path)
                continue
            yield from _walk_dir(entry.path, key + "/", follow, excluded, seen)
        elif os.path.realpath(entry.path) not in excluded:
            yield SourceFile(entry.path, key)
