"""``puller serve``: skopeo, puller itself and (where a dockerd can run) docker pull from it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from puller.serve import served_path, stored_name
from tests.support.images import build_image, build_index, push, sha256_digest

pytestmark = pytest.mark.filterwarnings("error")


def puller(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {tool} is not installed", pytrace=False)
        pytest.skip(f"{tool} is not installed")
    return path


class Server:
    """``puller serve`` as a subprocess on a free loopback port."""

    def __init__(self, store: Path, *extra: str) -> None:
        env = dict(os.environ)
        env.pop("PULLER_STORE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "puller", "serve", "--store", str(store),
             "--addr", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until it listens (or exits)
        if not line.startswith("serving "):
            self.stop()
            raise RuntimeError(f"serve did not start: {line!r} {self.stderr}")
        self.url = line.split(" on ", 1)[1].strip()
        self.host = self.url.split("://", 1)[1]
        self.port = int(self.host.rsplit(":", 1)[1])
        self.stderr = ""

    def request(self, method: str, path: str, headers: dict | None = None
                ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.headers, r.read()
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _, err = self.proc.communicate()
        self.stderr = err
        return self.proc.returncode


@pytest.fixture
def served(registry, unique_repo, tmp_path):
    """A store holding a two-platform index (both pulled) and a single image; served."""
    base = build_image(seed=71, layer_sizes=[300_000])
    amd = build_image(seed=72, layer_sizes=[40_000], base=base)
    arm = build_image(seed=73, layer_sizes=[30_000], platform=("linux", "arm64", "v8"))
    idx = build_index([amd, arm], attestations=False)  # `skopeo copy --all` wants every child
    push(registry.url, unique_repo, "multi", idx)
    single = build_image(seed=74, layer_sizes=[20_000], fmt="docker")
    push(registry.url, unique_repo, "single", single)
    store = tmp_path / "store"
    r = puller("pull", "--all-platforms", "--store", str(store),
               f"{registry.host}/{unique_repo}:multi", f"{registry.host}/{unique_repo}:single")
    assert r.returncode == 0, r.stderr
    server = Server(store)
    path = served_path(registry.host, unique_repo)
    yield server, path, idx, single, store
    assert server.stop() == 0, server.stderr
    assert "Traceback" not in server.stderr


def test_path_mapping():
    assert served_path("docker.io", "library/alpine") == "library/alpine"
    assert served_path("127.0.0.1:5000", "team/api") == "127.0.0.1_5000/team/api"
    assert served_path("GHCR.io", "org/app") == "ghcr.io/org/app"
    assert served_path("[::1]:5000", "x") is None
    for reg, repo in [("docker.io", "library/alpine"), ("docker.io", "user/app"),
                      ("127.0.0.1:5000", "team/api"), ("ghcr.io", "org/app"),
                      ("localhost", "a/b"), ("localhost:5000", "a")]:
        assert stored_name(served_path(reg, repo)) == (reg, repo)


def test_api_endpoints(served):
    server, path, idx, single, _ = served
    status, h, body = server.request("GET", "/v2/")
    assert status == 200 and h["Docker-Distribution-API-Version"] == "registry/2.0"

    status, h, body = server.request("GET", f"/v2/{path}/manifests/multi")
    assert status == 200
    assert body == idx.manifest
    assert h["Content-Type"] == idx.media_type
    assert h["Docker-Content-Digest"] == idx.digest

    status, h, body = server.request("HEAD", f"/v2/{path}/manifests/single")
    assert status == 200 and body == b""
    assert h["Content-Type"] == single.media_type
    assert h["Docker-Content-Digest"] == single.digest
    assert int(h["Content-Length"]) == len(single.manifest)

    arm = idx.images[1]
    status, h, body = server.request("GET", f"/v2/{path}/manifests/{arm.digest}")
    assert status == 200 and body == arm.manifest and h["Content-Type"] == arm.media_type

    layer = single.layers[0]
    d = sha256_digest(layer)
    status, h, body = server.request("GET", f"/v2/{path}/blobs/{d}")
    assert status == 200 and body == layer and h["Docker-Content-Digest"] == d
    status, h, body = server.request("HEAD", f"/v2/{path}/blobs/{d}")
    assert status == 200 and body == b"" and int(h["Content-Length"]) == len(layer)
    status, h, body = server.request("GET", f"/v2/{path}/blobs/{d}",
                                     {"Range": "bytes=100-199"})
    assert status == 206 and body == layer[100:200]
    assert h["Content-Range"] == f"bytes 100-199/{len(layer)}"
    status, h, body = server.request("GET", f"/v2/{path}/blobs/{d}", {"Range": "bytes=1000-"})
    assert status == 206 and body == layer[1000:]
    status, h, body = server.request("GET", f"/v2/{path}/blobs/{d}", {"Range": "bytes=-10"})
    assert status == 206 and body == layer[-10:]
    status, h, _ = server.request("GET", f"/v2/{path}/blobs/{d}",
                                  {"Range": f"bytes={len(layer)}-"})
    assert status == 416
    # A request line far too long: refused by the server, one log line, no traceback.
    status, _, _ = server.request("GET", "/v2/" + "a" * 70_000)
    assert status in (400, 414)
    # A Range header that isn't one single byte range is ignored (RFC 9110): all of it.
    for odd in ("garbage", "items=0-5", "bytes=0-1,5-6", "bytes=20-10", "bytes=-"):
        status, h, body = server.request("GET", f"/v2/{path}/blobs/{d}", {"Range": odd})
        assert status == 200 and body == layer and "Content-Range" not in h, odd

    status, _, body = server.request("GET", f"/v2/{path}/tags/list")
    assert status == 200 and json.loads(body) == {"name": path, "tags": ["multi", "single"]}
    status, h, body = server.request("GET", f"/v2/{path}/tags/list?n=1")
    assert json.loads(body)["tags"] == ["multi"] and 'rel="next"' in h["Link"]
    status, _, body = server.request("GET", "/v2/_catalog")
    assert status == 200 and path in json.loads(body)["repositories"]

    # unknowns, scoping, and writes
    status, _, body = server.request("GET", f"/v2/{path}/manifests/nope")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    status, _, body = server.request("GET", f"/v2/other/repo/blobs/{d}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    status, _, _ = server.request("GET", f"/v2/{path}/blobs/sha256:{'0' * 64}")
    assert status == 404
    status, _, _ = server.request("GET", f"/v2/{path}/blobs/sha256:..%2F..%2Fetc")
    assert status in (400, 404)
    status, _, body = server.request("POST", f"/v2/{path}/blobs/uploads/")
    assert status == 405 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    status, _, _ = server.request("DELETE", f"/v2/{path}/manifests/{single.digest}")
    assert status == 405


def test_skopeo_copies_from_serve_with_identical_digests(served, tmp_path):
    need("skopeo")
    server, path, idx, single, _ = served
    out = tmp_path / "copy"
    for tag, want in (("multi", idx.digest), ("single", single.digest)):
        r = subprocess.run(["skopeo", "copy", "--all", "--preserve-digests",
                            "--src-tls-verify=false", f"docker://{server.host}/{path}:{tag}",
                            f"oci:{out}:{tag}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        index = json.loads((out / "index.json").read_text())
        got = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
               for m in index["manifests"]}
        assert got[tag] == want
    r = subprocess.run(["skopeo", "inspect", "--tls-verify=false",
                        f"docker://{server.host}/{path}:single"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["Digest"] == single.digest


def test_puller_pulls_from_serve(served, tmp_path):
    server, path, idx, single, _ = served
    store2 = tmp_path / "store2"
    r = puller("pull", "-q", "--platform", "linux/arm64", "--store", str(store2),
               f"{server.host}/{path}:multi")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{server.host}/{path}@{idx.digest}"]
    # single is linux/amd64 only: pulled without asking for another platform
    r = puller("pull", "-q", "--store", str(store2), f"{server.host}/{path}:single")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{server.host}/{path}@{single.digest}"]


def test_pull_through_upstream(registry, unique_repo, tmp_path):
    img = build_image(seed=75, layer_sizes=[10_000])
    push(registry.url, unique_repo, "v1", img)
    store = tmp_path / "store"
    server = Server(store, "--upstream")
    try:
        path = served_path(registry.host, unique_repo)
        status, h, body = server.request("GET", f"/v2/{path}/manifests/v1")
        assert status == 200 and body == img.manifest
        assert h["Docker-Content-Digest"] == img.digest
        store2 = tmp_path / "store2"
        r = puller("pull", "-q", "--store", str(store2), f"{server.host}/{path}:v1")
        assert r.returncode == 0, r.stderr
        status, _, _ = server.request("GET", f"/v2/{path}/manifests/missing")
        assert status == 404
        # An upstream that can't be asked is not an image that doesn't exist.
        down = served_path("127.0.0.1:9", "nothing/here")
        status, _, body = server.request("GET", f"/v2/{down}/manifests/v1")
        assert status == 502 and b"pull-through failed" in body
    finally:
        assert server.stop() == 0, server.stderr
    assert "Traceback" not in server.stderr
    r = puller("images", "-q", "--store", str(store))
    assert r.stdout.split() == [f"{registry.host}/{unique_repo}:v1"]


def test_serve_usage_errors(tmp_path):
    r = puller("serve", "--store", str(tmp_path / "none"), "--addr", "127.0.0.1:0")
    assert r.returncode == 1 and "no store at" in r.stderr and "Traceback" not in r.stderr
    r = puller("serve", "--store", str(tmp_path), "--addr", "nonsense")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr


def test_serve_refuses_a_store_it_cannot_read(tmp_path):
    from puller.store import ContentStore

    store = ContentStore(tmp_path / "store").init().root
    (store / "index.json").write_text('{"manifests": ')
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    for extra in ([], ["--upstream"]):
        proc = subprocess.Popen([sys.executable, "-m", "puller", "serve", "--store", str(store),
                                 "--addr", "127.0.0.1:0", *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "serving ..." once it listens, "" when it exits
        if first:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert first == "", "serve started on a store it can't read"
        assert proc.returncode == 1 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and "index.json" in err


def test_store_that_breaks_while_serving_gets_registry_errors(registry, unique_repo, tmp_path):
    img = build_image(seed=76, layer_sizes=[10_000])
    push(registry.url, unique_repo, "v1", img)
    store = tmp_path / "store"
    r = puller("pull", "-q", "--store", str(store), f"{registry.host}/{unique_repo}:v1")
    assert r.returncode == 0, r.stderr
    path = served_path(registry.host, unique_repo)
    index = store / "index.json"
    good = index.read_bytes()

    def replace_index(data: bytes) -> None:  # a new file: the server sees the change
        (store / "index.new").write_bytes(data)
        os.replace(store / "index.new", index)

    server = Server(store)
    try:
        assert server.request("GET", f"/v2/{path}/manifests/v1")[0] == 200
        replace_index(b'{"manifests": ')
        layer = img.layer_digests[0]
        for method, url in [("GET", f"/v2/{path}/manifests/v1"),
                            ("GET", f"/v2/{path}/blobs/{layer}"),
                            ("GET", f"/v2/{path}/tags/list"), ("GET", "/v2/_catalog"),
                            ("GET", f"/v2/{path}/manifests/v1")]:
            status, h, body = server.request(method, url)
            assert status == 500, (url, status)
            assert h["Content-Type"].startswith("application/json")
            assert json.loads(body)["errors"][0]["code"] == "UNKNOWN"
            assert str(store) not in body.decode()  # clients aren't told where it lives
        status, _, body = server.request("HEAD", f"/v2/{path}/manifests/v1")
        assert status == 500 and body == b""
        replace_index(good)
        status, _, body = server.request("GET", f"/v2/{path}/manifests/v1")
        assert status == 200 and body == img.manifest
    finally:
        assert server.stop() == 0, server.stderr
    assert "Traceback" not in server.stderr
    lines = server.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read the store" in lines[0] and "index.json" in lines[0]


# -- docker ------------------------------------------------------------------------------


class Dockerd:
    """A private dockerd (vfs, no iptables, no bridge) under a temp dir, or a skip."""

    def __init__(self, root: Path, mirror: str | None = None) -> None:
        self.root = root
        self.sock = root / "docker.sock"
        args = ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
                "--storage-driver=vfs", "--data-root", str(root / "data"),
                "--exec-root", str(root / "exec"), "--pidfile", str(root / "pid"),
                "--host", f"unix://{self.sock}", "--config-file", str(root / "daemon.json")]
        (root / "daemon.json").write_text(json.dumps(
            {"registry-mirrors": [mirror]} if mirror else {}))
        self.log = open(root / "dockerd.log", "wb")
        env = dict(os.environ)
        env["DOCKER_CONFIG"] = str(root / "client")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        for _ in range(300):  # up to ~30 s
            if self.proc.poll() is not None:
                break
            if self.docker("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        tail = (root / "dockerd.log").read_text(errors="replace").strip().splitlines()[-3:]
        pytest.skip(f"dockerd could not start here: {' | '.join(tail)[:300]}")

    def docker(self, *args: str, check: bool = True, timeout: float = 120
               ) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env["DOCKER_HOST"] = f"unix://{self.sock}"
        env["DOCKER_CONFIG"] = str(self.root / "client")
        r = subprocess.run(["/usr/bin/docker" if os.path.exists("/usr/bin/docker")
                            else "docker", *args], capture_output=True, text=True,
                           timeout=timeout, env=env)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def dockerd_factory():
    need("dockerd")
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root")
    made: list[Dockerd] = []
    dirs: list[str] = []

    def make(mirror: str | None = None) -> Dockerd:
        # A short path: the daemon's unix sockets must fit in 108 bytes.
        d = tempfile.mkdtemp(prefix="pd-", dir="/tmp")
        dirs.append(d)
        dk = Dockerd(Path(d), mirror)
        made.append(dk)
        return dk

    yield make
    for dk in made:
        dk.stop()
    for d in dirs:
        subprocess.run(["rm", "-rf", "--one-file-system", d], check=False)


def test_docker_pulls_from_serve_and_as_mirror(served, dockerd_factory):
    server, path, idx, single, store = served
    # docker.io/test/mirrored:1 in the store, so the mirror serves it as test/mirrored:1.
    from puller.store import ContentStore

    ContentStore(store).set_ref("docker.io/test/mirrored:1", {
        "mediaType": single.media_type, "digest": single.digest, "size": single.size})
    dk = dockerd_factory(mirror=server.url)
    r = dk.docker("pull", f"{server.host}/{path}:single")
    assert f"Digest: {single.digest}" in r.stdout
    ids = dk.docker("image", "inspect", "--format", "{{.Id}}",
                    f"{server.host}/{path}:single").stdout.strip()
    assert ids == single.config_digest
    r = dk.docker("pull", "test/mirrored:1")
    assert f"Digest: {single.digest}" in r.stdout
