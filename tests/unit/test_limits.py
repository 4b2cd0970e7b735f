"""exporter/limits.py with tiny limits on loopback: idle connections are evicted for new ones, a new connection is
refused (503) only when every connection is busy, silent clients are cut off, declared bodies over the limit get
413. The real exporter under abuse: tests/netns/test_survival.py."""
import asyncio

from aiohttp import web

from kvmnet.exporter.limits import Limits, serve_async
from tests.conftest import free_port


async def start(limits: Limits):
    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return web.Response(text="slow\n")

    async def fast(request):
        return web.Response(text="fast\n")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/fast", fast)
    app.router.add_post("/fast", fast)
    port = free_port()
    ready = asyncio.get_running_loop().create_future()
    done = asyncio.Event()  # stands in for SIGTERM: the same clean shutdown, without signalling pytest itself
    task = asyncio.create_task(serve_async(app, "127.0.0.1", port, limits=limits, ready=ready.set_result,
                                           stop=done))
    tracker = await ready
    return port, tracker, release, (task, done)


async def request(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    out = await asyncio.wait_for(r.read(200), 5)
    w.close()
    return out


async def stop(server):
    task, done = server
    done.set()
    await asyncio.wait_for(task, 10)


async def test_idle_evicted_busy_refused():
    port, tracker, release, server = await start(Limits(max_connections=2, header_timeout=30))
    try:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.1)
        # Full of idle connections: a new request still gets through, an idle one is evicted.
        assert (await request(port, b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).startswith(
            b"HTTP/1.1 200")
        assert tracker.evicted >= 1
        for _, w in idle:
            w.close()
        # Two requests in progress: a third connection is refused with 503, nothing busy is evicted.
        busy = [asyncio.create_task(request(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")) for _ in range(2)]
        await asyncio.sleep(0.3)
        assert (await request(port, b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 503")
        release.set()
        assert all(b.startswith(b"HTTP/1.1 200") for b in await asyncio.gather(*busy))
    finally:
        await stop(server)


async def test_silent_client_cut_off_and_big_body_refused():
    port, tracker, release, server = await start(Limits(header_timeout=0.5, max_body=1000))
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r.read(), 3) == b""  # closed by the server, no response
        assert tracker.timeouts == 1
        w.close()
        reply = await request(port, b"POST /fast HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
        assert reply.startswith(b"HTTP/1.1 413")
        assert (await request(port, b"POST /fast HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n" + b"x" * 10)
                ).startswith(b"HTTP/1.1 200")
        assert tracker.too_large == 1 and tracker.malformed == 0
        assert (await request(port, b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
                ).startswith((b"HTTP/1.1 4", b"HTTP/1.0 4"))
        assert (await request(port, b"\x16\x03\x01garbage\r\n\r\n")).startswith((b"HTTP/1.1 400", b"HTTP/1.0 400"))
        assert tracker.malformed == 2
        names = {m.name: m.samples[0].value for m in tracker.collect()}
        assert names["kvmnet_http_requests_malformed"] == 2 and names["kvmnet_http_connections_timed_out"] == 1
    finally:
        await stop(server)


def test_sigterm_stops_even_a_starved_event_loop(tmp_path):
    """A handler that never yields starves the event loop (what `probe.interval: 0.0000001ms` used to do): SIGTERM
    must still end the process, by the forced-exit watchdog (shutdown timeout + 5 s)."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    script = tmp_path / "spin.py"
    script.write_text(
        "import asyncio, sys\n"
        "from aiohttp import web\n"
        "from kvmnet.exporter.limits import Limits, serve_async\n"
        "async def spin(request):\n"
        "    while True:\n"
        "        pass\n"
        "async def ok(request):\n"
        "    return web.Response(text='ok')\n"
        "app = web.Application()\n"
        "app.router.add_get('/spin', spin)\n"
        "app.router.add_get('/ok', ok)\n"
        f"asyncio.run(serve_async(app, '127.0.0.1', {port}, limits=Limits(shutdown_timeout=0.5)))\n")
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ok", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        import socket
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /spin HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # the loop is now spinning in the handler
        t0 = time.monotonic()
        proc.terminate()
        proc.wait(timeout=15)
        took = time.monotonic() - t0
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and 4 < took < 9, (proc.returncode, took)
    assert "event=forced_exit" in proc.stderr.read()
