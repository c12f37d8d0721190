"""A persistent site worker: one long-lived process per client that owns its SiteTrainer.

``python -m deployment.worker --cid K --config SNAPSHOT --address 127.0.0.1:PORT
--secret-file FILE`` loads the data, builds the model and optimiser once, then answers the
bridge's requests (see :mod:`deployment.channel`) one at a time until it is stopped. The
device comes from ``CUDA_VISIBLE_DEVICES`` (set by the launcher), else the CPU.

The worker serves one run at a time. A request for round 1 after other rounds starts a fresh
trainer (a new run on the same worker); a request for a round that does not follow the last
one resumes from ``client{K}/latest.pt`` when that checkpoint is at the right round (the worker
was restarted), and fails otherwise.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import traceback
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from configs import RunConfig, load_config

from .channel import parse_address, read_secret, receive, send

log = logging.getLogger("fedicra.worker")

#: Keys that may legitimately differ between the server's run config and a site's snapshot.
SITE_LOCAL_KEYS = frozenset({"root_path", "out_root", "gpus", "mode", "port", "cpus_per_client"})


class SiteWorker:
    """Holds client ``cid``'s trainer between rounds and turns requests into replies.

    Parameters
    ----------
    cfg : RunConfig
        The run configuration as this site sees it (its own data and output paths).
    cid : int
        Client id.
    device : str
        Passed to :class:`clients.trainer.SiteTrainer` (``''``: CUDA when visible, else CPU).
    """

    def __init__(self, cfg: RunConfig, cid: int, device: str = "") -> None:
        self.cfg = cfg
        self.cid = cid
        self.device = device
        self.trainer = self._new_trainer()

    def _new_trainer(self):
        from clients.trainer import SiteTrainer  # torch: only in the worker

        trainer = SiteTrainer(self.cfg, self.cid, device=self.device)
        log.info("client %d: trainer ready on %s (%d training cases)", self.cid, trainer.device,
                 len(trainer.train_set))
        return trainer

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Fail when the server runs a different experiment than this worker was given."""
        mine = self.cfg.to_dict()
        diff = [f"{k}: server {config[k]!r}, worker {mine[k]!r}" for k in sorted(mine)
                if k in config and k not in SITE_LOCAL_KEYS and _differs(config[k], mine[k])]
        if diff:
            raise ValueError(f"client {self.cid}: the server's run config differs from the "
                             f"worker's snapshot ({'; '.join(diff)}); restart the worker with "
                             "the run's config.toml")

    def _align(self, server_round: int) -> None:
        done = self.trainer.rounds_done
        if server_round == done + 1:
            return
        if server_round == 1:
            log.info("client %d: round 1 requested after %d rounds: starting a fresh trainer",
                     self.cid, done)
            self.trainer.close()
            self.trainer = self._new_trainer()
            return
        latest = self.trainer.client_dir / "latest.pt"
        if latest.is_file():
            self.trainer.load(latest)
            if self.trainer.rounds_done == server_round - 1:
                log.info("client %d: resumed from %s (round %d)", self.cid, latest,
                         self.trainer.rounds_done)
                return
        raise RuntimeError(f"client {self.cid}: asked for round {server_round} but the trainer "
                           f"has done {self.trainer.rounds_done} rounds and {latest} does not "
                           "continue it")

    def handle(self, message: Mapping[str, Any]) -> Dict[str, Any]:
        """One request -> one reply; exceptions become ``{"ok": False, "error": ...}``."""
        op = message.get("op")
        try:
            if op == "ping":
                return {"ok": True, "metrics": {"cid": float(self.cid)}}
            config = dict(message.get("config") or {})
            self.check_config(config)
            if op == "train":
                self._align(int(config["server-round"]))
                arrays, metrics = self.trainer.train(message.get("arrays") or {}, config)
                return {"ok": True, "arrays": arrays, "metrics": metrics}
            if op == "evaluate":
                return {"ok": True,
                        "metrics": self.trainer.evaluate(message.get("arrays") or {}, config)}
            raise ValueError(f"unknown operation {op!r}")
        except Exception as err:  # the bridge turns this into a Flower error reply
            log.error("client %d: %s failed:\n%s", self.cid, op, traceback.format_exc())
            return {"ok": False, "error": f"client {self.cid}: {err.__class__.__name__}: {err}"}

    def close(self) -> None:
        self.trainer.close()


def _differs(a: Any, b: Any) -> bool:
    if isinstance(b, float) and isinstance(a, (int, float)):
        return abs(float(a) - b) > 1e-12 * max(1.0, abs(b))
    if isinstance(b, list):
        return list(a) != b if isinstance(a, (list, tuple)) else True
    return a != b


def serve(worker: SiteWorker, address: str, secret: bytes) -> None:
    """Accept authenticated connections on ``address`` and answer their requests, forever."""
    with Listener(parse_address(address), family="AF_INET", authkey=secret) as listener:
        log.info("client %d: worker listening on %s", worker.cid, address)
        while True:
            try:
                conn = listener.accept()
            except Exception as err:  # failed handshake: log, keep serving
                log.warning("client %d: rejected a connection (%s: %s)", worker.cid,
                            err.__class__.__name__, err)
                continue
            with conn:
                try:
                    while True:
                        message = receive(conn)
                        start = time.perf_counter()
                        send(conn, worker.handle(message))
                        if message.get("op") != "ping":
                            log.info("client %d: %s, round %s, answered in %.2f s", worker.cid,
                                     message.get("op"),
                                     (message.get("config") or {}).get("server-round"),
                                     time.perf_counter() - start)
                except EOFError:
                    pass
                except (ConnectionError, OSError, ValueError, TypeError, KeyError) as err:
                    log.warning("client %d: connection dropped (%s)", worker.cid, err)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Persistent site worker of a deployment run")
    p.add_argument("--cid", type=int, required=True, help="client id (site index)")
    p.add_argument("--config", type=Path, required=True, help="the run's config.toml snapshot")
    p.add_argument("--address", required=True, help="HOST:PORT to listen on (keep it local)")
    p.add_argument("--secret-file", type=Path, required=True,
                   help="file holding the secret shared with the bridge")
    p.add_argument("--root_path", help="this site's data root (default: the snapshot's)")
    p.add_argument("--out_root", help="this site's output root (default: the snapshot's)")
    p.add_argument("--device", default="", help="torch device (default: cuda if visible, else cpu)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s worker{args.cid} %(levelname)s %(message)s")
    # Ctrl-C / SIGTERM: leave through the normal exit path so TensorBoard files are flushed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cfg = load_config(args.config)
    overrides = {k: getattr(args, k) for k in ("root_path", "out_root") if getattr(args, k)}
    cfg = cfg.override(overrides, "worker flags") if overrides else cfg
    secret = read_secret(args.secret_file)
    worker = SiteWorker(cfg, args.cid, device=args.device)
    try:
        serve(worker, args.address, secret)
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
