"""The content store: an OCI image layout that every pulled image shares.

Layout of the store root::

    oci-layout                 {"imageLayoutVersion": "1.0.0"}
    index.json                 one entry per pulled image, named by its normalised reference
    blobs/sha256/<hex>         verified content only; the name is the digest of the bytes
    ingest/sha256-<hex>        an unfinished download (never counted as present), locked
                               (flock) by whoever is writing that digest
    ingest/sha256-<hex>.segments  beside a partial fetched as parallel ranges: how far its
                               data is verified, and which later ranges are on disk
    index.json.lock            serialises index.json updates between processes
    gc.lock, pulls.lock        keep ``puller gc`` and pulls apart (see :meth:`ContentStore.pin`)

The only way into ``blobs/`` is :class:`BlobWriter` (through :meth:`ContentStore.ingest`
or :meth:`ContentStore.put`): it checks size and digest, fsyncs, and renames into place,
so a crash at any moment leaves either no blob or a whole, verified one. Nothing in the
store is reached through a symlink: the layout's directories must be real directories and
files are opened with ``O_NOFOLLOW``, so a planted link can't make puller read or write
outside the store root. Partial data
stays in ``ingest/`` and is resumed by the next writer of the same digest, which first
re-hashes what is already there.

Everything here is synchronous and blocking; the scheduler runs the heavy calls in
worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from . import mediatypes
from .digest import Digest
from .errors import DigestMismatch, SizeMismatch, StoreError
from .fsutil import (WRITEBACK_STEP, fsync_dir, start_writeback, thread_buffer, write_all,
                     write_atomic)

__all__ = ["ContentStore", "BlobWriter", "StoreBusy", "default_store_path"]

GC_LOCK = "gc.lock"
_MARK_MAX = 1 << 16  # bytes of a segments note read at most
_MAX_HELD = 256  # ranges a segments note keeps at most (each attempt adds a few)
SEGMENTS_SUFFIX = ".segments"  # ingest/<algorithm>-<hex>.segments: see BlobWriter.begin_segments
PULLS_LOCK = "pulls.lock"


class StoreBusy(StoreError):
    """gc or a repair could not get the store: pulls kept running for the whole wait."""


def default_store_path() -> Path:
    """``$PULLER_STORE``, else ``$XDG_CACHE_HOME/puller``, else ``~/.cache/puller``."""
    env = os.environ.get("PULLER_STORE")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "puller"


def _store_error(exc: OSError, what: str) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"disk full while {what}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"permission denied while {what}: {exc.strerror}")
    return StoreError(f"I/O error while {what}: {exc.strerror or exc}")


def _real_dir(path: Path) -> None:
    """Refuse a layout directory that is a symlink or not a directory at all."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{path} is a symlink; the store never follows links out of its root")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} is not a directory")




def clear_legacy_partial(directory: Path, *, dry_run: bool = False) -> int | None:
    """Remove an ingest entry in the layout older versions of puller wrote
    (``ingest/<algorithm>-<hex>/{data,lock,segments}``) unless a process holds its lock;
    returns the bytes freed (with ``dry_run``: would free, removing nothing), or None when
    it is busy or not something puller made. Links in it are removed, never followed."""
    lock = directory / "lock"
    fd = -1
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
            fd = -1
        if exc.errno not in (errno.ENOENT, errno.ELOOP):
            return None
    try:
        names = os.listdir(directory)
        size = 0
        for name in names:
            st = os.lstat(directory / name)
            if stat.S_ISDIR(st.st_mode):
                return None  # not something puller made: leave the directory alone
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
        if dry_run:
            return size
        for name in names:
            if name != "lock":
                os.unlink(directory / name)
        if "lock" in names:
            os.unlink(lock)  # last: a writer that opened it meanwhile sees it gone
        os.rmdir(directory)
        return size
    except FileNotFoundError:
        return 0
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def partial_bytes(entry: os.DirEntry[str]) -> int | None:
    """Bytes held by the partial download an ``ingest/`` entry is; None for an entry that
    is none (a segments note, a link, anything else). Never follows links."""
    if entry.name.endswith(SEGMENTS_SUFFIX):
        return None
    try:
        if entry.is_file(follow_symlinks=False):
            return entry.stat(follow_symlinks=False).st_size
        if entry.is_dir(follow_symlinks=False):  # the layout of older versions
            return os.lstat(Path(entry.path) / "data").st_size
    except OSError:
        return 0
    return None


def _spans_from(offset: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` ((start, end), end exclusive) from ``offset`` on: clipped there, sorted,
    the empty ones dropped and the touching ones merged."""
    out: list[tuple[int, int]] = []
    for a, b in sorted((max(a, offset), b) for a, b in spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


class BlobWriter:
    """Writes one blob into ``ingest/`` and commits it only when size and digest match.

    The partial file is its own lock: the writer holds an exclusive ``flock`` on it for its
    lifetime, so one process at a time writes a digest, and commits by renaming that very
    file into ``blobs/``. One inode per blob: an ingest directory with a lock file and a
    data file was three, and creating and deleting them made a pull of 100 small blobs
    take 350 ms of CPU instead of 210. Not thread-safe: one caller drives it, possibly
    from a worker thread.
    ``offset`` is the number of bytes already written and hashed (resumed data included);
    ``held`` lists later byte ranges ``(start, end)`` (end exclusive) that an earlier
    parallel-range attempt left on disk, not yet hashed: a resume fetches only the gaps.
    """

    def __init__(self, store: ContentStore, digest: Digest, size: int, fd: int,
                 path: Path) -> None:
        self._store = store
        self.digest = digest
        self.size = size
        self._fd = fd  # opened, flocked and checked by ContentStore.ingest
        self._path = path
        self._mark = path.with_name(path.name + SEGMENTS_SUFFIX)
        self._hasher = digest.hasher()
        self.offset = 0
        self.held: list[tuple[int, int]] = []
        self._unflushed = 0  # bytes written since the kernel was last asked to write back
        self.committed = False
        self._resumed = False  # until then close() leaves the file as it found it
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise StoreError(f"partial download of {digest} is not a regular file")
            self._resume()
            self._resumed = True
        except OSError as exc:
            self.close()
            raise _store_error(exc, f"opening partial download of {digest}") from exc
        except BaseException:
            self.close()
            raise

    def _resume(self) -> None:
        """Re-hash what an earlier attempt left, so the download can continue after it."""
        have = os.fstat(self._fd).st_size
        mark = self._read_segments_mark()
        held: list[tuple[int, int]] = []
        if mark is not None:
            verified, held = mark
            verified = min(verified, have)
            # Only what the note vouches for counts: the verified prefix, and the ranges
            # an attempt that stopped cleanly left whole. Anything else on disk was being
            # written when an attempt died (kill -9) and may have holes.
            held = _spans_from(verified, [(a, b) for a, b in held
                                          if b <= min(have, self.size)])
            end = held[-1][1] if held else verified
            if end < have:
                os.ftruncate(self._fd, end)
            have = verified
        if have > self.size:
            os.ftruncate(self._fd, 0)
            have = 0
        done = 0
        buf = thread_buffer()
        while done < have:
            n = os.preadv(self._fd, [buf[:min(len(buf), have - done)]], done)
            if not n:
                break
            self._hasher.update(buf[:n])
            done += n
        if done != have:  # file shrank under us; start over rather than guess
            os.ftruncate(self._fd, 0)
            self._hasher = self.digest.hasher()
            done = 0
            held = []
        os.lseek(self._fd, done, os.SEEK_SET)
        self.offset = done
        self.held = held
        while self.held and self.held[0][0] == self.offset:  # joins the prefix: hash it now
            self.absorb(self.held.pop(0)[1])

    def restart(self) -> None:
        """Throw away the partial data (the server ignored our Range and sent it all)."""
        try:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
        except OSError as exc:
            raise _store_error(exc, f"truncating partial download of {self.digest}") from exc
        self._hasher = self.digest.hasher()
        self.offset = 0
        self.held = []

    def write(self, data: bytes | memoryview) -> None:
        """Hash and append ``data``; refuses bytes beyond the descriptor's size."""
        n = len(data)
        if self.offset + n > self.size:
            raise SizeMismatch(
                f"blob {self.digest}: server sent more than the expected {self.size} bytes")
        self._hasher.update(data)
        try:
            write_all(self._fd, data)
        except OSError as exc:
            raise _store_error(exc, f"writing blob {self.digest}") from exc
        self.offset += n
        self._written(n)

    def _written(self, n: int) -> None:
        # Blobs of one step or less never ask (their commit's fsync is short anyway).
        # Segment threads share the counter unlocked: a lost update only moves a kick.
        self._unflushed += n
        if self._unflushed >= WRITEBACK_STEP and self.size > WRITEBACK_STEP:
            self._unflushed = 0
            start_writeback(self._fd)

    def write_many(self, chunks: list[bytes]) -> None:
        """Write a batch of chunks (one worker-thread hop for many network reads)."""
        for c in chunks:
            self.write(c)

    def _read_segments_mark(self) -> tuple[int, list[tuple[int, int]]] | None:
        """The note beside a partial fetched in ranges: the verified prefix and the
        later ranges known whole on disk. A note that can't be read vouches for nothing
        (the download starts over, which is never wrong)."""
        try:
            fd = os.open(self._mark, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            raw = os.read(fd, _MARK_MAX)
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw)
            if isinstance(doc, int) and not isinstance(doc, bool):  # an older note
                return max(0, doc), []
            verified = doc["verified"]
            held = [(int(a), int(b)) for a, b in doc["held"]]
            if not isinstance(verified, int) or isinstance(verified, bool):
                raise ValueError(verified)
        except (ValueError, TypeError, KeyError, RecursionError):
            return 0, []
        held.sort()
        if any(a < end for (_, end), (a, _) in zip(held, held[1:], strict=False)):
            return max(0, verified), []  # overlapping: not a note puller wrote
        return max(0, verified), held

    def _write_segments_mark(self, held: list[tuple[int, int]]) -> None:
        doc = {"verified": self.offset, "held": [[a, b] for a, b in held]}
        fd = os.open(self._mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            write_all(fd, json.dumps(doc, separators=(",", ":")).encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _clear_segments_mark(self) -> None:
        try:
            os.unlink(self._mark)
        except FileNotFoundError:
            pass

    def begin_segments(self) -> None:
        """Note, before later ranges are written ahead of the hashed prefix, how far the
        data is verified and which later ranges are whole (:attr:`held`); a crash from
        here on resumes from that."""
        try:
            self._write_segments_mark(self.held)
        except OSError as exc:
            raise _store_error(exc, f"preparing parallel download of {self.digest}") from exc

    def hold(self, ranges: list[tuple[int, int]]) -> None:
        """Ranges ``(start, end)`` of a parallel download that stopped, whole on disk:
        kept (with :attr:`held`) when the writer closes, for the next attempt."""
        self.held = _spans_from(self.offset, [*self.held, *ranges])[:_MAX_HELD]

    def write_at(self, position: int, chunks: list[bytes]) -> int:
        """Store a later segment of a parallel download at ``position``, unhashed.

        The bytes count only once :meth:`absorb` has hashed them in order; until then
        they are scratch space (a crash leaves them to be verified or thrown away).
        Returns the position after the last byte written.
        """
        for c in chunks:
            if position + len(c) > self.size:
                raise SizeMismatch(
                    f"blob {self.digest}: server sent more than the expected {self.size} bytes")
            try:
                view = memoryview(c)
                while view:
                    w = os.pwrite(self._fd, view, position)
                    view = view[w:]
                    position += w
            except OSError as exc:
                raise _store_error(exc, f"writing blob {self.digest}") from exc
            self._written(len(c))
        return position

    def absorb(self, upto: int) -> None:
        """Hash the segments already on disk from ``offset`` to ``upto`` (in order)."""
        try:
            buf = thread_buffer()
            while self.offset < upto:
                n = os.preadv(self._fd, [buf[:min(len(buf), upto - self.offset)]], self.offset)
                if not n:
                    raise SizeMismatch(f"blob {self.digest}: segment data missing on disk")
                self._hasher.update(buf[:n])
                self.offset += n
            os.lseek(self._fd, self.offset, os.SEEK_SET)
        except OSError as exc:
            raise _store_error(exc, f"reading back blob {self.digest}") from exc

    def commit_segments(self) -> None:
        """End a parallel-range download: hash what the later segments left on disk,
        then :meth:`commit` (one worker-thread hop for both)."""
        self.absorb(self.size)
        self.commit()

    def commit(self) -> None:
        """Verify size and digest, fsync and move the blob into ``blobs/``.

        On a mismatch the partial data is deleted (it can never become right) and
        :class:`SizeMismatch` or :class:`DigestMismatch` is raised.
        """
        if self.offset != self.size:
            self._discard()
            raise SizeMismatch(
                f"blob {self.digest}: got {self.offset} bytes, expected {self.size}")
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            self._discard()
            raise DigestMismatch(
                f"blob {self.digest}: content hashes to {self.digest.algorithm}:{actual}")
        target = self._store.blob_path(self.digest)
        try:
            os.fsync(self._fd)
            self._store._blob_dir(target.parent)
            # Renamed while still locked: whoever waits for the lock then finds the
            # ingest name gone (or new) and looks again.
            os.replace(self._path, target)
        except OSError as exc:
            raise _store_error(exc, f"committing blob {self.digest}") from exc
        # The rename is made durable by one directory fsync before anything names the
        # blob (ContentStore.sync, called by update_index), not one per blob.
        self._store._unsynced_dirs.add(target.parent)
        self.committed = True
        self._clear_segments_mark()
        self.close()

    def finish(self, tail: list[bytes]) -> bool:
        """Write the last chunks and, if that completes the blob, commit and close: the
        end of a download in one worker-thread hop. False when bytes are still missing
        (the writer stays open for a resume)."""
        self.write_many(tail)
        if self.offset < self.size:
            return False
        self.commit()
        self.close()
        return True

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _discard(self) -> None:
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        self.offset = 0
        self.held = []
        self._hasher = self.digest.hasher()

    def close(self) -> None:
        """Release the file and its lock; uncommitted data stays for a later resume: the
        hashed prefix, and the :attr:`held` ranges of a parallel download, noted once
        the data is on disk (an empty partial is removed: there is nothing to resume)."""
        if self._fd < 0:
            return
        if self._resumed and not self.committed:
            try:
                held = _spans_from(self.offset, self.held)
                end = held[-1][1] if held else self.offset
                if os.fstat(self._fd).st_size > end:  # unhashed bytes nothing vouches for
                    os.ftruncate(self._fd, end)
                if held:
                    os.fsync(self._fd)  # the data first: the note must not outlive it
                    self._write_segments_mark(held)
                else:
                    self._clear_segments_mark()
                if end == 0:  # still locked: a waiter finds the name gone
                    os.unlink(self._path)
            except OSError:
                pass
        os.close(self._fd)  # closing drops the flock
        self._fd = -1

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ContentStore:
    """A content-addressed OCI image layout on disk, shared by every pulled image."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self._blobs = self.root / "blobs"
        self._ingest = self.root / "ingest"
        self._index = self.root / "index.json"
        self._unsynced_dirs: set[Path] = set()  # see BlobWriter.commit and sync()
        # update_index's group commit: changes queued by this process's threads, and the
        # one thread at a time that writes them.
        self._index_queue: list[_IndexChange] = []
        self._index_queue_lock = threading.Lock()
        self._index_writer = threading.Lock()
        self._blob_dirs: set[Path] = set()  # checked by _blob_dir

    # -- setup -------------------------------------------------------------------------

    def init(self) -> ContentStore:
        """Create the layout if it isn't there yet; refuse a root that is something else."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in (self._blobs, self._blobs / "sha256", self._ingest):
                d.mkdir(exist_ok=True)
                _real_dir(d)
            layout = self.root / "oci-layout"
            if not layout.exists():
                write_atomic(layout, json.dumps(
                    {"imageLayoutVersion": mediatypes.OCI_LAYOUT_VERSION}).encode())
            if not self._index.exists():
                with self._index_lock():
                    if not self._index.exists():
                        write_atomic(self._index, self._dump_index([]))
        except OSError as exc:
            raise _store_error(exc, f"creating store at {self.root}") from exc
        return self

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        # Digest.parse guarantees algorithm and hex are plain [a-z0-9] names.
        return self._blobs / digest.algorithm / digest.hex

    def has(self, digest: Digest, size: int | None = None) -> bool:
        """True when a regular file (never a symlink) of the right size holds the digest."""
        try:
            st = os.lstat(self.blob_path(digest))
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        return size is None or st.st_size == size

    def read(self, digest: Digest, *, max_size: int) -> bytes:
        """Read a small blob (manifest, config) and re-verify its digest."""
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_size > max_size:
                    raise StoreError(f"blob {digest} in the store is larger than {max_size} bytes")
                data = b""
                while chunk := os.read(fd, max_size + 1 - len(data)):
                    data += chunk
                    if len(data) > max_size:
                        raise StoreError(f"blob {digest} grew while being read")
            finally:
                os.close(fd)
        except OSError as exc:
            raise _store_error(exc, f"reading blob {digest}") from exc
        if Digest.from_bytes(data, digest.algorithm) != digest:
            raise DigestMismatch(f"blob {digest} in the store is corrupt (run `puller fsck`)")
        return data

    def ingest(self, digest: Digest, size: int, *, wait: bool = True) -> BlobWriter | None:
        """Open a writer for ``digest``, resuming any partial data.

        Blocks while another process holds the lock on this digest (unless ``wait`` is
        False, then returns None). Callers should check :meth:`has` again after this
        returns: the other process may have committed the blob meanwhile.
        """
        path = self.partial_path(digest)
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except IsADirectoryError:  # a partial in the layout of older versions
                if clear_legacy_partial(path) is None:
                    raise StoreError(f"{path} is in use by an older puller, or is not "
                                     "puller's: remove it, or run `puller gc` when it is idle"
                                     ) from None
                continue
            except FileNotFoundError as exc:  # ingest/ itself is gone: make the layout again
                try:
                    self._ingest.mkdir(parents=True, exist_ok=True)
                    _real_dir(self._ingest)
                except OSError as exc2:
                    raise _store_error(exc2, f"preparing download of {digest}") from exc
                continue
            except OSError as exc:
                raise _store_error(exc, f"preparing download of {digest}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have committed (renamed the file into blobs/) or
            # given up on it (unlinked it) while we waited; our lock is then on a file that
            # is no longer the partial and means nothing: start again.
            try:
                current = os.lstat(path)
                mine = os.fstat(fd)
                stale = (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev)
            except FileNotFoundError:
                stale = True
            except OSError as exc:
                os.close(fd)
                raise _store_error(exc, f"preparing download of {digest}") from exc
            if not stale:
                return BlobWriter(self, digest, size, fd, path)
            os.close(fd)
        raise StoreError(f"could not take the download lock of {digest}: its partial file "
                         "keeps changing")

    def partial_path(self, digest: Digest) -> Path:
        """Where an unfinished download of ``digest`` lives (and is locked)."""
        return self._ingest / f"{digest.algorithm}-{digest.hex}"

    def partial_size(self, digest: Digest) -> int:
        """Bytes of an unfinished download of ``digest`` left in ``ingest/`` (0 if none)."""
        try:
            st = os.lstat(self.partial_path(digest))
        except OSError:
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def _blob_dir(self, directory: Path) -> None:
        """Make sure ``blobs/<algorithm>`` is there and a real directory (once per store)."""
        if directory in self._blob_dirs:
            return
        directory.mkdir(parents=True, exist_ok=True)
        _real_dir(directory)
        self._blob_dirs.add(directory)

    def put(self, digest: Digest, data: bytes) -> None:
        """Store small content (manifests) through the same verified writer."""
        if self.has(digest, len(data)):
            return
        writer = self.ingest(digest, len(data))
        assert writer is not None
        with writer:
            if self.has(digest, len(data)):
                return
            writer.restart()
            writer.write(data)
            writer.commit()

    # -- pulls versus gc ------------------------------------------------------------------
    #
    # A pull holds a shared flock on ``pulls.lock`` from before its first look at the store
    # until its index entry is written; ``puller gc`` (and ``fsck --repair``) hold it
    # exclusively, so they never see a blob that a pull has stored, or found present, but
    # not yet named in index.json. ``gc.lock`` gives gc priority: a pull takes its shared
    # hold only while briefly holding ``gc.lock`` shared too, so once gc holds ``gc.lock``
    # no new pull can start and gc waits only for the pulls already running.

    def _lock_fd(self, name: str) -> int:
        return os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)

    def pin(self) -> int | None:
        """Try to mark a pull as in progress. Returns a file descriptor to close when the
        pull has updated index.json, or None while gc runs (try again a little later).
        Never blocks."""
        try:
            gate = self._lock_fd(GC_LOCK)
        except OSError as exc:
            raise _store_error(exc, f"locking {self.root}") from exc
        try:
            try:
                fcntl.flock(gate, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            fd = self._lock_fd(PULLS_LOCK)
            try:
                # Can't be held exclusively now: gc takes it only while holding the gate.
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            return fd
        except OSError as exc:
            raise _store_error(exc, f"locking {self.root}") from exc
        finally:
            os.close(gate)

    @contextmanager
    def exclusive(self, wait: float = 0.0) -> Iterator[None]:
        """Hold the store with no pull in progress (for gc and repairs).

        Waits up to ``wait`` seconds for running pulls to finish (new ones wait for us),
        then raises :class:`StoreBusy`.
        """
        deadline = time.monotonic() + max(0.0, wait)
        fds: list[int] = []
        try:
            for name, who in ((GC_LOCK, "another gc or repair"), (PULLS_LOCK, "a pull")):
                fd = self._lock_fd(name)
                fds.append(fd)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise StoreBusy(f"store {self.root} is busy: {who} is in "
                                            f"progress (try again later, or wait longer)"
                                            ) from None
                        time.sleep(min(0.05, left))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise _store_error(exc, f"locking {self.root}") from exc
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        try:
            yield
        finally:
            for fd in reversed(fds):
                os.close(fd)

    # -- index.json ----------------------------------------------------------------------

    @contextmanager
    def _index_lock(self) -> Iterator[None]:
        fd = os.open(self.root / "index.json.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _dump_index(manifests: list[Any]) -> bytes:
        # One entry a line: as easy to read and diff as an indented file, and written by
        # json's C encoder (indent= takes the pure-Python one: twice the time, rewritten
        # for every image pulled into a store of thousands).
        head = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX})[:-1]
        lines = ",\n".join(json.dumps(m) for m in manifests)
        return f'{head}, "manifests": [\n{lines}\n]}}\n'.encode()

    def read_index(self) -> list[dict[str, Any]]:
        """The ``manifests`` entries of ``index.json`` that are JSON objects (empty if the
        store is new)."""
        return [e for e in self.read_index_raw() or () if isinstance(e, dict)]

    def read_index_raw(self) -> list[Any] | None:
        """Every entry of ``index.json``'s ``manifests`` as stored, whatever it is (fsck
        and gc judge them); None when there is no index.json."""
        try:
            fd = os.open(self._index, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                raw = b"".join(chunks)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _store_error(exc, f"reading {self._index}") from exc
        try:
            doc = json.loads(raw)
            entries = doc["manifests"]
            if not isinstance(entries, list):
                raise TypeError("manifests is not a list")
        except RecursionError:
            raise StoreError(f"{self._index} is not a valid OCI index: nested too deeply"
                             ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{self._index} is not a valid OCI index: {exc}") from exc
        return entries

    def sync(self) -> None:
        """fsync the blob directories that gained entries, so every committed blob
        survives a power cut before an index entry can name it."""
        while self._unsynced_dirs:
            d = self._unsynced_dirs.pop()
            try:
                fsync_dir(d)
            except OSError as exc:
                self._unsynced_dirs.add(d)
                raise _store_error(exc, f"syncing {d}") from exc

    def update_index(self, change: Callable[[list[Any]], list[Any]], *,
                     everything: bool = False) -> None:
        """Apply ``change`` to the index entries under the inter-process lock, atomically.
        ``change`` sees the entries that are JSON objects; the others are kept as they are,
        for fsck to report, unless ``everything`` hands it those too (fsck's repair).

        Group commit: changes that this process's threads queue while index.json is being
        written go into the next write together, in the order they came. Pulling many
        images at once then rewrites the file once per batch, not once per image (whose
        cost grows with the index: 1000 images named from 8 threads took 4.3 s)."""
        job = _IndexChange(change, everything)
        with self._index_queue_lock:
            self._index_queue.append(job)
        with self._index_writer:
            if not job.done:
                with self._index_queue_lock:
                    batch, self._index_queue = self._index_queue, []
                try:
                    self._write_changes(batch)
                except BaseException as exc:
                    for j in batch:
                        j.error = exc
                finally:
                    for j in batch:
                        j.done = True
        if job.error is not None:
            raise job.error

    def _write_changes(self, batch: list[_IndexChange]) -> None:
        self.sync()
        try:
            with self._index_lock():
                entries = self.read_index_raw() or []
                for job in batch:
                    if job.everything:
                        entries = job.change(entries)
                    else:
                        odd = [e for e in entries if not isinstance(e, dict)]
                        entries = job.change([e for e in entries if isinstance(e, dict)]) + odd
                write_atomic(self._index, self._dump_index(entries))
        except OSError as exc:
            raise _store_error(exc, f"updating {self._index}") from exc

    def set_ref(self, ref_name: str, descriptor: dict[str, Any]) -> None:
        """Point ``ref_name`` (a normalised reference) at ``descriptor``, replacing any
        earlier entry with that name."""
        self.update_index(lambda entries: _named(entries, ref_name, descriptor))

    def copy_ref(self, source: str, target: str, *, wait: float = 60.0) -> bool:
        """Name ``target`` what ``source`` names (``puller tag``); False when the store has
        no ``source``. Done as a pull is, so that no ``rmi`` and ``gc`` in between can
        leave ``target`` naming blobs that are gone: under a pull's hold on the store
        (waiting up to ``wait`` seconds while a gc runs) and within one update of
        index.json."""
        deadline = time.monotonic() + wait
        while (pin := self.pin()) is None:
            if time.monotonic() >= deadline:
                raise StoreBusy(f"store {self.root} is busy: a gc or repair is in progress "
                                "(try again later)")
            time.sleep(0.05)
        found = False
        try:
            def change(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
                nonlocal found
                entry = next((e for e in entries if entry_ref_name(e) == source), None)
                if entry is None:
                    return entries
                found = True
                return _named(entries, target,
                              {k: v for k, v in entry.items() if k != "annotations"})

            if self.lookup(source) is not None:  # no index.json write for nothing
                self.update_index(change)
        finally:
            os.close(pin)
        return found

    def lookup(self, ref_name: str) -> dict[str, Any] | None:
        """The index entry named ``ref_name``, if any."""
        for e in self.read_index():
            if entry_ref_name(e) == ref_name:
                return e
        return None


def _named(entries: list[dict[str, Any]], ref_name: str,
           descriptor: dict[str, Any]) -> list[dict[str, Any]]:
    """``entries`` with ``ref_name`` naming ``descriptor`` (its other annotations kept)
    instead of whatever it named before."""
    entry = dict(descriptor)
    given = entry.get("annotations")
    annotations = dict(given) if isinstance(given, dict) else {}
    annotations[mediatypes.ANNOTATION_REF_NAME] = ref_name
    entry["annotations"] = annotations
    return [e for e in entries if entry_ref_name(e) != ref_name] + [entry]


class _IndexChange:
    """One caller's change to index.json, waiting for (or done by) a group commit."""

    __slots__ = ("change", "everything", "done", "error")

    def __init__(self, change: Callable[[list[Any]], list[Any]], everything: bool) -> None:
        self.change = change
        self.everything = everything
        self.done = False
        self.error: BaseException | None = None


def entry_ref_name(entry: object) -> str | None:
    """The reference name of an ``index.json`` entry, however malformed the rest of it is."""
    ann = entry.get("annotations") if isinstance(entry, dict) else None
    name = ann.get(mediatypes.ANNOTATION_REF_NAME) if isinstance(ann, dict) else None
    return name if isinstance(name, str) else None
