"""Sparse ("weak") labels derived from full masks, in the forms of the published releases.

Every label map uses ``0 .. num_classes - 1`` for the classes and ``num_classes`` for unlabelled
pixels. The forms (keys of :data:`dataloaders.tasks.WEAK_FORM_KEYS`):

``point``
    a few small discs (radius 1-2 px) per class, each fully inside its class region; background
    points are taken close to the objects, as in the released FAZ labels.
``box``
    two classes: per object (connected component), the central third of its bounding box is
    labelled as the object's class, everything outside the union of all bounding boxes enlarged
    1.2x is background, the ring between stays unlabelled. More classes (nested structures such
    as cup inside disc): each object gets a thin ellipse scribble inscribed in its bounding box
    and clipped to the object, background is labelled as above.
``block``
    a few square patches per class, each fully inside its class region.
``scribble``
    thin curves inside each class region: an arc of an inner level set of the distance to the
    region boundary; for the background a ring around the objects.
``scribble_noisy``
    the same curves, less deep inside, warped by a smooth random displacement so that they may
    cross the boundaries by a few pixels.

Guarantees (tested): for ``point``, ``block`` and ``scribble`` every labelled pixel has the
mask's class; every class present in the mask gets at least one labelled pixel in every form;
``box`` never labels an object pixel as background.

CLI: ``python -m dataloaders.weak_labels ROOT --task T [--forms ...] [--seed S] [--overwrite]``
adds weak-label datasets to every train case under ``ROOT`` that has a ``mask``.
"""
from __future__ import annotations

import argparse
import re
import sys
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from dataloaders import h5layout
from dataloaders.tasks import WEAK_FORM_KEYS, get_task

__all__ = ["make_weak_label", "make_weak_labels", "add_weak_labels", "main"]

#: Bounding boxes are enlarged by this factor; background is labelled outside them.
BOX_ENLARGE = 1.2

_Coords = Tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- helpers
def _inner_distance(region: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Distance from each pixel of ``region`` to the nearest pixel outside it (0 outside).

    The image border is not a boundary, unless the region fills the whole image (then the
    distance to the border is used, so that level sets still exist).
    """
    if region.all():
        region = np.pad(region, 1, constant_values=False)
        crop = (slice(1, -1), slice(1, -1))
    else:
        crop = (slice(None), slice(None))
    if metric == "euclidean":
        dist = ndi.distance_transform_edt(region)
    else:
        dist = ndi.distance_transform_cdt(region, metric=metric).astype(np.float64)
    return dist[crop]


def _deepest(dist: np.ndarray) -> _Coords:
    """Coordinates of the pixels of maximal distance (never empty for a non-empty region)."""
    return np.nonzero(dist == dist.max())


def _level_band(dist: np.ndarray, t: float, width: float) -> np.ndarray:
    """Pixels whose inner distance lies in ``[t, t + width]`` (``t >= 1`` keeps it inside)."""
    t = min(max(t, 1.0), max(dist.max() - width, 1.0))
    return (dist >= t) & (dist <= t + width)


def _arc(ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator,
         span: Tuple[float, float]) -> np.ndarray:
    """Boolean selection of the points lying on one random angular arc around their centroid."""
    if ys.size == 0:
        return np.zeros(0, dtype=bool)
    theta = np.arctan2(ys - ys.mean(), xs - xs.mean())
    start = rng.uniform(0.0, 2 * np.pi)
    frac = rng.uniform(*span)
    keep = np.mod(theta - start, 2 * np.pi) < frac * 2 * np.pi
    return keep if keep.any() else np.ones_like(keep)


def _object_radius(mask: np.ndarray) -> float:
    """Radius of a disc with the area of all foreground (label >= 1) pixels."""
    return float(np.sqrt(np.count_nonzero(mask > 0) / np.pi))


def _disc_offsets(radius: int) -> _Coords:
    r = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    inside = dy ** 2 + dx ** 2 <= radius ** 2
    return dy[inside], dx[inside]


def _paint(out: np.ndarray, ys: np.ndarray, xs: np.ndarray, value: int) -> None:
    """Set the in-image pixels among ``(ys, xs)`` of ``out`` to ``value``."""
    h, w = out.shape
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[ok], xs[ok]] = value


def _present(mask: np.ndarray, num_classes: int) -> List[int]:
    return [c for c in range(num_classes) if np.any(mask == c)]


# --------------------------------------------------------------------------- forms
def _point(mask: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    out = np.full(mask.shape, num_classes, dtype=np.uint8)
    has_fg = np.any(mask > 0)
    for c in _present(mask, num_classes):
        dist = _inner_distance(mask == c)
        radius = int(rng.integers(1, 3))
        # A disc of radius r centred at p lies inside the region when dist(p) > r.
        while radius > 0 and not np.any(dist > radius):
            radius -= 1
        cand = dist > radius if radius > 0 else dist > 0
        if c == 0 and has_fg:
            # Background points near the objects, as annotators place them.
            near = cand & (dist <= max(np.median(dist[cand]), radius + 1.0))
            cand = near if near.any() else cand
        cy, cx = np.nonzero(cand)
        n = min(int(rng.integers(3, 6)), cy.size)
        pick = rng.choice(cy.size, size=n, replace=False)
        dy, dx = _disc_offsets(radius)
        _paint(out, (cy[pick, None] + dy).ravel(), (cx[pick, None] + dx).ravel(), c)
    return out


def _block(mask: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    out = np.full(mask.shape, num_classes, dtype=np.uint8)
    has_fg = np.any(mask > 0)
    cap = max(1, min(mask.shape) // 8)
    for c in _present(mask, num_classes):
        # Chessboard distance: a square of half-width k at p lies inside when cdist(p) > k.
        cdist = _inner_distance(mask == c, metric="chessboard")
        kmax = int(cdist.max()) - 1
        background = c == 0 and has_fg
        k = int(np.floor(kmax * rng.uniform(0.4, 0.8)))
        if background:
            k = min(k, cap)
        cy, cx = np.nonzero(cdist > k)
        n = int(rng.integers(2, 5)) if background else int(rng.integers(1, 3))
        pick = rng.choice(cy.size, size=min(n, cy.size), replace=False)
        r = np.arange(-k, k + 1)
        dy, dx = (a.ravel() for a in np.meshgrid(r, r, indexing="ij"))
        _paint(out, (cy[pick, None] + dy).ravel(), (cx[pick, None] + dx).ravel(), c)
    return out


def _scribble_pixels(mask: np.ndarray, c: int, rng: np.random.Generator,
                     depth: Tuple[float, float], width: float) -> _Coords:
    """Pixels of one scribble of class ``c``, all inside the class region."""
    region = mask == c
    dist = _inner_distance(region)
    if c == 0 and np.any(mask > 0):
        # Background: a ring around the objects, one to three object radii away from them.
        t = min(rng.uniform(1.2, 3.0) * _object_radius(mask), 0.7 * dist.max())
        span = (0.75, 1.0)
    else:
        t = rng.uniform(*depth) * dist.max()
        span = (0.4, 0.85)
    if c != 0 and np.any(ndi.binary_fill_holes(region) & ~region):
        # A ring (a disc rim): its level sets come in parallel pairs; its medial axis is the
        # one stroke an annotator would draw round it.
        band = skeletonize(region)
    else:
        band = _level_band(dist, t, width)
    if span[0] < 0.75:
        band = _one_curve_per_object(band, region)
    ys, xs = np.nonzero(band)
    if ys.size == 0:
        return _deepest(dist)
    keep = _arc(ys, xs, rng, span)
    return ys[keep], xs[keep]


def _one_curve_per_object(band: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Keep, within each connected object, only the longest piece of the level band.

    The level set of a ring-shaped object (a disc rim) has two parallel branches; an annotator
    draws one stroke.
    """
    eight = np.ones((3, 3), dtype=bool)
    pieces, count = ndi.label(band, structure=eight)
    if count <= 1:
        return band
    objects, _ = ndi.label(region, structure=eight)
    sizes = np.bincount(pieces.ravel())[1:]
    owner = ndi.labeled_comprehension(objects, pieces, np.arange(1, count + 1), np.max, int, 0)
    keep = np.zeros(count + 1, dtype=bool)
    # Stable sort by size, largest first; the first piece seen for an object wins.
    seen = set()
    for piece in np.argsort(-sizes, kind="stable"):
        if owner[piece] not in seen:
            seen.add(owner[piece])
            keep[piece + 1] = True
    return keep[pieces]


def _scribble(mask: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    out = np.full(mask.shape, num_classes, dtype=np.uint8)
    for c in _present(mask, num_classes):
        ys, xs = _scribble_pixels(mask, c, rng, depth=(0.3, 0.7), width=1.0)
        out[ys, xs] = c
    return out


def _smooth_field(shape: Tuple[int, int], rng: np.random.Generator, amplitude: float,
                  ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A smooth random displacement (one component) sampled at ``(ys, xs)``."""
    grid = rng.normal(0.0, amplitude, size=(5, 5))
    gy = ys * (4.0 / max(shape[0] - 1, 1))
    gx = xs * (4.0 / max(shape[1] - 1, 1))
    return ndi.map_coordinates(grid, [gy, gx], order=1, mode="nearest")


def _scribble_noisy(mask: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    out = np.full(mask.shape, num_classes, dtype=np.uint8)
    classes = _present(mask, num_classes)
    amplitude = max(1.0, 0.025 * min(mask.shape))
    clean: Dict[int, _Coords] = {}
    for c in classes:
        ys, xs = _scribble_pixels(mask, c, rng, depth=(0.15, 0.45), width=1.0)
        clean[c] = (ys, xs)
        shift = rng.uniform(-amplitude, amplitude, size=2)
        ny = ys + shift[0] + _smooth_field(mask.shape, rng, amplitude, ys, xs)
        nx = xs + shift[1] + _smooth_field(mask.shape, rng, amplitude, ys, xs)
        _paint(out, np.rint(ny).astype(np.intp), np.rint(nx).astype(np.intp), c)
    # A class whose warped scribble left the image or was painted over gets its clean one;
    # clean scribbles of different classes never overlap, so this terminates.
    for _ in classes:
        lost = [c for c in classes if not np.any(out == c)]
        if not lost:
            break
        for c in lost:
            out[clean[c]] = c
    return out


def _enlarged_box(ys: np.ndarray, xs: np.ndarray, shape: Tuple[int, int]) -> Tuple[slice, slice]:
    """The bounding box of ``(ys, xs)`` enlarged ``BOX_ENLARGE`` times about its centre."""
    out = []
    for coords, size in ((ys, shape[0]), (xs, shape[1])):
        lo, hi = int(coords.min()), int(coords.max())
        centre, half = (lo + hi) / 2.0, (hi - lo + 1) / 2.0 * BOX_ENLARGE
        elo = min(lo, int(np.floor(centre - half + 0.5)))
        ehi = max(hi, int(np.ceil(centre + half - 0.5)))
        out.append(slice(max(elo, 0), min(ehi, size - 1) + 1))
    return out[0], out[1]


def _box(mask: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    out = np.full(mask.shape, num_classes, dtype=np.uint8)
    outside = np.ones(mask.shape, dtype=bool)
    fg_labels: List[Tuple[np.ndarray, int]] = []
    for c in range(1, num_classes):
        components, count = ndi.label(mask == c, structure=np.ones((3, 3)))
        for index, sl in enumerate(ndi.find_objects(components), start=1):
            comp = components[sl] == index
            ys, xs = np.nonzero(comp)
            ys, xs = ys + sl[0].start, xs + sl[1].start
            outside[_enlarged_box(ys, xs, mask.shape)] = False
            fg = np.zeros(mask.shape, dtype=bool)
            if num_classes == 2:
                h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
                fg[sl[0].start + h // 3: sl[0].stop - h // 3,
                   sl[1].start + w // 3: sl[1].stop - w // 3] = True
            else:
                fg[sl] = _ellipse_scribble(comp)
            fg_labels.append((fg, c))
    if np.any(mask == 0):
        out[outside] = 0
    for fg, c in fg_labels:
        out[fg] = c
    if np.any(mask == 0) and not np.any(out == 0):
        # Objects fill (nearly) the whole image: label the background pixel farthest from them.
        dist = ndi.distance_transform_edt(mask == 0)
        free = out == num_classes
        if np.any(free & (mask == 0)):
            dist = np.where(free, dist, 0.0)
        out[_deepest(dist)] = 0
    return out


def _ellipse_scribble(comp: np.ndarray) -> np.ndarray:
    """A thin ellipse inscribed in the bounding box of ``comp`` (cropped to it), kept inside it.

    The ellipse scale is the median normalised elliptical radius of the object's pixels, so that
    the curve runs through the middle of filled objects and of rings (a disc rim) alike.
    """
    h, w = comp.shape
    yy, xx = np.mgrid[0:h, 0:w]
    a, b = max(h / 2.0, 0.5), max(w / 2.0, 0.5)
    rho = np.hypot((yy + 0.5 - h / 2.0) / a, (xx + 0.5 - w / 2.0) / b)
    scale = np.median(rho[comp])
    curve = comp & (np.abs(rho - scale) * min(a, b) <= 0.6)
    if not curve.any():
        curve = np.zeros_like(comp)
        curve[_deepest(_inner_distance(comp))] = True
    return curve


_FORMS: Dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "point": _point,
    "box": _box,
    "block": _block,
    "scribble": _scribble,
    "scribble_noisy": _scribble_noisy,
}
assert set(_FORMS) == set(WEAK_FORM_KEYS)


# --------------------------------------------------------------------------- public API
def _check(mask: np.ndarray, form: str, num_classes: int) -> np.ndarray:
    if form not in _FORMS:
        raise ValueError(f"unknown weak form {form!r}; expected one of {', '.join(_FORMS)}")
    if not 2 <= int(num_classes) <= 254:
        raise ValueError(f"num_classes must be in 2..254, got {num_classes}")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"mask is empty (shape {mask.shape})")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must hold integer labels, got dtype {mask.dtype}")
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"mask values must lie in 0..{num_classes - 1} (num_classes={num_classes}), "
            f"got range {lo}..{hi}"
        )
    return mask.astype(np.intp)


def make_weak_label(mask: np.ndarray, form: str, num_classes: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Derive a sparse label map of ``form`` from a full mask.

    Parameters
    ----------
    mask
        (H, W) integer labels in ``0 .. num_classes - 1``.
    form
        One of ``point``, ``box``, ``block``, ``scribble``, ``scribble_noisy``.
    num_classes
        Number of classes including background; unlabelled pixels get this value.
    rng
        Source of randomness; the result is a function of the mask and the generator state.

    Returns
    -------
    numpy.ndarray
        (H, W) uint8 label map.

    Raises
    ------
    ValueError
        Unknown form, a mask that is not 2-D or not integer, or values outside the classes.
    """
    mask = _check(mask, form, num_classes)
    return _FORMS[form](mask, int(num_classes), rng)


def make_weak_labels(mask: np.ndarray, num_classes: int, rng: np.random.Generator,
                     forms: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """All (or the given) weak forms of one mask, keyed by their HDF5 key (``keypoint``, ...)."""
    forms = list(WEAK_FORM_KEYS) if forms is None else list(forms)
    labels = {}
    for form in forms:
        label = make_weak_label(mask, form, num_classes, rng)  # validates the form first
        labels[WEAK_FORM_KEYS[form]] = label
    return labels


def _case_rng(seed: int, site: int, case: str, form: str) -> np.random.Generator:
    """A generator that depends only on (seed, site, case name, form), not on visiting order."""
    return np.random.default_rng(
        [seed, site, zlib.crc32(case.encode()), list(WEAK_FORM_KEYS).index(form)]
    )


def _site_folders(root: Path) -> List[Tuple[int, Path]]:
    found = []
    for path in root.iterdir():
        match = re.fullmatch(r"Domain(\d+)", path.name)
        if match and (path / "train").is_dir():
            found.append((int(match.group(1)) - 1, path / "train"))
    return sorted(found)


def add_weak_labels(root: Path, num_classes: int, forms: Optional[Sequence[str]] = None,
                    seed: int = 0, overwrite: bool = False) -> Dict[str, int]:
    """Add weak-label datasets to every train case with a ``mask`` under ``root``.

    Files are rewritten atomically through :func:`dataloaders.h5layout.write_case`; other
    datasets are kept. Forms already present are left alone unless ``overwrite``.

    Returns
    -------
    dict
        Counts: ``files`` rewritten, ``skipped`` (no mask or nothing to add), ``labels`` written.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    forms = list(WEAK_FORM_KEYS) if forms is None else list(forms)
    for form in forms:
        if form not in WEAK_FORM_KEYS:
            raise ValueError(
                f"unknown weak form {form!r}; expected one of {', '.join(WEAK_FORM_KEYS)}")
    sites = _site_folders(root)
    if not sites:
        raise FileNotFoundError(f"{root} holds no Domain<k>/train folders")
    counts = {"files": 0, "skipped": 0, "labels": 0}
    for site, folder in sites:
        for path in sorted(folder.glob("*.h5")):
            data = h5layout.read_case(path)
            if "mask" not in data or "image" not in data:
                counts["skipped"] += 1
                continue
            todo = [f for f in forms if overwrite or WEAK_FORM_KEYS[f] not in data]
            if not todo:
                counts["skipped"] += 1
                continue
            image, mask = data.pop("image"), data.pop("mask")
            for key, value in data.items():
                if value.ndim != 2 or not np.issubdtype(value.dtype, np.integer):
                    raise ValueError(
                        f"{path}: dataset {key!r} is not a 2-D label map; not rewriting")
            for form in todo:
                try:
                    data[WEAK_FORM_KEYS[form]] = make_weak_label(
                        mask, form, num_classes, _case_rng(seed, site, path.stem, form))
                except ValueError as err:
                    raise ValueError(f"{path}: {err}") from None
            h5layout.write_case(path, image, mask, data)
            counts["files"] += 1
            counts["labels"] += len(todo)
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataloaders.weak_labels",
        description="Add weak-label datasets (point, box, block, scribble, noisy scribble) "
                    "to every train case under ROOT that has a full mask.")
    parser.add_argument("root", type=Path, help="data root holding Domain1..DomainK")
    parser.add_argument("--task", required=True, help="task name (gives the number of classes)")
    parser.add_argument("--forms", nargs="+", choices=list(WEAK_FORM_KEYS),
                        default=list(WEAK_FORM_KEYS), help="forms to add (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute forms that the files already hold")
    args = parser.parse_args(argv)
    try:
        task = get_task(args.task)
        counts = add_weak_labels(args.root, task.num_classes, args.forms, args.seed, args.overwrite)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.root}: {counts['files']} files updated ({counts['labels']} label maps), "
          f"{counts['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
