"""Helpers shared by the conversion and command-line tests: a realistic source tree, running
the real CLI in a subprocess, and reading what an archive holds."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

from images import photo_like
from data2h5 import format as fmt
from data2h5.format import Kind
from data2h5.archive import read_index

REPO = Path(__file__).resolve().parent.parent
#: The installed console script of the interpreter running the tests.
CONSOLE_SCRIPT = Path(sys.executable).with_name("data2h5")


@dataclass
class Tree:
    """A source folder and what a conversion of it must hold."""

    root: Path
    images: Dict[str, Path]  # key -> source, for --ext png --ext jpg without following links
    linked: Dict[str, Path] = field(default_factory=dict)  # also there with follow_symlinks
    others: List[Path] = field(default_factory=list)  # files of other types


def build_tree(base: Path) -> Tree:
    """Icons of several sizes (grey, RGB, RGBA; PNG and JPEG) in nested folders, with files of
    other types around them, a symlinked file, symlinked folders (one outside the tree, one
    inside) and a folder symlink that loops back to the root."""
    root, outside = base / "src", base / "outside"
    rng = np.random.default_rng(7)
    images: Dict[str, Path] = {}

    def image(rel: str, size: int, channels: int, folder: Path = root) -> Path:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        ext = path.suffix.lower()
        iio.imwrite(path, photo_like(rng, size, size + 3, channels), extension=ext)
        return path

    specs = [  # relative path, size, channels (0: grey)
        ("icons/16/app.png", 16, 4),
        ("icons/16/app_grey.png", 16, 0),
        ("icons/32/app.png", 32, 3),
        ("icons/48/app.jpg", 48, 3),
        ("icons/64/APP_GREY.JPG", 64, 0),
        ("icons/128/logo.png", 128, 4),
        ("photos/a.b.png", 24, 3),  # sorts before photos/a/...
        ("photos/a/deep/er/pic.png", 20, 0),
        ("photos/a/deep/x.jpg", 40, 0),
        ("top.png", 12, 3),
    ]
    for rel, size, channels in specs:
        images[rel] = image(rel, size, channels)
    others = []
    for rel, content in [
        ("icons/readme.txt", b"icons of several sizes\n"),
        ("icons/16/.DS_Store", b"\x00\x01garbage"),
        ("photos/a/x.jpeg", b"not matched by --ext jpg"),
        ("photos/a/deep/notes.md", b"# notes\n"),
        ("data/table.csv", b"a,b\n1,2\n"),
        ("data/blob.bin", bytes(range(256))),
        ("png", b"a file named like an extension"),
        ("icons/app.png.bak", b"backup"),
    ]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        others.append(path)
    np.save(root / "data" / "arr.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    others.append(root / "data" / "arr.npy")

    # a symlinked file is stored under its own name, with its target's content
    (root / "link_to_app.png").symlink_to(Path("icons") / "32" / "app.png")
    images["link_to_app.png"] = root / "link_to_app.png"
    # symlinked folders: only walked with follow_symlinks
    linked = {
        "linked_dir/img.png": image("img.png", 18, 3, outside),
        "linked_dir/sub/img2.jpg": image("sub/img2.jpg", 22, 0, outside),
    }
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(Path("icons") / "16", target_is_directory=True)
    linked["alias/app.png"] = root / "icons" / "16" / "app.png"
    linked["alias/app_grey.png"] = root / "icons" / "16" / "app_grey.png"
    # a loop: icons/loop -> .. (the root); never entered, even when following links
    (root / "icons" / "loop").symlink_to("..", target_is_directory=True)
    return Tree(root, images, linked, others)


def run_cli(*args: str, cwd: Path, env: Optional[dict] = None, timeout: float = 120,
            launcher: str = "module") -> subprocess.CompletedProcess:
    """Run ``data2h5 ARGS`` as users do: ``python -m data2h5.cli`` or the console script."""
    cmd = [str(CONSOLE_SCRIPT)] if launcher == "script" else [sys.executable, "-m", "data2h5.cli"]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def index_group(f: h5py.File) -> h5py.Group:
    """An archive's index group, which no root listing shows (see data2h5.format)."""
    return f[f.attrs[fmt.ATTR_INDEX]]


def index(path: Path) -> Dict[str, np.ndarray]:
    """The archive's index columns, keys decoded."""
    with h5py.File(path, "r") as f:
        group = index_group(f)
        cols = {name: group[name][()] for name in group if name != fmt.INDEX_SELF}
    cols["keys"] = [k.decode("utf-8") for k in cols["keys"]]
    return cols


def filter_ids(ds: h5py.Dataset) -> List[int]:
    """The HDF5 filter ids in a dataset's pipeline (1 = deflate, 32000 = lzf, ...)."""
    plist = ds.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


def entry_kind(ds: h5py.Dataset) -> Kind:
    """The entry's kind, as the archive's index records it."""
    index = read_index(ds.file)
    return Kind(int(index.kind[index.position(ds.name.lstrip("/"))]))


def stored_value(ds: h5py.Dataset):
    """What an entry holds as its reader returned it: array, bytes or str."""
    kind = entry_kind(ds)
    data = ds[()]
    if kind == Kind.BYTES:
        return data.tobytes()
    if kind == Kind.TEXT:
        return data.tobytes().decode("utf-8")
    return data


def error_line(stderr: str) -> str:
    """The last line of stderr (after any progress bar), checked to be data2h5's error line."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("data2h5: error: "), stderr
    return lines[-1]


# -- permissions, also as root ---------------------------------------------------------------

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _drop_permission_override() -> None:
    """In the child, before exec: root gives up reading and writing past file permissions."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_unprivileged(*args, cwd: Path) -> subprocess.CompletedProcess:
    """A command as a user bound by file permissions. Root (CI containers) is made one by
    dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set before exec."""
    return subprocess.run([*map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          preexec_fn=_drop_permission_override)


def permissions_apply(tmp_path: Path) -> None:
    """Skip the test unless ``run_unprivileged`` is really refused a file it may not read."""
    if not sys.platform.startswith("linux"):
        pytest.skip("drops root's permission override with Linux prctl")
    probe = tmp_path / "probe"
    probe.write_text("secret")
    probe.chmod(0)
    try:
        done = run_unprivileged("cat", probe, cwd=tmp_path)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot drop root's permission override here: {exc}")
    finally:
        probe.unlink()
    if done.returncode == 0:
        pytest.skip("this user reads files whatever their permissions")
