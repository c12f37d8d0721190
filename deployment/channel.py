"""The authenticated request/reply channel between a ClientApp bridge and its site worker.

Transport: :mod:`multiprocessing.connection` over TCP on a local address; both ends prove
knowledge of a shared secret (HMAC challenge, ``authkey``) before anything else is read.
Payloads are never pickled: a message is a JSON header (plain config values and metrics,
plus the name, dtype, shape and byte range of every array) followed by one raw buffer holding
the arrays, so a peer can send data but never code.

A request is ``{"op": "train" | "evaluate" | "ping", "config": {...}, "arrays": {...}}``; a
reply is ``{"ok": bool, "error": str, "metrics": {...}, "arrays": {...}}``.

Deadlines: connecting and the handshake must finish within :data:`HANDSHAKE_TIMEOUT` seconds;
while a worker handles a request it sends an empty keep-alive frame every
:data:`KEEPALIVE_INTERVAL` seconds before its reply, and the requester gives up after
:data:`SILENCE_TIMEOUT` seconds without a byte (a stopped or hung worker), however long a
healthy round takes. The deadlines are socket timeouts (``SO_RCVTIMEO``/``SO_SNDTIMEO``), so
they also bound a peer that stops in the middle of a message.

Only numpy and the standard library are imported here: the bridge must stay light, since with
Flower's default isolation it starts in a fresh process for every message.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import struct
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from .packing import join_arrays, split_arrays

#: Bytes of a freshly generated secret.
SECRET_BYTES = 32
#: 2: keep-alive frames (empty) may precede a reply
PROTOCOL = 2
#: Seconds to connect and to complete the authentication handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds between two keep-alive frames of a worker busy with a request.
KEEPALIVE_INTERVAL = 2.0
#: Seconds without a byte from the peer (reply or keep-alive) after which a read gives up.
SILENCE_TIMEOUT = 60.0


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


def receive(conn: Connection, keepalive: bool = False) -> Dict[str, Any]:
    """The next message on ``conn``; with ``keepalive`` empty frames before it are skipped."""
    header = conn.recv_bytes()
    while keepalive and not header:
        header = conn.recv_bytes()
    return decode(header, conn.recv_bytes())


def set_deadline(sock: Any, seconds: float) -> None:
    """Bound every later read and write of ``sock`` (a socket or a Connection over one) to
    ``seconds`` (0: no bound); one that waits longer fails with :class:`BlockingIOError`."""
    fd = sock.fileno()
    whole = int(seconds)
    value = struct.pack("ll", whole, int(round((seconds - whole) * 1e6)))
    with socket.socket(fileno=os.dup(fd)) as view:  # the same socket, options are shared
        view.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        view.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def timed_out(err: BaseException) -> bool:
    """Whether ``err`` is a read or write that outlived :func:`set_deadline`."""
    return isinstance(err, (BlockingIOError, socket.timeout))


def connect(address: str, secret: bytes, who: str = "worker",
            timeout: float = HANDSHAKE_TIMEOUT) -> Connection:
    """An authenticated connection to ``address`` within ``timeout`` seconds.

    Raises
    ------
    WorkerUnavailable
        Nobody listens, the secret does not match, or the handshake did not finish in time.
    """
    try:
        sock = socket.create_connection(parse_address(address), timeout=timeout)
    except OSError as err:
        raise WorkerUnavailable(f"{who} is not running: nothing accepts connections at "
                                f"{address} ({err.__class__.__name__}: {err})") from None
    sock.settimeout(None)  # a blocking descriptor for Connection; set_deadline bounds it
    set_deadline(sock, timeout)
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, secret)
        deliver_challenge(conn, secret)
    except AuthenticationError as err:
        conn.close()
        raise WorkerUnavailable(f"{who} at {address} refused the handshake "
                                f"({err.__class__.__name__}: {err}); do both sides read the "
                                "same secret file?") from None
    except (EOFError, OSError) as err:
        conn.close()
        if timed_out(err):
            raise WorkerUnavailable(f"{who} at {address} accepted the connection but did not "
                                    f"complete the handshake within {timeout:.0f} s; it is "
                                    "stopped or hung (see its log)") from None
        raise WorkerUnavailable(f"{who} at {address} refused the handshake "
                                f"({err.__class__.__name__}: {err}); do both sides read the "
                                "same secret file?") from None
    return conn


# ---------------------------------------------------------------------- client side
def request(address: str, secret: bytes, message: Mapping[str, Any], who: str = "worker",
            handshake_timeout: float = HANDSHAKE_TIMEOUT,
            silence_timeout: float = SILENCE_TIMEOUT) -> Dict[str, Any]:
    """Send one request to the worker at ``address`` and return its (successful) reply.

    The worker may take as long as it needs while it sends keep-alives; ``silence_timeout``
    seconds without any byte from it end the wait.

    Raises
    ------
    WorkerUnavailable
        Nobody listens at ``address``, the secret does not match, the handshake or the reply
        did not come in time (a stopped or hung worker), or the connection broke before a
        reply came (the worker died).
    RuntimeError
        The worker answered with an error (its message is kept).
    """
    conn = connect(address, secret, who, handshake_timeout)
    try:
        with conn:
            set_deadline(conn, silence_timeout)
            send(conn, message)
            reply = receive(conn, keepalive=True)
    except (EOFError, ConnectionError, OSError) as err:
        if timed_out(err):
            raise WorkerUnavailable(f"{who} at {address} sent nothing for {silence_timeout:.0f} "
                                    f"s while handling {message.get('op')!r} (no reply, no "
                                    "keep-alive); it is stopped or hung, see its log") from None
        raise WorkerUnavailable(f"{who} at {address} closed the connection before replying "
                                f"to {message.get('op')!r} ({err.__class__.__name__}); it has "
                                "probably died, see its log") from None
    if not reply.get("ok"):
        raise RuntimeError(f"{who} failed on {message.get('op')!r}: {reply.get('error')}")
    return reply
