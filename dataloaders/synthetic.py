"""Synthetic federations (five sites by default) that mimic the two tasks of the paper.

``faz``: OCTA en-face images, one channel. A bright network of branching vessels and a fine
capillary mesh surrounds a dark, irregular, roughly elliptical avascular zone (the FAZ,
class 1). Capillary gaps, shadow artefacts and a bias field keep the zone from being found by
thresholding.

``odoc``: fundus crops around the optic disc, three channels. A bright yellowish disc (rim,
class 2) holds a brighter cup (class 1) with a faint edge; vessels leave the disc and cross the
rim; vignetting, and in some cases a bright peripapillary crescent beside the disc.

Each site has its own acquisition style (brightness, contrast, gamma, noise, blur, colour,
structure sizes), so the five sites differ in their statistics as real scanners do; with
``--sites K`` > 5, site ``k`` repeats the style and weak form of site ``k mod 5`` with its own
random draws (for load tests; :func:`dataloaders.tasks.get_task` counts the sites). Every
train case holds the full mask and every weak form (:data:`dataloaders.tasks.WEAK_FORM_KEYS`);
test cases hold image and mask. Every case draws from its own generator seeded by
``(seed, site, split, case)``: the same arguments give byte-identical files.

CLI: ``python -m dataloaders.synthetic --task faz|odoc --out DIR [--size N]
[--train-per-site N] [--test-per-site N] [--seed S] [--sites K]``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import lfilter

from dataloaders import h5layout
from dataloaders.tasks import WEAK_FORM_KEYS, Task, get_task
from dataloaders.weak_labels import make_weak_labels

__all__ = [
    "FazStyle", "OdocStyle", "FAZ_STYLES", "ODOC_STYLES", "METADATA_NAME",
    "faz_case", "odoc_case", "generate_federation", "main",
]

#: Name of the metadata file written at the federation root.
METADATA_NAME = "synthetic.json"
_SPLIT_IDS = {"train": 0, "test": 1}
_VERSION = 1


# --------------------------------------------------------------------------- site styles
@dataclass(frozen=True)
class FazStyle:
    """Acquisition style of one synthetic OCTA site."""

    faz_radius: float      # mean FAZ radius as a fraction of the image size
    brightness: float      # additive offset
    contrast: float        # gain of the vessel signal
    gamma: float
    noise: float           # std of additive speckle
    blur: float            # Gaussian blur std, in pixels at 96 px
    vessel_width: float    # radius of the large vessels, in pixels at 96 px
    capillary_scale: float  # scale of the capillary mesh, in pixels at 96 px
    n_vessels: int


@dataclass(frozen=True)
class OdocStyle:
    """Acquisition style of one synthetic fundus site."""

    disc_radius: float     # mean disc radius as a fraction of the image size
    retina: Tuple[float, float, float]  # background colour (R, G, B)
    disc: Tuple[float, float, float]
    cup: Tuple[float, float, float]
    brightness: float
    contrast: float
    gamma: float
    noise: float
    blur: float
    vignette: float        # strength of the radial illumination fall-off


FAZ_STYLES: Tuple[FazStyle, ...] = (
    FazStyle(0.09, 0.04, 1.00, 0.90, 0.04, 0.4, 0.72, 1.0, 9),   # FAZID: bright vessels
    FazStyle(0.11, 0.00, 0.85, 1.10, 0.06, 0.2, 0.55, 0.8, 7),   # OCTA500-3M: fine, darker
    FazStyle(0.075, -0.03, 0.90, 1.00, 0.05, 0.6, 0.65, 0.9, 10),  # OCTA500-6M: small FAZ, blurry
    FazStyle(0.12, -0.02, 0.70, 1.25, 0.08, 0.3, 0.6, 0.85, 8),  # OCTA-25K: dark, noisy, big FAZ
    FazStyle(0.10, 0.04, 0.80, 0.85, 0.03, 0.5, 0.7, 1.2, 9),    # ROSE: washed out, coarse mesh
)
ODOC_STYLES: Tuple[OdocStyle, ...] = (
    OdocStyle(0.22, (0.62, 0.26, 0.10), (0.90, 0.62, 0.36), (0.98, 0.86, 0.66),
              0.00, 1.00, 1.00, 0.020, 0.6, 0.35),   # Drishti-GS
    OdocStyle(0.26, (0.45, 0.30, 0.22), (0.78, 0.66, 0.52), (0.90, 0.84, 0.74),
              0.02, 0.85, 1.20, 0.035, 0.9, 0.15),   # RIM-ONE: greyish, low contrast
    OdocStyle(0.18, (0.55, 0.20, 0.06), (0.92, 0.55, 0.25), (1.00, 0.80, 0.50),
              -0.03, 1.10, 0.90, 0.025, 0.5, 0.45),  # REFUGE-train: saturated red/orange
    OdocStyle(0.19, (0.40, 0.22, 0.12), (0.80, 0.58, 0.38), (0.92, 0.78, 0.60),
              -0.05, 1.00, 1.15, 0.030, 0.7, 0.55),  # REFUGE-val: darker, strong vignette
    OdocStyle(0.21, (0.70, 0.36, 0.18), (0.96, 0.74, 0.50), (1.00, 0.92, 0.80),
              0.05, 0.90, 0.85, 0.015, 1.1, 0.25),   # GAMMA: bright, blurry
)


# --------------------------------------------------------------------------- drawing helpers
def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float64)


def _irregular_ellipse(centre: Tuple[float, float], radius: float, ratio: float, angle: float,
                       roughness: float, rng: np.random.Generator,
                       yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Signed "radius" field: negative inside a wobbly ellipse, in units of pixels at its edge."""
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, (-s * dx + c * dy) / ratio
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    wobble = np.ones_like(theta)
    for k in range(2, 7):
        wobble += rng.normal(0.0, roughness / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return rho - radius * np.clip(wobble, 0.5, 1.5)


def _smooth_noise(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise."""
    field = ndi.gaussian_filter(rng.normal(size=(size, size)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _vessel_paths(rng: np.random.Generator, starts: np.ndarray, headings: np.ndarray,
                  length: float, width: float, wander: float, depth: int,
                  stop: Optional[Tuple[float, float, float]] = None,
                  ) -> List[Tuple[np.ndarray, np.ndarray, float]]:
    """Branching vessels as a list of (ys, xs, width) poly-lines.

    The curvature is a smooth AR(1) process and the heading its running sum, so vessels bend
    gently and wander further from their start heading the longer they run.
    ``stop = (y, x, r)`` ends the trunks within ``r`` of a point, as the
    large vessels of the macula end before the avascular zone. Each trunk sprouts thinner,
    shorter branches down to ``depth`` levels.
    """
    paths = []
    step = 0.7
    for start, heading in zip(starts, headings):
        n = max(int(length / step), 2)
        theta = heading + np.cumsum(lfilter([1.0], [1.0, -0.9], rng.normal(0.0, wander, n)))
        ys = start[0] + np.cumsum(step * np.sin(theta))
        xs = start[1] + np.cumsum(step * np.cos(theta))
        if stop is not None:
            inside = np.hypot(ys - stop[0], xs - stop[1]) < stop[2]
            if inside.any():
                n = max(int(np.argmax(inside)), 2)
                ys, xs, theta = ys[:n], xs[:n], theta[:n]
        paths.append((ys, xs, width))
        if depth > 0 and n > 8:
            n_branch = int(rng.integers(1, 4))
            at = rng.integers(n // 5, n - 2, size=n_branch)
            sides = rng.choice([-1.0, 1.0], size=n_branch)
            child_heading = theta[at] + sides * rng.uniform(0.5, 1.2, n_branch)
            paths += _vessel_paths(rng, np.stack([ys[at], xs[at]], 1), child_heading,
                                   length * rng.uniform(0.3, 0.6), width * 0.7,
                                   wander * 1.3, depth - 1)
    return paths


def _render(paths: Sequence[Tuple[np.ndarray, np.ndarray, float]], size: int) -> np.ndarray:
    """Draw poly-lines into an image in [0, 1]: radius ``floor(width)``, thinner = fainter."""
    canvas = np.zeros((size, size))
    # Group the points by drawn radius and brightness; one dilation per group keeps it fast.
    groups = {}
    for ys, xs, width in paths:
        key = (int(width), round(min(1.0, 0.45 + 0.55 * width), 2))
        groups.setdefault(key, []).append((ys, xs))
    for (r, level), pieces in sorted(groups.items()):
        ys = np.rint(np.concatenate([p[0] for p in pieces])).astype(np.intp)
        xs = np.rint(np.concatenate([p[1] for p in pieces])).astype(np.intp)
        ok = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        hit = np.zeros((size, size), dtype=bool)
        hit[ys[ok], xs[ok]] = True
        if r > 0:
            g = np.arange(-r, r + 1)
            disc = g[:, None] ** 2 + g[None, :] ** 2 <= r * r + r
            hit = ndi.binary_dilation(hit, structure=disc)
        canvas = np.maximum(canvas, hit * level)
    return ndi.gaussian_filter(canvas, 0.6)


def _finish(image: np.ndarray, brightness: float, contrast: float, gamma: float,
            noise: float, blur: float, rng: np.random.Generator) -> np.ndarray:
    """Apply the site's acquisition style to an image in [0, 1] (any leading channel axes).

    Brightness and contrast also vary a little from case to case within a site.
    """
    axes = (0,) * (image.ndim - 2) + (blur, blur)
    image = ndi.gaussian_filter(image, axes) if blur > 0 else image
    contrast *= rng.uniform(0.85, 1.15)
    brightness += rng.normal(0.0, 0.04)
    image = (image - 0.5) * contrast + 0.5 + brightness
    image = np.clip(image, 0.0, 1.0) ** gamma
    image = image + rng.normal(0.0, noise, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- FAZ
def faz_case(size: int, style: FazStyle,
             rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic OCTA en-face image and its FAZ mask.

    Returns
    -------
    image, mask
        (size, size) float32 in [0, 1] and (size, size) uint8 with 0 background, 1 FAZ.
    """
    scale = size / 96.0
    yy, xx = _grid(size)
    centre = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    radius = max(style.faz_radius * size * rng.uniform(0.75, 1.25), 3.0)
    signed = _irregular_ellipse((centre[0], centre[1]), radius, rng.uniform(0.7, 1.0),
                                rng.uniform(0, np.pi), 0.25, rng, yy, xx)
    # Fine irregularity of the zone's edge.
    signed = signed + 1.2 * scale * _smooth_noise(size, 2.0 * scale, rng)
    mask = signed < 0
    if not mask.any():
        mask[int(centre[0]), int(centre[1])] = True
    outside = ndi.distance_transform_edt(~mask)
    # Capillaries end at the edge of the zone and are sparser in a halo around it.
    density = (outside > 0) * (0.55 + 0.45 * np.clip(outside / (1.2 * radius), 0.0, 1.0))

    # Capillary mesh: the zero set of band-pass noise is a connected web of thin lines.
    cs = style.capillary_scale * scale
    band = ndi.gaussian_filter(rng.normal(size=(size, size)), cs) \
        - ndi.gaussian_filter(rng.normal(size=(size, size)), 2.5 * cs)
    mesh = np.exp(-(band / (0.6 * band.std() + 1e-12)) ** 2)
    mesh = ndi.gaussian_filter(mesh, 0.4 * scale)
    mesh *= 0.6 + 0.4 * np.clip(0.5 + 0.5 * _smooth_noise(size, 6 * scale, rng), 0, 1)

    # Large vessels enter from the border, run towards the fovea and end before its zone.
    n = style.n_vessels
    angles = rng.uniform(0, 2 * np.pi, n)
    reach = size * rng.uniform(0.6, 0.8, n)
    starts = np.stack([centre[0] - np.sin(angles) * reach, centre[1] - np.cos(angles) * reach], 1)
    headings = angles + rng.normal(0, 0.35, n)
    paths = _vessel_paths(rng, starts, headings, size * 0.8, style.vessel_width * scale, 0.008,
                          depth=2, stop=(centre[0], centre[1], radius * rng.uniform(1.2, 2.0)))
    vessels = _render(paths, size)

    # Large vessels stay away from the zone; only the capillary mesh reaches its edge.
    vessels *= np.clip((outside - 0.3 * radius) / radius, 0.0, 1.0)
    # Deeper plexus glow between the capillaries: the zone is darker than the gaps of the mesh.
    signal = np.maximum((0.5 * mesh + 0.1) * density, np.minimum(1.6 * vessels, 1.0))
    # Shadow artefacts (floaters, vignetting) darken patches of the network elsewhere.
    shadow = 1.0 - 0.35 * np.clip(_smooth_noise(size, 10 * scale, rng) - 0.9, 0, None)
    bias = 1.0 + 0.15 * _smooth_noise(size, 20 * scale, rng)
    floor = 0.06 + 0.05 * rng.random((size, size))
    image = (floor + signal) * shadow * bias
    image = _finish(image, style.brightness, style.contrast, style.gamma, style.noise,
                    style.blur * scale, rng)
    return image, mask.astype(np.uint8)


# --------------------------------------------------------------------------- ODOC
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def odoc_case(size: int, style: OdocStyle,
              rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic fundus crop around the optic disc and its cup/rim mask.

    Returns
    -------
    image, mask
        (3, size, size) float32 in [0, 1] and (size, size) uint8 with 0 background, 1 cup,
        2 disc rim.
    """
    scale = size / 96.0
    yy, xx = _grid(size)
    centre = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    rd = style.disc_radius * size * rng.uniform(0.85, 1.15)
    disc_sd = _irregular_ellipse((centre[0], centre[1]), rd, rng.uniform(0.85, 1.0),
                                 np.pi / 2 + rng.normal(0, 0.2), 0.06, rng, yy, xx)
    disc = disc_sd < 0
    # The cup sits inside the disc, shifted to one (temporal) side, with a rim of >= 2 px.
    shift = rng.uniform(0.0, 0.15) * rd * np.array([rng.normal(0, 0.3), rng.choice([-1, 1])])
    rc = rd * rng.uniform(0.35, 0.7)
    cup_sd = _irregular_ellipse((centre[0] + shift[0], centre[1] + shift[1]), rc,
                                rng.uniform(0.8, 1.0), rng.uniform(0, np.pi), 0.12, rng, yy, xx)
    depth = ndi.distance_transform_edt(disc)
    cup = (cup_sd < 0) & (depth > 2.0 * scale)
    if not cup.any():
        cup = depth >= depth.max() - 1.0
    mask = np.where(cup, 1, np.where(disc, 2, 0)).astype(np.uint8)

    # Colour layers: retina with choroidal texture, disc with a soft edge, cup with a faint one.
    texture = (0.06 * _smooth_noise(size, 3 * scale, rng)
               + 0.05 * _smooth_noise(size, 12 * scale, rng))
    retina = np.asarray(style.retina)[:, None, None] * (1.0 + texture)[None]
    a_disc = _sigmoid(-disc_sd / (1.2 * scale))
    a_cup = _sigmoid(-cup_sd / (1.5 * scale)) * a_disc
    # The rim is paler on one (temporal) side and pinker on the other.
    side = np.arctan2(shift[0], shift[1]) if np.any(shift) else 0.0
    ang = np.arctan2(yy - centre[0], xx - centre[1])
    a_disc = a_disc * (0.75 + 0.25 * np.cos(ang - side))
    disc_col = np.asarray(style.disc)[:, None, None] * (1.0 + 0.5 * texture)[None]
    image = retina * (1 - a_disc) + disc_col * a_disc
    image = image * (1 - 0.9 * a_cup) + np.asarray(style.cup)[:, None, None] * 0.9 * a_cup
    if rng.random() < 0.7:
        # Peripapillary atrophy: a pale crescent hugging one side of the disc, outside it.
        side = side + rng.normal(0, 0.5)
        near = np.exp(-np.clip(disc_sd, 0, None) / (3.0 * scale)) * (disc_sd > 0)
        crescent = near * np.clip(np.cos(ang - side), 0, None) ** 2 * rng.uniform(0.4, 0.8)
        image = image * (1 - crescent) + np.asarray(style.disc)[:, None, None] * 0.9 * crescent

    # Vessels leave the disc from near the cup and run outwards across the rim.
    n = int(rng.integers(6, 10))
    headings = rng.uniform(0, 2 * np.pi, n)
    origin = np.array([centre[0] + shift[0], centre[1] + shift[1]])
    starts = origin + 0.3 * rc * np.stack([np.sin(headings), np.cos(headings)], 1)
    paths = _vessel_paths(rng, starts, headings, size * rng.uniform(0.6, 0.9),
                          1.2 * scale, 0.006, depth=2)
    vessels = _render(paths, size)
    image = image * (1.0 - vessels[None] * np.array([0.35, 0.65, 0.6])[:, None, None])
    # A bright reflex band along the vessels is common; a little of it breaks simple thresholds.
    image = image + 0.05 * ndi.gaussian_filter(vessels, 1.5 * scale)[None]

    vc = size / 2 + rng.normal(0, 0.1, 2) * size
    r2 = ((yy - vc[0]) ** 2 + (xx - vc[1]) ** 2) / (0.75 * size) ** 2
    image = image * (1.0 - style.vignette * np.clip(r2, 0, 1))[None]
    # Uneven illumination: a linear ramp in a random direction.
    tilt = rng.uniform(0, 2 * np.pi)
    ramp = ((yy - size / 2) * np.sin(tilt) + (xx - size / 2) * np.cos(tilt)) / size
    image = image * (1.0 + rng.uniform(0.2, 0.45) * ramp)[None]
    jitter = 1.0 + rng.normal(0, 0.04, 3)[:, None, None]
    image = _finish(np.clip(image * jitter, 0, 1), style.brightness, style.contrast,
                    style.gamma, style.noise, style.blur * scale, rng)
    return image, mask


# --------------------------------------------------------------------------- federation
def _base_task(task: str) -> Task:
    base = get_task(task)
    name = base.synthetic_of or base.name
    if name not in ("faz", "odoc"):
        raise ValueError(f"no synthetic generator for task {task!r}; expected faz or odoc")
    return get_task(name)


def _prepare_out(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not an earlier synthetic federation."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / METADATA_NAME).is_file():
            raise FileExistsError(
                f"{out} is not empty and holds no {METADATA_NAME}; refusing to write a synthetic "
                f"federation into it")
    out.mkdir(parents=True, exist_ok=True)


def generate_federation(task: str, out: Path, size: int = 96, train_per_site: int = 40,
                        test_per_site: int = 10, seed: int = 0, sites: int = 5) -> None:
    """Write a synthetic federation in the HDF5 layout of :mod:`dataloaders.h5layout`.

    Parameters
    ----------
    task
        ``faz`` or ``odoc`` (``synthetic_faz`` / ``synthetic_odoc`` are accepted too).
    out
        Root folder; receives ``Domain{1..sites}/{train,test}/<case>.h5`` and
        ``synthetic.json``. Case files (and site folders) of an earlier generation that this
        one does not write are removed.
    size
        Image side in pixels (at least 32).
    train_per_site, test_per_site
        Number of cases per site and split (at least 1 each).
    seed
        Seed; identical arguments give byte-identical files.
    sites
        Number of sites (default 5, the paper's); beyond 5, site ``k`` takes the style and weak
        form of site ``k mod 5``. Sites 0-4 are the same for any ``sites`` >= 5.

    Raises
    ------
    ValueError
        Unknown task or out-of-range sizes or counts.
    FileExistsError
        ``out`` is a non-empty folder that is not a synthetic federation.
    """
    base = _base_task(task)
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if train_per_site < 1 or test_per_site < 1:
        raise ValueError(
            "train_per_site and test_per_site must be at least 1, "
            f"got {train_per_site}, {test_per_site}")
    if sites < 1:
        raise ValueError(f"sites must be at least 1, got {sites}")
    out = Path(out)
    _prepare_out(out)
    base = base.with_sites(sites)
    styles = FAZ_STYLES if base.name == "faz" else ODOC_STYLES
    make_case = faz_case if base.name == "faz" else odoc_case
    counts = {"train": train_per_site, "test": test_per_site}
    for site in range(base.num_sites):
        for split, split_id in _SPLIT_IDS.items():
            folder = h5layout.site_dir(out, site, split)
            wanted = set()
            for case in range(counts[split]):
                rng = np.random.default_rng([seed, site, split_id, case])
                image, mask = make_case(size, styles[site % len(styles)], rng)
                labels = {}
                if split == "train":
                    weak_rng = np.random.default_rng([seed, site, split_id, case, 1])
                    labels = make_weak_labels(mask, base.num_classes, weak_rng)
                path = folder / f"d{site + 1}_{split}_{case:04d}.h5"
                h5layout.write_case(path, image, mask, labels)
                wanted.add(path.name)
            for stale in folder.glob("*.h5"):
                if stale.name not in wanted:
                    stale.unlink()
    extra = base.num_sites + 1  # site folders of an earlier, larger generation
    while (out / f"Domain{extra}").is_dir():
        shutil.rmtree(out / f"Domain{extra}")
        extra += 1
    meta = {
        "generator": "dataloaders.synthetic",
        "version": _VERSION,
        "task": f"synthetic_{base.name}",
        "synthetic_of": base.name,
        "seed": seed,
        "size": size,
        "train_per_site": train_per_site,
        "test_per_site": test_per_site,
        "num_classes": base.num_classes,
        "in_chns": base.in_chns,
        "class_names": list(base.class_names),
        "weak_keys": dict(WEAK_FORM_KEYS),
        "sites": [
            {"domain": f"Domain{i + 1}", "name": s.name, "weak_form": s.weak_form,
             "weak_key": WEAK_FORM_KEYS[s.weak_form], "n_train": train_per_site,
             "n_test": test_per_site, "style": asdict(styles[i % len(styles)])}
            for i, s in enumerate(base.sites)
        ],
    }
    (out / METADATA_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataloaders.synthetic",
        description="Write a synthetic federation (FAZ-like OCTA or fundus optic "
                    "disc/cup) with full masks and every weak-label form.")
    parser.add_argument("--task", required=True, help="faz or odoc")
    parser.add_argument("--out", required=True, type=Path, help="output root folder")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    parser.add_argument("--train-per-site", type=int, default=40)
    parser.add_argument("--test-per-site", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sites", type=int, default=5,
                        help="number of sites, Domain1..DomainK (default 5; beyond 5, site k "
                             "repeats the style and weak form of site k mod 5)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        generate_federation(args.task, args.out, args.size, args.train_per_site,
                            args.test_per_site, args.seed, args.sites)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = args.sites * (args.train_per_site + args.test_per_site)
    print(f"wrote {n} cases to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
