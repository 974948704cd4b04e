"""Run independent tasks in parallel, on a local process pool or on a Dask distributed cluster.

A task is a plain picklable function with its arguments that returns a small result (e.g.
one shard written and its checksum). Every task runs in a worker process, never in the
caller's, and a task must not start processes itself: Dask workers are daemonic processes,
which cannot have children. Either engine returns the results in task order, calls
``on_done`` as each task finishes, and counts the files that running tasks report with
:func:`report_progress`, across all workers, in the caller's thread.

Dask re-runs the tasks of a worker it lost, so a task must be idempotent: it writes to a name
of its own (:func:`data2h5.shard_plan.attempt_path`), syncs, and renames into place.

``distributed`` is imported only when a Dask engine is made (``pip install 'data2h5[dask]'``).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ._version import __version__
from .display import one_line
from .errors import ClusterError, DaskMissingError, Data2H5Error, SharedFolderError, TaskError, WorkerError

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 0.5  # a running task sends its count at most this often
CONNECT_SECONDS = 30  # to reach a scheduler
WORKERS_SECONDS = 60  # for a cluster's first worker to join before the folder check
_POLL_SECONDS = 0.5


class Task(NamedTuple):
    """``func(*args, **kwargs)`` to run in a worker. ``name`` says which part of the work it is
    (e.g. ``"shard train-00003-of-00008.h5"``): errors name it."""

    name: str
    func: Callable[..., Any]
    args: tuple = ()
    kwargs: Mapping[str, Any] = MappingProxyType({})


class Folders(NamedTuple):
    """The folders every worker must see: tasks read ``source`` and write in ``output``."""

    source: str
    output: str


ProgressCallback = Callable[[int], None]  # files done since the last call
DoneCallback = Callable[[int, Any], None]  # (task index, its result), as each task finishes


# --- in the worker -----------------------------------------------------------------------

class _Outcome(NamedTuple):
    result: Any
    files: int  # what the task reported in all


class _Reporter:
    """The running task's count, sent to the caller at most every ``PROGRESS_SECONDS``."""

    def __init__(self, index: int, send: Callable[[list], None], where: str):
        self.index, self.send, self.where = index, send, where
        self.count, self.sent, self.sent_at = 0, -1, 0.0

    def add(self, files: int) -> None:
        self.count += files
        if time.monotonic() - self.sent_at >= PROGRESS_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.count != self.sent:
            self.send([self.index, self.count, self.where])
            self.sent, self.sent_at = self.count, time.monotonic()


_running = threading.local()  # the reporter of the task this thread runs
_local_queue: Optional[Any] = None  # a local pool worker's channel to the caller


def report_progress(files: int = 1) -> None:
    """Count ``files`` more files done by the task running in this thread; the caller's
    ``on_progress`` sees them soon. Does nothing outside an engine's task."""
    reporter = getattr(_running, "reporter", None)
    if reporter is not None:
        reporter.add(files)


def _run_task(index: int, channel: Optional[str], folders: Optional[Folders], func: Callable[..., Any],
              args: tuple, kwargs: Mapping[str, Any]) -> _Outcome:
    """What a worker runs: check the folders, then the task with a progress reporter set."""
    if channel is None:  # a local pool worker
        send, where = _local_queue.put, f"pid {os.getpid()}"
    else:
        from distributed import get_worker

        worker = get_worker()
        where = worker.address
        if folders is not None:  # a worker that joined after the check
            problem = _folder_problem(folders)
            if problem is not None:
                raise SharedFolderError(where, *problem)

        def send(message: list) -> None:
            worker.log_event(channel, message)

    reporter = _Reporter(index, send, where)
    reporter.flush()  # says where the task runs
    _running.reporter = reporter
    try:
        result = func(*args, **dict(kwargs))
    finally:
        _running.reporter = None
    reporter.flush()
    return _Outcome(result, reporter.count)


def _init_local_worker(channel: Any) -> None:
    global _local_queue
    _local_queue = channel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    exit_with_parent()


def exit_with_parent() -> None:
    """Linux: have the kernel end this pool worker when its parent dies however it dies (a
    forked worker holds the task pipe's write end too, so it would never read EOF and would
    wait as an orphan). The parent is the caller, or under forkserver the fork server, which
    ends with the caller."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent_pid = os.getppid()
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    caller = multiprocessing.parent_process()
    if os.getppid() != parent_pid or (caller is not None and not caller.is_alive()):  # died before prctl took effect
        os._exit(1)


def _folder_problem(folders: Folders, probe: Optional[str] = None) -> Optional[Tuple[str, str, str]]:
    """(label, folder, reason) for the first folder this process cannot use as the tasks
    will, or None. ``probe``: a file the caller wrote in the output folder, which proves that
    this is the same folder and not one of the same name."""
    for label, folder, mode in (("source folder", folders.source, os.R_OK | os.X_OK),
                                ("output folder", folders.output, os.W_OK | os.X_OK)):
        if not os.path.exists(folder):
            return label, folder, "it does not exist"
        if not os.path.isdir(folder):
            return label, folder, "it is not a folder"
        if not os.access(folder, mode):
            return label, folder, "it cannot be " + ("read" if mode & os.R_OK else "written")
    if probe is not None and not os.path.exists(os.path.join(folders.output, probe)):
        return "output folder", folders.output, "it is another folder of the same name"
    return None


def _check_worker(folders: Folders, probe: str, version: str) -> Optional[list]:
    """Run on each Dask worker before the tasks: None, or what is wrong there."""
    if version != __version__:
        return ["version", f"it has data2h5 {__version__}, the client {version}"]
    problem = _folder_problem(folders, probe)
    return None if problem is None else ["folder", *problem]


# --- in the caller ------------------------------------------------------------------------

class _Progress:
    """Files done across tasks. A task's count is the most any attempt of it reported until
    it finishes, then what the finished attempt reported: a re-run counts nothing twice."""

    def __init__(self, count: int, on_progress: Optional[ProgressCallback]):
        self.on_progress = on_progress
        self.files = [0] * count
        self.where: Dict[int, str] = {}  # running tasks: where they run
        self.sealed = [False] * count

    def report(self, message: Sequence) -> None:
        index, files, where = int(message[0]), int(message[1]), str(message[2])
        if not 0 <= index < len(self.files) or self.sealed[index]:
            return
        self.where[index] = where
        self._set(index, max(self.files[index], files))

    def seal(self, index: int, files: int) -> None:
        self._set(index, files)
        self.sealed[index] = True
        self.where.pop(index, None)

    def _set(self, index: int, files: int) -> None:
        delta = files - self.files[index]
        self.files[index] = files
        if delta > 0 and self.on_progress is not None:
            self.on_progress(delta)


def _forward(exc: BaseException, task: Task) -> BaseException:
    """The error to raise for ``task``'s failure: its own if it is a data2h5 error (with the
    task named), else a :class:`TaskError`."""
    if isinstance(exc, Data2H5Error):
        return exc.add_context(f"in {task.name}")
    return TaskError(task.name, f"{type(exc).__name__}: {one_line(exc)}")


class Engine:
    """Runs tasks in worker processes; use as a context manager, or call :meth:`close`."""

    description = "engine"

    def check_folders(self, source: str, output: str) -> None:
        """Raise :class:`SharedFolderError`, naming the folder and the worker, if a worker
        cannot read ``source`` or write in ``output``."""
        raise NotImplementedError

    def run(self, tasks: Sequence[Task], *, on_progress: Optional[ProgressCallback] = None,
            on_done: Optional[DoneCallback] = None) -> List[Any]:
        """Run ``tasks``; return their results in task order. The first failure stops the
        run and is raised (see :func:`_forward`); tasks not yet started do not start. After
        :meth:`check_folders`, each task checks the folders again where it runs (a worker may
        join a cluster later)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine started (processes, a cluster, a connection)."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _collect(self, tasks: Sequence[Task], events: "queue.Queue", result_of: Callable[[int], _Outcome],
                 on_progress: Optional[ProgressCallback], on_done: Optional[DoneCallback],
                 failed: Callable[[int, BaseException, _Progress], BaseException]) -> List[Any]:
        """Turn ``("progress", message)`` and ``("done", index)`` events into callbacks, in
        this thread, until every task is done."""
        progress = _Progress(len(tasks), on_progress)
        results: List[Any] = [None] * len(tasks)
        remaining = len(tasks)
        while remaining:
            try:
                kind, payload = events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if kind == "progress":
                progress.report(payload)
                continue
            index = payload
            try:
                outcome = result_of(index)
            except BaseException as exc:  # noqa: B902 - forwarded as a data2h5 error
                raise failed(index, exc, progress) from exc
            results[index] = outcome.result
            progress.seal(index, outcome.files)
            remaining -= 1
            if on_done is not None:
                on_done(index, outcome.result)
        return results


class LocalPool(Engine):
    """``workers`` processes on this machine, each running one task at a time."""

    def __init__(self, workers: int, start_method: Optional[str] = None):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.workers, self.start_method = workers, start_method
        self.description = f"{workers} local worker process" + ("es" if workers > 1 else "")

    def check_folders(self, source: str, output: str) -> None:
        problem = _folder_problem(Folders(os.path.abspath(source), os.path.abspath(output)))
        if problem is not None:
            raise SharedFolderError("", *problem)

    def run(self, tasks: Sequence[Task], *, on_progress: Optional[ProgressCallback] = None,
            on_done: Optional[DoneCallback] = None) -> List[Any]:
        if not tasks:
            return []
        ctx = multiprocessing.get_context(self.start_method)
        channel = ctx.Queue()
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        relay = threading.Thread(target=_relay, args=(channel, events, stop), name="data2h5-progress", daemon=True)
        others = set(multiprocessing.active_children())  # children not the pool's: never stopped here
        pool = ProcessPoolExecutor(min(self.workers, len(tasks)), mp_context=ctx, initializer=_init_local_worker,
                                   initargs=(channel,))
        finished = False
        try:
            futures = [pool.submit(_run_task, i, None, None, t.func, t.args, dict(t.kwargs))
                       for i, t in enumerate(tasks)]
            relay.start()  # after the pool forked its workers (under fork, it forks them all at once)
            for i, future in enumerate(futures):
                future.add_done_callback(lambda _f, i=i: events.put(("done", i)))

            def failed(index: int, exc: BaseException, progress: _Progress) -> BaseException:
                if isinstance(exc, BrokenProcessPool):
                    running = [f"{tasks[i].name} ({where})" for i, where in sorted(progress.where.items())]
                    return WorkerError("a worker process died (out of memory, or a crash in a decoder) while running "
                                       + (", ".join(running) or tasks[index].name))
                return _forward(exc, tasks[index])

            results = self._collect(tasks, events, lambda i: futures[i].result(), on_progress, on_done, failed)
            finished = True
            return results
        finally:
            if not finished:  # stop now: do not let workers finish the queue
                stop_processes([p for p in multiprocessing.active_children() if p not in others])
            pool.shutdown(wait=True, cancel_futures=True)
            stop.set()
            if relay.is_alive():
                relay.join()
            channel.close()
            channel.cancel_join_thread()


def _relay(channel: Any, events: "queue.Queue", stop: threading.Event) -> None:
    """Move the workers' progress messages to the caller's event queue. Messages are a few
    bytes, written by one ``write`` each, so a worker killed mid-message leaves none half-read."""
    while not stop.is_set():
        try:
            events.put(("progress", channel.get(timeout=0.1)))
        except queue.Empty:
            continue
        except (EOFError, OSError):
            return


def stop_processes(procs: List[multiprocessing.Process]) -> None:
    """End a pool's workers now. A worker stopped while it held the result queue's lock
    leaves its siblings blocked on it, so whoever does not end on SIGTERM is killed, and all
    are joined here: the pool's shutdown then has no one left to wait for."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _import_distributed(what: str):
    try:
        import distributed
    except ImportError:
        raise DaskMissingError(what) from None
    return distributed


class DaskEngine(Engine):
    """The workers of a Dask distributed cluster, through ``client``.

    Made with :meth:`connect` (a scheduler address) or :meth:`local` (a local cluster it
    starts), the engine closes what it made; a client passed in is left open.
    """

    def __init__(self, client: Any, *, owned: Sequence[Any] = ()):
        self.client = client
        self._owned = list(owned)  # closed in this order
        self._folders: Optional[Folders] = None
        self.description = f"the Dask cluster at {self.address}"

    @property
    def address(self) -> str:
        return str(getattr(self.client.scheduler, "address", None) or "?")

    @classmethod
    def connect(cls, address: str, timeout: float = CONNECT_SECONDS) -> "DaskEngine":
        """Use the cluster whose scheduler listens at ``address`` (``tcp://HOST:8786``)."""
        distributed = _import_distributed(f"--scheduler {address}")
        try:
            client = distributed.Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {one_line(exc)}; start it with "
                               "'dask scheduler' and check the address") from exc
        return cls(client, owned=[client])

    @classmethod
    def local(cls, n_workers: int, **cluster_options: Any) -> "DaskEngine":
        """Start a ``LocalCluster`` of ``n_workers`` processes of one thread each (no
        dashboard unless ``cluster_options`` asks for one); it is closed with the engine."""
        distributed = _import_distributed(f"--dask-workers {n_workers}")
        if n_workers < 1:
            raise ValueError(f"n_workers must be at least 1, not {n_workers}")
        options: Dict[str, Any] = dict(n_workers=n_workers, threads_per_worker=1, processes=True)
        if "dashboard_address" not in cluster_options and "scheduler_kwargs" not in cluster_options:
            # no dashboard, and the scheduler's HTTP endpoints on a free loopback port, not on :8787
            options.update(dashboard_address=None,
                           scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
        options.update(cluster_options)
        cluster = distributed.LocalCluster(**options)
        try:
            client = distributed.Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        return cls(client, owned=[client, cluster])

    def close(self) -> None:
        owned, self._owned = self._owned, []
        for thing in owned:
            thing.close()

    def check_folders(self, source: str, output: str, timeout: float = WORKERS_SECONDS) -> None:
        folders = Folders(os.path.abspath(source), os.path.abspath(output))
        problem = _folder_problem(folders)
        if problem is not None:  # here first: a worker could not do better
            raise SharedFolderError("", *problem)
        import asyncio  # its TimeoutError is not the builtin one before Python 3.11

        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise ClusterError(f"no worker joined the Dask scheduler at {self.address} in {timeout:.0f} s") from exc
        probe = Path(folders.output) / f".data2h5-probe-{uuid.uuid4().hex}"
        try:
            probe.touch()
        except OSError as exc:
            raise SharedFolderError("", "output folder", folders.output, one_line(exc)) from exc
        try:
            answers = self.client.run(_check_worker, folders, probe.name, __version__, on_error="return")
        finally:
            probe.unlink()
        for worker in sorted(answers):
            answer = answers[worker]
            if isinstance(answer, BaseException):
                raise ClusterError(f"worker {worker} cannot run data2h5 tasks ({one_line(answer)}); install data2h5 "
                                   f"{__version__} and the plugins used on every worker")
            if answer and answer[0] == "version":
                raise ClusterError(f"worker {worker}: {answer[1]}; install the same data2h5 on every worker")
            if answer:
                raise SharedFolderError(worker, *answer[1:])
        threaded = sorted(w for w, n in self.client.nthreads().items() if n > 1)
        if threaded:
            log.warning("%d Dask workers (e.g. %s) run several threads: their tasks share one process and one core "
                        "for decoding; start workers with --nthreads 1", len(threaded), threaded[0])
        self._folders = folders

    def run(self, tasks: Sequence[Task], *, on_progress: Optional[ProgressCallback] = None,
            on_done: Optional[DoneCallback] = None) -> List[Any]:
        if not tasks:
            return []
        distributed = _import_distributed("running on a Dask cluster")
        client = self.client
        run_id = uuid.uuid4().hex[:8]
        topic = f"data2h5-progress-{run_id}"
        events: queue.Queue = queue.Queue()
        client.subscribe_topic(topic, lambda event: events.put(("progress", event[1])))
        futures: list = []
        finished = False
        try:
            for i, t in enumerate(tasks):
                future = client.submit(_run_task, i, topic, self._folders, t.func, t.args, dict(t.kwargs),
                                       key=f"data2h5-{run_id}-{i:06d}", pure=False, retries=0)
                future.add_done_callback(lambda _f, i=i: events.put(("done", i)))
                futures.append(future)

            def result_of(index: int) -> _Outcome:
                outcome = futures[index].result()
                futures[index].release()  # no need to recompute it if its worker is lost now
                return outcome

            def failed(index: int, exc: BaseException, progress: _Progress) -> BaseException:
                name = tasks[index].name
                if isinstance(exc, distributed.KilledWorker):
                    last = getattr(getattr(exc, "last_worker", None), "address", "?")
                    return WorkerError(f"{name}: every worker that ran it died, the last {last} (out of memory, or "
                                       "a crash in a decoder?); see that worker's log")
                if isinstance(exc, CancelledError) or type(exc).__name__ == "CancelledError":
                    return ClusterError(f"{name} was cancelled: the Dask scheduler at {self.address} or the "
                                        "connection to it was lost")
                return _forward(exc, tasks[index])

            results = self._collect(tasks, events, result_of, on_progress, on_done, failed)
            finished = True
            return results
        finally:
            if not finished and futures:
                client.cancel(futures)  # tasks not started do not start; running ones finish on their own
            try:
                client.unsubscribe_topic(topic)
            except Exception:  # noqa: BLE001 - the connection may be gone already
                log.debug("could not unsubscribe from %s", topic, exc_info=True)


def open_engine(*, workers: int = 1, scheduler: Optional[str] = None, client: Any = None,
                dask_workers: Optional[int] = None, start_method: Optional[str] = None) -> Engine:
    """The engine the options ask for: an existing Dask ``client``, the cluster at
    ``scheduler``, a local Dask cluster of ``dask_workers`` processes, or else a local pool
    of ``workers`` processes. At most one of the three Dask options may be given."""
    given = [name for name, value in (("scheduler", scheduler), ("client", client), ("dask_workers", dask_workers))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"pass one of scheduler, client and dask_workers, not {' and '.join(given)}")
    if client is not None:
        _import_distributed("client=")
        return DaskEngine(client)
    if scheduler is not None:
        return DaskEngine.connect(scheduler)
    if dask_workers is not None:
        return DaskEngine.local(dask_workers)
    return LocalPool(workers, start_method)
