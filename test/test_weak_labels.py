"""Contract of the weak-label generator on many random masks, its errors, and its CLI."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import h5py
import numpy as np
import pytest
from scipy import ndimage as ndi

from dataloaders import h5layout
from dataloaders.tasks import WEAK_FORM_KEYS
from dataloaders.weak_labels import (
    BOX_ENLARGE, add_weak_labels, main, make_weak_label, make_weak_labels,
)

FORMS = tuple(WEAK_FORM_KEYS)
EXACT_FORMS = ("point", "block", "scribble")


def _ellipse(shape, centre, radii, angle=0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / radii[1]) ** 2 + (v / radii[0]) ** 2 <= 1.0


def _random_mask(rng: np.random.Generator) -> Tuple[np.ndarray, int]:
    """A random 2- or 3-class mask: ellipses, nested disc/cup, or thresholded blobs."""
    h, w = (int(v) for v in rng.integers(20, 56, size=2))
    kind = rng.integers(0, 4)
    if kind == 0:  # one to three ellipses anywhere, possibly cut by the border
        mask = np.zeros((h, w), dtype=np.int64)
        for _ in range(int(rng.integers(1, 4))):
            e = _ellipse((h, w), rng.uniform(-3, [h + 3, w + 3]), rng.uniform(1, 12, 2),
                         rng.uniform(0, np.pi))
            mask[e] = 1
        return mask, 2
    if kind == 1:  # nested: cup (1) inside disc rim (2), like fundus
        centre = rng.uniform([0.3 * h, 0.3 * w], [0.7 * h, 0.7 * w])
        disc = _ellipse((h, w), centre, rng.uniform(4, 14, 2), rng.uniform(0, np.pi))
        cup = _ellipse((h, w), centre + rng.normal(0, 1, 2), rng.uniform(1, 6, 2)) & disc
        mask = np.where(cup, 1, np.where(disc, 2, 0))
        return mask, 3
    if kind == 2:  # irregular multi-component blobs from smoothed noise
        field = ndi.gaussian_filter(rng.normal(size=(h, w)), rng.uniform(1.5, 4))
        mask = (field > np.quantile(field, rng.uniform(0.6, 0.95))).astype(np.int64)
        return mask, 2
    # three classes side by side from thresholded noise (a class may be absent)
    field = ndi.gaussian_filter(rng.normal(size=(h, w)), 3)
    q = np.quantile(field, [0.5, 0.8])
    mask = np.digitize(field, q)
    if rng.random() < 0.3:
        mask[mask == 2] = 0
    return mask, 3


def _edge_cases() -> List[Tuple[str, np.ndarray, int]]:
    cases = []
    m = np.zeros((30, 30), dtype=np.int64)
    cases.append(("only background", m.copy(), 2))
    cases.append(("only foreground", np.ones((24, 17), dtype=np.int64), 2))
    one = m.copy()
    one[13, 7] = 1
    cases.append(("single pixel", one, 2))
    corner = m.copy()
    corner[0, 0] = 1
    cases.append(("pixel in corner", corner, 2))
    border = m.copy()
    border[:, :6] = 1
    cases.append(("strip on border", border, 2))
    line = m.copy()
    line[5:25, 14] = 1
    cases.append(("one-pixel line", line, 2))
    almost = np.ones((20, 20), dtype=np.int64)
    almost[19, 19] = 0
    cases.append(("background one pixel", almost, 2))
    ring = np.zeros((40, 40), dtype=np.int64)
    yy, xx = np.mgrid[0:40, 0:40]
    r = np.hypot(yy - 20, xx - 20)
    ring[(r > 8) & (r < 12)] = 1
    cases.append(("ring", ring, 2))
    nested = np.where(r < 3, 1, np.where(r < 5, 2, 0))
    cases.append(("tiny nested", nested, 3))
    thin_rim = np.where(r < 9, 1, np.where(r < 10, 2, 0))
    cases.append(("one-pixel rim", thin_rim, 3))
    three_only = np.full((16, 16), 2, dtype=np.int64)
    three_only[4:8, 4:8] = 1
    cases.append(("no background", three_only, 3))
    cases.append(("tiny image", np.array([[0, 1], [1, 0]]), 2))
    return cases


def _all_masks() -> List[Tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(12345)
    masks = [(f"random {i}", *_random_mask(rng)) for i in range(200)]
    return masks + _edge_cases()


MASKS = _all_masks()


def _check_contract(name: str, mask: np.ndarray, nc: int, form: str, label: np.ndarray) -> None:
    where = f"{form} on {name}"
    assert label.shape == mask.shape and label.dtype == np.uint8, where
    assert label.max() <= nc, where
    for c in np.unique(mask):
        assert np.any(label == c), f"{where}: class {c} present but never labelled"
    labelled = label < nc
    if form in EXACT_FORMS:
        wrong = labelled & (label != mask)
        assert not wrong.any(), f"{where}: {wrong.sum()} labelled pixels disagree with the mask"
    if form == "box":
        # No object pixel is ever labelled background.
        assert not np.any((label == 0) & (mask > 0)), f"{where}: object pixel labelled background"


@pytest.mark.parametrize("form", FORMS)
def test_contract_on_many_masks(form: str) -> None:
    for i, (name, mask, nc) in enumerate(MASKS):
        label = make_weak_label(mask, form, nc, np.random.default_rng(i))
        _check_contract(name, mask, nc, form, label)


def test_deterministic_given_rng() -> None:
    for name, mask, nc in MASKS[:20]:
        for form in FORMS:
            a = make_weak_label(mask, form, nc, np.random.default_rng(7))
            b = make_weak_label(mask, form, nc, np.random.default_rng(7))
            assert np.array_equal(a, b), f"{form} on {name} not deterministic"
    # ... and different seeds do give different labels somewhere.
    _, mask, nc = MASKS[0]
    differs = [not np.array_equal(make_weak_label(mask, f, nc, np.random.default_rng(1)),
                                  make_weak_label(mask, f, nc, np.random.default_rng(2)))
               for f in ("point", "block", "scribble_noisy")]
    assert any(differs)


def test_box_geometry_on_a_square() -> None:
    mask = np.zeros((100, 100), dtype=np.int64)
    mask[35:65, 35:65] = 1  # 30 x 30 object
    label = make_weak_label(mask, "box", 2, np.random.default_rng(0))
    fg = np.argwhere(label == 1)
    assert fg.min(0).tolist() == [45, 45] and fg.max(0).tolist() == [54, 54]
    assert np.count_nonzero(label == 1) == 100  # central third, filled
    # Enlarged box: half-extent 15 * 1.2 = 18 around the centre 49.5 -> rows/cols 32..67.
    assert BOX_ENLARGE == pytest.approx(1.2)
    unlabelled = np.argwhere(label == 2)
    assert unlabelled.min(0).tolist() == [32, 32] and unlabelled.max(0).tolist() == [67, 67]
    assert np.all(label[:32] == 0) and np.all(label[68:] == 0)


def test_box_for_nested_classes_uses_thin_ellipses() -> None:
    yy, xx = np.mgrid[0:80, 0:80]
    r = np.hypot(yy - 40, xx - 40)
    mask = np.where(r < 10, 1, np.where(r < 22, 2, 0))
    label = make_weak_label(mask, "box", 3, np.random.default_rng(0))
    for c in (1, 2):
        sel = label == c
        assert sel.any() and np.all(mask[sel] == c)
        assert sel.sum() < 0.35 * np.count_nonzero(mask == c)  # a thin curve, not a fill
    assert not np.any((label == 0) & (mask > 0))


def test_shapes_of_point_and_scribble_on_a_large_object() -> None:
    mask = _ellipse((96, 96), (48, 50), (20, 26), 0.3).astype(np.int64)
    area = np.count_nonzero(mask)
    for seed in range(5):
        point = make_weak_label(mask, "point", 2, np.random.default_rng(seed))
        pieces, count = ndi.label(point == 1)
        assert 1 <= count <= 5 and np.bincount(pieces.ravel())[1:].max() <= 13
        assert np.count_nonzero(point == 0) <= 5 * 13
        scribble = make_weak_label(mask, "scribble", 2, np.random.default_rng(seed))
        assert 5 <= np.count_nonzero(scribble == 1) < 0.2 * area
        block = make_weak_label(mask, "block", 2, np.random.default_rng(seed))
        assert np.count_nonzero(block == 1) >= 9


def test_noisy_scribbles_cross_boundaries_but_mostly_agree() -> None:
    wrong = total = 0
    for i, (_, mask, nc) in enumerate(MASKS[:100]):
        label = make_weak_label(mask, "scribble_noisy", nc, np.random.default_rng(i))
        sel = label < nc
        wrong += np.count_nonzero(sel & (label != mask))
        total += np.count_nonzero(sel)
    assert 0 < wrong < 0.5 * total


def test_make_weak_labels_returns_every_key() -> None:
    _, mask, nc = MASKS[1]
    labels = make_weak_labels(mask, nc, np.random.default_rng(0))
    assert set(labels) == set(WEAK_FORM_KEYS.values())


@pytest.mark.parametrize("mask, form, nc, words", [
    (np.zeros((8, 8), int), "scribbles", 2, "unknown weak form"),
    (np.zeros((8, 8), int), "keypoint", 2, "unknown weak form"),
    (np.full((8, 8), 2), "point", 2, "mask values"),
    (np.full((8, 8), -1), "point", 2, "mask values"),
    (np.zeros((2, 8, 8), int), "point", 2, "2-D"),
    (np.zeros(8, int), "box", 2, "2-D"),
    (np.zeros((8, 8)), "box", 2, "integer"),
    (np.zeros((0, 8), int), "box", 2, "empty"),
    (np.zeros((8, 8), int), "box", 1, "num_classes"),
])
def test_bad_inputs_raise(mask, form, nc, words) -> None:
    with pytest.raises(ValueError, match=words):
        make_weak_label(mask, form, nc, np.random.default_rng(0))


def _tiny_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for site in range(2):
        for k in range(2):
            mask = _ellipse((32, 32), (16 + k, 15), (6, 8)).astype(np.uint8)
            image = mask.astype(np.float32) * 0.5
            h5layout.write_case(root / f"Domain{site + 1}" / "train" / f"c{k}.h5", image, mask,
                                {"scribble": np.full((32, 32), 2, np.uint8)})
        h5layout.write_case(root / f"Domain{site + 1}" / "test" / "t0.h5",
                            np.zeros((32, 32), np.float32), np.zeros((32, 32), np.uint8), {})
    # A train case without a mask is left alone.
    h5layout.write_case(root / "Domain1" / "train" / "nomask.h5", np.zeros((32, 32)), None, {})
    return root


def test_cli_adds_weak_labels(tmp_path: Path, capsys) -> None:
    root = _tiny_root(tmp_path)
    assert main([str(root), "--task", "faz", "--seed", "3"]) == 0
    assert "4 files updated" in capsys.readouterr().out
    case = root / "Domain2" / "train" / "c1.h5"
    data = h5layout.read_case(case)
    assert set(WEAK_FORM_KEYS.values()) <= set(data)
    assert np.all(data["scribble"] == 2)  # existing form kept without --overwrite
    for key in set(WEAK_FORM_KEYS.values()) - {"scribble"}:
        assert data[key].dtype == np.uint8 and np.any(data[key] == 1)
    with h5py.File(root / "Domain1" / "test" / "t0.h5") as f:
        assert set(f.keys()) == {"image", "mask"}
    with h5py.File(root / "Domain1" / "train" / "nomask.h5") as f:
        assert set(f.keys()) == {"image"}
    before = case.read_bytes()
    counts = add_weak_labels(root, 2, seed=3)
    assert counts["files"] == 0 and case.read_bytes() == before
    counts = add_weak_labels(root, 2, forms=["scribble"], seed=3, overwrite=True)
    assert counts == {"files": 4, "skipped": 1, "labels": 4}
    assert np.any(h5layout.read_case(case, ["scribble"])["scribble"] == 1)
    assert not list(root.rglob("*.tmp"))


def test_cli_is_deterministic_and_reports_errors(tmp_path: Path, capsys) -> None:
    a, b = _tiny_root(tmp_path / "a"), _tiny_root(tmp_path / "b")
    main([str(a), "--task", "faz", "--forms", "point", "box"])
    main([str(b), "--task", "faz", "--forms", "point", "box"])
    for fa in sorted(a.rglob("*.h5")):
        assert fa.read_bytes() == (b / fa.relative_to(a)).read_bytes()
    assert main([str(a), "--task", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--task", "faz"]) == 2
    # A mask with values beyond the task's classes is named in the error.
    bad = tmp_path / "bad"
    h5layout.write_case(bad / "Domain1" / "train" / "x.h5", np.zeros((8, 8)),
                        np.full((8, 8), 3, np.uint8), {})
    assert main([str(bad), "--task", "faz"]) == 2
    err = capsys.readouterr().err
    assert "x.h5" in err and "mask values" in err
