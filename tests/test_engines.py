"""Engines under real workers: a local process pool, a distributed.LocalCluster, and a
``dask scheduler`` with two ``dask worker`` processes started here, one of them killed while
it runs a task. Tasks wait on files, never on time, so the kill lands mid-task on a busy
machine too.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

from data2h5.engines import (
    ClusterError,
    DaskEngine,
    LocalPool,
    SharedFolderError,
    Task,
    TaskError,
    open_engine,
    report_progress,
)
from data2h5.errors import ReadError, WorkerError
from data2h5.shard_plan import attempt_files, attempt_path

pytestmark = pytest.mark.timeout(240)

HERE = Path(__file__).resolve().parent
FILES_PER_TASK = 7
WAIT_SECONDS = 120  # for a marker file: only a hang guard, never a timing assertion


class ToyResult(NamedTuple):
    index: int
    name: str
    nbytes: int
    sha256: str


def toy_task(index: int, out_dir: str, hold_dir: Optional[str] = None, after: Optional[str] = None,
             fail: Optional[str] = None) -> ToyResult:
    """Write a file of ``index``'s deterministic bytes idempotently (attempt name, fsync,
    rename) and report FILES_PER_TASK files. With ``hold_dir``, the task marks that it has
    started (naming its pid) and waits, half written, while ``hold-INDEX`` exists there.
    With ``after`` (a folder), it returns only once the caller has marked a task done there."""
    if fail == "read":
        raise ReadError(f"src/{index}.png", "cannot decode")
    if fail == "bug":
        raise ValueError(f"bad value in task {index}")
    data = b"".join(hashlib.sha256(f"{index}-{j}".encode()).digest() for j in range(200 + 50 * index))
    final = Path(out_dir) / f"toy-{index}.bin"
    part = attempt_path(final)
    with open(part, "wb") as f:
        for j in range(FILES_PER_TASK):
            f.write(data[j * len(data) // FILES_PER_TASK:(j + 1) * len(data) // FILES_PER_TASK])
            report_progress(1)
            if j == FILES_PER_TASK // 2 and hold_dir is not None:
                f.flush()
                (Path(hold_dir) / f"started-{index}-{os.getpid()}").touch()
                wait_while(Path(hold_dir) / f"hold-{index}")
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, final)
    if after is not None:
        wait_for(lambda: list(Path(after).glob("done-*")), f"the caller to see a task done, in {after}")
    return ToyResult(index, final.name, len(data), hashlib.sha256(final.read_bytes()).hexdigest())


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def wait_while(path: Path) -> None:
    wait_for(lambda: not path.exists(), f"{path} to go")


def toy_tasks(n: int, out: Path, options: Optional[dict] = None) -> List[Task]:
    """n toy tasks writing in ``out``; ``options[i]``: task i's keyword arguments."""
    return [Task(f"shard toy-{i}", toy_task, (i, str(out)), (options or {}).get(i, {})) for i in range(n)]


def expected(n: int, tmp_path: Path) -> List[ToyResult]:
    """The uninterrupted run's results: the tasks called one by one, here."""
    out = tmp_path / "expected"
    out.mkdir()
    return [toy_task(i, str(out)) for i in range(n)]


class Recorder:
    """What the callbacks saw; ``signals``: a folder where each task's end is marked."""

    def __init__(self, signals: Optional[Path] = None):
        self.signals = signals
        self.files = 0
        self.done: List[int] = []
        self.threads = set()

    def progress(self, files: int) -> None:
        assert files > 0
        self.files += files
        self.threads.add(threading.get_ident())

    def finished(self, index: int, result) -> None:
        assert result.index == index
        self.done.append(index)
        self.threads.add(threading.get_ident())
        if self.signals is not None:
            (self.signals / f"done-{index}").touch()


def check_run(engine, tmp_path: Path, n: int = 4) -> Recorder:
    """Run n toy tasks where task 0 finishes only after the caller saw another one finish:
    results come back in task order though they finish out of it, and progress counts every
    file once."""
    out, signals = tmp_path / "out", tmp_path / "signals"
    out.mkdir()
    signals.mkdir()
    tasks = toy_tasks(n, out, {0: {"after": str(signals)}})
    seen = Recorder(signals)
    results = engine.run(tasks, on_progress=seen.progress, on_done=seen.finished)
    assert results == expected(n, tmp_path)
    assert seen.files == n * FILES_PER_TASK
    assert sorted(seen.done) == list(range(n)) and seen.done[0] != 0
    assert seen.threads == {threading.get_ident()}  # callbacks come in the caller's thread
    assert sorted(p.name for p in out.iterdir()) == [f"toy-{i}.bin" for i in range(n)]  # no attempt files left
    return seen


# --- local pool ----------------------------------------------------------------------------

@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_local_pool_runs_tasks_in_worker_processes(tmp_path, start_method):
    with open_engine(workers=2, start_method=start_method) as engine:
        assert isinstance(engine, LocalPool)
        check_run(engine, tmp_path)


def test_local_pool_forwards_errors_naming_the_task(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with LocalPool(2) as engine:
        with pytest.raises(ReadError) as caught:
            engine.run([Task("shard a", toy_task, (0, str(out))), Task("shard b", toy_task, (1, str(out), None, None,
                                                                                             "read"))])
        assert str(caught.value) == "src/1.png: cannot decode (in shard b)" and caught.value.path == "src/1.png"
        with pytest.raises(TaskError, match=r"^shard c failed: ValueError: bad value in task 2$"):
            engine.run([Task("shard c", toy_task, (2, str(out)), {"fail": "bug"})])


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_local_worker_is_a_worker_error_naming_the_task():
    with LocalPool(1) as engine:
        with pytest.raises(WorkerError, match=r"^a worker process died .* while running shard z"):
            engine.run([Task("shard z", die)])


def test_local_pool_checks_folders_here(tmp_path):
    with pytest.raises(SharedFolderError, match=r"^cannot use the source folder .*missing: it does not exist$"):
        LocalPool(1).check_folders(str(tmp_path / "missing"), str(tmp_path))


# --- distributed.LocalCluster --------------------------------------------------------------

@pytest.fixture(scope="module")
def local_cluster():
    pytest.importorskip("distributed")
    with open_engine(dask_workers=2) as engine:
        assert isinstance(engine, DaskEngine)
        yield engine
    assert engine.client.status == "closed"


def test_local_cluster_runs_tasks_with_progress_from_every_worker(local_cluster, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    local_cluster.check_folders(str(src), str(tmp_path))
    check_run(local_cluster, tmp_path)
    assert not list(tmp_path.glob(".data2h5-probe-*"))


def test_local_cluster_forwards_errors_naming_the_task(local_cluster, tmp_path):
    with pytest.raises(ReadError, match=r"^src/3.png: cannot decode \(in shard d\)$"):
        local_cluster.run([Task("shard d", toy_task, (3, str(tmp_path)), {"fail": "read"})])
    with pytest.raises(TaskError, match=r"^shard e failed: ValueError: bad value in task 4$"):
        local_cluster.run([Task("shard e", toy_task, (4, str(tmp_path)), {"fail": "bug"})])


def test_a_folder_a_worker_cannot_see_is_named_with_the_worker(local_cluster, tmp_path, monkeypatch):
    """/proc/self/cwd/NAME is a different folder in each process: worker A's view of the
    paths differs from the caller's, as on a machine that does not mount the same tree."""
    client = local_cluster.client
    a, b = sorted(client.nthreads())
    here, there = tmp_path / "client", tmp_path / "elsewhere"
    for folder in (here / "src", here / "out", there / "out"):
        folder.mkdir(parents=True)
    monkeypatch.chdir(here)
    before = client.run(os.getcwd)
    client.run(os.chdir, str(there), workers=[a])
    client.run(os.chdir, str(here), workers=[b])
    try:
        with pytest.raises(SharedFolderError) as caught:
            local_cluster.check_folders("/proc/self/cwd/src", "/proc/self/cwd/out")
        error = caught.value
        assert (error.worker, error.label, error.folder) == (a, "source folder", "/proc/self/cwd/src")
        assert str(error) == (f"worker {a} cannot see the source folder /proc/self/cwd/src: it does not exist there; "
                              "sources and output must be on a file system every worker mounts at the same path")
        (there / "src").mkdir()
        with pytest.raises(SharedFolderError, match=rf"^worker {a} cannot see the output folder /proc/self/cwd/out: "
                                                    "it is another folder of the same name there;"):
            local_cluster.check_folders("/proc/self/cwd/src", "/proc/self/cwd/out")
        assert not list(here.glob("out/.*")) and not list(there.glob("out/.*"))  # the probe is gone
        client.run(os.chdir, str(here), workers=[a])
        local_cluster.check_folders("/proc/self/cwd/src", "/proc/self/cwd/out")
    finally:
        for worker, cwd in before.items():
            client.run(os.chdir, cwd, workers=[worker])


def test_folders_the_caller_cannot_use_are_named_without_asking_workers(local_cluster, tmp_path):
    (tmp_path / "file").touch()
    with pytest.raises(SharedFolderError, match=r"^cannot use the output folder .*file: it is not a folder$"):
        local_cluster.check_folders(str(tmp_path), str(tmp_path / "file"))
    with pytest.raises(SharedFolderError, match=r"^cannot use the source folder .*gone: it does not exist$"):
        local_cluster.check_folders(str(tmp_path / "gone"), str(tmp_path))


def test_a_task_whose_workers_all_die_is_a_worker_error_naming_it():
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        engine = DaskEngine.local(1)
    with engine:
        with pytest.raises(WorkerError, match=r"^shard y: every worker that ran it died, the last tcp://"):
            engine.run([Task("shard y", die)])


# --- dask scheduler and dask worker processes -------------------------------------------

class Processes:
    """Processes this test module started, each in a session of its own, stopped by pid."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, cwd=self.logs)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, while the scheduler can still see them go
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever is left of its session: the worker process a nanny started
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def dask_cli(tmp_path_factory):
    """(scheduler address, worker folder) of a scheduler and two one-thread workers."""
    pytest.importorskip("distributed")
    root = tmp_path_factory.mktemp("dask-cli")
    procs = Processes(root)
    try:
        scheduler_file = root / "scheduler.json"
        procs.start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                    "--scheduler-file", str(scheduler_file))
        address = wait_for(lambda: _read_address(scheduler_file), "the scheduler file")
        for i in range(2):
            procs.start(f"worker{i}", "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1",
                        "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1", "--local-directory",
                        str(root / f"worker{i}"), "--death-timeout", "60")
        yield address
    finally:
        procs.stop()


def _read_address(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def test_scheduler_address_runs_tasks_on_its_workers(dask_cli, tmp_path):
    with open_engine(scheduler=dask_cli) as engine:
        engine.client.wait_for_workers(2, timeout=WAIT_SECONDS)
        engine.check_folders(str(HERE), str(tmp_path))
        check_run(engine, tmp_path)
        seen = engine.client.run(os.getpid)
    assert len(seen) == 2 and engine.client.status == "closed"


def test_a_worker_killed_mid_task_is_replaced_and_the_run_equals_an_uninterrupted_one(dask_cli, tmp_path):
    n = 5
    out, hold = tmp_path / "out", tmp_path / "hold"
    out.mkdir()
    hold.mkdir()
    (hold / "hold-0").touch()
    tasks = toy_tasks(n, out, {0: {"hold_dir": str(hold)}})
    seen = Recorder()
    box = {}
    with DaskEngine.connect(dask_cli) as engine:
        engine.client.wait_for_workers(2, timeout=WAIT_SECONDS)
        engine.check_folders(str(HERE), str(out))

        def run() -> None:
            try:
                box["results"] = engine.run(tasks, on_progress=seen.progress, on_done=seen.finished)
            except BaseException as exc:  # noqa: BLE001 - shown by the test's thread
                box["error"] = exc

        runner = threading.Thread(target=run)
        runner.start()
        try:
            first = wait_for(lambda: sorted(hold.glob("started-0-*")), "task 0 to start")
            killed = int(first[0].name.rsplit("-", 1)[1])
            os.kill(killed, signal.SIGKILL)  # the worker process, halfway through task 0
            again = wait_for(lambda: [p for p in hold.glob("started-0-*") if p != first[0]], "task 0 to run again")
            assert int(again[0].name.rsplit("-", 1)[1]) != killed
        finally:
            (hold / "hold-0").unlink()
            runner.join(WAIT_SECONDS)
        assert not runner.is_alive()
        assert "error" not in box, box.get("error")
        assert box["results"] == expected(n, tmp_path)
        assert seen.files == n * FILES_PER_TASK  # the killed attempt's files are not counted twice
        assert sorted(seen.done) == list(range(n))
        left = attempt_files(out / "toy-0.bin")
        assert len(left) == 1 and str(killed) in left[0].name  # the killed attempt's part; nothing else
        engine.client.wait_for_workers(2, timeout=WAIT_SECONDS)  # its nanny started a new worker process


def test_an_unreachable_scheduler_is_one_line(tmp_path):
    pytest.importorskip("distributed")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterError, match=rf"^cannot reach the Dask scheduler at tcp://127.0.0.1:{port}: "):
        DaskEngine.connect(f"tcp://127.0.0.1:{port}", timeout=2)


# --- without distributed -------------------------------------------------------------------

def test_missing_distributed_gives_the_install_hint_and_plain_runs_still_work(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['distributed'] = None\n"
        "import data2h5, data2h5.engines as e\n"
        "assert 'dask' not in sys.modules\n"
        "for kwargs in ({'dask_workers': 2}, {'scheduler': 'tcp://127.0.0.1:8786'}, {'client': object()}):\n"
        "    try:\n"
        "        e.open_engine(**kwargs)\n"
        "    except e.DaskMissingError as exc:\n"
        "        assert isinstance(exc, ImportError)\n"
        "        print(exc)\n"
        "print(type(e.open_engine(workers=2)).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "--dask-workers 2 needs the distributed package: pip install 'data2h5[dask]'",
        "--scheduler tcp://127.0.0.1:8786 needs the distributed package: pip install 'data2h5[dask]'",
        "client= needs the distributed package: pip install 'data2h5[dask]'",
        "LocalPool",
    ]


def test_dask_options_exclude_each_other():
    with pytest.raises(ValueError, match="not scheduler and dask_workers"):
        open_engine(scheduler="tcp://127.0.0.1:1", dask_workers=2)
