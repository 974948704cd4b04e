"""How runs show themselves: sizes in words, exceptions on one line, progress bars."""
from __future__ import annotations

import sys
from typing import Optional


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
    """An exception's message on one line (a KeyError's without the quotes ``str`` adds;
    the type's name when there is no message)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(text).split()) or type(exc).__name__


def progress_bar(total: int, enabled: Optional[bool], unit: str = "file"):
    """A tqdm bar on stderr; ``enabled=None`` shows it only when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=None if enabled is None else not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1, unit_scale=unit == "B", unit_divisor=1000)
