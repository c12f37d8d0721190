"""Development TLS certificates and SuperNode authentication keys for a deployment.

``python flower_runner.py certs --out DIR [--clients N] [--host NAME ...]`` writes, with the
``cryptography`` package (no ``openssl`` needed):

==========================  ===========================================================
``ca.crt``, ``ca.key``      a self-signed development CA (ECDSA P-384)
``server.pem``,             the SuperLink's certificate, signed by the CA; subject
``server.key``              alternative names ``localhost``, ``127.0.0.1``, ``::1`` and
                            every ``--host``
``client<k>.key``,          SuperNode authentication key pair of client ``k``: ECDSA
``client<k>.pub``           P-384 in OpenSSH format, as Flower 1.42 loads them
                            (``flower-supernode --auth-supernode-private-key`` reads the
                            private key with ``load_ssh_private_key``; ``flwr supernode
                            register`` reads the public key with ``load_ssh_public_key``
                            and accepts NIST curves only)
==========================  ===========================================================

Private keys are written with mode 0600 and the folder is set to 0700. Existing files are
never replaced unless ``overwrite`` is given. The CA is for development and closed networks;
a production federation uses certificates of its own PKI (same file roles).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Dict, List, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Always in the server certificate, so loopback deployments verify.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1


def ca_file(folder: os.PathLike) -> Path:
    return Path(folder) / "ca.crt"


def server_files(folder: os.PathLike) -> Dict[str, Path]:
    """``{"certfile", "keyfile", "ca"}`` of the SuperLink in ``folder``."""
    folder = Path(folder)
    return {"certfile": folder / "server.pem", "keyfile": folder / "server.key",
            "ca": ca_file(folder)}


def auth_key_files(folder: os.PathLike, cid: int) -> Dict[str, Path]:
    """``{"private", "public"}``: client ``cid``'s SuperNode authentication key pair."""
    folder = Path(folder)
    return {"private": folder / f"client{cid}.key", "public": folder / f"client{cid}.pub"}


def _names(hosts: Sequence[str]) -> List[x509.GeneralName]:
    names: List[x509.GeneralName] = []
    for host in dict.fromkeys([*LOOPBACK_NAMES, *hosts]):  # ordered, no duplicates
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write(path: Path, data: bytes, private: bool) -> None:
    path.unlink(missing_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # exact, whatever the umask
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_certs(out: os.PathLike, clients: int = 5, hosts: Sequence[str] = (),
                days: int = 365, overwrite: bool = False) -> List[Path]:
    """Write the CA, the SuperLink's certificate and ``clients`` SuperNode key pairs to ``out``.

    Returns the written paths. Raises :class:`FileExistsError` naming the existing files
    (and ``--overwrite``) when any of them exists and ``overwrite`` is false, before writing
    anything; :class:`ValueError` for a negative ``clients`` or ``days`` < 1.
    """
    if clients < 0:
        raise ValueError(f"--clients must be >= 0, got {clients}")
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    out = Path(out)
    server = server_files(out)
    planned = [out / "ca.key", server["ca"], server["keyfile"], server["certfile"]]
    for cid in range(clients):
        pair = auth_key_files(out, cid)
        planned += [pair["private"], pair["public"]]
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(p.name for p in existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise FileExistsError(f"{out} already holds {shown}; refusing to replace keys "
                              "(pass --overwrite, or choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedicra development"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedicra development CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(CURVE())
    common = next((h for h in hosts if h.strip()), "localhost")
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384()))

    written: List[Path] = []

    def put(path: Path, data: bytes, private: bool) -> None:
        _write(path, data, private)
        written.append(path)

    pem = serialization.Encoding.PEM
    put(out / "ca.key", _pem_key(ca_key), True)
    put(server["ca"], ca_cert.public_bytes(pem), False)
    put(server["keyfile"], _pem_key(server_key), True)
    put(server["certfile"], server_cert.public_bytes(pem), False)
    for cid in range(clients):
        key = ec.generate_private_key(CURVE())
        pair = auth_key_files(out, cid)
        put(pair["private"], key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()), True)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        put(pair["public"], public + f" fedicra-client{cid}\n".encode(), False)
    return written
