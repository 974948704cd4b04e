"""The ring of preallocated batch buffers, and the worker that fills one.

A reader holds ``prefetch + 1`` slots; a worker thread reads one batch into a slot
(:func:`fill_slot`) while the caller holds the batch of another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from ..errors import PluginError
from .device import alloc_buffer
from .plan import BatchPart, DecodeAhead
from .rows import Rows

Postprocess = Callable[[Any, Any], Tuple[Any, Any]]


class Slot:
    """One preallocated batch: output-layout arrays and the views the readers write through."""

    def __init__(self, out_shape, dtype, n_axis: int, sf_axes, labels_shape, labels_dtype, torch_mod, pin: bool):
        self.data, self.data_t = alloc_buffer(out_shape, dtype, torch_mod, pin)
        self.labels, self.labels_t = (None, None) if labels_shape is None else \
            alloc_buffer(labels_shape, labels_dtype, torch_mod, pin)
        self.n_axis = n_axis
        self.data_sf = self.data.transpose(sf_axes)  # sample first, other axes in file order
        self.event = None  # CUDA event of the last non-blocking copy out of this slot

    def batch(self, n: int) -> Tuple[Any, Any]:
        """The first ``n`` rows, as torch tensors where the ring is made of them."""
        data = self.data if self.data_t is None else self.data_t
        labels = self.labels if self.labels_t is None else self.labels_t
        data = data[(slice(None),) * self.n_axis + (slice(0, n),)]
        return data, None if labels is None else labels[:n]


@dataclass
class FillContext:
    """What a worker needs to fill a batch; never references the BatchReader."""

    path: str
    data: Rows
    labels: Optional[Rows]
    postprocess: Optional[Postprocess]


def fill_slot(state: FillContext, slot: Slot, indices: np.ndarray, parts: Optional[List[BatchPart]], ahead: List[DecodeAhead]):
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
