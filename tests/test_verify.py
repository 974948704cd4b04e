"""``verify``: an archive against the checksums it stores, and a source folder against the archive.

Archives are real conversions of a generated tree; damage is done to the file's bytes where
the index (or HDF5's chunk table) says an entry lies, and to the source files themselves.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

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
from data2h5.errors import ArchiveError, PluginError, SourceError
from data2h5.archive import read_index
from data2h5.verify import compare_source, verify
from data2h5.encoding import SINGLE_CHUNK_MAX

EXTS = ["png", "jpg", "npy", "txt", "bin"]
BIG = "data/big.npy"  # over SINGLE_CHUNK_MAX: stored in several chunks in either mode


def make_source(root: Path) -> Path:
    """Images (RGB, grey, JPEG) in nested folders, a name with a space and an umlaut, a small
    and a big .npy, text, random bytes and an empty file, plus files no extension selects."""
    rng = np.random.default_rng(11)
    for rel, channels in [("cats/1.png", 3), ("cats/2.jpg", 0), ("dogs/a b/ü.png", 4)]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, photo_like(rng, 24, 30, channels), extension=path.suffix)
    (root / "data").mkdir()
    np.save(root / "data" / "ramp.npy", np.tile(np.arange(256, dtype=np.uint16), (32, 1)))
    big = np.linspace(0, 1, (SINGLE_CHUNK_MAX // 200 + 1000) * 50, dtype=np.float32).reshape(-1, 50)
    np.save(root / BIG, big)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("grüße\n", encoding="utf-8")
    (root / "bin").mkdir()
    (root / "bin" / "blob.bin").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "bin" / "empty.bin").write_bytes(b"")
    (root / "other.csv").write_text("a,b\n")  # not selected
    return root


@pytest.fixture
def src(tmp_path) -> Path:
    return make_source(tmp_path / "src")


def convert(src: Path, out: Path, **kwargs) -> Path:
    kwargs.setdefault("ext", EXTS)
    kwargs.setdefault("workers", 1)
    data2h5.convert(src, out, **kwargs)
    return out


def flip(path: Path, offset: int) -> None:
    """Invert one byte of a file in place."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# -- intact archives pass --------------------------------------------------------------------------


@pytest.mark.parametrize("reader, workers", [("auto", 1), ("bytes", 1), ("auto", 2)])
def test_intact_archive_and_source_pass(tmp_path, src, reader, workers):
    out = convert(src, tmp_path / "out.h5", reader=reader, workers=workers)
    index = read_index(out)
    assert index.offset[index.position(BIG)] == 0  # the big entry really is several chunks
    for source in (None, src):
        report = verify(out, source)
        assert report.ok, report.problems
        assert report.entries == 8 and report.unchecked == 0
        assert "8 entries verified" in report.summary() and "0 corrupt, 0 missing, 0 extra, 0 changed" in report.summary()
    assert report.source_files == 8


def test_intact_stacked_archive_passes(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for i in range(40):  # 64 KiB rows: 16 to a chunk, so three chunks, the last one partial
        path = src / f"c{i % 2}" / f"{i:02d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.random((128, 128), dtype=np.float32))
    out = convert(src, tmp_path / "out.h5", ext="npy", layout="stacked")
    report = verify(out, src)
    assert report.ok and report.entries == 40 and report.unchecked == 0, report.problems
    with h5py.File(out, "r+") as f:
        assert len(index_group(f)[fmt.CHUNK_CRC32]) == 3
        del index_group(f)[fmt.CHUNK_CRC32]  # as archives written before chunks had checksums
    report = verify(out)
    assert report.ok and report.unchecked == 40


def test_archive_without_stored_checksums_is_decoded_and_counted(tmp_path, src):
    """Archives written before stored bytes had checksums: decoded arrays are read and
    decoded, and counted as unchecked; exact-bytes entries still check the source's CRC."""
    out = convert(src, tmp_path / "out.h5")
    with h5py.File(out, "r+") as f:
        del index_group(f)[fmt.STORED_CRC32]
    report = verify(out)
    index = read_index(out)
    arrays = sum(1 for pos in range(len(index)) if index.kind[pos] == fmt.Kind.ARRAY and index.stored[pos])
    assert report.ok and report.unchecked == arrays == 5, report.problems
    assert "5 entries have no recorded checksum" in report.summary()


# -- damage to the archive ------------------------------------------------------------------------


def single_block(out: Path, key: str) -> int:
    index = read_index(out)
    pos = index.position(key)
    assert index.offset[pos] > 0
    return int(index.offset[pos] + index.stored[pos] // 2)


def second_chunk(out: Path, key: str) -> int:
    """Inside the second chunk of a key (its only chunk if it has one)."""
    with h5py.File(out) as f:
        dsid = f[key].id
        info = dsid.get_chunk_info(min(1, dsid.get_num_chunks() - 1))
    return info.byte_offset + info.size // 2


@pytest.mark.parametrize(
    "reader, compression, key, where",
    [
        ("bytes", "auto", "cats/1.png", single_block),  # exact bytes, one block
        ("bytes", "auto", BIG, second_chunk),  # exact bytes, several chunks
        ("auto", "auto", "data/ramp.npy", single_block),  # a decoded array, lzf
        ("auto", "gzip", "dogs/a b/ü.png", single_block),
        ("auto", "none", "cats/2.jpg", single_block),
        ("auto", "auto", BIG, second_chunk),  # a decoded array in several lzf chunks
        ("auto", "zstd", BIG, second_chunk),
        ("auto", "gzip", BIG, second_chunk),
        ("auto", "blosc-lz4", BIG, second_chunk),  # compressed by HDF5: decoded through it
        ("auto", "blosc-lz4", "data/ramp.npy", second_chunk),  # one chunk, but not read as one block
    ],
)
def test_one_flipped_byte_fails_naming_the_entry(tmp_path, src, reader, compression, key, where):
    out = convert(src, tmp_path / "out.h5", reader=reader, compression=compression)
    flip(out, where(out, key))
    report = verify(out)
    assert not report.ok
    assert [(p.kind, p.key) for p in report.problems] == [("corrupt", key)]
    assert "checksum of the stored bytes does not match" in report.problems[0].reason

    result = invoke("verify", out)
    assert result.exit_code == 1
    assert f"corrupt  {key}: checksum of the stored bytes does not match" in result.stdout.splitlines()
    "8 entries verified: 1 corrupt" in result.stdout
    assert error_line(result.stderr) == f"data2h5: error: {out} failed verification: 1 problem listed above"


@pytest.mark.parametrize("compression", ["auto", "gzip"])
def test_flipped_byte_in_a_stacked_chunk_names_its_rows(tmp_path, compression):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(2)
    for i in range(40):
        np.save(src / f"{i:02d}.npy", rng.random((128, 128), dtype=np.float32))
    out = convert(src, tmp_path / "out.h5", ext="npy", layout="stacked", compression=compression)
    with h5py.File(out) as f:
        rows = f["data"].chunks[0]
        info = f["data"].id.get_chunk_info(1)
    flip(out, info.byte_offset + info.size // 2)
    report = verify(out)
    assert sorted(p.key for p in report.problems) == [f"{i:02d}.npy" for i in range(rows, 2 * rows)]
    assert {p.kind for p in report.problems} == {"corrupt"}
    assert "checksum of the stored chunk" in report.problems[0].reason


@pytest.mark.parametrize("key, where", [(BIG, second_chunk), ("data/ramp.npy", single_block)])
def test_without_stored_checksums_damage_is_caught_by_decompression(tmp_path, src, key, where):
    out = convert(src, tmp_path / "out.h5", compression="gzip")  # gzip checks its own data
    with h5py.File(out, "r+") as f:
        del index_group(f)[fmt.STORED_CRC32]
    flip(out, where(out, key))
    report = verify(out)
    assert [(p.kind, p.key) for p in report.problems] == [("corrupt", key)]
    assert "do not decompress" in report.problems[0].reason, report.problems[0].reason


def test_index_and_tree_must_agree(tmp_path, src):
    out = convert(src, tmp_path / "out.h5")
    with h5py.File(out, "r+") as f:
        del f["cats/1.png"]
        f["stray/thing.bin"] = np.zeros(3, np.uint8)
    report = verify(out)
    found = {(p.kind, p.key): p.reason for p in report.problems}
    assert set(found) == {("corrupt", "cats/1.png"), ("extra", "stray/thing.bin")}
    assert "no such dataset" in found["corrupt", "cats/1.png"]
    assert "index does not list" in found["extra", "stray/thing.bin"]


def test_zeroed_entries_of_an_archive_that_still_opens_are_listed(tmp_path, src):
    """Data lost (a bad sector, a torn copy) while the metadata survived."""
    out = convert(src, tmp_path / "out.h5", reader="bytes")
    index = read_index(out)
    lost = ["cats/1.png", "cats/2.jpg", "data/ramp.npy"]
    with open(out, "r+b") as fh:
        for key in lost:
            pos = index.position(key)
            fh.seek(int(index.offset[pos]))
            fh.write(bytes(int(index.stored[pos])))
    report = verify(out)
    assert sorted(p.key for p in report.problems) == lost and {p.kind for p in report.problems} == {"corrupt"}


@pytest.mark.parametrize("key", ["cats/1.png", BIG])
def test_damaged_dataset_header_is_that_entry_corrupt(tmp_path, src, key):
    """A damaged object header stops HDF5's walk of the tree: the walk goes on without it."""
    out = convert(src, tmp_path / "out.h5")
    with h5py.File(out) as f:
        header = h5py.h5o.get_info(f[key].id).addr
    flip(out, header + 20)
    report = verify(out)
    assert [(p.kind, p.key) for p in report.problems] == [("corrupt", key)]
    assert "its dataset cannot be opened" in report.problems[0].reason and "checksum" in report.problems[0].reason


# -- the source folder ----------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["auto", "bytes"])
@pytest.mark.parametrize("rel", ["bin/blob.bin", "cats/1.png", BIG])
@pytest.mark.parametrize("same_size", [True, False])
def test_changed_source_file_fails_naming_it(tmp_path, src, reader, rel, same_size):
    out = convert(src, tmp_path / "out.h5", reader=reader)
    path = src / rel
    data = bytearray(path.read_bytes())
    if same_size:
        data[len(data) // 2] ^= 0x01
    else:
        data += b"\x00"
    path.write_bytes(bytes(data))
    report = verify(out, src)
    assert [(p.kind, p.key) for p in report.problems] == [("changed", rel)]
    assert ("CRC-32" if same_size else "bytes, the archive recorded") in report.problems[0].reason
    assert verify(out).ok  # the archive itself is intact

    result = invoke("verify", out, "--source", src)
    assert result.exit_code == 1 and f"changed  {rel}: " in result.stdout


def test_exact_bytes_entries_are_compared_byte_for_byte(tmp_path):
    """Same size, same CRC-32, different bytes: caught where the stored bytes are the file's."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"abcdef")
    import zlib

    crc = zlib.crc32(b"abcdef")
    assert compare_source(str(path), 6, crc) is None
    assert compare_source(str(path), 6, crc, np.frombuffer(b"abcdef", np.uint8)) is None
    assert "differ from the bytes stored" in compare_source(str(path), 6, crc, np.frombuffer(b"abcdeX", np.uint8))


def test_added_removed_and_skipped_source_files(tmp_path, src):
    (src / "cats" / "bad.png").write_bytes(b"not a png")
    out = convert(src, tmp_path / "out.h5", on_error="skip")
    iio.imwrite(src / "cats" / "3.png", photo_like(np.random.default_rng(5), 8, 8))
    (src / "bin" / "blob.bin").unlink()
    report = verify(out, src)
    found = {(p.kind, p.key): p.reason for p in report.problems}
    assert set(found) == {("missing", "cats/3.png"), ("extra", "bin/blob.bin"), ("skipped", "cats/bad.png")}
    assert found["missing", "cats/3.png"] == "in the source folder, not in the archive"
    assert found["extra", "bin/blob.bin"] == "in the archive, not in the source folder"
    assert "skipped at conversion" in found["skipped", "cats/bad.png"] and "png" in found["skipped", "cats/bad.png"]
    assert "1 missing, 1 extra, 0 changed, 1 skipped at conversion" in report.summary()

    result = invoke("verify", out, "--source", src, "--json")
    assert result.exit_code == 1
    facts = json.loads(result.stdout)
    assert facts["ok"] is False and [p["key"] for p in facts["missing"]] == ["cats/3.png"]
    assert [p["key"] for p in facts["skipped"]] == ["cats/bad.png"] and facts["changed"] == []


def test_source_is_walked_with_the_recorded_options_unless_overridden(tmp_path, src):
    out = convert(src, tmp_path / "out.h5", ext="png")
    assert verify(out, src).ok  # the .jpg, .npy, ... files are not selected by --ext png
    report = verify(out, src, ext=["png", "txt"])
    assert [(p.kind, p.key) for p in report.problems] == [("missing", "notes/readme.txt")]


@pytest.mark.parametrize("follow", [False, True])
def test_recorded_follow_symlinks_is_honoured(tmp_path, src, follow):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    iio.imwrite(outside / "x.png", photo_like(np.random.default_rng(0), 8, 8))
    (src / "linked").symlink_to(outside, target_is_directory=True)
    out = convert(src, tmp_path / "out.h5", follow_symlinks=follow)
    assert ("linked/x.png" in read_index(out).keys) == follow
    assert verify(out, src).ok
    report = verify(out, src, follow_symlinks=not follow)
    assert [p.kind for p in report.problems] == ["extra" if follow else "missing"]


@pytest.mark.parametrize("exts", [(), ("png",)])
def test_recorded_prune_plugin_is_never_run(tmp_path, src, exts):
    """An archive names its prune plugin; verify shows it but runs only a plugin the user names."""
    canary = tmp_path / "ran"
    plugin = tmp_path / "keep.py"
    plugin.write_text(f"import pathlib\ndef keep(name, ext):\n    pathlib.Path({str(canary)!r}).touch()\n"
                      "    return name.endswith('.png')\n")
    out = convert(src, tmp_path / "out.h5", ext=exts, prune=f"{plugin}:keep", workers=1)
    canary.unlink()
    if exts:
        report = verify(out, src)
        assert report.ok and len(report.notes) == 1 and "never runs" in report.notes[0]
    else:
        with pytest.raises(SourceError, match="never runs.*pass --prune or --ext"):
            verify(out, src)
        result = invoke("verify", out, "--source", src)
        assert result.exit_code == 1 and "pass --prune or --ext" in error_line(result.stderr)
    assert not canary.exists()
    assert verify(out, src, ext="png").ok
    assert not canary.exists()
    assert verify(out, src, prune=f"{plugin}:keep").ok  # the user's own choice
    assert canary.exists()


def test_archive_inside_its_source_is_not_a_source_file(tmp_path, src):
    out = convert(src, src / "bin" / "archive.bin", ext=EXTS)  # even when the extension matches
    assert verify(out, src).ok


@pytest.mark.parametrize("source, error, words", [
    ("nowhere", SourceError, "does not exist"),
    ("src/other.csv", SourceError, "is not a folder"),
])
def test_bad_source_folder(tmp_path, src, source, error, words):
    out = convert(src, tmp_path / "out.h5")
    with pytest.raises(error, match=words):
        verify(out, tmp_path / source)


# -- the catalogue: not an archive at all -----------------------------------------------------------


def truncated(good: Path, path: Path) -> None:
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


BAD_FILES = {
    "missing": (lambda good, p: None, "no such file"),
    "empty": (lambda good, p: p.write_bytes(b""), "empty"),
    "not-hdf5": (lambda good, p: p.write_bytes(b"PK\x03\x04 a zip, not an archive" * 10), "not an HDF5 file"),
    "truncated": (truncated, "truncated"),
}


@pytest.mark.parametrize("command", ["verify", "extract"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_archive_file_is_one_clear_line(tmp_path, src, command, case):
    good = convert(src, tmp_path / "good.h5")
    make, words = BAD_FILES[case]
    path = tmp_path / "bad.h5"
    make(good, path)
    before = path.read_bytes() if path.exists() else None
    args = [command, path] + ([tmp_path / "dest"] if command == "extract" else [])
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == "", (done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = error_line(done.stderr)
    assert str(path) in line and words in line, line
    assert not (tmp_path / "dest").exists()
    assert (path.read_bytes() if path.exists() else None) == before


def test_plain_hdf5_file_is_read_but_has_no_source_checksums(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["a/x"] = np.arange(10)
        f.create_dataset("b", data=np.ones((4, 4)), fletcher32=True, chunks=(2, 2))
    report = verify(path)
    assert report.ok and report.entries == 2 and report.unchecked == 2
    with pytest.raises(ArchiveError, match="not written by data2h5"):
        verify(path, tmp_path)


def test_cli_verify_summary_and_quiet(tmp_path, src):
    out = convert(src, tmp_path / "out.h5")
    result = invoke("verify", out, "--source", src)
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.strip() == f"8 entries verified against {src} (8 source files): 0 corrupt, 0 missing, 0 extra, 0 changed"
    assert invoke("verify", out, "-q").stdout == ""


def test_cli_verify_source_options_need_source(tmp_path, src):
    out = convert(src, tmp_path / "out.h5")
    result = invoke("verify", out, "--ext", "png")
    assert result.exit_code == 2 and "give --source too" in result.stderr


def test_cli_verify_end_to_end(tmp_path, src):
    out = convert(src, tmp_path / "out.h5", reader="bytes")
    done = run_cli("verify", out, "--source", src, "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0 and "0 corrupt" in done.stdout, done.stderr
    os.remove(src / "notes" / "readme.txt")
    done = run_cli("verify", out, "--source", src, cwd=tmp_path)
    assert done.returncode == 1 and "extra    notes/readme.txt: in the archive, not in the source folder" in done.stdout
