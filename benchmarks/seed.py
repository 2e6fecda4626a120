"""Deterministic benchmark images, built as files and pushed to a registry by streaming.

Layers are built streaming (bounded memory, so a 1 GiB layer is fine): a one-file tar of
``random.Random(seed)`` bytes, gzipped like ``tests/support/images.py`` does (level 1 up to
8 MiB, level 0 -- stored deflate blocks -- above, so big layers cost no CPU to build and
compress to ~their own size). Built layers are cached under ``benchmarks/.work/layers`` as
``<seed>-<size>.tar.gz`` with a ``.json`` beside it (digest, diff_id, size); ``huge`` layers are
built with ``cache=False`` and deleted after the push.

An :class:`Image` here is manifest + config bytes and a list of layer files; :func:`push_image`
uploads it with http.client (HEAD first, so shared blobs are sent once).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])

CHUNK = 1 << 20
GZIP_LEVEL1_MAX = 8 << 20
_MTIME = 1_600_000_000
_CREATED = "2020-09-13T12:26:40Z"


def _digest(h: "hashlib._Hash") -> str:
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Layer:
    path: Path
    digest: str
    diff_id: str
    size: int


def build_layer(cache_dir: Path, seed: int, size: int, *, cache: bool = True) -> Layer:
    """A gzip'd tar of about ``size`` bytes (tar size; stored gzip adds ~0.01 %)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{seed}-{size}.tar.gz"
    meta = path.with_suffix(".json")
    if cache and path.is_file() and meta.is_file():
        m = json.loads(meta.read_text())
        if path.stat().st_size == m["size"]:
            return Layer(path, m["digest"], m["diff_id"], m["size"])
    rng = random.Random(seed)
    payload = max(0, size - 3 * 512 - 1024)
    level = 1 if size <= GZIP_LEVEL1_MAX else 0
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)  # gzip, mtime 0, no name
    tar_h, gz_h = hashlib.sha256(), hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "wb") as out:
        def emit(tar_bytes: bytes) -> None:
            nonlocal written
            tar_h.update(tar_bytes)
            gz = comp.compress(tar_bytes)
            if gz:
                gz_h.update(gz)
                out.write(gz)
                written += len(gz)

        note = f"puller benchmark layer seed={seed} size={size}\n".encode()
        for name, kind, length in ((f"l{seed}/", tarfile.DIRTYPE, 0),
                                   (f"l{seed}/README", tarfile.REGTYPE, len(note)),
                                   (f"l{seed}/blob.bin", tarfile.REGTYPE, payload)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.size, ti.mtime, ti.uid, ti.gid = kind, length, _MTIME, 0, 0
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            emit(ti.tobuf(format=tarfile.USTAR_FORMAT))
            if name.endswith("README"):
                emit(note + b"\0" * (-len(note) % 512))
        left = payload
        while left > 0:  # bounded: left shrinks by >= 1 each turn
            n = min(CHUNK, left)
            emit(rng.randbytes(n))
            left -= n
        emit(b"\0" * (-payload % 512) + b"\0" * 1024)
        tail = comp.flush()
        gz_h.update(tail)
        out.write(tail)
        written += len(tail)
    os.replace(tmp, path)
    layer = Layer(path, _digest(gz_h), _digest(tar_h), written)
    if cache:
        meta.write_text(json.dumps({"digest": layer.digest, "diff_id": layer.diff_id,
                                    "size": layer.size}))
    return layer


@dataclass
class Image:
    repo: str
    tag: str
    layers: list[Layer]
    config: bytes = b""
    manifest: bytes = b""

    def __post_init__(self) -> None:
        cfg = {
            "created": _CREATED, "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Labels": {"puller.bench": f"{self.repo}:{self.tag}"}},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]},
            "history": [{"created": _CREATED, "created_by": f"layer {i}"}
                        for i in range(len(self.layers))],
        }
        self.config = json.dumps(cfg, indent=2).encode()
        man = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.config_digest,
                       "size": len(self.config)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size}
                       for layer in self.layers],
        }
        self.manifest = json.dumps(man, indent=2).encode()

    @property
    def config_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    def blobs(self) -> dict[str, int]:
        """digest -> size of the config and every layer (what a pull downloads)."""
        out = {self.config_digest: len(self.config)}
        out.update({layer.digest: layer.size for layer in self.layers})
        return out


class _Conn:
    def __init__(self, base_url: str) -> None:
        u = urlsplit(base_url)
        self.netloc = u.netloc
        self.conn = http.client.HTTPConnection(u.netloc, timeout=120, blocksize=CHUNK)

    def req(self, method: str, path: str, body=None, headers: dict | None = None):
        if path.startswith("http"):
            u = urlsplit(path)
            path = u.path + (f"?{u.query}" if u.query else "")
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.will_close:
            self.conn.close()
        return resp.status, resp.headers, data

    def close(self) -> None:
        self.conn.close()


def _push_blob(c: _Conn, repo: str, digest: str, size: int, body) -> None:
    status, _, _ = c.req("HEAD", f"/v2/{repo}/blobs/{digest}")
    if status == 200:
        return
    status, h, data = c.req("POST", f"/v2/{repo}/blobs/uploads/", b"",
                            {"Content-Length": "0"})
    if status != 202:
        raise RuntimeError(f"POST upload {repo}: {status} {data[:200]!r}")
    loc = h["Location"]
    status, _, data = c.req("PUT", f"{loc}{'&' if '?' in loc else '?'}digest={digest}", body,
                            {"Content-Length": str(size),
                             "Content-Type": "application/octet-stream"})
    if status != 201:
        raise RuntimeError(f"PUT blob {repo} {digest}: {status} {data[:200]!r}")


def push_image(base_url: str, img: Image) -> str:
    c = _Conn(base_url)
    try:
        for layer in img.layers:
            with open(layer.path, "rb") as f:
                _push_blob(c, img.repo, layer.digest, layer.size, f)
        _push_blob(c, img.repo, img.config_digest, len(img.config), img.config)
        status, h, data = c.req("PUT", f"/v2/{img.repo}/manifests/{img.tag}", img.manifest,
                                {"Content-Type": OCI_MANIFEST,
                                 "Content-Length": str(len(img.manifest))})
        if status != 201:
            raise RuntimeError(f"PUT manifest {img.repo}:{img.tag}: {status} {data[:200]!r}")
        got = h.get("Docker-Content-Digest")
        if got != img.digest:
            raise RuntimeError(f"registry digest {got} != {img.digest}")
        return got
    finally:
        c.close()


__all__ = ["Layer", "Image", "build_layer", "push_image", "MANIFEST_ACCEPT"]
