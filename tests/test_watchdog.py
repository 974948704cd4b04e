"""The watchdog of ``info``, ``ls``, ``verify`` and ``extract`` (data2h5/watchdog.py).

A real damaged archive makes libhdf5 loop forever while holding the interpreter: its global
heap (where variable-length attribute strings live) is given one object size 16 bytes too
large, so libhdf5 reads the next object header from inside the heap's zero-filled free space,
as a free-space object of size 0, and steps by 0 bytes forever. A random byte flip in a small
archive's heap does this too (the fuzz test's seeds found it). The guarded commands end with
one line; unguarded, the same command never ends.

The watchdog's other promises (no misfire on slow but progressing runs, statuses and signals
passed through) are tested with tests/watchdog_program.py, a small command guarded the same
way, whose runs hold or release the interpreter for as long as asked.
"""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import data2h5
from conftest import photo_like
from convert_helpers import error_line, run_cli
from data2h5.watchdog import ENV_SECONDS

PROGRAM = Path(__file__).with_name("watchdog_program.py")
LAYOUTS = {"files": {}, "bytes": {"reader": "bytes"}, "stacked": {"layout": "stacked"}}


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict:
    """One small archive per layout, from real PNG and JPEG images."""
    base = tmp_path_factory.mktemp("watchdog")
    rng = np.random.default_rng(5)
    for i in range(6):
        path = base / "src" / f"c{i % 2}" / f"img_{i}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, photo_like(rng, 12, 12), extension=path.suffix)
    return {layout: Path(data2h5.convert(base / "src", base / f"{layout}.h5", ext=["png", "jpg"], workers=1,
                                         progress=False, **options).output)
            for layout, options in LAYOUTS.items()}


def loop_global_heap(data: bytes) -> bytes:
    """``data`` with the last object of its first global heap collection 16 bytes longer."""
    at = data.index(b"GCOL")  # signature, version, 3 reserved bytes, collection size
    end = at + struct.unpack_from("<Q", data, at + 8)[0]
    p, last = at + 16, None
    while p + 16 <= end:  # objects: index (2), references (2), reserved (4), size (8), data (8-aligned)
        number, size = struct.unpack_from("<H", data, p)[0], struct.unpack_from("<Q", data, p + 8)[0]
        if number == 0:  # the free space, zero-filled
            break
        last, p = p, p + 16 + (size + 7) // 8 * 8
    assert last is not None and end - p > 64, "no global heap object before enough free space"
    out = bytearray(data)
    struct.pack_into("<Q", out, last + 8, struct.unpack_from("<Q", data, last + 8)[0] + 16)
    return bytes(out)


@pytest.fixture(scope="module")
def looping(archives, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("looping")
    out = {}
    for layout, path in archives.items():
        out[layout] = base / f"{layout}.h5"
        out[layout].write_bytes(loop_global_heap(path.read_bytes()))
    return out


def command_args(command: str, path: Path, dest: Path) -> list:
    return [command, path, dest] if command == "extract" else [command, path]


LOOP_CASES = [("info", "files"), ("ls", "files"), ("verify", "files"), ("extract", "files"),
              ("info", "bytes"), ("verify", "stacked"), ("extract", "stacked")]


@pytest.mark.parametrize("command, layout", LOOP_CASES)
def test_a_looping_header_ends_the_command_in_one_line(tmp_path, looping, command, layout):
    path, dest = looping[layout], tmp_path / "dest"
    before = path.read_bytes()
    started = time.monotonic()
    done = run_cli(*command_args(command, path, dest), cwd=tmp_path, env={ENV_SECONDS: "1"}, timeout=60)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = error_line(done.stderr)
    assert f"{path}: the file's HDF5 structure is damaged" in line and "copy or convert it again" in line, line
    assert time.monotonic() - started < 30
    assert path.read_bytes() == before
    assert not dest.exists() or not any(dest.rglob("*")), "extract wrote something"


def test_without_the_watchdog_the_loop_never_ends(tmp_path, looping):
    """The evidence that the file, not the watchdog, is what stops: unguarded, info hangs."""
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("info", looping["files"], cwd=tmp_path, env={ENV_SECONDS: "0"}, timeout=4)


def damaged_entry(path: Path, out: Path) -> Path:
    """A copy of ``path`` with one byte of its first entry's stored bytes flipped."""
    from data2h5.archive import read_index

    index = read_index(path)
    offset = int(index.offset[0]) or int(index.offset[np.nonzero(index.offset)[0][0]])
    data = bytearray(path.read_bytes())
    data[offset + 1] ^= 0xFF
    out.write_bytes(data)
    return out


def normalized(done: subprocess.CompletedProcess) -> tuple:
    timed = re.compile(r"in \d+(\.\d+)? s")
    return done.returncode, timed.sub("in T s", done.stdout), timed.sub("in T s", done.stderr)


@pytest.mark.parametrize("command", ["info", "ls", "verify", "extract"])
@pytest.mark.parametrize("state", ["good", "damaged entry"])
def test_output_and_status_pass_through_unchanged(tmp_path, archives, command, state):
    path = archives["files"] if state == "good" else damaged_entry(archives["files"], tmp_path / "damaged.h5")
    runs = []
    for seconds in ("60", "0"):  # guarded, and not
        dest = tmp_path / "dest"
        runs.append(normalized(run_cli(*command_args(command, path, dest), cwd=tmp_path, env={ENV_SECONDS: seconds})))
        if dest.exists():
            subprocess.run(["rm", "-rf", str(dest)], check=True)
    assert runs[0] == runs[1]
    assert runs[0][0] == (0 if state == "good" or command in ("info", "ls") else 1), runs[0]


def test_a_limit_that_is_not_a_number_is_one_line(tmp_path, archives):
    done = run_cli("info", archives["files"], cwd=tmp_path, env={ENV_SECONDS: "soon"})
    assert done.returncode == 1 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert ENV_SECONDS in error_line(done.stderr) and "'soon'" in done.stderr


# -- the watchdog's promises, through a program guarded like the commands ------------------------


def program(how: str, *, limit: float = 1, duration: float = 2, **kwargs) -> subprocess.Popen:
    env = {**os.environ, ENV_SECONDS: str(limit), "DURATION": str(duration)}
    return subprocess.Popen([sys.executable, PROGRAM, "archive.h5", how], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=PROGRAM.parent, **kwargs)


@pytest.mark.parametrize("how", ["compute", "release-gil"])
def test_a_slow_run_that_progresses_is_left_alone(how):
    """Twice the limit, spent running Python code or in a C call that lets the interpreter run."""
    proc = program(how, limit=1, duration=2.5)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (0, "started\ndone\n", "")


def test_a_c_call_holding_the_interpreter_is_stopped():
    proc = program("hold-gil", limit=1, duration=120)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == "started\n", err
    assert err.startswith("data2h5: error: archive.h5: the file's HDF5 structure is damaged") and err.count("\n") == 1


@pytest.mark.parametrize("how, status, words", [("exit-7", 7, ""), ("raise", 1, "RuntimeError: raised on purpose")])
def test_the_child_status_and_traceback_pass_through(how, status, words):
    proc = program(how)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status and words in err, err


def children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(c) for c in fh.read().split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stops processes found through /proc")
@pytest.mark.parametrize("whom", ["the whole job", "the child alone"])
def test_time_stopped_is_not_silence(whom):
    """Ctrl-Z (the job stopped) or a debugger (the child stopped) for longer than the limit."""
    proc = program("release-gil", limit=1, duration=1.5, start_new_session=True)
    assert proc.stdout.readline() == "started\n"
    target = proc.pid if whom == "the whole job" else children(proc.pid)[0]
    stop = (lambda s: os.killpg(proc.pid, s)) if whom == "the whole job" else (lambda s: os.kill(target, s))
    stop(signal.SIGSTOP)
    time.sleep(2.5)
    stop(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (0, "done\n", "")


@pytest.mark.parametrize("signum, status, words", [(signal.SIGTERM, -signal.SIGTERM, ""),
                                                   (signal.SIGINT, 1, "Aborted!")])
def test_a_signal_to_the_watchdog_reaches_the_command(signum, status, words):
    """``kill`` of the process a shell or batch system knows: the command gets it and ends
    as it would unguarded (SIGTERM kills it, SIGINT is click's Aborted!); nothing stays behind."""
    proc = program("compute", duration=30)
    assert proc.stdout.readline() == "started\n"
    child = children(proc.pid)[0] if sys.platform.startswith("linux") else None
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=20)  # returns once the child, which shares the pipes, is gone too
    assert proc.returncode == status and words in err and "Traceback" not in err, err
    if child is not None:
        assert not os.path.exists(f"/proc/{child}") or "Z" in Path(f"/proc/{child}/stat").read_text().split(")")[1][:3]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal's Ctrl-C")
def test_ctrl_c_on_a_terminal_interrupts_once():
    """The terminal signals the whole job: the watchdog leaves Ctrl-C to the command, so the
    command is interrupted once, as unguarded, not twice."""
    pid, master = pty.fork()
    if pid == 0:  # the child: the program on a new terminal
        os.environ.update({ENV_SECONDS: "1", "DURATION": "30"})
        os.execv(sys.executable, [sys.executable, str(PROGRAM), "archive.h5", "compute"])
    seen = b""
    deadline = time.monotonic() + 30
    while b"started" not in seen and time.monotonic() < deadline:
        if select.select([master], [], [], 1)[0]:
            seen += os.read(master, 1024)
    assert b"started" in seen, seen
    os.write(master, b"\x03")
    while True:
        try:
            chunk = os.read(master, 1024)
        except OSError:  # the terminal's other end closed
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.waitstatus_to_exitcode(status) == 1 and seen.count(b"Aborted!") == 1, seen
