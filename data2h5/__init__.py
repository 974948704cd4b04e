"""data2h5: turn a folder of loose files into one compressed HDF5 archive, and read it back fast.

>>> report = data2h5.convert("images/", "images.h5", ext="jpg")
>>> h5py.File("images.h5")["cats/0001.jpg"][()]            # the decoded image
>>> ds = data2h5.H5Dataset("images.h5", target="folder")   # for DataLoader workers
>>> reader = data2h5.BatchReader("stacked.h5", batch_size=64, shuffle=True)
>>> data2h5.verify("images.h5", "images/").ok               # intact, and matches the source
>>> data2h5.extract("images.h5", "restored/")              # entries back as files
>>> data2h5.open("images.h5")["cats/0001.jpg"]              # any layout, key → decoded value
"""
from ._version import __version__
from .convert import Report, convert
from .errors import (
    ArchiveError,
    ArchiveKeyError,
    CompressionError,
    CorruptEntryError,
    Data2H5Error,
    LayoutError,
    OutputError,
    PluginError,
    ReadError,
    SourceError,
    UnsafeKeyError,
    WorkerError,
)
from .extract import ExtractReport, extract
from .mapping import ArchiveView, open
from .verify import VerifyReport, verify

# The loaders import torch when it is installed; importing them only on first use keeps
# `import data2h5` (and every conversion worker) free of that cost.
_LAZY = {"H5Dataset": ".loaders.dataset", "BatchReader": ".loaders.batch_reader"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data2h5' has no attribute {name!r}")


__all__ = [
    "__version__",
    "convert",
    "Report",
    "verify",
    "VerifyReport",
    "extract",
    "ExtractReport",
    "open",
    "ArchiveView",
    "H5Dataset",
    "BatchReader",
    "Data2H5Error",
    "SourceError",
    "OutputError",
    "ReadError",
    "PluginError",
    "WorkerError",
    "CompressionError",
    "LayoutError",
    "ArchiveError",
    "ArchiveKeyError",
    "CorruptEntryError",
    "UnsafeKeyError",
]
