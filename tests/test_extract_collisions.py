"""``extract`` refuses names that differ only in case or Unicode normalisation (distinct on
Linux, one file on macOS and Windows), before writing anything, in one line; unless
``--allow-unicode-collisions`` (``allow_collisions=True``), which writes them all, exactly."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest
from click.testing import CliRunner

import data2h5
from convert_helpers import error_line
from data2h5.cli import main
from data2h5.errors import NameCollisionError, UnsafeKeyError
from data2h5.extract import Collisions, find_collisions

NFC_E, NFD_E = "\u00e9", "e\u0301"

CASES = {  # name -> (keys, the colliding pair named first, colliding entries)
    "nfc-nfd-file": ([f"caf{NFC_E}.bin", f"caf{NFD_E}.bin", "other.bin"], (f"caf{NFC_E}.bin", f"caf{NFD_E}.bin"), 1),
    "nfc-nfd-folder": ([f"{NFC_E}/1.bin", f"{NFD_E}/2.bin"], (NFC_E, NFD_E), 1),
    "case-same-file": (["Cat/a.png", "cat/a.png"], ("Cat/a.png", "cat/a.png"), 1),
    "case-folder": (["A/x.bin", "a/y.bin", "a/z.bin"], ("A", "a"), 2),
    "file-vs-folder": (["a", "A/b"], ("a", "A"), 1),
    "deep-folder": (["top/Sub/deep/1.bin", "top/sub/deep/2.bin"], ("top/Sub", "top/sub"), 1),
    "case-and-form": ([f"{NFC_E.upper()}.bin", f"{NFD_E}.bin"], (f"{NFC_E.upper()}.bin", f"{NFD_E}.bin"), 1),
    "kelvin-sign": (["\u212a.bin", "k.bin"], ("\u212a.bin", "k.bin"), 1),
}


def keep_every_file(filename: str, ext: str) -> bool:
    return True


def make_archive(tmp_path: Path, keys: List[str]) -> Path:
    src = tmp_path / "src"
    for key in keys:
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(key.encode())
    out = tmp_path / "archive.h5"
    data2h5.convert(src, out, reader="bytes", prune=keep_every_file, workers=1)
    return out


def files_under(root: Path) -> List[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("name", CASES)
def test_collisions_are_found_with_the_first_pair_and_a_count(name):
    keys, pair, count = CASES[name]
    assert find_collisions(keys) == Collisions(*pair, count)


@pytest.mark.parametrize("keys", [
    ["cats/1.png", "cats/2.png", "catsup/1.png", "dogs/1.png"],
    ["\u2460.bin", "1.bin"],  # compatibility forms (NFKC) stay apart, as on those file systems
    ["\uff21.bin", "A.bin"],
    [f"{NFC_E}/1.bin", f"{NFC_E}/2.bin", "e/3.bin"],
    [],
])
def test_names_that_stay_apart_are_not_collisions(keys):
    assert find_collisions(keys) is None


@pytest.mark.parametrize("name", ["nfc-nfd-file", "case-same-file", "case-folder", "file-vs-folder"])
def test_extract_refuses_collisions_in_one_line_writing_nothing(tmp_path, name):
    keys, _, count = CASES[name]
    first, second, _ = find_collisions(sorted(keys, key=str.encode))  # the archive's order: its keys' bytes
    out = make_archive(tmp_path, keys)
    dest = tmp_path / "dest"
    result = invoke("extract", out, dest)
    assert result.exit_code == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    line = error_line(result.stderr)
    shown = ascii if name.startswith("nfc") else repr  # look-alike spellings show their code points
    assert f"{shown(first)} and {shown(second)} differ only in case or Unicode normalisation" in line
    assert f"({count} selected entr" in line and "--allow-unicode-collisions" in line
    assert not dest.exists()
    with pytest.raises(NameCollisionError) as exc:
        data2h5.extract(out, dest)
    assert (exc.value.first, exc.value.second, exc.value.count) == (first, second, count)
    assert isinstance(exc.value, UnsafeKeyError) and not dest.exists()


def test_nothing_is_written_into_an_existing_folder_either(tmp_path):
    out = make_archive(tmp_path, ["aa.bin", "Cat/a.png", "cat/a.png"])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(NameCollisionError):
        data2h5.extract(out, dest)
    assert os.listdir(dest) == []


@pytest.mark.parametrize("name", ["nfc-nfd-file", "nfc-nfd-folder", "case-folder", "file-vs-folder"])
def test_the_override_writes_every_name_exactly(tmp_path, name):
    keys = CASES[name][0]
    out = make_archive(tmp_path, keys)
    result = invoke("extract", out, tmp_path / "cli", "--allow-unicode-collisions", "-q")
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "cli") == sorted(keys)
    data2h5.extract(out, tmp_path / "lib", allow_collisions=True)
    assert files_under(tmp_path / "lib") == sorted(keys)
    for key in keys:
        assert (tmp_path / "lib" / key).read_bytes() == key.encode()


def test_a_collision_outside_the_selection_does_not_block(tmp_path):
    out = make_archive(tmp_path, ["Cat/a.png", "cat/a.png", "dogs/1.png", f"dogs/caf{NFC_E}.bin"])
    result = invoke("extract", out, tmp_path / "dest", "dogs", "Cat", "-q")
    assert result.exit_code == 0, result.stderr
    assert files_under(tmp_path / "dest") == ["Cat/a.png", "dogs/1.png", f"dogs/caf{NFC_E}.bin"]
    result = invoke("extract", out, tmp_path / "both", "cat", "Cat")
    assert result.exit_code == 1 and "'Cat/a.png' and 'cat/a.png'" in error_line(result.stderr)


def test_decoded_entries_collide_too(tmp_path):
    """Decoded arrays (written as .npy files) are compared by the names they are written to."""
    import numpy as np

    src = tmp_path / "src"
    src.mkdir()
    for name, n in (("x.NPY", 3), ("x.npy", 4)):
        with open(src / name, "wb") as fh:  # np.save would add .npy to a name ending in .NPY
            np.save(fh, np.arange(n))
    out = tmp_path / "a.h5"
    data2h5.convert(src, out, ext="npy", workers=1)
    with pytest.raises(NameCollisionError) as exc:
        data2h5.extract(out, tmp_path / "dest")
    assert {exc.value.first, exc.value.second} == {"x.NPY", "x.npy"}
