"""Installed packages register named readers and prunes through entry points."""
from __future__ import annotations

import os
import sys

import h5py
import pytest

import data2h5


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution 'shapes-plugin' installed in a folder on sys.path (and PYTHONPATH, for
    spawned workers), registering reader 'shape' and prune 'only-b'."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "shapes_plugin.py").write_text(
        "import os\n"
        "import numpy as np\n"
        "def read(path):\n"
        "    return np.array([len(open(path, 'rb').read()), os.getpid()], dtype=np.int64)\n"
        "def only_b(filename, ext):\n"
        "    return filename.startswith('b') and filename.endswith(ext)\n"
    )
    info = site / "shapes_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shapes-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[data2h5.readers]\nshape = shapes_plugin:read\n\n[data2h5.prunes]\nonly-b = shapes_plugin:only_b\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *sys.path]))
    src = tmp_path / "src"
    src.mkdir()
    for name, size in (("a.dat", 3), ("b1.dat", 5), ("b2.dat", 7)):
        (src / name).write_bytes(b"x" * size)
    return src


@pytest.mark.parametrize("workers, start_method", [(1, None), (2, "spawn")])
def test_registered_reader_and_prune_by_name(installed_plugin, tmp_path, workers, start_method):
    out = tmp_path / "out.h5"
    report = data2h5.convert(installed_plugin, out, ext="dat", reader="shape", prune="only-b",
                             workers=workers, start_method=start_method)
    assert report.entries == 2
    with h5py.File(out, "r") as f:
        assert sorted(k for k in f if not k.startswith("__")) == ["b1.dat", "b2.dat"]
        sizes, pids = zip(*(f[k][()] for k in ("b1.dat", "b2.dat")))
        assert sizes == (5, 7)
        assert all((pid == os.getpid()) == (workers == 1) for pid in pids)  # resolved inside the worker
        assert f.attrs["reader"] == "shape" and f.attrs["prune"] == "only-b"


def test_unknown_name_says_what_is_accepted(installed_plugin, tmp_path):
    with pytest.raises(data2h5.PluginError, match=r"'nope'.*built-in.*module:function"):
        data2h5.convert(installed_plugin, tmp_path / "out.h5", ext="dat", reader="nope")
