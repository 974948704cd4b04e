"""benchmark.py end to end on tiny inputs, so that it never rots: every row in the markdown
tables and in the JSON with positive figures, the temporary corpus removed (or kept), --plot."""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from conftest import photo_like

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmark.py"
HAS_SIMPLEJPEG = importlib.util.find_spec("simplejpeg") is not None  # its rows against Pillow alone
HAS_DISTRIBUTED = importlib.util.find_spec("distributed") is not None
CONVERSIONS = ({"naive", "original", "limit", "data2h5", "bytes", "bytes_packed", "stacked", "sharded"}
               | ({"data2h5_pillow"} if HAS_SIMPLEJPEG else set()) | ({"sharded_dask"} if HAS_DISTRIBUTED else set()))
LOADERS = ({"loose", "h5dataset", "h5dataset_bytes", "h5dataset_bytes_half", "h5dataset_packed", "h5dataset_packed_half",
            "lazy_h5py", "batch_reader"}
           | ({"h5dataset_bytes_pillow"} if HAS_SIMPLEJPEG else set()))
BATCH_ROWS = {"h5py_loop", "reader_sequential", "reader_shuffled", "reader_rank0_of_2", "sampler_overhead", "h5py_fancy",
              "overlap_h5py_loop", "overlap_reader_sequential", "overlap_reader_shuffled"}
HAS_WEBDATASET = importlib.util.find_spec("webdataset") is not None
HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None  # --corpus real: its photos
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_benchmark(work: Path, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--work-dir", str(work), "--repeat", "1", *map(str, args)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def table_labels(stdout: str) -> list:
    """First cell of every markdown table row (headers and separators left out)."""
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [row.split(" | ")[0][2:] for row in rows
            if not row.startswith(("| conversion |", "| loader |", "| batch reading |", "| decoder |"))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One full run on 24 generated JPEGs: (process, JSON, folder holding its outputs)."""
    tmp = tmp_path_factory.mktemp("bench")
    proc = run_benchmark(tmp / "work", "--make-corpus", 24, "--workers", 2, "--samples", 16, "--batch-size", 8,
                         "--json", tmp / "out.json", "--plot", tmp / "out.png")
    return proc, json.loads((tmp / "out.json").read_text()), tmp


def rows_of(data: dict, section: str) -> list:
    return [row for row in data["rows"] if row["section"] == section]


def test_every_conversion_row_is_in_the_table_and_the_json(tiny):
    proc, data, _ = tiny
    rows = {row["key"]: row for row in rows_of(data, "conversion")}
    assert set(rows) == CONVERSIONS | ({"webdataset"} if HAS_WEBDATASET else set())
    labels = table_labels(proc.stdout)
    for row in rows.values():
        assert row["label"] in labels
        assert row["items"] == 24 and len(row["times"]) == 1
        fig = row["figures"]
        assert fig["per_s"] > 0 and fig["mb_per_s"] > 0 and fig["peak_rss_main_mb"] > 0
        assert fig["x_limit"] > 0 and fig["x_data2h5"] > 0
        if row["key"] != "limit":  # the limit writes nothing
            assert fig["output_mb"] > 0 and fig["x_source"] > 0
    assert rows["limit"]["figures"]["x_limit"] == pytest.approx(1.0)
    assert rows["data2h5"]["figures"]["x_data2h5"] == pytest.approx(1.0)
    assert "peak_rss_worker_mb" not in rows["naive"]["figures"]  # one process, no pool
    assert rows["original"]["figures"]["peak_rss_worker_mb"] > 0
    # the corpus has several shapes: the stacked row goes through the resizing reader and says so
    assert "resized to 224×224 by a reader" in rows["stacked"]["label"]
    if not HAS_WEBDATASET:
        assert "webdataset is not installed" in proc.stdout


def test_every_loading_row_is_in_the_table_and_the_json(tiny):
    pytest.importorskip("torch")
    proc, data, _ = tiny
    rows = rows_of(data, "loading")
    assert {row["key"] for row in rows} == LOADERS
    regimes = {(row["extra"]["cache"], row["extra"]["order"]) for row in rows}
    cold = ("cold", "sequential") in regimes
    assert regimes == {(c, o) for c in (("warm", "cold") if cold else ("warm",)) for o in ("sequential", "shuffled")}
    assert cold or "cold: not permitted (needs root" in proc.stdout
    assert len(rows) == len(LOADERS) * len(regimes)
    # batches are stacked tensors cropped to the smallest shape (the corpus's 256×192 and 200×300: 192×200)
    assert "uint8 HWC tensor (torch.from_numpy, no copy) centre-cropped to 192×200" in proc.stdout
    assert "decode_size=(96, 100): half the smallest photo's height and width" in proc.stdout
    assert "nvJPEG row: " in proc.stdout  # run where CUDA and torchvision are, else the reason it is not
    labels = table_labels(proc.stdout)
    for row in rows:
        assert row["label"] in labels
        assert row["items"] == 16 and row["figures"]["per_s"] > 0 and row["figures"]["x_loose"] > 0
        if row["key"] == "loose":
            assert row["figures"]["x_loose"] == pytest.approx(1.0)
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| loader |"))
    assert "warm sequential" in header and "warm shuffled" in header


def test_every_decoding_row_is_in_the_table_and_the_json(tiny):
    """The decoders' own gap, one core: Pillow as ImageFolder uses it, data2h5 at full size
    and at decode_size."""
    proc, data, _ = tiny
    rows = {row["key"]: row for row in rows_of(data, "decoding")}
    assert set(rows) == {"pillow", "data2h5", "data2h5_half"}
    labels = table_labels(proc.stdout)
    for row in rows.values():
        assert row["label"] in labels and row["items"] == 16
        assert row["figures"]["us_each"] > 0 and row["figures"]["x_pillow"] > 0
    assert rows["pillow"]["figures"]["x_pillow"] == pytest.approx(1.0)
    assert "decode_size=(96, 100)" in rows["data2h5_half"]["label"]


def test_every_batch_row_is_in_the_table_and_the_json(tiny):
    proc, data, _ = tiny
    rows = {row["key"]: row for row in rows_of(data, "batch")}
    assert set(rows) == BATCH_ROWS
    labels = table_labels(proc.stdout)
    assert "### Batches: BatchReader over the stacked archive (24 rows of 224×224×3 uint8" in proc.stdout
    # 24 rows in batches of 8: the whole epoch, but fancy indexing reads only 2 batches, and rank 0
    # of 2 its 12 rows (two chunks of 6) in 2; the sampler row hands out 500,000 indices
    items = {"h5py_fancy": (16, 2), "reader_rank0_of_2": (12, 2), "sampler_overhead": (500_000, 1)}
    for key, row in rows.items():
        assert row["label"] in labels
        assert (row["items"], row["extra"]["batches"]) == items.get(key, (24, 3)) and len(row["times"]) == 1
        assert row["figures"]["per_s"] > 0
        if key != "sampler_overhead":
            assert row["figures"]["batch_ms"] > 0
    assert rows["reader_rank0_of_2"]["figures"]["x_half_one_rank"] > 0
    assert 0 < rows["sampler_overhead"]["figures"]["us_per_sample"] < 5
    for key in ("reader_sequential", "reader_shuffled", "h5py_fancy"):
        assert rows[key]["figures"]["x_h5py_loop"] > 0
    assert rows["reader_shuffled"]["figures"]["x_sequential"] > 0
    # the step defaults to the h5py loop's read time per batch in the first round
    step = rows["h5py_loop"]["times"][0] / 3 * 1e3
    for plain in ("h5py_loop", "reader_sequential", "reader_shuffled"):
        fig = rows["overlap_" + plain]["figures"]
        assert fig["step_ms"] == pytest.approx(step)
        assert fig["read_ms"] == pytest.approx(rows[plain]["figures"]["batch_ms"])
        assert fig["overlap"] > 0
    # reading, then sleeping T ≈ R, takes about T + R: the plain loop cannot score near 1
    assert rows["overlap_h5py_loop"]["figures"]["overlap"] > 1.3
    assert "overlap: each batch is followed by time.sleep(T)" in proc.stdout


def test_batch_section_without_a_stacked_archive_is_left_out_with_a_note(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "benchmark", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    from tqdm import tqdm

    notes: list = []
    args = SimpleNamespace(repeat=2, batch_size=8, batches=10, step_ms=None)
    with tqdm(total=bench.batch_steps(2), disable=True) as bar:
        assert bench.run_batch(tmp_path, args, bar, notes) == []
        assert bar.total == 0
    assert notes == ["batch: the stacked archive is missing (its conversion failed), so the batch section is left out"]


@pytest.mark.skipif(not HAS_SKIMAGE, reason="scikit-image (its photos) is not installed")
def test_real_corpus_is_crops_of_real_photos_in_the_corpus_shapes(tmp_path):
    from PIL import Image

    proc = run_benchmark(tmp_path, "--make-corpus", 12, "--corpus", "real", "--keep-corpus", "--only", "conversion")
    (kept,) = tmp_path.iterdir()
    files = sorted((kept / "corpus").rglob("*.jpg"))
    assert len(files) == 12
    sizes = {Image.open(f).size for f in files}
    assert len(sizes) == 12 and all(192 <= min(size) and max(size) <= 480 for size in sizes)  # the 12 corpus shapes
    # a photo, not a generated pattern: crops of different photos differ, none is flat
    arrays = [np.asarray(Image.open(f).convert("L"), np.float32) for f in files]
    assert all(a.std() > 5 for a in arrays)
    assert "12 crops of 9 real photos (scikit-image" in proc.stdout


def test_real_corpus_needs_make_corpus(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--path-images", str(tmp_path), "--corpus", "real"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--corpus real goes with --make-corpus N" in proc.stderr


def test_list_collate_keeps_every_loading_row(tmp_path):
    pytest.importorskip("torch")
    proc = run_benchmark(tmp_path, "--make-corpus", 12, "--only", "loading", "--collate", "list", "--workers", 1,
                         "--samples", 8, "--batch-size", 4, "--no-cold", "--json", tmp_path / "out.json")
    rows = rows_of(json.loads((tmp_path / "out.json").read_text()), "loading")
    assert {row["key"] for row in rows} == LOADERS
    assert all(row["items"] == 8 for row in rows)
    assert "centre-cropped" not in proc.stdout


def test_machine_and_method_are_described(tiny):
    proc, data, _ = tiny
    for key in ("cores", "memory", "python", "numpy", "h5py", "HDF5", "torch", "os"):
        assert data["machine"][key]
    first = proc.stdout.split("###")[0]
    for word in ("cores", "Python", "h5py", "HDF5", "Median of 1 run", "warm-up"):
        assert word in first


def test_plot_is_written_or_its_absence_explained(tiny):
    proc, _, tmp = tiny
    if HAS_MATPLOTLIB:
        assert (tmp / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (tmp / "out.png").exists()
        assert "--plot needs matplotlib" in proc.stderr


def test_generated_corpus_and_outputs_are_removed(tiny):
    _, _, tmp = tiny
    assert list((tmp / "work").iterdir()) == []


def test_keep_corpus_keeps_only_the_corpus(tmp_path):
    proc = run_benchmark(tmp_path, "--make-corpus", 6, "--keep-corpus", "--only", "conversion")
    (kept,) = tmp_path.iterdir()
    assert [p.name for p in kept.iterdir()] == ["corpus"]
    assert len(list((kept / "corpus").rglob("*.jpg"))) == 6
    assert f"corpus kept in {kept / 'corpus'}" in proc.stdout
    assert "### Conversion" in proc.stdout and "### Batches" not in proc.stdout and "### Loading" not in proc.stdout


def test_own_folder_of_one_shape_is_stacked_as_it_is_and_left_untouched(tmp_path):
    src = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for i in range(6):
        (src / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        iio.imwrite(src / f"class_{i % 2}" / f"{i}.png", photo_like(rng, 20, 30))
    before = {p: p.read_bytes() for p in src.rglob("*")if p.is_file()}
    proc = run_benchmark(tmp_path / "work", "--path-images", src, "--ext", "png", "--only", "conversion",
                         "--only", "batch", "--batch-size", 4, "--step-ms", 1)
    assert "| data2h5 --layout stacked |" in proc.stdout  # one shape: no resizing reader
    # the batch rows read that archive as it is: 6 rows of 20×30×3, a 1 ms step as asked
    assert "### Batches: BatchReader over the stacked archive (6 rows of 20×30×3 uint8" in proc.stdout
    assert "| overlap: BatchReader shuffled + 1.0 ms step per batch |" in proc.stdout
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert list((tmp_path / "work").iterdir()) == []
