"""How :class:`puller.client.RegistryClient` moves bytes: one small interface, two kinds.

The registry client owns everything HTTP *means* for a registry (auth challenges,
tokens, TLS per host, redirects, retries, error mapping). A transport only sends one
request and hands back the response:

- :class:`puller.aio.AiohttpTransport`: aiohttp with uvloop-friendly connection pools;
  the engine's transport for every blob and manifest of a pull, push or mirror.
- :class:`StdlibTransport`: ``http.client``, one request at a time. It costs nothing to
  import, so the command line uses it to ask "is my stored copy still current?" (one
  manifest ``HEAD``) before it loads aiohttp at all: a warm re-pull then starts as fast
  as Python does.

A response has ``status``, case-insensitive ``headers``, ``content_length``,
``content`` (``await read(n)``, ``await readany()``) and ``release()``.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

from .errors import PullerError, TransportError

__all__ = ["Transport", "StdlibTransport", "ThreadedTransport", "describe_network_error"]


class Transport:
    """The interface. ``errors`` lists the exception types that mean "the network
    failed"; ``classify`` turns one into a :class:`PullerError`."""

    errors: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def request(self, method: str, url: str, *, headers: dict[str, str],
                      ssl_context: ssl.SSLContext | None, data: Any = None) -> Any:
        raise NotImplementedError

    def classify(self, exc: BaseException, host: str, what: str) -> PullerError:
        return describe_network_error(exc, host, what)

    def tls_mismatch(self, exc: BaseException) -> bool:
        """True when ``exc`` says the server does not speak TLS (or speaks it badly),
        so a loopback or insecure registry may be tried over plain HTTP."""
        return isinstance(exc, (ssl.SSLError, ConnectionResetError, http.client.BadStatusLine,
                                http.client.RemoteDisconnected))


def describe_network_error(exc: BaseException, host: str, what: str) -> PullerError:
    """A one-line :class:`TransportError` for a socket-level failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _certificate_error(host, what, exc.verify_message or "not trusted")
    if isinstance(exc, ssl.SSLError):
        err = TransportError(f"TLS handshake with {host} failed while {what}: "
                             f"{exc.reason or type(exc).__name__}")
        err.retryable = False
        return err
    if isinstance(exc, (asyncio.TimeoutError, socket.timeout, TimeoutError)):
        return TransportError(f"{host} stopped answering while {what} (timed out)")
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(f"cannot connect to {host} while {what}: connection refused")
    if isinstance(exc, socket.gaierror):
        return TransportError(f"cannot connect to {host} while {what}: "
                              f"{exc.strerror or 'name not resolved'}")
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError)):
        return TransportError(f"{host} closed the connection while {what}")
    if isinstance(exc, (http.client.IncompleteRead,)):
        return TransportError(f"connection to {host} broke while {what}")
    if isinstance(exc, OSError):
        return TransportError(f"cannot connect to {host} while {what}: "
                              f"{exc.strerror or type(exc).__name__}")
    return TransportError(f"network error talking to {host} while {what}: "
                          f"{type(exc).__name__}")


def _certificate_error(host: str, what: str, reason: str) -> PullerError:
    err = TransportError(
        f"TLS certificate of {host} could not be verified ({reason}) while {what}; "
        f"trust its CA with --ca-cert FILE or /etc/docker/certs.d/{host}/ca.crt, "
        f"or allow it with --insecure-registry {host}")
    err.retryable = False
    return err


class _Body:
    """``response.content`` for the stdlib transports."""

    def __init__(self, resp: http.client.HTTPResponse, threaded: bool,
                 holder: dict[str, Any]) -> None:
        self._resp = resp
        self._threaded = threaded
        self._holder = holder

    async def read(self, n: int = -1) -> bytes:
        if self._threaded:
            return await _abortable(self._holder, self._resp.read, None if n < 0 else n)
        return self._resp.read(None if n < 0 else n)

    async def readany(self) -> bytes:
        if self._threaded:
            return await _abortable(self._holder, self._resp.read1, 1 << 20)
        return self._resp.read1(1 << 20)


async def _abortable(holder: dict[str, Any], fn: Any, *args: Any) -> Any:
    """Run blocking socket work in a thread; if we are cancelled meanwhile, shut the
    socket down so the thread returns now instead of at its timeout (Ctrl-C must not
    wait for a stalled registry)."""
    try:
        return await asyncio.to_thread(fn, *args)
    except asyncio.CancelledError:
        holder["aborted"] = True
        conn = holder.get("conn")
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise


class _Response:
    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
                 method: str, threaded: bool, give_back: Any, holder: dict[str, Any]) -> None:
        self._resp = resp
        self._conn = conn
        self._give_back = give_back
        self.status = resp.status
        self.headers = resp.headers  # email.message.Message: case-insensitive get/in
        length = resp.getheader("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None
        if method == "HEAD":
            self.content_length = None
        self.content = _Body(resp, threaded, holder)

    def release(self) -> None:
        # A body read to its end leaves a connection that can carry the next request.
        reusable = self._resp.isclosed() and not self._resp.will_close
        self._resp.close()
        if reusable and self._give_back is not None:
            self._give_back(self._conn)
        else:
            self._conn.close()


class StdlibTransport(Transport):
    """``http.client``, one request at a time, blocking the loop while it works.

    Meant for a handful of small requests (manifest checks, tokens) where importing
    aiohttp would cost more than the requests themselves. Honours ``add_hosts``; no
    proxies, so it is used only when no proxy is configured.
    """

    errors = (OSError, asyncio.TimeoutError, http.client.HTTPException)
    _threaded = False

    def __init__(self, *, timeout: float = 30.0, add_hosts: dict[str, str] | None = None,
                 user_agent: str = "puller") -> None:
        self._timeout = timeout
        self._hosts = dict(add_hosts or {})
        self._user_agent = user_agent
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}

    async def request(self, method: str, url: str, *, headers: dict[str, str],
                      ssl_context: ssl.SSLContext | None, data: Any = None) -> Any:
        return self._send(method, url, headers, ssl_context, data, {})

    async def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()

    def _connection(self, parts: Any, ssl_context: ssl.SSLContext | None
                    ) -> tuple[http.client.HTTPConnection, bool]:
        key = (parts.scheme, parts.netloc)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self._hosts.get(host, host)
        if parts.scheme == "https":
            if address != host:  # certificate checks and SNI use the name, not the address
                return _NamedHTTPSConnection(host, address, port, self._timeout,
                                             ssl_context), False
            return http.client.HTTPSConnection(host, port, timeout=self._timeout,
                                               context=ssl_context), False
        return http.client.HTTPConnection(address, port, timeout=self._timeout), False

    def _send(self, method: str, url: str, headers: dict[str, str],
              ssl_context: ssl.SSLContext | None, data: Any, holder: dict[str, Any]) -> Any:
        if data is not None and not isinstance(data, (bytes, dict)):
            raise TypeError("the http.client transports send only byte or form bodies")
        parts = urlsplit(url)
        body = data
        hdrs = {"User-Agent": self._user_agent, "Accept-Encoding": "identity", **headers}
        if isinstance(data, dict):
            from urllib.parse import urlencode

            body = urlencode(data).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        key = (parts.scheme, parts.netloc)
        conn, reused = self._connection(parts, ssl_context)
        holder["conn"] = conn  # lets a cancelled caller abort a blocked read
        try:
            try:
                conn.request(method, path, body=body, headers=hdrs)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                if not reused or holder.get("aborted"):
                    raise
                conn.close()  # the server closed an idle connection: once more, fresh
                conn, _ = self._connection(_Fresh(parts), ssl_context)
                holder["conn"] = conn
                conn.request(method, path, body=body, headers=hdrs)
                resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise

        def give_back(c: http.client.HTTPConnection) -> None:
            with self._lock:
                self._idle.setdefault(key, []).append(c)

        return _Response(resp, conn, method, self._threaded, give_back, holder)


class _Fresh:
    """URL parts that never match an idle connection (for the one retry above)."""

    def __init__(self, parts: Any) -> None:
        self.scheme, self.netloc = parts.scheme, parts.netloc + "\0fresh"
        self.hostname, self.port = parts.hostname, parts.port


class ThreadedTransport(StdlibTransport):
    """``http.client`` in worker threads: requests run concurrently without blocking
    the loop, connections are kept alive and reused. Costs nothing to import, so a
    command-line pull needs no aiohttp at all (blob bodies go through
    :mod:`puller.threadfetch` either way)."""

    _threaded = True

    async def request(self, method: str, url: str, *, headers: dict[str, str],
                      ssl_context: ssl.SSLContext | None, data: Any = None) -> Any:
        holder: dict[str, Any] = {}
        return await _abortable(holder, self._send, method, url, headers, ssl_context, data,
                                holder)


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to ``address`` but speaks TLS (SNI, certificate name) as ``name``."""

    def __init__(self, name: str, address: str, port: int, timeout: float,
                 context: ssl.SSLContext | None) -> None:
        super().__init__(name, port, timeout=timeout, context=context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        ctx = self._context  # type: ignore[attr-defined]
        self.sock = ctx.wrap_socket(sock, server_hostname=self.host)
