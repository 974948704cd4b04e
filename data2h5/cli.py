"""The ``data2h5`` command line: a thin layer over :func:`data2h5.convert` and the index."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import click

from ._version import __version__
from .codecs import CHOICES
from .layouts import writable as writable_layouts
from .convert import convert as convert_folder
from .errors import Data2H5Error, Interrupted, Terminated
from .watchdog import guarded
from .display import EscapingFormatter
from .safety import lock_prefixes
from .text import escape

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

CONVERT_EXAMPLE = """\b
Example:
  data2h5 convert --path-images photos/ --path-output photos.h5 --ext jpg
  python -c "import h5py; print(h5py.File('photos.h5')['cats/0001.jpg'][()].shape)"
\b
Store the files' exact bytes instead (about the source size, decoded on read):
  data2h5 convert --path-images photos/ --path-output photos.h5 --ext jpg --reader bytes
\b
Use your own reader or prune function (see plugins/):
  data2h5 convert ... --reader plugins/my_functions.py:my_read --prune plugins/my_functions.py:my_prune
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="data2h5")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens, file by file problems included.")
def main(verbose: bool) -> None:
    """Turn a folder of loose files into one compressed HDF5 archive."""
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    lock_prefixes()


@main.command(epilog=CONVERT_EXAMPLE)
@click.option("--path-images", "--path_images", "src", required=True, type=click.Path(readable=False),
              help="Folder holding the files to convert.")
@click.option("--path-output", "--path_output", "dst", required=True, type=click.Path(),
              help="Archive to write (e.g. out.h5).")
@click.option("--ext", "exts", multiple=True,
              help="Extension to keep; repeat for several (case-insensitive, dot optional).")
@click.option("--reader", default=None,
              help="auto (default), image, bytes, npy, text, module:function or file.py:function.")
@click.option("--prune", default=None, help="prune(filename, ext) -> bool as module:function or file.py:function.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes decoding files (default: every core; 1 works in-process).")
@click.option("--single_process", "--single-process", "single_process", is_flag=True, help="Same as --workers 1.")
@click.option("--compression", default="auto", show_default=True,
              help=f"{' or '.join(CHOICES.rsplit(', ', 1))}.")
@click.option("--no_compress", "--no-compress", "no_compress", is_flag=True, help="Same as --compression none.")
@click.option("--layout", type=click.Choice(list(writable_layouts())), default="files", show_default=True,
              help="files: one dataset per file; stacked: one (N, ...) array `data` with labels; packed: "
                   "every file's bytes appended to a few large blocks (millions of tiny files; read with "
                   "data2h5.open, not h5py).")
@click.option("--overwrite", is_flag=True, help="Replace the output if it exists (and start over, dropping an interrupted run's work).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted conversion into the same output, reusing what it stored safely.")
@click.option("--on-error", "--on_error", "on_error", type=click.Choice(["fail", "skip"]), default="fail",
              show_default=True, help="Stop at the first unreadable file, or skip it and list it.")
@click.option("--follow-symlinks", is_flag=True, help="Walk into symlinked folders (a link back to a folder above it is not entered).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds one file may take to read and decode (default: no limit).")
@click.option("--max-entry-size", type=str, default="4G", show_default=True,
              help="Largest value one file may decode to, e.g. 512M, 16G.")
@click.option("--decode-size", "decode_size", metavar="HxW", default=None,
              help="Image reader: decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) still at least HxW, e.g. 224x224.")
@click.option("--checkpoint-every", "checkpoint_every", type=click.FloatRange(min=0, min_open=True), default=2.0,
              show_default=True, help="Seconds between checkpoints: the most work a crash can cost.")
@click.option("--shard-size", "shard_size", default=None, metavar="SIZE",
              help="Write shard archives of at most SIZE (2G of source bytes, or 50000files) in parallel, "
                   "and the output as their master.")
@click.option("--scheduler", default=None, metavar="tcp://HOST:8786",
              help="With --shard-size: write the shards on this Dask cluster (a shared file system).")
@click.option("--dask-workers", "dask_workers", type=click.IntRange(min=1), default=None,
              help="With --shard-size: write the shards on a local Dask cluster of N processes.")
@click.option("--shard-links", "shard_links", is_flag=True,
              help="With --shard-size: an HDF5 external link per key in the master, so h5py.File(OUT)[key] works "
                   "(2 s and 7 MB more for 100,000 keys, 76 s and 83 MB for a million).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def convert(src: str, dst: str, exts: Tuple[str, ...], reader: Optional[str], prune: Optional[str],
            workers: Optional[int], single_process: bool, compression: str, no_compress: bool, layout: str,
            overwrite: bool, resume: bool, on_error: str, follow_symlinks: bool, timeout: Optional[float],
            max_entry_size: str, decode_size: Optional[str], checkpoint_every: float, shard_size: Optional[str],
            scheduler: Optional[str], dask_workers: Optional[int], shard_links: bool, quiet: bool) -> None:
    """Convert every matching file under a folder into one HDF5 archive, keyed by relative path."""
    if no_compress and compression != "auto":
        raise click.UsageError("--no_compress and --compression contradict each other; give one")
    if shard_size is None and (scheduler or dask_workers or shard_links):
        raise click.UsageError("--scheduler, --dask-workers and --shard-links apply to sharded output: give --shard-size")
    if scheduler and dask_workers:
        raise click.UsageError("--scheduler and --dask-workers contradict each other; give one")
    max_bytes = _parse_size(max_entry_size, "--max-entry-size")
    size = None if decode_size is None else _parse_hxw(decode_size, reader)
    _cwd_importable()
    try:
        with _sigterm_as_interrupt():
            report = convert_folder(
                src, dst, ext=exts, reader=reader, prune=prune, workers=1 if single_process else workers,
                compression="none" if no_compress else compression, layout=layout, overwrite=overwrite,
                resume=resume, on_error=on_error, follow_symlinks=follow_symlinks, timeout=timeout, decode_size=size,
                max_entry_bytes=max_bytes, checkpoint_seconds=checkpoint_every, progress=None if not quiet else False,
                shard_size=shard_size, scheduler=scheduler, dask_workers=dask_workers, shard_links=shard_links,
            )
    except Data2H5Error as exc:
        _fail(exc, _kept_note(exc))
    except OSError as exc:  # the disk filled up, a file-size limit: the work so far is kept
        _fail(f"cannot write {dst}: {exc.strerror or exc}; free space or raise the limit", _kept_note(exc))
    except KeyboardInterrupt as exc:
        _say(f"data2h5: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}; "
             f"nothing was written to {dst}{_kept_note(exc)}", err=True)
        sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)
    if not quiet:
        _say(report.summary(), err=True)


def _read_limit(func):
    """``--max-entry-size`` for the commands that read archives (they are untrusted input)."""
    return click.option("--max-entry-size", "max_entry_size", type=str, default="4G", show_default=True,
                        help="Refuse entries, rows or chunks that declare more than this, e.g. 512M, 16G.")(func)


@main.command()
@click.argument("archive", type=click.Path(readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
@_read_limit
@guarded()
def info(archive: str, as_json: bool, max_entry_size: str) -> None:
    """Show what an archive holds and how it was made (the plugins it names are shown, never run)."""
    from .info import describe

    limit = _parse_size(max_entry_size, "--max-entry-size")
    try:
        facts = describe(archive, max_entry_bytes=limit)
    except Data2H5Error as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(facts, indent=2))  # JSON escapes control characters itself
        return
    width = max(len(k) for k in facts)
    for name, value in facts.items():
        if name == "skipped":
            _say(f"{name:<{width}}  {len(value)}")
            for key, reason in value:
                _say(f"  {key}: {reason}")
        else:
            _say(f"{name:<{width}}  {value}")


@main.command()
@click.argument("archive", type=click.Path(readable=False))
@click.argument("prefix", required=False, default="")
@_read_limit
@guarded()
def ls(archive: str, prefix: str, max_entry_size: str) -> None:
    """List the archive's entry keys, optionally only those under PREFIX.

    Controls and invisible marks in keys are shown escaped (\\x1b, \\u200f), one key a line."""
    from .info import listing

    limit = _parse_size(max_entry_size, "--max-entry-size")
    try:
        blocks = listing(archive, prefix, max_entry_bytes=limit)
        first = next(blocks, "")
    except Data2H5Error as exc:
        _fail(exc)
    out = sys.stdout
    out.write(first)
    for block in blocks:
        out.write(block)


VERIFY_EXAMPLE = """\b
Examples:
  data2h5 verify photos.h5                     # the archive against its own checksums
  data2h5 verify photos.h5 --source photos/    # and the source folder against the archive
"""


@main.command(epilog=VERIFY_EXAMPLE)
@click.argument("archive", type=click.Path(readable=False))
@click.option("--source", type=click.Path(readable=False), default=None,
              help="Also check this folder: every file the conversion's options select must be in the archive, unchanged.")
@click.option("--ext", "exts", multiple=True, help="Select source files by these extensions, not the archive's.")
@click.option("--prune", default=None, help="Select source files with this prune plugin, not the archive's.")
@click.option("--follow-symlinks/--no-follow-symlinks", default=None,
              help="Walk into the source's symlinked folders (default: as the conversion did).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Threads reading and checksumming (default: up to 8).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:8786",
              help="A sharded archive: verify its shards on this Dask cluster (default: local processes).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary: the problems only.")
@_read_limit
@guarded()
def verify(archive: str, source: Optional[str], exts: Tuple[str, ...], prune: Optional[str],
           follow_symlinks: Optional[bool], workers: Optional[int], scheduler: Optional[str], as_json: bool,
           quiet: bool, max_entry_size: str) -> None:
    """Check that an archive (and, with --source, its source folder) is intact.

    Every entry is checked against the checksums stored in the archive; with --source,
    every file the conversion's options select must be in the archive, unchanged. Exits 0
    only when all holds; otherwise lists each problem, one a line: corrupt (stored
    data damaged), missing (in the source, not in the archive), skipped (in the source,
    skipped at conversion), extra (in the archive, not in the source), changed (the source
    file differs from what was recorded; for exact-bytes entries, from the stored bytes).
    """
    from .verify import verify as verify_archive

    if source is None and (exts or prune is not None or follow_symlinks is not None):
        raise click.UsageError("--ext, --prune and --follow-symlinks choose source files: give --source too")
    limit = _parse_size(max_entry_size, "--max-entry-size")
    if prune is not None:
        _cwd_importable()  # only a plugin the user names here is ever loaded
    try:
        report = verify_archive(archive, source, ext=exts or None, prune=prune, follow_symlinks=follow_symlinks,
                                workers=workers, progress=None if not (quiet or as_json) else False,
                                max_entry_bytes=limit, scheduler=scheduler)
    except Data2H5Error as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for problem in report.sorted_problems():
            _say(str(problem))
        for note in report.notes:
            _say(f"data2h5: note: {note}", err=True)
        if not quiet:
            _say(report.summary())
    if not report.ok:
        count = len(report.problems)
        _fail(f"{archive} failed verification: {count:,} problem{'' if count == 1 else 's'} listed above")


EXTRACT_EXAMPLE = """\b
Examples:
  data2h5 extract photos.h5 restored/                # every entry
  data2h5 extract photos.h5 restored/ cats dogs/01   # only keys equal to or under these
\b
Entries stored as exact bytes (--reader bytes) come back identical to the original files and
text as its UTF-8 bytes; decoded arrays (images, .npy, rows of a stacked archive) are written
as KEY.npy (KEY itself when it ends in .npy), which numpy.load reads back unchanged.
"""


@main.command(epilog=EXTRACT_EXAMPLE)
@click.argument("archive", type=click.Path(readable=False))
@click.argument("dest", type=click.Path())
@click.argument("prefixes", nargs=-1, metavar="[PREFIX]...")
@click.option("--overwrite", is_flag=True, help="Replace files that already exist (never links or folders).")
@click.option("--allow-expansion", is_flag=True,
              help="Write more than 100 times the archive's size (refused by default: a crafted archive can declare far more than it holds).")
@click.option("--allow-unicode-collisions", "allow_collisions", is_flag=True,
              help="Write names that differ only in case or Unicode normalisation (refused by default: they "
                   "overwrite each other on macOS and Windows file systems).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@_read_limit
@guarded()
def extract(archive: str, dest: str, prefixes: Tuple[str, ...], overwrite: bool, allow_expansion: bool,
            allow_collisions: bool, quiet: bool, max_entry_size: str) -> None:
    """Write the archive's entries back as files under DEST.

    DEST is created if needed; with PREFIXes, only the keys equal to or under one of them
    are written (cats selects cats/1.jpg, not catsup.jpg). Keys that would land outside
    DEST (absolute, with '..', through a symlink inside DEST) refuse the whole extraction
    before anything is written, as do existing files unless --overwrite, and names that
    differ only in case or Unicode normalisation (e.g. Cat/ and cat/) unless
    --allow-unicode-collisions. Files keep the keys' exact names.
    """
    from .extract import extract as extract_archive

    limit = _parse_size(max_entry_size, "--max-entry-size")
    try:
        report = extract_archive(archive, dest, prefixes, overwrite=overwrite, progress=None if not quiet else False,
                                 allow_expansion=allow_expansion, allow_collisions=allow_collisions,
                                 max_entry_bytes=limit)
    except Data2H5Error as exc:
        _fail(exc)
    if not quiet:
        _say(report.summary(), err=True)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only there can it be set
        yield
        return

    writer = os.getpid()

    def _raise(signum, frame):
        if os.getpid() != writer:  # a worker forked before its initializer reset the handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cwd_importable() -> None:
    """Let ``--reader mymodule:read`` name a module in the working folder, as ``python -m``
    would; the console script's ``sys.path`` starts with its own folder instead. Workers
    inherit ``sys.path`` under every start method."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _kept_note(exc: BaseException) -> str:
    kept = exc.kept if isinstance(exc, (Data2H5Error, Interrupted)) else 0
    return f"; the {kept} files converted so far are kept: rerun with --resume to go on" if kept else ""


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_hxw(text: str, reader: Optional[str]) -> Tuple[int, int]:
    """``"224x224"`` → ``(224, 224)``, for the readers that decode images."""
    if reader not in (None, "auto", "image"):
        raise click.UsageError(f"--decode-size applies to --reader auto or image, not {reader}; leave it out")
    height, sep, width = text.strip().lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise click.BadParameter(f"{text!r} is not HEIGHTxWIDTH in pixels such as 224x224", param_hint="--decode-size")
    return int(height), int(width)


def _parse_size(text: str, option: str) -> int:
    """``"512M"`` → bytes (binary units, an optional trailing ``B`` or ``iB``)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS and value[-1:] else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 512M or 16G", param_hint=option) from None
    if number <= 0:
        raise click.BadParameter(f"{text!r} must be more than 0", param_hint=option)
    return int(number * _SIZE_UNITS[unit])


def _say(line: str, err: bool = False) -> None:
    """Echo one line for a person, escaped (:func:`escape`): whatever key, path or attribute
    it quotes, it stays one line and shows its characters in their order."""
    click.echo(escape(line), err=err)


def _fail(exc, note: str = "") -> None:
    """The last word of a failed command: one escaped line on stderr, then exit 1 (escaping
    twice changes nothing, so messages escaped where they were made come out the same)."""
    _say(f"data2h5: error: {exc}{note}", err=True)
    sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
