"""Text meant for a person, made safe to show: archive keys come from strangers, and a key
holding a control, a line break or an invisible formatting mark could move the cursor, retitle
the terminal, fake a line of output or show its characters in another order than they are.

:func:`escape` replaces each such character with a Python-style escape (``\\x1b``,
``\\u200f``, ``\\U000e0041``). What it escapes, by Unicode general category: Cc (C0 and C1
controls, DEL), Cf (format marks: the bidirectional marks, overrides and isolates, zero-width
characters, the byte-order mark, the soft hyphen, tag characters), Cs (lone surrogates, such
as ``surrogateescape`` makes of bytes that are not UTF-8), Zl and Zp (line and paragraph
separators), plus the whole tag block U+E0000-E007F (unassigned code points included) and
the bidirectional controls whatever this Python's Unicode tables say of them.

Its output holds none of those and is left as it is by a second :func:`escape`, so text may
be escaped where it is made and again where it is shown. Only text for people goes through
it: keys returned as data, and the names of files written, stay exact.

This module imports nothing of data2h5, so that every module (errors included) may use it.
"""
from __future__ import annotations

import unicodedata

ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Unicode general categories escaped wherever they occur."""

BIDI_CONTROLS = frozenset({0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)})
"""The bidirectional marks, embeddings, overrides and isolates (all Cf in current Unicode)."""

TAG_BLOCK = range(0xE0000, 0xE0080)

TABLE_LIMIT = 1 << 16


def _escape_of(code: int) -> str:
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def needs_escape(char: str) -> bool:
    """Whether one character is shown escaped by :func:`escape`."""
    code = ord(char)
    return (unicodedata.category(char) in ESCAPED_CATEGORIES or code in BIDI_CONTROLS or code in TAG_BLOCK)


class _EscapeTable(dict):
    """A ``str.translate`` table filled on demand: each code point met is classified once,
    then looked up in C. Maps a code point to its escape, or to itself. Holds at most
    :data:`TABLE_LIMIT` code points, so text of every character cannot grow it without end."""

    def __missing__(self, code: int):
        value = _escape_of(code) if needs_escape(chr(code)) else code
        if len(self) < TABLE_LIMIT:
            self[code] = value
        return value


_TABLE = _EscapeTable()


def escape(text: str) -> str:
    """``text`` with every character of :data:`ESCAPED_CATEGORIES`, every bidirectional
    control and every tag character replaced by its escape, e.g. ``\\u200f``.

    Fast path: ``str.isprintable()`` is False for every character of categories Cc, Cf, Cs,
    Zl and Zp (the tag block's unassigned code points, Cn, included), so a printable string
    has nothing to escape and is returned as it is, at C speed; other strings (also those
    with a no-break space or a private-use character, which are shown as they are) are
    translated through a table that classifies each code point once.
    """
    if text.isprintable():
        return text
    return text.translate(_TABLE)


def escape_lines(text: str) -> str:
    """:func:`escape` for text of several lines: its ``\\n`` are kept, each line escaped."""
    if text.replace("\n", "").isprintable():
        return text
    return "\n".join(map(escape, text.split("\n")))
