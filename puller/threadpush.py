"""Blob uploads sent from a worker thread: the fast lane of :class:`puller.push.Transfer`.

The twin of :mod:`puller.threadfetch`. A copy between registries moves every byte
twice (in from the source, out to the target); through the event loop that is a
Python round for every socket read and every write. A worker thread that reads up to
1 MiB at a time into one reused buffer, hashes it and ``sendall``\\ s it (all three
release the GIL) costs a fraction of that, and several such threads use both cores.

So once the registry client has settled how to reach both registries (scheme, auth)
and started the upload (``POST``, where any auth challenge is answered), its bytes are
sent here: in one ``PUT ?digest=`` when the blob fits in one chunk, else in ``PATCH``
chunks and a closing ``PUT``. The bytes come from the store (a file) or straight from
the source registry (a ``GET`` whose body is forwarded as it arrives; nothing is
written to disk).

Failures are reported so the caller can do the right thing:

- :class:`NotPlain` for an answer that is not what the protocol promises (an auth
  challenge, an error status): the caller maps it, or refreshes its token and retries;
- :class:`Interrupted` when the connection broke mid-upload: it carries the upload's
  latest location and the bytes the registry acknowledged, so the caller can ask the
  registry where it stands and resume there.
"""

from __future__ import annotations

import hashlib
import http.client
import os
from typing import Any, Callable, Protocol
from urllib.parse import urlencode, urlsplit

from .client import BlobRequest, upload_range
from .digest import Digest
from .errors import DigestMismatch, PullerError, TransportError
from .fsutil import thread_buffer
from .threadfetch import Cancelled, Handle, NotPlain, discard, done_with, open_get, read_into
from .transport import ConnectionPool, describe_network_error, redirect_target, unusable_redirect

__all__ = ["Reader", "FileReader", "RegistryReader", "Interrupted", "send_blob"]

_PUT_SLOT = 1  # the handle slot of the upload's socket (the source GET is in slot 0)


class Reader(Protocol):
    def readinto(self, view: memoryview) -> int:
        """Fill up to ``len(view)`` bytes; 0 only at the end."""

    def close(self) -> None: ...


class FileReader:
    """A blob in the store, from ``offset``."""

    def __init__(self, path: str, offset: int) -> None:
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        self._pos = offset

    def readinto(self, view: memoryview) -> int:
        n = os.preadv(self._fd, [view], self._pos)
        self._pos += n
        return n

    def close(self) -> None:
        os.close(self._fd)


class RegistryReader:
    """A blob's body straight from its source registry, from ``offset``: a ``GET`` that
    follows redirects (credentials stay with the registry's own origin)."""

    def __init__(self, req: BlobRequest, offset: int, size: int, *, handle: Handle,
                 pool: ConnectionPool, what: str) -> None:
        self._pool = pool
        self._handle = handle
        self._host = urlsplit(req.url).netloc
        self._what = what
        self._resp, self._conn, self._target, start = open_get(
            req, offset, size, handle=handle, pool=pool, what=what)
        if self._conn.sock is not None:
            self._conn.sock.settimeout(req.timeout)
        self._skip = offset - start  # the source ignored Range: drop what we have sent
        self._left = None if self._resp.chunked else self._resp.length

    def readinto(self, view: memoryview) -> int:
        while True:
            n = read_into(self._resp, view, self._left, handle=self._handle, host=self._host,
                          what=self._what)
            if not n:
                return 0
            if self._left is not None:
                self._left -= n
            if self._skip:
                cut = min(self._skip, n)
                self._skip -= cut
                if cut == n:
                    continue
                view[:n - cut] = view[cut:n]
                n -= cut
            return n

    def close(self) -> None:
        # A body of known length read to its end keeps its connection.
        done_with(self._resp, self._conn, self._target,
                  self._left == 0 and not self._resp.will_close, self._handle, self._pool)


class Interrupted(TransportError):
    """The upload broke off mid-way: ask the registry how much it holds (see
    ``upload_location``) and go on from there."""

    upload_location: str | None = None


def send_blob(up: BlobRequest, source: Reader, *, digest: Digest, size: int, offset: int,
              chunk: int, handle: Handle, pool: ConnectionPool,
              progress: Callable[[int], None]) -> None:
    """Send bytes ``offset``..``size`` of ``digest`` from ``source`` to the upload at
    ``up.url`` and close it with ``PUT ?digest=``. Runs in a worker thread.

    From offset 0 the bytes are hashed on the way and must match ``digest``; a resumed
    upload is checked by the registry alone (it hashes everything it stored)."""
    hasher = hashlib.sha256() if offset == 0 and digest.algorithm == "sha256" else None
    view = thread_buffer()
    location = up.url
    where = [location]
    sent = offset
    what = f"uploading blob {digest}"
    if offset == 0 and size <= chunk:  # one request: PUT with the whole body
        _send(up, "PUT", _with_digest(location, digest), size, source, view, hasher, handle,
              pool, what, {"Content-Type": "application/octet-stream"},
              expect=(201, 204), start=0)
        _check(hasher, digest)
        return
    try:
        _send_chunks(up, source, view, hasher, handle, pool, what, digest=digest, size=size,
                     sent=sent, chunk=chunk, progress=progress, where=where)
    except (NotPlain, PullerError) as exc:
        exc.upload_location = where[0]  # type: ignore[union-attr]  # resume from here
        raise


def _send_chunks(up: BlobRequest, source: Reader, view: memoryview, hasher: Any,
                 handle: Handle, pool: ConnectionPool, what: str, *, digest: Digest,
                 size: int, sent: int, chunk: int, progress: Callable[[int], None],
                 where: list[str]) -> None:
    location = where[0]
    while sent < size:
        n = min(chunk, size - sent)
        resp_headers = _send(up, "PATCH", location, n, source, view, hasher, handle, pool,
                             what, {"Content-Type": "application/octet-stream",
                                    "Content-Range": f"{sent}-{sent + n - 1}"},
                             expect=(202,), start=sent)
        nxt = resp_headers.get("Location")
        if nxt:
            followed = redirect_target(location, nxt)
            if followed is None:
                raise unusable_redirect(urlsplit(up.url).netloc, nxt, what)
            location = where[0] = followed
        held = upload_range(resp_headers.get("Range"))
        if held is not None and held != sent + n:
            raise TransportError(f"{urlsplit(up.url).netloc} holds {held} bytes of {digest} "
                                 f"after a chunk ending at {sent + n}")
        sent += n
        progress(sent)
    _check(hasher, digest)
    _send(up, "PUT", _with_digest(location, digest), 0, None, view, None, handle, pool, what,
          {}, expect=(201, 204), start=sent)


def _with_digest(url: str, digest: Digest) -> str:
    return url + ("&" if "?" in url else "?") + urlencode([("digest", str(digest))])


def _check(hasher: Any, digest: Digest) -> None:
    if hasher is not None and hasher.hexdigest() != digest.hex:
        raise DigestMismatch(f"blob {digest} read from its source does not hash to its digest")


def _send(up: BlobRequest, method: str, url: str, length: int, source: Reader | None,
          view: memoryview, hasher: Any, handle: Handle, pool: ConnectionPool, what: str,
          extra: dict[str, str], *, expect: tuple[int, ...], start: int) -> Any:
    """One request carrying ``length`` bytes of ``source``; returns the response headers.
    The body is read (so the connection can be reused) and the status checked."""
    target = urlsplit(url)
    host = target.netloc
    if (target.scheme, target.netloc) != tuple(urlsplit(up.url)[:2]):
        raise PullerError(f"{urlsplit(up.url).netloc} wants the upload sent to another "
                          f"host ({host}); not supported")
    path = target.path + (f"?{target.query}" if target.query else "")
    headers = {**up.headers, **extra, "Content-Length": str(length)}
    ssl_context = up.ssl_for(host) if target.scheme == "https" else None
    if handle.cancelled.is_set():
        raise Cancelled()

    def begin(conn: http.client.HTTPConnection) -> None:
        if conn.sock is None:
            conn.connect()
        conn.sock.settimeout(up.timeout)  # type: ignore[union-attr]
        handle.attach(conn.sock, _PUT_SLOT)
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()

    try:
        conn, _ = pool.open(target, ssl_context, begin)
    except (OSError, http.client.HTTPException) as exc:
        handle.attach(None, _PUT_SLOT)
        raise _broken(exc, host, what) from exc
    except BaseException:
        handle.attach(None, _PUT_SLOT)
        raise
    keep = False
    moved = 0
    resp: http.client.HTTPResponse | None = None
    try:
        sending_failed: BaseException | None = None
        while moved < length:
            assert source is not None
            n = source.readinto(view[:min(len(view), length - moved)])
            if not n:
                raise TransportError(f"blob ended at the source after {start + moved} bytes "
                                     f"while {what}")
            piece = view[:n]
            if hasher is not None:
                hasher.update(piece)
            try:
                conn.sock.sendall(piece)  # type: ignore[union-attr]
            except OSError as exc:
                sending_failed = exc  # the server may have answered (and closed) early
                break
            moved += n
        try:
            resp = conn.getresponse()
            body = resp.read(64 << 10)
        except (OSError, http.client.HTTPException) as exc:
            if handle.cancelled.is_set():
                raise Cancelled() from exc
            raise _broken(sending_failed or exc, host, what) from exc
        if resp.status not in expect:
            raise NotPlain(f"HTTP {resp.status}", resp.status, resp.headers, body)
        if sending_failed is not None:
            raise _broken(sending_failed, host, what)
        keep = resp.isclosed() and not resp.will_close
        return resp.headers
    finally:
        handle.attach(None, _PUT_SLOT)
        if keep:
            pool.give(target, conn)
        else:
            discard(resp, conn)


def _broken(exc: BaseException, host: str, what: str) -> Interrupted:
    return Interrupted(str(describe_network_error(exc, host, what)))

