"""Synthetic federations: layout, value ranges, weak labels, determinism, site shifts, previews."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from dataloaders import h5layout
from dataloaders.preview import preview_federation, real_faz_tile, write_docs_images
from dataloaders.synthetic import METADATA_NAME, generate_federation, main
from dataloaders.tasks import WEAK_FORM_KEYS, get_task

SIZE, N_TRAIN, N_TEST, SEED = 48, 4, 2, 0
REAL_FAZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "FAZ"


@pytest.fixture(scope="module", params=["faz", "odoc"])
def federation(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param) / "fed"
    generate_federation(request.param, root, SIZE, N_TRAIN, N_TEST, SEED)
    return request.param, root


def _files(root: Path):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout_and_metadata(federation) -> None:
    name, root = federation
    task = get_task(name)
    for site in range(task.num_sites):
        assert len(h5layout.list_cases(root, site, "train")) == N_TRAIN
        assert len(h5layout.list_cases(root, site, "test")) == N_TEST
    assert not list(root.rglob("*.tmp"))
    meta = json.loads((root / METADATA_NAME).read_text())
    assert meta["task"] == f"synthetic_{name}" and meta["synthetic_of"] == name
    assert (meta["seed"], meta["size"]) == (SEED, SIZE)
    assert (meta["train_per_site"], meta["test_per_site"]) == (N_TRAIN, N_TEST)
    assert [s["weak_form"] for s in meta["sites"]] == [s.weak_form for s in task.sites]
    assert meta["num_classes"] == task.num_classes


def test_arrays_shapes_dtypes_and_ranges(federation) -> None:
    name, root = federation
    task = get_task(name)
    nc = task.num_classes
    shape = (SIZE, SIZE) if task.in_chns == 1 else (3, SIZE, SIZE)
    for site in range(task.num_sites):
        for split in ("train", "test"):
            for path in h5layout.list_cases(root, site, split):
                with h5py.File(path, "r") as f:
                    keys = set(f.keys())
                    image, mask = f["image"][()], f["mask"][()]
                    weak = {k: f[k][()] for k in keys - {"image", "mask"}}
                assert image.shape == shape and image.dtype == np.float32
                assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.02
                assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
                assert set(np.unique(mask)) == set(range(nc)), f"{path}: every class present"
                if split == "test":
                    assert keys == {"image", "mask"}
                    continue
                assert set(weak) == set(WEAK_FORM_KEYS.values())
                for key, label in weak.items():
                    assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
                    assert label.max() <= nc
                    assert set(np.unique(label)) == set(range(nc + 1)), f"{path}:{key}"
                    if key in ("keypoint", "block", "scribble"):
                        sel = label < nc
                        assert np.array_equal(label[sel], mask[sel]), f"{path}:{key}"
                    if key == "box":
                        assert not np.any((label == 0) & (mask > 0))


def test_site_weak_form_is_sparse(federation) -> None:
    name, root = federation
    task = get_task(name)
    for site in range(task.num_sites):
        key = WEAK_FORM_KEYS[task.site(site).weak_form]
        data = h5layout.read_case(h5layout.list_cases(root, site, "train")[0], [key])
        assert np.any(data[key] == task.num_classes), "a weak label leaves pixels unlabelled"


def test_sites_differ_in_image_statistics(federation) -> None:
    name, root = federation
    stats = []
    for site in range(get_task(name).num_sites):
        images = np.stack([h5layout.read_case(p, ["image"])["image"]
                           for p in h5layout.list_cases(root, site, "train")])
        stats.append([images.mean(), images.std(), np.abs(np.diff(images, axis=-1)).mean()])
    stats = np.asarray(stats)
    gaps = np.abs(stats[:, None] - stats[None]).max(-1)
    np.fill_diagonal(gaps, np.inf)
    assert gaps.min() > 0.01, f"two sites look alike: {np.round(stats, 3)}"


def test_cases_differ_within_a_site(federation) -> None:
    _, root = federation
    a, b = (h5layout.read_case(p) for p in h5layout.list_cases(root, 0, "train")[:2])
    assert not np.array_equal(a["image"], b["image"])
    assert not np.array_equal(a["mask"], b["mask"])


def test_same_seed_gives_identical_bytes(federation, tmp_path) -> None:
    name, root = federation
    again = tmp_path / "again"
    generate_federation(name, again, SIZE, N_TRAIN, N_TEST, SEED)
    assert _files(root) == _files(again)
    for rel in _files(root):
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_other_seed_gives_other_data(federation, tmp_path) -> None:
    name, root = federation
    other = tmp_path / "other"
    generate_federation(name, other, SIZE, N_TRAIN, N_TEST, SEED + 1)
    for rel in (Path("Domain1/train/d1_train_0000.h5"), Path("Domain5/test/d5_test_0001.h5")):
        a, b = h5layout.read_case(root / rel), h5layout.read_case(other / rel)
        assert not np.array_equal(a["image"], b["image"])


def test_regeneration_removes_stale_cases(tmp_path) -> None:
    root = tmp_path / "fed"
    generate_federation("faz", root, 32, 3, 2, 0)
    generate_federation("synthetic_faz", root, 32, 1, 1, 0)
    assert len(list(root.rglob("*.h5"))) == 5 * 2
    assert json.loads((root / METADATA_NAME).read_text())["train_per_site"] == 1


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        generate_federation("prostate", tmp_path / "a", 48, 1, 1, 0)
    with pytest.raises(ValueError, match="size"):
        generate_federation("faz", tmp_path / "a", 16, 1, 1, 0)
    with pytest.raises(ValueError, match="at least 1"):
        generate_federation("odoc", tmp_path / "a", 48, 0, 1, 0)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_federation("faz", busy, 48, 1, 1, 0)
    assert (busy / "notes.txt").read_text() == "mine"


def test_cli(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["--task", "odoc", "--out", str(out), "--size", "32",
                 "--train-per-site", "1", "--test-per-site", "1", "--seed", "5"]) == 0
    assert "wrote 10 cases" in capsys.readouterr().out
    assert json.loads((out / METADATA_NAME).read_text())["seed"] == 5
    assert main(["--task", "nope", "--out", str(out)]) == 2


def test_preview_png(federation, tmp_path) -> None:
    name, root = federation
    png = preview_federation(root, name, tmp_path / "p.png", tile=40)
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.width == 5 * 40 + 6 * 4 and im.height > 40
        pixels = np.asarray(im)
    # Some pixels carry the overlay colours (red for class 1, blue for background).
    rgb = pixels.astype(int)
    assert np.any(rgb[..., 0] - rgb[..., 1] > 80)
    assert np.any(rgb[..., 2] - rgb[..., 0] > 80)


def test_docs_images_without_real_data(tmp_path) -> None:
    written = write_docs_images(tmp_path, real_root=tmp_path / "absent", tile=32)
    assert sorted(p.name for p in written) == sorted(
        [f"faz_site{k}.png" for k in range(1, 6)] + ["odoc_synthetic.png"])
    for path in written:
        assert path.stat().st_size < 150_000


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_FAZ / "Domain1").is_dir(), reason="real FAZ release absent")
def test_real_faz_tile_reads_the_png_release() -> None:
    for site in range(5):
        tile = real_faz_tile(REAL_FAZ, site, 0, 256)
        assert tile.size == (256, 256)
        rgb = np.asarray(tile).astype(int)
        assert np.any(rgb[..., 0] - rgb[..., 1] > 80)  # some FAZ pixel labelled red
        assert np.any(rgb[..., 2] - rgb[..., 0] > 80)  # some background pixel labelled blue
