"""``RankSampler``: a rank-aware, deterministic, resumable sampler for :class:`H5Dataset`.

Each epoch's order is a pure function of ``(seed, epoch)`` (and the world size), computed
with numpy in one go and handed to the DataLoader as a list iterator, so the sampler costs
no Python per sample; how far the epoch got is read off that iterator's length hint.

Shuffled epochs lay the samples out archive by archive, each in file order, the archives in
a random order (one archive: rotated by a random offset); rank ``r`` takes the ``r``-th
contiguous span of that sequence, so it reads a contiguous block of archives, and shuffles
its span within windows of ``window`` consecutive samples (all of its span by default). Without ``shuffle`` rank ``r`` reads the
``r``-th contiguous span in dataset order, which is what evaluation wants.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import numpy as np

from .ranks import balanced_bounds, check_world_change, resolve_rank

try:  # torch is optional: subclass its Sampler when it is there, so isinstance checks pass.
    from torch.utils.data import Sampler as _Base
except ImportError:  # pragma: no cover - exercised only without torch
    _Base = object

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerState:
    """Where a rank's sampler stands: ``state_dict()`` returns these fields as a plain dict
    (so ``torch.save(..., weights_only=True)``, JSON and StatefulDataLoader all take it)."""

    epoch: int  # the epoch being read
    position: int  # samples of that epoch this rank has consumed
    seed: int
    num_samples: int  # samples in the dataset
    world_size: int
    rank: int
    shuffle: bool
    drop_last: bool
    window: Optional[int]


# What must match to resume: the epoch's order depends on each.
_PLAN_FIELDS = ("num_samples", "seed", "shuffle", "drop_last", "window")


class RankSampler(_Base):
    """Indices of a dataset for one rank: disjoint across ranks, deterministic, resumable.

    The epoch advances by itself at each new ``iter()`` once the last one handed out a sample;
    :meth:`set_epoch` sets it too.
    Together the ranks cover every sample of an epoch: with ``drop_last=False`` each exactly
    once, the first ``num_samples % world_size`` ranks one sample more than the others (so in
    DDP training one rank may run one batch more: use ``drop_last=True``, or the DataLoader's
    ``drop_last``, to keep ranks in step); with ``drop_last=True`` every rank gets
    ``num_samples // world_size``, the rest (other samples each shuffled epoch) left out.

    Args:
        num_samples: the dataset's length.
        groups: the archive of each sample (``H5Dataset`` passes it): a rank's span is a
            contiguous block of archives. None: one archive.
        rows: each sample's row in its archive, so spans and windows follow the file order.
        shuffle: a new order each epoch; False: each rank a contiguous span in dataset order.
        seed: the shuffle's seed, the same on every rank (an int >= 0).
        drop_last: equal counts on every rank, dropping the remainder.
        rank, world_size: default from an initialised ``torch.distributed``, else 0 and 1.
        window: shuffle within runs of this many consecutive samples of the rank's span (in
            file order), the windows themselves in random order: reads stay within a region
            of the file. None: the whole span.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        groups: Optional[np.ndarray] = None,
        rows: Optional[np.ndarray] = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        window: Optional[int] = None,
    ):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, the same on every rank, not {seed!r}")
        if window is not None and int(window) < 1:
            raise ValueError(f"window must be at least 1 (or None for the rank's whole span), not {window}")
        self.num_samples = n = int(num_samples)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.window = None if window is None else int(window)
        self._segments = _archive_segments(n, groups, rows)
        per = n // self.world_size
        self._bounds = ([r * per for r in range(self.world_size + 1)] if self.drop_last
                        else balanced_bounds(n, self.world_size))
        self._epoch, self._start = 0, 0  # the epoch read (or to read next) and where it starts
        self._fresh = True  # the next iter() reads (_epoch, _start) rather than the epoch after
        self._it: Optional[Iterator[int]] = None  # the current epoch's iterator
        self._it_total = 0  # what it held at the start

    # ---- the plan

    def __len__(self) -> int:
        """Samples this rank reads in an epoch."""
        return self._bounds[self.rank + 1] - self._bounds[self.rank]

    @property
    def epoch(self) -> int:
        """The epoch being read, or to be read by the next ``iter()`` after :meth:`set_epoch`
        or :meth:`load_state_dict`."""
        return self._epoch

    def indices(self, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's samples for ``epoch`` (default: :attr:`epoch`), in the order read."""
        epoch = self._epoch if epoch is None else int(epoch)
        lo, hi = self._bounds[self.rank], self._bounds[self.rank + 1]
        n = self.num_samples
        if not self.shuffle or hi == lo:
            return np.arange(lo, hi)
        rng = np.random.default_rng([self.seed, epoch])
        segments = self._segments
        if len(segments) == 1:  # one archive: rotate it, so that ranks read other parts each epoch
            mine = segments[0][(np.arange(lo, hi) + int(rng.integers(n))) % n]
        else:  # archives in a new order each epoch, each rank a contiguous block of them
            mine = np.concatenate([segments[a] for a in rng.permutation(len(segments))])[lo:hi]
        local = np.random.default_rng([self.seed, epoch, self.world_size, self.rank])
        w = self.window
        if w is None or w >= len(mine):
            return local.permutation(mine)
        win = (np.arange(len(mine)) + int(local.integers(w))) // w
        keys = local.permutation(int(win[-1]) + 1)[win] + local.random(len(mine))
        return mine[np.argsort(keys)]

    def __iter__(self) -> Iterator[int]:
        """The rest of the current epoch (after :meth:`set_epoch` or :meth:`load_state_dict`),
        else the next epoch; an iterator that handed out nothing is replaced by one for the
        same epoch (loaders such as StatefulDataLoader call ``iter()`` twice at the start)."""
        unused = self._it is not None and self._it_total and operator.length_hint(self._it) == self._it_total
        if not self._fresh and not unused:
            self._epoch, self._start = self._epoch + 1, 0
        self._fresh = False
        order = self.indices(self._epoch)[self._start :].tolist()
        self._it_total = len(order)
        self._it = iter(order)
        return self._it

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` at the next ``iter()`` (from where :meth:`load_state_dict` left it,
        if it was loaded for this same epoch)."""
        if not (self._fresh and int(epoch) == self._epoch):
            self._start = 0
        self._epoch, self._fresh, self._it = int(epoch), True, None

    # ---- resuming

    @property
    def position(self) -> int:
        """Samples of the current epoch this sampler has handed out (a DataLoader with workers
        takes them ahead of the training loop)."""
        if self._it is None:
            return self._start
        return self._start + self._it_total - operator.length_hint(self._it)

    def state_dict(self, consumed: Optional[int] = None) -> Dict[str, Any]:
        """Where to resume: the fields of :class:`SamplerState` as a dict.

        Args:
            consumed: samples the training loop took from the DataLoader since this epoch's
                iteration began (a resumed one: since it resumed). Pass it with a plain
                DataLoader that has workers, which takes indices ahead of the loop; without
                it the position is what the sampler handed out, exact with ``num_workers=0``
                and under torchdata's StatefulDataLoader (which snapshots this itself).
        """
        if consumed is None:
            position = self.position
        else:
            total = self._it_total if self._it is not None else len(self) - self._start
            if not 0 <= int(consumed) <= total:
                raise ValueError(f"consumed={consumed} is outside 0..{total}, the samples of this iteration")
            position = self._start + int(consumed)
        epoch = self._epoch
        if position >= len(self):  # read to its end: resume at the next epoch's start
            epoch, position = epoch + 1, 0
        state = SamplerState(epoch, position, self.seed, self.num_samples, self.world_size, self.rank,
                             self.shuffle, self.drop_last, self.window)
        return asdict(state)

    def load_state_dict(self, state: Union[Mapping[str, Any], SamplerState]) -> None:
        """Resume at exactly the next sample of the saved epoch at the next ``iter()``.

        Another rank's state loads too (ranks of a DDP job stand at the same position). With
        another world size the state loads at an epoch boundary and is refused mid-epoch.
        """
        if not isinstance(state, SamplerState):
            names = {f.name for f in fields(SamplerState)}
            if not isinstance(state, Mapping) or set(state) != names:
                raise ValueError(f"not a RankSampler state: expected the keys {sorted(names)}")
            state = SamplerState(**state)
        for name in _PLAN_FIELDS:
            saved, mine = getattr(state, name), getattr(self, name)
            if saved != mine:
                raise ValueError(f"sampler state has {name}={saved!r}, this sampler {name}={mine!r}: "
                                 f"build it with {name}={saved!r} to resume")
        check_world_change(state.world_size, self.world_size, state.epoch, state.position, "sampler")
        epoch, position = int(state.epoch), int(state.position)
        if position >= len(self):  # the epoch was read to its end (on this rank)
            epoch, position = epoch + 1, 0
        self._epoch, self._start, self._fresh, self._it = epoch, position, True, None
        log.debug("sampler (rank %d of %d) resumes epoch %d at sample %d", self.rank, self.world_size, epoch, position)

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        if state["_it"] is not None:  # list iterators do not pickle; keep where they stand
            state.update(_start=self.position, _it=None, _fresh=True)
        return state

    def __repr__(self) -> str:
        return (f"RankSampler({self.num_samples} samples, rank {self.rank} of {self.world_size}, epoch {self._epoch}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, window={self.window})")


def _archive_segments(n: int, groups: Optional[np.ndarray], rows: Optional[np.ndarray]) -> List[np.ndarray]:
    """Sample indices archive by archive (in archive order), each archive's in file order."""
    if groups is None:
        groups = np.zeros(n, np.int64)
    groups = np.asarray(groups)
    rows = np.arange(n) if rows is None else np.asarray(rows)
    if len(groups) != n or len(rows) != n:
        raise ValueError(f"groups and rows need one value per sample ({n}), got {len(groups)} and {len(rows)}")
    if n == 0:
        return [np.arange(0)]
    order = np.lexsort((rows, groups))
    cuts = np.flatnonzero(np.diff(groups[order])) + 1
    return np.split(order, cuts)
