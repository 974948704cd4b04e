"""Reader plugins for the sharded-conversion tests, importable by pool and Dask workers (this
folder is on their path). Both return a file's bytes as read.

``held_read``: with ``DATA2H5_TEST_HOLD`` naming a folder, a file called ``hold.bin`` marks
``started-PID`` there and waits while ``hold`` exists there: a test kills that worker then,
mid-shard, without timing. ``flaky_read``: fails on ``fail.bin`` while the file that
``DATA2H5_TEST_FAIL`` names exists, as a crash would stop a run.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

HANG_GUARD_SECONDS = 120


def held_read(path: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read()
    hold = os.environ.get("DATA2H5_TEST_HOLD")
    if hold and os.path.basename(path) == "hold.bin":
        (Path(hold) / f"started-{os.getpid()}").touch()
        deadline = time.monotonic() + HANG_GUARD_SECONDS
        while (Path(hold) / "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return data


def flaky_read(path: str) -> bytes:
    marker = os.environ.get("DATA2H5_TEST_FAIL")
    if marker and os.path.basename(path) == "fail.bin" and os.path.exists(marker):
        raise OSError("the disk went away")
    with open(path, "rb") as fh:
        return fh.read()
