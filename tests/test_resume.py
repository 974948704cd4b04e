"""Nothing lost: an interrupted conversion (Ctrl-C, SIGKILL at any instant, a file-size limit)
resumes with --resume, reads again only what was not safely stored or has changed, and ends
with exactly the archive an uninterrupted run makes. One writer per output at a time."""
from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import h5py
import numpy as np
import pytest

import data2h5
from data2h5 import format as fmt
from data2h5.errors import ArchiveError, OutputError
from data2h5.archive import ArchiveReader, open_h5, read_index
from data2h5.partial import OutputLock, Partial

from conftest import write_images
from convert_helpers import error_line, run_cli, index_group

INDEX_COLUMNS = ("keys", "size", "crc32", "kind", "codec", "stored", fmt.STORED_CRC32, "dtype", "shape")
STACKED_FIELDS = ("data", "labels", "keys", "classes")
STACKED_INDEX_FIELDS = ("size", "crc32", fmt.CHUNK_CRC32)


def content(path: Path) -> dict:
    """Everything an archive holds but where its blocks lie and when it was made."""
    with h5py.File(path, "r") as f:
        skip = (fmt.ATTR_CREATED, fmt.ATTR_BYTES_OUT, fmt.ATTR_INDEX)  # the index reference is an address
        out = {"attrs": {k: v for k, v in f.attrs.items() if k not in skip}}
        stacked = f.attrs[fmt.ATTR_LAYOUT] == fmt.LAYOUT_STACKED
        if stacked:
            for name in STACKED_FIELDS:
                out[name] = f[name][()]
            for name in STACKED_INDEX_FIELDS:
                out[f"index/{name}"] = index_group(f)[name][()]
            return out
        group = index_group(f)
        for name in INDEX_COLUMNS:
            out[name] = group[name][()]
    with ArchiveReader(path) as reader:
        out["values"] = [reader.read_stored(i) for i in range(len(reader))]
    return out


def assert_same_archive(a: Path, b: Path) -> None:
    ca, cb = content(a), content(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        if name == "attrs":
            assert {k: str(v) for k, v in ca[name].items()} == {k: str(v) for k, v in cb[name].items()}
        elif name == "values":
            assert len(ca[name]) == len(cb[name])
            for x, y in zip(ca[name], cb[name]):
                np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_array_equal(ca[name], cb[name], err_msg=name)


def make_source(root: Path, n: int = 40) -> Path:
    """Images in class folders, plus arrays big enough to be stored as several chunks."""
    write_images(root, [f"{('cat', 'dog', 'bird/small')[i % 3]}/img_{i:03d}" for i in range(n)], size=20)
    rng = np.random.default_rng(3)
    (root / "arrays").mkdir()
    for i in range(2):
        np.save(root / "arrays" / f"big_{i}.npy", rng.normal(size=(700, 1000)).astype(np.float32))
    return root


def stop_after(count: int, log: Path):
    """A reader that stops the run (as Ctrl-C would) after ``count`` files, logging each read."""
    import imageio.v3 as iio

    seen = []

    def read(path: str):
        if len(seen) == count:
            raise KeyboardInterrupt
        seen.append(path)
        with open(log, "a") as fh:
            fh.write(path + "\n")
        return np.load(path) if path.endswith(".npy") else iio.imread(path)

    return read


def logging_reader(log: Path):
    return stop_after(-1, log)


LAYOUTS = [
    pytest.param("files", ("png", "npy"), id="files"),
    pytest.param("stacked", ("png",), id="stacked"),
]


def stacked_source(root: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(4)
    for i in range(n):
        folder = root / ("cat", "dog")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"s_{i:03d}.npy", rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))  # 5 a chunk
    return root


@pytest.mark.parametrize("layout, exts", LAYOUTS)
def test_resume_reads_only_what_was_not_stored_or_changed(tmp_path, layout, exts):
    """Stop after 25 files; change one stored file, delete one, add one; the resume reads
    the changed, the new and the never-read files only, and equals a fresh conversion."""
    src = make_source(tmp_path / "src") if layout == "files" else stacked_source(tmp_path / "src")
    exts = exts if layout == "files" else ("npy",)
    out = tmp_path / "out.h5"
    log = tmp_path / "read.log"
    options = dict(ext=exts, layout=layout, workers=1, checkpoint_seconds=3600)
    with pytest.raises(KeyboardInterrupt) as stopped:
        data2h5.convert(src, out, reader=stop_after(25, log), **options)
    assert stopped.value.kept == 25 and not out.exists()
    first = log.read_text().split()
    changed, deleted = Path(first[12]), Path(first[20])
    if changed.suffix == ".npy":
        np.save(changed, np.load(changed)[::-1].copy())
    else:
        changed.write_bytes(changed.read_bytes())  # same bytes, new time: read again all the same
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    deleted.unlink()
    added = src / "cat" / "zz_added.npy"
    np.save(added, np.zeros((256, 256, 3), np.uint8))

    with pytest.raises(OutputError, match="--resume"):  # never passed over silently
        data2h5.convert(src, out, reader=logging_reader(log), **options)
    log.write_text("")
    report = data2h5.convert(src, out, reader=logging_reader(log), resume=True, **options)
    again = set(log.read_text().split())
    fresh = tmp_path / "fresh.h5"
    data2h5.convert(src, fresh, reader=logging_reader(tmp_path / "fresh.log"), **options)
    assert_same_archive(out, fresh)
    every = set((tmp_path / "fresh.log").read_text().split())
    if layout == "files":
        assert again == (every - set(first)) | {str(changed)}
        assert report.reused == 23
    else:  # rows are positional: reuse stops at the first changed file's chunk
        assert again == set(every) - set(first[:10])  # the chunks before the changed file's
        assert report.reused == 10
    assert report.entries == len(every) and not Partial(out).files()


def test_resume_with_other_options_is_refused_naming_them(tmp_path):
    src = make_source(tmp_path / "src", n=6)
    out = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt):
        data2h5.convert(src, out, ext="png", reader=stop_after(3, tmp_path / "log"), workers=1)
    with pytest.raises(OutputError, match=r"compression was 'auto', now 'gzip:4'.*--overwrite"):
        data2h5.convert(src, out, ext="png", reader=stop_after(-1, tmp_path / "log"), workers=1,
                        compression="gzip", resume=True)
    data2h5.convert(src, out, ext="png", workers=1, compression="gzip", overwrite=True)  # starts over
    assert len(read_index(out)) == 6 and not Partial(out).files()


def test_resume_of_a_finished_conversion_does_nothing(tmp_path):
    src = make_source(tmp_path / "src", n=4)
    out = tmp_path / "out.h5"
    data2h5.convert(src, out, ext="png", workers=1)
    before = out.stat().st_mtime_ns
    report = data2h5.convert(src, out, ext="png", workers=1, resume=True)
    assert report.entries == 4 and out.stat().st_mtime_ns == before


SLOW_READER = """
import sys, time
import numpy as np

def read(path):
    time.sleep({delay})
    return np.load(path)
"""


def slow_cli(tmp_path: Path, src: Path, out: Path, *extra: str, delay: float = 0.002) -> list:
    reader = tmp_path / "slow_reader.py"
    reader.write_text(SLOW_READER.format(delay=delay))
    return [sys.executable, "-m", "data2h5.cli", "convert", "--path-images", str(src), "--path-output", str(out),
            "--ext", "npy", "--reader", f"{reader}:read", "--workers", "2", "-q", *extra]


def npy_source(root: Path, n: int, shape=(32, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"c{i % 4}" / f"d{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{i:04d}.npy", rng.normal(size=shape).astype(np.float32))
    return root


#: Kills per layout before a last run is let finish: enough to kill start-up, the reuse of
#: earlier work and the reading of files several times over, few enough to stay quick.
MAX_KILLS = 6


class _RunJournal:
    """How many rows the journal of the run with process id ``pid`` vouches for, read again
    only when it has grown (it is polled while the run writes it)."""

    def __init__(self, partial: Partial, pid: int):
        self.partial, self.pid = partial, pid
        self.path: Optional[Path] = None
        self.chunk_rows: Optional[int] = None  # stacked: rows to a chunk, once a chunk is journaled
        self._size, self._rows = -1, 0
        self._others: Dict[Path, tuple] = {}  # journals of earlier runs, as they were when read

    def rows(self) -> Optional[int]:
        """Rows journaled so far; None until the run's journal has its header."""
        from data2h5.partial import read_journal

        if self.path is None:
            for gen in reversed(self.partial.generations()):
                path = self.partial.journal(gen)
                try:
                    st = path.stat()
                except OSError:
                    continue
                if self._others.get(path) == (st.st_ino, st.st_size):
                    continue  # read already, unchanged: not this run's (which may replace a stale one)
                header, _ = read_journal(path)
                if header is not None and header.get("pid") == self.pid:
                    self.path = path
                    break
                self._others[path] = (st.st_ino, st.st_size)
            else:
                return None
        try:
            size = self.path.stat().st_size
        except OSError:  # removed: the run finished and published the archive
            return self._rows
        if size != self._size:
            self._size = size
            _, records = read_journal(self.path)
            self._rows = 0
            for record in records:
                self._rows += len(record.get("entries", ())) + sum(len(rows) for _, rows, _ in record.get("chunks", ()))
                if "stacked" in record:
                    self.chunk_rows = record["stacked"][2]
        return self._rows


def _journalable(n: int, chunk_rows: Optional[int]) -> int:
    """Of ``n`` files, how many rows a run journals before it finishes: all of them, or in the
    stacked layout the rows of full chunks (the last, partial chunk is written on closing)."""
    return n - n % chunk_rows if chunk_rows else n


def _kill_moment(rng: random.Random, proc: subprocess.Popen, partial: Partial, n: int):
    """A moment to kill ``proc`` at, chosen at random among events that happen whatever the
    machine's speed: its label, and a function that says (polled) whether it has come."""
    from data2h5.layouts.stacked import journaled_chunks
    from data2h5.partial import load_previous

    previous = load_previous(partial)
    safe = len(previous)  # rows a resume can reuse
    started = time.monotonic()
    journal = _RunJournal(partial, proc.pid)
    pick = rng.random()
    if pick < 0.25:  # in start-up: imports, the walk, the lock, discarding stale journals
        delay = rng.uniform(0, 0.5)
        return f"start-up, {safe} safe", lambda: time.monotonic() >= started + delay
    chunking = journaled_chunks(previous)[0] if previous.layout == "stacked" else None
    if chunking and safe >= _journalable(n, chunking[2]):
        pick = 0.25  # no full chunk is left to journal: no progress to wait for
    delay, share = rng.uniform(0, 0.1), rng.uniform(0, 0.6)
    since: List[float] = []

    def after(ready: bool) -> bool:  # then a short random delay, to land anywhere in what follows
        if ready and not since:
            since.append(time.monotonic())
        return bool(since) and time.monotonic() >= since[0] + delay

    if pick < 0.5:  # once this run's journal is open: reusing earlier work, starting the pool
        return f"journal open, {safe} safe", lambda: after(journal.rows() is not None)

    def progressed() -> bool:
        """This run has journaled rows of its own, ``share`` of those it has left to journal:
        every such kill leaves more done, and lands early, midway or late in the archive."""
        rows = journal.rows()
        if rows is None or rows <= safe:
            return False
        cap = _journalable(n, journal.chunk_rows)
        return rows >= min(cap, safe + 1 + int(share * (cap - safe)))

    return f"progress, {safe} safe", lambda: after(progressed())


@pytest.mark.parametrize("layout", ["files", "stacked", "packed"])
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, layout):
    """The acceptance test: kill -9 a real conversion at random moments (in start-up, while it
    reuses earlier work, while it reads files), resume each time, then let a last run finish;
    the archive equals an uninterrupted run's and verifies. Moments are events seen in the
    journal, not times that assume a speed, so it holds on a busy machine."""
    n = 800
    src = npy_source(tmp_path / "src", n)
    out = tmp_path / "out.h5"
    partial = Partial(out)
    args = ["--layout", layout, "--checkpoint-every", "0.05"]
    rng = random.Random(1234 if layout == "files" else 4321)
    kills, moments = 0, []
    for attempt in range(MAX_KILLS + 1):
        cmd = slow_cli(tmp_path, src, out, *args, *(["--resume"] if attempt else []), delay=0.004)
        err = tmp_path / f"attempt{attempt}.err"
        with open(err, "wb") as fh:
            proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=fh)
        label = "none: let finish"
        try:
            if kills < MAX_KILLS:
                label, due = _kill_moment(rng, proc, partial, n)
                deadline = time.monotonic() + 120
                while proc.poll() is None and not due():
                    assert time.monotonic() < deadline, f"attempt {attempt} ({label}) never came: {err.read_text()}"
                    time.sleep(0.01)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            moments.append(label)
            continue
        assert proc.returncode == 0, err.read_text()
        break
    else:
        pytest.fail(f"the last run was killed: {moments}")
    assert kills >= 3, f"the runs were too quick to be killed: slow the reader down ({moments})"
    assert out.exists() and not Partial(out).files() and not Partial(out).lock_path.exists()
    fresh = tmp_path / "fresh.h5"
    subprocess.run(slow_cli(tmp_path, src, fresh, *args, delay=0), check=True, cwd=tmp_path)
    assert_same_archive(out, fresh)
    assert data2h5.verify(out, source=src).ok


def test_a_resumed_run_reuses_the_work_of_the_killed_one(tmp_path):
    src = npy_source(tmp_path / "src", 400)
    out = tmp_path / "out.h5"
    cmd = slow_cli(tmp_path, src, out, "--checkpoint-every", "0.05")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while sum(len(r) for r in _journal_rows(out)) < 100:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = sum(len(r) for r in _journal_rows(out))
    done = subprocess.run([c for c in cmd if c != "-q"] + ["--resume"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reused = int(done.stderr.split("resumed: ")[1].split()[0])
    assert stored <= reused < 400


def _journal_rows(out: Path) -> list:
    from data2h5.partial import read_journal

    partial = Partial(out)
    rows = []
    for gen in partial.generations():
        _, records = read_journal(partial.journal(gen))
        rows += [r.get("entries", []) for r in records]
    return rows


def _small_disk(folder: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` on ``folder`` (needs root); False where that is not allowed."""
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def _limit_file_size() -> None:
    """In the child: `ulimit -f` of 24 MiB."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (24 << 20, 24 << 20))


@pytest.mark.parametrize("limit", ["file-size-limit", "disk-full"])
def test_a_write_that_fails_part_way_keeps_the_work_for_resume(tmp_path, limit):
    """`ulimit -f`, or a full disk: the write fails part way; the error says so in one line,
    OUT is not written, and --resume completes the job once there is room."""
    src = npy_source(tmp_path / "src", 120, shape=(300, 300))  # 360 KB each, ~43 MB in all
    folder = tmp_path / "out"
    preexec = None
    if limit == "disk-full":
        if not _small_disk(folder, "24m"):
            pytest.skip("mounting a small tmpfs needs root")
    else:
        folder.mkdir()
        preexec = _limit_file_size

    out = folder / "out.h5"
    cmd = [sys.executable, "-m", "data2h5.cli", "convert", "--path-images", str(src), "--path-output", str(out),
           "--ext", "npy", "--compression", "none", "--workers", "2", "--checkpoint-every", "0.05"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec, cwd=tmp_path)
        assert done.returncode == 1
        line = error_line(done.stderr)
        reason = "File too large" if limit == "file-size-limit" else "No space left on device"
        assert f"cannot write {out}: {reason}" in line and "rerun with --resume" in line, done.stderr
        assert "Traceback" not in done.stderr and not out.exists()
        if limit == "disk-full":  # room is made: the resume copies what was kept, then goes on
            subprocess.run(["mount", "-o", "remount,size=200m", str(folder)], check=True)
        done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "resumed:" in done.stderr
        fresh = tmp_path / "fresh.h5"
        data2h5.convert(src, fresh, ext="npy", compression="none", workers=2)
        assert_same_archive(out, fresh)
    finally:
        if limit == "disk-full":
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


LOCK_HOLDER = """
import os, sys, time
from pathlib import Path
from data2h5.partial import OutputLock, Partial
OutputLock(Partial(Path(sys.argv[1]))).acquire()
child = os.fork()  # as a pool worker is forked
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_killed_writers_lock_is_free_while_its_forked_workers_live(tmp_path):
    """An flock lasts while any process holds the file open: the workers a SIGKILLed writer
    forked must not keep its output locked for the resume that follows."""
    out = tmp_path / "out.h5"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            OutputLock(Partial(out)).acquire()
        holder.kill()
        holder.wait(timeout=60)
        os.kill(child, 0)  # the forked child still runs
        with OutputLock(Partial(out)):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_one_writer_per_output_and_no_reading_of_unfinished_work(tmp_path):
    src = npy_source(tmp_path / "src", 300)
    out = tmp_path / "out.h5"
    first = subprocess.Popen(slow_cli(tmp_path, src, out, delay=0.01), cwd=tmp_path, stderr=subprocess.PIPE)
    partial = Partial(out)
    deadline = time.monotonic() + 60
    while not (partial.lock_path.exists() and partial.files()):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    second = run_cli("convert", "--path-images", str(src), "--path-output", str(out), "--ext", "npy",
                     "--overwrite", cwd=tmp_path)
    assert second.returncode == 1
    line = error_line(second.stderr)
    assert f"{out} is being written by another data2h5 convert (pid {first.pid})" in line
    with pytest.raises(ArchiveError, match="unfinished part of a conversion into out.h5"):
        open_h5(partial.part(1))
    with pytest.raises(ArchiveError, match="under way or was interrupted"):
        open_h5(out)
    assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    assert len(read_index(out)) == 300
