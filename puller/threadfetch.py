"""Blob bodies received in a worker thread: the fast lane of the scheduler.

On a 2-core machine most of a large pull's CPU goes to moving bytes: receiving,
hashing, writing. Receiving through the event loop costs a Python round for every
socket read (at most 256 KiB each); a worker thread that reads 1 MiB at a time into one
reused buffer, hashes it and writes it (hashlib and os.write release the GIL) costs a
fraction of that, and several such threads use both cores. So once the registry client
has settled how to reach a registry (scheme, auth), each blob body is fetched this way:
one thread per blob in flight, the event loop only scheduling and reporting.

Only the plain case is handled here: ``200``, or ``206`` with exactly the asked range,
after following redirects (the Authorization header never leaves the registry's own
origin). Anything else (an auth challenge, an error status) raises :class:`NotPlain`
and the scheduler asks again through the registry client, which knows what to do.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import threading
from functools import partial
from typing import Any, Callable
from urllib.parse import urlsplit

from .client import BlobRequest
from .errors import SizeMismatch
from .fsutil import thread_buffer
from .store import BlobWriter
from .transport import ConnectionPool, describe_network_error, redirect_target

__all__ = ["NotPlain", "Cancelled", "Handle", "fetch_into", "fetch_range", "in_thread",
           "open_get", "read_into", "done_with", "discard", "settle"]

_REPORT_EVERY = 256 * 1024  # bytes between progress reports to the event loop
# Over TLS a read returns one record, 16 KiB at most: a read gathers this much (or the
# rest of the body) before its caller hashes and writes it, so their per-piece costs
# are paid per 256 KiB, not per record.
_GATHER = 256 * 1024
_FAILED = "_puller_failed"  # a response's error, raised after the bytes that came before it
_MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class NotPlain(Exception):
    """The registry answered something other than the bytes. ``status`` and ``headers``
    say what (None for a protocol oddity); the scheduler maps an error status, and hands
    a 401 (a challenge) or an oddity to the full client."""

    def __init__(self, reason: str, status: int | None = None,
                 headers: Any = None, body: bytes = b"") -> None:
        super().__init__(reason)
        self.status = status
        self.headers = headers
        self.body = body  # the start of an error body, where one was read
        self.side: str | None = None  # in a copy, "source" when the source answered it


class Cancelled(Exception):
    """The download was cancelled while its thread was receiving."""


class Handle:
    """Lets the event loop stop a thread that is blocked in a socket read (or write).
    A thread that talks to two servers at once (a copy) attaches both sockets, each
    in its own slot."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._socks: dict[int, socket.socket] = {}

    def attach(self, sock: socket.socket | None, slot: int = 0) -> None:
        with self._lock:
            if sock is None:
                self._socks.pop(slot, None)
                return
            self._socks[slot] = sock
            if self.cancelled.is_set():
                _shutdown(sock)

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            for sock in self._socks.values():
                _shutdown(sock)


async def in_thread(executor: Any, fn: Callable[[], Any], handle: Handle) -> Any:
    """Run ``fn`` in ``executor`` and return its result. If we are cancelled meanwhile,
    ``handle`` is cancelled (the thread's sockets are shut down) and we wait until the
    thread has stopped before re-raising, so nothing it uses is closed under it."""
    working = asyncio.get_running_loop().run_in_executor(executor, fn)
    try:
        return await asyncio.shield(working)
    except asyncio.CancelledError:
        handle.cancel()
        await settle(working)  # its error is the cancellation we asked for
        raise


async def settle(aw: Any) -> bool:
    """Wait until ``aw`` has ended, even through cancellation; its outcome is dropped
    (marked retrieved). True when we were cancelled meanwhile (the caller re-raises)."""
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            cancelled = True
    if not fut.cancelled():
        fut.exception()
    return cancelled


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def read_into(resp: http.client.HTTPResponse, view: memoryview, remaining: int | None, *,
              handle: Handle, host: str, what: str) -> int:
    """One piece of a response body, read into ``view``: what has arrived, up to
    ``len(view)`` and, for a body of known length, up to its ``remaining`` bytes (None:
    chunked). 0 only at the end of the body; a known-length body that ends early raises.
    Straight from the socket where the length is known, in as many reads as it takes to
    gather 256 KiB or the rest of the body (each read waits for the network at most the
    socket's timeout, so a stall is still noticed); chunked bodies go through
    http.client. A failure after some bytes of a piece arrived returns those first (a
    resume then starts after them) and is raised by the next call. Network failures
    become one-line errors; a cancelled ``handle`` raises :class:`Cancelled`."""
    if remaining == 0:
        return 0
    try:
        failed = getattr(resp, _FAILED, None)
        if failed is not None:
            raise failed
        if remaining is None:
            chunk = resp.read1(len(view))
            n = len(chunk)
            view[:n] = chunk
        else:
            fp: Any = resp.fp
            want = min(len(view), remaining)
            goal = min(want, _GATHER)
            n = 0
            while n < goal:
                try:
                    got = fp.readinto1(view[n:want])
                    if not got:
                        raise http.client.IncompleteRead(b"", remaining - n)
                except (OSError, http.client.HTTPException) as exc:
                    if not n:
                        raise
                    setattr(resp, _FAILED, exc)  # for the next call, after these bytes
                    break
                n += got
    except (OSError, http.client.HTTPException) as exc:
        if handle.cancelled.is_set():
            raise Cancelled() from exc
        raise describe_network_error(exc, host, what) from exc
    if handle.cancelled.is_set():
        raise Cancelled()
    return n


def fetch_into(req: BlobRequest, writer: BlobWriter, *, handle: Handle,
               progress: Callable[[int], None], pool: ConnectionPool) -> int:
    """Receive the rest of the blob into ``writer`` (from ``writer.offset``), hashing as
    it goes. Returns the bytes received; the caller commits. Runs in a worker thread."""
    resp, conn, target, start = open_get(req, writer.offset, writer.size, handle=handle,
                                         pool=pool, what=f"fetching blob {writer.digest}")
    keep = False
    try:
        if start != writer.offset:
            writer.restart()  # the server ignored Range: take it all again
        got = _receive(resp, conn, writer, handle, progress, urlsplit(req.url).netloc,
                       req.timeout)
        keep = not resp.will_close and not resp.chunked
        return got
    finally:
        done_with(resp, conn, target, keep, handle, pool)


def open_get(req: BlobRequest, offset: int, size: int, *, handle: Handle,
             pool: ConnectionPool, what: str, end: int | None = None
             ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection, Any, int]:
    """``GET`` a blob from ``offset`` (of ``size``; up to byte ``end`` when given),
    following redirects. Returns the response (headers read, body not), its connection,
    the URL parts it came from and where its body starts: ``offset``, or 0 when the
    server ignored ``Range``. The connection's socket is attached to ``handle``; the
    caller closes or gives it back."""
    last = size - 1 if end is None else end
    ranged = bool(offset) or end is not None
    url = req.url
    origin = urlsplit(req.url)
    for _ in range(_MAX_REDIRECTS + 1):
        headers = dict(req.headers)
        target = urlsplit(url)
        if (target.scheme, target.hostname, target.port) != \
                (origin.scheme, origin.hostname, origin.port):
            headers.pop("Authorization", None)  # a CDN or object store gets no credentials
        if ranged:
            headers["Range"] = f"bytes={offset}-" if end is None else f"bytes={offset}-{end}"
        if handle.cancelled.is_set():
            raise Cancelled()
        ssl_context = req.ssl_for(target.netloc) if target.scheme == "https" else None
        path = target.path + (f"?{target.query}" if target.query else "")
        try:
            conn, resp = pool.open(target, ssl_context,
                                   partial(_get, path=path, headers=headers, handle=handle))
        except (OSError, http.client.HTTPException) as exc:
            handle.attach(None)
            raise describe_network_error(exc, origin.netloc, what) from exc
        except BaseException:
            handle.attach(None)
            raise
        try:
            location = resp.getheader("Location")
            if resp.status in (301, 302, 303, 307, 308) and location:
                followed = redirect_target(url, location)
                if followed is None:  # the registry client says why
                    raise NotPlain("unusable redirect")
                url = followed
                handle.attach(None)
                discard(resp, conn)
                continue
            if resp.status == 206 and ranged:
                m = _CONTENT_RANGE.match(resp.getheader("Content-Range") or "")
                if not (m and int(m.group(1)) == offset and int(m.group(2)) == last
                        and m.group(3) in ("*", str(size))):
                    raise NotPlain("unusable Content-Range")
                return resp, conn, target, offset
            if resp.status == 200:
                return resp, conn, target, 0
            raise NotPlain(f"HTTP {resp.status}", resp.status, resp.headers)
        except BaseException:
            handle.attach(None)
            discard(resp, conn)
            raise
    raise NotPlain("too many redirects")


def discard(resp: http.client.HTTPResponse | None, conn: http.client.HTTPConnection) -> None:
    """Close a connection not to be reused, and its response if it has one: the
    response's file keeps the socket open (and the descriptor in use) until it is closed
    too."""
    if resp is not None:
        try:
            resp.close()
        except OSError:
            pass
    conn.close()


def _get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str],
         handle: Handle) -> http.client.HTTPResponse:
    if conn.sock is None:
        conn.connect()
    handle.attach(conn.sock)
    conn.request("GET", path, headers=headers)
    return conn.getresponse()


def fetch_range(req: BlobRequest, start: int, end: int, size: int, *,
                put: Callable[[memoryview], None], handle: Handle,
                progress: Callable[[int], None], pool: ConnectionPool, what: str) -> int:
    """Receive bytes ``start``..``end`` (inclusive) of a blob of ``size`` and hand them
    to ``put`` piece by piece (one reused buffer: ``put`` must be done with a piece
    when it returns). Raises :class:`puller.client.RangeNotHonoured` unless the server
    answers with exactly that range. Runs in a worker thread; returns the bytes."""
    from .client import RangeNotHonoured

    host = urlsplit(req.url).netloc
    try:
        resp, conn, target, _ = open_get(req, start, size, handle=handle, pool=pool,
                                         what=what, end=end)
    except NotPlain as np:
        if np.status is None:  # a 206 for another range
            raise RangeNotHonoured(f"{host} answered range {start}-{end} with another "
                                   f"range while {what}") from None
        raise
    keep = False
    try:
        if resp.status != 206 or resp.chunked or resp.length != end - start + 1:
            raise RangeNotHonoured(f"{host} did not answer range {start}-{end} with "
                                   f"exactly that range while {what}")
        if conn.sock is not None:
            conn.sock.settimeout(req.timeout)
        view = thread_buffer()
        remaining = end - start + 1
        got = reported = 0
        while remaining:
            n = read_into(resp, view, remaining, handle=handle, host=host, what=what)
            put(view[:n])
            remaining -= n
            got += n
            if got - reported >= _REPORT_EVERY:
                reported = got
                progress(got)
        keep = not resp.will_close
        progress(got)
        return got
    finally:
        done_with(resp, conn, target, keep, handle, pool)


def done_with(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
               target: Any, keep: bool, handle: Handle, pool: ConnectionPool) -> None:
    """Detach the socket from ``handle``; a body read to its end (``keep``) leaves a
    connection that goes back to the pool, anything else is closed."""
    handle.attach(None)
    if keep:
        resp.close()
        pool.give(target, conn)
    else:
        discard(resp, conn)


def _receive(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
             writer: BlobWriter, handle: Handle, progress: Callable[[int], None],
             host: str, stall_timeout: float) -> int:
    if conn.sock is not None:
        conn.sock.settimeout(stall_timeout)  # a read that waits this long has stalled
    begun = reported = writer.offset
    view = thread_buffer()
    what = f"fetching blob {writer.digest}"
    remaining = None if resp.chunked else resp.length
    while n := read_into(resp, view, remaining, handle=handle, host=host, what=what):
        if remaining is not None:
            remaining -= n
        writer.write(view[:n])  # refuses bytes beyond the descriptor's size
        if writer.offset - reported >= _REPORT_EVERY and writer.offset < writer.size:
            # Not one loop wake-up per recv, and none for the last bytes: the caller
            # reports completion itself.
            reported = writer.offset
            progress(reported)
    if remaining == 0 and writer.offset < writer.size:
        # The server sent the whole body it announced: its copy is shorter than the
        # descriptor, which no resume can fix.
        raise SizeMismatch(f"blob {writer.digest}: the registry sent {writer.offset} bytes, "
                           f"the manifest says {writer.size}")
    return writer.offset - begun
