"""Rank-aware, deterministic, resumable loading: RankSampler and BatchReader under real
torch.distributed (gloo, CPU processes on 127.0.0.1 started here), and resumed in new processes.

Run as a script, this file is the program those processes run (``MODE ARGS...``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(180)

N = 45  # samples: not a multiple of 2, 3 or the batch size
SPLIT = 20  # the first archive holds samples 0..19, the second 20..44
ROW = (128, 1024)  # uint8 rows of 128 KiB: the stacked archive's 1 MiB chunks hold 8 rows
BATCH = 4
EPOCHS = 3
SEED = 7
ROOT = Path(__file__).resolve().parents[1]


# -- archives ---------------------------------------------------------------------------------------


def write_npys(root: Path, ids: Sequence[int]) -> Path:
    """Sample ``i`` is ``ROW`` filled with ``i``, under one of three class folders."""
    for i in ids:
        path = root / f"c{i % 3}" / f"{i:03d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.full(ROW, i, np.uint8))
    return root


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Dict[str, object]:
    """Two files-layout archives (samples split between them) and one stacked archive of all."""
    import data2h5

    tmp = tmp_path_factory.mktemp("dist")
    parts = [tmp / "a.h5", tmp / "b.h5"]
    data2h5.convert(write_npys(tmp / "src_a", range(SPLIT)), parts[0], workers=1, ext="npy")
    data2h5.convert(write_npys(tmp / "src_b", range(SPLIT, N)), parts[1], workers=1, ext="npy")
    data2h5.convert(write_npys(tmp / "src_all", range(N)), tmp / "stacked.h5", workers=1, ext="npy", layout="stacked")
    return {"parts": [str(p) for p in parts], "stacked": str(tmp / "stacked.h5"), "tmp": tmp}


def sample_ids(ds) -> np.ndarray:
    """The id (fill value) of each of the dataset's samples, from its keys."""
    return np.array([int(k.rsplit("/", 1)[-1][:3]) for k in ds.keys])


def batch_ids(data) -> List[int]:
    return np.asarray(data)[:, 0, 0].tolist()


# -- processes --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(commands: List[List[str]], env: Dict[str, str] = None, timeout: float = 120) -> None:
    """Run this file as a program once per command, concurrently; every process ends: those
    still running at the deadline are killed, then the test fails with their output."""
    base = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, __file__, *cmd], env={**base, **(env or {}), "PROC": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, cmd in enumerate(commands)]
    deadline, outs = time.monotonic() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


# -- under torch.distributed ------------------------------------------------------------------------


def ddp_program(out: str, stacked: str, *parts: str) -> None:
    """One rank: sampler orders over several epochs, drop_last and evaluation samplers, and
    BatchReader epochs, all with rank and world size taken from the process group."""
    from datetime import timedelta

    import torch.distributed as dist

    from data2h5 import BatchReader, H5Dataset

    rank, world = int(os.environ["PROC"]), int(os.environ["WORLD"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['PORT']}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        ds = H5Dataset(list(parts))
        ids = sample_ids(ds)
        sampler = ds.sampler(seed=SEED)
        assert (sampler.rank, sampler.world_size) == (rank, world)
        result = {"epochs": [ids[list(sampler)].tolist() for _ in range(EPOCHS)],
                  "drop_last": ids[list(ds.sampler(seed=SEED, drop_last=True))].tolist(),
                  "eval": ids[list(ds.eval_sampler())].tolist()}
        gathered: list = [None] * world  # a collective across the ranks: each sees the others' epoch 0
        dist.all_gather_object(gathered, result["epochs"][0])
        assert sorted(sum(gathered, [])) == list(range(N))
        with BatchReader(stacked, BATCH, shuffle=True, seed=SEED, shuffle_window=16) as reader:
            assert (reader.rank, reader.world_size) == (rank, world)
            result["reader"] = [sum((batch_ids(d) for d, _ in reader), []) for _ in range(EPOCHS)]
        with BatchReader(stacked, BATCH, shuffle=True, seed=SEED, drop_last=True) as reader:
            result["reader_drop_last_batches"] = len(reader)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_partition(orders: List[List[int]], complete: bool = True) -> None:
    everything = sum(orders, [])
    assert len(set(everything)) == len(everything), "a sample was read by two ranks, or twice"
    if complete:
        assert sorted(everything) == list(range(N))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_every_epoch_deterministically(archives, tmp_path, world):
    from data2h5 import BatchReader, H5Dataset

    run_all([["ddp", str(tmp_path), archives["stacked"], *archives["parts"]]] * world,
            env={"WORLD": str(world), "PORT": str(free_port())})
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    ds = H5Dataset(archives["parts"])
    ids = sample_ids(ds)
    for e in range(EPOCHS):
        check_partition([res["epochs"][e] for res in results])
        check_partition([res["reader"][e] for res in results])
    check_partition([res["drop_last"] for res in results], complete=False)
    assert len({len(res["drop_last"]) for res in results}) == 1 and sum(len(r["drop_last"]) for r in results) == N // world * world
    assert len({res["reader_drop_last_batches"] for res in results}) == 1
    # evaluation: every sample once, rank r the r-th span in dataset order
    assert sum((res["eval"] for res in results), []) == ids.tolist()
    with BatchReader(archives["stacked"], BATCH) as reader:
        k = reader._data_rows.slab_rows
    rows = {i: r for r, i in enumerate(sample_ids(H5Dataset(archives["stacked"])).tolist())}
    for rank, res in enumerate(results):
        # orders differ between epochs, and another run (this process, explicit rank) gives the same
        assert res["epochs"][0] != res["epochs"][1] != res["epochs"][2]
        assert res["reader"][0] != res["reader"][1]
        sampler = ds.sampler(seed=SEED, rank=rank, world_size=world)
        assert [ids[list(sampler)].tolist() for _ in range(EPOCHS)] == res["epochs"]
        with BatchReader(archives["stacked"], BATCH, shuffle=True, seed=SEED, shuffle_window=16, rank=rank,
                         world_size=world) as reader:
            assert [sum((batch_ids(d) for d, _ in reader), []) for _ in range(EPOCHS)] == res["reader"]
    # no two ranks decode one chunk of the stacked archive, in any epoch
    for e in range(EPOCHS):
        chunks = [{rows[i] // k for i in res["reader"][e]} for res in results]
        assert all(not (chunks[a] & chunks[b]) for a in range(world) for b in range(a + 1, world))


# -- resuming in a new process ----------------------------------------------------------------------

STOP_AFTER = 3  # batches of epoch 1 the first process trains on


def make_loader(kind: str, parts: Sequence[str]):
    from torch.utils.data import DataLoader

    from data2h5 import H5Dataset

    ds = H5Dataset(list(parts))
    sampler = ds.sampler(seed=SEED, rank=1, world_size=2)
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=2), sampler
    return DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=2), sampler


def dataset_program(phase: str, state_dir: str, out: str, *parts: str) -> None:
    """For each loader kind (DataLoader, and StatefulDataLoader when torchdata is installed),
    first phase: epoch 0, then STOP_AFTER batches of epoch 1, save the state and exit; second
    phase: restore, then the rest of epoch 1 and epoch 2."""
    import torch

    seen: Dict[str, List[List[int]]] = {}
    for kind in LOADER_KINDS:
        loader, sampler = make_loader(kind, parts)
        state = Path(state_dir, f"{kind}.pt")
        seen[kind] = []
        if phase == "first":
            seen[kind].append(sum((batch_ids(b) for b in loader), []))
            batches = []
            for step, batch in enumerate(loader):
                batches += batch_ids(batch)
                if step + 1 == STOP_AFTER:
                    saved = loader.state_dict() if kind == "stateful" else sampler.state_dict(consumed=(step + 1) * BATCH)
                    break
            seen[kind].append(batches)
            torch.save(saved, state)
        else:
            (loader if kind == "stateful" else sampler).load_state_dict(torch.load(state))
            for _ in range(2):
                seen[kind].append(sum((batch_ids(b) for b in loader), []))
    Path(out).write_text(json.dumps(seen))


try:
    import torchdata.stateful_dataloader  # noqa: F401

    LOADER_KINDS = ("plain", "stateful")
except ImportError:
    LOADER_KINDS = ("plain",)


@pytest.fixture(scope="module")
def resumed(archives) -> Dict[str, List[List[int]]]:
    """Each loader kind's epochs: the first process's two, then the second's two."""
    tmp = archives["tmp"]
    for phase in ("first", "second"):
        run_all([["dataset", phase, str(tmp), str(tmp / f"{phase}.json"), *archives["parts"]]])
    first, second = (json.loads((tmp / f"{p}.json").read_text()) for p in ("first", "second"))
    return {kind: first[kind] + second[kind] for kind in first}


@pytest.mark.parametrize("kind", ["plain", "stateful"])
def test_dataloader_resumes_at_the_next_sample_in_a_new_process(archives, resumed, kind):
    torch = pytest.importorskip("torch")
    if kind not in resumed:
        pytest.skip("torchdata is not installed (pip install torchdata)")
    loader, _ = make_loader("plain", archives["parts"])
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=BATCH, sampler=loader.sampler)  # no workers
    uninterrupted = [sum((batch_ids(b) for b in loader), []) for _ in range(EPOCHS)]
    epoch0, stopped, rest, epoch2 = resumed[kind]
    assert len(stopped) == STOP_AFTER * BATCH
    assert epoch0 == uninterrupted[0]
    assert stopped + rest == uninterrupted[1]
    assert epoch2 == uninterrupted[2]


def reader_program(phase: str, rank: str, world: str, state: str, out: str, stacked: str) -> None:
    from data2h5 import BatchReader

    seen: List[List[int]] = []
    with BatchReader(stacked, BATCH, shuffle=True, seed=SEED, shuffle_window=16, rank=int(rank),
                     world_size=int(world)) as reader:
        if phase == "first":
            seen.append(sum((batch_ids(d) for d, _ in reader), []))
            batches = []
            for step, (data, _) in enumerate(reader):
                batches += batch_ids(data)
                if step + 1 == STOP_AFTER:
                    break
            seen.append(batches)
            Path(state).write_text(json.dumps(reader.state_dict()))
        else:
            reader.load_state_dict(json.loads(Path(state).read_text()))
            for _ in range(2):
                seen.append(sum((batch_ids(d) for d, _ in reader), []))
    Path(out).write_text(json.dumps(seen))


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_batch_reader_resumes_at_the_next_batch_in_a_new_process(archives, tmp_path, rank, world):
    from data2h5 import BatchReader

    state = tmp_path / "state.json"
    for phase in ("first", "second"):
        run_all([["reader", phase, str(rank), str(world), str(state), str(tmp_path / f"{phase}.json"),
                  archives["stacked"]]])
    first, second = (json.loads((tmp_path / f"{p}.json").read_text()) for p in ("first", "second"))
    with BatchReader(archives["stacked"], BATCH, shuffle=True, seed=SEED, shuffle_window=16, rank=rank,
                     world_size=world) as reader:
        uninterrupted = [sum((batch_ids(d) for d, _ in reader), []) for _ in range(EPOCHS)]
    assert first[0] == uninterrupted[0] and len(first[1]) == STOP_AFTER * BATCH
    assert first[1] + second[0] == uninterrupted[1]
    assert second[1] == uninterrupted[2]


# -- in this process --------------------------------------------------------------------------------


def test_sampler_epochs_set_epoch_and_state_round_trip():
    from data2h5.loaders import RankSampler

    sampler = RankSampler(1000, seed=3, rank=1, world_size=3)
    epochs = [list(sampler) for _ in range(3)]
    assert epochs[0] != epochs[1] and len(epochs[0]) == len(sampler) == 333
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]
    it = iter(sampler)
    head = [next(it) for _ in range(10)]
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (2, 10)
    again = RankSampler(1000, seed=3, rank=1, world_size=3)
    again.load_state_dict(state)
    again.set_epoch(2)  # the habit of DistributedSampler users keeps the loaded position
    assert head + list(again) == epochs[2]
    assert list(again) == RankSampler(1000, seed=3, rank=1, world_size=3).indices(3).tolist()


def test_sampler_reads_a_contiguous_block_of_archives_shuffled_within_windows():
    from data2h5.loaders import RankSampler

    groups, rows = np.repeat(np.arange(8), 100), np.tile(np.arange(100), 8)
    for epoch in range(3):
        seen = []
        for rank in range(4):
            order = RankSampler(800, groups=groups, rows=rows, seed=1, rank=rank, world_size=4, window=25).indices(epoch)
            mine = sorted(set(groups[order].tolist()))
            assert len(mine) == 2  # 8 archives, 4 ranks: two whole archives each
            # windows of 25 consecutive samples of the span, read one after the other: at most
            # 8 of the jumps between consecutive samples span 25 positions or more
            jumps = min(np.count_nonzero(np.abs(np.diff((groups[order] == first) * 100 + rows[order])) >= 25)
                        for first in mine)
            assert jumps <= 8
            seen += order.tolist()
        assert sorted(seen) == list(range(800))


@pytest.mark.parametrize("field,value", [("seed", 4), ("shuffle", False), ("window", 10), ("num_samples", 99)])
def test_sampler_state_for_another_plan_is_refused(field, value):
    from data2h5.loaders import RankSampler

    state = RankSampler(100, seed=3, rank=0, world_size=2).state_dict()
    state[field] = value
    with pytest.raises(ValueError, match=f"sampler state has {field}="):
        RankSampler(100, seed=3, rank=0, world_size=2).load_state_dict(state)


def test_world_size_change_is_refused_mid_epoch_and_replanned_at_a_boundary(archives):
    from data2h5 import BatchReader
    from data2h5.loaders import RankSampler

    sampler = RankSampler(100, seed=3, rank=0, world_size=2)
    it = iter(sampler)
    next(it)
    with pytest.raises(ValueError, match="saved by 2 ranks in epoch 0 .position 1.; this run has 3"):
        RankSampler(100, seed=3, rank=0, world_size=3).load_state_dict(sampler.state_dict())
    list(it)  # the epoch read to its end: loads into 3 ranks as epoch 1's start
    three = RankSampler(100, seed=3, rank=2, world_size=3)
    three.load_state_dict(sampler.state_dict())
    assert three.epoch == 1 and list(three) == three.indices(1).tolist()
    with BatchReader(archives["stacked"], BATCH, seed=0, rank=0, world_size=2) as reader:
        next(iter(reader))
        state = reader.state_dict()
    with BatchReader(archives["stacked"], BATCH, seed=0, rank=0, world_size=3) as reader:
        with pytest.raises(ValueError, match="BatchReader state was saved by 2 ranks"):
            reader.load_state_dict(state)


# -- the programs -----------------------------------------------------------------------------------

PROGRAMS = {"ddp": ddp_program, "dataset": dataset_program, "reader": reader_program}

if __name__ == "__main__":
    PROGRAMS[sys.argv[1]](*sys.argv[2:])
