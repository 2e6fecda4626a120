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
from typing import Any
from urllib.parse import urlsplit

from .errors import PullerError, TransportError

__all__ = ["Transport", "StdlibTransport", "describe_network_error"]


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
    """``response.content`` for the stdlib transport."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self._resp = resp

    async def read(self, n: int = -1) -> bytes:
        return self._resp.read(None if n < 0 else n)

    async def readany(self) -> bytes:
        return self._resp.read1(1 << 20)


class _Response:
    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
                 method: str) -> None:
        self._resp = resp
        self._conn = conn
        self.status = resp.status
        self.headers = resp.headers  # email.message.Message: case-insensitive get/in
        length = resp.getheader("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None
        if method == "HEAD":
            self.content_length = None
        self.content = _Body(resp)

    def release(self) -> None:
        self._resp.close()
        self._conn.close()


class StdlibTransport(Transport):
    """``http.client``, a new connection per request, blocking the loop while it works.

    Meant for a handful of small requests (manifest checks, tokens) where importing
    aiohttp would cost more than the requests themselves. Honours ``add_hosts``; no
    proxies, so the client uses it only when no proxy is configured.
    """

    errors = (OSError, asyncio.TimeoutError, http.client.HTTPException)

    def __init__(self, *, timeout: float = 30.0, add_hosts: dict[str, str] | None = None,
                 user_agent: str = "puller") -> None:
        self._timeout = timeout
        self._hosts = dict(add_hosts or {})
        self._user_agent = user_agent

    async def request(self, method: str, url: str, *, headers: dict[str, str],
                      ssl_context: ssl.SSLContext | None, data: Any = None) -> Any:
        if data is not None and not isinstance(data, (bytes, dict)):
            raise TypeError("StdlibTransport sends only byte or form bodies")
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self._hosts.get(host, host)
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(address, port, timeout=self._timeout,
                                               context=ssl_context)
            if address != host:  # certificate checks and SNI use the name, not the address
                conn = _NamedHTTPSConnection(host, address, port, self._timeout, ssl_context)
        else:
            conn = http.client.HTTPConnection(address, port, timeout=self._timeout)
        body = data
        hdrs = {"User-Agent": self._user_agent, "Accept-Encoding": "identity", **headers}
        if isinstance(data, dict):
            from urllib.parse import urlencode

            body = urlencode(data).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        return _Response(resp, conn, method)


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
