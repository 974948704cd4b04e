"""Asynchronous batch reader: threads prefetch minibatches of an HDF5 ``data``/``labels`` pair.

While the caller trains on one batch, worker threads fill the next ones into preallocated
buffers (:mod:`.ring`), reading rows through the fastest source the storage allows
(:mod:`.slabs`, :mod:`.rows`) in the order an epoch's plan lays out (:mod:`.plan`).
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, Deque, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import h5py
import numpy as np

from .. import safety
from ..chunks import Field
from ..errors import ArchiveError, CorruptEntryError, UnsafeArchiveError
from ..format import ATTR_LAYOUT, STACKED_CLASSES, STACKED_LABELS
from ..layouts import SHARDED
from ..archive import check_labels, open_h5
from ..safety import MAX_ENTRY_BYTES
from .device import deliver, torch_options
from .plan import PLAN_FIELDS, DecodeAhead, EpochPlan, ReaderState, rank_bounds
from .ranks import check_world_change, resolve_rank
from .ring import FillContext, Postprocess, Slot, fill_slot
from .rows import MemoryRows, Rows
from .slabs import open_rows

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

THREAD_PREFIX = "data2h5-prefetch"
LABELS_IN_MEMORY_BYTES = 64 << 20  # labels at most this big are read once, at open
WINDOW_BYTES = 32 << 20  # default shuffle window: the rows that fit in this many bytes


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
        self._torch, self._device, pin = torch_options(device, pin_memory)
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
            Slot(self._out_shape, self._data_dtype, self._n_axis, self._sf_axes, self._labels_shape,
                  self._labels_dtype, self._torch, pin)
            for _ in range(self.prefetch + 1)
        ]
        self._free: Deque[int] = collections.deque(range(len(self._slots)))
        self._held: Optional[int] = None  # the slot of the batch the caller holds
        self._pending: Deque[_Pending] = collections.deque()
        self._cursor = (0, 0)  # (epoch, batch) of the next batch to fetch
        self._plans: Dict[int, EpochPlan] = {}  # by epoch: the one being fetched and the next
        self.epoch = -1  # epoch of the last batch returned
        self._at_boundary = True  # whether the last batch returned ended its epoch
        self._next_pos = (0, 0)  # (epoch, batch) after the last batch returned: where to resume

    def _open(self, data_field, labels_field, file_layout, layout, shuffle_window, direct) -> None:
        path = self.path
        self._res.h5 = h5 = open_h5(path)
        if h5.attrs.get(ATTR_LAYOUT) in (SHARDED, SHARDED.encode()):
            raise ArchiveError(f"{path}: a sharded archive; BatchReader reads one stacked archive: give it each shard "
                               "on its own, or read the sharded archive with H5Dataset")
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
        self._data_rows = open_rows(field, self._res.fd, direct, self._cache_slabs)

        self._labels_rows: Optional[Rows] = None
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
                self._labels_rows = MemoryRows(values)
            else:
                self._labels_rows = open_rows(lfield, self._res.fd, direct, self._cache_slabs)
            self._labels_shape = (self.batch_size, *labels.shape[1:])
            self._labels_dtype = labels.dtype.newbyteorder("=")

        file_shape = list(data.shape)
        file_shape[sa] = self.batch_size
        self._out_shape = tuple(file_shape[p] for p in perm)
        self._n_axis = perm.index(sa)
        self._sf_axes = [perm.index(sa)] + [perm.index(d) for d in range(data.ndim) if d != sa]
        self._data_dtype = data.dtype.newbyteorder("=")
        self._state = FillContext(path, self._data_rows, self._labels_rows, self.postprocess)
        bounds, _ = rank_bounds(n, self._data_rows.slab_rows, self.world_size)
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
            DecodeAhead(plan.windows[w] if w < len(plan.windows) else self._epoch_plan(epoch + 1).windows[0], lo, hi)
            for w, lo, hi in plan.ahead.get(batch, ())
        ]
        self._cursor = (epoch, batch + 1) if batch + 1 < len(self) else (epoch + 1, 0)
        if self._res.executor is None:
            self._res.executor = ThreadPoolExecutor(self.threads, thread_name_prefix=THREAD_PREFIX)
        slot = self._free.popleft()
        future = self._res.executor.submit(fill_slot, self._state, self._slots[slot], indices, parts, ahead)
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
        for name in PLAN_FIELDS:
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
        data = deliver(data, self._torch, self._device, self._pinned, self.copy)
        labels = deliver(labels, self._torch, self._device, self._pinned, self.copy)
        if self._pinned and self._device is not None and self._device.type == "cuda":
            # The copies run asynchronously: a worker must not refill this slot before they end.
            event = self._torch.cuda.Event()
            event.record()
            self._slots[job.slot].event = event
        return data, labels

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

    def _epoch_plan(self, epoch: int) -> EpochPlan:
        plan = self._plans.get(epoch)
        if plan is None:
            rng = np.random.default_rng([self._seed, epoch])
            plan = self._plans[epoch] = EpochPlan(epoch, self.num_rows, self.shuffle, rng, self._data_rows.slab_rows,
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
