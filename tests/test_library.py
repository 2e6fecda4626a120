"""The library API as an embedding program uses it: listeners that misbehave, pulls
cancelled from outside, a Puller shared by many tasks or closed under them, misuse, and
the event stream's promises (every ``pull.started`` ends exactly once, events round-trip
through JSON). Against the real registry; cancellation points are chosen by events, not
by timing."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from puller import Platform, Puller, PullOptions, events
from puller.client import ClientOptions
from puller.errors import InvalidReference, NotFound, PullerError
from tests.support.images import build_image, push

FAST_RETRY = ClientOptions(backoff_base=0.01, backoff_max=0.05, retries=2)
BIG = 6_000_000  # a layer big enough to be cancelled in the middle of (random: gzip keeps it)


def is_big(size: int) -> bool:
    return size > BIG // 2


@pytest.fixture
def small(registry, unique_repo) -> str:
    img = build_image(seed=301, layer_sizes=[1000, 200_000])
    push(registry.url, unique_repo, "v1", img)
    return f"{registry.host}/{unique_repo}:v1"


@pytest.fixture
def big(registry, unique_repo) -> str:
    img = build_image(seed=302, layer_sizes=[1000, 300_000, BIG])
    push(registry.url, unique_repo, "big", img)
    return f"{registry.host}/{unique_repo}:big"


def assert_store_valid(store: Path) -> None:
    for p in (store / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, f"corrupt blob {p.name}"
    for entry in json.loads((store / "index.json").read_text())["manifests"]:
        assert (store / "blobs" / "sha256" / entry["digest"].split(":")[1]).is_file()


def puller_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("puller-")]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_fds(before: int) -> int:
    """The descriptor count, given a few collections to let closed transports go."""
    n = open_fds()
    for _ in range(5):
        if n <= before:
            break
        gc.collect()
        n = open_fds()
    return n


def assert_events_consistent(evs: list[events.Event]) -> None:
    """Every pull.started ends with exactly one pull.done or pull.failed and nothing about
    that image follows it; in a pull that ended with pull.done every blob.queued has its
    blob.done; every event survives a JSON round trip."""
    kinds = {cls.kind: cls for cls in (getattr(events, n) for n in events.__all__)
             if isinstance(cls, type) and issubclass(cls, events.Event) and cls.kind != "event"}
    open_pulls: Counter[str] = Counter()
    queued: dict[str, Counter[str]] = {}
    failed: set[str] = set()
    for ev in evs:
        line = json.dumps(ev.to_json())
        back = json.loads(line)
        cls = kinds[back.pop("event")]
        assert cls(**back) == ev, line
        if ev.kind == "pull.started":
            open_pulls[ev.ref] += 1
            queued.setdefault(ev.ref, Counter())
            continue
        assert open_pulls[ev.ref] > 0, f"{ev.kind} for {ev.ref} outside its pull"
        if ev.kind == "blob.queued":
            queued[ev.ref][ev.digest] += 1
        elif ev.kind == "blob.done":
            queued[ev.ref][ev.digest] -= 1
        elif ev.kind in ("pull.done", "pull.failed"):
            open_pulls[ev.ref] -= 1
            if ev.kind == "pull.failed":
                failed.add(ev.ref)
    assert not +open_pulls, f"pulls that never ended: {dict(+open_pulls)}"
    for ref, blobs in queued.items():  # (concurrent pulls of one name interleave)
        assert ref in failed or not +blobs, f"blobs of {ref} queued and never done"


class LoopErrors:
    """What reaches the event loop's exception handler ("exception was never retrieved",
    "Exception in callback"): each is a traceback printed into the embedding program."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def install(self) -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, ctx: self.seen.append(str(ctx.get("message"))))


# -- listeners ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pull.started", "manifest.resolved", "blob.queued",
                                  "blob.started", "blob.progress", "blob.done", "pull.done"])
async def test_listener_that_raises_does_not_fail_the_pull(small, store_dir, caplog, kind):
    errors = LoopErrors()
    errors.install()
    seen: list[events.Event] = []

    def listener(ev: events.Event) -> None:
        seen.append(ev)
        if ev.kind == kind:
            raise RuntimeError(f"listener bug on {kind}")

    with caplog.at_level(logging.WARNING, logger="puller"):
        async with Puller(store=store_dir, on_event=listener) as p:
            result = await p.pull(small)
            again = await p.pull_many([small])
    assert result.blobs_fetched == 3
    assert again[0].digest == result.digest  # a result, not the listener's error
    assert_store_valid(store_dir)
    assert [e.kind for e in seen].count("pull.done") == 2  # events keep coming
    logged = [r for r in caplog.records if r.name == "puller"]
    assert len(logged) == 1, "one warning, however often the listener fails"
    assert "RuntimeError" in logged[0].getMessage() and "\n" not in logged[0].getMessage()
    gc.collect()
    assert errors.seen == []


async def test_coroutine_function_listener_is_refused(store_dir):
    async def listener(ev: events.Event) -> None:
        pass

    with pytest.raises(TypeError, match="on_event"):
        Puller(store=store_dir, on_event=listener)
    with pytest.raises(TypeError, match="put_nowait"):
        Puller(store=store_dir, on_event=asyncio.Queue().put)
    with pytest.raises(TypeError, match="on_event"):
        Puller(store=store_dir, on_event="print")  # type: ignore[arg-type]

    class Sink:
        async def __call__(self, ev: events.Event) -> None:
            pass

    with pytest.raises(TypeError, match="on_event"):
        Puller(store=store_dir, on_event=Sink())


async def test_listener_returning_a_coroutine_is_reported_not_leaked(small, store_dir, caplog,
                                                                    recwarn):
    queue: asyncio.Queue[events.Event] = asyncio.Queue()
    with caplog.at_level(logging.WARNING, logger="puller"):
        # not a coroutine function, so not refused up front: seen when it is called
        async with Puller(store=store_dir, on_event=lambda ev: queue.put(ev)) as p:
            result = await p.pull(small)
    assert result.blobs_fetched == 3
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
    logged = [r.getMessage() for r in caplog.records if r.name == "puller"]
    assert len(logged) == 1 and "coroutine" in logged[0]


# -- cancellation from outside -----------------------------------------------------------

def _cancel_when(point: str):
    done = Counter()

    def hit(ev: events.Event) -> bool:
        if point == "commit":  # the last blob is in: the manifests and the name are next
            done[ev.kind] += 1
            return ev.kind == "blob.done" and done["blob.done"] == 4
        if point == "mid-blob":
            return ev.kind == "blob.progress" and is_big(ev.total) and 0 < ev.complete < ev.total
        if point == "big-blob-started":
            return ev.kind == "blob.started" and is_big(ev.size)
        return ev.kind == point
    return hit


@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("point", ["pull.started", "manifest.resolved", "big-blob-started",
                                   "mid-blob", "commit"])
async def test_cancelled_pull_leaves_a_consistent_store_and_nothing_running(
        big, store_dir, point, segments):
    errors = LoopErrors()
    errors.install()
    fds, threads = open_fds(), puller_threads()
    options = PullOptions(segments=segments, segment_min=1 << 20)
    seen: list[events.Event] = []
    hit = _cancel_when(point)
    task: asyncio.Task | None = None

    def listener(ev: events.Event) -> None:
        seen.append(ev)
        if hit(ev) and task is not None:
            task.cancel()

    async with Puller(store=store_dir, options=options, client_options=FAST_RETRY,
                      on_event=listener) as p:
        task = asyncio.ensure_future(p.pull(big))
        with pytest.raises(asyncio.CancelledError):
            await task
        # no download outlives a cancelled pull that was its only taker
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("blob ")]
    assert puller_threads() == threads
    assert settled_fds(fds) <= fds
    assert_store_valid(store_dir)
    assert seen[-1].kind == "pull.failed" and seen[-1].error_type == "CancelledError"
    assert_events_consistent(seen)
    gc.collect()
    assert errors.seen == []
    kept = sum(p.stat().st_size for p in (store_dir / "ingest").iterdir())

    again: list[events.Event] = []
    async with Puller(store=store_dir, options=options, on_event=again.append) as p:
        result = await p.pull(big)
    assert result.images
    assert_store_valid(store_dir)
    assert not any((store_dir / "ingest").iterdir())
    resumed = [e.offset for e in again if e.kind == "blob.started" and e.offset]
    if point == "mid-blob" and segments == 1:
        assert kept > 0 and resumed  # the bytes on disk were kept and resumed from
    assert_events_consistent(again)
    assert puller_threads() == threads


async def test_cancelling_one_of_two_pulls_sharing_a_download(registry, unique_repo, store_dir):
    base = build_image(seed=305, layer_sizes=[BIG])
    a = build_image(seed=306, layer_sizes=[1000], base=base)
    b = build_image(seed=307, layer_sizes=[2000], base=base)
    push(registry.url, unique_repo, "a", a)
    push(registry.url, unique_repo, "b", b)
    ra, rb = f"{registry.host}/{unique_repo}:a", f"{registry.host}/{unique_repo}:b"
    seen: list[events.Event] = []
    tasks: dict[str, asyncio.Task] = {}

    def listener(ev: events.Event) -> None:
        seen.append(ev)
        if ev.ref == ra and ev.kind == "blob.progress" and is_big(ev.total) and \
                0 < ev.complete < ev.total and len(tasks) == 2:
            tasks[ra].cancel()

    async with Puller(store=store_dir, on_event=listener,
                      options=PullOptions(segments=1)) as p:
        tasks[ra] = asyncio.ensure_future(p.pull(ra))
        tasks[rb] = asyncio.ensure_future(p.pull(rb))
        result = await tasks[rb]  # the shared download went on for b
        with pytest.raises(asyncio.CancelledError):
            await tasks[ra]
    assert result.digest == b.digest and result.blobs_fetched == 3
    assert_events_consistent(seen)  # nothing about a after its pull.failed
    assert_store_valid(store_dir)


async def test_puller_closed_under_a_running_pull(big, store_dir):
    """Leaving ``async with`` while another task still pulls: that pull fails with a
    PullerError (its task was not cancelled), and everything stops before the exit ends."""
    seen: list[events.Event] = []
    progressing = asyncio.Event()

    def listener(ev: events.Event) -> None:
        seen.append(ev)
        if ev.kind == "blob.progress" and is_big(ev.total) and ev.complete < ev.total:
            progressing.set()

    threads = puller_threads()
    p = Puller(store=store_dir, on_event=listener, options=PullOptions(segments=1))
    await p.__aenter__()
    task = asyncio.ensure_future(p.pull(big))
    await asyncio.wait_for(progressing.wait(), 60)  # a bound, not a timing
    await p.__aexit__(None, None, None)
    assert task.done()
    with pytest.raises(PullerError, match="closed"):
        task.result()
    assert puller_threads() == threads
    assert seen[-1].kind == "pull.failed"
    assert_events_consistent(seen)
    assert_store_valid(store_dir)


# -- sharing ---------------------------------------------------------------------------

async def test_one_store_two_pullers_and_many_tasks(registry, unique_repo, store_dir):
    a = build_image(seed=303, layer_sizes=[1000, 300_000, 900_000])
    b = build_image(seed=304, layer_sizes=[1000, 300_000])
    push(registry.url, unique_repo, "a", a)
    push(registry.url, unique_repo, "b", b)
    ra, rb = f"{registry.host}/{unique_repo}:a", f"{registry.host}/{unique_repo}:b"
    seen: list[events.Event] = []
    async with Puller(store=store_dir, on_event=seen.append,
                      options=PullOptions(concurrency=2)) as p1, \
            Puller(store=store_dir, on_event=seen.append) as p2:
        results = await asyncio.gather(*(p.pull(r) for p in (p1, p2) for r in (ra, rb, ra)),
                                       p1.pull_many([ra, ra, rb, rb]))
    flat = [*results[:-1], *results[-1]]
    assert [r.digest for r in flat] == [a.digest, b.digest, a.digest] * 2 + \
        [a.digest, a.digest, b.digest, b.digest]
    assert_store_valid(store_dir)
    assert not any((store_dir / "ingest").iterdir())
    assert_events_consistent(seen)
    # every blob crossed the network at least once, and at most once per Puller
    total = sum(len(x) for x in {**a.blobs(), **b.blobs()}.values())
    fetched = sum(e.bytes_fetched for e in seen if e.kind == "pull.done")
    assert total <= fetched <= 2 * total


async def test_pull_many_fail_fast_ends_every_pull(registry, small, store_dir):
    seen: list[events.Event] = []
    missing = f"{registry.host}/test/does-not-exist:x"
    async with Puller(store=store_dir, on_event=seen.append, client_options=FAST_RETRY) as p:
        out = await p.pull_many([small, missing, small, "Not/A/Ref"], fail_fast=True)
        assert isinstance(out[3], InvalidReference)
        assert all(isinstance(r, PullerError) for r in out)
        assert_events_consistent(seen)
        seen.clear()
        out = await p.pull_many([small, missing, small])
        assert isinstance(out[1], NotFound) and out[0].digest == out[2].digest
        assert_events_consistent(seen)
    assert_store_valid(store_dir)


# -- misuse ----------------------------------------------------------------------------

def test_options_are_type_checked():
    for bad in (dict(concurrency="8"), dict(concurrency=8.5), dict(concurrency=True),
                dict(concurrency=None), dict(segments=2.5), dict(segment_min="16M"),
                dict(all_platforms="yes"), dict(include_foreign=None),
                dict(platform="linux/amd64")):
        with pytest.raises(TypeError, match=next(iter(bad))):
            PullOptions(**bad)
    with pytest.raises(ValueError, match="concurrency"):
        PullOptions(concurrency=0)
    with pytest.raises(TypeError, match="options"):
        Puller(options={"concurrency": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="client_options"):
        Puller(client_options=PullOptions())  # type: ignore[arg-type]


async def test_misuse_is_a_clear_error(small, store_dir):
    p = Puller(store=store_dir)
    with pytest.raises(RuntimeError, match="async with"):
        await p.pull(small)
    threads = puller_threads()
    async with p:
        with pytest.raises(RuntimeError, match="already"):
            await p.__aenter__()
        with pytest.raises(TypeError, match="platform"):
            await p.pull(small, platform="linux/amd64")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="all_platforms"):
            await p.pull(small, all_platforms="yes")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="list"):
            await p.pull_many("AB")  # a string is not a list of references
        assert (await p.pull(small, platform=Platform.parse("linux/amd64"))).blobs_fetched
    assert puller_threads() == threads
    with pytest.raises(RuntimeError, match="async with"):
        await p.pull(small)
    async with p:  # opened again after it was closed: fine
        assert (await p.pull(small)).up_to_date


def test_puller_used_from_another_event_loop(small, store_dir):
    p = Puller(store=store_dir)

    async def second() -> None:
        with pytest.raises(RuntimeError, match="another event loop"):
            await p.pull(small)
        with pytest.raises(RuntimeError, match="another event loop"):
            await p.check(small)
        with pytest.raises(RuntimeError, match="another event loop"):
            await p.pull_many([small])

    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(p.__aenter__())
        first.run_until_complete(p.pull(small))
        asyncio.run(second())
        assert first.run_until_complete(p.check(small)) is not None  # still fine in its own
    finally:
        first.run_until_complete(p.__aexit__(None, None, None))
        first.close()
