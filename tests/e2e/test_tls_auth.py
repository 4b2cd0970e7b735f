"""TLS and basic auth on the real kvmnet-exporter, from a Go-exporter web config file, with real TLS clients (curl and
Python's ssl via aiohttp) and certificates made by openssl in the test."""
import base64
import os
import socket
import ssl
import subprocess
import time

import aiohttp
import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import EXPORTER, Exporter

pytestmark = pytest.mark.timeout(120)




def openssl(*args, cwd):
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A self-signed server certificate, and a client CA with one client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", "server.key", "-out", "server.crt",
            cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kvmnet test client CA",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=prometheus", "-keyout", "client.key",
            "-out", "client.csr", cwd=d)
    (d / "ext").write_text("subjectAltName=DNS:prometheus.example.net\n")
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "ext", "-out", "client.crt", cwd=d)
    return d


def tls_exporter(web_config) -> Exporter:
    """The exporter serving HTTPS: ready once its port accepts (/healthz is behind TLS and auth too)."""
    return Exporter("--web.config.file", str(web_config), "--no-collector.probe", log_dir=web_config.parent,
                    ready="tcp", scheme="https")


def curl(*args) -> tuple[int, str]:
    """(HTTP status, body); status 0 when curl could not get a response (TLS refused, reset)."""
    p = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10", *args],
                       capture_output=True, text=True)
    body, _, code = p.stdout.rpartition("\n")
    return int(code or 0), body


@pytest.fixture(scope="module")
def basic_tls(pki):
    h = bcrypt.hashpw(b"correct horse", bcrypt.gensalt(rounds=10)).decode().replace("$2b$", "$2y$", 1)  # htpasswd -B
    (pki / "web.yml").write_text(f"""
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  min_version: TLS13
http_server_config:
  headers:
    X-Content-Type-Options: nosniff
basic_auth_users:
  prometheus: {h}
""")
    e = tls_exporter(pki / "web.yml")
    yield e
    err = e.stop()
    assert "Traceback" not in err, err


def test_curl_tls_and_basic_auth(basic_tls, pki):
    ca = ["--cacert", str(pki / "server.crt")]
    code, body = curl(*ca, "-u", "prometheus:correct horse", basic_tls.url + "/metrics")
    assert code == 200
    assert any(f.name == "kvmnet_build_info" for f in text_string_to_metric_families(body))
    assert curl(*ca, "-u", "prometheus:wrong", basic_tls.url + "/metrics")[0] == 401
    assert curl(*ca, "-u", "nobody:correct horse", basic_tls.url + "/metrics")[0] == 401
    assert curl(*ca, basic_tls.url + "/metrics")[0] == 401
    assert curl(*ca, "-u", "prometheus:correct horse", basic_tls.url + "/healthz")[0] == 200
    # An unverified server is refused by the client, plain HTTP gets no answer, TLS 1.2 is below min_version.
    assert curl("-u", "prometheus:correct horse", basic_tls.url + "/metrics")[0] == 0
    assert curl(f"http://127.0.0.1:{basic_tls.port}/metrics")[0] in (0, 400)
    assert curl(*ca, "--tls-max", "1.2", "-u", "prometheus:correct horse", basic_tls.url + "/metrics")[0] == 0
    p = subprocess.run(["curl", "-s", "-D", "-", "-o", "/dev/null", *ca, "-u", "prometheus:correct horse",
                        basic_tls.url + "/metrics"], capture_output=True, text=True)
    assert "x-content-type-options: nosniff" in p.stdout.lower()


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_python_ssl_client(basic_tls, pki):
    ctx = ssl.create_default_context(cafile=str(pki / "server.crt"))
    async with aiohttp.ClientSession() as s:
        async with s.get(basic_tls.url + "/metrics", ssl=ctx, headers=basic("prometheus", "correct horse")) as r:
            assert r.status == 200 and "kvmnet_build_info" in await r.text()
        async with s.get(basic_tls.url + "/metrics", ssl=ctx, headers=basic("prometheus", "x")) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")


def test_client_certificates(pki):
    (pki / "mtls.yml").write_text("""
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt
  client_allowed_sans: [prometheus.example.net]
""")
    e = tls_exporter(pki / "mtls.yml")
    try:
        ca = ["--cacert", str(pki / "server.crt")]
        client = ["--cert", str(pki / "client.crt"), "--key", str(pki / "client.key")]
        assert curl(*ca, *client, e.url + "/metrics")[0] == 200
        assert curl(*ca, e.url + "/metrics")[0] == 0  # no client certificate: the handshake fails
        # A certificate the CA did not sign (the server's own) is refused too.
        assert curl(*ca, "--cert", str(pki / "server.crt"), "--key", str(pki / "server.key"), e.url + "/metrics")[0] == 0
    finally:
        err = e.stop()
    assert "Traceback" not in err, err


def test_bad_web_config_one_line_exit_2(pki, tmp_path):
    (tmp_path / "bad.yml").write_text("tls_server_config:\n  cert_file: server.crt\n")
    p = subprocess.run([EXPORTER, "--web.config.file", str(tmp_path / "bad.yml"), "--config.check"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "tls_server_config.key_file: missing" in lines[0], p.stderr


def peer_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw_sock, ctx.wrap_socket(raw_sock) as s:
        return s.getpeercert(binary_form=True)


def der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(open(path).read())


def test_renewed_certificate_and_changed_password_need_no_restart(tmp_path):
    for name in ("a", "b"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=localhost-{name}",
                "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=tmp_path)
    for ext in ("crt", "key"):
        (tmp_path / f"server.{ext}").write_bytes((tmp_path / f"a.{ext}").read_bytes())
    web_yml = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nbasic_auth_users:\n  u: '{h}'\n"
    hash_of = lambda pw: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()  # noqa: E731
    (tmp_path / "web.yml").write_text(web_yml.format(h=hash_of("one")))
    e = tls_exporter(tmp_path / "web.yml")
    try:
        assert peer_cert(e.port) == der(tmp_path / "a.crt")
        # Renewed the way certbot/cert-manager do it: new files moved into place.
        for ext in ("key", "crt"):
            (tmp_path / f"new.{ext}").write_bytes((tmp_path / f"b.{ext}").read_bytes())
            os.replace(tmp_path / f"new.{ext}", tmp_path / f"server.{ext}")
        time.sleep(1.1)
        peer_cert(e.port)  # this handshake notices the change
        assert peer_cert(e.port) == der(tmp_path / "b.crt")
        insecure = ["-k"]
        assert curl(*insecure, "-u", "u:one", e.url + "/metrics")[0] == 200
        (tmp_path / "web.yml").write_text(web_yml.format(h=hash_of("two")))
        time.sleep(1.1)
        assert curl(*insecure, "-u", "u:one", e.url + "/metrics")[0] == 401
        assert curl(*insecure, "-u", "u:two", e.url + "/metrics")[0] == 200
        # A broken file is logged and the last good settings keep serving.
        (tmp_path / "web.yml").write_text("basic_auth_users:\n  u: not-a-hash\n")
        time.sleep(1.1)
        assert curl(*insecure, "-u", "u:two", e.url + "/metrics")[0] == 200
    finally:
        err = e.stop()
    assert "event=web_config_reloaded" in err and "event=web_config_reload_failed" in err, err
    assert "Traceback" not in err, err
