"""Text for people never carries a character that hides or reorders text: keys (from strangers)
reach ``ls``, ``verify``, ``info``, ``extract``, the error line, log records and exception
messages escaped (``\\u200f``, ``\\U000e0041``, ``\\x1b``), while keys returned as data and the
names of extracted files stay exact."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import unicodedata
from pathlib import Path
from typing import Dict, List

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import data2h5
from convert_helpers import error_line, index_group, run_cli
from data2h5 import format as fmt, safety
from data2h5.archive import read_index
from data2h5.cli import main
from data2h5.display import EscapingFormatter, one_line
from data2h5.errors import ArchiveKeyError, CorruptEntryError, Data2H5Error, ReadError
from data2h5.text import escape, escape_lines

HIDDEN = {  # name -> a character that hides, reorders or breaks text
    "rlm": "\u200f", "arabic-letter-mark": "\u061c", "zwsp": "\u200b", "bom": "\ufeff", "soft-hyphen": "\u00ad",
    "tag-a": "\U000e0041", "cancel-tag": "\U000e007f", "line-separator": "\u2028", "paragraph-separator": "\u2029",
    "esc": "\x1b", "csi-c1": "\x9b", "nel-c1": "\x85", "cr": "\r", "newline": "\n", "rlo": "\u202e",
    "lri": "\u2066", "lrm": "\u200e", "word-joiner": "\u2060",
}
LONE = "\udcff"  # what surrogateescape makes of the byte 0xff in a key that is not UTF-8
FOLDER_MARK = "\u202e"  # in the source and destination folders' names, which messages show


def expected_escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def is_hidden(char: str) -> bool:
    """The characters no text for people may hold (the spec, written independently of data2h5.text)."""
    code = ord(char)
    return (unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp") or 0xE0000 <= code <= 0xE007F
            or code in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)))


def assert_clean(text: str, *, lines: bool = True) -> None:
    """No hidden character in ``text`` (but its line breaks, where it has several lines)."""
    found = sorted({hex(ord(c)) for c in text if is_hidden(c) and not (lines and c == "\n")})
    assert not found, f"raw {found} in {text!r}"


def key_of(name: str) -> str:
    char = HIDDEN[name]
    return f"d{char}/k{char}.bin"


def shown(key: str) -> str:
    return "".join(expected_escape(c) if is_hidden(c) else c for c in key)


# -- the escape itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*HIDDEN, "lone-surrogate"])
def test_each_hidden_character_is_escaped(name):
    char = HIDDEN.get(name, LONE)
    text = f"cats/a{char}b.png"
    out = escape(text)
    assert out == f"cats/a{expected_escape(char)}b.png"
    assert escape(out) == out  # escaping again changes nothing
    assert_clean(out, lines=False)
    assert safety.printable is escape


def test_plain_text_is_returned_as_it_is():
    for text in ("cats/0001.jpg", "dogs/a b/ü.png", "日本/写真.jpg", "e\u0301t\u00e9", "\\x1b is four characters"):
        assert escape(text) is text
    # not printable for Python, shown as they are: a no-break space, private use, an unassigned code point
    assert escape("a\u00a0b\ue000c\U000effff") == "a\u00a0b\ue000c\U000effff"


def test_every_code_point_is_escaped_exactly_when_hidden():
    text = "".join(chr(c) for c in range(0x110000))
    out = escape(text)
    assert_clean(out, lines=False)
    assert out == "".join(expected_escape(c) if is_hidden(c) else c for c in text)


def test_lines_keep_their_breaks():
    assert escape_lines("a\u200fb\nplain\n\x1b") == "a\\u200fb\nplain\n\\x1b"
    assert escape("a\nb") == "a\\x0ab"


def test_exception_messages_are_escaped_and_fields_exact():
    key = f"cats/{HIDDEN['rlo']}gnp.exe"
    exc = ReadError(key, f"cannot decode {HIDDEN['esc']}[2J")
    assert str(exc) == "cats/\\u202egnp.exe: cannot decode \\x1b[2J"
    assert exc.path == key and key in exc.args[0]
    exc.add_context(f"while {HIDDEN['line-separator']}reading")
    assert str(exc).endswith("(while \\u2028reading)")
    assert str(ArchiveKeyError(f"no entry {HIDDEN['bom']}x")) == "no entry \\ufeffx"
    assert one_line(KeyError(f"a{HIDDEN['zwsp']}b")) == "a\\u200bb"
    assert str(Data2H5Error(f"a{LONE}")) == "a\\udcff"


def test_log_records_are_escaped_tracebacks_keep_their_lines():
    formatter = EscapingFormatter("%(levelname)s: %(message)s")
    try:
        raise ValueError(f"bad {HIDDEN['esc']}]0;title")
    except ValueError:
        record = logging.LogRecord("data2h5", logging.WARNING, __file__, 1, "skipped %s", (key_of("rlm"),),
                                   sys.exc_info())
    text = formatter.format(record)
    assert text.startswith("WARNING: skipped d\\u200f/k\\u200f.bin\nTraceback")
    assert "ValueError: bad \\x1b]0;title" in text
    assert_clean(text)


# -- the commands, on an archive of hostile keys -----------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Dict[str, object]:
    """An archive (exact bytes) of a key per hidden character, its folder named with one too,
    and a key that is not UTF-8 (a lone surrogate once decoded)."""
    tmp = tmp_path_factory.mktemp("printed")
    src = tmp / f"src{FOLDER_MARK}"
    keys = [key_of(name) for name in HIDDEN] + ["plain/ok.bin"]
    for key in keys:
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(key.encode())
    (src / "zz_lone.bin").write_bytes(b"lone")
    out = tmp / "hostile.h5"
    data2h5.convert(src, out, ext="bin", reader="bytes", workers=1)
    with h5py.File(out, "r+") as f:  # a key no conversion writes: its bytes are not UTF-8
        column = index_group(f)["keys"][()].tolist()
        assert column[-1] == b"zz_lone.bin"
        f.move("zz_lone.bin", b"zz_lone\xff.bin")
        column[-1] = b"zz_lone\xff.bin"
        del index_group(f)["keys"]
        index_group(f)["keys"] = np.array(column)
    os.rename(src / "zz_lone.bin", os.path.join(os.fsencode(src), b"zz_lone\xff.bin"))
    return {"tmp": tmp, "src": src, "archive": out, "keys": sorted(keys + [f"zz_lone{LONE}.bin"])}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def files_under(root: Path) -> List[str]:
    return sorted(os.fsdecode(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_keys_returned_as_data_stay_exact(hostile):
    assert sorted(data2h5.open(hostile["archive"])) == hostile["keys"]
    assert sorted(read_index(hostile["archive"]).keys) == hostile["keys"]


def test_ls_shows_every_key_escaped_one_a_line(hostile):
    result = invoke("ls", hostile["archive"])
    assert result.exit_code == 0
    assert_clean(result.stdout)
    assert sorted(result.stdout.splitlines()) == sorted(shown(k) for k in hostile["keys"])
    assert "d\\u200f/k\\u200f.bin" in result.stdout.splitlines() and "zz_lone\\udcff.bin" in result.stdout


@pytest.mark.parametrize("name", ["rlm", "tag-a", "esc"])
def test_ls_under_a_prefix_escapes_it_too(hostile, name):
    result = invoke("ls", hostile["archive"], f"d{HIDDEN[name]}/")
    assert result.exit_code == 0 and result.stdout.splitlines() == [shown(key_of(name))]


def test_info_escapes_what_the_archive_records(hostile):
    result = invoke("info", hostile["archive"])
    assert result.exit_code == 0
    assert_clean(result.stdout)
    assert f"src{expected_escape(FOLDER_MARK)}" in result.stdout


@pytest.mark.parametrize("changed, removed", [("rlm", "tag-a"), ("line-separator", "esc"), ("bom", "csi-c1")])
def test_verify_names_changed_and_extra_keys_escaped(hostile, tmp_path, changed, removed):
    src = tmp_path / f"copy{FOLDER_MARK}"
    shutil.copytree(hostile["src"], src)
    (src / key_of(changed)).write_bytes(b"changed since")
    (src / key_of(removed)).unlink()
    result = invoke("verify", hostile["archive"], "--source", src, "-q")
    assert result.exit_code == 1
    assert_clean(result.stdout)
    assert_clean(result.stderr)
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"changed  {shown(key_of(changed))}: ") for line in lines), lines
    assert f"extra    {shown(key_of(removed))}: in the archive, not in the source folder" in lines, lines
    assert len(error_line(result.stderr).splitlines()) == 1


@pytest.mark.parametrize("name", ["rlo", "zwsp", "paragraph-separator"])
def test_a_damaged_entry_is_named_escaped_by_verify_extract_and_the_library(hostile, tmp_path, name):
    out = tmp_path / "damaged.h5"
    shutil.copy(hostile["archive"], out)
    index = read_index(out)
    pos = index.position(key_of(name))
    with open(out, "r+b") as fh:
        fh.seek(int(index.offset[pos]))
        fh.write(b"\xff" * int(index.stored[pos]))
    result = invoke("verify", out, "-q")
    assert result.exit_code == 1 and f"corrupt  {shown(key_of(name))}: " in result.stdout
    assert_clean(result.stdout)
    result = invoke("extract", out, tmp_path / "dest", "-q", f"d{HIDDEN[name]}")
    assert result.exit_code == 1 and result.stdout == ""
    line = error_line(result.stderr)
    assert_clean(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and shown(key_of(name)) in line
    with pytest.raises(CorruptEntryError) as exc:
        data2h5.open(out)[key_of(name)]
    assert shown(key_of(name)) in str(exc.value)
    assert_clean(str(exc.value), lines=False)


def test_extract_writes_exact_names_and_says_so_escaped(hostile, tmp_path):
    dest = tmp_path / f"dest{FOLDER_MARK}"
    result = invoke("extract", hostile["archive"], dest)
    assert result.exit_code == 0, result.stderr
    assert files_under(dest) == hostile["keys"]
    assert (dest / key_of("tag-a")).read_bytes() == key_of("tag-a").encode()
    assert os.path.exists(os.path.join(os.fsencode(dest), b"zz_lone\xff.bin"))
    assert f"dest{expected_escape(FOLDER_MARK)}" in result.stderr
    assert_clean(result.stderr)
    assert_clean(result.stdout)


@pytest.mark.parametrize("name", ["rlm", "arabic-letter-mark", "tag-a", "newline", "nel-c1"])
def test_an_error_naming_a_key_is_one_escaped_line(hostile, tmp_path, name):
    missing = f"no{HIDDEN[name]}such"
    result = invoke("extract", hostile["archive"], tmp_path / "dest", missing)
    assert result.exit_code == 1 and not (tmp_path / "dest").exists()
    assert_clean(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
    line = error_line(result.stderr)
    assert shown(missing) in line or repr(missing) in line  # messages quoting a key with repr escape it so too
    with pytest.raises(ArchiveKeyError) as exc:
        data2h5.open(hostile["archive"])[missing]
    assert_clean(str(exc.value), lines=False)


def test_the_command_logs_escaped_lines(hostile, tmp_path):
    """The real command (another process, the watchdog engaged) with -v: its log records too."""
    dest = tmp_path / f"out{FOLDER_MARK}"
    done = run_cli("-v", "extract", hostile["archive"], dest, "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "INFO: " in done.stderr and f"out{expected_escape(FOLDER_MARK)}" in done.stderr
    assert_clean(done.stderr)
    assert files_under(dest) == hostile["keys"]
