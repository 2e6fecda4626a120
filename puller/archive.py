"""``puller save``: images from the store as a tar archive.

``--format docker`` (default) writes the archive ``docker save`` writes and ``docker load``
reads::

    manifest.json        [{"Config": "<hex>.json", "RepoTags": ["alpine:latest"],
                           "Layers": ["<hex>/layer.tar", ...]}, ...]
    repositories         {"alpine": {"latest": "<hex of the top layer>"}}
    <hex>.json           each image's config, named by its digest
    <hex>/layer.tar      each layer, as stored (gzip), or with --uncompressed a plain tar
                         named by its diff_id; zstd layers are always written as plain tars
                         (docker before 23 can't load zstd)

``skopeo inspect docker-archive:FILE`` and ``skopeo copy docker-archive:FILE ...`` read it.
One image per reference: the platform chosen like ``unpack`` does.

``--format oci`` writes an OCI image layout (``oci-archive:FILE`` for skopeo,
``ctr import``): ``oci-layout``, ``index.json`` with one entry per reference (named by
``org.opencontainers.image.ref.name`` and ``io.containerd.image.name``, both the normalised
reference) and ``blobs/``. An entry is written as the store holds it: a multi-platform
index stays the index (byte for byte, with the platforms that were pulled); with
``--platform`` only that platform's manifest is written.

Every blob is verified while it is copied. For the docker format each image's config must
be a JSON object whose ``rootfs.diff_ids`` lists one digest per layer (plain layers are
checked against it); this is checked before anything is written.

``-o FILE`` is written to a temporary file beside it, fsynced and renamed over it; on any
error the temporary file is removed and FILE is untouched. A symlink is followed (its
target gets the archive, the link stays). An existing FIFO or device is written to as a
stream, like standard output, never replaced; a directory, socket or terminal is refused.
Archives are deterministic: fixed times, owners and modes, files in a fixed order.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from . import mediatypes
from .digest import Digest
from .errors import DigestMismatch, PullerError, StoreError
from .fsutil import write_all
from .inventory import (Entry, StoredImage, choose_image, find, images_of, open_blob,
                        parse_platform, read_manifest, store_for)
from .manifest import Descriptor
from .platform import Platform
from .reference import Reference
from .store import ContentStore

__all__ = ["save", "save_command"]

_CHUNK = 1 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CONTAINERD_NAME = "io.containerd.image.name"


class _Verified(io.RawIOBase):
    """A blob's bytes, hashed as tarfile copies them."""

    def __init__(self, f: BinaryIO, digest: Digest) -> None:
        self._f = f
        self._digest = digest
        self._h = digest.hasher()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)  # type: ignore[attr-defined]
        if n:
            self._h.update(memoryview(b)[:n])
        return n or 0

    def check(self) -> None:
        if self._h.hexdigest() != self._digest.hex:
            raise DigestMismatch(f"blob {self._digest} in the store is corrupt "
                                 "(run `puller fsck`)")


class _Writer:
    def __init__(self, s: ContentStore, tf: tarfile.TarFile) -> None:
        self.s = s
        self.tf = tf
        self.written: set[str] = set()

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = size, 0o644, 0
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def dir(self, name: str) -> None:
        if name in self.written:
            return
        self.written.add(name)
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
        ti.uname = ti.gname = ""
        self.tf.addfile(ti)

    def data(self, name: str, data: bytes) -> None:
        if name in self.written:
            return
        self.written.add(name)
        self.tf.addfile(self._info(name, len(data)), io.BytesIO(data))

    def blob(self, name: str, desc: Descriptor) -> None:
        if name in self.written:
            return
        if not self.s.has(desc.digest, desc.size):
            raise StoreError(f"blob {desc.digest} is not in the store (pull the image again)")
        self.written.add(name)
        with open_blob(self.s, desc.digest) as f:
            src = _Verified(f, desc.digest)
            self.tf.addfile(self._info(name, desc.size), io.BufferedReader(src, _CHUNK))
            src.check()

    def file(self, name: str, f: BinaryIO, size: int) -> None:
        if name in self.written:
            return
        self.written.add(name)
        self.tf.addfile(self._info(name, size), f)


def _layer_head(s: ContentStore, d: Digest) -> bytes:
    with open_blob(s, d) as f:
        return f.read(4)


def _plain_layer(s: ContentStore, desc: Descriptor, diff_id: str | None) -> tuple[BinaryIO, str]:
    """The layer decompressed into a temporary file (verified); returns it and its diff_id."""
    from .unpack import _zstd_reader

    tmp = tempfile.TemporaryFile(prefix="puller-layer-")
    try:
        with open_blob(s, desc.digest) as f:
            src = _Verified(f, desc.digest)
            buffered = io.BufferedReader(src, _CHUNK)
            head = buffered.peek(4)[:4]
            closer = None
            if head.startswith(b"\x1f\x8b"):
                stream: BinaryIO = gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore
            elif head.startswith(_ZSTD_MAGIC):
                stream, closer = _zstd_reader(buffered)  # type: ignore[arg-type]
            else:
                stream = buffered  # type: ignore[assignment]
            h = hashlib.sha256()
            try:
                while chunk := stream.read(_CHUNK):
                    h.update(chunk)
                    tmp.write(chunk)
            except PullerError:
                raise
            except Exception as exc:  # zlib.error, BadGzipFile, zstd errors
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise
                raise StoreError(f"layer {desc.digest} can't be decompressed: "
                                 f"{' '.join(str(exc).split())[:200]}") from None
            finally:
                if closer is not None:
                    closer()
            while buffered.read(_CHUNK):  # hash any trailing bytes
                pass
            src.check()
        got = f"sha256:{h.hexdigest()}"
        if diff_id is not None and got != diff_id:
            raise DigestMismatch(f"layer {desc.digest} uncompresses to {got}, the config "
                                 f"says {diff_id}")
        tmp.seek(0)
        return tmp, got
    except BaseException:
        tmp.close()
        raise


def _checked(s: ContentStore, entry: Entry, img: StoredImage) -> list[str]:
    """The diff_ids of ``img`` (one per layer, see :func:`puller.unpack.layer_diff_ids`),
    after checking that its config and every layer are in the store."""
    from .unpack import layer_diff_ids

    diff_ids = layer_diff_ids(img, entry.name)
    for layer in img.manifest.layers:
        if not s.has(layer.digest, layer.size):
            raise StoreError(f"layer {layer.digest} of {entry.name} is not in the store"
                             + (" (a foreign layer: pull with --include-foreign)"
                                if layer.urls else ""))
    return diff_ids


def _repo_tag(name: str) -> tuple[str, str] | None:
    """``docker.io/library/alpine:3`` -> ("alpine", "3"); None without a tag."""
    try:
        ref = Reference.parse(name)
    except PullerError:
        return None
    if ref.tag is None:
        return None
    familiar = Reference(ref.registry, ref.repository, ref.tag, None).familiar()
    repo, _, tag = familiar.rpartition(":")
    return repo, tag


def _save_docker(s: ContentStore, w: _Writer, chosen: list[tuple[Entry, StoredImage]],
                 uncompressed: bool) -> None:
    manifest: list[dict[str, Any]] = []
    by_config: dict[str, dict[str, Any]] = {}
    repositories: dict[str, dict[str, str]] = {}
    for entry, img in chosen:
        cfg = img.manifest.config
        diff_ids = _checked(s, entry, img)
        repo_tag = _repo_tag(entry.name)
        item = by_config.get(str(cfg.digest))
        if item is not None:  # the same image under another name: one entry, more tags
            if repo_tag and f"{repo_tag[0]}:{repo_tag[1]}" not in item["RepoTags"]:
                item["RepoTags"].append(f"{repo_tag[0]}:{repo_tag[1]}")
                repositories.setdefault(repo_tag[0], {})[repo_tag[1]] = item["_top"]
            continue
        config_name = f"{cfg.digest.hex}.json"
        w.data(config_name, img.config_bytes or b"")
        layer_names = []
        for layer, diff_id in zip(img.manifest.layers, diff_ids, strict=True):
            plain = uncompressed or _layer_head(s, layer.digest).startswith(_ZSTD_MAGIC)
            if plain:
                tmp, got = _plain_layer(s, layer, diff_id)
                with tmp:
                    dirname = Digest.parse(got).hex
                    size = os.fstat(tmp.fileno()).st_size
                    w.dir(f"{dirname}/")
                    w.file(f"{dirname}/layer.tar", tmp, size)
            else:
                dirname = layer.digest.hex
                w.dir(f"{dirname}/")
                w.blob(f"{dirname}/layer.tar", layer)
            layer_names.append(f"{dirname}/layer.tar")
        top = layer_names[-1].split("/")[0] if layer_names else cfg.digest.hex
        item = {"Config": config_name,
                "RepoTags": [f"{repo_tag[0]}:{repo_tag[1]}"] if repo_tag else [],
                "Layers": layer_names, "_top": top}
        by_config[str(cfg.digest)] = item
        manifest.append(item)
        if repo_tag:
            repositories.setdefault(repo_tag[0], {})[repo_tag[1]] = top
    for item in manifest:
        item.pop("_top")
    w.data("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
    if repositories:
        w.data("repositories", json.dumps(repositories, separators=(",", ":")).encode())


def _save_oci(s: ContentStore, w: _Writer, chosen: list[tuple[Entry, StoredImage | None]]
              ) -> None:
    w.data("oci-layout", json.dumps(
        {"imageLayoutVersion": mediatypes.OCI_LAYOUT_VERSION}).encode())
    w.dir("blobs/")
    index_entries: list[dict[str, Any]] = []

    def blob(desc: Descriptor, data: bytes | None = None) -> None:
        w.dir(f"blobs/{desc.digest.algorithm}/")
        name = f"blobs/{desc.digest.algorithm}/{desc.digest.hex}"
        if data is not None:
            w.data(name, data)
        else:
            w.blob(name, desc)

    def image(img: StoredImage) -> None:
        for b in img.blobs():
            if not s.has(b.digest, b.size) and b.urls:
                continue  # foreign layer that was never downloaded: it names its URLs
            blob(b)
        blob(img.descriptor, img.manifest_bytes)

    for entry, img in chosen:
        if img is not None:  # one platform of an index
            desc = img.descriptor
            image(img)
        else:
            desc = entry.descriptor
            for child in images_of(s, entry):
                image(child)
            blob(desc, read_manifest(s, desc.digest))
        out = desc.to_json()
        annotations = dict(out.get("annotations") or {})
        annotations[mediatypes.ANNOTATION_REF_NAME] = entry.name
        annotations[_CONTAINERD_NAME] = entry.name
        out["annotations"] = annotations
        index_entries.append(out)
    doc = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": index_entries}
    w.data("index.json", json.dumps(doc, indent=2).encode() + b"\n")


def save(s: ContentStore, refs: list[str], out: BinaryIO, *, fmt: str = "docker",
         platform: Platform | None = None, uncompressed: bool = False,
         stream: bool = False) -> None:
    """Write ``refs`` from the store to ``out`` as a tar archive.

    Every reference is resolved, and for the docker format every image's config and
    layers are checked, before the first byte is written."""
    if fmt not in ("docker", "oci"):
        raise ValueError(f"unknown archive format {fmt!r}")
    if uncompressed and fmt != "docker":
        raise ValueError("uncompressed applies to the docker format only")
    entries: list[Entry] = []
    for r in refs:
        e = find(s, r)
        if e.name not in [x.name for x in entries]:
            entries.append(e)
    if fmt == "docker":
        docker = [(e, choose_image(s, e, platform)) for e in entries]
        for e, img in docker:
            _checked(s, e, img)
    else:
        oci = [(e, choose_image(s, e, platform) if platform else None) for e in entries]
    with tarfile.open(fileobj=out, mode="w|" if stream else "w",
                      format=tarfile.PAX_FORMAT) as tf:
        w = _Writer(s, tf)
        if fmt == "docker":
            _save_docker(s, w, docker, uncompressed)
        else:
            _save_oci(s, w, oci)


def _usage(message: str) -> int:
    print(f"puller: {message}", file=sys.stderr)
    return 2


def save_command(args: argparse.Namespace) -> int:
    """``-o FILE``: a regular file (or a new one) is written to a temporary file next to
    it, fsynced and renamed over it; a symlink is followed and its target written the
    same way (the link stays). A FIFO or device is opened and written to as a stream,
    never replaced. A directory, socket or terminal is refused."""
    if args.uncompressed and args.format != "docker":
        return _usage("save: --uncompressed applies to --format docker only")
    platform = parse_platform(args.platform)
    s = store_for(args.store)
    if not args.output or args.output == "-":
        if sys.stdout.isatty():
            return _usage("refusing to write an archive to a terminal (use -o FILE)")
        save(s, args.refs, sys.stdout.buffer, fmt=args.format, platform=platform,
             uncompressed=args.uncompressed, stream=True)
        sys.stdout.buffer.flush()
        return 0
    name = args.output
    # A symlink is written through: the file it points at gets the archive.
    target = Path(os.path.realpath(name)) if os.path.islink(name) else Path(name)
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise StoreError(f"cannot write {name}: {exc.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            return _usage(f"{name} is a directory (give a file name with -o)")
        if stat.S_ISSOCK(st.st_mode):
            return _usage(f"{name} is a socket: can't write an archive to it")
        return _save_to_stream(s, args, platform, name, target)
    _save_to_file(s, args, platform, name, target)
    return 0


class _Sink(io.RawIOBase):
    """An open FIFO or device written as a stream: every write is complete, and a write
    error names the output."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self._name = name

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            write_all(self._fd, b)
        except OSError as exc:
            raise StoreError(f"cannot write {self._name}: {exc.strerror or exc}") from None
        return len(b)


def _save_to_stream(s: ContentStore, args: argparse.Namespace, platform: Platform | None,
                    name: str, target: Path) -> int:
    """The archive written into an existing FIFO or device, as to standard output."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise StoreError(f"cannot write {name}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if os.isatty(fd):
            return _usage(f"refusing to write an archive to a terminal ({name})")
        if not stat.S_ISREG(mode):
            save(s, args.refs, _Sink(fd, name), fmt=args.format,  # type: ignore[arg-type]
                 platform=platform, uncompressed=args.uncompressed, stream=True)
            if stat.S_ISBLK(mode):
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise StoreError(f"cannot write {name}: {exc.strerror}") from None
            return 0
    finally:
        os.close(fd)
    # replaced by a regular file since it was looked at: written like one
    _save_to_file(s, args, platform, name, target)
    return 0


def _save_to_file(s: ContentStore, args: argparse.Namespace, platform: Platform | None,
                  name: str, target: Path) -> None:
    """The archive written to a temporary file next to ``target``, fsynced and renamed
    over it; on any error the temporary file is removed and ``target`` is untouched."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                   dir=target.parent if str(target.parent) else ".")
    except OSError as exc:
        raise StoreError(f"cannot write {name}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            save(s, args.refs, f, fmt=args.format, platform=platform,
                 uncompressed=args.uncompressed)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
