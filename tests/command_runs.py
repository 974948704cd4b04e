"""Every command and loader on many crafted archives, each run a process of its own under a
memory limit and a timeout (through ``fuzz_runner.py``), and what a run must look like: exit 0
or 1, at most one line on stderr, the error line data2h5's own and naming the archive, no
traceback, no signal, no timeout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

RUNNER = Path(__file__).with_name("fuzz_runner.py")
CLI_COMMANDS = ("info", "ls", "verify", "extract")
LOADERS = ("H5Dataset", "open", "BatchReader")
PRELOAD = {"cli": ["data2h5.cli", "data2h5.info", "data2h5.verify", "data2h5.extract"],
           "loaders": ["data2h5.loaders.dataset", "data2h5.loaders.batch_reader"]}


def command_argv(command: str, archive: Path) -> List[str]:
    """The command line of ``command`` (one of :data:`CLI_COMMANDS`) on ``archive``."""
    extra = [str(archive.parent / "extracted")] if command == "extract" else []
    return [command, str(archive), *extra]


def run_problem(command: str, archive_name: str, status: Optional[int], timed_out: bool, stderr: str,
                timeout: float) -> Optional[str]:
    """What is wrong with a run of ``command`` (a CLI command or a loader), or None."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith("data2h5: note: ")]  # verify's notes beside its verdict
    if timed_out:
        return f"still running after {timeout:g} s"
    if status is None or status < 0:
        return f"killed by signal {-(status or 0)}"
    if status not in (0, 1):
        return f"exit status {status}"
    if "Traceback" in stderr:
        return f"a traceback ending {lines[-1] if lines else ''!r}"
    if len(lines) > 1:
        return f"{len(lines)} lines on stderr"
    if status == 1 and not lines:
        return "exit status 1 without a message"
    if status == 1 and command in CLI_COMMANDS:
        if not lines[0].startswith("data2h5: error: "):
            return "an error line not from data2h5"
        if archive_name not in lines[0]:
            return "an error line not naming the archive"
    return None


@dataclass
class Run:
    """One command or loader's run on one archive."""

    case: str
    command: str
    archive: Path
    status: Optional[int]
    timed_out: bool
    stdout: str
    stderr: str

    def problem(self, timeout: float) -> Optional[str]:
        """What is wrong with this run, or None."""
        return run_problem(self.command, self.archive.name, self.status, self.timed_out, self.stderr, timeout)

    def report(self, problem: str) -> str:
        shown = (f"python -m data2h5 {' '.join(command_argv(self.command, self.archive))}"
                 if self.command in CLI_COMMANDS else f"{self.command}({str(self.archive)!r}), every entry")
        return (f"{problem}: {self.case}\n  command: {shown}\n  status: {self.status}\n"
                f"  stdout: {self.stdout[-300:]!r}\n  stderr: {self.stderr[-1500:]!r}")


def run_everything(cases: Dict[str, Path], base: Path, *, commands: Sequence[str] = CLI_COMMANDS + LOADERS,
                   memory: int = 2 << 30, timeout: float = 20.0, options: Optional[dict] = None,
                   env: Optional[dict] = None) -> List[Run]:
    """Each of ``commands`` on each archive of ``cases`` (name → path; each archive in a folder
    of its own, where ``extract`` writes), through two runners at once: one for the command
    line, one for the loaders (which import torch). ``options``: keyword arguments for every
    loader."""
    jobs: Dict[str, list] = {"cli": [], "loaders": []}
    planned = {}
    for n, (case, archive) in enumerate(cases.items()):
        for command in commands:
            ident = f"{n}-{command}"
            job = {"id": ident, "cwd": str(archive.parent), "out": str(archive.parent / f"run-{command}")}
            if command in CLI_COMMANDS:
                job["argv"] = command_argv(command, archive)
            else:
                job.update(load=str(archive), loader=command, options=options or {})
            jobs["cli" if command in CLI_COMMANDS else "loaders"].append(job)
            planned[ident] = (case, command, archive)
    runners = []
    for kind, todo in jobs.items():
        if not todo:
            continue
        spec = base / f"{kind}-jobs.json"
        spec.write_text(json.dumps({"preload": PRELOAD[kind], "parallel": 1, "timeout": timeout, "memory": memory,
                                    "jobs": todo}))
        runners.append(subprocess.Popen([sys.executable, str(RUNNER), str(spec)], env={**os.environ, **(env or {})},
                                        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {}
    for runner in runners:
        out, err = runner.communicate(timeout=timeout * len(planned) + 60)
        assert runner.returncode == 0, err
        results.update(json.loads(out))
    runs = []
    for ident, (case, command, archive) in planned.items():
        result = results[ident]
        text = {}
        for suffix in ("out", "err"):
            path = archive.parent / f"run-{command}.{suffix}"
            text[suffix] = path.read_text(errors="replace") if path.exists() else ""
        runs.append(Run(case, command, archive, result["status"], result["timed_out"], text["out"], text["err"]))
    return runs


def failures(runs: List[Run], timeout: float = 20.0) -> List[str]:
    """The report of each run with a problem."""
    return [run.report(problem) for run in runs if (problem := run.problem(timeout))]
