"""`puller bench` against the real registry: numbers come from real pulls, and the
user's store is never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.images import build_image, push


def run(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          text=True, timeout=180, env={**os.environ, **env})


def test_bench_reports_runs_and_leaves_no_store(registry, unique_repo, tmp_path):
    img = build_image(seed=71, layer_sizes=[2_000_000, 1_500_000])
    push(registry.url, unique_repo, "b", img)
    user_store = tmp_path / "user-store"
    work = tmp_path / "work"
    work.mkdir()
    r = run("bench", "--json", "--runs", "2", "--concurrency", "1,4", "--work-dir", str(work),
            f"{registry.host}/{unique_repo}:b", env={"PULLER_STORE": str(user_store)})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["digest"] == img.digest
    assert [row["concurrency"] for row in report["summary"]] == [1, 4]
    blob_bytes = len(img.config) + sum(len(x) for x in img.layers)
    for run_ in report["runs"]:
        assert run_["bytes"] == blob_bytes and run_["blobs"] == 3  # each run is cold
        assert 0 < run_["to_manifest"] <= run_["to_first_byte"] <= run_["wall"]
    assert len(report["runs"]) == 4
    assert all(row["bound"] for row in report["summary"])
    assert not user_store.exists()
    assert list(work.iterdir()) == []  # throw-away stores are removed

    warm = run("bench", "--warm", "--runs", "2", "--work-dir", str(work),
               f"{registry.host}/{unique_repo}:b", env={"PULLER_STORE": str(user_store)})
    assert warm.returncode == 0, warm.stderr
    assert "nothing to download" in warm.stdout


def test_bench_bad_input_is_one_line(tmp_path):
    for args in (["--concurrency", "x"], ["--runs", "0"], ["--concurrency", "0"]):
        r = run("bench", *args, "127.0.0.1:9/x:1", env={})
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bench_without_a_usable_work_dir_is_one_line():
    # /proc is a directory in which nobody, root included, can make one.
    r = run("bench", "--work-dir", "/proc", "127.0.0.1:9/x:1", env={})
    assert r.returncode == 1
    assert r.stderr.startswith("puller: bench: cannot make its throw-away stores in /proc")
    assert r.stderr.count("\n") == 1
