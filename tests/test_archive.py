"""``puller save``: docker-archive and OCI archives that skopeo (and docker load) read."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading

import pytest

from tests.support.images import build_image, build_index, push
from tests.test_serve import dockerd_factory, need  # noqa: F401 - fixture reuse
from tests.test_unpack import BAD_CONFIGS, push_config

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


def leftovers(d) -> list[str]:
    """Temporary files a save may have left in ``d``."""
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def one_line_error(r: subprocess.CompletedProcess, rc: int, words: str) -> None:
    err = r.stderr.decode()
    assert r.returncode == rc, err
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_save_into_a_fifo_streams_the_archive(stored, tmp_path):
    """A FIFO is written to, not replaced: the reader gets the whole archive."""
    store, one, _, img, _ = stored
    expected = puller("save", "--store", str(store), one).stdout
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # Held open so the reader's open never waits and EOF comes only after it is closed,
    # whether or not save ever opens the FIFO.
    keeper = os.open(fifo, os.O_RDWR)
    got = bytearray()

    def read() -> None:
        with open(fifo, "rb") as f:
            while chunk := f.read(65536):
                got.extend(chunk)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        r = puller("save", "--store", str(store), one, "-o", str(fifo))
    finally:
        os.close(keeper)
        t.join(120)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert bytes(got) == expected
    with tarfile.open(fileobj=io.BytesIO(bytes(got))) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        for name in manifest[0]["Layers"]:
            tf.extractfile(name).read()
    assert manifest[0]["RepoTags"] == [one]
    assert leftovers(tmp_path) == []


def _device(path, minor: int) -> None:
    """A character device node of the kernel's mem driver (1, minor) at ``path``."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
        os.close(os.open(path, os.O_WRONLY))
    except PermissionError:
        pytest.skip("can't create or open device nodes here")


def test_save_into_a_device_writes_to_it(stored, tmp_path):
    store, one, _, _, _ = stored
    null = tmp_path / "null"
    _device(null, 3)
    r = puller("save", "--store", str(store), one, "-o", str(null))
    assert r.returncode == 0, r.stderr
    st = os.lstat(null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert leftovers(tmp_path) == []
    # a device that refuses the bytes (like /dev/full): one line, the node stays
    full = tmp_path / "full"
    _device(full, 7)
    r = puller("save", "--store", str(store), one, "-o", str(full))
    one_line_error(r, 1, "No space left on device")
    assert stat.S_ISCHR(os.lstat(full).st_mode) and leftovers(tmp_path) == []


def test_save_through_a_symlink_keeps_the_link(stored, tmp_path):
    store, one, _, _, _ = stored
    expected = puller("save", "--store", str(store), one).stdout
    real = tmp_path / "real.tar"
    real.write_bytes(b"old")
    link = tmp_path / "link.tar"
    link.symlink_to("real.tar")
    r = puller("save", "--store", str(store), one, "-o", str(link))
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == "real.tar"
    assert real.read_bytes() == expected
    # a link to a file not there yet: the file is made, the link stays
    (tmp_path / "sub").mkdir()
    new = tmp_path / "new.tar"
    new.symlink_to(tmp_path / "sub" / "made.tar")
    assert puller("save", "--store", str(store), one, "-o", str(new)).returncode == 0
    assert new.is_symlink() and (tmp_path / "sub/made.tar").read_bytes() == expected
    # a link to a device is written through too
    null = tmp_path / "null"
    _device(null, 3)
    dev = tmp_path / "dev.tar"
    dev.symlink_to(null)
    assert puller("save", "--store", str(store), one, "-o", str(dev)).returncode == 0
    assert dev.is_symlink() and stat.S_ISCHR(os.lstat(null).st_mode)
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []


def test_save_refuses_a_directory_or_a_socket(stored, tmp_path):
    store, one, _, _, _ = stored
    d = tmp_path / "out"
    d.mkdir()
    r = puller("save", "--store", str(store), one, "-o", str(d))
    one_line_error(r, 2, "is a directory")
    assert d.is_dir() and list(d.iterdir()) == [] and leftovers(tmp_path) == []
    sock_path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        r = puller("save", "--store", str(store), one, "-o", str(sock_path))
        one_line_error(r, 2, "is a socket")
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode) and leftovers(tmp_path) == []


def test_uncompressed_is_for_the_docker_format_only(stored, tmp_path):
    store, one, _, _, _ = stored
    out = tmp_path / "o.tar"
    r = puller("save", "--format", "oci", "--uncompressed", "--store", str(store), one,
               "-o", str(out))
    one_line_error(r, 2, "--uncompressed")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_docker_save_refuses_an_invalid_config(registry, unique_repo, tmp_path, case):
    """Refused before anything is written: no file, nothing on standard output."""
    config, layers, words = BAD_CONFIGS[case]
    push_config(registry, unique_repo, "bad", config, layers)
    store, ref = tmp_path / "store", f"{registry.host}/{unique_repo}:bad"
    assert puller("pull", "-q", "--store", str(store), ref).returncode == 0
    out = tmp_path / "a.tar"
    for extra in ([], ["--uncompressed"]):
        r = puller("save", *extra, "--store", str(store), ref, "-o", str(out))
        one_line_error(r, 1, words)
        assert not out.exists() and leftovers(tmp_path) == []
        r = puller("save", *extra, "--store", str(store), ref)
        one_line_error(r, 1, words)
        assert r.stdout == b""
