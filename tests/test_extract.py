"""``extract``: entries back as files, byte for byte where they were stored as bytes, and never
a file outside the destination, whatever keys a crafted archive holds."""
from __future__ import annotations

import filecmp
import os
import sys
from pathlib import Path
from typing import Dict, List

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
from click.testing import CliRunner

import data2h5
from conftest import photo_like
from convert_helpers import error_line, run_cli, index_group
from data2h5 import format as fmt
from data2h5.cli import main
from data2h5.errors import ArchiveKeyError, CorruptEntryError, OutputError
from data2h5.extract import PART_SUFFIX, UnsafeKeyError, extract
from data2h5.archive import ArchiveReader, read_index

EXTS = ["png", "jpg", "npy", "txt", "bin", "dat"]


def make_source(root: Path) -> Dict[str, Path]:
    """Images, arrays, text, random and empty binaries in nested folders, names with spaces
    and non-ASCII letters, and a file over one chunk; returns ``{key: path}``."""
    rng = np.random.default_rng(4)
    files: Dict[str, Path] = {}

    def add(rel: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        files[rel] = path
        return path

    for rel, channels in [("cats/1.png", 3), ("cats/2.jpg", 0), ("dogs/big dog/çà.png", 4), ("top.png", 0)]:
        iio.imwrite(add(rel), photo_like(rng, 20, 26, channels), extension=Path(rel).suffix)
    np.save(add("arrays/ramp.npy"), np.tile(np.arange(256, dtype=np.uint16), (16, 1)))
    np.save(add("arrays/deep/er/f64.npy"), rng.random((3, 4, 5)))
    add("text/notes.txt").write_text("ünïcode\nlines\n", encoding="utf-8")
    add("bin/random.bin").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    add("bin/empty.bin").write_bytes(b"")
    add("bin/large.dat").write_bytes(rng.integers(0, 256, 5 << 20, dtype=np.uint8).tobytes())  # several chunks
    add("catsup.bin").write_bytes(b"not under cats/")
    return files


@pytest.fixture
def source(tmp_path) -> Dict[str, Path]:
    return make_source(tmp_path / "src")


def convert(tmp_path: Path, name: str = "out.h5", **kwargs) -> Path:
    kwargs.setdefault("ext", EXTS)
    kwargs.setdefault("workers", 1)
    return Path(data2h5.convert(tmp_path / "src", tmp_path / name, **kwargs).output)


def files_under(root: Path) -> List[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_bytes_archive_round_trips_byte_for_byte(tmp_path, source, workers):
    out = convert(tmp_path, reader="bytes", workers=workers)
    assert read_index(out).offset[read_index(out).position("bin/large.dat")] == 0  # several chunks
    dest = tmp_path / "dest"
    report = extract(out, dest)
    assert files_under(dest) == sorted(source)
    for key, path in source.items():
        assert filecmp.cmp(path, dest / key, shallow=False), key
    assert report.files == len(source) and report.bytes == sum(p.stat().st_size for p in source.values())


def test_decoded_archive_writes_arrays_as_npy(tmp_path, source):
    out = convert(tmp_path)  # auto: images and .npy decoded, text as text, .bin/.dat as bytes
    dest = tmp_path / "dest"
    extract(out, dest)
    expected = sorted(
        k + ".npy" if Path(k).suffix in (".png", ".jpg") else k for k in source
    )
    assert files_under(dest) == expected
    with ArchiveReader(out) as reader:
        for pos, key in enumerate(reader.index.keys):
            stored = reader.read_stored(pos)
            if key.endswith((".png", ".jpg", ".npy")):
                path = dest / (key if key.endswith(".npy") else key + ".npy")
                back = np.load(path, allow_pickle=False)
                assert back.dtype == stored.dtype and back.shape == stored.shape and np.array_equal(back, stored), key
            else:
                assert (dest / key).read_bytes() == stored.tobytes()
    assert np.array_equal(np.load(dest / "arrays/deep/er/f64.npy"), np.load(source["arrays/deep/er/f64.npy"]))
    assert (dest / "text/notes.txt").read_text(encoding="utf-8") == "ünïcode\nlines\n"
    assert filecmp.cmp(source["bin/large.dat"], dest / "bin/large.dat", shallow=False)


def test_stacked_archive_writes_each_row_as_npy(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(8)
    rows = {}
    for i in range(40):  # three chunks of rows
        key = f"c{i % 3}/{i:02d}.npy"
        rows[key] = rng.random((128, 128), dtype=np.float32)
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        np.save(src / key, rows[key])
    out = convert(tmp_path, ext="npy", layout="stacked")
    dest = tmp_path / "dest"
    extract(out, dest, ["c1"])
    assert files_under(dest) == sorted(k for k in rows if k.startswith("c1/"))
    for key in files_under(dest):
        assert np.array_equal(np.load(dest / key), rows[key])


def test_plain_hdf5_datasets_become_npy_files(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["group/x"] = np.arange(12, dtype=np.int16).reshape(3, 4)
        f["y.npy"] = np.ones(3)
    extract(path, tmp_path / "dest")
    assert files_under(tmp_path / "dest") == ["group/x.npy", "y.npy"]
    assert np.array_equal(np.load(tmp_path / "dest/group/x.npy"), np.arange(12, dtype=np.int16).reshape(3, 4))


# -- prefixes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefixes, expected", [
    (["cats"], ["cats/1.png", "cats/2.jpg"]),
    (["cats/"], ["cats/1.png", "cats/2.jpg"]),
    (["cats/1.png", "bin"], ["bin/empty.bin", "bin/large.dat", "bin/random.bin", "cats/1.png"]),
    (["arrays/deep"], ["arrays/deep/er/f64.npy"]),
    (["catsup.bin"], ["catsup.bin"]),
])
def test_prefixes_select_keys_and_folders(tmp_path, source, prefixes, expected):
    out = convert(tmp_path, reader="bytes")
    extract(out, tmp_path / "dest", prefixes)
    assert files_under(tmp_path / "dest") == expected


def test_prefix_that_selects_nothing_fails_and_writes_nothing(tmp_path, source):
    out = convert(tmp_path, reader="bytes")
    with pytest.raises(ArchiveKeyError, match="'ca'"):
        extract(out, tmp_path / "dest", ["cats", "ca"])
    assert not (tmp_path / "dest").exists()


# -- existing files ---------------------------------------------------------------------------------


def test_existing_files_are_kept_unless_overwrite(tmp_path, source):
    out = convert(tmp_path, reader="bytes")
    dest = tmp_path / "dest"
    extract(out, dest)
    (dest / "cats/1.png").write_bytes(b"mine")
    (dest / "bin/random.bin").unlink()
    with pytest.raises(OutputError, match=r"10 files already exist in .*dest \(arrays/deep/er/f64.npy, .* and 7 more\); pass --overwrite"):
        extract(out, dest)
    assert (dest / "cats/1.png").read_bytes() == b"mine"
    assert not (dest / "bin/random.bin").exists()  # refused before writing anything
    extract(out, dest, overwrite=True)
    assert filecmp.cmp(source["cats/1.png"], dest / "cats/1.png", shallow=False)
    assert files_under(dest) == sorted(source)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_or_file_in_the_way_is_never_replaced(tmp_path, source, overwrite):
    out = convert(tmp_path, reader="bytes")
    dest = tmp_path / "dest"
    (dest / "cats" / "1.png").mkdir(parents=True)  # a folder where a file goes
    with pytest.raises(OutputError, match="not a regular file"):
        extract(out, dest, overwrite=overwrite)
    (dest / "cats" / "1.png").rmdir()
    (dest / "bin").write_bytes(b"a file where a folder goes")
    with pytest.raises(OutputError, match="not a folder"):
        extract(out, dest, overwrite=overwrite)
    assert files_under(dest) == ["bin"]


# -- crafted archives -----------------------------------------------------------------------------


def with_keys(out: Path, replace: Dict[str, str]) -> Path:
    """Rewrite the archive's index so that entries carry the given keys instead."""
    with h5py.File(out, "r+") as f:
        group = index_group(f)
        keys = [k.decode() for k in group["keys"][()]]
        keys = [replace.get(k, k) for k in keys]
        del group["keys"]
        group["keys"] = np.array([k.encode() for k in keys])
    return out


def assert_nothing_written(tmp_path: Path, before: List[str]) -> None:
    assert files_under(tmp_path) == before, "extract wrote something"
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())
    assert not (tmp_path / "outside").exists() or not any((tmp_path / "outside").iterdir())


@pytest.mark.parametrize("evil", [
    "../escape.bin",
    "../../escape.bin",
    "/tmp/absolute.bin",
    "a/../../escape.bin",
    "a/./b.bin",
    "a//b.bin",
    "a/b/",
    "..",
    "a\\..\\..\\escape.bin",
    "nul\x00.bin",
])
def test_keys_that_escape_dest_refuse_the_whole_extraction(tmp_path, source, evil):
    out = with_keys(convert(tmp_path, reader="bytes"), {"bin/random.bin": evil})
    (tmp_path / "outside").mkdir()
    before = files_under(tmp_path)
    with pytest.raises(UnsafeKeyError) as caught:
        extract(out, tmp_path / "dest" / "inner")
    assert repr(evil) in str(caught.value) and "\n" not in str(caught.value)
    assert_nothing_written(tmp_path, before)
    assert not Path("/tmp/absolute.bin").exists()

    result = invoke("extract", out, tmp_path / "dest" / "inner")
    assert result.exit_code == 1 and "refusing to extract" in error_line(result.stderr)
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("replace, words", [
    ({"cats/1.png": "cats/2.jpg"}, "would both be written"),
    ({"cats/1.png": "bin"}, "needs a folder"),  # a file named like a folder of other keys
    ({"bin/random.bin": "cats/2.jpg/inner.bin"}, "needs a folder"),
])
def test_keys_that_collide_refuse_the_whole_extraction(tmp_path, source, replace, words):
    out = with_keys(convert(tmp_path, reader="bytes"), replace)
    before = files_under(tmp_path)
    with pytest.raises(UnsafeKeyError, match=words):
        extract(out, tmp_path / "dest")
    assert_nothing_written(tmp_path, before)


def test_decoded_key_colliding_with_its_npy_name_is_refused(tmp_path, source):
    out = convert(tmp_path)  # cats/1.png is decoded: written as cats/1.png.npy
    with_keys(out, {"bin/random.bin": "cats/1.png.npy"})
    with pytest.raises(UnsafeKeyError, match="would both be written to 'cats/1.png.npy'"):
        extract(out, tmp_path / "dest")


@pytest.mark.parametrize("link", ["cats", "dogs/big dog", "cats/1.png"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_symlink_inside_dest_is_never_followed(tmp_path, source, link, overwrite):
    out = convert(tmp_path, reader="bytes")
    outside, dest = tmp_path / "outside", tmp_path / "dest"
    outside.mkdir()
    (dest / link).parent.mkdir(parents=True, exist_ok=True)
    (dest / link).symlink_to(outside, target_is_directory=True)
    before = files_under(tmp_path)
    with pytest.raises(UnsafeKeyError, match="symbolic link"):
        extract(out, dest, overwrite=overwrite)
    assert files_under(tmp_path) == before and not any(outside.iterdir())


def test_symlink_planted_after_the_checks_is_not_followed(tmp_path, source, monkeypatch):
    """The checks before writing are a courtesy; the writer itself never follows a link
    (a link planted between the checks and the writing, by a race)."""
    extract_module = sys.modules["data2h5.extract"]  # the package's `extract` is the function

    out = convert(tmp_path, reader="bytes")
    outside, dest = tmp_path / "outside", tmp_path / "dest"
    outside.mkdir()
    (outside / "1.png").write_bytes(b"theirs")
    dest.mkdir()
    (dest / "cats").symlink_to(outside, target_is_directory=True)
    (dest / "top.png").symlink_to(outside / "1.png")
    monkeypatch.setattr(extract_module, "check_dest", lambda *args, **kwargs: None)
    with pytest.raises(UnsafeKeyError, match="refusing to write through it"):
        extract(out, dest, ["cats"])
    with pytest.raises(UnsafeKeyError, match="symbolic link"):
        extract(out, dest, ["top.png"], overwrite=True)
    with pytest.raises(OutputError, match="appeared while extracting"):
        extract(out, dest, ["top.png"])
    assert sorted(os.listdir(outside)) == ["1.png"] and (outside / "1.png").read_bytes() == b"theirs"
    assert (dest / "top.png").is_symlink() and sorted(os.listdir(dest)) == ["cats", "top.png"]


# -- damage and interruption ----------------------------------------------------------------------


def test_corrupt_entry_stops_extraction_leaving_only_complete_files(tmp_path, source):
    out = convert(tmp_path, reader="bytes")
    index = read_index(out)
    pos = index.position("cats/2.jpg")
    with open(out, "r+b") as fh:
        fh.seek(int(index.offset[pos] + index.stored[pos] // 2))
        fh.write(b"\x00\xff\x00")
    dest = tmp_path / "dest"
    with pytest.raises(CorruptEntryError, match=r"cats/2.jpg.*extraction stopped: \d+ of 11 files were written"):
        extract(out, dest)
    written = files_under(dest)
    assert written and "cats/2.jpg" not in written and not any(PART_SUFFIX in name for name in written)
    for key in written:
        assert filecmp.cmp(source[key], dest / key, shallow=False)
    done = run_cli("extract", out, tmp_path / "dest2", cwd=tmp_path)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "damaged" in error_line(done.stderr) and "extraction stopped" in error_line(done.stderr)


def test_corrupt_stacked_chunk_stops_extraction_naming_its_rows(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(40):
        np.save(src / f"{i:02d}.npy", rng.random((128, 128), dtype=np.float32))
    out = convert(tmp_path, ext="npy", layout="stacked")
    with h5py.File(out) as f:
        rows = f["data"].chunks[0]
        info = f["data"].id.get_chunk_info(1)
    with open(out, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(b"\x00\xff\x00")
    with pytest.raises(CorruptEntryError, match=f"entries '{rows:02d}.npy' to '{2 * rows - 1:02d}.npy'"):
        extract(out, tmp_path / "dest")
    assert files_under(tmp_path / "dest") == [f"{i:02d}.npy" for i in range(rows)]


def test_no_temporary_file_is_left_behind(tmp_path, source):
    out = convert(tmp_path)
    extract(out, tmp_path / "dest")
    assert not [p for p in (tmp_path / "dest").rglob("*") if PART_SUFFIX in p.name]


# -- the command line -----------------------------------------------------------------------------


def test_cli_extract(tmp_path, source):
    out = convert(tmp_path, reader="bytes")
    dest = tmp_path / "dest"
    result = invoke("extract", out, dest, "cats", "top.png")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "3 files" in result.stderr and str(dest) in result.stderr
    assert files_under(dest) == ["cats/1.png", "cats/2.jpg", "top.png"]
    result = invoke("extract", out, dest, "cats")
    assert result.exit_code == 1
    assert error_line(result.stderr) == (
        f"data2h5: error: 2 files already exist in {dest} (cats/1.png, cats/2.jpg); "
        "pass --overwrite to replace them, or extract to an empty folder"
    )
    assert invoke("extract", out, dest, "cats", "--overwrite", "-q").exit_code == 0


def test_cli_extract_end_to_end(tmp_path, source):
    out = convert(tmp_path, reader="bytes")
    done = run_cli("extract", out, tmp_path / "dest", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert files_under(tmp_path / "dest") == sorted(source)
    (tmp_path / "file").write_text("x")
    done = run_cli("extract", out, tmp_path / "file", cwd=tmp_path)
    assert done.returncode == 1 and "is not a folder" in error_line(done.stderr)
