"""``H5Dataset``: a map-style dataset over one or more archives, safe in DataLoader workers.

Each archive is listed from its index at construction (open, read, close: the parent keeps
no handle), and opened lazily once per process when read, so the dataset works under the
fork, spawn and forkserver start methods alike. It is a ``torch.utils.data.Dataset`` when
torch is installed and a plain sequence otherwise.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .. import format as fmt
from ..errors import ArchiveError, ArchiveKeyError
from ..archive import ArchiveReader, PathLike
from ..keys import Keys
from ..safety import MAX_ENTRY_BYTES
from ..jpeg import check_decode_size
from ..format import ROOT_CLASS

try:  # torch is optional: subclass its Dataset when it is there, so isinstance checks pass.
    from torch.utils.data import Dataset as _Base
except ImportError:  # pragma: no cover - exercised only without torch
    _Base = object

if TYPE_CHECKING:
    from .sampler import RankSampler

Target = Union[None, str, Callable[[str], Any]]


class H5Dataset(_Base):
    """Samples of one archive, or of several read as one concatenated dataset.

    ``dataset[i]`` returns the sample alone when there is no ``target`` and no
    ``return_key``; otherwise a tuple ``(sample, target)``, ``(sample, key)`` or
    ``(sample, target, key)``. Samples are numpy arrays (the DataLoader's default collate
    makes tensors of them); TEXT entries are ``str``.

    Args:
        paths: an archive path or a list of them.
        prefix: keep only keys starting with this string (or any of these strings).
        keys: keep exactly these keys, in this order; an unknown key raises
            :class:`ArchiveKeyError`. With several archives a key is taken from the first
            archive holding it.
        limit: at most this many samples (after ``prefix``/``keys``).
        target: ``None``; ``"folder"`` for an ImageFolder-style class index, the key's first
            path component (``"."`` for files at the top, as in stacked archives, whose
            ``labels`` are used); ``"attr:NAME"`` for the HDF5 attribute ``NAME`` of the
            entry's dataset; or a callable ``target(key)``. With ``"folder"`` the dataset
            has ``classes`` (sorted; taken from the samples selected before ``limit``, so
            ``limit`` does not change class indices), ``class_to_idx`` and ``targets``.
        return_key: also return the entry's key, last.
        decode: decode entries stored as file bytes (images, .npy, text); ``False`` returns
            a uint8 array of the file's exact bytes.
        decode_size: ``(height, width)``: decode JPEG entries of a bytes archive at the
            smallest DCT scale (1, 1/2, 1/4, 1/8) whose output is still at least this large,
            several times faster for photos much larger than it. Opt-in, as the result is not
            the array of a full decode followed by a resize; other entries are unaffected.
        transform: applied to each sample after decoding.
        verify: check the CRC-32 of entries stored as exact bytes on every read.
        max_entry_bytes: refuse entries that declare more than this. Archives are untrusted
            input: every row is checked before it is read (see :mod:`data2h5.safety`), and a
            stacked archive's labels must index its ``classes``.
    """

    def __init__(
        self,
        paths: Union[PathLike, Sequence[PathLike]],
        *,
        prefix: Union[None, str, Sequence[str]] = None,
        keys: Optional[Sequence[str]] = None,
        limit: Optional[int] = None,
        target: Target = None,
        return_key: bool = False,
        decode: bool = True,
        decode_size: Optional[Tuple[int, int]] = None,
        transform: Optional[Callable[[Any], Any]] = None,
        verify: bool = True,
        max_entry_bytes: int = MAX_ENTRY_BYTES,
    ):
        if isinstance(paths, (str, bytes, os.PathLike)):
            paths = [paths]
        if not paths:
            raise ValueError("H5Dataset needs at least one archive path")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.readers: List[ArchiveReader] = [ArchiveReader(p, verify=verify, max_entry_bytes=max_entry_bytes)
                                             for p in paths]
        self.prefixes = (prefix,) if isinstance(prefix, str) else (tuple(prefix) if prefix is not None else None)
        self.return_key = return_key
        self.decode = decode
        self.decode_size = None if decode_size is None else check_decode_size(decode_size)
        self.transform = transform
        self.target = target
        self._archive, self._row = self._select(keys)
        self.classes: Optional[List[str]] = None
        self.class_to_idx: Optional[Dict[str, int]] = None
        self._targets: Optional[np.ndarray] = None
        self._attr: Optional[str] = None
        self._setup_target(target)  # before ``limit``, so classes do not depend on it
        if limit is not None:
            self._archive, self._row = self._archive[:limit], self._row[:limit]
            if self._targets is not None:
                self._targets = self._targets[:limit]

    # -- selection -------------------------------------------------------------------------

    def _select(self, keys: Optional[Sequence[str]]):
        if keys is not None:
            return self._select_keys(keys)
        archives, rows = [], []
        for a, reader in enumerate(self.readers):
            if self.prefixes is None:
                selected = np.arange(len(reader.index), dtype=np.int64)
            else:
                found = [reader.index.keys.prefixed(p) for p in self.prefixes]
                selected = found[0] if len(found) == 1 else np.unique(np.concatenate(found))
            archives.append(np.full(len(selected), a, np.int32))
            rows.append(np.asarray(selected, np.int64))
        return np.concatenate(archives), np.concatenate(rows)

    def _select_keys(self, keys: Sequence[str]):
        archives, rows = np.empty(len(keys), np.int32), np.empty(len(keys), np.int64)
        for i, key in enumerate(keys):
            for a, reader in enumerate(self.readers):
                pos = reader.index.keys.position(key) if isinstance(key, str) else -1
                if pos >= 0:
                    archives[i], rows[i] = a, pos
                    break
            else:
                where = self.readers[0].path if len(self.readers) == 1 else f"any of {len(self.readers)} archives"
                raise ArchiveKeyError(f"no entry {key!r} in {where}")
            if self.prefixes is not None and not key.startswith(self.prefixes):
                raise ArchiveKeyError(f"entry {key!r} does not start with prefix {' or '.join(self.prefixes)}")
        return archives, rows

    # -- targets ---------------------------------------------------------------------------

    def _setup_target(self, target: Target) -> None:
        if target is None or callable(target):
            return
        if not isinstance(target, str):
            raise ValueError(f"target must be None, 'folder', 'attr:NAME' or a callable, got {target!r}")
        if target == "folder":
            self._setup_folder()
        elif target.startswith("attr:") and len(target) > 5:
            self._attr = target[5:]
        else:
            raise ValueError(f"unknown target {target!r}: use None, 'folder', 'attr:NAME' or a callable")

    def _setup_folder(self) -> None:
        """Class names and indices from numpy columns: each key's first path component (or
        a stacked archive's labels), made distinct once per archive, not once per sample."""
        names, inverses = [], []
        for a, reader in enumerate(self.readers):
            rows = self._row[self._archive == a]
            found, inverse = self._folder_classes(reader, rows)
            names.append(found)
            inverses.append((a, inverse))
        self.classes = sorted(set().union(*names)) if names else []
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        targets = np.empty(len(self._row), np.int64)
        for (a, inverse), found in zip(inverses, names):
            lookup = np.array([self.class_to_idx[c] for c in found], np.int64)
            targets[self._archive == a] = lookup[inverse] if len(inverse) else inverse
        self._targets = targets

    @staticmethod
    def _folder_classes(reader: ArchiveReader, rows: np.ndarray) -> Tuple[List[str], np.ndarray]:
        """The distinct classes of ``rows`` and each row's number among them."""
        index = reader.index
        if index.layout == fmt.LAYOUT_STACKED:
            if index.labels is None:
                raise ArchiveError(
                    f"{reader.path}: stacked archive without {fmt.STACKED_LABELS!r}, so no folder targets"
                )
            labels, inverse = np.unique(np.asarray(index.labels)[rows], return_inverse=True)
            named = [index.classes[int(l)] if index.classes is not None else str(int(l)) for l in labels.tolist()]
            return named, inverse.reshape(-1)
        head, sep, _ = np.strings.partition(index.keys.raw[rows], b"/")
        heads = np.where(sep == b"/", head, np.bytes_(ROOT_CLASS.encode()))
        distinct, inverse = np.unique(heads, return_inverse=True)
        return [h.decode("utf-8", "surrogateescape") for h in distinct.tolist()], inverse.reshape(-1)

    @property
    def targets(self) -> Optional[List[int]]:
        """Class index of every sample with ``target='folder'`` (as ImageFolder has)."""
        return None if self._targets is None else self._targets.tolist()

    def _target_of(self, i: int, reader: ArchiveReader, row: int, key: str) -> Any:
        if self._targets is not None:
            return int(self._targets[i])
        if self._attr is not None:
            return reader.attr(row, self._attr)
        return self.target(key)

    # -- sequence --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._row)

    def key(self, i: int) -> str:
        """The key of sample ``i``."""
        i = self._check(i)
        return self.readers[self._archive[i]].index.keys[self._row[i]]

    @property
    def keys(self) -> Keys:
        """The key of every sample, in order (a sequence of str, decoded on access)."""
        if len(self.readers) == 1:
            return Keys(self.readers[0].index.keys.raw[self._row])
        width = max(r.index.keys.raw.dtype.itemsize for r in self.readers)
        raw = np.zeros(len(self._row), dtype=f"S{width}")
        for a, reader in enumerate(self.readers):
            mine = self._archive == a
            raw[mine] = reader.index.keys.raw[self._row[mine]]
        return Keys(raw)

    def _check(self, i: int) -> int:
        n = len(self._row)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for a dataset of {n}")
        return i

    def __getitem__(self, i: int) -> Any:
        i = self._check(i)
        reader = self.readers[self._archive[i]]
        row = int(self._row[i])
        sample = reader.read(row, decode=self.decode, decode_size=self.decode_size)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target is None and not self.return_key:
            return sample
        key = reader.index.keys[row]
        out = (sample,) if self.target is None else (sample, self._target_of(i, reader, row, key))
        return out + (key,) if self.return_key else out

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # -- sampling --------------------------------------------------------------------------

    def sampler(self, shuffle: bool = True, seed: int = 0, drop_last: bool = False, *, rank: Optional[int] = None,
                world_size: Optional[int] = None, window: Optional[int] = None) -> "RankSampler":
        """A rank-aware, deterministic, resumable sampler over this dataset (see
        :class:`data2h5.loaders.RankSampler`): each rank reads its own block of archives."""
        from .sampler import RankSampler

        return RankSampler(len(self), groups=self._archive, rows=self._row, shuffle=shuffle, seed=seed,
                           drop_last=drop_last, rank=rank, world_size=world_size, window=window)

    def eval_sampler(self, *, rank: Optional[int] = None, world_size: Optional[int] = None) -> "RankSampler":
        """Every sample exactly once across ranks, rank ``r`` the ``r``-th contiguous span in
        dataset order (counts differ by at most one): gathered outputs concatenate in order."""
        return self.sampler(shuffle=False, drop_last=False, rank=rank, world_size=world_size)

    # -- pickling --------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Paths and options, and the selection as runs: a worker gets a few kilobytes, not a
        copy of the index (each reader reads its index again, once, in the worker)."""
        state = self.__dict__.copy()
        for name in ("_archive", "_row", "_targets"):
            state[name] = _Runs.of(state[name])
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("_archive", "_row", "_targets"):
            if isinstance(state.get(name), _Runs):
                state[name] = state[name].array()
        self.__dict__.update(state)

    # -- handles ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every archive handle this process opened; they reopen on the next read."""
        for reader in getattr(self, "readers", ()):
            reader.close()

    def __enter__(self) -> "H5Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter shutdown modules may be gone
            pass

    def __repr__(self) -> str:
        paths = ", ".join(r.path for r in self.readers)
        return f"H5Dataset({paths}; {len(self)} samples)"



class _Runs(NamedTuple):
    """An integer array as runs of steady steps (``start``, ``step``, ``length`` each):
    ``arange`` rows and repeated archive or class numbers take a few runs, whatever their
    length. Arrays that do not run are kept whole."""

    starts: np.ndarray
    steps: np.ndarray
    lengths: np.ndarray
    dtype: str
    whole: Optional[np.ndarray] = None

    @classmethod
    def of(cls, values: Optional[np.ndarray]) -> Optional["_Runs"]:
        if values is None:
            return None
        values = np.asarray(values)
        n = len(values)
        if n < 3:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), values.dtype.str, values)
        diff = np.diff(values.astype(np.int64))
        breaks = np.flatnonzero(diff[1:] != diff[:-1]) + 1  # a new step starts at diff[b]
        if len(breaks) * 3 > n // 4:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), values.dtype.str, values)
        # runs cover values[lo:hi]: each run starts at its first value and holds its steps
        edges = np.concatenate(([0], breaks + 1, [n]))
        starts = values[edges[:-1]].astype(np.int64)
        lengths = np.diff(edges)
        steps = np.concatenate((diff[edges[:-2]], [diff[-1]])) if len(edges) > 2 else diff[:1]
        return cls(starts, steps.astype(np.int64), lengths.astype(np.int64), values.dtype.str)

    def array(self) -> np.ndarray:
        if self.whole is not None:
            return self.whole
        n = int(self.lengths.sum())
        first = np.repeat(np.cumsum(self.lengths) - self.lengths, self.lengths)
        out = np.repeat(self.starts, self.lengths) + (np.arange(n) - first) * np.repeat(self.steps, self.lengths)
        return out.astype(self.dtype)
