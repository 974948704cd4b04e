"""The codec and layout registries: read-only, complete, and what the CLI and errors show."""
from __future__ import annotations

import pickle

import pytest
from click.testing import CliRunner

from data2h5 import codecs, layouts
from data2h5.cli import main
from data2h5.errors import CompressionError, LayoutError


def test_codec_registry_is_read_only_and_every_codec_pickles():
    with pytest.raises(TypeError):
        codecs.CODECS["new"] = codecs.CODECS["gzip"]  # type: ignore[index]
    for name, codec in codecs.CODECS.items():
        assert codec.name == name and codecs.codec_by_id(codec.id) is codec
        assert pickle.loads(pickle.dumps(codec)) == codec
        if codec.filter_id is not None:
            assert codecs.BY_FILTER[codec.filter_id] is codec


def test_levels_and_errors_come_from_the_definitions():
    assert codecs.parse_compression("gzip:9") == codecs.CODECS["gzip"].with_level(9)
    assert codecs.codec_by_id(codecs.GZIP, 9).level == 9
    with pytest.raises(CompressionError, match="takes no such level"):
        codecs.parse_compression("zstd:23")
    with pytest.raises(CompressionError) as err:
        codecs.parse_compression("brotli")
    for codec in codecs.CODECS.values():
        assert codec.usage in str(err.value)
    help_text = " ".join(CliRunner().invoke(main, ["convert", "--help"]).output.split())
    assert "gzip[:0-9]" in help_text and "zstd[:1-22]" in help_text


def test_a_chunk_that_would_decompress_past_its_size_is_refused():
    gzip = codecs.CODECS["gzip"]
    stored, _ = gzip.compress(bytes(1 << 16))
    with pytest.raises(ValueError):
        gzip.decompress(stored, 1 << 10)


def test_layout_registry_is_read_only_and_every_layout_loads():
    with pytest.raises(TypeError):
        layouts.LAYOUTS["new"] = "x:y"  # type: ignore[index]
    for name in layouts.LAYOUTS:
        assert layouts.get(name).name == name
    assert set(layouts.writable()) == {"files", "stacked", "packed"}
    assert not layouts.get(layouts.PLAIN).writable
    with pytest.raises(LayoutError, match="unknown layout"):
        layouts.get("sharded-someday")
