"""TLS, SuperNode authentication and private outputs of a deployment.

Fast tests: the development certificates (``flower_runner.py certs``) are what Flower 1.42
loads, keys are private and never silently replaced; the TLS probe a site runs before it
says "joined" names each mismatch; worker secrets are new for every run. Slow tests: a tiny
loopback federation with TLS and SuperNode authentication completes, and a site whose CA does
not match the SuperLink's (or that has none) fails within seconds naming the problem.
"""
from __future__ import annotations

import csv
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import flower_runner
from conftest import free_base
from deployment.certs import auth_key_files, server_files, write_certs
from deployment.security import UNREACHABLE, tls_problem

REPO = Path(__file__).resolve().parents[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sec") / "certs"
    write_certs(folder, clients=3, hosts=["coord.example.org", "10.1.2.3"])
    return folder


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sec") / "other"
    write_certs(folder, clients=1)
    return folder


# ---------------------------------------------------------------------- certificates
def test_certs_are_what_flower_loads_and_private(certs):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

    assert mode(certs) == 0o700
    for name in ("ca.key", "server.key", "client0.key", "client2.key"):
        assert mode(certs / name) == 0o600, name
    for name in ("ca.crt", "server.pem", "client0.pub"):
        assert mode(certs / name) == 0o644, name
    pair = auth_key_files(certs, 1)
    # flower-supernode --auth-supernode-private-key: OpenSSH EC key (flower_supernode.py)
    private = load_ssh_private_key(pair["private"].read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    # flwr supernode register: OpenSSH public key on a NIST curve, and the same key
    registered = try_load_public_key(pair["public"])
    assert registered == public_key_to_bytes(private.public_key())
    assert bytes_to_public_key(registered).curve.name == "secp384r1"
    # the SuperLink's certificate: signed by the CA, loopback and --host names in its SAN
    files = server_files(certs)
    ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(files["certfile"].read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "coord.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "::1", "10.1.2.3"} <= {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    ssl.create_default_context(cafile=str(files["ca"])).load_cert_chain(
        files["certfile"], files["keyfile"])  # what the SuperLink's HTTPS server loads


def test_certs_refuses_to_replace_keys_without_overwrite(tmp_path, capsys):
    out = tmp_path / "c"
    assert flower_runner.main(["certs", "--out", str(out), "--clients", "2"]) == 0
    before = (out / "client0.key").read_bytes()
    assert flower_runner.main(["certs", "--out", str(out), "--clients", "2"]) == 2
    text = capsys.readouterr().out
    assert "refusing to replace keys" in text and "--overwrite" in text
    assert (out / "client0.key").read_bytes() == before
    assert flower_runner.main(["certs", "--out", str(out), "--clients", "2", "--overwrite"]) == 0
    assert (out / "client0.key").read_bytes() != before and mode(out / "client0.key") == 0o600


def test_auth_keys_without_tls_is_refused_before_anything_starts(tiny_federation, certs, tmp_path,
                                                                  capsys):
    code = flower_runner.main(["--mode", "deployment", "--img_class", "synthetic_faz",
                               "--root_path", str(tiny_federation), "--num_clients", "2",
                               "--out_root", str(tmp_path / "model"), "--auth-keys", str(certs)])
    assert code == 2
    assert "--auth-keys: Flower authenticates SuperNodes only over TLS" in capsys.readouterr().out
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------- the TLS probe
class Server:
    """A one-connection-at-a-time TCP server on loopback, TLS with ``certs`` or plain."""

    def __init__(self, certs: Path = None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.context = None
        if certs is not None:
            files = server_files(certs)
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(files["certfile"], files["keyfile"])
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                if self.context is not None:
                    conn = self.context.wrap_socket(conn, server_side=True)
                else:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()

    def close(self):
        self.sock.close()


def test_tls_probe_names_every_mismatch(certs, other_certs):
    tls, plain = Server(certs), Server()
    try:
        link, plain_link = f"127.0.0.1:{tls.port}", f"127.0.0.1:{plain.port}"
        ca, wrong = str(certs / "ca.crt"), str(other_certs / "ca.crt")
        assert tls_problem(link, ca) is None
        assert tls_problem(f"localhost:{tls.port}", ca) is None
        assert tls_problem(plain_link, "") is None  # plain on both sides
        problem = tls_problem(link, wrong)
        assert "does not verify against --root-certificates" in problem and wrong in problem
        assert "speaks TLS but this site has no CA" in tls_problem(link, "")
        assert "does not complete a TLS handshake" in tls_problem(plain_link, ca)
        assert "--insecure" in tls_problem(plain_link, ca)
    finally:
        tls.close()
        plain.close()
    assert tls_problem(f"127.0.0.1:{free_base(1)}", ca) == UNREACHABLE


def test_worker_secrets_are_new_for_every_run(tmp_path):
    from deployment.launch import fresh_secret

    path = tmp_path / "secrets" / "client0.key"
    first = fresh_secret(path).read_bytes()
    assert mode(path) == 0o600 and len(first) >= 64
    assert fresh_secret(path).read_bytes() != first


# ---------------------------------------------------------------------- real runs
def tiny_runner(data: Path, out_root: Path, port: int, exp: str, clients: int, rounds: int,
                *extra: str):
    return [sys.executable, "flower_runner.py", "--mode", "deployment", "--img_class",
            "synthetic_faz", "--root_path", str(data), "--num_clients", str(clients),
            "--rounds", str(rounds), "--iters", "2", "--rep_iters", "1", "--batch_size", "2",
            "--procedure", "pce", "--img_size", "32", "--set", "base_channels=4", "--set",
            "aux_channels=8", "--set", "ala_max_epochs=2", "--port", str(port), "--out_root",
            str(out_root), "--exp", exp, "--stop-timeout", "5", *extra]


@pytest.mark.slow
def test_deployment_with_tls_and_supernode_auth_completes(tiny_federation, certs, tmp_path):
    clients = 2
    cmd = tiny_runner(tiny_federation, tmp_path / "model", free_base(2 * clients + 2), "tls",
                      clients, 2, "--tls", str(certs), "--auth-keys", str(certs))
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = tmp_path / "model" / "tls"
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "ended: finished:completed" in res.stdout
    assert f"registered {clients} SuperNode public key(s)" in res.stdout
    link_log = (out / "logs" / "superlink.log").read_text()
    assert "running on https://" in link_log  # TLS, not --insecure
    from deployment.processes import recorded_pids

    argv = recorded_pids(out / "pids.json")
    assert set(argv) >= {"superlink", "supernode0", "supernode1"}
    for k in range(clients):
        assert "SuperNode ID:" in (out / "logs" / f"supernode{k}.log").read_text()
    with open(out / "metrics.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * clients
    # private outputs (umask 077 of the runner and its children)
    for folder in (out, out / "logs", out / "secrets", out / "client0", out / "tb"):
        assert mode(folder) == 0o700, folder
    for path in (out / "metrics.csv", out / "config.toml", out / "logs" / "worker0.log",
                 out / "client0" / "latest.pt", out / "secrets" / "client0.key"):
        assert mode(path) == 0o600, path
    from deployment.processes import group_members

    assert not [p for p in argv.values() if group_members(p)]


@pytest.mark.slow
def test_site_that_cannot_complete_the_tls_handshake_fails_fast(tiny_federation, certs,
                                                                other_certs, tmp_path):
    """A site with the wrong CA, or none, facing a TLS SuperLink: exit 2 within seconds with a
    message naming the problem, never "joined" (a plain SuperNode would retry forever)."""
    base = free_base(8)
    snap = tmp_path / "model" / "sites" / "config.toml"
    assert flower_runner.main(["launch", "--superlink", f"127.0.0.1:{base}", "--dry-run",
                               "--img_class", "synthetic_faz", "--root_path",
                               str(tiny_federation), "--num_clients", "2", "--img_size", "32",
                               "--set", "base_channels=4", "--set", "aux_channels=8",
                               "--out_root", str(tmp_path / "model"), "--exp", "sites"]) == 0
    link = subprocess.Popen([sys.executable, "flower_runner.py", "superlink", "--port", str(base),
                             "--out_dir", str(tmp_path / "link"), "--tls", str(certs),
                             "--stop-timeout", "5"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "link" / "logs" / "superlink.log").is_file() or \
                "Uvicorn running" not in (tmp_path / "link" / "logs" / "superlink.log").read_text():
            assert link.poll() is None and time.monotonic() < deadline, "SuperLink did not start"
            time.sleep(0.2)
        cases = {"wrong CA": (["--root-certificates", str(other_certs / "ca.crt")],
                              "does not verify against --root-certificates"),
                 "no CA": ([], "speaks TLS but this site has no CA")}
        for what, (flags, expected) in cases.items():
            started = time.monotonic()
            res = subprocess.run([sys.executable, "flower_runner.py", "site", "--cid", "0",
                                  "--superlink", f"127.0.0.1:{base}", "--config", str(snap),
                                  "--port", str(base + 2), "--stop-timeout", "5", *flags],
                                 cwd=REPO, capture_output=True, text=True, timeout=120)
            took = time.monotonic() - started
            text = res.stdout + res.stderr
            assert res.returncode == 2, f"{what}: {text[-3000:]}"
            assert expected in text and "client 0 cannot join" in text, f"{what}: {text[-3000:]}"
            assert "joined" not in text, what
            # interpreter, data and worker start included; the TLS check itself is immediate
            # with a CA and after 2 s without one
            assert took < 45, f"{what}: {took:.0f} s"
    finally:
        link.terminate()
        link.communicate(timeout=60)
