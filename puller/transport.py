"""How :class:`puller.client.RegistryClient` moves bytes: one small interface, two kinds.

The registry client owns everything HTTP *means* for a registry (auth challenges,
tokens, TLS per host, redirects, retries, error mapping). A transport only sends one
request and hands back the response:

- :class:`puller.aio.AiohttpTransport`: aiohttp with uvloop-friendly connection pools;
  the library's default, and the command line's wherever a proxy is configured.
- :class:`ThreadedTransport`: ``http.client`` in worker threads, with keep-alive
  connections from a :class:`ConnectionPool`. It costs nothing to import, so the
  command line pulls, pushes, copies and mirrors with it and never loads aiohttp (and
  asks "is my stored copy still current?" with one manifest ``HEAD`` before anything
  else).

Either way, blob bodies mostly bypass the transport: once the client has settled how to
reach a registry, worker threads receive them (:mod:`puller.threadfetch`) and send them
(:mod:`puller.threadpush`) over connections of their own.

A response has ``status``, case-insensitive ``headers``, ``content_length``,
``content`` (``await read(n)``, ``await readany()``) and ``release()``.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import ssl
import threading
from typing import Any, Callable, TypeVar
from urllib.parse import urljoin, urlsplit

from .errors import PullerError, RegistryError, TransportError

_T = TypeVar("_T")

__all__ = ["Transport", "ThreadedTransport", "ConnectionPool", "describe_network_error",
           "proxy_configured", "env_proxy", "ProxyError", "ssl_error_of", "tls_alert",
           "tls_refusal"]

# The variables docker's Go client reads (ALL_PROXY is curl's; Go ignores it, and so do we).
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")


def redirect_target(base: str, location: str) -> str | None:
    """The URL a redirect from ``base`` to ``location`` leads to, or None when it is not
    one puller follows (not http or https, or no host: ``file:///etc``, ``http:///x``)."""
    # An absolute Location stands on its own (urljoin would lend "http:///x" the base's
    # host); a relative one is resolved against the URL that was redirected.
    url = location if urlsplit(location).scheme else urljoin(base, location)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.geturl()  # the scheme in lower case


def unusable_redirect(host: str, location: str, what: str) -> PullerError:
    """The error for a redirect :func:`redirect_target` won't follow."""
    shown = " ".join(location.split())[:80]
    return RegistryError(f"{host} redirected to {shown!r}, which is not an HTTP(S) URL, "
                         f"while {what}", host=host)


def proxy_configured() -> bool:
    """A proxy is set in the environment: only the aiohttp transport honours one."""
    return any(os.environ.get(v) for v in _PROXY_VARS)


def _first_set(*names: str) -> tuple[str, str]:
    """The first of ``names`` set to something in the environment (Go's order: the
    upper-case name first), and its value; ``("", "")`` if none is."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return "", ""


class ProxyError(TransportError):
    """A proxy variable in the environment can't be used."""

    retryable = False


def env_proxy(url: str) -> str | None:
    """The proxy a request to ``url`` goes through, chosen from the environment the way
    docker's Go client chooses it: ``HTTPS_PROXY`` for https URLs, ``HTTP_PROXY`` for
    http ones (the lower-case names first), none for a host ``NO_PROXY`` names, and never
    one for this machine (localhost, 127.0.0.0/8, ::1). A value without a scheme means
    ``http://``. Raises :class:`ProxyError`, naming the variable, for a value that is
    not an ``http://HOST[:PORT]`` URL."""
    from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]

    from .tls import address_in, is_loopback_host, network_of

    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or is_loopback_host(host) or parts.scheme not in ("http", "https"):
        return None
    name, value = _first_set(f"{parts.scheme.upper()}_PROXY", f"{parts.scheme}_proxy")
    if not value:
        return None
    no_proxy = _first_set("NO_PROXY", "no_proxy")[1]
    netloc = parts.netloc.rpartition("@")[2]
    # (The standard library matches names and single addresses; Go also takes networks.)
    networks = [n for n in map(network_of, no_proxy.split(",")) if n is not None]
    if proxy_bypass_environment(netloc, {"no": no_proxy}) or address_in(host, networks):
        return None
    proxy = value if "://" in value else f"http://{value}"
    try:
        p = urlsplit(proxy)
        p.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        p = None
    if p is None or not p.hostname:
        raise ProxyError(f"{name}={value!r} is not a proxy URL (want http://HOST:PORT)")
    if p.scheme != "http":
        raise ProxyError(f"{name}={value!r}: only http:// proxies are supported, "
                         f"not {p.scheme}://")
    return proxy


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


# OpenSSL's reasons for an alert received from the server: it speaks TLS, and refused.
_ALERTS = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")
# The server answered the ClientHello with something that is not TLS (plain HTTP).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG")
# Alerts that mean "no client certificate, or not one I trust".
_CLIENT_CERT_ALERTS = ("SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                       "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_UNKNOWN_CA",
                       "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
                       "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE")
_OLD_TLS = ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")


def ssl_error_of(exc: BaseException) -> ssl.SSLError | None:
    """The :class:`ssl.SSLError` behind ``exc`` (itself, or what a transport wrapped)."""
    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo and len(seen) < 8:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        if isinstance(e, ssl.SSLError):
            return e
        seen.append(e)
        todo += [getattr(e, "certificate_error", None), getattr(e, "os_error", None),
                 e.__cause__, e.__context__]
    return None


def tls_alert(exc: BaseException) -> str | None:
    """The reason of a TLS alert the server sent (it speaks TLS and refused us), if
    that is what ``exc`` is; such a registry is not retried over plain HTTP."""
    err = ssl_error_of(exc)
    reason = getattr(err, "reason", None) or ""
    return reason if reason.startswith(_ALERTS) else None


def tls_refusal(exc: BaseException) -> ssl.SSLError | None:
    """The SSL error behind ``exc`` when it is a final TLS answer (a certificate that
    fails verification, an alert from the server, a server that does not speak TLS),
    not a connection cut in the middle; else None."""
    err = ssl_error_of(exc)
    if err is None:
        return None
    reason = err.reason or ""
    if isinstance(err, ssl.SSLCertVerificationError) or reason.startswith(_ALERTS) \
            or reason in _NOT_TLS or reason in _OLD_TLS:
        return err
    return None


def describe_network_error(exc: BaseException, host: str, what: str) -> PullerError:
    """A one-line :class:`TransportError` for a socket-level failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _certificate_error(host, what, exc.verify_message or "not trusted")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        if reason in _NOT_TLS:
            message = (f"{host} does not speak TLS while {what} (a plain-HTTP registry? "
                       f"allow plain HTTP to it with --insecure-registry {host})")
        elif reason in _CLIENT_CERT_ALERTS:
            message = (f"{host} refused the TLS connection ({reason}) while {what}: it wants "
                       f"a client certificate it trusts; put NAME.cert and NAME.key in "
                       f"/etc/docker/certs.d/{host}/ (or $DOCKER_CONFIG/certs.d/{host}/)")
        elif reason in _OLD_TLS:
            message = (f"TLS handshake with {host} failed while {what}: it offers no TLS "
                       f"version puller accepts (TLS 1.2 or later) ({reason})")
        elif reason.startswith(_ALERTS):  # any other refusal
            message = f"TLS handshake with {host} failed while {what}: {reason}"
        else:
            # Not a refusal: the connection ended without TLS's goodbye (a peer or a load
            # balancer closing it mid-transfer) or bytes went bad on the way. Like a
            # reset: retried, and a transfer resumes from what arrived.
            return TransportError(f"the TLS connection to {host} broke while {what} "
                                  f"({reason})")
        err = TransportError(message)
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
    if isinstance(exc, _InvalidLength):
        return TransportError(f"{host} sent {exc} while {what}")
    return TransportError(f"network error talking to {host} while {what}: "
                          f"{type(exc).__name__}")


def _certificate_error(host: str, what: str, reason: str) -> PullerError:
    lowered = reason.lower()
    if "hostname mismatch" in lowered or "ip address mismatch" in lowered \
            or "expired" in lowered or "not yet valid" in lowered:
        # Trusting another CA can't help with these.
        fix = f"allow it with --insecure-registry {host}"
    else:
        fix = (f"trust its CA with --ca-cert FILE or /etc/docker/certs.d/{host}/ca.crt, "
               f"or allow it with --insecure-registry {host}")
    err = TransportError(
        f"TLS certificate of {host} could not be verified ({reason}) while {what}; {fix}")
    err.retryable = False
    return err


class ConnectionPool:
    """Keep-alive ``http.client`` connections by (scheme, host:port), shared by threads.

    ``add_hosts`` names are dialled at their given address while TLS (SNI, certificate
    checks) still uses the name. A connection given back has had its response read to
    the end; ``timeout`` is restored on it for the next user."""

    def __init__(self, *, add_hosts: dict[str, str] | None = None, timeout: float = 30.0,
                 max_idle: int = 16) -> None:
        self._hosts = dict(add_hosts or {})
        self._timeout = timeout
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._closed = False

    def new(self, parts: Any, ssl_context: ssl.SSLContext | None) -> http.client.HTTPConnection:
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self._hosts.get(host, host)
        if parts.scheme == "https":
            if address != host:
                return _NamedHTTPSConnection(host, address, port, self._timeout, ssl_context)
            return http.client.HTTPSConnection(host, port, timeout=self._timeout,
                                               context=ssl_context)
        if address != host:
            return _NamedHTTPConnection(host, address, port, self._timeout)
        return http.client.HTTPConnection(host, port, timeout=self._timeout)

    def take(self, parts: Any, ssl_context: ssl.SSLContext | None
             ) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection to ``parts``' origin (True) or a new one (False)."""
        with self._lock:
            idle = self._idle.get((parts.scheme, parts.netloc))
            if idle:
                return idle.pop(), True
        return self.new(parts, ssl_context), False

    def open(self, parts: Any, ssl_context: ssl.SSLContext | None,
             start: Callable[[http.client.HTTPConnection], _T], *, reuse: bool = True,
             retry: Callable[[], bool] = lambda: True
             ) -> tuple[http.client.HTTPConnection, _T]:
        """A connection to ``parts``' origin with ``start(conn)`` (send a request, maybe
        read its answer) done on it: an idle one when there is one and ``reuse``, else a
        new one. A server may have closed an idle connection in the meantime, so when
        ``start`` fails on one, it runs once more on a new connection (unless ``retry()``
        says no). The error of the last try is raised; a connection that failed is
        closed."""
        conn, reused = self.take(parts, ssl_context) if reuse else \
            (self.new(parts, ssl_context), False)
        while True:
            try:
                answer = start(conn)
                if isinstance(answer, http.client.HTTPResponse):
                    _check_length(answer)
                return conn, answer
            except (OSError, http.client.HTTPException):
                conn.close()
                if not reused or not retry():
                    raise
            except BaseException:
                conn.close()
                raise
            conn, reused = self.new(parts, ssl_context), False

    def give(self, parts: Any, conn: http.client.HTTPConnection) -> None:
        # settimeout gives up the GIL for its syscall, and the event loop thread (which
        # hands back connections of bodiless responses) then waits behind busy workers
        # to get it back: only call it when the timeout really changed.
        if conn.sock is not None and conn.sock.gettimeout() != self._timeout:
            conn.sock.settimeout(self._timeout)
        with self._lock:
            idle = self._idle.setdefault((parts.scheme, parts.netloc), [])
            if not self._closed and len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()


class _Body:
    """``response.content`` for the threaded transport."""

    def __init__(self, resp: http.client.HTTPResponse, holder: dict[str, Any]) -> None:
        self._resp = resp
        self._holder = holder

    async def read(self, n: int = -1) -> bytes:
        return await _abortable(self._holder, self._resp.read, None if n < 0 else n)

    async def readany(self) -> bytes:
        return await _abortable(self._holder, self._resp.read1, 1 << 20)


async def _abortable(holder: dict[str, Any], fn: Any, *args: Any) -> Any:
    """Run blocking socket work in a thread; if we are cancelled meanwhile, shut the
    socket down so the thread returns now instead of at its timeout (Ctrl-C must not
    wait for a stalled registry)."""
    return await _abort_on_cancel(holder, asyncio.to_thread(fn, *args))


def _pieces(data: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """An async iterator of bytes as a plain iterator, for a worker thread."""
    it = data.__aiter__()
    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(it.__anext__(), loop).result()
        except StopAsyncIteration:
            return


async def _abort_on_cancel(holder: dict[str, Any], work: Any) -> Any:
    try:
        return await work
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


def _check_length(resp: http.client.HTTPResponse) -> None:
    """A Content-Length that is not a count of bytes (``-5``, ``12abc``) is an error now:
    ``http.client`` would read such a body until the server hangs up, which a server
    keeping the connection open never does (the read then waits out the stall timeout)."""
    raw = resp.getheader("Content-Length")
    if raw is not None and not resp.chunked and not raw.strip().isdigit():
        resp.close()
        raise _InvalidLength(f"an invalid Content-Length ({raw[:20]!r})")


class _InvalidLength(http.client.HTTPException):
    pass


class _Response:
    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
                 method: str, give_back: Any, holder: dict[str, Any]) -> None:
        self._resp = resp
        self._conn = conn
        self._give_back = give_back
        self.status = resp.status
        self.headers = resp.headers  # email.message.Message: case-insensitive get/in
        length = resp.getheader("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None
        if method == "HEAD":
            self.content_length = None
        self.content = _Body(resp, holder)

    def release(self) -> None:
        # A body read to its end leaves a connection that can carry the next request.
        # One with nothing to read (a HEAD, a 201 or 404 without a body) is ended here:
        # that reads nothing from the socket.
        if not self._resp.isclosed() and self._resp.length == 0:
            self._resp.read()
        reusable = self._resp.isclosed() and not self._resp.will_close
        self._resp.close()
        if reusable:
            self._give_back(self._conn)
        else:
            self._conn.close()


class ThreadedTransport(Transport):
    """``http.client`` in worker threads: requests run concurrently without blocking
    the loop, connections are kept alive and reused. Costs nothing to import, so a
    command-line pull needs no aiohttp at all (blob bodies go through
    :mod:`puller.threadfetch`). No proxies: use it only when none is configured."""

    errors = (OSError, asyncio.TimeoutError, http.client.HTTPException)

    def __init__(self, *, timeout: float = 30.0, add_hosts: dict[str, str] | None = None,
                 user_agent: str = "puller") -> None:
        self._pool = ConnectionPool(add_hosts=add_hosts, timeout=timeout)
        self._user_agent = user_agent
        self._streams: Any = None  # threads that send streamed bodies

    async def request(self, method: str, url: str, *, headers: dict[str, str],
                      ssl_context: ssl.SSLContext | None, data: Any = None) -> Any:
        holder: dict[str, Any] = {}
        if hasattr(data, "__aiter__"):
            # A streamed body: the sending thread pulls each piece from the event loop.
            # It gets a thread of its own, so the reads that produce the pieces (which
            # use the loop's default threads) can never wait behind it.
            from concurrent.futures import ThreadPoolExecutor

            loop = asyncio.get_running_loop()
            if self._streams is None:
                self._streams = ThreadPoolExecutor(max_workers=64,
                                                   thread_name_prefix="puller-stream")
            body = _pieces(data, loop)
            sending = loop.run_in_executor(self._streams, self._send, method, url, headers,
                                           ssl_context, body, holder)
            return await _abort_on_cancel(holder, sending)
        return await _abortable(holder, self._send, method, url, headers, ssl_context, data,
                                holder)

    async def close(self) -> None:
        self._pool.close()
        if self._streams is not None:
            streams, self._streams = self._streams, None
            await asyncio.to_thread(streams.shutdown, wait=True)

    def _send(self, method: str, url: str, headers: dict[str, str],
              ssl_context: ssl.SSLContext | None, data: Any, holder: dict[str, Any]) -> Any:
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
        def start(conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
            holder["conn"] = conn  # lets a cancelled caller abort a blocked read
            conn.request(method, path, body=body, headers=hdrs)
            return conn.getresponse()

        # A stream can't be sent twice: no idle connection that may have gone stale.
        conn, resp = self._pool.open(
            parts, ssl_context, start, reuse=data is None or isinstance(data, (bytes, dict)),
            retry=lambda: not holder.get("aborted"))
        return _Response(resp, conn, method, lambda c: self._pool.give(parts, c), holder)


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


class _NamedHTTPConnection(http.client.HTTPConnection):
    """Connects to ``address`` but sends ``Host: name``, as docker does for --add-host."""

    def __init__(self, name: str, address: str, port: int, timeout: float) -> None:
        super().__init__(name, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
