"""Tests of the test infrastructure itself (real registry, token server, builder, fault proxy).
No puller imports here."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.client
import io
import json
import shutil
import subprocess
import tarfile
import time
from urllib.parse import urlsplit

import pytest

from tests.support.images import (
    DOCKER_LIST, DOCKER_MANIFEST, IN_TOTO, MANIFEST_ACCEPT, OCI_INDEX, PushError,
    build_image, build_index, hello_world_amd64, hello_world_list, make_layer, push,
    push_raw_manifest, sha256_digest,
)
from tests.support.proxy import FaultProxy
from tests.support.tokenserver import decode_jwt_unverified


def _get(host: str, path: str, headers: dict | None = None, method: str = "GET"):
    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, resp.headers, body
    finally:
        conn.close()


def _get_partial(host: str, path: str, headers: dict | None = None):
    """GET that tolerates a connection cut mid-body: (status, headers, bytes received, complete)."""
    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        try:
            return resp.status, resp.headers, resp.read(), True
        except http.client.IncompleteRead as e:
            return resp.status, resp.headers, e.partial, False
    finally:
        conn.close()


# -- builder ---------------------------------------------------------------------------------

def test_layers_are_deterministic_real_tars():
    a = make_layer(7, 100_000)
    assert a == make_layer(7, 100_000)
    assert a != make_layer(8, 100_000)
    tar = gzip.decompress(a)
    assert 95_000 < len(tar) < 110_000
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        names = tf.getnames()
    assert "layer7/data/blob.bin" in names and "layer7/link" in names
    assert make_layer(7, 1000, compress="none")[:5] != b"\x1f\x8b\x08\x00\x00"[:5]


def test_big_layer_is_fast():
    t = time.monotonic()
    blob = make_layer(123456, 64 << 20)
    assert len(blob) > 64 << 20
    assert time.monotonic() - t < 5


def test_image_config_and_manifest_are_consistent():
    base = build_image(seed=1, layer_sizes=[1000])
    img = build_image(seed=2, layer_sizes=[2000, 3000], base=base, fmt="docker",
                      platform=("linux", "arm", "v7"))
    m = json.loads(img.manifest)
    cfg = json.loads(img.config)
    assert m["mediaType"] == DOCKER_MANIFEST == img.media_type
    assert m["layers"][0]["digest"] == base.layer_digests[0]
    assert [(d["digest"], d["size"]) for d in m["layers"]] == \
        [(sha256_digest(b), len(b)) for b in img.layers]
    assert cfg["rootfs"]["diff_ids"] == [sha256_digest(gzip.decompress(b)) for b in img.layers]
    assert (cfg["os"], cfg["architecture"], cfg["variant"]) == ("linux", "arm", "v7")
    assert len(cfg["history"]) == 3
    assert img.digest == "sha256:" + hashlib.sha256(img.manifest).hexdigest()
    assert set(img.blobs()) == {img.config_digest, *img.layer_digests}


def test_index_with_attestations_shape():
    a = build_image(seed=1, layer_sizes=[10])
    b = build_image(seed=2, layer_sizes=[10], platform=("linux", "arm64", "v8"))
    idx = build_index([a, b])
    m = json.loads(idx.manifest)
    assert m["mediaType"] == OCI_INDEX
    assert len(m["manifests"]) == 4 and idx.images == [a, b] and len(idx.attestations) == 2
    att = m["manifests"][2]
    assert att["platform"] == {"architecture": "unknown", "os": "unknown"}
    assert att["annotations"]["vnd.docker.reference.digest"] == a.digest
    assert att["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
    assert json.loads(idx.attestations[0].manifest)["layers"][0]["mediaType"] == IN_TOTO
    assert m["manifests"][1]["platform"] == {"architecture": "arm64", "os": "linux",
                                             "variant": "v8"}


# -- real registry ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_push_and_read_back(registry, unique_repo, fmt):
    img = build_image(seed=11, layer_sizes=[5000, 70_000], fmt=fmt)
    assert push(registry.url, unique_repo, "v1", img) == img.digest
    status, h, body = _get(registry.host, f"/v2/{unique_repo}/manifests/v1",
                           {"Accept": MANIFEST_ACCEPT})
    assert status == 200
    assert body == img.manifest
    assert h["Docker-Content-Digest"] == img.digest
    assert h["Content-Type"] == img.media_type
    for digest, data in img.blobs().items():
        status, h, body = _get(registry.host, f"/v2/{unique_repo}/blobs/{digest}")
        assert status == 200 and body == data
    # pushing again skips existing blobs and is idempotent
    assert push(registry.url, unique_repo, "v1", img) == img.digest


def test_registry_serves_ranges(registry, unique_repo):
    img = build_image(seed=12, layer_sizes=[10_000])
    push(registry.url, unique_repo, "t", img)
    layer = img.layers[0]
    status, h, body = _get(registry.host, f"/v2/{unique_repo}/blobs/{img.layer_digests[0]}",
                           {"Range": "bytes=100-199"})
    assert status == 206 and body == layer[100:200]
    assert h["Content-Range"] == f"bytes 100-199/{len(layer)}"


def test_index_with_attestations_accepted(registry, unique_repo):
    a = build_image(seed=21, layer_sizes=[100])
    b = build_image(seed=22, layer_sizes=[100], base=a, platform=("linux", "arm64", "v8"))
    idx = build_index([a, b])
    assert push(registry.url, unique_repo, "multi", idx) == idx.digest
    status, h, body = _get(registry.host, f"/v2/{unique_repo}/manifests/multi",
                           {"Accept": MANIFEST_ACCEPT})
    assert (status, body, h["Content-Type"]) == (200, idx.manifest, OCI_INDEX)
    for child in idx.children:
        status, h, body = _get(registry.host, f"/v2/{unique_repo}/manifests/{child.digest}",
                               {"Accept": MANIFEST_ACCEPT})
        assert (status, body) == (200, child.manifest)


def test_docker_manifest_list_accepted(registry, unique_repo):
    imgs = [build_image(seed=31, layer_sizes=[100], fmt="docker"),
            build_image(seed=32, layer_sizes=[100], fmt="docker", platform=("linux", "s390x"))]
    lst = build_index(imgs, fmt="docker")
    assert push(registry.url, unique_repo, "list", lst) == lst.digest
    status, h, body = _get(registry.host, f"/v2/{unique_repo}/manifests/list",
                           {"Accept": MANIFEST_ACCEPT})
    assert (status, body, h["Content-Type"]) == (200, lst.manifest, DOCKER_LIST)


def test_registry_rejects_index_with_absent_children(registry, unique_repo):
    child = build_image(seed=41, layer_sizes=[10])
    lone = build_index([child], attestations=False)
    with pytest.raises(PushError) as ei:
        push_raw_manifest(registry.url, unique_repo, "t", lone.manifest, lone.media_type)
    assert ei.value.status == 400 and b"MANIFEST_BLOB_UNKNOWN" in ei.value.body


def test_oci_manifest_needs_accept_header(registry, unique_repo):
    img = build_image(seed=42, layer_sizes=[10])
    push(registry.url, unique_repo, "t", img)
    status, _, body = _get(registry.host, f"/v2/{unique_repo}/manifests/t")
    assert status == 404 and b"MANIFEST_UNKNOWN" in body


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_skopeo_sees_builder_digest(registry, unique_repo, tmp_path):
    img = build_image(seed=51, layer_sizes=[1000, 2000])
    push(registry.url, unique_repo, "sk", img)
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/{unique_repo}:sk"],
        capture_output=True, text=True, timeout=60, check=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    doc = json.loads(out.stdout)
    assert doc["Digest"] == img.digest
    assert doc["Layers"] == img.layer_digests


def test_hello_world_capture_roundtrip(registry, unique_repo, fixtures_dir):
    hw = hello_world_amd64()
    assert hw.digest.startswith("sha256:7e9b6e7b")
    assert push(registry.url, unique_repo, "latest", hw) == hw.digest
    status, h, body = _get(registry.host, f"/v2/{unique_repo}/manifests/latest",
                           {"Accept": DOCKER_MANIFEST})
    assert (status, body, h["Docker-Content-Digest"]) == (200, hw.manifest, hw.digest)
    for digest, data in hw.blobs().items():
        assert _get(registry.host, f"/v2/{unique_repo}/blobs/{digest}")[2] == data
    # the real 11-platform list cannot be stored: 10 of its children are absent
    with pytest.raises(PushError) as ei:
        push(registry.url, unique_repo, "list", hello_world_list())
    assert ei.value.status == 400


# -- token auth --------------------------------------------------------------------------------

def test_token_registry_challenge_and_anonymous_pull(token_registry, unique_repo):
    reg, ts = token_registry, token_registry.tokenserver
    img = build_image(seed=61, layer_sizes=[100])
    assert push(reg.url, unique_repo, "t", img, credentials=reg.credentials) == img.digest

    status, h, _ = _get(reg.host, f"/v2/{unique_repo}/manifests/t", {"Accept": MANIFEST_ACCEPT})
    assert status == 401
    challenge = h["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{ts.realm}"' in challenge and 'service="puller-test-registry"' in challenge
    assert f'scope="repository:{unique_repo}:pull"' in challenge

    ts.clear_log()
    u = urlsplit(ts.realm)
    status, _, body = _get(u.netloc, f"{u.path}?service=puller-test-registry"
                                     f"&scope=repository:{unique_repo}:pull,push")
    assert status == 200
    doc = json.loads(body)
    assert doc["token"] == doc["access_token"] and doc["expires_in"] == ts.expires_in
    header, claims = decode_jwt_unverified(doc["token"])
    assert header["alg"] == "ES256" and header["x5c"]
    assert claims["access"] == [{"type": "repository", "name": unique_repo, "actions": ["pull"]}]
    assert ts.log[0]["had_authorization"] is False

    auth = {"Authorization": f"Bearer {doc['token']}", "Accept": MANIFEST_ACCEPT}
    status, h, body = _get(reg.host, f"/v2/{unique_repo}/manifests/t", auth)
    assert (status, body) == (200, img.manifest)

    # anonymous token cannot push; wrong password is refused by the token server
    with pytest.raises(PushError):
        push(reg.url, unique_repo, "t2", build_image(seed=62, layer_sizes=[10]))
    with pytest.raises(PushError) as ei:
        push(reg.url, unique_repo, "t2", img, credentials=("pusher", "wrong"))
    assert ei.value.status == 401
    # expired tokens are rejected (distribution allows 60 s leeway, so go well past it)
    old = ts.issue(unique_repo, ["pull"], expires_in=-120)
    assert _get(reg.host, f"/v2/{unique_repo}/manifests/t",
                {"Authorization": f"Bearer {old}", "Accept": MANIFEST_ACCEPT})[0] == 401


# -- fault proxy --------------------------------------------------------------------------------

@pytest.fixture
def pushed(registry, unique_repo):
    img = build_image(seed=71, layer_sizes=[300_000])
    push(registry.url, unique_repo, "t", img)
    return unique_repo, img


def test_proxy_forwards_transparently(proxy, pushed):
    repo, img = pushed
    status, h, body = _get(proxy.host, f"/v2/{repo}/manifests/t", {"Accept": MANIFEST_ACCEPT})
    assert (status, body, h["Docker-Content-Digest"]) == (200, img.manifest, img.digest)
    layer, digest = img.layers[0], img.layer_digests[0]
    status, h, body = _get(proxy.host, f"/v2/{repo}/blobs/{digest}", {"Range": "bytes=10-"})
    assert status == 206 and body == layer[10:]
    assert _get(proxy.host, f"/v2/{repo}/blobs/{digest}", method="HEAD")[0] == 200
    # pushing through the proxy works too (Location rewritten to the proxy)
    img2 = build_image(seed=72, layer_sizes=[1000])
    assert push(proxy.url, repo, "t2", img2) == img2.digest
    posts = [e for e in proxy.requests if e["method"] == "PUT" and "uploads" in e["path"]]
    assert posts and all(e["status"] == 201 for e in posts)
    log = proxy.blob_requests(digest)
    assert [e["range"] for e in log] == ["bytes=10-"]
    assert log[0]["bytes_sent"] == len(layer) - 10


def test_proxy_cut_blob(proxy, pushed):
    repo, img = pushed
    path = f"/v2/{repo}/blobs/{img.layer_digests[0]}"
    proxy.cut_blob(1000)
    status, h, got, complete = _get_partial(proxy.host, path)
    assert status == 200 and not complete
    assert got == img.layers[0][:1000]
    assert int(h["Content-Length"]) == len(img.layers[0])
    # fired once only
    status, _, got, complete = _get_partial(proxy.host, path)
    assert complete and got == img.layers[0]
    assert proxy.pending() == []


def test_proxy_corrupt_blob(proxy, pushed):
    repo, img = pushed
    layer, digest = img.layers[0], img.layer_digests[0]
    proxy.corrupt_blob(200_000, digest=digest)
    body = _get(proxy.host, f"/v2/{repo}/blobs/{digest}", {"Range": "bytes=100000-"})[2]
    assert len(body) == len(layer) - 100_000 and body != layer[100_000:]
    assert body[100_000] == layer[200_000] ^ 0xFF
    assert body[:100_000] == layer[100_000:200_000]
    assert _get(proxy.host, f"/v2/{repo}/blobs/{digest}")[2] == layer


def test_proxy_ignore_range_and_bad_content_range(proxy, pushed):
    repo, img = pushed
    layer, path = img.layers[0], f"/v2/{repo}/blobs/{img.layer_digests[0]}"
    proxy.ignore_range(times=1)
    status, h, body = _get(proxy.host, path, {"Range": "bytes=500-"})
    assert status == 200 and body == layer
    proxy.bad_content_range()
    status, h, body = _get(proxy.host, path, {"Range": "bytes=500-999"})
    assert status == 206 and body == layer[500:1000]
    assert h["Content-Range"] == f"bytes 501-1000/{len(layer)}"
    assert _get(proxy.host, path, {"Range": "bytes=500-999"})[1]["Content-Range"] == \
        f"bytes 500-999/{len(layer)}"


def test_proxy_status_delay_stall(proxy, pushed):
    repo, img = pushed
    proxy.status(429, r"/manifests/", times=2, headers={"Retry-After": "1"})
    s1, h1, _ = _get(proxy.host, f"/v2/{repo}/manifests/t", {"Accept": MANIFEST_ACCEPT})
    s2, _, _ = _get(proxy.host, f"/v2/{repo}/manifests/t", {"Accept": MANIFEST_ACCEPT})
    s3, _, _ = _get(proxy.host, f"/v2/{repo}/manifests/t", {"Accept": MANIFEST_ACCEPT})
    assert (s1, s2, s3, h1["Retry-After"]) == (429, 429, 200, "1")
    proxy.delay(0.3, r"/manifests/")
    t = time.monotonic()
    assert _get(proxy.host, f"/v2/{repo}/manifests/t", {"Accept": MANIFEST_ACCEPT})[0] == 200
    assert time.monotonic() - t >= 0.3
    proxy.stall_blob(1000, 0.5)
    t = time.monotonic()
    body = _get(proxy.host, f"/v2/{repo}/blobs/{img.layer_digests[0]}")[2]
    assert body == img.layers[0] and time.monotonic() - t >= 0.5
    assert [e["fault"] for e in proxy.requests][:2] == ["status", "status"]


async def test_proxy_serves_other_event_loop(proxy, pushed):
    """An in-process async client on the test's loop talks to the proxy's own loop."""
    import aiohttp

    repo, img = pushed
    proxy.cut_blob(5000)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(f"{proxy.url}/v2/{repo}/blobs/{img.layer_digests[0]}") as r:
                await r.read()
        async with s.get(f"{proxy.url}/v2/{repo}/blobs/{img.layer_digests[0]}") as r:
            assert await r.read() == img.layers[0]
    await asyncio.sleep(0)


def test_proxy_in_front_of_token_registry(fault_proxy, token_registry, unique_repo):
    img = build_image(seed=81, layer_sizes=[100])
    p: FaultProxy = fault_proxy(token_registry)
    assert push(p.url, unique_repo, "t", img, credentials=token_registry.credentials) == img.digest
    assert any(e["status"] == 401 for e in p.requests)


def test_registry_start_stop(registry_factory):
    reg = registry_factory()
    with reg:
        assert _get(reg.host, "/v2/")[0] == 200
        pid = reg.proc.pid
    assert reg.proc is None
    with pytest.raises(OSError):
        _get(f"127.0.0.1:{reg.port}", "/v2/")
    assert pid


def test_htpasswd_registry(registry_factory, unique_repo):
    import base64

    with registry_factory(auth="htpasswd", htpasswd_users={"alice": "secret"}) as reg:
        status, h, _ = _get(reg.host, "/v2/")
        assert status == 401 and h["WWW-Authenticate"].startswith("Basic ")
        good = "Basic " + base64.b64encode(b"alice:secret").decode()
        assert _get(reg.host, "/v2/", {"Authorization": good})[0] == 200
        img = build_image(seed=91, layer_sizes=[10])
        assert push(reg.url, unique_repo, "t", img, credentials=("alice", "secret")) == img.digest


def test_tls_registry(tmp_path, registry_factory):
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    with registry_factory(tls=(cert_path, key_path)) as reg:
        assert reg.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        conn = http.client.HTTPSConnection("127.0.0.1", reg.port, timeout=10, context=ctx)
        try:
            conn.request("GET", "/v2/")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        finally:
            conn.close()
