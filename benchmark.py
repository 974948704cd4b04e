#!/usr/bin/env python
"""Measure data2h5 against the alternatives, side by side, in one run.

    python benchmark.py                      # every section, 5,000 generated JPEGs
    python benchmark.py --files 1000 --only convert
    python benchmark.py --only load --cold   # as root: drop the page cache before each epoch

Sections (``--only``, repeatable):

convert  files/s of turning the JPEG folder into one file: an emulation of the original
         Data2H5 script (a Pool decoding rounds of 4×cores files, the main process writing
         each with ``create_dataset(..., compression="lzf")``), the per-file work alone in a
         Pool (read, decode, lzf; nothing written: the ceiling), webdataset tar shards of the
         raw bytes, and data2h5 decoded (lzf) and as bytes.
load     samples/s of a torch DataLoader epoch (shuffled, 2 workers): loose JPEGs decoded with
         Pillow, a naive lazy h5py dataset, and ``data2h5.H5Dataset``; warm page cache, and
         cold with ``--cold``.
batch    ``data2h5.BatchReader`` over a stacked archive: how much of the read cost hides
         behind a simulated training step, and shuffled against sequential throughput.

Conversions are timed until their output is on disk (data2h5 fsyncs its archive; the
baselines are given the same fsync), each after an untimed ``sync`` so that no run pays for
the write-back of the one before; decoders are imported before any Pool forks. The load
section's epochs each start a fresh DataLoader, worker start-up included.

The machine is noisy, so each figure is the best of ``--repeat`` runs (the median is shown
beside it) and the goals are ratios against baselines measured in the same run. Generated
data and outputs stay in ``--work-dir`` (default ./bench-data) between runs. Needs pillow
and webdataset (``pip install 'data2h5[bench]'``) and torch for the load section; a section
or variant whose package is missing is skipped with a note.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import h5py
import numpy as np

SECTIONS = ("convert", "load", "batch")
IMAGE_SIZE = 256
CLASSES = 10
SUBFOLDERS = 4
# Tuned so the data behaves like the photos the goals were set on: ~14 KB per 256×256 JPEG,
# and decoded arrays that lzf shrinks to ~0.7 (photos: 0.63). Sensor-like noise over the whole
# frame would make every decoded array incompressible, which no real photo collection is.
JPEG_QUALITY = 88
NOISE_SIGMA = 20.0
TEXTURED_FRACTION = 0.2  # rows of the frame with fine texture; the rest is smooth
SHAPES = 20


# -- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured variant: its times over the repeats and what it produced."""

    section: str
    name: str
    items: int
    times: List[float]
    size: Optional[int] = None  # bytes written, when the variant writes something
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def rate(self) -> float:
        return self.items / self.best

    @property
    def median_rate(self) -> float:
        return self.items / statistics.median(self.times)


@dataclass
class Results:
    rows: Dict[str, Row] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    ratios: List[tuple] = field(default_factory=list)  # (label, value, goal)

    def add(self, key: str, row: Row) -> Row:
        self.rows[key] = row
        print(f"  {row.name:<44} {row.rate:9.0f} /s  (best of {len(row.times)}: {row.best:.2f} s)", flush=True)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def ratio(self, label: str, num: str, den: str, goal: Optional[float]) -> None:
        """Record rows[num].rate / rows[den].rate, if both were measured."""
        if num in self.rows and den in self.rows:
            self.ratios.append((label, self.rows[num].rate / self.rows[den].rate, goal))

    def value(self, label: str, value: float, goal: Optional[float], lower_is_better: bool = False) -> None:
        self.ratios.append((label, value, (goal, lower_is_better) if goal is not None else None))

    def print(self) -> None:
        print("\n== results " + "=" * 90)
        print(f"{'section':<8} {'variant':<46} {'items':>6} {'best s':>8} {'per s':>8} {'median/s':>9} {'output':>10}  note")
        for row in self.rows.values():
            size = f"{row.size / 1e6:8.1f}MB" if row.size is not None else ""
            print(
                f"{row.section:<8} {row.name:<46} {row.items:>6} {row.best:>8.2f} {row.rate:>8.0f} "
                f"{row.median_rate:>9.0f} {size:>10}  {row.note}"
            )
        if self.ratios:
            print("\nratios (same run)")
            width = max(len(label) for label, _, _ in self.ratios)
            for label, value, goal in self.ratios:
                print(f"  {label:<{width}} {value:7.2f}  {_goal_text(value, goal)}")
        for text in self.notes:
            print(f"note: {text}")


def _goal_text(value: float, goal) -> str:
    if goal is None:
        return ""
    lower = False
    if isinstance(goal, tuple):
        goal, lower = goal
    ok = value <= goal if lower else value >= goal
    return f"goal {'≤' if lower else '≥'} {goal:g}  {'met' if ok else 'MISSED'}"


def timed(run: Callable[[], object], repeat: int, before: Optional[Callable[[], None]] = None) -> List[float]:
    """Wall times of ``repeat`` calls of ``run``; ``before`` runs untimed ahead of each."""
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache (root only); False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        return False
    return True


def warm_files(paths: Sequence[Path]) -> None:
    """Read files once so that they are in the page cache."""
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def missing(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return True
    return False


# -- data --------------------------------------------------------------------------------------


def photo_like(index: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """A deterministic RGB image with smooth gradients, hard-edged shapes and sensor-like noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    for c in range(3):
        waves = np.zeros((size, size), np.float32)
        for _ in range(4):
            fx, fy = rng.uniform(0.3, 4, 2)
            waves += rng.uniform(10, 35) * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
        img[..., c] = waves + rng.uniform(60, 190)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(SHAPES):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(10, size // 2, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    img = np.asarray(canvas).astype(np.float32)
    band = int(size * TEXTURED_FRACTION)
    img[:band] += rng.normal(0, NOISE_SIGMA, (band, size, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def relative_name(index: int) -> str:
    """``class_03/part_1/img_000123.jpg``: ~10 classes, each split over a few subfolders."""
    return f"class_{index % CLASSES:02d}/part_{index // CLASSES % SUBFOLDERS}/img_{index:06d}.jpg"


def _write_jpeg(job: tuple) -> int:
    from PIL import Image

    root, index = job
    path = Path(root) / relative_name(index)
    buf = io.BytesIO()
    Image.fromarray(photo_like(index)).save(buf, "JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def ensure_jpegs(work: Path, n: int, workers: int) -> Path:
    """The folder of ``n`` generated JPEGs, made once and cached in ``work``."""
    root = work / f"photos-{n}"
    done = root / ".complete"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    for index in range(min(n, CLASSES * SUBFOLDERS)):
        (root / relative_name(index)).parent.mkdir(parents=True, exist_ok=True)
    print(f"generating {n} JPEGs in {root} ...", flush=True)
    start = time.perf_counter()
    with Pool(workers) as pool:
        sizes = pool.map(_write_jpeg, [(str(root), i) for i in range(n)], chunksize=32)
    done.write_text(json.dumps({"files": n, "mean_bytes": float(np.mean(sizes))}))
    print(f"  {n} files, mean {np.mean(sizes) / 1e3:.1f} KB, {time.perf_counter() - start:.0f} s", flush=True)
    return root


def source_files(n: int) -> List[str]:
    return [relative_name(i) for i in range(n)]


def preload_decoders(sample: Path) -> None:
    """Import the decoders and decode one file in this process, so that forked workers of
    every variant start with them loaded and the figures measure steady-state work."""
    import imageio.v3 as iio
    import lzf  # noqa: F401
    from PIL import Image

    iio.imread(sample)
    with Image.open(sample) as img:
        img.convert("RGB")


# -- convert: the variants ---------------------------------------------------------------------


class _OriginalConverter:
    """The shape of the original Data2H5 script's converter: one object holding every
    relative path, whose bound method is what its Pool maps, so each task pickles the whole
    object (the full file list included) to the workers; files are read through imageio's
    legacy ``imageio.imread``."""

    def __init__(self, root: Path, keys: Sequence[str]):
        self.root = str(root)
        self.keys = list(keys)

    def read(self, key: str):
        import imageio.v2 as iio2

        return key, iio2.imread(os.path.join(self.root, key))


def convert_original(root: Path, keys: Sequence[str], out: Path) -> None:
    """Emulates the original Data2H5 script: synchronous rounds of 4×cores files decoded by a
    Pool mapping a bound method, each array then written by the main process as its own lzf
    dataset (one chunk per image) in a file of the default format version."""
    cores = os.cpu_count() or 1
    per_round = 4 * cores
    converter = _OriginalConverter(root, keys)
    with Pool(cores) as pool, h5py.File(out, "w") as h5:
        for start in range(0, len(keys), per_round):
            for key, arr in pool.map(converter.read, converter.keys[start : start + per_round]):
                h5.create_dataset(key, data=arr, chunks=arr.shape, compression="lzf")
    fsync_tree(out)


def _limit_work(path: str) -> int:
    """What data2h5 does per file, done alone: read, checksum, decode (data2h5's own image
    decoder), lzf-compress."""
    import zlib

    import lzf

    from data2h5.readers import BUILTIN_READERS

    with open(path, "rb") as fh:
        raw = fh.read()
    zlib.crc32(raw)
    arr = BUILTIN_READERS["image"].from_bytes(raw, os.path.splitext(path)[1].lower())
    packed = lzf.compress(arr.tobytes())
    return len(packed) if packed is not None else arr.nbytes


def convert_limit(root: Path, keys: Sequence[str]) -> int:
    """The per-file work alone (read, decode, lzf) in a Pool of every core; nothing written."""
    with Pool(os.cpu_count() or 1) as pool:
        return sum(pool.imap_unordered(_limit_work, [str(root / key) for key in keys], chunksize=16))


def convert_webdataset(root: Path, keys: Sequence[str], out: Path) -> None:
    """Pack the raw files into webdataset tar shards, the usual way to ship loose JPEGs."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=10000, verbose=0) as sink:
        for key in keys:
            sink.write({"__key__": key[: -len(".jpg")], "jpg": (root / key).read_bytes(), "cls": key[6:8]})
    fsync_tree(out)


def convert_data2h5(root: Path, out: Path, *, reader: str, workers: int, compression: str = "auto", layout: str = "files"):
    import data2h5

    return data2h5.convert(
        root, out, ext="jpg", reader=reader, compression=compression, layout=layout, workers=workers, overwrite=True
    )


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def fresh(path: Path) -> Callable[[], None]:
    """Untimed set-up of a conversion: remove the last output and flush every dirty page, so
    that no run pays for the write-back of the one before."""

    def setup() -> None:
        remove(path)
        os.sync()

    return setup


def fsync_tree(path: Path) -> None:
    """Flush ``path`` (a file, or every file under a folder) to disk. data2h5 syncs its archive
    before it returns; the baselines are timed to the same point, a durable output."""
    for item in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Outputs:
    """Where each variant's output lives, for the load and batch sections to reuse."""

    dir: Path

    @property
    def original(self) -> Path:
        return self.dir / "original.h5"

    @property
    def decoded(self) -> Path:
        return self.dir / "data2h5-decoded.h5"

    @property
    def raw_bytes(self) -> Path:
        return self.dir / "data2h5-bytes.h5"

    @property
    def stacked(self) -> Path:
        return self.dir / "data2h5-stacked.h5"

    @property
    def shards(self) -> Path:
        return self.dir / "webdataset"


def run_convert(args, root: Path, keys: List[str], outs: Outputs, results: Results) -> set:
    """Time every conversion variant; returns the outputs it (re)wrote in this run."""
    print(f"\n== convert: {len(keys)} JPEGs, data2h5 with {args.workers} workers, {os.cpu_count()} cores", flush=True)
    warm_files([root / key for key in keys])
    n, made = len(keys), set()
    sec = "convert"
    src = tree_size(root)
    results.note(f"source: {n} JPEGs, {src / 1e6:.1f} MB ({src / n / 1e3:.1f} KB each)")

    times = timed(lambda: convert_original(root, keys, outs.original), args.repeat, fresh(outs.original))
    results.add("original", Row(sec, "original Data2H5 emulation (lzf per dataset)", n, times, tree_size(outs.original)))
    made.add("original")

    times = timed(lambda: convert_limit(root, keys), args.repeat, os.sync)
    results.add("limit", Row(sec, "limit: read+decode+lzf in a Pool, no writes", n, times, None, "ceiling"))

    if missing("webdataset"):
        results.note("webdataset is not installed: skipped its conversion (pip install 'data2h5[bench]')")
    else:
        times = timed(lambda: convert_webdataset(root, keys, outs.shards), args.repeat, fresh(outs.shards))
        results.add("wds", Row(sec, "webdataset ShardWriter (raw bytes, 1 process)", n, times, tree_size(outs.shards)))

    for key, reader, label in (("d2h_decoded", "image", "data2h5 decoded (image, lzf)"), ("d2h_bytes", "bytes", "data2h5 bytes")):
        path = outs.decoded if reader == "image" else outs.raw_bytes
        compression = "lzf" if reader == "image" else "auto"
        times = timed(
            lambda: convert_data2h5(root, path, reader=reader, workers=args.workers, compression=compression),
            args.repeat,
            fresh(path),
        )
        results.add(key, Row(sec, label, n, times, tree_size(path)))
        made.add(key)

    results.ratio("convert: data2h5 decoded / original", "d2h_decoded", "original", 5.0)
    results.ratio("convert: data2h5 decoded / limit", "d2h_decoded", "limit", 0.8)
    results.ratio("convert: data2h5 bytes / webdataset", "d2h_bytes", "wds", 1.5)
    for key in ("original", "d2h_decoded", "d2h_bytes", "wds"):
        if key in results.rows:
            results.value(f"size: {results.rows[key].name} / source", results.rows[key].size / src, None)
    return made


def ensure_outputs(args, root: Path, keys: List[str], outs: Outputs, made: set, wanted: Sequence[str]) -> None:
    """Build, untimed, the outputs a later section reads and this run has not written yet.

    The original emulation's output is reused from an earlier run when present (its code does
    not change); data2h5's archives are rebuilt so that they come from the code being measured.
    """
    outs.dir.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        if name in made:
            continue
        print(f"  building {name} output (untimed) ...", flush=True)
        if name == "original":
            if not outs.original.exists():
                convert_original(root, keys, outs.original)
        elif name == "d2h_decoded":
            convert_data2h5(root, outs.decoded, reader="image", compression="lzf", workers=args.workers)
        elif name == "d2h_bytes":
            convert_data2h5(root, outs.raw_bytes, reader="bytes", workers=args.workers)
        elif name == "d2h_stacked":
            convert_data2h5(root, outs.stacked, reader="image", compression="lzf", layout="stacked", workers=args.workers)
        made.add(name)


# -- load: datasets for the DataLoader ---------------------------------------------------------


class LooseJpegs:
    """Decode each loose JPEG with Pillow on every access: the usual ImageFolder-style loader."""

    def __init__(self, root: Path, keys: Sequence[str]):
        self.paths = [str(root / key) for key in keys]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return np.asarray(img.convert("RGB"))


class NaiveH5:
    """The common lazy pattern: list the datasets up front, open the file on first access in
    each worker, read ``f[key][:]`` through h5py's high-level API."""

    def __init__(self, path: Path):
        self.path = str(path)
        names: List[str] = []
        with h5py.File(self.path, "r") as f:
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        self.keys = sorted(k for k in names if not k.startswith("__data2h5__"))
        self.h5 = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.h5 is None:
            self.h5 = h5py.File(self.path, "r")
        return self.h5[self.keys[i]][:]


def find_h5dataset():
    """``data2h5.H5Dataset``, or None if this checkout does not have it yet."""
    try:
        from data2h5 import H5Dataset
    except ImportError:
        try:
            from data2h5.dataset import H5Dataset
        except ImportError:
            return None
    return H5Dataset


def stack_collate(batch: list):
    """Stack same-shape samples into one tensor (a sample may be an array or a tuple led by one)."""
    import torch

    arrays = [s[0] if isinstance(s, tuple) else s for s in batch]
    return torch.from_numpy(np.stack(arrays))


def load_epoch(dataset, workers: int, batch_size: int, seed: int = 0) -> int:
    """One shuffled epoch through a fresh DataLoader (worker start-up included, as in training)."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=stack_collate, generator=generator
    )
    seen = 0
    for batch in loader:
        seen += batch.shape[0]
    if seen != len(dataset):
        raise RuntimeError(f"epoch saw {seen} samples, the dataset has {len(dataset)}")
    return seen


def run_load(args, root: Path, keys: List[str], outs: Outputs, made: set, results: Results) -> None:
    print(f"\n== load: DataLoader, {args.load_workers} workers, batch {args.batch_size}, shuffled", flush=True)
    if missing("torch"):
        results.note("torch is not installed: skipped the load section")
        return
    if missing("PIL"):
        results.note("pillow is not installed: skipped the load section (pip install 'data2h5[bench]')")
        return
    H5Dataset = find_h5dataset()
    if H5Dataset is None:
        results.note("data2h5.H5Dataset is not available yet: skipped its variants")
    ensure_outputs(args, root, keys, outs, made, ["original", "d2h_decoded", "d2h_bytes"])

    variants: Dict[str, tuple] = {
        "loose": ("loose JPEG, Pillow decode", lambda: LooseJpegs(root, keys)),
        "naive_orig": ("naive h5py over original output", lambda: NaiveH5(outs.original)),
        "naive_dec": ("naive h5py over data2h5 decoded", lambda: NaiveH5(outs.decoded)),
    }
    if H5Dataset is not None:
        variants.update(
            {
                "h5ds_bytes": ("H5Dataset over data2h5 bytes", lambda: H5Dataset(outs.raw_bytes)),
                "h5ds_dec": ("H5Dataset over data2h5 decoded", lambda: H5Dataset(outs.decoded)),
                "h5ds_orig": ("H5Dataset over original output", lambda: H5Dataset(outs.original)),
            }
        )
    modes = ["warm"]
    if args.cold:
        if drop_page_cache():
            modes.append("cold")
        else:
            results.note("--cold needs root to write /proc/sys/vm/drop_caches: cold loading skipped")

    for mode in modes:
        for key, (label, make) in variants.items():
            dataset = make()
            epoch = lambda: load_epoch(dataset, args.load_workers, args.batch_size)  # noqa: E731
            if mode == "warm":
                epoch()  # fill the page cache (and make the first epoch's imports)
                times = timed(epoch, args.repeat)
            else:
                times = timed(epoch, args.repeat, drop_page_cache)
            results.add(f"{key}_{mode}", Row(f"load {mode}", label, len(dataset), times))
            close = getattr(dataset, "close", None)
            if close is not None:
                close()

    for mode, goal in (("warm", 1.0), ("cold", 1.2)):
        results.ratio(f"load {mode}: H5Dataset bytes / loose JPEG", f"h5ds_bytes_{mode}", f"loose_{mode}", goal)
    for mode in modes:
        results.ratio(f"load {mode}: H5Dataset decoded / naive over decoded", f"h5ds_dec_{mode}", f"naive_dec_{mode}", 1.2)
        results.ratio(f"load {mode}: H5Dataset / naive over original output", f"h5ds_orig_{mode}", f"naive_orig_{mode}", 1.0)


# -- batch: the asynchronous batch reader -------------------------------------------------------


def find_batch_reader():
    """``data2h5.BatchReader``, or None if this checkout does not have it yet."""
    try:
        from data2h5 import BatchReader
    except ImportError:
        try:
            from data2h5.prefetch import BatchReader
        except ImportError:
            return None
    return BatchReader


def plain_epoch(path: Path, batch_size: int, step_s: float = 0.0) -> int:
    """The loop people write first: slice each batch out of ``data``/``labels`` with h5py, in
    order, then train on it; reading and training take turns."""
    with h5py.File(path, "r") as f:
        data, labels = f["data"], f["labels"]
        n = data.shape[0]
        for start in range(0, n, batch_size):
            data[start : start + batch_size], labels[start : start + batch_size]
            if step_s:
                time.sleep(step_s)
    return n


def h5py_shuffled_epoch(path: Path, batch_size: int, max_batches: int, seed: int = 0) -> int:
    """Random rows per batch through h5py (sorted fancy indexing), for ``max_batches`` batches:
    what shuffling costs without a reader that works chunk by chunk."""
    with h5py.File(path, "r") as f:
        data, labels = f["data"], f["labels"]
        order = np.random.default_rng(seed).permutation(data.shape[0])
        seen = 0
        for b in range(min(max_batches, -(-len(order) // batch_size))):
            rows = np.sort(order[b * batch_size : (b + 1) * batch_size])
            data[rows], labels[rows]
            seen += len(rows)
    return seen


def reader_epoch(reader, step_s: float = 0.0) -> int:
    """One epoch from a BatchReader, sleeping ``step_s`` per batch as a stand-in for training."""
    seen = 0
    for data, _labels in reader:
        seen += data.shape[0]
        if step_s:
            time.sleep(step_s)
    return seen


def run_batch(args, root: Path, keys: List[str], outs: Outputs, made: set, results: Results) -> None:
    print(
        f"\n== batch: BatchReader over a stacked archive, batch {args.batch_size}, {args.threads} threads, "
        f"prefetch {args.prefetch or 'default'}",
        flush=True,
    )
    BatchReader = find_batch_reader()
    if BatchReader is None:
        results.note("data2h5.BatchReader is not available yet: skipped the batch section")
        return
    ensure_outputs(args, root, keys, outs, made, ["d2h_stacked"])
    path, n, bs, sec = outs.stacked, len(keys), args.batch_size, "batch"
    batches = -(-n // bs)
    warm_files([path])

    opts = {"threads": args.threads} if args.prefetch is None else {"threads": args.threads, "prefetch": args.prefetch}
    with BatchReader(path, bs, shuffle=False, **opts) as seq, BatchReader(path, bs, shuffle=True, seed=0, **opts) as shuf:
        print(f"  {path.name}: {n} rows, read by {seq.method}", flush=True)
        readers = (("br_seq", seq, "BatchReader sequential"), ("br_shuf", shuf, "BatchReader shuffled"))
        times = timed(lambda: plain_epoch(path, bs), args.repeat)
        results.add("plain", Row(sec, "h5py loop, sequential slices", n, times))
        for key, reader, label in readers:
            times = timed(lambda: reader_epoch(reader), args.repeat)
            results.add(key, Row(sec, label, n, times))
        sample_batches = max(1, min(batches, 3))  # ~1 s per batch: a sample is enough
        times = timed(lambda: h5py_shuffled_epoch(path, bs, sample_batches), args.repeat)
        rows = min(n, sample_batches * bs)
        results.add("h5py_shuf", Row(sec, "h5py shuffled rows (fancy index)", rows, times, note=f"first {sample_batches} batches"))

        # Overlap: a simulated training step of T ms per batch against the read cost R. Runs
        # with and without the step alternate, so that a noisy spell hits both alike; R is the
        # best epoch without the step, which makes the ratio a strict one.
        step_ms = args.step_ms if args.step_ms is not None else results.rows["br_shuf"].best / batches * 1e3
        step_s = step_ms / 1e3
        times = timed(lambda: plain_epoch(path, bs, step_s), args.repeat)
        results.add("plain_step", Row(sec, f"h5py loop + {step_ms:.1f} ms step per batch", n, times))
        for key, reader, label in readers:
            stepped = []
            for _ in range(args.repeat):
                results.rows[key].times += timed(lambda: reader_epoch(reader), 1)
                stepped += timed(lambda: reader_epoch(reader, step_s), 1)
            results.add(f"{key}_step", Row(sec, f"{label} + {step_ms:.1f} ms step", n, stepped))
            read_s = results.rows[key].best / batches
            ideal = max(step_s, read_s) * batches
            results.note(f"batch: {label}: R = {read_s * 1e3:.1f} ms per batch, T = {step_ms:.1f} ms, {batches} batches")
            results.value(f"batch: {label}+step epoch / (max(T,R) × batches)", min(stepped) / ideal, 1.15, True)

    results.ratio("batch: BatchReader shuffled+step / h5py loop+step (speed-up)", "br_shuf_step", "plain_step", None)
    results.ratio("batch: BatchReader shuffled / sequential", "br_shuf", "br_seq", None)
    results.ratio("batch: BatchReader sequential / h5py loop", "br_seq", "plain", None)
    results.ratio("batch: BatchReader shuffled / h5py shuffled rows", "br_shuf", "h5py_shuf", None)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=5000, help="number of generated JPEGs (default 5000)")
    p.add_argument("--workers", type=int, default=2, help="data2h5 conversion workers (default 2)")
    p.add_argument("--load-workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="DataLoader / BatchReader batch size (default 64)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported (default 3)")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    p.add_argument("--work-dir", type=Path, default=Path("bench-data"), help="data and outputs (default ./bench-data)")
    p.add_argument("--cold", action="store_true", help="also load with the page cache dropped before each epoch (root)")
    p.add_argument("--threads", type=int, default=2, help="BatchReader threads (default 2)")
    p.add_argument("--prefetch", type=int, default=None, help="BatchReader batches read ahead (default: its own)")
    p.add_argument("--step-ms", type=float, default=None, help="batch section: simulated train step (default: the read cost)")
    args = p.parse_args(argv)
    if args.files < 1 or args.repeat < 1 or args.workers < 1 or args.batch_size < 1:
        p.error("--files, --repeat, --workers and --batch-size must be at least 1")
    args.sections = args.only or list(SECTIONS)
    args.cores = cores
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if missing("PIL"):
        print("benchmark.py needs pillow to generate its JPEGs: pip install 'data2h5[bench]'", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    root = ensure_jpegs(args.work_dir, args.files, args.cores)
    keys = source_files(args.files)
    preload_decoders(root / keys[0])
    outs = Outputs(args.work_dir / f"out-photos-{args.files}")
    outs.dir.mkdir(parents=True, exist_ok=True)
    results, made = Results(), set()
    print(f"python {sys.version.split()[0]}, h5py {h5py.__version__}, {args.cores} cores, sections: {' '.join(args.sections)}")
    if "convert" in args.sections:
        made |= run_convert(args, root, keys, outs, results)
    if "load" in args.sections:
        run_load(args, root, keys, outs, made, results)
    if "batch" in args.sections:
        run_batch(args, root, keys, outs, made, results)
    results.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
