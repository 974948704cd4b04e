"""Cut a sorted list of source files into shards, and name the shard files.

A plan depends only on the sorted keys, their sizes and the shard size asked for, so the same
folder and options always give the same shards with the same names. Shards are contiguous
ranges of the key order: each shard holds a key range, and the shards in name order hold
every key in order.
"""
from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path
from typing import List, NamedTuple, Pattern, Sequence, Union

from .errors import ShardSizeError

BYTES = "bytes"
FILES = "files"
NAME_DIGITS = 5  # at least: 00000-of-00004; more only from 100000 shards on
ATTEMPT_TAG = ".data2h5-attempt-"

_BINARY = {"": None, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<prefix>[KMGT]?)\s*(?P<unit>I?B|FILES?)?", re.IGNORECASE)


class ShardSize(NamedTuple):
    """The most one shard may hold: ``limit`` source bytes (``unit == "bytes"``) or ``limit``
    files (``unit == "files"``)."""

    limit: int
    unit: str


class SourceEntry(NamedTuple):
    """One source file as the planner sees it: its key and its size in bytes."""

    key: str
    nbytes: int


class ShardPlan(NamedTuple):
    """One shard: the entries ``first:stop`` of the sorted list, written to ``name``."""

    index: int
    name: str  # the shard file's name, in OUT's folder
    first: int  # position of its first entry in the sorted list
    stop: int  # one past its last entry
    entries: int
    nbytes: int  # source bytes of its entries
    first_key: str
    last_key: str


def parse_shard_size(text: str, option: str = "--shard-size") -> ShardSize:
    """``"2G"`` → 2 GiB of source bytes per shard; ``"50000files"`` (or ``"50k files"``) → 50000
    files per shard.

    Byte sizes use binary prefixes and may end in ``B`` or ``iB`` (as ``--max-entry-size``);
    counts use decimal prefixes and end in ``file``/``files``. A bare number is refused: 50000
    bytes and 50000 files are both plausible and would give very different archives.
    """
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ShardSizeError(str(text), "not a size such as 2G or a count such as 50000files", option)
    prefix = match["prefix"].upper()
    unit = (match["unit"] or "").upper()
    if not unit and not prefix:
        raise ShardSizeError(text, f"give a unit: {match['number']}B for bytes or {match['number']}files for files",
                             option)
    number = float(match["number"])
    if unit.startswith("FILE"):
        if prefix == "T":
            raise ShardSizeError(text, "a count takes k, M or G, not T", option)
        limit = number * _DECIMAL[prefix]
        if limit != int(limit):
            raise ShardSizeError(text, "a count of files must be a whole number", option)
        kind = FILES
    else:
        limit = number * (_BINARY[prefix] or 1)
        kind = BYTES
    if int(limit) < 1:
        raise ShardSizeError(text, "must be at least 1 byte or 1 file", option)
    return ShardSize(int(limit), kind)


def plan_shards(entries: Sequence[SourceEntry], size: ShardSize, out: Union[str, os.PathLike]) -> List[ShardPlan]:
    """Cut ``entries`` (sorted by key, as :func:`data2h5.walk.walk` yields them) into
    contiguous shards of at most ``size``, named beside ``out``.

    Each shard takes entries in order until the next one would pass the limit; a file larger
    than a byte limit gets a shard of its own. No entries give no shards. Raises
    ``ValueError`` if the keys are not strictly increasing (the plan would not be stable).
    """
    if size.unit not in (BYTES, FILES) or size.limit < 1:
        raise ValueError(f"not a shard size: {size!r}")
    for before, after in zip(entries, entries[1:]):
        if not before.key < after.key:
            raise ValueError(f"keys are not sorted and unique: {before.key!r} then {after.key!r}")
    ranges = []  # (first, stop, nbytes)
    first, held, nbytes = 0, 0, 0
    for pos, entry in enumerate(entries):
        if entry.nbytes < 0:
            raise ValueError(f"{entry.key!r}: negative size {entry.nbytes}")
        cost = entry.nbytes if size.unit == BYTES else 1
        if held and held + cost > size.limit:
            ranges.append((first, pos, nbytes))
            first, held, nbytes = pos, 0, 0
        held += cost
        nbytes += entry.nbytes
    if entries:
        ranges.append((first, len(entries), nbytes))
    count = len(ranges)
    return [
        ShardPlan(i, shard_name(out, i, count), a, b, b - a, n, entries[a].key, entries[b - 1].key)
        for i, (a, b, n) in enumerate(ranges)
    ]


def shard_name(out: Union[str, os.PathLike], index: int, count: int) -> str:
    """The file name of shard ``index`` of ``count`` beside ``out``: ``train.h5`` →
    ``train-00003-of-00008.h5``. The count is part of the name, so shards of different plans
    never mix."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    path = Path(out)
    digits = max(NAME_DIGITS, len(str(count - 1)))
    return f"{path.stem}-{index:0{digits}d}-of-{count:0{digits}d}{path.suffix}"


def shard_path(out: Union[str, os.PathLike], index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` lies: in ``out``'s folder."""
    return Path(out).with_name(shard_name(out, index, count))


def shard_name_pattern(out: Union[str, os.PathLike]) -> Pattern[str]:
    """Matches the names of ``out``'s shards of any count (e.g. to keep them out of a walk
    of the source folder, or to find those of an earlier plan)."""
    path = Path(out)
    return re.compile(re.escape(path.stem) + r"-(\d{5,})-of-(\d{5,})" + re.escape(path.suffix))


def attempt_path(final: Union[str, os.PathLike]) -> Path:
    """A temporary name beside ``final`` that no other attempt uses, on any machine: a task
    writes there, syncs and renames onto ``final``, so a re-run of the task (after its worker
    was lost) never writes into a file that another attempt still holds."""
    final = Path(final)
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return final.with_name(f".{final.name}{ATTEMPT_TAG}{tag}")


def attempt_files(final: Union[str, os.PathLike]) -> List[Path]:
    """The temporary files that attempts at ``final`` left (those of killed attempts stay),
    with the part files of the archives written under an attempt's name (``.`` + its name)."""
    final = Path(final)
    head = f".{final.name}{ATTEMPT_TAG}"
    try:
        names = os.listdir(final.parent)
    except FileNotFoundError:
        return []
    return sorted(final.parent / n for n in names if n.startswith(head) or n.startswith("." + head))
