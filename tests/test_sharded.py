"""Sharded archives, written by real workers: the local pool, a distributed.LocalCluster, and a
``dask scheduler`` with two ``dask worker`` processes started here, one of them killed in the
middle of a shard (at a file that waits on a marker, never on time). Each run, read through
the master, equals the unsharded archive; a missing, truncated or replaced shard is refused
by every reader, naming it; a resume reuses the shards done.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import data2h5
import test_engines as engine_helpers
from data2h5.archive import ArchiveReader, read_index
from data2h5.cli import main
from data2h5.errors import ShardError
from data2h5.loaders import BatchReader, H5Dataset
from data2h5.shard_plan import attempt_path
from data2h5.sharding import ShardJournal
from images import photo_like

pytestmark = pytest.mark.timeout(300)

HERE = Path(__file__).resolve().parent


def photos(root: Path, n: int = 20) -> Path:
    """n PNGs of one shape (so the stacked layout takes them) in three folders."""
    import imageio.v3 as iio

    rng = np.random.default_rng(1)
    for i in range(n):
        path = root / f"c{i % 3}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, photo_like(rng, 12, 12, 3))
    return root


def blobs(root: Path, names: List[str]) -> Path:
    """Files of random bytes and varied sizes under ``root``."""
    rng = np.random.default_rng(2)
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.integers(0, 256, 100 + 37 * i, dtype=np.uint8).tobytes())
    return root


def pairs(path: Path) -> List[Tuple[str, bytes]]:
    """The archive's ``(key, stored bytes)`` in index order, read through ArchiveReader."""
    with ArchiveReader(path) as reader:
        return [(key, reader.read_stored(i).tobytes()) for i, key in enumerate(reader.index.keys)]


def shard_files(master: Path) -> List[Path]:
    return sorted(master.parent.glob(f"{master.stem}-*-of-*{master.suffix}"))


def leftovers(folder: Path) -> List[str]:
    """Hidden files a finished conversion must not leave (attempts, parts, journals, locks)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def local_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.mark.parametrize("engine,layout", [("local", "files"), ("local", "stacked"), ("local", "packed"),
                                           ("dask-local", "files")])
def test_a_sharded_conversion_reads_as_the_unsharded_archive(tmp_path, request, engine, layout):
    src = photos(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    single = data2h5.convert(src, out / "one.h5", ext="png", layout=layout, workers=1)
    options = {"client": request.getfixturevalue("local_cluster")} if engine == "dask-local" else {"workers": 2}
    report = data2h5.convert(src, out / "sharded.h5", ext="png", layout=layout, shard_size="6files", **options)

    assert [p.name for p in shard_files(out / "sharded.h5")] == [f"sharded-{i:05d}-of-00004.h5" for i in range(4)]
    assert report.entries == single.entries == 20
    assert pairs(out / "sharded.h5") == pairs(out / "one.h5")
    for shard in shard_files(out / "sharded.h5"):  # each shard is an archive of its own
        assert read_index(shard).layout == layout
    dataset = H5Dataset(out / "sharded.h5", decode=False)
    assert [(dataset.keys[i], dataset[i].tobytes()) for i in range(len(dataset))] == pairs(out / "one.h5")
    assert data2h5.verify(out / "sharded.h5").ok
    assert leftovers(out) == []


def test_shards_by_bytes_external_links_and_a_source_folder_holding_the_output(tmp_path):
    src = blobs(tmp_path / "src", [f"d{i % 2}/f{i:02d}.bin" for i in range(12)])
    master = src / "all.h5"
    data2h5.convert(src, master, ext=["bin", "h5"], reader="bytes", shard_size="1K", workers=2, shard_links=True)
    first = [p.name for p in shard_files(master)]
    assert len(first) > 2
    # Again, over the output of the first run: its master and shards are not sources.
    data2h5.convert(src, master, ext=["bin", "h5"], reader="bytes", shard_size="1K", workers=2, shard_links=True,
                    overwrite=True)
    keys = read_index(master).keys
    assert keys == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.bin"))
    assert [p.name for p in shard_files(master)] == first
    with h5py.File(master, "r") as f:  # plain h5py follows the links into the shards
        assert f["d1/f03.bin"][()].tobytes() == (src / "d1/f03.bin").read_bytes()


# --- damaged shards ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    src = blobs(root / "src", [f"k{i:02d}.bin" for i in range(9)])
    (root / "good").mkdir()
    data2h5.convert(src, root / "good" / "m.h5", ext="bin", reader="bytes", shard_size="3files", workers=1)
    return root / "good"


def _damage(folder: Path, how: str) -> str:
    victim = folder / "m-00001-of-00003.h5"
    if how == "deleted":
        victim.unlink()
    elif how == "truncated":
        with open(victim, "r+b") as fh:
            fh.truncate(victim.stat().st_size - 100)
    else:  # replaced by another archive made the same size: only its identity can tell
        size = victim.stat().st_size
        data = (folder / "m-00002-of-00003.h5").read_bytes()
        victim.write_bytes(data[:size] + b"\0" * max(0, size - len(data)))
    return victim.name


@pytest.mark.parametrize("how", ["deleted", "truncated", "replaced"])
def test_every_reader_refuses_a_bad_shard_naming_it(sharded_blobs, tmp_path, how):
    folder = tmp_path / "copy"
    shutil.copytree(sharded_blobs, folder)
    master = folder / "m.h5"
    name = _damage(folder, how)
    for open_it in (lambda: H5Dataset(master), lambda: ArchiveReader(master), lambda: read_index(master),
                    lambda: data2h5.verify(master)):
        with pytest.raises(ShardError, match=name) as caught:
            open_it()
        assert caught.value.shard == name and "\n" not in str(caught.value)
    runner = CliRunner()
    for args in (["info", str(master)], ["ls", str(master)], ["verify", str(master)],
                 ["extract", str(master), str(tmp_path / "x")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert name in result.output and ("shard " + name) in result.output
    assert not (tmp_path / "x").exists()


def test_verify_names_a_shard_damaged_inside(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        (src / f"big{i}.bin").write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    master = tmp_path / "m.h5"
    data2h5.convert(src, master, ext="bin", reader="bytes", shard_size="1files", workers=1)
    victim = tmp_path / "m-00001-of-00003.h5"
    offset = int(read_index(victim).offset[0])
    assert offset
    data = bytearray(victim.read_bytes())
    data[offset + 100_000] ^= 0xFF  # past the ends that every open checks: found by reading
    victim.write_bytes(bytes(data))
    report = data2h5.verify(master)
    assert not report.ok
    assert {p.key for p in report.problems} == {"big1.bin", victim.name}
    assert all(victim.name in p.reason or p.key == victim.name for p in report.problems)
    with pytest.raises(data2h5.errors.CorruptEntryError, match=victim.name):
        ArchiveReader(master).read(1)
    result = CliRunner().invoke(main, ["verify", str(master)])
    assert result.exit_code == 1 and victim.name in result.output


def test_batch_reader_refuses_a_master_in_one_line(sharded_blobs):
    with pytest.raises(data2h5.errors.ArchiveError, match="sharded archive"):
        BatchReader(sharded_blobs / "m.h5", batch_size=2)


# --- resume ----------------------------------------------------------------------------------

def test_a_resume_after_a_crash_reuses_the_shards_done(tmp_path, monkeypatch):
    src = blobs(tmp_path / "src", [f"k{i:02d}.bin" for i in range(8)] + ["z/fail.bin"])
    marker = tmp_path / "fail-now"
    marker.touch()
    monkeypatch.setenv("DATA2H5_TEST_FAIL", str(marker))
    monkeypatch.syspath_prepend(str(HERE))
    out = tmp_path / "out"
    out.mkdir()
    master = out / "m.h5"
    options = dict(ext="bin", reader="shard_readers:flaky_read", shard_size="3files", workers=1)
    with pytest.raises(data2h5.errors.PluginError, match="fail.bin"):
        data2h5.convert(src, master, **options)
    assert not master.exists()
    done = {p.name: p.stat().st_ino for p in shard_files(master)}
    assert sorted(done) == ["m-00000-of-00003.h5", "m-00001-of-00003.h5"]
    assert ShardJournal(master).path.exists()
    stale = attempt_path(out / "m-00002-of-00003.h5")
    stale.write_bytes(b"left by a killed attempt")

    marker.unlink()
    with pytest.raises(data2h5.errors.OutputError, match="--resume"):  # never passed over silently
        data2h5.convert(src, master, **options)
    report = data2h5.convert(src, master, resume=True, **options)
    assert report.reused == 6 and report.entries == 9
    assert {n: (out / n).stat().st_ino for n in done} == done  # the same files: not written again
    data2h5.convert(src, tmp_path / "one.h5", ext="bin", reader="shard_readers:flaky_read", workers=1)
    assert pairs(master) == pairs(tmp_path / "one.h5")
    assert leftovers(out) == []


# --- a scheduler and two workers started here; one killed mid-shard ---------------------------

@pytest.fixture(scope="module")
def dask_cli(tmp_path_factory):
    """(scheduler address, hold folder) of a scheduler and two one-thread workers whose
    ``held_read`` waits in the hold folder."""
    pytest.importorskip("distributed")
    root = tmp_path_factory.mktemp("dask-cli")
    hold = root / "hold"
    hold.mkdir()
    procs = engine_helpers.Processes(root)
    saved = os.environ.get("DATA2H5_TEST_HOLD")
    os.environ["DATA2H5_TEST_HOLD"] = str(hold)  # the workers inherit it
    try:
        scheduler_file = root / "scheduler.json"
        procs.start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                    "--scheduler-file", str(scheduler_file))
        address = engine_helpers.wait_for(lambda: engine_helpers._read_address(scheduler_file), "the scheduler file")
        for i in range(2):
            procs.start(f"worker{i}", "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1",
                        "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1", "--local-directory",
                        str(root / f"worker{i}"), "--death-timeout", "60")
        yield address, hold
    finally:
        if saved is None:
            os.environ.pop("DATA2H5_TEST_HOLD", None)
        else:
            os.environ["DATA2H5_TEST_HOLD"] = saved
        procs.stop()


def test_a_worker_killed_mid_shard_is_replaced_and_the_result_equals_an_uninterrupted_run(dask_cli, tmp_path,
                                                                                           monkeypatch):
    address, hold = dask_cli
    monkeypatch.delenv("DATA2H5_TEST_HOLD", raising=False)  # this process never holds
    monkeypatch.syspath_prepend(str(HERE))
    src = blobs(tmp_path / "src", ["a/hold.bin"] + [f"b/f{i:02d}.bin" for i in range(9)])
    out = tmp_path / "out"
    out.mkdir()
    options = dict(ext="bin", reader="shard_readers:held_read", shard_size="4files")
    (hold / "hold").touch()
    for old in hold.glob("started-*"):
        old.unlink()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    with open(tmp_path / "convert.log", "wb") as log:
        convert = subprocess.Popen([sys.executable, "-m", "data2h5.cli", "convert", "--path-images", str(src),
                                    "--path-output", str(out / "m.h5"), "--ext", "bin", "--reader", options["reader"],
                                    "--shard-size", options["shard_size"], "--scheduler", address, "-q"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        first = engine_helpers.wait_for(lambda: sorted(hold.glob("started-*")), "shard 0 to reach hold.bin")
        killed = int(first[0].name.rsplit("-", 1)[1])
        os.kill(killed, signal.SIGKILL)  # the worker process, in the middle of shard 0
        again = engine_helpers.wait_for(lambda: [p for p in hold.glob("started-*") if p != first[0]],
                                        "shard 0 to run again")
        assert int(again[0].name.rsplit("-", 1)[1]) != killed
    finally:
        (hold / "hold").unlink()
        try:
            convert.wait(engine_helpers.WAIT_SECONDS)
        finally:
            if convert.poll() is None:
                convert.kill()
    assert convert.returncode == 0, (tmp_path / "convert.log").read_text()
    data2h5.convert(src, tmp_path / "one.h5", workers=1, **options)
    assert pairs(out / "m.h5") == pairs(tmp_path / "one.h5")
    assert leftovers(out) == []  # the killed attempt's files were cleaned up
    verify = subprocess.run([sys.executable, "-m", "data2h5.cli", "verify", str(out / "m.h5"), "--scheduler", address],
                            capture_output=True, text=True, env=env, timeout=engine_helpers.WAIT_SECONDS)
    assert verify.returncode == 0, verify.stderr
    assert "verified on the Dask cluster at " + address in verify.stderr


def test_shards_written_inside_the_source_folder_are_never_sources(tmp_path):
    """Output beside the files it converts: a rerun with overwrite, or another shard size,
    walks the earlier shards and their master and must leave them out."""
    src = blobs(tmp_path / "src", [f"f{i:02d}.bin" for i in range(12)])
    out = src / "all.h5"
    first = data2h5.convert(src, out, ext=["bin", "h5"], reader="bytes", shard_size="5files", workers=2)
    again = data2h5.convert(src, out, ext=["bin", "h5"], reader="bytes", shard_size="4files", workers=2,
                            overwrite=True)
    assert first.entries == again.entries == 12
    assert [k for k, _ in pairs(out)] == [f"f{i:02d}.bin" for i in range(12)]
