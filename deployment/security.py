"""TLS and SuperNode authentication checks of a deployment (no Flower imports).

- :func:`tls_problem`: connect to the SuperLink the way a SuperNode will (TLS verified
  against the given CA, or plain HTTP) and say in one sentence why that cannot work, before a
  SuperNode retries silently or exits with Flower's exit code 305;
- :func:`register_supernodes`: ``flwr supernode register`` each public key on a SuperLink
  started with ``--enable-supernode-auth`` (Flower 1.42 accepts authenticated SuperNodes
  only once their public key is registered through the Control API).
"""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

#: What :func:`tls_problem` returns while nothing accepts connections yet.
UNREACHABLE = "unreachable"


def split_address(address: str) -> tuple:
    """``"HOST:PORT"`` or ``"[V6]:PORT"`` -> ``(host, port)``."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"SuperLink address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def tls_problem(superlink: str, root_certificates: str = "", timeout: float = 3.0
                ) -> Optional[str]:
    """Why a SuperNode configured with ``root_certificates`` (none: plain HTTP) cannot talk to
    the SuperLink at ``superlink``; None when it can, :data:`UNREACHABLE` when nothing accepts
    TCP connections there (yet)."""
    host, port = split_address(superlink)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return UNREACHABLE
    with sock:
        if root_certificates:
            try:
                context = ssl.create_default_context(cafile=str(root_certificates))
            except (OSError, ssl.SSLError) as err:
                return (f"--root-certificates {root_certificates} cannot be read as a PEM CA "
                        f"certificate ({err})")
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as err:
            return (f"the SuperLink at {superlink} presented a TLS certificate that does not "
                    f"verify against --root-certificates {root_certificates}: "
                    f"{err.verify_message or err}; give the CA certificate that signed the "
                    "SuperLink's certificate (ca.crt of `flower_runner.py certs`), and a "
                    "SuperLink address named in that certificate")
        except (ssl.SSLError, OSError) as err:
            if root_certificates:
                return (f"the SuperLink at {superlink} does not complete a TLS handshake "
                        f"({err.__class__.__name__}: {err}); is it running without TLS "
                        "(--insecure)? Then start this site without --root-certificates, "
                        "or restart the SuperLink with its certificate")
            return None  # plain HTTP on both sides
        if not root_certificates:
            return (f"the SuperLink at {superlink} speaks TLS but this site has no CA "
                    "certificate; pass --root-certificates CA (ca.crt of `flower_runner.py "
                    "certs`), otherwise its SuperNode retries forever without joining")
    return None


def register_supernodes(public_keys: Sequence[Path], flwr_home: Path, env: Mapping[str, str],
                        flwr: str, connection: str, cwd: Optional[Path] = None,
                        timeout: float = 120.0) -> Dict[Path, int]:
    """``flwr supernode register KEY CONNECTION`` for every key (in parallel); returns
    ``{key: node id}``. Raises :class:`RuntimeError` naming the key and Flower's message if
    one fails (a key registered twice is refused by Flower too)."""
    procs = []
    for key in public_keys:
        key = Path(key)
        if not key.is_file():
            raise FileNotFoundError(f"SuperNode public key {key} not found; write the keys with "
                                    "python flower_runner.py certs --out DIR --clients N")
        procs.append((key, subprocess.Popen(
            [flwr, "supernode", "register", str(key), connection, "--format", "json"],
            env={**env, "FLWR_HOME": str(flwr_home)}, cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
    nodes: Dict[Path, int] = {}
    errors: List[str] = []
    for key, proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            errors.append(f"{key}: flwr supernode register did not answer within {timeout:.0f} s")
            continue
        try:
            reply = json.loads(out[out.index("{"):])
        except ValueError:
            reply = {}
        if reply.get("success"):
            nodes[key] = int(reply["node-id"])
        else:
            text = str(reply.get("error-message") or err.strip() or out.strip())
            errors.append(f"{key}: {' '.join(text.split())}")
    if errors:
        raise RuntimeError("SuperNode registration failed: " + "; ".join(errors))
    return nodes
