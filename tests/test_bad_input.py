"""Bad input through the real command line: exit codes, one-line messages naming the file and
what to do, nothing half-written at OUT, and Ctrl-C that leaves no worker, temporary or shared
memory. Grouped by what is wrong: the files' bytes, what the paths are (links, pipes, folders),
permissions, files changing during a run, names and paths, the output, plugins, stopping."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Tuple

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

import data2h5
from data2h5 import format as fmt
from data2h5.partial import Partial
from convert_helpers import entry_kind, error_line, index, permissions_apply, run_cli, run_unprivileged
from data2h5.format import Kind
from data2h5.archive import ArchiveReader


def published(folder) -> list:
    """What a conversion left in ``folder``, less the part files it keeps for ``--resume``."""
    return sorted(n for n in os.listdir(folder) if ".data2h5-part" not in n)


@pytest.fixture
def src(tmp_path) -> Path:
    """Good PNGs in nested folders."""
    root = tmp_path / "src"
    rng = np.random.default_rng(5)
    for rel in ["a/one.png", "a/b/two.png", "c/three.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(root / rel, rng.integers(0, 255, (12, 14, 3), dtype=np.uint8))
    return root


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """OUT's folder, holding nothing else: whatever a run leaves there shows."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def convert_cli(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("convert", "--path-images", src, "--path-output", out, *extra, cwd=src.parent)


def one_line(done: subprocess.CompletedProcess) -> str:
    """The error of a -q run: exit code 1 and exactly one line on stderr."""
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return error_line(done.stderr)


# -- corrupt and unreadable files -------------------------------------------------------------


def truncated_png(path: Path) -> None:
    data = iio.imwrite("<bytes>", np.full((30, 30, 3), 7, np.uint8), extension=".png")
    path.write_bytes(data[: len(data) // 2])


def truncated_jpg(path: Path) -> None:
    data = iio.imwrite("<bytes>", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8),
                       extension=".jpg")
    path.write_bytes(data[: len(data) // 3])


CORRUPT = {
    "truncated.png": (truncated_png, "truncated"),
    "truncated.jpg": (truncated_jpg, "cannot read as image"),
    "garbage.jpg": (lambda p: p.write_bytes(b"this is not a jpeg at all"), "not a valid .jpg file"),
    "empty.png": (lambda p: p.write_bytes(b""), "the file is empty"),
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_image_fails_naming_file_and_reason(src, out_dir, name, workers):
    make, reason = CORRUPT[name]
    bad = src / "a" / "b" / name
    make(bad)
    done = convert_cli(src, out_dir / "out.h5", "--ext", "png", "--ext", "jpg", "--workers", workers, "-q")
    line = one_line(done)
    assert str(bad) in line and reason in line
    assert published(out_dir) == []  # no OUT (a resume may use the part files)


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_a_bad_file_says_how_to_go_on_without_it(src, out_dir, name):
    make, _ = CORRUPT[name]
    make(src / "a" / name)
    line = one_line(convert_cli(src, out_dir / "out.h5", "--ext", "png", "--ext", "jpg", "--workers", "1", "-q"))
    assert "--on-error skip" in line, line


@pytest.mark.parametrize("where, kept", [("a/0_first.png", False), ("z/last.png", True)])
def test_doing_what_a_bad_file_says_goes_on_without_it(src, out_dir, where, kept):
    """The hint is the command that works: with files kept from the stopped run, that is
    --resume --on-error skip; with none, --on-error skip alone."""
    (src / "m").mkdir()
    for i in range(12):  # enough work before the last file for a checkpoint to keep it
        iio.imwrite(src / "m" / f"{i:02d}.png", np.full((8, 8), i, np.uint8))
    bad = src / where
    bad.parent.mkdir(exist_ok=True)
    truncated_png(bad)
    out = out_dir / "out.h5"
    line = one_line(convert_cli(src, out, "--ext", "png", "--workers", "1", "--checkpoint-every", "0.001", "-q"))
    hint = ["--resume", "--on-error", "skip"] if "rerun with --resume --on-error skip" in line else ["--on-error", "skip"]
    assert ("--resume" in hint) == kept and "--on-error skip" in line, line
    done = convert_cli(src, out, "--ext", "png", "--workers", "1", *hint, "-q")
    assert done.returncode == 0, done.stderr
    assert skipped_keys(out) == [where]


def test_a_decoders_warnings_about_one_file_show_with_verbose_only(src, out_dir):
    """Pillow warns about palette PNGs whose transparency is given in bytes: a remark about one
    file, logged with -v, never printed raw in the middle of the progress bar."""
    from PIL import Image

    image = Image.fromarray((np.arange(64, dtype=np.uint8) % 4).reshape(8, 8), mode="L").convert("P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    image.save(src / "c" / "palette.png", transparency=bytes([0, 128, 255, 255]))
    quiet = convert_cli(src, out_dir / "a.h5", "--ext", "png", "--workers", "2")
    assert quiet.returncode == 0 and "Warning" not in quiet.stderr and "warnings.warn" not in quiet.stderr, quiet.stderr
    verbose = run_cli("-v", "convert", "--path-images", src, "--path-output", out_dir / "b.h5", "--ext", "png",
                      "--workers", "2", cwd=src.parent)
    assert verbose.returncode == 0 and "warnings.warn" not in verbose.stderr
    assert any(ln.startswith("INFO: ") and "palette.png" in ln and "Transparency" in ln
               for ln in verbose.stderr.splitlines()), verbose.stderr


def test_failure_after_a_progress_bar_still_ends_with_the_error(src, out_dir):
    truncated_png(src / "c" / "z_broken.png")
    done = convert_cli(src, out_dir / "out.h5", "--ext", "png")
    assert done.returncode == 1
    assert str(src / "c" / "z_broken.png") in error_line(done.stderr)
    assert published(out_dir) == []  # no OUT (a resume may use the part files)


def test_skip_lists_the_skipped_files_everywhere(src, out_dir):
    truncated_png(src / "a" / "bad1.png")
    (src / "c" / "bad2.png").write_bytes(b"")
    out = out_dir / "out.h5"
    done = convert_cli(src, out, "--ext", "png", "--on-error", "skip")
    assert done.returncode == 0, done.stderr
    summary = done.stderr[done.stderr.rindex("3 files, ") :]
    assert "2 skipped" in summary
    assert "a/bad1.png: cannot read as image" in summary and "c/bad2.png: cannot read as image" in summary
    assert index(out)["keys"] == ["a/b/two.png", "a/one.png", "c/three.png"]
    with h5py.File(out, "r") as f:
        skipped = json.loads(f.attrs[fmt.ATTR_SKIPPED])
    assert [k for k, _ in skipped] == ["a/bad1.png", "c/bad2.png"]
    assert "the file is empty" in skipped[1][1]
    assert sorted(os.listdir(out_dir)) == ["out.h5"]
    # the library's report says the same
    report = data2h5.convert(src, out_dir / "lib.h5", ext="png", on_error="skip", workers=2)
    assert report.skipped == [tuple(s) for s in skipped]


def test_skip_with_every_file_bad_writes_nothing(tmp_path, out_dir):
    root = tmp_path / "allbad"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    (root / "b.png").write_bytes(b"")
    done = convert_cli(root, out_dir / "out.h5", "--ext", "png", "--on-error", "skip", "-q")
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert "every matching file" in line and str(root) in line and "not a valid .png file" in line
    assert list(out_dir.iterdir()) == []


def skipped_keys(out: Path) -> list:
    with h5py.File(out, "r") as f:
        return [k for k, _ in json.loads(f.attrs[fmt.ATTR_SKIPPED])]


def fails_then_skips(src: Path, out_dir: Path, bad: Path, words: list, *extra: str) -> subprocess.CompletedProcess:
    """``bad`` stops a run in one line naming it, and is listed as skipped with --on-error skip."""
    out = out_dir / "out.h5"
    line = one_line(convert_cli(src, out, "--ext", "png", *extra, "-q"))
    assert str(bad) in line and all(w in line for w in words), line
    assert not out.exists()
    out = out_dir / "skipping.h5"  # a failed run may leave part files for --resume at the first
    done = convert_cli(src, out, "--ext", "png", "--on-error", "skip", *extra, "-q")
    assert done.returncode == 0, done.stderr
    assert skipped_keys(out) == [bad.relative_to(src).as_posix()]
    assert index(out)["keys"] == ["a/b/two.png", "a/one.png", "c/three.png"]
    return done


# -- things named like files that are not files -------------------------------------------------


NOT_FILES = {  # how a/gone.png is made, and the words of its message
    "dangling-symlink": (lambda p: p.symlink_to(p.parent / "nowhere.png"), ["broken symlink", "nowhere.png"]),
    "symlink-to-itself": (lambda p: p.symlink_to(p.name), ["symlink loop"]),
    "symlink-loop-of-two": (lambda p: (p.symlink_to("other.lnk"), (p.parent / "other.lnk").symlink_to(p.name)),
                            ["symlink loop"]),
    "named-pipe": (lambda p: os.mkfifo(p), ["not a regular file (a named pipe)", "--ext or --prune"]),
    "link-to-a-device": (lambda p: p.symlink_to(os.devnull), ["not a regular file (a character device)"]),
}


@pytest.mark.parametrize("case", sorted(NOT_FILES))
def test_what_cannot_be_read_as_a_file_is_reported_not_waited_on(src, out_dir, case):
    """Found by the walk, before any file is read: a pipe would otherwise block its reader forever."""
    make, words = NOT_FILES[case]
    bad = src / "a" / "gone.png"
    make(bad)
    fails_then_skips(src, out_dir, bad, [*words, "--on-error skip"])


def test_folder_named_like_a_file_is_walked_not_read(src, out_dir):
    (src / "x.png").mkdir()
    iio.imwrite(src / "x.png" / "inner.png", np.zeros((4, 4), np.uint8))
    (src / "a" / "empty.png").mkdir()
    (src / "linked.png").symlink_to("c", target_is_directory=True)
    out = out_dir / "out.h5"
    done = convert_cli(src, out, "--ext", "png", "-q")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert index(out)["keys"] == ["a/b/two.png", "a/one.png", "c/three.png", "x.png/inner.png"]
    done = convert_cli(src, out, "--ext", "png", "--follow-symlinks", "--overwrite", "-q")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert index(out)["keys"] == ["a/b/two.png", "a/one.png", "c/three.png", "linked.png/three.png",
                                  "x.png/inner.png"]


FOLDER_LOOPS = {  # links to make, relative to the source folder
    "to-itself": {"a/self": "."},
    "to-its-parent": {"a/b/up": ".."},
    "to-the-source-folder": {"c/top": "../"},
    "mutual": {"a/to_c": "../c", "c/to_a": "../a"},
}
MUTUAL_FOLLOWED = ["a/b/two.png", "a/one.png", "a/to_c/three.png", "c/three.png", "c/to_a/b/two.png",
                   "c/to_a/one.png"]


@pytest.mark.parametrize("follow", [False, True], ids=["not-followed", "followed"])
@pytest.mark.parametrize("case", sorted(FOLDER_LOOPS))
def test_folder_symlink_loops_end(src, out_dir, case, follow):
    """Not followed, a linked folder is left out; followed, a link back to a folder above it is
    not entered (with a warning naming it), so every walk ends and every file appears once per name."""
    for link, target in FOLDER_LOOPS[case].items():
        (src / link).symlink_to(target, target_is_directory=True)
    out = out_dir / "out.h5"
    done = convert_cli(src, out, "--ext", "png", "-q", *(["--follow-symlinks"] if follow else []))
    assert done.returncode == 0, done.stderr
    keys = index(out)["keys"]
    if not follow:
        assert keys == ["a/b/two.png", "a/one.png", "c/three.png"] and done.stderr == ""
        return
    assert keys == (MUTUAL_FOLLOWED if case == "mutual" else ["a/b/two.png", "a/one.png", "c/three.png"])
    warnings = done.stderr.splitlines()
    assert warnings and all("links back to a folder above it" in w for w in warnings), done.stderr
    assert "Traceback" not in done.stderr


# -- permissions ------------------------------------------------------------------------------

def convert_unprivileged(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_unprivileged(sys.executable, "-m", "data2h5.cli", "convert", "--path-images", src,
                            "--path-output", out, "--ext", "png", *extra, cwd=src.parent)


@pytest.fixture
def locked(src, tmp_path):
    """chmod 0 what a test names, and give the permissions back after it (so its folder can be removed)."""
    permissions_apply(tmp_path)
    changed = []

    def lock(path: Path, mode: int = 0) -> Path:
        changed.append((path, path.stat().st_mode))
        path.chmod(mode)
        return path

    yield lock
    for path, mode in reversed(changed):
        path.chmod(mode)


def test_unreadable_file_fails_naming_it_or_is_skipped(src, out_dir, locked):
    bad = locked(src / "a" / "one.png")
    out = out_dir / "out.h5"
    done = convert_unprivileged(src, out, "-q")
    line = one_line(done)
    assert str(bad) in line and "cannot open: Permission denied" in line
    assert not out.exists()
    out = out_dir / "skipping.h5"
    done = convert_unprivileged(src, out, "--on-error", "skip", "-q")
    assert done.returncode == 0, done.stderr
    assert skipped_keys(out) == ["a/one.png"] and index(out)["keys"] == ["a/b/two.png", "c/three.png"]


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_unlistable_folder_stops_the_run_naming_it(src, out_dir, locked, on_error):
    """Its files cannot even be named, so they cannot be listed as skipped: the run stops."""
    folder = locked(src / "a" / "b")
    out = out_dir / "out.h5"
    line = one_line(convert_unprivileged(src, out, "--on-error", on_error, "-q"))
    assert f"{folder}: cannot list this folder (Permission denied)" in line and "make it readable" in line
    assert not out.exists()


def test_unreadable_source_folder_is_named(src, out_dir, locked):
    locked(src)
    line = one_line(convert_unprivileged(src, out_dir / "out.h5", "-q"))
    assert f"{src}: cannot list this folder (Permission denied)" in line
    assert os.listdir(out_dir) == []


def test_read_only_output_folder_is_refused_naming_it(src, out_dir, locked):
    locked(out_dir, 0o555)
    out = out_dir / "out.h5"
    line = one_line(convert_unprivileged(src, out, "-q"))
    assert f"cannot write {out}" in line and "Permission denied" in line and "a folder you can write to" in line
    assert os.listdir(out_dir) == []


# -- files that change while the run is under way -------------------------------------------------


# A prune plugin runs during the walk, file by file in walk order: on the last file it changes
# one already walked, as another program could between the walk and the read.
CHANGER = """
import os, shutil

def prune(name, ext):
    if name == "three.png":
        target = {target!r}
        {action}
    return name.endswith(ext)
"""
CHANGES = {
    "deleted": ("os.remove(target)", ["cannot open: No such file or directory"]),
    "replaced-by-a-folder": ("os.remove(target); os.mkdir(target)", ["cannot open: Is a directory"]),
}


def changer(src: Path, action: str) -> str:
    plugin = src.parent / "changer.py"
    plugin.write_text(CHANGER.format(target=str(src / "a" / "one.png"), action=action))
    return f"{plugin}:prune"


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("case", sorted(CHANGES))
def test_file_gone_after_the_walk(src, out_dir, case, workers):
    action, words = CHANGES[case]
    spec = changer(src, action)
    out = out_dir / "out.h5"
    line = one_line(convert_cli(src, out, "--ext", "png", "--prune", spec, "--workers", workers, "-q"))
    assert str(src / "a" / "one.png") in line and all(w in line for w in words), line
    assert not out.exists()
    if case == "replaced-by-a-folder":
        os.rmdir(src / "a" / "one.png")
    iio.imwrite(src / "a" / "one.png", np.zeros((3, 3), np.uint8))
    out = out_dir / "skipping.h5"
    done = convert_cli(src, out, "--ext", "png", "--prune", spec, "--workers", workers, "--on-error", "skip", "-q")
    assert done.returncode == 0, done.stderr
    assert skipped_keys(out) == ["a/one.png"] and index(out)["keys"] == ["a/b/two.png", "c/three.png"]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("reader", ["auto", "bytes"])
def test_file_rewritten_after_the_walk_is_stored_as_read(src, out_dir, reader, workers):
    """What is stored is what was read, checksummed as read: size and CRC-32 of the new bytes."""
    new = iio.imwrite("<bytes>", np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3), extension=".png")
    (src.parent / "new.png").write_bytes(new)
    spec = changer(src, f"shutil.copyfile({str(src.parent / 'new.png')!r}, target)")
    out = out_dir / "out.h5"
    done = convert_cli(src, out, "--ext", "png", "--prune", spec, "--reader", reader, "--workers", workers, "-q")
    assert done.returncode == 0, done.stderr
    assert (src / "a" / "one.png").read_bytes() == new
    cols = index(out)
    pos = cols["keys"].index("a/one.png")
    assert (int(cols["size"][pos]), int(cols["crc32"][pos])) == (len(new), zlib.crc32(new))
    with ArchiveReader(out) as archive:  # the stored bytes' checksums hold too
        value = archive.read(pos)
    np.testing.assert_array_equal(value, iio.imread(new))


# -- names and paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "folder"])
def test_name_that_is_not_utf8(src, out_dir, where):
    folder = os.fsencode(src / "a")
    if where == "folder":
        folder = os.path.join(folder, b"caf\xe9")
        os.mkdir(folder)
    name = b"pic.png" if where == "folder" else b"pic\xff.png"
    fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, (src / "a" / "one.png").read_bytes())
    os.close(fd)
    shown = "a/caf\\xe9/pic.png" if where == "folder" else "a/pic\\xff.png"
    out = out_dir / "out.h5"
    line = one_line(convert_cli(src, out, "--ext", "png", "-q"))
    assert f"{src}/{shown}: file name is not valid UTF-8" in line and "--on-error skip" in line
    assert not out.exists()
    done = convert_cli(src, out, "--ext", "png", "--on-error", "skip")
    assert done.returncode == 0, done.stderr
    assert f"skipped: {shown}: file name is not valid UTF-8" in done.stderr
    assert skipped_keys(out) == [shown]


def deep_folder(root: Path, path_max: int) -> Tuple[int, str]:
    """Nest 200-byte folder names under ``root`` until the path is within 210 bytes of
    ``path_max``: a short name fits below it, a 250-byte one does not. Returns an open
    descriptor of the deepest and its path (``dir_fd`` reaches where paths cannot)."""
    fd, path = os.open(root, os.O_RDONLY), str(root)
    while len(os.fsencode(path)) + 201 < path_max - 8:
        name = f"{path.count('/'):03d}" + "d" * 197
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, path = child, f"{path}/{name}"
    return fd, path


def make_file(fd: int, name: str, data: bytes) -> None:
    out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, data)
    os.close(out)


@pytest.mark.parametrize("too_long", ["file", "folder"])
def test_path_too_long_to_open(tmp_path, out_dir, too_long):
    """A path of PATH_MAX bytes or more cannot be opened: it is reported, naming it and what to
    do, before any file is read. A key of over 3500 bytes below the limit is stored and reads back."""
    root = tmp_path / "deep"
    root.mkdir()
    path_max = os.pathconf(root, "PC_PATH_MAX")
    fd, deepest = deep_folder(root, path_max)
    name = "n" * 246 + ".png" if too_long == "file" else "f" * 250
    try:
        make_file(fd, "ok.png", b"fits")
        if too_long == "file":
            make_file(fd, name, b"too deep")
        else:
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY, dir_fd=fd)
            make_file(sub, "x.png", b"too deep")
            os.close(sub)
    finally:
        os.close(fd)
    ok_key = os.path.relpath(f"{deepest}/ok.png", root)
    assert len(ok_key) > path_max - 600

    out = out_dir / "out.h5"
    for on_error in ("fail", "skip") if too_long == "folder" else ("fail",):  # a folder's files have no names to skip
        line = one_line(run_cli("convert", "--path-images", root, "--path-output", out, "--ext", "png",
                                "--reader", "bytes", "--on-error", on_error, "-q", cwd=tmp_path))
        assert f"{deepest}/{name}: the path is" in line
        assert "longer than the system can open" in line and "shorten the folder names" in line
        assert not out.exists()
    if too_long == "folder":
        return
    done = run_cli("convert", "--path-images", root, "--path-output", out, "--ext", "png", "--reader", "bytes",
                   "--on-error", "skip", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert index(out)["keys"] == [ok_key]
    assert skipped_keys(out) == [os.path.relpath(f"{deepest}/{name}", root)]
    with ArchiveReader(out) as archive:
        assert archive.read(0, decode=False).tobytes() == b"fits"


# -- empty files ------------------------------------------------------------------------------


def test_empty_files_per_reader(tmp_path, out_dir):
    root = tmp_path / "empty"
    root.mkdir()
    for name in ["e.png", "e.txt", "e.bin", "e.npy"]:
        (root / name).write_bytes(b"")
    done = convert_cli(root, out_dir / "bytes.h5", "--ext", "png", "--ext", "txt", "--ext", "bin", "--ext", "npy",
                       "--reader", "bytes", "-q")
    assert done.returncode == 0, done.stderr
    with h5py.File(out_dir / "bytes.h5", "r") as f:
        for name in ["e.png", "e.txt", "e.bin", "e.npy"]:
            assert f[name].shape == (0,) and f[name].dtype == np.uint8
    assert index(out_dir / "bytes.h5")["size"].tolist() == [0, 0, 0, 0]
    done = convert_cli(root, out_dir / "text.h5", "--ext", "txt", "-q")  # auto: text
    assert done.returncode == 0, done.stderr
    with h5py.File(out_dir / "text.h5", "r") as f:
        assert entry_kind(f["e.txt"]) == Kind.TEXT and f["e.txt"].shape == (0,)
    for ext, reader in [("png", "image"), ("npy", "npy")]:
        reason = f"cannot read as {reader}: the file is empty"
        line = one_line(convert_cli(root, out_dir / f"{ext}.h5", "--ext", ext, "-q"))
        assert str(root / f"e.{ext}") in line and reason in line
        assert not (out_dir / f"{ext}.h5").exists()


# -- the output -------------------------------------------------------------------------------


def test_existing_output_is_refused_then_replaced_with_overwrite(src, out_dir):
    out = out_dir / "out.h5"
    out.write_bytes(b"precious data")
    line = one_line(convert_cli(src, out, "--ext", "png", "-q"))
    assert str(out) in line and "--overwrite" in line
    assert out.read_bytes() == b"precious data"
    done = convert_cli(src, out, "--ext", "png", "--overwrite", "-q")
    assert done.returncode == 0, done.stderr
    assert index(out)["keys"] == ["a/b/two.png", "a/one.png", "c/three.png"]
    assert sorted(os.listdir(out_dir)) == ["out.h5"]


def test_failed_overwrite_keeps_the_old_output(src, out_dir):
    out = out_dir / "out.h5"
    out.write_bytes(b"precious data")
    truncated_png(src / "a" / "bad.png")
    line = one_line(convert_cli(src, out, "--ext", "png", "--overwrite", "-q"))
    assert "bad.png" in line
    assert out.read_bytes() == b"precious data" and published(out_dir) == ["out.h5"]


@pytest.mark.parametrize(
    "case, words",
    [
        ("dir-missing", ["does not exist"]),
        ("dir-is-a-file", ["is not a folder"]),
        ("no-match", ["no file under", "--ext .gif"]),
        ("no-ext", ["no extension given", "--ext"]),
        ("out-folder-missing", ["does not exist", "create"]),
        ("out-is-a-folder", ["is a folder"]),
        ("bad-compression", ["unknown compression 'brotli'"]),
    ],
)
def test_bad_arguments_give_a_clear_message(src, out_dir, case, words):
    source, out, extra = src, out_dir / "out.h5", ["--ext", "png"]
    if case == "dir-missing":
        source = src.parent / "nope"
    elif case == "dir-is-a-file":
        source = src / "a" / "one.png"
    elif case == "no-match":
        extra = ["--ext", "gif"]
    elif case == "no-ext":
        extra = []
    elif case == "out-folder-missing":
        out = out_dir / "missing" / "out.h5"
    elif case == "out-is-a-folder":
        out = out_dir / "sub"
        out.mkdir()
        extra += ["--overwrite"]
    elif case == "bad-compression":
        extra += ["--compression", "brotli"]
    line = one_line(convert_cli(source, out, *extra, "-q"))
    assert all(w in line for w in words), line
    if case.startswith("dir"):
        assert str(source) in line
    assert [p.name for p in out_dir.iterdir()] == (["sub"] if case == "out-is-a-folder" else [])


# -- plugins ----------------------------------------------------------------------------------


PLUGINS = {
    "import": ("import no_such_package_here\n\ndef read(path):\n    return b''\n", "read", False,
               "ModuleNotFoundError"),
    "missing": ("def reed(path):\n    return b''\n", "read", False, "has no function 'read'"),
    "raises": ("def read(path):\n    raise RuntimeError('unsupported header')\n", "read", True,
               "RuntimeError: unsupported header"),
    "dict": ("def read(path):\n    return {'pixels': []}\n", "read", True, "returned dict"),
    "none": ("def read(path):\n    return None\n", "read", True, "returned NoneType"),
    "object-array": ("import numpy as np\n\ndef read(path):\n    return np.array([1, 'a'], dtype=object)\n", "read",
                     True, "returned an array of object"),
    "str-array": ("import numpy as np\n\ndef read(path):\n    return np.array(['a', 'bc'])\n", "read", True,
                  "returned an array of <U2"),
}


@pytest.mark.parametrize("case", sorted(PLUGINS))
def test_plugin_errors_through_the_cli(src, out_dir, case):
    source, func, per_file, reason = PLUGINS[case]
    plugin = src.parent / f"plugin_{case}.py"
    plugin.write_text(source)
    spec = f"{plugin}:{func}"
    line = one_line(convert_cli(src, out_dir / "out.h5", "--ext", "png", "--reader", spec, "-q"))
    assert spec in line and reason in line
    if per_file:
        assert str(src / "a" / "b" / "two.png") in line  # the first file in walk order
    assert published(out_dir) == []  # no OUT (a resume may use the part files)


def test_plugin_file_that_does_not_exist(src, out_dir):
    line = one_line(convert_cli(src, out_dir / "out.h5", "--ext", "png", "--reader", "nothere.py:read", "-q"))
    assert "nothere.py" in line and "no such file" in line


def test_worker_that_dies_is_reported(src, out_dir):
    plugin = src.parent / "crash.py"
    plugin.write_text("import os\n\ndef read(path):\n    if path.endswith('three.png'):\n        os._exit(3)\n"
                      "    return b'ok'\n")
    line = one_line(convert_cli(src, out_dir / "out.h5", "--ext", "png", "--workers", "2",
                                "--reader", f"{plugin}:read", "-q"))
    assert "worker process died" in line and "--workers 1" in line
    assert published(out_dir) == []  # no OUT (a resume may use the part files)


# -- Ctrl-C -----------------------------------------------------------------------------------


SLOW_READER = """
import time

def read(path):
    with open({log!r}, "a") as log:  # the test waits for work to be under way
        log.write(path + "\\n")
    time.sleep(0.02)
    with open(path, "rb") as fh:
        return fh.read()
"""
SPAWN_DRIVER = (
    "import sys, data2h5\n"
    "try:\n"
    "    data2h5.convert(sys.argv[1], sys.argv[2], ext='dat', reader=sys.argv[3], workers=2,\n"
    "                    start_method='spawn', progress=True)\n"
    "except KeyboardInterrupt:\n"
    "    sys.exit(130)\n"
)
N_SLOW = 400


def proc_state(pid: int) -> str:
    """'' when the process is gone, else its state letter (Z: a zombie, which runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def descendants(pid: int) -> set:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def mapped_shm_dirs(pid: int) -> set:
    """The /dev/shm/data2h5-* folders a process has mapped: the slots of this very run."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return {m.group(1) for m in re.finditer(r"(/dev/shm/data2h5-[^/\s]+)/", fh.read())}
    except OSError:
        return set()


def running_with(marker: str) -> set:
    """Live processes whose command line mentions ``marker`` (fork workers share the parent's)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read() and proc_state(int(entry)) not in ("", "Z"):
                        found.add(int(entry))
            except OSError:
                pass
    return found


STOPS = [  # how it runs, the signal, sent to the process group (as a terminal does) or the writer only
    pytest.param("cli-workers-2", signal.SIGINT, True, id="ctrl-c"),
    pytest.param("cli-in-process", signal.SIGINT, True, id="ctrl-c-in-process"),
    pytest.param("library-spawn", signal.SIGINT, True, id="ctrl-c-spawn"),
    pytest.param("cli-workers-2", signal.SIGINT, False, id="sigint-writer-only"),
    pytest.param("cli-workers-2", signal.SIGTERM, False, id="sigterm"),
    pytest.param("cli-workers-2", signal.SIGKILL, False, id="sigkill"),
]
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the workers")
@pytest.mark.parametrize("how, sig, group", STOPS)
def test_stopping_a_run_leaves_no_output_and_no_process(tmp_path, out_dir, how, sig, group):
    """Ctrl-C (and kill): exit 130 (143 for SIGTERM), no OUT, only the part files a resume
    can use beside it, no worker left running, and the run's shared-memory slots removed.
    SIGKILL cannot clean up, but its workers still end and OUT is not written."""
    source = tmp_path / "slow"
    source.mkdir()
    for i in range(N_SLOW):
        (source / f"{i:04d}.dat").write_bytes(b"%d" % i)
    reader = tmp_path / "slow_reader.py"
    log = tmp_path / "read.log"
    reader.write_text(SLOW_READER.format(log=str(log)))
    out = out_dir / "out.h5"
    if how == "library-spawn":
        cmd = [sys.executable, "-c", SPAWN_DRIVER, str(source), str(out), f"{reader}:read"]
    else:
        workers = "2" if how == "cli-workers-2" else "1"
        cmd = [sys.executable, "-m", "data2h5.cli", "convert", "--path-images", str(source), "--path-output",
               str(out), "--ext", "dat", "--reader", f"{reader}:read", "--workers", workers]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    stderr = []
    pump = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read1(4096), b"")), daemon=True)
    pump.start()
    children, ours = set(), set()
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_text().count("\n") >= 10):  # well under way
            assert proc.poll() is None and time.monotonic() < deadline, b"".join(stderr).decode(errors="replace")
            time.sleep(0.05)
        children = descendants(proc.pid)
        ours = mapped_shm_dirs(proc.pid)
        if how != "cli-in-process":
            assert len(children) >= 2 and ours, (children, ours)  # workers and their shared slots
        (os.killpg if group else os.kill)(proc.pid, sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = {p for p in children if proc_state(p) not in ("", "Z")} | running_with(str(tmp_path))
            if not alive:
                break
            time.sleep(0.1)
        for pid in alive:  # do not leave them behind even when the test fails
            os.kill(pid, signal.SIGKILL)
    pump.join(timeout=10)
    text = b"".join(stderr).decode(errors="replace")

    assert rc == EXIT_CODES[sig], text
    assert not alive, f"processes left running: {alive}"
    assert not out.exists()
    partial = Partial(out)
    part_files = {partial.part(1).name, partial.journal(1).name}
    if sig == signal.SIGKILL:  # nothing could run; what is left is the part files and the lock
        assert {p.name for p in out_dir.iterdir()} <= part_files | {partial.lock_path.name}
        for folder in ours:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if how.startswith("cli"):
        word = "terminated" if sig == signal.SIGTERM else "interrupted"
        assert f"{word}; nothing was written to {out}" in text
        if partial.files():
            assert "rerun with --resume to go on" in text
    assert "Traceback" not in text
    assert {p.name for p in out_dir.iterdir()} <= part_files  # no OUT, no lock
    assert not any(os.path.exists(d) for d in ours), ours
