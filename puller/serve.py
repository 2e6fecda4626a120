"""``puller serve``: the store as a read-only registry (distribution API v2).

Repository paths
----------------
A stored reference is served under a path that names its registry only when that
registry isn't Docker Hub, so a docker daemon using the server as a ``registry-mirrors``
entry finds Hub images where it looks for them:

====================================  =======================================
stored reference                      served as
====================================  =======================================
``docker.io/library/alpine:latest``   ``library/alpine:latest``
``docker.io/user/app:1``              ``user/app:1``
``ghcr.io/org/app:1.2``               ``ghcr.io/org/app:1.2``
``127.0.0.1:5000/team/api:3``         ``127.0.0.1_5000/team/api:3``
====================================  =======================================

A registry's ``:`` becomes ``_`` (repository names can't hold ``:``, host names can't hold
``_``) and its name is lower-cased. A path whose first component has a ``.`` or ``_`` or
is ``localhost`` names a registry; any other path is Docker Hub's (Hub namespaces have
neither). IPv6 registries (``[::1]:5000``) aren't served.

What is served
--------------
``GET /v2/``; ``GET``/``HEAD`` of ``/v2/NAME/manifests/TAG-or-DIGEST`` (the stored bytes, the
stored media type as ``Content-Type``, and ``Docker-Content-Digest``); ``GET``/``HEAD``
of ``/v2/NAME/blobs/DIGEST`` with single ``Range`` requests; ``/v2/NAME/tags/list`` and
``/v2/_catalog`` (with ``n`` and ``last``). A digest is served only in repositories whose
images use it. Writes get ``405 UNSUPPORTED``.

Manifests are re-verified on every read (they are small); blobs are streamed as stored
(``puller fsck`` checks them, and every client verifies the digest).

A store whose ``index.json`` can't be read is refused at start-up. If it stops being
readable while serving, requests get ``500`` with a registry error (code ``UNKNOWN``) and
the cause is logged on one line, once, until the store reads again.

With ``--upstream`` a manifest missing from the store is pulled first (through
:class:`puller.api.Puller`, into the store, named like any pull) from the registry the
path names; a tag that is in the store is served as it is, never re-checked upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import stat
import sys
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import mediatypes
from .digest import Digest
from .errors import InvalidDigest, NotFound, PullerError
from .inventory import entries, open_blob
from .manifest import MAX_MANIFEST_SIZE, Descriptor, ImageIndex, ImageManifest, parse_manifest
from .reference import DEFAULT_REGISTRY, Reference
from .store import ContentStore

__all__ = ["served_path", "stored_name", "make_app", "serve_command"]

_CHUNK = 1 << 20
_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
_NAME_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|[-]+)"
                      r"[a-z0-9]+)*)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)


def served_path(registry: str, repository: str) -> str | None:
    """Where ``registry/repository`` is served (None: not servable)."""
    if registry == DEFAULT_REGISTRY:
        return repository
    if registry.startswith("["):
        return None
    return f"{registry.lower().replace(':', '_')}/{repository}"


def stored_name(path: str) -> tuple[str, str]:
    """The inverse of :func:`served_path`: (registry, repository) of a served path."""
    first, slash, rest = path.partition("/")
    if slash and ("." in first or "_" in first or first == "localhost"):
        host, _, port = first.partition("_")
        return (f"{host}:{port}" if port else host), rest
    return DEFAULT_REGISTRY, path


def _error(status: int, code: str, message: str, head: bool = False) -> web.Response:
    if head:
        return web.Response(status=status, headers=_API_VERSION)
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]})
    return web.Response(status=status, text=body, content_type="application/json",
                        headers=_API_VERSION)


@dataclass
class _Repo:
    tags: dict[str, Descriptor] = field(default_factory=dict)
    manifests: dict[Digest, str] = field(default_factory=dict)  # digest -> media type
    blobs: dict[Digest, int] = field(default_factory=dict)  # digest -> size
    children: set[Digest] = field(default_factory=set)  # listed by an index, maybe absent


class _View:
    """What the store serves, rebuilt when index.json changes."""

    def __init__(self, s: ContentStore) -> None:
        self.s = s
        self._key: tuple[int, int, int] | None = None
        self.repos: dict[str, _Repo] = {}

    def refresh(self) -> None:
        try:
            st = os.stat(self.s.root / "index.json")
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key is not None and key == self._key:
            return
        repos: dict[str, _Repo] = {}
        cache: dict[Digest, ImageManifest | ImageIndex | None] = {}
        for e in entries(self.s):
            ref = e.reference
            if ref is None:
                continue
            path = served_path(ref.registry, ref.repository)
            if path is None:
                continue
            repo = repos.setdefault(path, _Repo())
            if ref.tag is not None:
                repo.tags[ref.tag] = e.descriptor
            self._add(repo, e.descriptor, cache)
        self.repos = repos
        self._key = key

    def _parsed(self, d: Descriptor, cache: dict[Digest, Any]) -> Any:
        if d.digest not in cache:
            try:
                data = self.s.read(d.digest, max_size=MAX_MANIFEST_SIZE)
                cache[d.digest] = parse_manifest(data, d.media_type)
            except PullerError:
                cache[d.digest] = None
        return cache[d.digest]

    def _add(self, repo: _Repo, d: Descriptor, cache: dict[Digest, Any]) -> None:
        if not self.s.has(d.digest, d.size):
            return
        m = self._parsed(d, cache)
        if m is None:
            return
        repo.manifests[d.digest] = m.media_type
        if isinstance(m, ImageIndex):
            for child in m.manifests:
                repo.children.add(child.digest)
                if child.media_type in mediatypes.MANIFESTS:
                    self._add(repo, child, cache)
        else:
            for b in (m.config, *m.layers):
                if self.s.has(b.digest, b.size):
                    repo.blobs[b.digest] = b.size


class Registry:
    def __init__(self, s: ContentStore, *, puller: Any = None) -> None:
        self.s = s
        self.view = _View(s)
        self.puller = puller
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._store_error: str | None = None  # the last one logged

    async def _refresh(self, head: bool = False) -> web.Response | None:
        """Bring the view up to date; when the store can't be read, the error response
        to answer with (the error is logged once, on one line, until the store reads
        again)."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.view.refresh)
        except (PullerError, OSError) as exc:
            message = f"cannot read the store: {exc}"
            if message != self._store_error:
                self._store_error = message
                print(f"puller serve: {message}", file=sys.stderr, flush=True)
            # Clients learn that the store is broken, not where it lives.
            return _error(500, "UNKNOWN", "the store can't be read (see the server's log)",
                          head)
        self._store_error = None
        return None

    # -- handlers ------------------------------------------------------------------------

    async def base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers=_API_VERSION)

    async def catalog(self, request: web.Request) -> web.Response:
        if (failed := await self._refresh(request.method == "HEAD")) is not None:
            return failed
        names = sorted(self.view.repos)
        names, link = _page(request, names)
        headers = dict(_API_VERSION)
        if link:
            headers["Link"] = f'<{link}>; rel="next"'
        return web.json_response({"repositories": names}, headers=headers)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """``/v2/NAME/(manifests|blobs|tags)/...`` (NAME may hold slashes)."""
        tail = request.match_info["tail"]
        head = request.method == "HEAD"
        m = re.fullmatch(r"(.+)/(manifests|blobs)/([^/]+)", tail)
        if m is None:
            m2 = re.fullmatch(r"(.+)/tags/list", tail)
            if m2 is None or request.method not in ("GET", "HEAD"):
                if request.method not in ("GET", "HEAD"):
                    return _error(405, "UNSUPPORTED", "this registry is read-only")
                return _error(404, "NOT_FOUND", "no such endpoint", head)
            return await self.tags(request, m2.group(1))
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "this registry is read-only")
        name, kind, ident = m.groups()
        if not _NAME_RE.fullmatch(name):
            return _error(404, "NAME_INVALID", "invalid repository name", head)
        if kind == "manifests":
            return await self.manifest(request, name, ident, head)
        return await self.blob(request, name, ident, head)

    async def tags(self, request: web.Request, name: str) -> web.Response:
        if (failed := await self._refresh(request.method == "HEAD")) is not None:
            return failed
        repo = self.view.repos.get(name)
        if repo is None:
            return _error(404, "NAME_UNKNOWN", "repository name not known to registry",
                          request.method == "HEAD")
        tags, link = _page(request, sorted(repo.tags))
        headers = dict(_API_VERSION)
        if link:
            headers["Link"] = f'<{link}>; rel="next"'
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    async def manifest(self, request: web.Request, name: str, ident: str,
                       head: bool) -> web.Response:
        if (failed := await self._refresh(head)) is not None:
            return failed
        found = self._lookup_manifest(name, ident)
        upstream_error = None
        if found is None and self.puller is not None:
            upstream_error = await self._pull_through(name, ident)
            if (failed := await self._refresh(head)) is not None:
                return failed
            found = self._lookup_manifest(name, ident)
        if found is None and upstream_error is not None:
            # Not "unknown": the upstream could not be asked (down, refusing, timing
            # out), and a client must not take that for an image that doesn't exist.
            return _error(502, "UNKNOWN", f"pull-through failed: {upstream_error}", head)
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown", head)
        digest, media_type = found
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.s.read(digest, max_size=MAX_MANIFEST_SIZE))
        except PullerError as exc:
            return _error(500, "UNKNOWN", str(exc), head)
        headers = {**_API_VERSION, "Docker-Content-Digest": str(digest),
                   "Content-Type": media_type, "ETag": f'"{digest}"'}
        if head:
            headers["Content-Length"] = str(len(data))
            return web.Response(status=200, headers=headers)
        return web.Response(status=200, body=data, headers=headers)

    def _lookup_manifest(self, name: str, ident: str) -> tuple[Digest, str] | None:
        repo = self.view.repos.get(name)
        if repo is None:
            return None
        if ":" in ident:
            try:
                d = Digest.parse(ident)
            except InvalidDigest:
                return None
            mt = repo.manifests.get(d)
            return (d, mt) if mt is not None else None
        desc = repo.tags.get(ident)
        if desc is None or desc.digest not in repo.manifests:
            return None
        return desc.digest, repo.manifests[desc.digest]

    async def _pull_through(self, name: str, ident: str) -> PullerError | None:
        """Pull ``name``/``ident`` from the upstream into the store; the error when the
        upstream could not be asked (None when it was, even if it has no such image)."""
        registry, repository = stored_name(name)
        if ":" in ident:
            try:
                d = Digest.parse(ident)
            except InvalidDigest:
                return None
            text = f"{registry}/{repository}@{d}"
        elif _TAG_RE.fullmatch(ident):
            text = f"{registry}/{repository}:{ident}"
        else:
            return None
        try:
            ref = Reference.parse(text)
        except PullerError:
            return None
        fut = self._inflight.get(text)
        if fut is None:
            fut = asyncio.ensure_future(self._pull(ref))
            self._inflight[text] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(text, None))
        return await asyncio.shield(fut)

    async def _pull(self, ref: Reference) -> PullerError | None:
        try:
            await self.puller.pull(ref)
        except NotFound:
            pass
        except PullerError as exc:
            print(f"puller serve: pull-through of {ref} failed: {exc}", file=sys.stderr,
                  flush=True)
            return exc
        return None

    async def blob(self, request: web.Request, name: str, ident: str,
                   head: bool) -> web.StreamResponse:
        if (failed := await self._refresh(head)) is not None:
            return failed
        try:
            d = Digest.parse(ident)
        except InvalidDigest:
            return _error(400, "DIGEST_INVALID", "invalid digest", head)
        repo = self.view.repos.get(name)
        size = None
        if repo is not None:
            size = repo.blobs.get(d)
            if size is None and d in repo.manifests:
                size = _size(self.s, d)
        if size is None:
            return _error(404, "BLOB_UNKNOWN", "blob unknown to registry", head)
        headers = {**_API_VERSION, "Docker-Content-Digest": str(d),
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "ETag": f'"{d}"', "Cache-Control": "max-age=31536000"}
        start, end = 0, size - 1
        status = 200
        rng = request.headers.get("Range")
        parsed = _parse_range(rng, size) if rng else _WHOLE
        if parsed is None:
            headers = {**_API_VERSION, "Content-Range": f"bytes */{size}"}
            return web.Response(status=416, headers=headers)
        if parsed is not _WHOLE:
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        headers["Content-Length"] = str(length)
        if head:
            return web.Response(status=status, headers=headers)
        loop = asyncio.get_running_loop()
        try:
            f = await loop.run_in_executor(None, open_blob, self.s, d)
        except PullerError as exc:
            return _error(404, "BLOB_UNKNOWN", str(exc))
        try:
            if os.fstat(f.fileno()).st_size != size:
                return _error(500, "UNKNOWN", f"blob {d} in the store has the wrong size")
            resp = web.StreamResponse(status=status, headers=headers)
            await resp.prepare(request)
            pos, left = start, length
            try:
                while left > 0:
                    chunk = await loop.run_in_executor(None, os.pread, f.fileno(),
                                                       min(_CHUNK, left), pos)
                    if not chunk:
                        break
                    await resp.write(chunk)
                    pos += len(chunk)
                    left -= len(chunk)
                await resp.write_eof()
            except ConnectionResetError:  # the client went away mid-blob: its business
                pass
            return resp
        finally:
            f.close()

    async def read_only(self, request: web.Request) -> web.Response:
        return _error(405, "UNSUPPORTED", "this registry is read-only")


class _OneLine(logging.Handler):
    """aiohttp's own errors (a client that sent a 70,000-character request line, or hung
    up mid-answer) as one line on stderr, not a traceback: the server goes on."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        why = f": {type(exc).__name__}: {' '.join(str(exc).split())[:200]}" if exc else ""
        print(f"puller serve: {record.getMessage()}{why}", file=sys.stderr, flush=True)


def _quiet_server_errors() -> None:
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access"):
        log = logging.getLogger(name)
        if not any(isinstance(h, _OneLine) for h in log.handlers):
            log.addHandler(_OneLine())
        log.propagate = False


def _size(s: ContentStore, d: Digest) -> int | None:
    try:
        st = os.lstat(s.blob_path(d))
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


_WHOLE = (-1, -1)  # _parse_range: send the whole blob


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range -> (first, last) inclusive; None if unsatisfiable (416);
    ``_WHOLE`` for a header to ignore, as RFC 9110 has it: another unit, several ranges
    (which puller's clients never ask for) or one that isn't a range at all."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value)
    if m is None or (not m.group(1) and not m.group(2)):
        return _WHOLE
    if not m.group(1):  # suffix: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    first = int(m.group(1))
    if m.group(2) and int(m.group(2)) < first:  # not a range
        return _WHOLE
    if first >= size:
        return None
    last = int(m.group(2)) if m.group(2) else size - 1
    return first, min(last, size - 1)


def _page(request: web.Request, names: list[str]) -> tuple[list[str], str | None]:
    last = request.query.get("last")
    if last:
        names = [n for n in names if n > last]
    n_text = request.query.get("n")
    if n_text and n_text.isdigit():
        n = int(n_text)
        if len(names) > n:
            names = names[:n]
            link = request.rel_url.with_query({"n": str(n), "last": names[-1] if names
                                               else ""})
            return names, str(link)
    return names, None


def make_app(s: ContentStore, *, puller: Any = None) -> web.Application:
    """The registry application serving ``s`` (``puller``: an entered Puller, for
    pull-through)."""
    reg = Registry(s, puller=puller)
    app = web.Application()
    app.router.add_route("GET", "/v2/", reg.base)
    app.router.add_route("HEAD", "/v2/", reg.base)
    app.router.add_route("GET", "/v2/_catalog", reg.catalog)
    app.router.add_route("*", "/v2/{tail:.+}", reg.dispatch)
    app["registry"] = reg
    return app


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--addr wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _serve(args: argparse.Namespace, s: ContentStore, host: str, port: int) -> int:
    puller = None
    if args.upstream:
        from .api import Puller, PullOptions
        from .cli import _network_options
        from .platform import Platform

        options = PullOptions(platform=Platform.parse(args.platform) if args.platform else None,
                              all_platforms=args.all_platforms)
        puller = await Puller(store=s, options=options,
                              client_options=_network_options(args)).__aenter__()
    ssl_ctx = None
    if args.tls_cert or args.tls_key:
        import ssl

        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(args.tls_cert, args.tls_key)
    _quiet_server_errors()
    runner = web.AppRunner(make_app(s, puller=puller), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx)
        await site.start()
        bound = runner.addresses[0]
        scheme = "https" if ssl_ctx else "http"
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        print(f"serving {s.root} on {scheme}://{shown}:{bound[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await runner.cleanup()
        if puller is not None:
            await puller.__aexit__(None, None, None)


def serve_command(args: argparse.Namespace) -> int:
    from .inventory import store_for

    try:
        host, port = _addr(args.addr)
    except ValueError as exc:
        print(f"puller: {exc}", file=sys.stderr)
        return 2
    if (args.platform or args.all_platforms) and not args.upstream:
        print("puller: --platform and --all-platforms need --upstream", file=sys.stderr)
        return 2
    if args.upstream:
        s = ContentStore(args.store or _default()).init()
    else:
        s = store_for(args.store)
    entries(s)  # a store whose index.json can't be read is refused here (StoreError)
    try:
        return asyncio.run(_serve(args, s, host, port))
    except ValueError as exc:
        print(f"puller: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"puller: cannot serve on {args.addr}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _default() -> str:
    from .store import default_store_path

    return str(default_store_path())
