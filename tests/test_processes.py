"""Several puller processes on one store, and interrupting a pull from outside."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.support.images import build_image, push
from tests.test_pull import assert_store_valid, index_entries


def start(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    return subprocess.Popen([sys.executable, "-m", "puller", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_two_processes_share_one_store(registry, proxy, unique_repo, store_dir):
    base = build_image(seed=41, layer_sizes=[4_000_000, 3_000_000])
    a = build_image(seed=42, layer_sizes=[500_000], base=base)
    b = build_image(seed=43, layer_sizes=[600_000], base=base)
    push(registry.url, unique_repo, "a", a)
    push(registry.url, unique_repo, "b", b)
    # Slow the shared layers down so both processes want them at the same time.
    for layer in base.layers:
        proxy.delay(0.5, "/blobs/sha256:" + hashlib.sha256(layer).hexdigest(), times=1)
    ra, rb = f"{proxy.host}/{unique_repo}:a", f"{proxy.host}/{unique_repo}:b"
    procs = [start("pull", "-q", "--store", str(store_dir), r) for r in (ra, rb)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert set(index_entries(store_dir)) == {ra, rb}
    assert_store_valid(store_dir)
    fetched = Counter(q["path"].rsplit("/", 1)[1] for q in proxy.blob_requests()
                      if q["status"] == 200)
    for layer in base.layers:
        d = "sha256:" + hashlib.sha256(layer).hexdigest()
        assert fetched[d] == 1, f"shared layer {d} downloaded {fetched[d]} times"
    assert not [p for p in (store_dir / "ingest").iterdir() if p.name.startswith("sha256-")]


def test_sigint_and_sigterm_keep_partial_downloads_for_the_next_run(registry, proxy,
                                                                    unique_repo, store_dir):
    img = build_image(seed=44, layer_sizes=[6_000_000])
    push(registry.url, unique_repo, "s", img)
    layer = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    ref = f"{proxy.host}/{unique_repo}:s"
    partial = store_dir / "ingest" / f"sha256-{layer.split(':')[1]}"

    for sig in (signal.SIGINT, signal.SIGTERM):
        proxy.clear_rules()
        already = partial.stat().st_size if partial.exists() else 0
        proxy.stall_blob(after_bytes=2_000_000, seconds=30, times=1, digest=layer)
        p = start("pull", "--json", "--store", str(store_dir), ref)
        assert p.stdout is not None
        deadline = time.monotonic() + 30
        for line in p.stdout:  # wait until some of the layer is on disk
            ev = json.loads(line)
            if ev["event"] == "blob.progress" and ev["digest"] == layer and \
                    ev["complete"] >= already + 1_000_000:
                break
            assert time.monotonic() < deadline, "no progress seen"
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130, (sig, err)
        assert "Traceback" not in err
        assert "interrupted" in err
        assert_store_valid(store_dir)
        assert index_entries(store_dir) == {}
        assert partial.stat().st_size > already  # kept, and grew

    proxy.clear_rules()
    proxy.clear_log()
    done = start("pull", "-q", "--store", str(store_dir), ref)
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    (req,) = proxy.blob_requests(layer)
    assert req["range"] and int(req["range"][6:-1]) >= 2_000_000
    assert (store_dir / "blobs" / "sha256" / layer.split(":")[1]).read_bytes() == img.layers[0]
    assert_store_valid(store_dir)
    assert Path(store_dir / "index.json").exists()


def test_kill_9_during_parallel_ranges_resumes_from_verified_bytes(registry, proxy,
                                                                  unique_repo, store_dir):
    img = build_image(seed=45, layer_sizes=[8_000_000])
    push(registry.url, unique_repo, "seg", img)
    layer = "sha256:" + hashlib.sha256(img.layers[0]).hexdigest()
    ref = f"{proxy.host}/{unique_repo}:seg"
    # Every range stalls part-way, so the kill lands while later ranges sit unhashed on disk.
    proxy.stall_blob(after_bytes=1_200_000, seconds=30, times=4, digest=layer)
    p = start("pull", "--json", "--segments", "4", "--segment-min", "1", "--store",
              str(store_dir), ref)
    assert p.stdout is not None
    for line in p.stdout:
        ev = json.loads(line)
        if ev["event"] == "blob.progress" and ev["digest"] == layer and \
                ev["complete"] >= 3_000_000:
            break
    p.kill()
    p.communicate(timeout=30)
    assert_store_valid(store_dir)
    entry = store_dir / "ingest" / f"sha256-{layer.split(':')[1]}"
    assert entry.with_name(entry.name + ".segments").exists()  # the verified prefix, noted

    proxy.clear_rules()
    proxy.clear_log()
    done = start("pull", "-q", "--segments", "1", "--store", str(store_dir), ref)
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    (req,) = proxy.blob_requests(layer)  # one request, no digest-mismatch re-fetch
    assert (store_dir / "blobs" / "sha256" / layer.split(":")[1]).read_bytes() == img.layers[0]
    assert not entry.exists() and not entry.with_name(entry.name + ".segments").exists()
    assert_store_valid(store_dir)


def test_ctrl_c_while_the_registry_stalls_exits_at_once(registry, proxy, unique_repo,
                                                        store_dir):
    img = build_image(seed=46, layer_sizes=[5_000])
    push(registry.url, unique_repo, "hang", img)
    ref = f"{proxy.host}/{unique_repo}:hang"
    for warm in (False, True):  # the engine's manifest fetch, then the up-to-date check
        if warm:
            first = start("pull", "-q", "--store", str(store_dir), ref)
            first.communicate(timeout=60)
            assert first.returncode == 0
        proxy.clear_log()
        proxy.delay(60, r"/manifests/", times=1)
        p = start("pull", "--store", str(store_dir), ref)
        deadline = time.monotonic() + 30
        while not proxy.requests:  # wait until the request is in flight
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        # Well under the 60 s the registry would take: the blocked request is aborted.
        _, err = p.communicate(timeout=20)
        assert p.returncode == 130, err
        assert "Traceback" not in err and "interrupted" in err
        proxy.clear_rules()
