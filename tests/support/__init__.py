"""Test infrastructure for puller's integration tests.

Everything here is independent of the ``puller`` package (it is an oracle):

* :mod:`tests.support.registry`    -- run the real CNCF distribution registry (docker-registry)
* :mod:`tests.support.tokenserver` -- a Bearer token server for the registry's ``auth: token`` mode
* :mod:`tests.support.images`      -- deterministic image/index builder and an http.client pusher
* :mod:`tests.support.proxy`       -- an aiohttp fault-injecting reverse proxy

This module holds the small shared helpers: :func:`free_port` and :class:`ThreadedServer`
(an aiohttp application served from a background thread with its own event loop).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["free_port", "ThreadedServer"]


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (bind to port 0, read it, close).

    Racy by nature; callers that hand the port to another process must retry on a bind failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """Serve an ``aiohttp.web.Application`` on 127.0.0.1 from a daemon thread with its own loop.

    ``start()`` blocks until the socket listens (or re-raises the startup error); ``stop()``
    stops the loop, cleans up the runner (open connections are closed after a short grace
    period) and joins the thread. Both are idempotent. Usable as a context manager.
    """

    def __init__(
        self,
        app_factory: Callable[[], Awaitable["object"]] | Callable[[], "object"],
        *,
        name: str = "test-server",
        port: int = 0,
        shutdown_timeout: float = 0.5,
        ssl_context: Any = None,
    ) -> None:
        """``ssl_context``: serve HTTPS with it."""
        self._ssl_context = ssl_context
        self._app_factory = app_factory
        self._name = name
        self._want_port = port
        self._shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.port: int | None = None

    # -- public -------------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "server not started"
        return self._loop

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "ThreadedServer":
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._started.wait(15):
            self.stop()
            raise RuntimeError(f"{self._name}: did not start within 15 s")
        if self._error is not None:
            err = self._error
            self.stop()
            raise RuntimeError(f"{self._name}: failed to start: {err!r}") from err
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # loop already closed
                pass
            thread.join(15)
        self._thread = None

    def call(self, coro_factory: Callable[[], Awaitable[object]], timeout: float = 10) -> object:
        """Run ``coro_factory()`` on the server loop; wait for its result (from another thread)."""
        fut = asyncio.run_coroutine_threadsafe(_as_coro(coro_factory), self.loop)
        return fut.result(timeout)

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- thread body ----------------------------------------------------------------------------
    def _run(self) -> None:
        from aiohttp import web

        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            try:
                app = self._app_factory()
                if asyncio.iscoroutine(app):
                    app = loop.run_until_complete(app)
                runner = web.AppRunner(
                    app, handle_signals=False, access_log=None,
                    shutdown_timeout=self._shutdown_timeout,
                )
                loop.run_until_complete(runner.setup())
                self._runner = runner
                site = web.TCPSite(runner, "127.0.0.1", self._want_port, reuse_address=False,
                                   ssl_context=self._ssl_context)
                loop.run_until_complete(site.start())
                self.port = runner.addresses[0][1]
            except BaseException as e:  # noqa: BLE001 - reported to start()
                self._error = e
                self._started.set()
                if self._runner is not None:
                    loop.run_until_complete(self._runner.cleanup())
                return
            self._started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
        finally:
            try:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()


async def _as_coro(factory: Callable[[], Awaitable[object]]) -> object:
    return await factory()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
