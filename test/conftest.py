"""Shared fixtures: tiny HDF5 federations written directly with h5layout, and the real FAZ path."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from dataloaders import h5layout
from dataloaders.tasks import WEAK_FORM_KEYS, get_task

REPO = Path(__file__).resolve().parents[1]

#: The seed README's train command. Its GPU ids are refused where the machine lacks them, so
#: a run adapts them as the README says (a bare ``--gpus`` after it: the CPU).
SEED_TRAIN = ("--port 8097 --procedure flower_pCE_2D_GateCRFMsacleTreeEnergyLoss_Ours "
              "--exp faz/WeaklySeg_pCE --base_lr 0.01 --img_class faz --model unet_lc_multihead "
              "--gpus 0 1 2 3 4 5 --strategy FedICRA --alpha 1 --rep_iters 3").split()


def free_base(span: int) -> int:
    """A base port with ``span`` free ports above it (below the ephemeral range)."""
    from deployment.processes import free_port_base

    return free_port_base(span)


def real_faz_root() -> Path:
    """Real FAZ PNG release: ``$FAZ_ROOT`` or ``../shared/data/FAZ`` beside the checkout."""
    env = os.environ.get("FAZ_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "data" / "FAZ"


@pytest.fixture
def faz_png_root() -> Path:
    root = real_faz_root()
    if not (root / "Domain1").is_dir():
        pytest.skip(f"real FAZ data not found at {root} (set FAZ_ROOT)")
    return root


def write_random_case(path: Path, task_name: str, site: int, size: int,
                      rng: np.random.Generator, with_mask: bool = True) -> None:
    """One random but valid case: disk-shaped mask, weak label = mask with unlabelled holes."""
    task = get_task(task_name)
    shape = (size, size) if task.in_chns == 1 else (task.in_chns, size, size)
    image = rng.random(shape, dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    mask = np.zeros((size, size), np.uint8)
    for c in range(1, task.num_classes):  # nested disks: class c inside radius ~ size/(2+c)
        mask[r < size / (2 + c) + rng.uniform(-1, 1)] = c
    weak = np.where(rng.random((size, size)) < 0.3, mask, task.unlabelled).astype(np.uint8)
    key = WEAK_FORM_KEYS[task.site(site).weak_form]
    h5layout.write_case(path, image, mask if with_mask else None, {key: weak})


@pytest.fixture
def make_h5_site() -> Callable[..., Path]:
    """Factory ``make(root, task, site, n_train, n_test, size=32, seed=0)`` -> root."""

    def make(root: Path, task: str, site: int, n_train: int, n_test: int, size: int = 32,
             seed: int = 0, with_mask: bool = True) -> Path:
        rng = np.random.default_rng(seed)
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                path = h5layout.site_dir(root, site, split) / f"case{i:03d}.h5"
                write_random_case(path, task, site, size, rng, with_mask)
        return root

    return make


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> Path:
    """A five-site synthetic FAZ-like federation at 32 px (6 train + 2 test cases per site)."""
    from dataloaders.synthetic import generate_federation

    root = tmp_path_factory.mktemp("tiny_faz")
    generate_federation("faz", root, size=32, train_per_site=6, test_per_site=2, seed=3)
    assert sorted(p.name for p in root.glob("Domain*")) == [f"Domain{k}" for k in range(1, 6)]
    return root


def tiny_run_config(root: Path, out_root: Path, **overrides):
    """A RunConfig for a tiny federation: 3 clients, width 4, 2 rounds of 2 iterations.

    Keys of methods other than ``strategy`` are ignored (``cfg.ignored_keys``). Adaptive
    aggregation blends from round 2 (``ala_warmup_iters = 0``; FedICRA's own 50 iterations
    would outlast a tiny run)."""
    from configs import RunConfig

    values = dict(img_class="synthetic_faz", root_path=str(root), exp="tiny", out_root=str(out_root),
                  model="unet_lc_multihead", base_channels=4, aux_channels=8, procedure="pce",
                  strategy="FedICRA", num_clients=3, rounds=2, iters=2, rep_iters=1, batch_size=2,
                  ala_max_epochs=2, ala_warmup_iters=0, seed=7)
    values.update(overrides)
    return RunConfig.from_mapping(values).validate()


def score_personal_models(cfg, clients: int = 3) -> list:
    """Save the run's config snapshot (as the runner does), score every client with
    ``test_client.py`` and check that each was tested with its own ``client<k>/best.pt``;
    returns the rows of ``test/result.csv``."""
    import csv

    import test_client
    from configs import save_config

    save_config(cfg, cfg.out_dir / "config.toml")
    assert test_client.main(["--client", "all", "--exp", cfg.exp, "--out_root", cfg.out_root,
                             "--no_images"]) == 0
    with open(cfg.out_dir / "test" / "result.csv") as f:
        results = list(csv.DictReader(f))
    assert {(r["model"], r["checkpoint"]) for r in results} == \
        {("personal", f"client{k}/best.pt") for k in range(clients)}
    return results


class InProcessGrid:
    """A Grid for ``Strategy.start`` that hands every message to an in-process site worker
    (the deployment's :class:`deployment.worker.SiteWorker`) and records the traffic."""

    def __init__(self, cfg, node_ids=None):
        from deployment.worker import SiteWorker

        # node ids unrelated to client ids by default, as a SuperLink assigns them
        node_ids = node_ids or [9000 - 17 * k for k in range(cfg.num_clients)]
        self.workers = {n: SiteWorker(cfg, k) for k, n in enumerate(node_ids)}
        self.traffic = []  # (op, server round, node, arrays sent, reply)

    def get_node_ids(self):
        return list(self.workers)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Message, MessageType, MetricRecord, RecordDict

        from strategies.base import to_numpy, to_record

        replies = []
        for msg in messages:
            op = "train" if msg.metadata.message_type == MessageType.TRAIN else "evaluate"
            config = dict(msg.content["config"].items())
            arrays = to_numpy(msg.content["arrays"])
            reply = self.workers[msg.metadata.dst_node_id].handle(
                {"op": op, "config": config, "arrays": arrays})
            assert reply["ok"], reply.get("error")
            self.traffic.append((op, int(config["server-round"]), msg.metadata.dst_node_id,
                                 arrays, reply))
            content = {"metrics": MetricRecord(reply["metrics"])}
            if op == "train":
                content["arrays"] = to_record(reply["arrays"])
            replies.append(Message(RecordDict(content), reply_to=msg))
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """Flower 1.42 builds messages only inside a task: give this process one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def heavy(why: str):
    """Skip a test unless ``FEDICRA_HEAVY=1``: minutes of training that CI leaves out."""
    return pytest.mark.skipif(os.environ.get("FEDICRA_HEAVY") != "1",
                              reason=f"{why}: FEDICRA_HEAVY=1 runs it")
