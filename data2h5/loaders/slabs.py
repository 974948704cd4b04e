"""The chunk path: rows read a slab (every chunk at one sample position) at a time.

Where it can, a worker reads a chunk's stored bytes with ``os.pread`` at the address HDF5
reports and decompresses them itself: h5py serialises every call behind one global lock,
while ``pread``, zlib and zstandard release the GIL, so only this path lets threads overlap.
Datasets whose filters it cannot decode (shuffle, blosc, fletcher32...) are read through h5py.
The chunk-level reads are in :mod:`data2h5.chunks`; this module caches the decoded slabs for
sequential batches and decodes shuffle windows (:class:`_Window`) for shuffled ones.
:func:`open_rows` picks the fastest row source a dataset's storage allows.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import h5py
import numpy as np

from ..chunks import ContiguousBlocks, Field, H5pyChunks, RawChunks, dataset_filters, require_filters
from ..codecs import decoder
from .plan import runs_of_equal
from .rows import H5pyRows, Rows

if TYPE_CHECKING:
    from .plan import BatchPart, DecodeAhead, WindowSpec

log = logging.getLogger(__name__)

SPARE_WINDOWS = 2  # window arrays kept for reuse: fresh memory costs a page fault per 4 KiB
FINISHED_KEYS = 1024  # windows remembered as read to the end, so a late decode-ahead skips them


def _scatter(out: np.ndarray, pos: np.ndarray, src: np.ndarray, rows: np.ndarray) -> None:
    """``out[pos] = src[rows]``, with plain slices when both are runs (the sequential case)."""
    n = len(pos)
    if pos[-1] - pos[0] == n - 1 and rows[-1] - rows[0] == n - 1 and (n < 3 or np.all(np.diff(pos) == 1)):
        out[pos[0] : pos[0] + n] = src[rows[0] : rows[0] + n]
    else:
        out[pos] = src[rows]


def _is_run(indices: np.ndarray) -> bool:
    n = len(indices)
    return bool(indices[-1] - indices[0] == n - 1 and (n < 3 or np.all(np.diff(indices) == 1)))


class _Slab:
    """A cache entry: a decoded slab, or the error decoding it raised."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Optional[np.ndarray] = None
        self.error: Optional[BaseException] = None


class SlabRows(Rows):
    """Rows of a dataset read a slab at a time (chunked, or contiguous in blocks).

    Sequential batches come from a small LRU cache of decoded slabs shared by the workers, so
    a chunk straddling two batches is decoded once. Shuffled batches come from windows
    (:class:`_Window`): each slab of a window is decoded once into one array, and a batch is
    one fancy-indexed copy out of it.
    """

    def __init__(self, loader, method: str, capacity: int, dtype: np.dtype, row_shape: Tuple[int, ...]):
        self.loader, self.method = loader, method
        self.slab_rows = loader.rows
        self.capacity = max(1, capacity)
        self.dtype, self.row_shape = dtype, row_shape
        self._lock = threading.Lock()
        self._cache: "collections.OrderedDict[int, _Slab]" = collections.OrderedDict()
        self._windows: Dict[Any, _Window] = {}
        self._finished: Dict[Any, None] = {}  # keys of windows read to the end, oldest first
        self._spare: List[np.ndarray] = []  # window arrays to reuse
        self.decoded: Dict[str, int] = {"ahead": 0, "on demand": 0}  # window slabs decoded, by whom

    def slab(self, s: int) -> np.ndarray:
        with self._lock:
            entry = self._cache.get(s)
            owner = entry is None
            if owner:
                entry = self._cache[s] = _Slab()
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(s)
        if owner:
            try:
                entry.value = self.loader.load(s)
            except BaseException as exc:
                entry.error = exc
                with self._lock:
                    if self._cache.get(s) is entry:
                        del self._cache[s]
                raise
            finally:
                entry.done.set()
        else:
            if not entry.done.is_set():
                entry.done.wait()
            if entry.error is not None:
                raise entry.error
        return entry.value

    def fill(self, indices: np.ndarray, out: np.ndarray) -> None:
        if isinstance(self.loader, ContiguousBlocks) and out.flags.c_contiguous and _is_run(indices):
            self.loader.read(int(indices[0]), int(indices[0]) + len(indices), into=out)
            return
        order = np.argsort(indices, kind="stable")
        srt = indices[order]
        k = self.slab_rows
        for a, b in runs_of_equal(srt // k):
            s = int(srt[a]) // k
            _scatter(out, order[a:b], self.slab(s), srt[a:b] - s * k)

    def gather(self, part: "BatchPart", out: np.ndarray) -> None:
        """Copy one window's share of a shuffled batch into ``out``."""
        spec = part.window
        window = self._enter(spec, ahead=False)
        decoded = 0
        try:
            decoded = window.ensure(np.unique(np.searchsorted(spec.starts, part.local, side="right") - 1),
                                    self.loader)
            if out.flags.c_contiguous and out.dtype == window.array.dtype:
                np.take(window.array, part.local, axis=0, out=out, mode="clip")  # "raise" would buffer
            else:
                out[...] = window.array[part.local]
        finally:
            self._leave(spec.key, consumed=True, decoded=decoded, ahead=False)

    def prepare(self, ahead: "DecodeAhead") -> None:
        """Decode some slabs of a window that later batches read. An error is not raised here
        but by the batch that needs the slab, which decodes it again."""
        spec = ahead.window
        window = self._enter(spec, ahead=True)
        if window is None:  # its batches are all read already
            return
        decoded = 0
        try:
            decoded = window.ensure(np.arange(ahead.lo, ahead.hi), self.loader)
        except Exception as exc:  # noqa: BLE001 - raised again by the batch that reads the slab
            log.debug("%s: decoding ahead failed, left to the batch that reads it: %s", self.loader.field.path, exc)
        finally:
            self._leave(spec.key, consumed=False, decoded=decoded, ahead=True)

    def _enter(self, spec: "WindowSpec", ahead: bool) -> Optional["_Window"]:
        with self._lock:
            window = self._windows.get(spec.key)
            if window is None:
                if ahead and spec.key in self._finished:
                    return None
                rows = int(spec.starts[-1])
                spare = self._spare.pop() if self._spare else None
                if spare is None or len(spare) < rows:
                    spare = np.empty((rows, *self.row_shape), dtype=self.dtype)
                window = self._windows[spec.key] = _Window(spare, spec.slabs, spec.starts, spec.refs)
            window.users += 1
            return window

    def _leave(self, key, consumed: bool, decoded: int, ahead: bool) -> None:
        with self._lock:
            self.decoded["ahead" if ahead else "on demand"] += decoded
            window = self._windows.get(key)
            if window is None:
                return
            window.users -= 1
            window.refs -= consumed
            if window.refs <= 0 and window.users <= 0:
                del self._windows[key]
                self._finished[key] = None
                if len(self._finished) > FINISHED_KEYS:
                    del self._finished[next(iter(self._finished))]
                self._keep_spare(window.base)

    def _keep_spare(self, base: np.ndarray) -> None:
        if len(self._spare) < SPARE_WINDOWS:
            self._spare.append(base)

    def reset(self) -> None:
        with self._lock:
            for window in self._windows.values():
                self._keep_spare(window.base)
            self._windows.clear()
            self._finished.clear()


class _Window:
    """Rows of a few slabs decoded into one array; shuffled batches are drawn from it.

    Each slab is loaded once, by the first worker that needs it; the others wait for it.
    ``refs`` counts the batches still to read from it, ``users`` the workers inside it now.
    """

    def __init__(self, base: np.ndarray, slabs: np.ndarray, starts: np.ndarray, refs: int):
        self.base = base
        self.array = base[: int(starts[-1])]
        self.slabs, self.starts, self.refs, self.users = slabs, starts, refs, 0
        self.state = np.zeros(len(slabs), np.uint8)  # 0 to load, 1 loading, 2 loaded
        self.cond = threading.Condition()

    def ensure(self, needed: np.ndarray, loader) -> int:
        """Load the slabs at positions ``needed`` that are not loaded; returns how many this
        call loaded."""
        decoded = 0
        for i in needed[self.state[needed] != 2].tolist():
            with self.cond:
                while self.state[i] == 1:
                    self.cond.wait()
                if self.state[i] == 2:
                    continue
                self.state[i] = 1
            loaded = False
            try:
                loader.load_into(int(self.slabs[i]), self.array[self.starts[i] : self.starts[i + 1]])
                loaded = True
                decoded += 1
            finally:
                with self.cond:
                    self.state[i] = 2 if loaded else 0
                    self.cond.notify_all()
        return decoded


def open_rows(field: Field, fd: int, direct: bool, capacity: Callable[[int], int]) -> Rows:
    """Pick the fastest reader that can decode this dataset's storage."""
    dset = field.dset
    dcpl = dset.id.get_create_plist()
    layout = dcpl.get_layout()
    plain = (
        direct
        and hasattr(os, "pread")  # not on Windows: h5py reads everything there
        and dset.dtype.kind in "biufc"
        and dset.dtype.fields is None
        and dset.id.get_type().get_size() == dset.dtype.itemsize
        and dcpl.get_external_count() == 0
    )
    loader, method = None, ""
    if layout == h5py.h5d.CHUNKED:
        filters = dataset_filters(dset)
        decode = decoder(filters[0]) if len(filters) == 1 else None
        if plain and (not filters or decode is not None):
            loader, method = RawChunks(field, fd, decode), "direct-chunks"
        else:
            require_filters(field.path, field.name, filters)
            loader, method = H5pyChunks(field), "h5py-chunks"
    elif layout == h5py.h5d.CONTIGUOUS and plain and field.sample_axis == 0:
        offset = dset.id.get_offset()
        if offset is not None and dset.id.get_storage_size() == dset.size * dset.dtype.itemsize:
            loader, method = ContiguousBlocks(field, fd, offset), "direct-contiguous"
    if loader is None:
        return H5pyRows(field)
    row_shape = tuple(n for d, n in enumerate(dset.shape) if d != field.sample_axis)
    return SlabRows(loader, method, capacity(loader.rows), dset.dtype, row_shape)
