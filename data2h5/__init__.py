"""data2h5: turn a folder of loose files into one compressed HDF5 archive, and read it back fast.

>>> report = data2h5.convert("images/", "images.h5", ext="jpg")
>>> h5py.File("images.h5")["cats/0001.jpg"][()]      # the decoded image
>>> ds = data2h5.H5Dataset("images.h5", target="folder")  # for torch DataLoader workers
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
    WorkerError,
)

__all__ = [
    "__version__",
    "convert",
    "Report",
    "Data2H5Error",
    "SourceError",
    "WorkerError",
    "OutputError",
    "ReadError",
    "PluginError",
    "CompressionError",
    "LayoutError",
    "ArchiveError",
    "ArchiveKeyError",
    "CorruptEntryError",
]
