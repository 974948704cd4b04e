"""Reading something that is not a whole archive: a truncated archive, an empty file, a file
that is not HDF5, a folder. Every reader (``info``, ``ls``, ``H5Dataset``, ``ArchiveReader``,
``BatchReader``) says so in one line naming the file and what to do, and leaves it as it was."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import data2h5
from conftest import photo_like
from convert_helpers import error_line, permissions_apply, run_cli, run_unprivileged
from data2h5.loaders import H5Dataset
from data2h5.errors import ArchiveError
from data2h5.archive import ArchiveReader
from data2h5.loaders import BatchReader

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """One small archive of each layout, converted from real PNGs."""
    base = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(3)
    for i in range(24):
        path = base / "src" / f"c{i % 3}" / f"img_{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, photo_like(rng, 32, 32))
    return {layout: data2h5.convert(base / "src", base / f"{layout}.h5", ext="png", layout=layout,
                                    workers=1).output
            for layout in ("files", "stacked")}


def cut(fraction: float = 0.0, keep: int = 0):
    def make(good: str, path: Path) -> None:
        data = Path(good).read_bytes()
        path.write_bytes(data[: keep or int(len(data) * fraction)])
        assert path.read_bytes().startswith(HDF5_SIGNATURE)  # still recognisably HDF5, only short
    return make


def zero_filled_half(good: str, path: Path) -> None:
    """What a crash can leave: the file at its full size, its second half never written."""
    data = Path(good).read_bytes()
    path.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))


def jpeg(good: str, path: Path) -> None:
    path.write_bytes(iio.imwrite("<bytes>", photo_like(np.random.default_rng(0), 16, 16), extension=".jpg"))


# name -> (how it is made from a good archive, layout of that archive or None, words of the message)
BAD = {
    "cut-in-half": (cut(0.5), ("files", "stacked"), ["truncated", "copy or convert it again"]),
    "cut-past-superblock": (cut(keep=100), ("files", "stacked"), ["truncated", "copy or convert it again"]),
    "zero-filled-half": (zero_filled_half, ("files", "stacked"), ["damaged", "copy or convert it again"]),
    "empty": (lambda good, p: p.write_bytes(b""), None, ["empty", "copy or convert it again"]),
    "jpeg-named-h5": (jpeg, None, ["not an HDF5 file", "give the path of an archive"]),
    "text": (lambda good, p: p.write_text("train: data/train.h5\n"), None,
             ["not an HDF5 file", "give the path of an archive"]),
    "folder": (lambda good, p: p.mkdir(), None, ["not a file", "give the path of an .h5 archive"]),
}
CASES = [pytest.param(name, layout, id=f"{name}-{layout}" if layout else name)
         for name, (_, layouts, _) in BAD.items() for layout in (layouts or [None])]


def make_bad(name: str, layout, good: dict, tmp_path: Path):
    make, _, words = BAD[name]
    path = tmp_path / "archive.h5"
    make(good[layout or "files"], path)
    return path, words


def snapshot(path: Path):
    return sorted(os.listdir(path)) if path.is_dir() else path.read_bytes()


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "ls"])
@pytest.mark.parametrize("name, layout", CASES)
def test_cli_on_a_bad_archive(tmp_path, good, command, name, layout):
    path, words = make_bad(name, layout, good, tmp_path)
    before = snapshot(path)
    done = run_cli(command, path, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = error_line(done.stderr)
    assert str(path) in line and all(w in line for w in words), line
    assert snapshot(path) == before


# -- the library ----------------------------------------------------------------------------------


def read_all_h5dataset(path: Path) -> None:
    ds = H5Dataset(path)
    for i in range(len(ds)):
        ds[i]


def read_all_archive_reader(path: Path) -> None:
    with ArchiveReader(path) as reader:
        for i in range(len(reader)):
            reader.read(i)


def read_all_batch_reader(path: Path) -> None:
    with BatchReader(path, 4) as reader:
        for _ in reader:
            pass


READERS = {"H5Dataset": read_all_h5dataset, "ArchiveReader": read_all_archive_reader,
           "BatchReader": read_all_batch_reader}


LIBRARY_CASES = [  # BatchReader reads the rows of a stacked archive's data
    pytest.param(reader, *case.values, id=f"{reader}-{case.id}")
    for reader in sorted(READERS) for case in CASES if not (reader == "BatchReader" and case.values[1] == "files")
]


@pytest.mark.parametrize("reader, name, layout", LIBRARY_CASES)
def test_library_on_a_bad_archive(tmp_path, good, reader, name, layout):
    path, words = make_bad(name, layout, good, tmp_path)
    before = snapshot(path)
    with pytest.raises(ArchiveError) as caught:
        READERS[reader](path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and all(w in message for w in words), message
    assert snapshot(path) == before


def test_the_good_archives_read(good):
    """The archives the bad files are cut from are themselves fine: the failures above are the cuts'."""
    for layout, path in good.items():
        for name, reader in READERS.items():
            if not (name == "BatchReader" and layout == "files"):
                reader(Path(path))
        assert run_cli("ls", path, cwd=Path(path).parent).stdout.count("\n") == 24


def test_one_bad_archive_among_good_ones_is_named(tmp_path, good):
    path, _ = make_bad("cut-in-half", "files", good, tmp_path)
    with pytest.raises(ArchiveError, match="archive.h5: the file is truncated"):
        H5Dataset([good["files"], path, good["stacked"]])


# -- an archive that cannot be read -------------------------------------------------------------


@pytest.fixture
def unreadable(tmp_path, good) -> Path:
    permissions_apply(tmp_path)
    path = tmp_path / "locked.h5"
    shutil.copy(good["files"], path)
    path.chmod(0)
    return path


LIBRARY_DRIVER = (
    "import sys\n"
    "from data2h5 import H5Dataset\n"
    "from data2h5.errors import ArchiveError\n"
    "try:\n"
    "    H5Dataset(sys.argv[1])\n"
    "except ArchiveError as exc:\n"
    "    print(f'ArchiveError: {exc}', file=sys.stderr)\n"
    "    sys.exit(1)\n"
)


def test_unreadable_archive_in_the_library(tmp_path, unreadable):
    done = run_unprivileged(sys.executable, "-c", LIBRARY_DRIVER, unreadable, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == f"ArchiveError: {unreadable}: cannot open (Permission denied); make it readable"


@pytest.mark.parametrize("command", ["info", "ls"])
def test_unreadable_archive_on_the_command_line(tmp_path, unreadable, command):
    done = run_unprivileged(sys.executable, "-m", "data2h5.cli", command, unreadable, cwd=tmp_path)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = error_line(done.stderr)
    assert str(unreadable) in line and "Permission denied" in line and "make it readable" in line
