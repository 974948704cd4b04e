"""Fuzz: small archives of each layout with random bytes changed, read by every command.

For each layout (``files`` decoded, ``files`` as exact bytes, ``stacked``) an archive is
converted from real PNG and JPEG images; each seed changes 1 to 4 of its bytes at random
(seeded, so a seed is the same change on every run), and ``info``, ``ls``, ``verify``,
``extract`` and a script reading everything through ``H5Dataset`` each run on the result in a
process of their own, under a 2 GiB memory limit and a timeout. Each must exit 0 or 1 with at
most one line on stderr (an error naming the archive when it exits 1), no traceback, and not
be killed by a signal or the timeout. A command that libhdf5 holds in a loop ends by the
watchdog's line; the library documents that limit, so ``H5Dataset`` may time out on a variant
that the watchdog stopped a command on.

The archives' source folder is given a name of fixed length, so that a seed changes the same
structure wherever the test runs with the same versions of data2h5 and its libraries (the
archives differ only in their timestamps and that name); a change to the format moves them.

Run more seeds: ``DATA2H5_FUZZ_SEEDS=500 pytest -m fuzz``; start elsewhere with
``DATA2H5_FUZZ_FIRST=1000``. Reproduce one: ``python tests/test_fuzz.py LAYOUT SEED [FOLDER]``
writes the archive and its variant there and prints the commands to run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import imageio.v3 as iio
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's helpers, also as a script

import data2h5  # noqa: E402
from command_runs import run_problem  # noqa: E402
from conftest import photo_like  # noqa: E402
from data2h5.watchdog import ENV_SECONDS  # noqa: E402

pytestmark = pytest.mark.fuzz

RUNNER = Path(__file__).with_name("fuzz_runner.py")
LAYOUTS = {"files": {}, "bytes": {"reader": "bytes"}, "stacked": {"layout": "stacked"},
           "packed": {"reader": "bytes", "layout": "packed"}}
COMMANDS = ("info", "ls", "verify", "extract", "H5Dataset")
SEEDS = int(os.environ.get("DATA2H5_FUZZ_SEEDS", "32"))  # variants per layout
FIRST = int(os.environ.get("DATA2H5_FUZZ_FIRST", "0"))
MEMORY = 2 << 30
TIMEOUT = 20.0  # seconds a run may take: several times the watchdog's limit below
WATCHDOG = "3"  # the watchdog's limit in these runs: small archives read in a fraction of it
SOURCE_NAME_LENGTH = 160  # characters of the source folder's absolute path, padded


def make_archives(base: Path) -> Dict[str, Path]:
    """One archive per layout under ``base``, from six 12x12 RGB images (three PNG, three JPEG)
    in two classes; the source folder's path is padded to a fixed length."""
    name = "src".ljust(max(4, SOURCE_NAME_LENGTH - len(str(base)) - 1), "_")
    src = base / name
    rng = np.random.default_rng(9)
    for i in range(6):
        path = src / f"c{i % 2}" / f"img_{i}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, photo_like(rng, 12, 12), extension=path.suffix)
    return {layout: Path(data2h5.convert(src, base / f"{layout}.h5", ext=["png", "jpg"], workers=1,
                                         progress=False, **options).output)
            for layout, options in LAYOUTS.items()}


Flips = List[Tuple[int, int, int]]  # (offset, byte before, byte after)


def mutate(data: bytes, seed: int) -> Tuple[bytes, Flips]:
    """``data`` with 1 to 4 bytes at random offsets set to other random values."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 5))
    offsets = sorted(int(o) for o in rng.choice(len(data), size=count, replace=False))
    out, flips = bytearray(data), []
    for offset in offsets:
        new = (data[offset] + int(rng.integers(1, 256))) % 256  # never the byte it was
        out[offset] = new
        flips.append((offset, data[offset], new))
    return bytes(out), flips


def describe_flips(flips: Flips) -> str:
    return ", ".join(f"{offset}: 0x{old:02x}->0x{new:02x}" for offset, old, new in flips)


def command_argv(command: str, folder: Path) -> List[str]:
    archive = str(folder / "archive.h5")
    return {"info": ["info", archive], "ls": ["ls", archive], "verify": ["verify", archive],
            "extract": ["extract", archive, str(folder / "extracted")]}[command]


@dataclass
class Run:
    layout: str
    seed: int
    flips: Flips
    command: str
    folder: Path
    status: Optional[int]
    timed_out: bool
    stdout: str
    stderr: str

    def problem(self) -> Optional[str]:
        """What is wrong with this run, or None."""
        return run_problem(self.command, "archive.h5", self.status, self.timed_out, self.stderr, TIMEOUT)

    def report(self, problem: str) -> str:
        shown = f"python -m data2h5 {' '.join(command_argv(self.command, self.folder))}" \
            if self.command != "H5Dataset" else f"H5Dataset({str(self.folder / 'archive.h5')!r}), every entry"
        return (f"{problem}: layout {self.layout}, seed {self.seed}, bytes changed {describe_flips(self.flips)}\n"
                f"  command: {shown}\n  status: {self.status}\n"
                f"  stdout: {self.stdout[-300:]!r}\n  stderr: {self.stderr[-1500:]!r}\n"
                f"  reproduce: python tests/test_fuzz.py {self.layout} {self.seed}")


PRELOAD = {"cli": ["data2h5.cli", "data2h5.info", "data2h5.verify", "data2h5.extract"],
           "H5Dataset": ["data2h5.loaders.dataset"]}


def run_all(layout: str, archive: Path, base: Path) -> List[Run]:
    """Every command on every seed's variant of ``archive``, through two fuzz runners at once:
    one for the command line, one for H5Dataset (which imports torch)."""
    data = archive.read_bytes()
    jobs: Dict[str, list] = {"cli": [], "H5Dataset": []}
    runs = {}
    for seed in range(FIRST, FIRST + SEEDS):
        folder = base / f"{layout}-{seed}"
        folder.mkdir()
        variant, flips = mutate(data, seed)
        (folder / "archive.h5").write_bytes(variant)
        for command in COMMANDS:
            ident = f"{seed}-{command}"
            job = {"id": ident, "cwd": str(folder), "out": str(folder / command)}
            if command == "H5Dataset":
                job["h5dataset"] = str(folder / "archive.h5")
            else:
                job["argv"] = command_argv(command, folder)
            jobs["cli" if command != "H5Dataset" else "H5Dataset"].append(job)
            runs[ident] = (seed, flips, command, folder)
    env = {**os.environ, ENV_SECONDS: WATCHDOG}
    runners = []
    for kind, todo in jobs.items():
        spec = base / f"{kind}-jobs.json"
        spec.write_text(json.dumps({"preload": PRELOAD[kind], "parallel": 1, "timeout": TIMEOUT,
                                    "memory": MEMORY, "jobs": todo}))
        runners.append(subprocess.Popen([sys.executable, str(RUNNER), str(spec)], env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {}
    for runner in runners:
        out, err = runner.communicate(timeout=TIMEOUT * len(runs))
        assert runner.returncode == 0, err
        results.update(json.loads(out))
    found = []
    for ident, (seed, flips, command, folder) in runs.items():
        result = results[ident]
        text = {s: (folder / f"{command}.{s}").read_text(errors="replace") if (folder / f"{command}.{s}").exists()
                else "" for s in ("out", "err")}
        found.append(Run(layout, seed, flips, command, folder, result["status"], result["timed_out"],
                         text["out"], text["err"]))
    return found


def stopped_by_watchdog(runs: List[Run], seed: int) -> bool:
    return any(r.seed == seed and "HDF5 structure is damaged" in r.stderr for r in runs)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Dict[str, Path]:
    return make_archives(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_damaged_archives_end_in_one_line(tmp_path, archives, layout):
    runs = run_all(layout, archives[layout], tmp_path)
    failures = []
    for run in runs:
        problem = run.problem()
        if problem and run.command == "H5Dataset" and run.timed_out and stopped_by_watchdog(runs, run.seed):
            continue  # libhdf5's own loop, which only the command line's watchdog ends (documented)
        if problem:
            failures.append(run.report(problem))
    assert not failures, f"{len(failures)} of {len(runs)} runs failed:\n" + "\n".join(failures)


def main(argv: List[str]) -> None:
    """``python tests/test_fuzz.py LAYOUT SEED [FOLDER]``: write one seed's variant."""
    import tempfile

    layout, seed = argv[0], int(argv[1])
    base = Path(argv[2]) if len(argv) > 2 else Path(tempfile.mkdtemp(prefix="data2h5-fuzz-"))
    base.mkdir(parents=True, exist_ok=True)
    archive = base / f"{layout}.h5"
    if not archive.exists():  # made by an earlier call into the same folder, or made now
        archive = make_archives(base)[layout]
    variant, flips = mutate(archive.read_bytes(), seed)
    folder = base / f"{layout}-{seed}"
    folder.mkdir(exist_ok=True)
    (folder / "archive.h5").write_bytes(variant)
    print(f"{folder / 'archive.h5'}: {layout} archive, seed {seed}, bytes changed {describe_flips(flips)}")
    for command in COMMANDS[:-1]:
        print(f"  {ENV_SECONDS}={WATCHDOG} python -m data2h5 {' '.join(command_argv(command, folder))}")
    print(f"  python -c \"from data2h5 import H5Dataset; ds = H5Dataset('{folder / 'archive.h5'}'); "
          f"[ds[i] for i in range(len(ds))]\"")


if __name__ == "__main__":
    main(sys.argv[1:])
