"""What ``data2h5 info`` and ``data2h5 ls`` show: an archive's facts and its keys."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Union

import h5py

from . import format as fmt
from .errors import ArchiveError


def _open(path: Union[str, os.PathLike]) -> h5py.File:
    if not os.path.isfile(path):
        raise ArchiveError(f"{path}: no such archive")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ArchiveError(f"{path} is not an HDF5 file ({exc})") from exc


def list_keys(path: Union[str, os.PathLike]) -> List[str]:
    """Every entry key in index order; for HDF5 files without an index, every dataset path."""
    with _open(path) as f:
        if fmt.INDEX_GROUP in f:
            return [k.decode("utf-8") for k in f[fmt.INDEX_GROUP]["keys"][()]]
        keys: List[str] = []
        f.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset) else None)
        return sorted(keys)


def describe(path: Union[str, os.PathLike]) -> Dict[str, object]:
    """Entries, bytes in and out, compression ratio and how the archive was made."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    with _open(path) as f:
        attrs = dict(f.attrs)
        if fmt.INDEX_GROUP in f:
            entries = int(f[fmt.INDEX_GROUP]["keys"].shape[0])
        else:
            entries = len(list_keys(path))
    bytes_in = int(attrs.get(fmt.ATTR_BYTES_IN, 0))
    skipped = json.loads(attrs.get(fmt.ATTR_SKIPPED, "[]"))
    return {
        "archive": os.path.abspath(path),
        "layout": str(attrs.get(fmt.ATTR_LAYOUT, "plain HDF5 (not written by data2h5)")),
        "entries": entries,
        "skipped": [list(s) for s in skipped],  # [relative path, reason]
        "bytes in": bytes_in,
        "bytes out": size,
        "ratio": round(size / bytes_in, 3) if bytes_in else None,
        "reader": str(attrs.get(fmt.ATTR_READER, "?")),
        "prune": str(attrs.get(fmt.ATTR_PRUNE, "?")),
        "extensions": json.loads(attrs.get(fmt.ATTR_EXTENSIONS, "[]")),
        "compression": str(attrs.get(fmt.ATTR_COMPRESSION, "?")),
        "source": str(attrs.get(fmt.ATTR_SOURCE, "?")),
        "created": str(attrs.get(fmt.ATTR_CREATED, "?")),
        "version": str(attrs.get(fmt.ATTR_VERSION, "?")),
    }
