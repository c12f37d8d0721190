"""A persistent site worker: one long-lived process per client that owns its SiteTrainer.

``python -m deployment.worker --cid K --config SNAPSHOT --address 127.0.0.1:PORT
--secret-file FILE`` loads the data, builds the model and optimiser once, then answers the
bridge's requests (see :mod:`deployment.channel`) one at a time until it is stopped. The
device comes from ``CUDA_VISIBLE_DEVICES`` (set by the launcher), else the CPU.

The worker serves one run at a time. A request for round 1 after other rounds starts a fresh
trainer (a new run on the same worker); a request for a round that does not follow the last
one continues from ``client{K}/latest.pt`` (the worker was restarted, or the site missed rounds
and rejoins: its personal state is that of its last round, the shared part comes with the
request), and fails when the trainer is ahead of the request.

Connections (:func:`serve`): each is served on its own thread, its handshake bounded by
:data:`~deployment.channel.HANDSHAKE_TIMEOUT`, so a peer that connects and sends nothing
delays nobody; requests that train or evaluate take turns on the one trainer (a lock), and
the worker sends keep-alives while it works on one (see :mod:`deployment.channel`).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from configs.round_keys import SERVER_ROUND
from configs import RunConfig, load_config
from configs.schema import LOCAL_ONLY_KEYS, SITE_PATH_KEYS
from strategies.errors import SITE_REFUSED

from .channel import (HANDSHAKE_TIMEOUT, KEEPALIVE_INTERVAL, SILENCE_TIMEOUT, parse_address,
                      read_secret, receive, send, set_deadline, timed_out)

log = logging.getLogger("fedicra.worker")

#: Keys that may legitimately differ between the server's run config and a site's snapshot.
SITE_LOCAL_KEYS = frozenset(LOCAL_ONLY_KEYS + SITE_PATH_KEYS)


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
        #: held while the trainer trains or evaluates (requests take turns)
        self.lock = threading.Lock()
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
            self._load(latest)
            done = self.trainer.rounds_done
            if done == server_round - 1:
                log.info("client %d: resumed from %s (round %d)", self.cid, latest, done)
                return
            if done < server_round - 1:
                log.warning("client %d: rejoining at round %d from %s (round %d): rounds %d..%d "
                            "were missed; the personal state continues from round %d, the "
                            "shared part comes from the server", self.cid, server_round, latest,
                            done, done + 1, server_round - 1, done)
                return
        elif done < server_round - 1 and done == 0:
            log.warning("client %d: joining at round %d without a checkpoint (no %s): rounds "
                        "1..%d were missed; training starts from the initial model and the "
                        "server's shared part", self.cid, server_round, latest, server_round - 1)
            return
        raise RuntimeError(f"client {self.cid}: asked for round {server_round} but the trainer "
                           f"has done {self.trainer.rounds_done} rounds and {latest} does not "
                           "continue it")

    def _load(self, latest: Path) -> None:
        """Continue from the site's own ``latest.pt``. A checkpoint that cannot be loaded (of
        another run or client, damaged, of another model) would fail every round alike: the
        error says :data:`~strategies.errors.SITE_REFUSED`, and the server stops the run."""
        try:
            self.trainer.load(latest)
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise RuntimeError(f"client {self.cid} {SITE_REFUSED}: it must continue from "
                               f"{latest}, which it cannot load: {err}") from None

    def _restore(self) -> None:
        """A restarted worker evaluates the site's model of its last round, not a fresh one."""
        latest = self.trainer.client_dir / "latest.pt"
        if self.trainer.rounds_done == 0 and latest.is_file():
            self._load(latest)
            log.info("client %d: restored round %d from %s", self.cid, self.trainer.rounds_done,
                     latest)

    def handle(self, message: Mapping[str, Any]) -> Dict[str, Any]:
        """One request -> one reply; exceptions become ``{"ok": False, "error": ...}``."""
        op = message.get("op")
        try:
            if op == "ping":
                return {"ok": True, "metrics": {"cid": float(self.cid)}}
            config = dict(message.get("config") or {})
            self.check_config(config)
            if op == "train":
                with self.lock:
                    self._align(int(config[SERVER_ROUND]))
                    arrays, metrics = self.trainer.train(message.get("arrays") or {}, config)
                return {"ok": True, "arrays": arrays, "metrics": metrics}
            if op == "evaluate" and config.get("identify"):
                # a resumed server asking which client this node serves: no work
                return {"ok": True, "metrics": {"cid": float(self.cid)}}
            if op == "evaluate":
                with self.lock:
                    self._restore()
                    metrics = self.trainer.evaluate(message.get("arrays") or {}, config)
                return {"ok": True, "metrics": metrics}
            raise ValueError(f"unknown operation {op!r}")
        except Exception as err:  # the bridge turns this into a Flower error reply
            log.error("client %d: %s failed:\n%s", self.cid, op, traceback.format_exc())
            return {"ok": False, "error": f"client {self.cid}: {err.__class__.__name__}: {err}"}

    def close(self) -> None:
        """Flush the trainer's logs (after the request in progress, if it ends within 10 s)."""
        acquired = self.lock.acquire(timeout=10.0)
        try:
            self.trainer.close()
        finally:
            if acquired:
                self.lock.release()


def _differs(a: Any, b: Any) -> bool:
    if isinstance(b, float) and isinstance(a, (int, float)):
        return abs(float(a) - b) > 1e-12 * max(1.0, abs(b))
    if isinstance(b, list):
        return list(a) != b if isinstance(a, (list, tuple)) else True
    return a != b


def serve(worker: SiteWorker, address: str, secret: bytes,
          handshake_timeout: float = HANDSHAKE_TIMEOUT, idle_timeout: float = SILENCE_TIMEOUT,
          keepalive: float = KEEPALIVE_INTERVAL, stop: Optional[threading.Event] = None,
          ready: Optional[threading.Event] = None) -> None:
    """Accept authenticated connections on ``address`` and answer their requests, until
    ``stop`` is set (forever without one).

    Every connection is served on its own thread: the handshake must finish within
    ``handshake_timeout`` seconds and a request must arrive within ``idle_timeout`` seconds,
    else the connection is closed; a silent or slow peer therefore holds up only its own
    thread. While a request trains or evaluates, a keep-alive goes out every ``keepalive``
    seconds. ``ready`` is set once the port is bound.
    """
    with socket.create_server(parse_address(address), backlog=64) as server:
        server.settimeout(0.5)  # wake up to look at ``stop``
        log.info("client %d: worker listening on %s", worker.cid, address)
        if ready is not None:
            ready.set()
        while stop is None or not stop.is_set():
            try:
                sock, peer = server.accept()
            except socket.timeout:
                continue
            threading.Thread(target=_serve_connection, name=f"conn-{peer[0]}:{peer[1]}",
                             args=(worker, sock, secret, handshake_timeout, idle_timeout,
                                   keepalive), daemon=True).start()


def _serve_connection(worker: SiteWorker, sock: socket.socket, secret: bytes,
                      handshake_timeout: float, idle_timeout: float, keepalive: float) -> None:
    try:
        sock.settimeout(None)
        set_deadline(sock, handshake_timeout)
        conn = Connection(sock.detach())
    except OSError:
        sock.close()
        return
    with conn:
        try:
            deliver_challenge(conn, secret)
            answer_challenge(conn, secret)
        except (AuthenticationError, EOFError, OSError) as err:
            reason = (f"no handshake within {handshake_timeout:.0f} s" if timed_out(err)
                      else f"{err.__class__.__name__}: {err}")
            log.warning("client %d: rejected a connection (%s)", worker.cid, reason)
            return
        try:
            set_deadline(conn, idle_timeout)
            while True:
                message = receive(conn)
                start = time.perf_counter()
                if message.get("op") == "ping":
                    reply = worker.handle(message)
                else:
                    with KeepAlive(conn, keepalive):
                        reply = worker.handle(message)
                send(conn, reply)
                if message.get("op") != "ping":
                    log.info("client %d: %s, round %s, answered in %.2f s", worker.cid,
                             message.get("op"), (message.get("config") or {}).get(SERVER_ROUND),
                             time.perf_counter() - start)
        except EOFError:
            pass
        except (ConnectionError, OSError, ValueError, TypeError, KeyError) as err:
            if timed_out(err):
                log.warning("client %d: closed a connection silent for %.0f s", worker.cid,
                            idle_timeout)
            else:
                log.warning("client %d: connection dropped (%s)", worker.cid, err)


class KeepAlive:
    """Sends an empty frame on ``conn`` every ``interval`` seconds while the block runs (the
    requester's sign that the worker is alive); stopped, and joined, before the block ends so
    the reply follows the last keep-alive."""

    def __init__(self, conn: Connection, interval: float) -> None:
        self.conn = conn
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keepalive", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.conn.send_bytes(b"")
            except OSError:  # the requester is gone: the reply will fail too
                return

    def __enter__(self) -> "KeepAlive":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


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
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (the handler above)
        pass
    finally:
        worker.close()
    return 0


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: once :meth:`SiteWorker.close` has flushed
    what the trainer writes, collecting torch's objects at exit only delays the end (seconds
    on a loaded machine, longer than the launcher's SIGKILL grace)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
