"""Template reader and prune functions: copy this file, edit, and name it on the command line.

Both functions work as they are. Use them with::

    data2h5 convert --path-images DIR --path-output out.h5 --ext foo \\
        --reader plugins/my_functions.py:my_read --prune plugins/my_functions.py:my_prune

The functions run in worker processes, so keep them at module level, keep module-level
state picklable (or build it lazily), and do not rely on globals set by the main process.
"""
from __future__ import annotations

import re
from pathlib import PurePath

import imageio.v3 as iio
import numpy as np


def my_read(path: str) -> np.ndarray:
    """Read one file and return what should be stored for it.

    Return a numpy array (stored decoded, e.g. an image), ``bytes`` (stored as they are) or
    ``str`` (stored as UTF-8 text). Raise any exception for a file that cannot be read: the
    converter reports it with the file's path.
    """
    # Change this line to read your own format, e.g. ``np.load(path)`` for .npy files or
    # ``cv2.imread(path)`` for OpenCV's BGR channel order.
    return iio.imread(path)


def my_prune(filename: str, ext: str) -> bool:
    """Whether to keep ``filename`` for the extension ``ext`` (lower case with a dot: ".foo").

    Called once for each ``--ext`` value; a file is kept if any call returns True. This
    version matches the suffix case-insensitively and lets digits follow the extension, so
    ``scan.FoO0345`` is kept for ``--ext foo`` while ``scan.food`` is not.
    """
    # Change the pattern to match your own naming scheme; ``filename`` may include folders.
    name = PurePath(filename).name.lower()
    return re.fullmatch(r".+" + re.escape(ext.lower()) + r"[0-9]*", name) is not None
