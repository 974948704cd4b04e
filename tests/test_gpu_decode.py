"""Batched JPEG decoding through torchvision: JPEG bytes collated in real DataLoader workers
from a bytes archive, headers checked before anything is decoded, a one-line error naming what
is missing, and the decode itself on the CPU and, where there is one, on a CUDA device."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data2h5
from conftest import photo_like
from data2h5.errors import ReadError, SizeLimitError

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from data2h5.loaders.gpu_decode import (  # noqa: E402
    DecoderUnavailable,
    JpegBatch,
    JpegBatchDecoder,
    check_batch,
    collate_jpeg_bytes,
)

SHAPES = [(48, 64), (40, 40), (33, 57), (64, 48), (24, 80), (56, 56)]  # (height, width), odd ones included


def torchvision_reason() -> str:
    """Why torchvision cannot decode here ('' when it can): missing, or built for another torch."""
    try:
        JpegBatchDecoder("cpu")
    except DecoderUnavailable as exc:
        return str(exc)
    return ""


NO_TORCHVISION = torchvision_reason()


@pytest.fixture
def archive(tmp_path: Path):
    """A bytes archive of RGB JPEGs in two class folders: (path, {key: file bytes})."""
    src = tmp_path / "src"
    files = {}
    for i, (h, w) in enumerate(SHAPES):
        buf = io.BytesIO()
        Image.fromarray(photo_like(np.random.default_rng(i), h, w)).save(buf, "JPEG", quality=90)
        key = f"class_{i % 2}/img_{i}.jpg"
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(buf.getvalue())
        files[key] = buf.getvalue()
    out = tmp_path / "bytes.h5"
    data2h5.convert(src, out, ext="jpg", reader="bytes", workers=1)
    return out, files


def test_collate_keeps_each_files_bytes_in_workers_and_collates_the_rest(archive):
    path, files = archive
    dataset = data2h5.H5Dataset(path, decode=False, target="folder", return_key=True)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_jpeg_bytes)
    seen = {}
    for batch in loader:
        assert isinstance(batch, JpegBatch)
        targets, keys = batch.fields
        assert targets.dtype == torch.int64 and len(keys) == len(batch.images) == len(targets)
        for image, target, key in zip(batch.images, targets.tolist(), keys):
            assert image.dtype == torch.uint8 and image.ndim == 1
            assert target == int(key.split("/")[0][-1])
            seen[key] = image.numpy().tobytes()
    assert seen == files  # every file, byte for byte


def test_collate_of_bytes_alone_has_no_fields(archive):
    path, files = archive
    batch = collate_jpeg_bytes([data2h5.H5Dataset(path, decode=False)[i] for i in range(3)])
    assert batch.fields == () and len(batch.images) == 3


def test_headers_are_checked_before_decoding(archive):
    _, files = archive
    raws = [np.frombuffer(raw, np.uint8) for raw in files.values()]
    assert [(h.height, h.width) for h in check_batch(raws)] == SHAPES
    first = files["class_0/img_0.jpg"]
    at = first.index(b"\xff\xc0") + 5
    huge = first[:at] + (4000).to_bytes(2, "big") + (4000).to_bytes(2, "big") + first[at + 4 :]
    with pytest.raises(SizeLimitError) as caught:
        check_batch([raws[0], np.frombuffer(huge, np.uint8)], max_entry_bytes=1 << 20)
    assert (caught.value.path, caught.value.size, caught.value.limit) == ("batch item 1", 4000 * 4000 * 3, 1 << 20)
    with pytest.raises(ReadError, match=r"^batch item 0: not a JPEG"):
        check_batch([np.frombuffer(b"\x89PNG\r\n\x1a\n" + bytes(40), np.uint8)])


def test_missing_torchvision_is_one_line_with_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with pytest.raises(DecoderUnavailable) as caught:
        JpegBatchDecoder("cpu")
    assert caught.value.missing == "torchvision"
    assert str(caught.value) == ("JpegBatchDecoder needs torchvision: pip install torchvision (the build made for "
                                 "your torch, with CUDA for device='cuda')")
    assert isinstance(caught.value, ImportError) and "\n" not in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_missing_cuda_device_is_one_line_naming_the_cpu_alternative():
    with pytest.raises(DecoderUnavailable, match=r"^JpegBatchDecoder needs a CUDA device: none is visible to torch "
                                                 r".*; use device='cpu'") as caught:
        JpegBatchDecoder("cuda")
    assert caught.value.missing == "a CUDA device"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of RGB, GRAY, UNCHANGED, not 'BGR'"):
        JpegBatchDecoder("cpu", mode="BGR")


def decode_and_compare(archive, device: str) -> None:
    path, files = archive
    loader = DataLoader(data2h5.H5Dataset(path, decode=False, return_key=True), batch_size=6, num_workers=2,
                        collate_fn=collate_jpeg_bytes)
    decoder = JpegBatchDecoder(device)
    (batch,) = list(loader)
    decoded = decoder(batch.images)
    reference = data2h5.H5Dataset(path, return_key=True)  # data2h5's CPU path: imageio's arrays
    expected = {key: arr for arr, key in reference}
    for image, key in zip(decoded, batch.fields[0]):
        assert image.device.type == device and image.dtype == torch.uint8
        want = expected[key]
        assert tuple(image.shape) == (3,) + want.shape[:2]
        diff = np.abs(image.cpu().permute(1, 2, 0).numpy().astype(np.int16) - want.astype(np.int16))
        assert diff.mean() < 2.0  # another IDCT and upsampling may differ by a level or two


@pytest.mark.skipif(bool(NO_TORCHVISION), reason=NO_TORCHVISION or "torchvision decodes")
def test_batch_decodes_on_the_cpu_to_data2h5s_arrays(archive):
    decode_and_compare(archive, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batch_decodes_on_the_gpu_to_data2h5s_arrays(archive):
    if NO_TORCHVISION:
        pytest.skip(NO_TORCHVISION)
    decode_and_compare(archive, "cuda")
