"""A fault-injecting reverse proxy (aiohttp) to put in front of the real registry.

    with FaultProxy(registry.url) as proxy:
        proxy.cut_blob(after_bytes=1000)          # next blob GET: reset after 1000 body bytes
        ... client talks to proxy.url ...
        proxy.requests                            # what happened

Runs in a background thread with its own event loop, so it serves in-process async tests (any
loop) and subprocess CLI tests alike. Forwards method, path, query, headers (minus hop-by-hop
and Host) and bodies in both directions (streamed), does not follow redirects, rewrites
``Location`` headers that point at the upstream to point at the proxy.

Fault rules fire on matching requests, each a bounded number of ``times`` (``None`` = every
time), first-added first. Blob rules match ``GET /v2/<name>/blobs/<digest>`` (optionally only a
given digest). Offsets for :meth:`corrupt_blob` are blob offsets (a 206 body starting at
Content-Range start S has blob offset S for its first byte); ``after_bytes`` for cut/stall
counts body bytes of that one response.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import ThreadedServer

__all__ = ["FaultProxy", "BLOB_PATH"]

BLOB_PATH = re.compile(
    r"^/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+)$")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "host"}
CHUNK = 64 * 1024
MAX_STALL = 120.0  # seconds; stall/delay rules are clamped to this


@dataclass
class _Rule:
    kind: str
    times: int | None  # remaining; None = unlimited
    params: dict = field(default_factory=dict)
    path_re: re.Pattern | None = None
    methods: tuple[str, ...] | None = None
    digest: str | None = None
    fired: int = 0

    def matches(self, method: str, path: str, has_range: bool) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.path_re is not None and not self.path_re.search(path):
            return False
        if self.kind in ("cut", "corrupt", "stall", "bad_content_range", "ignore_range"):
            m = BLOB_PATH.match(path)
            if m is None or method != "GET":
                return False
            if self.digest and m.group("digest") != self.digest:
                return False
        if self.kind in ("bad_content_range", "ignore_range") and not has_range:
            return False
        return True


class FaultProxy:
    def __init__(self, upstream_url: str, ssl_context: Any = None) -> None:
        """``ssl_context``: the proxy itself speaks HTTPS (a TLS registry's front)."""
        self.upstream_url = upstream_url.rstrip("/")
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._log: list[dict] = []
        self._session = None
        self._server = ThreadedServer(self._make_app, name="fault-proxy",
                                      ssl_context=ssl_context)
        self._limiter: dict | None = None
        self.stalls_begun = 0  # stall rules that have reached their pause (all bytes sent)

    # -- lifecycle / addresses -------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int | None:
        return self._server.port

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def url(self) -> str:
        return self._server.url

    # -- request log ----------------------------------------------------------------------------
    @property
    def requests(self) -> list[dict]:
        """Copies of log entries: method, path, query, range, status, bytes_sent, fault."""
        with self._lock:
            return [dict(e) for e in self._log]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def blob_requests(self, digest: str | None = None) -> list[dict]:
        out = []
        for e in self.requests:
            m = BLOB_PATH.match(e["path"])
            if m and e["method"] == "GET" and (digest is None or m.group("digest") == digest):
                out.append(e)
        return out

    # -- fault rules ----------------------------------------------------------------------------
    def _add(self, rule: _Rule) -> _Rule:
        if rule.times is not None and rule.times < 0:
            raise ValueError("times must be >= 0 or None")
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        self.clear_rules()
        self.clear_log()

    def pending(self) -> list[tuple[str, int | None]]:
        """(kind, remaining) of rules that can still fire."""
        with self._lock:
            return [(r.kind, r.times) for r in self._rules if r.times is None or r.times > 0]

    def cut_blob(self, after_bytes: int, times: int | None = 1, digest: str | None = None):
        """Send status+headers of a blob GET, then abort the connection after N body bytes
        (a shorter body is sent complete; the rule still counts as fired)."""
        return self._add(_Rule("cut", times, {"after": after_bytes}, digest=digest))

    def corrupt_blob(self, offset: int, times: int | None = 1, digest: str | None = None):
        """Flip (xor 0xff) the byte at blob offset ``offset`` in a blob GET body."""
        return self._add(_Rule("corrupt", times, {"offset": offset}, digest=digest))

    def ignore_range(self, times: int | None = None, digest: str | None = None):
        """Drop the Range header of blob GETs so the upstream answers 200 with the full body."""
        return self._add(_Rule("ignore_range", times, digest=digest))

    def bad_content_range(self, times: int | None = 1, digest: str | None = None, shift: int = 1):
        """Answer a ranged blob GET with 206 and the right body but a Content-Range whose
        start (and end) are shifted by ``shift``."""
        return self._add(_Rule("bad_content_range", times, {"shift": shift}, digest=digest))

    def stall_blob(self, after_bytes: int, seconds: float, times: int | None = 1,
                   digest: str | None = None):
        """Send N body bytes, then pause ``seconds`` (clamped to 120) before continuing."""
        return self._add(_Rule("stall", times, {"after": after_bytes,
                                                "seconds": min(seconds, MAX_STALL)},
                               digest=digest))

    def status(self, code: int, path_regex: str = r"", times: int | None = 1,
               headers: dict | None = None, method: str | None = None, body: bytes | None = None,
               skip: int = 0):
        """Answer requests whose path matches ``path_regex`` (re.search) with ``code`` instead
        of forwarding them (e.g. 500, 503, 429 with ``headers={"Retry-After": "1"}``), after
        letting the first ``skip`` of them through."""
        return self._add(_Rule("status", times,
                               {"code": code, "headers": dict(headers or {}), "body": body,
                                "skip": skip},
                               path_re=re.compile(path_regex),
                               methods=(method.upper(),) if method else None))

    def drop_header(self, name: str, path_regex: str = r"", times: int | None = None,
                    method: str | None = None):
        """Leave the response header ``name`` out of matching answers (a registry or
        proxy that doesn't send it)."""
        return self._add(_Rule("drop_header", times, {"name": name.lower()},
                               path_re=re.compile(path_regex),
                               methods=(method.upper(),) if method else None))

    def rate_limit(self, limit: int, window: float, path_regex: str = r"/manifests/") -> None:
        """Act like Docker Hub's pull limit on matching paths: a bucket of ``limit`` GETs
        that refills at ``limit / window`` per second; HEADs are free. Every matching
        answer carries ``RateLimit-Limit`` / ``RateLimit-Remaining`` (``N;w=window``); a
        GET with the bucket empty gets 429 (counted in :attr:`rate_limited`)."""
        with self._lock:
            self._limiter = {"limit": limit, "window": window, "re": re.compile(path_regex),
                             "tokens": float(limit), "at": time.monotonic()}
            self.rate_limited = 0

    def _rate_headers(self, method: str, path: str) -> tuple[dict[str, str], bool]:
        """(headers to add, refuse with 429) for one request under :meth:`rate_limit`."""
        with self._lock:
            lim = self._limiter
            if lim is None or not lim["re"].search(path):
                return {}, False
            now = time.monotonic()
            lim["tokens"] = min(lim["limit"], lim["tokens"] +
                                (now - lim["at"]) * lim["limit"] / lim["window"])
            lim["at"] = now
            refuse = False
            if method == "GET":
                if lim["tokens"] < 1:
                    refuse = True
                    self.rate_limited += 1
                else:
                    lim["tokens"] -= 1
            w = int(lim["window"])
            return {"RateLimit-Limit": f"{lim['limit']};w={w}",
                    "RateLimit-Remaining": f"{int(lim['tokens'])};w={w}"}, refuse

    def delay(self, seconds: float, path_regex: str = r"", times: int | None = 1,
              method: str | None = None):
        """Wait ``seconds`` (clamped to 120) before forwarding matching requests."""
        return self._add(_Rule("delay", times, {"seconds": min(seconds, MAX_STALL)},
                               path_re=re.compile(path_regex),
                               methods=(method.upper(),) if method else None))

    def _take(self, kinds: tuple[str, ...], method: str, path: str,
              has_range: bool) -> _Rule | None:
        with self._lock:
            for r in self._rules:
                if r.kind in kinds and r.matches(method, path, has_range):
                    if r.params.get("skip"):
                        r.params["skip"] -= 1
                        continue
                    if r.times is not None:
                        r.times -= 1
                    r.fired += 1
                    return r
        return None

    # -- server ---------------------------------------------------------------------------------
    async def _make_app(self):
        import aiohttp
        from aiohttp import web

        async def on_startup(app):
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=60),
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )

        async def on_cleanup(app):
            if self._session is not None:
                await self._session.close()

        app = web.Application(client_max_size=0)
        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request):
        from aiohttp import web
        import aiohttp

        method, path = request.method, request.path
        rng = request.headers.get("Range")
        entry = {"method": method, "path": path, "query": request.query_string, "range": rng,
                 "status": None, "bytes_sent": 0, "fault": None}
        with self._lock:
            self._log.append(entry)

        def note(**kw):
            with self._lock:
                entry.update(kw)

        limit_headers, refuse = self._rate_headers(method, path)
        if refuse:
            note(status=429, fault="rate_limit")
            return web.Response(status=429, body=json.dumps({"errors": [{
                "code": "TOOMANYREQUESTS", "message": "rate limit (FaultProxy)"}]}).encode(),
                headers={"Content-Type": "application/json", "Retry-After": "1",
                         **limit_headers})
        rule = self._take(("status",), method, path, rng is not None)
        if rule is not None:
            note(status=rule.params["code"], fault="status")
            body = rule.params["body"]
            if body is None:
                body = json.dumps({"errors": [{"code": "UNKNOWN",
                                               "message": "injected by FaultProxy"}]}).encode()
            return web.Response(status=rule.params["code"], body=body,
                                headers={"Content-Type": "application/json",
                                         **rule.params["headers"]})
        rule = self._take(("delay",), method, path, rng is not None)
        if rule is not None:
            note(fault="delay")
            await asyncio.sleep(rule.params["seconds"])

        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        faults = []
        if rng is not None and self._take(("ignore_range",), method, path, True):
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
            faults.append("ignore_range")
        body_rules = {}
        for kind in ("cut", "corrupt", "stall", "bad_content_range"):
            r = self._take((kind,), method, path, rng is not None and "ignore_range" not in faults)
            if r is not None:
                body_rules[kind] = r
                faults.append(kind)
        if faults:
            note(fault=",".join(faults))

        data = request.content if request.body_exists else None
        try:
            upstream = await self._session.request(
                method, self.upstream_url + request.path_qs, headers=headers, data=data,
                allow_redirects=False)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            note(status=502)
            return web.Response(status=502, text=f"FaultProxy upstream error: {e!r}")

        dropped = self._take(("drop_header",), method, path, False)
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():  # .items() keeps repeated headers
                if k.lower() in HOP_BY_HOP:
                    continue
                if dropped is not None and k.lower() == dropped.params["name"]:
                    continue
                if k.lower() == "location" and v.startswith(self.upstream_url):
                    v = self.url + v[len(self.upstream_url):]
                resp.headers.add(k, v)
            for k, v in limit_headers.items():
                resp.headers[k] = v
            start = 0
            cr = upstream.headers.get("Content-Range")
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", cr or "")
            if m:
                start = int(m.group(1))
                if "bad_content_range" in body_rules and upstream.status == 206:
                    s = body_rules["bad_content_range"].params["shift"]
                    a, b = int(m.group(1)) + s, int(m.group(2)) + s
                    if a < 0:
                        a, b = a + 2 * abs(s), b + 2 * abs(s)
                    resp.headers["Content-Range"] = f"bytes {a}-{b}/{m.group(3)}"
            note(status=upstream.status)
            await resp.prepare(request)
            if method == "HEAD":
                await resp.write_eof()
                return resp

            sent = 0
            cut = body_rules.get("cut")
            stall = body_rules.get("stall")
            corrupt = body_rules.get("corrupt")
            stalled = False
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    if corrupt is not None:
                        rel = corrupt.params["offset"] - start - sent
                        if 0 <= rel < len(chunk):
                            chunk = chunk[:rel] + bytes([chunk[rel] ^ 0xFF]) + chunk[rel + 1:]
                    if (stall is not None and not stalled
                            and sent + len(chunk) >= stall.params["after"]):
                        k = stall.params["after"] - sent
                        await resp.write(chunk[:k])
                        sent += k
                        note(bytes_sent=sent)
                        await self._flush(request)
                        with self._lock:
                            self.stalls_begun += 1
                        await asyncio.sleep(stall.params["seconds"])
                        stalled = True
                        chunk = chunk[k:]
                    if cut is not None and sent + len(chunk) >= cut.params["after"]:
                        k = cut.params["after"] - sent
                        if k:
                            await resp.write(chunk[:k])
                        sent += k
                        note(bytes_sent=sent)
                        await self._flush(request)
                        if request.transport is not None:
                            request.transport.abort()
                        return resp
                    if chunk:
                        await resp.write(chunk)
                        sent += len(chunk)
                        note(bytes_sent=sent)
                await resp.write_eof()
            except (ConnectionError, aiohttp.ClientError, asyncio.TimeoutError):
                # client went away or upstream broke: drop the connection
                if request.transport is not None:
                    request.transport.abort()
            return resp

    @staticmethod
    async def _flush(request, limit: float = 5.0) -> None:
        """Wait (bounded) until the transport's write buffer is empty."""
        t = request.transport
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while t is not None and not t.is_closing() and t.get_write_buffer_size() > 0 \
                and loop.time() < deadline:
            await asyncio.sleep(0.005)

    def __repr__(self) -> str:
        return f"<FaultProxy {self.url} -> {self.upstream_url}>"
