"""Coming from Data2H5: the loader code its README and a popular blog post teach, run unchanged
on a data2h5 archive of a flat folder. Root listings show the user's files only; the index is
where no listing reaches, and archives that kept it at the root still open everywhere."""
from __future__ import annotations

from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

import data2h5
from conftest import photo_like
from convert_helpers import index_group
from data2h5 import format as fmt

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, Dataset  # noqa: E402


class RecipeDataset(Dataset):
    """The original Data2H5 README's three steps, as its users wrote them."""

    def __init__(self, path_h5: str):
        self.path_h5 = path_h5
        with h5py.File(path_h5, "r") as h5_obj:
            self.file_list = list(h5_obj.keys())  # each key is the relative path to a file

    def __len__(self) -> int:
        return len(self.file_list)

    def __getitem__(self, i: int):
        if not hasattr(self, "h5_obj"):
            self.h5_obj = h5py.File(self.path_h5, mode="r", swmr=True)
        entry_str = self.file_list[i]
        return entry_str, self.h5_obj[entry_str][:]

    def __del__(self):
        if hasattr(self, "h5_obj"):
            self.h5_obj.close()


class BlogDataset(Dataset):
    """The blog post's lazy pattern: count samples with ``len(archive)``, open the files on
    first use in each worker (its ``trajectory_{i}`` names become the archive's own keys)."""

    def __init__(self, h5_paths, limit: int = -1):
        self.limit, self.h5_paths = limit, h5_paths
        self._archives = [h5py.File(p, "r") for p in h5_paths]
        self.indices = {}
        idx = 0
        for a, archive in enumerate(self.archives):
            for i in range(len(archive)):
                self.indices[idx] = (a, i)
                idx += 1
        self._archives = None

    @property
    def archives(self):
        if self._archives is None:
            self._archives = [h5py.File(p, "r") for p in self.h5_paths]
        return self._archives

    def __getitem__(self, index: int):
        a, i = self.indices[index]
        archive = self.archives[a]
        name = list(archive.keys())[i]
        return name, torch.from_numpy(archive[name][:])

    def __len__(self) -> int:
        return min(len(self.indices), self.limit) if self.limit > 0 else len(self.indices)


def as_list(batch):
    return batch


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """A flat folder of JPEGs and PNGs (several shapes), and its data2h5 archive."""
    base = tmp_path_factory.mktemp("flat")
    src = base / "photos"
    src.mkdir()
    rng = np.random.default_rng(5)
    for i in range(24):
        ext = ".jpg" if i % 3 else ".png"
        iio.imwrite(src / f"img_{i:03d}{ext}", photo_like(rng, 20 + i % 4, 24, 3 if i % 2 else 0))
    out = data2h5.convert(src, base / "photos.h5", ext=["jpg", "png"], workers=2).output
    return src, Path(out)


@pytest.mark.parametrize("start", ["fork", "spawn"])
@pytest.mark.parametrize("recipe", [RecipeDataset, BlogDataset])
def test_their_loader_reads_every_file_unchanged(flat, recipe, start):
    src, archive = flat
    dataset = recipe(str(archive)) if recipe is RecipeDataset else recipe([str(archive)])
    assert len(dataset) == len(list(src.iterdir())) == 24
    loader = DataLoader(dataset, batch_size=5, num_workers=2, collate_fn=as_list, multiprocessing_context=start)
    seen = {}
    for batch in loader:
        for name, sample in batch:
            seen[name] = np.asarray(sample)
    assert sorted(seen) == sorted(p.name for p in src.iterdir())
    for name, sample in seen.items():
        np.testing.assert_array_equal(sample, iio.imread(src / name), err_msg=name)


@pytest.mark.parametrize("layout", ["files", "stacked"])
def test_root_lists_no_index(tmp_path, layout):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        iio.imwrite(src / f"{i}.png", np.full((4, 4), i, np.uint8))
    out = data2h5.convert(src, tmp_path / "a.h5", ext="png", layout=layout, workers=1).output
    with h5py.File(out, "r") as f:
        names = []
        f.visit(names.append)
        assert fmt.INDEX_GROUP not in names and not any(n.startswith(fmt.INDEX_GROUP) for n in names)
        if layout == "files":
            assert list(f.keys()) == ["0.png", "1.png", "2.png", "3.png"] and len(f) == 4
        assert "keys" in index_group(f)  # found through the root attribute, not a path
    assert data2h5.verify(out).ok


def test_archives_with_the_index_at_the_root_still_open(tmp_path, flat):
    """Archives written before kept the index in the group ``__data2h5__``."""
    src, archive = flat
    old = tmp_path / "old.h5"
    old.write_bytes(archive.read_bytes())
    with h5py.File(old, "r+") as f:
        f[fmt.INDEX_GROUP] = index_group(f)
        del f[fmt.INDEX_GROUP][fmt.INDEX_SELF]
        del f.attrs[fmt.ATTR_INDEX]
    assert data2h5.verify(old, src).ok
    ds = data2h5.H5Dataset(old, return_key=True)
    for i in range(len(ds)):
        sample, key = ds[i]
        np.testing.assert_array_equal(sample, iio.imread(src / key))
