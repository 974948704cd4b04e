"""Archives crafted by hand with h5py, as a stranger could: every command and loader answers
each attack with one line (exit 1) or a clean result, never runs code the archive names,
never shows a byte from outside the archive, never hangs, never raises a traceback."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

import data2h5
from convert_helpers import index_group
from conftest import photo_like, write_images
from data2h5 import format as fmt, safety

CANARY = b"CANARY-d2h5-outside-the-archive"
ENV_SECRET = "CANARY-d2h5-environment-secret"
MEMORY_LIMIT = 3 << 30
TIMEOUT = 90

DRIVER = r"""
import contextlib, io, json, sys
import numpy as np
import data2h5
from data2h5.cli import main
from data2h5.archive import ArchiveReader
from data2h5.loaders import BatchReader

path, layout, commands = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
results = {}
for name, args in commands.items():  # the real command line, in this one process
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args, prog_name="data2h5")
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    results[name] = {"rc": rc, "text": out.getvalue() + err.getvalue(), "data": ""}

def dataset():
    ds = data2h5.H5Dataset(path, target="folder")
    return [ds[i][0] for i in range(len(ds))]
def archive_reader():
    with ArchiveReader(path) as reader:
        return [reader.read_stored(i) for i in range(len(reader))]
def batch_reader():
    with BatchReader(path, batch_size=4, shuffle=True, seed=0) as reader:
        return [data.copy() for data, _ in reader]
loaders = {"H5Dataset": dataset, "ArchiveReader": archive_reader}
if layout == "stacked":
    loaders["BatchReader"] = batch_reader
for name, load in loaders.items():
    try:
        data = b"".join(np.ascontiguousarray(v).tobytes() for v in load())
        results[name] = {"rc": 0, "text": "", "data": data.decode("latin-1")}
    except data2h5.Data2H5Error as exc:
        results[name] = {"rc": 1, "text": f"data2h5: error: {exc}\n", "data": ""}
sys.stdout.write(json.dumps(results))
"""


@dataclass
class Ctx:
    """What an attack may use: files outside the archive it tries to reach."""

    tmp: Path
    canary: Path  # a plain file outside the archive
    outside_h5: Path  # an HDF5 file outside the archive, holding the canary
    plugin_ran: Path  # created if the archive's named plugin ever runs
    evil_plugin: Path


@pytest.fixture(scope="module")
def goods(tmp_path_factory) -> Dict[str, Path]:
    """A small archive of each layout: files decoded, files bytes, stacked (same-shape images)."""
    base = tmp_path_factory.mktemp("hostile")
    src, same = base / "src", base / "same"
    write_images(src, [f"{c}/img_{i}" for c in ("a", "b") for i in range(3)], size=12)
    rng = np.random.default_rng(1)
    for i in range(8):
        (same / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        iio.imwrite(same / "ab"[i % 2] / f"img_{i}.png", photo_like(rng, 12, 12))
    return {
        "files": data2h5.convert(src, base / "files.h5", ext="png", workers=1).output,
        "bytes": data2h5.convert(src, base / "bytes.h5", ext="png", reader="bytes", workers=1).output,
        "stacked": data2h5.convert(same, base / "stacked.h5", ext="png", layout="stacked", workers=1).output,
        "packed": data2h5.convert(src, base / "packed.h5", ext="png", reader="bytes", layout="packed",
                                  workers=1).output,
        "src": src,
    }


@pytest.fixture
def ctx(tmp_path) -> Ctx:
    canary = tmp_path / "canary.txt"
    canary.write_bytes(CANARY)
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["x"] = np.frombuffer(CANARY, np.uint8)
        f["data"] = np.frombuffer(CANARY * 8, np.uint8).reshape(8, -1)
    ran = tmp_path / "plugin-ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n"
                    f"def keep(name, ext):\n    pathlib.Path({str(ran)!r}).touch()\n    return True\n")
    return Ctx(tmp_path, canary, outside, ran, evil)


# -- attacks: each edits a copy of a good archive in place --------------------------------------


def _row(f: h5py.File, key_index: int = 0) -> str:
    return index_group(f)["keys"][key_index].decode()


def _set_row(f: h5py.File, row: int, **fields) -> None:
    for name, value in fields.items():
        column = index_group(f)[name]
        if name == "shape":  # the column is as wide as the archive's entries need
            value = value[: column.shape[1]]
        column[row] = value


def _replace_entry(f: h5py.File, row: int, make: Callable[[h5py.Group, str], None], n: int) -> None:
    """Put something else where entry ``row`` was, with an index row that describes it as a
    plain uint8 array of ``n`` bytes read through HDF5."""
    key = _row(f, row)
    parent, name = key.rsplit("/", 1)
    del f[key]
    make(f[parent], name)
    shape = np.full(fmt.MAX_NDIM, -1, np.int64)
    shape[0] = n
    _set_row(f, row, offset=0, stored=n, codec=0, kind=1, dtype=b"|u1", shape=shape, size=n, crc32=0)


def external_storage(where: Callable[[Ctx], str]):
    def attack(path: Path, ctx: Ctx) -> None:
        with h5py.File(path, "r+") as f:
            _replace_entry(f, 0, lambda g, name: g.create_dataset(
                name, shape=(len(CANARY),), dtype="u1", external=[(where(ctx), 0, len(CANARY))]), len(CANARY))
    return attack


def fifo(ctx: Ctx) -> str:
    pipe = ctx.tmp / "pipe"
    os.mkfifo(pipe)
    return str(pipe)


def external_link(path: Path, ctx: Ctx) -> None:
    with h5py.File(path, "r+") as f:
        _replace_entry(f, 0, lambda g, name: g.__setitem__(name, h5py.ExternalLink(str(ctx.outside_h5), "/x")),
                       len(CANARY))


def virtual_dataset(path: Path, ctx: Ctx) -> None:
    def make(g: h5py.Group, name: str) -> None:
        layout = h5py.VirtualLayout(shape=(len(CANARY),), dtype="u1")
        layout[:] = h5py.VirtualSource(str(ctx.outside_h5), "x", shape=(len(CANARY),))
        g.create_virtual_dataset(name, layout)

    with h5py.File(path, "r+") as f:
        _replace_entry(f, 0, make, len(CANARY))


def stacked_data_external_link(path: Path, ctx: Ctx) -> None:
    with h5py.File(path, "r+") as f:
        del f[fmt.STACKED_DATA]
        f[fmt.STACKED_DATA] = h5py.ExternalLink(str(ctx.outside_h5), "/data")


def hidden_block(path: Path, ctx: Ctx) -> None:
    """Row 0 points at a block of the attacker's: h5py would show the real entry."""
    with h5py.File(path, "r+") as f:
        index = index_group(f)
        key = _row(f, 0)
        real = f[key]
        hidden = index.create_dataset("hidden", data=np.full(real.shape, 66, real.dtype))  # contiguous, raw
        _set_row(f, 0, offset=hidden.id.get_offset(), stored=hidden.id.get_storage_size(), codec=0, stored_crc32=0)


def packed_hidden_block(path: Path, ctx: Ctx) -> None:
    """Row 0 of a packed archive points at a block of the attacker's, outside the packed blocks."""
    with h5py.File(path, "r+") as f:
        n = int(index_group(f)["stored"][0])
        hidden = index_group(f).create_dataset("hidden", data=np.full(n, 66, np.uint8))
        _set_row(f, 0, offset=hidden.id.get_offset(), stored=n, codec=0, stored_crc32=0)


def packed_chunked_block(path: Path, ctx: Ctx) -> None:
    """The first packed block replaced by a compressed one: its rows no longer lie in raw storage."""
    with h5py.File(path, "r+") as f:
        data = f["packed/000000"][()]
        del f["packed/000000"]
        f.create_dataset("packed/000000", data=data, chunks=(64,), compression="gzip")


def packed_block_number(path: Path, ctx: Ctx) -> None:
    with h5py.File(path, "r+") as f:
        _set_row(f, 0, block=7)


def shared_block(path: Path, ctx: Ctx) -> None:
    with h5py.File(path, "r+") as f:
        index = index_group(f)
        for name in ("offset", "stored", "codec", "dtype", "stored_crc32", "kind", "size", "crc32", "verbatim"):
            column = index[name][()]
            column[:] = column[0]
            index[name][...] = column
        shape = index["shape"][()]
        shape[:] = shape[0]
        index["shape"][...] = shape


def fill_value_bomb(path: Path, ctx: Ctx) -> None:
    n = 10 << 30
    with h5py.File(path, "r+") as f:
        _replace_entry(f, 0, lambda g, name: g.create_dataset(name, shape=(n,), dtype="u1", chunks=(1 << 20,)), n)


def huge_shape(codec: int):
    def attack(path: Path, ctx: Ctx) -> None:
        with h5py.File(path, "r+") as f:
            shape = np.full(fmt.MAX_NDIM, -1, np.int64)
            shape[0] = 10 ** 12
            _set_row(f, 0, codec=codec, dtype=b"|u1", shape=shape)
    return attack


def over_ratio(path: Path, ctx: Ctx) -> None:
    """Under the read limit, but more than lzf can make of the stored bytes (python-lzf would
    allocate it unchecked)."""
    with h5py.File(path, "r+") as f:
        shape = np.full(fmt.MAX_NDIM, -1, np.int64)
        shape[0] = 1 << 31
        _set_row(f, 0, codec=1, dtype=b"|u1", shape=shape)


def offset(value: int, dtype: str = "<u8"):
    def attack(path: Path, ctx: Ctx) -> None:
        with h5py.File(path, "r+") as f:
            column = index_group(f)["offset"][()].astype(dtype)
            column[0] = value
            del index_group(f)["offset"]
            index_group(f)["offset"] = column
    return attack


def dtype(text: bytes):
    def attack(path: Path, ctx: Ctx) -> None:
        with h5py.File(path, "r+") as f:
            _set_row(f, 0, dtype=text)
    return attack


def malformed_attrs(path: Path, ctx: Ctx) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[fmt.ATTR_SKIPPED] = "[" * 100_000  # deep enough to exhaust the JSON parser's recursion
        f.attrs[fmt.ATTR_EXTENSIONS] = np.arange(5)
        f.attrs[fmt.ATTR_ENTRIES] = "many"
        f.attrs[fmt.ATTR_BYTES_IN] = -3
        f.attrs[fmt.ATTR_CREATED] = np.zeros((2, 2))


def escape_keys(path: Path, ctx: Ctx) -> None:
    evil = "\x1b]0;owned\x07\x1b[2J\rfake line\nsecond.png"
    with h5py.File(path, "r+") as f:
        keys = index_group(f)["keys"][()].tolist()
        old = keys[0].decode()
        f.move(old, evil)
        keys[0] = evil.encode()
        del index_group(f)["keys"]
        index_group(f)["keys"] = np.array(keys)
        f.attrs[fmt.ATTR_SOURCE] = "\x1b]0;title\x07/home"


def label(value: int):
    def attack(path: Path, ctx: Ctx) -> None:
        with h5py.File(path, "r+") as f:
            f[fmt.STACKED_LABELS][1] = value
    return attack


def index_reference(to: str):
    """The root attribute that finds the index refers to something else."""
    def attack(path: Path, ctx: Ctx) -> None:
        with h5py.File(path, "r+") as f:
            target = f[_row(f, 0)] if to == "entry" else f["/"]
            f.attrs[fmt.ATTR_INDEX] = target.ref if to != "text" else "not a reference"
    return attack


def archive_named_plugin(path: Path, ctx: Ctx) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[fmt.ATTR_PRUNE] = f"{ctx.evil_plugin}:keep"
        f.attrs[fmt.ATTR_READER] = f"{ctx.evil_plugin}:keep"


ENTRY = ("verify", "extract", "H5Dataset", "ArchiveReader")  # refused by whatever reads entries
ALL = ("info", "ls", *ENTRY)
# name: (attack, layouts, the runs that must refuse it)
ATTACKS = {
    "external-storage-absolute": (external_storage(lambda c: str(c.canary)), ("files", "bytes"), ENTRY),
    "external-storage-relative": (external_storage(lambda c: "canary.txt"), ("files",), ENTRY),
    "external-storage-environ": (external_storage(lambda c: "/proc/self/environ"), ("bytes",), ENTRY),
    "external-storage-fifo": (external_storage(fifo), ("files",), ENTRY),
    "external-link": (external_link, ("files", "bytes"), ENTRY),
    "virtual-dataset": (virtual_dataset, ("files",), ENTRY),
    "stacked-data-external-link": (stacked_data_external_link, ("stacked",), (*ALL, "BatchReader")),
    "index-hidden-block": (hidden_block, ("files", "bytes"), ENTRY),
    "packed-row-outside-its-block": (packed_hidden_block, ("packed",), ALL),
    "packed-block-chunked": (packed_chunked_block, ("packed",), ALL),
    "packed-block-missing": (packed_block_number, ("packed",), ALL),
    "shared-block-bomb": (shared_block, ("files", "bytes", "packed"), ALL),
    "fill-value-bomb": (fill_value_bomb, ("files",), ALL),
    "huge-shape-none": (huge_shape(0), ("bytes", "packed"), ALL),
    "huge-shape-lzf": (huge_shape(1), ("files",), ALL),
    "huge-shape-gzip": (huge_shape(2), ("files",), ALL),
    "huge-shape-zstd": (huge_shape(3), ("files",), ALL),
    "lzf-over-ratio": (over_ratio, ("files",), ALL),
    "offset-overflow": (offset(2 ** 64 - 16), ("files", "packed"), ALL),
    "offset-negative": (offset(-16, "<i8"), ("files",), ALL),
    "unknown-dtype": (dtype(b"zz"), ("files", "packed"), ALL),
    "object-dtype": (dtype(b"|O"), ("bytes",), ALL),
    "malformed-attributes": (malformed_attrs, ("files", "stacked"), ()),
    "escape-sequences": (escape_keys, ("bytes",), ()),
    "label-out-of-range": (label(99), ("stacked",), ("verify", "extract", "H5Dataset", "ArchiveReader",
                                                     "BatchReader")),
    "label-negative": (label(-1), ("stacked",), ("verify", "extract", "H5Dataset", "ArchiveReader", "BatchReader")),
    "archive-named-plugin": (archive_named_plugin, ("files",), ()),
    "index-reference-to-an-entry": (index_reference("entry"), ("files",), ALL),
    "index-reference-to-the-root": (index_reference("root"), ("bytes",), ALL),
    "index-reference-as-text": (index_reference("text"), ("files",), ALL),
}
CASES = [pytest.param(name, layout, id=f"{name}-{layout}") for name, (_, layouts, _) in ATTACKS.items()
         for layout in layouts]


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _run(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    # As a fresh shell starts it: without the prefixes an in-process CLI test may have locked.
    env = {k: v for k, v in os.environ.items() if k not in safety.PREFIX_VARIABLES}
    env["D2H5_SECRET"] = ENV_SECRET
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, timeout=TIMEOUT,
                          preexec_fn=_limit_memory)


def _lines(text: str) -> List[str]:
    return [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]


@pytest.mark.parametrize("name, layout", CASES)
def test_attack_is_refused_in_one_line(goods, ctx, name, layout):
    attack, _, refused_by = ATTACKS[name]
    path = ctx.tmp / "archive.h5"
    shutil.copy(goods["stacked" if layout == "stacked" else layout], path)
    attack(path, ctx)
    dest = ctx.tmp / "dest"
    verify = ["verify", str(path)] + (["--source", str(goods["src"])] if name == "archive-named-plugin" else [])
    commands = {"info": ["info", str(path)], "ls": ["ls", str(path)], "verify": verify,
                "extract": ["extract", "-q", str(path), str(dest)]}
    done = _run(["-c", DRIVER, str(path), layout, json.dumps(commands)], ctx.tmp)
    where = f"{name}/{layout}: rc={done.returncode}\n{done.stderr.decode(errors='replace')[-3000:]}"
    assert done.returncode == 0, where  # no crash, no signal, no exception outside data2h5's own
    results = json.loads(done.stdout)
    for run, result in results.items():
        text = result["text"]
        assert result["rc"] in (0, 1) and "Traceback" not in text, f"{run}: {where}\n{text}"
        if result["rc"]:
            errors = [ln for ln in _lines(text) if ln.startswith("data2h5: error: ")]
            assert len(errors) == 1, f"{run} on {name}/{layout}:\n{text}"
        assert "\x1b" not in text, f"{run} printed a raw escape sequence: {text!r}"
    outcomes = {run: "error" if result["rc"] else "ok" for run, result in results.items()}
    for run in refused_by:
        assert outcomes[run] == "error", f"{run} accepted {name}/{layout}: {outcomes}"
    blobs = [r["text"].encode() + r["data"].encode("latin-1") for r in results.values()]
    blobs += [p.read_bytes() for p in dest.rglob("*") if p.is_file()] if dest.exists() else []
    for blob in blobs:
        assert CANARY not in blob and ENV_SECRET.encode() not in blob, f"{name}/{layout}: a byte from outside"
    assert not ctx.plugin_ran.exists(), "code named by the archive ran"
    if name == "escape-sequences" and outcomes["extract"] == "ok":
        assert any("\x1b" in p.name for p in dest.rglob("*"))  # file names stay exact; printed text is escaped


def test_escaped_keys_are_listed_one_a_line(goods, ctx):
    path = ctx.tmp / "archive.h5"
    shutil.copy(goods["bytes"], path)
    escape_keys(path, ctx)
    listed = _run(["-m", "data2h5.cli", "ls", str(path)], ctx.tmp).stdout.decode()
    assert len(listed.splitlines()) == len(data2h5.archive.read_index(path))
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x0dfake line\\x0asecond.png" in listed.splitlines()


def test_locked_prefixes_reach_processes_started_after(tmp_path, ctx):
    """The second lock (set by the data2h5 command): a process started after it, even reading
    with plain h5py, cannot open a relative external file."""
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", shape=(len(CANARY),), dtype="u1", external=[("canary.txt", 0, len(CANARY))])
    child = ("import h5py, sys\n"
             "try:\n    sys.stdout.buffer.write(h5py.File(sys.argv[1])['x'][()].tobytes())\n"
             "except OSError:\n    print('refused')")
    parent = ("import subprocess, sys\nfrom data2h5.safety import lock_prefixes\nlock_prefixes()\n"
              "subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])")
    assert _run(["-c", child, str(path)], tmp_path).stdout.strip() == CANARY  # unlocked, plain h5py reads it
    assert _run(["-c", parent, child, str(path)], tmp_path).stdout.strip() == b"refused"
