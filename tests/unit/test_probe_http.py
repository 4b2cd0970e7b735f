"""/probe over the real HTTP stack (create_app + limits.serve_async on loopback) with a fake ICMP socket that never
answers: every bad header, count, target and netns is a 400/403 that leaves the background prober cycling; at
most 8 probes run at once and the rest get 429 at once, so 256 slow /probe clients never lock /metrics out."""
import asyncio
import urllib.parse

from prometheus_client.parser import text_string_to_metric_families

from kvmnet.exporter.collectors.probe import GuestCollector
from kvmnet.exporter.limits import serve_async
from kvmnet.exporter.prober.engine import GuestProber, Prober
from kvmnet.exporter.prober.socket import _Pending
from kvmnet.exporter.service import Service, Settings, load
from kvmnet.exporter.web import create_app
from tests.conftest import free_port


class Silent:
    """IcmpSocket's interface; nothing ever answers, so an on-demand probe takes its whole budget."""

    def __init__(self, netns, family, loop, on_result, mode, payload_size, tx_timestamps):
        self.netns, self.family, self.loop, self.mode, self.inode = netns, family, loop, "raw", 1
        self.pending = {}

    def send(self, owner, addr, timeout):
        return _Pending(owner, addr, 0, self.loop.time() + timeout)

    def expire(self, now):
        return None

    def forget(self, p):
        pass

    def close(self):
        pass


async def serve():
    settings = Settings(enabled={"identity": False})
    gp = GuestProber(Prober(socket_factory=Silent), render=GuestCollector)
    service = Service(settings, load(settings), factories={}, prober=gp)
    app = create_app(service, probe_handler=gp.handle_probe)
    port = free_port()
    ready = asyncio.get_running_loop().create_future()
    done = asyncio.Event()  # stands in for SIGTERM without signalling pytest itself
    task = asyncio.create_task(serve_async(app, "127.0.0.1", port, ready=ready.set_result, stop=done))
    await ready
    return port, gp, (task, done)


async def get(port, path, headers=b"", keep=False):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers +
            (b"" if keep else b"Connection: close\r\n") + b"\r\n")
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
    body = await r.readexactly(length)
    if not keep:
        w.close()
    return int(head.split()[1]), body, w


async def stop(server):
    task, done = server
    done.set()
    await asyncio.wait_for(task, 10)


async def test_bad_values_are_refused_and_the_prober_keeps_cycling():
    port, gp, server = await serve()
    try:
        t = "/probe?target=10.0.0.2&count=1"
        for value in (b"nan", b"inf", b"-inf", b"-1", b"0", b"1e308x", b"garbage", b"", b"9" * 400):
            status, body, _ = await get(port, t, b"X-Prometheus-Scrape-Timeout-Seconds: " + value + b"\r\n")
            assert status == 400 and b"X-Prometheus-Scrape-Timeout-Seconds" in body, (value, status, body)
        for q, code in (("target=10.0.0.2&count=0", 400), ("target=10.0.0.2&count=101", 400),
                        ("target=10.0.0.2&count=%D9%A3", 400), ("target=fe80::1%25eth0", 400),
                        ("target=10.0.0.2%0a", 400), ("target=224.0.0.1", 400), ("target=255.255.255.255", 400),
                        ("target=0.0.0.0", 400), ("target=ff02::1", 400), ("target=::", 400), ("target=10.0.0.2&netns=elsewhere", 403),
                        ("target=10.0.0.2&netns=" + urllib.parse.quote("lab\n"), 403),
                        ("target=10.0.0.2&netns=..%2F..", 403)):
            status, body, _ = await get(port, "/probe?" + q)
            assert status == code, (q, status, body)
        # a huge but finite timeout is clamped (60 s budget) rather than refused; count=1 with no reply ends at
        # the budget, so use the largest allowed short one instead
        status, body, _ = await get(port, t, b"X-Prometheus-Scrape-Timeout-Seconds: 0.7\r\n")
        assert status == 200 and b"probe_success 0" in body
        await asyncio.sleep(0.2)
        assert gp.health() == (True, "ok")
        status, body, _ = await get(port, "/metrics")
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        rej = {s.labels["reason"]: s.value for s in fams["kvmnet_http_probe_rejected"].samples}
        assert rej == {"bad_request": 19, "netns_not_watched": 3, "too_many": 0}
        assert fams["kvmnet_prober_last_cycle_timestamp_seconds"].samples[0].value > 0
    finally:
        await stop(server)


async def test_256_slow_probes_never_lock_out_metrics():
    port, gp, server = await serve()
    try:
        slow = b"X-Prometheus-Scrape-Timeout-Seconds: 6\r\n"  # a 5.5 s budget with no reply: slow
        probes = [asyncio.create_task(get(port, "/probe?target=10.0.0.2&count=1", slow, keep=True))
                  for _ in range(256)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 4
        while gp.rejected.get("too_many", 0) < 248:  # all 256 arrived (on a busy machine that takes a while)
            assert loop.time() < deadline, gp.rejected
            await asyncio.sleep(0.05)
        assert gp.inflight == 8
        status, body, _ = await get(port, "/metrics")
        assert status == 200 and b"kvmnet_http_connections" in body
        results = await asyncio.wait_for(asyncio.gather(*probes), 15)
        codes = sorted(s for s, _, _ in results)
        assert codes.count(200) == 8 and codes.count(429) == 248
        for _, _, w in results:
            w.close()
        status, body, _ = await get(port, "/metrics")
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        rej = {s.labels["reason"]: s.value for s in fams["kvmnet_http_probe_rejected"].samples}
        assert rej["too_many"] == 248 and gp.inflight == 0
        for name in ("kvmnet_http_connections_refused", "kvmnet_http_connections_evicted",
                     "kvmnet_http_connections_timed_out", "kvmnet_http_requests_too_large"):
            assert name in fams
    finally:
        await stop(server)
