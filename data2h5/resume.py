"""Resuming: what an interrupted conversion left beside its output, and reusing it.

:func:`previous_work` decides whether there is work to resume (and refuses to pass it over
silently, or to resume it with options that would make another archive); :func:`reuse`
copies what it safely holds into the new part, block by block, each checked against its
CRC-32, and says which files must still be read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .errors import OutputError
from .partial import BlockReader, InterruptedRun, Partial, differing_options, load_previous
from .walk import SourceFile

log = logging.getLogger(__name__)


@dataclass
class Reused:
    """What a resume took from the interrupted run, and the files left to read."""

    entries: int = 0
    bytes_in: int = 0
    bytes_decoded: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # still skipped, with their reasons
    todo: List[SourceFile] = field(default_factory=list)


def previous_work(partial: Partial, options: dict, resume: bool, overwrite: bool) -> Optional[InterruptedRun]:
    """What an interrupted conversion left, if it is to be resumed; refuses to pass it over
    silently, and to resume it with options that would make a different archive."""
    gens = [g for g in partial.generations() if partial.part(g).exists()]
    stale = [g for g in partial.generations() if g not in gens]
    partial.discard(stale)  # journals whose part became the archive: the run that wrote them finished
    if not gens:
        return None
    if not resume:
        if not overwrite:
            raise OutputError(
                f"an interrupted conversion into {partial.dst} was found ({partial.part(gens[-1]).name}); "
                "rerun with --resume to continue it, or with --overwrite to start over"
            )
        partial.discard()
        return None
    previous = load_previous(partial)
    if previous.header is None:
        log.warning("the interrupted conversion into %s left nothing reusable; starting over", partial.dst)
        partial.discard()
        return None
    differ = differing_options(previous.header, options)
    if differ:
        raise OutputError(
            f"cannot resume {partial.dst} with other options than the interrupted run's ({'; '.join(differ)}); "
            "rerun with its options, or with --overwrite to start over"
        )
    return previous


def reuse(run: InterruptedRun, files: List[SourceFile], writer, partial: Partial, layout) -> Reused:
    """Copy what ``run`` safely holds into ``writer`` (a :class:`data2h5.layouts.EntryWriter`,
    as its :class:`~data2h5.layouts.Layout` keeps entries), each block
    checked against its CRC-32; returns what was reused and the files still to read."""
    blocks = BlockReader(partial)
    reused = Reused()
    try:
        reused.todo = layout.reuse(run, files, writer, blocks, reused)
    finally:
        blocks.close()
    log.info("resume: %d of %d files reused", reused.entries, len(files))
    return reused
