"""Reading what the store holds: ``puller images``, ``inspect``, ``rmi`` and ``du``.

Also the shared model the other store commands (``save``, ``unpack``, ``serve``) use:
:func:`entries` lists the ``index.json`` entries (:func:`parse_entry` checks one),
:func:`find` resolves a reference given on the command line to one of them,
:func:`images_of` lists the platform images of an entry that are present in the store,
and :func:`choose_image` picks one of them.

Every read goes through :class:`~puller.store.ContentStore`: digests are parsed with
:meth:`Digest.parse` before they become paths, files are opened with ``O_NOFOLLOW``, and
small blobs (manifests, configs) are re-verified on every read. Big blobs are opened with
:func:`open_blob` and verified by whoever streams them.

"Pulled at" is the entry's ``io.puller.pulled-at`` annotation (RFC 3339) when a pull
recorded one, else the modification time of the stored top manifest (when it first
entered the store).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from . import mediatypes
from .digest import Digest
from .errors import InvalidDigest, PullerError, StoreError
from .manifest import MAX_MANIFEST_SIZE, Descriptor, ImageIndex, ImageManifest, parse_manifest
from .platform import Platform, is_unknown, select
from .reference import Reference
from .store import ContentStore, default_store_path, entry_ref_name, partial_bytes

__all__ = ["Entry", "StoredImage", "entries", "parse_entry", "find", "images_of", "choose_image",
           "open_blob", "read_manifest", "PULLED_AT", "NoSuchImage"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Index entry annotation a pull may record: when the entry was written (RFC 3339, UTC).
PULLED_AT = "io.puller.pulled-at"
_MAX_CONFIG = 16 * 1024 * 1024


class NoSuchImage(PullerError):
    """The store has no entry for the reference given."""


@dataclass(frozen=True)
class Entry:
    """One ``index.json`` entry."""

    name: str  # the normalised reference (org.opencontainers.image.ref.name)
    descriptor: Descriptor
    raw: dict[str, Any]

    @property
    def reference(self) -> Reference | None:
        try:
            return Reference.parse(self.name)
        except PullerError:
            return None


@dataclass
class StoredImage:
    """One platform image of an entry whose manifest is in the store."""

    descriptor: Descriptor  # of the image manifest (from the index, or the entry itself)
    manifest_bytes: bytes
    manifest: ImageManifest
    platform: Platform | None  # from the index entry, else from the config
    config_bytes: bytes | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> Digest:
        return self.descriptor.digest

    def blobs(self) -> list[Descriptor]:
        return [self.manifest.config, *self.manifest.layers]


def store_for(path: str | os.PathLike[str] | None) -> ContentStore:
    """The store at ``path`` (default location when None); refuses one that isn't there."""
    s = ContentStore(Path(path).expanduser() if path else default_store_path())
    if not (s.root / "index.json").is_file() or not (s.root / "oci-layout").is_file():
        raise StoreError(f"no store at {s.root} (pull an image first, or pass --store)")
    return s


def parse_entry(raw: object) -> tuple[Descriptor, str | None]:
    """Check one ``index.json`` entry: (its descriptor, its reference name, or None for an
    entry without one). Raises :class:`~puller.errors.ManifestError` saying what is wrong:
    not a JSON object, ``mediaType``, ``digest`` or ``size`` missing or of the wrong type,
    a digest that isn't canonical (``sha256:`` and 64 lower-case hex digits), annotations
    that aren't an object of strings (so also a reference name that isn't a string), ...
    ``entries`` skips such entries; ``puller fsck`` reports them and ``puller gc`` refuses
    to run while one is there."""
    desc = Descriptor.from_json(raw)
    ann = desc.annotations
    return desc, (ann.get(mediatypes.ANNOTATION_REF_NAME) if ann is not None else None)


def entries(s: ContentStore) -> list[Entry]:
    """The named entries of ``index.json`` (malformed ones, see :func:`parse_entry`, and
    unnamed ones are skipped)."""
    out = []
    for raw in s.read_index():
        try:
            desc, name = parse_entry(raw)
        except PullerError:
            continue
        if name is not None:
            out.append(Entry(name=name, descriptor=desc, raw=raw))
    return out


def find(s: ContentStore, text: str) -> Entry:
    """The entry ``text`` names: a reference (normalised like ``docker pull``), the
    exact stored name, or the full digest of an entry (``sha256:…``)."""
    all_entries = entries(s)
    for e in all_entries:
        if e.name == text:
            return e
    if text.startswith(("sha256:", "sha512:")):
        try:
            d = Digest.parse(text)
        except InvalidDigest as exc:
            raise NoSuchImage(str(exc)) from None
        matches = [e for e in all_entries if e.descriptor.digest == d]
        if matches:
            return matches[0]
        raise NoSuchImage(f"no image with digest {d} in the store")
    ref = Reference.parse(text)  # InvalidReference is a usage error for the caller
    name = str(ref)
    for e in all_entries:
        if e.name == name:
            return e
    if ref.digest is not None:  # name@digest: any entry of that repository with that digest
        for e in all_entries:
            r = e.reference
            if r is not None and r.name == ref.name and e.descriptor.digest == ref.digest:
                return e
    raise NoSuchImage(f"no such image in the store: {name}")


def open_blob(s: ContentStore, digest: Digest) -> BinaryIO:
    """Open a stored blob for streaming, never through a symlink. The caller verifies."""
    path = s.blob_path(digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise StoreError(f"blob {digest} is not in the store (pulled for another "
                         f"platform, or removed: pull the image again)") from None
    except OSError as exc:
        raise StoreError(f"cannot open blob {digest}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"blob {digest} in the store is not a regular file")
    return os.fdopen(fd, "rb", buffering=0)


def read_manifest(s: ContentStore, digest: Digest) -> bytes:
    return s.read(digest, max_size=MAX_MANIFEST_SIZE)


def _platform_of_config(config: dict[str, Any]) -> Platform | None:
    if not config.get("os") or not config.get("architecture"):
        return None
    try:
        return Platform.from_json({k: config[k] for k in ("os", "architecture", "variant")
                                   if isinstance(config.get(k), str) and config[k]})
    except (PullerError, TypeError, ValueError):
        return None


def load_image(s: ContentStore, desc: Descriptor, *, with_config: bool = True) -> StoredImage:
    data = read_manifest(s, desc.digest)
    m = parse_manifest(data, desc.media_type)
    if not isinstance(m, ImageManifest):
        raise StoreError(f"{desc.digest} is an index inside an index (not supported)")
    img = StoredImage(descriptor=desc, manifest_bytes=data, manifest=m, platform=desc.platform)
    if with_config and s.has(m.config.digest):
        img.config_bytes = s.read(m.config.digest, max_size=_MAX_CONFIG)
        try:
            doc = json.loads(img.config_bytes)
            img.config = doc if isinstance(doc, dict) else {}
        except ValueError:
            img.config = {}
        if img.platform is None:
            img.platform = _platform_of_config(img.config)
    return img


def top_manifest(s: ContentStore, e: Entry) -> tuple[bytes, ImageManifest | ImageIndex]:
    data = read_manifest(s, e.descriptor.digest)
    return data, parse_manifest(data, e.descriptor.media_type)


def images_of(s: ContentStore, e: Entry, *, with_config: bool = True) -> list[StoredImage]:
    """The platform images of ``e`` whose manifests are in the store (for an index, the
    platforms that were pulled; attestations left out)."""
    _, top = top_manifest(s, e)
    if isinstance(top, ImageManifest):
        return [load_image(s, e.descriptor, with_config=with_config)]
    out = []
    for d in top.images():
        if d.media_type in mediatypes.IMAGE_MANIFESTS and s.has(d.digest, d.size):
            out.append(load_image(s, d, with_config=with_config))
    return out


def choose_image(s: ContentStore, e: Entry, platform: Platform | None) -> StoredImage:
    """One image of ``e``: the one for ``platform``; without one, the only image present,
    else the one for this host."""
    present = images_of(s, e)
    if not present:
        raise StoreError(f"{e.name}: none of its images is in the store (pull it again)")
    if platform is None:
        if len(present) == 1:
            return present[0]
        platform = Platform.host()
    usable = [(i.platform, i) for i in present if i.platform is None or not is_unknown(i.platform)]
    return select(usable, platform)


def blob_size_on_disk(s: ContentStore, digest: Digest) -> int | None:
    try:
        st = os.lstat(s.blob_path(digest))
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def reachable(s: ContentStore, e: Entry) -> dict[Digest, int]:
    """Digest -> size of every blob of ``e`` that is in the store (manifests included)."""
    out: dict[Digest, int] = {}
    top = e.descriptor
    if blob_size_on_disk(s, top.digest) is None:
        return out
    out[top.digest] = top.size
    try:
        imgs = images_of(s, e, with_config=False)
    except PullerError:
        return out
    for img in imgs:
        out[img.digest] = img.descriptor.size
        for b in img.blobs():
            if s.has(b.digest, b.size):
                out[b.digest] = b.size
    return out


def pulled_at(s: ContentStore, e: Entry) -> _dt.datetime | None:
    value = e.descriptor.annotations.get(PULLED_AT) if e.descriptor.annotations else None
    if value is not None:
        try:
            t = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)
        except ValueError:
            pass
    try:
        st = os.lstat(s.blob_path(e.descriptor.digest))
    except OSError:
        return None
    return _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc)


# -- formatting ----------------------------------------------------------------------------


def human_size(n: int) -> str:
    """docker's sizes: decimal units, three significant digits (``7.8MB``)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.3g}{unit}"
        value /= 1000
    return f"{n}B"  # pragma: no cover


def _ago(t: _dt.datetime | None, now: _dt.datetime) -> str:
    if t is None:
        return "unknown"
    secs = (now - t).total_seconds()
    if secs < 1:
        return "Less than a second ago"
    for limit, div, unit in ((60, 1, "second"), (3600, 60, "minute"), (86400 * 2, 3600, "hour"),
                             (86400 * 14, 86400, "day"), (86400 * 60, 86400 * 7, "week"),
                             (86400 * 365 * 2, 86400 * 30, "month")):
        if secs < limit:
            n = int(secs // div)
            count = "About a" if n == 1 and unit == "hour" else str(n)
            return f"{count} {unit}{'s' if n != 1 else ''} ago"
    return f"{int(secs // (86400 * 365))} years ago"


def _iso(t: _dt.datetime | None) -> str | None:
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        lines.append("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _print(text: str) -> None:
    print(text, flush=True)


def _json(obj: Any) -> None:
    _print(json.dumps(obj, separators=(",", ":")))


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"puller: {message}", file=sys.stderr)
    return code


def parse_platform(text: str | None) -> Platform | None:
    return Platform.parse(text) if text else None


# -- images --------------------------------------------------------------------------------


def image_rows(s: ContentStore) -> list[dict[str, Any]]:
    rows = []
    for e in entries(s):
        row: dict[str, Any] = {"reference": e.name, "digest": str(e.descriptor.digest),
                               "mediaType": e.descriptor.media_type}
        try:
            imgs = images_of(s, e)
            row["platforms"] = [str(i.platform) if i.platform else None for i in imgs]
            blobs: dict[Digest, int] = {}
            for i in imgs:
                for b in i.blobs():
                    blobs[b.digest] = b.size
            row["size"] = sum(blobs.values())
            row["complete"] = bool(imgs) and all(s.has(d, n) for d, n in blobs.items())
        except PullerError as exc:
            row.update(platforms=[], size=0, complete=False, error=str(exc))
        t = pulled_at(s, e)
        row["pulledAt"] = _iso(t)
        row["_t"] = t
        rows.append(row)
    rows.sort(key=lambda r: r["reference"])
    return rows


def _images_command(args: argparse.Namespace) -> int:
    s = store_for(args.store)
    rows = image_rows(s)
    if args.pattern:
        pats = [args.pattern]
        try:
            pats.append(str(Reference.parse(args.pattern)))
        except PullerError:
            pass
        rows = [r for r in rows if any(fnmatch.fnmatchcase(r["reference"], p)
                                       or fnmatch.fnmatchcase(r["reference"], p + ":*")
                                       or fnmatch.fnmatchcase(r["reference"], p + "@*")
                                       for p in pats)]
    if args.quiet:
        for r in rows:
            _print(r["reference"])
        return EXIT_OK
    if args.json:
        for r in rows:
            r.pop("_t")
            _json(r)
        return EXIT_OK
    now = _dt.datetime.now(_dt.timezone.utc)
    table = [["REFERENCE", "DIGEST", "PLATFORM", "SIZE", "PULLED"]]
    for r in rows:
        digest = r["digest"] if args.no_trunc else r["digest"][:19]
        names = [p or "-" for p in r["platforms"]]
        if len(names) > _PLATFORMS_SHOWN and not args.no_trunc:  # --json/--no-trunc: all
            names = names[:_PLATFORMS_SHOWN - 1] + [f"+{len(names) - _PLATFORMS_SHOWN + 1}"]
        plats = ",".join(names) or "-"
        size = human_size(r["size"]) + ("" if r["complete"] else " (incomplete)")
        table.append([r["reference"], digest, plats, size, _ago(r["_t"], now)])
    _print(_table(table))
    return EXIT_OK


#: An entry holding more platforms than this shows the first few and "+N" (a pull
#: with --all-platforms of a big index would otherwise make one very wide cell).
_PLATFORMS_SHOWN = 3


# -- inspect -------------------------------------------------------------------------------


def inspect_doc(s: ContentStore, e: Entry) -> dict[str, Any]:
    _, top = top_manifest(s, e)
    doc: dict[str, Any] = {
        "reference": e.name, "digest": str(e.descriptor.digest),
        "mediaType": e.descriptor.media_type, "size": e.descriptor.size,
        "pulledAt": _iso(pulled_at(s, e)),
    }
    if isinstance(top, ImageIndex):
        doc["manifests"] = [dict(d.to_json(), present=s.has(d.digest, d.size))
                            for d in top.manifests]
    images = []
    for img in images_of(s, e):
        images.append({
            "digest": str(img.digest), "mediaType": img.manifest.media_type,
            "platform": str(img.platform) if img.platform else None,
            "config": dict(img.manifest.config.to_json(), present=img.config_bytes is not None),
            "layers": [dict(b.to_json(), present=s.has(b.digest, b.size))
                       for b in img.manifest.layers],
            "size": sum(b.size for b in img.blobs()),
            "created": img.config.get("created"),
            "imageConfig": img.config.get("config"),
            "rootfs": img.config.get("rootfs"),
            "history": img.config.get("history"),
        })
    doc["images"] = images
    return doc


def _inspect_command(args: argparse.Namespace) -> int:
    s = store_for(args.store)
    e = find(s, args.ref)
    if args.raw or args.config:
        if args.config or args.platform:
            img = choose_image(s, e, parse_platform(args.platform))
            data = img.manifest_bytes if not args.config else img.config_bytes
            if data is None:
                raise StoreError(f"config {img.manifest.config.digest} is not in the store")
        else:
            data = read_manifest(s, e.descriptor.digest)
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            pass
        return EXIT_OK
    _print(json.dumps(inspect_doc(s, e), indent=2))
    return EXIT_OK


# -- rmi -----------------------------------------------------------------------------------


def remove(s: ContentStore, names: Iterable[str]) -> list[str]:
    """Drop the index entries named ``names`` (exact stored names); returns those removed."""
    wanted = set(names)
    removed: list[str] = []

    def change(current: list[dict[str, Any]]) -> list[dict[str, Any]]:
        removed.clear()
        kept = []
        for raw in current:
            name = entry_ref_name(raw)
            if name is not None and name in wanted:
                removed.append(name)
            else:
                kept.append(raw)
        return kept

    s.update_index(change)
    return removed


def _rmi_command(args: argparse.Namespace) -> int:
    s = store_for(args.store)
    names, failed = [], False
    for text in args.refs:
        try:
            names.append(find(s, text).name)
        except NoSuchImage as exc:
            failed = True
            print(f"puller: {exc}", file=sys.stderr)
    removed = set(remove(s, names)) if names else set()
    for name in dict.fromkeys(names):  # in the order given
        if name in removed:
            _print(f"Untagged: {name}")
    if names and not args.quiet:
        _print("Blobs no other image uses are removed by the next `puller gc`.")
    return EXIT_FAILED if failed else EXIT_OK


# -- du ------------------------------------------------------------------------------------


def du(s: ContentStore) -> dict[str, Any]:
    """Per-entry sizes split into bytes only that entry uses and bytes it shares."""
    per: dict[str, dict[Digest, int]] = {e.name: reachable(s, e) for e in entries(s)}
    users: dict[Digest, int] = {}
    for blobs in per.values():
        for d in blobs:
            users[d] = users.get(d, 0) + 1
    sizes: dict[Digest, int] = {}
    for blobs in per.values():
        sizes.update(blobs)
    images = []
    for name in sorted(per):
        blobs = per[name]
        unique = sum(n for d, n in blobs.items() if users[d] == 1)
        total = sum(blobs.values())
        images.append({"reference": name, "size": total, "unique": unique,
                       "shared": total - unique})
    on_disk = 0
    count = 0
    unreferenced = 0
    blobs_dir = s.root / "blobs"
    for algo in sorted(os.listdir(blobs_dir)) if blobs_dir.is_dir() else []:
        adir = blobs_dir / algo
        if adir.is_symlink() or not adir.is_dir():
            continue
        with os.scandir(adir) as it:
            for de in it:
                if not de.is_file(follow_symlinks=False):
                    continue
                n = de.stat(follow_symlinks=False).st_size
                on_disk += n
                count += 1
                try:
                    d = Digest(algo, de.name)
                except PullerError:
                    d = None
                if d is None or d not in users:
                    unreferenced += n
    partial = 0
    ingest = s.root / "ingest"
    if ingest.is_dir() and not ingest.is_symlink():
        with os.scandir(ingest) as it:
            for de in it:
                partial += partial_bytes(de) or 0
    referenced = sum(sizes.values())
    shared = sum(n for d, n in sizes.items() if users[d] > 1)
    return {"store": str(s.root), "images": images, "blobs": count, "total": on_disk,
            "referenced": referenced, "shared": shared, "unique": referenced - shared,
            "unreferenced": unreferenced, "partial": partial}


def _du_command(args: argparse.Namespace) -> int:
    s = store_for(args.store)
    report = du(s)
    if args.json:
        _json(report)
        return EXIT_OK
    h = human_size
    table = [["REFERENCE", "SIZE", "UNIQUE", "SHARED"]]
    for i in report["images"]:
        table.append([i["reference"], h(i["size"]), h(i["unique"]), h(i["shared"])])
    if len(table) > 1:
        _print(_table(table))
        _print("")
    _print(f"{report['blobs']} blobs, {h(report['total'])} in {report['store']}: "
           f"{h(report['unique'])} used by one image, {h(report['shared'])} shared, "
           f"{h(report['unreferenced'])} unreferenced (freed by `puller gc`)")
    if report["partial"]:
        _print(f"{h(report['partial'])} in partial downloads")
    return EXIT_OK
