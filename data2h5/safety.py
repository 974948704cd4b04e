"""What data2h5 accepts from an archive: a file from a stranger is data, never code and never
a window onto the machine.

Every reader goes through these checks before it allocates or reads:

* **Only bytes inside the file.** Objects are reached by walking links one at a time from
  the root: hard links, and soft links that resolve inside the file; an external or
  user-defined link is refused before HDF5 could follow it. A dataset stored in other files
  (external storage) or assembled from them (a virtual dataset) is refused. As a second
  lock, the ``data2h5`` command points HDF5's external-file, external-link and
  virtual-dataset prefixes at a path that cannot exist (:func:`lock_prefixes`); the library
  leaves the process's HDF5 settings to the program that imports it.
* **Bounded sizes.** What an entry, a row or a chunk declares (fill values of unwritten
  chunks included) is bounded by the read limit (:data:`MAX_ENTRY_BYTES` unless the caller
  gives another) before anything is allocated; root attributes and index fields likewise.
* **An index that proves itself** (:func:`check_rows`): every row's block lies inside the
  file, no two rows share bytes, kinds, codecs and dtypes are known, shapes are well formed,
  and what a block decompresses to is within what its codec can produce from it. Whether a
  row's block is its key's own dataset storage is proven on first read (see
  :func:`check_storage`), so data2h5 and h5py can never return different values for a key.
* **Text shown as text.** Keys and attribute values reach a terminal through
  :func:`printable`, with control characters escaped.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import h5py
import numpy as np

from .errors import ArchiveError, CorruptEntryError, SizeLimitError, UnsafeArchiveError
from .format import ATTR_INDEX, INDEX_GROUP, MAX_NDIM, Kind
from .text import escape

MAX_ENTRY_BYTES = 4 << 30
"""Default read limit: the largest value one entry (or row, or chunk) may declare."""

MAX_ATTR_BYTES = 64 << 20
"""Largest root attribute read (the list of skipped files is the longest one data2h5 writes)."""

MAX_SOFT_HOPS = 16
"""Soft links followed while resolving one path: more is a loop."""

NOWHERE = "/dev/null/data2h5-reads-no-external-file/"
"""External-file and virtual-dataset prefix: under a file, so no path beneath it can exist."""

PREFIX_VARIABLES = ("HDF5_EXTFILE_PREFIX", "HDF5_VDS_PREFIX", "HDF5_EXT_PREFIX")

ALLOWED_DTYPE_KINDS = frozenset("biufcmMSU")
"""Array kinds read from stored bytes: plain numbers, dates and fixed-size text, never objects."""


# -- text on a terminal -------------------------------------------------------------------------

printable = escape
"""``text`` with controls, format marks (bidirectional, zero-width, tags), lone surrogates and
line or paragraph separators escaped (``\\x1b``, ``\\u200f``): see :mod:`data2h5.text`."""


# -- sizes ---------------------------------------------------------------------------------------


def check_size(nbytes: float, limit: int, path: str, what: str) -> None:
    """Refuse ``what`` (e.g. ``entry 'a.jpg'``) when it declares more than ``limit`` bytes."""
    if nbytes > limit:
        raise SizeLimitError(path, what, int(nbytes) if math.isfinite(nbytes) else None, limit)


def declared_bytes(shape: Tuple[int, ...], itemsize: int) -> float:
    """Bytes of an array of ``shape``; a float, so a crafted shape cannot overflow."""
    return float(np.prod(np.asarray(shape, dtype=np.float64))) * itemsize if shape else float(itemsize)


def safe_dtype(text: Any, path: str, what: str) -> np.dtype:
    """The numpy dtype that an index records for ``what``, refused unless it is plain data."""
    try:
        dt = np.dtype(text.decode("ascii") if isinstance(text, bytes) else str(text))
    except (TypeError, ValueError, UnicodeDecodeError, SyntaxError):
        raise ArchiveError(f"{path}: {what} records an unknown dtype {printable(repr(text))}; "
                           "the archive is damaged or crafted") from None
    if dt.hasobject or dt.kind not in ALLOWED_DTYPE_KINDS or dt.fields is not None or dt.itemsize > 64:
        raise ArchiveError(f"{path}: {what} records dtype {dt.str!r}, which data2h5 does not read from stored "
                           "bytes; the archive is damaged or crafted")
    return dt


# -- links and storage ----------------------------------------------------------------------------

_locked_dapl: Optional[h5py.h5p.PropDAID] = None


def lock_prefixes() -> None:
    """The second lock behind :func:`check_local` and :func:`resolve`, for programs that read
    only archives (the ``data2h5`` command): HDF5's search paths for external raw-data files,
    external links and virtual-dataset sources point at :data:`NOWHERE`, in the environment
    of every process started from now on (HDF5 reads it when it loads) and for every dataset
    :func:`open_dataset` opens in this one."""
    global _locked_dapl
    for name in PREFIX_VARIABLES:
        os.environ[name] = NOWHERE
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_efile_prefix(NOWHERE.encode())
    dapl.set_virtual_prefix(NOWHERE.encode())
    _locked_dapl = dapl


_LINK_KINDS = {h5py.h5l.TYPE_EXTERNAL: "an external link to another file"}


def resolve(f: h5py.File, name: str, *, groups: Optional[Dict[str, Any]] = None,
            path: Optional[str] = None) -> Tuple[Any, bytes]:
    """``(GroupID, component name as bytes)`` of the last link of ``name``, reached from the
    root through hard links and in-file soft links only.

    Raises :class:`KeyError` when a component does not exist and :class:`UnsafeArchiveError`
    when one is an external or user-defined link, a soft link loop, or not a group.
    ``groups`` caches opened groups by path, for callers resolving many names; ``path``
    names the file in messages (default: its name).
    """
    path = f.filename if path is None else path
    cache: Dict[str, Any] = {} if groups is None else groups
    parts = [p for p in name.split("/") if p]
    for _ in range(MAX_SOFT_HOPS + 1):
        if not parts:
            raise UnsafeArchiveError(path, name, "names the root group, not an entry")
        parent = "/".join(parts[:-1])
        start = len(parts) - 1 if parent in cache else 0  # keys share folders: start at the cached one
        loc = cache[parent] if start else cache.get("") or cache.setdefault("", _root(f))
        restart = None
        for i in range(start, len(parts)):
            raw = parts[i].encode("utf-8", "surrogateescape")
            try:
                kind = loc.links.get_info(raw).type
            except (KeyError, RuntimeError):
                raise KeyError(name) from None
            if kind == h5py.h5l.TYPE_SOFT:
                target = loc.links.get_val(raw).decode("utf-8", "surrogateescape")
                base = [] if target.startswith("/") else parts[:i]
                restart = base + [p for p in target.split("/") if p] + parts[i + 1:]
                break
            if kind != h5py.h5l.TYPE_HARD:
                raise UnsafeArchiveError(path, name, _LINK_KINDS.get(kind, "a user-defined link") + " at "
                                         + repr("/".join(parts[: i + 1])) + ", which data2h5 never follows")
            if i == len(parts) - 1:
                return loc, raw
            try:
                loc = h5py.h5g.open(loc, raw)
            except (KeyError, ValueError, RuntimeError, OSError, TypeError):
                raise UnsafeArchiveError(path, name, f"{'/'.join(parts[: i + 1])!r} is not a group") from None
            cache["/".join(parts[: i + 1])] = loc
        parts = restart
    raise UnsafeArchiveError(path, name, f"more than {MAX_SOFT_HOPS} soft links to follow (a loop)")


def _object_type(loc: Any, raw: bytes, path: str, name: str, cause: BaseException) -> int:
    """The HDF5 object type at ``raw`` in ``loc``; a damaged header is an :class:`ArchiveError`
    that says so (not "not a dataset")."""
    try:
        return h5py.h5o.get_info(loc, raw).type
    except (KeyError, RuntimeError, OSError, ValueError):
        raise _unopenable(path, name, cause) from None


def _unopenable(path: str, name: str, exc: BaseException) -> CorruptEntryError:
    reason = f"its dataset cannot be opened: {printable(' '.join(str(exc).split()))}"
    return CorruptEntryError(f"{path}: {printable(repr(name))} is damaged ({reason}); copy or convert it again", reason)


def _root(f: h5py.File):
    return h5py.h5g.open(f.id, b"/")


def open_dataset(f: h5py.File, name: str, *, groups: Optional[Dict[str, Any]] = None) -> h5py.Dataset:
    """The dataset ``name`` of ``f``, reached as :func:`resolve` does and stored inside the
    file (see :func:`check_local`). :class:`KeyError` when there is none."""
    return h5py.Dataset(open_dataset_id(f, name, groups=groups)[0])


def open_dataset_id(f: h5py.File, name: str, *, groups: Optional[Dict[str, Any]] = None,
                    path: Optional[str] = None, plist: bool = True
                    ) -> Tuple[h5py.h5d.DatasetID, Optional[h5py.h5p.PropDCID]]:
    """:func:`open_dataset` at HDF5's level, for hot paths: ``(dataset id, creation plist)``.

    ``plist=False`` skips the creation plist and its check (``(dataset id, None)``): for a
    caller that goes on to :func:`check_storage`, which proves the dataset's storage itself.
    """
    path = f.filename if path is None else path
    loc, raw = resolve(f, name, groups=groups, path=path)
    return _open_local(loc, raw, path, name, plist)


def _open_local(loc: Any, raw: bytes, path: str, name: str, plist: bool = True
                ) -> Tuple[h5py.h5d.DatasetID, Optional[h5py.h5p.PropDCID]]:
    """The dataset linked as ``raw`` in ``loc``, refused unless stored inside the file (with
    ``plist`` False, not yet checked: see :func:`open_dataset_id`)."""
    try:
        dsid = h5py.h5d.open(loc, raw, _locked_dapl)
    except KeyError as exc:
        if _object_type(loc, raw, path, name, exc) != h5py.h5o.TYPE_DATASET:
            raise UnsafeArchiveError(path, name, "is a group or a named type, not a dataset") from None
        try:  # held open already in this process, with HDF5's default prefixes
            dsid = h5py.h5d.open(loc, raw)
        except KeyError as again:
            raise _unopenable(path, name, again) from again
    if not plist:
        return dsid, None
    dcpl = dsid.get_create_plist()
    check_local(dcpl, path, name)
    return dsid, dcpl


def open_group(f: h5py.File, name: str) -> Optional[h5py.Group]:
    """The group ``name`` of ``f`` reached as :func:`resolve` does; None when there is none
    or it is not a group."""
    try:
        loc, raw = resolve(f, name)
        if h5py.h5o.get_info(loc, raw).type != h5py.h5o.TYPE_GROUP:
            return None
        return h5py.Group(h5py.h5g.open(loc, raw))
    except KeyError:
        return None


def open_index_group(f: h5py.File) -> Optional[h5py.Group]:
    """The archive's index group: the one the root attribute ``data2h5_index`` refers to, or,
    in archives written before it, the group ``__data2h5__``; None when there is neither.
    Raises :class:`ArchiveError` when the attribute is not a reference to a group of the file."""
    if ATTR_INDEX not in f.attrs:
        return open_group(f, INDEX_GROUP)
    aid = f.attrs.get_id(ATTR_INDEX)
    if aid.shape != () or h5py.check_dtype(ref=aid.dtype) is not h5py.Reference:
        raise ArchiveError(f"{f.filename}: root attribute {ATTR_INDEX!r} is not a reference to the index; "
                           "the archive is damaged or crafted")
    try:
        oid = h5py.h5r.dereference(f.attrs[ATTR_INDEX], f.id)
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
        raise ArchiveError(f"{f.filename}: the index that root attribute {ATTR_INDEX!r} refers to cannot be "
                           f"opened ({' '.join(str(exc).split())}); the archive is damaged") from exc
    if oid is None or h5py.h5i.get_type(oid) != h5py.h5i.GROUP:
        raise ArchiveError(f"{f.filename}: root attribute {ATTR_INDEX!r} refers to something other than a group; "
                           "the archive is damaged or crafted")
    return h5py.Group(oid)


def open_child(f: h5py.File, group: h5py.Group, name: str) -> h5py.Dataset:
    """Dataset ``name`` linked in ``group`` (which may have no path, as the index has none):
    a hard link, or a soft link to an absolute path of the file; :class:`KeyError` when absent."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        kind = group.id.links.get_info(raw).type
    except (KeyError, RuntimeError):
        raise KeyError(name) from None
    if kind == h5py.h5l.TYPE_SOFT:
        target = group.id.links.get_val(raw).decode("utf-8", "surrogateescape")
        if not target.startswith("/"):
            raise UnsafeArchiveError(f.filename, name, "is a relative soft link in the index, which data2h5 never follows")
        return open_dataset(f, target)
    if kind != h5py.h5l.TYPE_HARD:
        raise UnsafeArchiveError(f.filename, name, _LINK_KINDS.get(kind, "a user-defined link") + " in the index, "
                                 "which data2h5 never follows")
    return h5py.Dataset(_open_local(group.id, raw, f.filename, name)[0])


def has(f: h5py.File, name: str) -> bool:
    """Whether ``name`` exists in ``f``, without following any link outside it."""
    try:
        resolve(f, name)
    except KeyError:
        return False
    return True


def check_local(dcpl: h5py.h5p.PropDCID, path: str, name: str) -> None:
    """Refuse a dataset (by its creation property list) whose bytes live outside the file:
    external storage, or a virtual dataset mapping other files (or this one: its sources are
    never followed)."""
    if dcpl.get_layout() == h5py.h5d.VIRTUAL:
        raise UnsafeArchiveError(path, name, "is a virtual dataset assembled from other datasets")
    if dcpl.get_external_count():
        raise UnsafeArchiveError(path, name, "is stored in external files")


def check_storage(dsid: h5py.h5d.DatasetID, dcpl: Optional[h5py.h5p.PropDCID], offset: int, stored: int, path: str,
                  name: str) -> None:
    """Refuse an index row whose block (``offset``, ``stored``) is not the dataset's own
    storage: its contiguous data, or its single chunk. ``dcpl`` None: the dataset is not
    checked yet (:func:`open_dataset_id` with ``plist=False``) and is checked here."""
    actual: Optional[Tuple[int, int]] = None
    # HDF5 gives an address only for contiguous data inside the file (not external files,
    # not virtual, not chunked): the usual case is proven without the creation plist.
    start = dsid.get_offset()
    if start is not None:
        actual = (start, dsid.get_storage_size())
    else:
        if dcpl is None:
            dcpl = dsid.get_create_plist()
            check_local(dcpl, path, name)
        if dcpl.get_layout() == h5py.h5d.CHUNKED and dsid.get_num_chunks() == 1:
            info = dsid.get_chunk_info(0)
            actual = (info.byte_offset, info.size)
    if actual != (offset, stored):
        raise UnsafeArchiveError(path, name, "its index row points at bytes that are not its dataset's storage "
                                 "(h5py would show other data)")


def check_chunks(dset: h5py.Dataset, limit: int, path: str, name: str) -> None:
    """Refuse a chunked dataset whose chunks declare more than ``limit`` bytes each."""
    if dset.chunks is not None:
        check_size(declared_bytes(dset.chunks, dset.dtype.itemsize), limit, path, f"a chunk of dataset {name!r}")


def read_small(dset: h5py.Dataset, limit: int, path: str, name: str) -> np.ndarray:
    """All of ``dset``, refused when it declares more than ``limit`` bytes."""
    check_size(declared_bytes(dset.shape or (), dset.dtype.itemsize), limit, path, f"dataset {name!r}")
    return dset[()]


# -- attributes ------------------------------------------------------------------------------------


def read_attrs(f: h5py.File) -> Dict[str, Any]:
    """The root attributes of ``f`` as plain Python (``str``, ``int``, ``float``, ``bool``, or
    a small list), each read only when its declared size is within :data:`MAX_ATTR_BYTES`;
    attributes of other types (references, compounds, huge arrays) are left out."""
    out: Dict[str, Any] = {}
    for raw in _attr_names(f):
        try:
            aid = h5py.h5a.open(f.id, raw)
            if declared_bytes(aid.shape or (), max(1, aid.dtype.itemsize)) > MAX_ATTR_BYTES:
                continue
            value = f.attrs[raw.decode("utf-8", "surrogateescape")]
        except (KeyError, ValueError, TypeError, OSError, RuntimeError):
            continue
        plain = _plain(value)
        if plain is not None:
            out[raw.decode("utf-8", "replace")] = plain
    return out


def _attr_names(f: h5py.File) -> List[bytes]:
    names: List[bytes] = []
    h5py.h5a.iterate(f.id, lambda name, *_: names.append(name))
    return names


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.size <= 64 and value.dtype.kind in "biufSU":
        return [_plain(v) for v in value.tolist()]
    return None


def attr_text(attrs: Dict[str, Any], name: str, default: str = "?") -> str:
    """A text attribute, or ``default`` when it is missing or not text."""
    value = attrs.get(name)
    return value if isinstance(value, str) else default


def attr_int(attrs: Dict[str, Any], name: str, default: Optional[int] = None) -> Optional[int]:
    """A non-negative integer attribute, or ``default`` when missing or of another type."""
    value = attrs.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return default
    return value


def attr_json_list(attrs: Dict[str, Any], name: str, item: Callable[[Any], bool], path: str) -> list:
    """A JSON-encoded list attribute whose every item passes ``item``; ``[]`` when missing.
    Raises :class:`ArchiveError` when it is there but malformed."""
    value = attrs.get(name)
    if value is None:
        return []
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, list) or not all(item(v) for v in parsed):
        raise ArchiveError(f"{path}: root attribute {name!r} is malformed (not a JSON list of the expected items); "
                           "the archive is damaged or crafted")
    return parsed


def is_text(value: Any) -> bool:
    return isinstance(value, str)


def is_text_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


# -- the index, all rows at once --------------------------------------------------------------------


def row_itemsizes(dtypes: np.ndarray, path: str, keys_of: Callable[[int], str], strict: bool) -> np.ndarray:
    """Item size of each row's recorded dtype; every distinct dtype checked once (``strict``:
    refused unless :func:`safe_dtype` accepts it; else, as for a plain HDF5 file whose dtypes
    come from its own datasets and are read by h5py, only parsed)."""
    values, inverse = _distinct(dtypes)
    sizes = np.empty(len(values), np.int64)
    for j, text in enumerate(values.tolist()):
        if strict:
            row = int(np.argmax(inverse == j))
            sizes[j] = safe_dtype(text, path, f"entry {printable(repr(keys_of(row)))}").itemsize
        else:
            try:
                sizes[j] = np.dtype(text.decode("ascii")).itemsize
            except (TypeError, ValueError, UnicodeDecodeError, SyntaxError):
                sizes[j] = 1
    return sizes[inverse.reshape(-1)]


def row_bytes(shape: np.ndarray, itemsize: np.ndarray, axes: int = MAX_NDIM) -> np.ndarray:
    """Bytes each index row declares (float64, so a crafted shape cannot overflow): its
    ``shape`` (padded with -1) times its item size, over the first ``axes`` axes."""
    nbytes = itemsize.astype(np.float64)
    for axis in range(min(axes, shape.shape[1])):
        nbytes *= np.where(shape[:, axis] < 0, 1, shape[:, axis])
    return nbytes


def _distinct(values: np.ndarray, few: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, without sorting when there are at most
    ``few`` distinct values (an archive holds a handful of dtypes in a million rows)."""
    found: List[Any] = []
    inverse = np.zeros(len(values), np.intp)
    todo = np.ones(len(values), dtype=bool)
    while todo.any():
        if len(found) == few:
            return np.unique(values, return_inverse=True)
        first = int(np.argmax(todo))
        same = values == values[first]
        inverse[same] = len(found)
        found.append(values[first])
        todo &= ~same
    return np.array(found, dtype=values.dtype), inverse


def _one_of(values: np.ndarray, allowed: List[int]) -> np.ndarray:
    """``np.isin(values, allowed)``, by table lookup for one-byte columns."""
    if values.dtype == np.uint8:
        table = np.zeros(256, bool)
        table[[a for a in allowed if 0 <= a < 256]] = True
        return table[values]
    return np.isin(values, allowed)


def check_rows(index: Any, file_size: int, limit: int, known_codecs: frozenset, ratios: Dict[int, float],
               *, strict_dtypes: bool = True) -> None:
    """Prove an index's rows before any is used (see the module's docstring); raises
    :class:`ArchiveError` (or :class:`SizeLimitError`) naming the first bad row's key.

    ``ratios``: by codec id, the most one stored byte can decompress to (absent: unbounded
    by ratio, bounded by ``limit`` alone).
    """
    path, n = index.path, len(index)
    if not n:
        return
    key = lambda i: index.keys[int(i)]  # noqa: E731 - one-line accessor for messages

    def refuse(bad: np.ndarray, why: str) -> None:
        if bad.any():
            first = int(np.argmax(bad))
            raise ArchiveError(f"{path}: entry {printable(repr(key(first)))} {why}; the archive is damaged or crafted")

    refuse(~_one_of(index.kind, [int(k) for k in Kind]), "has an unknown kind")
    refuse(~_one_of(index.codec, sorted(known_codecs)), "records an unknown codec")
    shape = index.shape
    if shape.min() < -1:
        refuse((shape < -1).any(axis=1), "records a negative dimension")
    pad = shape == -1
    used = np.flatnonzero((~pad).any(axis=0))
    k = int(used[-1]) + 1 if len(used) else 0  # axes any row uses: rows are padded after them
    if k > 1 and (pad[:, : k - 1] & ~pad[:, 1:k]).any():
        refuse((pad[:, : k - 1] & ~pad[:, 1:k]).any(axis=1), "records a malformed shape")
    nbytes = row_bytes(shape, row_itemsizes(index.dtype, path, key, strict_dtypes), axes=k)
    if (nbytes > limit).any():
        first = int(np.argmax(nbytes > limit))
        check_size(float(nbytes[first]), limit, path, f"entry {printable(repr(key(first)))}")

    offset, stored = index.offset, index.stored
    block = offset > 0
    size = np.uint64(file_size)
    refuse(block & ((offset > size) | (stored > size - np.minimum(offset, size))),
           "points outside the file (its offset and size lie past its end)")
    stored_f = stored.astype(np.float64)
    refuse(block & (index.codec == 0) & (stored_f != nbytes), "records a stored size that is not its data's size")
    codecs = np.unique(index.codec[block]) if (index.codec != index.codec[0]).any() else index.codec[:1]
    for codec_id in codecs.tolist():
        ratio = ratios.get(codec_id)
        if ratio is not None:
            refuse(block & (index.codec == codec_id) & (nbytes > stored_f * ratio + 64),
                   "declares more data than its stored bytes can hold")
    placed = block & (stored > 0)
    every = bool(placed.all())
    rows = np.arange(n) if every else np.flatnonzero(placed)
    if len(rows) > 1:
        starts = offset if every else offset[rows]
        if (starts[1:] >= starts[:-1]).all():  # as written: no reordering to pay for
            order, ends = rows, starts + (stored if every else stored[rows])
        else:
            order = rows[np.argsort(starts, kind="stable")]
            starts, ends = offset[order], offset[order] + stored[order]
        shared = starts[1:] < ends[:-1]
        if shared.any():
            j = int(np.argmax(shared))
            a, b = sorted((int(order[j]), int(order[j + 1])))
            raise ArchiveError(f"{path}: entries {printable(repr(key(a)))} and {printable(repr(key(b)))} share stored "
                               "bytes; the archive is damaged or crafted")

