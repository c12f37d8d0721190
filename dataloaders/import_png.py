"""Convert the published PNG release into the HDF5 layout.

Input layout::

    SRC/Domain{k}/{train,test}/imgs/<case>.png     image (grayscale, or RGB for 3-channel tasks)
    SRC/Domain{k}/{train,test}/mask/<case>.png     full label
    SRC/Domain{k}/{train,test}/<form>/<case>.png   weak label (folder names: PNG_FORM_FOLDERS)

Label PNGs store ``task.png_values[label]`` (FAZ: 0 / 127 / 254 = background / FAZ /
unlabelled); any other pixel value is an error. Output: ``DST/Domain{k}/{train,test}/<case>.h5``
written with :func:`dataloaders.h5layout.write_case` (atomic per file), image float32 = png / 255.

Usage::

    python -m dataloaders.import_png SRC DST --task faz [--workers N] [--limit N] [--sites 1,3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from . import h5layout
from .tasks import WEAK_FORM_KEYS, Task, get_task

IMAGE_FOLDER = "imgs"
MASK_FOLDER = "mask"
#: Weak-label folder name of the PNG release -> label form (the one place for this mapping).
#: The release uses ``scr_n``/``keypoint``/``block``/``box``/``scr`` (FAZ Domain1..5); the
#: form names themselves are accepted too.
PNG_FORM_FOLDERS: Dict[str, str] = {
    "scr_n": "scribble_noisy",
    "scr": "scribble",
    "keypoint": "point",
    "block": "block",
    "box": "box",
    "scribble": "scribble",
    "scribble_noisy": "scribble_noisy",
    "point": "point",
}


@dataclass(frozen=True)
class CaseJob:
    """Everything needed to convert one case (picklable, for worker processes)."""

    image: Path
    mask: Optional[Path]
    weak: Tuple[Tuple[str, Path], ...]  # (HDF5 key, png path)
    out: Path
    in_chns: int
    png_values: Tuple[int, ...]


@dataclass
class ImportSummary:
    """Cases written per (site index, split) and the label keys found there."""

    counts: Dict[Tuple[int, str], int] = field(default_factory=dict)
    keys: Dict[Tuple[int, str], Tuple[str, ...]] = field(default_factory=dict)
    seconds: float = 0.0


def _gray_or_rgb(path: Path) -> np.ndarray:
    """Pixels of a PNG as uint8 (H, W) or (H, W, 3); errors name the file."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    if mode == "RGBA":
        if (arr[..., 3] != 255).any():
            raise ValueError(f"{path}: RGBA image with transparent pixels; expected L or RGB")
        arr, mode = arr[..., :3], "RGB"
    if mode not in ("L", "RGB") or arr.dtype != np.uint8:
        raise ValueError(f"{path}: image mode {mode} ({arr.dtype}); expected 8-bit L or RGB")
    return arr


def _to_single_channel(path: Path, arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim == 3:
        if not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()):
            raise ValueError(f"{path}: {what} is colour RGB; expected grayscale")
        arr = arr[..., 0]
    return arr


def read_png_image(path: Path, in_chns: int) -> np.ndarray:
    """Image PNG -> float32 (H, W) for one channel or (3, H, W), values png / 255."""
    arr = _gray_or_rgb(path)
    if in_chns == 1:
        arr = _to_single_channel(path, arr, "image")
    elif in_chns == 3:
        if arr.ndim == 2:
            raise ValueError(f"{path}: grayscale image; the task expects RGB")
        arr = arr.transpose(2, 0, 1)
    else:
        raise ValueError(f"{path}: cannot import images for a task with {in_chns} channels")
    return arr.astype(np.float32) / np.float32(255)


def read_png_label(path: Path, png_values: Sequence[int], full: bool) -> np.ndarray:
    """Label PNG -> uint8 (H, W) label indices.

    ``png_values[i]`` is the pixel value of label ``i``; the last entry is the unlabelled
    value, which full masks may not contain.
    """
    arr = _to_single_channel(path, _gray_or_rgb(path), "label")
    allowed = list(png_values[:-1]) if full else list(png_values)
    lut = np.full(256, -1, dtype=np.int16)
    for label, value in enumerate(allowed):
        lut[value] = label
    out = lut[arr]
    if (out < 0).any():
        found = np.unique(arr).tolist()
        bad = np.unique(arr[out < 0]).tolist()
        kind = "full mask" if full else "weak label"
        raise ValueError(
            f"{path}: unexpected pixel values {bad} (found {found}); a {kind} may hold only "
            f"{allowed}"
        )
    return out.astype(np.uint8)


def convert_case(job: CaseJob) -> Path:
    """Convert one case and write it atomically; returns the output path."""
    image = read_png_image(job.image, job.in_chns)
    spatial = image.shape[-2:]
    mask = None
    if job.mask is not None:
        mask = read_png_label(job.mask, job.png_values, full=True)
    labels = {key: read_png_label(p, job.png_values, full=False) for key, p in job.weak}
    for p, lab in [(job.mask, mask), *[(p, labels[k]) for k, p in job.weak]]:
        if lab is not None and lab.shape != spatial:
            raise ValueError(f"{p}: label shape {lab.shape} differs from image {job.image} {spatial}")
    h5layout.write_case(job.out, image, mask, labels)
    return job.out


def _pngs(folder: Path) -> Dict[str, Path]:
    return {p.stem: p for p in sorted(folder.glob("*.png"))}


def plan_split(src_split: Path, dst_split: Path, task: Task, png_values: Sequence[int],
               limit: Optional[int] = None) -> List[CaseJob]:
    """Jobs for one ``Domain{k}/{train,test}`` folder; checks folders and case names."""
    images = _pngs(src_split / IMAGE_FOLDER)
    if not images:
        raise FileNotFoundError(f"{src_split / IMAGE_FOLDER}: no .png images")
    label_folders: Dict[str, Dict[str, Path]] = {}
    weak_keys: List[Tuple[str, str]] = []  # (folder name, HDF5 key)
    for sub in sorted(p for p in src_split.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name == IMAGE_FOLDER:
            continue
        if sub.name != MASK_FOLDER:
            if sub.name not in PNG_FORM_FOLDERS:
                raise ValueError(
                    f"{sub}: unknown label folder; expected {IMAGE_FOLDER}, {MASK_FOLDER} or one "
                    f"of {', '.join(sorted(PNG_FORM_FOLDERS))}"
                )
            key = WEAK_FORM_KEYS[PNG_FORM_FOLDERS[sub.name]]
            if key in (k for _, k in weak_keys):
                raise ValueError(f"{sub}: a second folder for the {key!r} labels")
            weak_keys.append((sub.name, key))
        files = _pngs(sub)
        if set(files) != set(images):
            missing = sorted(set(images) - set(files))[:5]
            extra = sorted(set(files) - set(images))[:5]
            raise ValueError(
                f"{sub}: case names differ from {src_split / IMAGE_FOLDER} "
                f"(missing e.g. {missing}, extra e.g. {extra})"
            )
        label_folders[sub.name] = files
    names = sorted(images)[:limit] if limit is not None else sorted(images)
    masks = label_folders.get(MASK_FOLDER)
    return [
        CaseJob(
            image=images[n],
            mask=masks[n] if masks is not None else None,
            weak=tuple((key, label_folders[folder][n]) for folder, key in weak_keys),
            out=dst_split / f"{n}.h5",
            in_chns=task.in_chns,
            png_values=tuple(png_values),
        )
        for n in names
    ]


def find_sites(src: Path) -> List[int]:
    """Site indices (from 0) of the ``Domain{k}`` folders under ``src``."""
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist (expected Domain1..DomainK)")
    sites = sorted(int(p.name[6:]) - 1 for p in src.glob("Domain*")
                   if p.is_dir() and p.name[6:].isdigit() and int(p.name[6:]) >= 1)
    if not sites:
        raise FileNotFoundError(f"source folder {src} holds no Domain{{k}} folders")
    return sites


def import_png_tree(
    src: os.PathLike,
    dst: os.PathLike,
    task: Task | str,
    workers: int = 1,
    limit: Optional[int] = None,
    sites: Optional[Iterable[int]] = None,
    png_values: Optional[Sequence[int]] = None,
) -> ImportSummary:
    """Convert a PNG release tree into HDF5 cases under ``dst``.

    Parameters
    ----------
    src, dst : path-like
    task : Task or str
    workers : int
        Worker processes (1 = in-process). Every output file is written atomically, so
        concurrent or interrupted imports never leave a half-written ``.h5``.
    limit : int, optional
        Import only the first ``limit`` cases (sorted names) of each site and split.
    sites : iterable of int, optional
        Site indices (from 0) to import; default: every ``Domain{k}`` folder found.
    png_values : sequence of int, optional
        Pixel value of each label, unlabelled last; default ``task.png_values``.
    """
    task = get_task(task) if isinstance(task, str) else task
    src, dst = Path(src), Path(dst)
    values = tuple(png_values if png_values is not None else task.png_values)
    if len(values) != task.num_classes + 1:
        raise ValueError(f"png_values {values} must list {task.num_classes + 1} values "
                         f"({task.num_classes} classes + unlabelled)")
    if len(set(values)) != len(values) or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"png_values {values} must be distinct 8-bit values")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    found = find_sites(src)
    chosen = found if sites is None else sorted(set(sites))
    summary = ImportSummary()
    jobs: List[CaseJob] = []
    for site in chosen:
        task.site(site)  # range check against the task
        if site not in found:
            raise FileNotFoundError(f"{src / f'Domain{site + 1}'} does not exist")
        for split in h5layout.SPLITS:
            src_split = src / f"Domain{site + 1}" / split
            if not src_split.is_dir():
                raise FileNotFoundError(f"{src_split} does not exist (expected {IMAGE_FOLDER}/, {MASK_FOLDER}/, ...)")
            split_jobs = plan_split(src_split, h5layout.site_dir(dst, site, split), task, values, limit)
            summary.counts[(site, split)] = len(split_jobs)
            keys = (["mask"] if split_jobs and split_jobs[0].mask else []) + \
                [k for k, _ in (split_jobs[0].weak if split_jobs else ())]
            summary.keys[(site, split)] = tuple(keys)
            jobs.extend(split_jobs)
    start = time.perf_counter()
    if workers <= 1:
        for job in jobs:
            convert_case(job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(convert_case, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    summary.seconds = time.perf_counter() - start
    return summary


def format_summary(summary: ImportSummary, task: Task, check_counts: bool) -> str:
    """Table of cases per site and split; flags counts that differ from the task table."""
    lines = [f"{'site':<9}{'name':<14}{'train':>7}{'test':>7}  keys (train / test)"]
    for site in sorted({s for s, _ in summary.counts}):
        info = task.site(site)
        cells = []
        for split, expected in (("train", info.n_train), ("test", info.n_test)):
            n = summary.counts[(site, split)]
            flag = "!" if check_counts and n != expected else ""
            cells.append(f"{n}{flag}")
        keys = " / ".join(",".join(summary.keys[(site, sp)]) for sp in ("train", "test"))
        lines.append(f"{f'Domain{site + 1}':<9}{info.name:<14}{cells[0]:>7}{cells[1]:>7}  {keys}")
    total = sum(summary.counts.values())
    lines.append(f"{total} cases in {summary.seconds:.1f} s")
    if check_counts and any(
            summary.counts[(s, sp)] != (task.site(s).n_train if sp == "train" else task.site(s).n_test)
            for s, sp in summary.counts):
        lines.append("! = differs from the published count in dataloaders/tasks.py")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataloaders.import_png",
        description="Convert the PNG release layout (Domain{k}/{train,test}/{imgs,mask,<form>}) "
                    "into HDF5 cases.")
    parser.add_argument("src", type=Path, help="PNG release root (holds Domain1..)")
    parser.add_argument("dst", type=Path, help="output root for Domain{k}/{train,test}/<case>.h5")
    parser.add_argument("--task", required=True, help="task name, e.g. faz or odoc")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--limit", type=int, default=None,
                        help="import only the first N cases of each site and split")
    parser.add_argument("--sites", default=None,
                        help="comma-separated Domain numbers to import (from 1), e.g. 1,3")
    parser.add_argument("--values", default=None,
                        help="comma-separated PNG pixel value per label, unlabelled last "
                             "(default: the task's, e.g. 0,127,254 for faz)")
    args = parser.parse_args(argv)
    try:
        task = get_task(args.task)
        sites = [int(s) - 1 for s in args.sites.split(",")] if args.sites else None
        values = [int(v) for v in args.values.split(",")] if args.values else None
        summary = import_png_tree(args.src, args.dst, task, workers=args.workers,
                                  limit=args.limit, sites=sites, png_values=values)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary, task, check_counts=args.limit is None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
