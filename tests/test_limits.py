"""Per-file limits: a reader that hangs meets --timeout, one that returns something enormous
meets --max-entry-size; either way the file is named, and the rest of the run is unharmed."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from convert_helpers import error_line, index, run_cli

PLUGIN = """
import time
import numpy as np

def read(path):
    name = path.rsplit("/", 1)[-1]
    if name.startswith("hang"):
        time.sleep(600)
    if name.startswith("huge"):
        return np.broadcast_to(np.uint8(0), (1 << 40,))  # a terabyte view that costs nothing yet
    return np.load(path)
"""


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    for i in range(6):
        np.save(root / f"ok_{i}.npy", np.full((50, 50), i, dtype=np.int32))  # 10 kB each
    (tmp_path / "plugin.py").write_text(PLUGIN)
    return root


def convert(src: Path, *args: str):
    out = src.parent / "out.h5"
    done = run_cli("convert", "--path-images", src, "--path-output", out, "--ext", "npy", "-q",
                   "--reader", f"{src.parent / 'plugin.py'}:read", *args, cwd=src.parent)
    return done, out


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_hanging_reader_meets_the_timeout(src, workers, on_error):
    np.save(src / "hang_1.npy", np.zeros(3))
    started = time.monotonic()
    done, out = convert(src, "--timeout", "1", "--workers", workers, "--on-error", on_error)
    assert time.monotonic() - started < 60  # not the reader's 600 s
    if on_error == "fail":
        assert done.returncode == 1
        line = error_line(done.stderr)
        assert str(src / "hang_1.npy") in line and "--timeout" in line
        assert not out.exists()
    else:
        assert done.returncode == 0, done.stderr
        assert index(out)["keys"] == [f"ok_{i}.npy" for i in range(6)]


@pytest.mark.parametrize("limit, name, words", [
    (None, "huge_1.npy", "1.0 TiB, over the 4.0 GiB limit"),  # a reader gone wrong, default cap
    ("8K", "ok_0.npy", "9.8 KiB, over the 8.0 KiB limit"),  # a cap the user set, below the real size
])
def test_a_value_over_the_size_limit_is_refused_naming_the_file(src, limit, name, words):
    if limit is None:
        np.save(src / "huge_1.npy", np.zeros(3))
    done, out = convert(src, "--workers", "2", *(["--max-entry-size", limit] if limit else []))
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert str(src / name) in line and words in line and "--max-entry-size" in line
    assert "Traceback" not in done.stderr and not out.exists()


def test_a_size_limit_that_is_not_a_size_is_a_usage_error(src):
    done, _ = convert(src, "--max-entry-size", "lots")
    assert done.returncode == 2 and "'lots' is not a size such as 512M or 16G" in done.stderr
