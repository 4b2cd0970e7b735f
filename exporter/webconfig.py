"""`--web.config.file`: TLS and basic auth in the Go exporters' format (prometheus/exporter-toolkit), so operators
reuse the files they already have for node_exporter & co.

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file, as in exporter-toolkit
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
      min_version: TLS12
    http_server_config:
      headers: {X-Frame-Options: deny}
    basic_auth_users:
      prometheus: $2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG

`load(path) -> WebConfig` with an `ssl.SSLContext` (or None) and aiohttp middlewares. Bad input raises
`WebConfigError`: one line naming the field (`tls_server_config.min_version: unknown TLS version 'TLS9'`).
Differences from Go, said plainly: `curve_preferences`, `prefer_server_cipher_suites` and `http2` are accepted and
not applied (OpenSSL's defaults; aiohttp speaks HTTP/1.1 only); `RequireAnyClientCert` is refused, because
Python's ssl module cannot require a client certificate without verifying it. Changed files are picked up while
running (`Rotation`): renewed certificates and changed passwords need no restart.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import bcrypt
from aiohttp import web

from kvmnet.common import yamlfile

from . import logs
from .config import ConfigError

log = logging.getLogger("kvmnet.webconfig")


class WebConfigError(ConfigError):
    """A bad web config file; `str()` is one line: the file, the field, what is wrong."""


_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "client_allowed_sans", "min_version",
             "max_version", "cipher_suites", "prefer_server_cipher_suites", "curve_preferences"}
_HTTP_KEYS = {"http2", "headers"}
# exporter-toolkit allows exactly these response headers to be set.
_HEADERS = {"Strict-Transport-Security", "X-Content-Type-Options", "X-Frame-Options", "X-XSS-Protection",
            "Content-Security-Policy"}
_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1, "TLS12": ssl.TLSVersion.TLSv1_2,
             "TLS13": ssl.TLSVersion.TLSv1_3}
# Go's crypto/tls names -> OpenSSL's, for the TLS 1.2 suites Go offers (TLS 1.3 suites are not configurable in Go).
_CIPHERS = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
}
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_NONE,
                "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL, "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}

# A verified (user, password) is remembered this long. bcrypt is slow on purpose (cost 10 is ~70 ms of CPU);
# Prometheus sends the same credentials every scrape, and re-hashing each time would cost more than the scrape.
CACHE_SECONDS = 60.0
CACHE_MAX = 1024


@dataclass
class WebConfig:
    path: str
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)
    allowed_sans: list[str] = field(default_factory=list)
    middlewares: tuple = ()
    files: list[str] = field(default_factory=list)  # the file itself and the certificate files it names


def _fail(path: str, where: str, msg: str) -> WebConfigError:
    # A key from the file may hold a newline: the message stays one line.
    where = where if where.isprintable() else repr(where)
    return WebConfigError(f"{path}: {where}: {' '.join(msg.split())}")


def _mapping(path: str, where: str, value: Any, allowed: set[str] | None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, where, f"must be a mapping, got {type(value).__name__}")
    for k in value:
        key = f"{where}.{k}" if where != "(top level)" else str(k)
        if not isinstance(k, str):
            raise _fail(path, key, f"keys must be strings, got {type(k).__name__} (quote it)")
        if allowed is not None and k not in allowed:
            raise _fail(path, key, "unknown key")
    return value


def _str(path: str, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, where, f"must be a non-empty string, got {type(value).__name__}")
    return value


def _file(path: str, where: str, value: Any) -> str:
    name = os.path.join(os.path.dirname(os.path.abspath(path)), _str(path, where, value))
    if not os.path.isfile(name):
        raise _fail(path, where, f"no such file: {name}")
    return name


def _str_list(path: str, where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(path, where, f"must be a list, got {type(value).__name__}")
    return [_str(path, f"{where}[{i}]", v) for i, v in enumerate(value)]


def _tls(path: str, tls: dict) -> tuple[ssl.SSLContext, list[str], list[str]]:
    where = "tls_server_config"
    for key in ("cert_file", "key_file"):
        if key not in tls:
            raise _fail(path, f"{where}.{key}", "missing")
    cert, key = _file(path, f"{where}.cert_file", tls["cert_file"]), _file(path, f"{where}.key_file", tls["key_file"])
    files = [cert, key]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise _fail(path, f"{where}.cert_file", f"cannot load certificate and key: {exc}") from None
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = tls.get(key, default)
        if name not in _VERSIONS:
            raise _fail(path, f"{where}.{key}", f"unknown TLS version {name!r} (TLS10, TLS11, TLS12, TLS13)")
        versions[key] = _VERSIONS[name]
    try:
        ctx.minimum_version, ctx.maximum_version = versions["min_version"], versions["max_version"]
    except ValueError as exc:
        raise _fail(path, f"{where}.min_version", str(exc)) from None
    suites = _str_list(path, f"{where}.cipher_suites", tls.get("cipher_suites"))
    for i, s in enumerate(suites):
        if s not in _CIPHERS:
            raise _fail(path, f"{where}.cipher_suites[{i}]", f"unknown or unsupported cipher suite {s!r}")
    if suites:
        ctx.set_ciphers(":".join(_CIPHERS[s] for s in suites))
    _str_list(path, f"{where}.curve_preferences", tls.get("curve_preferences"))  # accepted, not applied
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth == "RequireAnyClientCert":
        raise _fail(path, f"{where}.client_auth_type", "RequireAnyClientCert is not supported (Python's ssl "
                    "verifies every client certificate it requires): use RequireAndVerifyClientCert")
    if auth not in _CLIENT_AUTH:
        raise _fail(path, f"{where}.client_auth_type", f"unknown client auth type {auth!r}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    if "client_ca_file" in tls:
        files.append(_file(path, f"{where}.client_ca_file", tls["client_ca_file"]))
        try:
            ctx.load_verify_locations(files[-1])
        except ssl.SSLError as exc:
            raise _fail(path, f"{where}.client_ca_file", f"cannot load CA certificates: {exc}") from None
    elif ctx.verify_mode != ssl.CERT_NONE:
        raise _fail(path, f"{where}.client_ca_file", f"missing (needed by client_auth_type {auth})")
    sans = _str_list(path, f"{where}.client_allowed_sans", tls.get("client_allowed_sans"))
    if sans and ctx.verify_mode == ssl.CERT_NONE:
        raise _fail(path, f"{where}.client_allowed_sans", "needs a client_auth_type that verifies certificates")
    return ctx, sans, files


def _users(path: str, users: dict) -> dict[str, bytes]:
    out = {}
    for user, h in users.items():
        where = f"basic_auth_users.{user}"
        if not isinstance(h, str) or not h.startswith(("$2a$", "$2b$", "$2y$")) or len(h) != 60:
            raise _fail(path, where, "not a bcrypt hash (htpasswd -nBC 10 \"\" | tr -d ':\\n' makes one)")
        out[user] = h.encode()
    return out


def parse(path: str) -> WebConfig:
    """Read and check a web config file; build its SSL context (no middlewares yet)."""
    data = yamlfile.read_yaml(path, WebConfigError)  # regular file, size, UTF-8, depth, aliases, duplicate keys
    top = _mapping(path, "(top level)", data, {"tls_server_config", "http_server_config", "basic_auth_users"})
    cfg = WebConfig(path=path, files=[path])
    tls = _mapping(path, "tls_server_config", top.get("tls_server_config"), _TLS_KEYS)
    if tls:
        cfg.ssl_context, cfg.allowed_sans, files = _tls(path, tls)
        cfg.files += files
    http = _mapping(path, "http_server_config", top.get("http_server_config"), _HTTP_KEYS)
    if "http2" in http and not isinstance(http["http2"], bool):
        raise _fail(path, "http_server_config.http2", f"must be true or false, got {type(http['http2']).__name__}")
    headers = _mapping(path, "http_server_config.headers", http.get("headers"), _HEADERS)
    cfg.headers = {k: _str(path, f"http_server_config.headers.{k}", v) for k, v in headers.items()}
    cfg.users = _users(path, _mapping(path, "basic_auth_users", top.get("basic_auth_users"), None))
    return cfg


def load(path: str) -> WebConfig:
    """`parse()`, plus the middlewares, plus picking up changed files while running (see `Rotation`)."""
    cfg = parse(path)
    rotation = Rotation(cfg)
    if cfg.ssl_context is not None:
        cfg.ssl_context.sni_callback = rotation.sni  # runs on every handshake, SNI or not
    mws = []
    if cfg.headers:
        mws.append(headers_middleware(cfg.headers))
    if cfg.allowed_sans:
        mws.append(sans_middleware(cfg.allowed_sans))
    if cfg.users:
        rotation.auth = BasicAuth(cfg.users, rotation.check)
        mws.append(rotation.auth.middleware)
    cfg.middlewares = tuple(mws)
    logs.event(log, "web_config_loaded", file=path, tls=cfg.ssl_context is not None,
               client_auth=cfg.ssl_context.verify_mode.name if cfg.ssl_context else "-", users=len(cfg.users))
    return cfg


def _stamps(files: list[str]) -> tuple:
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class Rotation:
    """Certificates get renewed and passwords changed while the exporter runs. As the Go exporters re-read their web
    config, this re-reads ours when the file or a certificate file it names changes (checked at most once a second,
    on TLS handshakes and on authenticated requests): new connections get the new certificate and key, requests are
    checked against the new users. A file that no longer parses is logged and the old settings stay. Turning TLS
    or basic auth on or off, and the other TLS settings, take a restart."""

    def __init__(self, cfg: WebConfig) -> None:
        self.path, self.files = cfg.path, cfg.files
        self.stamp = _stamps(self.files)
        self.context = cfg.ssl_context
        self.auth: BasicAuth | None = None
        self._checked = time.monotonic()

    def check(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        stamp = _stamps(self.files)
        if stamp == self.stamp:
            return
        self.stamp = stamp
        try:
            new = parse(self.path)
        except WebConfigError as exc:
            logs.event(log, "web_config_reload_failed", logging.ERROR, error=str(exc), action="keeping the old one")
            return
        self.files = new.files
        self.stamp = _stamps(self.files)
        if self.context is not None and new.ssl_context is not None:
            self.context = new.ssl_context
        if self.auth is not None and new.users:
            self.auth.set_users(new.users)
        if (self.context is None) != (new.ssl_context is None) or (self.auth is None) != (not new.users):
            logs.event(log, "web_config_restart_needed", logging.WARNING,
                       reason="TLS or basic auth turned on or off")
        logs.event(log, "web_config_reloaded", file=self.path, users=len(new.users))

    def sni(self, sslobj, server_name, context) -> None:
        self.check()
        if self.context is not None and self.context is not context:
            sslobj.context = self.context
        return None


def headers_middleware(headers: dict[str, str]):
    @web.middleware
    async def add_headers(request: web.Request, handler):
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(headers)
            raise
        resp.headers.update(headers)
        return resp
    return add_headers


def sans_middleware(allowed: list[str]):
    """client_allowed_sans: the verified client certificate must carry one of these DNS/IP/URI/email SANs."""
    allowed_set = set(allowed)

    @web.middleware
    async def check_sans(request: web.Request, handler):
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        sans = {v for _, v in (cert or {}).get("subjectAltName", ())}
        if not sans & allowed_set:
            raise web.HTTPForbidden(text="client certificate not allowed\n")
        return await handler(request)
    return check_sans


class BasicAuth:
    """Basic auth against bcrypt hashes, as exporter-toolkit does it.

    Every request needs credentials. Passwords are only ever compared by bcrypt.checkpw, which compares hashes in
    constant time; the cache is looked up by a SHA-256 digest, never by the password itself. A wrong user costs the
    same bcrypt work as a wrong password (checked against a dummy hash), so response time does not tell which users
    exist. Verified credentials are cached for
    CACHE_SECONDS under a SHA-256 of user, password and hash: the cache never holds a password, and a changed hash
    (a new web config) misses it. bcrypt runs in a worker thread so the event loop, and the prober on it, keep going
    while a password is checked; at most two checks run at once, so a flood of bad passwords costs two cores, not
    a thread pool.
    """

    _DUMMY = b"$2b$10$dHsMiULRphgMnHSJy8A58edTZzF65iyNTbUZ9lgD7YVBeJMvqMIHG"  # cost 10, like htpasswd -B

    def __init__(self, users: dict[str, bytes], before=None) -> None:
        self.users = users
        self._before = before  # Rotation.check: pick up a changed file first
        self._cache: dict[bytes, float] = {}
        self._sem = asyncio.Semaphore(2)

    def set_users(self, users: dict[str, bytes]) -> None:
        self.users = users
        self._cache = {}  # the keys include the hash, but a removed user must not linger for CACHE_SECONDS

    def _key(self, user: str, password: bytes, hashed: bytes) -> bytes:
        return hashlib.sha256(b"\0".join((user.encode(), password, hashed))).digest()

    async def verify(self, user: str, password: bytes) -> bool:
        hashed = self.users.get(user)
        key = self._key(user, password, hashed or self._DUMMY)
        now = time.monotonic()
        expiry = self._cache.get(key)
        if hashed is not None and expiry is not None and expiry > now:
            return True
        async with self._sem:
            ok = await asyncio.to_thread(bcrypt.checkpw, password, hashed or self._DUMMY)
        ok = ok and hashed is not None
        if ok:
            if len(self._cache) >= CACHE_MAX:
                self._cache = {k: t for k, t in self._cache.items() if t > now}
                if len(self._cache) >= CACHE_MAX:
                    self._cache.clear()
            self._cache[key] = now + CACHE_SECONDS
        return ok

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if self._before is not None:
            self._before()
        creds = parse_basic(request.headers.get("Authorization", ""))
        if creds is None or not await self.verify(*creds):
            raise web.HTTPUnauthorized(text="Unauthorized\n", headers={"WWW-Authenticate": 'Basic realm="kvmnet"'})
        return await handler(request)


def parse_basic(header: str) -> tuple[str, bytes] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        return user.decode(), password
    except UnicodeDecodeError:
        return None
