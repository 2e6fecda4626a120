"""puller push and puller tag: from the store to a real registry, through a counting proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tests.support.images import build_image, build_index, push

pytestmark = pytest.mark.filterwarnings("error")


def run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("PULLER_STORE", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          text=True, timeout=timeout, env=e)


def skopeo_raw(ref: str) -> bytes:
    return subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
                          capture_output=True, check=True, timeout=60).stdout


def short(digest: str) -> str:
    return digest.split(":")[1][:12]


def uploads(log: list[dict]) -> list[dict]:
    """Requests that finish an upload (PUT ...?digest=)."""
    return [q for q in log if q["method"] == "PUT" and "/blobs/uploads/" in q["path"]
            and "digest=" in q["query"]]


def test_tag_then_push_mounts_from_the_pulled_repository(registry, proxy, unique_repo, store_dir):
    img = build_image(seed=601, layer_sizes=[300_000, 5_000])
    push(registry.url, unique_repo, "1", img)
    src = f"{proxy.host}/{unique_repo}:1"
    dst = f"{proxy.host}/{unique_repo}-copy:1"
    assert run("pull", "-q", "--store", str(store_dir), src).returncode == 0
    r = run("tag", "--store", str(store_dir), src, dst)
    assert r.returncode == 0, r.stderr

    proxy.clear_log()
    r = run("push", "--store", str(store_dir), dst)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"The push refers to repository [{proxy.host}/{unique_repo}-copy]"
    for d in [img.config_digest, *img.layer_digests]:
        assert f"{short(d)}: Mounted from {unique_repo}" in lines
    assert lines[-1] == f"1: digest: {img.digest} size: {len(img.manifest)}"
    log = proxy.requests
    mounts = [q for q in log if q["method"] == "POST" and "mount=" in q["query"]]
    assert len(mounts) == 3 and all(q["status"] == 201 for q in mounts)
    assert all(parse_qs(q["query"])["from"] == [unique_repo] for q in mounts)
    assert not uploads(log) and not [q for q in log if q["method"] == "PATCH"]
    assert not proxy.blob_requests()  # nothing read back from the registry
    assert skopeo_raw(f"{registry.host}/{unique_repo}-copy:1") == img.manifest

    # Again: everything is there; one HEAD per blob, and the manifest PUT again.
    proxy.clear_log()
    r = run("push", "--store", str(store_dir), dst)
    assert r.returncode == 0, r.stderr
    for d in img.layer_digests:
        assert f"{short(d)}: Layer already exists" in r.stdout
    methods = sorted(q["method"] for q in proxy.requests if "/blobs/" in q["path"])
    assert methods == ["HEAD"] * 3


def test_push_monolithic_and_chunked_to_another_registry(registry, registry_factory,
                                                          fault_proxy, unique_repo, store_dir):
    img = build_image(seed=602, layer_sizes=[2_500_000, 20_000])
    push(registry.url, unique_repo, "v1", img)
    src = f"{registry.host}/{unique_repo}:v1"
    assert run("pull", "-q", "--store", str(store_dir), src).returncode == 0
    other = registry_factory()
    front = fault_proxy(other)
    dst = f"{front.host}/pushed/app:v1"
    assert run("tag", "--store", str(store_dir), src, dst).returncode == 0

    r = run("push", "--json", "--chunk-size", "1M", "--store", str(store_dir), dst)
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in r.stdout.splitlines()]
    done = [e for e in events if e["event"] == "push.done"][0]
    assert done["uploaded"] == 3 and done["mounted"] == 0 and done["existed"] == 0
    assert done["bytes_uploaded"] == sum(len(b) for b in img.layers) + len(img.config)
    log = front.requests
    patches = [q for q in log if q["method"] == "PATCH"]
    assert len(patches) == 3  # the 2.5 MB layer in 1 MiB chunks; small blobs in one PUT
    assert len(uploads(log)) == 3
    assert skopeo_raw(f"{other.host}/pushed/app:v1") == img.manifest


@pytest.mark.parametrize("threaded", [True, False], ids=["thread", "event-loop"])
async def test_interrupted_chunked_upload_resumes_from_the_registry_s_offset(
        registry, registry_factory, fault_proxy, unique_repo, store_dir, threaded):
    from puller.client import ClientOptions, RegistryClient
    from puller.push import StoreProvider, Transfer, TransferOptions
    from puller.reference import Reference
    from puller.store import ContentStore

    img = build_image(seed=603, layer_sizes=[3_000_000])  # 3 chunks of 1 MiB
    push(registry.url, unique_repo, "r", img)
    src = f"{registry.host}/{unique_repo}:r"
    assert run("pull", "-q", "--store", str(store_dir), src).returncode == 0
    other = registry_factory()
    front = fault_proxy(other)
    target = Reference.parse(f"{front.host}/resumed/app:r")
    events: list[dict] = []
    chunk = 1 << 20
    async with RegistryClient(ClientOptions(retries=2, backoff_base=0.01),
                              credentials=None) as client:
        # the third chunk's PATCH is refused on the wire
        front.status(503, path_regex=r"/blobs/uploads/", method="PATCH", times=1, skip=2)
        store = ContentStore(store_dir)
        transfer = Transfer(client, TransferOptions(chunk_size=chunk, threaded=threaded),
                            emit=events.append)
        provider = StoreProvider(store, src)
        try:
            digest = await transfer.push_image(provider, img.manifest, img.media_type, target,
                                               "r")
        finally:
            await transfer.aclose()
    assert str(digest) == img.digest
    resumed = [e for e in events if e["event"] == "blob.resumed"]
    assert [e["offset"] for e in resumed] == [2 * chunk]
    log = front.requests
    patches = [q for q in log if q["method"] == "PATCH"]
    assert [q["status"] for q in patches] == [202, 202, 503, 202]
    status_gets = [q for q in log if q["method"] == "GET" and "/blobs/uploads/" in q["path"]]
    assert len(status_gets) == 1 and status_gets[0]["status"] == 204
    assert skopeo_raw(f"{other.host}/resumed/app:r") == img.manifest


def test_push_index_with_every_platform_and_fallback_to_one(registry, registry_factory,
                                                             unique_repo, store_dir):
    amd = build_image(seed=604, layer_sizes=[10_000])
    arm = build_image(seed=605, layer_sizes=[11_000], platform=("linux", "arm64", "v8"))
    idx = build_index([amd, arm], attestations=False)
    push(registry.url, unique_repo, "multi", idx)
    src = f"{registry.host}/{unique_repo}:multi"
    other = registry_factory()
    # Only one platform in the store: that image is pushed, with a note.
    assert run("pull", "-q", "--platform", "linux/arm64", "--store", str(store_dir),
               src).returncode == 0
    assert run("tag", "--store", str(store_dir), src, f"{other.host}/one:t").returncode == 0
    r = run("push", "--store", str(store_dir), f"{other.host}/one:t")
    assert r.returncode == 0, r.stderr
    assert "Pushing only linux/arm64" in r.stdout
    assert skopeo_raw(f"{other.host}/one:t") == arm.manifest
    # Every platform in the store: the index goes byte for byte.
    assert run("pull", "-q", "--all-platforms", "--store", str(store_dir), src).returncode == 0
    assert run("tag", "--store", str(store_dir), src, f"{other.host}/all:t").returncode == 0
    r = run("push", "--store", str(store_dir), f"{other.host}/all:t")
    assert r.returncode == 0, r.stderr
    assert skopeo_raw(f"{other.host}/all:t") == idx.manifest
    assert skopeo_raw(f"{other.host}/all@{arm.digest}") == arm.manifest


def test_push_of_an_index_the_store_holds_in_part(registry, registry_factory, unique_repo,
                                                 store_dir):
    amd = build_image(seed=606, layer_sizes=[10_000])
    arm = build_image(seed=607, layer_sizes=[11_000], platform=("linux", "arm64", "v8"))
    idx = build_index([amd, arm])  # with attestation manifests, which a pull never fetches
    push(registry.url, unique_repo, "att", idx)
    src = f"{registry.host}/{unique_repo}:att"
    other = registry_factory()
    assert run("pull", "-q", "--all-platforms", "--store", str(store_dir), src).returncode == 0
    assert run("tag", "--store", str(store_dir), src, f"{other.host}/part:t").returncode == 0
    # Both platforms pulled: pushing one of them under the tag would drop the other.
    r = run("push", "--store", str(store_dir), f"{other.host}/part:t")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "has 2 of the index's 4 manifests" in r.stderr
    assert "--platform" in r.stderr and "puller copy" in r.stderr
    gone = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                           f"docker://{other.host}/part:t"], capture_output=True, timeout=60)
    assert gone.returncode != 0  # nothing was pushed under the tag
    # One image, asked for by platform: pushed, with a note saying what was left out.
    r = run("push", "--platform", "linux/arm64", "--store", str(store_dir),
            f"{other.host}/part:t")
    assert r.returncode == 0, r.stderr
    assert "Pushing only linux/arm64" in r.stdout and "puller copy" in r.stdout
    assert skopeo_raw(f"{other.host}/part:t") == arm.manifest
    # The whole index, as the hint says.
    assert run("copy", src, f"{other.host}/whole:t").returncode == 0
    assert skopeo_raw(f"{other.host}/whole:t") == idx.manifest


def test_push_and_tag_errors_are_one_line(registry, store_dir, tmp_path: Path):
    r = run("push", "--store", str(store_dir), f"{registry.host}/not/pulled:1")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "is not in the store" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("push", "--store", str(store_dir), "Bad//Ref")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run("tag", "--store", str(store_dir), f"{registry.host}/a:1", f"{registry.host}/b:1")
    assert r.returncode == 1 and "not in the store" in r.stderr


def test_a_cancelled_store_read_closes_the_file_only_after_its_thread(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """Cancelling a push while a worker thread reads a blob from the store leaves that
    thread running; the file must stay open until it is done (a descriptor closed under
    a read may be reused by another open meanwhile), and then be closed."""
    import asyncio
    import threading

    from puller import mediatypes, push as push_mod
    from puller.digest import Digest
    from puller.manifest import Descriptor
    from puller.store import ContentStore

    store = ContentStore(tmp_path / "store")
    data = os.urandom(300_000)
    digest = Digest.from_bytes(data)
    store.put(digest, data)
    desc = Descriptor(media_type=mediatypes.OCI_LAYER, digest=digest, size=len(data))
    blob_path = os.path.realpath(store.blob_path(digest))

    def open_on_blob() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") == blob_path
            except OSError:
                pass
        return n

    entered, release = threading.Event(), threading.Event()
    real_pread = os.pread

    def slow_pread(fd: int, n: int, pos: int) -> bytes:
        entered.set()
        release.wait(30)
        return real_pread(fd, n, pos)

    async def main() -> tuple[int, int]:
        async def consume() -> None:
            async with push_mod._StoreBlob(store, desc).open(0) as chunks:
                async for _ in chunks:
                    pass

        monkeypatch.setattr(os, "pread", slow_pread)
        task = asyncio.create_task(consume())
        await asyncio.to_thread(entered.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        during = open_on_blob()  # the thread is still in pread
        release.set()
        for _ in range(500):  # bounded: the thread finishes at once once released
            if not open_on_blob():
                break
            await asyncio.sleep(0.01)
        return during, open_on_blob()

    during, after = asyncio.run(main())
    assert (during, after) == (1, 0)
