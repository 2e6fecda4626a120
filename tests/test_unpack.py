"""``puller unpack``: whiteouts, gzip/zstd/plain layers, hostile layers, and umoci agreeing."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.images import OCI_CONFIG, OCI_MANIFEST, build_image, push, push_raw_manifest

pytestmark = pytest.mark.filterwarnings("error")


def puller(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def tar(*members: tuple) -> bytes:
    """members: (name, kind, payload) with kind file|dir|sym|link; payload bytes or target."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, *rest in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            ti.mode = rest[1] if len(rest) > 1 else (0o755 if kind == "dir" else 0o644)
            if kind == "file":
                data = rest[0] if rest else b""
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                       "link": tarfile.LNKTYPE}[kind]
            if kind in ("sym", "link"):
                ti.linkname = rest[0]
            tf.addfile(ti)
    return buf.getvalue()


def compress(data: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(data, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
    if how == "zstd":
        try:
            import zstandard
            return (zstandard.ZstdCompressor().compress(data),
                    "application/vnd.oci.image.layer.v1.tar+zstd")
        except ImportError:
            exe = shutil.which("zstd")
            if exe is None:
                pytest.skip("neither the zstandard module nor the zstd program is installed")
            out = subprocess.run([exe, "-c", "-q"], input=data, capture_output=True, check=True)
            return out.stdout, "application/vnd.oci.image.layer.v1.tar+zstd"
    return data, "application/vnd.oci.image.layer.v1.tar"


def push_layers(registry, repo: str, tag: str, layers: list[tuple[bytes, str]]) -> None:
    """An OCI image of the given (tar, compression) layers, pushed as repo:tag."""
    blobs, descs, diff_ids = {}, [], []
    for t, how in layers:
        blob, mt = compress(t, how)
        blobs[sha(blob)] = blob
        descs.append({"mediaType": mt, "digest": sha(blob), "size": len(blob)})
        diff_ids.append(sha(t))
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    blobs[sha(config)] = config
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": sha(config),
                                      "size": len(config)},
                           "layers": descs}).encode()
    push_raw_manifest(registry.url, repo, tag, manifest, OCI_MANIFEST, blobs)


def pull_and_unpack(registry, repo: str, tag: str,
                    tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    store = tmp_path / "store"
    r = puller("pull", "-q", "--store", str(store), f"{registry.host}/{repo}:{tag}")
    assert r.returncode == 0, r.stderr
    root = tmp_path / "root"
    return puller("unpack", "--store", str(store), f"{registry.host}/{repo}:{tag}",
                  str(root)), root


def tree(root: Path) -> dict[str, tuple]:
    """path -> (kind, mode, content or link target) for everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def test_whiteouts_and_compressions(registry, unique_repo, tmp_path):
    lower = tar(("etc/", "dir"), ("etc/keep", "file", b"keep"), ("etc/gone", "file", b"x"),
                ("opq/", "dir"), ("opq/old", "file", b"old"), ("opq/sub/", "dir"),
                ("opq/sub/deep", "file", b"d"), ("tree/", "dir"), ("tree/a", "file", b"a"),
                ("bin/", "dir"), ("bin/sh", "file", b"#!", 0o755), ("lib", "sym", "usr/lib"),
                ("usr/", "dir"), ("usr/lib/", "dir"))
    upper = tar(("etc/.wh.gone", "file"), ("opq/", "dir"), ("opq/.wh..wh..opq", "file"),
                ("opq/new", "file", b"new"), ("opq/sub2/x", "file", b"x"), (".wh.tree", "file"),
                ("lib/libc.so", "file", b"elf"), ("bin/sh2", "link", "bin/sh"))
    top = tar(("etc/keep", "file", b"replaced", 0o600), ("tree/", "dir"),
              ("tree/b", "file", b"b"))
    push_layers(registry, unique_repo, "t", [(lower, "gzip"), (upper, "zstd"), (top, "none")])
    r, root = pull_and_unpack(registry, unique_repo, "t", tmp_path)
    assert r.returncode == 0, r.stderr
    t = tree(root)
    assert t["etc/keep"] == ("file", 0o600, b"replaced")
    assert "etc/gone" not in t and "etc/.wh.gone" not in t
    assert sorted(k for k in t if k.startswith("opq/")) == ["opq/new", "opq/sub2", "opq/sub2/x"]
    assert sorted(k for k in t if k.startswith("tree")) == ["tree", "tree/b"]
    assert t["lib"] == ("link", "usr/lib")
    assert t["usr/lib/libc.so"][2] == b"elf"  # written through the symlink, inside root
    assert t["bin/sh2"] == ("file", 0o755, b"#!")
    assert os.stat(root / "bin/sh2").st_ino == os.stat(root / "bin/sh").st_ino


@pytest.mark.parametrize("members, what", [
    ([("../escape", "file", b"x")], ".."),
    ([("a/../../escape", "file", b"x")], ".."),
    ([("evil", "sym", "/"), ("evil/escape", "file", b"x")], None),
    ([("evil", "sym", "../../../../.."), ("evil/escape", "file", b"x")], None),
    ([("d/", "dir"), ("d/up", "sym", "../.."), ("d/up/escape", "file", b"x")], None),
    ([("/escape", "file", b"x")], None),
    ([("hl", "link", "../../outside-secret")], ".."),
    ([("s", "sym", "/outside-dir"), ("hl", "link", "s/secret")], "not in the image"),
])
def test_hostile_layers_never_write_outside(registry, unique_repo, tmp_path, members, what):
    """Each layer tries to write `escape` (or link a file) outside DIR: it is refused, or
    the write lands inside DIR (symlinks resolve as if DIR were /)."""
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (tmp_path / "outside-secret").write_text("secret")
    push_layers(registry, unique_repo, "evil", [(tar(*members), "gzip")])
    r, root = pull_and_unpack(registry, unique_repo, "evil", tmp_path)
    for p in (tmp_path / "escape", tmp_path.parent / "escape", Path("/escape"),
              outside / "escape"):
        assert not p.exists(), p
    assert (outside / "secret").read_text() == "secret"
    assert "Traceback" not in r.stderr
    if what is not None:
        assert r.returncode == 1 and what in r.stderr and len(r.stderr.splitlines()) == 1
    else:
        assert r.returncode == 0, r.stderr
        assert (root / "escape").is_file() or any(root.rglob("escape"))


def test_corrupt_layer_is_refused(registry, unique_repo, tmp_path):
    push_layers(registry, unique_repo, "c", [(tar(("f", "file", b"data")), "gzip")])
    store = tmp_path / "store"
    assert puller("pull", "-q", "--store", str(store),
                  f"{registry.host}/{unique_repo}:c").returncode == 0
    layer = max((store / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    for p in (store / "blobs/sha256").iterdir():
        if p.read_bytes()[:2] == b"\x1f\x8b":
            layer = p
    data = bytearray(layer.read_bytes())
    data[-12] ^= 0xFF
    layer.write_bytes(bytes(data))
    r = puller("unpack", "--store", str(store), f"{registry.host}/{unique_repo}:c",
               str(tmp_path / "root"))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr


def test_unpack_refuses_a_non_empty_dir_and_unknown_refs(registry, unique_repo, tmp_path):
    push_layers(registry, unique_repo, "n", [(tar(("f", "file", b"data")), "gzip")])
    store = tmp_path / "store"
    assert puller("pull", "-q", "--store", str(store),
                  f"{registry.host}/{unique_repo}:n").returncode == 0
    d = tmp_path / "full"
    d.mkdir()
    (d / "x").write_text("x")
    r = puller("unpack", "--store", str(store), f"{registry.host}/{unique_repo}:n", str(d))
    assert r.returncode == 1 and "not empty" in r.stderr
    # nothing was written, and the message says so
    assert "nothing was written" in r.stderr and "incomplete" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and [p.name for p in d.iterdir()] == ["x"]
    f = tmp_path / "afile"
    f.write_text("keep")
    r = puller("unpack", "--store", str(store), f"{registry.host}/{unique_repo}:n", str(f))
    assert r.returncode == 1 and "nothing was written" in r.stderr, r.stderr
    assert "incomplete" not in r.stderr and f.read_text() == "keep"
    # an empty DIR argument is a usage error (not the current directory)
    r = puller("unpack", "--store", str(store), f"{registry.host}/{unique_repo}:n", "")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "incomplete" not in r.stderr
    r = puller("unpack", "--store", str(store), "nothere", str(tmp_path / "x"))
    assert r.returncode == 1 and "no such image" in r.stderr
    r = puller("unpack", "--store", str(store), "Bad:Ref!", str(tmp_path / "x"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_same_tree_as_umoci(registry, unique_repo, tmp_path):
    if shutil.which("umoci") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but umoci is not installed", pytrace=False)
        pytest.skip("umoci is not installed")
    base = build_image(seed=81, layer_sizes=[100_000, 5_000])
    extra = gzip.compress(tar(("layer81000/README", "file", b"changed", 0o640),
                              ("layer81001/.wh.data", "file"), ("etc/", "dir"),
                              ("etc/hosts", "file", b"127.0.0.1 localhost\n"),
                              ("etc/hosts.link", "sym", "hosts")), mtime=0)
    img = build_image(seed=82, layer_sizes=[3_000], base=base, extra_layers=[extra])
    push(registry.url, unique_repo, "u", img)
    r, root = pull_and_unpack(registry, unique_repo, "u", tmp_path)
    assert r.returncode == 0, r.stderr
    store = tmp_path / "store"
    bundle = tmp_path / "bundle"
    u = subprocess.run(["umoci", "unpack", "--rootless", "--image",
                        f"{store}:{registry.host}/{unique_repo}:u", str(bundle)],
                       capture_output=True, text=True, timeout=120)
    assert u.returncode == 0, u.stderr
    ours, theirs = tree(root), tree(bundle / "rootfs")
    assert ours.keys() == theirs.keys()
    assert ours == theirs
    assert "layer81001/data" not in ours and ours["layer81000/README"][2] == b"changed"


@pytest.mark.parametrize("how", ["none", "gzip"])
def test_trailing_padding_counts_toward_the_diff_id(registry, unique_repo, tmp_path, how):
    """A tar may carry zero padding after its end-of-archive blocks (tar pads to whole
    records). It belongs to the layer's diff_id; make it longer than any read-ahead."""
    padded = tar(("pad/", "dir"), ("pad/f", "file", b"x" * 3000)) + b"\0" * (3 << 20)
    push_layers(registry, unique_repo, "p", [(padded, how)])
    r, root = pull_and_unpack(registry, unique_repo, "p", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (root / "pad" / "f").read_bytes() == b"x" * 3000


def push_config(registry, repo: str, tag: str, config: bytes,
                layers: list[bytes] | None, diff_ids: int | None = None) -> list[str]:
    """An OCI image with exactly these ``config`` bytes and gzip layers of these tars,
    pushed as repo:tag (``layers=None`` writes ``"layers": null``). Returns the real
    diff_ids of the layers."""
    blobs, descs, real = {}, [], []
    for t in layers or []:
        blob, mt = compress(t, "gzip")
        blobs[sha(blob)] = blob
        descs.append({"mediaType": mt, "digest": sha(blob), "size": len(blob)})
        real.append(sha(t))
    blobs[sha(config)] = config
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": sha(config),
                                      "size": len(config)},
                           "layers": descs if layers is not None else None}).encode()
    push_raw_manifest(registry.url, repo, tag, manifest, OCI_MANIFEST, blobs)
    return real


def config_with(diff_ids) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


LAYER_A = tar(("a", "file", b"a"))
LAYER_B = tar(("b", "file", b"b"))

# (config bytes, layers, words the error must contain)
BAD_CONFIGS = {
    "not-json": (b"{bad", [LAYER_A], "not valid JSON"),
    "a-list": (b"[]", [LAYER_A], "not a JSON object"),
    "diff_ids-null": (config_with(None), [LAYER_A], "no rootfs.diff_ids"),
    "no-rootfs": (json.dumps({"os": "linux", "architecture": "amd64"}).encode(), [LAYER_A],
                  "no rootfs.diff_ids"),
    "diff_id-not-a-string": (config_with([7]), [LAYER_A], "diff_ids[0]"),
    "fewer-diff_ids": (config_with([sha(LAYER_A)]), [LAYER_A, LAYER_B],
                       "1 diff_ids for 2 layers"),
    "layers-null": (config_with([sha(LAYER_A)]), None, "1 diff_ids for 0 layers"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_unpack_refuses_an_invalid_config(registry, unique_repo, tmp_path, case):
    config, layers, words = BAD_CONFIGS[case]
    push_config(registry, unique_repo, "bad", config, layers)
    r, root = pull_and_unpack(registry, unique_repo, "bad", tmp_path)
    assert r.returncode == 1, r.stderr
    assert words in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not root.exists()  # refused before DIR is made


def test_unpack_checks_every_layer_against_its_diff_id(registry, unique_repo, tmp_path):
    """Two layers, two diff_ids, the second wrong: found while the second is applied."""
    push_config(registry, unique_repo, "w", config_with([sha(LAYER_A), sha(LAYER_A)]),
                [LAYER_A, LAYER_B])
    r, root = pull_and_unpack(registry, unique_repo, "w", tmp_path)
    assert r.returncode == 1 and "the config says" in r.stderr, r.stderr
    assert "left incomplete" in r.stderr and len(r.stderr.splitlines()) == 1
    # the same layers with the right diff_ids unpack
    push_config(registry, unique_repo, "ok", config_with([sha(LAYER_A), sha(LAYER_B)]),
                [LAYER_A, LAYER_B])
    store = tmp_path / "store"
    assert puller("pull", "-q", "--store", str(store),
                  f"{registry.host}/{unique_repo}:ok").returncode == 0
    r = puller("unpack", "--store", str(store), f"{registry.host}/{unique_repo}:ok",
               str(tmp_path / "ok"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ok/a").read_bytes() == b"a" and (tmp_path / "ok/b").read_bytes() == b"b"
