"""Generated test images: photo-like arrays and folders of image files, made per test."""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np


def photo_like(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A smooth image with some noise: compresses like a photo, not like flat colour."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(np.sin(x / (7 + c * 3)) + np.cos(y / (5 + c * 2))) * 60 + 128 for c in range(max(channels, 1))],
        axis=-1,
    )
    img = base + rng.normal(0, 12, base.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img[..., 0] if channels == 0 else img


def write_images(root: Path, names: list[str], *, ext: str = ".png", size: int = 16, seed: int = 0) -> dict[str, Path]:
    """Write one image per relative name under ``root``; returns {key: path}."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(names):
        path = root / f"{name}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = (3, 0, 4)[i % 3] if ext == ".png" else (3, 0)[i % 2]
        iio.imwrite(path, photo_like(rng, size + i % 5, size + 2 * (i % 3), channels))
        out[path.relative_to(root).as_posix()] = path
    return out
