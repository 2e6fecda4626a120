"""The fault-injection suite: what registries and networks really do, in front of the real
distribution registry. Transient faults are survived within one run; permanent ones fail
fast (few requests, checked in the proxy's log) with one line naming the image and digest,
while the other images of the run still complete.

``FaultProxy`` (tests/support) cuts, stalls, corrupts and answers with statuses. Faults that
need different *bytes* (a manifest that isn't what was asked for, a size that lies, media
types the registry won't store) come from ``RewriteProxy`` below, which forwards to the
registry and rewrites chosen responses.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from pathlib import Path
from typing import Callable

import pytest

import puller.client
from puller import Puller, PullOptions
from puller.client import ClientOptions
from puller.errors import RateLimited, TransportError
from puller.maintenance import fsck
from tests.support import ThreadedServer, free_port
from tests.support.images import (DOCKER_MANIFEST, build_image, push, push_blob,
                                  push_raw_manifest, sha256_digest)
from tests.support.proxy import FaultProxy
from tests.support.registry import Registry
from tests.test_fsck import blob, cli
from tests.test_pull import FAST_RETRY, assert_store_valid, index_entries, pull

Rewrite = Callable[[int, dict, bytes], tuple[int, dict, bytes]]
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
        "content-encoding", "upgrade", "te", "trailer"}


class RewriteProxy:
    """Forwards to ``upstream`` and lets a test rewrite whole responses (status, headers,
    body) of GETs whose path matches a regex. Bodies are buffered: small images only."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules: list[tuple[re.Pattern, Rewrite]] = []
        self.log: list[dict] = []
        self._session = None
        self._server = ThreadedServer(self._app, name="rewrite-proxy")

    def start(self) -> RewriteProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def host(self) -> str:
        return self._server.host

    def rewrite(self, path_regex: str, fn: Rewrite) -> None:
        self.rules.append((re.compile(path_regex), fn))

    def requests(self, path_regex: str) -> list[dict]:
        return [e for e in list(self.log) if re.search(path_regex, e["path"])]

    async def _app(self):
        import aiohttp
        from aiohttp import web

        async def startup(app):
            self._session = aiohttp.ClientSession(auto_decompress=False)

        async def cleanup(app):
            await self._session.close()

        async def handle(request):
            self.log.append({"method": request.method, "path": request.path,
                             "range": request.headers.get("Range")})
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
            body = await request.read()
            async with self._session.request(request.method, self.upstream + request.path_qs,
                                             headers=headers, data=body or None,
                                             allow_redirects=False) as up:
                status, data = up.status, await up.read()
                out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if request.method == "GET":
                for rx, fn in self.rules:
                    if rx.search(request.path):
                        status, out, data = fn(status, out, data)
            return web.Response(status=status, headers=out, body=data)

        app = web.Application(client_max_size=64 << 20)
        app.on_startup.append(startup)
        app.on_cleanup.append(cleanup)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture
def rewriter(registry):
    p = RewriteProxy(registry.url).start()
    yield p
    p.stop()


def one_line(err: str) -> list[str]:
    assert "Traceback" not in err
    return err.strip().splitlines()


def json_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# -- transient faults: survived within one run ----------------------------------------------


def test_transient_faults_are_survived_by_one_cli_run(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=501, layer_sizes=[1_200_000, 800_000, 300_000, 2000])
    push(registry.url, unique_repo, "t", img)
    a, b, c, d = img.layer_digests
    proxy.status(503, r"/manifests/", times=1)  # 5xx on the manifest
    proxy.cut_blob(after_bytes=400_000, times=1, digest=a)  # reset mid-blob ...
    proxy.cut_blob(after_bytes=300_000, times=1, digest=a)  # ... and again after resuming
    proxy.ignore_range(digest=b)  # a server that ignores Range: 200 from zero
    proxy.cut_blob(after_bytes=300_000, times=1, digest=b)
    proxy.status(502, rf"/blobs/{c}$", times=1)
    proxy.status(429, rf"/blobs/{d}$", times=1, headers={"Retry-After": "0"})
    r = cli("pull", "--json", "--store", str(store_dir), f"{proxy.host}/{unique_repo}:t")
    assert r.returncode == 0, r.stderr
    events = json_events(r.stdout)
    assert events[-1]["event"] == "pull.done"
    retried = {e["digest"] for e in events if e["event"] == "blob.retry"}
    assert retried == {a, b, c, d}
    resumed = [e["offset"] for e in events if e["event"] == "blob.started" and e["digest"] == a]
    assert resumed[0] == 0 and 0 < resumed[1] <= 400_000
    assert resumed[1] < resumed[2] <= resumed[1] + 300_000
    ranges = [q["range"] for q in proxy.blob_requests(a)]
    assert ranges == [None, f"bytes={resumed[1]}-", f"bytes={resumed[2]}-"]
    assert [q["status"] for q in proxy.blob_requests(b)] == [200, 200]  # Range ignored
    for digest, data in img.blobs().items():
        assert blob(store_dir, digest).read_bytes() == data  # no byte duplicated or lost
    assert fsck(store_dir).ok


async def test_retry_after_in_seconds_and_as_an_http_date(registry, proxy, unique_repo,
                                                          store_dir):
    img = build_image(seed=502, layer_sizes=[1000, 1100])
    push(registry.url, unique_repo, "r", img)
    first, second = img.layer_digests
    proxy.status(429, rf"/blobs/{first}$", times=1, headers={"Retry-After": "1"})
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    proxy.status(429, rf"/blobs/{second}$", times=1, headers={"Retry-After": when})
    events: list = []
    # Backoff of our own would be at most 10 ms: anything longer is the registry's.
    options = ClientOptions(backoff_base=0.01, backoff_max=2.0, retries=2)
    await pull(store_dir, f"{proxy.host}/{unique_repo}:r", events=events,
               client_options=options)
    delays = {e.digest: e.delay for e in events if e.kind == "blob.retry"}
    assert delays[first] == 1.0
    assert 0.05 < delays[second] <= 2.0  # from the date, not our own backoff (<= 10 ms)
    assert "rate limited" in next(e.error for e in events if e.kind == "blob.retry")


async def test_connection_refused_at_first_contact_is_retried(registry, unique_repo, store_dir,
                                                              monkeypatch):
    img = build_image(seed=503, layer_sizes=[1000])
    push(registry.url, unique_repo, "c", img)
    port = free_port()  # nothing listens here yet
    late = FaultProxy(registry.url)
    late._server = ThreadedServer(late._make_app, name="late-proxy", port=port)
    seen: list[BaseException | None] = []
    real = puller.client.retry_delay

    def retry_delay(options, attempt, error=None):
        seen.append(error)
        if len(seen) == 1:  # the first attempt was refused: now the registry comes up
            late.start()
        return real(options, attempt, error)

    monkeypatch.setattr(puller.client, "retry_delay", retry_delay)
    try:
        r = await pull(store_dir, f"127.0.0.1:{port}/{unique_repo}:c")
    finally:
        late.stop()
    assert r.digest == img.digest
    assert isinstance(seen[0], TransportError) and "cannot connect" in str(seen[0])
    assert late.requests  # the pull went through once it was up


def test_stalled_transfer_is_resumed_after_the_stall_timeout(registry, proxy, unique_repo,
                                                             store_dir):
    img = build_image(seed=504, layer_sizes=[1_000_000])
    push(registry.url, unique_repo, "s", img)
    layer = img.layer_digests[0]
    proxy.stall_blob(after_bytes=600_000, seconds=60, digest=layer)
    r = cli("pull", "--json", "--stall-timeout", "1", "--store", str(store_dir),
            f"{proxy.host}/{unique_repo}:s")
    assert r.returncode == 0, r.stderr
    (retry,) = [e for e in json_events(r.stdout) if e["event"] == "blob.retry"]
    assert "timed out" in retry["error"] and retry["offset"] > 0
    first, second = proxy.blob_requests(layer)
    assert first["range"] is None and second["range"] == f"bytes={retry['offset']}-"
    assert blob(store_dir, layer).read_bytes() == img.layers[0]


# -- permanent faults: fail fast, name the image and digest, others complete ----------------


def test_401_403_404_fail_fast_and_the_other_images_complete(registry, proxy, unique_repo,
                                                             store_dir):
    imgs = {code: build_image(seed=505 + i, layer_sizes=[1000 + i])
            for i, code in enumerate((401, 403, 404, 200))}
    refs = {}
    for code, img in imgs.items():
        push(registry.url, unique_repo, f"s{code}", img)
        refs[code] = f"{proxy.host}/{unique_repo}:s{code}"
        if code != 200:
            proxy.status(code, rf"/blobs/{img.layer_digests[0]}$", times=None)
    r = cli("pull", "--retries", "5", "--no-progress", "--store", str(store_dir),
            *refs.values())
    assert r.returncode == 1
    lines = one_line(r.stderr)
    assert len(lines) == 3
    expect = {401: "authentication required", 403: "access denied", 404: "not found"}
    for code, word in expect.items():
        layer = imgs[code].layer_digests[0]
        (line,) = [x for x in lines if refs[code] in x]
        assert word in line and layer in line, line
        assert len(proxy.blob_requests(layer)) == 1  # not retried
    assert f"Digest: {imgs[200].digest}" in r.stdout
    assert list(index_entries(store_dir)) == [refs[200]]
    assert_store_valid(store_dir)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "http:///no-host",
                                      "ftp://mirror.example/blob"])
def test_a_redirect_to_something_not_http_is_one_clear_error(location, registry, proxy,
                                                              unique_repo, store_dir):
    img = build_image(seed=509, layer_sizes=[1500])
    push(registry.url, unique_repo, "r", img)
    layer = img.layer_digests[0]
    proxy.status(307, rf"/blobs/{layer}$", times=None, headers={"Location": location})
    r = cli("pull", "--retries", "3", "--store", str(store_dir), f"{proxy.host}/{unique_repo}:r")
    assert r.returncode == 1
    (line,) = one_line(r.stderr)
    assert f"redirected to {location!r}, which is not an HTTP(S) URL" in line, line
    assert layer in line
    assert len(proxy.blob_requests(layer)) <= 3  # the worker paths' and the client's: no retry


def test_fail_fast_stops_the_other_images(registry, proxy, unique_repo, store_dir):
    good = build_image(seed=510, layer_sizes=[500_000])
    push(registry.url, unique_repo, "good", good)
    proxy.stall_blob(after_bytes=100_000, seconds=60, digest=good.layer_digests[0])
    missing = f"{proxy.host}/{unique_repo}:missing"
    ok = f"{proxy.host}/{unique_repo}:good"
    r = cli("pull", "--fail-fast", "--no-progress", "--store", str(store_dir), ok, missing)
    assert r.returncode == 1
    lines = one_line(r.stderr)
    assert any(missing in x and "not found" in x for x in lines), lines
    assert any(ok in x and "cancelled" in x for x in lines), lines
    assert index_entries(store_dir) == {}
    assert fsck(store_dir).ok


def test_digest_mismatch_after_one_clean_refetch_fails(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=511, layer_sizes=[200_000])
    push(registry.url, unique_repo, "m", img)
    layer = img.layer_digests[0]
    proxy.corrupt_blob(offset=5000, times=None, digest=layer)
    r = cli("pull", "--retries", "5", "--store", str(store_dir), f"{proxy.host}/{unique_repo}:m")
    assert r.returncode == 1
    (line,) = one_line(r.stderr)
    assert f"{proxy.host}/{unique_repo}:m" in line and layer in line and "hashes to" in line
    assert len(proxy.blob_requests(layer)) == 2  # the first and one clean re-fetch
    assert not blob(store_dir, layer).exists()
    assert fsck(store_dir).ok


def _swap_body(data: bytes, media_type: str) -> Rewrite:
    def fn(status: int, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        headers = {k: v for k, v in headers.items() if k.lower() != "docker-content-digest"}
        headers["Content-Type"] = media_type
        return 200, headers, data
    return fn


def test_manifest_bytes_must_match_the_requested_digest(registry, rewriter, unique_repo,
                                                        store_dir):
    img = build_image(seed=512, layer_sizes=[1000])
    other = build_image(seed=513, layer_sizes=[1000])
    push(registry.url, unique_repo, "a", img)
    push(registry.url, unique_repo, "b", other)
    rewriter.rewrite(rf"/manifests/{img.digest}$", _swap_body(other.manifest, DOCKER_MANIFEST))
    # A tag whose Docker-Content-Digest header names other bytes than the body's.
    rewriter.rewrite(r"/manifests/liar$",
                     lambda s, h, b: (s, {**h, "Docker-Content-Digest": other.digest}, b))
    push(registry.url, unique_repo, "liar", img)
    pinned = f"{rewriter.host}/{unique_repo}@{img.digest}"
    liar = f"{rewriter.host}/{unique_repo}:liar"
    r = cli("pull", "--retries", "5", "--store", str(store_dir), pinned, liar)
    assert r.returncode == 1
    lines = one_line(r.stderr)
    assert len(lines) == 2
    assert any(pinned in x and f"hashes to {other.digest}" in x for x in lines), lines
    assert any(liar in x and f"registry says {other.digest}" in x for x in lines), lines
    assert len(rewriter.requests(r"/manifests/")) == 2  # neither was retried
    assert rewriter.requests(r"/blobs/") == []  # nothing fetched on a wrong manifest
    assert index_entries(store_dir) == {}


def test_unknown_media_type_schema1_and_oversized_manifests_are_refused(
        registry, rewriter, unique_repo, store_dir):
    img = build_image(seed=514, layer_sizes=[1000])
    for tag in ("odd", "old", "huge"):
        push(registry.url, unique_repo, tag, img)
    odd = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.example.thing+json",
                      "config": json.loads(img.manifest)["config"], "layers": []}).encode()
    old = json.dumps({"schemaVersion": 1, "name": unique_repo, "tag": "old",
                      "architecture": "amd64", "fsLayers": [], "history": []}).encode()
    huge = b'{"schemaVersion": 2, "annotations": {"x": "' + b"a" * (5 << 20) + b'"}}'
    rewriter.rewrite(r"/manifests/odd$",
                     _swap_body(odd, "application/vnd.example.thing+json"))
    rewriter.rewrite(r"/manifests/old$",
                     _swap_body(old, "application/vnd.docker.distribution.manifest.v1+json"))
    rewriter.rewrite(r"/manifests/huge$", _swap_body(huge, DOCKER_MANIFEST))
    refs = {t: f"{rewriter.host}/{unique_repo}:{t}" for t in ("odd", "old", "huge")}
    r = cli("pull", "--store", str(store_dir), *refs.values())
    assert r.returncode == 1
    lines = one_line(r.stderr)
    assert len(lines) == 3
    words = {"odd": "unsupported manifest media type", "old": "schema1",
             "huge": "over the 4194304-byte limit"}
    for tag, word in words.items():
        assert any(refs[tag] in x and word in x for x in lines), (tag, lines)
    assert len(rewriter.requests(r"/manifests/")) == 3  # permanent: asked once each
    assert rewriter.requests(r"/blobs/") == []


@pytest.mark.parametrize("delta", [-100, +100], ids=["longer", "shorter"])
def test_blob_size_must_match_the_descriptor(delta, registry, rewriter, unique_repo,
                                             store_dir):
    """The descriptor says ``size + delta``: a body longer than the descriptor is cut off
    at the descriptor's size, a shorter one is refused; each after one clean re-fetch."""
    img = build_image(seed=515, layer_sizes=[300_000])
    layer = img.layer_digests[0]
    doc = json.loads(img.manifest)
    doc["layers"][0]["size"] += delta
    lying = json.dumps(doc).encode()
    push(registry.url, unique_repo, "real", img)
    rewriter.rewrite(r"/manifests/sz$", _swap_body(lying, img.media_type))
    push(registry.url, unique_repo, "sz", img)
    ref = f"{rewriter.host}/{unique_repo}:sz"
    r = cli("pull", "--retries", "5", "--store", str(store_dir), ref)
    assert r.returncode == 1
    (line,) = one_line(r.stderr)
    assert ref in line and layer in line
    assert ("more than the expected" if delta < 0 else "the manifest says") in line, line
    assert len(rewriter.requests(rf"/blobs/{layer}$")) == 2
    assert not blob(store_dir, layer).exists()
    partial = store_dir / "ingest" / f"sha256-{layer.split(':')[1]}"
    assert not partial.exists() or partial.stat().st_size == 0  # wrong bytes not kept
    assert fsck(store_dir).ok


class _ForeignRegistry(Registry):
    """The real registry, configured to accept manifests whose layers name URLs."""

    def _config(self) -> dict:
        cfg = super()._config()
        cfg["validation"] = {"manifests": {"urls": {"allow": [r"^https?://"]}}}
        return cfg


def test_foreign_layers_are_skipped_unless_asked_for(tmp_path, unique_repo, store_dir):
    from tests.conftest import _need_registry

    _need_registry()
    img = build_image(seed=516, layer_sizes=[1000], fmt="docker")
    foreign = b"a non-distributable layer" * 40
    doc = json.loads(img.manifest)
    doc["layers"].insert(0, {
        "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "digest": sha256_digest(foreign), "size": len(foreign),
        "urls": ["https://example.invalid/layer.tar.gz"]})
    raw = json.dumps(doc, indent=2).encode()
    with _ForeignRegistry(tmp_path / "reg") as reg, FaultProxy(reg.url) as proxy:
        push_raw_manifest(reg.url, unique_repo, "f", raw, DOCKER_MANIFEST, img.own_blobs())
        push_blob(reg.url, unique_repo, foreign)  # so --include-foreign can get it
        ref = f"{proxy.host}/{unique_repo}:f"
        r = cli("pull", "--json", "--store", str(store_dir), ref)
        assert r.returncode == 0, r.stderr
        assert proxy.blob_requests(sha256_digest(foreign)) == []
        assert not blob(store_dir, sha256_digest(foreign)).exists()
        assert fsck(store_dir).ok  # an image without its foreign layer is complete
        r = cli("pull", "--include-foreign", "-q", "--store", str(store_dir), ref)
        assert r.returncode == 0, r.stderr
        assert blob(store_dir, sha256_digest(foreign)).read_bytes() == foreign
        assert len(proxy.blob_requests(sha256_digest(foreign))) == 1
    assert fsck(store_dir).ok


async def test_library_reports_permanent_errors_as_puller_errors(registry, proxy, unique_repo,
                                                                 store_dir):
    """pull_many returns each image's error; a 429 that never ends uses up the retries."""
    img = build_image(seed=517, layer_sizes=[1000])
    push(registry.url, unique_repo, "x", img)
    proxy.status(429, rf"/blobs/{img.layer_digests[0]}$", times=None,
                 headers={"Retry-After": "0"})
    async with Puller(store=store_dir, options=PullOptions(),
                      client_options=FAST_RETRY) as p:
        (res,) = await p.pull_many([f"{proxy.host}/{unique_repo}:x"])
    assert isinstance(res, RateLimited) and img.layer_digests[0] in str(res)
    assert len(proxy.blob_requests(img.layer_digests[0])) == FAST_RETRY.retries + 1
    assert_store_valid(Path(store_dir))
    await asyncio.sleep(0)
