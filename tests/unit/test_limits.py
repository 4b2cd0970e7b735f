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
    finally:
        await stop(server)
