"""Small file-system helpers shared by the store and the credentials file."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

__all__ = ["fsync_dir", "write_all", "write_atomic", "thread_buffer", "BUFFER_SIZE"]

BUFFER_SIZE = 1 << 20
_local = threading.local()


def thread_buffer() -> memoryview:
    """This thread's 1 MiB I/O buffer, made once. Blob bytes pass through it (received,
    read back, sent) instead of through a fresh object per read: a zeroed MiB per blob
    was most of a small blob's CPU, and allocating and freeing large buffers makes the
    C allocator keep them, so peak memory grew with the number of transfers at once."""
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(BUFFER_SIZE))
    return view


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte of ``data`` is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file (``.NAME.tmp-…`` beside it),
    fsync and rename: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # whatever the umask left
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
