"""``data2h5.open``: any archive as a read-only mapping from key to decoded value.

Every layout reads the same way, with no torch and no h5py calls of one's own: the keys are
the index's (found by binary search), a value is read, checked and decoded as
:class:`~data2h5.loaders.H5Dataset` would return it. It is the way to reach a ``packed``
archive's entries by key, since they are not HDF5 datasets.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

from .archive import ArchiveReader, PathLike
from .errors import ArchiveKeyError
from .safety import MAX_ENTRY_BYTES


class ArchiveView(Mapping):
    """The entries of one archive by key (see :func:`open`). Handles open on first read,
    once per process; close it (or use it as a context manager) to let them go."""

    def __init__(self, path: PathLike, *, decode: bool = True, verify: bool = True,
                 max_entry_bytes: int = MAX_ENTRY_BYTES):
        self._reader = ArchiveReader(path, verify=verify, max_entry_bytes=max_entry_bytes)
        self.decode = decode

    @property
    def path(self) -> str:
        return self._reader.path

    @property
    def layout(self) -> str:
        return self._reader.index.layout

    def __getitem__(self, key: str) -> Any:
        pos = self._reader.index.keys.position(key) if isinstance(key, str) else -1
        if pos < 0:
            raise ArchiveKeyError(f"no entry {key!r} in archive {self.path}")
        return self._reader.read(pos, decode=self.decode)

    def __contains__(self, key: object) -> bool:
        return key in self._reader.index

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.index.keys)

    def __len__(self) -> int:
        return len(self._reader.index)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "ArchiveView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<data2h5 archive {self.path} ({self.layout}, {len(self)} entries)>"


def open(path: PathLike, *, decode: bool = True, verify: bool = True,  # noqa: A001 - data2h5.open, as h5py.File
         max_entry_bytes: int = MAX_ENTRY_BYTES) -> ArchiveView:
    """The archive at ``path`` (any layout) as a read-only mapping: ``view[key]`` is the
    entry's value, decoded as :class:`~data2h5.loaders.H5Dataset` returns it (``decode=False``:
    as stored, file bytes as a uint8 array). The index is read and checked now; values are
    checked on read (``verify``), none may declare more than ``max_entry_bytes``."""
    return ArchiveView(path, decode=decode, verify=verify, max_entry_bytes=max_entry_bytes)
