"""Sharded masters crafted as a stranger could: a shard table whose numbers wrap when summed,
shards that are links out of the master's folder, a shard that is itself a master, and a
table of many rows naming one file. Every command and loader answers each in one line (exit 1)
under a memory limit, and never shows another archive's content."""
from __future__ import annotations

import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Callable, Dict

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data2h5  # noqa: E402
from command_runs import failures, run_everything  # noqa: E402
from conftest import write_images  # noqa: E402
from data2h5.sharding import IDENTITY_BYTES  # noqa: E402

MEMORY = 2 << 30


def index_group(f: h5py.File) -> h5py.Group:
    return h5py.Group(h5py.h5r.dereference(f.attrs["data2h5_index"], f.id))


def set_columns(path: Path, **columns: np.ndarray) -> None:
    """Replace index columns of the archive at ``path`` with ``columns``, in their own dtype."""
    with h5py.File(path, "r+") as f:
        group = index_group(f)
        for name, values in columns.items():
            del group[name]
            group[name] = values


def identity(path: Path) -> int:
    data = path.read_bytes()
    return zlib.crc32(data[-IDENTITY_BYTES:], zlib.crc32(data[:IDENTITY_BYTES]))


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> Path:
    """A master over three shards of two entries each."""
    base = tmp_path_factory.mktemp("shards")
    write_images(base / "src", [f"{c}/img_{i}" for c in ("a", "b") for i in range(3)], size=12)
    (base / "good").mkdir()
    return Path(data2h5.convert(base / "src", base / "good" / "archive.h5", ext="png", reader="bytes",
                                shard_size="2files", workers=1, progress=False).output)


def copy_master(master: Path, folder: Path) -> Path:
    folder.mkdir()
    for path in master.parent.iterdir():
        if path.suffix == ".h5":
            shutil.copy(path, folder / path.name)
    return folder / master.name


def shard_names(archive: Path) -> list:
    with h5py.File(archive, "r") as f:
        return [n.decode() for n in index_group(f)["shard_name"][()]]


# -- attacks: each edits a copy of the good master ------------------------------------------------


def set_table(archive: Path, names: list, entries: np.ndarray) -> None:
    """A shard table of ``names`` (each given the size and identity of the file beside the
    archive of that name, where there is one) and ``entries``."""
    files = [archive.parent / n for n in names]
    set_columns(archive, shard_name=np.array([n.encode() for n in names]),
                shard_size=np.array([p.stat().st_size if p.exists() else 0 for p in files], np.uint64),
                shard_crc32=np.zeros(len(names), np.uint64),
                shard_identity=np.array([identity(p) if p.exists() else 0 for p in files], np.uint64),
                shard_entries=entries, shard_first_key=np.array([b"a"] * len(names)),
                shard_last_key=np.array([b"z"] * len(names)))


def entries_wrap_uint64(archive: Path) -> None:
    """Shard entries that sum to the six rows only modulo 2^64."""
    set_columns(archive, shard_entries=np.array([2 ** 64 - 2, 4, 4], np.uint64))


def entries_wrap_int64(archive: Path) -> None:
    """Five signed counts, each below 2^62, that sum to six only modulo 2^64."""
    names = shard_names(archive)
    set_table(archive, names + ["x-3.h5", "x-4.h5"], np.array([2 ** 62 - 1] * 4 + [10], np.int64))


def entries_negative(archive: Path) -> None:
    set_columns(archive, shard_entries=np.array([-4, 5, 5], np.int64))


def size_huge(archive: Path) -> None:
    set_columns(archive, shard_size=np.array([2 ** 63 - 1, 1, 1], np.int64))


def rows_huge(archive: Path) -> None:
    set_columns(archive, row=np.full(6, 2 ** 63 - 1, np.int64), shard=np.full(6, 2 ** 31, np.uint32))


def symlink_out_of_folder(archive: Path) -> None:
    """A shard replaced by a symlink to the same bytes elsewhere (size and identity match)."""
    name = shard_names(archive)[0]
    elsewhere = archive.parent.parent / f"elsewhere-{archive.parent.name}"
    elsewhere.mkdir()
    os.replace(archive.parent / name, elsewhere / name)
    os.symlink(elsewhere / name, archive.parent / name)


def symlink_in_folder(archive: Path) -> None:
    """A shard that is a symlink to a file beside it."""
    name = shard_names(archive)[0]
    os.replace(archive.parent / name, archive.parent / f"real-{name}")
    os.symlink(f"real-{name}", archive.parent / name)


def hard_link_from_elsewhere(archive: Path) -> None:
    """A shard that is a hard link to a file in another folder."""
    name = shard_names(archive)[0]
    elsewhere = archive.parent.parent / f"elsewhere-{archive.parent.name}"
    elsewhere.mkdir()
    os.link(archive.parent / name, elsewhere / name)


def shard_is_a_master(archive: Path) -> None:
    """The master's one shard is another master (over the real shards, beside it)."""
    inner = archive.with_name("inner.h5")
    shutil.copy(archive, inner)
    with h5py.File(archive, "r") as f:
        group = index_group(f)
        keys = group["keys"][()]
        last = group["keys"][-1]
    n = len(keys)
    set_columns(archive, shard_name=np.array([b"inner.h5"]), shard_size=np.array([inner.stat().st_size], np.uint64),
                shard_crc32=np.array([0], np.uint64), shard_identity=np.array([identity(inner)], np.uint64),
                shard_entries=np.array([n], np.uint64), shard_first_key=keys[:1], shard_last_key=np.array([last]),
                shard=np.zeros(n, np.uint32), row=np.arange(n, dtype=np.uint64))


def many_rows_one_file(archive: Path) -> None:
    """A table of 200,000 rows, every one naming the same shard."""
    entries = np.zeros(200_000, np.uint64)
    entries[:3] = 2
    set_table(archive, shard_names(archive)[:1] * len(entries), entries)


def duplicate_names(archive: Path) -> None:
    """Three rows, one file: each names the first shard (with its size and identity)."""
    set_table(archive, shard_names(archive)[:1] * 3, np.full(3, 2, np.uint64))


ATTACKS: Dict[str, Callable[[Path], None]] = {f.__name__: f for f in (
    entries_wrap_uint64, entries_wrap_int64, entries_negative, size_huge, rows_huge, symlink_out_of_folder,
    symlink_in_folder, hard_link_from_elsewhere, shard_is_a_master, many_rows_one_file, duplicate_names)}


def test_crafted_masters_answer_in_one_line(tmp_path, master):
    cases = {}
    for name, attack in ATTACKS.items():
        archive = copy_master(master, tmp_path / name)
        attack(archive)
        cases[name] = archive
    runs = run_everything(cases, tmp_path, memory=MEMORY)
    found = failures(runs)
    assert not found, f"{len(found)} of {len(runs)} runs failed:\n" + "\n".join(found)
    # info and ls show the master's own index, opening no shard: a shard that is a master is
    # refused where shards are opened (verify, extract, the loaders).
    listed = {("shard_is_a_master", "info"), ("shard_is_a_master", "ls")}
    refused = [f"{r.case} {r.command}" for r in runs if r.status != 1 and (r.case, r.command) not in listed]
    assert not refused, f"read as if sound: {refused}"
    expected = {"symlink_out_of_folder": "symbolic link", "symlink_in_folder": "symbolic link",
                "hard_link_from_elsewhere": "hard links", "shard_is_a_master": "master of shards",
                "many_rows_one_file": "shards for 6 entries", "duplicate_names": "more than once",
                "entries_wrap_uint64": "outside 0 to", "entries_negative": "outside 0 to"}
    for run in runs:
        if run.case in expected and run.command in ("info", "ls", "verify", "extract") and run.status == 1:
            assert expected[run.case] in run.stdout + run.stderr, run.report("not the expected reason")


def test_a_plain_copied_folder_still_reads(tmp_path, master):
    """The good master, copied with its shards to another folder, reads as before."""
    archive = copy_master(master, tmp_path / "copy")
    with data2h5.open(archive, decode=False) as view:
        assert len(view) == 6 and all(len(view[k]) for k in view)
