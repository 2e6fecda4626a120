"""Ctrl-C and SIGTERM during ``puller push``, ``copy`` and ``mirror``.

Each run goes through a FaultProxy that delays every request in front of a fresh target
registry, and is interrupted at several points of its uploads (the first upload started,
the first bytes on their way, the first blob done), with one signal or several in a row
(``timeout`` sends two; so may an impatient user). Every time the process must end with
exit 130 and the single line ``puller: interrupted``; the target must not have the image,
and the same command run again must put it there byte for byte."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.images import build_image, build_index, push
from tests.test_processes import start
from tests.test_push import run, skopeo_raw

INTERRUPTED = "puller: interrupted\n"
WAIT = 60  # seconds: the most any step may take before the test fails


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A large image and an index in the session registry, both pulled into a store."""
    big = build_image(seed=901, layer_sizes=[12_000_000, 9_000_000, 6_000_000])
    amd = build_image(seed=902, layer_sizes=[3_000])
    arm = build_image(seed=903, layer_sizes=[2_000], platform=("linux", "arm64", "v8"))
    index = build_index([amd, arm], attestations=False)
    push(registry.url, "interrupts/big", "v1", big)
    push(registry.url, "interrupts/multi", "v1", index)
    store = tmp_path_factory.mktemp("interrupts") / "store"
    src = {"big": f"{registry.host}/interrupts/big:v1",
           "multi": f"{registry.host}/interrupts/multi:v1"}
    r = run("pull", "-q", "--all-platforms", "--store", str(store), src["big"], src["multi"])
    assert r.returncode == 0, r.stderr
    return {"store": store, "src": src, "big": big, "multi": index}


def _upload_started(q: dict) -> bool:
    return q["method"] == "POST" and "/blobs/uploads/" in q["path"]


def _bytes_sent(q: dict) -> bool:
    return q["method"] in ("PUT", "PATCH") and "/blobs/uploads/" in q["path"]


def _blob_done(q: dict) -> bool:
    return q["method"] == "PUT" and "/blobs/uploads/" in q["path"] and q["status"] == 201


# (what to wait for in the target's request log, signals sent, pause between them): a
# second signal comes while the cleanups run, a third ends the process at once.
POINTS = [(_upload_started, 1, 0.0), (_bytes_sent, 2, 0.0), (_blob_done, 1, 0.0),
          (_upload_started, 2, 0.05), (_bytes_sent, 2, 0.2), (_bytes_sent, 3, 0.05)]


def _interrupt(argv: list[str], front, seen, times: int, pause: float = 0.0,
               sig: int = signal.SIGINT) -> None:
    """Start ``puller *argv``, signal it once ``seen`` matches a request at ``front``,
    and check that it ends promptly with exit 130 and one line."""
    front.clear_log()
    p = start(*argv)
    try:
        deadline = time.monotonic() + WAIT
        while not any(seen(q) for q in front.requests):
            if p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"the run ended (exit {p.returncode}) before it was interrupted: "
                            f"{err}")
            assert time.monotonic() < deadline, "the interruption point was never reached"
            time.sleep(0.02)
        for n in range(times):
            if n and pause:
                time.sleep(pause)
            p.send_signal(sig)
        _, err = p.communicate(timeout=WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert (p.returncode, err) == (130, INTERRUPTED)


def _absent(ref: str) -> bool:
    r = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
                       capture_output=True, timeout=WAIT)
    return r.returncode != 0


def _slow_target(registry_factory, fault_proxy):
    """A fresh registry (read back directly: the proxy keeps one Accept header only) and a
    proxy in front of it that delays every request."""
    target = registry_factory()
    front = fault_proxy(target)
    front.delay(0.3, times=None)
    return target, front


def _direct(ref: str, front, target) -> str:
    return target.host + ref[len(front.host):]


def test_push_interrupted_at_several_points_then_completed(images, registry_factory,
                                                          fault_proxy):
    store = str(images["store"])
    for i, (seen, times, pause) in enumerate(POINTS):
        # A fresh target each time: the store's names for the earlier targets would let
        # this push mount every blob instead of uploading it.
        target, front = _slow_target(registry_factory, fault_proxy)
        dst = {"big": f"{front.host}/push{i}/big:v1", "multi": f"{front.host}/push{i}/multi:v1"}
        for name in ("big", "multi"):
            r = run("tag", "--store", store, images["src"][name], dst[name])
            assert r.returncode == 0, r.stderr
        argv = ["push", "--store", store, "--chunk-size", "4M", dst["big"], dst["multi"]]
        _interrupt(argv, front, seen, times, pause)
        assert _absent(_direct(dst["big"], front, target))
        r = run(*argv, timeout=WAIT * 2)
        assert r.returncode == 0, r.stderr
        assert skopeo_raw(_direct(dst["big"], front, target)) == images["big"].manifest
        assert skopeo_raw(_direct(dst["multi"], front, target)) == images["multi"].manifest


def test_copy_interrupted_at_several_points_then_completed(images, registry_factory,
                                                          fault_proxy):
    target, front = _slow_target(registry_factory, fault_proxy)
    for i, (seen, times, pause) in enumerate(POINTS):
        dst = f"{front.host}/copy{i}/big:v1"
        argv = ["copy", "--chunk-size", "4M", images["src"]["big"], dst]
        _interrupt(argv, front, seen, times, pause)
        assert _absent(_direct(dst, front, target))
        r = run(*argv, timeout=WAIT * 2)
        assert r.returncode == 0, r.stderr
        assert skopeo_raw(_direct(dst, front, target)) == images["big"].manifest


def test_mirror_interrupted_at_several_points_then_completed(images, registry, registry_factory,
                                                            fault_proxy):
    target, front = _slow_target(registry_factory, fault_proxy)
    for i, (seen, times, pause) in enumerate(POINTS):
        argv = ["mirror", "--chunk-size", "4M", "--target", f"{front.host}/m{i}",
                f"{registry.host}/interrupts/big", f"{registry.host}/interrupts/multi"]
        _interrupt(argv, front, seen, times, pause)
        assert _absent(f"{target.host}/m{i}/interrupts/big:v1")
        r = run(*argv, timeout=WAIT * 2)
        assert r.returncode == 0, r.stderr
        assert skopeo_raw(f"{target.host}/m{i}/interrupts/big:v1") == images["big"].manifest
        assert skopeo_raw(f"{target.host}/m{i}/interrupts/multi:v1") == images["multi"].manifest


@pytest.mark.parametrize("command", ["push", "copy"])
def test_sigterm_mid_upload_ends_like_ctrl_c(images, registry_factory, fault_proxy, command,
                                             tmp_path: Path):
    target, front = _slow_target(registry_factory, fault_proxy)
    dst = f"{front.host}/term/big:v1"
    if command == "push":
        store = str(images["store"])
        r = run("tag", "--store", store, images["src"]["big"], dst)
        assert r.returncode == 0, r.stderr
        argv = ["push", "--store", store, dst]
    else:
        argv = ["copy", images["src"]["big"], dst]
    _interrupt(argv, front, _bytes_sent, 1, sig=signal.SIGTERM)
    assert _absent(_direct(dst, front, target))
    r = run(*argv, timeout=WAIT * 2)
    assert r.returncode == 0, r.stderr
    assert skopeo_raw(_direct(dst, front, target)) == images["big"].manifest
