"""The deployment ClientApp: a thin, authenticated bridge to the node's persistent site worker.

The SuperNode runs this app for every message it receives; the app forwards the round's
arrays and config to the worker named by the node config and turns the worker's reply into a
Flower :class:`~flwr.app.Message`. Node config keys (set by ``flower_runner.py``):

- ``cid``: the client id (used in error messages and checked against the worker);
- ``worker-address``: ``HOST:PORT`` of the worker (local to the node);
- ``worker-secret-file``: path of the file holding the secret shared with the worker.

Arrays arrive packed into one array when the server runs :mod:`deployment.server_app`; the
reply is packed the same way then (see :mod:`deployment.packing`).

This module imports numpy and flwr only (no torch, no medpy), so starting it is cheap.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .channel import read_secret, request
from .packing import is_packed, pack_record, record_arrays

app = ClientApp()

ADDRESS_KEY = "worker-address"
SECRET_KEY = "worker-secret-file"


def _node(context: Context) -> Dict[str, Any]:
    node = dict(context.node_config)
    cid = node.get("cid", node.get("partition-id", "?"))
    missing = [k for k in (ADDRESS_KEY, SECRET_KEY) if k not in node]
    if missing:
        raise ValueError(f"client {cid}: node config lacks {', '.join(missing)}; start the "
                         "SuperNode with flower_runner.py (site or --mode deployment), which "
                         "sets them")
    node["cid"] = cid
    return node


def ask_worker(context: Context, op: str, config: Mapping[str, Any],
               arrays: Mapping[str, Any]) -> Dict[str, Any]:
    """Send one request to this node's worker; errors name the client."""
    node = _node(context)
    who = f"site worker of client {node['cid']}"
    try:
        secret = read_secret(node[SECRET_KEY])
    except OSError as err:
        raise RuntimeError(f"{who}: cannot read the secret file {node[SECRET_KEY]} ({err})") from None
    reply = request(str(node[ADDRESS_KEY]), secret,
                    {"op": op, "config": dict(config), "arrays": dict(arrays)}, who=who)
    got = reply.get("metrics", {}).get("cid")
    if got is not None and str(node["cid"]) != "?" and int(got) != int(node["cid"]):
        raise RuntimeError(f"{who}: the worker at {node[ADDRESS_KEY]} serves client {int(got)}")
    return reply


def _arrays(msg: Message) -> Dict[str, Any]:
    return record_arrays(msg.content.array_records.get("arrays"))


def _config(msg: Message) -> Dict[str, Any]:
    record = msg.content.config_records.get("config")
    return {} if record is None else dict(record.items())


#: In-process sites of the simulation mode, by (config file, client id).
_LOCAL_SITES: Dict[tuple, Any] = {}


def local_site(context: Context):
    """The site of this node trained in this process (simulation mode: the node config has no
    worker, Flower's ``partition-id`` is the client id), built from the run's snapshot once
    and kept for the next rounds. Imports torch only here."""
    from configs import load_config

    from .worker import SiteWorker

    path = str(context.run_config.get("config-file", ""))
    if not path:
        raise ValueError("run config key 'config-file' is empty: submit with flower_runner.py")
    cid = int(context.node_config["partition-id"])
    key = (path, cid)
    if key not in _LOCAL_SITES:
        _LOCAL_SITES[key] = SiteWorker(load_config(path), cid)
    return _LOCAL_SITES[key]


def ask_site(context: Context, op: str, config: Mapping[str, Any],
             arrays: Mapping[str, Any]) -> Dict[str, Any]:
    """The node's persistent worker in deployment; the in-process site in simulation."""
    if ADDRESS_KEY in context.node_config or "partition-id" not in context.node_config:
        return ask_worker(context, op, config, arrays)
    reply = local_site(context).handle({"op": op, "config": dict(config), "arrays": dict(arrays)})
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", f"{op} failed"))
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = ask_site(context, "train", _config(msg), _arrays(msg))
    if is_packed(msg.content.array_records.get("arrays")):
        arrays = pack_record(reply["arrays"])
    else:
        arrays = ArrayRecord({k: Array(v) for k, v in reply["arrays"].items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(reply["metrics"])})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = ask_site(context, "evaluate", _config(msg), _arrays(msg))
    return Message(content=RecordDict({"metrics": MetricRecord(reply["metrics"])}), reply_to=msg)

