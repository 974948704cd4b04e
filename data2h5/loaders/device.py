"""Torch and device handling for the batch reader: optional torch, pinned buffers, delivery.

torch is imported only when a reader asks for a device or pinned memory, so the reader (and
``import data2h5``) works without it.
"""
from __future__ import annotations

import warnings
from typing import Any, Tuple

import numpy as np


def torch_options(device: Any, pin_memory: bool) -> Tuple[Any, Any, bool]:
    """(torch module or None, torch.device or None, whether to pin) for the options given."""
    if device is None and not pin_memory:
        return None, None, False
    try:
        import torch
    except ImportError:
        raise ImportError(
            "BatchReader(device=..., pin_memory=...) needs torch: pip install 'data2h5[torch]'"
        ) from None
    dev = None if device is None else torch.device(device)
    pin = bool(pin_memory)
    if pin and not torch.cuda.is_available():
        warnings.warn("BatchReader(pin_memory=True): CUDA is not available, so memory is not pinned",
                      stacklevel=3)
        pin = False
    return torch, dev, pin


def alloc_buffer(shape, dtype: np.dtype, torch_mod, pin: bool) -> Tuple[np.ndarray, Any]:
    """A numpy array and, when torch is wanted and can hold the dtype, a tensor sharing it."""
    try:
        tdtype = torch_mod.from_numpy(np.empty(0, dtype)).dtype
    except (AttributeError, TypeError):  # no torch wanted, or a dtype torch has not (bytes)
        return np.empty(shape, dtype=dtype), None
    tensor = torch_mod.empty(shape, dtype=tdtype, pin_memory=pin)
    return tensor.numpy(), tensor


def deliver(value: Any, torch: Any, device: Any, pinned: bool, copy: bool) -> Any:
    """Move a batch array to the device and/or copy it out of the ring, as asked (``torch``
    is the module, or None when no tensors are wanted)."""
    if value is None:
        return None
    if torch is not None and isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        value = torch.from_numpy(value)
    if torch is not None and isinstance(value, torch.Tensor):
        if device is not None and value.device != device:
            value = value.to(device, non_blocking=pinned)
        elif copy:
            value = value.clone()
        return value
    return np.array(value, copy=True) if copy else value
