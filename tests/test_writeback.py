"""Early writeback: a large blob's pages are handed to the disk while it downloads, not all
at the commit's fsync, and that changes nothing about what gets committed."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from puller import fsutil, store as store_mod
from puller.digest import Digest
from puller.store import ContentStore

STEP = fsutil.WRITEBACK_STEP


def _digest(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


@pytest.fixture
def kicks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def counting(fd: int) -> None:
        calls.append(fd)
        fsutil.start_writeback(fd)  # the real call too: it must not disturb the writer

    monkeypatch.setattr(store_mod, "start_writeback", counting)
    return calls


def test_a_large_blob_is_written_back_every_step_and_commits_intact(tmp_path, kicks) -> None:
    data = os.urandom(3 * STEP + 12345)
    st = ContentStore(tmp_path / "store").init()
    w = st.ingest(_digest(data), len(data))
    assert w is not None
    for i in range(0, len(data), 1 << 20):
        w.write(data[i:i + (1 << 20)])
    w.commit()
    w.close()
    assert len(kicks) == 3
    assert st.read(_digest(data), max_size=len(data)) == data


def test_segments_written_out_of_order_are_written_back_too(tmp_path, kicks) -> None:
    data = os.urandom(2 * STEP + 777)
    st = ContentStore(tmp_path / "store").init()
    w = st.ingest(_digest(data), len(data))
    assert w is not None
    w.begin_segments()
    half = len(data) // 2
    w.write_at(half, [data[half:]])  # the later segment lands first
    w.write_at(0, [data[:half]])
    w.absorb(len(data))
    w.commit()
    w.close()
    assert len(kicks) >= 2
    assert st.read(_digest(data), max_size=len(data)) == data


def test_small_blobs_never_ask(tmp_path, kicks) -> None:
    data = os.urandom(STEP)  # exactly one step: no kick is worth it
    st = ContentStore(tmp_path / "store").init()
    w = st.ingest(_digest(data), len(data))
    assert w is not None
    w.write(data)
    w.commit()
    w.close()
    assert kicks == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_kernel_call_is_found_and_harmless_on_anything(tmp_path) -> None:
    assert fsutil._load_sync_file_range()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"x" * 100000)
        fsutil.start_writeback(fd)
    finally:
        os.close(fd)
    r, w = os.pipe()  # not a file: the call fails inside and is ignored
    try:
        fsutil.start_writeback(r)
    finally:
        os.close(r)
        os.close(w)


def test_a_partial_in_the_old_directory_layout_is_cleared_unless_in_use(tmp_path) -> None:
    import fcntl

    from puller.errors import StoreError

    data = b"layer bytes" * 100
    st = ContentStore(tmp_path / "store").init()
    old = st.partial_path(_digest(data))  # ingest/<alg>-<hex>/{data,lock} of older versions
    old.mkdir()
    (old / "data").write_bytes(data[:50])
    lock = os.open(old / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # an older puller is writing it right now
        with pytest.raises(StoreError, match="older puller"):
            st.ingest(_digest(data), len(data))
        assert (old / "data").read_bytes() == data[:50]  # left alone
    finally:
        os.close(lock)
    w = st.ingest(_digest(data), len(data))  # now nobody holds it: cleared, started afresh
    assert w is not None and w.offset == 0 and old.is_file()
    w.write(data)
    w.commit()
    assert st.read(_digest(data), max_size=len(data)) == data and not old.exists()
