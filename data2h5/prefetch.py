"""Asynchronous batch reader: threads prefetch minibatches of an HDF5 ``data``/``labels`` pair.

While the caller trains on one batch, worker threads fill the next ones into preallocated
buffers. Where it can, a worker reads a chunk's stored bytes with ``os.pread`` at the address
HDF5 reports and decompresses them itself: h5py serialises every call behind one global lock,
while ``pread``, zlib and zstandard release the GIL, so only this path lets threads overlap.
Datasets whose filters it cannot decode (shuffle, blosc, fletcher32...) are read through h5py.
The chunk-level reads are in :mod:`data2h5.chunks`; this module turns them into batches.

Shuffling never reads one row at a time: an epoch permutes the chunks along the sample axis
and mixes the rows within windows of whole chunks; the workers decode each chunk of a window
once into one array, and a batch is one fancy-indexed copy out of it. Each window is decoded
ahead, a share by each of the batches before the first that reads it (see :class:`_Plan`).
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import h5py
import numpy as np

from . import safety
from .chunks import ContiguousBlocks, Field, H5pyChunks, RawChunks, dataset_filters, decoder, require_filters
from .errors import ArchiveError, CorruptEntryError, PluginError, UnsafeArchiveError
from .format import STACKED_CLASSES, STACKED_LABELS
from .index import check_labels, open_h5
from .loaders.ranks import balanced_bounds, check_world_change, resolve_rank
from .safety import MAX_ENTRY_BYTES

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Postprocess = Callable[[Any, Any], Tuple[Any, Any]]

THREAD_PREFIX = "data2h5-prefetch"
LABELS_IN_MEMORY_BYTES = 64 << 20  # labels at most this big are read once, at open
WINDOW_BYTES = 32 << 20  # default shuffle window: the rows that fit in this many bytes
SPARE_WINDOWS = 2  # window arrays kept for reuse: fresh memory costs a page fault per 4 KiB
FINISHED_KEYS = 1024  # windows remembered as read to the end, so a late decode-ahead skips them


# --------------------------------------------------------------------------- row readers


class _Rows:
    """Reads rows (samples) of one dataset into a sample-first output view."""

    method = ""
    slab_rows = 0  # rows per chunk along the sample axis; 0 when reads have no chunk grain

    def fill(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Write row ``indices[i]`` to ``out[i]``; ``indices`` holds no duplicates."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget state kept between batches (called while no worker runs)."""


def _scatter(out: np.ndarray, pos: np.ndarray, src: np.ndarray, rows: np.ndarray) -> None:
    """``out[pos] = src[rows]``, with plain slices when both are runs (the sequential case)."""
    n = len(pos)
    if pos[-1] - pos[0] == n - 1 and rows[-1] - rows[0] == n - 1 and (n < 3 or np.all(np.diff(pos) == 1)):
        out[pos[0] : pos[0] + n] = src[rows[0] : rows[0] + n]
    else:
        out[pos] = src[rows]


def _runs_of_equal(values: np.ndarray) -> List[Tuple[int, int]]:
    """``[start, stop)`` of each run of equal values."""
    breaks = np.flatnonzero(np.diff(values)) + 1
    edges = [0, *breaks.tolist(), len(values)]
    return list(zip(edges[:-1], edges[1:]))


def _is_run(indices: np.ndarray) -> bool:
    n = len(indices)
    return bool(indices[-1] - indices[0] == n - 1 and (n < 3 or np.all(np.diff(indices) == 1)))


class _MemoryRows(_Rows):
    """A small dataset read whole at open (labels, usually)."""

    method = "memory"

    def __init__(self, array: np.ndarray):
        self.array = array

    def fill(self, indices: np.ndarray, out: np.ndarray) -> None:
        out[...] = self.array[indices]


class _H5pyRows(_Rows):
    """Rows read through h5py, one selection per batch (datasets with no chunk grain)."""

    method = "h5py"

    def __init__(self, field: Field):
        self.field = field

    def fill(self, indices: np.ndarray, out: np.ndarray) -> None:
        f = self.field
        order = np.argsort(indices, kind="stable")
        srt = indices[order]
        lo, hi = int(srt[0]), int(srt[-1]) + 1
        sel = slice(lo, hi) if hi - lo == len(srt) else srt
        try:
            arr = f.sample_first(f.dset[f.along(sel)])
        except OSError as exc:
            raise CorruptEntryError(f"{f.where(lo, hi)} cannot be read ({exc}); the archive is damaged") from exc
        out[order] = arr


class _Slab:
    """A cache entry: a decoded slab, or the error decoding it raised."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Optional[np.ndarray] = None
        self.error: Optional[BaseException] = None


class _SlabRows(_Rows):
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
        for a, b in _runs_of_equal(srt // k):
            s = int(srt[a]) // k
            _scatter(out, order[a:b], self.slab(s), srt[a:b] - s * k)

    def gather(self, part: "_Part", out: np.ndarray) -> None:
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

    def prepare(self, ahead: "_Ahead") -> None:
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

    def _enter(self, spec: "_WindowSpec", ahead: bool) -> Optional["_Window"]:
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


def _open_rows(field: Field, fd: int, direct: bool, capacity: Callable[[int], int]) -> _Rows:
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
        return _H5pyRows(field)
    row_shape = tuple(n for d, n in enumerate(dset.shape) if d != field.sample_axis)
    return _SlabRows(loader, method, capacity(loader.rows), dset.dtype, row_shape)


# --------------------------------------------------------------------------- epochs


@dataclass
class _WindowSpec:
    """One shuffle window of an epoch, as the plan lays it out."""

    key: Tuple[int, int]  # (epoch, window)
    slabs: np.ndarray  # the window's slabs, in the order their rows are laid out
    starts: np.ndarray  # first row of each slab in the window array, then its length
    refs: int  # batches that read from this window


@dataclass
class _Part:
    """The rows of one batch that come from one shuffle window."""

    window: _WindowSpec
    local: np.ndarray  # rows of the window array, in batch order
    lo: int  # where they go in the batch
    hi: int


@dataclass
class _Ahead:
    """Slabs ``lo:hi`` of a window that a batch decodes for the batches after it."""

    window: _WindowSpec
    lo: int
    hi: int


class _Plan:
    """One epoch: the order of its rows and, for shuffled slab reads, its windows.

    Shuffled reads of a chunked dataset permute whole slabs, group them into windows of
    about ``window`` rows, and permute the rows within each window; a batch then needs only
    the slabs of one or two windows, each decoded once.

    Decoding a whole window when its first batch is read would make that batch cost several
    others, a spike that ``prefetch`` batches of read-ahead cannot hide. Instead window ``w``
    is decoded ahead, its slabs shared out evenly over the batches from the first that reads
    window ``w - 1`` to the last before the first that reads ``w`` (at least that last one);
    the last batches of the epoch decode the next epoch's first window. So every batch costs about the same, and a
    window is held decoded while the window before it is read.

    With several ranks the plan is the rank's share (see :func:`_rank_bounds`): its span of
    rows in order, or its span of the permuted slabs (the short last slab kept last, so each
    rank's count is the same every epoch), then windowed as above; no two ranks decode a slab.
    """

    def __init__(self, epoch: int, n: int, shuffle: bool, rng: np.random.Generator, k: int, window: int,
                 batch_size: int, batches: int, rank: int = 0, world_size: int = 1):
        self.epoch, self.batch_size = epoch, batch_size
        self.windows: List[_WindowSpec] = []
        self.ahead: Dict[int, List[Tuple[int, int, int]]] = {}  # batch: (window, first slab, stop)
        rows, slab_bounds = _rank_bounds(n, k, world_size)
        lo, hi = rows[rank], rows[rank + 1]
        if not shuffle:
            self.order = np.arange(lo, hi)
            return
        if k <= 1:  # no chunk grain, or one row a chunk: any order reads as fast
            self.order = rng.permutation(n)[lo:hi] if world_size > 1 else rng.permutation(n)
            return
        slabs = rng.permutation(-(-n // k))
        if world_size > 1:
            if n % k:  # the short slab last: every epoch gives each rank the same count
                slabs = np.concatenate([slabs[slabs != len(slabs) - 1], [len(slabs) - 1]])
            slabs = slabs[slab_bounds[rank] : slab_bounds[rank + 1]]
            if not len(slabs):
                self.order = np.arange(0)
                return
        per = max(1, -(-window // k))
        orders, locals_, window_of, groups = [], [], [], []
        for w, i in enumerate(range(0, len(slabs), per)):
            group = slabs[i : i + per]
            sizes = np.minimum(k, n - group * k)
            starts = np.concatenate([[0], np.cumsum(sizes)])
            rows = (group[:, None] * k + np.arange(k)).ravel()
            rows = rows[rows < n]  # laid out slab after slab: row j of this is window row j
            local = rng.permutation(len(rows))
            orders.append(rows[local])
            locals_.append(local)
            window_of.append(np.full(len(rows), w))
            groups.append((group, starts))
        self.order = np.concatenate(orders)
        self.local = np.concatenate(locals_)
        self.window_of = np.concatenate(window_of)
        # Batches that read from each window: the window's rows span batch first..last.
        sizes = np.array([int(starts[-1]) for _, starts in groups])
        ends = np.cumsum(sizes)
        firsts, lasts = (ends - sizes) // batch_size, (ends - 1) // batch_size
        refs = np.clip(np.minimum(lasts, batches - 1) - firsts + 1, 0, None)
        self.windows = [_WindowSpec((epoch, w), g, st, int(r)) for w, ((g, st), r) in enumerate(zip(groups, refs))]
        self._schedule([int(f) for f in firsts], batches, min(per, len(slabs)))

    def _schedule(self, firsts: List[int], batches: int, first_window_slabs: int) -> None:
        """Fill ``self.ahead``; window ``len(self.windows)`` stands for the next epoch's first."""
        bounds = firsts + [batches]
        for w in range(1, len(self.windows) + 1):
            if bounds[w] >= batches and w < len(self.windows):
                continue  # no batch reads it (drop_last)
            z = min(bounds[w], batches)
            a = max(0, min(bounds[w - 1], z - 1))  # windows first read by one batch: the one before
            m = len(self.windows[w].slabs) if w < len(self.windows) else first_window_slabs
            for j, b in enumerate(range(a, z)):
                lo, hi = j * m // (z - a), (j + 1) * m // (z - a)
                if hi > lo:
                    self.ahead.setdefault(b, []).append((w, lo, hi))

    def batch(self, b: int) -> Tuple[np.ndarray, Optional[List[_Part]]]:
        lo, hi = b * self.batch_size, (b + 1) * self.batch_size
        indices = self.order[lo:hi]
        if not self.windows:
            return indices, None
        parts = []
        window_of = self.window_of[lo:hi]
        for a, z in _runs_of_equal(window_of):
            w = int(window_of[a])
            parts.append(_Part(self.windows[w], self.local[lo + a : lo + z], a, z))
        return indices, parts


def _rank_bounds(n: int, k: int, world_size: int) -> Tuple[List[int], List[int]]:
    """First row of each rank's share then ``n``, and (with a chunk grain of ``k > 1`` rows)
    first slab of each rank's share then the slab count; rank shares follow slab bounds so
    that no two ranks decode one chunk, and differ by less than two slabs of rows."""
    if world_size == 1:
        return [0, n], [0, -(-n // max(k, 1))]
    if k <= 1:
        return balanced_bounds(n, world_size), []
    slabs = -(-n // k)
    cuts = [min(slabs, (2 * r * n + world_size * k) // (2 * world_size * k)) for r in range(world_size)] + [slabs]
    return [min(j * k, n) for j in cuts], cuts


# --------------------------------------------------------------------------- layouts


def _axes(file_layout: Optional[str], layout: Optional[str], ndim: int, where: str) -> Tuple[int, List[int]]:
    """The sample axis in the file and the permutation from file axes to output axes."""
    if file_layout is None:
        if layout is not None:
            raise ValueError(f"{where}: layout={layout!r} needs file_layout= to say what the stored axes are")
        return 0, list(range(ndim))
    layout = file_layout if layout is None else layout
    for name, text in (("file_layout", file_layout), ("layout", layout)):
        if len(text) != ndim or len(set(text)) != ndim or "N" not in text:
            raise ValueError(
                f"{where}: {name}={text!r} must name each of the {ndim} axes once, the sample axis 'N'"
            )
    if set(file_layout) != set(layout):
        raise ValueError(f"{where}: layout={layout!r} must use the letters of file_layout={file_layout!r}")
    return file_layout.index("N"), [file_layout.index(a) for a in layout]


# --------------------------------------------------------------------------- ring buffers


class _Slot:
    """One preallocated batch: output-layout arrays and the views the readers write through."""

    def __init__(self, out_shape, dtype, n_axis: int, sf_axes, labels_shape, labels_dtype, torch_mod, pin: bool):
        self.data, self.data_t = _alloc(out_shape, dtype, torch_mod, pin)
        self.labels, self.labels_t = (None, None) if labels_shape is None else \
            _alloc(labels_shape, labels_dtype, torch_mod, pin)
        self.n_axis = n_axis
        self.data_sf = self.data.transpose(sf_axes)  # sample first, other axes in file order
        self.event = None  # CUDA event of the last non-blocking copy out of this slot

    def batch(self, n: int) -> Tuple[Any, Any]:
        """The first ``n`` rows, as torch tensors where the ring is made of them."""
        data = self.data if self.data_t is None else self.data_t
        labels = self.labels if self.labels_t is None else self.labels_t
        data = data[(slice(None),) * self.n_axis + (slice(0, n),)]
        return data, None if labels is None else labels[:n]


def _alloc(shape, dtype: np.dtype, torch_mod, pin: bool) -> Tuple[np.ndarray, Any]:
    """A numpy array and, when torch is wanted and can hold the dtype, a tensor sharing it."""
    try:
        tdtype = torch_mod.from_numpy(np.empty(0, dtype)).dtype
    except (AttributeError, TypeError):  # no torch wanted, or a dtype torch has not (bytes)
        return np.empty(shape, dtype=dtype), None
    tensor = torch_mod.empty(shape, dtype=tdtype, pin_memory=pin)
    return tensor.numpy(), tensor


@dataclass
class _State:
    """What a worker needs to fill a batch; never references the BatchReader."""

    path: str
    data: _Rows
    labels: Optional[_Rows]
    postprocess: Optional[Postprocess]


def _fill(state: _State, slot: _Slot, indices: np.ndarray, parts: Optional[List[_Part]], ahead: List[_Ahead]):
    """Worker: decode this batch's share of a later window, read one batch into ``slot`` and
    post-process it."""
    for job in ahead:  # first: a batch running beside this one may need these slabs soon
        state.data.prepare(job)
    if slot.event is not None:  # the last copy out of these pinned buffers must be done
        slot.event.synchronize()
        slot.event = None
    n = len(indices)
    if parts is None:
        state.data.fill(indices, slot.data_sf[:n])
    else:
        for part in parts:
            state.data.gather(part, slot.data_sf[part.lo : part.hi])
    if state.labels is not None:
        state.labels.fill(indices, slot.labels[:n])
    data, labels = slot.batch(n)
    if state.postprocess is not None:
        try:
            data, labels = state.postprocess(data, labels)
        except Exception as exc:
            name = getattr(state.postprocess, "__qualname__", repr(state.postprocess))
            raise PluginError(f"{state.path}: postprocess {name} raised {type(exc).__name__}: {exc}") from exc
    return data, labels


@dataclass(frozen=True)
class ReaderState:
    """Where a :class:`BatchReader` stands: ``state_dict()`` returns these fields as a dict."""

    epoch: int  # the epoch of the next batch to return
    batch: int  # that batch, within the epoch
    seed: int  # the shuffle's seed entropy (a seed=None reader's random one)
    num_rows: int
    batch_size: int
    world_size: int
    rank: int
    shuffle: bool
    drop_last: bool
    window: int


_READER_PLAN_FIELDS = ("num_rows", "batch_size", "seed", "shuffle", "drop_last", "window")


@dataclass
class _Pending:
    epoch: int
    batch: int
    slot: int
    future: Any


class _Resources:
    """Threads and handles, shut down by close() or by the reader's finalizer."""

    def __init__(self) -> None:
        self.executor: Optional[ThreadPoolExecutor] = None
        self.h5: Optional[h5py.File] = None
        self.fd: Optional[int] = None

    def stop_threads(self) -> None:
        executor, self.executor = self.executor, None
        if executor is not None:
            # A finalizer may run on a worker thread (a cycle collected there): never join it.
            own = threading.current_thread() in getattr(executor, "_threads", ())
            executor.shutdown(wait=not own, cancel_futures=True)

    def release(self) -> None:
        self.stop_threads()
        if self.h5 is not None:
            try:
                self.h5.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown may have torn h5py down
                pass
            self.h5 = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- the reader


class BatchReader:
    """Minibatches of an HDF5 ``data`` (+ ``labels``) pair, prefetched by background threads.

    ``data`` is any dataset of shape (N, ...) (or with the samples on another axis, see
    ``file_layout``); ``labels``, if present, has N rows on axis 0. Iterating yields one epoch
    of ``(data, labels)`` batches; ``labels`` is None when ``labels_field=None``::

        with BatchReader("train.h5", batch_size=64, shuffle=True, seed=0,
                         file_layout="NHWC", layout="NCHW") as reader:
            for epoch in range(10):
                for data, labels in reader:
                    train(data, labels)

    or, as in torch.async-hdf5-reader, ``fetch()`` starts reading a batch in the background
    and ``next_batch()`` blocks until the oldest fetched batch is ready.

    **Buffer reuse.** Batches are read into ``prefetch + 1`` preallocated buffers used in a
    ring: the arrays a batch returns stay valid only until the next batch is requested, after
    which a worker may overwrite them. Pass ``copy=True`` to get arrays of your own (or copy
    what you keep). A ``postprocess`` that returns new arrays also gives you arrays of your own.

    **Threads.** ``threads`` workers read batches in order; they stop on :meth:`close`, on
    leaving a ``with`` block, when the reader is garbage collected, and when an epoch's loop
    is left early (``break`` or an exception), after which the next loop starts a fresh epoch.
    An error in a worker is raised by the call that asks for that batch.

    Args:
        path: the HDF5 file.
        batch_size: rows per batch; the last batch of an epoch may be smaller unless
            ``drop_last``.
        shuffle: visit rows in a new random order every epoch. Rows are mixed within windows
            of ``shuffle_window`` rows (whole chunks); the chunks themselves in any order.
        seed: seed of the shuffle; epoch ``e`` uses ``(seed, e)``. None: a random seed.
        rank, world_size: read this rank's share of each epoch (default: from an initialised
            ``torch.distributed``, else 0 and 1). Shares are disjoint and together every row;
            they follow chunk bounds, so no two ranks decode one chunk, and may differ by up
            to two chunks of rows. With ``drop_last`` every rank reads the same number of
            batches (as DDP needs); without, every row exactly once (evaluation).
        shuffle_window: rows mixed together, rounded up to whole chunks. Each window is
            decoded ahead, a share of it by each batch of the window before, so three are
            held in memory, decoded: the one read, the next, and the one before while its
            last batch is read (one more for each window's worth of ``prefetch`` batches);
            their arrays are reused. Default: the rows that fit in 32 MiB, at least 4
            batches. A window of at least the dataset's length shuffles it fully.
        threads: worker threads. 2 suits a 2-core machine where chunks are zlib or zstd
            compressed; lzf and h5py-read datasets hold the GIL, so more threads add little.
        prefetch: batches read ahead of the one the caller holds.
        postprocess: ``f(data, labels) -> (data, labels)``, run in the worker thread on each
            batch (torch tensors when ``device`` is set, else numpy arrays).
        data_field, labels_field: dataset names; ``labels_field=None`` reads no labels.
        file_layout, layout: the stored axes and the axes wanted, one letter per axis with
            ``N`` for samples, e.g. ``file_layout="NHWC", layout="NCHW"``. Default: as stored,
            samples on axis 0.
        drop_last: drop the last batch of an epoch if it is smaller than ``batch_size``.
        copy: return arrays the reader never reuses.
        device: return torch tensors moved to this device (``"cpu"`` for CPU tensors).
        pin_memory: allocate the ring in pinned memory so copies to the GPU run
            asynchronously; without CUDA it warns and does nothing. With ``device`` set, the
            reader waits for each copy to end before it refills the buffer; without it, finish
            your own ``non_blocking`` copy before asking for the next batch.
        direct: read and decompress chunks in the worker threads instead of through h5py
            wherever the filters allow (the fast path; False forces h5py, for comparison).
        max_entry_bytes: refuse a file whose rows or chunks declare more than this (the
            file is untrusted input: see :mod:`data2h5.safety`). Datasets stored or linked
            outside the file are refused, and labels must index the file's ``classes``.

    **Resuming.** :meth:`state_dict` names the batch after the last one returned, and
    :meth:`load_state_dict` (in a new process too) makes the next loop start there; with
    another world size it is refused mid-epoch and accepted at an epoch boundary.

    Attributes:
        epoch: the epoch of the last batch returned (-1 before the first).
        num_rows: samples in the dataset.
        rank_rows: rows of this rank's share of an epoch.
        method: how ``data`` is read (see the property).
    """

    def __init__(
        self,
        path: PathLike,
        batch_size: int = 1,
        *,
        shuffle: bool = False,
        seed: Optional[int] = None,
        shuffle_window: Optional[int] = None,
        threads: int = 2,
        prefetch: int = 2,
        postprocess: Optional[Postprocess] = None,
        data_field: str = "data",
        labels_field: Optional[str] = "labels",
        file_layout: Optional[str] = None,
        layout: Optional[str] = None,
        drop_last: bool = False,
        copy: bool = False,
        device: Any = None,
        pin_memory: bool = False,
        direct: bool = True,
        max_entry_bytes: int = MAX_ENTRY_BYTES,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        self.path = os.fspath(path)
        self._limit = int(max_entry_bytes)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        for name, value in (("batch_size", batch_size), ("threads", threads), ("prefetch", prefetch),
                            ("shuffle_window", 1 if shuffle_window is None else shuffle_window)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self.batch_size, self.threads, self.prefetch = int(batch_size), int(threads), int(prefetch)
        self.shuffle, self.drop_last, self.copy = bool(shuffle), bool(drop_last), bool(copy)
        self.postprocess = postprocess
        self._torch, self._device, pin = _torch_options(device, pin_memory)
        self._pinned = pin

        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.release)
        try:
            self._open(data_field, labels_field, file_layout, layout, shuffle_window, direct)
        except BaseException:
            self._finalizer()
            raise
        self._seed = np.random.SeedSequence(seed).entropy
        self._slots = [
            _Slot(self._out_shape, self._data_dtype, self._n_axis, self._sf_axes, self._labels_shape,
                  self._labels_dtype, self._torch, pin)
            for _ in range(self.prefetch + 1)
        ]
        self._free: Deque[int] = collections.deque(range(len(self._slots)))
        self._held: Optional[int] = None  # the slot of the batch the caller holds
        self._pending: Deque[_Pending] = collections.deque()
        self._cursor = (0, 0)  # (epoch, batch) of the next batch to fetch
        self._plans: Dict[int, _Plan] = {}  # by epoch: the one being fetched and the next
        self.epoch = -1  # epoch of the last batch returned
        self._at_boundary = True  # whether the last batch returned ended its epoch
        self._next_pos = (0, 0)  # (epoch, batch) after the last batch returned: where to resume

    def _open(self, data_field, labels_field, file_layout, layout, shuffle_window, direct) -> None:
        path = self.path
        self._res.h5 = h5 = open_h5(path)
        try:
            self._res.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ArchiveError(f"{path}: cannot open: {exc}") from exc
        data = _dataset(h5, path, data_field)
        if data.ndim == 0:
            raise ArchiveError(f"{path}: dataset {data_field!r} is a scalar, not rows of samples")
        safety.check_chunks(data, self._limit, path, data_field)
        if data.dtype.hasobject:
            raise ArchiveError(f"{path}: dataset {data_field!r} holds variable-length values; BatchReader "
                               "reads fixed-size arrays only")
        sa, perm = _axes(file_layout, layout, data.ndim, f"{path}: dataset {data_field!r}")
        self.num_rows = n = data.shape[sa]
        row_shape = tuple(d for i, d in enumerate(data.shape) if i != sa)
        safety.check_size(safety.declared_bytes(row_shape, data.dtype.itemsize) * self.batch_size, self._limit, path,
                          f"a batch of {self.batch_size} rows of {data_field!r}")
        row_bytes = max(1, data.size // max(n, 1) * data.dtype.itemsize)
        window = shuffle_window or max(4 * self.batch_size, WINDOW_BYTES // row_bytes)
        self._window = window
        field = Field(path, data_field, data, sa)
        self._data_rows = _open_rows(field, self._res.fd, direct, self._cache_slabs)

        self._labels_rows: Optional[_Rows] = None
        self._labels_shape = self._labels_dtype = None
        if labels_field is not None:
            labels = _dataset(h5, path, labels_field)
            if labels.ndim == 0 or labels.shape[0] != n or labels.dtype.hasobject:
                raise ArchiveError(
                    f"{path}: dataset {labels_field!r} has shape {labels.shape}, {labels.dtype}; labels need "
                    f"{n} fixed-size rows on axis 0, one per sample of {data_field!r}"
                )
            safety.check_chunks(labels, self._limit, path, labels_field)
            lfield = Field(path, labels_field, labels, 0)
            classes = _classes(h5, path, self._limit) if labels_field == STACKED_LABELS else None
            if labels.size * labels.dtype.itemsize <= LABELS_IN_MEMORY_BYTES or classes is not None:
                safety.check_size(labels.size * labels.dtype.itemsize, self._limit, path, f"dataset {labels_field!r}")
                try:
                    values = labels[()]
                except OSError as exc:
                    raise CorruptEntryError(f"{path}: dataset {labels_field!r} cannot be read ({exc})") from exc
                if classes is not None:
                    check_labels(values, n, classes, path)
                self._labels_rows = _MemoryRows(values)
            else:
                self._labels_rows = _open_rows(lfield, self._res.fd, direct, self._cache_slabs)
            self._labels_shape = (self.batch_size, *labels.shape[1:])
            self._labels_dtype = labels.dtype.newbyteorder("=")

        file_shape = list(data.shape)
        file_shape[sa] = self.batch_size
        self._out_shape = tuple(file_shape[p] for p in perm)
        self._n_axis = perm.index(sa)
        self._sf_axes = [perm.index(sa)] + [perm.index(d) for d in range(data.ndim) if d != sa]
        self._data_dtype = data.dtype.newbyteorder("=")
        self._state = _State(path, self._data_rows, self._labels_rows, self.postprocess)
        bounds, _ = _rank_bounds(n, self._data_rows.slab_rows, self.world_size)
        shares = np.diff(bounds)
        self.rank_rows = int(shares[self.rank])
        self._batch_rows = int(shares.min()) if self.drop_last else self.rank_rows  # rows batched
        log.debug("%s: %d rows of %r read by %s", path, n, data_field, self._data_rows.method)

    def _cache_slabs(self, k: int) -> int:
        """Decoded chunk rows of ``k`` samples to cache: those of every batch in the ring, and
        two shuffle windows (the one being read and the next)."""
        batch_slabs = -(-self.batch_size // k) + 1
        capacity = (self.prefetch + 1) * batch_slabs + self.threads
        if self.shuffle:
            capacity += 2 * -(-self._window // k)
        return capacity

    # ---- public API

    @property
    def method(self) -> str:
        """How rows of ``data`` are read: ``direct-chunks``, ``direct-contiguous``,
        ``h5py-chunks`` (HDF5 decodes whole chunks) or ``h5py``."""
        return self._data_rows.method

    def __len__(self) -> int:
        """Batches per epoch (of this rank)."""
        full, rest = divmod(self._batch_rows, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.method
        ranks = f", rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
        return f"<BatchReader {self.path!r} {self.num_rows} rows, batch_size={self.batch_size}{ranks}, {state}>"

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def fetch(self) -> None:
        """Start reading the next batch in the background; returns at once.

        Batches follow each other epoch after epoch. At most ``prefetch`` batches may be
        fetched and not yet returned by :meth:`next_batch`.
        """
        self._check_open()
        if len(self._pending) >= self.prefetch:
            raise RuntimeError(
                f"BatchReader on {self.path}: {len(self._pending)} batches already fetched (prefetch="
                f"{self.prefetch}); call next_batch() first"
            )
        if not len(self):
            raise ValueError(f"BatchReader on {self.path}: no batch to fetch, the epoch has no full batch")
        epoch, batch = self._cursor
        plan = self._epoch_plan(epoch)
        indices, parts = plan.batch(batch)
        ahead = [
            _Ahead(plan.windows[w] if w < len(plan.windows) else self._epoch_plan(epoch + 1).windows[0], lo, hi)
            for w, lo, hi in plan.ahead.get(batch, ())
        ]
        self._cursor = (epoch, batch + 1) if batch + 1 < len(self) else (epoch + 1, 0)
        if self._res.executor is None:
            self._res.executor = ThreadPoolExecutor(self.threads, thread_name_prefix=THREAD_PREFIX)
        slot = self._free.popleft()
        future = self._res.executor.submit(_fill, self._state, self._slots[slot], indices, parts, ahead)
        self._pending.append(_Pending(epoch, batch, slot, future))

    def next_batch(self) -> Tuple[Any, Any]:
        """Block until the oldest fetched batch is read (fetching one if none is) and return
        ``(data, labels)``. The previous batch's arrays may be reused from now on."""
        self._check_open()
        return self._next(top_up=False)

    def __iter__(self) -> Iterator[Tuple[Any, Any]]:
        """One epoch of ``(data, labels)`` batches, read ``prefetch`` batches ahead."""
        self._check_open()
        if not self._at_boundary or (self._pending and self._pending[0].batch != 0):
            self._drop_pending()
        return self._epoch_iter()

    def epochs(self, n: Optional[int] = None) -> Iterator[Tuple[int, Any, Any]]:
        """``(epoch, data, labels)`` for ``n`` epochs (forever if None), prefetching across
        epoch boundaries."""
        count = 0
        while n is None or count < n:
            for data, labels in self:
                yield self.epoch, data, labels
            count += 1

    def set_epoch(self, epoch: int) -> None:
        """Make the next loop (or ``fetch``) start epoch ``epoch`` at its first batch; batches
        fetched ahead are dropped. Epochs also advance by themselves."""
        self._check_open()
        self._restart_at(int(epoch), 0)

    def state_dict(self) -> Dict[str, Any]:
        """Where to resume: the batch after the last one returned, as the fields of
        :class:`ReaderState` in a dict (for ``torch.save``, JSON, a checkpoint)."""
        epoch, batch = self._next_pos
        return asdict(ReaderState(epoch, batch, int(self._seed), self.num_rows, self.batch_size, self.world_size,
                                  self.rank, self.shuffle, self.drop_last, int(self._window)))

    def load_state_dict(self, state: Union[Mapping[str, Any], ReaderState]) -> None:
        """Make the next loop start at the saved batch: the rest of that epoch, then on.

        Another rank's state loads too (ranks in step stand at the same batch); with another
        world size it is refused mid-epoch and accepted at an epoch boundary.
        """
        self._check_open()
        if not isinstance(state, ReaderState):
            names = {f.name for f in fields(ReaderState)}
            if not isinstance(state, Mapping) or set(state) != names:
                raise ValueError(f"not a BatchReader state: expected the keys {sorted(names)}")
            state = ReaderState(**state)
        mine = {"num_rows": self.num_rows, "batch_size": self.batch_size, "seed": int(self._seed),
                "shuffle": self.shuffle, "drop_last": self.drop_last, "window": int(self._window)}
        for name in _READER_PLAN_FIELDS:
            if getattr(state, name) != mine[name]:
                what = "shuffle_window" if name == "window" else name
                raise ValueError(f"BatchReader state has {name}={getattr(state, name)!r}, this reader "
                                 f"{mine[name]!r}: open it with {what}={getattr(state, name)!r} to resume")
        check_world_change(state.world_size, self.world_size, state.epoch, state.batch, "BatchReader")
        epoch, batch = int(state.epoch), int(state.batch)
        if batch >= len(self):
            epoch, batch = epoch + 1, 0
        self._restart_at(epoch, batch)

    def close(self) -> None:
        """Stop the threads and close the file. Arrays already returned stay usable."""
        self._pending.clear()
        self._finalizer()

    def __enter__(self) -> "BatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals

    def _epoch_iter(self) -> Iterator[Tuple[Any, Any]]:
        """From the next batch (the first, or where a loaded state resumes) to the epoch's end."""
        done = False
        try:
            while len(self):
                yield self._next(top_up=True)
                if self._at_boundary:
                    break
            done = True
        finally:
            if not done and not self.closed:
                self._drop_pending()

    def _next(self, top_up: bool):
        if self._held is not None:  # the caller is done with the previous batch
            self._free.append(self._held)
            self._held = None
        if not self._pending:
            self.fetch()
        job = self._pending.popleft()
        self._held = job.slot
        if top_up:
            while len(self._pending) < self.prefetch:
                self.fetch()
        data, labels = job.future.result()
        self.epoch = job.epoch
        self._at_boundary = job.batch == len(self) - 1
        self._next_pos = (job.epoch + 1, 0) if self._at_boundary else (job.epoch, job.batch + 1)
        data, labels = self._deliver(data), self._deliver(labels)
        if self._pinned and self._device is not None and self._device.type == "cuda":
            # The copies run asynchronously: a worker must not refill this slot before they end.
            event = self._torch.cuda.Event()
            event.record()
            self._slots[job.slot].event = event
        return data, labels

    def _deliver(self, value):
        """Move a batch array to the device and/or copy it out of the ring, as asked."""
        if value is None:
            return None
        torch = self._torch
        if torch is not None and isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
            value = torch.from_numpy(value)
        if torch is not None and isinstance(value, torch.Tensor):
            if self._device is not None and value.device != self._device:
                value = value.to(self._device, non_blocking=self._pinned)
            elif self.copy:
                value = value.clone()
            return value
        return np.array(value, copy=True) if self.copy else value

    def _drop_pending(self) -> None:
        """Stop the threads, forget fetched batches, and move on to the next epoch's start."""
        resume = (self._pending[0].epoch, self._pending[0].batch) if self._pending else self._cursor
        for job in self._pending:
            self._free.append(job.slot)
        self._pending.clear()
        self._res.stop_threads()  # cancels what has not started, waits for what has
        self._data_rows.reset()
        if resume[1] != 0:
            resume = (resume[0] + 1, 0)
        self._cursor = resume
        self._at_boundary = True

    def _restart_at(self, epoch: int, batch: int) -> None:
        """Drop what was fetched ahead; the next fetch reads ``batch`` of ``epoch``."""
        self._drop_pending()
        self._cursor = self._next_pos = (epoch, batch)
        self._at_boundary = True

    def _epoch_plan(self, epoch: int) -> _Plan:
        plan = self._plans.get(epoch)
        if plan is None:
            rng = np.random.default_rng([self._seed, epoch])
            plan = self._plans[epoch] = _Plan(epoch, self.num_rows, self.shuffle, rng, self._data_rows.slab_rows,
                                              self._window, self.batch_size, len(self), self.rank, self.world_size)
            for old in [e for e in self._plans if e < epoch - 1 or e > epoch + 1]:
                del self._plans[old]
        return plan

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"BatchReader on {self.path} is closed")


def _dataset(h5: h5py.File, path: str, name: str) -> h5py.Dataset:
    """Dataset ``name``, reached and stored inside the file (see :func:`safety.open_dataset`)."""
    try:
        return safety.open_dataset(h5, name)
    except (KeyError, UnsafeArchiveError) as exc:
        if isinstance(exc, UnsafeArchiveError) and "not a dataset" not in exc.reason:
            raise
        root = h5py.h5g.open(h5.id, b"/")
        names: List[bytes] = []
        root.links.iterate(names.append)
        found = sorted(n.decode("utf-8", "replace") for n in names
                       if root.links.get_info(n).type == h5py.h5l.TYPE_HARD
                       and h5py.h5o.get_info(root, n).type == h5py.h5o.TYPE_DATASET)
        what = "no dataset" if isinstance(exc, KeyError) else "a group, not a dataset,"
        raise ArchiveError(f"{path}: {what} {safety.printable(repr(name))} (datasets at the root: "
                           f"{safety.printable(', '.join(found)) or 'none'})") from None


def _classes(h5: h5py.File, path: str, limit: int) -> Optional[List[str]]:
    """A data2h5 stacked archive's class names, which its labels must index; None elsewhere."""
    if not safety.has(h5, STACKED_CLASSES):
        return None
    names = safety.read_small(safety.open_dataset(h5, STACKED_CLASSES), limit, path, STACKED_CLASSES)
    return names.tolist() if names.ndim == 1 else None


def _torch_options(device: Any, pin_memory: bool):
    """(torch module or None, torch.device or None, whether to pin) for the options given."""
    if device is None and not pin_memory:
        return None, None, False
    try:
        import torch
    except ImportError:
        raise ImportError(
            "BatchReader(device=..., pin_memory=...) needs torch: pip install 'data2h5[torch]'"
        ) from None
    dev = None if device is None else torch.device(device)
    pin = bool(pin_memory)
    if pin and not torch.cuda.is_available():
        warnings.warn("BatchReader(pin_memory=True): CUDA is not available, so memory is not pinned",
                      stacklevel=3)
        pin = False
    return torch, dev, pin
