"""``puller unpack REF DIR``: an image's root filesystem, extracted safely.

Layers are applied in order, as containerd and umoci do:

* OCI whiteouts: ``.wh.NAME`` removes NAME from the layers below; ``.wh..wh..opq`` in a
  directory removes everything the layers below put there. Entries of the same layer are
  never removed by its own whiteouts. Whiteout files themselves are not written.
* Layers may be plain tar, gzip or zstd (told by their first bytes). zstd uses the
  ``zstandard`` module when it is installed, else the ``zstd`` program.
* Every layer is verified while it is read: its digest, and the digest of the
  uncompressed tar against the config's ``rootfs.diff_ids``. A config that is not a JSON
  object, or whose ``rootfs.diff_ids`` is not a list of one digest per layer, is refused
  before DIR is touched.

Nothing is ever written outside DIR. Member names are taken relative to DIR (a leading
``/`` is dropped, as docker does) and a name with a ``..`` component is refused. A path
is resolved inside DIR component by component: symlinks met on the way are followed as
if DIR were ``/`` (an absolute or ``..``-laden target can't climb out), and the
directory that receives an entry is then opened with ``O_NOFOLLOW`` from DIR down, so
every create, link and unlink happens through a directory descriptor known to be inside
DIR. Hard links must point at something already inside DIR.

Ownership is applied when running as root (unless ``--no-chown``); device nodes are
created only as root (skipped with a warning otherwise); extended attributes are not
applied. Directory modes and times are set at the end, so read-only directories don't
block later layers.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .digest import Digest
from .errors import DigestMismatch, ManifestError, PullerError, StoreError
from .fsutil import write_all
from .store import ContentStore

if TYPE_CHECKING:
    from .inventory import StoredImage

__all__ = ["unpack", "UnpackError", "UnpackReport", "unpack_command", "layer_diff_ids"]

_CHUNK = 1 << 20
_MAX_SYMLINKS = 40
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class UnpackError(PullerError):
    """A layer that can't be applied safely (a path escaping DIR, a bad link, ...)."""


class _UnusableTarget(UnpackError):
    """DIR can't be used (not a directory, not empty, ...): nothing has been written."""


@dataclass
class UnpackReport:
    layers: int = 0
    entries: int = 0
    warnings: list[str] = field(default_factory=list)


# -- streams -------------------------------------------------------------------------------


class _Hashing(io.RawIOBase):
    """Reads ``raw`` and hashes what passes; ``count`` bytes so far. Wraps the stored
    (compressed) blob for its digest, and the decompressed tar for its diff_id."""

    def __init__(self, raw: BinaryIO, algorithm: str = "sha256") -> None:
        self._raw = raw
        self._readinto = getattr(raw, "readinto", None)
        self.hasher = hashlib.new(algorithm)
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._readinto is not None:
            n = self._readinto(b) or 0
            if n:
                self.hasher.update(memoryview(b)[:n])
        else:
            data = self._raw.read(len(b))
            n = len(data)
            b[:n] = data
            self.hasher.update(data)
        self.count += n
        return n

    def finish(self) -> None:
        """Read and hash whatever is left (trailing bytes, tar padding)."""
        while True:
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                return
            self.hasher.update(chunk)
            self.count += len(chunk)


def _zstd_reader(source: BinaryIO) -> tuple[BinaryIO, Any]:
    """A decompressed stream of ``source`` and a closer that reports errors."""
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)

        def close_lib() -> None:
            reader.close()

        return reader, close_lib  # type: ignore[return-value]
    exe = shutil.which("zstd")
    if exe is None:
        raise UnpackError("zstd layer: install the `zstandard` Python package or the `zstd` "
                          "program")
    proc = subprocess.Popen([exe, "-d", "-c", "-q"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    feed_error: list[BaseException] = []

    def feed() -> None:
        assert proc.stdin is not None
        try:
            while chunk := source.read(_CHUNK):
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            feed_error.append(exc)
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    t = threading.Thread(target=feed, daemon=True)
    t.start()

    def close_proc() -> None:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        t.join()
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        proc.stderr.close()
        if proc.wait() != 0:
            raise UnpackError(f"zstd failed: {err[-1] if err else proc.returncode}")
        if feed_error:
            raise feed_error[0]

    assert proc.stdout is not None
    return proc.stdout, close_proc  # type: ignore[return-value]


# -- safe paths ----------------------------------------------------------------------------


def _clean(name: str) -> list[str]:
    """Member name -> components inside DIR; refuses ``..``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnpackError(f"layer entry {name[:200]!r} climbs out with '..'")
    return parts


class _Root:
    """DIR, with paths resolved as if it were ``/`` and directories opened without
    following links."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)

    def close(self) -> None:
        os.close(self.fd)

    def resolve(self, parts: list[str]) -> list[str]:
        """Resolve the directory components of ``parts`` (not the last one) inside the
        root: symlinks are followed as if the root were ``/``. Returns real components."""
        todo = list(parts[:-1])
        done: list[str] = []
        links = 0
        while todo:
            comp = todo.pop(0)
            if comp in ("", "."):
                continue
            if comp == "..":
                if done:
                    done.pop()
                continue
            st = self._lstat(done, comp)
            if st is not None and stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_SYMLINKS:
                    raise UnpackError(f"too many levels of symbolic links in "
                                      f"{'/'.join(parts)[:200]!r}")
                target = self._readlink(done, comp)
                if target.startswith("/"):
                    done = []
                todo = [p for p in target.split("/") if p] + todo
                continue
            done.append(comp)
        return done + parts[-1:]

    def _lstat(self, comps: list[str], name: str) -> os.stat_result | None:
        try:
            fd = self.open_dir(comps, create=False)
        except OSError:
            return None
        try:
            return os.lstat(name, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _readlink(self, comps: list[str], name: str) -> str:
        fd = self.open_dir(comps, create=False)
        try:
            return os.readlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    def open_dir(self, comps: list[str], *, create: bool, mode: int = 0o755) -> int:
        """Open DIR/comps with O_NOFOLLOW at every step (creating missing directories);
        a component that isn't a real directory is refused."""
        fd = os.dup(self.fd)
        try:
            for c in comps:
                try:
                    nfd = os.open(c, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(c, mode | 0o700, dir_fd=fd)
                    nfd = os.open(c, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        if not create:
                            raise
                        # A file (or a link left after resolution) where a directory must be:
                        # replace it, as tar and docker do.
                        os.unlink(c, dir_fd=fd)
                        os.mkdir(c, mode | 0o700, dir_fd=fd)
                        nfd = os.open(c, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                      dir_fd=fd)
                    else:
                        raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise


def _remove(dir_fd: int, name: str) -> None:
    """Remove ``name`` (a file, link or whole tree) under ``dir_fd``; never follows links."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o700)
            for child in os.listdir(fd):
                _remove(fd, child)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


# -- applying layers -------------------------------------------------------------------------


class _Applier:
    def __init__(self, root: _Root, *, chown: bool, report: UnpackReport) -> None:
        self.root = root
        self.chown = chown
        self.report = report
        self.dir_meta: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self.is_root = os.geteuid() == 0

    def apply(self, tf: tarfile.TarFile) -> None:
        layer_paths: set[tuple[str, ...]] = set()
        for m in tf:
            self.report.entries += 1
            parts = _clean(m.name)
            if not parts:  # the root directory itself
                if m.isdir():
                    self.dir_meta[()] = m
                continue
            base = parts[-1]
            if base.startswith(WHITEOUT):
                self._whiteout(parts, layer_paths)
                continue
            real = self.root.resolve(parts)
            for i in range(1, len(real) + 1):
                layer_paths.add(tuple(real[:i]))
            parent = self.root.open_dir(real[:-1], create=True)
            try:
                self._entry(tf, m, parent, real)
            finally:
                os.close(parent)

    def _whiteout(self, parts: list[str], layer_paths: set[tuple[str, ...]]) -> None:
        real = self.root.resolve(parts)
        dir_comps, base = real[:-1], real[-1]
        try:
            fd = self.root.open_dir(dir_comps, create=False)
        except (FileNotFoundError, NotADirectoryError, OSError):
            return  # nothing below to hide
        try:
            if base == OPAQUE:
                for child in os.listdir(fd):
                    if tuple(dir_comps + [child]) not in layer_paths:
                        _remove(fd, child)
                        self._forget(tuple(dir_comps + [child]))
            else:
                target = base[len(WHITEOUT):]
                if not target or target in (".", ".."):
                    raise UnpackError(f"invalid whiteout {'/'.join(parts)!r}")
                if tuple(dir_comps + [target]) not in layer_paths:
                    _remove(fd, target)
                    self._forget(tuple(dir_comps + [target]))
        finally:
            os.close(fd)

    def _forget(self, prefix: tuple[str, ...]) -> None:
        for k in [k for k in self.dir_meta if k[:len(prefix)] == prefix]:
            del self.dir_meta[k]

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parent: int,
               real: list[str]) -> None:
        name = real[-1]
        key = tuple(real)
        try:
            existing = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            existing = None
        if m.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                os.unlink(name, dir_fd=parent)
                existing = None
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=parent)
            else:
                os.chmod(name, stat.S_IMODE(existing.st_mode) | 0o700, dir_fd=parent,
                         follow_symlinks=False)
            self.dir_meta[key] = m
            return
        if existing is not None:
            _remove(parent, name)
            self._forget(key)
        if m.isreg():
            self._file(tf, m, parent, name)
        elif m.issym():
            os.symlink(m.linkname, name, dir_fd=parent)
            self._owner(parent, name, m)
            self._times(parent, name, m)
        elif m.islnk():
            self._hardlink(m, parent, name)
        elif m.isfifo():
            os.mkfifo(name, stat.S_IMODE(m.mode), dir_fd=parent)
            self._meta(parent, name, m)
        elif m.ischr() or m.isblk():
            if not self.is_root:
                self.report.warnings.append(f"skipped device node /{'/'.join(real)} (not root)")
                return
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(name, kind | stat.S_IMODE(m.mode), os.makedev(m.devmajor, m.devminor),
                     dir_fd=parent)
            self._meta(parent, name, m)
        else:
            self.report.warnings.append(f"skipped /{'/'.join(real)}: unsupported tar type "
                                        f"{m.type!r}")

    def _file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parent: int, name: str) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=parent)
        try:
            src = tf.extractfile(m)
            if src is not None:
                while chunk := src.read(_CHUNK):
                    write_all(fd, chunk)
            if self.chown and self.is_root:
                os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, stat.S_IMODE(m.mode))
            os.utime(fd, (m.mtime, m.mtime))
        finally:
            os.close(fd)

    def _hardlink(self, m: tarfile.TarInfo, parent: int, name: str) -> None:
        target = _clean(m.linkname)
        if not target:
            raise UnpackError(f"hard link {m.name[:200]!r} points at the root directory")
        real = self.root.resolve(target)
        try:
            tfd = self.root.open_dir(real[:-1], create=False)
        except OSError:
            raise UnpackError(f"hard link {m.name[:200]!r} -> {m.linkname[:200]!r}: "
                              "target is not in the image") from None
        try:
            st = os.lstat(real[-1], dir_fd=tfd)
            if stat.S_ISDIR(st.st_mode):
                raise UnpackError(f"hard link {m.name[:200]!r} points at a directory")
            os.link(real[-1], name, src_dir_fd=tfd, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise UnpackError(f"hard link {m.name[:200]!r} -> {m.linkname[:200]!r}: "
                              "target is not in the image") from None
        finally:
            os.close(tfd)

    def _owner(self, parent: int, name: str, m: tarfile.TarInfo) -> None:
        if self.chown and self.is_root:
            os.chown(name, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)

    def _times(self, parent: int, name: str, m: tarfile.TarInfo) -> None:
        try:
            os.utime(name, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
        except (OSError, NotImplementedError):
            pass

    def _meta(self, parent: int, name: str, m: tarfile.TarInfo) -> None:
        self._owner(parent, name, m)
        os.chmod(name, stat.S_IMODE(m.mode), dir_fd=parent, follow_symlinks=False)
        self._times(parent, name, m)

    def finish(self) -> None:
        """Directory ownership, modes and times, deepest first."""
        for key in sorted(self.dir_meta, key=len, reverse=True):
            m = self.dir_meta[key]
            comps = list(key)
            try:
                fd = self.root.open_dir(comps, create=False)
            except OSError:
                continue
            try:
                if self.chown and self.is_root:
                    os.fchown(fd, m.uid, m.gid)
                os.fchmod(fd, stat.S_IMODE(m.mode))
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)


def _apply_layer(s: ContentStore, applier: _Applier, layer: Digest, size: int,
                 diff_id: str | None) -> None:
    from .inventory import open_blob

    with open_blob(s, layer) as f:
        if os.fstat(f.fileno()).st_size != size:
            raise StoreError(f"layer {layer} in the store is not {size} bytes (run `puller fsck`)")
        src = _Hashing(f, layer.algorithm)
        head = f.read(4)
        src.hasher.update(head)
        src.count += len(head)
        joined: BinaryIO = io.BufferedReader(_Chain(head, src), _CHUNK)  # type: ignore[arg-type]
        closer = None
        if head.startswith(_GZIP_MAGIC):
            import gzip

            stream: BinaryIO = gzip.GzipFile(fileobj=joined, mode="rb")  # type: ignore[assignment]
        elif head.startswith(_ZSTD_MAGIC):
            stream, closer = _zstd_reader(joined)
        else:
            stream = joined
        tar_hash = _Hashing(stream)
        try:
            with tarfile.open(fileobj=io.BufferedReader(tar_hash, _CHUNK), mode="r|",
                              errorlevel=2) as tf:
                applier.apply(tf)
            tar_hash.finish()  # tar padding after the end-of-archive blocks counts too
        except BaseException as exc:
            if closer is not None:
                try:
                    closer()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
            if isinstance(exc, (PullerError, KeyboardInterrupt)) or (
                    isinstance(exc, OSError) and exc.errno is not None):
                raise
            if isinstance(exc, Exception):
                detail = " ".join(str(exc).split())[:200] or type(exc).__name__
                raise UnpackError(f"layer {layer} can't be read: {detail}") from None
            raise
        if closer is not None:
            closer()
        src.finish()
    if src.hasher.hexdigest() != layer.hex:
        raise DigestMismatch(f"layer {layer} in the store is corrupt (run `puller fsck`)")
    if diff_id is not None and f"sha256:{tar_hash.hasher.hexdigest()}" != diff_id:
        raise DigestMismatch(f"layer {layer} uncompresses to sha256:"
                             f"{tar_hash.hasher.hexdigest()}, the config says {diff_id}")


class _Chain(io.RawIOBase):
    """``head`` then the rest of ``rest``."""

    def __init__(self, head: bytes, rest: io.RawIOBase) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._rest.readinto(b) or 0


def layer_diff_ids(img: StoredImage, name: str) -> list[str]:
    """The ``rootfs.diff_ids`` of ``img``'s config, one per layer of its manifest.

    Refused (ManifestError, StoreError when the config isn't stored): a config that is
    not a JSON object, a ``rootfs.diff_ids`` that is missing or not a list of digests, and
    a count of diff_ids that differs from the count of layers (a layer without its
    diff_id could not be checked)."""
    cfg = img.manifest.config.digest
    if img.config_bytes is None:
        raise StoreError(f"config {cfg} of {name} is not in the store (pull it again)")
    what = f"image config {cfg} of {name}"
    try:
        doc = json.loads(img.config_bytes)
    except (ValueError, RecursionError):
        raise ManifestError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{what} is not a JSON object")
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ManifestError(f"{what} has no rootfs.diff_ids list")
    for i, d in enumerate(diff_ids):
        try:
            Digest.parse(d)
        except PullerError as exc:
            raise ManifestError(f"{what}: rootfs.diff_ids[{i}]: {exc}") from None
    layers = len(img.manifest.layers)
    if len(diff_ids) != layers:
        raise ManifestError(f"{what} lists {len(diff_ids)} diff_ids for {layers} layers")
    return list(diff_ids)


def unpack(store: ContentStore, ref: str, directory: str | os.PathLike[str], *,
           platform: Any = None, chown: bool = True) -> UnpackReport:
    """Extract the root filesystem of ``ref`` into ``directory`` (created; must be empty).

    The image is checked (config, diff_ids, layers present) and DIR is checked before
    anything is written; those errors leave DIR as it was. An error while layers are
    applied leaves DIR incomplete."""
    from .inventory import choose_image, find

    if not os.fspath(directory):
        raise _UnusableTarget("the directory name is empty")
    entry = find(store, ref)
    img = choose_image(store, entry, platform)
    layers = img.manifest.layers
    diff_ids = layer_diff_ids(img, entry.name)
    for d in layers:
        if not store.has(d.digest, d.size):
            raise StoreError(f"layer {d.digest} of {entry.name} is not in the store "
                             "(pull it again)")
    target = Path(directory)
    try:
        target.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or not target.is_dir():
            raise _UnusableTarget(f"{target} is not a directory")
        if any(target.iterdir()):
            raise _UnusableTarget(f"{target} is not empty")
    except OSError as exc:
        raise _UnusableTarget(f"cannot use {target}: {exc.strerror}") from None
    report = UnpackReport()
    root = _Root(target)
    try:
        applier = _Applier(root, chown=chown, report=report)
        for d, diff_id in zip(layers, diff_ids, strict=True):
            _apply_layer(store, applier, d.digest, d.size, diff_id)
            report.layers += 1
        applier.finish()
    finally:
        root.close()
    return report


def unpack_command(args: argparse.Namespace) -> int:
    from .inventory import parse_platform, store_for

    if not args.dir:
        print("puller: unpack: the directory name is empty", file=sys.stderr)
        return 2
    platform = parse_platform(args.platform)
    s = store_for(args.store)
    try:
        report = unpack(s, args.ref, args.dir, platform=platform, chown=not args.no_chown)
    except _UnusableTarget as exc:
        print(f"puller: {exc} (nothing was written)", file=sys.stderr)
        return 1
    except (UnpackError, DigestMismatch) as exc:
        print(f"puller: {exc} ({args.dir} is left incomplete)", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a quota, ...: while writing into DIR
        what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        print(f"puller: cannot unpack into {args.dir}: {what} ({args.dir} is left "
              "incomplete)", file=sys.stderr)
        return 1
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"unpacked {report.layers} layers ({report.entries} entries) into {args.dir}")
    return 0
