"""``puller save``: docker-archive and OCI archives that skopeo (and docker load) read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.support.images import build_image, build_index, push
from tests.test_serve import dockerd_factory, need  # noqa: F401 - fixture reuse

pytestmark = pytest.mark.filterwarnings("error")


def puller(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          timeout=120, env=env)


@pytest.fixture
def stored(registry, unique_repo, tmp_path):
    base = build_image(seed=91, layer_sizes=[200_000])
    img = build_image(seed=92, layer_sizes=[20_000], base=base)
    arm = build_image(seed=93, layer_sizes=[10_000], platform=("linux", "arm64", "v8"))
    idx = build_index([img, arm])
    push(registry.url, unique_repo, "one", img)
    push(registry.url, unique_repo, "multi", idx)
    store = tmp_path / "store"
    one, multi = f"{registry.host}/{unique_repo}:one", f"{registry.host}/{unique_repo}:multi"
    r = puller("pull", "-q", "--platform", "linux/amd64", "--store", str(store), one, multi)
    assert r.returncode == 0, r.stderr
    return store, one, multi, img, idx


def skopeo(*args: str) -> dict:
    r = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


def test_docker_archive_read_by_skopeo(stored, tmp_path):
    need("skopeo")
    store, one, multi, img, idx = stored
    out = tmp_path / "a.tar"
    r = puller("save", "--store", str(store), one, "-o", str(out))
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tf:
        names = tf.getnames()
        manifest = json.load(tf.extractfile("manifest.json"))
        repos = json.load(tf.extractfile("repositories"))
    repo, tag = one.rsplit(":", 1)
    assert manifest == [{"Config": img.config_digest.split(":")[1] + ".json",
                         "RepoTags": [one],
                         "Layers": [f"{d.split(':')[1]}/layer.tar" for d in img.layer_digests]}]
    assert repos == {repo: {tag: img.layer_digests[-1].split(":")[1]}}
    assert "repositories" in names
    info = skopeo("inspect", f"docker-archive:{out}")
    assert info["Layers"] == img.diff_ids
    assert info["Labels"] == {"puller.test.seed": "92"}
    # skopeo copies it (verifying every layer against its diff_id)
    skopeo("copy", f"docker-archive:{out}", f"oci:{tmp_path / 'copy'}:x")
    config = skopeo("inspect", "--config", f"oci:{tmp_path / 'copy'}:x")
    assert config["rootfs"]["diff_ids"] == img.diff_ids

    # Two images (one from an index, same config as `one`): one entry with both tags.
    both = tmp_path / "both.tar"
    assert puller("save", "--store", str(store), one, multi, "-o", str(both)).returncode == 0
    with tarfile.open(both) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
    assert len(manifest) == 1 and manifest[0]["RepoTags"] == [one, multi]


def test_uncompressed_docker_archive(stored, tmp_path):
    need("skopeo")
    store, one, _, img, _ = stored
    out = tmp_path / "plain.tar"
    r = puller("save", "--uncompressed", "--store", str(store), one, "-o", str(out))
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
    assert manifest[0]["Layers"] == [f"{d.split(':')[1]}/layer.tar" for d in img.diff_ids]
    assert skopeo("inspect", f"docker-archive:{out}")["Layers"] == img.diff_ids


def test_oci_archive_read_by_skopeo(stored, tmp_path):
    need("skopeo")
    store, one, multi, img, idx = stored
    out = tmp_path / "o.tar"
    r = puller("save", "--format", "oci", "--store", str(store), one, multi, "-o", str(out))
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tf:
        index = json.load(tf.extractfile("index.json"))
        assert tf.extractfile(f"blobs/sha256/{idx.digest.split(':')[1]}").read() == idx.manifest
    names = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
             for m in index["manifests"]}
    assert names == {one: img.digest, multi: idx.digest}
    assert skopeo("inspect", f"oci-archive:{out}:{one}")["Digest"] == img.digest
    assert skopeo("inspect", f"oci-archive:{out}:{multi}")["Layers"] == img.layer_digests
    # --platform writes only that platform's manifest
    out2 = tmp_path / "p.tar"
    r = puller("save", "--format", "oci", "--platform", "linux/amd64", "--store", str(store),
               multi, "-o", str(out2))
    assert r.returncode == 0, r.stderr
    assert skopeo("inspect", f"oci-archive:{out2}")["Digest"] == img.digest


def test_save_errors_leave_no_file(stored, tmp_path):
    store, one, multi, img, _ = stored
    out = tmp_path / "x.tar"
    r = puller("save", "--store", str(store), one, "nothere", "-o", str(out))
    assert r.returncode == 1 and b"no such image" in r.stderr and not out.exists()
    r = puller("save", "--platform", "linux/arm64", "--store", str(store), multi, "-o", str(out))
    assert r.returncode == 1 and b"no image for linux/arm64" in r.stderr and not out.exists()
    # a corrupt layer is detected while it is copied
    layer = store / "blobs/sha256" / img.layer_digests[-1].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF
    layer.write_bytes(bytes(data))
    r = puller("save", "--store", str(store), one, "-o", str(out))
    assert r.returncode == 1 and b"corrupt" in r.stderr and not out.exists()
    assert b"Traceback" not in r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x.tar")] == []


def test_save_to_stdout(stored, tmp_path):
    store, one, _, img, _ = stored
    r = puller("save", "--store", str(store), one)
    assert r.returncode == 0, r.stderr
    (tmp_path / "s.tar").write_bytes(r.stdout)
    with tarfile.open(tmp_path / "s.tar") as tf:
        assert json.load(tf.extractfile("manifest.json"))[0]["RepoTags"] == [one]


def test_docker_load(stored, tmp_path, dockerd_factory):  # noqa: F811
    store, one, _, img, _ = stored
    out = tmp_path / "a.tar"
    assert puller("save", "--store", str(store), one, "-o", str(out)).returncode == 0
    dk = dockerd_factory()
    r = dk.docker("load", "-i", str(out))
    assert f"Loaded image: {one}" in r.stdout
    got = dk.docker("image", "inspect", "--format", "{{.Id}}", one).stdout.strip()
    assert got == img.config_digest
