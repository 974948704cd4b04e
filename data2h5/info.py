"""What ``data2h5 info`` and ``data2h5 ls`` show: an archive's facts and its keys."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from . import format as fmt
from .index import PathLike, read_index


def list_keys(path: PathLike) -> List[str]:
    """Every entry key in index order (for plain HDF5 files, every dataset path, sorted)."""
    return read_index(path).keys


def describe(path: PathLike) -> Dict[str, object]:
    """Entries, bytes in and out, compression ratio and how the archive was made."""
    index = read_index(path)
    attrs = index.attrs
    size = os.path.getsize(path)
    bytes_in = int(attrs.get(fmt.ATTR_BYTES_IN, 0))
    return {
        "archive": os.path.abspath(path),
        "layout": index.layout if fmt.ATTR_FORMAT in attrs else "plain HDF5 (not written by data2h5)",
        "entries": len(index),
        "skipped": [list(s) for s in json.loads(attrs.get(fmt.ATTR_SKIPPED, "[]"))],  # [relative path, reason]
        "bytes in": bytes_in,
        "bytes out": size,
        "ratio": round(size / bytes_in, 3) if bytes_in else None,
        "reader": attrs.get(fmt.ATTR_READER, "?"),
        "prune": attrs.get(fmt.ATTR_PRUNE, "?"),
        "extensions": json.loads(attrs.get(fmt.ATTR_EXTENSIONS, "[]")),
        "compression": attrs.get(fmt.ATTR_COMPRESSION, "?"),
        "source": attrs.get(fmt.ATTR_SOURCE, "?"),
        "created": attrs.get(fmt.ATTR_CREATED, "?"),
        "version": attrs.get(fmt.ATTR_VERSION, "?"),
    }
