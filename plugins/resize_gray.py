"""Reader plugin: decode an image, convert it to greyscale and resize it to one fixed size.

Every sample then has the same shape, which is what the ``stacked`` layout (one
``(N, height, width)`` array) needs when the source images differ in size::

    data2h5 convert --path-images DIR --path-output out.h5 --ext jpg --layout stacked \\
        --reader plugins/resize_gray.py:read

The size is ``WIDTHxHEIGHT`` (or one number for a square) from the environment variable
``RESIZE_GRAY_SIZE``, e.g. ``RESIZE_GRAY_SIZE=128x96 data2h5 convert ...``; without it the
size is :data:`DEFAULT_SIZE`. The variable is checked on import (a bad value fails before
any file is read) and looked up on every call, so a change reaches already-imported copies.
Copy the file and change :data:`DEFAULT_SIZE` or :func:`read` for other sizes or colour.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Tuple

import numpy as np
from PIL import Image

DEFAULT_SIZE = (64, 64)  # (width, height), Pillow's order
ENV_VAR = "RESIZE_GRAY_SIZE"


@functools.lru_cache(maxsize=8)
def parse_size(text: str) -> Tuple[int, int]:
    """Parse ``"128x96"`` (width x height) or ``"64"`` (square) into ``(width, height)``."""
    match = re.fullmatch(r"\s*([1-9][0-9]*)\s*(?:[xX]\s*([1-9][0-9]*)\s*)?", text)
    if match is None:
        raise ValueError(f"{ENV_VAR}={text!r}: use WIDTHxHEIGHT or one number, e.g. 128x96 or 64")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def target_size() -> Tuple[int, int]:
    """``(width, height)`` from ``RESIZE_GRAY_SIZE``, or :data:`DEFAULT_SIZE` when it is unset."""
    text = os.environ.get(ENV_VAR, "")
    return parse_size(text) if text.strip() else DEFAULT_SIZE


target_size()  # fail on import, before any file is read, if the variable is malformed


def read(path: str) -> np.ndarray:
    """Decode the image at ``path`` into a ``(height, width)`` uint8 greyscale array."""
    size = target_size()
    with Image.open(path) as img:
        # For JPEG, decode straight to grey at the smallest scale (1/2, 1/4, 1/8) that is
        # still at least the target: several times faster than decoding the full image.
        img.draft("L", size)
        grey = img.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(grey)
