"""Worker-side encoding: an entry's value becomes a :class:`Packed`, its chunks compressed.

Workers run :func:`pack` on what a reader returned; the writer only hands the chunks to HDF5.
The chunk shapes and the order of chunks (which an entry's stored checksum runs over) are
defined here, so the writer, a resume and verify all agree on them.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterator, NamedTuple, Optional, Tuple

import numpy as np

from .codecs import NONE, Codec

#: Arrays up to this size are stored as one chunk; larger ones in chunks of about
#: CHUNK_BYTES so that a slice reads only the chunks it touches.
SINGLE_CHUNK_MAX = 4 << 20
CHUNK_BYTES = 1 << 20


class Packed(NamedTuple):
    """One entry ready to write, as a worker hands it to the writer."""

    key: str
    kind: int
    dtype: str
    shape: Tuple[int, ...]
    codec: int  # codec id (see data2h5.codecs)
    chunk_shape: Optional[Tuple[int, ...]]  # None: contiguous storage, ``data`` is the raw bytes
    data: object  # raw bytes (contiguous) | [(chunk offset, bytes, filter mask)] | ndarray (HDF5 compresses)
    size: int  # source file size
    crc32: int  # source file CRC-32
    nbytes: int  # decoded size
    stored_crc32: int = 0  # CRC-32 of the stored bytes, chunks concatenated in chunk-grid order
    mtime_ns: int = 0  # source file's modification time when read: a resume re-reads it if it changed
    verbatim: bool = False  # a BYTES/TEXT value that is exactly the source file's bytes
    level: Optional[int] = None  # the codec's level (None: its default, or it takes none)


class Failed(NamedTuple):
    """A file a worker could not read: reported, not raised, so one bad file does not lose
    its batch. ``error`` is a :class:`~data2h5.errors.ReadError` or a ``PluginError``."""

    key: str
    error: Exception


def chunk_shape_for(shape: Tuple[int, ...], itemsize: int) -> Tuple[int, ...]:
    """One chunk for small arrays; for large ones, halve leading axes until ~CHUNK_BYTES."""
    if math.prod(shape) * itemsize <= SINGLE_CHUNK_MAX:
        return tuple(shape)
    chunk = list(shape)
    axis = 0
    while math.prod(chunk) * itemsize > CHUNK_BYTES and axis < len(chunk):
        if chunk[axis] > 1:
            chunk[axis] = (chunk[axis] + 1) // 2
        else:
            axis += 1
    return tuple(chunk)


def iter_chunk_offsets(shape: Tuple[int, ...], chunk: Tuple[int, ...]) -> Iterator[Tuple[Tuple[int, ...], tuple]]:
    """Yield ``(offset, slices)`` of every chunk of an array, in row-major chunk-grid order:
    the order in which an entry's stored checksum runs over its chunks."""
    grid = [range(0, n, c) for n, c in zip(shape, chunk)]
    for cell in np.ndindex(*[len(g) for g in grid]):
        start = tuple(g[i] for g, i in zip(grid, cell))
        yield start, tuple(slice(s, s + c) for s, c in zip(start, chunk))


def iter_chunks(arr: np.ndarray, chunk: Tuple[int, ...]) -> Iterator[Tuple[Tuple[int, ...], np.ndarray]]:
    """Yield ``(offset, chunk data)``; edge chunks are zero-padded to the full chunk shape, as
    HDF5 stores them."""
    for start, where in iter_chunk_offsets(arr.shape, chunk):
        block = arr[where]
        if block.shape != chunk:
            padded = np.zeros(chunk, dtype=arr.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        yield start, np.ascontiguousarray(block)


def pack(key: str, kind: int, arr: np.ndarray, codec: Codec, size: int, crc32: int, mtime_ns: int = 0) -> Packed:
    """Prepare ``arr`` for the writer, compressing its chunks here (in the worker)."""
    entry = dict(key=key, kind=kind, dtype=arr.dtype.str, shape=tuple(arr.shape), size=size, crc32=crc32,
                 nbytes=arr.nbytes, mtime_ns=mtime_ns)

    def as_is() -> Packed:
        raw = arr.tobytes()
        return Packed(codec=NONE, chunk_shape=None, data=raw, stored_crc32=zlib.crc32(raw), **entry)

    if codec.id == NONE or arr.nbytes == 0 or arr.ndim == 0:
        return as_is()
    chunk = chunk_shape_for(entry["shape"], arr.itemsize)
    if not codec.in_worker:
        return Packed(codec=codec.id, level=codec.level, chunk_shape=chunk, data=arr, **entry)
    if chunk == entry["shape"]:  # one chunk, the whole array: no chunk grid to walk
        chunks = [((0,) * arr.ndim, *codec.compress(np.ascontiguousarray(arr).data.cast("B")))]
        _, data, mask = chunks[0]
        if not mask and len(data) >= arr.nbytes:  # stored as it is rather than grown
            return as_is()
    else:
        chunks = [(offset, *codec.compress(block.data)) for offset, block in iter_chunks(arr, chunk)]
    stored_crc = 0
    for _, data, _ in chunks:
        stored_crc = zlib.crc32(data, stored_crc)
    return Packed(codec=codec.id, level=codec.level, chunk_shape=chunk, data=chunks, stored_crc32=stored_crc, **entry)
