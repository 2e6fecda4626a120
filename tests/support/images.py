"""Deterministic test images and a small registry pusher (stdlib http.client), independent of
puller.

    img = build_image(seed=1, layer_sizes=[1000, 2_000_000])
    arm = build_image(seed=2, layer_sizes=[10], platform=("linux", "arm64", "v8"))
    idx = build_index([img, arm])
    push(registry.url, "test/repo", "v1", idx)

Same arguments -> same bytes -> same digests (tar mtimes, gzip header and JSON are fixed).
Manifests are serialised with ``json.dumps(obj, indent=2)`` (no trailing newline).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import http.client
import io
import json
import os
import random
import re
import ssl
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union
from urllib.parse import urlencode, urlsplit

__all__ = [
    "OCI_MANIFEST", "OCI_INDEX", "OCI_CONFIG", "OCI_LAYER_GZIP", "OCI_LAYER_TAR",
    "DOCKER_MANIFEST", "DOCKER_LIST", "DOCKER_CONFIG", "DOCKER_LAYER_GZIP", "IN_TOTO",
    "MANIFEST_ACCEPT", "sha256_digest", "make_layer", "Image", "Index", "build_image",
    "build_index", "push", "push_blob", "push_raw_manifest", "Pusher", "PushError",
    "FIXTURES", "fixtures_available", "fixture_bytes", "hello_world_amd64",
    "hello_world_list", "seed_registry",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IN_TOTO = "application/vnd.in-toto+json"
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

_FIXED_MTIME = 1_600_000_000  # 2020-09-13
_CREATED = "2020-09-13T12:26:40Z"
_GZIP_LEVEL1_MAX = 8 << 20  # layers above this are gzipped at level 0 (stored) for speed


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, indent=2).encode()


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------

def _tar_bytes(seed: int, size: int) -> bytes:
    """A deterministic tar of about ``size`` bytes: two dirs, a small text file, a symlink and
    one big file of random content (``random.Random(seed).randbytes``)."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    overhead = 6 * 512 + 2 * 512  # headers + end-of-archive blocks, roughly
    payload_len = max(0, size - overhead)
    note = f"puller test layer seed={seed} size={size}\n".encode()

    def info(name: str, kind: bytes, length: int = 0, mode: int = 0o644) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode, ti.mtime = kind, length, mode, _FIXED_MTIME
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(info(f"layer{seed}/", tarfile.DIRTYPE, mode=0o755))
        tf.addfile(info(f"layer{seed}/data/", tarfile.DIRTYPE, mode=0o755))
        tf.addfile(info(f"layer{seed}/README", tarfile.REGTYPE, len(note)), io.BytesIO(note))
        link = info(f"layer{seed}/link", tarfile.SYMTYPE)
        link.linkname = "README"
        tf.addfile(link)
        tf.addfile(info(f"layer{seed}/data/blob.bin", tarfile.REGTYPE, payload_len),
                   io.BytesIO(rng.randbytes(payload_len)))
    return buf.getvalue()


def _gzip(data: bytes, level: int) -> bytes:
    # wbits=31: gzip container with mtime 0 and no file name -> deterministic bytes.
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


@functools.lru_cache(maxsize=64)
def _layer_cached(seed: int, size: int, compress: str, level: int | None) -> tuple[bytes, str]:
    tar = _tar_bytes(seed, size)
    diff_id = sha256_digest(tar)
    if compress == "none":
        return tar, diff_id
    if compress == "gzip":
        if level is None:
            level = 1 if len(tar) <= _GZIP_LEVEL1_MAX else 0
        return _gzip(tar, level), diff_id
    raise ValueError(f"unsupported compression {compress!r} (gzip or none; no zstd module)")


def make_layer(seed: int, size: int, *, compress: str = "gzip", level: int | None = None) -> bytes:
    """A real tar layer of ~``size`` uncompressed bytes, gzip-compressed (``compress="none"``
    for a plain tar). Random content, so compressed size ≈ size. Gzip level defaults to 1, or 0
    (stored deflate blocks; still valid gzip) above 8 MiB to keep 64 MiB layers fast. zstd is not
    offered (no zstd module in the venv). Results are cached."""
    return _layer_cached(seed, size, compress, level)[0]


def layer_diff_id(layer: bytes) -> str:
    """sha256 of the uncompressed tar (gzip detected by magic)."""
    if layer[:2] == b"\x1f\x8b":
        return sha256_digest(gzip.decompress(layer))
    return sha256_digest(layer)


# ------------------------------------------------------------------------------------------------
# images and indexes
# ------------------------------------------------------------------------------------------------

@dataclass
class Image:
    manifest: bytes
    media_type: str
    config: bytes
    layers: list[bytes]
    platform: dict | None = None
    diff_ids: list[str] = field(default_factory=list)
    annotations: dict | None = None  # for the index entry (attestations use it)

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def layer_digests(self) -> list[str]:
        return [sha256_digest(b) for b in self.layers]

    @property
    def manifest_json(self) -> dict:
        return json.loads(self.manifest)

    @property
    def children(self) -> list:
        return []

    def own_blobs(self) -> dict[str, bytes]:
        out = {self.config_digest: self.config}
        for b in self.layers:
            out[sha256_digest(b)] = b
        return out

    def blobs(self) -> dict[str, bytes]:
        """config + layers, by digest."""
        return self.own_blobs()

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            d["platform"] = dict(self.platform)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


@dataclass
class Index:
    manifest: bytes
    media_type: str
    children: list  # Image (incl. attestation manifests) or nested Index, in manifest order
    annotations: dict | None = None
    platform: dict | None = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def manifest_json(self) -> dict:
        return json.loads(self.manifest)

    @property
    def images(self) -> list:
        """Children that are not attestation manifests."""
        return [c for c in self.children if not _is_attestation(c)]

    @property
    def attestations(self) -> list:
        return [c for c in self.children if _is_attestation(c)]

    def own_blobs(self) -> dict[str, bytes]:
        return {}

    def blobs(self) -> dict[str, bytes]:
        """All blobs of all children (recursively)."""
        out: dict[str, bytes] = {}
        for c in self.children:
            out.update(c.blobs())
        return out

    def manifests(self) -> dict[str, tuple[str, bytes]]:
        """digest -> (media_type, bytes) for this index and every manifest below it."""
        out = {self.digest: (self.media_type, self.manifest)}
        for c in self.children:
            if isinstance(c, Index):
                out.update(c.manifests())
            else:
                out[c.digest] = (c.media_type, c.manifest)
        return out

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            d["platform"] = dict(self.platform)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


def _is_attestation(obj) -> bool:
    return bool(obj.annotations) and \
        obj.annotations.get("vnd.docker.reference.type") == "attestation-manifest"


def _platform(platform: tuple | dict | None) -> dict | None:
    if platform is None:
        return None
    if isinstance(platform, dict):
        return dict(platform)
    os_, arch, *rest = platform
    p = {"architecture": arch, "os": os_}
    if rest and rest[0]:
        p["variant"] = rest[0]
    return p


def build_image(
    *,
    seed: int,
    layer_sizes: list[int] | tuple[int, ...] = (1024,),
    fmt: str = "oci",
    base: Image | None = None,
    platform: tuple | dict | None = ("linux", "amd64", None),
    extra_layers: list[bytes] | None = None,
    compress: str = "gzip",
    annotations: dict | None = None,
) -> Image:
    """A single-platform image: ``base``'s layers first (same blobs -> dedupe), then one layer
    per ``layer_sizes`` entry (seeds derived from ``seed``), then ``extra_layers`` (raw blobs;
    gzip or plain tar). ``fmt`` is "oci" or "docker" (schema 2)."""
    if fmt not in ("oci", "docker"):
        raise ValueError("fmt must be 'oci' or 'docker'")
    layers: list[bytes] = []
    diff_ids: list[str] = []
    history: list[dict] = []
    if base is not None:
        layers += base.layers
        diff_ids += base.diff_ids
        history += json.loads(base.config).get("history", [])
    for i, size in enumerate(layer_sizes):
        lseed = seed * 1000 + i
        blob, diff_id = _layer_cached(lseed, size, compress, None)
        layers.append(blob)
        diff_ids.append(diff_id)
        history.append({"created": _CREATED, "created_by": f"test layer seed={lseed} size={size}"})
    for blob in extra_layers or []:
        layers.append(blob)
        diff_ids.append(layer_diff_id(blob))
        history.append({"created": _CREATED, "created_by": "extra layer"})
    plat = _platform(platform) or {"architecture": "amd64", "os": "linux"}
    config_obj: dict = {
        "created": _CREATED,
        "architecture": plat["architecture"],
        "os": plat["os"],
    }
    if plat.get("variant"):
        config_obj["variant"] = plat["variant"]
    config_obj.update({
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], "Labels": {"puller.test.seed": str(seed)}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    })
    config = _dumps(config_obj)
    if fmt == "oci":
        mt, cfg_mt = OCI_MANIFEST, OCI_CONFIG
        layer_mt = {True: OCI_LAYER_GZIP, False: OCI_LAYER_TAR}
    else:
        mt, cfg_mt = DOCKER_MANIFEST, DOCKER_CONFIG
        layer_mt = {True: DOCKER_LAYER_GZIP, False: "application/vnd.docker.image.rootfs.diff.tar"}
    manifest_obj = {
        "schemaVersion": 2,
        "mediaType": mt,
        "config": {"mediaType": cfg_mt, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": layer_mt[b[:2] == b"\x1f\x8b"], "digest": sha256_digest(b),
                    "size": len(b)} for b in layers],
    }
    return Image(manifest=_dumps(manifest_obj), media_type=mt, config=config, layers=layers,
                 platform=_platform(platform), diff_ids=diff_ids, annotations=annotations)


def _attestation_for(img: Image) -> Image:
    """A buildkit-style attestation manifest for ``img`` (in-toto SPDX statement layer)."""
    statement = _dumps({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [{"name": "pkg:docker/test", "digest": {"sha256": img.digest.split(":")[1]}}],
        "predicate": {"spdxVersion": "SPDX-2.3", "name": "puller-test-sbom"},
    })
    config = _dumps({"architecture": "unknown", "os": "unknown", "config": {},
                     "rootfs": {"type": "layers", "diff_ids": [sha256_digest(statement)]}})
    manifest = _dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": IN_TOTO, "digest": sha256_digest(statement),
                    "size": len(statement),
                    "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"}}],
    })
    return Image(manifest=manifest, media_type=OCI_MANIFEST, config=config, layers=[statement],
                 platform={"architecture": "unknown", "os": "unknown"},
                 diff_ids=[sha256_digest(statement)],
                 annotations={"vnd.docker.reference.digest": img.digest,
                              "vnd.docker.reference.type": "attestation-manifest"})


def build_index(images: list, *, fmt: str = "oci", attestations: bool = True,
                annotations: dict | None = None) -> Index:
    """An OCI index (``fmt="oci"``) or Docker manifest list (``fmt="docker"``) over ``images``
    (each entry carries the image's platform). With ``attestations`` (OCI only) one
    buildkit-style attestation manifest per image is appended after the images."""
    if fmt not in ("oci", "docker"):
        raise ValueError("fmt must be 'oci' or 'docker'")
    children = list(images)
    if attestations and fmt == "oci":
        children += [_attestation_for(i) for i in images if isinstance(i, Image)]
    mt = OCI_INDEX if fmt == "oci" else DOCKER_LIST
    obj: dict = {"schemaVersion": 2, "mediaType": mt,
                 "manifests": [c.descriptor() for c in children]}
    if annotations:
        obj["annotations"] = annotations
    return Index(manifest=_dumps(obj), media_type=mt, children=children)


# ------------------------------------------------------------------------------------------------
# pushing
# ------------------------------------------------------------------------------------------------

class PushError(RuntimeError):
    def __init__(self, msg: str, status: int | None = None, body: bytes = b""):
        super().__init__(f"{msg}: HTTP {status} {body[:500]!r}")
        self.status = status
        self.body = body


TokenArg = Union[None, str, Callable[[dict], str]]


def _parse_challenge(value: str) -> tuple[str, dict]:
    scheme, _, rest = value.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class Pusher:
    """One persistent http.client connection to a registry, with Bearer/Basic challenge
    handling. ``token``: a fixed bearer token, or a callable(challenge_params) -> token.
    ``credentials``: (user, password) used for the token request (or Basic auth)."""

    def __init__(self, base_url: str, *, token: TokenArg = None,
                 credentials: tuple[str, str] | None = None, timeout: float = 60,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        u = urlsplit(base_url)
        self.scheme, self.netloc = u.scheme, u.netloc
        self.base_path = u.path.rstrip("/")
        self.timeout = timeout
        self.credentials = credentials
        self._token_arg = token
        self._auth_header: str | None = f"Bearer {token}" if isinstance(token, str) else None
        self._ssl = ssl_context
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Pusher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.scheme == "https":
                ctx = self._ssl or ssl._create_unverified_context()
                self._conn = http.client.HTTPSConnection(self.netloc, timeout=self.timeout,
                                                         context=ctx)
            else:
                self._conn = http.client.HTTPConnection(self.netloc, timeout=self.timeout)
        return self._conn

    def _raw(self, method: str, path: str, body: bytes | None, headers: dict) \
            -> tuple[int, http.client.HTTPMessage, bytes]:
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.close()
                return resp.status, resp.headers, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """``path`` is relative to the base URL (or absolute URL on the same host)."""
        if path.startswith(("http://", "https://")):
            u = urlsplit(path)
            path = u.path + (f"?{u.query}" if u.query else "")
        elif not path.startswith(self.base_path + "/"):
            path = self.base_path + path
        hdrs = dict(headers or {})
        if body is not None:
            hdrs.setdefault("Content-Length", str(len(body)))
        if self._auth_header:
            hdrs["Authorization"] = self._auth_header
        status, rh, data = self._raw(method, path, body, hdrs)
        if status == 401 and "WWW-Authenticate" in rh:
            if self._authenticate(rh["WWW-Authenticate"]):
                hdrs["Authorization"] = self._auth_header
                status, rh, data = self._raw(method, path, body, hdrs)
        return status, rh, data

    def _authenticate(self, challenge: str) -> bool:
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic" and self.credentials:
            raw = f"{self.credentials[0]}:{self.credentials[1]}".encode()
            self._auth_header = "Basic " + base64.b64encode(raw).decode()
            return True
        if scheme != "bearer":
            return False
        if callable(self._token_arg):
            self._auth_header = f"Bearer {self._token_arg(params)}"
            return True
        realm = params.get("realm")
        if not realm:
            return False
        q = {k: params[k] for k in ("service", "scope") if k in params}
        url = realm + ("&" if "?" in realm else "?") + urlencode(q)
        ru = urlsplit(url)
        cls = http.client.HTTPSConnection if ru.scheme == "https" else http.client.HTTPConnection
        kw = {"context": ssl._create_unverified_context()} if ru.scheme == "https" else {}
        conn = cls(ru.netloc, timeout=self.timeout, **kw)
        headers = {}
        if self.credentials:
            raw = f"{self.credentials[0]}:{self.credentials[1]}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        try:
            conn.request("GET", ru.path + "?" + ru.query, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise PushError(f"token request to {url} failed", resp.status, data)
        doc = json.loads(data)
        self._auth_header = f"Bearer {doc.get('token') or doc['access_token']}"
        return True

    # -- registry operations ---------------------------------------------------------------------
    def blob_exists(self, repo: str, digest: str) -> bool:
        status, _, _ = self.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        return status == 200

    def push_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """Monolithic upload (POST then PUT ?digest=); skipped if HEAD says it exists."""
        digest = digest or sha256_digest(data)
        if self.blob_exists(repo, digest):
            return digest
        status, h, body = self.request("POST", f"/v2/{repo}/blobs/uploads/", b"")
        if status != 202:
            raise PushError(f"POST upload {repo}", status, body)
        loc = h["Location"]
        sep = "&" if "?" in loc else "?"
        status, h, body = self.request(
            "PUT", f"{loc}{sep}digest={digest}", data,
            {"Content-Type": "application/octet-stream"})
        if status != 201:
            raise PushError(f"PUT upload {repo} {digest}", status, body)
        return digest

    def put_manifest(self, repo: str, ref: str, manifest: bytes, media_type: str) -> str:
        status, h, body = self.request("PUT", f"/v2/{repo}/manifests/{ref}", manifest,
                                       {"Content-Type": media_type})
        if status != 201:
            raise PushError(f"PUT manifest {repo}:{ref} ({media_type})", status, body)
        return h.get("Docker-Content-Digest", sha256_digest(manifest))

    def push(self, repo: str, ref: str | None, obj) -> str:
        """Push ``obj`` (Image, Index or RawManifest) and everything below it; children by
        digest, the top manifest by ``ref`` (tag or digest; None = its digest)."""
        for child in obj.children:
            self.push(repo, None, child)
        for digest, data in obj.own_blobs().items():
            self.push_blob(repo, data, digest)
        return self.put_manifest(repo, ref or obj.digest, obj.manifest, obj.media_type)


def push(base_url: str, repo: str, ref_or_tag: str | None, obj, *, token: TokenArg = None,
         credentials: tuple[str, str] | None = None) -> str:
    """Push an :class:`Image`/:class:`Index`/:class:`RawManifest` (blobs that the registry
    already has are skipped). Returns the registry's Docker-Content-Digest for the top manifest."""
    with Pusher(base_url, token=token, credentials=credentials) as p:
        return p.push(repo, ref_or_tag, obj)


def push_blob(base_url: str, repo: str, data: bytes, *, token: TokenArg = None,
              credentials: tuple[str, str] | None = None) -> str:
    with Pusher(base_url, token=token, credentials=credentials) as p:
        return p.push_blob(repo, data)


@dataclass
class RawManifest:
    """Manifest bytes pushed verbatim, with the blobs it needs (and optional child manifests)."""
    manifest: bytes
    media_type: str
    blob_map: dict[str, bytes] = field(default_factory=dict)
    children: list = field(default_factory=list)
    platform: dict | None = None
    annotations: dict | None = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            d["platform"] = dict(self.platform)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    def own_blobs(self) -> dict[str, bytes]:
        return dict(self.blob_map)

    def blobs(self) -> dict[str, bytes]:
        out = dict(self.blob_map)
        for c in self.children:
            out.update(c.blobs())
        return out


def push_raw_manifest(base_url: str, repo: str, ref: str | None, manifest_bytes: bytes,
                      media_type: str, blobs: dict[str, bytes] | None = None, *,
                      children: list | None = None, token: TokenArg = None,
                      credentials: tuple[str, str] | None = None) -> str:
    """Push exact manifest bytes under ``ref`` (tag, or None for by-digest) after the blobs
    (digest -> bytes; each is checked to match its digest) and child manifests."""
    for d, b in (blobs or {}).items():
        if sha256_digest(b) != d:
            raise ValueError(f"blob bytes do not match {d}")
    raw = RawManifest(manifest_bytes, media_type, dict(blobs or {}), list(children or []))
    return push(base_url, repo, ref, raw, token=token, credentials=credentials)


def seed_registry(registry, repo: str, tag: str = "latest", *, seed: int = 1,
                  layer_sizes: list[int] | tuple[int, ...] = (1024, 4096), fmt: str = "oci",
                  **kw) -> Image:
    """Build one image and push it to ``registry`` (anything with ``.url`` and optionally
    ``.credentials``) as ``repo:tag``."""
    img = build_image(seed=seed, layer_sizes=list(layer_sizes), fmt=fmt, **kw)
    push(registry.url, repo, tag, img, credentials=getattr(registry, "credentials", None))
    return img


# ------------------------------------------------------------------------------------------------
# captured real-registry fixtures
# ------------------------------------------------------------------------------------------------

FIXTURES = Path(os.environ.get("PULLER_FIXTURES")
                or Path(__file__).resolve().parents[3] / "shared" / "fixtures"
                / "registry-captures")


def fixtures_available() -> bool:
    return (FIXTURES / "SOURCES.md").is_file()


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


_HW = "dockerhub-hello-world-20230604"


def hello_world_amd64() -> RawManifest:
    """Docker Hub's real hello-world linux/amd64 chain (2023-06-04): v2s2 manifest
    (sha256:7e9b6e7b…), config and gzip layer, as captured. Push it by tag; it reads back
    byte-identical."""
    manifest = fixture_bytes(f"{_HW}.linux-amd64.v2s2-manifest.json")
    config = fixture_bytes(f"{_HW}.linux-amd64.config.json")
    layer = fixture_bytes(f"{_HW}.linux-amd64.layer.tar.gz")
    blobs = {sha256_digest(config): config, sha256_digest(layer): layer}
    return RawManifest(manifest, DOCKER_MANIFEST, blobs,
                       platform={"architecture": "amd64", "os": "linux"})


def hello_world_list() -> RawManifest:
    """The real 11-platform manifest list (sha256:fc6cf906…) with only its amd64 child present.
    distribution 2.8 refuses to store it (MANIFEST_BLOB_UNKNOWN for the 10 absent children), so
    it cannot be pushed as-is; serve it through a proxy rule or use it for parser tests."""
    return RawManifest(fixture_bytes(f"{_HW}.manifest-list.json"), DOCKER_LIST, {},
                       [hello_world_amd64()])
