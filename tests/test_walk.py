"""The walk: sorted keys, the output never included, symlinks, names that cannot be keys."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import data2h5
from data2h5 import format as fmt
from data2h5.errors import ReadError
from data2h5.walk import walk
from data2h5.partial import Partial
from convert_helpers import build_tree, error_line, index, run_cli

NAMES = ["b", "a.b", "a/x", "a/y/z", "a-b", "A", "a0", "é", "z/ä", "a/x0", "_", "~", "10", "9"]


def write(root: Path, rel: str, data: bytes = b"x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def keys_of(root: Path, **kw) -> list:
    return [f.key for f in walk(str(root), **kw)]


def test_keys_come_in_plain_sorted_order(tmp_path):
    # creation order is not the order on disk nor the sorted one
    for rel in NAMES:
        write(tmp_path / "src", rel + ".dat", rel.encode())
    keys = keys_of(tmp_path / "src")
    assert keys == sorted(rel + ".dat" for rel in NAMES)
    assert keys == sorted(keys, key=lambda k: k.encode("utf-8"))  # the order of the index's bytes


def test_index_order_is_the_walk_order_and_reproducible(tmp_path):
    for rel in NAMES:
        write(tmp_path / "src", rel + ".dat", rel.encode())
    data2h5.convert(tmp_path / "src", tmp_path / "one.h5", ext="dat", workers=2)
    data2h5.convert(tmp_path / "src", tmp_path / "two.h5", ext="dat", workers=1)
    assert index(tmp_path / "one.h5")["keys"] == index(tmp_path / "two.h5")["keys"] == keys_of(tmp_path / "src")


def test_walk_yields_openable_paths_and_relative_keys(tmp_path):
    tree = build_tree(tmp_path)
    found = {f.key: f.path for f in walk(str(tree.root))}
    for key, src in tree.images.items():
        assert Path(found[key]).read_bytes() == src.read_bytes()
    assert all("\\" not in k and not k.startswith("/") for k in found)


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_inside_the_source_is_never_included(tmp_path, overwrite):
    src = tmp_path / "src"
    write(src, "a/one.h5", b"1")
    write(src, "z/two.h5", b"2")
    out = src / "out.h5"
    if overwrite:  # an earlier archive, and the part file of a killed run
        out.write_bytes(b"old archive")
        Partial(out).part(1).write_bytes(b"stale part")
    report = data2h5.convert(src, out, ext="h5", reader="bytes", overwrite=overwrite, workers=2)
    assert index(out)["keys"] == ["a/one.h5", "z/two.h5"] and report.entries == 2
    assert not Partial(out).files()
    # and the walk itself: the exact output path, and its part file, whatever they are called
    excluded = [src / "archive.bin", Partial(src / "archive.bin").part(1)]
    for path in excluded:
        path.write_bytes(b"being written")
    assert keys_of(src, exclude=[str(p) for p in excluded]) == ["a/one.h5", "out.h5", "z/two.h5"]


def test_symlinked_output_target_is_excluded(tmp_path):
    """A link in the source pointing at the output is the output: never read while written."""
    src = tmp_path / "src"
    write(src, "a.bin")
    (src / "b.bin").symlink_to(tmp_path / "out.bin")
    (tmp_path / "out.bin").write_bytes(b"old")
    assert keys_of(src, exclude=[str(tmp_path / "out.bin")]) == ["a.bin"]


def test_symlinks_default_and_followed(tmp_path):
    tree = build_tree(tmp_path)
    default = keys_of(tree.root)
    assert [k for k in default if k.endswith((".png", ".jpg", ".JPG"))] == sorted(tree.images)
    assert "link_to_app.png" in default  # a symlinked file is a file
    assert not any(k.startswith(("linked_dir/", "alias/", "icons/loop/")) for k in default)

    followed = keys_of(tree.root, follow_symlinks=True)
    assert set(default) < set(followed)
    images = [k for k in followed if k.endswith((".png", ".jpg", ".JPG"))]
    assert images == sorted({**tree.images, **tree.linked})
    assert not any("loop" in k for k in followed)  # entered once? never: it points above itself
    assert followed == sorted(followed)


def test_a_folder_linked_twice_is_walked_under_each_name(tmp_path):
    """A link to a sibling folder is not a loop: both names are kept, the real folder too."""
    src = tmp_path / "src"
    write(src, "real/f.dat")
    (src / "0link").symlink_to("real", target_is_directory=True)
    (src / "zlink").symlink_to("real", target_is_directory=True)
    assert keys_of(src, follow_symlinks=True) == ["0link/f.dat", "real/f.dat", "zlink/f.dat"]
    assert keys_of(src) == ["real/f.dat"]


def test_mutual_symlink_loops_end(tmp_path):
    src = tmp_path / "src"
    write(src, "a/f.dat")
    write(src, "b/g.dat")
    (src / "a" / "to_b").symlink_to(src / "b", target_is_directory=True)
    (src / "b" / "to_a").symlink_to(src / "a", target_is_directory=True)
    assert keys_of(src, follow_symlinks=True) == ["a/f.dat", "a/to_b/g.dat", "b/g.dat", "b/to_a/f.dat"]


# -- names that are not valid UTF-8 -----------------------------------------------------------


def bad_name_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write(src, "good.png.bin", b"good")
    write(src, "sub/ok.bin", b"ok")
    fd = os.open(os.path.join(os.fsencode(src / "sub"), b"bad\xff.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"bad name")
    os.close(fd)
    return src


def test_undecodable_name_fails_by_default_naming_it(tmp_path):
    src = bad_name_tree(tmp_path)
    with pytest.raises(ReadError) as exc:
        data2h5.convert(src, tmp_path / "out.h5", ext="bin", workers=1)
    message = str(exc.value)
    assert "sub/bad\\xff.bin" in message and "not valid UTF-8" in message and "--on-error skip" in message
    message.encode("utf-8")  # printable as it is: no lone surrogates
    assert not (tmp_path / "out.h5").exists()


def test_undecodable_name_is_skipped_and_listed(tmp_path):
    src = bad_name_tree(tmp_path)
    out = tmp_path / "out.h5"
    report = data2h5.convert(src, out, ext="bin", on_error="skip", workers=2)
    assert index(out)["keys"] == ["good.png.bin", "sub/ok.bin"]
    assert [k for k, _ in report.skipped] == ["sub/bad\\xff.bin"]
    assert "not valid UTF-8" in report.skipped[0][1]
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs[fmt.ATTR_SKIPPED]) == [list(s) for s in report.skipped]
        assert f.attrs[fmt.ATTR_ENTRIES] == 2


def test_undecodable_name_through_the_cli(tmp_path):
    src = bad_name_tree(tmp_path)
    failed = run_cli("convert", "--path-images", src, "--path-output", tmp_path / "out.h5", "--ext", "bin",
                     "-q", cwd=tmp_path)
    assert failed.returncode == 1
    assert "sub/bad\\xff.bin" in error_line(failed.stderr)
    skipped = run_cli("convert", "--path-images", src, "--path-output", tmp_path / "out.h5", "--ext", "bin",
                      "--on-error", "skip", cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    assert "1 skipped" in skipped.stderr and "sub/bad\\xff.bin" in skipped.stderr


def test_reserved_index_name_is_refused(tmp_path):
    src = tmp_path / "src"
    write(src, f"{fmt.INDEX_GROUP}/keys.bin")
    write(src, "fine.bin")
    with pytest.raises(ReadError, match="reserved"):
        data2h5.convert(src, tmp_path / "out.h5", ext="bin")
    report = data2h5.convert(src, tmp_path / "out.h5", ext="bin", on_error="skip")
    assert report.entries == 1 and report.skipped[0][0] == f"{fmt.INDEX_GROUP}/keys.bin"
    with h5py.File(tmp_path / "out.h5", "r") as f:
        np.testing.assert_array_equal(f["fine.bin"][()], np.frombuffer(b"x", np.uint8))
