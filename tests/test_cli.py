"""The ``data2h5`` command line: convert (new and original spellings), info, ls, version, help.

Most cases go through click's CliRunner (in this process); the end-to-end ones run the real
command in a subprocess, as ``python -m data2h5.cli`` and as the installed console script.
"""
from __future__ import annotations

import json
import os

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
from click.testing import CliRunner, Result

import data2h5
from data2h5 import format as fmt
from data2h5.cli import main
from data2h5.codecs import NONE
from convert_helpers import build_tree, error_line, filter_ids, index, run_cli


@pytest.fixture
def tree(tmp_path):
    return build_tree(tmp_path)


def invoke(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def convert_args(tree, out, *extra):
    return ["convert", "--path-images", tree.root, "--path-output", out, "-q", *extra]


# -- convert ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ext_args, suffixes",
    [
        (["--ext", "png"], {".png"}),
        (["--ext", ".PNG"], {".png"}),
        (["--ext", "jpg"], {".jpg", ".JPG"}),
        (["--ext", "JPG", "--ext", ".png"], {".png", ".jpg", ".JPG"}),
        (["--ext", "png,jpg"], {".png", ".jpg", ".JPG"}),
    ],
)
def test_ext_is_repeatable_case_insensitive_dot_optional(tmp_path, tree, ext_args, suffixes):
    out = tmp_path / "out.h5"
    result = invoke(*convert_args(tree, out, *ext_args))
    assert result.exit_code == 0, result.output
    expected = sorted(k for k, p in tree.images.items() if p.suffix in suffixes)
    assert index(out)["keys"] == expected


PID_PLUGIN = "import os\nimport numpy as np\n\ndef read(path):\n    return np.array([os.getpid()])\n"


def test_original_spellings(tmp_path, tree):
    """--path_images, --path_output, --single_process and --no_compress, as the original script."""
    plugin = tmp_path / "pid.py"
    plugin.write_text(PID_PLUGIN)
    out = tmp_path / "out.h5"
    result = invoke("convert", "--path_images", tree.root, "--path_output", out, "--ext", "png",
                    "--single_process", "--no_compress", "--reader", f"{plugin}:read", "-q")
    assert result.exit_code == 0, result.output
    cols = index(out)
    assert len(cols["keys"]) == sum(p.suffix == ".png" for p in tree.images.values())
    assert set(cols["codec"]) == {NONE}
    with h5py.File(out, "r") as f:
        assert f.attrs[fmt.ATTR_COMPRESSION] == "none"
        assert {int(f[k][0]) for k in cols["keys"]} == {os.getpid()}  # ran in this very process
        assert all(filter_ids(f[k]) == [] for k in cols["keys"])


def test_workers_run_elsewhere(tmp_path, tree):
    plugin = tmp_path / "pid.py"
    plugin.write_text(PID_PLUGIN)
    out = tmp_path / "out.h5"
    result = invoke(*convert_args(tree, out, "--ext", "png", "--workers", "2", "--reader", f"{plugin}:read"))
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        pids = {int(f[k][0]) for k in index(out)["keys"]}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_summary_names_the_output_and_counts(tmp_path, tree):
    out = tmp_path / "out.h5"
    result = invoke("convert", "--path-images", tree.root, "--path-output", out, "--ext", "png", "--ext", "jpg")
    assert result.exit_code == 0, result.output
    n = len(tree.images)
    assert f"{n} files" in result.stderr and str(out) in result.stderr and "0 skipped" in result.stderr
    assert result.stdout == ""


def test_quiet_prints_nothing(tmp_path, tree):
    result = invoke(*convert_args(tree, tmp_path / "out.h5", "--ext", "png"))
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""


def test_no_compress_and_compression_contradict(tmp_path, tree):
    result = CliRunner().invoke(main, [str(a) for a in convert_args(tree, tmp_path / "o.h5", "--ext", "png",
                                                                    "--no_compress", "--compression", "gzip")])
    assert result.exit_code == 2 and "contradict" in result.stderr
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("launcher", ["module", "script"])
@pytest.mark.parametrize("reader", [None, "bytes"])
def test_convert_end_to_end_in_a_subprocess(tmp_path, tree, launcher, reader, workers):
    out = tmp_path / "out.h5"
    args = ["convert", "--path-images", "src", "--path-output", "out.h5", "--ext", "png", "--ext", "JPG",
            "--workers", workers]
    done = run_cli(*args, *(["--reader", reader] if reader else []), cwd=tmp_path, launcher=launcher)
    assert done.returncode == 0, done.stderr
    assert f"{len(tree.images)} files" in done.stderr
    with h5py.File(out, "r") as f:
        assert sorted(k for k in index(out)["keys"]) == sorted(tree.images)
        for key, src in tree.images.items():
            if reader == "bytes":
                assert f[key][()].tobytes() == src.read_bytes()
            else:
                np.testing.assert_array_equal(f[key][()], iio.imread(src), err_msg=key)


def test_module_plugin_from_the_working_folder(tmp_path, tree):
    """``--reader mymod:read`` finds mymod.py in the working folder, also via the console script."""
    (tmp_path / "mymod_cwd.py").write_text("def read(path):\n    return open(path, 'rb').read()[:8]\n")
    done = run_cli("convert", "--path-images", "src", "--path-output", "out.h5", "--ext", "png",
                   "--reader", "mymod_cwd:read", "-q", cwd=tmp_path, launcher="script")
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert f["top.png"][()].tobytes() == b"\x89PNG\r\n\x1a\n"


def test_module_plugin_from_pythonpath_under_workers(tmp_path, tree):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "shapes_plugin.py").write_text(
        "import imageio.v3 as iio\nimport numpy as np\n\ndef read(path):\n    return np.array(iio.imread(path).shape)\n")
    done = run_cli("convert", "--path-images", tree.root, "--path-output", tmp_path / "out.h5", "--ext", "png",
                   "--workers", "2", "--reader", "shapes_plugin:read", "-q", cwd=tmp_path,
                   env={"PYTHONPATH": str(lib)})
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "out.h5", "r") as f:
        for key, src in tree.images.items():
            if src.suffix == ".png":
                np.testing.assert_array_equal(f[key][()], iio.imread(src).shape)


# -- version and help -------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["runner", "module", "script"])
def test_version(tmp_path, launcher):
    if launcher == "runner":
        result = invoke("--version")
        code, out = result.exit_code, result.stdout
    else:
        done = run_cli("--version", cwd=tmp_path, launcher=launcher)
        code, out = done.returncode, done.stdout
    assert code == 0 and out.strip() == f"data2h5, version {data2h5.__version__}"


def test_help_shows_an_example():
    result = invoke("convert", "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    assert "data2h5 convert --path-images" in result.stdout and "--reader bytes" in result.stdout
    for option in ("--path_images", "--path_output", "--single_process", "--no_compress", "--on-error", "--overwrite"):
        assert option in result.stdout
    top = invoke("--help")
    assert all(cmd in top.stdout for cmd in ("convert", "info", "ls"))


# -- info and ls ------------------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path, tree):
    out = tmp_path / "out.h5"
    broken = tree.root / "icons" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    assert invoke(*convert_args(tree, out, "--ext", "png", "--ext", "jpg", "--on-error", "skip")).exit_code == 0
    return out, tree


def parse_info(text: str) -> dict:
    facts = {}
    for line in text.splitlines():
        if line.startswith("  "):
            facts.setdefault("skipped list", []).append(line.strip())
        else:
            name, _, value = line.partition("  ")
            facts[name.strip()] = value.strip()
    return facts


def test_info_shows_how_the_archive_was_made(archive):
    out, tree = archive
    result = invoke("info", out)
    assert result.exit_code == 0, result.output
    facts = parse_info(result.stdout)
    bytes_in = sum(p.stat().st_size for p in tree.images.values())
    assert facts["entries"] == str(len(tree.images))
    assert facts["bytes in"] == str(bytes_in)
    assert facts["bytes out"] == str(out.stat().st_size)
    assert float(facts["ratio"]) == pytest.approx(out.stat().st_size / bytes_in, abs=1e-3)
    assert facts["reader"] == "auto" and facts["prune"] == "ext" and facts["layout"] == "files"
    assert facts["source"] == str(tree.root)
    assert facts["created"] == h5py.File(out, "r").attrs[fmt.ATTR_CREATED]
    assert facts["version"] == data2h5.__version__
    assert facts["skipped"] == "1"
    assert facts["skipped list"][0].startswith("icons/broken.png: cannot read as image")


def test_info_json(archive):
    out, tree = archive
    result = invoke("info", "--json", out)
    facts = json.loads(result.stdout)
    assert facts["entries"] == len(tree.images)
    assert facts["bytes in"] == sum(p.stat().st_size for p in tree.images.values())
    assert facts["extensions"] == [".png", ".jpg"]
    assert [k for k, _ in facts["skipped"]] == ["icons/broken.png"]


def test_ls_with_and_without_prefix(archive):
    out, tree = archive
    everything = invoke("ls", out)
    assert everything.exit_code == 0
    assert everything.stdout.splitlines() == sorted(tree.images)
    icons16 = invoke("ls", out, "icons/16/")
    assert icons16.stdout.splitlines() == ["icons/16/app.png", "icons/16/app_grey.png"]
    assert invoke("ls", out, "nothing/").stdout == ""


@pytest.mark.parametrize("command", ["info", "ls"])
@pytest.mark.parametrize("what", ["missing", "not-hdf5"])
def test_info_and_ls_on_something_else(tmp_path, command, what):
    path = tmp_path / "x.h5"
    if what == "not-hdf5":
        path.write_bytes(b"just text")
    done = run_cli(command, path, cwd=tmp_path)
    assert done.returncode == 1
    assert str(path) in error_line(done.stderr) and len(done.stderr.strip().splitlines()) == 1
