"""puller copy: registry to registry, digests unchanged, skopeo as the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from urllib.parse import parse_qs

import pytest

from tests.support.images import build_image, build_index, push
from tests.test_push import run, skopeo_raw, uploads

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture
def multi(registry, unique_repo):
    base = build_image(seed=701, layer_sizes=[400_000])
    amd = build_image(seed=702, layer_sizes=[30_000], base=base)
    arm = build_image(seed=703, layer_sizes=[31_000], base=base, platform=("linux", "arm64", "v8"))
    idx = build_index([amd, arm])  # with buildkit attestation manifests
    push(registry.url, unique_repo, "2.0", idx)
    return idx, amd, arm


def test_copy_index_with_every_platform_keeps_digests(registry, registry_factory, fault_proxy,
                                                      unique_repo, multi):
    idx, amd, arm = multi
    other = registry_factory()
    front = fault_proxy(other)
    r = run("copy", "--json", f"{registry.host}/{unique_repo}:2.0", f"{front.host}/copied/app")
    assert r.returncode == 0, r.stderr
    done = [json.loads(x) for x in r.stdout.splitlines()][-1]
    assert done["event"] == "copy.done" and done["digest"] == idx.digest
    assert done["manifests"] == 5  # index, two images, two attestations
    assert skopeo_raw(f"{other.host}/copied/app:2.0") == idx.manifest
    for child in idx.children:
        assert skopeo_raw(f"{other.host}/copied/app@{child.digest}") == child.manifest
    # The shared base layer went up once.
    finished = [parse_qs(q["query"])["digest"][0] for q in uploads(front.requests)]
    assert sorted(finished) == sorted(set(finished)) == sorted(idx.blobs())

    front.clear_log()
    r = run("copy", f"{registry.host}/{unique_repo}:2.0", f"{front.host}/copied/app:2.0")
    assert r.returncode == 0, r.stderr
    assert not uploads(front.requests)  # children found by HEAD: nothing sent again


def test_copy_one_platform_and_within_a_registry_by_mount(registry, proxy, unique_repo, multi):
    idx, amd, arm = multi
    src = f"{proxy.host}/{unique_repo}:2.0"
    r = run("copy", "--platform", "linux/arm64", src, f"{proxy.host}/{unique_repo}-arm:1")
    assert r.returncode == 0, r.stderr
    assert f"Digest: {arm.digest}" in r.stdout
    assert "3 mounted" in r.stdout
    assert skopeo_raw(f"{registry.host}/{unique_repo}-arm:1") == arm.manifest
    assert not proxy.blob_requests()  # mounted, never read
    mounts = [q for q in proxy.requests if q["method"] == "POST" and "mount=" in q["query"]]
    assert len(mounts) == 3 and {q["status"] for q in mounts} == {201}


def test_copy_via_store_caches_blobs(registry, registry_factory, unique_repo, store_dir):
    img = build_image(seed=704, layer_sizes=[50_000])
    push(registry.url, unique_repo, "c", img)
    other = registry_factory()
    r = run("copy", "--via-store", "--store", str(store_dir), f"{registry.host}/{unique_repo}:c",
            f"{other.host}/cached:c")
    assert r.returncode == 0, r.stderr
    assert skopeo_raw(f"{other.host}/cached:c") == img.manifest
    for d in img.layer_digests:
        assert (store_dir / "blobs" / "sha256" / d.split(":")[1]).is_file()


def test_copy_failures_are_one_line(registry, registry_factory, unique_repo):
    other = registry_factory()
    r = run("copy", f"{registry.host}/{unique_repo}:missing", f"{other.host}/x:1")
    assert r.returncode == 1
    assert "not found" in r.stderr and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
    r = run("copy", "--concurrency", "0", f"{registry.host}/a:1", f"{other.host}/x:1")
    assert r.returncode == 2


def test_copy_with_its_output_on_a_full_disk_finishes_and_says_so(registry, registry_factory,
                                                                  unique_repo, multi):
    idx, _, _ = multi
    other = registry_factory()
    e = {k: v for k, v in os.environ.items() if k != "PULLER_STORE"}
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "puller", "copy", "--json",
                            f"{registry.host}/{unique_repo}:2.0", f"{other.host}/full/app"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env=e)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["puller: cannot write the output: No space left on device"]
    assert skopeo_raw(f"{other.host}/full/app:2.0") == idx.manifest


def test_platforms_an_index_lacks_are_left_out_and_none_is_an_error(registry, unique_repo,
                                                                    multi):
    """Several --platform values: the ones the index has are copied (one: that image);
    an index with none of them fails in one line, naming them."""
    idx, amd, arm = multi
    src = f"{registry.host}/{unique_repo}:2.0"
    r = run("copy", "--platform", "linux/arm64", "--platform", "linux/s390x", src,
            f"{registry.host}/{unique_repo}-some:1")
    assert r.returncode == 0, r.stderr
    assert skopeo_raw(f"{registry.host}/{unique_repo}-some:1") == arm.manifest
    r = run("copy", "--platform", "linux/s390x", "--platform", "windows/amd64", src,
            f"{registry.host}/{unique_repo}-none:1")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "none of the platforms linux/s390x, windows/amd64" in r.stderr
