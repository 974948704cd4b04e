"""Runs many short data2h5 runs as separate processes, fast: ``python fuzz_runner.py JOBS.json``.

Starting Python and importing h5py and numpy costs about half a second a run, more than the run
itself on a small archive. This runner pays it once, then forks one process per run: the
command line as ``python -m data2h5 ARGS`` runs it (``runpy``, as ``-m`` does, ending through
the interpreter's normal exit), or a script reading every entry through ``H5Dataset``. Each
run is its own process group under a memory limit (``RLIMIT_AS``) and a timeout, with stdin
from /dev/null and stdout and stderr in files.

JOBS.json: ``{"preload": [modules], "parallel": 2, "timeout": 20, "memory": BYTES, "jobs":
[{"id": "...", "cwd": "...", "out": "prefix of the .out/.err files", "argv": [...]} or
{..., "h5dataset": PATH} or {..., "load": PATH, "loader": "H5Dataset" | "open" | "BatchReader",
"options": {keyword arguments}}]}``. Preload what the runs import, and no more: the command line
does not import torch, ``H5Dataset`` does, and a process holding torch takes half a second
to exit. Writes ``{"id": {"status": exit status (-N: killed by signal N), "timed_out": bool,
"seconds": float}}`` as JSON on stdout once every run has ended.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import runpy
import signal
import sys
import time
import traceback
from typing import Dict, NoReturn


def read_everything(path: str) -> NoReturn:
    """What a training script does: every entry of an archive through H5Dataset; an error of
    data2h5's is one line and status 1, anything else a traceback. Ends at once (no exit of
    the interpreter holding torch)."""
    load_everything(path, "H5Dataset", {})


LOADERS = ("H5Dataset", "open", "BatchReader")


def load_everything(path: str, loader: str, options: dict) -> NoReturn:
    """Every entry of an archive through one loader (see :data:`LOADERS`) with ``options``,
    decoded where the loader decodes; ends as :func:`read_everything` does."""
    import numpy as np

    import data2h5
    from data2h5.errors import Data2H5Error

    status = 0
    try:
        if loader == "H5Dataset":
            ds = data2h5.H5Dataset(path, **options)
            for i in range(len(ds)):
                ds[i]
        elif loader == "open":
            with data2h5.open(path, **options) as view:
                for key in view:
                    view[key]
        elif loader == "BatchReader":
            from data2h5.loaders import BatchReader

            with BatchReader(path, **{"batch_size": 4, **options}) as reader:
                for batch in reader:
                    np.asarray(batch[0]).sum()
        else:
            raise SystemExit(f"unknown loader {loader!r}")
    except Data2H5Error as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_job(job: dict, memory: int) -> NoReturn:
    """In the forked child: become the run. Exceptions and SystemExit end this process as
    they end ``python`` (a traceback and status 1, or the exit status)."""
    os.setpgid(0, 0)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, suffix in ((1, ".out"), (2, ".err")):
        os.dup2(os.open(job["out"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(job["cwd"])
    if "h5dataset" in job:
        read_everything(job["h5dataset"])
    if "load" in job:
        load_everything(job["load"], job["loader"], job.get("options", {}))
    else:
        sys.argv = ["python -m data2h5", *job["argv"]]
        runpy.run_module("data2h5", run_name="__main__", alter_sys=True)
    sys.exit(0)


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    for module in spec.get("preload", []):
        importlib.import_module(module)
    gc.freeze()  # the runs' collections leave the preloaded modules' pages shared, not copied
    jobs, results = list(reversed(spec["jobs"])), {}
    running: Dict[int, tuple] = {}
    while jobs or running:
        while jobs and len(running) < spec["parallel"]:
            job = jobs.pop()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                run_job(job, spec["memory"])  # raises SystemExit (or anything) up through main: the run's end
            try:
                os.setpgid(pid, pid)  # here too, so that a timeout finds the group however soon it comes
            except OSError:  # the child got there first, or is already gone
                pass
            running[pid] = (job["id"], time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        now = time.monotonic()
        if pid:
            ident, started = running.pop(pid)
            results[ident] = {"status": os.waitstatus_to_exitcode(status), "timed_out": False,
                              "seconds": round(now - started, 3)}
            continue
        for pid, (ident, started) in list(running.items()):
            if now - started > spec["timeout"]:
                try:
                    os.killpg(pid, signal.SIGKILL)  # the run and any process of its own (the watchdog's child)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                del running[pid]
                results[ident] = {"status": None, "timed_out": True, "seconds": round(now - started, 3)}
        time.sleep(0.002)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
