"""exporter/webconfig.py: the Go exporters' web config format. Bad files give one line naming the field; basic
auth answers 401 to wrong or missing credentials and caches verified ones. TLS with a real client is in
tests/e2e/test_tls_auth.py."""
import base64
import subprocess

import bcrypt
import pytest
from aiohttp import web

from kvmnet.exporter import webconfig
from kvmnet.exporter.webconfig import WebConfigError

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


def make_cert(d, name="server", cn="localhost"):
    """A self-signed certificate and key made by openssl, as an operator would."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={cn}",
                    "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1", "-keyout", str(d / f"{name}.key"),
                    "-out", str(d / f"{name}.crt")], check=True, capture_output=True)
    return d / f"{name}.crt", d / f"{name}.key"


def write(tmp_path, text):
    p = tmp_path / "web.yml"
    p.write_text(text)
    return str(p)


def test_empty_file_means_plain_http(tmp_path):
    cfg = webconfig.load(write(tmp_path, ""))
    assert cfg.ssl_context is None and cfg.middlewares == () and cfg.users == {}


def test_tls_relative_paths_and_versions(tmp_path):
    make_cert(tmp_path)
    cfg = webconfig.load(write(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                                         "  min_version: TLS13\n"))
    import ssl
    assert cfg.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert cfg.ssl_context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize("text,expected", [
    ("tls_server_config:\n  key_file: server.key\n", "tls_server_config.cert_file: missing"),
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n", "tls_server_config.cert_file: no such file"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS9\n",
     "tls_server_config.min_version: unknown TLS version 'TLS9'"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n",
     "tls_server_config.client_ca_file: missing"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: Sometimes\n",
     "tls_server_config.client_auth_type: unknown client auth type 'Sometimes'"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  cipher_suites: [TLS_FOO]\n",
     "tls_server_config.cipher_suites[0]: unknown or unsupported cipher suite 'TLS_FOO'"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  colour: blue\n",
     "tls_server_config.colour: unknown key"),
    ("tls_config:\n  cert_file: server.crt\n", "tls_config: unknown key"),
    ("basic_auth_users:\n  alice: hunter2\n", "basic_auth_users.alice: not a bcrypt hash"),
    ("basic_auth_users: [alice]\n", "basic_auth_users: must be a mapping, got list"),
    ("basic_auth_users:\n  123: x\n", "basic_auth_users.123: keys must be strings, got int"),
    ("http_server_config:\n  headers:\n    X-Powered-By: me\n", "http_server_config.headers.X-Powered-By: unknown key"),
    ("http_server_config:\n  http2: yes please\n", "http_server_config.http2: must be true or false, got str"),
    ("tls_server_config: [\n", "invalid YAML"),
])
def test_bad_files_name_the_field(tmp_path, text, expected):
    make_cert(tmp_path)
    path = write(tmp_path, text)
    with pytest.raises(WebConfigError) as info:
        webconfig.load(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(path) and expected in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(WebConfigError, match="No such file"):
        webconfig.load(str(tmp_path / "absent.yml"))


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
async def client(tmp_path, aiohttp_client):
    cfg = webconfig.load(write(tmp_path, f"basic_auth_users:\n  alice: '{HASH}'\n"
                                         "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"))
    app = web.Application(middlewares=list(cfg.middlewares))

    async def ok(request):
        return web.Response(text="ok\n")
    app.router.add_get("/metrics", ok)
    return await aiohttp_client(app), cfg


async def test_basic_auth(client):
    c, cfg = client
    r = await c.get("/metrics")
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert r.headers["X-Frame-Options"] == "deny"
    assert (await c.get("/metrics", headers=basic("alice", "wrong"))).status == 401
    assert (await c.get("/metrics", headers=basic("mallory", "s3cret"))).status == 401
    assert (await c.get("/metrics", headers={"Authorization": "Basic !!!"})).status == 401
    assert (await c.get("/metrics", headers={"Authorization": "Bearer abc"})).status == 401
    r = await c.get("/metrics", headers=basic("alice", "s3cret"))
    assert r.status == 200 and await r.text() == "ok\n" and r.headers["X-Frame-Options"] == "deny"


async def test_verified_password_is_cached(client, monkeypatch):
    c, cfg = client
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(webconfig.bcrypt, "checkpw", lambda p, h: calls.append(1) or real(p, h))
    for _ in range(5):
        assert (await c.get("/metrics", headers=basic("alice", "s3cret"))).status == 200
    assert len(calls) == 1
    for _ in range(3):  # failures are never cached: each costs a bcrypt check
        assert (await c.get("/metrics", headers=basic("alice", "nope"))).status == 401
    assert len(calls) == 4


def test_go_style_2y_hashes_verify():
    # htpasswd -B writes $2y$; bcrypt treats it as $2b$.
    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)
    auth = webconfig.BasicAuth({"u": h.encode()})
    import asyncio
    assert asyncio.run(auth.verify("u", b"pw"))
    assert not asyncio.run(auth.verify("u", b"px"))
