"""One site's cases as a torch Dataset, plus a seeded infinite batch stream.

Cases live in ``<root>/Domain{site+1}/{train,test}/<case>.h5`` (see :mod:`dataloaders.h5layout`).
The ``train`` and ``val`` splits are carved deterministically from the ``train`` folder; ``test``
is the ``test`` folder. Every case is checked when the dataset is built, so bad input fails at
start-up with a message that names the file.

Default labels per split:

- ``train``: the site's weak form (``task.site(site).weak_form``);
- ``val``: the full ``mask`` when every validation case has one (validation Dice needs full
  masks), otherwise the site's weak form;
- ``test``: the full ``mask``.

Images stored as ``uint8`` are rescaled by 1/255; float images must lie in [0, 1] (values up to
:data:`RANGE_TOLERANCE` outside are clipped).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import h5layout
from .augment import IMAGE_ORDERS, random_augment
from .tasks import FULL_FORM, Task, get_task, label_key

SPLIT_NAMES = ("train", "val", "test")
#: Float images may exceed [0, 1] by this much (rounding); they are clipped.
RANGE_TOLERANCE = 1e-4
#: What :meth:`InfiniteBatches.draw` returns: the batch's dataset indices and sample seeds.
BatchPlan = Tuple[List[int], List[int]]


def split_train_val(
    cases: Sequence[str], val_fraction: float = 0.2, seed: int = 2022
) -> Tuple[List[str], List[str]]:
    """Deterministic train/validation split of case names.

    The names are sorted first, so the split depends only on the set of names, the fraction
    and the seed. With two or more cases, at least one goes to validation and at least one to
    training (when ``val_fraction > 0``).

    Returns
    -------
    train, val : list of str
        Disjoint, sorted, together covering ``cases``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = sorted(cases)
    if len(set(names)) != len(names):
        raise ValueError("duplicate case names")
    n = len(names)
    n_val = 0
    if n >= 2 and val_fraction > 0:
        n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(names) if i not in val_idx]
    val = [c for i, c in enumerate(names) if i in val_idx]
    return train, val


def _image_to_chw(path: Path, image: np.ndarray, in_chns: int) -> np.ndarray:
    """Validate an image array and return it as float32 (C, H, W) in [0, 1]."""
    if image.ndim == 2:
        image = image[None]
    elif image.ndim != 3:
        raise ValueError(f"{path}: image has shape {image.shape}; expected (H, W) or (C, H, W)")
    if image.shape[0] != in_chns:
        hint = " (channels last? the layout stores (C, H, W))" if image.shape[-1] == in_chns else ""
        raise ValueError(
            f"{path}: image has {image.shape[0]} channel(s) (shape {image.shape}); "
            f"the task expects {in_chns}{hint}"
        )
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)
    if image.dtype.kind != "f":
        raise ValueError(f"{path}: image dtype {image.dtype}; expected float in [0, 1] or uint8")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError(f"{path}: image contains {int((~np.isfinite(image)).sum())} NaN/inf pixel(s)")
    lo, hi = float(image.min()), float(image.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{path}: image values span [{lo:g}, {hi:g}]; expected [0, 1]")
    return np.clip(image, 0.0, 1.0)


def _check_label(path: Path, key: str, label: np.ndarray, spatial: Tuple[int, ...],
                 task: Task, full: bool) -> np.ndarray:
    """Validate a label map against the image size and the task's label range."""
    if label.shape != spatial:
        raise ValueError(f"{path}: {key!r} has shape {label.shape}; expected {spatial} to match the image")
    if label.dtype.kind not in "iu":
        raise ValueError(f"{path}: {key!r} has dtype {label.dtype}; expected integer labels")
    top = task.num_classes - 1 if full else task.unlabelled
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi > top:
        bad = np.unique(label[(label < 0) | (label > top)])
        what = "full mask" if full else "weak label (num_classes = unlabelled)"
        raise ValueError(
            f"{path}: {key!r} holds values {bad.tolist()}; expected 0..{top} for a {what} "
            f"of task {task.name!r}"
        )
    return label.astype(np.uint8, copy=False)


@dataclass
class CaseArrays:
    """Validated arrays of one case: image (C, H, W) float32, label and mask (H, W) uint8."""

    image: np.ndarray
    label: np.ndarray
    mask: Optional[np.ndarray]


def load_case(path: os.PathLike, task: Task, form: str, with_mask: bool) -> CaseArrays:
    """Read and validate one case file.

    Parameters
    ----------
    path : path-like
        The ``.h5`` file.
    task : Task
    form : str
        Label form to return as ``label`` (``'mask'``, ``'scribble'``, ``'point'``, ...).
    with_mask : bool
        Also return the full ``mask`` (it must then exist).
    """
    path = Path(path)
    key = label_key(form)
    keys = ["image", key] + (["mask"] if with_mask and key != "mask" else [])
    arrays = h5layout.read_case(path, keys)
    image = _image_to_chw(path, arrays["image"], task.in_chns)
    spatial = image.shape[1:]
    label = _check_label(path, key, arrays[key], spatial, task, full=form == FULL_FORM)
    mask = None
    if with_mask:
        mask = label if key == "mask" else _check_label(path, "mask", arrays["mask"], spatial,
                                                        task, full=True)
    return CaseArrays(image, label, mask)


def _check_meta(path: Path, meta: Dict[str, Tuple[Tuple[int, ...], Any]], task: Task,
                keys: Sequence[str]) -> None:
    """Cheap structural check (keys, shapes, channels) from :func:`h5layout.read_meta`."""
    for key in ["image", *keys]:
        if key not in meta:
            raise KeyError(f"{path}: dataset {key!r} missing (file has {', '.join(sorted(meta)) or 'nothing'})")
    shape = meta["image"][0]
    if len(shape) not in (2, 3) or (len(shape) == 2 and task.in_chns != 1) or (
            len(shape) == 3 and shape[0] != task.in_chns):
        raise ValueError(f"{path}: image has shape {shape}; the task expects {task.in_chns} channel(s) as (C, H, W)")
    for key in keys:
        if meta[key][0] != tuple(shape[-2:]):
            raise ValueError(f"{path}: {key!r} has shape {meta[key][0]}; expected {tuple(shape[-2:])} to match the image")


class SiteDataset(Dataset):
    """Cases of one site and split, as dicts of tensors.

    Parameters
    ----------
    root : path-like
        Federation root holding ``Domain1``, ``Domain2``, ...
    task : Task or str
    site : int
        Site index counted from 0 (``Domain{site+1}`` on disk).
    split : {'train', 'val', 'test'}
        ``train`` and ``val`` are carved from the ``train`` folder by :func:`split_train_val`.
    label_form : str, optional
        Form returned as ``label``; ``None`` picks the split's default (module docstring).
    augment : bool
        Apply :func:`dataloaders.augment.random_augment` to every sample.
    rotate_order : int
        Spline order of the image in the free rotation (0, nearest, as the reference).
    rotate_fill : float
        Image value rotated in from outside; negative (default) takes the task's reference
        fill ``task.rotate_fill`` (FAZ 0.8, fundus 0).
    val_fraction : float
        Fraction of the train folder held out for validation.
    seed : int
        Seed of the train/val split and of the fallback augmentation generator.
    preload : bool
        Read and validate every case now and keep the arrays in memory. Otherwise only the
        file structure is checked now and pixels are read (and validated) per access.

    Notes
    -----
    A sample is ``{'image': float32 (C, H, W) in [0, 1], 'label': int64 (H, W), 'case': str}``
    plus ``'mask'`` (int64 (H, W), the full label) when every case of the split holds one.
    """

    def __init__(
        self,
        root: os.PathLike,
        task: Union[Task, str],
        site: int,
        split: str,
        label_form: Optional[str] = None,
        augment: bool = False,
        val_fraction: float = 0.2,
        seed: int = 2022,
        preload: bool = True,
        rotate_order: int = 0,
        rotate_fill: float = -1.0,
    ) -> None:
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        self.task = get_task(task, root) if isinstance(task, str) else task
        if rotate_order not in IMAGE_ORDERS or isinstance(rotate_order, bool):
            raise ValueError(f"rotate_order must be one of {IMAGE_ORDERS}, got {rotate_order!r}")
        self.rotate_order = int(rotate_order)
        self.rotate_fill = float(self.task.rotate_fill if rotate_fill < 0 else rotate_fill)
        self.site = site
        self.split = split
        self.augment = augment
        self.root = Path(root)
        weak_form = self.task.site(site).weak_form
        folder_split = "test" if split == "test" else "train"
        files = h5layout.list_cases(self.root, site, folder_split)
        if split != "test":
            by_name = {p.stem: p for p in files}
            train, val = split_train_val(list(by_name), val_fraction, seed)
            chosen = train if split == "train" else val
            if not chosen:
                raise ValueError(
                    f"{h5layout.site_dir(self.root, site, 'train')}: {len(files)} case(s) leave "
                    f"no {split} cases at val_fraction={val_fraction}; need at least 2 cases"
                )
            files = [by_name[c] for c in chosen]
        self.files: List[Path] = files
        self.cases: List[str] = [p.stem for p in files]
        metas = [h5layout.read_meta(p) for p in files]
        self.has_mask = all("mask" in m for m in metas)
        if label_form is None:
            if split == "test" or (split == "val" and self.has_mask):
                label_form = FULL_FORM
            else:
                label_form = weak_form
        label_key(label_form)  # validates the form name
        self.label_form = label_form
        keys = [label_key(label_form)] + (["mask"] if self.has_mask else [])
        for path, meta in zip(files, metas):
            _check_meta(path, meta, self.task, keys)
        self._arrays: Optional[List[CaseArrays]] = None
        if preload:
            self._arrays = [self._load(i) for i in range(len(files))]
        self._aug_rng = np.random.default_rng(seed)

    def _load(self, index: int) -> CaseArrays:
        return load_case(self.files[index], self.task, self.label_form, self.has_mask)

    def __len__(self) -> int:
        return len(self.files)

    def arrays(self, index: int) -> CaseArrays:
        """Validated NumPy arrays of case ``index`` (no augmentation)."""
        return self._arrays[index] if self._arrays is not None else self._load(index)

    def sample(self, index: int, rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
        """Sample ``index``; augmentation (if enabled) draws from ``rng``.

        Without ``rng`` the dataset's own generator (seeded with ``seed``) is used, which is
        reproducible only for a fixed sequence of calls in one process.
        """
        arr = self.arrays(index)
        image, label, mask = arr.image, arr.label, arr.mask
        if self.augment:
            labels = (label,) if mask is None else (label, mask)
            image, labels = random_augment(image, labels, rng if rng is not None else self._aug_rng,
                                           fill_label=self.task.unlabelled,
                                           image_order=self.rotate_order,
                                           image_fill=self.rotate_fill)
            label = labels[0]
            mask = labels[1] if mask is not None else None
        out: Dict[str, Any] = {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)),
            "label": torch.from_numpy(label.astype(np.int64)),
            "case": self.cases[index],
        }
        if mask is not None:
            out["mask"] = torch.from_numpy(mask.astype(np.int64))
        return out

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.sample(index)

    def __repr__(self) -> str:
        return (f"SiteDataset(task={self.task.name!r}, site={self.site}, split={self.split!r}, "
                f"label_form={self.label_form!r}, cases={len(self)}, augment={self.augment})")


def collate(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack samples into a batch: tensors gain a leading batch axis, ``case`` becomes a list."""
    batch: Dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def make_loader(dataset: Dataset, batch_size: int = 1, shuffle: bool = False,
                seed: int = 2022) -> DataLoader:
    """Finite loader for evaluation (in-process, seeded when ``shuffle``)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collate, num_workers=0)


class InfiniteBatches:
    """Endless stream of batches in a seeded, reproducible order.

    Indices follow a fresh random permutation of the dataset each epoch; batches run across
    epoch boundaries, so every batch is full even when the dataset is smaller than
    ``batch_size``. Each sample gets its own augmentation generator drawn from the stream's
    generator, so the stream depends only on ``seed`` (and on the state restored by
    :meth:`load_state_dict`).

    Parameters
    ----------
    dataset : SiteDataset or Dataset
        Datasets with a ``sample(index, rng)`` method get per-sample generators; others are
        indexed plainly.
    batch_size : int
    seed : int
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 2022) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self._order = np.zeros(0, dtype=np.int64)
        self._pos = 0

    def __iter__(self) -> "InfiniteBatches":
        return self

    def next_indices(self) -> List[int]:
        """Indices of the next batch (advances the stream)."""
        out: List[int] = []
        while len(out) < self.batch_size:
            if self._pos == len(self._order):
                self._order = self._rng.permutation(len(self.dataset))
                self._pos = 0
            take = min(self.batch_size - len(out), len(self._order) - self._pos)
            out.extend(self._order[self._pos:self._pos + take].tolist())
            self._pos += take
        return out

    def __next__(self) -> Dict[str, Any]:
        return self.make_batch(self.draw())

    def draw(self) -> BatchPlan:
        """Indices and augmentation seeds of the next batch (advances the stream; cheap).

        Returns
        -------
        indices, seeds : list of int
            ``batch_size`` dataset indices and one seed per sample.
        """
        indices = self.next_indices()
        seeds = self._rng.integers(0, 2**63 - 1, size=len(indices))
        return indices, [int(s) for s in seeds]

    def make_batch(self, plan: BatchPlan) -> Dict[str, Any]:
        """The batch of a plan from :meth:`draw`: read, augment and collate (the costly part).

        It depends on ``plan`` alone (no stream state), so it may run on another thread.
        Returns ``{'image': (B, C, H, W) float32, 'label': (B, H, W) int64, 'case': list}``
        plus ``'mask'`` when the dataset has full masks.
        """
        indices, seeds = plan
        get = getattr(self.dataset, "sample", None)
        if get is not None:
            samples = [get(i, np.random.default_rng(s)) for i, s in zip(indices, seeds)]
        else:
            samples = [self.dataset[i] for i in indices]
        return collate(samples)

    def state_dict(self) -> Dict[str, Any]:
        """Position of the stream, to resume it after a restart."""
        return {"rng": self._rng.bit_generator.state, "order": self._order.tolist(),
                "pos": self._pos}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._order = np.asarray(state["order"], dtype=np.int64)
        self._pos = int(state["pos"])


class PrefetchBatches:
    """:class:`InfiniteBatches` with reading, augmentation and collation on background threads.

    The plans (indices and sample seeds, :meth:`InfiniteBatches.draw`) are drawn on the
    calling thread, in order, so the batches are exactly those of the wrapped stream; only
    :meth:`InfiniteBatches.make_batch`, which depends on its plan alone, runs on ``depth``
    worker threads (the augmentation's SciPy resampling releases the GIL). While the caller
    trains on one batch, the next ``depth`` are being built.

    :meth:`state_dict` is the position of the *consumer* (the state before the first batch
    drawn but not yet returned), in the format of :meth:`InfiniteBatches.state_dict`, so a
    checkpoint resumes identically with or without prefetching.

    Parameters
    ----------
    stream : InfiniteBatches
        The stream to prefetch from; it must not be advanced by anyone else.
    depth : int
        Batches in flight (and worker threads), >= 1.
    pin_memory : bool
        Return page-locked tensors (for asynchronous copies to a CUDA device).
    """

    def __init__(self, stream: InfiniteBatches, depth: int = 2, pin_memory: bool = False) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"prefetch depth must be an integer >= 1, got {depth!r}")
        self.stream = stream
        self.depth = depth
        self.pin_memory = pin_memory
        self._pending: Deque[Tuple[Dict[str, Any], Future]] = deque()
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def dataset(self) -> Dataset:
        return self.stream.dataset

    @property
    def batch_size(self) -> int:
        return self.stream.batch_size

    def __iter__(self) -> "PrefetchBatches":
        return self

    def __next__(self) -> Dict[str, Any]:
        self._fill(1)
        _, future = self._pending.popleft()
        self._fill(self.depth)  # keep the workers busy while the caller trains
        return future.result()

    def _fill(self, count: int) -> None:
        """Draw plans (on this thread) until ``count`` batches are in flight."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="batches")
        while len(self._pending) < count:
            state = self.stream.state_dict()
            plan = self.stream.draw()
            self._pending.append((state, self._pool.submit(self._build, plan)))

    def _build(self, plan: BatchPlan) -> Dict[str, Any]:
        batch = self.stream.make_batch(plan)
        if self.pin_memory:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def _discard(self) -> None:
        """Forget the batches in flight (a running one finishes and is dropped)."""
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    def state_dict(self) -> Dict[str, Any]:
        """Position of the consumer, in the format of :meth:`InfiniteBatches.state_dict`."""
        return self._pending[0][0] if self._pending else self.stream.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from ``state`` (from either stream class); batches in flight are dropped."""
        self._discard()
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Drop the batches in flight and stop the worker threads."""
        self._discard()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
