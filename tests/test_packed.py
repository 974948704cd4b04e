"""The packed layout, command by command and loader by loader, side by side with files: the
same source gives the same keys, values, listings and checks whichever layout holds it."""
from __future__ import annotations

import pickle
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from torch.utils.data import DataLoader

import data2h5
from data2h5.cli import main
from data2h5.layouts import packed
from data2h5.loaders import H5Dataset

LAYOUTS = ["files", "packed"]


def tiny_source(root: Path, folders: int = 3, per_folder: int = 40) -> Path:
    rng = np.random.default_rng(3)
    for d in range(folders):
        (root / f"c{d}").mkdir(parents=True)
        for i in range(per_folder):
            (root / f"c{d}" / f"{i:03d}.bin").write_bytes(rng.integers(0, 256, 64 + 7 * i, dtype=np.uint8).tobytes())
    (root / "top.txt").write_text("at the top\n")
    (root / "empty.bin").write_bytes(b"")
    return root


def run_cli(args, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args], prog_name="data2h5")
    out = capsys.readouterr().out
    assert done.value.code in (0, None), out
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tiny_source(tmp_path_factory.mktemp("packed") / "src")


def files_of(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("compression", ["auto", "none", "gzip", "zstd", "lzf"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_command_reads_the_same_entries(tmp_path, source, layout, compression, capsys):
    out = tmp_path / "out.h5"
    run_cli(["convert", "--path-images", source, "--path-output", out, "--ext", "bin", "--ext", "txt", "--reader", "bytes", "--layout", layout,
             "--compression", compression, "--workers", "2"], capsys)
    expected = files_of(source)
    assert run_cli(["ls", out], capsys).splitlines() == sorted(expected)
    assert run_cli(["ls", out, "c1/"], capsys).splitlines() == sorted(k for k in expected if k.startswith("c1/"))
    assert "entries      122" in run_cli(["info", out], capsys).replace(",", "")
    assert "0 corrupt" in run_cli(["verify", out, "--source", source], capsys)
    run_cli(["extract", "-q", out, tmp_path / "back"], capsys)
    assert files_of(tmp_path / "back") == expected
    with data2h5.open(out, decode=False) as view:
        assert len(view) == len(expected) and list(view) == sorted(expected)
        assert all(view[k].tobytes() == v for k, v in expected.items())
        assert "c2/000.bin" in view and "c9/000.bin" not in view
        with pytest.raises(KeyError):
            view["c9/000.bin"]
    assert data2h5.open(out)["top.txt"] == "at the top\n"  # decoded as H5Dataset decodes it


def as_list(batch):
    return batch


@pytest.mark.parametrize("layout", LAYOUTS)
def test_h5dataset_and_spawn_workers(tmp_path, source, layout):
    out = tmp_path / "out.h5"
    data2h5.convert(source, out, ext=["bin"], reader="bytes", layout=layout, workers=1)
    ds = H5Dataset(out, decode=False, target="folder", return_key=True)
    assert ds.classes == sorted({"c0", "c1", "c2", "."})
    assert list(ds.keys) == sorted(files_of(source).keys() - {"top.txt"})
    assert ds.targets[ds.keys.index("empty.bin")] == ds.class_to_idx["."]
    sub = H5Dataset(out, decode=False, prefix="c2/")
    assert len(sub) == 40 and all(k.startswith("c2/") for k in sub.keys)
    chosen = H5Dataset(out, decode=False, keys=["c1/005.bin", "c0/000.bin"], return_key=True)
    assert [k for _, k in chosen] == ["c1/005.bin", "c0/000.bin"]
    assert len(pickle.dumps(ds)) < 20_000  # paths and options, not the index
    loader = DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context="spawn",
                        collate_fn=as_list)
    seen = {key: (sample.tobytes(), target) for batch in loader for sample, target, key in batch}
    src = files_of(source)
    assert seen == {k: (src[k], ds.class_to_idx[k.split("/")[0] if "/" in k else "."]) for k in seen}
    assert len(seen) == len(ds)


def test_packed_creates_no_dataset_per_entry(tmp_path, source):
    out = tmp_path / "out.h5"
    data2h5.convert(source, out, ext=["bin"], reader="bytes", layout="packed", workers=1)
    objects = []
    with h5py.File(out, "r") as f:
        f.visit(objects.append)
        assert sorted(objects) == ["packed", "packed/000000"]
        with pytest.raises(KeyError):
            f["c0/000.bin"]  # what the layout gives up


def test_packed_blocks_split_and_entries_larger_than_a_block(tmp_path, monkeypatch):
    """Small blocks: entries spread over many; a multi-chunk array (compressed by the writer in
    one piece) and an entry larger than a block each fit."""
    monkeypatch.setattr(packed, "BLOCK_BYTES", 4096)
    src = tmp_path / "src"
    tiny_source(src, folders=2, per_folder=30)
    big = np.arange(3 << 20, dtype=np.float32).reshape(1536, 2048)  # 12 MiB: several 1 MiB chunks
    np.save(src / "big.npy", big)
    out = tmp_path / "out.h5"
    data2h5.convert(src, out, ext=["bin", "npy"], layout="packed", compression="gzip", workers=2)
    with h5py.File(out, "r") as f:
        assert len(f["packed"]) >= 4, packed.BLOCK_BYTES
    view = data2h5.open(out, decode=False)
    np.testing.assert_array_equal(view["big.npy"], big)
    assert view["c1/029.bin"].tobytes() == (src / "c1/029.bin").read_bytes()
    assert data2h5.verify(out, source=src).ok


def stopper(count: int):
    """A reader that stops the run (as Ctrl-C would) after ``count`` files (-1: never)."""
    seen = []

    def read(path: str):
        if len(seen) == count:
            raise KeyboardInterrupt
        seen.append(path)
        return np.frombuffer(Path(path).read_bytes(), np.uint8)

    return read


def test_packed_resume_reuses_written_blocks(tmp_path, source):
    """Stopped after 50 files: the resume reuses what the journal vouches for and the archive
    holds every file."""
    out = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt) as stopped:
        data2h5.convert(source, out, ext=["bin"], reader=stopper(50), layout="packed", workers=1,
                        checkpoint_seconds=0)
    assert stopped.value.kept == 50
    report = data2h5.convert(source, out, ext=["bin"], reader=stopper(-1), layout="packed", workers=1, resume=True)
    assert report.reused == 50 and report.entries == 121
    view = data2h5.open(out, decode=False)
    assert {k: view[k].tobytes() for k in view} == {k: v for k, v in files_of(source).items() if k != "top.txt"}
    assert data2h5.verify(out).ok


def test_crc_of_every_packed_row_is_its_stored_bytes(tmp_path, source):
    out = tmp_path / "out.h5"
    data2h5.convert(source, out, ext=["bin"], reader="bytes", layout="packed", compression="zstd", workers=1)
    index = data2h5.archive.read_index(out)
    raw = out.read_bytes()
    for pos in range(len(index)):
        lo, n = int(index.offset[pos]), int(index.stored[pos])
        assert zlib.crc32(raw[lo : lo + n]) == int(index.stored_crc32[pos]) if n else lo == 0
