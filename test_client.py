"""Test what a method deploys: ``python test_client.py --client all --exp faz/FedICRA``.

A method that deploys one global model (``deploys = "global"``: FedAvg, FedProx) is tested with
``<exp>/global/best.pt`` (``--checkpoint latest``: ``latest.pt``) on every site; a personalised
method with each client's ``client<k>/best.pt`` (selected on its own validation split). The log
says which model scored each client. Per-case metrics go to ``result.csv``; ``mean_std_result.csv``
holds one row per site, ``mean of sites`` (every site weighs the same) and ``pooled`` (every
case weighs the same). Testing one client at a time (``--client clientK``) adds to the results
of the same run instead of replacing them. Predictions are written as NIfTI files and overlay
PNGs. See ``clients/metrics.py`` for the empty-prediction policy.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from configs import load_config
from configs.devices import pick_device
from dataloaders.dataset import SiteDataset
from dataloaders.tasks import get_task
from clients.evaluation import predict
from clients.overlay import overlay
from clients.metrics import METRIC_NAMES, binary_metrics
from networks.checkpoint import load_checkpoint, run_meta
from networks.factory import build_for_run

log = logging.getLogger("fedicra.test")

#: Columns that say which model scored a client (in result.csv and mean_std_result.csv).
MODEL_COLUMNS = ("model", "checkpoint", "round", "val_dice")
#: ``client`` labels of the summary rows over several sites.
MEAN_OF_SITES = "mean of sites"
POOLED = "pooled"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--client", default="all", help="clientK or all")
    p.add_argument("--cid", type=int, default=None, help="client id (same as --client clientK)")
    p.add_argument("--exp", required=True,
                   help="the run's folder under --out_root (<out_root>/<exp>, as trained, or "
                        "wherever the folder was copied or moved)")
    p.add_argument("--out_root", default="model", help="folder holding <exp>/")
    p.add_argument("--root_path", default=None, help="data root (default: the run's)")
    p.add_argument("--img_class", default=None, help="task (checked against the run's)")
    p.add_argument("--model", default=None, help="network (checked against the run's)")
    p.add_argument("--num_classes", type=int, default=None, help="checked against the task")
    p.add_argument("--in_chns", type=int, default=None, help="checked against the task")
    p.add_argument("--min_num_clients", type=int, default=None,
                   help="number of clients of the run (checked against the run's)")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    p.add_argument("--output", default=None, help="result folder (default <out_root>/<exp>/test)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    p.add_argument("--no_images", action="store_true", help="skip NIfTI and PNG outputs")
    return p.parse_args(argv)


def _check(flag: str, given, expected) -> None:
    if given is not None and given != expected:
        raise ValueError(f"--{flag} {given} does not match the run ({expected})")


def save_outputs(folder: Path, case: str, image: np.ndarray, pred: np.ndarray,
                 truth: np.ndarray, num_classes: int) -> None:
    """``<case>_pred.nii.gz`` (labels) and ``<case>_overlay.png`` (prediction tinted, ground
    truth as a green contour)."""
    import SimpleITK as sitk
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(pred.astype(np.uint8)), str(folder / f"{case}_pred.nii.gz"))
    Image.fromarray(overlay(image, pred, truth, num_classes)).save(folder / f"{case}_overlay.png")


def deployed_model(cfg) -> str:
    """What the run's method hands its sites: ``'global'`` (one model for every site) or
    ``'personal'`` (each site's own), as its registry entry declares."""
    return cfg.method.deploys


def checkpoint_path(cfg, cid: int, checkpoint: str, deploys: str) -> Path:
    """``<exp>/global/<checkpoint>.pt`` for a global method, ``<exp>/client<cid>/...`` otherwise."""
    folder = "global" if deploys == "global" else f"client{cid}"
    return cfg.out_dir / folder / f"{checkpoint}.pt"


def load_arrays_strictly(model: nn.Module, arrays: Mapping[str, object], path: Path) -> None:
    """Load ``arrays`` (state_dict key -> array) into ``model``; every model key must be there.

    Raises
    ------
    ValueError
        Naming ``path`` and the missing (or unexpected, or misshaped) keys.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the model's {len(expected)} keys "
                         f"(not a full global model?): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    unexpected = [k for k in arrays if k not in expected]
    if unexpected:
        raise ValueError(f"{path} holds keys the model ({len(unexpected)}) does not have: "
                         f"{', '.join(unexpected[:8])}")
    state = {k: torch.as_tensor(np.asarray(arrays[k])) for k in expected}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit the model: {err}") from None


def _checkpoint_entry(state: object, path: Path, key: str) -> object:
    if not isinstance(state, dict) or key not in state:
        raise ValueError(f"{path} is not a {'global' if key == 'arrays' else 'client'} "
                         f"checkpoint: it has no {key!r} entry")
    return state[key]


def load_tested_model(cfg, cid: int, checkpoint: str, device: torch.device
                      ) -> Tuple[nn.Module, Dict[str, object]]:
    """The model that client ``cid`` is tested with, and where it comes from.

    A method that deploys the global model (FedAvg, FedProx) is tested with ``global/<ckpt>.pt``
    (its ``arrays`` loaded strictly into the site's network); a personalised method with
    ``client<cid>/<ckpt>.pt``.

    Returns
    -------
    model, info
        ``info`` holds ``model`` (``'global'`` or ``'personal'``), ``checkpoint`` (path relative
        to the experiment folder), ``round`` and ``val_dice`` (NaN when the file records none).
    """
    deploys = deployed_model(cfg)
    path = checkpoint_path(cfg, cid, checkpoint, deploys)
    expect = run_meta(cfg, None if deploys == "global" else cid)
    state = load_checkpoint(path, map_location="cpu", expect=expect)
    model = build_for_run(cfg, site=cid)
    if deploys == "global":
        load_arrays_strictly(model, _checkpoint_entry(state, path, "arrays"), path)
    else:
        try:
            model.load_state_dict(_checkpoint_entry(state, path, "model"))
        except RuntimeError as err:
            raise ValueError(f"{path} does not fit the model: {err}") from None
    info = {"model": deploys, "checkpoint": path.relative_to(cfg.out_dir).as_posix(),
            "round": int(state.get("round", state.get("rounds_done", -1))),
            "val_dice": float(state.get("val_dice", math.nan))}
    return model.to(device), info


def describe_model(cid: int, info: Mapping[str, object]) -> str:
    """One log line: which model client ``cid`` is scored with."""
    kind = "the global model" if info["model"] == "global" else "its personalised model"
    val = float(info["val_dice"])
    return (f"client {cid}: scoring {kind} {info['checkpoint']} (round {info['round']}, "
            f"validation Dice {'n/a' if math.isnan(val) else f'{val:.4f}'})")


def test_client(cfg, cid: int, root: str, checkpoint: str, out: Path, device: torch.device,
                images: bool) -> List[Dict[str, object]]:
    """Per-case, per-target metrics of client ``cid``'s test cases (see :func:`load_tested_model`)."""
    task = get_task(cfg.img_class, root)
    model, info = load_tested_model(cfg, cid, checkpoint, device)
    log.info("%s", describe_model(cid, info))
    data = SiteDataset(root, task, cid, "test", val_fraction=cfg.val_fraction, seed=cfg.seed)
    run = run_id(cfg)
    rows: List[Dict[str, object]] = []
    for i in range(len(data)):
        sample = data.sample(i)
        image = sample["image"][None].to(device)
        pred = predict(model, image, cid, cfg.img_size)[0].cpu().numpy()
        truth = sample["label"].numpy()
        for target in task.eval_targets:
            row: Dict[str, object] = {"run": run, "client": cid, **info, "case": sample["case"],
                                      "target": target.name}
            row.update(binary_metrics(np.isin(pred, target.labels), np.isin(truth, target.labels)))
            rows.append(row)
        if images:
            save_outputs(out / f"client{cid}", sample["case"], sample["image"].numpy(), pred,
                         truth, task.num_classes)
    return rows


def run_at(run_dir: Path):
    """The run in folder ``run_dir`` (``<out_root>/<exp>`` as given): its ``config.toml``
    with the folder pinned to ``run_dir``, so a copied or moved run folder is scored, and
    written to, where it is, whatever ``exp`` and ``out_root`` its snapshot recorded."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    name = run_dir.name.replace("{", "{{").replace("}", "}}")  # exp is a format string
    cfg.out_root, cfg.exp = str(run_dir.parent), name
    return cfg


def run_id(cfg) -> str:
    """Identifies the run a result row comes from: its experiment folder, resolved."""
    return str(Path(cfg.out_dir).resolve())


def _common(values: Sequence[object]) -> object:
    """The value all ``values`` share, else ``''`` (e.g. personal checkpoints of several sites)."""
    return values[0] if values and len({str(v) for v in values}) == 1 else ""


def _metric_stats(values: Sequence[float]) -> Dict[str, float]:
    """Mean and (population) std of the defined (non-NaN) ``values``; NaN if none is."""
    arr = np.asarray(values, dtype=np.float64)
    defined = arr[~np.isnan(arr)]
    if not defined.size:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(defined.mean()), "std": float(defined.std())}


def _summary_row(label: str, target: str, members: Sequence[Mapping[str, object]],
                 sites: int) -> Dict[str, object]:
    s: Dict[str, object] = {"client": label, "target": target}
    s.update({c: _common([m[c] for m in members]) for c in MODEL_COLUMNS})
    s.update(sites=sites, cases=len(members))
    return s


def _case_summary(label: str, target: str, members: Sequence[Mapping[str, object]]
                  ) -> Dict[str, object]:
    """Mean and std over the cases ``members`` (one site, or every case pooled)."""
    s = _summary_row(label, target, members, len({m["client"] for m in members}))
    for m in METRIC_NAMES:
        stats = _metric_stats([float(x[m]) for x in members])
        s[f"{m}_mean"], s[f"{m}_std"] = stats["mean"], stats["std"]
    s["hd95_undefined"] = int(sum(math.isnan(float(x["hd95"])) for x in members))
    return s


def _mean_of_sites(target: str, members: Sequence[Mapping[str, object]],
                   sites: Sequence[Mapping[str, object]]) -> Dict[str, object]:
    """Every site weighs the same: mean and std across the per-site means ``sites``."""
    s = _summary_row(MEAN_OF_SITES, target, members, len(sites))
    for m in METRIC_NAMES:
        stats = _metric_stats([float(x[f"{m}_mean"]) for x in sites])
        s[f"{m}_mean"], s[f"{m}_std"] = stats["mean"], stats["std"]
    s["hd95_undefined"] = int(sum(int(x["hd95_undefined"]) for x in sites))
    return s


def summarise(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Summary rows per target: one per site (``client<k>``), ``'mean of sites'`` (mean and std
    across the per-site means) and ``'pooled'`` (mean and std over every case).

    Distances (HD95, ASSD) average the cases where they are defined; ``hd95_undefined`` counts
    the others. The model columns hold the value shared by the summarised rows, else ``''``.
    """
    targets = list(dict.fromkeys(str(r["target"]) for r in rows))
    sites: List[Dict[str, object]] = []
    for cid in sorted({int(r["client"]) for r in rows}):
        for target in targets:
            members = [r for r in rows if int(r["client"]) == cid and r["target"] == target]
            if members:
                sites.append(_case_summary(f"client{cid}", target, members))
    out = list(sites)
    for target in targets:
        members = [r for r in rows if r["target"] == target]
        out.append(_mean_of_sites(target, members, [s for s in sites if s["target"] == target]))
    for target in targets:
        out.append(_case_summary(POOLED, target, [r for r in rows if r["target"] == target]))
    return out


def read_result_rows(path: Path) -> List[Dict[str, object]]:
    """Rows of a ``result.csv`` written by :func:`write_csv`, with numbers parsed back."""
    with open(path, newline="") as f:
        rows: List[Dict[str, object]] = list(csv.DictReader(f))
    try:
        for r in rows:
            r["client"] = int(r["client"])
            r["round"] = int(r["round"])
            for key in ("val_dice",) + METRIC_NAMES:
                r[key] = float(r[key])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a result.csv of this script ({err})") from None
    return rows


def _same_run(row: Mapping[str, object], run: str, checkpoint: str) -> bool:
    return row.get("run") == run and Path(str(row.get("checkpoint", ""))).stem == checkpoint


def merge_results(path: Path, rows: List[Dict[str, object]], run: str,
                  checkpoint: str) -> List[Dict[str, object]]:
    """``rows`` plus the rows of ``path`` (an earlier ``result.csv``) of the clients not tested
    now, when every row there comes from the same run and checkpoint choice (``best``/``latest``);
    otherwise the earlier file is replaced. Sorted by client, case order kept."""
    previous: List[Dict[str, object]] = []
    if path.is_file():
        try:
            previous = read_result_rows(path)
        except ValueError as err:
            log.warning("%s; it is replaced", err)
        if previous and not all(_same_run(r, run, checkpoint) for r in previous):
            log.warning("%s holds results of another run or checkpoint; it is replaced", path)
            previous = []
    tested = {int(r["client"]) for r in rows}
    kept = [r for r in previous if int(r["client"]) not in tested]
    return sorted(kept + rows, key=lambda r: int(r["client"]))


def write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(summary: List[Dict[str, object]]) -> str:
    head = (f"{'client':>13} {'target':>7} {'model':>8} {'round':>5} {'cases':>5} "
            + " ".join(f"{m:>17}" for m in METRIC_NAMES))
    lines = [head]
    for s in summary:
        cells = " ".join(f"{s[m + '_mean']:8.4f}±{s[m + '_std']:<8.4f}" for m in METRIC_NAMES)
        lines.append(f"{str(s['client']):>13} {s['target']:>7} {str(s['model']):>8} "
                     f"{str(s['round']):>5} {s['cases']:>5} {cells}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        cfg = run_at(Path(args.out_root) / args.exp)
        task = get_task(cfg.img_class)
        _check("img_class", args.img_class, cfg.img_class)
        _check("model", args.model, cfg.model)
        _check("num_classes", args.num_classes, task.num_classes)
        _check("in_chns", args.in_chns, task.in_chns)
        _check("min_num_clients", args.min_num_clients, cfg.num_clients)
        if args.cid is not None:
            clients = [args.cid]
        elif args.client == "all":
            clients = list(range(cfg.num_clients))
        elif args.client.startswith("client") and args.client[6:].isdigit():
            clients = [int(args.client[6:])]
        else:
            raise ValueError(f"--client expects clientK or all, got {args.client!r}")
        for cid in clients:
            if not 0 <= cid < cfg.num_clients:
                raise ValueError(f"client {cid} out of range: the run has {cfg.num_clients} clients")
        out = Path(args.output) if args.output else cfg.out_dir / "test"
        device = pick_device(args.device)
        rows: List[Dict[str, object]] = []
        for cid in clients:
            rows += test_client(cfg, cid, args.root_path or cfg.root_path, args.checkpoint, out,
                                device, not args.no_images)
        rows = merge_results(out / "result.csv", rows, run_id(cfg), args.checkpoint)
    except (ValueError, FileNotFoundError, KeyError) as err:
        log.error("error: %s", err)
        return 2
    summary = summarise(rows)
    write_csv(out / "result.csv", rows)
    write_csv(out / "mean_std_result.csv", summary)
    log.info("%s", format_table(summary))
    log.info("results in %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
