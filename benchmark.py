#!/usr/bin/env python
"""Measure data2h5 against the usual alternatives, on your files or a generated corpus.

    python benchmark.py --make-corpus 5000                  # photo-like JPEGs, made and removed
    python benchmark.py --make-corpus 5000 --corpus real    # crops of scikit-image's photos
    python benchmark.py --path-images DIR --ext jpg         # your own folder, left untouched
    python benchmark.py --make-corpus 5000 --json out.json --plot out.png

Conversion: data2h5 with its defaults, with ``--reader bytes`` and with ``--layout stacked``
(through a reader that resizes every image to one shape when the files differ in shape),
against baselines run on the same files in the same run: the h5py loop tutorials write
(one process, imageio, gzip), a re-implementation of the original Data2H5 approach (a pool
decoding small rounds of files, one writer compressing each with lzf), webdataset tar shards
(when installed), and the limit: every file read and decoded in a pool of every core, the
result discarded. Each conversion runs in a fresh child process, timed until its output is
on disk (the baselines fsync as data2h5 does), after an untimed ``sync``.

Loading: a PyTorch DataLoader (persistent workers) over loose files decoded with Pillow
(ImageFolder-style), over the decoded and the bytes archive with ``data2h5.H5Dataset``, and
over the decoded archive with a hand-written lazy h5py dataset; and ``data2h5.BatchReader``
over the stacked archive. For JPEGs, the bytes archive is also read with Pillow alone (as
without simplejpeg; the conversion gets such a row too), with ``decode_size`` at half the
smallest photo's sides, and, where CUDA and torchvision are, as JPEG bytes decoded a batch at
a time by nvJPEG. Every DataLoader row hands samples over as training does (``--collate
tensor``): uint8 tensors cropped to one size, each batch stacked into one shared-memory
tensor. Each run reads ``--samples`` samples, in order and shuffled, with a warm page cache
and, as root, a cold one (``sync; echo 3 > /proc/sys/vm/drop_caches``).

``--corpus real`` makes the corpus from crops of the photographs scikit-image's wheel ships
(``pip install scikit-image``) instead of generated images: the same shapes and classes.

Batches: over the stacked archive, the first ``--batches`` batches of an epoch read by the
plain h5py loop over slices of ``data``, by ``data2h5.BatchReader`` in order and shuffled, and
(a few batches) by h5py fancy indexing of shuffled rows; then the loop, and BatchReader,
with a simulated training step per batch (``--step-ms``, by default as long as the loop's
read): how much of the read the reader hides behind training. ``--only`` picks sections.

Every figure is the median of ``--repeat`` runs, after one untimed warm-up; in each round
the variants run in turn, so that a noisy spell hits them alike. The report (markdown) goes
to stdout, progress to stderr. ``pip install 'data2h5[bench]'`` brings Pillow (needed),
webdataset (its row), matplotlib (``--plot``) and scikit-image (``--corpus real``); the loading rows need torch. A row whose
package is missing is left out with a note. Outputs go to ``--work-dir``: put it on the disk
you care about (the report names its file system).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

SECTIONS = ("conversion", "loading", "batch", "decoding")
# Generated corpus: ~16 KB JPEGs of 12 shapes from 200 to 480 px, 10 classes each split over
# 4 sub-folders. Smooth gradients, hard-edged shapes and a band of sensor-like noise make the
# decoded arrays compress like photos (lzf: ~0.7), which noise over the whole frame would not.
CORPUS_SHAPES = [(256, 256), (224, 224), (320, 240), (240, 320), (300, 200), (200, 300),
                 (352, 224), (224, 352), (480, 270), (270, 480), (200, 200), (256, 192)]  # (width, height)
CLASSES = 10
SUBFOLDERS = 4
JPEG_QUALITY = 88
STACK_SIZE = (224, 224)  # (width, height) the stacked row resizes to when the files differ in shape
WARMUP_FILES = 100  # files in the untimed warm-up round of the conversions
MB = 1e6


# -- measurements -------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured variant: the wall time of each run and what it read and produced."""

    section: str
    key: str
    label: str
    items: int = 0  # files converted, or samples loaded, per run
    times: List[float] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)  # as measured: output bytes, peak RSS, ...
    figures: Dict[str, float] = field(default_factory=dict)  # as reported: rates, ratios, MB

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def rate(self) -> float:
        return self.items / self.seconds


def peak_rss_self() -> int:
    """Peak resident set size of this process since it started its program (Linux: VmHWM;
    ru_maxrss would also count the parent's memory at the fork before the exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_children(resource.RUSAGE_SELF)


def peak_rss_children(who: int = resource.RUSAGE_CHILDREN) -> int:
    """Peak resident set size of the largest waited-for child (or of ``who``)."""
    value = resource.getrusage(who).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def drop_page_cache() -> bool:
    """Write back dirty pages and drop the page cache (root only); False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        return False
    return True


def read_through(paths: Sequence[Path]) -> None:
    """Read every file under ``paths`` once, so that they are in the page cache."""
    for path in paths:
        for item in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            with open(item, "rb") as fh:
                while fh.read(1 << 22):
                    pass


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fsync_tree(path: Path) -> None:
    """Flush ``path`` (a file, or every file under a folder) to disk, as data2h5 does before it returns."""
    for item in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it: torch alone would add ~200 MB)."""
    return importlib.util.find_spec(module) is not None


# -- the machine --------------------------------------------------------------------------------


def version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def filesystem_of(path: Path) -> str:
    """``ext4 on /dev/vda``: the mount holding ``path``, from /proc/mounts (Linux)."""
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                device, mount, fstype = line.split()[:3]
                if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) >= len(best[0]):
                    best = (mount, fstype, device)
    except OSError:
        return "unknown"
    return f"{best[1]} on {best[2]}"


def describe_machine(work: Path) -> Dict[str, str]:
    """Cores, memory, OS and the versions that decide the figures."""
    cpu = platform.processor() or platform.machine()
    memory = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as fh:
            memory = f"{int(fh.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "cores": f"{os.cpu_count()} cores ({cpu})",
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "HDF5": h5py.version.hdf5_version,
        "torch": version_of("torch"),
        "Pillow": version_of("pillow"),
        "data2h5": version_of("data2h5"),
        "work folder": f"{work} ({filesystem_of(work)})",
    }


# -- the source files ---------------------------------------------------------------------------


@dataclass
class Source:
    """The files measured: relative keys in data2h5's walk order, and what they decode to."""

    root: Path
    exts: List[str]
    keys: List[str]
    nbytes: int
    images: bool  # Pillow opens every file
    shapes: List[Tuple[int, int, str]]  # distinct (width, height, mode) when images
    description: str = ""

    @property
    def one_shape(self) -> bool:
        return self.images and len(self.shapes) == 1


def photo_like(index: int, width: int, height: int) -> np.ndarray:
    """A deterministic RGB image: smooth gradients, hard-edged shapes, a band of noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(index)
    scale = float(max(width, height))
    x, y = np.arange(width, dtype=np.float32) / scale, np.arange(height, dtype=np.float32) / scale
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):  # four plane waves summed by one matrix product: sin(a + b) = sin a cos b + cos a sin b
        fx, fy = rng.uniform(0.3, 4, (2, 4, 1)).astype(np.float32)
        amp, phase = rng.uniform(10, 35, (4, 1)).astype(np.float32), rng.uniform(0, 2 * np.pi, (4, 1)).astype(np.float32)
        ax, by = 2 * np.pi * fx * x + phase, 2 * np.pi * fy * y  # (4, width), (4, height)
        rows = np.concatenate([amp * np.cos(by), amp * np.sin(by)]).T  # (height, 8)
        # einsum, not @: BLAS would start threads of its own in every pool worker
        img[..., c] = np.einsum("hk,kw->hw", rows, np.concatenate([np.sin(ax), np.cos(ax)])) + rng.uniform(60, 190)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(20):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(10, min(width, height) // 2, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    out = np.asarray(canvas).astype(np.int16)
    band = height // 5
    out[:band] += (rng.standard_normal((band, width, 3), dtype=np.float32) * 20).astype(np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


def corpus_name(index: int) -> str:
    """``class_03/part_1/img_000123.jpg``."""
    return f"class_{index % CLASSES:02d}/part_{index // CLASSES % SUBFOLDERS}/img_{index:06d}.jpg"


# Real photos: the RGB photographs scikit-image's wheel ships in skimage/data (no download).
REAL_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
               "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")


def real_photo_paths() -> List[Path]:
    """The photos of :data:`REAL_PHOTOS` found in the installed scikit-image (none if it is not)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [folder / name for name in REAL_PHOTOS if (folder / name).is_file()]


@functools.lru_cache(maxsize=None)
def _real_photos() -> Tuple[Any, ...]:
    """The real photos decoded to RGB, once per pool worker."""
    from PIL import Image

    photos = []
    for path in real_photo_paths():
        with Image.open(path) as img:
            photos.append(img.convert("RGB"))
    return tuple(photos)


def real_crop(index: int, width: int, height: int) -> np.ndarray:
    """A ``width``×``height`` crop of one of the real photos: a region 1 to 2 times that size
    (smaller where the photo is), at a random place, resized and sometimes mirrored."""
    from PIL import Image

    rng = np.random.default_rng(index)
    photos = _real_photos()
    photo = photos[int(rng.integers(len(photos)))]
    fits = min(photo.width / width, photo.height / height)
    scale = min(fits, float(rng.uniform(1.0, 2.0)))
    w, h = min(photo.width, round(width * scale)), min(photo.height, round(height * scale))
    x, y = int(rng.integers(photo.width - w + 1)), int(rng.integers(photo.height - h + 1))
    crop = photo.resize((width, height), Image.Resampling.BICUBIC, box=(x, y, x + w, y + h))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def _write_corpus_file(job: Tuple[str, int, str]) -> int:
    from PIL import Image

    root, index, kind = job
    width, height = CORPUS_SHAPES[index * 7 % len(CORPUS_SHAPES)]
    pixels = real_crop(index, width, height) if kind == "real" else photo_like(index, width, height)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY)
    Path(root, corpus_name(index)).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_corpus(root: Path, n: int, kind: str = "generated") -> float:
    """Write ``n`` JPEGs under ``root`` in a pool of every core, photo-like (``generated``) or
    crops of real photos (``real``); returns the seconds taken."""
    from tqdm import tqdm

    start = time.perf_counter()
    for index in range(min(n, CLASSES * SUBFOLDERS)):
        (root / corpus_name(index)).parent.mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool, tqdm(total=n, desc="corpus", unit="file", file=sys.stderr) as bar:
        for _ in pool.imap_unordered(_write_corpus_file, [(str(root), i, kind) for i in range(n)], chunksize=32):
            bar.update(1)
    return time.perf_counter() - start


def list_keys(root: Path, exts: Sequence[str]) -> List[str]:
    """Relative paths of the files with one of ``exts``, sorted as data2h5 walks them."""
    wanted = {"." + e.lower().lstrip(".") for e in exts}
    keys = []
    for dirpath, _dirs, names in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in names:
            if os.path.splitext(name)[1].lower() in wanted:
                keys.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(keys)


def probe_shapes(root: Path, keys: Sequence[str]) -> Optional[List[Tuple[int, int, str]]]:
    """Distinct (width, height, mode) of the files from their headers, or None if one is not an image."""
    from PIL import Image

    shapes = set()
    for key in keys:
        try:
            with Image.open(root / key) as img:
                shapes.add((img.width, img.height, img.mode))
        except Exception:  # Pillow raises anything on a file that is not an image
            return None
    return sorted(shapes)


def open_source(root: Path, exts: Sequence[str]) -> Source:
    keys = list_keys(root, exts)
    if not keys:
        raise SystemExit(f"benchmark.py: error: no file under {root} has the extension {' or '.join(exts)}; check --ext")
    shapes = probe_shapes(root, keys)
    nbytes = sum((root / key).stat().st_size for key in keys)
    return Source(root, list(exts), keys, nbytes, shapes is not None, shapes or [])


# -- conversion: the variants, each run in a fresh child process --------------------------------


def convert_naive(src: Path, keys: Sequence[str], out: Path, exts: Sequence[str]) -> None:
    """What tutorials write: one process walks the folder, imreads each file and stores it
    with ``create_dataset(..., compression="gzip")``."""
    import imageio.v3 as iio

    wanted = {"." + e.lower() for e in exts}
    with h5py.File(out, "w") as f:
        for dirpath, _dirs, names in os.walk(src):
            for name in names:
                if os.path.splitext(name)[1].lower() in wanted:
                    path = os.path.join(dirpath, name)
                    f.create_dataset(os.path.relpath(path, src), data=iio.imread(path), compression="gzip")
    fsync_tree(out)


class _OriginalConverter:
    """The shape of the original Data2H5 script's converter: one object holding every relative
    path, whose bound method is what its Pool maps (each task pickles the whole object, the
    file list included); files are read with imageio's legacy ``imread``."""

    def __init__(self, root: Path, keys: Sequence[str]):
        self.root = str(root)
        self.keys = list(keys)

    def read(self, key: str):
        import imageio.v2 as iio2

        return key, iio2.imread(os.path.join(self.root, key))


def convert_original(src: Path, keys: Sequence[str], out: Path, exts: Sequence[str]) -> None:
    """The original Data2H5 approach, re-implemented for this benchmark: synchronous rounds of
    4×cores files decoded by a Pool, each array written by the one main process as its own
    lzf dataset (one chunk per image)."""
    cores = os.cpu_count() or 1
    per_round = 4 * cores
    converter = _OriginalConverter(src, keys)
    with Pool(cores) as pool, h5py.File(out, "w") as h5:
        for start in range(0, len(keys), per_round):
            for key, arr in pool.map(converter.read, converter.keys[start : start + per_round]):
                h5.create_dataset(key, data=arr, chunks=arr.shape, compression="lzf")
    fsync_tree(out)


def _decode_file(path: str) -> None:
    from data2h5.readers import reader_for_extension

    with open(path, "rb") as fh:
        raw = fh.read()
    ext = os.path.splitext(path)[1].lower()
    reader_for_extension(ext).from_bytes(raw, ext)


def convert_limit(src: Path, keys: Sequence[str], out: Path, exts: Sequence[str]) -> None:
    """The limit: read and decode every file (data2h5's decoder) in a Pool of every core; nothing is kept."""
    with Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_decode_file, [str(src / key) for key in keys], chunksize=16):
            pass


def convert_webdataset(src: Path, keys: Sequence[str], out: Path, exts: Sequence[str]) -> None:
    """The files' bytes into webdataset tar shards, one process, the usual way to ship loose files."""
    import webdataset as wds

    from data2h5.format import class_of

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=10000, verbose=0) as sink:
        for key in keys:
            stem, ext = os.path.splitext(key)
            sink.write({"__key__": stem, ext[1:].lower(): (src / key).read_bytes(), "cls": class_of(key)})
    fsync_tree(out)


def convert_data2h5(src: Path, keys: Sequence[str], out: Path, exts: Sequence[str], **options: Any) -> None:
    import data2h5

    data2h5.convert(src, out, ext=exts, **options)


def convert_data2h5_sharded(src: Path, keys: Sequence[str], out: Path, exts: Sequence[str], **options: Any) -> None:
    """data2h5 with --shard-size: the shards and their master in the folder ``out``."""
    out.mkdir()
    convert_data2h5(src, keys, out / "all.h5", exts, **options)


def convert_data2h5_pillow(src: Path, keys: Sequence[str], out: Path, exts: Sequence[str], **options: Any) -> None:
    """data2h5 with its JPEG fast path off: Pillow decodes, as without simplejpeg installed."""
    from data2h5 import jpeg

    os.environ["DATA2H5_JPEG"] = "pillow"  # for workers that start afresh; forked ones inherit the switch
    jpeg.USE_SIMPLEJPEG = False
    convert_data2h5(src, keys, out, exts, **options)


def pillow_jpeg_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: this worker decodes JPEGs with Pillow alone."""
    from data2h5 import jpeg

    jpeg.USE_SIMPLEJPEG = False


def jpeg_source(source: Source) -> bool:
    """Whether the files are images read by a JPEG extension."""
    return source.images and bool({"jpg", "jpeg", "jpe", "jfif"} & {e.lower().lstrip(".") for e in source.exts})


def fast_jpeg(source: Source) -> bool:
    """Whether the files are JPEGs and simplejpeg decodes them here (else the rows comparing it with
    Pillow are left out)."""
    from data2h5 import jpeg

    return jpeg_source(source) and jpeg.backend() == "simplejpeg"


def half_size(source: Source) -> Tuple[int, int]:
    """``decode_size`` at half the smallest height and width: every photo decodes at 1/2 scale or less."""
    return min(h for _, h, _ in source.shapes) // 2 or 1, min(w for w, _, _ in source.shapes) // 2 or 1


def read_resized(path: str) -> np.ndarray:
    """Reader for the stacked row when the files differ in shape: RGB at :data:`STACK_SIZE`."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", STACK_SIZE)  # JPEG: decode at a reduced scale when still >= the target
        rgb = img.convert("RGB")
    if rgb.size != STACK_SIZE:
        rgb = rgb.resize(STACK_SIZE, Image.Resampling.BILINEAR)
    return np.asarray(rgb)


CONVERTERS: Dict[str, Callable[..., None]] = {
    "naive": convert_naive,
    "original": convert_original,
    "limit": convert_limit,
    "webdataset": convert_webdataset,
    "data2h5": convert_data2h5,
    "data2h5_pillow": convert_data2h5_pillow,
    "bytes": convert_data2h5,
    "bytes_packed": convert_data2h5,
    "stacked": convert_data2h5,
    "sharded": convert_data2h5_sharded,
    "sharded_dask": convert_data2h5_sharded,
}


SHARDS_PER_CORE = 2  # the sharded rows cut the files into this many shards per core


@dataclass
class Conversion:
    """A conversion variant as the parent plans it; ``options`` go to its converter."""

    key: str
    label: str
    options: Dict[str, Any] = field(default_factory=dict)
    output: Optional[str] = None  # file or folder name under the work folder; None: writes nothing


def plan_conversions(source: Source, notes: List[str], timed: bool) -> List[Conversion]:
    """The conversion rows; with ``timed`` False only the archives the loading rows read matter."""
    plan = []
    if source.images:
        plan += [
            Conversion("naive", "naive h5py loop (1 process, imageio, gzip)", output="naive.h5"),
            Conversion("original", "original Data2H5 approach (re-implemented: pool rounds, one lzf writer)",
                       output="original.h5"),
        ]
    elif timed:
        notes.append("the files are not images Pillow opens: the naive loop and the original approach "
                     "(both imread images) are left out")
    plan.append(Conversion("limit", "limit: decode every file in a pool of all cores, discard"))
    if installed("webdataset"):
        plan.append(Conversion("webdataset", "webdataset tar shards (file bytes, 1 process)", output="shards"))
        if timed:
            notes.append("webdataset: `import webdataset` loads torch, most of its row's peak RSS")
    elif timed:
        notes.append("webdataset is not installed: its row is left out (pip install 'data2h5[bench]')")
    plan.append(Conversion("data2h5", "data2h5, defaults (decoded, lzf)", output="data2h5.h5"))
    if fast_jpeg(source):
        plan.append(Conversion("data2h5_pillow", "data2h5, defaults, JPEGs decoded by Pillow alone (no simplejpeg)",
                               output="data2h5_pillow.h5"))
    elif timed and jpeg_source(source):
        notes.append("simplejpeg is not installed: data2h5 decodes JPEGs with Pillow, and the rows comparing the two "
                     "are left out (pip install 'data2h5[jpeg]')")
    plan.append(Conversion("bytes", "data2h5 --reader bytes", {"reader": "bytes"}, output="bytes.h5"))
    plan.append(Conversion("bytes_packed", "data2h5 --reader bytes --layout packed",
                           {"reader": "bytes", "layout": "packed"}, output="bytes_packed.h5"))
    shards = SHARDS_PER_CORE * (os.cpu_count() or 1)
    shard_size = f"{max(1, -(-len(source.keys) // shards))}files"
    plan.append(Conversion("sharded", f"data2h5 --reader bytes --shard-size {shard_size} (local pool, one writer "
                           "per shard)", {"reader": "bytes", "shard_size": shard_size}, output="sharded"))
    if installed("distributed"):
        workers = os.cpu_count() or 1
        plan.append(Conversion("sharded_dask", f"data2h5 --reader bytes --shard-size {shard_size} --dask-workers "
                               f"{workers} (cluster start included)",
                               {"reader": "bytes", "shard_size": shard_size, "dask_workers": workers},
                               output="sharded_dask"))
    elif timed:
        notes.append("distributed is not installed: the Dask row is left out (pip install 'data2h5[dask]')")
    if source.one_shape or not source.images:
        plan.append(Conversion("stacked", "data2h5 --layout stacked", {"layout": "stacked"}, output="stacked.h5"))
    else:
        size = "×".join(map(str, STACK_SIZE))
        spec = f"{Path(__file__).resolve()}:read_resized"
        plan.append(Conversion("stacked", f"data2h5 --layout stacked (resized to {size} by a reader)",
                               {"layout": "stacked", "reader": spec}, output="stacked.h5"))
        notes.append(f"stacked: the files have {len(source.shapes)} shapes, so the stacked row converts them "
                     f"through a reader that resizes each to {size} RGB (read_resized in benchmark.py); its "
                     "decoded arrays are smaller than the other rows' and its time includes the resize")
    return plan


def preload_decoders(sample: Path) -> None:
    """Import the decoders and decode one file, so that forked workers start with them loaded."""
    from data2h5.readers import reader_for_extension

    reader_for_extension(sample.suffix.lower())(str(sample))
    try:
        import imageio.v2 as iio2
        import lzf

        lzf.compress(iio2.imread(sample).tobytes())
    except Exception:  # not an image: the baselines that imread are not run
        pass


def _conversion_child(conn, key: str, src: str, keys: List[str], out: Optional[str], exts: List[str],
                      options: Dict[str, Any]) -> None:
    """Body of the child process: one timed conversion, then its times and peak RSS."""
    try:
        preload_decoders(Path(src, keys[0]))
        base = peak_rss_self()
        start = time.perf_counter()
        CONVERTERS[key](Path(src), keys, Path(out) if out else None, exts, **options)
        seconds = time.perf_counter() - start
        conn.send({"seconds": seconds, "rss_base": base, "rss_writer": peak_rss_self(),
                   "rss_workers": peak_rss_children()})
    except BaseException as exc:  # reported by the parent as a note; a traceback helps nobody here
        conn.send({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})


def run_conversion(conv: Conversion, root: Path, keys: Sequence[str], exts: Sequence[str], work: Path) -> Dict[str, Any]:
    """Run ``conv`` once in a fresh (spawned) process, after removing its last output and an
    untimed ``sync``; returns the child's figures plus the output's size."""
    out = work / conv.output if conv.output else None
    if out is not None:
        remove(out)
    os.sync()
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_conversion_child,
                        args=(send, conv.key, str(root), list(keys), str(out) if out else None, list(exts), conv.options))
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"error": "the child process died"}
    child.join()
    if out is not None and "error" not in result:
        result["output_bytes"] = tree_size(out)
    return result


def link_subset(source: Source, dest: Path, n: int) -> List[str]:
    """Hard-link (or copy) ``n`` files spread over the source into ``dest``, for the warm-up round."""
    keys = source.keys[:: max(1, len(source.keys) // n)][:n]
    for key in keys:
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source.root / key, dest / key)
        except OSError:
            shutil.copyfile(source.root / key, dest / key)
    return keys


LOADED_ARCHIVES = ("data2h5", "bytes", "bytes_packed", "stacked")  # conversions whose output the loading rows read


def run_conversions(plan: List[Conversion], source: Source, work: Path, repeat: int, bar, notes: List[str]) -> List[Row]:
    """One untimed warm-up round on a few files, then ``repeat`` rounds, each running every
    variant in turn; the archives the loading rows read stay in ``work``. A variant that fails
    once is left out, with a note."""
    failed: Dict[str, str] = {}
    warm = work / "warmup"
    warm_keys = link_subset(source, warm / "src", WARMUP_FILES)
    for conv in plan:
        bar.set_description(f"warm-up: {conv.key}")
        result = run_conversion(conv, warm / "src", warm_keys, source.exts, warm)
        if "error" in result:
            failed[conv.key] = result["error"]
        bar.update(1)
    remove(warm)
    read_through([source.root])
    rows = {c.key: Row("conversion", c.key, c.label, len(source.keys)) for c in plan}
    for r in range(repeat):
        for conv in plan:
            bar.set_description(f"conversion {r + 1}/{repeat}: {conv.key}")
            result = {} if conv.key in failed else run_conversion(conv, source.root, source.keys, source.exts, work)
            bar.update(1)
            if "error" in result:
                failed[conv.key] = result["error"]
            elif result:
                rows[conv.key].times.append(result.pop("seconds"))
                rows[conv.key].extra.update(result)
    for conv in plan:
        if conv.output and conv.key not in LOADED_ARCHIVES:
            remove(work / conv.output)
    notes += [f"{rows[key].label}: failed ({error}); row left out" for key, error in failed.items()]
    return [row for key, row in rows.items() if key not in failed]


# -- loading ------------------------------------------------------------------------------------


class LooseImages:
    """ImageFolder-style: the class is the first folder; each access opens the file and
    decodes it with Pillow to RGB (ImageFolder's loader), then applies ``transform``."""

    def __init__(self, root: Path, keys: Sequence[str], transform: Optional[Callable[[np.ndarray], Any]] = None):
        self.paths = [str(root / key) for key in keys]
        self.targets = class_indices(keys)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as fh:
            sample = pillow_rgb(fh)
        return (sample if self.transform is None else self.transform(sample)), self.targets[i]


def pillow_rgb(source: Any) -> np.ndarray:
    """What ImageFolder's loader makes of a file (a path or an open binary file): Pillow's
    decode, converted to RGB, as an array."""
    from PIL import Image

    with Image.open(source) as img:
        return np.asarray(img.convert("RGB"))


class LazyH5:
    """The hand-written lazy pattern: list the datasets once, open the file on first access in
    each worker, read ``f[key][()]`` through h5py."""

    def __init__(self, path: Path, transform: Optional[Callable[[np.ndarray], Any]] = None):
        from data2h5.format import INDEX_GROUP

        names: List[str] = []
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        self.path = str(path)
        self.keys = [k for k in names if not k.startswith(INDEX_GROUP + "/")]
        self.targets = class_indices(self.keys)
        self.transform = transform
        self.h5: Optional[h5py.File] = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        if self.h5 is None:
            self.h5 = h5py.File(self.path, "r")
        sample = self.h5[self.keys[i]][()]
        return (sample if self.transform is None else self.transform(sample)), self.targets[i]


def class_indices(keys: Sequence[str]) -> List[int]:
    from data2h5.format import class_of

    classes = {c: i for i, c in enumerate(sorted({class_of(k) for k in keys}))}
    return [classes[class_of(k)] for k in keys]


class IndexList:
    """A sampler whose indices change between runs while the DataLoader's workers stay up."""

    def __init__(self) -> None:
        self.indices: List[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def as_list(batch: list) -> list:
    """Collate (``--collate list``): a batch stays a list of (array, target), pickled sample by
    sample from the workers."""
    return batch


@dataclass(frozen=True)
class CenterCrop:
    """The loading rows' transform (``--collate tensor``): the sample as a uint8 HWC tensor
    sharing the array's memory (``torch.from_numpy``), centre-cropped to ``height``×``width``
    (a view: every image is at least that large), so that the default collate stacks a batch
    into one tensor in shared memory, as training pipelines get it."""

    height: int
    width: int

    def __call__(self, array: np.ndarray):
        import torch

        top, left = (array.shape[0] - self.height) // 2, (array.shape[1] - self.width) // 2
        return torch.from_numpy(array)[top : top + self.height, left : left + self.width]


@dataclass(frozen=True)
class LoadingPlan:
    """How the loading rows hand samples over: ``crop`` (height, width) and stacked batches,
    or None: lists of arrays."""

    crop: Optional[Tuple[int, int]]

    def transform(self, scale: int = 1) -> Optional[CenterCrop]:
        """The crop for samples decoded at 1/``scale`` (decode_size), None for lists."""
        return None if self.crop is None else CenterCrop(self.crop[0] // scale, self.crop[1] // scale)


class TorchLoader:
    """A DataLoader with persistent workers over one dataset; ``run`` reads the given indices.
    ``collate_fn`` None: torch's default (batches of one shape stacked); ``finish``: applied
    to each batch in the main process (the GPU decode)."""

    def __init__(self, dataset, workers: int, batch_size: int, worker_init_fn: Optional[Callable[[int], None]] = None,
                 collate_fn: Optional[Callable[[list], Any]] = as_list, finish: Optional[Callable[[Any], Any]] = None):
        from torch.utils.data import DataLoader

        self.sampler = IndexList()
        self.finish = finish
        self.listed = collate_fn is as_list  # a list of samples; else (data, targets) or a JPEG batch
        options = {} if collate_fn is None else {"collate_fn": collate_fn}
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 persistent_workers=workers > 0, worker_init_fn=worker_init_fn, **options)

    def run(self, order: str, indices: List[int]) -> int:
        """Load ``indices`` (already in ``order``); returns the samples seen."""
        self.sampler.indices = indices
        seen = 0
        for batch in self.loader:
            seen += len(batch) if self.listed else len(batch[0])
            if self.finish is not None:
                self.finish(batch)
        return seen

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()


class StackedReader:
    """``data2h5.BatchReader`` over the stacked archive: one reader in order, one shuffled."""

    def __init__(self, path: Path, batch_size: int):
        from data2h5 import BatchReader

        self.batch_size = batch_size
        self.readers = {"sequential": BatchReader(path, batch_size),
                        "shuffled": BatchReader(path, batch_size, shuffle=True, seed=0)}

    def run(self, order: str, indices: List[int]) -> int:
        """Read as many batches as ``indices`` would fill; a BatchReader picks its own rows."""
        reader = self.readers[order]
        batches, seen = -(-len(indices) // self.batch_size), 0
        for b, (data, _labels) in enumerate(reader):
            seen += len(data)
            if b + 1 == batches:
                break
        return seen

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def loading_plan(source: Source, collate: str) -> LoadingPlan:
    """``--collate tensor`` crops to the smallest photo's height and width when every file
    decodes to one mode (so that batches stack); anything else goes as lists."""
    if collate == "tensor" and source.images and len({mode for _, _, mode in source.shapes}) == 1:
        return LoadingPlan((min(h for _, h, _ in source.shapes), min(w for w, _, _ in source.shapes)))
    return LoadingPlan(None)


class GpuDecodeFinish:
    """The GPU row's step in the main process: decode the batch's JPEG bytes with nvJPEG,
    crop each image as the CPU rows do, stack, and wait for the device."""

    def __init__(self, crop: Optional[Tuple[int, int]]):
        from data2h5.loaders.gpu_decode import JpegBatchDecoder

        self.decode = JpegBatchDecoder("cuda")
        self.crop = crop

    def __call__(self, batch) -> None:
        import torch

        images = self.decode(batch.images)
        if self.crop is not None:
            h, w = self.crop
            images = [im[:, (im.shape[1] - h) // 2 : (im.shape[1] - h) // 2 + h,
                         (im.shape[2] - w) // 2 : (im.shape[2] - w) // 2 + w] for im in images]
            torch.stack(images)
        torch.cuda.synchronize()


def gpu_decode_reason() -> str:
    """Why the nvJPEG row cannot run here ('' when it can)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    from data2h5.loaders.gpu_decode import DecoderUnavailable, JpegBatchDecoder

    try:
        JpegBatchDecoder("cuda")
    except DecoderUnavailable as exc:
        return str(exc)
    return ""


def plan_loaders(source: Source, work: Path, workers: int, batch_size: int, notes: List[str],
                 collate: str = "tensor") -> Dict[str, Tuple[str, Callable[[], Any]]]:
    """The loading variants whose input exists: key → (label, a function that opens the loader)."""
    from data2h5 import H5Dataset

    plan = loading_plan(source, collate)
    stacks = plan.crop is not None

    def torch_loader(make_dataset, worker_init_fn=None):
        return lambda: TorchLoader(make_dataset(), workers, batch_size, worker_init_fn,
                                   collate_fn=None if stacks else as_list)

    decoded, raw, stacked = work / "data2h5.h5", work / "bytes.h5", work / "stacked.h5"
    packed = work / "bytes_packed.h5"
    fast = fast_jpeg(source)
    half = half_size(source) if jpeg_source(source) else None
    crop, crop_half = plan.transform(), plan.transform(2)
    resized = "" if source.one_shape or not source.images else f" resized to {'×'.join(map(str, STACK_SIZE))}"
    gpu = gpu_decode_reason() if raw.exists() and jpeg_source(source) else "not a JPEG bytes archive"

    def gpu_loader():
        from data2h5.loaders.gpu_decode import collate_jpeg_bytes

        return TorchLoader(H5Dataset(raw, target="folder", decode=False), workers, batch_size,
                           collate_fn=collate_jpeg_bytes, finish=GpuDecodeFinish(plan.crop))

    planned = {
        "loose": ("loose files, Pillow (ImageFolder-style)", source.root if source.images else None,
                  torch_loader(lambda: LooseImages(source.root, source.keys, crop))),
        "h5dataset": ("H5Dataset, default archive (decoded)", decoded,
                      torch_loader(lambda: H5Dataset(decoded, target="folder", transform=crop))),
        "h5dataset_bytes": (f"H5Dataset, bytes archive (decoded on read{', simplejpeg' if fast else ''})", raw,
                            torch_loader(lambda: H5Dataset(raw, target="folder", transform=crop))),
        "h5dataset_bytes_pillow": ("H5Dataset, bytes archive (decoded on read, Pillow alone)", raw if fast else None,
                                   torch_loader(lambda: H5Dataset(raw, target="folder", transform=crop),
                                                pillow_jpeg_worker)),
        "h5dataset_bytes_half": (f"H5Dataset, bytes archive, decode_size={half} (JPEGs at 1/2 scale or less)",
                                 raw if half else None,
                                 torch_loader(lambda: H5Dataset(raw, target="folder", decode_size=half,
                                                                transform=crop_half))),
        "h5dataset_packed": (f"H5Dataset, bytes archive, --layout packed (decoded on read{', simplejpeg' if fast else ''})",
                             packed, torch_loader(lambda: H5Dataset(packed, target="folder", transform=crop))),
        "h5dataset_packed_half": (f"H5Dataset, bytes archive, --layout packed, decode_size={half}",
                                  packed if half else None,
                                  torch_loader(lambda: H5Dataset(packed, target="folder", decode_size=half,
                                                                 transform=crop_half))),
        "h5dataset_bytes_nvjpeg": ("H5Dataset, bytes archive, JPEG bytes decoded a batch at a time by nvJPEG (GPU)",
                                   None if gpu else raw, gpu_loader),
        "lazy_h5py": ("hand-written lazy h5py dataset, default archive", decoded,
                      torch_loader(lambda: LazyH5(decoded, crop))),
        "batch_reader": (f"BatchReader, stacked archive (arrays{resized}, nothing to decode)", stacked,
                         lambda: StackedReader(stacked, batch_size)),
    }
    if not source.images:
        notes.append("the files are not images Pillow opens: the loose-file row is left out, and with it the ratios")
    if stacks:
        h, w = plan.crop
        notes.append(f"--collate tensor: every DataLoader row hands each sample over as a uint8 HWC tensor "
                     f"(torch.from_numpy, no copy) centre-cropped to {h}×{w}, the smallest photo's height and width "
                     "(a view, as RandomCrop takes), and torch's default collate stacks each batch into one tensor in "
                     "shared memory; the same for loose files and archives")
    elif collate == "tensor" and source.images:
        notes.append("--collate tensor: the files decode to more than one mode, so batches stay lists of arrays")
    if fast:
        notes.append("Pillow alone: the bytes archive read with data2h5's JPEG fast path (simplejpeg) switched off in "
                     "the DataLoader workers, as without the jpeg extra")
    if half:
        cropped = f", cropped to {crop_half.height}×{crop_half.width}" if crop_half is not None else ""
        notes.append(f"decode_size={half}: half the smallest photo's height and width, so every JPEG decodes at 1/2 "
                     f"scale or less inside libjpeg{cropped}: smaller arrays, and not those of a full decode and a resize")
    if jpeg_source(source):
        notes.append("nvJPEG row: " + (gpu + ", so it is left out (data2h5.loaders.gpu_decode)" if gpu else
                                        "workers collate the JPEG bytes, the main process decodes each batch on the GPU "
                                        "(torchvision.io.decode_jpeg), crops as the other rows and waits for the device"))
    return {key: (label, make) for key, (label, needs, make) in planned.items() if needs is not None and needs.exists()}


def sample_indices(n: int, samples: int, round_: int) -> Dict[str, List[int]]:
    """The first ``samples`` in order, and ``samples`` drawn at random from all ``n``."""
    rng = np.random.default_rng(round_)
    return {"sequential": list(range(samples)), "shuffled": [int(i) for i in rng.choice(n, samples, replace=False)]}


def run_loading(source: Source, work: Path, args, cold: bool, bar, notes: List[str]) -> List[Row]:
    """Warm-up, then ``repeat`` rounds warm and (``cold``) ``repeat`` rounds cold; in each round
    every loader runs in turn, in order and shuffled."""
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # Pillow's, read-only
    planned = plan_loaders(source, work, args.workers, args.batch_size, notes, args.collate)
    samples = min(args.samples, len(source.keys))
    loaders: Dict[str, Any] = {}
    rows: Dict[Tuple[str, str, str], Row] = {}
    bar.total = bar.n + len(planned) * (1 + args.repeat * 2 * (2 if cold else 1))
    bar.refresh()
    try:
        for key, (_label, make) in planned.items():
            loaders[key] = make()
        read_through([source.root, work])
        for key, loader in loaders.items():
            bar.set_description(f"loading warm-up: {key}")
            loader.run("shuffled", sample_indices(len(source.keys), samples, args.repeat)["shuffled"])
            bar.update(1)
        for cache in ("warm", "cold") if cold else ("warm",):
            for r in range(args.repeat):
                for order, indices in sample_indices(len(source.keys), samples, r).items():
                    for key, loader in loaders.items():
                        bar.set_description(f"loading {cache} {r + 1}/{args.repeat}: {key} {order}")
                        if cache == "cold":
                            drop_page_cache()
                        start = time.perf_counter()
                        seen = loader.run(order, indices)
                        row = rows.setdefault((key, cache, order), Row("loading", key, planned[key][0], seen))
                        row.times.append(time.perf_counter() - start)
                        row.extra.update(cache=cache, order=order)
                        bar.update(1)
    finally:
        for loader in loaders.values():
            loader.close()
    return list(rows.values())


# -- batch: BatchReader against h5py loops over the stacked archive ------------------------------

FANCY_BATCHES = 2  # fancy indexing decompresses a whole chunk for every row (~50× slower): a sample suffices
WARMUP_BATCHES = 1  # batches each batch variant reads in the untimed warm-up round


def h5py_loop(path: Path, batch_size: int, batches: int, step_s: float = 0.0, seed: int = 0) -> Tuple[float, int]:
    """The loop people write first: slice each batch of ``data``/``labels`` out with h5py, in
    order, then train on it, reading and training in turn. Returns (seconds, rows read)."""
    start = time.perf_counter()
    seen = 0
    with h5py.File(path, "r") as f:
        data, labels = f["data"], f["labels"]
        for b in range(batches):
            seen += len(data[b * batch_size : (b + 1) * batch_size])
            labels[b * batch_size : (b + 1) * batch_size]
            if step_s:
                time.sleep(step_s)
        return time.perf_counter() - start, seen


def h5py_fancy(path: Path, batch_size: int, batches: int, step_s: float = 0.0, seed: int = 0) -> Tuple[float, int]:
    """Shuffled rows through h5py as people do it: one permutation, each batch's indices sorted
    (h5py wants them increasing) and read by fancy indexing."""
    start = time.perf_counter()
    seen = 0
    with h5py.File(path, "r") as f:
        data, labels = f["data"], f["labels"]
        order = np.random.default_rng(seed).permutation(data.shape[0])
        for b in range(batches):
            rows = np.sort(order[b * batch_size : (b + 1) * batch_size])
            seen += len(data[rows])
            labels[rows]
            if step_s:
                time.sleep(step_s)
        return time.perf_counter() - start, seen


def batch_reader_loop(shuffle: bool, rank: int = 0, world_size: int = 1) -> Callable[..., Tuple[float, int]]:
    def run(path: Path, batch_size: int, batches: int, step_s: float = 0.0, seed: int = 0) -> Tuple[float, int]:
        """A fresh ``data2h5.BatchReader`` (its defaults) for the first ``batches`` batches of an
        epoch (of rank ``rank``'s share); the clock stops at the last batch, before the reader
        stops its threads."""
        from data2h5 import BatchReader

        start = time.perf_counter()
        seen = 0
        with BatchReader(path, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size) as reader:
            for b, (data, _labels) in enumerate(reader):
                seen += len(data)
                if step_s:
                    time.sleep(step_s)
                if b + 1 == batches:
                    break
            return time.perf_counter() - start, seen

    return run


SAMPLER_SAMPLES = 1_000_000  # the sampler row: one epoch of rank 0 of 2 over this many samples


def sampler_epoch(path: Path, batch_size: int, batches: int, step_s: float = 0.0, seed: int = 0) -> Tuple[float, int]:
    """One epoch of ``RankSampler`` (rank 0 of 2, shuffled) taken by a Python loop, as a
    DataLoader takes it: planning included. Returns (seconds, indices)."""
    from data2h5.loaders import RankSampler

    sampler = RankSampler(SAMPLER_SAMPLES, seed=seed, rank=0, world_size=2)
    start = time.perf_counter()
    seen = 0
    for _ in sampler:
        seen += 1
    return time.perf_counter() - start, seen


def rank_batches(path: Path, batch_size: int, batches: int) -> int:
    """Batches the rank-0-of-2 row reads: at most ``batches``, at most rank 0's share."""
    from data2h5 import BatchReader

    with BatchReader(path, batch_size, rank=0, world_size=2) as reader:
        return max(1, min(batches, len(reader)))


@dataclass
class BatchVariant:
    key: str
    label: str
    run: Callable[..., Tuple[float, int]]
    batches: int
    overlap_of: Optional[str] = None  # for a variant with a training step: the same loop without


def plan_batch(batches: int, rank0_batches: int) -> List[BatchVariant]:
    """The variants without a training step; the overlap ones are added once the step is known."""
    fancy = min(batches, FANCY_BATCHES)
    return [
        BatchVariant("h5py_loop", "h5py loop over sequential slices of `data` (no prefetch)", h5py_loop, batches),
        BatchVariant("reader_sequential", "BatchReader sequential", batch_reader_loop(False), batches),
        BatchVariant("reader_shuffled", "BatchReader shuffled", batch_reader_loop(True), batches),
        BatchVariant("reader_rank0_of_2", "BatchReader shuffled, rank 0 of world_size 2",
                     batch_reader_loop(True, rank=0, world_size=2), rank0_batches),
        BatchVariant("sampler_overhead", f"RankSampler: one epoch of rank 0 of 2 over {SAMPLER_SAMPLES:,} samples",
                     sampler_epoch, 1),
        BatchVariant("h5py_fancy", f"h5py shuffled rows by fancy indexing (sorted indices per batch; "
                     f"{fancy} batch{'es' if fancy > 1 else ''})", h5py_fancy, fancy),
    ]


def overlap_variants(plain: List[BatchVariant], step_ms: float) -> List[BatchVariant]:
    by = {v.key: v for v in plain}
    names = {"h5py_loop": "h5py loop", "reader_sequential": "BatchReader sequential", "reader_shuffled": "BatchReader shuffled"}
    return [BatchVariant(f"overlap_{key}", f"overlap: {name} + {step_ms:.1f} ms step per batch",
                         by[key].run, by[key].batches, overlap_of=key)
            for key, name in names.items()]


def run_batch(work: Path, args, bar, notes: List[str]) -> List[Row]:
    """Warm-up, then ``repeat`` rounds; in each every variant runs in turn, those with a
    simulated training step last. The step is ``--step-ms``, or the h5py loop's read time per
    batch in the first round."""
    stacked = work / "stacked.h5"
    bar.total = bar.n + (batch_steps(args.repeat) if stacked.exists() else 0)  # the last section: set, not planned
    bar.refresh()
    if not stacked.exists():
        notes.append("batch: the stacked archive is missing (its conversion failed), so the batch section is left out")
        return []
    with h5py.File(stacked, "r") as f:
        n = f["data"].shape[0]
    bs = args.batch_size
    batches = max(1, min(args.batches, -(-n // bs)))
    plain, stepped = plan_batch(batches, rank_batches(stacked, bs, batches)), []
    rows: Dict[str, Row] = {}

    def measure(v: BatchVariant, r: int, step_ms: float = 0.0) -> None:
        bar.set_description(f"batch {r + 1}/{args.repeat}: {v.key}")
        seconds, seen = v.run(stacked, bs, v.batches, step_ms / 1e3, seed=r)
        row = rows.setdefault(v.key, Row("batch", v.key, v.label, seen))
        row.times.append(seconds)
        row.extra.update(batches=v.batches, batch_size=bs)
        if v.overlap_of is not None:
            row.extra.update(step_ms=step_ms, overlap_of=v.overlap_of)
        bar.update(1)

    read_through([stacked])
    for v in plain:
        bar.set_description(f"batch warm-up: {v.key}")
        v.run(stacked, bs, min(v.batches, WARMUP_BATCHES))
        bar.update(1)
    step_ms = args.step_ms
    for r in range(args.repeat):
        for v in plain:
            measure(v, r)
        if step_ms is None:
            step_ms = rows["h5py_loop"].times[0] / batches * 1e3
        stepped = stepped or overlap_variants(plain, step_ms)
        for v in stepped:
            measure(v, r, step_ms)
    return list(rows.values())


def batch_steps(repeat: int) -> int:
    """Runs of the batch section: 6 variants warmed up, 9 timed in each round."""
    return 6 + 9 * repeat


# -- report -------------------------------------------------------------------------------------

SINGLE_PROCESS = {"naive", "webdataset"}  # conversions without a pool: no worker RSS


def run_decoding(source: Source, args, bar, notes: List[str]) -> List[Row]:
    """One core, no DataLoader: the corpus's JPEG bytes (up to ``--samples``) decoded from
    memory by Pillow as ImageFolder's loader does, and by data2h5's decoder at full size and
    at ``decode_size`` half the smallest photo's sides; the decoders' own gap, which every
    loading row dilutes with the costs a sample has besides its decode."""
    from data2h5 import jpeg

    if not jpeg_source(source):
        notes.append("decoding: the files are not JPEGs, so the decoding rows are left out")
        return []
    raws = [(source.root / key).read_bytes() for key in source.keys[: args.samples]]
    half = half_size(source)

    variants = [("pillow", "Pillow: open, convert to RGB, to an array (ImageFolder's loader)",
                 lambda raw: pillow_rgb(io.BytesIO(raw))),
                ("data2h5", f"data2h5 ({jpeg.backend()}), full size: the same array", jpeg.decode),
                ("data2h5_half", f"data2h5 ({jpeg.backend()}), decode_size={half}",
                 functools.partial(jpeg.decode, decode_size=half))]
    rows = {key: Row("decoding", key, label, items=len(raws)) for key, label, _ in variants}
    for _, _, decode in variants:  # warm-up: libraries loaded, caches filled
        for raw in raws[:32]:
            decode(raw)
    for _ in range(args.repeat):
        for key, _, decode in variants:
            bar.set_description(f"decoding: {key}")
            started = time.perf_counter()
            for raw in raws:
                decode(raw)
            rows[key].times.append(time.perf_counter() - started)
            bar.update(1)
    notes.append("decoding: one core, each JPEG's bytes already in memory, decoded one after another; Pillow and "
                 "simplejpeg both run libjpeg-turbo, so their gap is the copies and conversions around it")
    return list(rows.values())


def decoding_table(rows: List[Row]) -> List[str]:
    base = rows[0].seconds / rows[0].items
    lines = [f"### Decoding: µs a photo, one core ({rows[0].items:,} photos; in brackets: × Pillow)", "",
             "| decoder | µs a photo |", "|---|---:|"]
    for row in rows:
        each = row.seconds / row.items
        lines.append(f"| {row.label} | {each * 1e6:,.0f} ({base / each:.2f}×) |")
    return lines


def add_figures(rows: List[Row], source: Source) -> None:
    """Derive into each row's ``figures`` every number the tables show (the JSON has them too)."""
    by = {(r.section, r.key, r.extra.get("cache"), r.extra.get("order")): r for r in rows}
    limit, ours = by.get(("conversion", "limit", None, None)), by.get(("conversion", "data2h5", None, None))
    for row in rows:
        fig = row.figures = {"per_s": row.rate, "seconds": row.seconds}
        if row.section == "loading":
            base = by.get(("loading", "loose", row.extra["cache"], row.extra["order"]))
            if base is not None:
                fig["x_loose"] = row.rate / base.rate
            continue
        if row.section == "batch":
            batch_figures(row, {r.key: r for r in rows if r.section == "batch"})
            continue
        if row.section == "decoding":
            base = by.get(("decoding", "pillow", None, None))
            fig["us_each"] = row.seconds / row.items * 1e6
            if base is not None:
                fig["x_pillow"] = base.seconds / row.seconds
            continue
        fig["mb_per_s"] = source.nbytes / MB / row.seconds
        if "output_bytes" in row.extra:
            fig["output_mb"] = row.extra["output_bytes"] / MB
            fig["x_source"] = row.extra["output_bytes"] / source.nbytes
        fig["peak_rss_main_mb"] = row.extra["rss_writer"] / MB
        if row.key not in SINGLE_PROCESS:
            fig["peak_rss_worker_mb"] = row.extra["rss_workers"] / MB
        if limit is not None:
            fig["x_limit"] = row.rate / limit.rate
        if ours is not None:
            fig["x_data2h5"] = row.rate / ours.rate


def batch_figures(row: Row, by: Dict[str, Row]) -> None:
    """Rates against the h5py loop and, for a variant with a step, its overlap: the time over
    max(step, its loop's own read time per batch) × batches, 1.0 when reading hides entirely."""
    fig = row.figures
    if row.key == "sampler_overhead":
        fig["us_per_sample"] = row.seconds / row.items * 1e6
        return
    fig["batch_ms"] = row.seconds / row.extra["batches"] * 1e3
    plain = by.get("h5py_loop")
    if row.key == "reader_rank0_of_2" and "reader_shuffled" in by:
        fig["x_half_one_rank"] = row.rate / (by["reader_shuffled"].rate / 2)
    if row.extra.get("overlap_of") is None:
        if plain is not None:
            fig["x_h5py_loop"] = row.rate / plain.rate
        if row.key == "reader_shuffled" and "reader_sequential" in by:
            fig["x_sequential"] = row.rate / by["reader_sequential"].rate
        return
    read_ms = by[row.extra["overlap_of"]].seconds / row.extra["batches"] * 1e3
    fig.update(step_ms=row.extra["step_ms"], read_ms=read_ms,
               overlap=row.seconds * 1e3 / (max(row.extra["step_ms"], read_ms) * row.extra["batches"]))


def cell(value: Optional[float], spec: str = ",.2f") -> str:
    return "–" if value is None else format(value, spec)


def conversion_table(rows: List[Row], source: Source) -> List[str]:
    lines = [
        f"### Conversion: {len(source.keys):,} files, {source.nbytes / MB:,.1f} MB",
        "",
        "| conversion | files/s | MB/s read | output MB | × source | peak RSS MB (main / worker) | × limit | × data2h5 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        f = row.figures
        lines.append(
            f"| {row.label} | {cell(f['per_s'], ',.0f')} | {cell(f['mb_per_s'], ',.1f')} | {cell(f.get('output_mb'), ',.1f')} "
            f"| {cell(f.get('x_source'))} | {cell(f['peak_rss_main_mb'], ',.0f')} / {cell(f.get('peak_rss_worker_mb'), ',.0f')} "
            f"| {cell(f.get('x_limit'))} | {cell(f.get('x_data2h5'))} |"
        )
    return lines


def loading_table(rows: List[Row], args, samples: int) -> List[str]:
    regimes = list(dict.fromkeys((r.extra["cache"], r.extra["order"]) for r in rows))
    cells = {(r.key, r.extra["cache"], r.extra["order"]): r for r in rows}
    lines = [
        f"### Loading: samples/s ({samples:,} samples a run, batch {args.batch_size}, "
        f"{args.workers} DataLoader workers; in brackets: × loose files)",
        "",
        "| loader | " + " | ".join(f"{c} {o}" for c, o in regimes) + " |",
        "|---|" + "---:|" * len(regimes),
    ]
    for key, label in dict.fromkeys((r.key, r.label) for r in rows):
        shown = []
        for cache, order in regimes:
            row = cells.get((key, cache, order))
            ratio = row.figures.get("x_loose") if row else None
            shown.append("–" if row is None else cell(row.rate, ",.0f") + (f" ({ratio:.2f}×)" if ratio else ""))
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return lines


def batch_table(rows: List[Row], stacked: Dict[str, Any]) -> List[str]:
    first = rows[0].extra
    lines = [
        f"### Batches: BatchReader over the stacked archive ({stacked['rows']:,} rows of "
        f"{'×'.join(map(str, stacked['row_shape']))} {stacked['dtype']}, {stacked['mb']:,.{1 if stacked['mb'] >= 1 else 3}f} MB; batch "
        f"{first['batch_size']}, the first {first['batches']} batches of an epoch a run)",
        "",
        "| batch reading | rows/s | ratio |",
        "|---|---:|---:|",
    ]
    for row in rows:
        f = row.figures
        if "overlap" in f:
            ratio = f"{f['overlap']:.2f} (ideal 1; R = {f['read_ms']:.1f} ms)"
        elif "us_per_sample" in f:
            ratio = f"{f['us_per_sample']:.3f} µs a sample"
        elif "x_half_one_rank" in f:
            ratio = f"{f['x_half_one_rank']:.2f}× half the 1-rank rate (BatchReader shuffled)"
        elif "x_sequential" in f:
            ratio = f"{f['x_sequential']:.2f}× sequential ({f['x_h5py_loop']:.2f}× h5py loop)"
        elif row.key == "h5py_loop":
            ratio = f"R = {f['batch_ms']:.1f} ms a batch"
        else:
            ratio = f"{f['x_h5py_loop']:.{3 if f['x_h5py_loop'] < 0.1 else 2}f}× h5py loop" if "x_h5py_loop" in f else "–"
        lines.append(f"| {row.label} | {cell(f['per_s'], ',.0f')} | {ratio} |")
    return lines


def report(result: Dict[str, Any], rows: List[Row], source: Source, args) -> str:
    m = result["machine"]
    runs = f"{args.repeat} runs" if args.repeat > 1 else "1 run"
    lines = [
        "## data2h5 benchmark",
        "",
        f"`{result['command']}`: {source.description}. Median of {runs} after one untimed warm-up, "
        f"the variants taking turns within each round; {result['wall_seconds']:.0f} s in all.",
        "",
        f"Machine: {m['cores']}, {m['memory']}, {m['os']}; Python {m['python']}, numpy {m['numpy']}, "
        f"h5py {m['h5py']}, HDF5 {m['HDF5']}, torch {m['torch']}, Pillow {m['Pillow']}, data2h5 {m['data2h5']}; "
        f"work folder {m['work folder']}; load average {result['load_before']:.2f} before, {result['load_after']:.2f} after.",
        "",
    ]
    conversions = [r for r in rows if r.section == "conversion"]
    loads = [r for r in rows if r.section == "loading"]
    batches = [r for r in rows if r.section == "batch"]
    if conversions:
        lines += conversion_table(conversions, source) + [""]
    if loads:
        lines += loading_table(loads, args, result["samples"]) + [""]
    if batches:
        lines += batch_table(batches, result["stacked"]) + [""]
    decodes = [r for r in rows if r.section == "decoding"]
    if decodes:
        lines += decoding_table(decodes) + [""]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)


CONVERSION_NOTES = [
    "files/s and MB/s: source files and bytes over the median wall time, until the output is on disk "
    "(the baselines fsync as data2h5 does); each run in a fresh process after an untimed sync.",
    "limit: each file read and decoded with data2h5's decoder in a pool of every core, the arrays discarded: "
    "what decoding alone allows; data2h5's default row also compresses (lzf) and writes.",
    "peak RSS: the main (writer) process's peak, including the interpreter with numpy, h5py and Pillow "
    "loaded, and the largest pool worker's peak (pages shared after fork count in both).",
]
LOADING_NOTES = [
    "loading: DataLoader workers stay up between runs (persistent_workers); BatchReader is not a DataLoader: "
    "its 2 threads read whole batches of the stacked array (no crop), and its shuffle mixes rows within windows "
    "of the file.",
]

BATCH_NOTES = [
    "batches: each run opens the stacked archive and reads the first batches of an epoch (at most --batches), "
    "page cache warm; BatchReader with its defaults (2 threads, 2 batches ahead), a fresh one each run, its "
    "clock stopped at the last batch; its shuffle visits chunks in random order and mixes rows within windows "
    "of chunks (32 MiB by default). h5py fancy indexing decompresses each row's whole chunk, so only a few batches.",
    "ranks: rank 0 of world_size 2 reads its share (whole chunks, none decoded by rank 1) in this one process; its "
    "rate over half the 1-rank shuffled rate is what two ranks get each when they share the disk: ≥ 0.9 wanted "
    "(about 2 when one rank reads alone). The sampler row: the Python loop over one epoch's indices, planning included.",
    "overlap: each batch is followed by time.sleep(T), a stand-in for a training step that releases the GIL "
    "as a GPU step would; T is --step-ms, else the h5py loop's read time per batch in the first round (so T ≈ R). "
    "Ratio: the run's time ÷ (max(T, R) × batches), R the same loop's own median read time per batch: 1.0 "
    "when reading hides entirely behind the step; a loop that reads, then trains, takes (T + R) ÷ max(T, R), ~2.",
]


def write_plot(path: Path, rows: List[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conversions = [r for r in rows if r.section == "conversion"]
    loads = [r for r in rows if r.section == "loading"]
    fig, axes = plt.subplots(2, 1, figsize=(13, 9))
    axes[0].barh([r.label for r in conversions], [r.rate for r in conversions], color="tab:blue")
    axes[0].set_xlabel("files/s (conversion)")
    axes[0].invert_yaxis()
    regimes = list(dict.fromkeys((r.extra["cache"], r.extra["order"]) for r in loads))
    labels = list(dict.fromkeys(r.label for r in loads))
    height = 0.8 / max(1, len(regimes))
    for i, regime in enumerate(regimes):
        rates = {r.label: r.rate for r in loads if (r.extra["cache"], r.extra["order"]) == regime}
        axes[1].barh([j + i * height for j in range(len(labels))], [rates.get(lb, 0) for lb in labels],
                     height=height, label=" ".join(regime))
    axes[1].set_yticks([j + height * (len(regimes) - 1) / 2 for j in range(len(labels))], labels)
    axes[1].set_xlabel("samples/s (loading)")
    axes[1].invert_yaxis()
    if regimes:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--path-images", type=Path, metavar="DIR", help="your own folder (read, never changed)")
    src.add_argument("--make-corpus", type=int, metavar="N", help="generate N photo-like JPEGs in a temporary folder")
    p.add_argument("--corpus", choices=("generated", "real"), default="generated",
                   help="with --make-corpus: photo-like generated images, or crops of the photos scikit-image ships "
                        "(pip install scikit-image); default generated")
    p.add_argument("--ext", action="append", help="extension of your files (repeatable; default jpg)")
    p.add_argument("--keep-corpus", action="store_true", help="keep the generated corpus (its folder is printed)")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the corpus and the outputs are written (default: the temporary folder)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each variant; the median is reported (default 3)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="DataLoader workers (default: the cores, at most 8); conversions use data2h5's default")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the loading and batch rows (default 64)")
    p.add_argument("--samples", type=int, default=1024, help="samples read by each loading run (default 1024)")
    p.add_argument("--batches", type=int, default=100,
                   help="batch section: batches read by each run, at most an epoch (default 100)")
    p.add_argument("--step-ms", type=float, metavar="T",
                   help="batch section: simulated training step per batch (default: the h5py loop's read time)")
    p.add_argument("--collate", choices=("tensor", "list"), default="tensor",
                   help="loading rows: samples as uint8 tensors cropped to one size, batches stacked in shared memory "
                        "(default), or lists of arrays pickled sample by sample")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache loading runs even as root")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    p.add_argument("--scale", metavar="N[,N...]", help="only the scale table: generate trees of N tiny files (e.g. "
                   "10000,100000,1000000) and measure files and packed archives of them, then remove them")
    p.add_argument("--scale-trees", type=Path, metavar="DIR", help="with --scale: keep the trees (and reuse them) "
                   "under DIR")
    p.add_argument("--scale-compression", default="auto", help="with --scale: --compression of the conversions")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="bar chart of the rates (needs matplotlib)")
    args = p.parse_args(argv)
    if not args.scale and args.path_images is None and args.make_corpus is None:
        p.error("one of the arguments --path-images --make-corpus (or --scale) is required")
    if args.make_corpus is not None and args.make_corpus < 1:
        p.error("--make-corpus needs at least 1 file")
    if min(args.repeat, args.batch_size, args.samples, args.batches) < 1 or args.workers < 0:
        p.error("--repeat, --batch-size, --samples and --batches must be at least 1, --workers at least 0")
    if args.step_ms is not None and args.step_ms < 0:
        p.error("--step-ms must be at least 0")
    if args.corpus == "real" and args.make_corpus is None:
        p.error("--corpus real goes with --make-corpus N")
    if args.corpus == "real" and not real_photo_paths():
        p.error("--corpus real needs scikit-image, whose wheel ships the photos: pip install scikit-image")
    if args.path_images is not None and not args.path_images.is_dir():
        p.error(f"--path-images {args.path_images} is not a folder")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.absolute().parent.is_dir():
            p.error(f"{option} {path}: the folder {path.absolute().parent} does not exist")
    args.ext = [e.lower().lstrip(".") for e in (args.ext or ["jpg"])]
    args.sections = args.only or list(SECTIONS)
    return args


def describe_stacked(path: Path) -> Optional[Dict[str, Any]]:
    """Rows, row shape, dtype and size of the stacked archive the batch rows read, if it exists."""
    if not path.exists():
        return None
    with h5py.File(path, "r") as f:
        data = f["data"]
        return {"rows": data.shape[0], "row_shape": list(data.shape[1:]), "dtype": str(data.dtype),
                "chunk_rows": data.chunks[0] if data.chunks else None, "mb": path.stat().st_size / MB}


def prepare_source(args, work: Path) -> Source:
    if args.path_images is not None:
        source = open_source(args.path_images.resolve(), args.ext)
        source.description = (f"{len(source.keys):,} files under {source.root} (--ext {' '.join(args.ext)}), "
                              f"{source.nbytes / MB:,.1f} MB")
        return source
    root = work / "corpus"
    seconds = make_corpus(root, args.make_corpus, args.corpus)
    source = open_source(root, ["jpg"])
    shapes = sorted({(w, h) for w, h, _ in source.shapes})
    classes = len({key.split("/")[0] for key in source.keys})
    what = (f"crops of {len(real_photo_paths())} real photos (scikit-image {version_of('scikit-image')}'s "
            "skimage/data), saved as JPEGs," if args.corpus == "real" else "generated photo-like JPEGs")
    source.description = (
        f"{args.make_corpus:,} {what} in {classes} class folders, {len(shapes)} shapes "
        f"from {min(shapes)[0]}×{min(shapes)[1]} to {max(shapes)[0]}×{max(shapes)[1]}, {source.nbytes / MB:,.1f} MB "
        f"({source.nbytes / len(source.keys) / 1e3:.1f} KB a file), generated in {seconds:.0f} s"
    )
    return source


def ensure_archives(source: Source, work: Path, plan: List[Conversion], wanted: Sequence[str], notes: List[str]) -> None:
    """Build, untimed, the ``wanted`` archives that no conversion left behind."""
    for conv in plan:
        if conv.key in wanted and not (work / conv.output).exists():
            result = run_conversion(conv, source.root, source.keys, source.exts, work)
            if "error" in result:
                notes.append(f"{conv.label}: failed ({result['error']}); the rows that read it are left out")


def planned_steps(args, plan: List[Conversion], loading: bool, cold: bool) -> int:
    """Runs the progress bar counts (the loading part is corrected once its loaders are known)."""
    steps = len(plan) * (1 + args.repeat) if "conversion" in args.sections else 0
    steps += batch_steps(args.repeat) if "batch" in args.sections else 0
    steps += 3 * args.repeat if "decoding" in args.sections else 0
    return steps + (5 * (1 + 2 * args.repeat * (2 if cold else 1)) if loading else 0)



# -- scale: a million tiny files ---------------------------------------------------------------

SCALE_FOLDER_FILES = 1000  # files per folder of a generated tiny-file tree
SCALE_READS = 20000  # random single-sample reads timed in a fresh process

#: Run in a fresh interpreter, so that each figure is its own process's (peak memory above all).
SCALE_PROBE = r"""
import json, os, pickle, subprocess, sys, time
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS:")][0].split()[1]) * 1024
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
what, args = sys.argv[1], json.loads(sys.argv[2])
out = {}
if what == "convert":
    import data2h5
    t = time.perf_counter()
    report = data2h5.convert(args["src"], args["dst"], ext="bin", reader="bytes", layout=args["layout"],
                             workers=args["workers"], compression=args["compression"])
    out = {"files_per_s": report.entries / (time.perf_counter() - t), "writer_peak": hwm()}
elif what == "webdataset":
    import webdataset as wds
    t = time.perf_counter()
    pattern = os.path.join(args["dst"], "shard-%06d.tar")
    n = 0
    with wds.ShardWriter(pattern, maxsize=1 << 30, verbose=0) as sink:
        for folder in sorted(os.listdir(args["src"])):
            for name in sorted(os.listdir(os.path.join(args["src"], folder))):
                with open(os.path.join(args["src"], folder, name), "rb") as fh:
                    sink.write({"__key__": f"{folder}/{name[:-4]}", "bin": fh.read()})
                n += 1
    out = {"files_per_s": n / (time.perf_counter() - t), "writer_peak": hwm()}
elif what == "open":
    from data2h5.loaders import H5Dataset
    H5Dataset(args["dst"], decode=False, limit=1)  # imports and HDF5's first open out of the timing
    t = time.perf_counter()
    ds = H5Dataset(args["dst"], decode=False)
    out["open_s"] = time.perf_counter() - t
    out["pickled"] = len(pickle.dumps(ds))
    t = time.perf_counter()
    folder = H5Dataset(args["dst"], decode=False, target="folder")
    out["open_folder_s"] = time.perf_counter() - t
    out["pickled_folder"] = len(pickle.dumps(folder))
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "data2h5", "ls", args["dst"]], stdout=subprocess.PIPE, check=True)
    out["ls_s"] = time.perf_counter() - t
    out["ls_lines"] = done.stdout.count(b"\n")
elif what == "worker":
    import multiprocessing as mp
    from data2h5.loaders import H5Dataset
    sys.path.insert(0, args["here"])
    from benchmark import scale_collate, scale_worker_probe
    ds = H5Dataset(args["dst"], decode=False, target="folder")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=scale_worker_probe, args=(ds, q))
    proc.start()
    out.update(q.get())
    proc.join()
    import torch
    from torch.utils.data import DataLoader
    from benchmark import ScaleBare
    for key, dataset in (("bare_first_batch_s", ScaleBare(len(ds))), ("first_batch_s", ds)):
        t = time.perf_counter()
        loader = DataLoader(dataset, batch_size=64, num_workers=2, shuffle=True, multiprocessing_context="spawn",
                            collate_fn=scale_collate)
        next(iter(loader))
        out[key] = time.perf_counter() - t
        del loader
elif what == "reads":
    import numpy as np
    from data2h5.loaders import H5Dataset
    ds = H5Dataset(args["dst"], decode=False)
    order = np.random.default_rng(0).integers(0, len(ds), args["reads"]).tolist()
    for key in ("reads_per_s", "reads_again_per_s"):  # every row new to this process, then the same rows again
        t = time.perf_counter()
        for i in order:
            ds[i]
        out[key] = len(order) / (time.perf_counter() - t)
print(json.dumps(out))
"""


def scale_worker_probe(ds: Any, queue: Any) -> None:
    """In a spawned worker: the memory the dataset adds once it has read one sample (its
    index read again here), over that of a worker with the same modules loaded."""
    import data2h5.loaders  # noqa: F401 - what every worker loads anyway
    import torch  # noqa: F401

    def rss() -> int:
        return int([ln for ln in open("/proc/self/status") if ln.startswith("VmRSS:")][0].split()[1]) * 1024

    before = rss()
    ds[0]
    queue.put({"worker_added": rss() - before})


def scale_collate(batch: list) -> list:
    return batch


class ScaleBare:
    """A dataset of ``n`` integers that reads nothing: what starting spawn workers costs
    torch alone, beside the archive's first batch."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def make_tiny_tree(root: Path, n: int) -> float:
    """``n`` files of 64-512 random bytes in folders of SCALE_FOLDER_FILES; returns seconds taken."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    sizes = rng.integers(64, 513, n)
    for d in range(-(-n // SCALE_FOLDER_FILES)):
        folder = root / f"{d:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(SCALE_FOLDER_FILES, n - d * SCALE_FOLDER_FILES)):
            j = d * SCALE_FOLDER_FILES + i
            start = (j * 613) % (len(blob) - 600)
            (folder / f"{i:04d}.bin").write_bytes(blob[start : start + int(sizes[j])])
    return time.perf_counter() - started


def _scale_probe(what: str, **args: Any) -> Dict[str, float]:
    done = subprocess_run([sys.executable, "-c", SCALE_PROBE, what, json.dumps(args)])
    return json.loads(done.splitlines()[-1])


def subprocess_run(cmd: List[str]) -> str:
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def run_scale(entries: Sequence[int], work_dir: Path, workers: int, compression: str, keep: Optional[Path]) -> str:
    """The scale table: for each entry count, a generated tree of tiny files converted with
    the files and packed layouts (and WebDataset's ShardWriter when installed), then the
    archive opened, pickled, listed, loaded by spawn workers and read at random."""
    here = str(Path(__file__).resolve().parent)
    lines = [f"scale: tiny files (64-512 random bytes, {SCALE_FOLDER_FILES} a folder), --reader bytes, "
             f"--compression {compression}, {workers} workers, {os.cpu_count()} cores",
             "| entries | writer | files/s | writer peak | H5Dataset() | folder target | pickled | ls to a pipe "
             "| worker adds | spawn, 2 workers, first batch | random reads/s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    wds = installed("webdataset")
    for n in entries:
        base = (keep or work_dir) / f"tiny-{n}"
        src = base / "src"
        made = 0.0 if (src / "0000").exists() else make_tiny_tree(src, n)
        print(f"scale: {n} files {'generated in %.1f s' % made if made else 'reused'} ({src})", file=sys.stderr)
        try:
            for layout in ("files", "packed"):
                dst = base / f"{layout}.h5"
                if dst.exists():
                    dst.unlink()
                conv = _scale_probe("convert", src=str(src), dst=str(dst), layout=layout, workers=workers,
                                    compression=compression)
                opened = _scale_probe("open", dst=str(dst))
                worker = _scale_probe("worker", dst=str(dst), here=here)
                reads = _scale_probe("reads", dst=str(dst), reads=SCALE_READS)
                lines.append(f"| {n:,} | {layout} | {conv['files_per_s']:,.0f} | {conv['writer_peak'] / 1e6:,.0f} MB "
                             f"| {opened['open_s']:.2f} s | {opened['open_folder_s']:.2f} s "
                             f"| {opened['pickled'] / 1e3:,.1f} kB | {opened['ls_s']:.2f} s "
                             f"| {worker['worker_added'] / 1e6:,.0f} MB | {worker['first_batch_s']:.2f} s "
                             f"(torch alone {worker['bare_first_batch_s']:.2f} s) "
                             f"| {reads['reads_per_s']:,.0f} (again {reads['reads_again_per_s']:,.0f}) |")
                print(lines[-1], file=sys.stderr)
                dst.unlink()
            if wds:
                shards = base / "wds"
                shards.mkdir(exist_ok=True)
                conv = _scale_probe("webdataset", src=str(src), dst=str(shards))
                lines.append(f"| {n:,} | WebDataset ShardWriter | {conv['files_per_s']:,.0f} "
                             f"| {conv['writer_peak'] / 1e6:,.0f} MB | | | | | | | |")
                remove(shards)
        finally:
            if keep is None:
                remove(base)
    if not wds:
        lines.append("WebDataset is not installed: its row is left out (pip install webdataset)")
    lines.append(f"generation of the trees is not included; {SCALE_READS:,} random reads in a fresh process each, "
                 "then the same reads again; torch alone: the same spawn DataLoader over a dataset that reads nothing")
    return "\n".join(lines)

def main(argv: Optional[Sequence[str]] = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    if args.scale:
        entries = [int(n) for n in args.scale.split(",")]
        args.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="data2h5-scale-", dir=args.work_dir)).resolve()
        try:
            print(run_scale(entries, work, args.workers, args.scale_compression, args.scale_trees))
        finally:
            remove(work)
        return 0
    if not installed("PIL"):
        print("benchmark.py: error: needs Pillow: pip install 'data2h5[bench]'", file=sys.stderr)
        return 2
    notes: List[str] = []
    if args.plot is not None and not installed("matplotlib"):
        print(f"benchmark.py: --plot needs matplotlib (pip install matplotlib); {args.plot} will not be written",
              file=sys.stderr)
        notes.append(f"--plot: matplotlib is not installed, so {args.plot} was not written (pip install matplotlib)")
        args.plot = None
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="data2h5-bench-", dir=args.work_dir)).resolve()
    keep = work / "corpus" if args.make_corpus is not None and args.keep_corpus else None
    try:
        source = prepare_source(args, work)
        out = work / "out"
        out.mkdir()
        plan = plan_conversions(source, notes, "conversion" in args.sections)
        loading = "loading" in args.sections and installed("torch")
        if "loading" in args.sections and not loading:
            notes.append("torch is not installed: the loading rows are left out (pip install torch)")
        cold = loading and not args.no_cold and drop_page_cache()
        if loading and not args.no_cold and not cold:
            notes.append("cold: not permitted (needs root to write /proc/sys/vm/drop_caches); warm page cache only")
        elif cold:
            notes.append("cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before each cold run; warm: every file "
                         "read once before the warm runs")
        rows: List[Row] = []
        with tqdm(total=planned_steps(args, plan, loading, cold), unit="run", file=sys.stderr) as bar:
            if "conversion" in args.sections:
                rows += run_conversions(plan, source, out, args.repeat, bar, notes)
            if "conversion" not in args.sections and (loading or "batch" in args.sections):
                ensure_archives(source, out, plan, LOADED_ARCHIVES if loading else ["stacked"], notes)
            if loading:
                rows += run_loading(source, out, args, cold, bar, notes)
            if "batch" in args.sections:
                rows += run_batch(out, args, bar, notes)
            if "decoding" in args.sections:
                rows += run_decoding(source, args, bar, notes)
            stacked = describe_stacked(out / "stacked.h5")
        notes += CONVERSION_NOTES if any(r.section == "conversion" for r in rows) else []
        notes += LOADING_NOTES if any(r.section == "loading" for r in rows) else []
        notes += BATCH_NOTES if any(r.section == "batch" for r in rows) else []
        add_figures(rows, source)
        if keep is not None:
            notes.append(f"corpus kept in {keep} (reuse it: --path-images {keep} --ext jpg)")
        result = {
            "command": "python benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": describe_machine(work),
            "source": {"description": source.description, "files": len(source.keys), "bytes": source.nbytes,
                       "images": source.images, "shapes": source.shapes},
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "samples": min(args.samples, len(source.keys)),
            "stacked": stacked,
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "wall_seconds": time.perf_counter() - started,
            "notes": notes,
            "rows": [asdict(r) for r in rows],
        }
        print(report(result, rows, source, args))
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if args.plot is not None:
            write_plot(args.plot, rows)
    finally:
        for item in work.iterdir():
            if item != keep:
                remove(item)
        if keep is None:
            work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
