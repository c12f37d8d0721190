"""Pictures of federations: each site's image with its own weak label overlaid in colour.

Colours: background blue, class 1 red, class 2 green, class 3 yellow; unlabelled pixels are
left transparent. Only PIL is used.

CLI::

    python -m dataloaders.preview ROOT --task T --out PNG [--case I] [--tile N]
    python -m dataloaders.preview --docs docs/img [--real ../shared/data/FAZ]

The second form writes the pictures of the documentation: ``faz_site{1..5}.png`` (the real FAZ
release, when present, beside a synthetic site) and ``odoc_synthetic.png`` (five synthetic
fundus sites), generating small synthetic federations in a temporary folder.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dataloaders import h5layout
from dataloaders.tasks import WEAK_FORM_KEYS, get_task

__all__ = [
    "overlay", "site_tile", "real_faz_tile", "side_by_side", "preview_federation",
    "write_docs_images", "REAL_FAZ_FOLDERS", "main",
]

#: Label colours (RGB) by class value.
COLOURS = np.array([[40, 90, 255], [255, 40, 40], [40, 230, 60], [255, 220, 0]], dtype=np.float64)
#: Weak-label folders of the published FAZ PNG release, by weak form.
REAL_FAZ_FOLDERS = {"scribble_noisy": "scr_n", "point": "keypoint", "block": "block",
                    "box": "box", "scribble": "scr"}
_FORM_NAMES = {"scribble_noisy": "noisy scribble", "point": "point", "block": "block",
               "box": "box", "scribble": "scribble"}


def overlay(image: np.ndarray, label: np.ndarray, num_classes: int, tile: int = 128,
            alpha: float = 0.7) -> Image.Image:
    """Image (H, W) or (C, H, W) in [0, 1] with the labelled pixels of ``label`` in colour.

    Both are resized to ``tile`` x ``tile`` (bilinear for the image, nearest for the label)
    before blending, so that thin scribbles stay visible.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = np.moveaxis(image[:3], 0, -1) if image.shape[0] in (1, 3) else image
        if image.shape[-1] == 1:
            image = image[..., 0]
    rgb = np.clip(image, 0.0, 1.0) * 255.0
    mode = "L" if rgb.ndim == 2 else "RGB"
    pic = Image.fromarray(rgb.astype(np.uint8), mode).convert("RGB")
    pic = pic.resize((tile, tile), Image.BILINEAR)
    lab = Image.fromarray(np.asarray(label, dtype=np.uint8)).resize((tile, tile), Image.NEAREST)
    lab = np.asarray(lab)
    base = np.asarray(pic, dtype=np.float64)
    colour = COLOURS[np.minimum(lab, len(COLOURS) - 1)]
    a = (lab < num_classes)[..., None] * alpha
    return Image.fromarray((base * (1 - a) + colour * a).astype(np.uint8), "RGB")


def site_tile(root: Path, task: str, site: int, case: int = 0, tile: int = 128,
              split: str = "train") -> Image.Image:
    """Overlay of one case of one site of an HDF5 federation, with the site's own weak form."""
    spec = get_task(task)
    form = spec.site(site).weak_form
    key = WEAK_FORM_KEYS[form]
    cases = h5layout.list_cases(root, site, split)
    data = h5layout.read_case(cases[case % len(cases)], ["image", key])
    return overlay(data["image"], data[key], spec.num_classes, tile)


def real_faz_tile(real_root: Path, site: int, case: int = 0, tile: int = 128) -> Image.Image:
    """Overlay of one training case of the published FAZ PNG release (0 / 127 / 254 labels)."""
    form = get_task("faz").site(site).weak_form
    folder = Path(real_root) / f"Domain{site + 1}" / "train"
    names = sorted(p.name for p in (folder / "imgs").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"{folder / 'imgs'} holds no PNG images")
    name = names[case % len(names)]
    image = np.asarray(Image.open(folder / "imgs" / name).convert("L"), dtype=np.float64) / 255.0
    raw = np.asarray(Image.open(folder / REAL_FAZ_FOLDERS[form] / name).convert("L"))
    label = np.full(raw.shape, 2, dtype=np.uint8)
    label[raw == 0] = 0
    label[raw == 127] = 1
    return overlay(image, label, 2, tile)


def side_by_side(tiles: Sequence[Image.Image], captions: Optional[Sequence[str]] = None,
                 gap: int = 4) -> Image.Image:
    """Tiles in one row on a white background, each with an optional caption above it."""
    font = ImageFont.load_default()
    head = 14 if captions else 0
    width = sum(t.width for t in tiles) + gap * (len(tiles) + 1)
    height = max(t.height for t in tiles) + head + 2 * gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for i, t in enumerate(tiles):
        if captions:
            draw.text((x, gap - 1), captions[i], fill="black", font=font)
        canvas.paste(t, (x, gap + head))
        x += t.width + gap
    return canvas


def preview_federation(root: Path, task: str, out: Path, case: int = 0, tile: int = 128) -> Path:
    """Write one PNG with one overlay per site, side by side; returns ``out``."""
    spec = get_task(task)
    tiles = [site_tile(root, task, s, case, tile) for s in range(spec.num_sites)]
    captions = [f"{s + 1}: {_FORM_NAMES[spec.site(s).weak_form]}" for s in range(spec.num_sites)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(tiles, captions).save(out, optimize=True)
    return out


def _save_small(picture: Image.Image, path: Path, limit: int = 150_000) -> Path:
    """Save a PNG; fall back to a 256-colour palette when the file would exceed ``limit``."""
    picture.save(path, optimize=True)
    if path.stat().st_size > limit:
        picture.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def write_docs_images(out_dir: Path, real_root: Optional[Path] = None, tile: int = 128,
                      seed: int = 0) -> List[Path]:
    """Write ``faz_site{1..5}.png`` and ``odoc_synthetic.png`` into ``out_dir``.

    Each FAZ picture shows a real training case of the site with its weak label (skipped when
    ``real_root`` is missing) beside a synthetic case of the same site and form.
    """
    from dataloaders.synthetic import generate_federation  # heavy only when used

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    have_real = real_root is not None and (Path(real_root) / "Domain1" / "train").is_dir()
    written = []
    faz = get_task("faz")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("faz", "odoc"):
            generate_federation(name, Path(tmp) / name, size=tile, train_per_site=2,
                                test_per_site=1, seed=seed)
        for s in range(faz.num_sites):
            form = _FORM_NAMES[faz.site(s).weak_form]
            tiles, captions = [], []
            if have_real:
                tiles.append(real_faz_tile(Path(real_root), s, 0, tile))
                captions.append(f"real {faz.site(s).name}")
            tiles.append(site_tile(Path(tmp) / "faz", "faz", s, 0, tile))
            captions.append(f"synthetic: {form}")
            written.append(_save_small(side_by_side(tiles, captions),
                                       out_dir / f"faz_site{s + 1}.png"))
        odoc = get_task("odoc")
        tiles = [site_tile(Path(tmp) / "odoc", "odoc", s, 0, tile) for s in range(odoc.num_sites)]
        captions = [f"{s + 1}: {_FORM_NAMES[odoc.site(s).weak_form]}"
                    for s in range(odoc.num_sites)]
        written.append(_save_small(side_by_side(tiles, captions), out_dir / "odoc_synthetic.png"))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataloaders.preview",
        description="Draw each site's image with its weak label overlaid, side by side.")
    parser.add_argument("root", nargs="?", type=Path, help="federation root (Domain1..DomainK)")
    parser.add_argument("--task", help="task name of ROOT")
    parser.add_argument("--out", type=Path, help="PNG to write")
    parser.add_argument("--case", type=int, default=0, help="case index shown for every site")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--docs", type=Path, metavar="DIR",
                        help="write the documentation pictures into DIR instead")
    parser.add_argument("--real", type=Path, default=None,
                        help="published FAZ PNG release shown beside synthetic FAZ (with --docs)")
    args = parser.parse_args(argv)
    try:
        if args.docs is not None:
            for path in write_docs_images(args.docs, args.real, args.tile):
                print(path)
            return 0
        if args.root is None or args.task is None or args.out is None:
            parser.error("ROOT, --task and --out are required unless --docs is given")
        print(preview_federation(args.root, args.task, args.out, args.case, args.tile))
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
