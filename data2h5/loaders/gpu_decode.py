"""Batched JPEG decoding on a CUDA device (nvJPEG, through ``torchvision.io.decode_jpeg``).

For a ``--reader bytes`` archive of JPEGs: the DataLoader workers read each entry's file bytes
(``H5Dataset(..., decode=False)``) and :func:`collate_jpeg_bytes` keeps them as a list of
uint8 tensors; the main process then decodes a whole batch at once on the GPU with
:class:`JpegBatchDecoder` (CUDA cannot be used in forked workers, so decoding happens there)::

    dataset = H5Dataset("train.h5", decode=False, target="folder")
    loader = DataLoader(dataset, batch_size=256, num_workers=4, collate_fn=collate_jpeg_bytes)
    decode = JpegBatchDecoder("cuda")
    for batch in loader:
        images = decode(batch.images)  # uint8 CHW tensors on the GPU
        targets = batch.fields[0].cuda()

nvJPEG's arrays are close to, not bit-identical with, the CPU decoders' (another IDCT and
upsampling). Every header is checked before decoding, so that a hostile entry cannot make the
device allocate more than ``max_entry_bytes``. torch and torchvision are imported only here,
when this module is used (``pip install torchvision``, built for the installed torch).
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Sequence, Tuple

import numpy as np

from ..errors import Data2H5Error, ReadError, SizeLimitError
from ..jpeg import Header, read_header
from ..safety import MAX_ENTRY_BYTES

INSTALL_HINT = "pip install torchvision (the build made for your torch, with CUDA for device='cuda')"
MODES = ("RGB", "GRAY", "UNCHANGED")


class DecoderUnavailable(Data2H5Error, ImportError):
    """Batched JPEG decoding was asked for, but ``missing`` (torchvision, or a CUDA device) is not there."""

    def __init__(self, missing: str, hint: str):
        self.missing, self.hint = missing, hint
        super().__init__(f"JpegBatchDecoder needs {missing}: {hint}")

    def __reduce__(self):
        return type(self), (self.missing, self.hint)


class JpegBatch(NamedTuple):
    """A collated batch of JPEG bytes: ``images``, one 1-D uint8 tensor of file bytes per
    sample; ``fields``, the rest of each sample (targets, keys) collated as the DataLoader
    would (empty when the dataset returns the bytes alone)."""

    images: List[Any]
    fields: Tuple[Any, ...]


def collate_jpeg_bytes(samples: Sequence[Any]) -> JpegBatch:
    """DataLoader ``collate_fn`` for ``H5Dataset(..., decode=False)``: the file bytes stay a
    list (they differ in length), the other fields go through torch's default collate."""
    import torch
    from torch.utils.data import default_collate

    tuples = isinstance(samples[0], tuple)
    images = [torch.from_numpy(np.ascontiguousarray(s[0] if tuples else s, dtype=np.uint8)) for s in samples]
    fields = tuple(default_collate([s[1:] for s in samples])) if tuples and len(samples[0]) > 1 else ()
    return JpegBatch(images, fields)


def check_batch(images: Sequence[Any], max_entry_bytes: int = MAX_ENTRY_BYTES) -> List[Header]:
    """The frame header of every JPEG in ``images`` (uint8 arrays or tensors of file bytes),
    read without decoding; :class:`ReadError` for one that is not a JPEG, and
    :class:`SizeLimitError` for one whose decoded samples would exceed ``max_entry_bytes``."""
    headers = []
    for i, image in enumerate(images):
        raw = np.asarray(image, dtype=np.uint8).tobytes()
        header = read_header(raw)
        if header is None:
            raise ReadError(f"batch item {i}", "not a JPEG, or cut before its frame header (nvJPEG decodes JPEGs only)")
        if header.nbytes() > max_entry_bytes:
            raise SizeLimitError(f"batch item {i}", f"a {header.height}×{header.width} JPEG",
                                 header.nbytes(), max_entry_bytes)
        headers.append(header)
    return headers


class JpegBatchDecoder:
    """Decode a batch of JPEG file bytes in one call on ``device`` (nvJPEG on CUDA; on the
    CPU, torchvision's libjpeg-turbo). ``mode``: ``"RGB"`` (default), ``"GRAY"`` or
    ``"UNCHANGED"``. Raises :class:`DecoderUnavailable` at construction, in one line with
    what to install, when torchvision or the CUDA device is missing."""

    def __init__(self, device: Any = "cuda", mode: str = "RGB", max_entry_bytes: int = MAX_ENTRY_BYTES):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        try:
            import torch
        except ImportError:
            raise DecoderUnavailable("torch", "pip install 'data2h5[torch]' torchvision") from None
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DecoderUnavailable("a CUDA device", "none is visible to torch "
                                     f"{torch.__version__}; use device='cpu', or a CUDA build of torch and torchvision")
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            raise DecoderUnavailable("torchvision", INSTALL_HINT) from None
        except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch fails as it loads its ops
            reason = " ".join(str(exc).split())
            raise DecoderUnavailable("a torchvision that loads", f"{INSTALL_HINT}; this one fails: {reason}") from None
        self._decode = decode_jpeg
        self.mode = getattr(ImageReadMode, mode)
        self.max_entry_bytes = max_entry_bytes

    def __call__(self, images: Sequence[Any]) -> List[Any]:
        """``images`` (a :class:`JpegBatch`'s, or any uint8 arrays or CPU tensors of file bytes)
        decoded to uint8 CHW tensors on the device, in order."""
        import torch

        check_batch(images, self.max_entry_bytes)
        tensors = [image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image, np.uint8))
                   for image in images]
        return list(self._decode(tensors, mode=self.mode, device=self.device))

    def __repr__(self) -> str:
        return f"JpegBatchDecoder(device={str(self.device)!r}, mode={self.mode.name!r})"
