"""The aiohttp transport: one pooled session for every registry of a run (the library's
default; the command line uses it where a proxy is configured).

Connection limits live on the connector (in total and per host); a response that
sends nothing for ``stall_timeout`` seconds fails (and the scheduler resumes it);
bodies are never decompressed, so blobs are hashed exactly as the registry sent them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Any

import aiohttp
import aiohttp.abc
import yarl

from .errors import PullerError, TransportError
from .transport import Transport, _certificate_error, env_proxy

if TYPE_CHECKING:  # pragma: no cover
    from .client import ClientOptions

__all__ = ["AiohttpTransport"]


class _Hosts(aiohttp.abc.AbstractResolver):
    """Resolves the names given in ``add_hosts`` without DNS; others as usual."""

    def __init__(self, table: dict[str, str]) -> None:
        self._table = table
        self._default = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: int = socket.AF_INET) -> list[dict[str, Any]]:
        address = self._table.get(host)
        if address is None:
            return await self._default.resolve(host, port, family)
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [{"hostname": host, "host": address, "port": port, "family": fam,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        await self._default.close()


class AiohttpTransport(Transport):
    errors = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)

    def __init__(self, options: ClientOptions) -> None:
        self._options = options
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        o = self._options
        connector = aiohttp.TCPConnector(
            limit=o.max_connections,
            limit_per_host=o.max_connections_per_host,
            ttl_dns_cache=300,
            enable_cleanup_closed=False,
            resolver=_Hosts(dict(o.add_hosts)) if o.add_hosts else None,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=o.connect_timeout,
                                          sock_read=o.stall_timeout),
            auto_decompress=False,  # blobs are hashed as sent; never inflate them
            read_bufsize=o.read_buffer,
            headers={"User-Agent": o.user_agent},
            raise_for_status=False,
            # Proxies are chosen per request (transport.env_proxy: docker's rules, which
            # never send this machine's registries through one); nothing else is taken
            # from the environment (no .netrc: registry logins come from docker's config).
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, url: str, *, headers: dict[str, str],
                      ssl_context: ssl.SSLContext | None, data: Any = None) -> Any:
        assert self._session is not None, "transport used before open()"
        proxy = env_proxy(url)
        proxy_auth = None
        if proxy is not None:
            url_ = yarl.URL(proxy)
            if url_.user is not None:
                proxy_auth = aiohttp.BasicAuth(url_.user, url_.password or "")
                proxy = str(url_.with_user(None))
        return await self._session.request(
            method, url, headers=headers, data=data, allow_redirects=False,
            ssl=ssl_context if ssl_context is not None else False,
            proxy=proxy, proxy_auth=proxy_auth)

    def classify(self, exc: BaseException, host: str, what: str) -> PullerError:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            reason = getattr(exc.certificate_error, "verify_message", None) or "not trusted"
            return _certificate_error(host, what, reason)
        if isinstance(exc, aiohttp.ClientSSLError):
            err = TransportError(f"TLS handshake with {host} failed while {what}: "
                                 f"{getattr(exc, 'strerror', None) or type(exc).__name__}")
            err.retryable = False
            return err
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            return TransportError(f"the proxy answered HTTP {exc.status} "
                                  f"{exc.message or ''}".rstrip() + f" for {host} while {what}")
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return TransportError(f"cannot connect to the proxy for {host} while {what}: "
                                  f"{exc.os_error.strerror or exc.os_error}")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return TransportError(f"cannot connect to {host} while {what}: "
                                  f"{exc.os_error.strerror or exc.os_error}")
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            return TransportError(f"{host} stopped answering while {what} (timed out)")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return TransportError(f"connection to {host} broke while {what}")
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return TransportError(f"{host} closed the connection while {what}")
        if isinstance(exc, aiohttp.InvalidURL):
            err = TransportError(f"invalid URL for {host} while {what}")
            err.retryable = False
            return err
        return super().classify(exc, host, what)

    def tls_mismatch(self, exc: BaseException) -> bool:
        # (A proxy that won't tunnel to the registry's port counts too: docker falls back
        # to plain HTTP for an insecure registry whatever stopped HTTPS.)
        return isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ClientOSError,
                                aiohttp.ServerDisconnectedError, aiohttp.ClientHttpProxyError))
