"""A plain HTTP forward proxy (what ``HTTP_PROXY`` points at), for tests of puller behind
a corporate proxy. Requests arrive in absolute form (``GET http://host:port/path``) and
are forwarded as they are; each one is logged as ``(method, host, path)``. Loopback only.

puller, like docker, never sends requests for this machine's own addresses through a
proxy, so tests name registries with made-up names that only the proxy knows
(``names``: name -> the loopback address it dials, the request's Host kept as sent):

    with ForwardProxy({"reg.proxied.test": "127.0.0.1"}) as fp:
        env["HTTP_PROXY"] = fp.url
        ...
        fp.requests  # [("GET", "reg.proxied.test:5000", "/v2/"), ...]

A ``CONNECT`` (an HTTPS request through the proxy) is answered by hanging up, as a TLS
handshake with a plain-HTTP registry would end: a client that tries HTTPS first for an
insecure registry then falls back to HTTP.
"""

from __future__ import annotations

import threading

from . import ThreadedServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


class ForwardProxy:
    def __init__(self, names: dict[str, str] | None = None) -> None:
        self._names = dict(names or {})
        self._lock = threading.Lock()
        self._log: list[tuple[str, str, str]] = []
        self._session = None
        self._server = ThreadedServer(self._make_app, name="forward-proxy")

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self._log)

    def __enter__(self) -> "ForwardProxy":
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    async def _make_app(self):
        import aiohttp
        from aiohttp import web

        async def on_startup(app):
            self._session = aiohttp.ClientSession(auto_decompress=False)

        async def on_cleanup(app):
            await self._session.close()

        @web.middleware
        async def no_tunnels(request, handler):  # before routing: a CONNECT has no path
            if request.method == "CONNECT":
                with self._lock:
                    self._log.append(("CONNECT", request.raw_path, ""))
                request.transport.close()
                return web.Response(status=502)
            return await handler(request)

        async def handle(request):
            url = request.url
            sent_host = request.headers.get("Host", f"{url.host}:{url.port}")
            if url.host in self._names:
                url = url.with_host(self._names[url.host])
            if url.host not in ("127.0.0.1", "localhost", "::1"):
                return web.Response(status=403, text="ForwardProxy: loopback only")
            with self._lock:
                self._log.append((request.method, sent_host, request.url.path))
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Host"] = sent_host
            data = request.content if request.body_exists else None
            async with self._session.request(request.method, str(url), headers=headers,
                                             data=data, allow_redirects=False) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        resp.headers.add(k, v)
                if up.content_length is not None:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                if request.method != "HEAD":
                    async for chunk in up.content.iter_chunked(1 << 16):
                        await resp.write(chunk)
                await resp.write_eof()
                return resp

        app = web.Application(middlewares=[no_tunnels])
        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app
