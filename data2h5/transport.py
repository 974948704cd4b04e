"""Hand workers' results to the writer through shared memory instead of the pool's pipe.

Decoded images are hundreds of KB each. Sent through the pool's pipe they are pickled,
copied through the kernel twice and unpickled, and the pipe is drained by a thread of the
writer process that needs the GIL the writer holds while it writes, so workers stall on the
writer. Instead the writer owns one memory-mapped slot per task in flight; a worker copies
its payloads into its task's slot and returns small descriptors, and the writer writes
straight from the slot. The slots are files in ``/dev/shm`` (or the temp folder where there is
none), deleted when the run ends however it ends.
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .encoding import Packed


class Span(NamedTuple):
    """Where a payload lies in its task's slot."""

    start: int
    length: int


SHM_DIR = "/dev/shm"
PREFIX = "data2h5-"  # then the writer's pid: data2h5-<pid>-<random>


def remove_stale(parent: str) -> None:
    """Delete slot folders whose writer is gone (killed with SIGKILL, which nothing can catch)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid_text = name[len(PREFIX):].split("-", 1)[0]
        if not (name.startswith(PREFIX) and pid_text.isdigit()):
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except OSError:
            pass  # alive, under another user


class Slots:
    """Writer side: ``count`` shared slots of ``size`` bytes each."""

    def __init__(self, count: int, size: int):
        parent = SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()
        remove_stale(parent)
        self.dir = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)
        self.size = size
        self.paths: List[str] = []
        self._maps: List[mmap.mmap] = []
        self._views: List[np.ndarray] = []
        try:
            for i in range(count):
                path = os.path.join(self.dir, f"slot{i}")
                with open(path, "wb+") as fh:
                    fh.truncate(size)
                    m = mmap.mmap(fh.fileno(), size)
                self.paths.append(path)
                self._maps.append(m)
                self._views.append(np.frombuffer(m, dtype=np.uint8))
        except BaseException:
            self.close()
            raise
        self.free = list(range(count))

    def resolve(self, slot: int, items: list) -> list:
        """Replace the :class:`Span` payloads of ``items`` by views of ``slot`` (raw bytes, as
        ``uint8`` arrays: the writer reads them with the entry's dtype and shape)."""
        view = self._views[slot]
        out = []
        for item in items:
            if isinstance(item, Packed) and isinstance(item.data, Span):
                item = item._replace(data=view[item.data.start : item.data.start + item.data.length])
            elif isinstance(item, Packed) and isinstance(item.data, list) and item.data and isinstance(item.data[0][1], Span):
                item = item._replace(data=[(o, view[s.start : s.start + s.length], m) for o, s, m in item.data])
            out.append(item)
        return out

    def view(self, slot: int) -> np.ndarray:
        """The bytes of ``slot``, writable."""
        return self._views[slot]

    def close(self) -> None:
        self._views.clear()
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere; the file goes anyway
                pass
        self._maps.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


_worker_maps: Dict[str, mmap.mmap] = {}


def _worker_map(slot_path: str, slot_size: int) -> mmap.mmap:
    m = _worker_maps.get(slot_path)
    if m is None:
        with open(slot_path, "r+b") as fh:
            m = _worker_maps[slot_path] = mmap.mmap(fh.fileno(), slot_size)
    return m


def compress_in_slot(slot_path: str, slot_size: int, nbytes: int, codec) -> Tuple[int, int, Optional[bytes]]:
    """Worker side: compress the first ``nbytes`` of a slot with ``codec`` (a
    :class:`~data2h5.codecs.Codec`) and put the result back at its start; returns ``(length,
    filter mask, None)``, or the bytes themselves in place of None when they do not fit."""
    m = _worker_map(slot_path, slot_size)
    data, mask = codec.compress(m[:nbytes])
    if len(data) > slot_size:
        return len(data), mask, data
    m[: len(data)] = data
    return len(data), mask, None


def share(items: list, slot_path: Optional[str], slot_size: int) -> list:
    """Worker side: copy payloads into the task's slot while they fit; the rest stay inline."""
    if slot_path is None:
        return items
    m = _worker_map(slot_path, slot_size)
    pos, out = 0, []
    for item in items:
        if (isinstance(item, Packed) and item.chunk_shape is None and isinstance(item.data, np.ndarray)
                and item.data.dtype.kind in "biufc"):
            arr = np.ascontiguousarray(item.data)  # a decoded row, for a layout that stores arrays as they come
            n = arr.nbytes
            if pos + n <= slot_size:
                np.frombuffer(m, np.uint8, n, pos)[:] = arr.reshape(-1).view(np.uint8)
                item = item._replace(data=Span(pos, n))
                pos += n
        elif isinstance(item, Packed) and isinstance(item.data, (bytes, bytearray)):
            n = len(item.data)
            if pos + n <= slot_size:
                m[pos : pos + n] = item.data
                item = item._replace(data=Span(pos, n))
                pos += n
        elif isinstance(item, Packed) and isinstance(item.data, list):
            n = sum(len(d) for _, d, _ in item.data)
            if pos + n <= slot_size:
                chunks = []
                for offset, data, mask in item.data:
                    m[pos : pos + len(data)] = data
                    chunks.append((offset, Span(pos, len(data)), mask))
                    pos += len(data)
                item = item._replace(data=chunks)
        out.append(item)
    return out
