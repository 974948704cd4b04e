"""The ``plain`` layout: an HDF5 file data2h5 did not write (e.g. by the original Data2H5
script), read by walking it; every dataset is an entry, sorted by path. It cannot be written.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, Optional, Sequence, Tuple

import h5py
import numpy as np

from .. import codecs, format as fmt
from ..archive import Index, blank_index
from . import PLAIN as NAME, Layout
from .files import read_entries

log = logging.getLogger(__name__)


class PlainLayout(Layout):
    """Every dataset of the file is an entry; nothing is recorded about them beyond HDF5's own."""

    name = NAME
    writable = False
    records_source = False

    def read_index(self, f: h5py.File, attrs: dict, limit: int) -> Index:
        return _walk(f, attrs)

    def extract_values(self, archive: str, index: Index, todo: Sequence[Tuple[int, str]]
                       ) -> Iterator[Tuple[str, np.ndarray, bool]]:
        return read_entries(archive, index, todo)


def _walk(f: h5py.File, attrs: dict) -> Index:
    found: Dict[str, h5py.Dataset] = {}

    def visit(name: str, obj) -> None:  # hard links only: HDF5's visit follows no other link
        if isinstance(obj, h5py.Dataset):
            found[name] = obj

    f.visititems(visit)
    keys = sorted(found)
    index = blank_index(f.filename, NAME, keys, attrs)
    for i, key in enumerate(keys):
        dset = found[key]
        index.dtype[i] = dset.dtype.str.encode()[:16]
        shape = dset.shape or ()
        index.shape[i, : min(len(shape), fmt.MAX_NDIM)] = shape[: fmt.MAX_NDIM]
        block = _one_block(dset)
        if block is not None:
            index.codec[i], index.offset[i], index.stored[i] = block
    log.info("%s: not a data2h5 archive; walked %d datasets", f.filename, len(keys))
    return index


# HDF5 filters whose chunks the fast path can decompress, by the codec that does it.
_FILTER_CODECS = {c.filter_id: c.id for c in (codecs.CODECS["gzip"], codecs.CODECS["lzf"])}


def _one_block(dset: h5py.Dataset) -> Optional[tuple]:
    """``(codec id, offset, stored bytes)`` when a plain dataset's data is one block the fast
    path can read (contiguous, or a single chunk with at most one lzf/deflate filter)."""
    if dset.dtype.kind not in "biufc" or dset.dtype.itemsize > 16 or dset.ndim > fmt.MAX_NDIM or not dset.size:
        return None
    dsid = dset.id
    dcpl = dsid.get_create_plist()
    if dcpl.get_layout() == h5py.h5d.VIRTUAL or dcpl.get_external_count():
        return None  # listed; refused when read (see safety.check_local)
    if dset.chunks is None:
        offset = dsid.get_offset()
        return None if offset is None else (codecs.NONE, offset, dset.size * dset.dtype.itemsize)
    if dset.chunks != dset.shape or dsid.get_num_chunks() != 1:
        return None
    nfilters = dcpl.get_nfilters()
    if nfilters > 1:
        return None
    codec = codecs.NONE
    if nfilters == 1:
        codec = _FILTER_CODECS.get(dcpl.get_filter(0)[0])
        if codec is None:
            return None
    info = dsid.get_chunk_info(0)
    if info.filter_mask:  # the filter was skipped for this chunk: stored raw
        codec = codecs.NONE
    return codec, info.byte_offset, info.size


PLAIN = PlainLayout()
