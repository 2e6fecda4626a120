"""A WAN-like reverse proxy (aiohttp) for the ``wan`` benchmark scenario.

    python benchmarks/wanproxy.py --upstream http://127.0.0.1:5000 [--latency 0.02] [--rate 40e6]

Listens on 127.0.0.1 (a free port; prints ``PORT <n>`` on stdout once listening) and forwards
every request to the upstream registry after ``--latency`` seconds (one simulated round trip
per request). Response bodies are streamed back through a token bucket per client connection:
each TCP connection from a client gets at most ``--rate`` bytes/s (burst ``--burst`` bytes), so
a tool that uses several connections gets proportionally more, as on a real long fat network
with per-flow limits. Redirect ``Location`` headers pointing at the upstream are rewritten.
Exits on SIGTERM/SIGINT, or when the parent dies (Linux PR_SET_PDEATHSIG, set by the caller).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
CHUNK = 128 * 1024


class Bucket:
    """Token bucket: ``rate`` bytes/s, holding at most ``burst`` bytes of credit."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self.used = self.stamp

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.used = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


def make_app(upstream: str, latency: float, rate: float, burst: float) -> web.Application:
    buckets: dict[int, Bucket] = {}
    state: dict[str, ClientSession] = {}

    async def on_startup(app: web.Application) -> None:
        state["session"] = ClientSession(
            connector=TCPConnector(limit=0, force_close=False),
            timeout=ClientTimeout(total=None, sock_connect=10, sock_read=120),
            auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await state["session"].close()

    def bucket_for(request: web.Request) -> Bucket:
        key = id(request.transport)
        b = buckets.get(key)
        if b is None:
            if len(buckets) > 1024:  # bounded: drop idle ones
                cutoff = time.monotonic() - 30
                for k in [k for k, v in buckets.items() if v.used < cutoff]:
                    del buckets[k]
            b = buckets[key] = Bucket(rate, burst)
        return b

    async def handle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(latency)
        bucket = bucket_for(request)
        # a list, not a dict: clients repeat headers (skopeo sends one Accept line per type)
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in HOP_BY_HOP)
        body = await request.read() if request.can_read_body else None
        async with state["session"].request(request.method, upstream + request.path_qs,
                                            headers=headers, data=body,
                                            allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() in HOP_BY_HOP:
                    continue
                if k.lower() == "location" and v.startswith(upstream):
                    v = f"http://{request.host}{v[len(upstream):]}"
                resp.headers.add(k, v)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            if request.method != "HEAD":
                async for chunk in up.content.iter_chunked(CHUNK):
                    await bucket.take(len(chunk))
                    await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=1 << 30)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(args: argparse.Namespace) -> None:
    app = make_app(args.upstream.rstrip("/"), args.latency, args.rate, args.burst)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description="WAN-like reverse proxy for benchmarks")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--latency", type=float, default=0.020, help="seconds added per request")
    ap.add_argument("--rate", type=float, default=40e6, help="bytes/s per client connection")
    ap.add_argument("--burst", type=float, default=256 * 1024, help="token bucket size, bytes")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    if not args.upstream.startswith("http://127.") and \
            not args.upstream.startswith("http://localhost"):
        print("wanproxy: upstream must be a loopback http:// URL", file=sys.stderr)
        return 2
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
