"""The on-disk layout shared by every dataset: ``<root>/Domain{k}/{train,test}/<case>.h5``.

Each case file holds ``image`` (H, W) or (C, H, W) float32 in [0, 1], ``mask`` (H, W) uint8 full
label, and one (H, W) uint8 array per weak form (keys in :data:`dataloaders.tasks.WEAK_FORM_KEYS`).
Sites are numbered from 0 in code and from 1 on disk (``Domain1`` is site 0).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import h5py
import numpy as np

SPLITS = ("train", "test")


def site_dir(root: os.PathLike, site: int, split: str) -> Path:
    """Folder of one site's split; ``site`` counts from 0."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(root) / f"Domain{site + 1}" / split


def list_cases(root: os.PathLike, site: int, split: str) -> List[Path]:
    """Sorted case files of one site's split; raises if the folder is missing or empty."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (expected Domain1..DomainK inside)")
    folder = site_dir(root, site, split)
    if not folder.is_dir():
        raise FileNotFoundError(f"site folder {folder} does not exist (expected <case>.h5 files)")
    cases = sorted(folder.glob("*.h5"))
    if not cases:
        raise FileNotFoundError(f"site folder {folder} holds no .h5 case files")
    return cases


def write_case(
    path: os.PathLike,
    image: np.ndarray,
    mask: Optional[np.ndarray],
    labels: Mapping[str, np.ndarray],
) -> None:
    """Write one case atomically (temporary file in the same folder, then rename).

    ``labels`` maps HDF5 keys (``'scribble'``, ``'keypoint'``, ...) to (H, W) label arrays.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # track_times=False keeps files byte-identical for identical inputs.
        with h5py.File(tmp, "w", track_order=True) as f:
            f.create_dataset("image", data=np.asarray(image, dtype=np.float32),
                             compression="gzip", compression_opts=4, track_times=False)
            if mask is not None:
                f.create_dataset("mask", data=np.asarray(mask, dtype=np.uint8),
                                 compression="gzip", compression_opts=4, track_times=False)
            for key in sorted(labels):
                f.create_dataset(key, data=np.asarray(labels[key], dtype=np.uint8),
                                 compression="gzip", compression_opts=4, track_times=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _open(path: Path) -> h5py.File:
    """Open a case for reading; a damaged or non-HDF5 file raises a ValueError naming it."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None


def read_case(path: os.PathLike, keys: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    """Read datasets of one case; errors name the file and the missing key."""
    path = Path(path)
    with _open(path) as f:
        wanted = list(f.keys()) if keys is None else keys
        out = {}
        for key in wanted:
            if key not in f:
                raise KeyError(
                    f"{path}: dataset {key!r} missing (file has {', '.join(sorted(f.keys())) or 'nothing'})"
                )
            try:
                out[key] = f[key][()]
            except (OSError, TypeError) as err:
                raise ValueError(f"{path}: dataset {key!r} could not be read ({err})") from None
        return out


def read_meta(path: os.PathLike) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """Shape and dtype of every dataset of one case, without reading the arrays."""
    path = Path(path)
    with _open(path) as f:
        return {key: (tuple(obj.shape), obj.dtype) for key, obj in f.items()
                if isinstance(obj, h5py.Dataset)}
