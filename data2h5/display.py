"""How runs show themselves: sizes in words, exceptions on one line, log records with their
controls escaped, progress bars."""
from __future__ import annotations

import logging
import sys
from typing import Optional

from .text import escape, escape_lines


def decimal_size(n: float) -> str:
    """``12.3 MB``: a size in the decimal units of summaries."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            break
    return f"{n:.1f} {unit}"


def one_line(exc: BaseException) -> str:
    """An exception's message on one line and escaped (a KeyError's without the quotes
    ``str`` adds; the type's name when there is no message)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return escape(" ".join(str(text).split())) or type(exc).__name__


class EscapingFormatter(logging.Formatter):
    """A log formatter for the terminal: each record's line is escaped (:func:`escape`), so
    a key a message quotes cannot move the cursor or fake a line; a traceback keeps its line
    breaks, each of its lines escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return escape_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return escape_lines(super().formatStack(stack_info))


def progress_bar(total: int, enabled: Optional[bool], unit: str = "file"):
    """A tqdm bar on stderr; ``enabled=None`` shows it only when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=None if enabled is None else not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1, unit_scale=unit == "B", unit_divisor=1000)
