"""Where and how the console listens (issue 23): HTTPS with --tls-cert/--tls-key and
HSTS, plain HTTP only on loopback unless --insecure-listen, a bind error as one line,
the request body limit in the server. Real sockets on 127.0.0.1 only."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import generate_password_hash

from ipvs_synproxy.cli import main as cli
from webui import serve
from webui.app import HSTS

ROOT = Path(__file__).resolve().parents[3]


def _self_signed(tmp: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return _self_signed(tmp_path)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    f = tmp_path / "console.yaml"
    f.write_text("secret_key_file: key\naudit_log: audit.log\nusers: [{name: a, role: admin, "
                 f"password_hash: '{generate_password_hash('a-password')}'}}]\n")
    return f


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def console(config: Path) -> Iterator[Any]:
    """Start ``ipvs-synproxy webui`` as a process; stopped at the end of the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("LISTEN_PID", None)
        p = subprocess.Popen([sys.executable, "-m", "ipvs_synproxy.cli", "webui", "--config",
                              str(config), *args], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
        p.communicate(timeout=10)


def _wait_listening(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the console did not start listening")


def test_https_is_served_with_the_given_certificate_and_sends_hsts(
        console: Any, cert: tuple[Path, Path]) -> None:
    port = _free_port()
    proc = console("--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert[0]),
                   "--tls-key", str(cert[1]))
    _wait_listening(proc, port)
    ctx = ssl.create_default_context(cafile=str(cert[0]))  # verifies chain and name
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/login", context=ctx,
                                timeout=10) as r:
        assert r.status == 200
        assert r.headers["Strict-Transport-Security"] == HSTS
        assert "Secure" in r.headers["Set-Cookie"]  # TLS on: session cookie Secure
    # the body limit reaches the server from the CLI: refused before the body is sent
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 70000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert f"console on https://127.0.0.1:{port}/" in out


def test_a_certificate_the_client_does_not_trust_fails_verification(
        console: Any, cert: tuple[Path, Path], tmp_path: Path) -> None:
    port = _free_port()
    proc = console("--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert[0]),
                   "--tls-key", str(cert[1]))
    _wait_listening(proc, port)
    other = tmp_path / "other"
    other.mkdir()
    ctx = ssl.create_default_context(cafile=str(_self_signed(other)[0]))
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://127.0.0.1:{port}/login", context=ctx, timeout=10)


def test_a_bind_error_is_one_line_on_stderr_and_a_nonzero_exit(console: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = console("--listen", f"127.0.0.1:{port}")
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.splitlines() == [f"ipvs-synproxy webui: cannot listen on 127.0.0.1:{port}: "
                                "Address already in use"]


def test_an_address_not_on_this_host_is_one_line(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: bind fails, nothing is sent
    assert cli.main(["webui", "--config", str(config), "--listen", "192.0.2.1:8443",
                     "--insecure-listen"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("ipvs-synproxy webui: cannot listen on 192.0.2.1:8443: "
                       "Cannot assign requested address")
    assert not any("Traceback" in line for line in err)


@pytest.fixture
def no_bind(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every socket bind (and refuse it)."""
    binds: list[object] = []

    def bind(self: socket.socket, addr: object) -> None:
        binds.append(addr)
        raise AssertionError(f"bound {addr}")

    monkeypatch.setattr(socket.socket, "bind", bind)
    return binds


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "192.0.2.5:8080"])
def test_plain_http_off_loopback_is_refused_before_anything_is_bound(
        config: Path, capsys: pytest.CaptureFixture[str], no_bind: list[object],
        listen: str) -> None:
    assert cli.main(["webui", "--config", str(config), "--listen", listen]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--tls-cert" in err[0] and "--insecure-listen" in err[0]
    assert no_bind == []


def test_insecure_listen_or_tls_lift_the_refusal() -> None:
    with pytest.raises(serve.ServeError):
        serve.check_listen("0.0.0.0", tls=False, insecure=False)
    serve.check_listen("0.0.0.0", tls=False, insecure=True)
    serve.check_listen("0.0.0.0", tls=True, insecure=False)
    serve.check_listen("::1", tls=False, insecure=False)
    serve.check_listen("127.0.0.2", tls=False, insecure=False)


def test_tls_files_that_do_not_load_are_one_line(
        config: Path, cert: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], no_bind: list[object]) -> None:
    other = tmp_path / "other"
    other.mkdir()
    wrong_key = _self_signed(other)[1]
    for args, expect in (
            (["--tls-cert", str(cert[0])], "--tls-cert and --tls-key go together"),
            (["--tls-cert", str(cert[0]), "--tls-key", str(tmp_path / "nokey")],
             "no such file"),
            (["--tls-cert", str(cert[0]), "--tls-key", str(wrong_key)],
             "cannot load the certificate and key"),
            (["--tls-cert", str(config), "--tls-key", str(cert[1])],
             "cannot load the certificate and key")):
        assert cli.main(["webui", "--config", str(config), *args]) != 0
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert no_bind == []


def test_hsts_only_over_https(client: FlaskClient) -> None:
    r = client.get("/login", base_url="https://localhost")
    assert r.headers["Strict-Transport-Security"] == HSTS
    assert "Strict-Transport-Security" not in client.get("/login").headers


def test_the_server_refuses_bodies_over_the_apps_limit(app: Flask) -> None:
    server = serve.make_server(app, "127.0.0.1", 0, max_body=app.config["MAX_CONTENT_LENGTH"])
    host, port = serve.bind(server)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        for head in (b"Content-Length: 70000\r\n",  # refused before the body is read
                     b"Transfer-Encoding: chunked\r\n"):
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(b"POST /login HTTP/1.1\r\nHost: localhost\r\n" + head +
                          b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
                if b"chunked" in head:
                    s.sendall(b"%x\r\n%s\r\n" % (70_000, b"x" * 70_000) + b"0\r\n\r\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    finally:
        server.stop()
        t.join(timeout=10)
