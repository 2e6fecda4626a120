"""Uploads sent from worker threads (puller.threadpush) and the event-loop path beside them:
redirects at the source, tokens that stop working mid-run, bad bytes, and a copy that goes
entirely through the http.client transport."""

from __future__ import annotations


import signal
import socket
import subprocess
import time

import pytest

from puller.client import ClientOptions, RegistryClient
from puller.digest import Digest
from puller.errors import DigestMismatch
from puller.push import RegistryProvider, Transfer, TransferOptions
from puller.reference import Reference
from puller.transport import ThreadedTransport
from tests.support.images import build_image, push
from tests.support.tokenserver import spoil_cached_token
from tests.test_auth import _RedirectingFront
from tests.test_processes import start
from tests.test_push import run, skopeo_raw, uploads

pytestmark = pytest.mark.filterwarnings("error")


async def _copy(client: RegistryClient, src: str, dst: str, options: TransferOptions,
                events: list[dict] | None = None) -> str:
    source, target = Reference.parse(src), Reference.parse(dst)
    fetched = await client.get_manifest(source)
    transfer = Transfer(client, options, emit=(events.append if events is not None
                                                else lambda ev: None))
    try:
        digest = await transfer.push_image(RegistryProvider(client, source), fetched.data,
                                           fetched.media_type, target, target.tag or "latest")
    finally:
        await transfer.aclose()
    return str(digest)


@pytest.mark.parametrize("threaded", [True, False], ids=["thread", "event-loop"])
async def test_copy_over_http_client_transport(registry, registry_factory, fault_proxy,
                                               unique_repo, threaded):
    """Both upload paths work over the http.client transport the command line uses:
    a small blob in one PUT, a large one in PATCH chunks."""
    img = build_image(seed=611, layer_sizes=[2_600_000, 3_000])
    push(registry.url, unique_repo, "t", img)
    other = registry_factory()
    front = fault_proxy(other)
    transport = ThreadedTransport(timeout=30)
    async with RegistryClient(ClientOptions(), credentials=None, transport=transport) as client:
        digest = await _copy(client, f"{registry.host}/{unique_repo}:t",
                             f"{front.host}/over/http:t",
                             TransferOptions(chunk_size=1 << 20, threaded=threaded))
    assert digest == img.digest
    assert skopeo_raw(f"{other.host}/over/http:t") == img.manifest
    patches = [q for q in front.requests if q["method"] == "PATCH"]
    assert len(patches) == 3  # 2.6 MB in 1 MiB chunks
    assert len(uploads(front.requests)) == 3  # config, two layers


async def test_source_redirect_is_followed_without_credentials(token_registry, registry_factory,
                                                               unique_repo):
    """A source that sends blob GETs to a CDN (another origin): the upload thread follows
    the redirect and the CDN never sees the registry's token."""
    img = build_image(seed=612, layer_sizes=[70_000, 9_000])
    push(token_registry.url, unique_repo, "r", img, credentials=token_registry.credentials)
    other = registry_factory()
    with _RedirectingFront(token_registry.url, img.blobs()) as front:
        async with RegistryClient(ClientOptions(), credentials=None) as client:
            digest = await _copy(client, f"{front.front.host}/{unique_repo}:r",
                                 f"{other.host}/from/cdn:r", TransferOptions())
    assert digest == img.digest
    assert len(front.cdn_saw_auth) == 3 and not any(front.cdn_saw_auth)
    assert skopeo_raw(f"{other.host}/from/cdn:r") == img.manifest


async def test_source_token_refused_mid_run_is_renewed(token_registry, registry_factory,
                                                       unique_repo):
    """The source refuses the token an upload thread sends (expired, revoked): the run
    earns a new one through the registry client and the copy goes on."""
    img = build_image(seed=613, layer_sizes=[40_000])
    push(token_registry.url, unique_repo, "r", img, credentials=token_registry.credentials)
    other = registry_factory()
    src = Reference.parse(f"{token_registry.host}/{unique_repo}:r")
    events: list[dict] = []
    async with RegistryClient(ClientOptions(), credentials=None) as client:
        fetched = await client.get_manifest(src)
        spoil_cached_token(client, src.api_host, f"repository:{unique_repo}:pull")
        token_registry.tokenserver.clear_log()
        transfer = Transfer(client, TransferOptions(), emit=events.append)
        try:
            digest = await transfer.push_image(
                RegistryProvider(client, src), fetched.data, fetched.media_type,
                Reference.parse(f"{other.host}/renewed/app:r"), "r")
        finally:
            await transfer.aclose()
    assert str(digest) == img.digest
    assert len(token_registry.tokenserver.log) == 1  # one fresh token, shared by both blobs
    assert skopeo_raw(f"{other.host}/renewed/app:r") == img.manifest
    assert not [e for e in events if e["event"] == "blob.retry"]


@pytest.mark.parametrize("size", [50_000, 2_600_000], ids=["one-put", "chunked"])
async def test_corrupt_source_bytes_never_land(registry, registry_factory, fault_proxy,
                                               unique_repo, size):
    """A source whose blob bytes don't hash to the digest: the copy fails with a digest
    error, and the target has neither the blob nor the manifest."""
    img = build_image(seed=614 + size, layer_sizes=[size])
    push(registry.url, unique_repo, "bad", img)
    bad = fault_proxy(registry)
    layer = img.layer_digests[0]
    bad.corrupt_blob(size // 2, times=None, digest=layer)
    other = registry_factory()
    async with RegistryClient(ClientOptions(retries=1, backoff_base=0.01),
                              credentials=None) as client:
        with pytest.raises(DigestMismatch):
            await _copy(client, f"{bad.host}/{unique_repo}:bad", f"{other.host}/bad/copy:bad",
                        TransferOptions(chunk_size=1 << 20, retries=1))
        target = Reference.parse(f"{other.host}/bad/copy:bad")
        assert await client.blob_exists(target, Digest.parse(layer)) is None
        assert await client.head_manifest(target, "bad") is None


def test_copy_command_reports_a_corrupt_source_in_one_line(registry, registry_factory,
                                                           fault_proxy, unique_repo):
    img = build_image(seed=619, layer_sizes=[60_000])
    push(registry.url, unique_repo, "bad", img)
    bad = fault_proxy(registry)
    bad.corrupt_blob(10, times=None, digest=img.layer_digests[0])
    other = registry_factory()
    r = run("copy", "--retries", "0", f"{bad.host}/{unique_repo}:bad", f"{other.host}/x/y:bad")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "hash" in lines[0], r.stderr


@pytest.mark.parametrize("command,size", [("copy", 3_000_000), ("copy", 9_000_000),
                                          ("mirror", 3_000_000)],
                         ids=["copy-one-put", "copy-chunked", "mirror"])
def test_ctrl_c_while_the_source_stalls_mid_copy(registry, registry_factory, fault_proxy,
                                                 unique_repo, command, size):
    """The source stops sending half-way through a blob an upload thread is forwarding:
    Ctrl-C ends the run at once (exit 130, one line), the target gets no manifest, and
    the next run copies everything."""
    img = build_image(seed=620 + size % 7, layer_sizes=[size])
    push(registry.url, unique_repo, "stall", img)
    src = fault_proxy(registry)
    layer = img.layer_digests[0]
    src.stall_blob(after_bytes=size // 2, seconds=60, times=1, digest=layer)
    other = registry_factory()
    source = f"{src.host}/{unique_repo}:stall"
    if command == "copy":
        dst = f"{other.host}/stalled/copy:stall"
        argv = ["copy", "--chunk-size", "4194304", source, dst]
    else:
        dst = f"{other.host}/m/{unique_repo}:stall"
        argv = ["mirror", "--chunk-size", "4194304", "--target", f"{other.host}/m", source]
    p = start(*argv)
    deadline = time.monotonic() + 30
    while not any(q["fault"] == "stall" and q["bytes_sent"] >= size // 2
                  for q in src.requests):
        assert time.monotonic() < deadline and p.poll() is None, "the stall was not reached"
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)  # well under the 60 s stall
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert len([x for x in err.splitlines() if x.strip()]) == 1, err
    missing = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                              f"docker://{dst}"], capture_output=True, timeout=60)
    assert missing.returncode != 0

    src.clear_rules()
    r = run(*argv)
    assert r.returncode == 0, r.stderr
    assert skopeo_raw(dst) == img.manifest


async def test_target_token_refused_mid_run_is_renewed(registry, token_registry, unique_repo):
    """The target refuses the push token an upload thread sends: the registry client
    earns a new one (with the saved login) and the upload goes on from what the target
    holds."""
    from puller.credentials import Credentials

    class Login:
        def get(self, registry: str) -> Credentials:
            return Credentials(*token_registry.credentials)

    img = build_image(seed=625, layer_sizes=[90_000])
    push(registry.url, unique_repo, "r", img)
    target = Reference.parse(f"{token_registry.host}/{unique_repo}-renewed:r")
    events: list[dict] = []
    async with RegistryClient(ClientOptions(), credentials=Login()) as client:
        real = client.upload_request
        spoiled: list[bool] = []

        async def upload_request(ref, location):
            if not spoiled:  # the first upload thread gets a token the registry refuses
                spoiled.append(True)
                spoil_cached_token(client, ref.api_host, client.push_scope(ref))
            return await real(ref, location)

        client.upload_request = upload_request
        token_registry.tokenserver.clear_log()
        digest = await _copy(client, f"{registry.host}/{unique_repo}:r", str(target),
                             TransferOptions(), events)
    assert digest == img.digest and spoiled
    assert len(token_registry.tokenserver.log) >= 1  # a fresh token was issued
    assert not [e for e in events if e["event"] == "blob.retry"]
    assert skopeo_raw(str(target)) == img.manifest


def test_command_line_behind_an_http_proxy(registry, registry_factory, unique_repo,
                                           store_dir):
    """With HTTP_PROXY set the command line goes through the proxy (aiohttp, the only
    transport that honours one) for every request to a registry that is not on this
    machine, pull and copy alike, and the bytes arrive intact. (The registries here are
    on loopback, which is never proxied, so they go by names only the proxy knows, as
    insecure registries: HTTPS is tried through the proxy first.)"""
    from tests.support.forwardproxy import ForwardProxy

    img = build_image(seed=630, layer_sizes=[2_600_000, 4_000])
    push(registry.url, unique_repo, "p", img)
    other = registry_factory()
    src_host = f"src.proxied.test:{registry.host.rsplit(':', 1)[1]}"
    dst_host = f"dst.proxied.test:{other.host.rsplit(':', 1)[1]}"
    src, dst = f"{src_host}/{unique_repo}:p", f"{dst_host}/proxied/copy:p"
    with ForwardProxy({"src.proxied.test": "127.0.0.1", "dst.proxied.test": "127.0.0.1"}) as fp:
        env = {"HTTP_PROXY": fp.url, "https_proxy": fp.url,
               "PULLER_INSECURE_REGISTRIES": f"{src_host},{dst_host}"}
        r = run("copy", "--chunk-size", "1048576", src, dst, env=env)
        assert r.returncode == 0, r.stderr
        p = run("pull", "-q", "--store", str(store_dir), src, env=env)
        assert p.returncode == 0, p.stderr
        seen = fp.requests
    assert skopeo_raw(f"{other.host}/proxied/copy:p") == img.manifest
    for d, data in img.blobs().items():
        assert (store_dir / "blobs" / "sha256" / d.split(":")[1]).read_bytes() == data
    # Every blob went through the proxy: GETs at the source (copy and pull), uploads at
    # the target.
    for d in [img.config_digest, *img.layer_digests]:
        assert sum(1 for m, h, path in seen
                   if m == "GET" and h == src_host and path.endswith(d)) == 2
    assert any(m == "PATCH" and h == dst_host for m, h, _ in seen)
    assert any(m == "PUT" and h == dst_host and "/manifests/" in path for m, h, path in seen)
    assert any(m == "CONNECT" for m, _, _ in seen)  # HTTPS was tried first


def test_loopback_registries_never_go_through_the_proxy(registry, unique_repo, store_dir):
    """docker's rule: requests for this machine's own registries (127.0.0.0/8, ::1,
    localhost) never go through HTTP(S)_PROXY, even one that is down, and NO_PROXY
    isn't needed for them."""
    img = build_image(seed=631, layer_sizes=[300_000])
    push(registry.url, unique_repo, "p", img)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # a port nobody listens on
    proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
    try:
        env = {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
               "https_proxy": proxy}
        for ref in (f"{registry.host}/{unique_repo}:p",
                    f"localhost:{registry.host.rsplit(':', 1)[1]}/{unique_repo}:p"):
            r = run("pull", "-q", "--store", str(store_dir), ref, env=env)
            assert r.returncode == 0, r.stderr
    finally:
        dead.close()
    assert (store_dir / "blobs" / "sha256" / img.layer_digests[0].split(":")[1]).is_file()


def test_an_unusable_proxy_setting_is_named(registry, unique_repo, store_dir):
    """A proxy variable that can't be used is one line naming it, not an error about the
    registry, and the pull fails at once (no retries)."""
    env = {"HTTPS_PROXY": "socks5://proxy.corp:1080"}
    r = run("pull", "-q", "--store", str(store_dir), "registry.invalid/a/b:1", env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "puller: registry.invalid/a/b:1: HTTPS_PROXY='socks5://proxy.corp:1080': only "
        "http:// proxies are supported, not socks5://"], r.stderr
