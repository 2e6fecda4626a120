"""Small file-system helpers shared by the store and the credentials file."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "write_all", "write_atomic", "thread_buffer", "start_writeback",
           "BUFFER_SIZE", "WRITEBACK_STEP"]

BUFFER_SIZE = 1 << 20
# A blob writer asks the kernel to start writing its file out after every this many bytes.
WRITEBACK_STEP = 8 << 20
_local = threading.local()
_sync_file_range: Any = None  # resolved on first use; False where there is none


def thread_buffer() -> memoryview:
    """This thread's 1 MiB I/O buffer, made once. Blob bytes pass through it (received,
    read back, sent) instead of through a fresh object per read: a zeroed MiB per blob
    was most of a small blob's CPU, and allocating and freeing large buffers makes the
    C allocator keep them, so peak memory grew with the number of transfers at once."""
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(BUFFER_SIZE))
    return view


def start_writeback(fd: int) -> None:
    """Have the kernel start writing ``fd``'s dirty pages to disk now, without waiting for
    it (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``). Left alone, a blob's pages stay
    dirty until the commit's fsync, which then writes the whole blob while the download
    waits: with 8 x 64 MiB that was a quarter of a second at the end of every pull. Kicked
    while the bytes arrive, the disk works alongside the network and the fsync finds little
    left. Advisory: where the call is missing or fails nothing happens (the fsync at commit
    still makes the blob durable)."""
    global _sync_file_range
    fn = _sync_file_range
    if fn is None:
        fn = _sync_file_range = _load_sync_file_range()
    if fn:
        fn(fd, 0, 0, 2)  # offset 0, nbytes 0 = to the end; 2 = SYNC_FILE_RANGE_WRITE


def _load_sync_file_range() -> Any:
    try:
        import ctypes  # only blobs past WRITEBACK_STEP get here: small pulls never load it

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


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
