"""Exception types, one per failure a user can act on.

Every message is one line that names the file (or plugin, entry, field) involved and, where
there is one, what to do about it. Each type carries the fields its message is made of, so
callers read them instead of parsing the text. The message a person reads (``str(exc)``)
has its controls and invisible marks escaped (:func:`data2h5.text.escape`), whatever key or
attribute it quotes; the fields and ``args`` keep the exact values. This module imports
nothing of data2h5 but :mod:`data2h5.text`: every other module may raise these.
"""
from __future__ import annotations

import unicodedata
from typing import Optional

from .text import escape


class Data2H5Error(Exception):
    """Base class of every error data2h5 raises on purpose.

    ``context`` holds what the raising operation adds on the way out (e.g. how far an
    extraction got), shown after the message; the type and fields stay those of the failure.
    ``str()`` shows it all escaped, on one line, so a crafted key cannot hide in it.
    """

    context: tuple = ()
    #: Entries a stopped conversion kept in its part files for a resume (0: nothing kept).
    kept: int = 0

    def add_context(self, text: str) -> "Data2H5Error":
        """Append ``text`` to what :meth:`__str__` shows; returns the same exception."""
        self.context = (*self.context, text)
        return self

    def _with_context(self, text: str) -> str:
        return escape(text + "".join(f" ({c})" for c in self.context))

    def __str__(self) -> str:
        return self._with_context(super().__str__())


class SourceError(Data2H5Error):
    """The source folder is missing, is not a folder, or holds no matching file."""


class OutputError(Data2H5Error):
    """The output already exists (and overwrite was not asked for) or its folder is missing."""


class ReadError(Data2H5Error):
    """A source file could not be read or decoded. ``skippable``: a conversion could go on
    without it (``on_error="skip"``), which the message then says how to ask for."""

    def __init__(self, path: str, reason: str, skippable: bool = False):
        self.path = path
        self.reason = reason
        self.skippable = skippable
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # travels from worker processes intact
        return type(self), (self.path, self.reason, self.skippable)


class Interrupted(KeyboardInterrupt):
    """A conversion stopped by Ctrl-C (a :class:`KeyboardInterrupt`, so it stops callers as one
    would); ``kept``: the entries kept in its part files for a resume."""

    def __init__(self, kept: int = 0):
        super().__init__()
        self.kept = kept


class Terminated(Interrupted):
    """A conversion stopped by SIGTERM (``kill``, a batch system's time limit), raised like
    Ctrl-C so that the same clean-up runs."""


class PluginError(Data2H5Error):
    """A reader or prune plugin could not be loaded, raised, or returned something unusable."""


class WorkerError(Data2H5Error):
    """A worker process died before it could report on its files."""


class CompressionError(Data2H5Error):
    """The compression asked for is unknown or its codec is not installed."""


class LayoutError(Data2H5Error):
    """The samples do not fit the layout asked for (e.g. shapes differ in a stacked archive)."""


class ArchiveError(Data2H5Error):
    """An archive is missing, is not HDF5, or lacks the field asked for."""


class ArchiveKeyError(ArchiveError, KeyError):
    """An entry key is not in the archive."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self._with_context(str(self.args[0]) if self.args else "")


class CorruptEntryError(ArchiveError):
    """An entry's stored bytes do not decode: the archive is damaged. ``reason`` is what is
    wrong, without the archive and entry that the message names around it."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message

    def __reduce__(self):  # travels from DataLoader workers intact
        return type(self), (self.args[0], self.reason)


class UnsafeKeyError(ArchiveError):
    """An archive key would be written outside the destination folder, through a link in it,
    or onto another key's path: the archive is damaged or crafted; nothing is extracted."""


class NameCollisionError(UnsafeKeyError):
    """Two entries selected for extraction have names that differ only in case or Unicode
    normalisation (``Cat/`` and ``cat/``, ``é`` composed and decomposed): distinct files on
    Linux, one file on macOS and Windows file systems, where one would overwrite the other.
    ``first`` and ``second`` are the first two such names (paths or folders, relative to the
    destination), ``count`` the selected entries whose path collides with an earlier one's."""

    def __init__(self, archive: str, first: str, second: str, count: int):
        self.archive, self.first, self.second, self.count = archive, first, second, count
        # composed and decomposed spellings look alike: show their code points then
        shown = ascii if unicodedata.normalize("NFC", first) == unicodedata.normalize("NFC", second) else repr
        super().__init__(f"{archive}: {shown(first)} and {shown(second)} differ only in case or Unicode normalisation and "
                         f"would be one name on macOS or Windows ({count:,} selected "
                         f"entr{'y collides' if count == 1 else 'ies collide'}); nothing was extracted; pass "
                         "--allow-unicode-collisions "
                         "(allow_collisions=True) to write them all, e.g. on a case-sensitive Linux file system")

    def __reduce__(self):
        return type(self), (self.archive, self.first, self.second, self.count)


class UnsafeArchiveError(ArchiveError):
    """An archive holds something data2h5 never reads: an entry stored or linked outside the
    file (external storage, an external link, a virtual dataset) or an index row that is not
    its entry's own storage. The archive is crafted or damaged; nothing of it was read."""

    def __init__(self, path: str, key: str, reason: str):
        self.path, self.key, self.reason = path, key, reason
        # repr escapes every control, line and bidirectional mark: the key shows on one line
        super().__init__(f"{path}: {key!r} {reason}; refusing to read it (the archive is crafted or "
                         "damaged)")

    def __reduce__(self):
        return type(self), (self.path, self.key, self.reason)


class ShardError(ArchiveError):
    """A shard of a sharded archive is missing, truncated, replaced or damaged: ``master`` is
    the archive that lists it, ``shard`` its file name, ``reason`` what is wrong."""

    def __init__(self, master: str, shard: str, reason: str):
        self.master, self.shard, self.reason = master, shard, reason
        super().__init__(f"{master}: shard {shard} {reason}")

    def __reduce__(self):
        return type(self), (self.master, self.shard, self.reason)


class SizeLimitError(ArchiveError):
    """Something in an archive (an entry, a row, a chunk, an extraction's total) declares more
    bytes than the read limit allows. ``size`` is None when the declared size overflows."""

    def __init__(self, path: str, what: str, size: Optional[int], limit: int, hint: str = ""):
        self.path, self.what, self.size, self.limit, self.hint = path, what, size, limit, hint
        declared = "more than can be counted" if size is None else binary_size(size)
        super().__init__(f"{path}: {what} declares {declared}, over the limit of {binary_size(limit)}; "
                         + (hint or "raise --max-entry-size (max_entry_bytes=) only if you trust this archive"))

    def __reduce__(self):
        return type(self), (self.path, self.what, self.size, self.limit, self.hint)


def binary_size(n: float) -> str:
    """``4.0 GiB``: a size in the binary units that limits are given in."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


DASK_INSTALL_HINT = "pip install 'data2h5[dask]'"


class ShardSizeError(Data2H5Error, ValueError):
    """A shard size option that is not a size in bytes or a count of files."""

    def __init__(self, text: str, reason: str, option: str = "--shard-size"):
        self.text, self.reason, self.option = text, reason, option
        super().__init__(f"{option} {text!r}: {reason}")

    def __reduce__(self):
        return type(self), (self.text, self.reason, self.option)


class DaskMissingError(Data2H5Error, ImportError):
    """Running on Dask was asked for, but ``distributed`` is not installed."""

    def __init__(self, what: str = "running on a Dask cluster"):
        self.what = what
        super().__init__(f"{what} needs the distributed package: {DASK_INSTALL_HINT}")

    def __reduce__(self):
        return type(self), (self.what,)


class ClusterError(Data2H5Error):
    """The cluster cannot be reached, has no workers, or a worker cannot run data2h5 tasks."""


class SharedFolderError(ClusterError):
    """A worker does not see a folder the tasks read or write: sources and output must be on a
    file system every worker mounts at the same path."""

    def __init__(self, worker: str, label: str, folder: str, reason: str):
        self.worker, self.label, self.folder, self.reason = worker, label, folder, reason
        if not worker:  # the caller's own machine
            super().__init__(f"cannot use the {label} {folder}: {reason}")
        else:
            super().__init__(f"worker {worker} cannot see the {label} {folder}: {reason} there; sources and output "
                             "must be on a file system every worker mounts at the same path")

    def __reduce__(self):
        return type(self), (self.worker, self.label, self.folder, self.reason)


class TaskError(Data2H5Error):
    """A task raised an exception that is not a data2h5 error (a bug, or an unexpected
    failure); ``reason`` is its type and message."""

    def __init__(self, task: str, reason: str):
        self.task, self.reason = task, reason
        super().__init__(f"{task} failed: {reason}")

    def __reduce__(self):
        return type(self), (self.task, self.reason)
