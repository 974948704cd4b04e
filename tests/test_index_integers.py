"""Property: whatever number a crafted archive puts in any integer column of its index (or its
shard table, or a stacked archive's labels), every command and loader answers in one line.

For each layout an archive is converted from real images; each case sets one integer column of
it to an extreme value (0, -1, 2^31, 2^62, 2^63-1), in its first row or in every row, either in
the column's own type (where it wraps, as a crafted file's bytes would) or in a column rewritten
as int64. ``info``, ``ls``, ``verify``, ``extract``, ``H5Dataset``, ``data2h5.open`` and
``BatchReader`` each run on it in a process of their own under a memory limit: each must exit 0
or 1 with one line, never a traceback, a signal or a timeout.

By default each column meets one value, drawn at random from a seed (the draws differ from
column to column, so the run covers every value); ``DATA2H5_INTEGER_CASES=all`` runs every
column with every value, in every row and in the first, in both types.
"""
from __future__ import annotations

import itertools
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data2h5  # noqa: E402
from command_runs import failures, run_everything  # noqa: E402
from conftest import photo_like  # noqa: E402

pytestmark = pytest.mark.fuzz

EXTREMES = (0, -1, 1 << 31, 1 << 62, (1 << 63) - 1)
WHERE = ("first", "every")
TYPES = ("own", "int64")
ALL = os.environ.get("DATA2H5_INTEGER_CASES") == "all"
SEED = int(os.environ.get("DATA2H5_INTEGER_SEED", "26"))
LAYOUTS = {"files": {}, "bytes": {"reader": "bytes"}, "stacked": {"layout": "stacked"},
           "packed": {"reader": "bytes", "layout": "packed"}, "sharded": {"reader": "bytes", "shard_size": "2files"}}


class Case(NamedTuple):
    """One integer column set to one value."""

    layout: str
    column: str  # "index/NAME" or a root dataset's name
    value: int
    where: str  # one of WHERE
    type: str  # one of TYPES

    @property
    def name(self) -> str:
        return f"{self.layout} {self.column} = {self.value} ({self.where} row, {self.type} type)"


def index_group(f: h5py.File) -> h5py.Group:
    return h5py.Group(h5py.h5r.dereference(f.attrs["data2h5_index"], f.id))


def integer_columns(path: Path) -> List[str]:
    """The archive's integer columns: every integer dataset of its index, and its root datasets
    of integers (a stacked archive's labels)."""
    with h5py.File(path, "r") as f:
        columns = [f"index/{name}" for name, d in index_group(f).items()
                   if isinstance(d, h5py.Dataset) and d.dtype.kind in "iu"]
        columns += [name for name, d in f.items() if isinstance(d, h5py.Dataset) and d.dtype.kind in "iu"
                    and d.ndim == 1]
    return sorted(columns)


def cases_of(layout: str, columns: List[str]) -> List[Case]:
    if ALL:
        return [Case(layout, c, v, w, t) for c, v, w, t in itertools.product(columns, EXTREMES, WHERE, TYPES)]
    rng = random.Random(f"{SEED}-{layout}")
    return [Case(layout, c, rng.choice(EXTREMES), rng.choice(WHERE), rng.choice(TYPES)) for c in columns]


def craft(case: Case, archive: Path, folder: Path) -> Path:
    """A copy of ``archive`` (and of its shards, beside it) in ``folder`` with ``case`` applied."""
    folder.mkdir()
    for shard in archive.parent.glob(f"{archive.stem}-*.h5"):
        shutil.copy(shard, folder / shard.name)
    out = folder / archive.name
    shutil.copy(archive, out)
    with h5py.File(out, "r+") as f:
        parent = index_group(f) if case.column.startswith("index/") else f
        name = case.column.split("/", 1)[1] if case.column.startswith("index/") else case.column
        values = parent[name][()]
        if case.type == "int64":
            values = values.astype(np.int64)
            del parent[name]
        cell = (0,) * values.ndim if case.where == "first" else ...
        values[cell] = np.array(case.value).astype(np.int64).astype(values.dtype)  # wraps as stored bytes would
        if case.type == "int64":
            parent[name] = values
        else:
            parent[name][...] = values
    return out


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Dict[str, Path]:
    base = tmp_path_factory.mktemp("integers")
    src = base / "src"
    rng = np.random.default_rng(26)
    for i in range(6):
        path = src / f"c{i % 2}" / f"img_{i}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, photo_like(rng, 12, 12), extension=path.suffix)
    out = {}
    for layout, options in LAYOUTS.items():
        (base / layout).mkdir()
        out[layout] = Path(data2h5.convert(src, base / layout / "archive.h5", ext=["png", "jpg"], workers=1,
                                           progress=False, **options).output)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_extreme_integers_answer_in_one_line(tmp_path, archives, layout):
    columns = integer_columns(archives[layout])
    assert len(columns) >= 3, columns  # the crafting found the index
    cases = {}
    for n, case in enumerate(cases_of(layout, columns)):
        cases[case.name] = craft(case, archives[layout], tmp_path / f"case-{n}")
    runs = run_everything(cases, tmp_path, memory=2 << 30)
    found = failures(runs)
    assert not found, f"{len(found)} of {len(runs)} runs failed:\n" + "\n".join(found)
