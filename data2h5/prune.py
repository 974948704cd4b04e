"""Decide which files are kept: the extension match by default, or the user's own prune."""
from __future__ import annotations

from typing import Callable, Iterable, Tuple

Prune = Callable[[str, str], bool]


def normalize_extensions(exts: Iterable[str]) -> Tuple[str, ...]:
    """``["JPG", ".png", "jpg"]`` → ``(".jpg", ".png")``: lowercase, leading dot, no repeats."""
    out = []
    for ext in exts:
        for part in str(ext).split(","):
            part = part.strip().lower()
            if not part:
                continue
            part = part if part.startswith(".") else "." + part
            if part not in out:
                out.append(part)
    return tuple(out)


def match_extension(filename: str, ext: str) -> bool:
    """The default prune: does ``filename`` end with ``ext`` (case-insensitive)?"""
    return filename.lower().endswith(ext.lower())


def keeps(prune: Prune, filename: str, exts: Tuple[str, ...]) -> bool:
    """Whether ``prune`` keeps ``filename`` for any of ``exts`` (or for ``""`` when none given)."""
    return any(prune(filename, ext) for ext in (exts or ("",)))
