"""A small command line guarded like data2h5's, for the watchdog's tests: ``python
watchdog_program.py NAME HOW`` prints ``started``, does HOW, prints ``done``.

HOW is what the guarded run does for a while (``DURATION`` seconds, default 3):

- ``hold-gil``: one C call that holds the interpreter (libc ``sleep`` through ``ctypes.PyDLL``,
  which keeps the GIL), as h5py does through a libhdf5 call that loops;
- ``release-gil``: one C call that releases it (``time.sleep``), as h5py does through ``H5Dread``;
- ``compute``: Python code running the whole time;
- ``exit-N``: exit with status N at once; ``raise``: an uncaught exception.
"""
from __future__ import annotations

import ctypes
import os
import sys
import time

import click

from data2h5.watchdog import guarded

DURATION = float(os.environ.get("DURATION", "3"))


@click.command()
@click.argument("archive")
@click.argument("how")
@guarded()
def main(archive: str, how: str) -> None:
    click.echo("started")
    sys.stdout.flush()
    if how == "hold-gil":
        ctypes.PyDLL(None).sleep(int(DURATION))
    elif how == "release-gil":
        time.sleep(DURATION)
    elif how == "compute":
        end = time.monotonic() + DURATION
        while time.monotonic() < end:
            pass
    elif how.startswith("exit-"):
        sys.exit(int(how[5:]))
    elif how == "raise":
        raise RuntimeError("raised on purpose")
    click.echo("done")


if __name__ == "__main__":
    main()
