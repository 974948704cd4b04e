"""Archive layouts: how entries lie in the HDF5 file, one module each, found by name.

A layout owns everything that differs between layouts: its writer (the :class:`EntryWriter`
protocol), how its index is read, its chunk helpers, and how a resume, verify and extract
treat it. The rest of data2h5 asks the registry, never the layout's name::

    layout = layouts.get(index.layout)
    layout.extract_values(archive, index, todo)

:data:`LAYOUTS` maps each name to the object that implements it, as ``"module:attribute"``,
imported on first use (as fsspec's registry does): adding a layout is its own module and one
entry here. ``plain`` reads HDF5 files that data2h5 did not write; it cannot be written.

Annotations name the types of other modules in quotes: this package imports none of them, so
that every module may look a layout up.
"""
from __future__ import annotations

import importlib
import types
from typing import Any, Callable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

from .. import format as fmt
from ..errors import LayoutError


PLAIN = "plain"
SHARDED = "sharded"  # a master archive over shard archives: written with a shard size, not named

LAYOUTS: Mapping[str, str] = types.MappingProxyType({
    fmt.LAYOUT_FILES: "data2h5.layouts.files:FILES",
    fmt.LAYOUT_STACKED: "data2h5.layouts.stacked:STACKED",
    "packed": "data2h5.layouts.packed:PACKED",
    PLAIN: "data2h5.layouts.plain:PLAIN",
    SHARDED: "data2h5.layouts.sharded:SHARDED",
})
"""Every layout by name, as ``"module:attribute"`` of the :class:`Layout` implementing it."""

#: A verify task: run in a thread, returns ``(problems, entries without a stored checksum, entries done)``.
VerifyTask = Callable[[], Tuple[list, int, int]]


#: ``compress(codec, chunk)``: a future-like object (``done()``, ``result()`` → ``(stored bytes,
#: filter mask)``) for a chunk compressed elsewhere (the conversion's workers), or None.
Compressor = Callable[[Any, Any], Optional[Any]]


class EntryWriter(Protocol):
    """What a conversion writes entries through, whatever the layout."""

    def __len__(self) -> int: ...

    def add(self, item: "Packed") -> None:
        """Store one entry (raises :class:`~data2h5.errors.LayoutError` if it does not fit)."""

    def skip(self, key: str, reason: str) -> None:
        """Note a file that could not be read."""

    def checkpoint(self) -> None:
        """Journal what was written since the last checkpoint."""

    def close(self, order: Optional[dict] = None) -> int:
        """Finish the archive (index included), entries in ``order[key]`` order where the
        layout can reorder; returns the bytes of entry data stored."""


class Checker(Protocol):
    """What verify offers a layout to check an archive with (see :mod:`data2h5.verify`)."""

    reader: "ArchiveReader"
    index: "Index"
    sources: dict

    def walk_tree(self) -> None: ...

    def entries(self, positions: range) -> Tuple[list, int, int]: ...

    def sources_of(self, positions: range) -> Tuple[list, int, int]: ...

    def rows(self, lo: int, hi: int, read: Callable[[], Any], checksummed: bool) -> Tuple[list, int, int]: ...

    def archive_problem(self, reason: str) -> None: ...


class Layout:
    """One layout. Subclasses override what their layout does differently."""

    name: str = ""
    #: A conversion can write it (``plain`` cannot).
    writable: bool = True
    #: Workers compress each entry (:func:`data2h5.encoding.pack`); else they hand the writer
    #: decoded arrays.
    packed_by_workers: bool = True
    #: Each entry is its own HDF5 dataset, named by its key, described by a recorded index
    #: (its storage is proven to be the dataset's own before a fast read).
    indexed_datasets: bool = False
    #: Each entry is an HDF5 dataset that may carry attributes.
    entry_datasets: bool = True
    #: The archive records its source's checksums (verify can compare a source folder).
    records_source: bool = True

    def read_index(self, f: "h5py.File", attrs: dict, limit: int) -> Optional["Index"]:
        """The archive's index, its rows not yet checked; None when ``f`` is not an archive
        of this layout after all (it is then read as ``plain``)."""
        raise NotImplementedError

    def open_writer(self, f: "h5py.File", *, entries: int, codec: Optional["Codec"],
                    checkpoints: Optional["Checkpoints"] = None, compress: Optional[Compressor] = None) -> EntryWriter:
        """A writer of ``entries`` (at most) into ``f``. ``compress``: where a layout that
        compresses its own chunks may have the conversion's workers do it."""
        raise LayoutError(f"the {self.name} layout cannot be written")

    def reuse(self, run: "InterruptedRun", files: List["SourceFile"], writer: EntryWriter, blocks: "BlockReader",
              reused: "Reused") -> List["SourceFile"]:
        """Copy what ``run`` safely holds into ``writer``; returns the files still to read."""
        return files


    def entry_reader(self, reader: "ArchiveReader") -> Optional[Any]:
        """What reads this layout's entries in place of ``reader`` itself (its ``read_stored``,
        ``dataset`` and ``attr`` by row), e.g. a reader per shard; None: ``reader`` reads them."""
        return None

    #: ``verify_archive(archive, index, **options)``: a verify of its own (e.g. shard by shard), or None.
    verify_archive: Optional[Callable[..., Any]] = None

    def kept(self, run: "InterruptedRun") -> int:
        """Entries of an interrupted run of this layout that a resume could reuse."""
        return 0

    def read_h5(self, reader: "ArchiveReader", pos: int) -> "np.ndarray":
        """Entry ``pos`` read through h5py (HDF5 decodes it)."""
        return reader.dataset(pos)[()]

    def verify_tasks(self, checker: Checker, batch: int) -> Iterator[VerifyTask]:
        """The tasks that check every entry (and, given sources, every source file)."""
        import functools

        n = len(checker.index)
        for lo in range(0, n, batch):
            yield functools.partial(checker.entries, range(lo, min(n, lo + batch)))

    def extract_values(self, archive: str, index: "Index", todo: Sequence[Tuple[int, str]]
                       ) -> Iterator[Tuple[str, "np.ndarray", bool]]:
        """``(relative path, stored array, whether it is written as .npy)`` of each planned
        entry, read and checked."""
        raise NotImplementedError


def get(name: str) -> Layout:
    """The layout called ``name``; :class:`LayoutError` naming the choices for another name."""
    target = LAYOUTS.get(name) if isinstance(name, str) else None
    if target is None:
        raise LayoutError(f"unknown layout {name!r}: use {', '.join(writable())}")
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def writable() -> Tuple[str, ...]:
    """The layouts a conversion can be asked for by name."""
    return tuple(name for name in LAYOUTS if name not in (PLAIN, SHARDED))


def recorded() -> Tuple[str, ...]:
    """The layouts an archive data2h5 wrote may record."""
    return tuple(name for name in LAYOUTS if name != PLAIN)
