"""SiteDataset, the train/val split, augmentation and the infinite batch stream."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dataloaders import h5layout
from dataloaders.augment import random_augment, rot_flip, rotate
from dataloaders.dataset import InfiniteBatches, SiteDataset, make_loader, split_train_val
from dataloaders.tasks import FAZ, ODOC


# ---------------------------------------------------------------- shapes, dtypes, defaults

@pytest.mark.parametrize("task", [FAZ, ODOC])
def test_samples_shapes_dtypes_ranges(tmp_path, make_h5_site, task):
    make_h5_site(tmp_path, task.name, site=1, n_train=5, n_test=2, size=24)
    for split in ("train", "val", "test"):
        ds = SiteDataset(tmp_path, task.name, 1, split)
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].dtype == torch.float32 and s["image"].shape == (task.in_chns, 24, 24)
            assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
            assert s["label"].dtype == torch.int64 and s["label"].shape == (24, 24)
            assert s["mask"].dtype == torch.int64 and s["mask"].shape == (24, 24)
            assert int(s["mask"].max()) < task.num_classes
            assert int(s["label"].max()) <= task.unlabelled
            assert isinstance(s["case"], str) and s["case"] == ds.cases[i]
    assert len(SiteDataset(tmp_path, task, 1, "test")) == 2


def test_default_label_forms(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=1, n_train=5, n_test=2)  # site 1 of faz: point
    assert SiteDataset(tmp_path, "faz", 1, "train").label_form == "point"
    assert SiteDataset(tmp_path, "faz", 1, "val").label_form == "mask"
    assert SiteDataset(tmp_path, "faz", 1, "test").label_form == "mask"
    val_weak = SiteDataset(tmp_path, "faz", 1, "val", label_form="point")
    assert val_weak.label_form == "point" and int(val_weak[0]["label"].max()) == FAZ.unlabelled
    full = SiteDataset(tmp_path, "faz", 1, "train", label_form="mask")
    assert torch.equal(full[0]["label"], full[0]["mask"])


def test_val_falls_back_to_weak_without_masks(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=4, n_train=4, n_test=1, with_mask=False)
    ds = SiteDataset(tmp_path, "faz", 4, "val")
    assert ds.label_form == "scribble" and "mask" not in ds[0]
    with pytest.raises(KeyError, match=r"test.*case000\.h5.*'mask' missing"):
        SiteDataset(tmp_path, "faz", 4, "test")


def test_preload_false_matches_preload(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "odoc", site=0, n_train=4, n_test=1, size=16)
    a = SiteDataset(tmp_path, "odoc", 0, "train")
    b = SiteDataset(tmp_path, "odoc", 0, "train", preload=False)
    for i in range(len(a)):
        for key in ("image", "label", "mask"):
            assert torch.equal(a[i][key], b[i][key])


def test_uint8_images_are_rescaled(tmp_path):
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for i in range(2):
        h5layout.write_case(tmp_path / "Domain1/train" / f"c{i}.h5", np.zeros((16, 16)), None, {})
        with h5py.File(tmp_path / "Domain1/train" / f"c{i}.h5", "r+") as f:
            del f["image"]
            f["image"] = img
            f["scribble_noisy"] = np.zeros((16, 16), np.uint8)
    s = SiteDataset(tmp_path, "faz", 0, "train", val_fraction=0.5)[0]
    assert torch.equal(s["image"][0], torch.from_numpy(img.astype(np.float32) / 255))


# ---------------------------------------------------------------- train/val split

def test_split_disjoint_covering_deterministic():
    names = [f"c{i}" for i in range(23)]
    train, val = split_train_val(names, 0.2, seed=7)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(names)
    assert len(val) == 5 and train == sorted(train) and val == sorted(val)
    assert split_train_val(list(reversed(names)), 0.2, seed=7) == (train, val)
    assert split_train_val(names, 0.2, seed=8) != (train, val)
    assert split_train_val(["a", "b"], 0.01, 0) [1] and split_train_val(["a", "b"], 0.99, 0)[0]
    assert split_train_val(["a"], 0.2, 0) == (["a"], [])


def test_dataset_split_uses_train_folder_only(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=0, n_train=10, n_test=3)
    train = SiteDataset(tmp_path, "faz", 0, "train")
    val = SiteDataset(tmp_path, "faz", 0, "val")
    test = SiteDataset(tmp_path, "faz", 0, "test")
    assert len(train) == 8 and len(val) == 2
    assert set(train.cases).isdisjoint(val.cases)
    assert sorted(train.cases + val.cases) == [f"case{i:03d}" for i in range(10)]
    assert all(p.parent.name == "train" for p in train.files + val.files)
    assert all(p.parent.name == "test" for p in test.files)
    assert SiteDataset(tmp_path, "faz", 0, "val").cases == val.cases


def test_val_needs_two_cases(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=0, n_train=1, n_test=1)
    assert len(SiteDataset(tmp_path, "faz", 0, "train")) == 1
    with pytest.raises(ValueError, match=r"Domain1/train.*no val cases"):
        SiteDataset(tmp_path, "faz", 0, "val")


# ---------------------------------------------------------------- augmentation

def _label_image(size: int = 33, seed: int = 0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, (size, size)).astype(np.uint8)
    return label[None].astype(np.float32), label


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("axis", [0, 1])
def test_rot_flip_aligns_exactly(k, axis):
    image, label = _label_image()
    image = np.concatenate([image, image + 10])
    out, (lab, lab2) = rot_flip(image, [label, label], k, axis)
    assert np.array_equal(out[0], lab) and np.array_equal(out[1] - 10, lab)
    assert np.array_equal(lab, lab2)


@pytest.mark.parametrize("angle", [-45.0, -13.7, 30.0, 45.0])
def test_rotate_aligns_and_fills(angle):
    image, label = _label_image()
    out, (lab,) = rotate(image, [label], angle, fill_label=3, image_order=0)
    inside = lab != 3
    assert inside.mean() > 0.5 and (~inside).any()
    assert np.array_equal(out[0][inside], lab[inside].astype(np.float32))
    assert (out[0][~inside] == 0).all()
    filled, _ = rotate(image, [label], angle, fill_label=3, image_fill=0.8)  # nearest by default
    assert np.array_equal(filled[0][inside], out[0][inside])
    assert (filled[0][~inside] == np.float32(0.8)).all()
    smooth, _ = rotate(image / 2, [label], angle, fill_label=3, image_order=1)  # stays within range
    assert smooth.min() >= 0 and smooth.max() <= 1


def test_random_augment_reproducible_and_aligned():
    image, label = _label_image()
    seen = set()
    for seed in range(30):
        a_img, (a_lab, a_mask) = random_augment(image, [label, label], np.random.default_rng(seed),
                                                fill_label=3, image_order=0)
        b_img, (b_lab, _) = random_augment(image, [label, label], np.random.default_rng(seed),
                                           fill_label=3, image_order=0)
        assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
        assert np.array_equal(a_lab, a_mask) and a_lab.dtype == np.uint8
        keep = a_lab != 3
        assert np.array_equal(a_img[0][keep], a_lab[keep].astype(np.float32))
        seen.add(a_img.tobytes())
    assert len(seen) > 10


def test_dataset_augment_keeps_label_and_mask_aligned(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=0, n_train=3, n_test=1, size=20)
    ds = SiteDataset(tmp_path, "faz", 0, "train", label_form="mask", augment=True)
    for seed in range(10):
        s = ds.sample(0, np.random.default_rng(seed))
        assert torch.equal(s["label"], s["mask"])
        assert s["image"].shape == (1, 20, 20) and s["image"].is_contiguous()


# ---------------------------------------------------------------- batches

def test_infinite_batches_reproducible_and_epoch_covering(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=0, n_train=6, n_test=1, size=16)
    ds = SiteDataset(tmp_path, "faz", 0, "train", augment=True)  # 5 cases
    a, b = InfiniteBatches(ds, 4, seed=3), InfiniteBatches(ds, 4, seed=3)
    first = [next(a) for _ in range(4)]
    for batch in first:
        other = next(b)
        assert batch["image"].shape == (4, 1, 16, 16) and batch["label"].shape == (4, 16, 16)
        assert batch["mask"].dtype == torch.int64 and len(batch["case"]) == 4
        assert torch.equal(batch["image"], other["image"]) and batch["case"] == other["case"]
    cases = sum((batch["case"] for batch in first), [])
    for epoch in range(3):  # each block of len(ds) draws is a permutation
        assert sorted(cases[5 * epoch:5 * epoch + 5]) == sorted(ds.cases)
    c = InfiniteBatches(ds, 4, seed=4)
    assert [next(c)["case"] for _ in range(4)] != [x["case"] for x in first]


def test_infinite_batches_resume(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "faz", site=0, n_train=4, n_test=1, size=16)
    ds = SiteDataset(tmp_path, "faz", 0, "train", augment=True)
    stream = InfiniteBatches(ds, 5, seed=1)  # batch larger than the dataset
    next(stream)
    state = stream.state_dict()
    expected = next(stream)
    resumed = InfiniteBatches(ds, 5, seed=99)
    resumed.load_state_dict(state)
    got = next(resumed)
    assert torch.equal(got["image"], expected["image"]) and got["case"] == expected["case"]


def test_make_loader(tmp_path, make_h5_site):
    make_h5_site(tmp_path, "odoc", site=2, n_train=2, n_test=3, size=16)
    batches = list(make_loader(SiteDataset(tmp_path, "odoc", 2, "test"), batch_size=2))
    assert [b["image"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["image"].shape == (2, 3, 16, 16)


# ---------------------------------------------------------------- bad input

def _case(tmp_path: Path, name: str = "bad", split: str = "train") -> Path:
    return tmp_path / "Domain1" / split / f"{name}.h5"


def _good(size: int = 16):
    image = np.full((size, size), 0.5, np.float32)
    mask = np.zeros((size, size), np.uint8)
    mask[4:8, 4:8] = 1
    return image, mask, {"scribble_noisy": np.full((size, size), 2, np.uint8)}


def _write_site(tmp_path: Path, image=None, mask="default", labels=None, split="train"):
    """Two good cases plus one case 'bad' with the given arrays (defaults: good ones)."""
    g_image, g_mask, g_labels = _good()
    for name in ("ok1", "ok2"):
        h5layout.write_case(_case(tmp_path, name, split), g_image, g_mask, g_labels)
    h5layout.write_case(_case(tmp_path, "bad", split),
                        g_image if image is None else image,
                        g_mask if isinstance(mask, str) else mask,
                        g_labels if labels is None else labels)


def _raises(tmp_path, match, exc=(ValueError, KeyError), split="train", **kw):
    for preload in (True, False):
        with pytest.raises(exc, match=match):
            ds = SiteDataset(tmp_path, "faz", 0, split, val_fraction=0.0 if split != "test" else 0.2,
                             preload=preload)
            for i in range(len(ds)):  # lazy datasets validate pixels on access
                ds[i]


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist"):
        SiteDataset(tmp_path / "nowhere", "faz", 0, "train")


def test_missing_and_empty_site_folder(tmp_path):
    (tmp_path / "Domain1" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"Domain1/train holds no \.h5"):
        SiteDataset(tmp_path, "faz", 0, "train")
    with pytest.raises(FileNotFoundError, match=r"Domain2/train does not exist"):
        SiteDataset(tmp_path, "faz", 1, "train")


def test_corrupt_h5(tmp_path):
    _write_site(tmp_path)
    _case(tmp_path).write_bytes(b"this is not an HDF5 file")
    _raises(tmp_path, r"bad\.h5: not a readable HDF5 file")


def test_missing_label_key(tmp_path):
    _write_site(tmp_path, labels={"box": _good()[1]})
    _raises(tmp_path, r"bad\.h5: dataset 'scribble_noisy' missing")


def test_missing_image(tmp_path):
    _write_site(tmp_path)
    with h5py.File(_case(tmp_path), "r+") as f:
        del f["image"]
    _raises(tmp_path, r"bad\.h5: dataset 'image' missing")


def test_weak_label_out_of_range(tmp_path):
    _write_site(tmp_path, labels={"scribble_noisy": np.full((16, 16), 3, np.uint8)})
    _raises(tmp_path, r"bad\.h5: 'scribble_noisy' holds values \[3\]; expected 0\.\.2")


def test_mask_with_unlabelled_value(tmp_path):
    _write_site(tmp_path, mask=np.full((16, 16), 2, np.uint8), split="test")
    _raises(tmp_path, r"bad\.h5: 'mask' holds values \[2\]; expected 0\.\.1 for a full mask",
            split="test")


def test_shape_mismatch(tmp_path):
    _write_site(tmp_path, labels={"scribble_noisy": np.zeros((16, 15), np.uint8)})
    _raises(tmp_path, r"bad\.h5: 'scribble_noisy' has shape \(16, 15\); expected \(16, 16\)")


def test_channel_mismatch(tmp_path):
    _write_site(tmp_path, image=np.zeros((3, 16, 16), np.float32))
    _raises(tmp_path, r"bad\.h5: image has shape \(3, 16, 16\); the task expects 1 channel")
    odoc_root = tmp_path / "odoc"
    g_image, g_mask, _ = _good()
    for name in ("a", "b"):  # (H, W) image for a 3-channel task
        h5layout.write_case(odoc_root / "Domain1/train" / f"{name}.h5", g_image, g_mask,
                            {"scribble": g_mask})
    with pytest.raises(ValueError, match=r"/[ab]\.h5: image has shape \(16, 16\); the task expects 3"):
        SiteDataset(odoc_root, "odoc", 0, "train")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_pixels(tmp_path, value):
    image = _good()[0]
    image[3, 3] = value
    _write_site(tmp_path, image=image)
    _raises(tmp_path, r"bad\.h5: image contains 1 NaN/inf pixel")


def test_image_out_of_range(tmp_path):
    _write_site(tmp_path, image=np.full((16, 16), 255.0, np.float32))
    _raises(tmp_path, r"bad\.h5: image values span \[255, 255\]; expected \[0, 1\]")


def test_tiny_range_excess_is_clipped(tmp_path):
    _write_site(tmp_path, image=np.full((16, 16), 1 + 1e-6, np.float32))
    ds = SiteDataset(tmp_path, "faz", 0, "train", val_fraction=0.0)
    assert max(float(ds[i]["image"].max()) for i in range(len(ds))) == 1.0
