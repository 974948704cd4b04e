"""The read plan of an epoch: its order of rows, each rank's share, and its shuffle windows.

Shuffling never reads one row at a time: an epoch permutes the chunks along the sample axis
and mixes the rows within windows of whole chunks; the workers decode each chunk of a window
once into one array, and a batch is one fancy-indexed copy out of it. Each window is decoded
ahead, a share by each of the batches before the first that reads it (see :class:`EpochPlan`).
:class:`ReaderState` names a batch of such a plan, so that a reader can resume there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .ranks import balanced_bounds


def runs_of_equal(values: np.ndarray) -> List[Tuple[int, int]]:
    """``[start, stop)`` of each run of equal values."""
    breaks = np.flatnonzero(np.diff(values)) + 1
    edges = [0, *breaks.tolist(), len(values)]
    return list(zip(edges[:-1], edges[1:]))


@dataclass
class WindowSpec:
    """One shuffle window of an epoch, as the plan lays it out."""

    key: Tuple[int, int]  # (epoch, window)
    slabs: np.ndarray  # the window's slabs, in the order their rows are laid out
    starts: np.ndarray  # first row of each slab in the window array, then its length
    refs: int  # batches that read from this window


@dataclass
class BatchPart:
    """The rows of one batch that come from one shuffle window."""

    window: WindowSpec
    local: np.ndarray  # rows of the window array, in batch order
    lo: int  # where they go in the batch
    hi: int


@dataclass
class DecodeAhead:
    """Slabs ``lo:hi`` of a window that a batch decodes for the batches after it."""

    window: WindowSpec
    lo: int
    hi: int


class EpochPlan:
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

    With several ranks the plan is the rank's share (see :func:`rank_bounds`): its span of
    rows in order, or its span of the permuted slabs (the short last slab kept last, so each
    rank's count is the same every epoch), then windowed as above; no two ranks decode a slab.
    """

    def __init__(self, epoch: int, n: int, shuffle: bool, rng: np.random.Generator, k: int, window: int,
                 batch_size: int, batches: int, rank: int = 0, world_size: int = 1):
        self.epoch, self.batch_size = epoch, batch_size
        self.windows: List[WindowSpec] = []
        self.ahead: Dict[int, List[Tuple[int, int, int]]] = {}  # batch: (window, first slab, stop)
        rows, slab_bounds = rank_bounds(n, k, world_size)
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
        self.windows = [WindowSpec((epoch, w), g, st, int(r)) for w, ((g, st), r) in enumerate(zip(groups, refs))]
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

    def batch(self, b: int) -> Tuple[np.ndarray, Optional[List[BatchPart]]]:
        lo, hi = b * self.batch_size, (b + 1) * self.batch_size
        indices = self.order[lo:hi]
        if not self.windows:
            return indices, None
        parts = []
        window_of = self.window_of[lo:hi]
        for a, z in runs_of_equal(window_of):
            w = int(window_of[a])
            parts.append(BatchPart(self.windows[w], self.local[lo + a : lo + z], a, z))
        return indices, parts


def rank_bounds(n: int, k: int, world_size: int) -> Tuple[List[int], List[int]]:
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


PLAN_FIELDS = ("num_rows", "batch_size", "seed", "shuffle", "drop_last", "window")
