"""Shared fixtures: real image trees generated per test, never committed."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from images import photo_like, write_images  # noqa: F401 - test modules import them from here too

# A shell running the suite in the background ignores SIGINT in it, and every process it starts
# inherits that: the Ctrl-C tests would then see conversions that cannot be interrupted.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def image_tree(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A nested folder of PNG images (RGB, grey, RGBA) with files of other types around them."""
    root = tmp_path / "src"
    names = ["a/img_000", "a/b/img_001", "a/b/c/img_002", "cat/img_003", "dog/img_004", "dog/img_005"]
    files = write_images(root, names)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "dog" / "labels.json").write_text("{}")
    return root, files


@pytest.fixture
def cpu_count() -> int:
    return os.cpu_count() or 1
