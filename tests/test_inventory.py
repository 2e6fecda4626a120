"""``puller images``, ``inspect``, ``rmi`` and ``du`` on a store filled by real pulls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from puller.store import ContentStore
from tests.support.images import build_image, build_index, push

pytestmark = pytest.mark.filterwarnings("error")


def puller(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          timeout=120, env=env)


@pytest.fixture
def store(registry, unique_repo, tmp_path):
    base = build_image(seed=61, layer_sizes=[100_000])
    a = build_image(seed=62, layer_sizes=[10_000], base=base)
    b = build_image(seed=63, layer_sizes=[20_000], base=base, fmt="docker")
    arm = build_image(seed=64, layer_sizes=[5_000], platform=("linux", "arm64", "v8"))
    idx = build_index([a, arm])
    push(registry.url, unique_repo, "a", a)
    push(registry.url, unique_repo, "b", b)
    push(registry.url, unique_repo, "multi", idx)
    s = tmp_path / "store"
    name = f"{registry.host}/{unique_repo}"
    r = puller("pull", "-q", "--all-platforms", "--store", str(s), f"{name}:a", f"{name}:b",
               f"{name}:multi")
    assert r.returncode == 0, r.stderr
    return s, name, a, b, arm, idx


def test_images_table_and_json(store):
    s, name, a, b, arm, idx = store
    r = puller("images", "--store", str(s))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["REFERENCE", "DIGEST", "PLATFORM", "SIZE", "PULLED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[f"{name}:a"][1] == a.digest[:19]
    assert rows[f"{name}:multi"][2] == "linux/amd64,linux/arm64/v8"
    r = puller("images", "--json", "--store", str(s))
    docs = {d["reference"]: d for d in map(json.loads, r.stdout.decode().splitlines())}
    assert docs[f"{name}:b"]["digest"] == b.digest
    assert docs[f"{name}:b"]["size"] == len(b.config) + sum(map(len, b.layers))
    assert docs[f"{name}:multi"]["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    assert all(d["complete"] and d["pulledAt"].endswith("Z") for d in docs.values())
    r = puller("images", "-q", "--store", str(s), f"{name}:m*")
    assert r.stdout.decode().split() == [f"{name}:multi"]
    r = puller("images", "-q", "--store", str(s), name)
    assert len(r.stdout.decode().split()) == 3


def test_an_entry_of_many_platforms_shows_a_few_and_a_count(registry, unique_repo, tmp_path):
    plats = [("linux", "amd64", None), ("linux", "arm64", "v8"), ("linux", "arm", "v7"),
             ("linux", "ppc64le", None), ("linux", "s390x", None)]
    imgs = [build_image(seed=70 + i, layer_sizes=[1_000], platform=p) for i, p in enumerate(plats)]
    push(registry.url, unique_repo, "wide", build_index(imgs))
    s, ref = tmp_path / "store", f"{registry.host}/{unique_repo}:wide"
    assert puller("pull", "-q", "--all-platforms", "--store", str(s), ref).returncode == 0
    row = puller("images", "--store", str(s)).stdout.decode().splitlines()[1].split()
    assert row[2] == "linux/amd64,linux/arm64/v8,+3"  # 3 more
    row = puller("images", "--no-trunc", "--store", str(s)).stdout.decode().splitlines()[1]
    assert "linux/amd64,linux/arm64/v8,linux/arm/v7,linux/ppc64le,linux/s390x" in row
    doc = json.loads(puller("images", "--json", "--store", str(s)).stdout)
    assert len(doc["platforms"]) == 5


def test_pulled_at_annotation_is_used_when_present(store):
    s, name, a, *_ = store
    entry = ContentStore(s).lookup(f"{name}:a")
    entry["annotations"]["io.puller.pulled-at"] = "2021-01-02T03:04:05Z"
    ContentStore(s).set_ref(f"{name}:a", entry)
    r = puller("images", "--json", "--store", str(s), f"{name}:a")
    assert json.loads(r.stdout)["pulledAt"] == "2021-01-02T03:04:05Z"


def test_inspect(store):
    s, name, a, b, arm, idx = store
    r = puller("inspect", "--store", str(s), f"{name}:multi")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["digest"] == idx.digest and doc["mediaType"] == idx.media_type
    assert [i["platform"] for i in doc["images"]] == ["linux/amd64", "linux/arm64/v8"]
    assert [x["digest"] for x in doc["images"][1]["layers"]] == arm.layer_digests
    assert doc["images"][0]["rootfs"]["diff_ids"] == a.diff_ids
    assert puller("inspect", "--raw", "--store", str(s), f"{name}:multi").stdout == idx.manifest
    r = puller("inspect", "--raw", "--platform", "linux/arm64", "--store", str(s),
               f"{name}:multi")
    assert r.stdout == arm.manifest
    assert puller("inspect", "--config", "--store", str(s), f"{name}:b").stdout == b.config
    # by entry digest, and name@digest
    assert json.loads(puller("inspect", "--store", str(s), b.digest).stdout)["digest"] == b.digest
    r = puller("inspect", "--store", str(s), f"{name}@{b.digest}")
    assert json.loads(r.stdout)["reference"] == f"{name}:b"


def test_errors_are_one_line(store, tmp_path):
    s, name, *_ = store
    for args, code, text in [
        (["inspect", "nothere"], 1, b"no such image"),
        (["inspect", "x/Bad:ref!"], 2, b"invalid reference"),
        (["inspect", "--platform", "linux/s390x", f"{name}:multi", "--raw"], 1, b"no image"),
        (["rmi", "nothere"], 1, b"no such image"),
    ]:
        r = puller(*args, "--store", str(s))
        assert r.returncode == code, (args, r.stderr)
        assert text in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = puller("images", "--store", str(tmp_path / "nostore"))
    assert r.returncode == 1 and b"no store at" in r.stderr


def test_rmi_and_du(store):
    s, name, a, b, arm, idx = store
    r = puller("du", "--json", "--store", str(s))
    assert r.returncode == 0, r.stderr
    du = json.loads(r.stdout)
    per = {i["reference"]: i for i in du["images"]}
    base_layer = len(a.layers[0])  # shared by all three entries' amd64 images
    assert per[f"{name}:b"]["shared"] == base_layer
    assert per[f"{name}:b"]["unique"] == len(b.manifest) + len(b.config) + len(b.layers[1])
    # :a's image is also :multi's amd64 image: everything of :a is shared
    assert per[f"{name}:a"]["unique"] == 0
    assert du["unreferenced"] == 0 and du["total"] == du["referenced"]

    r = puller("rmi", "--store", str(s), f"{name}:b", f"{name}:a")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[:2] == [f"Untagged: {name}:b", f"Untagged: {name}:a"]
    left = puller("images", "-q", "--store", str(s)).stdout.decode().split()
    assert left == [f"{name}:multi"]
    du = json.loads(puller("du", "--json", "--store", str(s)).stdout)
    # b's own blobs are unreferenced now; a's are still used by multi
    assert du["unreferenced"] == len(b.manifest) + len(b.config) + len(b.layers[1])
    assert (s / "blobs/sha256" / b.digest.split(":")[1]).exists()  # gc removes it, not rmi
    r = puller("du", "--store", str(s))
    assert b"unreferenced" in r.stdout


def test_malformed_index_entries_are_skipped_not_a_crash(store):
    """Entries that aren't valid descriptors are left out (``puller fsck`` reports them);
    the commands go on with the others."""
    s, name, a, b, arm, idx = store
    path = s / "index.json"
    doc = json.loads(path.read_text())
    by_name = {m["annotations"]["org.opencontainers.image.ref.name"]: m
               for m in doc["manifests"]}
    by_name[f"{name}:a"]["annotations"] = ["a"]
    del by_name[f"{name}:multi"]["mediaType"]
    doc["manifests"].append("not an entry")
    path.write_text(json.dumps(doc))
    for args in (["images", "-q"], ["du"], ["inspect", f"{name}:b"]):
        r = puller(*args, "--store", str(s))
        assert r.returncode == 0 and b"Traceback" not in r.stderr, (args, r.stderr)
    r = puller("images", "-q", "--store", str(s))
    assert r.stdout.decode().split() == [f"{name}:b"]
    r = puller("inspect", "--store", str(s), f"{name}:a")
    assert r.returncode == 1 and r.stderr.decode().startswith("puller: no such image")
    assert len(r.stderr.splitlines()) == 1
    r = puller("rmi", "--store", str(s), f"{name}:b")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    left = json.loads(path.read_text())["manifests"]
    assert len(left) == 3 and "not an entry" in left  # only :b went; the rest is fsck's
    assert puller("images", "-q", "--store", str(s)).stdout == b""
