"""Built-in readers, and turning what any reader returns into a storable array.

A reader is ``read(path) -> numpy array | bytes | str``. Built-in readers also decode from
bytes already in memory (``from_bytes``), so a worker reads each file once for both the
checksum and the decoding.
"""
from __future__ import annotations

import io
import os
from typing import Callable, Optional, Tuple

import numpy as np

from . import declared, jpeg
from .errors import binary_size, PluginError, ReadError
from .format import Kind
from .plugins import Plugin

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .tif .tiff .webp .ppm .pgm .pbm .pnm .ico .tga".split()
)
ARRAY_EXTENSIONS = frozenset({".npy", ".npz"})
TEXT_EXTENSIONS = frozenset(".txt .json .csv .tsv .md .xml .yaml .yml .html .svg".split())


class BuiltinReader:
    """A built-in reader: callable on a path, and able to decode bytes already read.

    ``from_bytes`` takes decoding options that only the image reader uses: ``max_bytes``
    (refuse a JPEG whose header declares more, before decoding it) and ``decode_size``
    (decode a JPEG at the reduced DCT scale that still covers ``(height, width)``).
    """

    def __init__(self, name: str, decode: Callable[..., object], *, warns: bool = True):
        self.name = name
        self._decode = decode
        self.warns = warns  # its decoder may issue warnings worth logging (False: bytes and text)

    def from_bytes(self, raw: bytes, ext: str, *, max_bytes: Optional[int] = None,
                   decode_size: Optional[Tuple[int, int]] = None):
        return self._decode(raw, ext, max_bytes=max_bytes, decode_size=decode_size)

    def __call__(self, path: str):
        with open(path, "rb") as fh:
            return self._decode(fh.read(), os.path.splitext(path)[1].lower())

    def __repr__(self) -> str:
        return f"<data2h5 reader {self.name}>"


class Undecodable(ValueError):
    """A built-in reader's own account of why a file does not decode (shown as is)."""


JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})


def _decode_image(raw: bytes, ext: str, *, max_bytes: Optional[int] = None,
                  decode_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """imageio's array of an image file; JPEGs go to :func:`jpeg.decode` (the same array,
    faster: imageio's per-call set-up alone costs ~150 µs, and simplejpeg decodes in about
    half Pillow's time), which also honours ``max_bytes`` and ``decode_size``."""
    import imageio.v3 as iio

    if not raw:
        raise Undecodable("the file is empty")
    try:
        if ext in JPEG_EXTENSIONS:
            decoded = jpeg.decode(raw, decode_size=decode_size, max_bytes=max_bytes)
            if decoded is not None:
                return decoded
        if max_bytes is not None:
            declared.check(declared.image(raw, ext), max_bytes)
        return iio.imread(raw, extension=ext or None)
    except (jpeg.TooLarge, declared.TooLarge):
        raise  # read_source words it as any value over the limit
    except declared.Unrecognised as exc:
        raise Undecodable(f"not a valid {ext or 'image'} file ({exc})") from exc
    except declared.Undeclared as exc:
        raise Undecodable(f"not decoded under the {binary_size(max_bytes or 0)} limit: {exc}; read it with "
                          "decode=False (--reader bytes keeps it as bytes)") from exc
    except jpeg.JpegError as exc:
        raise Undecodable(str(exc)) from exc
    except Exception as exc:  # decoders raise anything on bad bytes (OSError, struct.error, SyntaxError...)
        if "Could not find a backend" in str(exc):  # imageio's words for "no decoder accepts these bytes"
            detail = "no image decoder recognises its bytes"
        else:
            detail = _reason(exc)
        raise Undecodable(f"not a valid {ext or 'image'} file ({detail})") from exc


def _decode_npy(raw: bytes, ext: str, *, max_bytes: Optional[int] = None, **_options) -> np.ndarray:
    if not raw:
        raise Undecodable("the file is empty")
    if max_bytes is not None:
        try:
            declared.check(declared.npy(raw), max_bytes)
        except declared.Undeclared as exc:
            raise Undecodable(str(exc)) from exc
    loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = loaded.files
            if len(names) != 1:
                raise Undecodable(
                    f"the .npz holds {len(names)} arrays ({', '.join(names[:5])}); "
                    "store one array per file or write a reader plugin that picks one"
                )
            return loaded[names[0]]
    return loaded


def _decode_text(raw: bytes, ext: str, *, max_bytes: Optional[int] = None, **_options) -> str:
    declared.check(declared.text(raw), max_bytes)
    return raw.decode("utf-8")


def _decode_bytes(raw: bytes, ext: str, **_options) -> bytes:
    return raw


BUILTIN_READERS = {
    "image": BuiltinReader("image", _decode_image),
    "bytes": BuiltinReader("bytes", _decode_bytes, warns=False),
    "npy": BuiltinReader("npy", _decode_npy),
    "text": BuiltinReader("text", _decode_text, warns=False),
}
AUTO = "auto"


def reader_for_extension(ext: str) -> BuiltinReader:
    """The ``auto`` reader: image for image extensions, npy for .npy/.npz, text for text
    formats, and the exact bytes for anything else."""
    ext = ext.lower()
    if ext in IMAGE_EXTENSIONS:
        return BUILTIN_READERS["image"]
    if ext in ARRAY_EXTENSIONS:
        return BUILTIN_READERS["npy"]
    if ext in TEXT_EXTENSIONS:
        return BUILTIN_READERS["text"]
    return BUILTIN_READERS["bytes"]


def to_stored(value) -> Optional[Tuple[Kind, np.ndarray]]:
    """What a reader returned → ``(kind, contiguous array)``; None if the type is unsupported."""
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc":
            return None
        # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
        return Kind.ARRAY, arr if arr.flags.c_contiguous else arr.copy(order="C")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Kind.BYTES, np.frombuffer(bytes(value), dtype=np.uint8)
    if isinstance(value, str):
        return Kind.TEXT, np.frombuffer(value.encode("utf-8"), dtype=np.uint8)
    return None


def read_source(
    reader: Optional[Plugin], path: str, raw: bytes, ext: str, max_bytes: Optional[int] = None,
    decode_size: Optional[Tuple[int, int]] = None,
) -> Tuple[Kind, np.ndarray]:
    """Decode one source file with ``reader`` (None: the ``auto`` rule by extension).

    Built-in readers decode ``raw`` (the file's bytes, already read); a plugin gets the path.
    ``decode_size``: JPEGs read as images are decoded at the reduced scale that still covers
    ``(height, width)`` (see :mod:`data2h5.jpeg`). Raises :class:`ReadError` when a built-in
    cannot decode the file or the value is over ``max_bytes`` (a JPEG's declared size is
    checked before decoding), and :class:`PluginError` when a plugin raises or returns an
    unsupported type, each naming the file.
    """
    func = reader_for_extension(ext) if reader is None else reader.func
    if isinstance(func, BuiltinReader):
        try:
            value = func.from_bytes(raw, ext, max_bytes=max_bytes, decode_size=decode_size)
        except jpeg.TooLarge as exc:
            raise ReadError(path, _over_limit(f"its header declares {'×'.join(map(str, exc.shape))} samples "
                                              f"({binary_size(exc.nbytes)} decoded)", max_bytes)) from None
        except declared.TooLarge as exc:
            raise ReadError(path, _over_limit(f"its header declares {exc.declared.what} "
                                              f"({binary_size(exc.declared.nbytes)} decoded)", max_bytes)) from None
        except Exception as exc:
            reason = str(exc) if isinstance(exc, Undecodable) else _reason(exc)
            raise ReadError(path, f"cannot read as {func.name}: {reason}") from exc
        _check_size(value, path, max_bytes)
        stored = to_stored(value)
        if stored is None:  # e.g. a .npy of strings or records
            raise ReadError(
                path, f"read as {func.name}, it holds {_describe(value)}, which is not stored; "
                "use --reader bytes, or a reader plugin that returns a numeric array"
            )
        return stored
    try:
        value = func(path)
    except Exception as exc:
        raise PluginError(f"reader plugin {reader.spec!r} failed on {path}: {_reason(exc)}") from exc
    _check_size(value, path, max_bytes)
    stored = to_stored(value)
    if stored is None:
        raise PluginError(
            f"reader plugin {reader.spec!r} returned {_describe(value)} for {path}; "
            "return a numeric numpy array, bytes or str"
        )
    return stored


def _check_size(value, path: str, max_bytes: Optional[int]) -> None:
    """Refuse a value over ``max_bytes`` before anything copies it (a reader gone wrong can
    return a view of terabytes that costs nothing until it is copied)."""
    if max_bytes is None:
        return
    if isinstance(value, (np.ndarray, np.generic)):
        nbytes = np.asarray(value).nbytes
    elif isinstance(value, (bytes, bytearray, memoryview, str)):
        nbytes = len(value)
    else:
        return
    if nbytes > max_bytes:
        raise ReadError(path, _over_limit(f"read as {binary_size(nbytes)}", max_bytes))


def _over_limit(what: str, max_bytes: int) -> str:
    return (f"{what}, over the {binary_size(max_bytes)} limit per file; "
            "pass a larger --max-entry-size if that is expected")



def _describe(value) -> str:
    if isinstance(value, (np.ndarray, np.generic)):
        return f"an array of {np.asarray(value).dtype}"
    return type(value).__name__


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
