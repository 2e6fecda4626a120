"""The blob scheduler: concurrency, dedupe, retries and resume.

Every blob of every image in a run goes through one :class:`BlobScheduler`:

- a blob already in the store is not fetched;
- the same digest wanted by several images at once is downloaded once (a map from
  digest to task; a failed task is forgotten so the next caller tries again);
- at most ``concurrency`` downloads run at a time;
- a failed transfer is retried with backoff and resumed with ``Range`` from the bytes
  already verified on disk; an integrity failure gets one clean re-fetch;
- bytes are hashed and written in a worker thread, in batches of about a MiB, while
  the event loop reads the next batch from the socket, so neither stalls the other and
  memory stays flat whatever the blob size.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable


from .client import BlobRequest, ClientOptions, RangeNotHonoured, RegistryClient, retry_delay
from .digest import Digest
from .errors import IntegrityError, NotFound, PullerError, SizeMismatch, TransportError
from .events import BlobProgress, BlobRetry, BlobStarted, Event
from .manifest import Descriptor
from .reference import Reference
from .store import BlobWriter, ContentStore
from .threadfetch import Handle, NotPlain, fetch_into, fetch_range, in_thread, settle
from .transport import ConnectionPool

__all__ = ["BlobScheduler"]

_BATCH = 512 * 1024  # bytes handed to the worker thread at once
_LOCK_POLL = 0.25  # seconds between looks at a digest another process is writing


class BlobScheduler:
    def __init__(self, client: RegistryClient, store: ContentStore, *, concurrency: int,
                 executor: Executor, emit: Callable[[Event], None] | None,
                 options: ClientOptions | None = None, segments: int = 4,
                 segment_min: int = 16 << 20, threaded: bool = True) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._client = client
        self._store = store
        self._executor = executor
        self._emit = emit
        self._options = options or client.options
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._segments = segments
        self._segment_min = max(1 << 20, segment_min)
        self._alive = 0  # downloads wanted and not finished (running or waiting for a slot)
        self._no_ranges: set[str] = set()  # hosts that don't honour Range
        self._threaded = threaded
        self._bodies: ThreadPoolExecutor | None = None  # one thread per body in flight
        self._connections = ConnectionPool(add_hosts=dict(self._options.add_hosts),
                                           timeout=self._options.connect_timeout)
        self._inflight: dict[Digest, asyncio.Task[int]] = {}
        self._fetched: set[Digest] = set()  # downloaded by this scheduler (this run)
        self._watchers: dict[Digest, list[str]] = {}

    async def _run(self, fn: Callable[..., object], *args: object) -> object:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def fetch(self, ref: Reference, desc: Descriptor, *, image: str) -> tuple[str, int]:
        """Make sure ``desc`` is in the store. Returns ``("exists", 0)`` when it already
        was, else ``("downloaded", bytes_fetched_by_this_caller)``. ``image`` names the
        image in events."""
        digest = desc.digest
        task = self._inflight.get(digest)
        if task is None:
            if self._store.has(digest, desc.size):
                # Brought in by another image of this scheduler's run, or there before.
                return ("downloaded", 0) if digest in self._fetched else ("exists", 0)
            task = asyncio.create_task(self._download(ref, desc), name=f"blob {digest}")
            self._inflight[digest] = task
            watchers = self._watchers[digest] = [image]
            task.add_done_callback(lambda t, d=digest: self._forget(d, t))
            owner = True
        else:
            watchers = self._watchers.setdefault(digest, [])
            watchers.append(image)
            owner = False
        try:
            # Shielded: one image giving up must not cancel a download others wait for.
            fetched = await asyncio.shield(task)
        finally:
            await self._leave(digest, task, watchers, image)
        if fetched < 0:  # someone else (another process) committed it meanwhile
            return "exists", 0
        return "downloaded", fetched if owner else 0

    async def _leave(self, digest: Digest, task: asyncio.Task[int], watchers: list[str],
                     image: str) -> None:
        """``image`` no longer waits for ``task``: it gets no more events about it, and
        when nobody else waits either, the download is stopped (and waited for, thread
        and all) rather than left running for no one."""
        if image in watchers:
            watchers.remove(image)
        if watchers or task.done():
            return
        if self._inflight.get(digest) is task:  # a new caller starts a new download
            del self._inflight[digest]
            self._watchers.pop(digest, None)
        task.cancel()
        await settle(task)  # (cancelled again meanwhile: we are on our way out already)

    async def aclose(self) -> None:
        """Cancel downloads nobody waits for any more and wait until they have stopped."""
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._bodies is not None:
            pool, self._bodies = self._bodies, None
            await asyncio.shield(asyncio.to_thread(pool.shutdown, wait=True))
        self._connections.close()

    def _forget(self, digest: Digest, task: asyncio.Task[int]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
            self._watchers.pop(digest, None)
        if not task.cancelled():
            # The exception is marked retrieved; waiters get it through the shield.
            if task.exception() is None and task.result() >= 0:
                self._fetched.add(digest)

    def _notify(self, digest: Digest, make: Callable[[str], Event]) -> None:
        if self._emit is None:  # nobody listens: no events built
            return
        for image in self._watchers.get(digest, ()):
            self._emit(make(image))

    async def _download(self, ref: Reference, desc: Descriptor) -> int:
        """Returns bytes fetched, or -1 when another process stored the blob first."""
        self._alive += 1
        try:
            return await self._download_in_slot(ref, desc)
        finally:
            self._alive -= 1

    async def _download_in_slot(self, ref: Reference, desc: Descriptor) -> int:
        async with self._slots:
            attempt = 0
            integrity_failures = 0
            fetched = 0
            while True:
                try:
                    got = await self._download_once(ref, desc)
                    return got if got < 0 else fetched + got
                except _Partial as p:
                    fetched += p.fetched
                    exc = p.error
                except IntegrityError as e:
                    integrity_failures += 1
                    exc = e
                    if integrity_failures > 1:  # the clean re-fetch failed too: it's permanent
                        e.retryable = False
                        raise
                except PullerError as e:
                    exc = e
                if not exc.retryable or attempt >= self._options.retries:
                    raise exc
                delay = retry_delay(self._options, attempt, exc)
                attempt += 1
                retry = {"digest": str(desc.digest), "attempt": attempt, "error": str(exc),
                         "offset": self._store.partial_size(desc.digest),
                         "delay": round(delay, 3)}
                self._notify(desc.digest, lambda im, kw=retry: BlobRetry(ref=im, **kw))
                await asyncio.sleep(delay)

    async def _open_writer(self, desc: Descriptor) -> BlobWriter | None:
        """Take the per-digest ingest lock; None when the blob turned up in the store."""
        while True:
            if self._store.has(desc.digest, desc.size):
                return None
            opening = asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: self._store.ingest(desc.digest, desc.size, wait=False))
            try:
                writer = await asyncio.shield(opening)
            except asyncio.CancelledError:
                # The thread goes on and may take the lock: release it when it does.
                opening.add_done_callback(_close_opened)
                raise
            if writer is not None:
                assert isinstance(writer, BlobWriter)
                return writer
            await asyncio.sleep(_LOCK_POLL)  # another process is writing this digest

    async def _download_once(self, ref: Reference, desc: Descriptor) -> int:
        if self._threaded and self._unsplittable(ref, desc.size):
            req = await self._client.blob_request(ref, desc.digest)
            if req is not None:
                try:
                    got = await self._whole_in_thread(req, desc)
                except NotPlain as np:
                    self._raise_error_status(np, ref, desc)
                    got = None  # a challenge or an oddity: the full path below
                if got is not None:
                    return got
        writer = await self._open_writer(desc)
        if writer is None:
            return -1
        try:
            if self._store.has(desc.digest, desc.size):
                return -1
            start_offset = writer.offset
            if start_offset == desc.size:  # all bytes were already there: just verify
                await self._run(writer.commit)
                return 0
            self._notify(desc.digest, lambda im: BlobStarted(
                ref=im, digest=str(desc.digest), size=desc.size, offset=start_offset))
            if writer.held and ref.api_host in self._no_ranges:
                writer.held = []  # ranges it won't serve: one stream from the prefix
            parts = self._segments_for(ref, desc.size - start_offset)
            if parts > 1 or writer.held:  # (what an earlier attempt left: only the gaps)
                return await self._download_segments(ref, desc, writer, parts)
            if self._threaded:
                req = await self._client.blob_request(ref, desc.digest)
                if req is not None:
                    try:
                        return await self._download_in_thread(req, desc, writer)
                    except NotPlain as np:
                        self._raise_error_status(np, ref, desc)
            async with self._client.open_blob(ref, desc.digest, size=desc.size,
                                              offset=start_offset) as stream:
                if stream.start != writer.offset:
                    await self._run(writer.restart)
                begun = writer.offset
                try:
                    tail = await self._pump(ref, stream.content, writer, desc, keep_tail=True)
                except (PullerError, *self._client.transport_errors) as exc:
                    err = exc if isinstance(exc, PullerError) else self._client.map_transport(
                        exc, ref.api_host, f"fetching blob {desc.digest}")
                    if isinstance(err, SizeMismatch):  # more bytes than announced
                        await self._run(writer.restart)
                        raise err from exc
                    raise _Partial(err, writer.offset - begun) from exc
                declared = stream.response.content_length
            try:
                complete = await self._run(writer.finish, tail)
            except SizeMismatch:  # more bytes than announced: none of it can be kept
                await self._run(writer.restart)
                raise
            fetched = writer.offset - begun
            if not complete:
                if declared is not None and fetched == declared:
                    # The server said how long its body was and sent all of it: its copy
                    # is shorter than the descriptor, which no resume can fix.
                    await self._run(writer.restart)
                    raise SizeMismatch(f"blob {desc.digest}: the registry sent "
                                       f"{begun + declared} bytes, the manifest says "
                                       f"{desc.size}")
                raise _Partial(TransportError(
                    f"blob {desc.digest} ended after {writer.offset} of {desc.size} bytes"),
                    fetched)
            self._progress(desc.digest, str(desc.digest), desc.size, desc.size)
            return fetched
        finally:
            # close() can take a while on some filesystems: keep it off the event loop.
            # Once submitted it runs even if we are cancelled while waiting for it.
            if not writer.closed:
                await asyncio.shield(asyncio.get_running_loop().run_in_executor(
                    self._executor, writer.close))

    def _raise_error_status(self, np: NotPlain, ref: Reference, desc: Descriptor) -> None:
        """An error status is that error (retried like any other); a challenge or an
        oddity returns, for the registry client, which knows the rest."""
        challenge = np.status == 401 and np.headers is not None and \
            np.headers.get("WWW-Authenticate")  # type: ignore[attr-defined]
        if np.status is not None and np.status >= 400 and not challenge:
            err = self._client.status_error(np.status, np.headers, ref.api_host,
                                            f"fetching blob {desc.digest}")
            if isinstance(err, NotFound):
                err = NotFound(f"blob {desc.digest} not found in {ref.name}", status=404,
                               host=ref.api_host)
            raise err from None

    def _unsplittable(self, ref: Reference, size: int) -> bool:
        """Too small (or from a host that ignores Range) to be fetched in ranges."""
        return self._segments < 2 or size < 2 * self._segment_min or \
            ref.api_host in self._no_ranges

    async def _whole_in_thread(self, req: BlobRequest, desc: Descriptor) -> int | None:
        """A whole blob in one worker-thread hop: take the ingest lock, receive, hash,
        write, commit, release. Small layers are dominated by per-step costs (each hop
        between the loop and a thread is a GIL hand-over); here there is one.
        Returns like :meth:`_download_once`, or None when another process holds the
        digest's lock (the caller then waits for it the usual way)."""
        loop = asyncio.get_running_loop()
        digest = str(desc.digest)
        handle = Handle()
        store = self._store

        started = self._reporter(loop, lambda offset: self._notify(
            desc.digest, lambda im: BlobStarted(ref=im, digest=digest, size=desc.size,
                                                offset=offset)))
        progress = self._reporter(
            loop, lambda done: self._progress(desc.digest, digest, done, desc.size))

        def whole() -> int | None:  # in the worker thread
            writer = store.ingest(desc.digest, desc.size, wait=False)
            if writer is None:
                return None
            try:
                if store.has(desc.digest, desc.size):
                    return -1
                begun = writer.offset
                started(begun)
                if begun < desc.size:
                    try:
                        fetch_into(req, writer, handle=handle, progress=progress,
                                   pool=self._connections)
                    except SizeMismatch:
                        writer.restart()
                        raise
                    except PullerError as err:
                        raise _Partial(err, writer.offset - begun) from err
                try:
                    complete = writer.finish([])
                except SizeMismatch:
                    writer.restart()
                    raise
                if not complete:
                    raise _Partial(TransportError(
                        f"blob {desc.digest} ended after {writer.offset} of {desc.size} "
                        f"bytes"), writer.offset - begun)
                return desc.size - begun
            finally:
                if not writer.closed:
                    writer.close()

        got = await in_thread(self._body_pool(), whole, handle)  # the lock is released in it
        if got is not None and got >= 0:
            self._progress(desc.digest, digest, desc.size, desc.size)
        return got

    async def _download_in_thread(self, req: BlobRequest, desc: Descriptor,
                                  writer: BlobWriter) -> int:
        """Receive, hash and write the body in a worker thread (see puller.threadfetch)."""
        loop = asyncio.get_running_loop()
        digest = str(desc.digest)
        handle = Handle()

        progress = self._reporter(
            loop, lambda done: self._progress(desc.digest, digest, done, desc.size))

        begun = writer.offset
        try:  # never closes the writer under the thread, even when cancelled
            await in_thread(self._body_pool(), functools.partial(
                fetch_into, req, writer, handle=handle, progress=progress,
                pool=self._connections), handle)
        except SizeMismatch:
            await self._run(writer.restart)
            raise
        except PullerError as err:
            raise _Partial(err, writer.offset - begun) from err
        try:
            complete = await self._run(writer.finish, [])
        except SizeMismatch:
            await self._run(writer.restart)
            raise
        fetched = writer.offset - begun
        if not complete:
            raise _Partial(TransportError(
                f"blob {desc.digest} ended after {writer.offset} of {desc.size} bytes"), fetched)
        self._progress(desc.digest, digest, desc.size, desc.size)
        return fetched

    def _body_pool(self) -> ThreadPoolExecutor:
        if self._bodies is None:
            self._bodies = ThreadPoolExecutor(max_workers=self._concurrency,
                                              thread_name_prefix="puller-body")
        return self._bodies

    def _segments_for(self, ref: Reference, remaining: int) -> int:
        """How many ranges to fetch a blob's ``remaining`` bytes in, at once.

        Only spare capacity is used: a blob is split when fewer blobs than the
        concurrency limit are waiting, so one big layer gets several connections (as a
        CDN caps each one) while many layers keep one each."""
        if self._segments < 2 or ref.api_host in self._no_ranges:
            return 1
        spare = self._concurrency - self._alive + 1
        return max(1, min(self._segments, spare, remaining // self._segment_min))

    async def _download_segments(self, ref: Reference, desc: Descriptor, writer: BlobWriter,
                                 parts: int) -> int:
        """Fetch ``parts`` byte ranges of one blob in parallel. The first range streams
        through the hasher; the others are written at their offsets and hashed, in
        order, from disk once all have arrived. Memory stays flat."""
        if self._threaded:
            req = await self._client.blob_request(ref, desc.digest)
            if req is not None:
                try:
                    return await self._segments_in_threads(req, ref, desc, writer, parts)
                except NotPlain as np:
                    self._raise_error_status(np, ref, desc)
                    # A challenge or an oddity: the same ranges through the client.
        begun = writer.offset
        held = _span_bytes(writer.held)
        bounds = _plan(begun, desc.size, writer.held, parts)
        cursors = [a for a, _ in bounds]
        await self._run(writer.begin_segments)

        def done() -> int:
            return writer.offset + held + _span_bytes(_reached(bounds, cursors))

        async def segment(i: int) -> None:
            a, b = bounds[i]
            async with self._client.open_blob(ref, desc.digest, size=desc.size, offset=a,
                                              end=b) as stream:
                if i == 0:
                    await self._pump(ref, stream.content, writer, desc, on_progress=done)
                    reached = writer.offset
                else:
                    def sink(batch: list[bytes], i: int = i) -> None:
                        cursors[i] = writer.write_at(cursors[i], batch)

                    await self._pump(ref, stream.content, writer, desc, sink=sink,
                                     on_progress=done)
                    reached = cursors[i]
            if reached != b + 1:
                raise TransportError(f"range {a}-{b} of blob {desc.digest} ended at {reached}")

        tasks = [asyncio.create_task(segment(i)) for i in range(len(bounds))]
        try:
            await asyncio.gather(*tasks)
        except BaseException as exc:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.hold(_reached(bounds, cursors))
            await self._segments_failed(exc, ref, desc, writer, done() - held - begun)
            raise
        await self._run(writer.commit_segments)
        return desc.size - begun - held

    async def _segments_failed(self, exc: BaseException, ref: Reference, desc: Descriptor,
                               writer: BlobWriter, fetched: int) -> None:
        """Raise what a failed parallel-range download means (returns for anything
        that is not a transfer failure, for the caller to re-raise). ``fetched``: the
        bytes this attempt received (the ranges that arrived are held for the next)."""
        if isinstance(exc, RangeNotHonoured):
            self._no_ranges.add(ref.api_host)  # from now on one stream per blob
            retry = TransportError(f"{exc}; fetching {desc.digest} in one stream")
            raise _Partial(retry, fetched) from exc
        if isinstance(exc, (PullerError, *self._client.transport_errors)):
            err = exc if isinstance(exc, PullerError) else self._client.map_transport(
                exc, ref.api_host, f"fetching blob {desc.digest}")
            if isinstance(err, SizeMismatch):
                await self._run(writer.restart)
                raise err from exc
            raise _Partial(err, fetched) from exc

    async def _segments_in_threads(self, req: BlobRequest, ref: Reference, desc: Descriptor,
                                   writer: BlobWriter, parts: int) -> int:
        """:meth:`_download_segments` with each range received by a worker thread
        (:func:`puller.threadfetch.fetch_range`): the first hashes and appends, the
        others write at their offsets; once all are in, the rest is hashed from disk."""
        loop = asyncio.get_running_loop()
        begun = writer.offset
        held = _span_bytes(writer.held)
        bounds = _plan(begun, desc.size, writer.held, parts)
        cursors = [a for a, _ in bounds]
        digest = str(desc.digest)
        what = f"fetching blob {desc.digest}"
        await self._run(writer.begin_segments)
        handles = [Handle() for _ in bounds]

        def received() -> int:
            return writer.offset - begun + _span_bytes(_reached(bounds, cursors))

        def report() -> None:  # in the loop
            self._progress(desc.digest, digest, begun + held + received(), desc.size)

        progress = self._reporter(loop, lambda _: report())

        def segment(i: int) -> None:  # in a worker thread
            a, b = bounds[i]
            if i == 0:
                put: Callable[[memoryview], object] = writer.write
            else:
                def put(piece: memoryview, i: int = i) -> None:
                    cursors[i] = writer.write_at(cursors[i], [piece])
            fetch_range(req, a, b, desc.size, put=put, handle=handles[i], progress=progress,
                        pool=self._connections, what=what)

        pool = self._body_pool()
        futures = [loop.run_in_executor(pool, segment, i) for i in range(len(bounds))]
        gathered = asyncio.gather(*futures)
        try:
            await asyncio.shield(gathered)
        except BaseException as exc:
            # Cancelled, the shield drops the gather: its error is retrieved here instead
            # of printed as "exception was never retrieved" when it is collected.
            gathered.add_done_callback(_retrieve)
            for h in handles:
                h.cancel()
            while not all(f.done() for f in futures):  # no thread may outlive the writer
                try:
                    await asyncio.wait(futures)
                except asyncio.CancelledError:
                    pass
            for f in futures:
                if not f.cancelled():
                    f.exception()  # retrieved
            writer.hold(_reached(bounds, cursors))  # every thread has stopped
            if isinstance(exc, NotPlain):
                raise
            await self._segments_failed(exc, ref, desc, writer, received())
            raise
        await self._run(writer.commit_segments)
        return desc.size - begun - held

    async def _pump(self, ref: Reference, content: Any, writer: BlobWriter,
                    desc: Descriptor, sink: Callable[[list[bytes]], object] | None = None,
                    on_progress: Callable[[], int] | None = None,
                    keep_tail: bool = False) -> list[bytes]:
        """Read the body and hand it to the writer in batches, one batch in flight.

        ``sink`` takes each batch in a worker thread (default: hash and append);
        ``on_progress`` says how many bytes of the blob are done, for progress events.
        With ``keep_tail`` the last, partial batch is returned unwritten, for the caller
        to finish the blob with in one thread hop (a small blob is then one hop)."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[None] | None = None
        batch: list[bytes] = []
        batched = 0
        digest = str(desc.digest)
        sink = sink or writer.write_many
        done = on_progress or (lambda: writer.offset)

        def report(_: object) -> None:  # progress = bytes on disk
            self._progress(desc.digest, digest, done(), desc.size)

        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _BATCH:
                    if pending is not None:
                        # Shielded: cancelling us must not mark a running write as done.
                        await asyncio.shield(pending)
                    pending = loop.run_in_executor(self._executor, sink, batch)
                    pending.add_done_callback(report)
                    batch = []
                    batched = 0
            if pending is not None:
                await asyncio.shield(pending)
            if keep_tail:
                tail, batch = batch, []
                return tail
            if batch:
                await loop.run_in_executor(self._executor, sink, batch)
                batch = []
            report(None)
            return []
        finally:
            # Never let the writer be closed while a worker thread still writes to it.
            while pending is not None and not pending.done():
                try:
                    await asyncio.wait([pending])
                except asyncio.CancelledError:
                    pass  # the error or cancellation that brought us here goes on after this
            healthy = pending is None or (not pending.cancelled() and pending.exception() is None)
            if batch and healthy:
                # The connection broke or we were cancelled: keep what did arrive (at most
                # one batch) so the next attempt resumes after it. It is verified with the
                # rest at commit.
                try:
                    sink(batch)
                except PullerError:
                    pass

    def _reporter(self, loop: asyncio.AbstractEventLoop,
                  report: Callable[[int], None]) -> Callable[[int], None]:
        """A callback for worker threads to report through (a blob's start, its
        progress): runs ``report`` in the loop, or does nothing at all when nobody
        listens (no loop wake-up per report)."""
        if self._emit is None:
            return _ignore

        def in_loop(done: int) -> None:
            loop.call_soon_threadsafe(report, done)

        return in_loop

    def _progress(self, d: Digest, digest: str, complete: int, total: int) -> None:
        self._notify(d, lambda im: BlobProgress(ref=im, digest=digest, complete=complete,
                                                total=total))


def _ignore(_: int) -> None:
    pass


def _ranges(begun: int, size: int, parts: int) -> list[tuple[int, int]]:
    """Bytes ``begun``..``size - 1`` as ``parts`` (first, last) ranges, the last taking
    the remainder."""
    step = (size - begun) // parts
    return [(begun + i * step, begun + (i + 1) * step - 1 if i < parts - 1 else size - 1)
            for i in range(parts)]


def _plan(begun: int, size: int, held: list[tuple[int, int]],
          parts: int) -> list[tuple[int, int]]:
    """The (first, last) ranges to fetch: bytes ``begun``..``size - 1`` less the ``held``
    ones (``(start, end)``, end exclusive, after ``begun``), about ``parts`` of them
    shared among the gaps by size, at least one a gap. The first starts at ``begun``."""
    gaps, at = [], begun
    for a, b in held:
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    if at < size:
        gaps.append((at, size))
    total = sum(b - a for a, b in gaps)
    out: list[tuple[int, int]] = []
    for a, b in gaps:
        k = max(1, min(b - a, round(parts * (b - a) / total)))
        out += _ranges(a, b, k)
    return out


def _reached(bounds: list[tuple[int, int]], cursors: list[int]) -> list[tuple[int, int]]:
    """What the ranges after the first (which streams into the hash) have on disk, as
    (start, end) spans, end exclusive."""
    return [(a, c) for (a, _), c in zip(bounds[1:], cursors[1:], strict=True) if c > a]


def _span_bytes(spans: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in spans)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _close_opened(fut: asyncio.Future[BlobWriter | None]) -> None:
    if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
        fut.result().close()  # type: ignore[union-attr]


class _Partial(Exception):
    """A transfer failed after some bytes were stored; carries the count for reporting."""

    def __init__(self, error: PullerError, fetched: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.fetched = fetched
