"""End-to-end pulls through the library API against the real distribution registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from puller import Platform, Puller, PullOptions
from puller.client import ClientOptions
from puller.errors import (DigestMismatch, NoMatchingPlatform, NotFound, PullerError,
                           SizeMismatch)
from tests.support.images import (RawManifest, build_image, build_index, hello_world_amd64,
                                  push)

FAST_RETRY = ClientOptions(backoff_base=0.01, backoff_max=0.05, retries=3)


def blob_files(store: Path) -> dict[str, bytes]:
    return {f"sha256:{p.name}": p.read_bytes() for p in (store / "blobs" / "sha256").iterdir()}


def assert_store_valid(store: Path) -> None:
    """Every blob hashes to its name; index.json parses; everything it names is present."""
    for p in (store / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, f"corrupt blob {p.name}"
    index = json.loads((store / "index.json").read_text())
    assert index["schemaVersion"] == 2
    for entry in index["manifests"]:
        assert (store / "blobs" / "sha256" / entry["digest"].split(":")[1]).is_file()
    assert json.loads((store / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}


def index_entries(store: Path) -> dict[str, dict]:
    index = json.loads((store / "index.json").read_text())
    return {e["annotations"]["org.opencontainers.image.ref.name"]: e for e in index["manifests"]}


async def pull(store: Path, ref: str, *, events: list | None = None,
               client_options: ClientOptions = FAST_RETRY, **opts):
    async with Puller(store=store, options=PullOptions(**opts), client_options=client_options,
                      on_event=events.append if events is not None else None) as p:
        return await p.pull(ref)


async def test_pull_oci_image_then_repull_is_up_to_date(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=11, layer_sizes=[3000, 200_000, 1_500_000])
    push(registry.url, unique_repo, "v1", img)
    ref = f"{proxy.host}/{unique_repo}:v1"

    events: list = []
    result = await pull(store_dir, ref, events=events)
    assert result.digest == img.digest
    assert result.reference == ref
    assert result.blobs_fetched == 4 and result.blobs_reused == 0
    assert result.bytes_fetched == len(img.config) + sum(len(x) for x in img.layers)
    assert not result.up_to_date
    blobs = blob_files(store_dir)
    for d, data in img.blobs().items():
        assert blobs[d] == data
    assert blobs[img.digest] == img.manifest  # stored verbatim
    entry = index_entries(store_dir)[ref]
    assert entry["digest"] == img.digest and entry["size"] == len(img.manifest)
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert_store_valid(store_dir)
    assert not any((store_dir / "ingest").iterdir())
    kinds = [e.kind for e in events]
    assert kinds[0] == "pull.started" and kinds[-1] == "pull.done"

    proxy.clear_log()
    again = await pull(store_dir, ref)
    assert again.up_to_date and again.blobs_fetched == 0 and again.blobs_reused == 4
    assert proxy.blob_requests() == []  # warm re-pull: no blob requests at all
    assert len(index_entries(store_dir)) == 1


async def test_pull_docker_schema2_and_captured_hello_world(registry, unique_repo, store_dir,
                                                            fixtures_dir):
    img = build_image(seed=12, layer_sizes=[5000, 7000], fmt="docker")
    push(registry.url, unique_repo, "d", img)
    hw = hello_world_amd64()
    push(registry.url, unique_repo, "hello", hw)

    r1 = await pull(store_dir, f"{registry.host}/{unique_repo}:d")
    assert r1.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    r2 = await pull(store_dir, f"{registry.host}/{unique_repo}:hello")
    # Docker Hub's own bytes keep Docker Hub's digest.
    assert r2.digest == "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3"
    assert len(index_entries(store_dir)) == 2
    assert_store_valid(store_dir)


async def test_shared_layers_are_downloaded_once(registry, proxy, unique_repo, store_dir):
    base = build_image(seed=13, layer_sizes=[800_000, 300_000])
    a = build_image(seed=14, layer_sizes=[1000], base=base)
    b = build_image(seed=15, layer_sizes=[2000], base=base)
    push(registry.url, unique_repo, "a", a)
    push(registry.url, unique_repo, "b", b)
    async with Puller(store=store_dir, client_options=FAST_RETRY) as p:
        results = await p.pull_many([f"{proxy.host}/{unique_repo}:a",
                                     f"{proxy.host}/{unique_repo}:b"])
    assert all(not isinstance(r, Exception) for r in results)
    for layer in base.layers:
        d = "sha256:" + hashlib.sha256(layer).hexdigest()
        assert len(proxy.blob_requests(d)) == 1, "a shared layer was fetched twice"
    # Each image counts the shared layers as downloaded in this run, but their bytes
    # are counted once, by the image whose request fetched them.
    assert [r.blobs_fetched for r in results] == [4, 4]
    unique = {**a.blobs(), **b.blobs()}
    assert sum(r.bytes_fetched for r in results) == sum(len(v) for v in unique.values())
    assert_store_valid(store_dir)


async def test_index_platform_selection_and_attestations(registry, unique_repo, store_dir):
    amd = build_image(seed=16, layer_sizes=[1000], platform=("linux", "amd64", None))
    arm = build_image(seed=17, layer_sizes=[1100], platform=("linux", "arm64", "v8"))
    arm7 = build_image(seed=18, layer_sizes=[1200], platform=("linux", "arm", "v7"))
    idx = build_index([amd, arm, arm7], fmt="oci", attestations=True)
    push(registry.url, unique_repo, "multi", idx)
    ref = f"{registry.host}/{unique_repo}:multi"

    r = await pull(store_dir, ref, platform=Platform.parse("linux/arm64"))
    assert r.digest == idx.digest
    assert [i.manifest_digest for i in r.images] == [arm.digest]
    blobs = blob_files(store_dir)
    assert blobs[idx.digest] == idx.manifest  # index stored as fetched
    assert arm.digest in blobs and amd.digest not in blobs
    for att in idx.attestations:
        assert att.digest not in blobs

    r = await pull(store_dir, ref, all_platforms=True)
    assert sorted(i.manifest_digest for i in r.images) == sorted([amd.digest, arm.digest,
                                                                  arm7.digest])
    blobs = blob_files(store_dir)
    assert all(att.digest not in blobs for att in idx.attestations)

    with pytest.raises(NoMatchingPlatform, match="linux/s390x"):
        await pull(store_dir, ref, platform=Platform.parse("linux/s390x"))


async def test_index_child_of_the_wrong_size_is_refused(registry, unique_repo, store_dir):
    amd = build_image(seed=26, layer_sizes=[1000], platform=("linux", "amd64", None))
    good = build_index([amd], attestations=False)
    doc = json.loads(good.manifest)
    doc["manifests"][0]["size"] += 1  # the right digest, the wrong size
    bad = RawManifest(manifest=json.dumps(doc).encode(), media_type=good.media_type,
                      children=[amd])
    push(registry.url, unique_repo, "bad", bad)
    ref = f"{registry.host}/{unique_repo}:bad"
    with pytest.raises(SizeMismatch, match="the index says"):
        await pull(store_dir, ref, platform=Platform.parse("linux/amd64"))
    # Nor when the child is already in the store (pulled by digest on its own).
    await pull(store_dir, f"{registry.host}/{unique_repo}@{amd.digest}")
    with pytest.raises(SizeMismatch, match="the index says"):
        await pull(store_dir, ref, platform=Platform.parse("linux/amd64"))
    assert ref not in index_entries(store_dir)


async def test_a_single_platform_image_must_be_for_the_platform_asked(registry, unique_repo,
                                                                     store_dir):
    arm = build_image(seed=27, layer_sizes=[1000, 1200], platform=("linux", "arm64", "v8"))
    push(registry.url, unique_repo, "arm", arm)
    ref = f"{registry.host}/{unique_repo}:arm"
    with pytest.raises(NoMatchingPlatform, match="for linux/arm64/v8 only, not for linux/amd64"):
        await pull(store_dir, ref, platform=Platform.parse("linux/amd64"))
    blobs = blob_files(store_dir)
    assert not any(d in blobs for d in arm.layer_digests)  # no layer fetched for nothing
    assert not (store_dir / "index.json").exists() or ref not in index_entries(store_dir)
    r = await pull(store_dir, ref, platform=Platform.parse("linux/arm64"))
    assert r.digest == arm.digest
    r = await pull(store_dir, ref)  # no platform asked: the image as it is
    assert r.digest == arm.digest
    # Already in the store, asked again for the wrong platform: still refused.
    with pytest.raises(NoMatchingPlatform):
        await pull(store_dir, ref, platform=Platform.parse("linux/amd64"))


async def test_manifest_list_arm_variant_fallback(registry, unique_repo, store_dir):
    v5 = build_image(seed=19, layer_sizes=[900], platform=("linux", "arm", "v5"), fmt="docker")
    v6 = build_image(seed=20, layer_sizes=[900], platform=("linux", "arm", "v6"), fmt="docker")
    lst = build_index([v5, v6], fmt="docker", attestations=False)
    push(registry.url, unique_repo, "arm", lst)
    r = await pull(store_dir, f"{registry.host}/{unique_repo}:arm",
                   platform=Platform.parse("linux/arm/v7"))
    assert [i.manifest_digest for i in r.images] == [v6.digest]  # v7 host runs v6, like containerd


async def test_pull_by_digest_and_digest_mismatch(registry, unique_repo, store_dir):
    img = build_image(seed=21, layer_sizes=[1000])
    push(registry.url, unique_repo, "t", img)
    ref = f"{registry.host}/{unique_repo}@{img.digest}"
    r = await pull(store_dir, ref)
    assert r.digest == img.digest and r.reference == ref
    assert ref in index_entries(store_dir)

    with pytest.raises(NotFound):
        await pull(store_dir, f"{registry.host}/{unique_repo}@sha256:{'0' * 64}")
    with pytest.raises(NotFound):
        await pull(store_dir, f"{registry.host}/{unique_repo}:no-such-tag")


async def test_cut_mid_blob_resumes_with_range(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=22, layer_sizes=[3_000_000])
    push(registry.url, unique_repo, "r", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    proxy.cut_blob(after_bytes=1_000_000, digest=big)
    events: list = []
    r = await pull(store_dir, f"{proxy.host}/{unique_repo}:r", events=events)
    assert r.digest == img.digest
    reqs = proxy.blob_requests(big)
    assert len(reqs) == 2
    assert reqs[0]["range"] is None
    start = int(reqs[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 1_000_000  # only the missing bytes were asked for
    assert any(e.kind == "blob.retry" for e in events)
    assert blob_files(store_dir)[big] == img.layers[0]


async def test_a_tls_transfer_cut_mid_blob_resumes_with_range(registry, unique_repo,
                                                             store_dir, tmp_path):
    """Real registries speak TLS: a connection cut in the middle of an encrypted body (no
    close_notify) is a broken transfer like any other, resumed from the bytes on disk."""
    import ssl

    import trustme

    from tests.support.proxy import FaultProxy

    cert = trustme.CA().issue_cert("127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    img = build_image(seed=24, layer_sizes=[3_000_000])
    push(registry.url, unique_repo, "tls", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    with FaultProxy(registry.url, ssl_context=ctx).start() as front:
        front.cut_blob(after_bytes=1_000_000, digest=big)
        r = await pull(store_dir, f"{front.host}/{unique_repo}:tls")  # loopback: TLS unchecked
        reqs = front.blob_requests(big)
    assert r.digest == img.digest and blob_files(store_dir)[big] == img.layers[0]
    assert len(reqs) == 2 and reqs[0]["range"] is None
    assert 0 < int(reqs[1]["range"].removeprefix("bytes=").rstrip("-")) <= 1_000_000


async def test_server_ignoring_range_restarts_cleanly(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=23, layer_sizes=[2_000_000])
    push(registry.url, unique_repo, "r", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    proxy.cut_blob(after_bytes=700_000, digest=big)
    proxy.ignore_range(digest=big)
    await pull(store_dir, f"{proxy.host}/{unique_repo}:r")
    assert blob_files(store_dir)[big] == img.layers[0]  # no duplicated bytes
    assert len(proxy.blob_requests(big)) == 2


async def test_bad_content_range_falls_back_to_full_fetch(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=24, layer_sizes=[1_500_000])
    push(registry.url, unique_repo, "r", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    proxy.cut_blob(after_bytes=500_000, digest=big)
    proxy.bad_content_range(digest=big)
    await pull(store_dir, f"{proxy.host}/{unique_repo}:r")
    assert blob_files(store_dir)[big] == img.layers[0]


async def test_corrupt_byte_refetched_once_then_fails_cleanly(registry, proxy, unique_repo,
                                                              store_dir):
    img = build_image(seed=25, layer_sizes=[400_000])
    push(registry.url, unique_repo, "c", img)
    layer = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    ref = f"{proxy.host}/{unique_repo}:c"

    proxy.corrupt_blob(offset=1234, times=1, digest=layer)
    r = await pull(store_dir, ref)  # one clean re-fetch repairs it
    assert r.digest == img.digest

    other = tmp = store_dir.parent / "store2"
    proxy.corrupt_blob(offset=99, times=None, digest=layer)
    with pytest.raises(DigestMismatch, match=layer):
        await pull(tmp, ref)
    proxy.clear_rules()
    assert layer not in blob_files(other)
    assert index_entries(other) == {}  # nothing indexed
    assert_store_valid(other)


async def test_interrupted_run_resumes_in_next_run(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=26, layer_sizes=[2_500_000])
    push(registry.url, unique_repo, "i", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    ref = f"{proxy.host}/{unique_repo}:i"
    proxy.cut_blob(after_bytes=1_200_000, digest=big)
    with pytest.raises(PullerError):
        await pull(store_dir, ref, client_options=ClientOptions(retries=0))
    partial = store_dir / "ingest" / f"sha256-{big.split(':')[1]}"
    assert partial.stat().st_size > 0
    assert big not in blob_files(store_dir)
    assert_store_valid(store_dir)

    proxy.clear_log()
    await pull(store_dir, ref)
    (req,) = proxy.blob_requests(big)
    assert req["range"] == f"bytes={partial.stat().st_size if partial.exists() else 0}-" or \
        int(req["range"].removeprefix("bytes=").rstrip("-")) > 0
    assert blob_files(store_dir)[big] == img.layers[0]


async def test_cancel_mid_pull_leaves_store_valid_and_resumable(registry, proxy, unique_repo,
                                                                store_dir):
    img = build_image(seed=27, layer_sizes=[3_000_000, 2_000_000])
    push(registry.url, unique_repo, "x", img)
    ref = f"{proxy.host}/{unique_repo}:x"
    proxy.stall_blob(after_bytes=1_500_000, seconds=5, times=None)
    started = asyncio.Event()

    def on_event(ev):
        if ev.kind == "blob.progress" and ev.complete >= 1 << 20:
            started.set()

    async def run():
        async with Puller(store=store_dir, client_options=FAST_RETRY, on_event=on_event) as p:
            await p.pull(ref)

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proxy.clear_rules()
    assert_store_valid(store_dir)
    assert index_entries(store_dir) == {}
    r = await pull(store_dir, ref)
    assert r.digest == img.digest
    ranged = [q for q in proxy.blob_requests() if q["range"]]
    assert ranged, f"the next pull should resume partial downloads with Range: {proxy.requests}"
    assert_store_valid(store_dir)


async def test_transient_server_errors_are_retried(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=28, layer_sizes=[1000])
    push(registry.url, unique_repo, "e", img)
    proxy.status(503, r"/manifests/", times=2)
    proxy.status(500, r"/blobs/", times=1)
    proxy.status(429, r"/blobs/", times=1, headers={"Retry-After": "0"})
    r = await pull(store_dir, f"{proxy.host}/{unique_repo}:e")
    assert r.digest == img.digest


async def test_anonymous_bearer_token_flow(token_registry, unique_repo, store_dir):
    img = build_image(seed=29, layer_sizes=[2000, 3000])
    push(token_registry.url, unique_repo, "tok", img, credentials=token_registry.credentials)
    token_registry.tokenserver.clear_log()
    r = await pull(store_dir, f"{token_registry.host}/{unique_repo}:tok")
    assert r.digest == img.digest
    log = token_registry.tokenserver.log
    assert log and all(not e["had_authorization"] for e in log)
    assert len(log) == 1  # one token, cached for the manifest and every blob
    assert f"repository:{unique_repo}:pull" in log[0]["query"].get("scope", "")


SEGMENTED = dict(segments=4, segment_min=1 << 20)


def ranges_of(requests: list[dict]) -> list[tuple[int, int]]:
    out = []
    for q in requests:
        a, _, b = q["range"].removeprefix("bytes=").partition("-")
        out.append((int(a), int(b)))
    return sorted(out)


async def test_large_blob_is_fetched_as_parallel_ranges(registry, proxy, unique_repo,
                                                        store_dir):
    img = build_image(seed=61, layer_sizes=[6_000_000])
    push(registry.url, unique_repo, "big", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    events: list = []
    r = await pull(store_dir, f"{proxy.host}/{unique_repo}:big", events=events, **SEGMENTED)
    assert r.digest == img.digest
    reqs = proxy.blob_requests(big)
    assert len(reqs) == 4 and all(q["status"] == 206 for q in reqs)
    spans = ranges_of(reqs)
    size = len(img.layers[0])
    assert spans[0][0] == 0 and spans[-1][1] == size - 1
    assert all(spans[i][1] + 1 == spans[i + 1][0] for i in range(3))  # no gaps, no overlap
    assert blob_files(store_dir)[big] == img.layers[0]
    progress = [e.complete for e in events if e.kind == "blob.progress" and e.digest == big]
    assert progress[-1] == size
    assert not any((store_dir / "ingest").glob("sha256-*"))


async def test_many_blobs_keep_one_stream_each(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=62, layer_sizes=[3_000_000] * 8)
    push(registry.url, unique_repo, "many", img)
    await pull(store_dir, f"{proxy.host}/{unique_repo}:many", concurrency=4, **SEGMENTED)
    # While more blobs wait than there are slots, each gets one stream; only the last few
    # (at most concurrency - 1, once slots fall idle) may be split.
    split = {q["path"] for q in proxy.blob_requests() if q["range"]}
    assert len(split) <= 3
    assert len(proxy.blob_requests()) - sum(1 for q in proxy.blob_requests() if q["range"]) >= 6


async def test_ranges_ignored_falls_back_to_one_stream(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=63, layer_sizes=[5_000_000])
    push(registry.url, unique_repo, "nr", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    proxy.ignore_range(digest=big)
    r = await pull(store_dir, f"{proxy.host}/{unique_repo}:nr", **SEGMENTED)
    assert r.digest == img.digest
    assert blob_files(store_dir)[big] == img.layers[0]
    assert proxy.blob_requests(big)[-1]["range"] is None  # the last try was one plain GET


async def test_cut_segment_is_retried_and_blob_verified(registry, proxy, unique_repo,
                                                        store_dir):
    img = build_image(seed=64, layer_sizes=[6_000_000])
    push(registry.url, unique_repo, "cut", img)
    big = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    proxy.cut_blob(after_bytes=300_000, times=2, digest=big)
    proxy.corrupt_blob(offset=4_500_000, times=1, digest=big)
    r = await pull(store_dir, f"{proxy.host}/{unique_repo}:cut", **SEGMENTED)
    assert r.digest == img.digest
    assert blob_files(store_dir)[big] == img.layers[0]
    assert_store_valid(store_dir)
