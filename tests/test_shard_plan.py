"""The shard planner: contiguous, deterministic ranges by bytes or by count, stable names."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from data2h5.errors import Data2H5Error
from data2h5.shard_plan import (
    BYTES,
    FILES,
    ShardSize,
    ShardSizeError,
    SourceEntry,
    attempt_files,
    attempt_path,
    parse_shard_size,
    plan_shards,
    shard_name,
    shard_name_pattern,
    shard_path,
)


@pytest.mark.parametrize("text, expected", [
    ("2G", ShardSize(2 << 30, BYTES)),
    ("2GiB", ShardSize(2 << 30, BYTES)),
    ("2 gb", ShardSize(2 << 30, BYTES)),
    ("1.5M", ShardSize(3 << 19, BYTES)),
    ("4096B", ShardSize(4096, BYTES)),
    ("50000files", ShardSize(50000, FILES)),
    ("50k files", ShardSize(50000, FILES)),
    ("1Mfiles", ShardSize(10**6, FILES)),
    ("1 file", ShardSize(1, FILES)),
])
def test_sizes_parse(text, expected):
    assert parse_shard_size(text) == expected


@pytest.mark.parametrize("text, says", [
    ("50000", "give a unit: 50000B for bytes or 50000files"),
    ("2X", "not a size such as 2G or a count such as 50000files"),
    ("", "not a size"),
    ("-1G", "not a size"),
    ("0files", "at least 1"),
    ("0.2B", "at least 1"),
    ("1.5files", "whole number"),
    ("2T files", "k, M or G"),
])
def test_bad_sizes_say_why_on_one_line(text, says):
    with pytest.raises(ShardSizeError) as caught:
        parse_shard_size(text, "--shard-size")
    message = str(caught.value)
    assert says in message and message.startswith(f"--shard-size {text!r}") and "\n" not in message
    assert isinstance(caught.value, Data2H5Error) and isinstance(caught.value, ValueError)
    again = pickle.loads(pickle.dumps(caught.value))
    assert (type(again), str(again)) == (ShardSizeError, message)


def entries(sizes):
    return [SourceEntry(f"k{i:03d}", n) for i, n in enumerate(sizes)]


def test_bytes_cut_into_contiguous_ranges_that_cover_every_entry():
    files = entries([40, 30, 30, 10, 100, 250, 5, 5, 60])
    plan = plan_shards(files, ShardSize(100, BYTES), "/data/train.h5")
    assert [(p.first, p.stop) for p in plan] == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 9)]
    assert [p.nbytes for p in plan] == [100, 10, 100, 250, 70]  # a full shard is closed; 250 B stand alone
    assert [p.entries for p in plan] == [3, 1, 1, 1, 3]
    assert [(p.first_key, p.last_key) for p in plan][4] == ("k006", "k008")
    assert [p.index for p in plan] == [0, 1, 2, 3, 4]
    assert [p.name for p in plan] == [f"train-{i:05d}-of-00005.h5" for i in range(5)]
    covered = [k for p in plan for k in range(p.first, p.stop)]
    assert covered == list(range(len(files)))


def test_count_cuts_every_n_files_whatever_their_size():
    files = entries([1, 10**9, 0, 7, 7, 7, 7])
    plan = plan_shards(files, ShardSize(3, FILES), Path("out.hdf5"))
    assert [(p.first, p.stop) for p in plan] == [(0, 3), (3, 6), (6, 7)]
    assert plan[0].nbytes == 10**9 + 1
    assert [p.name for p in plan] == ["out-00000-of-00003.hdf5", "out-00001-of-00003.hdf5", "out-00002-of-00003.hdf5"]


def test_plans_are_deterministic_and_empty_input_gives_no_shards():
    files = entries([i * 37 % 101 for i in range(500)])
    size = ShardSize(1000, BYTES)
    assert plan_shards(files, size, "a.h5") == plan_shards(list(files), size, "a.h5")
    assert all(p.nbytes <= 1000 for p in plan_shards(files, size, "a.h5"))
    assert plan_shards([], size, "a.h5") == []


def test_unsorted_or_repeated_keys_are_refused():
    with pytest.raises(ValueError, match="not sorted"):
        plan_shards([SourceEntry("b", 1), SourceEntry("a", 1)], ShardSize(10, FILES), "o.h5")
    with pytest.raises(ValueError, match="not sorted"):
        plan_shards([SourceEntry("a", 1), SourceEntry("a", 1)], ShardSize(10, FILES), "o.h5")


def test_names_sit_beside_out_widen_past_99999_and_match_the_pattern():
    assert shard_path("/x/y/train.h5", 3, 8) == Path("/x/y/train-00003-of-00008.h5")
    assert shard_name("train", 0, 1) == "train-00000-of-00001"
    assert shard_name("t.h5", 123456, 200000) == "t-123456-of-200000.h5"
    pattern = shard_name_pattern("/x/train.h5")
    assert pattern.fullmatch("train-00003-of-00008.h5") and pattern.fullmatch("train-123456-of-200000.h5")
    assert not pattern.fullmatch("train-3-of-8.h5") and not pattern.fullmatch("trainX00003-of-00008.h5")
    with pytest.raises(ValueError):
        shard_name("t.h5", 8, 8)


def test_attempt_paths_are_hidden_unique_and_listed(tmp_path):
    final = tmp_path / "train-00000-of-00002.h5"
    a, b = attempt_path(final), attempt_path(final)
    assert a != b and a.parent == tmp_path and a.name.startswith(".train-00000-of-00002.h5")
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    (tmp_path / "train-00001-of-00002.h5").write_bytes(b"z")
    assert attempt_files(final) == sorted([a, b])
    assert attempt_files(tmp_path / "missing" / "t.h5") == []
    os.replace(a, final)
    assert attempt_files(final) == [b]
