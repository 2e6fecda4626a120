"""The command line as users run it, and other tools reading what it writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.images import build_image, build_index, push

pytestmark = pytest.mark.filterwarnings("error")


def run(*args: str, store: Path | None = None, env: dict | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "puller", *args]
    if store is not None:
        cmd[3:3] = []  # keep order readable in failures
        cmd += ["--store", str(store)]
    e = dict(os.environ)
    e.pop("PULLER_STORE", None)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {tool} is not installed", pytrace=False)
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture
def image(registry, unique_repo):
    base = build_image(seed=31, layer_sizes=[600_000, 20_000])
    img = build_image(seed=32, layer_sizes=[50_000], base=base)
    push(registry.url, unique_repo, "1.0", img)
    return f"{registry.host}/{unique_repo}:1.0", img


def short(digest: str) -> str:
    return digest.split(":")[1][:12]


def test_docker_style_output_then_already_exists(image, store_dir, unique_repo, registry):
    ref, img = image
    first = run("pull", ref, store=store_dir)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == f"1.0: Pulling from {unique_repo}"
    for d in img.layer_digests:
        assert f"{short(d)}: Pull complete" in lines
    assert short(img.config_digest) + ":" not in first.stdout  # docker lists layers only
    assert lines[-3:] == [f"Digest: {img.digest}",
                          f"Status: Downloaded newer image for {ref}", ref]
    assert "Traceback" not in first.stderr

    # Up to date: like docker, a header, the digest and the status, no layer lines.
    second = run("pull", ref, store=store_dir)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        f"1.0: Pulling from {unique_repo}", f"Digest: {img.digest}",
        f"Status: Image is up to date for {ref}", ref]

    # Another image on the same base: the shared layers are "Already exists".
    sibling = build_image(seed=39, layer_sizes=[10_000], base=build_image(
        seed=31, layer_sizes=[600_000, 20_000]))
    push(registry.url, unique_repo, "2.0", sibling)
    third = run("pull", ref.replace(":1.0", ":2.0"), store=store_dir)
    assert third.returncode == 0, third.stderr
    for d in sibling.layer_digests[:2]:
        assert f"{short(d)}: Already exists" in third.stdout
    assert f"{short(sibling.layer_digests[2])}: Pull complete" in third.stdout


def test_quiet_prints_pinned_reference(image, store_dir, registry, unique_repo):
    ref, img = image
    r = run("pull", "-q", ref, store=store_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{registry.host}/{unique_repo}@{img.digest}\n"


def test_json_events(image, store_dir):
    ref, img = image
    r = run("pull", "--json", ref, store=store_dir)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "pull.started" and kinds[-1] == "pull.done"
    done = events[-1]
    assert done["digest"] == img.digest and done["blobs_fetched"] == 4
    assert {e["digest"] for e in events if e["event"] == "blob.done"} == set(img.blobs())


def run_into(stdout: int, *args: str, store: Path) -> subprocess.CompletedProcess:
    """``puller ARGS --store STORE`` with its standard output on the file descriptor given."""
    e = {k: v for k, v in os.environ.items() if k != "PULLER_STORE"}
    return subprocess.run([sys.executable, "-m", "puller", *args, "--store", str(store)],
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120, env=e)


@pytest.mark.parametrize("mode", [[], ["-q"], ["--json"]])
def test_output_to_a_full_disk_is_one_line_and_the_pull_completes(image, store_dir, mode):
    ref, img = image
    with open("/dev/full", "w") as full:
        cold = run_into(full.fileno(), "pull", *mode, ref, store=store_dir)
        warm = run_into(full.fileno(), "pull", *mode, ref, store=store_dir)
    for r in (cold, warm):  # the engine's path and the already-current one
        assert r.returncode == 1
        assert r.stderr.splitlines() == \
            ["puller: cannot write the output: No space left on device"], r.stderr
    listed = run("images", "-q", store=store_dir)
    assert listed.stdout.split() == [ref]  # the pull itself finished
    with open("/dev/full", "w") as full:  # every other command says it the same way
        others = [run_into(full.fileno(), *args, store=store_dir)
                  for args in (["images"], ["fsck", "--json"], ["du"], ["inspect", ref])]
    for r in others:
        assert (r.returncode, r.stderr) == \
            (1, "puller: cannot write the output: No space left on device\n")


def test_a_reader_that_leaves_does_not_stop_the_pull(image, store_dir):
    ref, img = image
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `puller pull ... | head -0` would
    try:
        r = run_into(write_end, "pull", "--json", ref, store=store_dir)
    finally:
        os.close(write_end)
    assert r.returncode == 0 and r.stderr == ""
    assert run("images", "-q", store=store_dir).stdout.split() == [ref]


def test_the_program_exits_without_teardown_only_when_nothing_else_runs(monkeypatch, capsys):
    import atexit
    import threading

    import puller.cli as cli

    class Exited(Exception):
        pass

    def fake_exit(code: int) -> None:
        raise Exited(code)

    ran: list[str] = []
    monkeypatch.setattr(cli, "main", lambda: print("output") or 3)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: ran.append("atexit"))
    monkeypatch.setattr(os, "_exit", fake_exit)
    # (This test process has threads of its own: the count is what run() is told.)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    with pytest.raises(Exited) as quick:
        cli.run()
    assert quick.value.args == (3,) and ran == ["atexit"]
    assert capsys.readouterr().out == "output\n"  # flushed before leaving

    # Another thread still at work: the usual exit, which waits for it.
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    with pytest.raises(SystemExit) as usual:
        cli.run()
    assert usual.value.code == 3 and ran == ["atexit"]


@pytest.mark.parametrize("bad, fragment", [
    ("UPPER/Case:tag", "lowercase"),
    ("alpine:-bad", "tag"),
    ("alpine@sha256:1234", "digest"),
    ("alpine@md5:" + "a" * 32, "digest"),
    ("", "empty"),
    ("a" * 300, "more than 255"),
    ("x//y", "invalid"),
])
def test_bad_references_are_one_line_usage_errors(bad, fragment, store_dir):
    r = run("pull", bad, store=store_dir)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0].lower(), r.stderr
    assert not store_dir.exists()  # nothing created for bad input


def test_failures_exit_nonzero_and_others_complete(image, store_dir, registry, unique_repo):
    ref, img = image
    missing = f"{registry.host}/{unique_repo}:missing"
    unreachable = "127.0.0.1:9/nothing/here:1"
    r = run("pull", "--retries", "0", missing, ref, unreachable, store=store_dir)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert f"Digest: {img.digest}" in r.stdout  # the good image still completed
    err = r.stderr.splitlines()
    assert any("not found" in e and missing in e for e in err), r.stderr
    assert any("127.0.0.1:9" in e and "connect" in e for e in err), r.stderr


def test_bad_platform_and_options(image, store_dir):
    ref, _ = image
    for args in (["--platform", "linux"], ["--platform", "a/b/c/d"], ["-c", "0"],
                 ["--stall-timeout", "nan"], ["--stall-timeout", "inf"],
                 ["--stall-timeout", "1e12"], ["--stall-timeout", "0"], ["--retries", "-1"],
                 ["--platform", ""], ["--platform", "linux/arm64", "--all-platforms"]):
        r = run("pull", *args, ref, store=store_dir)
        if args == ["--platform", "linux"]:
            continue  # "linux" alone means linux on this host's architecture
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_empty_store_path_is_refused(image, tmp_path):
    ref, _ = image
    for args in (["pull", "-q", ref], ["images"], ["gc"], ["fsck"], ["du"]):
        r = subprocess.run([sys.executable, "-m", "puller", *args, "--store", ""],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("puller: --store: an empty path") and \
            r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing made in the current directory


def test_odd_index_entries_neither_stop_a_pull_nor_vanish(image, store_dir):
    ref, img = image
    store_dir.mkdir(parents=True)
    odd = [5, {"mediaType": "x", "annotations": ["not", "a", "mapping"]}]
    (store_dir / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": odd}))
    (store_dir / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    for _ in range(2):  # the engine's path, then the already-current one
        r = run("pull", "-q", ref, store=store_dir)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    kept = json.loads((store_dir / "index.json").read_text())["manifests"]
    assert odd[0] in kept and odd[1] in kept  # left for fsck to report, not dropped
    assert run("fsck", store=store_dir).returncode == 1
    (store_dir / "index.json").write_text("[" * 100_000)
    r = run("images", store=store_dir)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "nested too deeply" in r.stderr


def test_store_from_environment(image, tmp_path):
    ref, img = image
    store = tmp_path / "env-store"
    r = run("pull", "-q", ref, env={"PULLER_STORE": str(store)})
    assert r.returncode == 0, r.stderr
    assert (store / "blobs" / "sha256" / img.digest.split(":")[1]).is_file()


def test_unwritable_store_is_a_clear_error(image, tmp_path):
    ref, _ = image
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run("pull", ref, "--store", str(blocker / "store"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "store" in r.stderr.lower()


def test_skopeo_reads_the_store_and_agrees_on_digests(registry, unique_repo, store_dir):
    skopeo = need("skopeo")
    amd = build_image(seed=33, layer_sizes=[40_000], platform=("linux", "amd64", None))
    arm = build_image(seed=34, layer_sizes=[40_000], platform=("linux", "arm64", "v8"))
    idx = build_index([amd, arm])
    push(registry.url, unique_repo, "multi", idx)
    single = build_image(seed=35, layer_sizes=[30_000, 10_000], fmt="oci")
    push(registry.url, unique_repo, "single", single)

    for tag in ("multi", "single"):
        ref = f"{registry.host}/{unique_repo}:{tag}"
        pulled = run("pull", "-q", "--platform", "linux/amd64", ref, store=store_dir)
        assert pulled.returncode == 0, pulled.stderr
        pinned_digest = pulled.stdout.strip().rsplit("@", 1)[1]
        remote = subprocess.run([skopeo, "inspect", "--tls-verify=false", "--raw",
                                 f"docker://{ref}"], capture_output=True, check=True)
        local = subprocess.run([skopeo, "inspect", "--raw", f"oci:{store_dir}:{ref}"],
                               capture_output=True, check=True)
        assert local.stdout == remote.stdout  # byte-identical manifest in the store
        remote_info = json.loads(subprocess.run(
            [skopeo, "inspect", "--tls-verify=false", "--override-arch", "amd64",
             f"docker://{ref}"], capture_output=True, check=True, text=True).stdout)
        local_info = json.loads(subprocess.run(
            [skopeo, "inspect", "--override-arch", "amd64", f"oci:{store_dir}:{ref}"],
            capture_output=True, check=True, text=True).stdout)
        assert local_info["Layers"] == remote_info["Layers"]
        if tag == "single":
            assert pinned_digest == remote_info["Digest"] == single.digest
    # skopeo can copy the image out of the store: every blob it needs is there and valid.
    out = store_dir.parent / "copied"
    subprocess.run([skopeo, "copy", f"oci:{store_dir}:{registry.host}/{unique_repo}:single",
                    f"oci:{out}:x"], capture_output=True, check=True)


def test_umoci_unpacks_an_image_from_the_store(registry, unique_repo, store_dir, tmp_path):
    umoci = need("umoci")
    img = build_image(seed=36, layer_sizes=[20_000, 5_000])
    push(registry.url, unique_repo, "u", img)
    ref = f"{registry.host}/{unique_repo}:u"
    assert run("pull", "-q", ref, store=store_dir).returncode == 0
    bundle = tmp_path / "bundle"
    u = subprocess.run([umoci, "unpack", "--rootless", "--image", f"{store_dir}:{ref}",
                        str(bundle)], capture_output=True, text=True)
    assert u.returncode == 0, u.stderr
    files = sorted(p.name for p in (bundle / "rootfs").iterdir())
    assert files, "umoci unpacked an empty rootfs"


WARM_PROBE = """
import sys
from puller.cli import main
code = main(sys.argv[1:])
print("AIOHTTP-LOADED" if "aiohttp" in sys.modules else "AIOHTTP-NOT-LOADED")
sys.exit(code)
"""


def probe(*args: str, store: Path) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "PULLER_STORE"}
    return subprocess.run([sys.executable, "-c", WARM_PROBE, *args, "--store", str(store)],
                          capture_output=True, text=True, timeout=120, env=e)


def test_warm_repull_is_one_round_trip_without_the_engine(registry, proxy, unique_repo,
                                                          store_dir):
    img = build_image(seed=37, layer_sizes=[40_000, 20_000])
    push(registry.url, unique_repo, "w", img)
    ref = f"{proxy.host}/{unique_repo}:w"
    assert run("pull", "-q", ref, store=store_dir).returncode == 0

    proxy.clear_log()
    warm = probe("pull", ref, store=store_dir)
    assert warm.returncode == 0, warm.stderr
    assert f"Status: Image is up to date for {ref}" in warm.stdout
    assert "AIOHTTP-NOT-LOADED" in warm.stdout
    assert [(q["method"], "/manifests/" in q["path"]) for q in proxy.requests] == [("HEAD", True)]

    # The tag moves: the cheap check says no, and the engine pulls the new image.
    newer = build_image(seed=38, layer_sizes=[30_000], base=img)
    push(registry.url, unique_repo, "w", newer)
    proxy.clear_log()
    moved = probe("pull", "-q", ref, store=store_dir)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.splitlines()[0].endswith(newer.digest)
    assert len(proxy.blob_requests()) == 2  # the new layer and config, nothing else
    # The command line pulls without aiohttp too (http.client in threads).
    assert "AIOHTTP-NOT-LOADED" in moved.stdout

    # A blob gone from the store: not current, so the engine fetches it again.
    layer = newer.layer_digests[-1].split(":")[1]
    (store_dir / "blobs" / "sha256" / layer).unlink()
    proxy.clear_log()
    repaired = probe("pull", "-q", ref, store=store_dir)
    assert repaired.returncode == 0, repaired.stderr
    assert (store_dir / "blobs" / "sha256" / layer).is_file()
    assert len(proxy.blob_requests()) == 1

    # By digest, a complete image needs no request at all.
    proxy.clear_log()
    pinned = probe("pull", "-q", f"{proxy.host}/{unique_repo}@{newer.digest}", store=store_dir)
    assert pinned.returncode == 0, pinned.stderr
    assert proxy.requests == []  # manifest and blobs all came from the store
    pinned = probe("pull", "-q", f"{proxy.host}/{unique_repo}@{newer.digest}", store=store_dir)
    assert "AIOHTTP-NOT-LOADED" in pinned.stdout
    assert proxy.requests == []


def _blocked_reading_stdin(proc: subprocess.Popen) -> bool:
    """The process sits in read(0, ...) (Linux /proc: syscall 0 on x86-64, fd 0)."""
    try:
        fields = Path(f"/proc/{proc.pid}/syscall").read_text().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == "0" and fields[1] == "0x0"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_login_prompt_is_one_line(sig, tmp_path):
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("reads x86-64 syscall numbers from /proc")
    e = {k: v for k, v in os.environ.items() if k != "PULLER_STORE"}
    e["DOCKER_CONFIG"] = str(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "puller", "login", "-u", "bob",
                          "--password-stdin", "127.0.0.1:9"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    try:
        deadline = time.monotonic() + 60
        while not _blocked_reading_stdin(p) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _blocked_reading_stdin(p), "login never waited for its password"
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert (p.returncode, err) == (130, "puller: interrupted\n")
    assert list(tmp_path.iterdir()) == []  # nothing saved
