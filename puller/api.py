"""The library API: :class:`Puller`, the options it takes and the results it returns.

::

    async with Puller(store="./cache", on_event=print) as p:
        result = await p.pull("alpine")
        results = await p.pull_many(["alpine", "127.0.0.1:5000/team/api:3"])

One ``Puller`` holds one registry client, one content store and one blob scheduler,
so every image pulled through it shares connections, the concurrency limit and
deduplication.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from . import mediatypes
from .client import DEFAULT_CREDENTIALS, ClientOptions, FetchedManifest, RegistryClient
from .digest import Digest
from .errors import (ManifestError, NoMatchingPlatform, PullerError, SizeMismatch,
                     UnsupportedManifest)
from .events import BlobDone, BlobQueued, Event, Listener, ManifestResolved, PullDone, \
    PullFailed, PullStarted
from .manifest import MAX_MANIFEST_SIZE, Descriptor, ImageIndex, ImageManifest, parse_manifest
from .platform import Platform, select
from .record import Record
from .reference import Reference
from .scheduler import BlobScheduler
from .store import ContentStore, default_store_path

__all__ = ["Puller", "PullOptions", "PullResult", "ImageResult"]

_GC_POLL = 0.1  # seconds between looks at a store that a gc holds
_log = logging.getLogger("puller")


class PullOptions(Record, kw_only=True):
    """What to pull. Frozen and validated."""

    platform: Platform | None = None  # None: the host's platform
    all_platforms: bool = False  # every image of an index (never attestations)
    concurrency: int = 8  # blobs downloaded at once, across all images
    include_foreign: bool = False  # also fetch non-distributable layers that carry URLs
    # A big blob is fetched as up to this many byte ranges at once when there are fewer
    # blobs than ``concurrency`` to fetch (1 turns it off); each range is at least
    # ``segment_min`` bytes.
    segments: int = 4
    segment_min: int = 16 << 20

    def __post_init__(self) -> None:
        for name in ("concurrency", "segments", "segment_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        for name in ("all_platforms", "include_foreign"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, not "
                                f"{type(getattr(self, name)).__name__}")
        if not 1 <= self.concurrency <= 256:
            raise ValueError("concurrency must be between 1 and 256")
        if not 1 <= self.segments <= 64:
            raise ValueError("segments must be between 1 and 64")
        if self.segment_min < 1 << 20:
            raise ValueError("segment_min must be at least 1 MiB")
        if self.platform is not None and not isinstance(self.platform, Platform):
            raise TypeError("platform must be a puller.Platform (use Platform.parse)")


class ImageResult(Record):
    """One platform image of a pull."""

    manifest_digest: str
    media_type: str
    platform: str | None
    config_digest: str
    layers: tuple[str, ...]
    size: int  # config + layers, bytes


class PullResult(Record):
    reference: str  # normalised, as named in the store's index.json
    name: str  # registry/repository
    digest: str  # what the reference resolved to (index or manifest)
    media_type: str
    images: tuple[ImageResult, ...]
    blobs_fetched: int
    blobs_reused: int
    bytes_fetched: int
    up_to_date: bool  # nothing fetched and the store already named this digest

    @property
    def pinned(self) -> str:
        """``registry/repository@digest``: the reference that always gives these bytes."""
        return f"{self.name}@{self.digest}"


class Puller:
    """Pulls images into a :class:`ContentStore`. Use as an async context manager."""

    def __init__(self, *, store: str | os.PathLike[str] | ContentStore | None = None,
                 options: PullOptions | None = None,
                 client_options: ClientOptions | None = None,
                 on_event: Listener | None = None,
                 credentials: Any = DEFAULT_CREDENTIALS,
                 transport: Any = None) -> None:
        """``credentials``: where registry logins come from; by default docker's
        ``config.json`` and credential helpers, ``None`` for anonymous access only, or
        any object with ``get(registry) -> Credentials | None``. ``transport``: see
        :mod:`puller.transport` (default: aiohttp). ``on_event``: a plain function,
        called in the event loop with each event; it must be quick, and its failures
        are logged once (``puller`` logger), never the pull's."""
        if options is not None and not isinstance(options, PullOptions):
            raise TypeError(f"options must be a PullOptions, not {type(options).__name__}")
        if client_options is not None and not isinstance(client_options, ClientOptions):
            raise TypeError("client_options must be a ClientOptions, not "
                            f"{type(client_options).__name__}")
        _check_listener(on_event)
        if isinstance(store, ContentStore):
            self.store = store
        else:
            self.store = ContentStore(store if store is not None else default_store_path())
        self.options = options or PullOptions()
        self._client_options = client_options or ClientOptions()
        self._listener = on_event
        self._listener_failed = False
        self._credentials = credentials
        self._transport = transport
        self._client: RegistryClient | None = None
        self._scheduler: BlobScheduler | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pulls: set[asyncio.Task[PullResult]] = set()  # running, see pull()

    async def __aenter__(self) -> Puller:
        if self._executor is not None:
            raise RuntimeError("this Puller is already open (`async with` it once at a time)")
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=min(32, self.options.concurrency + 2), thread_name_prefix="puller-io")
        try:
            await loop.run_in_executor(self._executor, self.store.init)
            self._client = await RegistryClient(self._client_options,
                                                credentials=self._credentials,
                                                transport=self._transport).__aenter__()
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise
        self._loop = loop
        self._scheduler = BlobScheduler(self._client, self.store,
                                        concurrency=self.options.concurrency,
                                        executor=self._executor,
                                        emit=self._emit if self._listener else None,
                                        segments=self.options.segments,
                                        segment_min=self.options.segment_min)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            # Pulls still running in other tasks end first (each fails with a
            # PullerError), so nothing uses the client or the threads closed below.
            pulls = [t for t in self._pulls if not t.done()]
            for t in pulls:
                t.cancel()
            if pulls:
                await asyncio.wait(pulls)
            if self._scheduler is not None:
                await self._scheduler.aclose()
            if self._client is not None:
                await self._client.__aexit__(None, None, None)
        finally:
            self._client = None
            self._scheduler = None
            self._loop = None
            if self._executor is not None:
                executor, self._executor = self._executor, None
                # Wait for the worker threads without blocking the loop: results they
                # deliver meanwhile (a lock taken for a download that was cancelled) are
                # handled by callbacks that need the loop, and must run before we return.
                await asyncio.shield(asyncio.to_thread(executor.shutdown, wait=True))
                await asyncio.sleep(0)

    def _emit(self, event: Event) -> None:
        """Give ``event`` to the listener. A listener that fails is the embedding
        program's bug, not the pull's: it is logged once and the pull goes on."""
        listener = self._listener
        if listener is None:
            return
        try:
            result = listener(event)
            if inspect.iscoroutine(result):  # an ``async def __call__``: it would never run
                result.close()
                raise TypeError("it returned a coroutine, which nothing awaits "
                                "(pass a plain function)")
        except Exception as exc:
            if not self._listener_failed:
                self._listener_failed = True
                text = " ".join(str(exc).split())
                _log.warning("puller: the on_event listener failed on a %s event (%s: %s); "
                             "pulls go on, later listener failures are not logged",
                             event.kind, type(exc).__name__, text)
                _log.debug("the on_event listener's failure", exc_info=exc)

    def _check_open(self) -> None:
        if self._client is None or self._scheduler is None:
            raise RuntimeError("Puller used outside `async with`")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("this Puller was opened in another event loop: open it "
                               "(`async with`) in the loop that uses it")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- pulling -------------------------------------------------------------------------

    async def pull_many(self, refs: Iterable[str | Reference], *,
                        fail_fast: bool = False) -> list[PullResult | PullerError]:
        """Pull several images at once through the shared scheduler.

        Returns one entry per reference, in order: a result, or the error that image
        failed with. With ``fail_fast`` the first failure cancels the rest.
        """
        if isinstance(refs, (str, bytes, Reference)):
            raise TypeError("pull_many takes a list of references, not one (see pull)")
        self._check_open()
        tasks = [asyncio.create_task(self.pull(r)) for r in refs]
        if fail_fast:
            try:
                await asyncio.gather(*tasks)
            except Exception:
                for t in tasks:
                    t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        out: list[PullResult | PullerError] = []
        for r in done:
            if isinstance(r, BaseException) and not isinstance(r, PullerError):
                if isinstance(r, asyncio.CancelledError):
                    err = PullerError("cancelled after another image failed")
                    out.append(err)
                    continue
                raise r
            out.append(r)
        return out

    async def pull(self, ref: str | Reference, *, platform: Platform | None = None,
                   all_platforms: bool | None = None) -> PullResult:
        """Pull one image (every blob verified) and name it in the store's index.

        Every ``pull.started`` event is followed by one ``pull.done`` or ``pull.failed``
        (``error_type`` ``CancelledError`` when the caller's task was cancelled)."""
        self._check_open()
        want, every = self._wanted(platform, all_platforms)
        if not isinstance(ref, Reference):
            ref = Reference.parse(ref)
        name = str(ref)
        self._emit(PullStarted(ref=name))
        # In a task of its own, which __aexit__ can stop without cancelling the caller.
        work = asyncio.create_task(self._pull_pinned(ref, name, want, every),
                                   name=f"pull {name}")
        self._pulls.add(work)
        work.add_done_callback(self._pulls.discard)
        try:
            return await work
        except PullerError as exc:
            self._emit(PullFailed(ref=name, error=str(exc), error_type=type(exc).__name__))
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # our caller cancelled us
                self._emit(PullFailed(ref=name, error="cancelled",
                                      error_type="CancelledError"))
                raise
            closed = PullerError(f"{name}: the Puller was closed before the pull finished")
            self._emit(PullFailed(ref=name, error=str(closed), error_type="PullerError"))
            raise closed from None
        except BaseException as exc:  # a bug: still the end of this pull's events
            self._emit(PullFailed(ref=name, error=str(exc) or type(exc).__name__,
                                  error_type=type(exc).__name__))
            raise

    async def _pull_pinned(self, ref: Reference, name: str, want: Platform | None,
                           all_platforms: bool) -> PullResult:
        pin = await self._pin()
        try:
            return await self._pull(ref, name, want, all_platforms)
        finally:
            os.close(pin)

    def _wanted(self, platform: Platform | None,
                all_platforms: bool | None) -> tuple[Platform | None, bool]:
        """The platform and all-platforms choice of one pull or check."""
        if platform is not None and not isinstance(platform, Platform):
            raise TypeError("platform must be a puller.Platform (use Platform.parse)")
        if all_platforms is not None and not isinstance(all_platforms, bool):
            raise TypeError("all_platforms must be True, False or None, not "
                            f"{type(all_platforms).__name__}")
        return (platform or self.options.platform,
                self.options.all_platforms if all_platforms is None else all_platforms)

    async def _pin(self) -> int:
        """Mark this pull as in progress so ``puller gc`` leaves its blobs alone until it
        has named them in index.json (see ContentStore.pin); waits while a gc runs."""
        while True:
            pin = self.store.pin()  # a few non-blocking syscalls: no thread needed
            if pin is not None:
                return pin
            await asyncio.sleep(_GC_POLL)

    async def check(self, ref: str | Reference, *, platform: Platform | None = None,
                    all_platforms: bool | None = None) -> PullResult | None:
        """The result of pulling ``ref`` if that would download nothing: the registry
        still names the stored digest (one manifest ``HEAD``; none at all for a digest
        reference) and every blob the requested platforms need is in the store. None
        otherwise, or when the registry can't say cheaply; the store is not changed."""
        self._check_open()
        want, every = self._wanted(platform, all_platforms)
        if not isinstance(ref, Reference):
            ref = Reference.parse(ref)
        name = str(ref)
        entry = self.store.lookup(name)
        if entry is None:
            return None
        try:
            stored = Digest.parse(str(entry.get("digest")))
        except PullerError:
            return None
        if ref.digest is None:
            assert self._client is not None  # (checked open above)
            try:
                head = await self._client.head_manifest(ref)
            except PullerError:
                return None
            if head is None or head[0] != stored:
                return None
        elif ref.digest != stored:
            return None
        try:
            return self._complete(ref, name, stored, want, every)
        except PullerError:
            return None

    def _check_platform(self, ref: Reference, m: ImageManifest, want: Platform) -> None:
        """Raise NoMatchingPlatform unless the stored config of ``m`` says it runs on
        ``want``; a config that names no platform (an artifact's) is let be."""
        try:
            doc = json.loads(self.store.read(m.config.digest, max_size=MAX_MANIFEST_SIZE))
            have = Platform.from_json({k: doc[k] for k in ("os", "architecture", "variant")
                                       if k in doc})
        except (ValueError, TypeError, KeyError, PullerError):
            return
        try:
            select([(have, True)], want)
        except NoMatchingPlatform:
            raise NoMatchingPlatform(f"{ref} is an image for {have} only, not for {want}"
                                     ) from None

    def _complete(self, ref: Reference, name: str, digest: Digest, want: Platform | None,
                  all_platforms: bool) -> PullResult | None:
        """A PullResult for ``digest`` if the store holds all it needs, else None."""
        if not self.store.has(digest):
            return None
        top = parse_manifest(self.store.read(digest, max_size=MAX_MANIFEST_SIZE))
        if isinstance(top, ImageIndex):
            pairs: list[tuple[Descriptor | None, Digest]] = [
                (d, d.digest) for d in self._choose(ref, top, want, all_platforms)]
        else:
            if want is not None:
                self._check_platform(ref, top, want)
            pairs = [(None, digest)]
        images = []
        seen: set[Digest] = set()
        for d, manifest_digest in pairs:
            if not self.store.has(manifest_digest):
                return None
            m = parse_manifest(self.store.read(manifest_digest, max_size=MAX_MANIFEST_SIZE))
            if not isinstance(m, ImageManifest):
                return None
            blobs = [m.config] + [x for x in m.layers
                                  if self.options.include_foreign or not x.urls]
            if not all(self.store.has(b.digest, b.size) for b in blobs):
                return None
            seen.update(b.digest for b in blobs)
            images.append(ImageResult(
                manifest_digest=str(manifest_digest), media_type=m.media_type,
                platform=str(d.platform) if d is not None and d.platform else None,
                config_digest=str(m.config.digest), layers=tuple(str(x.digest) for x in m.layers),
                size=sum(b.size for b in blobs)))
        return PullResult(reference=name, name=ref.name, digest=str(digest),
                          media_type=top.media_type, images=tuple(images), blobs_fetched=0,
                          blobs_reused=len(seen), bytes_fetched=0, up_to_date=True)

    async def _manifest(self, ref: Reference, digest: Digest | None = None,
                        expect: Descriptor | None = None) -> FetchedManifest:
        """A manifest by digest comes from the store when it is there (content never
        changes); anything else from the registry."""
        assert self._client is not None
        if digest is not None and self.store.has(digest):
            data = await self._run(lambda: self.store.read(digest, max_size=MAX_MANIFEST_SIZE))
            media_type = expect.media_type if expect is not None else None
            fetched = FetchedManifest(data=data, media_type=media_type, digest=digest)
        else:
            fetched = await self._client.get_manifest(ref, str(digest) if digest else None)
        # A digest names exactly one content, and so one size: an index that gives another
        # is wrong, wherever the manifest came from.
        if expect is not None and len(fetched.data) != expect.size:
            raise SizeMismatch(f"manifest {expect.digest} of {ref.name} is "
                               f"{len(fetched.data)} bytes, the index says {expect.size}")
        return fetched

    def _choose(self, ref: Reference, index: ImageIndex, want: Platform | None,
                all_platforms: bool) -> list[Descriptor]:
        images = [d for d in index.images() if d.media_type in mediatypes.IMAGE_MANIFESTS]
        if not images and any(d.media_type in mediatypes.SCHEMA1 for d in index.manifests):
            raise UnsupportedManifest(f"index of {ref} lists only Docker schema1 manifests, "
                                      "which are deprecated and not supported")
        if all_platforms:
            if not images:
                raise ManifestError(f"index of {ref} lists no images")
            return images
        target = want or Platform.host()
        return [select([(d.platform, d) for d in images], target)]

    async def _pull(self, ref: Reference, name: str, want: Platform | None,
                    all_platforms: bool) -> PullResult:
        assert self._scheduler is not None
        previous = self.store.lookup(name)
        top = await self._manifest(ref, ref.digest)
        parsed = parse_manifest(top.data, top.media_type)
        top_type = parsed.media_type

        # (descriptor or None for the top manifest itself, bytes, parsed manifest)
        children: list[tuple[Descriptor | None, bytes, ImageManifest]] = []
        if isinstance(parsed, ImageIndex):
            chosen = self._choose(ref, parsed, want, all_platforms)
            fetched = await asyncio.gather(*(self._manifest(ref, d.digest, d) for d in chosen))
            for d, f in zip(chosen, fetched, strict=True):
                child = parse_manifest(f.data, f.media_type or d.media_type)
                if not isinstance(child, ImageManifest):
                    raise UnsupportedManifest(
                        f"{ref}: nested index {d.digest} in an index is not supported")
                children.append((d, f.data, child))
        else:
            children.append((None, top.data, parsed))

        images: list[ImageResult] = []
        wanted: list[tuple[Descriptor, str]] = []
        for d, _, m in children:
            plat = str(d.platform) if d is not None and d.platform is not None else None
            blobs = [m.config] + [layer for layer in m.layers
                                  if self.options.include_foreign or not layer.urls]
            total = sum(b.size for b in blobs)
            manifest_digest = str(d.digest) if d is not None else str(top.digest)
            self._emit(ManifestResolved(ref=name, digest=str(top.digest),
                                        manifest_digest=manifest_digest, media_type=m.media_type,
                                        platform=plat, layers=len(m.layers), total_bytes=total))
            images.append(ImageResult(manifest_digest=manifest_digest, media_type=m.media_type,
                                      platform=plat, config_digest=str(m.config.digest),
                                      layers=tuple(str(x.digest) for x in m.layers), size=total))
            for b in blobs:
                wanted.append((b, "config" if b is m.config else "layer"))

        # One fetch per distinct digest of this image set; the scheduler dedupes across images.
        unique: dict[Digest, tuple[Descriptor, str]] = {}
        for b, role in wanted:
            prior = unique.get(b.digest)
            if prior is not None and prior[0].size != b.size:
                raise ManifestError(f"{ref}: blob {b.digest} is listed with two sizes")
            unique.setdefault(b.digest, (b, role))
        if self._listener is not None:
            for b, role in unique.values():
                self._emit(BlobQueued(ref=name, digest=str(b.digest), size=b.size, role=role))
        rest = [b for b, _ in unique.values()]
        results: list[tuple[str, int]] = []
        if want is not None and isinstance(parsed, ImageManifest) and \
                parsed.config.media_type in mediatypes.CONFIGS:
            # Asked for a platform, a single-platform image must be for it (docker's rule):
            # its config says, so it comes first, and no layer is fetched for nothing.
            results.append(await self._fetch(ref, name, parsed.config))
            await self._run(self._check_platform, ref, parsed, want)
            rest = [b for b in rest if b.digest != parsed.config.digest]
        results += await _gather_all(*(self._fetch(ref, name, b) for b in rest))

        fetched_count = sum(1 for status, _ in results if status == "downloaded")
        reused = len(results) - fetched_count
        bytes_fetched = sum(n for _, n in results)

        # Blobs first, then child manifests, then the top: nothing is named before all
        # that it points to is stored.
        for d, data, _ in children:
            if d is not None:
                await self._run(self.store.put, d.digest, data)
        await self._run(self.store.put, top.digest, top.data)
        pulled_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry = {"mediaType": top_type, "digest": str(top.digest), "size": len(top.data),
                 "annotations": {"io.puller.pulled-at": pulled_at}}
        await self._run(self.store.set_ref, name, entry)

        up_to_date = (fetched_count == 0 and previous is not None
                      and previous.get("digest") == str(top.digest))
        result = PullResult(reference=name, name=ref.name, digest=str(top.digest),
                            media_type=top_type,
                            images=tuple(images), blobs_fetched=fetched_count,
                            blobs_reused=reused, bytes_fetched=bytes_fetched,
                            up_to_date=up_to_date)
        self._emit(PullDone(ref=name, digest=result.digest,
                            platforms=[i.platform for i in images if i.platform],
                            blobs_fetched=fetched_count, blobs_reused=reused,
                            bytes_fetched=bytes_fetched, up_to_date=up_to_date))
        return result

    async def _fetch(self, ref: Reference, name: str, desc: Descriptor) -> tuple[str, int]:
        assert self._scheduler is not None
        status, n = await self._scheduler.fetch(ref, desc, image=name)
        if self._listener is not None:
            self._emit(BlobDone(ref=name, digest=str(desc.digest), size=desc.size,
                                status=status, bytes_fetched=n))
        return status, n


def _check_listener(listener: Any) -> None:
    if listener is None:
        return
    if not callable(listener):
        raise TypeError(f"on_event must be a function taking an event, not "
                        f"{type(listener).__name__}")
    if inspect.iscoroutinefunction(listener) or \
            inspect.iscoroutinefunction(type(listener).__call__):
        raise TypeError("on_event must be a plain function: it is called in the event loop "
                        "and nothing awaits what it returns (to hand events to a task, pass "
                        "an asyncio.Queue's put_nowait)")


async def _gather_all(*aws: Any) -> list[Any]:
    """Like gather, but on the first failure cancel the siblings and wait for them, so
    no download outlives the image that failed unless another image shares it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
