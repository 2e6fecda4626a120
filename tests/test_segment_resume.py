"""A blob fetched as parallel byte ranges resumes every range, not only the first.

When a parallel-range download stops (a connection cut, a retry, Ctrl-C, a cancelled
task), each later range has some bytes on disk beyond the hashed prefix. The writer notes
those spans (after the data is on disk) in the partial's ``.segments`` note, and the next
attempt, in this process or another, fetches only the gaps. A crash (kill -9) keeps only
what a note vouched for; data that doesn't hash to the digest is thrown away whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from puller.digest import Digest
from puller.errors import DigestMismatch
from puller.store import SEGMENTS_SUFFIX, ContentStore
from tests.support.images import build_image, push
from tests.test_pull import assert_store_valid, blob_files, pull

SIZE = 1_000_000
DATA = hashlib.shake_256(b"segments").digest(SIZE)
DIGEST = Digest.from_bytes(DATA)


def _partial(store: ContentStore) -> Path:
    return store.root / "ingest" / f"sha256-{DIGEST.hex}"


def _stopped_download(store: ContentStore) -> None:
    """An attempt in four ranges that stopped part-way: the first streamed 100,000 bytes
    into the hash, the others wrote some of theirs at their offsets."""
    w = store.ingest(DIGEST, SIZE)
    w.begin_segments()
    w.write(DATA[:100_000])
    for a, c in ((250_000, 400_000), (500_000, 500_000), (750_000, 990_000)):
        w.write_at(a, [DATA[a:c]])
    w.hold([(250_000, 400_000), (500_000, 500_000), (750_000, 990_000)])
    w.close()


def test_a_stopped_parallel_download_keeps_every_range(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    _stopped_download(store)
    note = json.loads(_partial(store).with_name(_partial(store).name + SEGMENTS_SUFFIX)
                      .read_bytes())
    assert note == {"verified": 100_000, "held": [[250_000, 400_000], [750_000, 990_000]]}

    w = store.ingest(DIGEST, SIZE)
    assert (w.offset, w.held) == (100_000, [(250_000, 400_000), (750_000, 990_000)])
    # The next attempt fetches only the gaps: the first streams, the others land at their
    # offsets; then everything after the prefix is hashed from disk.
    w.begin_segments()
    w.write(DATA[100_000:250_000])
    w.write_at(400_000, [DATA[400_000:750_000]])
    w.write_at(990_000, [DATA[990_000:]])
    w.commit_segments()
    assert store.read(DIGEST, max_size=SIZE) == DATA
    assert not any((store.root / "ingest").iterdir())


def test_a_range_that_joins_the_prefix_is_hashed_at_once(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    w = store.ingest(DIGEST, SIZE)
    w.begin_segments()
    w.write(DATA[:250_000])  # the first range finished: the second starts right here
    w.write_at(250_000, [DATA[250_000:600_000]])
    w.hold([(250_000, 600_000)])
    w.close()
    w = store.ingest(DIGEST, SIZE)
    assert (w.offset, w.held) == (600_000, [])
    w.write(DATA[600_000:])
    w.commit()
    assert store.read(DIGEST, max_size=SIZE) == DATA


def test_a_crash_keeps_only_what_the_note_vouches_for(tmp_path: Path) -> None:
    """kill -9 during an attempt: the note still says what it said when the ranges
    began; bytes written since (maybe with holes) are dropped, the held spans kept."""
    store = ContentStore(tmp_path / "store")
    _stopped_download(store)
    w = store.ingest(DIGEST, SIZE)
    w.begin_segments()
    w.write(DATA[100_000:180_000])  # streamed into the hash, never noted
    w.write_at(400_000, [b"\0" * 50_000])  # garbage in a gap, never noted
    os.close(w._fd)  # the process dies: no close(), no note written
    w._fd = -1

    w = store.ingest(DIGEST, SIZE)
    assert (w.offset, w.held) == (100_000, [(250_000, 400_000), (750_000, 990_000)])
    assert os.fstat(w._fd).st_size == 990_000  # nothing after the last span it vouches for
    w.close()


@pytest.mark.parametrize("note", [
    b'{"verified": 100000, "held": [[250000, 400000], [300000, 500000]]}',  # overlapping
    b'{"verified": 100000, "held": [[250000, 400000]',  # cut short
    b'{"verified": "x", "held": []}',
    b"[" * 10_000,
])
def test_a_note_puller_did_not_write_vouches_for_nothing(tmp_path: Path, note: bytes) -> None:
    store = ContentStore(tmp_path / "store")
    _stopped_download(store)
    _partial(store).with_name(_partial(store).name + SEGMENTS_SUFFIX).write_bytes(note)
    w = store.ingest(DIGEST, SIZE)
    assert w.held == [] and w.offset in (0, 100_000)
    w.close()


def test_a_note_beyond_the_data_on_disk_is_not_believed(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    _stopped_download(store)
    os.truncate(_partial(store), 800_000)  # the last span is no longer whole
    w = store.ingest(DIGEST, SIZE)
    assert (w.offset, w.held) == (100_000, [(250_000, 400_000)])
    w.close()


def test_held_bytes_that_are_wrong_fail_the_digest_and_are_dropped(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    _stopped_download(store)
    with open(_partial(store), "r+b") as f:  # a bit flips in a held span
        f.seek(300_000)
        f.write(bytes([DATA[300_000] ^ 0xFF]))
    w = store.ingest(DIGEST, SIZE)
    w.write(DATA[100_000:250_000])
    w.write_at(400_000, [DATA[400_000:750_000]])
    w.write_at(990_000, [DATA[990_000:]])
    with pytest.raises(DigestMismatch):
        w.commit_segments()
    w.close()
    assert not store.has(DIGEST)
    w = store.ingest(DIGEST, SIZE)  # the next attempt starts from nothing
    assert (w.offset, w.held) == (0, [])
    w.close()


SEGMENTED = dict(segments=4, segment_min=1 << 20)


@pytest.mark.parametrize("threads", [True, False], ids=["threads", "event-loop"])
async def test_stalled_ranges_resume_where_each_stopped(registry, proxy, unique_repo,
                                                        store_dir, monkeypatch,
                                                        threads) -> None:
    """Every range of a 6 MB layer stalls after 700,000 bytes until the stall timeout
    fails it: the retry asks each range only for what it is missing (what arrived in
    whole pieces of at least 256 KiB is kept), and the blob is verified whole. Bodies received by
    worker threads, or through the registry client in the event loop (as behind a
    proxy)."""
    from puller.client import ClientOptions, RegistryClient

    if not threads:
        async def no_thread(self, ref, digest):
            return None

        monkeypatch.setattr(RegistryClient, "blob_request", no_thread)

    img = build_image(seed=66, layer_sizes=[6_000_000])
    push(registry.url, unique_repo, "stall", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    size = len(img.layers[0])
    proxy.stall_blob(after_bytes=700_000, seconds=30, times=4, digest=big)
    quick = ClientOptions(backoff_base=0.01, backoff_max=0.05, retries=3, stall_timeout=1.0)
    r = await pull(store_dir, f"{proxy.host}/{unique_repo}:stall", client_options=quick,
                   **SEGMENTED)
    assert r.digest == img.digest
    assert blob_files(store_dir)[big] == img.layers[0]
    assert_store_valid(store_dir)

    def span(q: dict) -> tuple[int, int]:
        a, b = q["range"].removeprefix("bytes=").split("-")
        return int(a), int(b)

    reqs = proxy.blob_requests(big)
    first, retry = sorted(map(span, reqs[:4])), sorted(map(span, reqs[4:]))
    assert len(retry) == 4
    # A range keeps the whole 256 KiB pieces it received, so more than 700,000 - 256 KiB.
    for (a, _), (start, end) in zip(retry, first, strict=True):
        assert start + 700_000 - 256 * 1024 < a <= start + 700_000 < end
    assert sum(b - a + 1 for a, b in retry) < size - 4 * (700_000 - 256 * 1024)
    assert r.bytes_fetched == size + len(img.config)  # each byte counted once


async def test_a_cancelled_pull_leaves_every_range_for_the_next(registry, proxy,
                                                                unique_repo,
                                                                store_dir) -> None:
    """A pull cancelled while its ranges stall keeps what each range received; the next
    pull (another Puller, as a new process would be) asks only for the rest."""
    import asyncio

    from puller import Puller, PullOptions

    img = build_image(seed=67, layer_sizes=[6_000_000])
    push(registry.url, unique_repo, "stall", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    size = len(img.layers[0])
    proxy.stall_blob(after_bytes=700_000, seconds=30, times=4, digest=big)
    ref = f"{proxy.host}/{unique_repo}:stall"
    async with Puller(store=store_dir, options=PullOptions(**SEGMENTED)) as p:
        task = asyncio.create_task(p.pull(ref))
        for _ in range(3000):  # bounded: until every range has reached its stall
            if proxy.stalls_begun >= 4 or task.done():
                break
            await asyncio.sleep(0.02)
        assert proxy.stalls_begun == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    note = store_dir / "ingest" / f"sha256-{big.split(':')[1]}{SEGMENTS_SUFFIX}"
    kept = json.loads(note.read_bytes())
    starts = [0, *(a for a, _ in kept["held"])]
    assert len(kept["held"]) == 3 and all(a < b for a, b in kept["held"])
    assert all(b - a <= 700_000 for a, b in kept["held"]) and kept["verified"] <= 700_000

    proxy.clear_rules()
    proxy.clear_log()
    r = await pull(store_dir, ref, **SEGMENTED)
    assert r.digest == img.digest and blob_files(store_dir)[big] == img.layers[0]
    asked = sorted(tuple(int(x) for x in q["range"].removeprefix("bytes=").split("-"))
                   for q in proxy.blob_requests(big))
    # Exactly the gaps: nothing held or verified is asked for again.
    assert asked[0][0] == kept["verified"] and len(starts) == 4
    assert sum(b - a + 1 for a, b in asked) == \
        size - kept["verified"] - sum(b - a for a, b in kept["held"])
    for a, b in asked:
        assert not any(ha <= a < hb or ha <= b < hb for ha, hb in kept["held"])
    assert r.bytes_fetched == sum(b - a + 1 for a, b in asked)  # (the config: stored before)
    assert_store_valid(store_dir)
