"""One place that declares every segmentation task: classes, channels, sites and weak forms.

A task is a contract shared by the data layer, the trainer and the test script. Label maps use
values ``0 .. num_classes - 1`` for the classes and ``num_classes`` for "unlabelled" (UA), which
the partial cross-entropy ignores.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

#: Weak annotation forms and the HDF5 dataset key that stores each of them.
WEAK_FORM_KEYS: Dict[str, str] = {
    "point": "keypoint",
    "box": "box",
    "block": "block",
    "scribble": "scribble",
    "scribble_noisy": "scribble_noisy",
}
#: Label "forms" that are not weak: the full mask (used by CT-full and for evaluation).
FULL_FORM = "mask"
LABEL_FORMS = tuple(WEAK_FORM_KEYS) + (FULL_FORM,)


def label_key(form: str) -> str:
    """HDF5 key that stores the labels of ``form`` (``'point'`` -> ``'keypoint'``)."""
    if form == FULL_FORM:
        return FULL_FORM
    try:
        return WEAK_FORM_KEYS[form]
    except KeyError:
        raise ValueError(
            f"unknown label form {form!r}; expected one of {', '.join(LABEL_FORMS)}"
        ) from None


@dataclass(frozen=True)
class Site:
    """One hospital of a federation."""

    name: str
    weak_form: str
    n_train: int
    n_test: int


@dataclass(frozen=True)
class EvalTarget:
    """A structure scored by the test script: pixels whose label is in ``labels``."""

    name: str
    labels: Tuple[int, ...]


@dataclass(frozen=True)
class Task:
    """Everything the code needs to know about one segmentation task."""

    name: str
    in_chns: int
    class_names: Tuple[str, ...]
    image_size: int
    sites: Tuple[Site, ...]
    eval_targets: Tuple[EvalTarget, ...]
    #: Label values of the published PNG release, indexed by label (last one = unlabelled).
    png_values: Tuple[int, ...] = ()
    synthetic_of: str = ""
    #: Image value of pixels rotated in from outside by the free-rotation augmentation, as in
    #: the reference (``random_rotate``): 0.8 for FAZ (bright, so the rotated-in corners do
    #: not look like the dark avascular zone), 0 for fundus photographs.
    rotate_fill: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def unlabelled(self) -> int:
        """Label value of unlabelled pixels (= ``num_classes``)."""
        return self.num_classes

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def with_sites(self, count: int) -> "Task":
        """This task with ``count`` sites: site ``k`` takes the weak form of declared site
        ``k mod n`` (``n`` declared sites) and its name, numbered from the second round on
        (``FAZID #2``). For synthetic federations of any size."""
        if count < 1:
            raise ValueError(f"a task needs at least one site, got {count}")
        n = len(self.sites)
        sites = tuple(self.sites[k % n] if k < n else
                      replace(self.sites[k % n], name=f"{self.sites[k % n].name} #{k // n + 1}")
                      for k in range(count))
        return replace(self, sites=sites)

    def site(self, index: int) -> Site:
        if not 0 <= index < self.num_sites:
            raise ValueError(
                f"site index {index} out of range for task {self.name!r} "
                f"(expected 0..{self.num_sites - 1})"
            )
        return self.sites[index]


_FAZ_SITES = (
    Site("FAZID", "scribble_noisy", 244, 60),
    Site("OCTA500-3M", "point", 150, 50),
    Site("OCTA500-6M", "block", 200, 100),
    Site("OCTA-25K-3x3", "box", 708, 304),
    Site("ROSE", "scribble", 30, 9),
)
_ODOC_SITES = (
    Site("Drishti-GS", "scribble", 50, 51),
    Site("RIM-ONE-r3", "scribble_noisy", 99, 60),
    Site("REFUGE-train", "box", 320, 80),
    Site("REFUGE-val", "point", 320, 80),
    Site("GAMMA", "block", 100, 100),
)

_TASKS: Dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    _TASKS[task.name] = task
    return task


FAZ = register_task(Task(
    name="faz",
    in_chns=1,
    class_names=("background", "faz"),
    image_size=256,
    sites=_FAZ_SITES,
    eval_targets=(EvalTarget("faz", (1,)),),
    png_values=(0, 127, 254),
    rotate_fill=0.8,
))
ODOC = register_task(Task(
    name="odoc",
    in_chns=3,
    class_names=("background", "cup", "disc_rim"),
    image_size=384,
    sites=_ODOC_SITES,
    eval_targets=(EvalTarget("cup", (1,)), EvalTarget("disc", (1, 2))),
    png_values=(0, 127, 254, 255),
))
# Synthetic twins: same classes, channels and weak forms; the generator decides the counts.
SYNTHETIC_FAZ = register_task(Task(
    name="synthetic_faz", in_chns=1, class_names=FAZ.class_names, image_size=256,
    sites=FAZ.sites, eval_targets=FAZ.eval_targets, png_values=FAZ.png_values,
    synthetic_of="faz", rotate_fill=FAZ.rotate_fill,
))
SYNTHETIC_ODOC = register_task(Task(
    name="synthetic_odoc", in_chns=3, class_names=ODOC.class_names, image_size=384,
    sites=ODOC.sites, eval_targets=ODOC.eval_targets, png_values=ODOC.png_values,
    synthetic_of="odoc", rotate_fill=ODOC.rotate_fill,
))


def get_task(name: str, root: Optional[os.PathLike] = None) -> Task:
    """Look a task up by name (``faz``, ``odoc``, ``synthetic_faz``, ``synthetic_odoc``).

    A synthetic task grows with its data: with ``root`` holding more site folders
    ``Domain1..DomainK`` (:func:`domains_in`; the generator's ``--sites K``) than its five
    declared sites, it has ``K`` sites (fewer folders are missing data, reported by the data
    checks). Real tasks always have their declared sites.
    """
    try:
        task = _TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; expected one of {', '.join(sorted(_TASKS))}"
        ) from None
    if task.synthetic_of and root is not None:
        count = domains_in(root)
        if count > task.num_sites:
            task = task.with_sites(count)
    return task


def domains_in(root: os.PathLike) -> int:
    """``K`` when ``root`` holds the site folders ``Domain1..DomainK`` (consecutive from 1);
    0 when it holds none or does not exist."""
    try:
        found = {int(m.group(1)) for p in Path(root).iterdir()
                 if p.is_dir() and (m := re.fullmatch(r"Domain(\d+)", p.name))}
    except OSError:
        return 0
    count = 0
    while count + 1 in found:
        count += 1
    return count


def task_names() -> Tuple[str, ...]:
    return tuple(sorted(_TASKS))
