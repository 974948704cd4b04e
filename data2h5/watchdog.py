"""A watchdog for commands that read an archive, so that libhdf5 looping forever on a damaged
header ends the run with one line instead of hanging it.

Why a second process: h5py holds Python's global interpreter lock (GIL) through every libhdf5
call but dataset reads (``H5Dread``). A header loop inside, say, an attribute read holds it
forever, so no Python thread, signal handler or timer of the looping process can run again.

How: :func:`guard` forks. The child runs the command exactly as it would have run (same
output, same file descriptors, same exit status), while a thread of it writes a heartbeat
down a pipe every :func:`heartbeat_seconds`. A heartbeat needs the GIL, so it stops when the
interpreter stops making progress, not when a run is merely long: a long computation or a long
``H5Dread`` (which releases the GIL) keep it beating. One libhdf5 call of another kind that
takes longer than the limit (metadata read from a stalled network file system) and the
interpreter's own exit (about 0.1 s for the command line) count as silence; the default
leaves them a minute. The parent waits for the child and exits with its status (or dies of the
same signal). When no heartbeat has come for :data:`ENV_SECONDS` seconds (default
:data:`DEFAULT_SECONDS`, ``0`` turns the watchdog off), it kills the child and prints one line
naming the archive, then exits with status 1.

Signals: the parent passes on SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to it alone (``kill``,
a batch system) and leaves those from the terminal (Ctrl-C, Ctrl-\\) to the child, which gets
them too, as part of the same process group. Time the whole job is stopped (Ctrl-Z) or the
child alone is stopped does not count as silence.

The watchdog guards the ``data2h5`` command line only: it engages where data2h5's own command
is the program (never in a caller's process, such as click's ``CliRunner``), on systems with
``fork``. Library calls (``read_index``, ``H5Dataset``, ``ArchiveReader``, ``BatchReader``)
are not guarded: a program reading untrusted archives with them should run them in a process
of its own, under a time limit.
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import select
import signal
import sys
import threading
import time
from typing import Any, Callable, NoReturn, Optional, TypeVar

import click

log = logging.getLogger(__name__)

ENV_SECONDS = "DATA2H5_WATCHDOG_SECONDS"
"""Environment variable: seconds without progress before a guarded command is stopped (``0``: never)."""

DEFAULT_SECONDS = 60.0

EXIT_ERROR = 1
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel sent: the terminal's Ctrl-C, Ctrl-\, hang-up
_TICK = 0.1  # seconds between the parent's looks at its signals and the child's state

_in_child = False  # this process is a guarded command's child: do not guard again

F = TypeVar("F", bound=Callable[..., Any])


def limit_seconds() -> float:
    """The watchdog's limit from :data:`ENV_SECONDS`; raises :class:`ValueError` naming the
    variable when it is not a number of seconds."""
    text = os.environ.get(ENV_SECONDS, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{ENV_SECONDS}={text!r} is not a number of seconds; "
                         f"unset it or give one such as {DEFAULT_SECONDS:g} (0 turns the watchdog off)")
    return seconds


def heartbeat_seconds(limit: float) -> float:
    """How often the child beats: often enough that a few missed beats are far from the limit."""
    return min(1.0, limit / 8)


def guarded(archive_param: str = "archive") -> Callable[[F], F]:
    """Decorate a click command's callback so that it runs under :func:`guard`, naming the
    archive held by its parameter ``archive_param``. Put it below the click decorators."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            guard(str(kwargs[archive_param]))
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def guard(archive: str, seconds: Optional[float] = None) -> None:
    """Run the rest of this command in a watched child process.

    Returns in the child, which goes on as the command. This process becomes the watchdog and
    never returns: it exits with the child's status, or with status 1 and one line naming
    ``archive`` when the child makes no progress for ``seconds`` (default: :func:`limit_seconds`).
    Returns at once, unguarded, where the watchdog does not apply (see the module's docstring).
    """
    if not _applies():
        return
    if seconds is None:
        try:
            seconds = limit_seconds()
        except ValueError as exc:
            _fail(str(exc))
    if not seconds:
        return
    interval = heartbeat_seconds(seconds)
    for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
        stream.flush()
    read_end, write_end = os.pipe()
    gc.freeze()  # the modules loaded so far stay shared with the child, not copied by its collections
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    try:
        pid = os.fork()
    except OSError as exc:  # no room for a second process: run unguarded rather than not at all
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        gc.unfreeze()
        os.close(read_end)
        os.close(write_end)
        log.warning("cannot start the HDF5 watchdog (%s); running without it", exc.strerror or exc)
        return
    if pid == 0:
        global _in_child
        _in_child = True
        os.close(read_end)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        threading.Thread(target=_beat, args=(write_end, interval), name="data2h5-heartbeat", daemon=True).start()
        return
    os.close(write_end)
    _watch(pid, read_end, archive, seconds, interval)


def _applies() -> bool:
    """Whether this process may fork a guarded child: data2h5's command line is the program
    (so the child only ever returns into it), in the main thread, and not already guarded."""
    if _in_child or not hasattr(os, "fork") or threading.current_thread() is not threading.main_thread():
        return False
    ctx = click.get_current_context(silent=True)
    program = getattr(sys.modules.get("__main__"), "main", None)
    return ctx is not None and program is not None and ctx.find_root().command is program


def _beat(fd: int, interval: float) -> None:
    """The child's heartbeat: one byte per ``interval``, for as long as the interpreter runs."""
    try:
        while True:
            os.write(fd, b".")
            time.sleep(interval)
    except OSError:  # the watchdog is gone: nothing left to tell
        pass


def _watch(pid: int, fd: int, archive: str, seconds: float, interval: float) -> NoReturn:
    """The parent's part: pass signals on, wait for the child, stop it when silent too long."""
    silent = 0.0
    before = time.monotonic()
    while True:
        readable, _, _ = select.select([fd], [], [], _TICK)
        now = time.monotonic()
        # a long gap between two looks is this process stopped (Ctrl-Z) or starved, not the child
        silent += min(now - before, 2 * _TICK)
        before = now
        if readable:
            if not os.read(fd, 4096):
                break  # the child is ending (or closed its end): collect its status
            silent = 0.0
        _pass_on_signals(pid)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _exit_as(status)
        if silent >= seconds:
            if _stopped(pid):
                silent = 0.0
                continue
            _stop(pid)
            _fail(f"{archive}: the file's HDF5 structure is damaged: the HDF5 library made no progress "
                  f"reading it for {seconds:g} s and was stopped; copy or convert it again "
                  f"(if it is only slow, set {ENV_SECONDS} higher)")
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _exit_as(status)
        _pass_on_signals(pid)
        time.sleep(pause)
        pause = min(2 * pause, _TICK)


def _pass_on_signals(pid: int) -> None:
    while True:
        info = signal.sigtimedwait(_FORWARDED, 0)
        if info is None:
            return
        if info.si_code != _SI_KERNEL:  # the terminal signals the whole job; a kill only us
            try:
                os.kill(pid, info.si_signo)
            except ProcessLookupError:
                pass


def _stopped(pid: int) -> bool:
    """Whether the child is stopped (SIGSTOP, a debugger); Linux only, elsewhere False."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


def _stop(pid: int) -> None:
    """Kill the child, which cannot run a handler while libhdf5 holds its interpreter."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _exit_as(status: int) -> NoReturn:
    """End this process as the child ended: with its exit code, or of the signal that killed it."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # a signal whose default is not to end the process
    os._exit(os.waitstatus_to_exitcode(status))


def _fail(message: str) -> NoReturn:
    if sys.stderr.isatty():  # end a progress bar the child left mid-line
        sys.stderr.write("\n")
    sys.stderr.write(f"data2h5: error: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_ERROR)
