"""Resuming: what an interrupted conversion left beside its output, and reusing it.

:func:`previous_work` decides whether there is work to resume (and refuses to pass it over
silently, or to resume it with options that would make another archive); :func:`reuse`
copies what it safely holds into the new part, block by block, each checked against its
CRC-32, and says which files must still be read.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .errors import OutputError
from .partial import BlockReader, Partial, Previous, differing_options, load_previous, unchanged
from .walk import SourceFile
from .writer import JournalEntry, unjournal

log = logging.getLogger(__name__)


@dataclass
class Reused:
    """What a resume took from the interrupted run, and the files left to read."""

    entries: int = 0
    bytes_in: int = 0
    bytes_decoded: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # still skipped, with their reasons
    todo: List[SourceFile] = field(default_factory=list)


def previous_work(partial: Partial, options: dict, resume: bool, overwrite: bool) -> Optional[Previous]:
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


def reuse(previous: Previous, files: List[SourceFile], writer, partial: Partial, stacked: bool) -> Reused:
    """Copy what ``previous`` safely holds into ``writer``, each block checked against its
    CRC-32; returns what was reused and the files still to read."""
    blocks = BlockReader(partial)
    reused = Reused()
    try:
        if stacked:
            reused.todo = _reuse_chunks(previous, files, writer, blocks, reused)
        else:
            reused.todo = _reuse_entries(previous, files, writer, blocks, reused)
    finally:
        blocks.close()
    log.info("resume: %d of %d files reused", reused.entries, len(files))
    return reused


def _reuse_entries(previous: Previous, files: List[SourceFile], writer, blocks: BlockReader,
                   reused: Reused) -> List[SourceFile]:
    todo = []
    for src in files:
        hit = previous.entries.get(src.key)
        packed = None
        if hit is not None:
            gen, row = hit
            entry = JournalEntry(*row)
            if unchanged(src.path, entry.size, entry.mtime_ns):
                packed = unjournal(entry, lambda addr, n, gen=gen: blocks.read(gen, addr, n))
                if packed is None:
                    log.info("%s: its stored bytes in the interrupted run do not check out; reading it again", src.key)
        if packed is None:
            todo.append(src)
            continue
        writer.add(packed)
        reused.entries += 1
        reused.bytes_in += packed.size
        reused.bytes_decoded += packed.nbytes
    return todo


def _reuse_chunks(previous: Previous, files: List[SourceFile], writer, blocks: BlockReader,
                  reused: Reused) -> List[SourceFile]:
    """Stacked: reuse the longest run of chunks whose rows are still the first files, in
    order and unchanged (rows are positional, so reuse stops at the first difference)."""
    if previous.stacked is None:
        return files
    dtype, shape, rows_per_chunk = previous.stacked
    writer.start(dtype, shape, rows_per_chunk)
    pos = 0
    for gen, chunk, rows, skipped in previous.chunks:
        start, addr, size, mask, crc = chunk
        end = _match_rows(files, pos, rows, skipped)
        if start != len(writer) or end is None:
            break
        if len(rows) < rows_per_chunk and end != len(files):  # a last, partial chunk: only at the end
            break
        data = blocks.read(gen, addr, size)
        if data is None or zlib.crc32(data) != crc:
            log.info("chunk at row %d of the interrupted run does not check out; reading from there again", start)
            break
        writer.put_chunk(data, mask, crc, rows, skipped)
        reused.skipped.extend((key, reason) for key, reason in skipped)
        reused.entries += len(rows)
        reused.bytes_in += sum(r[1] for r in rows)
        reused.bytes_decoded += len(rows) * int(np.prod(shape)) * np.dtype(dtype).itemsize
        pos = end
    return files[pos:]


def _match_rows(files: List[SourceFile], pos: int, rows: list, skipped: list) -> Optional[int]:
    """Where ``files[pos:]`` ends after the chunk's rows and skipped files (interleaved in walk
    order), or None if they are not the next files or a row's source changed."""
    want_rows = {r[0]: r for r in rows}
    want_skipped = {key for key, _ in skipped}
    left = len(rows) + len(skipped)
    while left:
        if pos >= len(files):
            return None
        src = files[pos]
        row = want_rows.get(src.key)
        if row is not None:
            if not unchanged(src.path, row[1], row[3]):
                return None
        elif src.key not in want_skipped:
            return None
        pos += 1
        left -= 1
    return pos
