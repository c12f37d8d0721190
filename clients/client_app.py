"""Flower ClientApp: a thin adapter between Flower messages and a :class:`SiteTrainer`.

The run configuration travels in every message (``config`` record), so the same ClientApp
serves every run; node-local settings (``cid``/``partition-id``, ``root-path``, ``device``)
come from the node config. Trainers stay alive in the process between rounds; when a message
lands in a process that does not hold the site's current trainer (another simulation actor,
a restarted process) the trainer is rebuilt from its latest checkpoint.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Dict, Tuple

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from configs import RunConfig

from .trainer import SiteTrainer

app = ClientApp()

_TRAINERS: Dict[Tuple[str, int], SiteTrainer] = {}
_STATE_KEY = "fedicra"
_RUN_KEYS = {f.name for f in fields(RunConfig)}


def node_cid(context: Context) -> int:
    """Client id of this node: ``cid`` in the node config, else Flower's ``partition-id``."""
    node = context.node_config
    for key in ("cid", "partition-id"):
        if key in node:
            return int(node[key])
    raise ValueError("node config lacks 'cid' (or 'partition-id'): start the SuperNode with "
                     "--node-config \"cid=K\"")


def run_config(message_config: ConfigRecord, context: Context) -> RunConfig:
    values = {k: v for k, v in message_config.items() if k in _RUN_KEYS}
    cfg = RunConfig.from_mapping(values, "message config")
    if "root-path" in context.node_config:
        cfg.root_path = str(context.node_config["root-path"])
    return cfg


def get_trainer(message_config: ConfigRecord, context: Context) -> SiteTrainer:
    cfg = run_config(message_config, context)
    cid = node_cid(context)
    if _STATE_KEY not in context.state.config_records:
        context.state.config_records[_STATE_KEY] = ConfigRecord({"rounds-done": 0})
    rounds_done = int(context.state.config_records[_STATE_KEY]["rounds-done"])
    key = (str(cfg.out_dir.resolve()), cid)
    trainer = _TRAINERS.get(key)
    if trainer is None or (rounds_done == 0 and trainer.rounds_done > 0):
        trainer = SiteTrainer(cfg, cid, device=str(context.node_config.get("device", "")))
        _TRAINERS[key] = trainer
    if trainer.rounds_done != rounds_done:
        # Another process trained this site since: keep the loaded data, restore the state.
        trainer.load(trainer.client_dir / "latest.pt")
    return trainer


def to_arrays(record: ArrayRecord) -> Dict[str, object]:
    return {k: v.numpy() for k, v in record.items()}


def from_arrays(arrays: Dict[str, object]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    trainer = get_trainer(config, context)
    arrays, metrics = trainer.train(to_arrays(msg.content["arrays"]), config)
    context.state.config_records[_STATE_KEY] = ConfigRecord({"rounds-done": trainer.rounds_done})
    content = RecordDict({"arrays": from_arrays(arrays), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation Dice of the personalised model, and of the received global arrays when the
    strategy deploys a global model (``validate-global`` in the config)."""
    config = msg.content["config"]
    trainer = get_trainer(config, context)
    metrics = trainer.evaluate(to_arrays(msg.content["arrays"]), config)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
