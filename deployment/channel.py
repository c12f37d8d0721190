"""The authenticated request/reply channel between a ClientApp bridge and its site worker.

Transport: :mod:`multiprocessing.connection` over TCP on a local address; both ends prove
knowledge of a shared secret (HMAC challenge, ``authkey``) before anything else is read.
Payloads are never pickled: a message is a JSON header (plain config values and metrics,
plus the name, dtype, shape and byte range of every array) followed by one raw buffer holding
the arrays, so a peer can send data but never code.

A request is ``{"op": "train" | "evaluate" | "ping", "config": {...}, "arrays": {...}}``; a
reply is ``{"ok": bool, "error": str, "metrics": {...}, "arrays": {...}}``.

Only numpy and the standard library are imported here: the bridge must stay light, since with
Flower's default isolation it starts in a fresh process for every message.
"""
from __future__ import annotations

import json
import os
import secrets
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from .packing import join_arrays, split_arrays

#: Bytes of a freshly generated secret.
SECRET_BYTES = 32
PROTOCOL = 1


class WorkerUnavailable(RuntimeError):
    """The site worker could not be reached, failed authentication or died mid-request."""


def parse_address(text: str) -> Tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"worker address must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def write_secret(path: os.PathLike) -> Path:
    """Create ``path`` (mode 0600) with a new random secret unless it exists; return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(SECRET_BYTES).encode())
    return path


def read_secret(path: os.PathLike) -> bytes:
    """The shared secret stored in ``path`` (surrounding whitespace ignored)."""
    secret = Path(path).read_bytes().strip()
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


# ---------------------------------------------------------------------- encoding
def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TypeError(f"cannot send a value of type {type(value).__name__} over the channel")


def encode(message: Mapping[str, Any]) -> Tuple[bytes, bytes]:
    """``message`` -> (JSON header, array buffer); ``message['arrays']`` maps names to arrays."""
    index, buffer = split_arrays(message.get("arrays") or {})
    header = {k: ({str(a): _plain(b) for a, b in v.items()} if isinstance(v, Mapping) else _plain(v))
              for k, v in message.items() if k != "arrays"}
    header["arrays"] = index
    header["protocol"] = PROTOCOL
    return json.dumps(header).encode(), buffer


def decode(header: bytes, buffer: bytes) -> Dict[str, Any]:
    """Inverse of :func:`encode` (arrays are writable copies)."""
    message = json.loads(header.decode())
    if message.pop("protocol", None) != PROTOCOL:
        raise ValueError("channel protocol mismatch between bridge and worker")
    message["arrays"] = join_arrays(message.get("arrays", []), buffer)
    return message


def send(conn: Connection, message: Mapping[str, Any]) -> None:
    header, buffer = encode(message)
    conn.send_bytes(header)
    conn.send_bytes(buffer)


def receive(conn: Connection) -> Dict[str, Any]:
    header = conn.recv_bytes()
    return decode(header, conn.recv_bytes())


# ---------------------------------------------------------------------- client side
def request(address: str, secret: bytes, message: Mapping[str, Any], who: str = "worker"
            ) -> Dict[str, Any]:
    """Send one request to the worker at ``address`` and return its (successful) reply.

    Raises
    ------
    WorkerUnavailable
        Nobody listens at ``address``, the secret does not match, or the connection broke
        before a reply came (the worker died).
    RuntimeError
        The worker answered with an error (its message is kept).
    """
    try:
        conn = Client(parse_address(address), family="AF_INET", authkey=secret)
    except (ConnectionRefusedError, OSError) as err:
        raise WorkerUnavailable(f"{who} is not running: nothing accepts connections at "
                                f"{address} ({err.__class__.__name__}: {err})") from None
    except Exception as err:  # multiprocessing.AuthenticationError and friends
        raise WorkerUnavailable(f"{who} at {address} refused the handshake "
                                f"({err.__class__.__name__}: {err}); do both sides read the "
                                "same secret file?") from None
    try:
        with conn:
            send(conn, message)
            reply = receive(conn)
    except (EOFError, ConnectionError, OSError) as err:
        raise WorkerUnavailable(f"{who} at {address} closed the connection before replying "
                                f"to {message.get('op')!r} ({err.__class__.__name__}); it has "
                                "probably died, see its log") from None
    if not reply.get("ok"):
        raise RuntimeError(f"{who} failed on {message.get('op')!r}: {reply.get('error')}")
    return reply
