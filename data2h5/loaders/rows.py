"""Row sources: each reads rows (samples) of one dataset into a batch buffer.

:class:`Rows` is the interface; a small dataset is held in memory (:class:`MemoryRows`) and
one with no chunk grain is read through h5py (:class:`H5pyRows`). Chunked and contiguous
datasets are read a slab at a time by :class:`data2h5.loaders.slabs.SlabRows`.
"""
from __future__ import annotations

import numpy as np

from ..chunks import Field
from ..errors import CorruptEntryError


class Rows:
    """Reads rows (samples) of one dataset into a sample-first output view."""

    method = ""
    slab_rows = 0  # rows per chunk along the sample axis; 0 when reads have no chunk grain

    def fill(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Write row ``indices[i]`` to ``out[i]``; ``indices`` holds no duplicates."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget state kept between batches (called while no worker runs)."""


class MemoryRows(Rows):
    """A small dataset read whole at open (labels, usually)."""

    method = "memory"

    def __init__(self, array: np.ndarray):
        self.array = array

    def fill(self, indices: np.ndarray, out: np.ndarray) -> None:
        out[...] = self.array[indices]


class H5pyRows(Rows):
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
