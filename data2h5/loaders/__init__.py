"""Loading for training: the map-style :class:`H5Dataset`, the prefetching
:class:`BatchReader`, and rank-aware, deterministic, resumable samplers.

Re-exported lazily: ``H5Dataset`` and ``RankSampler`` import torch when it is installed, and
importing this package, or :mod:`data2h5.loaders.batch_reader` without a device, never does.
"""
_EXPORTS = {
    "H5Dataset": ".dataset",
    "BatchReader": ".batch_reader",
    "ReaderState": ".plan",
    "RankSampler": ".sampler",
    "SamplerState": ".sampler",
    "resolve_rank": ".ranks",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data2h5.loaders' has no attribute {name!r}")


__all__ = list(_EXPORTS)
