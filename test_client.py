"""Test personalised models: ``python test_client.py --client all --exp faz/FedICRA``.

Each client's *personalised* best checkpoint (selected on its own validation split) predicts
every case of its site's test folder. Per-case metrics go to ``result.csv``, per-client and
overall mean/std to ``mean_std_result.csv``; predictions are written as NIfTI files and
overlay PNGs. See ``clients/metrics.py`` for the empty-prediction policy.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from configs import load_config
from dataloaders.dataset import SiteDataset
from dataloaders.tasks import get_task
from clients.evaluation import predict
from clients.metrics import METRIC_NAMES, binary_metrics
from networks.checkpoint import load_checkpoint
from networks.factory import build_for_run

log = logging.getLogger("fedicra.test")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--client", default="all", help="clientK or all")
    p.add_argument("--cid", type=int, default=None, help="client id (same as --client clientK)")
    p.add_argument("--exp", required=True, help="experiment name used for training")
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
                 num_classes: int) -> None:
    import SimpleITK as sitk
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(pred.astype(np.uint8)), str(folder / f"{case}_pred.nii.gz"))
    grey = image.mean(axis=0) if image.ndim == 3 else image
    rgb = np.repeat((np.clip(grey, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    colours = np.array([[0, 0, 0], [255, 64, 64], [64, 255, 64], [64, 64, 255]], dtype=np.float32)
    for c in range(1, num_classes):
        m = pred == c
        rgb[m] = (0.5 * rgb[m] + 0.5 * colours[c % len(colours)]).astype(np.uint8)
    Image.fromarray(rgb).save(folder / f"{case}_overlay.png")


def test_client(cfg, cid: int, root: str, checkpoint: str, out: Path, device: torch.device,
                images: bool) -> List[Dict[str, object]]:
    task = get_task(cfg.img_class)
    path = cfg.out_dir / f"client{cid}" / f"{checkpoint}.pt"
    state = load_checkpoint(path, map_location=device)
    model = build_for_run(cfg, site=cid).to(device)
    model.load_state_dict(state["model"])
    data = SiteDataset(root, task, cid, "test", val_fraction=cfg.val_fraction, seed=cfg.seed)
    rows: List[Dict[str, object]] = []
    for i in range(len(data)):
        sample = data.sample(i)
        image = sample["image"][None].to(device)
        pred = predict(model, image, cid, cfg.img_size)[0].cpu().numpy()
        truth = sample["label"].numpy()
        for target in task.eval_targets:
            row: Dict[str, object] = {"client": cid, "case": sample["case"], "target": target.name}
            row.update(binary_metrics(np.isin(pred, target.labels), np.isin(truth, target.labels)))
            rows.append(row)
        if images:
            save_outputs(out / f"client{cid}", sample["case"], sample["image"].numpy(), pred,
                         task.num_classes)
    return rows


def summarise(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Mean and std per (client, target) and over all clients ('all')."""
    out = []
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["client"], r["target"]), []).append(r)
        groups.setdefault(("all", r["target"]), []).append(r)
    order = sorted(groups, key=lambda k: (k[0] == "all", str(k[0]).zfill(4), k[1]))
    for client, target in order:
        members = groups[(client, target)]
        s: Dict[str, object] = {"client": client, "target": target, "cases": len(members)}
        for m in METRIC_NAMES:
            values = np.array([float(x[m]) for x in members], dtype=np.float64)
            defined = values[~np.isnan(values)]
            s[f"{m}_mean"] = float(defined.mean()) if defined.size else math.nan
            s[f"{m}_std"] = float(defined.std()) if defined.size else math.nan
        s["hd95_undefined"] = int(sum(math.isnan(float(x["hd95"])) for x in members))
        out.append(s)
    return out


def write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(summary: List[Dict[str, object]]) -> str:
    head = f"{'client':>7} {'target':>7} {'cases':>5} " + " ".join(f"{m:>17}" for m in METRIC_NAMES)
    lines = [head]
    for s in summary:
        cells = " ".join(f"{s[m + '_mean']:8.4f}±{s[m + '_std']:<8.4f}" for m in METRIC_NAMES)
        lines.append(f"{str(s['client']):>7} {s['target']:>7} {s['cases']:>5} {cells}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        cfg = load_config(Path(args.out_root) / args.exp / "config.toml")
        cfg.out_root = args.out_root
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
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        rows: List[Dict[str, object]] = []
        for cid in clients:
            rows += test_client(cfg, cid, args.root_path or cfg.root_path, args.checkpoint, out,
                                device, not args.no_images)
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
