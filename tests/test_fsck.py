"""`puller fsck` and `puller gc` against stores filled by real pulls, the store's refusal to
follow symlinks, and gc running while a pull is in flight."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from puller import Platform
from puller.digest import Digest
from puller.errors import StoreError
from puller.maintenance import fsck, gc
from puller.store import ContentStore, StoreBusy
from tests.support.images import build_image, build_index, push
from tests.test_pull import assert_store_valid, index_entries, pull


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def start(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    return subprocess.Popen([sys.executable, "-m", "puller", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def blob(store: Path, digest: str) -> Path:
    return store / "blobs" / "sha256" / digest.split(":")[1]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def kinds(report) -> list[str]:
    return sorted(p.kind for p in report.problems)


@pytest.fixture
def pulled(registry, unique_repo, store_dir):
    """A store holding one two-layer image; returns (store, ref, image)."""
    img = build_image(seed=301, layer_sizes=[300_000, 5000])
    push(registry.url, unique_repo, "v1", img)
    ref = f"{registry.host}/{unique_repo}:v1"

    async def go():
        return await pull(store_dir, ref)

    return store_dir, ref, img, go


async def test_clean_store_passes_library_and_cli(pulled):
    store, ref, img, go = pulled
    await go()
    report = fsck(store)
    assert report.ok and report.problems == []
    assert report.blobs == 4 and report.entries == 1
    assert report.bytes == sum(len(b) for b in img.blobs().values()) + len(img.manifest)

    r = cli("fsck", "--store", str(store))
    assert r.returncode == 0, r.stderr
    assert "store is consistent" in r.stdout
    r = cli("fsck", "--json", "--store", str(store))
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["blobs"] == 4 and doc["problems"] == []


async def test_corruption_is_found_and_repaired(pulled, tmp_path):
    store, ref, img, go = pulled
    await go()
    layer = img.layer_digests[1]
    data = bytearray(blob(store, layer).read_bytes())
    data[10] ^= 0xFF
    blob(store, layer).write_bytes(bytes(data))  # same size: has() still believes it
    (store / "blobs" / "sha256" / "not-a-digest").write_bytes(b"junk")
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    os.symlink(outside, blob(store, sha(b"secret")))  # a link named after its target's digest
    # A partial download nobody holds: reported, not a problem.
    partial = store / "ingest" / f"sha256-{'a' * 64}"
    partial.write_bytes(b"x" * 100)

    r = cli("fsck", "--store", str(store))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"corrupt blob {layer}" in r.stdout
    assert "misnamed file blobs/sha256/not-a-digest" in r.stdout
    assert f"dangling index entry {ref}" in r.stdout
    assert "1 partial downloads" in r.stdout
    report = fsck(store)
    assert kinds(report) == ["corrupt", "dangling", "misnamed", "symlink"]
    assert [p.size for p in report.partials] == [100]
    assert not report.partials[0].active

    r = cli("fsck", "--repair", "--json", "--store", str(store))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert all(p["repaired"] for p in doc["problems"]) and len(doc["problems"]) == 4
    assert outside.read_bytes() == b"secret"  # the link went, never its target
    assert not blob(store, layer).exists()
    assert index_entries(store) == {}  # the entry lost a layer: removed
    assert partial.exists()  # fsck keeps resumable data; gc removes it
    assert fsck(store).ok
    assert_store_valid(store)

    await go()  # the next pull fetches the removed layer again
    assert fsck(store).ok and blob(store, layer).read_bytes() == img.layers[1]


async def test_index_with_only_the_pulled_platform_is_not_dangling(registry, unique_repo,
                                                                   store_dir):
    amd = build_image(seed=302, layer_sizes=[1000], platform=("linux", "amd64", None))
    arm = build_image(seed=303, layer_sizes=[1100], platform=("linux", "arm64", "v8"))
    idx = build_index([amd, arm], attestations=True)
    push(registry.url, unique_repo, "multi", idx)
    await pull(store_dir, f"{registry.host}/{unique_repo}:multi",
               platform=Platform.parse("linux/arm64"))
    assert not blob(store_dir, amd.digest).exists()
    assert fsck(store_dir).ok  # amd64 and the attestations were never pulled: normal

    os.unlink(blob(store_dir, arm.layer_digests[0]))  # the only pulled child breaks
    report = fsck(store_dir)
    (problem,) = report.problems
    assert problem.kind == "dangling" and problem.digest == idx.digest
    assert "no image of index" in problem.detail and arm.layer_digests[0] in problem.detail


async def test_invalid_index_json_is_reported_and_gc_refuses(pulled):
    store, ref, img, go = pulled
    await go()
    (store / "index.json").write_text('{"manifests": ')
    before = sorted(p.name for p in (store / "blobs" / "sha256").iterdir())
    report = fsck(store)
    assert [p.kind for p in report.problems] == ["invalid-index"]
    r = cli("gc", "--store", str(store))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "index.json" in r.stderr
    assert sorted(p.name for p in (store / "blobs" / "sha256").iterdir()) == before


def test_missing_store_and_usage_errors(tmp_path):
    r = cli("fsck", "--store", str(tmp_path / "nope"))
    assert r.returncode == 1 and r.stderr.startswith("puller: no store at")
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("gc", "--bogus")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for cmd in ("gc", "fsck"):
        for wait in ("-1", "nan", "inf", "1e12"):
            r = cli(cmd, "--wait", wait, "--store", str(tmp_path))
            assert r.returncode == 2 and r.stderr.startswith("puller: --wait must be"), wait


async def test_gc_removes_what_no_entry_reaches(registry, unique_repo, store_dir):
    base = build_image(seed=304, layer_sizes=[200_000])
    old = build_image(seed=305, layer_sizes=[100_000], base=base)
    new = build_image(seed=306, layer_sizes=[50_000], base=base)
    ref = f"{registry.host}/{unique_repo}:app"
    push(registry.url, unique_repo, "app", old)
    await pull(store_dir, ref)
    push(registry.url, unique_repo, "app", new)  # the tag moves on
    await pull(store_dir, ref)

    s = ContentStore(store_dir)
    stale = store_dir / "ingest" / f"sha256-{'b' * 64}"
    stale.write_bytes(b"y" * 1000)
    (store_dir / "ingest" / f"sha256-{'b' * 64}.segments").write_bytes(b"0")
    legacy = store_dir / "ingest" / f"sha256-{'c' * 64}"  # older versions' layout
    legacy.mkdir()
    (legacy / "data").write_bytes(b"z" * 500)
    (legacy / "lock").write_bytes(b"")
    held = s.ingest(Digest.from_bytes(b"being written"), 13)  # someone is writing this one
    assert held is not None
    held.write(b"being")
    (store_dir / ".index.json.tmp-1-2").write_bytes(b"{")  # a crash mid index update
    garbage = {old.digest, old.config_digest, old.layer_digests[-1]}
    garbage_bytes = len(old.manifest) + len(old.config) + len(old.layers[-1])

    dry = gc(store_dir, dry_run=True)
    assert sorted(Path(p).name for p in dry.blobs_removed) == sorted(
        d.split(":")[1] for d in garbage)
    assert all(blob(store_dir, d).exists() for d in garbage)  # dry run removes nothing

    r = cli("gc", "--json", "--store", str(store_dir))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["blob_bytes"] == garbage_bytes and len(doc["blobs_removed"]) == 3
    assert sorted(doc["ingest_removed"]) == [f"ingest/sha256-{'b' * 64}",
                                             f"ingest/sha256-{'c' * 64}"]
    assert doc["ingest_bytes"] == 1500 and not legacy.exists()
    assert not (store_dir / "ingest" / f"sha256-{'b' * 64}.segments").exists()
    assert doc["ingest_busy"] == 1 and doc["other_removed"] == [".index.json.tmp-1-2"]
    assert doc["bytes_freed"] == garbage_bytes + 1500
    assert not any(blob(store_dir, d).exists() for d in garbage)
    for d in new.blobs():
        assert blob(store_dir, d).exists()  # shared base layer kept
    assert held.offset == 5 and (store_dir / "ingest" / f"sha256-{held.digest.hex}").exists()
    held.close()
    assert fsck(store_dir).ok
    assert_store_valid(store_dir)

    again = gc(store_dir)
    assert again.blobs_removed == [] and again.kept == 4
    assert len(again.ingest_removed) == 1  # the partial, now that its writer let go


def test_gc_and_pulls_exclude_each_other(tmp_path):
    s = ContentStore(tmp_path / "s").init()
    pin = s.pin()
    assert pin is not None
    with pytest.raises(StoreBusy, match="a pull is in progress"):
        with s.exclusive(wait=0):
            pass
    os.close(pin)
    with s.exclusive(wait=0):
        assert s.pin() is None  # pulls wait while gc holds the store
        with pytest.raises(StoreBusy, match="another gc"):
            with ContentStore(s.root).exclusive(wait=0):
                pass
    pin = s.pin()
    assert pin is not None
    os.close(pin)


def test_tag_is_done_as_a_pull_is(tmp_path):
    """copy_ref (puller tag) reads the source and names the target in one update of
    index.json, under a pull's hold: no rmi and gc can come in between."""
    s = ContentStore(tmp_path / "s").init()
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": "sha256:" + "a" * 64, "size": 10,
             "annotations": {"org.opencontainers.image.ref.name": "x.io/a:1",
                             "io.puller.pulled-at": "2026-01-01T00:00:00Z"}}
    s.update_index(lambda entries: entries + [entry])
    assert s.copy_ref("x.io/a:1", "y.io/b:2")
    tagged = s.lookup("y.io/b:2")
    assert tagged is not None and tagged["digest"] == entry["digest"]
    assert tagged["annotations"] == {"org.opencontainers.image.ref.name": "y.io/b:2"}
    assert not s.copy_ref("x.io/missing:1", "y.io/c:3") and s.lookup("y.io/c:3") is None
    with s.exclusive(wait=0):  # a gc is running: tag waits for it, then gives up
        with pytest.raises(StoreBusy, match="a gc or repair"):
            s.copy_ref("x.io/a:1", "y.io/d:4", wait=0.2)
    assert s.lookup("y.io/d:4") is None


def test_index_updates_from_many_threads_all_land(tmp_path):
    """update_index's group commit: every change from every thread is in index.json, in
    a valid file, whichever thread happened to write it."""
    import threading

    s = ContentStore(tmp_path / "s").init()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha256:" + "b" * 64, "size": 7}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(40):
                s.set_ref(f"x.io/t{k}:{i}", desc)
                if i % 10 == 0:
                    s.copy_ref(f"x.io/t{k}:{i}", f"x.io/copy{k}:{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    names = {e["annotations"]["org.opencontainers.image.ref.name"]
             for e in json.loads((s.root / "index.json").read_text())["manifests"]}
    assert len(names) == 8 * 40 + 8 * 4
    assert fsck(s.root).entries == len(names)


def test_gc_while_a_pull_is_in_flight(registry, proxy, unique_repo, store_dir):
    """A pull has committed some blobs but not yet named them in index.json when gc runs:
    gc must leave them alone (without the protocol it would delete them as unreachable)."""
    img = build_image(seed=307, layer_sizes=[300_000, 4000])
    push(registry.url, unique_repo, "g", img)
    big = img.layer_digests[0]
    ref = f"{proxy.host}/{unique_repo}:g"
    # Hold the pull back: the big layer answers 429 (retry in 0.2 s) until we let it go.
    proxy.status(429, rf"/blobs/{big}$", times=None, headers={"Retry-After": "0.2"})
    p = start("pull", "--json", "--retries", "100", "--store", str(store_dir), ref)
    assert p.stdout is not None
    small = {img.config_digest, img.layer_digests[1]}
    done: set[str] = set()
    retried = False
    for line in p.stdout:  # bounded: the pull gives up after 100 retries
        ev = json.loads(line)
        if ev["event"] == "blob.done":
            done.add(ev["digest"])
        retried = retried or (ev["event"] == "blob.retry" and ev["digest"] == big)
        if small <= done and retried:
            break
    assert small <= done and retried, "the pull should be stuck on the big layer"
    assert all(blob(store_dir, d).exists() for d in small)
    assert index_entries(store_dir) == {}  # committed, not named yet

    busy = cli("gc", "--wait", "0", "--store", str(store_dir))
    assert busy.returncode == 1 and "busy" in busy.stderr and "Traceback" not in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1
    waiting = start("gc", "--json", "--wait", "60", "--store", str(store_dir))
    s = ContentStore(store_dir)
    for _ in range(600):  # until gc holds the gate (new pulls would now wait for it)
        pin = s.pin()
        if pin is None:
            break
        os.close(pin)
        assert waiting.poll() is None, waiting.communicate()
        time.sleep(0.05)
    assert pin is None, "gc never started waiting"
    assert p.poll() is None  # the pull is still in flight
    proxy.clear_rules()  # let the pull finish; gc runs after it
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    gc_out, gc_err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, gc_err
    report = json.loads(gc_out)
    assert report["blobs_removed"] == [] and report["kept"] == 4
    for d, data in img.blobs().items():
        assert blob(store_dir, d).read_bytes() == data
    assert fsck(store_dir).ok
    assert list(index_entries(store_dir)) == [ref]


# -- the store never follows symlinks ------------------------------------------------------


async def test_store_refuses_symlinked_layout_dirs(pulled, tmp_path):
    store, ref, img, go = pulled
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store.mkdir()
    (store / "blobs").mkdir()
    os.symlink(elsewhere, store / "blobs" / "sha256")
    with pytest.raises(StoreError, match="symlink"):
        await go()
    assert list(elsewhere.iterdir()) == []


async def test_planted_ingest_links_are_not_followed(pulled, tmp_path):
    store, ref, img, go = pulled
    ContentStore(store).init()
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    layer = img.layer_digests[0]
    entry = store / "ingest" / f"sha256-{layer.split(':')[1]}"
    os.symlink(victim, entry)  # a link where a partial download would be
    config = store / "ingest" / f"sha256-{img.config_digest.split(':')[1]}"
    os.symlink(tmp_path, config)  # one pointing at a directory outside
    old = store / "ingest" / f"sha256-{img.layer_digests[-1].split(':')[1]}"
    old.mkdir()  # the layout of older versions, with a link where its data would be
    os.symlink(victim, old / "data")
    with pytest.raises(StoreError):
        await go()
    assert victim.read_bytes() == b"do not touch"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["victim", "store"])
    assert index_entries(store) == {}
    gc(store)  # removes the planted links, never their targets
    assert victim.read_bytes() == b"do not touch" and tmp_path.is_dir()
    left = [(p.name, "link" if p.is_symlink() else os.listdir(p))
            for p in (store / "ingest").iterdir()]
    assert left == []
    await go()
    assert fsck(store).ok


# -- an index.json gc can't trust ----------------------------------------------------------


def blob_names(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "blobs" / "sha256").iterdir())


def assert_gc_refuses(store: Path, *also: str) -> None:
    """gc (and its dry run) fails on one line and removes nothing."""
    before = blob_names(store)
    for args in (["--dry-run"], ["--json"], []):
        r = cli("gc", *args, "--store", str(store))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "not collecting garbage" in r.stderr and all(a in r.stderr for a in also)
    with pytest.raises(StoreError, match="not collecting garbage"):
        gc(store)
    assert blob_names(store) == before


async def test_missing_index_json_is_a_problem_and_gc_refuses(pulled):
    store, ref, img, go = pulled
    await go()
    os.unlink(store / "index.json")
    assert_gc_refuses(store, "index.json is missing")
    report = fsck(store)
    assert [p.kind for p in report.problems] == ["invalid-index"] and not report.ok
    r = cli("fsck", "--store", str(store))
    assert r.returncode == 1 and "store is consistent" not in r.stdout
    assert "index.json: it is missing" in r.stdout
    assert blob_names(store) == sorted(d.split(":")[1] for d in [*img.blobs(), img.digest])


def test_missing_index_json_without_blobs_is_an_empty_store(tmp_path):
    s = ContentStore(tmp_path / "s").init()
    os.unlink(s.root / "index.json")
    os.rmdir(s.root / "blobs" / "sha256")
    os.rmdir(s.root / "blobs")
    assert fsck(s.root).ok
    assert gc(s.root).blobs_removed == []


def _upper_digest(e: dict) -> object:
    return dict(e, digest="sha256:" + e["digest"].split(":")[1].upper())


def _annotations_list(e: dict) -> object:
    return dict(e, annotations=["a"])


def _no_media_type(e: dict) -> object:
    return {k: v for k, v in e.items() if k != "mediaType"}


def _string_size(e: dict) -> object:
    return dict(e, size=str(e["size"]))


def _ref_name_number(e: dict) -> object:
    return dict(e, annotations=dict(e["annotations"],
                                    **{"org.opencontainers.image.ref.name": 5}))


def _not_an_object(e: dict) -> object:
    return [e]


@pytest.mark.parametrize("spoil", [_upper_digest, _annotations_list, _no_media_type,
                                   _string_size, _ref_name_number, _not_an_object])
async def test_invalid_index_entry_is_a_problem_and_gc_refuses(pulled, spoil):
    store, ref, img, go = pulled
    await go()
    doc = json.loads((store / "index.json").read_text())
    (entry,) = doc["manifests"]
    doc["manifests"] = [spoil(entry)]
    (store / "index.json").write_text(json.dumps(doc))

    assert_gc_refuses(store, "manifests[0]")
    assert blob_names(store) == sorted(d.split(":")[1] for d in [*img.blobs(), img.digest])
    report = fsck(store)
    assert [p.kind for p in report.problems] == ["invalid-entry"] and not report.ok
    assert "manifests[0]" in report.problems[0].detail
    r = cli("fsck", "--store", str(store))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "store is consistent" not in r.stdout and "invalid index entry" in r.stdout

    # --repair drops the entry like a dangling one; then gc runs again
    repaired = fsck(store, repair=True)
    assert repaired.ok and [p.kind for p in repaired.problems] == ["invalid-entry"]
    assert json.loads((store / "index.json").read_text())["manifests"] == []
    assert gc(store, dry_run=True).kept == 0


async def test_gc_refusal_names_the_bad_entry_among_good_ones(pulled):
    store, ref, img, go = pulled
    await go()
    doc = json.loads((store / "index.json").read_text())
    (entry,) = doc["manifests"]
    doc["manifests"].append(dict(entry, digest="sha256:" + entry["digest"][7:].upper(),
                                 annotations={"org.opencontainers.image.ref.name": "x/y:z"}))
    (store / "index.json").write_text(json.dumps(doc))
    assert_gc_refuses(store, "manifests[1] (x/y:z)", "hex must be lowercase")
    report = fsck(store)
    assert report.entries == 2 and [(p.kind, p.ref) for p in report.problems] == [
        ("invalid-entry", "x/y:z")]


async def test_gc_refuses_while_a_manifest_in_use_cant_be_read(pulled):
    """One bad manifest blob must not cost the image its layers (in an air-gapped store
    they may be the only copy): gc stops, fsck names it, --repair drops the entry."""
    store, ref, img, go = pulled
    await go()
    blob(store, img.digest).write_bytes(b"{ not a manifest")
    assert_gc_refuses(store, img.digest, "can't be read")
    assert all(blob(store, d).exists() for d in img.layer_digests)
    report = fsck(store, repair=True)
    assert "dangling" in kinds(report)
    assert gc(store).blobs_removed  # with the entry gone, its blobs are garbage now
