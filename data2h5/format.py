"""The on-disk layout of a data2h5 archive: names shared by the writer and the readers.

A ``files`` archive holds one HDF5 dataset per source file, named by its relative path
(``foo/boo/image_0001.jpg``), and nothing else at its root, so that ``list(f.keys())`` and
``len(f)`` see the user's files only. Its index is a group that no path from the root reaches:
created anonymous, it holds a hard link to itself (:data:`INDEX_SELF`), which keeps it in the
file, and the root attribute :data:`ATTR_INDEX` holds an object reference to it. (Archives
written before this place it at :data:`INDEX_GROUP`, where readers still find it.) The index
has one row per entry, aligned across these 1-D datasets:

==========  ==========  ===============================================================
name        dtype       meaning
==========  ==========  ===============================================================
keys        S<n>        the entry's key, UTF-8 (gzip-compressed, so a million keys load
                        in a fraction of a second without walking the HDF5 tree)
size        uint64      size in bytes of the source file
crc32       uint32      CRC-32 of the source file's bytes
kind        uint8       :class:`Kind` of the stored value
codec       uint8       codec id of the stored bytes (see :mod:`data2h5.codecs`)
offset      uint64      absolute file offset of the entry's data when it is stored as
                        one block (one chunk, or contiguous); 0 when it is not, and the
                        entry must then be read through h5py
stored      uint64      number of stored (compressed) bytes at ``offset``
stored_crc32 uint32     CRC-32 of the entry's stored bytes: the block at ``offset``, or,
                        for an entry of several chunks, the chunks as stored (compressed)
                        run together in row-major chunk-grid order; damage to a
                        compressed block is caught even by codecs without a checksum
verbatim    uint8       1 when a BYTES or TEXT entry holds exactly the source file's bytes
                        (what the built-in readers store); 0 when a reader plugin returned
                        other bytes or text, which the source's CRC-32 then does not describe
dtype       S16         numpy dtype string of the stored array (``|u1``, ``<f4``)
shape       int64 (k)   shape of the stored array, padded with -1; k (1 to 8) is the
                        most axes any entry has (earlier archives hold 8)
==========  ==========  ===============================================================

A ``stacked`` archive holds ``data`` (N, ...), ``labels`` (N,), ``keys`` (N,) and
``classes``, plus soft links that make the same file an h5torch dataset (``central`` and
``0/labels``, ``0/keys``); its index group holds ``keys``, ``size`` and ``crc32`` per row
and :data:`CHUNK_CRC32`, the CRC-32 of each chunk of ``data`` as stored, in row order.

Root attributes (:data:`ATTRS`) record how the archive was made.
"""
from __future__ import annotations

import enum

import numpy as np

FORMAT_VERSION = 1

INDEX_GROUP = "__data2h5__"  # where archives written before ATTR_INDEX keep their index; still reserved
INDEX_SELF = "__self__"  # the index group's link to itself, its one link
MAX_NDIM = 8

# Root attributes.
ATTR_FORMAT = "data2h5_format"
ATTR_INDEX = "data2h5_index"  # object reference to the index group
ATTR_VERSION = "data2h5_version"
ATTR_LAYOUT = "layout"
ATTR_READER = "reader"
ATTR_PRUNE = "prune"
ATTR_EXTENSIONS = "extensions"  # JSON list
ATTR_SOURCE = "source"
ATTR_CREATED = "created"  # ISO 8601, UTC
ATTR_COMPRESSION = "compression"
ATTR_ENTRIES = "entries"
ATTR_SKIPPED = "skipped"  # JSON list of [relative path, reason]
ATTR_BYTES_IN = "bytes_in"
ATTR_BYTES_OUT = "bytes_out"  # bytes of entry data stored (compressed), metadata excluded
ATTR_FOLLOW_SYMLINKS = "follow_symlinks"  # whether the walk entered symlinked folders

# Entries carry no attributes of their own (one costs ~12 µs an entry, a seventh of the
# writer's time in bytes mode): what an entry holds is the index's ``kind``, and its key, the
# source's relative path, ends with the source's extension.

LAYOUT_FILES = "files"
LAYOUT_STACKED = "stacked"

# Stacked layout.
STACKED_DATA = "data"
STACKED_LABELS = "labels"
STACKED_KEYS = "keys"
STACKED_CLASSES = "classes"
CHUNK_CRC32 = "chunk_crc32"  # index column of a stacked archive: one per chunk of data
ROOT_CLASS = "."  # the class of files directly in the source folder: a name no folder can have


def class_of(key: str) -> str:
    """The class of a key: its first path component, or :data:`ROOT_CLASS` for a top-level file."""
    head, sep, _ = key.partition("/")
    return head if sep else ROOT_CLASS


class Kind(enum.IntEnum):
    """What an entry's stored uint8/array data means."""

    ARRAY = 0  # a decoded numpy array, stored as is
    BYTES = 1  # a file's exact bytes (1-D uint8), decoded on read by extension
    TEXT = 2  # UTF-8 text (1-D uint8)


STORED_CRC32 = "stored_crc32"  # absent from archives written before it was recorded
VERBATIM = "verbatim"  # absent from archives written before it was recorded

INDEX_FIELDS = {
    "keys": None,  # fixed-length bytes, sized to the longest key
    "size": np.dtype("<u8"),
    "crc32": np.dtype("<u4"),
    "kind": np.dtype("u1"),
    "codec": np.dtype("u1"),
    "offset": np.dtype("<u8"),
    "stored": np.dtype("<u8"),
    STORED_CRC32: np.dtype("<u4"),
    VERBATIM: np.dtype("u1"),
    "dtype": np.dtype("S16"),
    "shape": np.dtype("<i8"),  # 2-D: (entries, 1 to MAX_NDIM)
}
