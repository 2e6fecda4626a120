"""Crash safety: `kill -9` a pulling process at random points (fixed seeds), then the store
must still be valid and the next run must resume exactly where the bytes on disk end.
Also: a full disk is a clear error that leaves the store valid."""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from puller.maintenance import fsck
from tests.support.images import build_image, push
from tests.test_pull import assert_store_valid, index_entries

LAYERS = [1_500_000, 700_000, 200_000]


def start(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    return subprocess.Popen([sys.executable, "-m", "puller", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def events(proc: subprocess.Popen) -> queue.Queue:
    """The process's JSON events, read by a thread (None at EOF), so waits can be bounded."""
    q: queue.Queue = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(json.loads(line))
        q.put(None)

    threading.Thread(target=read, daemon=True).start()
    return q


def partials(store: Path) -> dict[str, int]:
    """digest -> bytes of its unfinished download in ingest/."""
    out = {}
    for d in (store / "ingest").iterdir() if (store / "ingest").exists() else ():
        if d.name.startswith("sha256-") and "." not in d.name:
            out["sha256:" + d.name.split("-", 1)[1]] = d.stat().st_size
    return out


@pytest.fixture
def image(registry, unique_repo):
    img = build_image(seed=401, layer_sizes=LAYERS)
    push(registry.url, unique_repo, "k", img)
    return img


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_kill_9_at_a_random_point_then_resume(seed, image, proxy, unique_repo, store_dir):
    rng = random.Random(seed)
    ref = f"{proxy.host}/{unique_repo}:k"
    sizes = {image.config_digest: len(image.config),
             **{d: len(b) for d, b in zip(image.layer_digests, image.layers, strict=True)}}
    # Modes: "stalled" holds one layer after some bytes and kills while it waits (a
    # resume is certain); "anywhere" lets everything run and kills after a random event
    # (before, during or after blob writes, or around the index update).
    mode = "stalled" if seed % 2 else "anywhere"
    victim = image.layer_digests[0]
    if mode == "stalled":
        proxy.stall_blob(after_bytes=rng.randrange(600_000, 1_400_000), seconds=60,
                         digest=victim)
    p = start("pull", "--json", "-c", str(rng.choice([1, 2, 4])), "--store", str(store_dir),
              ref)
    q = events(p)
    kill_after = rng.randrange(1, 30)
    seen = 0
    while True:
        ev = q.get(timeout=60)  # a guard against a hang, not a timing assertion
        if ev is None:
            break
        seen += 1
        if mode == "stalled":
            if ev["event"] == "blob.progress" and ev["digest"] == victim and \
                    ev["complete"] >= 512 * 1024:
                time.sleep(rng.uniform(0, 0.2))
                break
        elif seen >= kill_after:
            time.sleep(rng.uniform(0, 0.05))
            break
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    proxy.clear_rules()

    # The store is valid: blobs/ holds only whole, verified blobs; index.json parses.
    assert_store_valid(store_dir)
    report = fsck(store_dir)
    assert report.ok, [p.line() for p in report.problems]
    entries = index_entries(store_dir)
    if mode == "stalled":
        assert entries == {}  # the stalled layer can't have finished
    on_disk = partials(store_dir)
    if mode == "stalled":
        assert on_disk.get(victim, 0) >= 512 * 1024
    r = subprocess.run([sys.executable, "-m", "puller", "fsck", "--json", "--store",
                        str(store_dir)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

    # The next run completes, asking only for the bytes that are missing.
    proxy.clear_log()
    done = start("pull", "-q", "--store", str(store_dir), ref)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert out.strip() == f"{proxy.host}/{unique_repo}@{image.digest}"
    for req in proxy.blob_requests():
        digest = req["path"].rsplit("/", 1)[1]
        have = on_disk.get(digest, 0)
        assert 0 < sizes[digest] and have < sizes[digest], f"{digest} was already whole"
        assert req["range"] == (f"bytes={have}-" if have else None), (digest, have, req)
    requested = {q["path"].rsplit("/", 1)[1] for q in proxy.blob_requests()}
    stored_before = {d for d in sizes if d not in requested}
    for d in stored_before:  # not asked for again: whole on disk (blobs/ or ingest/)
        assert on_disk.get(d, sizes[d]) == sizes[d]
    if mode == "stalled":
        assert victim in requested
    for d, data in image.blobs().items():
        assert (store_dir / "blobs" / "sha256" / d.split(":")[1]).read_bytes() == data
    assert fsck(store_dir).ok and fsck(store_dir).partials == []
    assert list(index_entries(store_dir)) == [ref]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("disk-full test needs root to mount a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_disk_full_is_a_clear_error_and_the_store_stays_valid(registry, unique_repo,
                                                             small_disk):
    img = build_image(seed=402, layer_sizes=[3_000_000, 20_000])
    push(registry.url, unique_repo, "big", img)
    store = small_disk / "store"
    ref = f"{registry.host}/{unique_repo}:big"
    p = start("pull", "--no-progress", "--store", str(store), ref)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    # The big layer fills the disk; whichever write then meets ENOSPC first is named.
    named = [d for d in img.blobs() if d in lines[0]]
    assert len(lines) == 1 and "disk full while writing blob" in lines[0] and named, err
    assert index_entries(store) == {}
    assert_store_valid(store)
    assert fsck(store).ok  # the partial download is kept in ingest/, nothing else is wrong
    big = img.layer_digests[0]
    assert not (store / "blobs" / "sha256" / big.split(":")[1]).exists()


def test_unpack_onto_a_full_disk_says_where(registry, unique_repo, tmp_path, small_disk):
    img = build_image(seed=403, layer_sizes=[3_000_000])
    push(registry.url, unique_repo, "fat", img)
    store = tmp_path / "store"
    ref = f"{registry.host}/{unique_repo}:fat"
    p = start("pull", "-q", "--store", str(store), ref)
    p.communicate(timeout=120)
    assert p.returncode == 0
    root = small_disk / "rootfs"
    p = start("unpack", "--store", str(store), ref, str(root))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(f"puller: cannot unpack into {root}: No space left on device"), err
    assert line.endswith("is left incomplete)")


def test_sigterm_during_save_removes_its_temporary_file(registry, unique_repo, tmp_path):
    img = build_image(seed=404, layer_sizes=[24_000_000])
    push(registry.url, unique_repo, "sv", img)
    store, ref = tmp_path / "store", f"{registry.host}/{unique_repo}:sv"
    p = start("pull", "-q", "--store", str(store), ref)
    p.communicate(timeout=120)
    assert p.returncode == 0
    out = tmp_path / "out" / "image.tar"
    out.parent.mkdir()
    p = start("save", "--uncompressed", "--store", str(store), ref, "-o", str(out))
    deadline = time.monotonic() + 60
    while not list(out.parent.iterdir()) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert p.poll() is None, "save ended before its temporary file could be seen"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (130, "puller: interrupted\n")
    assert list(out.parent.iterdir()) == []  # no half archive, no temporary file
