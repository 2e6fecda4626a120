"""Moving images to registries: push from the store, copy and mirror between registries.

One :class:`Transfer` serves a whole run (one image or a catalogue):

- every blob goes to a target repository at most once per run: a digest already known
  to be there is not asked about again, one already in another repository of the same
  registry is cross-repository mounted (``POST ?mount=&from=``), and a digest wanted
  by several repositories at once is uploaded by one of them while the others wait and
  then mount it;
- a blob the target lacks is streamed, from the store or straight from the source
  registry, never held in memory: in one ``PUT`` when small, else in ``PATCH`` chunks of
  ``chunk_size``; a chunk that fails is resumed from what the registry says it holds
  (``GET`` on the upload), or the upload starts again when the registry has lost it;
- at most ``concurrency`` uploads run at once, across all images;
- manifests are ``PUT`` byte for byte, children before their index, so digests at the
  target are the source's.

Nothing here imports aiohttp at import time: :mod:`puller.transfer` (the command line)
imports this module only inside its command handlers.
"""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Protocol

from . import mediatypes
from .digest import Digest
from .errors import DigestMismatch, IntegrityError, ManifestError, NoMatchingPlatform, NotFound, \
    PullerError, SizeMismatch, StoreError, TransportError, UnsupportedManifest
from .manifest import MAX_MANIFEST_SIZE, Descriptor, ImageIndex, ImageManifest, parse_manifest
from .platform import Platform, select
from .reference import Reference

if TYPE_CHECKING:  # pragma: no cover
    from .client import RegistryClient
    from .scheduler import BlobScheduler
    from .store import ContentStore

__all__ = ["TransferOptions", "ImageStats", "Transfer", "StoreProvider", "RegistryProvider",
           "ManifestProvider"]

_READ = 1 << 20  # bytes read from the store at a time


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferOptions:
    concurrency: int = 8  # uploads at once, across all images
    chunk_size: int = 32 << 20  # blobs above this go up in PATCH chunks of this size
    mount: bool = True  # cross-repository mounts within the target registry
    retries: int = 5  # extra attempts of an upload after a transient failure
    threaded: bool = True  # send blob bytes from worker threads (see puller.threadpush)

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 256:
            raise ValueError("concurrency must be between 1 and 256")
        if self.chunk_size < 1024:
            raise ValueError("chunk size must be at least 1024 bytes")
        if self.retries < 0:
            raise ValueError("retries must not be negative")


@dataclass(slots=True)
class ImageStats:
    """What one image (or a whole run, summed) cost."""

    uploaded: int = 0  # blobs whose bytes were sent
    mounted: int = 0  # blobs mounted from another repository of the target registry
    existed: int = 0  # blobs the target repository already had
    bytes_uploaded: int = 0
    bytes_reused: int = 0  # mounted or already there
    manifests: int = 0  # manifests PUT

    def add(self, other: ImageStats) -> None:
        for name in self.__slots__:  # type: ignore[attr-defined]
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


# -- where blob bytes and manifests come from ---------------------------------------------

class BlobSource(Protocol):
    async def prepare(self) -> None: ...

    def open(self, offset: int) -> Any:
        """An async context manager yielding an async iterator of the bytes from
        ``offset`` on."""

    async def thread_reader(self, offset: int, handle: Any, pool: Any
                            ) -> Callable[[], Any] | None:
        """A function that opens the bytes from ``offset`` on as a
        :class:`puller.threadpush.Reader`, called in a worker thread; None when this
        source can't be read that way."""

    async def refresh(self) -> None:
        """Earn fresh credentials after the source refused the ones a thread sent."""


def _close_opened(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


def _close_after(read: asyncio.Future[bytes], fd: int) -> None:
    if not read.cancelled():
        read.exception()  # retrieved: nobody waits for this read any more
    os.close(fd)


class _StoreBlob:
    def __init__(self, store: ContentStore, desc: Descriptor) -> None:
        self.store = store
        self.desc = desc

    async def prepare(self) -> None:
        if not self.store.has(self.desc.digest, self.desc.size):
            raise StoreError(f"blob {self.desc.digest} is not in the store {self.store.root}")

    @asynccontextmanager
    async def open(self, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        path = self.store.blob_path(self.desc.digest)
        loop = asyncio.get_running_loop()
        # A cancelled await leaves its thread running: the file is closed only once no
        # thread can still be using it (a descriptor closed under a pread could be
        # reused by another open meanwhile), and one opened after a cancel is closed.
        opening = loop.run_in_executor(None, lambda: os.open(path, os.O_RDONLY
                                                             | os.O_NOFOLLOW))
        try:
            fd = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
        except OSError as exc:
            raise StoreError(f"cannot read blob {self.desc.digest} from the store: "
                             f"{exc.strerror}") from exc
        reading: asyncio.Future[bytes] | None = None

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal reading
            pos = offset
            while True:
                reading = loop.run_in_executor(None, os.pread, fd, _READ, pos)
                data = await asyncio.shield(reading)
                if not data:
                    return
                pos += len(data)
                yield data

        try:
            yield chunks()
        finally:
            if reading is not None and not reading.done():
                reading.add_done_callback(lambda f: _close_after(f, fd))
            else:
                os.close(fd)

    async def thread_reader(self, offset: int, handle: Any, pool: Any
                            ) -> Callable[[], Any] | None:
        from .threadpush import FileReader

        path = str(self.store.blob_path(self.desc.digest))
        digest = self.desc.digest

        def make() -> Any:
            try:
                return FileReader(path, offset)
            except OSError as exc:
                raise StoreError(f"cannot read blob {digest} from the store: "
                                 f"{exc.strerror}") from exc

        return make

    async def refresh(self) -> None:
        pass


class _RegistryBlob:
    def __init__(self, client: RegistryClient, ref: Reference, desc: Descriptor) -> None:
        self.client = client
        self.ref = ref
        self.desc = desc

    async def prepare(self) -> None:
        pass

    async def thread_reader(self, offset: int, handle: Any, pool: Any
                            ) -> Callable[[], Any] | None:
        from .threadpush import RegistryReader

        req = await self.client.blob_request(self.ref, self.desc.digest)
        if req is None:
            return None
        size, what = self.desc.size, f"fetching blob {self.desc.digest}"
        return lambda: RegistryReader(req, offset, size, handle=handle, pool=pool, what=what)

    async def refresh(self) -> None:
        await self.client.blob_exists(self.ref, self.desc.digest)

    @asynccontextmanager
    async def open(self, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self.client.open_blob(self.ref, self.desc.digest, size=self.desc.size,
                                         offset=offset) as stream:
            skip = offset - stream.start  # the source ignored our Range: drop the prefix

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal skip
                content = stream.content
                read_nowait = getattr(content, "read_nowait", None)  # aiohttp's
                try:
                    while True:
                        data = await content.readany()
                        if not data:
                            return
                        # Fewer, larger writes to the target: join what is already
                        # buffered (bounded; nothing waits for more to arrive).
                        if read_nowait is not None and len(data) < _READ and \
                                content.is_eof() is False:
                            parts = [data]
                            size = len(data)
                            while size < _READ:
                                more = read_nowait(_READ - size)
                                if not more:
                                    break
                                parts.append(more)
                                size += len(more)
                            if len(parts) > 1:
                                data = b"".join(parts)
                        if skip:
                            cut = min(skip, len(data))
                            skip -= cut
                            data = data[cut:]
                            if not data:
                                continue
                        yield data
                except self.client.transport_errors as exc:
                    raise self.client.map_transport(exc, self.ref.api_host,
                                                    f"fetching blob {self.desc.digest}") from exc

            yield chunks()


class _Empty:
    """A reader with nothing in it (an upload whose bytes are all sent already)."""

    def readinto(self, view: memoryview) -> int:
        return 0

    def close(self) -> None:
        pass


_EMPTY = _Empty()


class _CachedBlob(_StoreBlob):
    """A source blob fetched into the store first (``--via-store``), then read from disk."""

    def __init__(self, scheduler: BlobScheduler, store: ContentStore, ref: Reference,
                 desc: Descriptor) -> None:
        super().__init__(store, desc)
        self.scheduler = scheduler
        self.ref = ref

    async def prepare(self) -> None:
        await self.scheduler.fetch(self.ref, self.desc, image=str(self.ref))


class ManifestProvider(Protocol):
    """Where an image's manifests and blobs are read from."""

    name: str  # for messages

    async def manifest(self, digest: Digest, media_type: str | None) -> tuple[bytes, str | None]:
        ...

    def blob(self, desc: Descriptor) -> BlobSource: ...

    def mount_hints(self, target: Reference, digest: Digest) -> list[str]: ...


class RegistryProvider:
    """Manifests and blobs read from a registry repository (``copy``, ``mirror``)."""

    def __init__(self, client: RegistryClient, ref: Reference, *,
                 scheduler: BlobScheduler | None = None,
                 store: ContentStore | None = None) -> None:
        self.client = client
        self.ref = ref
        self.name = ref.name
        self._scheduler = scheduler
        self._store = store

    async def manifest(self, digest: Digest, media_type: str | None) -> tuple[bytes, str | None]:
        if self._store is not None and self._store.has(digest):
            data = await asyncio.to_thread(self._store.read, digest, max_size=MAX_MANIFEST_SIZE)
            return data, media_type
        fetched = await self.client.get_manifest(self.ref, str(digest))
        if self._store is not None:
            await asyncio.to_thread(self._store.put, digest, fetched.data)
        return fetched.data, fetched.media_type or media_type

    async def fetch_top(self, identifier: str) -> tuple[Digest, bytes, str | None]:
        """``GET`` the manifest ``identifier`` (a tag or digest) names: its digest,
        bytes and media type."""
        fetched = await self.client.get_manifest(self.ref, identifier)
        if self._store is not None:
            await asyncio.to_thread(self._store.put, fetched.digest, fetched.data)
        return fetched.digest, fetched.data, fetched.media_type

    def blob(self, desc: Descriptor) -> BlobSource:
        if self._scheduler is not None and self._store is not None:
            return _CachedBlob(self._scheduler, self._store, self.ref, desc)
        return _RegistryBlob(self.client, self.ref, desc)

    def mount_hints(self, target: Reference, digest: Digest) -> list[str]:
        if target.registry == self.ref.registry and target.repository != self.ref.repository:
            return [self.ref.repository]
        return []


class StoreProvider:
    """Manifests and blobs read from the store (``push``). Mount hints come from the
    store's other references on the target registry: an image pulled from (or tagged
    for) ``reg/a`` tells that ``reg/a`` has its blobs."""

    def __init__(self, store: ContentStore, name: str) -> None:
        self.store = store
        self.name = name
        self._hints: dict[str, dict[Digest, list[str]]] = {}  # registry -> digest -> repos

    async def manifest(self, digest: Digest, media_type: str | None) -> tuple[bytes, str | None]:
        if not self.store.has(digest):
            raise NotFound(f"manifest {digest} of {self.name} is not in the store")
        data = await asyncio.to_thread(self.store.read, digest, max_size=MAX_MANIFEST_SIZE)
        return data, media_type

    def blob(self, desc: Descriptor) -> BlobSource:
        return _StoreBlob(self.store, desc)

    def mount_hints(self, target: Reference, digest: Digest) -> list[str]:
        table = self._hints.get(target.registry)
        if table is None:
            table = self._hints[target.registry] = self._scan(target.registry)
        return [r for r in table.get(digest, ()) if r != target.repository]

    def _scan(self, registry: str) -> dict[Digest, list[str]]:
        out: dict[Digest, list[str]] = {}
        try:
            entries = self.store.read_index()
        except PullerError:
            return out
        for e in entries:
            name = (e.get("annotations") or {}).get(mediatypes.ANNOTATION_REF_NAME)
            try:
                ref = Reference.parse(name) if isinstance(name, str) else None
                top = Digest.parse(e.get("digest", ""))
            except PullerError:
                continue
            if ref is None or ref.registry != registry:
                continue
            for d in self._blobs_below(top, depth=0):
                repos = out.setdefault(d, [])
                if ref.repository not in repos:
                    repos.append(ref.repository)
        return out

    def _blobs_below(self, digest: Digest, depth: int) -> list[Digest]:
        if depth > 3 or not self.store.has(digest):
            return []
        try:
            m = parse_manifest(self.store.read(digest, max_size=MAX_MANIFEST_SIZE))
        except PullerError:
            return []
        if isinstance(m, ImageIndex):
            out: list[Digest] = []
            for c in m.manifests:
                out += self._blobs_below(c.digest, depth + 1)
            return out
        return [m.config.digest] + [layer.digest for layer in m.layers]


# -- the engine ---------------------------------------------------------------------------

Emit = Callable[[dict[str, Any]], None]


class Transfer:
    """Puts images into registries; one per run, shared by every image of the run."""

    def __init__(self, client: RegistryClient, options: TransferOptions | None = None, *,
                 emit: Emit | None = None) -> None:
        self.client = client
        self.options = options or TransferOptions()
        self._emit = emit or (lambda ev: None)
        self._slots = asyncio.Semaphore(self.options.concurrency)
        # (registry, repository, digest) -> the task that put it there (or found it)
        self._blobs: dict[tuple[str, str, Digest], asyncio.Task[tuple[str, str | None]]] = {}
        # (registry, digest) -> repositories known to hold it
        self._located: dict[tuple[str, Digest], list[str]] = {}
        # (registry, digest) -> an upload of it in progress in this run
        self._uploads: dict[tuple[str, Digest], asyncio.Future[str]] = {}
        self.stats = ImageStats()
        self._pool: Any = None  # http.client connections of the upload threads
        self._threads: Any = None  # one worker thread per upload in flight

    async def aclose(self) -> None:
        """Cancel uploads nobody waits for any more (each blob's task is shielded from
        the images that wait on it) and wait until they have ended, stop the upload
        threads and close their connections. Runs to its end even when cancelled
        (everything it waits for is bounded: the threads were told to stop), then
        re-raises the cancellation."""
        from .threadfetch import settle

        cancelled = False
        while True:
            tasks = [t for t in self._blobs.values() if not t.done()]
            if not tasks:
                break
            for t in tasks:
                t.cancel()
            cancelled |= await settle(asyncio.gather(*tasks, return_exceptions=True))
        threads, self._threads = self._threads, None
        if threads is not None:
            cancelled |= await settle(asyncio.to_thread(threads.shutdown, wait=True))
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if cancelled:
            raise asyncio.CancelledError

    # -- blobs --------------------------------------------------------------------------

    async def ensure_blob(self, target: Reference, desc: Descriptor, source: BlobSource,
                          hints: Iterable[str] = ()) -> tuple[str, str | None]:
        """Make sure ``target``'s repository holds ``desc``. Returns ``("exists", None)``,
        ``("mounted", from_repository)`` or ``("uploaded", None)``; a blob another image
        of this run already put there counts as ``exists``."""
        key = (target.registry, target.repository, desc.digest)
        task = self._blobs.get(key)
        if task is None:
            task = asyncio.create_task(self._ensure(target, desc, source, list(hints)))
            self._blobs[key] = task
            task.add_done_callback(lambda t, k=key: self._settled(k, t))
            return await asyncio.shield(task)
        await asyncio.shield(task)
        return "exists", None

    def _settled(self, key: tuple[str, str, Digest], task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            if self._blobs.get(key) is task:
                del self._blobs[key]  # let a later image try again

    async def _ensure(self, target: Reference, desc: Descriptor, source: BlobSource,
                      hints: list[str]) -> tuple[str, str | None]:
        client = self.client
        digest, repo = desc.digest, target.repository
        where = self._located.setdefault((target.registry, digest), [])
        if repo in where:
            return "exists", None
        busy = self._uploads.get((target.registry, digest))
        if busy is None:
            if await client.blob_exists(target, digest, scope=client.push_scope(target)) \
                    is not None:
                where.append(repo)
                return "exists", None
            busy = self._uploads.get((target.registry, digest))
        if busy is not None:  # another repository of this run is uploading it: wait, mount
            try:
                await asyncio.shield(busy)
            except PullerError:
                pass
        location: str | None = None
        if self.options.mount:
            candidates = [r for r in where if r != repo]
            candidates += [h for h in hints if h != repo and h not in candidates]
            for frm in candidates[:3]:
                got = await client.mount_blob(target, digest, frm)
                if got is None:
                    where.append(repo)
                    return "mounted", frm
                if location is not None:
                    await client.cancel_upload(target, location)
                location = got
        key = (target.registry, digest)
        mine: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        owner = key not in self._uploads
        if owner:
            self._uploads[key] = mine
        try:
            async with self._slots:
                await source.prepare()
                await self._upload(target, desc, source, location)
            where.append(repo)
            if owner:
                mine.set_result(repo)
        except BaseException as exc:
            if owner:
                mine.set_exception(exc if isinstance(exc, PullerError)
                                   else PullerError("upload cancelled"))
                mine.exception()  # retrieved: waiters only need to know it ended
            raise
        finally:
            if owner and self._uploads.get(key) is mine:
                del self._uploads[key]
        return "uploaded", None

    async def _upload(self, target: Reference, desc: Descriptor, source: BlobSource,
                      location: str | None) -> None:
        from .client import retry_delay

        client = self.client
        size, digest = desc.size, desc.digest
        chunk = self.options.chunk_size
        attempt = 0
        offset = 0
        while True:
            try:
                if location is None:
                    location = await client.start_upload(target)
                    offset = 0
                if self.options.threaded and await self._upload_in_thread(
                        target, desc, source, location, offset):
                    return
                if size <= chunk:
                    async with source.open(0) as data:
                        await client.finish_upload(target, location, digest,
                                                   body=_exactly(data, size, digest), length=size)
                    return
                async with source.open(offset) as data:
                    reader = _Chunks(data, digest)
                    while offset < size:
                        n = min(chunk, size - offset)
                        location, held = await client.upload_chunk(
                            target, location, reader.take(n), offset, n)
                        if held != offset + n:
                            raise TransportError(f"{target.api_host} holds {held} bytes of "
                                                 f"{digest} after a chunk ending at {offset + n}")
                        offset = held
                        self._progress(target, digest, offset, size)
                await client.finish_upload(target, location, digest)
                return
            except (PullerError, *client.transport_errors) as exc:
                err = exc if isinstance(exc, PullerError) else client.map_transport(
                    exc, target.api_host, f"uploading {digest}")
                # A chunked upload that failed in a thread says where it had got to.
                location = getattr(exc, "upload_location", None) or location
                if not err.retryable or attempt >= self.options.retries:
                    if location is not None:
                        await client.cancel_upload(target, location)
                    raise err from exc
                attempt += 1
                delay = retry_delay(client.options, attempt - 1, err)
                self._emit({"event": "blob.retry", "ref": str(target), "digest": str(digest),
                            "attempt": attempt, "error": str(err), "delay": round(delay, 3)})
                await asyncio.sleep(delay)
                if location is None or size <= chunk or isinstance(err, IntegrityError):
                    if location is not None:
                        await client.cancel_upload(target, location)
                    # A fresh upload: a half-sent PUT can't be resumed, and bytes that
                    # did not hash right must not be built upon.
                    location = None
                    continue
                try:
                    location, offset = await client.upload_status(target, location)
                    self._emit({"event": "blob.resumed", "ref": str(target),
                                "digest": str(digest), "offset": offset, "total": size})
                except PullerError:
                    location = None  # the registry lost (or won't resume) it: start again

    def _progress(self, target: Reference, digest: Digest, done: int, size: int) -> None:
        self._emit({"event": "blob.progress", "ref": str(target), "digest": str(digest),
                    "complete": done, "total": size})

    async def _upload_in_thread(self, target: Reference, desc: Descriptor,
                                source: BlobSource, location: str, offset: int) -> bool:
        """Send the bytes from ``offset`` on in a worker thread (:mod:`puller.threadpush`).
        False when this upload can't go that way (the caller sends it itself)."""
        from concurrent.futures import ThreadPoolExecutor

        from .threadfetch import Handle, NotPlain, in_thread
        from .threadpush import send_blob
        from .transport import ConnectionPool

        client = self.client
        digest = desc.digest
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ConnectionPool(add_hosts=dict(client.options.add_hosts),
                                        timeout=client.options.connect_timeout)
            self._threads = ThreadPoolExecutor(max_workers=self.options.concurrency,
                                               thread_name_prefix="puller-upload")
        for refreshed in (False, True):
            handle = Handle()
            up = await client.upload_request(target, location)
            make = await source.thread_reader(offset, handle, self._pool)
            if up is None or make is None:
                return False

            def progress(done: int) -> None:  # in the worker thread
                loop.call_soon_threadsafe(self._progress, target, digest, done, desc.size)

            def run(up: Any = up, make: Any = make, handle: Any = handle,
                    offset: int = offset) -> None:
                try:
                    # Nothing left to read when the registry holds every byte already.
                    reader = make() if offset < desc.size else _EMPTY
                except NotPlain as np:
                    np.side = "source"
                    raise
                try:
                    send_blob(up, reader, digest=digest, size=desc.size, offset=offset,
                              chunk=self.options.chunk_size, handle=handle, pool=self._pool,
                              progress=progress)
                finally:
                    reader.close()

            try:  # when cancelled, the thread stops before anyone else sends
                await in_thread(self._threads, run, handle)
                return True
            except NotPlain as np:
                from_source = np.side == "source"
                challenged = np.status == 401 and np.headers is not None and \
                    np.headers.get("WWW-Authenticate")
                if challenged and not refreshed:  # a token expired: earn a new one, again
                    if from_source:
                        await source.refresh()
                    else:
                        # (the registry may hold more by now: go on from there)
                        location, offset = await client.upload_status(
                            target, getattr(np, "upload_location", None) or location)
                    continue
                err = self._not_plain(np, target, desc, source, from_source)
                err.upload_location = getattr(np, "upload_location", None)  # type: ignore
                raise err from None
        return False  # not reached

    def _not_plain(self, np: Any, target: Reference, desc: Descriptor, source: BlobSource,
                   from_source: bool) -> PullerError:
        from .client import error_code

        if np.status is None:
            host = getattr(source, "ref", target).api_host if from_source else target.api_host
            err = TransportError(f"{host} sent an unusable answer ({np}) while "
                                 f"{'fetching' if from_source else 'uploading'} blob "
                                 f"{desc.digest}")
            err.retryable = False
            return err
        code, detail = error_code(np.body)
        if from_source:
            ref = source.ref  # type: ignore[attr-defined]
            err = self.client.status_error(np.status, np.headers, ref.api_host,
                                           f"fetching blob {desc.digest}", code=code,
                                           detail=detail)
            if isinstance(err, NotFound):
                err = NotFound(f"blob {desc.digest} not found in {ref.name}", status=404,
                               host=ref.api_host)
            return err
        if code in ("DIGEST_INVALID", "SIZE_INVALID"):
            return DigestMismatch(f"{target.api_host} refused blob {desc.digest}: the bytes "
                                  f"sent do not hash to it")
        return self.client.status_error(np.status, np.headers, target.api_host,
                                        f"uploading blob {desc.digest} to {target.name}",
                                        code=code, detail=detail)

    # -- manifests ------------------------------------------------------------------------

    async def push_image(self, provider: ManifestProvider, data: bytes, media_type: str | None,
                         target: Reference, identifier: str, *,
                         stats: ImageStats | None = None,
                         on_blob: Callable[[Descriptor, str, str | None], None] | None = None
                         ) -> Digest:
        """Put the manifest ``data`` (and everything below it) into ``target`` under
        ``identifier`` (a tag or its digest). Returns its digest."""
        stats = stats if stats is not None else ImageStats()
        parsed = parse_manifest(data, media_type)
        if isinstance(parsed, ImageIndex):
            await _gather_all(*(self._child(provider, target, c, stats, on_blob, 1)
                                for c in parsed.manifests))
        else:
            await self._blobs_of(provider, target, parsed, stats, on_blob)
        digest = await self.client.put_manifest(target, identifier, data, parsed.media_type)
        stats.manifests += 1
        return digest

    async def _child(self, provider: ManifestProvider, target: Reference, desc: Descriptor,
                     stats: ImageStats, on_blob: Any, depth: int) -> None:
        if depth > 4:
            raise UnsupportedManifest(f"indexes nested too deeply in {provider.name}")
        if desc.media_type not in mediatypes.MANIFESTS:
            raise UnsupportedManifest(f"{provider.name}: index entry {desc.digest} has media "
                                      f"type {desc.media_type}, which can't be copied")
        have = await self.client.head_manifest(target, str(desc.digest))
        if have is not None and have[0] == desc.digest:
            return  # a manifest in the registry implies all it points to is there too
        data, media_type = await provider.manifest(desc.digest, desc.media_type)
        if len(data) != desc.size:
            raise SizeMismatch(f"manifest {desc.digest} of {provider.name} is {len(data)} "
                               f"bytes, the index says {desc.size}")
        parsed = parse_manifest(data, media_type or desc.media_type)
        if isinstance(parsed, ImageIndex):
            await _gather_all(*(self._child(provider, target, c, stats, on_blob, depth + 1)
                                for c in parsed.manifests))
        else:
            await self._blobs_of(provider, target, parsed, stats, on_blob)
        await self.client.put_manifest(target, str(desc.digest), data, parsed.media_type)
        stats.manifests += 1

    async def _blobs_of(self, provider: ManifestProvider, target: Reference, m: ImageManifest,
                        stats: ImageStats, on_blob: Any) -> None:
        unique: dict[Digest, Descriptor] = {}
        for b in [m.config, *m.layers]:
            if b.urls:  # non-distributable: the registry doesn't need (or want) the bytes
                continue
            prior = unique.get(b.digest)
            if prior is not None and prior.size != b.size:
                raise ManifestError(f"{provider.name}: blob {b.digest} is listed with two sizes")
            unique.setdefault(b.digest, b)

        async def one(b: Descriptor) -> None:
            status, frm = await self.ensure_blob(target, b, provider.blob(b),
                                                 provider.mount_hints(target, b.digest))
            if status == "uploaded":
                stats.uploaded += 1
                stats.bytes_uploaded += b.size
            elif status == "mounted":
                stats.mounted += 1
                stats.bytes_reused += b.size
            else:
                stats.existed += 1
                stats.bytes_reused += b.size
            if on_blob is not None:
                on_blob(b, status, frm)

        await _gather_all(*(one(b) for b in unique.values()))


def choose_platforms(data: bytes, media_type: str | None, platforms: list[Platform] | None,
                     name: str) -> tuple[bytes, str | None, Descriptor | None]:
    """What to put at the target for an index when only some ``platforms`` are wanted.

    ``None``: all of it, byte for byte. One platform: that image's descriptor (the caller
    fetches its manifest). Several: a new index listing just those entries (a new
    digest); platforms the index doesn't have are left out (a nightly mirror of
    ``amd64, arm64`` copies an amd64-only image rather than failing it), and an index
    with none of them is :class:`NoMatchingPlatform`. Returns (bytes, media type,
    descriptor of the one image or None)."""
    parsed = parse_manifest(data, media_type)
    if not platforms or not isinstance(parsed, ImageIndex):
        return data, media_type, None
    images = [d for d in parsed.images() if d.media_type in mediatypes.IMAGE_MANIFESTS]
    chosen: list[Descriptor] = []
    for p in platforms:
        try:
            d = select([(d.platform, d) for d in images], p)
        except NoMatchingPlatform:
            if len(platforms) == 1:
                raise
            continue
        if d not in chosen:
            chosen.append(d)
    if not chosen:
        raise NoMatchingPlatform(f"{name} has none of the platforms "
                                 f"{', '.join(map(str, platforms))}")
    if len(chosen) == 1:
        return data, media_type, chosen[0]
    doc = json.loads(data)
    keep = {str(d.digest) for d in chosen}
    doc["manifests"] = [e for e in doc.get("manifests") or [] if e.get("digest") in keep]
    new = json.dumps(doc, separators=(",", ":")).encode()
    return new, parsed.media_type, None


async def _exactly(data: AsyncIterator[bytes], size: int, digest: Digest) -> AsyncIterator[bytes]:
    sent = 0
    async for piece in data:
        if sent + len(piece) > size:
            raise SizeMismatch(f"blob {digest} is longer than its {size} bytes at the source")
        sent += len(piece)
        yield piece
    if sent != size:
        raise TransportError(f"blob {digest} ended after {sent} of {size} bytes at the source")


class _Chunks:
    """Hands out consecutive slices of one byte stream as separate request bodies."""

    def __init__(self, data: AsyncIterator[bytes], digest: Digest) -> None:
        self._it = data.__aiter__()
        self._left = b""
        self._digest = digest

    async def take(self, n: int) -> AsyncIterator[bytes]:
        while n > 0:
            if not self._left:
                try:
                    self._left = await self._it.__anext__()
                except StopAsyncIteration:
                    raise TransportError(f"blob {self._digest} ended early at the source") \
                        from None
            piece, self._left = self._left[:n], self._left[n:]
            n -= len(piece)
            yield piece


async def _gather_all(*aws: Any) -> list[Any]:
    """Like gather, but every awaitable finishes (or is cancelled) before the first error
    is raised, so no upload is left running behind a failed image."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for t in tasks:
        if t.exception() is not None:
            for other in tasks:
                if other is not t and not other.cancelled():
                    other.exception()
            raise t.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]
