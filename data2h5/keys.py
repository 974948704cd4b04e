"""Keys held compactly: one fixed-width byte array (about a key's length an entry, not a
Python string each), built by appending (:class:`KeyColumn`) and read as a sequence of str
(:class:`Keys`). The walk's file list, the writer's index rows and an archive's index all
hold their keys this way."""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np


class Keys(Sequence[str]):
    """An archive's keys as one fixed-width byte array (about a key's length an entry, not
    a Python string each), decoded on access: ``keys[i]``, iteration and ``len`` work as on
    a list of str. :meth:`position` finds a key by binary search, the sort order computed
    once when the keys are not sorted already (an archive's keys are, as the walk is)."""

    __slots__ = ("raw", "_order", "_ordered")
    BLOCK = 1 << 14  # keys decoded at a time when iterating

    def __init__(self, raw: np.ndarray):
        self.raw = raw
        self._order: Optional[np.ndarray] = None  # rows in key order (None: not known yet, or sorted)
        self._ordered: Optional[np.ndarray] = None  # the keys in order, once looked for

    @classmethod
    def of(cls, keys: Union["Keys", Sequence[str], np.ndarray]) -> "Keys":
        """``keys`` as :class:`Keys` (given str, bytes or a bytes array)."""
        if isinstance(keys, Keys):
            return keys
        if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":
            return cls(keys)
        encoded = [k if isinstance(k, bytes) else str(k).encode("utf-8", "surrogateescape") for k in keys]
        return cls(np.array(encoded, dtype=f"S{max(map(len, encoded), default=1) or 1}"))

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Keys(self.raw[i])
        return self.raw[i].decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        for lo in range(0, len(self.raw), self.BLOCK):
            for k in self.raw[lo : lo + self.BLOCK].tolist():
                yield k.decode("utf-8", "surrogateescape")

    def tolist(self) -> List[str]:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Keys):
            return len(self) == len(other) and bool((self.raw == other.raw).all())
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(repr(k) for k in self[:3]) + (", ..." if len(self) > 3 else "")
        return f"Keys([{shown}]; {len(self)} keys)"

    def __getstate__(self) -> dict:
        return {"raw": self.raw}  # the sort order is found again where it is needed

    def __setstate__(self, state: dict) -> None:
        self.raw, self._order, self._ordered = state["raw"], None, None

    def _sorted(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The keys in sorted order and the rows they come from (None: the keys are sorted)."""
        if self._ordered is None:
            raw = self.raw
            in_order = len(raw) < 2 or bool((raw[1:] >= raw[:-1]).all())
            self._order = None if in_order else np.argsort(raw, kind="stable")
            self._ordered = raw if in_order else raw[self._order]
        return self._ordered, self._order

    def position(self, key: str) -> int:
        """The row of ``key``, or -1 when there is none."""
        want = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
        if not isinstance(want, bytes) or len(want) > self.raw.dtype.itemsize or b"\0" in want:
            return -1
        ordered, order = self._sorted()
        at = int(np.searchsorted(ordered, want))
        if at >= len(ordered) or ordered[at] != want:
            return -1
        return at if order is None else int(order[at])

    def prefixed(self, prefix: str) -> np.ndarray:
        """Rows of the keys starting with ``prefix``, in row order (a binary search over the
        sorted keys)."""
        want = prefix.encode("utf-8", "surrogateescape")
        if not want:
            return np.arange(len(self.raw))
        if len(want) > self.raw.dtype.itemsize:
            return np.zeros(0, np.int64)
        ordered, order = self._sorted()
        lo = int(np.searchsorted(ordered, want, side="left"))
        hi = lo + int(np.sum(np.strings.startswith(ordered[lo : lo + 1], want)))
        if hi > lo:  # the matches run on from lo: find where they end
            hi = int(np.searchsorted(ordered, _after_prefix(want)[: self.raw.dtype.itemsize], side="left"))
        return np.arange(lo, hi) if order is None else np.sort(order[lo:hi])


def _after_prefix(prefix: bytes) -> bytes:
    """The least byte string above every string starting with ``prefix`` (its last byte below
    0xff raised by one); keys hold no NUL, so this bounds the prefix's range."""
    head = prefix.rstrip(b"\xff")
    if not head:
        return b"\xff" * 4096
    return head[:-1] + bytes([head[-1] + 1])


class KeyColumn:
    """Keys as they are added, in fixed-width byte blocks (about a key's length an entry,
    not a Python object each); a block is widened when a longer key arrives."""

    BLOCK = 1 << 16

    def __init__(self) -> None:
        self._blocks: List[np.ndarray] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, key: bytes) -> None:
        i = self._n % self.BLOCK
        if i == 0:
            self._blocks.append(np.zeros(self.BLOCK, dtype=f"S{max(len(key), 1)}"))
        block = self._blocks[-1]
        if len(key) > block.dtype.itemsize:
            block = self._blocks[-1] = block.astype(f"S{len(key)}")
        block[i] = key
        self._n += 1

    def array(self) -> np.ndarray:
        """Every key, as one ``S<longest>`` array."""
        width = max((b.dtype.itemsize for b in self._blocks), default=1)
        out = np.zeros(self._n, dtype=f"S{width}")
        for j, block in enumerate(self._blocks):
            lo = j * self.BLOCK
            out[lo : lo + self.BLOCK] = block[: self._n - lo]
        return out
