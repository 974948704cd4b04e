"""Exception types, one per failure a user can act on.

Every message is one line that names the file (or plugin, entry, field) involved and, where
there is one, what to do about it.
"""
from __future__ import annotations


class Data2H5Error(Exception):
    """Base class of every error data2h5 raises on purpose."""


class SourceError(Data2H5Error):
    """The source folder is missing, is not a folder, or holds no matching file."""


class OutputError(Data2H5Error):
    """The output already exists (and overwrite was not asked for) or its folder is missing."""


class ReadError(Data2H5Error):
    """A source file could not be read or decoded."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # travels from worker processes intact
        return type(self), (self.path, self.reason)


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
        return str(self.args[0]) if self.args else ""


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
