"""Bulk mirror benchmark: puller mirror against skopeo sync, registry to registry.

Seeds 20 repositories x 2 tags (every image: one shared 16 MB base layer, a 4 MB layer
shared by the two tags of a repository, and a small layer of its own) in one real
distribution registry, then mirrors them into a fresh second registry with

- ``puller mirror --target B/p SRC/repo0 ... SRC/repo19`` (one process), and
- ``skopeo sync --src docker --dest docker --src-tls-verify=false --dest-tls-verify=false
  SRC/repoN B/s`` (one process per repository, as ``--src docker`` takes one),

alternating which goes first, ``--reps`` times (default 3). After each cold run the same
command runs again against the now-complete target (the no-change re-run). Prints the
medians and the ratio. Run from the repository root::

    .venv/bin/python benchmarks/mirror_bench.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.images import build_image, push  # noqa: E402
from tests.support.registry import Registry  # noqa: E402

REPOS, TAGS = 20, 2


def seed(src: Registry) -> list[str]:
    base = build_image(seed=1, layer_sizes=[16 << 20])
    repos = []
    for i in range(REPOS):
        mid = build_image(seed=100 + i, layer_sizes=[4 << 20], base=base)
        for t in range(TAGS):
            img = build_image(seed=1000 + i * 10 + t, layer_sizes=[64 << 10], base=mid)
            push(src.url, f"bench/app{i}", f"v{t}", img)
        repos.append(f"{src.host}/bench/app{i}")
    return repos


def timed(cmd: list[str]) -> float:
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:4])} ...: {r.stderr.strip()[-500:]}")
    return elapsed


def puller_run(repos: list[str], dst: Registry) -> float:
    return timed([sys.executable, "-m", "puller", "mirror", "-q", "--target", f"{dst.host}/p",
                  *repos])


def skopeo_run(repos: list[str], dst: Registry) -> float:
    total = 0.0
    for repo in repos:
        total += timed(["skopeo", "sync", "--src", "docker", "--dest", "docker",
                        "--src-tls-verify=false", "--dest-tls-verify=false", repo,
                        f"{dst.host}/s"])
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("skopeo") is None:
        raise SystemExit("skopeo is not installed")
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    results: dict[str, list[float]] = {"puller": [], "skopeo": [], "puller-rerun": [],
                                       "skopeo-rerun": []}
    try:
        with Registry(work / "src") as src:
            repos = seed(src)
            print(f"seeded {REPOS} repositories x {TAGS} tags in {src.url}", flush=True)
            for rep in range(args.reps):
                order = [("puller", puller_run), ("skopeo", skopeo_run)]
                if rep % 2:
                    order.reverse()
                for name, fn in order:
                    with Registry(work / f"dst-{name}-{rep}") as dst:
                        cold = fn(repos, dst)
                        again = fn(repos, dst)
                    results[name].append(cold)
                    results[f"{name}-rerun"].append(again)
                    print(f"rep {rep + 1}: {name:7s} cold {cold:6.2f}s  no-change re-run "
                          f"{again:6.2f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(f"median cold:   puller {med['puller']:.2f}s   skopeo sync {med['skopeo']:.2f}s   "
          f"ratio {med['skopeo'] / med['puller']:.1f}x")
    print(f"median re-run: puller {med['puller-rerun']:.2f}s   skopeo sync "
          f"{med['skopeo-rerun']:.2f}s   ratio {med['skopeo-rerun'] / med['puller-rerun']:.1f}x")


if __name__ == "__main__":
    main()
