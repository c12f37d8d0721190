"""Checks a run configuration before any process starts, so a bad run fails in a second.

Every check raises :class:`PreflightError` whose message starts with the flag or key at fault
and says what was expected. Nothing is written. ``flower_runner.py`` calls :func:`check_run`
in both modes, ``launch`` checks everything but the data (which lives on the sites) and
``site`` checks its own data. Then, and only then, :func:`claim_output` takes the run folder
(marker and lock: :mod:`deployment.run_folder`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from configs import RunConfig
from deployment.run_folder import (  # noqa: F401  (re-exported)
    MARKER, RUN_ENTRIES, FolderRefused, check_exp_inside, claim, run_files)


class PreflightError(ValueError):
    """A run configuration that cannot work; the message names the flag or key."""


def _fail(key: str, message: str) -> None:
    raise PreflightError(f"--{key}: {message}")


def check_names(cfg: RunConfig) -> None:
    """Task, strategy, network, objective and parameter groups exist and fit each other."""
    from dataloaders.tasks import get_task
    from losses.objective import PROCEDURES, resolve_procedure
    from networks.registry import network_info, network_names

    for key, lookup in (("img_class", get_task), ("procedure", resolve_procedure)):
        try:
            lookup(getattr(cfg, key))
        except ValueError as err:
            _fail(key, str(err))
    if cfg.model not in network_names():
        _fail("model", f"unknown network {cfg.model!r}; expected one of {', '.join(network_names())}")
    network = network_info(cfg.model)  # what the network declared at its registration
    strategy = cfg.method  # the strategy name was resolved when the configuration was built
    ft_iters = cfg.ignored_keys.get("ft_iters", 0)
    if ft_iters and not strategy.fine_tunes:
        _fail("ft_iters", f"{ft_iters}: only FT fine-tunes after the last round; "
                          f"{strategy.name} would ignore it (set ft_iters = 0, or --strategy FT)")
    if network.calibration_head and not strategy.calibrates:
        _fail("model", f"{cfg.model!r} carries FedLC's calibration head, which only FedLC trains "
                       f"and deploys; use it with --strategy FedLC"
                       + (f", or {network.uncalibrated!r} with {strategy.name}"
                          if network.uncalibrated else ""))
    problem = strategy.refusal(cfg)  # a method's own refusals: (key, reason)
    if problem:
        _fail(problem[0], f"{problem[1]} (strategy {strategy.name})")
    task = get_task(cfg.img_class, cfg.root_path)  # a synthetic task: the sites of its data
    if cfg.num_clients > task.num_sites:
        more = (f"; for more, write a synthetic federation with python -m dataloaders.synthetic "
                f"--sites {cfg.num_clients} to --root_path" if task.synthetic_of else "")
        _fail("num_clients", f"{cfg.num_clients} clients but task {task.name!r} has "
                             f"{task.num_sites} sites (one client per site{more})")
    terms = PROCEDURES[resolve_procedure(cfg.procedure)]
    if "tree" in terms and cfg.lambda_tree != 0 and not network.aux_heads:
        _fail("procedure", f"{cfg.procedure!r} has the tree energy term, which needs a network "
                           f"with auxiliary heads ({_networks_with('aux_heads')}), "
                           f"not {cfg.model!r}")
    if terms == {"pce", "sc"} and not network.site_gates:
        # (the full objective skips its site term on a network without gates, by design)
        _fail("procedure", f"{cfg.procedure!r} is pCE plus the site-contrastive term, which "
                           f"needs a network with site gates ({_networks_with('site_gates')}), "
                           f"not {cfg.model!r}")
    size = cfg.img_size or task.image_size
    if size % network.size_multiple:
        _fail("img_size", f"{size} px: network {cfg.model!r} needs a multiple of "
                          f"{network.size_multiple}")
    try:
        check_exp_inside(cfg.exp_name)
    except ValueError as err:
        _fail("exp", str(err))


def _networks_with(capability: str) -> str:
    """Registered networks that declare ``capability`` (a :class:`NetworkInfo` field)."""
    from networks.registry import network_info, network_names

    return ", ".join(n for n in network_names() if getattr(network_info(n), capability))


def check_gpus(gpus: Sequence[int]) -> None:
    """GPU ids are non-negative and, where CUDA is present, exist."""
    bad = [g for g in gpus if g < 0]
    if bad:
        _fail("gpus", f"GPU ids must be >= 0, got {bad}")
    if not gpus:
        return
    from configs.devices import available_gpus

    count = len(available_gpus())
    missing = [g for g in gpus if g >= count]
    if missing and not count:
        _fail("gpus", f"GPU ids {missing} do not exist: this machine has no CUDA GPU "
                      "(torch.cuda.device_count() = 0); leave --gpus out (or give it no ids) "
                      "to train on the CPU")
    if missing:
        _fail("gpus", f"GPU ids {missing} do not exist: this machine has {count} "
                      f"(ids 0..{count - 1})")


def count_cases(cfg: RunConfig, sites: Optional[Sequence[int]] = None,
                headers: bool = True) -> Dict[int, Dict[str, int]]:
    """Cases per site and split for ``sites`` (default: every site the run uses); fails naming
    ``--root_path``. With ``headers`` every case file is opened too (:func:`check_case_files`)."""
    from dataloaders import h5layout

    root = Path(cfg.root_path)
    if not root.is_dir():
        _fail("root_path", f"data root {root} does not exist (expected Domain1..Domain"
                           f"{cfg.num_clients} inside; see docs/data.md to import or generate data)")
    counts: Dict[int, Dict[str, int]] = {}
    for site in range(cfg.num_clients) if sites is None else sites:
        counts[site] = {}
        for split in h5layout.SPLITS:
            folder = h5layout.site_dir(root, site, split)
            n = len(list(folder.glob("*.h5"))) if folder.is_dir() else 0
            if n == 0:
                _fail("root_path", f"{folder} holds no .h5 cases (site {site} of "
                                   f"{cfg.num_clients} clients needs train and test cases)")
            counts[site][split] = n
        if round(counts[site]["train"] * cfg.val_fraction) < 1 or \
                counts[site]["train"] - round(counts[site]["train"] * cfg.val_fraction) < 1:
            _fail("val_fraction", f"{cfg.val_fraction} of site {site}'s "
                                  f"{counts[site]['train']} training cases leaves an empty "
                                  "training or validation split")
    if headers:
        check_case_files(cfg, counts)
    return counts


#: A site with more cases than this gets a progress line while its files are opened.
PROGRESS_CASES = 500


def check_case_files(cfg: RunConfig, counts: Dict[int, Dict[str, int]]) -> None:
    """Open every case file of the sites in ``counts`` (the HDF5 header only, no pixels) and
    check that it holds ``image`` and the labels its split is read with (training: the run's
    label form, ``label_form`` or the site's weak form; test: ``mask``), with matching shapes.
    Fails naming ``--root_path`` and the file; a large site logs a progress line first."""
    import logging

    from dataloaders import h5layout
    from dataloaders.dataset import _check_meta
    from dataloaders.tasks import get_task, label_key

    task = get_task(cfg.img_class, cfg.root_path)
    for site in counts:
        total = sum(counts[site].values())
        if total > PROGRESS_CASES:
            logging.getLogger("fedicra").info("checking the %d case files of site %d ...",
                                              total, site)
        for split in h5layout.SPLITS:
            form = (cfg.label_form or task.site(site).weak_form) if split == "train" else "mask"
            for path in sorted(h5layout.site_dir(cfg.root_path, site, split).glob("*.h5")):
                try:
                    _check_meta(path, h5layout.read_meta(path), task, [label_key(form)])
                except (ValueError, KeyError) as err:
                    message = err.args[0] if err.args else str(err)
                    _fail("root_path", f"site {site} ({split}): {message}")


def check_run(cfg: RunConfig, data: bool = True) -> Dict[int, Dict[str, int]]:
    """All checks; returns the case counts per site (empty without ``data``). The cheap ones
    first: names, the data folders, GPUs, then every case file."""
    check_names(cfg)
    counts = count_cases(cfg, headers=False) if data else {}
    check_gpus(cfg.gpus)
    if data:
        check_case_files(cfg, counts)
    return counts


def describe_counts(counts: Dict[int, Dict[str, int]]) -> str:
    return ", ".join(f"site {k}: {c['train']} train / {c['test']} test" for k, c in counts.items())


# ---------------------------------------------------------------------- output folders
def claim_output(out_dir: Path, overwrite: bool, exp: str = "", role: str = "run",
                 prepared: bool = False):
    """Make ``out_dir`` this process's run folder (:func:`deployment.run_folder.claim`): refused
    while a live run holds it, when it is not a run's folder, or when it holds a run and not
    ``overwrite``; returns the lock, held until the process ends or releases it."""
    return claim(Path(out_dir), exp or Path(out_dir).name, overwrite, role, prepared)
