"""One event loop per command, ended cleanly by Ctrl-C and SIGTERM.

:func:`run` is how the command line runs a pull, push, copy or mirror. SIGINT and SIGTERM
cancel the command's task: its cleanups run (worker threads are told to stop and waited
for, connections closed), every task it started finishes, the loop is shut down, and
then :func:`run` raises :class:`KeyboardInterrupt` for the command to say "interrupted"
and exit 130. The signal handler never raises into the code it interrupts -- a signal
that arrives while the loop starts, cleans up or shuts down only makes the end an
interruption -- so the second SIGINT that ``timeout`` (or a double Ctrl-C) sends changes
nothing; a third ends the process at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any, Awaitable, Callable

__all__ = ["run"]

EXIT_INTERRUPTED = 130


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``coro_fn()`` in a fresh event loop (uvloop where installed); its result.
    Raises KeyboardInterrupt, after a clean shutdown, when a signal ended it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every OS
        uvloop = None

    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    task = loop.create_task(coro_fn())  # type: ignore[arg-type]
    signals = 0

    def cancel() -> None:  # in the loop
        if not task.done() and not task.cancelling():
            task.cancel()

    def on_signal(signum: int, frame: Any) -> None:  # in the main thread, between bytecodes
        nonlocal signals
        signals += 1
        if signals >= 3:
            os.write(2, b"puller: interrupted\n")
            os._exit(EXIT_INTERRUPTED)
        try:
            loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # the loop is closed already
            pass

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    cancelled = False
    try:
        try:
            result = loop.run_until_complete(task)
        except asyncio.CancelledError:
            cancelled = True
        finally:
            _close(loop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signals or cancelled:
        raise KeyboardInterrupt
    return result


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """What ``asyncio.run`` does at the end: cancel what is left and wait for it, close
    async generators, stop the default executor's threads (while the loop still runs, so
    they can report back), then close the loop."""
    try:
        left = asyncio.all_tasks(loop)
        for t in left:
            t.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
