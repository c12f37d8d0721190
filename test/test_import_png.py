"""PNG release -> HDF5 importer: round trips, bad input, and real FAZ cases when available."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataloaders import h5layout
from dataloaders.dataset import SiteDataset
from dataloaders.import_png import PNG_FORM_FOLDERS, import_png_tree, main
from dataloaders.tasks import FAZ, ODOC, WEAK_FORM_KEYS

FAZ_FOLDERS = {0: "scr_n", 1: "keypoint", 2: "block", 3: "box", 4: "scr"}


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_tree(root: Path, task=FAZ, folders=FAZ_FOLDERS, n=(3, 2), size=12, seed=0):
    """PNG release tree; returns {(site, split, case): (image, mask labels, weak labels)}."""
    rng = np.random.default_rng(seed)
    values = np.array(task.png_values, np.uint8)
    truth = {}
    for site, folder in folders.items():
        for split, count in zip(("train", "test"), n):
            for i in range(count):
                case = f"{site}_{i:02d}"
                shape = (size, size) if task.in_chns == 1 else (size, size, 3)
                img = rng.integers(0, 256, shape, dtype=np.uint8)
                mask = rng.integers(0, task.num_classes, (size, size)).astype(np.uint8)
                weak = rng.integers(0, task.num_classes + 1, (size, size)).astype(np.uint8)
                base = root / f"Domain{site + 1}" / split
                _png(base / "imgs" / f"{case}.png", img)
                _png(base / "mask" / f"{case}.png", values[mask])
                if split == "train":
                    _png(base / folder / f"{case}.png", values[weak])
                truth[(site, split, case)] = (img, mask, weak if split == "train" else None)
    return truth


def _check_tree(dst: Path, truth, task, folders) -> None:
    for (site, split, case), (img, mask, weak) in truth.items():
        got = h5layout.read_case(h5layout.site_dir(dst, site, split) / f"{case}.h5")
        expected_img = img if img.ndim == 2 else img.transpose(2, 0, 1)
        assert got["image"].dtype == np.float32
        assert np.array_equal(got["image"], expected_img.astype(np.float32) / np.float32(255))
        assert np.array_equal(np.round(got["image"] * 255).astype(np.uint8), expected_img)
        assert np.array_equal(got["mask"], mask)
        if weak is not None:
            key = WEAK_FORM_KEYS[PNG_FORM_FOLDERS[folders[site]]]
            assert set(got) == {"image", "mask", key}
            assert np.array_equal(got[key], weak)
        else:
            assert set(got) == {"image", "mask"}


def test_faz_round_trip_and_dataset(tmp_path):
    truth = _make_tree(tmp_path / "png")
    summary = import_png_tree(tmp_path / "png", tmp_path / "h5", "faz")
    assert summary.counts == {(s, sp): n for s in range(5) for sp, n in (("train", 3), ("test", 2))}
    _check_tree(tmp_path / "h5", truth, FAZ, FAZ_FOLDERS)
    assert not list((tmp_path / "h5").rglob("*.tmp"))
    for site in range(5):  # the imported tree feeds SiteDataset with each site's weak form
        ds = SiteDataset(tmp_path / "h5", "faz", site, "train")
        assert ds.label_form == FAZ.site(site).weak_form and len(ds) == 2


def test_odoc_rgb_round_trip_and_workers(tmp_path):
    folders = {0: "scribble", 1: "scribble_noisy", 2: "box", 3: "point", 4: "block"}
    truth = _make_tree(tmp_path / "png", ODOC, folders, n=(2, 1))
    import_png_tree(tmp_path / "png", tmp_path / "h5", "odoc", workers=2)
    _check_tree(tmp_path / "h5", truth, ODOC, folders)


def test_limit_sites_and_cli(tmp_path, capsys):
    _make_tree(tmp_path / "png", n=(3, 2))
    assert main([str(tmp_path / "png"), str(tmp_path / "h5"), "--task", "faz",
                 "--limit", "1", "--sites", "2,5"]) == 0
    out = capsys.readouterr().out
    assert "Domain2" in out and "Domain5" in out and "Domain1 " not in out
    files = sorted(p.relative_to(tmp_path / "h5").as_posix() for p in (tmp_path / "h5").rglob("*.h5"))
    assert files == ["Domain2/test/1_00.h5", "Domain2/train/1_00.h5",
                     "Domain5/test/4_00.h5", "Domain5/train/4_00.h5"]


def test_unknown_pixel_value_names_file_and_values(tmp_path):
    _make_tree(tmp_path / "png")
    bad = tmp_path / "png/Domain3/train/block/2_01.png"
    arr = np.asarray(Image.open(bad)).copy()
    arr[0, :3] = [200, 5, 200]
    _png(bad, arr)
    with pytest.raises(ValueError, match=r"block/2_01\.png: unexpected pixel values \[5, 200\]"):
        import_png_tree(tmp_path / "png", tmp_path / "h5", "faz")
    assert main([str(tmp_path / "png"), str(tmp_path / "h5"), "--task", "faz"]) == 2


def test_mask_with_unlabelled_value_rejected(tmp_path):
    _make_tree(tmp_path / "png", n=(1, 1))
    bad = tmp_path / "png/Domain1/test/mask/0_00.png"
    _png(bad, np.full((12, 12), 254, np.uint8))
    with pytest.raises(ValueError, match=r"mask/0_00\.png: unexpected pixel values \[254\].*full mask"):
        import_png_tree(tmp_path / "png", tmp_path / "h5", "faz")


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing does not exist"):
        import_png_tree(tmp_path / "missing", tmp_path / "h5", "faz")
    _make_tree(tmp_path / "png", n=(2, 1))
    (tmp_path / "png/Domain1/train/strokes").mkdir()
    with pytest.raises(ValueError, match=r"train/strokes: unknown label folder"):
        import_png_tree(tmp_path / "png", tmp_path / "h5", "faz")
    (tmp_path / "png/Domain1/train/strokes").rmdir()
    (tmp_path / "png/Domain2/train/mask/1_01.png").unlink()
    with pytest.raises(ValueError, match=r"Domain2/train/mask: case names differ.*1_01"):
        import_png_tree(tmp_path / "png", tmp_path / "h5", "faz")


def test_colour_image_for_grayscale_task(tmp_path):
    _make_tree(tmp_path / "png", n=(1, 1))
    bad = tmp_path / "png/Domain4/test/imgs/3_00.png"
    _png(bad, np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"imgs/3_00\.png: image is colour RGB; expected grayscale"):
        import_png_tree(tmp_path / "png", tmp_path / "h5", "faz")


@pytest.mark.realdata
def test_real_faz_cases_survive_exactly(tmp_path, faz_png_root):
    for site in range(FAZ.num_sites):  # published counts, from the file listing alone
        for split in ("train", "test"):
            n = len(list((faz_png_root / f"Domain{site + 1}" / split / "imgs").glob("*.png")))
            expected = FAZ.site(site).n_train if split == "train" else FAZ.site(site).n_test
            assert n == expected, (site, split)
    summary = import_png_tree(faz_png_root, tmp_path, "faz", limit=3)
    assert set(summary.counts.values()) == {3}
    lut = {value: label for label, value in enumerate(FAZ.png_values)}
    for h5 in sorted(tmp_path.rglob("*.h5")):
        site_dir, split = h5.parent.parent.name, h5.parent.name
        src = faz_png_root / site_dir / split
        got = h5layout.read_case(h5)
        img = np.asarray(Image.open(src / "imgs" / f"{h5.stem}.png"))
        assert got["image"].shape == (256, 256)
        assert np.array_equal(np.round(got["image"] * 255).astype(np.uint8), img)
        folders = [p for p in src.iterdir() if p.name != "imgs"]
        assert len(folders) == (2 if split == "train" else 1)
        for folder in folders:
            key = "mask" if folder.name == "mask" else WEAK_FORM_KEYS[PNG_FORM_FOLDERS[folder.name]]
            png = np.asarray(Image.open(folder / f"{h5.stem}.png"))
            assert set(np.unique(png).tolist()) <= set(lut)
            assert np.array_equal(got[key], np.vectorize(lut.get)(png).astype(np.uint8)), (h5, key)
            if key == "mask":
                assert got[key].max() < FAZ.num_classes
    for site in range(FAZ.num_sites):
        ds = SiteDataset(tmp_path, "faz", site, "train")
        assert ds.label_form == FAZ.site(site).weak_form
        assert int(ds[0]["label"].max()) == FAZ.unlabelled


def test_custom_png_values(tmp_path):
    values = np.array([200, 10, 90], np.uint8)  # background, FAZ, unlabelled
    mask = np.tile(np.array([0, 1], np.uint8), (4, 2))
    weak = np.tile(np.array([0, 1, 2, 2], np.uint8), (4, 1))
    for split in ("train", "test"):
        base = tmp_path / "png/Domain1" / split
        _png(base / "imgs/a.png", np.zeros((4, 4), np.uint8))
        _png(base / "mask/a.png", values[mask])
    _png(tmp_path / "png/Domain1/train/scr_n/a.png", values[weak])
    assert main([str(tmp_path / "png"), str(tmp_path / "h5"), "--task", "faz",
                 "--values", "200,10,90"]) == 0
    got = h5layout.read_case(tmp_path / "h5/Domain1/train/a.h5")
    assert np.array_equal(got["mask"], mask) and np.array_equal(got["scribble_noisy"], weak)
    with pytest.raises(ValueError, match=r"must list 3 values"):
        import_png_tree(tmp_path / "png", tmp_path / "h5", "faz", png_values=(0, 127))
