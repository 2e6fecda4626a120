"""The registry client: the one place puller talks to the network.

:class:`RegistryClient` owns a transport (:mod:`puller.transport`; aiohttp's pooled
session for the engine) and with it the connection limits, the auth handshake (see
:mod:`puller.auth`), redirects, retries of small requests, and the mapping of every
HTTP and socket failure into :mod:`puller.errors`. It hands out manifests as verified
bytes and blobs as open streams; it never writes to disk.

Registries on loopback (``localhost``, 127.0.0.0/8, ``::1``) are spoken to as docker
does: HTTPS without verification if they speak it, else plain HTTP; every other
registry over HTTPS with certificate verification.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import ssl
import re
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple, TypeVar
from urllib.parse import urljoin, urlencode, urlsplit

from . import __version__
from .auth import Challenge, Token, parse_challenges, parse_token_response, pull_scope
from .credentials import Credentials, DockerConfig
from .digest import Digest
from .errors import (
    AccessDenied,
    AuthenticationRequired,
    DigestMismatch,
    InvalidDigest,
    ManifestTooLarge,
    NotFound,
    PullerError,
    RateLimited,
    RegistryError,
    ServerError,
    TransportError,
)
from .manifest import MAX_MANIFEST_SIZE
from .mediatypes import ACCEPT
from .record import Record
from .reference import Reference
from .tls import InsecureRegistries, is_loopback_host, make_ssl_context
from .transport import (Transport, describe_network_error, proxy_configured, redirect_target,
                        tls_alert, tls_refusal, unusable_redirect)

__all__ = ["ClientOptions", "RegistryClient", "FetchedManifest", "BlobStream", "retry_delay",
           "RangeNotHonoured", "DEFAULT_CREDENTIALS"]

T = TypeVar("T")

_MAX_REDIRECTS = 5
_HUB_API = "registry-1.docker.io"
_ERROR_BODY_LIMIT = 64 * 1024
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class ClientOptions(Record, kw_only=True):
    """Network settings. Frozen and validated; pass a new one to change anything."""

    max_connections: int = 64  # across all registries
    max_connections_per_host: int = 16
    connect_timeout: float = 30.0
    # A transfer that receives nothing for this long counts as failed (and is resumed).
    stall_timeout: float = 30.0
    retries: int = 5  # extra attempts for a failing request, with backoff
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    # aiohttp stream buffer per response. Larger buys no speed here (measured) and costs
    # memory per concurrent blob.
    read_buffer: int = 128 * 1024
    user_agent: str = f"puller/{__version__}"
    ca_cert: str | None = None  # extra CA bundle trusted for every registry
    # Hosts (host[:port]) reached over HTTPS without verification, or plain HTTP.
    insecure_registries: tuple[str, ...] = ()
    # (name, address) pairs resolved without DNS, like docker's --add-host.
    add_hosts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_connections_per_host", "read_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("connect_timeout", "stall_timeout", "backoff_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.retries < 0 or self.backoff_base < 0:
            raise ValueError("retries and backoff_base must not be negative")
        for name, address in self.add_hosts:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"add_hosts: {address!r} for {name!r} is not an IP address") \
                    from None


def retry_delay(options: ClientOptions, attempt: int, error: BaseException | None = None) -> float:
    """Exponential backoff with full jitter; honours a registry's Retry-After."""
    if isinstance(error, RateLimited) and error.retry_after is not None:
        return min(max(error.retry_after, 0.0), options.backoff_max * 4)
    cap = min(options.backoff_max, options.backoff_base * (2 ** attempt))
    import random  # only ever needed for a retry

    return random.uniform(cap / 2, cap)


class FetchedManifest(Record):
    data: bytes  # exactly as the registry sent them
    media_type: str | None  # the Content-Type header, parameters stripped
    digest: Digest  # of ``data``, verified against what was asked for


class BlobStream(Record, frozen=False):
    """An open blob response. ``start`` is the offset of its first byte: the requested
    offset for a ``206``, or 0 when the server ignored the Range and sent everything."""

    response: Any
    start: int

    def __post_init__(self) -> None:
        self.content: Any = self.response.content  # await readany() / read(n)


class BlobRequest(Record):
    url: str
    headers: dict[str, str]  # includes the registry's Authorization: same origin only
    ssl_for: Callable[[str], ssl.SSLContext]
    timeout: float  # seconds without data before the transfer counts as stalled


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime
    import datetime as _dt

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return max(0.0, (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds())


async def _read_bounded(content: Any, limit: int) -> bytes:
    """The whole body, up to ``limit`` bytes (a stream's read(n) may return less)."""
    data = b""
    while len(data) < limit:
        more = await content.read(limit - len(data))
        if not more:
            break
        data += more
    return data


def _permanent(err: PullerError) -> PullerError:
    """A registry that serves wrong manifest bytes won't serve right ones a second later."""
    err.retryable = False
    return err


def _challenges_of(headers: Any) -> list[Challenge]:
    """Every challenge in a response's ``WWW-Authenticate`` headers (there may be several
    headers, each with one challenge or more)."""
    if headers is None:
        return []
    getall = getattr(headers, "getall", None) or getattr(headers, "get_all", None)
    values = (getall("WWW-Authenticate", None) if getall is not None
              else [headers.get("WWW-Authenticate")]) or []
    return [c for value in values if value for c in parse_challenges(value)]


def _same_origin(a: str, b: str) -> bool:
    if a == b:
        return True
    sa, sb = urlsplit(a), urlsplit(b)
    return (sa.scheme, sa.hostname, sa.port) == (sb.scheme, sb.hostname, sb.port)


# Marker for "docker's config.json and credential helpers" (the default everywhere).
DEFAULT_CREDENTIALS: Any = object()


class RegistryClient:
    """Talks to registries. Use as ``async with RegistryClient() as client: ...``.

    ``credentials`` is where logins come from: by default docker's ``config.json`` and
    credential helpers (:class:`puller.credentials.DockerConfig`); ``None`` for none.
    It is asked only when a registry challenges, once per registry.
    """

    def __init__(self, options: ClientOptions | None = None, *,
                 credentials: Any = DEFAULT_CREDENTIALS,
                 transport: Transport | None = None) -> None:
        """``transport``: how requests are sent; by default aiohttp
        (:class:`puller.aio.AiohttpTransport`), created on entry."""
        self.options = options or ClientOptions()
        self._transport = transport
        self._credentials = DockerConfig() if credentials is DEFAULT_CREDENTIALS else credentials
        self._creds_cache: dict[str, Credentials | None] = {}
        self._open = False
        self._tokens: dict[tuple[str, str], Token] = {}
        self._token_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._challenges: dict[str, Challenge] = {}  # host -> last challenge it sent
        self._basic: dict[str, str] = {}  # host -> Basic header, once it asked for one
        self._sent_credentials: set[str] = set()  # hosts (or their realms) given a login
        self._ssl: dict[str, ssl.SSLContext] = {}
        self._schemes: dict[str, str] = {}  # host -> scheme that worked
        self._probes: dict[str, asyncio.Lock] = {}  # host -> held while its scheme is found
        self._proxied = proxy_configured()  # read once: the environment is read once too
        self._rate_limits: dict[str, RateLimit] = {}  # host -> its last RateLimit-* answer
        env = os.environ.get("PULLER_INSECURE_REGISTRIES", "")
        self._insecure = InsecureRegistries([*self.options.insecure_registries,
                                             *env.split(",")], self.options.add_hosts)

    async def __aenter__(self) -> RegistryClient:
        if self._transport is None:
            from .aio import AiohttpTransport

            self._transport = AiohttpTransport(self.options)
        await self._transport.open()
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._open and self._transport is not None:
            self._open = False
            await self._transport.close()

    def _failures(self) -> tuple[type[BaseException], ...]:
        """What a request can fail with short of a PullerError: the transport's errors,
        and ValueError (a URL or header value the HTTP library refuses)."""
        return (*self.transport_errors, ValueError)

    @property
    def transport_errors(self) -> tuple[type[BaseException], ...]:
        """Exception types that mean the network failed (see :meth:`map_transport`)."""
        assert self._transport is not None
        return self._transport.errors

    # -- plumbing ------------------------------------------------------------------------

    def _relaxed(self, host: str) -> bool:
        """Loopback and insecure registries: HTTPS without verification, else HTTP."""
        return host in self._insecure or is_loopback_host(host)

    def _scheme(self, host: str) -> str:
        return self._schemes.get(host, "https")

    def _ssl_for(self, host: str) -> ssl.SSLContext:
        ctx = self._ssl.get(host)
        if ctx is None:
            ctx = make_ssl_context(host, ca_cert=self.options.ca_cert,
                                   verify=not self._relaxed(host))
            self._ssl[host] = ctx
        return ctx

    async def _creds(self, registry: str) -> Credentials | None:
        if self._credentials is None:
            return None
        if registry not in self._creds_cache:
            self._creds_cache[registry] = await asyncio.to_thread(self._credentials.get,
                                                                  registry)
        return self._creds_cache[registry]

    async def _with_retries(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await fn()
            except PullerError as exc:
                if not exc.retryable or attempt >= self.options.retries:
                    raise
                delay = retry_delay(self.options, attempt, exc)
                attempt += 1
                await asyncio.sleep(delay)

    def map_transport(self, exc: BaseException, host: str, what: str) -> PullerError:
        """Turn a transport's exception into a one-line :class:`PullerError`."""
        assert self._transport is not None
        tls = tls_refusal(exc)
        if tls is not None:  # one wording whichever transport saw it
            return describe_network_error(tls, host, what)
        return self._transport.classify(exc, host, what)

    async def _error_for(self, resp: Any, host: str, what: str) -> RegistryError:
        """Map an error status into an exception; reads a bounded part of the body."""
        try:
            body = await resp.content.read(_ERROR_BODY_LIMIT)
        except self.transport_errors:
            body = b""
        code, detail = error_code(body)
        return self.status_error(resp.status, resp.headers, host, what, code=code,
                                 detail=detail)

    def status_error(self, status: int, headers: Any, host: str, what: str, *,
                     code: str | None = None, detail: str | None = None) -> RegistryError:
        """The exception for an error ``status`` (``headers``: for Retry-After)."""
        reason = f": {detail[:200]}" if detail else ""
        kw: dict[str, Any] = {"status": status, "host": host, "code": code}
        if status == 401:
            login = "puller login" if host == _HUB_API else f"puller login {host}"
            if host in self._sent_credentials and any(
                    c.params.get("error") == "insufficient_scope"
                    for c in _challenges_of(headers)):
                # The token service took the login but granted less than asked: the
                # login is fine, the repository is missing or not this user's.
                return AccessDenied(f"access denied by {host} while {what}: the saved login "
                                    "has no access to this repository (or it does not exist)",
                                    **kw)
            if host in self._sent_credentials:
                return AuthenticationRequired(
                    f"authentication failed for {host} while {what}: the saved credentials "
                    f"were refused (run `{login}` again)", **kw)
            return AuthenticationRequired(
                f"authentication required for {host} while {what}: run `{login}`", **kw)
        if status == 403:
            return AccessDenied(f"access denied by {host} while {what}{reason}", **kw)
        if status == 404:
            return NotFound(f"not found while {what}{reason or f' (HTTP 404 from {host})'}", **kw)
        if status == 429:
            return RateLimited(f"rate limited by {host} while {what}",
                               retry_after=_parse_retry_after(headers.get("Retry-After")),
                               **kw)
        if status >= 500:
            return ServerError(f"{host} failed with HTTP {status} while {what}{reason}", **kw)
        err = RegistryError(f"{host} answered HTTP {status} while {what}{reason}", **kw)
        if status in (408,):
            err.retryable = True
        return err

    # -- auth ----------------------------------------------------------------------------

    async def _token(self, ref: Reference, challenge: Challenge, scope: str) -> str:
        key = (ref.api_host, scope)
        token = self._tokens.get(key)
        if token is not None and token.fresh():
            return token.value
        # One token request per (host, scope) at a time; the others wait and reuse it.
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            token = self._tokens.get(key)
            if token is None or not token.fresh():
                token = await self._fetch_token(ref, challenge, scope)
                self._tokens[key] = token
            return token.value

    async def _fetch_token(self, ref: Reference, challenge: Challenge, scope: str) -> Token:
        """Ask the challenge's realm for a token: anonymously, with the saved user and
        password (Basic, to the realm only), or by OAuth refresh with an identity token.

        Redirects are followed as docker's client follows them, the login going along
        only while the origin stays the same. The request is retried here; a failure
        that survives that is final (the request that wanted the token must not retry
        it all again)."""
        host = ref.api_host
        self._check_realm(host, challenge)
        realm = challenge.realm
        assert realm is not None
        service = challenge.params.get("service", "")
        creds = await self._creds(ref.registry)
        realm_host = urlsplit(realm).netloc
        what = f"getting a token for {scope or 'login'}"

        async def attempt() -> Token:
            assert self._transport is not None
            headers: dict[str, str] = {}
            method, url, data = "GET", realm, None
            if creds is not None and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "client_id": "puller", "service": service, "scope": scope}
                # (OAuth takes several scopes space-separated in one field.)
                method, data = "POST", {k: v for k, v in form.items() if v}
                self._sent_credentials.add(host)
            else:
                # Several scopes (push to one repository, mount from another) go as
                # repeated scope parameters, as the token spec says.
                params = [("service", service)] if service else []
                params += [("scope", one) for one in scope.split(" ") if one]
                url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(params)}"
                if creds is not None and creds.username:
                    headers["Authorization"] = creds.basic()
                    self._sent_credentials.add(host)
            def post_stays(status: int, followed: str) -> None:
                # A POST (an identity token in its body) only to the same origin.
                if method == "POST" and (status not in (307, 308)
                                         or not _same_origin(followed, url)):
                    raise RegistryError(f"{realm_host} redirected the identity token "
                                        f"exchange elsewhere while {what}; refusing",
                                        host=realm_host)

            at = realm_host
            try:
                resp, final = await self._send_following(
                    method, url, headers={}, auth=headers, data=data, host=realm_host,
                    what=what, check=post_stays)
                at = urlsplit(final).netloc
                try:
                    if resp.status != 200:
                        if resp.status in (401, 403) and creds is not None:
                            self._sent_credentials.add(host)
                            login = "puller login" if host == _HUB_API else \
                                f"puller login {ref.registry}"
                            raise AuthenticationRequired(
                                f"authentication failed for {ref.registry}: the token service "
                                f"{realm_host} refused the saved credentials (run `{login}`)",
                                status=resp.status, host=host)
                        if resp.status == 401:  # the login that helps is the registry's
                            raise self.status_error(401, resp.headers, host, what)
                        raise await self._error_for(resp, at, what)
                    body = await _read_bounded(resp.content, _ERROR_BODY_LIMIT * 4)
                finally:
                    resp.release()
            except PullerError:
                raise
            except self._failures() as exc:
                raise self.map_transport(exc, at, what) from exc
            try:
                return parse_token_response(body)
            except ValueError as exc:
                raise AuthenticationRequired(f"{at}: {exc}", host=host) from exc

        try:
            return await self._with_retries(what, attempt)
        except PullerError as exc:
            exc.retryable = False
            raise

    async def _auth_header(self, ref: Reference, scope: str) -> dict[str, str]:
        host = ref.api_host
        basic = self._basic.get(host)
        if basic is not None:
            return {"Authorization": basic}
        challenge = self._challenges.get(host)
        if challenge is None or challenge.scheme != "bearer":
            return {}
        return {"Authorization": f"Bearer {await self._token(ref, challenge, scope)}"}

    async def blob_request(self, ref: Reference, digest: Digest) -> BlobRequest | None:
        """What a worker thread needs to GET a blob itself (see :mod:`puller.threadfetch`):
        the URL, the auth header already earned for this repository, TLS and name
        resolution. None until a request to this registry has settled how to reach it
        (scheme, challenge), or where a proxy is configured."""
        host = ref.api_host
        if host not in self._schemes or self._proxied:
            return None
        scope = pull_scope(ref.repository)
        auth = await self._auth_header(ref, scope)
        scheme = self._schemes[host]
        return BlobRequest(
            url=f"{scheme}://{host}/v2/{ref.repository}/blobs/{digest}",
            headers={"User-Agent": self.options.user_agent, "Accept-Encoding": "identity",
                     **auth},
            ssl_for=self._ssl_for, timeout=self.options.stall_timeout)

    async def upload_request(self, ref: Reference, location: str) -> BlobRequest | None:
        """What a worker thread needs to send an upload's bytes itself (see
        :mod:`puller.threadpush`): the upload's absolute URL and the push auth header.
        None where :meth:`blob_request` would be."""
        host = ref.api_host
        if host not in self._schemes or self._proxied:
            return None
        auth = await self._auth_header(ref, self.push_scope(ref))
        return BlobRequest(
            url=f"{self._schemes[host]}://{host}{self._upload_path(ref, location)}",
            headers={"User-Agent": self.options.user_agent, **auth},
            ssl_for=self._ssl_for, timeout=self.options.stall_timeout)

    def _check_realm(self, host: str, challenge: Challenge) -> None:
        """Raise if a Bearer ``challenge`` names no token service puller would ask."""
        realm = challenge.realm
        parts = urlsplit(realm or "")
        if not realm or parts.scheme not in ("http", "https") or not parts.hostname:
            raise AuthenticationRequired(f"{host} sent a Bearer challenge without a usable realm",
                                         host=host)
        if parts.scheme == "http" and not self._relaxed(host):
            raise AuthenticationRequired(f"{host} asks for credentials to be sent to a plain "
                                         f"HTTP token service ({parts.netloc}); refusing",
                                         host=host)

    async def _answer_challenge(self, ref: Reference, resp: Any,
                                sent: dict[str, str], scope: str) -> bool:
        """After a 401: learn what the registry wants. True when a retry can succeed."""
        host = ref.api_host
        challenges = _challenges_of(resp.headers)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            # Checked before it is kept: the challenge is remembered for the whole host,
            # and one repository's unusable one must not fail every other's requests.
            self._check_realm(host, bearer)
            self._challenges[host] = bearer
            # The token we sent was refused (expired, revoked): drop it, unless a
            # concurrent request has already replaced it, and ask again.
            cached = self._tokens.get((host, scope))
            if cached is not None and sent.get("Authorization") == f"Bearer {cached.value}":
                del self._tokens[(host, scope)]
            return True
        if any(c.scheme == "basic" for c in challenges):
            if "Authorization" in sent:
                return False  # our Basic credentials were refused
            creds = await self._creds(ref.registry)
            if creds is None or not creds.username:
                return False
            self._basic[host] = creds.basic()
            self._sent_credentials.add(host)
            return True
        return False

    async def _send_following(self, method: str, url: str, *, headers: dict[str, str],
                              auth: dict[str, str], data: Any, host: str, what: str,
                              check: Callable[[int, str], None] | None = None
                              ) -> tuple[Any, str]:
        """Send a request, following redirects (at most ``_MAX_REDIRECTS``): ``auth``
        headers go along only while the target keeps ``url``'s origin, never to a CDN or
        another host. ``check(status, next_url)`` may refuse a redirect by raising.
        Returns the final response (the caller releases it) and its URL."""
        assert self._transport is not None
        target = url
        for _ in range(_MAX_REDIRECTS + 1):
            h = {**headers, **auth} if _same_origin(target, url) else dict(headers)
            parts = urlsplit(target)
            ssl_ctx = self._ssl_for(parts.netloc) if parts.scheme == "https" else None
            resp = await self._transport.request(method, target, headers=h,
                                                 ssl_context=ssl_ctx, data=data)
            location = resp.headers.get("Location")
            if resp.status not in (301, 302, 303, 307, 308) or not location:
                return resp, target
            resp.release()
            followed = redirect_target(target, location)
            if followed is None:
                raise unusable_redirect(host, location, what)
            if check is not None:
                check(resp.status, followed)
            target = followed
        raise TransportError(f"too many redirects from {host} while {what}")

    @asynccontextmanager
    async def _request(self, method: str, ref: Reference, path: str, *, what: str,
                       headers: dict[str, str] | None = None,
                       scope: str | None = None,
                       data: Any = None) -> AsyncIterator[Any]:
        """One request to the registry with auth, TLS and redirects handled.

        Yields the final response (any status); the caller maps error statuses. The
        Authorization header goes to the registry host only, never to a redirect target
        on another host. ``scope`` may list several scopes separated by spaces (e.g.
        ``repository:a:pull,push repository:b:pull``). A ``data`` body must be bytes (it
        may be sent twice: once more after an auth challenge).
        """
        assert self._open and self._transport is not None, \
            "RegistryClient used outside `async with`"
        host = ref.api_host
        scope = pull_scope(ref.repository) if scope is None else scope
        base_headers = dict(headers or {})
        auth_round = 0
        probing: asyncio.Lock | None = None
        if host not in self._schemes:
            # The first request to a host finds out how to reach it (TLS or, for a
            # loopback or insecure registry, plain HTTP); requests started meanwhile wait
            # for the answer instead of each trying TLS first.
            probing = self._probes.setdefault(host, asyncio.Lock())
            await probing.acquire()
            if host in self._schemes:
                probing.release()
                probing = None
        try:
            while True:
                scheme = self._scheme(host)
                origin = f"{scheme}://{host}{path}"
                auth = await self._auth_header(ref, scope)
                try:
                    resp, _ = await self._send_following(
                        method, origin, headers=base_headers, auth=auth, data=data,
                        host=host, what=what)
                except PullerError:
                    raise
                except self._failures() as exc:
                    if (scheme == "https" and self._schemes.get(host) != "https"
                            and self._relaxed(host) and self._transport.tls_mismatch(exc)
                            and tls_alert(exc) is None):
                        # A loopback or insecure registry that doesn't speak TLS: plain
                        # HTTP, as docker does, from now on. (One that answered with a
                        # TLS alert speaks TLS and refused us: that error is the answer.)
                        self._schemes[host] = "http"
                        continue
                    raise self.map_transport(exc, host, what) from exc
                self._schemes.setdefault(host, scheme)
                if resp.status == 401 and auth_round == 0:
                    auth_round = 1
                    try:
                        again = await self._answer_challenge(ref, resp, auth, scope)
                    except BaseException:
                        resp.release()
                        raise
                    if again:
                        resp.release()
                        continue
                if probing is not None:  # settled: the requests waiting on it may go
                    probing.release()
                    probing = None
                try:
                    yield resp
                finally:
                    resp.release()
                return
        finally:
            if probing is not None:
                probing.release()

    async def check_login(self, ref: Reference) -> None:
        """``GET /v2/`` with whatever the registry asks for; raises unless it is accepted."""
        async def attempt() -> None:
            async with self._request("GET", ref, "/v2/", what="logging in", scope="") as resp:
                if resp.status != 200:
                    raise await self._error_for(resp, ref.api_host, "logging in")

        await self._with_retries("logging in", attempt)

    # -- manifests -----------------------------------------------------------------------

    async def get_manifest(self, ref: Reference, identifier: str | None = None, *,
                           accept: str = ACCEPT) -> FetchedManifest:
        """Fetch a manifest or index by tag or digest and verify its bytes.

        When asked by digest, the bytes must hash to it. A ``Docker-Content-Digest``
        header, when the registry sends one, must match the bytes too.
        """
        ident = identifier or ref.identifier
        wanted: Digest | None = None
        if ":" in ident:
            wanted = Digest.parse(ident)
        what = f"fetching manifest {ref.name}{'@' if wanted else ':'}{ident}"

        async def attempt() -> FetchedManifest:
            asked_at = time.monotonic()
            async with self._request("GET", ref, f"/v2/{ref.repository}/manifests/{ident}",
                                     what=what, headers={"Accept": accept}) as resp:
                self._note_rate_limit(ref.api_host, resp.headers, asked_at)
                if resp.status != 200:
                    err = await self._error_for(resp, ref.api_host, what)
                    if isinstance(err, NotFound):
                        err = NotFound(f"manifest unknown: {ref.name}"
                                       f"{'@' if wanted else ':'}{ident} not found on "
                                       f"{ref.registry}", status=404, host=ref.api_host,
                                       code=err.code)
                    raise err
                length = resp.content_length
                if length is not None and length > MAX_MANIFEST_SIZE:
                    raise ManifestTooLarge(f"manifest of {ref} is {length} bytes, over the "
                                           f"{MAX_MANIFEST_SIZE}-byte limit")
                try:
                    data = await resp.content.read(MAX_MANIFEST_SIZE + 1)
                    while len(data) <= MAX_MANIFEST_SIZE:
                        more = await resp.content.read(MAX_MANIFEST_SIZE + 1 - len(data))
                        if not more:
                            break
                        data += more
                except self.transport_errors as exc:
                    raise self.map_transport(exc, ref.api_host, what) from exc
                if len(data) > MAX_MANIFEST_SIZE:
                    raise ManifestTooLarge(f"manifest of {ref} is over the "
                                           f"{MAX_MANIFEST_SIZE}-byte limit")
                if length is not None and len(data) != length:
                    raise TransportError(f"manifest of {ref} was cut short")
                header_digest = resp.headers.get("Docker-Content-Digest")
                ctype = resp.headers.get("Content-Type")
            media_type = ctype.split(";", 1)[0].strip() if ctype else None
            digest = Digest.from_bytes(data, wanted.algorithm if wanted else "sha256")
            if wanted is not None and digest != wanted:
                raise _permanent(DigestMismatch(
                    f"manifest of {ref.name}@{wanted} hashes to {digest}"))
            if header_digest:
                try:
                    claimed = Digest.parse(header_digest.strip())
                except InvalidDigest:
                    claimed = None
                if claimed is not None:
                    actual = digest if claimed.algorithm == digest.algorithm else \
                        Digest.from_bytes(data, claimed.algorithm)
                    if actual != claimed:
                        raise _permanent(DigestMismatch(
                            f"manifest of {ref} hashes to {actual} but the registry says "
                            f"{claimed}"))
            if digest.algorithm != "sha256" and wanted is None:
                digest = Digest(algorithm="sha256", hex=hashlib.sha256(data).hexdigest())
            return FetchedManifest(data=data, media_type=media_type, digest=digest)

        return await self._with_retries(what, attempt)

    # -- blobs ---------------------------------------------------------------------------

    @asynccontextmanager
    async def open_blob(self, ref: Reference, digest: Digest, *, size: int | None = None,
                        offset: int = 0, end: int | None = None) -> AsyncIterator[BlobStream]:
        """Open a blob for reading, from ``offset`` when the server honours ``Range``.

        A ``206`` must carry a ``Content-Range`` that starts at ``offset`` and ends where
        asked (the blob's last byte by default, ``end`` inclusive when given); a wrong
        one is answered by asking again for the whole blob. A ``200`` yields a stream with
        ``start == 0``: the caller restarts. With ``end`` (one segment of a parallel
        download) anything but the exact range raises :class:`RangeNotHonoured`.
        """
        what = f"fetching blob {digest}"
        path = f"/v2/{ref.repository}/blobs/{digest}"
        headers = {"Accept-Encoding": "identity"}
        ranged = offset > 0 or end is not None
        last = end if end is not None else (size - 1 if size is not None else None)
        for _ in range(2):
            h = dict(headers)
            if ranged:
                h["Range"] = f"bytes={offset}-{'' if end is None else end}"
            async with self._request("GET", ref, path, what=what, headers=h) as resp:
                if resp.status == 206 and ranged:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    good = (m is not None and int(m.group(1)) == offset
                            and (size is None or m.group(3) == "*" or int(m.group(3)) == size)
                            and (last is None or int(m.group(2)) == last))
                    if good:
                        yield BlobStream(resp, offset)
                        return
                    if end is not None:
                        raise RangeNotHonoured(f"{ref.api_host} answered a range of {digest} "
                                               "with the wrong bytes")
                    ranged = False  # don't trust this server's ranges: take it all
                    continue
                if resp.status == 200:
                    if end is not None:
                        raise RangeNotHonoured(f"{ref.api_host} ignores Range requests")
                    yield BlobStream(resp, 0)
                    return
                if resp.status == 416 and ranged:
                    if end is not None:
                        raise RangeNotHonoured(f"{ref.api_host} refused a range of {digest}")
                    ranged = False
                    continue
                err = await self._error_for(resp, ref.api_host, what)
                if isinstance(err, NotFound):
                    err = NotFound(f"blob {digest} not found in {ref.name}", status=404,
                                   host=ref.api_host, code=err.code)
                raise err
        raise TransportError(f"{ref.api_host} sent an unusable Content-Range for {digest}")

    # -- pushing (used by puller.push: push, copy, mirror) -------------------------------

    @staticmethod
    def push_scope(ref: Reference, mount_from: str | None = None) -> str:
        """Token scope for writing to ``ref``'s repository (and reading ``mount_from``)."""
        scope = f"repository:{ref.repository}:pull,push"
        if mount_from and mount_from != ref.repository:
            scope += f" repository:{mount_from}:pull"
        return scope

    def _note_rate_limit(self, host: str, headers: Any, asked_at: float) -> None:
        """Remember Docker Hub's ``RateLimit-Remaining`` / ``RateLimit-Limit`` (``N;w=S``)
        from an answer to a request sent at ``asked_at`` (monotonic); an answer to an
        older request never replaces a newer one."""
        remaining = _rate_value(headers.get("RateLimit-Remaining"))
        if remaining is None:
            return
        limit = _rate_value(headers.get("RateLimit-Limit"))
        table = self._rate_limits
        known = table.get(host)
        if known is not None and known.asked_at > asked_at:
            return
        table[host] = RateLimit(remaining[0], limit[0] if limit else None,
                                remaining[1] or (limit[1] if limit else None), asked_at)

    def rate_limit(self, ref: Reference) -> RateLimit | None:
        """The latest ``RateLimit(remaining, limit, window, asked_at)`` the registry
        announced on a manifest request, if any."""
        return self._rate_limits.get(ref.api_host)

    def _upload_path(self, ref: Reference, location: str) -> str:
        """An upload ``Location`` (absolute or relative) as a path on the registry host."""
        parts = urlsplit(location)
        if parts.netloc and parts.netloc != ref.api_host:
            raise RegistryError(f"{ref.api_host} wants the upload sent to another host "
                                f"({parts.netloc}); not supported")
        if not parts.path.startswith("/"):
            raise RegistryError(f"{ref.api_host} sent an unusable upload location")
        return parts.path + (f"?{parts.query}" if parts.query else "")

    async def head_manifest(self, ref: Reference, identifier: str | None = None
                            ) -> tuple[Digest, int | None, str | None] | None:
        """``HEAD`` a manifest: ``(digest, size, media type)``, or None when it is absent.

        Costs no pull on Docker Hub. A registry that sends no ``Docker-Content-Digest``
        (it is optional) is asked again with a ``GET`` for a tag; for a digest, the
        ``200`` is the answer."""
        ident = identifier or ref.identifier
        what = f"checking manifest {ref.name}{'@' if ':' in ident else ':'}{ident}"
        by_digest = ":" in ident

        async def attempt() -> tuple[Digest, int | None, str | None] | None:
            asked_at = time.monotonic()
            async with self._request("HEAD", ref, f"/v2/{ref.repository}/manifests/{ident}",
                                     what=what, headers={"Accept": ACCEPT}) as resp:
                self._note_rate_limit(ref.api_host, resp.headers, asked_at)
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise await self._error_for(resp, ref.api_host, what)
                header = resp.headers.get("Docker-Content-Digest")
                ctype = resp.headers.get("Content-Type")
                media_type = ctype.split(";", 1)[0].strip() if ctype else None
                try:
                    if header:
                        return Digest.parse(header.strip()), resp.content_length, media_type
                    if by_digest:
                        return Digest.parse(ident), resp.content_length, media_type
                except InvalidDigest as exc:
                    raise RegistryError(f"{ref.api_host} sent a bad digest while {what}") \
                        from exc
                return _NO_DIGEST

        head = await self._with_retries(what, attempt)
        if head is not _NO_DIGEST:
            return head
        fetched = await self.get_manifest(ref, ident)  # the digest is that of the bytes
        return fetched.digest, len(fetched.data), fetched.media_type

    async def put_manifest(self, ref: Reference, identifier: str, data: bytes,
                           media_type: str) -> Digest:
        """``PUT`` manifest bytes exactly as given; returns their digest (checked against
        what the registry says it stored)."""
        digest = Digest.from_bytes(data, "sha256")
        what = f"pushing manifest {ref.name}{'@' if ':' in identifier else ':'}{identifier}"

        async def attempt() -> Digest:
            async with self._request("PUT", ref, f"/v2/{ref.repository}/manifests/{identifier}",
                                     what=what, headers={"Content-Type": media_type},
                                     scope=self.push_scope(ref), data=data) as resp:
                if resp.status not in (200, 201, 202):
                    raise await self._error_for(resp, ref.api_host, what)
                header = resp.headers.get("Docker-Content-Digest")
            if header and header.strip() != str(digest):
                raise _permanent(DigestMismatch(
                    f"{ref.api_host} stored manifest {identifier} of {ref.name} as "
                    f"{header.strip()}, not {digest}"))
            return digest

        return await self._with_retries(what, attempt)

    async def blob_exists(self, ref: Reference, digest: Digest, *,
                          scope: str | None = None) -> int | None:
        """``HEAD`` a blob in ``ref``'s repository: its size, or None when absent."""
        what = f"checking blob {digest} in {ref.name}"

        async def attempt() -> int | None:
            async with self._request("HEAD", ref, f"/v2/{ref.repository}/blobs/{digest}",
                                     what=what, scope=scope) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise await self._error_for(resp, ref.api_host, what)
                length = resp.headers.get("Content-Length")
                return int(length) if length and length.isdigit() else -1

        return await self._with_retries(what, attempt)

    async def mount_blob(self, ref: Reference, digest: Digest, from_repo: str) -> str | None:
        """Cross-repository mount (``POST ?mount=&from=``). None when mounted; otherwise
        the location of the upload the registry started instead."""
        what = f"mounting blob {digest} from {from_repo} into {ref.name}"
        path = (f"/v2/{ref.repository}/blobs/uploads/?"
                f"{urlencode([('mount', str(digest)), ('from', from_repo)])}")

        async def attempt() -> str | None:
            async with self._request("POST", ref, path, what=what,
                                     scope=self.push_scope(ref, from_repo),
                                     headers={"Content-Length": "0"}) as resp:
                if resp.status == 201:
                    return None
                if resp.status == 202 and resp.headers.get("Location"):
                    return resp.headers["Location"]
                raise await self._error_for(resp, ref.api_host, what)

        return await self._with_retries(what, attempt)

    async def start_upload(self, ref: Reference) -> str:
        """``POST`` a new upload (no body: any auth challenge is answered here, so the
        streamed bodies that follow are never needed twice). Returns its location."""
        what = f"starting an upload to {ref.name}"

        async def attempt() -> str:
            async with self._request("POST", ref, f"/v2/{ref.repository}/blobs/uploads/",
                                     what=what, scope=self.push_scope(ref),
                                     headers={"Content-Length": "0"}) as resp:
                if resp.status == 202 and resp.headers.get("Location"):
                    return resp.headers["Location"]
                raise await self._error_for(resp, ref.api_host, what)

        return await self._with_retries(what, attempt)

    async def upload_chunk(self, ref: Reference, location: str, body: Any, start: int,
                           length: int) -> tuple[str, int]:
        """``PATCH`` ``length`` bytes at ``start``; returns (next location, bytes the
        registry now holds). Not retried here: the caller asks :meth:`upload_status`."""
        what = f"uploading to {ref.name}"
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Length": str(length),
                   "Content-Range": f"{start}-{start + length - 1}"}
        async with self._request("PATCH", ref, self._upload_path(ref, location), what=what,
                                 scope=self.push_scope(ref), headers=headers,
                                 data=body) as resp:
            if resp.status != 202:
                raise await self._error_for(resp, ref.api_host, what)
            held = upload_range(resp.headers.get("Range"))
            return resp.headers.get("Location") or location, \
                start + length if held is None else held

    async def finish_upload(self, ref: Reference, location: str, digest: Digest,
                            body: Any = None, length: int = 0) -> None:
        """``PUT ?digest=``, with the remaining ``length`` bytes as ``body`` (or none)."""
        what = f"finishing the upload of {digest} to {ref.name}"
        path = self._upload_path(ref, location)
        path += ("&" if "?" in path else "?") + urlencode([("digest", str(digest))])
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        async with self._request("PUT", ref, path, what=what, scope=self.push_scope(ref),
                                 headers=headers, data=body if length else None) as resp:
            if resp.status not in (201, 204):
                err = await self._error_for(resp, ref.api_host, what)
                if err.code in ("DIGEST_INVALID", "SIZE_INVALID"):
                    raise DigestMismatch(f"{ref.api_host} refused blob {digest}: the bytes "
                                         f"sent do not hash to it")
                raise err

    async def upload_status(self, ref: Reference, location: str) -> tuple[str, int]:
        """``GET`` an upload's status: (location to continue at, bytes the registry holds).
        Raises NotFound when the registry has forgotten (or refuses to resume) it."""
        what = f"asking for the status of an upload to {ref.name}"
        async with self._request("GET", ref, self._upload_path(ref, location), what=what,
                                 scope=self.push_scope(ref)) as resp:
            if resp.status not in (200, 204):
                raise await self._error_for(resp, ref.api_host, what)
            held = upload_range(resp.headers.get("Range"))
            return resp.headers.get("Location") or location, held or 0

    async def cancel_upload(self, ref: Reference, location: str) -> None:
        """``DELETE`` an upload we won't finish (best effort)."""
        try:
            async with self._request("DELETE", ref, self._upload_path(ref, location),
                                     what="cancelling an upload", scope=self.push_scope(ref)):
                pass
        except PullerError:
            pass

    async def list_tags(self, ref: Reference, *, page_size: int = 1000,
                        max_pages: int = 1000) -> list[str]:
        """Every tag of ``ref``'s repository (``/v2/<name>/tags/list``, following
        ``Link: <...>; rel="next"`` pagination)."""
        what = f"listing tags of {ref.name}"
        path: str | None = f"/v2/{ref.repository}/tags/list?n={page_size}"
        tags: list[str] = []
        seen: set[str] = set()
        for _ in range(max_pages):
            if path is None:
                return tags
            current = path

            async def attempt(current: str = current) -> tuple[list[str], str | None]:
                async with self._request("GET", ref, current, what=what) as resp:
                    if resp.status != 200:
                        err = await self._error_for(resp, ref.api_host, what)
                        if isinstance(err, NotFound):
                            err = NotFound(f"repository {ref.name} not found", status=404,
                                           host=ref.api_host, code=err.code)
                        raise err
                    body = await resp.content.read(MAX_MANIFEST_SIZE + 1)
                    link = resp.headers.get("Link")
                try:
                    doc = json.loads(body)
                    page = doc.get("tags") or []
                    if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                        raise ValueError("tags is not a list of strings")
                except (ValueError, AttributeError) as exc:
                    raise RegistryError(f"{ref.api_host} sent an unreadable tag list for "
                                        f"{ref.name}") from exc
                return page, _next_link(link, ref, current)

            page, path = await self._with_retries(what, attempt)
            for t in page:
                if t not in seen:
                    seen.add(t)
                    tags.append(t)
            if path == current:  # the same page again: nothing more will come
                return tags
        if path is None:
            return tags
        raise RegistryError(f"the tag list of {ref.name} goes on past {max_pages} pages; "
                            "stopping rather than use part of it", host=ref.api_host)


def error_code(body: bytes) -> tuple[str | None, str | None]:
    """The first ``{"errors": [{"code", "message"}]}`` entry of a registry's error body."""
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        return None, None
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"]:
        first = doc["errors"][0]
        if isinstance(first, dict):
            code = first.get("code")
            msg = first.get("message")
            return (code if isinstance(code, str) else None,
                    msg if isinstance(msg, str) else None)
    return None, None


def _rate_value(value: str | None) -> tuple[int, int | None] | None:
    """``"76;w=21600"`` -> (76, 21600)."""
    if not value:
        return None
    head, _, rest = value.partition(";")
    try:
        n = int(head.strip().split(",")[0])
    except ValueError:
        return None
    window = None
    m = re.search(r"w\s*=\s*(\d+)", rest)
    if m:
        window = int(m.group(1))
    return n, window


def upload_range(value: str | None) -> int | None:
    """An upload's ``Range: 0-N`` header as the number of bytes held (N + 1)."""
    if not value:
        return None
    m = re.match(r"^\s*(?:bytes[ =])?0-(\d+)\s*$", value)
    if not m:
        return None
    end = int(m.group(1))
    # distribution says "0-0" for an empty upload too; a 1-byte upload is never resumed.
    return 0 if end == 0 else end + 1


def _next_link(link: str | None, ref: Reference, current: str) -> str | None:
    """The path of the next page a ``Link: <...>; rel="next"`` header names, resolved
    against the page it came with (``current``); None on the last page. A next page on
    another host or outside ``/v2/`` is an error: the list would be cut short."""
    if not link:
        return None
    for part in link.split(","):
        m = re.match(r'\s*<([^>]+)>\s*;(.*)$', part)
        if m and re.search(r'rel="?next"?', m.group(2)):
            base = f"http://{ref.api_host}{current}"
            parts = urlsplit(urljoin(base, m.group(1).strip()))
            if parts.netloc != ref.api_host or not parts.path.startswith("/v2/"):
                raise RegistryError(f"{ref.api_host} continued the tag list of {ref.name} "
                                    f"at {m.group(1)[:200]!r}, not on its own /v2/ API",
                                    host=ref.api_host)
            return parts.path + (f"?{parts.query}" if parts.query else "")
    return None


_NO_DIGEST: Any = object()  # head_manifest: a 200 without the digest header


class RateLimit(NamedTuple):
    """What a registry said of its pull limit (Docker Hub's ``RateLimit-*`` headers)."""

    remaining: int
    limit: int | None
    window: int | None  # seconds
    asked_at: float  # time.monotonic() when the request that was answered so was sent


class RangeNotHonoured(TransportError):
    """The registry did not answer a segment request with exactly that segment."""

    retryable = False
