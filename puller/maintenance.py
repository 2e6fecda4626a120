"""Store maintenance: ``puller fsck`` checks (and repairs) the store, ``puller gc`` cleans it.

Library use::

    from puller.maintenance import fsck, gc
    report = fsck("./cache", repair=True)      # FsckReport; report.ok is True when clean
    freed = gc("./cache")                      # GcReport: what was removed, bytes freed

What fsck checks
----------------
* Every file under ``blobs/`` is re-hashed (streamed, a few threads) and must be a regular
  file (never a symlink) whose name is a valid digest of its bytes.
* ``index.json`` must be there (when ``blobs/`` is) and be an OCI index, and every entry
  must be a valid descriptor (:func:`puller.inventory.parse_entry`: an object with a
  ``mediaType``, a canonical ``digest`` and an integer ``size``, annotations that are
  strings, ...).
* Every ``index.json`` entry must be *complete*: its manifest is present and intact and
  parses; for an image manifest, its config and every layer are present and intact
  (foreign layers that name ``urls`` may be absent: puller skips them unless asked);
  for an index, **at least one** image entry (attestations don't count) is present and
  complete, recursively. Only the chosen platforms of an index are pulled, so children
  that were never pulled are normal and not a problem.
* ``ingest/`` holds partial downloads. They are reported but are not problems: the next
  pull of that blob resumes them, and ``puller gc`` removes the ones nobody is writing.

``--repair`` removes corrupt, misnamed and symlinked blobs and then every entry that is
not valid or not complete, while no pull runs (see :meth:`ContentStore.exclusive`). A
missing or unreadable ``index.json`` is never repaired: only its owner knows what it held.

What gc removes
---------------
Blobs no index entry reaches (entry -> manifest -> config and layers; index -> every
child it lists), partial downloads nobody holds the lock of, and temporary files a crash
left next to ``index.json``. It holds the store exclusively while it works: running pulls
are waited for (``--wait``), and pulls that start meanwhile wait for gc, so a blob that a
pull has stored or found present is always named in ``index.json`` before gc can look.

gc removes nothing at all when it can't be sure what is in use: when ``index.json`` is
missing (while ``blobs/`` is there) or unreadable, when any of its entries is not a
valid descriptor, or when a manifest in use can't be read or parsed. It says so on one
line and fails; ``puller fsck`` shows the problem (and ``--repair`` drops the entry).

``add_parsers(sub)`` registers both subcommands on the command line; importing this
module stays cheap (no aiohttp).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

from .digest import ALGORITHMS, Digest
from .errors import PullerError, StoreError
from .inventory import parse_entry
from .manifest import MAX_MANIFEST_SIZE, Descriptor, ImageIndex, parse_manifest
from .record import Record
from .store import (SEGMENTS_SUFFIX, ContentStore, clear_legacy_partial, default_store_path,
                    entry_ref_name, partial_bytes)

__all__ = ["FsckReport", "GcReport", "Problem", "Partial", "fsck", "gc", "add_parsers"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_READ_CHUNK = 1 << 20
_REFUSE = "not collecting garbage (run `puller fsck`)"  # how gc declines
_MAX_DEPTH = 8  # nested indexes followed at most this deep
_DEFAULT_WAIT = 60.0


# -- reports -----------------------------------------------------------------------------


class Problem(Record, frozen=False):
    """One thing wrong with the store.

    ``kind``: ``corrupt`` (bytes don't hash to the name), ``misnamed`` (not a digest),
    ``symlink``, ``not-regular``, ``unexpected`` (something else under blobs/),
    ``dangling`` (an index entry that isn't complete), ``invalid-entry`` (an index entry
    that isn't a valid descriptor), ``invalid-index`` (index.json missing or unreadable),
    ``unreadable`` (a blob that could not be read).
    """

    kind: str
    path: str  # relative to the store root
    detail: str
    digest: str | None = None
    ref: str | None = None
    repaired: bool = False

    def line(self) -> str:
        what = {
            "corrupt": f"corrupt blob {self.digest}",
            "misnamed": f"misnamed file {self.path}",
            "symlink": f"symlink {self.path}",
            "not-regular": f"not a regular file: {self.path}",
            "unexpected": f"unexpected entry {self.path}",
            "dangling": f"dangling index entry {self.ref or '(unnamed)'} ({self.digest})",
            "invalid-entry": f"invalid index entry {self.ref or '(unnamed)'}",
            "invalid-index": f"invalid {self.path}",
            "unreadable": f"unreadable blob {self.path}",
        }.get(self.kind, f"{self.kind} {self.path}")
        return f"{what}: {self.detail}{' (repaired)' if self.repaired else ''}"


class Partial(Record, frozen=False):
    """A partial download in ``ingest/``."""

    path: str
    digest: str | None
    size: int
    active: bool  # some process holds its lock right now


class FsckReport(Record, frozen=False):
    store: str
    blobs: int = 0
    bytes: int = 0
    entries: int = 0
    problems: list[Problem] = []  # (lists are copied for each report)
    partials: list[Partial] = []

    @property
    def ok(self) -> bool:
        """No problem is left (partial downloads are not problems)."""
        return all(p.repaired for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        out = self.as_dict()
        out["ok"] = self.ok
        return out


class GcReport(Record, frozen=False):
    store: str
    dry_run: bool
    kept: int = 0  # blobs reachable from index.json
    blobs_removed: list[str] = []  # paths relative to the root
    blob_bytes: int = 0
    ingest_removed: list[str] = []
    ingest_bytes: int = 0
    ingest_busy: int = 0  # partial downloads left because someone holds their lock
    other_removed: list[str] = []  # temporary files
    warnings: list[str] = []

    @property
    def bytes_freed(self) -> int:
        return self.blob_bytes + self.ingest_bytes

    def to_json(self) -> dict[str, Any]:
        out = self.as_dict()
        out["bytes_freed"] = self.bytes_freed
        return out


# -- helpers -------------------------------------------------------------------------------


def _open_store(store: str | os.PathLike[str] | ContentStore) -> ContentStore:
    s = store if isinstance(store, ContentStore) else ContentStore(store)
    try:
        st = os.lstat(s.root)
    except FileNotFoundError:
        raise StoreError(f"no store at {s.root}") from None
    except OSError as exc:
        raise StoreError(f"cannot read {s.root}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode) or not (s.root / "oci-layout").is_file():
        raise StoreError(f"{s.root} is not a puller store (no oci-layout)")
    return s


def _rel(s: ContentStore, path: Path) -> str:
    return str(path.relative_to(s.root))


def _scandir(path: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            yield from sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot list {path}: {exc.strerror}") from exc


def _hash_file(path: Path, algorithm: str) -> tuple[str | None, int, str | None]:
    """(hex digest, size, error) of a regular file, read without following symlinks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        return None, 0, exc.strerror or str(exc)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, 0, "not a regular file"
        h = Digest.from_bytes(b"", algorithm).hasher()
        size = 0
        while chunk := os.read(fd, _READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size, None
    except OSError as exc:
        return None, 0, exc.strerror or str(exc)
    finally:
        os.close(fd)


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _has_blobs_dir(s: ContentStore) -> bool:
    return os.path.lexists(s.root / "blobs")


def _parse_index(entries: list[object]
                 ) -> tuple[list[tuple[object, Descriptor, str | None]],
                            list[tuple[int, object, str]]]:
    """Split ``index.json``'s entries into (entry, descriptor, name) of the valid ones and
    (position, entry, reason) of the others."""
    good, bad = [], []
    for i, entry in enumerate(entries):
        try:
            desc, name = parse_entry(entry)
        except PullerError as exc:
            bad.append((i, entry, str(exc)))
            continue
        good.append((entry, desc, name))
    return good, bad


def _lock_state(lock: Path) -> bool:
    """True when some process holds the flock on ``lock`` right now."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops our lock if we got it


def _ingest_digest(name: str) -> Digest | None:
    alg, sep, hexpart = name.partition("-")
    if not sep:
        return None
    try:
        return Digest(alg, hexpart)
    except PullerError:
        return None


# -- fsck ----------------------------------------------------------------------------------


def _scan_blobs(s: ContentStore, report: FsckReport, threads: int) -> dict[Digest, int]:
    """Re-hash every blob; returns the intact ones (digest -> size) and records problems."""
    blobs_dir = s.root / "blobs"
    good: dict[Digest, int] = {}
    to_hash: list[tuple[Digest, Path]] = []
    try:
        _check_real_dir(blobs_dir)
    except StoreError as exc:
        report.problems.append(Problem("unexpected", "blobs", str(exc)))
        return good
    for top in _scandir(blobs_dir):
        path = Path(top.path)
        if top.is_symlink():
            report.problems.append(Problem("symlink", _rel(s, path),
                                           "the store never follows symlinks"))
            continue
        if not top.is_dir(follow_symlinks=False) or top.name not in ALGORITHMS:
            report.problems.append(Problem("unexpected", _rel(s, path),
                                           "not a digest algorithm directory"))
            continue
        for e in _scandir(path):
            p = Path(e.path)
            if e.is_symlink():
                report.problems.append(Problem("symlink", _rel(s, p),
                                               "the store never follows symlinks"))
                continue
            try:
                digest = Digest(top.name, e.name)
            except PullerError:
                digest = None
            if not e.is_file(follow_symlinks=False):
                report.problems.append(Problem("not-regular", _rel(s, p),
                                               "blobs must be regular files",
                                               digest=str(digest) if digest else None))
                continue
            if digest is None:
                report.problems.append(Problem("misnamed", _rel(s, p),
                                               f"not a valid {top.name} digest"))
                continue
            to_hash.append((digest, p))

    def work(item: tuple[Digest, Path]) -> tuple[Digest, Path, str | None, int, str | None]:
        d, p = item
        return (d, p, *_hash_file(p, d.algorithm))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="puller-fsck") as pool:
        for d, p, actual, size, error in pool.map(work, to_hash):
            if error is not None:
                report.problems.append(Problem("unreadable", _rel(s, p), error, digest=str(d)))
                continue
            report.blobs += 1
            report.bytes += size
            if actual != d.hex:
                report.problems.append(Problem("corrupt", _rel(s, p),
                                               f"content hashes to {d.algorithm}:{actual}",
                                               digest=str(d)))
            else:
                good[d] = size
    return good


def _check_real_dir(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{path} is a symlink; the store never follows links")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} is not a directory")


def _why_incomplete(s: ContentStore, good: dict[Digest, int], digest: Digest,
                    size: int | None, media_type: str | None, depth: int = 0) -> str | None:
    """None when ``digest`` names a complete image or index, else the reason it isn't."""
    if digest not in good:
        return f"manifest {digest} is missing or corrupt"
    if size is not None and good[digest] != size:
        return f"manifest {digest} is {good[digest]} bytes, the entry says {size}"
    if depth > _MAX_DEPTH:
        return f"indexes nested deeper than {_MAX_DEPTH}"
    try:
        data = s.read(digest, max_size=MAX_MANIFEST_SIZE)
        parsed = parse_manifest(data, media_type)
    except PullerError as exc:
        return f"manifest {digest} can't be used: {exc}"
    if isinstance(parsed, ImageIndex):
        images = list(parsed.images())
        reasons = []  # of children that are present but broken (absent ones weren't pulled)
        for child in images:
            if child.digest not in good:
                continue
            why = _why_incomplete(s, good, child.digest, child.size, child.media_type,
                                  depth + 1)
            if why is None:
                return None
            reasons.append(why)
        if not images:
            return f"index {digest} lists no images"
        if reasons:
            return f"no image of index {digest} is complete ({reasons[0]})"
        return f"none of the {len(images)} images of index {digest} is in the store"
    for blob in (parsed.config, *parsed.layers):
        if blob.urls and blob is not parsed.config and blob.digest not in good:
            continue  # foreign layer: pulled only with --include-foreign
        if blob.digest not in good:
            role = "config" if blob is parsed.config else "layer"
            return f"{role} {blob.digest} is missing or corrupt"
        if good[blob.digest] != blob.size:
            return f"blob {blob.digest} is {good[blob.digest]} bytes, the manifest says {blob.size}"
    return None


def _scan_ingest(s: ContentStore) -> list[Partial]:
    out = []
    for e in _scandir(s.root / "ingest"):
        if e.name.endswith(SEGMENTS_SUFFIX):
            continue  # a note beside a partial, reported with it
        p = Path(e.path)
        digest = _ingest_digest(e.name)
        active = False
        if e.is_file(follow_symlinks=False):
            active = _lock_state(p)
        elif e.is_dir(follow_symlinks=False):  # the layout of older versions
            active = _lock_state(p / "lock")
        out.append(Partial(_rel(s, p), str(digest) if digest else None,
                           partial_bytes(e) or 0, active))
    return out


def fsck(store: str | os.PathLike[str] | ContentStore, *, repair: bool = False,
         threads: int | None = None, wait: float = _DEFAULT_WAIT) -> FsckReport:
    """Check every blob and index entry of ``store``; with ``repair``, remove the broken
    ones (while holding the store so no pull runs, waiting up to ``wait`` seconds for
    running pulls). Raises :class:`StoreError` when the store can't be read."""
    s = _open_store(store)
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    if repair:
        with s.exclusive(wait):
            return _fsck(s, repair=True, threads=threads)
    return _fsck(s, repair=False, threads=threads)


def _fsck(s: ContentStore, *, repair: bool, threads: int) -> FsckReport:
    report = FsckReport(store=str(s.root))
    # index.json first: everything it names was stored before it was named, so a pull
    # that runs while we scan can't make an entry look dangling.
    entries: list[object] = []
    try:
        found = s.read_index_raw()
    except StoreError as exc:
        report.problems.append(Problem("invalid-index", "index.json", str(exc)))
    else:
        if found is not None:
            entries = found
        elif _has_blobs_dir(s):
            report.problems.append(Problem(
                "invalid-index", "index.json",
                "it is missing, so nothing says which blobs are in use (restore it, or "
                "pull the images again)"))
    good = _scan_blobs(s, report, threads)
    report.partials = _scan_ingest(s)

    valid, invalid = _parse_index(entries)
    report.entries = len(entries)
    broken: list[object] = []
    for i, entry, why in invalid:
        broken.append(entry)
        report.problems.append(Problem("invalid-entry", "index.json",
                                       f"manifests[{i}]: {why}", ref=entry_ref_name(entry)))
    for entry, desc, name in valid:
        reason = _why_incomplete(s, good, desc.digest, desc.size, desc.media_type)
        if reason is not None:
            broken.append(entry)
            report.problems.append(Problem("dangling", "index.json", reason,
                                           digest=str(desc.digest), ref=name))

    if repair:
        _repair(s, report, broken)
    return report


def _repair(s: ContentStore, report: FsckReport, broken: list[object]) -> None:
    for p in report.problems:
        if p.kind in ("corrupt", "misnamed", "symlink"):
            p.repaired = _unlink(s.root / p.path)
        elif p.kind == "unexpected" and p.path.startswith("blobs/"):
            path = s.root / p.path
            if not path.is_dir() or path.is_symlink():
                p.repaired = _unlink(path)
    if broken:
        bad = {json.dumps(e, sort_keys=True) for e in broken}

        def change(current: list[Any]) -> list[Any]:
            # Matched by content: update_index reads index.json again under its lock.
            return [e for e in current if json.dumps(e, sort_keys=True) not in bad]

        s.update_index(change, everything=True)
        for p in report.problems:
            if p.kind in ("dangling", "invalid-entry"):
                p.repaired = True


# -- gc ------------------------------------------------------------------------------------


def _reachable(s: ContentStore, entries: list[Descriptor]) -> set[Digest]:
    keep: set[Digest] = set()
    todo: list[tuple[Digest, str | None, int]] = [(d.digest, d.media_type, 0)
                                                   for d in entries]
    seen: set[Digest] = set()
    while todo:  # bounded: each digest is expanded once
        d, mt, depth = todo.pop()
        keep.add(d)
        if d in seen or depth > _MAX_DEPTH or not s.has(d):
            continue
        seen.add(d)
        try:
            parsed = parse_manifest(s.read(d, max_size=MAX_MANIFEST_SIZE), mt)
        except PullerError as exc:
            # What it names can't be known: collecting now could take an image's layers
            # (in an air-gapped store, maybe their only copy) because one blob went bad.
            raise StoreError(f"manifest {d} is in use but can't be read ({exc}); "
                             f"{_REFUSE}") from None
        if isinstance(parsed, ImageIndex):
            for child in parsed.manifests:
                todo.append((child.digest, child.media_type, depth + 1))
        else:
            keep.add(parsed.config.digest)
            keep.update(layer.digest for layer in parsed.layers)
    return keep


def gc(store: str | os.PathLike[str] | ContentStore, *, dry_run: bool = False,
       wait: float = _DEFAULT_WAIT) -> GcReport:
    """Remove blobs no index entry reaches and partial downloads nobody is writing.

    Holds the store exclusively (waiting up to ``wait`` seconds for running pulls, then
    raising :class:`puller.store.StoreBusy`); ``dry_run`` only reports. Refuses to run
    (raises :class:`StoreError`, removing nothing) when index.json is missing, can't be
    read or has an entry that is not a valid descriptor, or when a manifest in use can't be
    read, since then nothing is known to be reachable."""
    s = _open_store(store)
    if dry_run:
        return _gc(s, dry_run=True)
    with s.exclusive(wait):
        return _gc(s, dry_run=False)


def _gc(s: ContentStore, *, dry_run: bool) -> GcReport:
    report = GcReport(store=str(s.root), dry_run=dry_run)
    index = s.root / "index.json"
    try:
        entries = s.read_index_raw()
    except StoreError as exc:
        raise StoreError(f"{exc}; {_REFUSE}") from exc
    if entries is None:
        if _has_blobs_dir(s):
            raise StoreError(f"{index} is missing, so nothing says which blobs are in use; "
                             f"{_REFUSE}")
        entries = []
    valid, invalid = _parse_index(entries)
    if invalid:
        i, entry, why = invalid[0]
        name = entry_ref_name(entry)
        more = f" (and {len(invalid) - 1} more)" if len(invalid) > 1 else ""
        raise StoreError(f"{index}: entry manifests[{i}]{f' ({name})' if name else ''} "
                         f"is not valid{more}: {why}; {_REFUSE}")
    keep = _reachable(s, [desc for _, desc, _ in valid])

    blobs_dir = s.root / "blobs"
    _check_real_dir(blobs_dir)
    for top in _scandir(blobs_dir):
        if top.is_symlink() or not top.is_dir(follow_symlinks=False):
            report.warnings.append(f"left {_rel(s, Path(top.path))}: not an algorithm directory")
            continue
        for e in _scandir(Path(top.path)):
            p = Path(e.path)
            try:
                digest: Digest | None = Digest(top.name, e.name)
            except PullerError:
                digest = None
            if digest is not None and digest in keep:
                if e.is_file(follow_symlinks=False):
                    report.kept += 1
                    continue
            if e.is_dir(follow_symlinks=False):
                report.warnings.append(f"left directory {_rel(s, p)}")
                continue
            try:
                size = 0 if e.is_symlink() else e.stat(follow_symlinks=False).st_size
            except OSError:
                size = 0
            if dry_run or _unlink(p):
                report.blobs_removed.append(_rel(s, p))
                report.blob_bytes += size

    partials = list(_scandir(s.root / "ingest"))
    names = {e.name for e in partials}
    for e in partials:
        p = Path(e.path)
        if e.name.endswith(SEGMENTS_SUFFIX):
            # Removed with its partial, below; on its own only when the partial is gone.
            if e.name[:-len(SEGMENTS_SUFFIX)] not in names and (dry_run or _unlink(p)):
                report.ingest_removed.append(_rel(s, p))
            continue
        if e.is_dir(follow_symlinks=False):  # the layout of older versions
            freed = clear_legacy_partial(p, dry_run=dry_run)
        elif e.is_file(follow_symlinks=False):
            freed = _remove_partial(p, dry_run)
        else:  # a link or anything else puller never makes there
            if dry_run or _unlink(p):
                report.ingest_removed.append(_rel(s, p))
            continue
        if freed is None:
            report.ingest_busy += 1
        else:
            report.ingest_removed.append(_rel(s, p))
            report.ingest_bytes += freed

    # Temporary files of index.json or oci-layout writes cut short by a crash.
    for e in _scandir(s.root):
        if e.name.startswith((".index.json.tmp-", ".oci-layout.tmp-")) and \
                not e.is_dir(follow_symlinks=False):
            if dry_run:
                report.other_removed.append(e.name)
            else:
                with s._index_lock():  # a live writer holds it while its temp file exists
                    if _unlink(Path(e.path)):
                        report.other_removed.append(e.name)
    return report


def _remove_partial(path: Path, dry_run: bool) -> int | None:
    """Remove one partial download (and its segments note) unless a writer holds its
    lock; returns bytes freed, or None when it is busy."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        size = os.fstat(fd).st_size
        if not dry_run:
            _unlink(path.with_name(path.name + SEGMENTS_SUFFIX))
            # Unlinked while we hold the lock: a writer that opened it meanwhile finds
            # the name gone once it gets the lock, and starts a new file.
            _unlink(path)
        return size
    except OSError:  # BlockingIOError: a pull is writing it right now
        return None
    finally:
        os.close(fd)


# -- command line --------------------------------------------------------------------------


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _store_arg(args: argparse.Namespace) -> Path:
    return Path(args.store).expanduser() if args.store else default_store_path()


def _fail(message: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"event": "error", "error": message}), flush=True)
    print(f"puller: {message}", file=sys.stderr)
    return EXIT_PROBLEMS


def _run(args: argparse.Namespace, work: Callable[[Path], Any]) -> Any:
    """Run ``work`` on the store; an int is an exit code for a failure already told."""
    from .cli import MAX_SECONDS

    if not 0 <= args.wait <= MAX_SECONDS:  # (also false for nan)
        print(f"puller: --wait must be from 0 to {MAX_SECONDS} seconds", file=sys.stderr)
        return EXIT_USAGE
    try:
        return work(_store_arg(args))
    except PullerError as exc:
        return _fail(str(exc), args.json)
    except KeyboardInterrupt:
        print("puller: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fsck_command(args: argparse.Namespace) -> int:
    report = _run(args, lambda store: fsck(store, repair=args.repair, wait=args.wait))
    if isinstance(report, int):
        return report
    if args.json:
        print(json.dumps(report.to_json(), separators=(",", ":")), flush=True)
        return EXIT_OK if report.ok else EXIT_PROBLEMS
    print(f"checked {report.blobs} blobs ({_human(report.bytes)}) and {report.entries} "
          f"index entries in {report.store}")
    for p in report.problems:
        print(p.line())
    stale = [p for p in report.partials if not p.active]
    if report.partials:
        total = sum(p.size for p in report.partials)
        print(f"{len(report.partials)} partial downloads in ingest/ ({_human(total)}, "
              f"{len(report.partials) - len(stale)} in progress): the next pull resumes them, "
              f"`puller gc` removes them")
    left = [p for p in report.problems if not p.repaired]
    if not report.problems:
        print("store is consistent")
    elif left:
        hint = "" if args.repair else " (run `puller fsck --repair` to remove them)"
        print(f"{len(left)} problems found{hint}")
    else:
        print(f"repaired {len(report.problems)} problems")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _gc_command(args: argparse.Namespace) -> int:
    report = _run(args, lambda store: gc(store, dry_run=args.dry_run, wait=args.wait))
    if isinstance(report, int):
        return report
    if args.json:
        print(json.dumps(report.to_json(), separators=(",", ":")), flush=True)
        return EXIT_OK
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} {len(report.blobs_removed)} blobs ({_human(report.blob_bytes)}) and "
          f"{len(report.ingest_removed)} partial downloads ({_human(report.ingest_bytes)}); "
          f"kept {report.kept} blobs")
    if report.ingest_busy:
        print(f"left {report.ingest_busy} partial downloads that are being written")
    for w in report.warnings:
        print(f"warning: {w}")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``fsck`` and ``gc`` on the command line's subparsers."""
    store_help = "store directory (default: $PULLER_STORE or ~/.cache/puller)"
    wait_help = (f"wait up to this long for running pulls to finish (default: "
                 f"{_DEFAULT_WAIT:.0f})")

    f = sub.add_parser("fsck", help="check every blob and index entry of the store",
                       description="Re-hash every blob in the store and check that every "
                       "index.json entry is complete. Exit 0 when the store is consistent, "
                       "1 when problems were found (or are left after --repair).")
    f.add_argument("--store", metavar="DIR", help=store_help)
    f.add_argument("--repair", action="store_true",
                   help="remove corrupt blobs and dangling index entries")
    f.add_argument("--json", action="store_true", help="print the report as one JSON object")
    f.add_argument("--wait", type=float, default=_DEFAULT_WAIT, metavar="SECONDS",
                   help=f"with --repair: {wait_help}")
    f.set_defaults(handler=_fsck_command)

    g = sub.add_parser("gc", help="remove blobs that no image in the store uses",
                       description="Remove blobs no index.json entry reaches and partial "
                       "downloads nobody is writing. Never removes what a running pull "
                       "has stored or is about to name.")
    g.add_argument("--store", metavar="DIR", help=store_help)
    g.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    g.add_argument("--json", action="store_true", help="print the report as one JSON object")
    g.add_argument("--wait", type=float, default=_DEFAULT_WAIT, metavar="SECONDS",
                   help=wait_help)
    g.set_defaults(handler=_gc_command)
