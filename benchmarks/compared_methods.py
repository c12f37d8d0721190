"""The rows of a comparison (:class:`Method`: a registered method and the settings that make
it this row) and where their runs live under a comparison folder ``DIR``: ``runs/<method>/``
(one seed) or ``runs/<method>_seed<S>/`` (one of several seeds). Used by
:mod:`benchmarks.compare_strategies`, which trains them, and
:mod:`benchmarks.comparison_report`, which reads them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from methods.registry import get_method, method_names

log = logging.getLogger("fedicra.compare")


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a strategy and the settings that make it this row."""

    label: str
    strategy: str
    settings: Mapping[str, object] = field(default_factory=dict)
    #: folder name under ``runs/`` and the name ``--methods`` accepts besides the label
    short: str = ""

    @property
    def slug(self) -> str:
        return self.short or self.label


def full_objective_settings() -> Dict[str, object]:
    """FedICRA's network and objective (its registered defaults), for the FedAvg ablation row."""
    fedicra = get_method("FedICRA")
    return {"model": fedicra.model, "procedure": fedicra.procedure}


def all_methods() -> List[Method]:
    """The rows of the paper's comparison in its order, FedICRA first, then any other
    registered method (by name), then the ablation.

    Methods that are not registered (yet) are left out with a warning.
    """
    names = ["FedICRA", "FedICRA-ref", "FedLPPA", "FedAvg", "FT", "FedProx", "FedBN", "FedAP", "FedRep", "MetaFed",
             "FedALA", "FedLC", "Local", "CT-weak", "CT-full"]
    known = {n.lower(): n for n in method_names()}
    rows = []
    for name in names:
        if name.lower() in known:
            rows.append(Method(name, known[name.lower()]))
        else:
            log.warning("method %s is not registered; left out of the comparison", name)
    listed = {n.lower() for n in names}
    rows += [Method(n, n) for n in method_names() if n.lower() not in listed]  # added methods
    rows.append(Method("FedAvg + full objective", "FedAvg", full_objective_settings(),
                       short="FedAvg+full"))
    return rows


def select_methods(spec: str) -> List[Method]:
    """``all`` or a comma-separated list of labels (case-insensitive; the ablation row is
    ``FedAvg+full``)."""
    rows = all_methods()
    if spec.strip().lower() == "all":
        return rows
    by_name = {m.label.lower(): m for m in rows}
    by_name.update({m.slug.lower(): m for m in rows})
    chosen = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name.lower() not in by_name:
            raise SystemExit(f"--methods: unknown method {name!r}; choose from "
                             f"{', '.join(m.slug for m in rows)} or all")
        chosen.append(by_name[name.lower()])
    return chosen


def run_dir(out: Path, method: Method, seed: Optional[int] = None) -> Path:
    """Where ``method`` is trained: ``runs/<method>`` (one seed: ``seed=None``) or
    ``runs/<method>_seed<S>`` (one of several seeds)."""
    name = method.slug if seed is None else f"{method.slug}_seed{seed}"
    return out / "runs" / name


def _finished(folder: Path) -> bool:
    return ((folder / "test" / "mean_std_result.csv").is_file()
            and (folder / "compare.json").is_file())


def snapshot_seed(folder: Path) -> Optional[int]:
    """The seed of a run's configuration snapshot (``config.toml``), None if unreadable."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        with open(folder / "config.toml", "rb") as f:
            seed = tomllib.load(f).get("seed")
    except (OSError, ValueError):
        return None
    return seed if isinstance(seed, int) else None


def result_dir(out: Path, method: Method, seed: Optional[int] = None) -> Optional[Path]:
    """The folder holding the finished results of ``method`` (and ``seed``), None if there is
    none yet. For one of several seeds, a finished single-seed folder ``runs/<method>`` of the
    same seed stands in for ``runs/<method>_seed<S>``."""
    folder = run_dir(out, method, seed)
    if _finished(folder):
        return folder
    if seed is not None:
        single = run_dir(out, method)
        if _finished(single) and snapshot_seed(single) == seed:
            return single
    return None


def is_done(out: Path, method: Method, seed: Optional[int] = None) -> bool:
    return result_dir(out, method, seed) is not None


def job_name(method: Method, seed: Optional[int]) -> str:
    return method.label + ("" if seed is None else f" seed {seed}")
