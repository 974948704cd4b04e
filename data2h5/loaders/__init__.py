"""Loading for training: rank-aware, deterministic, resumable samplers.

Re-exported lazily, so that importing :mod:`data2h5.loaders.ranks` (as ``BatchReader``
does) never imports torch.
"""
_EXPORTS = {
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
