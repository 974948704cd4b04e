"""The source folder: checking it, loading the prune, and walking it for the files to store.

Conversion and verification select source files the same way, through :func:`collect`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

from . import format as fmt
from .errors import PluginError, SourceError
from .plugins import Plugin, PluginSpec, load
from .prune import keeps, match_extension
from .walk import SourceFiles, walk

DEFAULT_PRUNE = "ext"


def check_folder(src: Path, hint: str) -> None:
    """Raise :class:`SourceError` when ``src`` is missing or not a folder; ``hint`` says which
    folder to give (``give the folder holding your files``)."""
    if not src.exists():
        raise SourceError(f"{src} does not exist; {hint}")
    if not src.is_dir():
        raise SourceError(f"{src} is not a folder; {hint}")


def load_prune(spec: Optional[PluginSpec]) -> Plugin:
    """The prune plugin ``spec`` names, or the extension match when it is None."""
    return load(spec if spec is not None else DEFAULT_PRUNE, "prune", {DEFAULT_PRUNE: match_extension})


def collect(
    src: Path,
    exts: Tuple[str, ...],
    prune: Plugin,
    *,
    follow_symlinks: bool = False,
    exclude: Iterable[Path] = (),
) -> Tuple[SourceFiles, List[Tuple[str, str]]]:
    """Walk ``src`` and keep what ``prune`` accepts; returns (files, unusable names with reasons)."""
    bad: List[Tuple[str, str]] = []
    root = os.path.join(os.path.abspath(src), "")

    def kept() -> Iterator[str]:
        for f in walk(str(src), follow_symlinks=follow_symlinks, exclude=[str(p) for p in exclude]):
            try:
                keep = keeps(prune.func, f.name, exts)
            except Exception as exc:
                raise PluginError(f"prune plugin {prune.spec!r} failed on {f.path}: {type(exc).__name__}: {exc}") from exc
            if not keep:
                continue
            problem = f.key_problem()
            if problem is None and (f.key == fmt.INDEX_GROUP or f.key.startswith(fmt.INDEX_GROUP + "/")):
                problem = f"the name {fmt.INDEX_GROUP} is reserved for the archive's index; rename it"
            if problem:
                bad.append((f.shown_key, problem))
            else:
                yield f.key

    files = SourceFiles.of(root, kept())  # packed as the walk goes: no list of a million strings
    return files, bad
