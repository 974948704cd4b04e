"""Shared slots between workers and the writer: what a killed writer leaves is cleaned up."""
from __future__ import annotations

import os
import subprocess
import sys

from data2h5.transport import PREFIX, Slots, remove_stale


def test_slot_folders_of_dead_writers_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{PREFIX}{int(gone.stdout)}-abc"
    alive = tmp_path / f"{PREFIX}{os.getpid()}-def"
    other = tmp_path / "data2h5-notes"
    for folder in (dead, alive, other):
        folder.mkdir()
        (folder / "slot0").write_bytes(b"x")
    remove_stale(str(tmp_path))
    assert not dead.exists()
    assert alive.exists() and other.exists()


def test_slots_are_named_by_writer_and_removed_on_close():
    slots = Slots(2, 4096)
    assert os.path.basename(slots.dir).startswith(f"{PREFIX}{os.getpid()}-")
    assert len(slots.paths) == 2 and all(os.path.getsize(p) == 4096 for p in slots.paths)
    slots.close()
    assert not os.path.exists(slots.dir)


def test_writeback_starts_on_each_new_step_of_the_file(tmp_path):
    from data2h5.partial import Writeback

    path = tmp_path / "grow.bin"
    path.write_bytes(b"")
    wb = Writeback(str(path))
    wb.STEP = 1 << 16
    with open(path, "ab") as fh:
        fh.write(b"x" * 1000)
        fh.flush()
        wb.poll(1000)
        assert wb._done == 0  # less than a step: nothing started
        fh.write(b"y" * (1 << 16))
        fh.flush()
        wb.poll(1 << 16)
    assert wb._done == path.stat().st_size or wb._fd is None  # not Linux: it does nothing
    wb.close()
    assert path.read_bytes()[:3] == b"xxx"
