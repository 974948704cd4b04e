"""What ``data2h5 info`` and ``data2h5 ls`` show: an archive's facts and its keys."""
from __future__ import annotations

import functools
import os
from typing import Dict, Iterator

from . import format as fmt, safety
from .archive import PathLike, read_index
from .keys import Keys
from .text import escape_lines


#: Keys written at a time by :func:`listing`.
LISTING_BLOCK = 1 << 16


def list_keys(path: PathLike, *, max_entry_bytes: int = safety.MAX_ENTRY_BYTES) -> Keys:
    """Every entry key in index order (for plain HDF5 files, every dataset path, sorted): a
    sequence of str, decoded on access."""
    return read_index(path, max_entry_bytes=max_entry_bytes).keys


def listing(path: PathLike, prefix: str = "", *, max_entry_bytes: int = safety.MAX_ENTRY_BYTES) -> Iterator[str]:
    """The keys starting with ``prefix`` (found by binary search), in index order, as blocks
    of text: one key a line, controls and invisible marks escaped (:func:`safety.printable`);
    a block is decoded and checked at once, and only its lines that need it are escaped."""
    keys = list_keys(path, max_entry_bytes=max_entry_bytes)
    rows = keys.prefixed(prefix) if prefix else None
    n = len(keys) if rows is None else len(rows)
    for lo in range(0, n, LISTING_BLOCK):
        raw = keys.raw[lo : lo + LISTING_BLOCK] if rows is None else keys.raw[rows[lo : lo + LISTING_BLOCK]]
        joined = b"\n".join(raw.tolist())
        if joined.count(b"\n") == len(raw) - 1:  # no key holds a line break: escape the block at once
            yield escape_lines(joined.decode("utf-8", "surrogateescape")) + "\n"
        else:
            yield "".join(safety.printable(k.decode("utf-8", "surrogateescape")) + "\n" for k in raw.tolist())


def describe(path: PathLike, *, max_entry_bytes: int = safety.MAX_ENTRY_BYTES) -> Dict[str, object]:
    """Entries, bytes in and out, compression ratio and how the archive was made.

    Attribute values are type-checked (a malformed one is shown as ``?``, a malformed list
    refused in one line); the plugin specs an archive records are shown, never loaded.
    """
    index = read_index(path, max_entry_bytes=max_entry_bytes)
    attrs = index.attrs
    size = os.path.getsize(path) + sum(s.size for s in getattr(index, "shards", ()))  # a master: its shards too
    bytes_in = safety.attr_int(attrs, fmt.ATTR_BYTES_IN, 0)
    text = functools.partial(safety.attr_text, attrs)
    return {
        "archive": os.path.abspath(path),
        "layout": index.layout if fmt.ATTR_FORMAT in attrs else "plain HDF5 (not written by data2h5)",
        **({"shards": len(index.shards)} if getattr(index, "shards", None) else {}),
        "entries": len(index),
        "skipped": safety.attr_json_list(attrs, fmt.ATTR_SKIPPED, safety.is_text_pair, index.path),  # [path, reason]
        "bytes in": bytes_in,
        "bytes out": size,
        "ratio": round(size / bytes_in, 3) if bytes_in else None,
        "reader": text(fmt.ATTR_READER),
        "prune": text(fmt.ATTR_PRUNE),
        "extensions": safety.attr_json_list(attrs, fmt.ATTR_EXTENSIONS, safety.is_text, index.path),
        "compression": text(fmt.ATTR_COMPRESSION),
        "source": text(fmt.ATTR_SOURCE),
        "created": text(fmt.ATTR_CREATED),
        "version": text(fmt.ATTR_VERSION),
    }
