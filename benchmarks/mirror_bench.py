"""Bulk mirror benchmark: puller mirror against skopeo sync, registry to registry.

Seeds 20 repositories x 2 tags (every image: one shared 16 MB base layer, a 4 MB layer
shared by the two tags of a repository, and a small layer of its own) in one real
distribution registry, then mirrors them into a fresh second registry with

- ``puller mirror --target B/p SRC/repo0 ... SRC/repo19`` (one process), and
- ``skopeo sync --src docker --dest docker --src-tls-verify=false --dest-tls-verify=false
  SRC/repoN B/s`` (one process per repository, as ``--src docker`` takes one), and
- ``skopeo sync --src yaml --dest docker --dest-tls-verify=false FILE B/y`` (one process,
  the repositories listed in a YAML file); ratios are against the faster of the two,

each tool going first in turn, ``--reps`` times (default 3). After each cold run the same
command runs again against the now-complete target (the no-change re-run). Prints the
medians and the ratio, and writes them to ``benchmarks/results/mirror.md``.

Besides wall time it records CPU seconds: the tool's own (all its processes) and each
registry's (from ``/proc``) during the cold run. Two Go registries doing the
receiving, hashing and fsync-ing share the same two cores as the tool, so their CPU
sets a floor no client can go below: ``(tool + registries CPU) / cores`` is reported
next to the wall time. Run from the repository root::

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
sys.path.insert(0, str(ROOT / "benchmarks"))

from tests.support.images import build_image, push  # noqa: E402
from tests.support.registry import Registry  # noqa: E402
from run import tool_python  # noqa: E402  (puller as installed: see run.tool_python)

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
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: byte code cached
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:4])} ...: {r.stderr.strip()[-500:]}")
    return elapsed


def puller_run(repos: list[str], dst: Registry) -> float:
    return timed([tool_python(), "-m", "puller", "mirror", "-q", "--target", f"{dst.host}/p",
                  *repos])


def skopeo_run(repos: list[str], dst: Registry) -> float:
    total = 0.0
    for repo in repos:
        total += timed(["skopeo", "sync", "--src", "docker", "--dest", "docker",
                        "--src-tls-verify=false", "--dest-tls-verify=false", repo,
                        f"{dst.host}/s"])
    return total


def skopeo_yaml_run(repos: list[str], dst: Registry) -> float:
    """skopeo sync's own way to take many repositories in one process: a YAML source
    listing them (an empty tag list means every tag)."""
    host = repos[0].split("/", 1)[0]
    lines = [f"{host}:", "  tls-verify: false", "  images:"]
    lines += [f"    {r.split('/', 1)[1]}: []" for r in repos]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        return timed(["skopeo", "sync", "--src", "yaml", "--dest", "docker",
                      "--dest-tls-verify=false", f.name, f"{dst.host}/y"])
    finally:
        os.unlink(f.name)


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("skopeo") is None:
        raise SystemExit("skopeo is not installed")
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    tools = [("puller", puller_run), ("skopeo", skopeo_run), ("skopeo-yaml", skopeo_yaml_run)]
    results: dict[str, list[float]] = {
        f"{name}{part}": [] for name, _ in tools
        for part in ("", "-rerun", "-cpu", "-registries-cpu")}
    try:
        with Registry(work / "src") as src:
            repos = seed(src)
            print(f"seeded {REPOS} repositories x {TAGS} tags in {src.url}", flush=True)
            for rep in range(args.reps):
                first = rep % len(tools)  # each tool goes first in turn
                order = tools[first:] + tools[:first]
                for name, fn in order:
                    with Registry(work / f"dst-{name}-{rep}") as dst:
                        before = (children_cpu(), cpu_of(src.proc.pid), cpu_of(dst.proc.pid))
                        cold = fn(repos, dst)
                        after = (children_cpu(), cpu_of(src.proc.pid), cpu_of(dst.proc.pid))
                        again = fn(repos, dst)
                    tool_cpu = after[0] - before[0]
                    reg_cpu = (after[1] - before[1]) + (after[2] - before[2])
                    results[name].append(cold)
                    results[f"{name}-rerun"].append(again)
                    results[f"{name}-cpu"].append(tool_cpu)
                    results[f"{name}-registries-cpu"].append(reg_cpu)
                    print(f"rep {rep + 1}: {name:11s} cold {cold:6.2f}s (CPU: tool {tool_cpu:.2f}s,"
                          f" registries {reg_cpu:.2f}s)  no-change re-run {again:6.2f}s",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    cores = os.cpu_count() or 1
    # The peer is skopeo sync run its faster way in this run (per repository or YAML).
    best = min(("skopeo", "skopeo-yaml"), key=lambda k: med[k])
    best_rerun = min(("skopeo", "skopeo-yaml"), key=lambda k: med[f"{k}-rerun"])
    cold_ratio = med[best] / med["puller"]
    rerun_ratio = med[f"{best_rerun}-rerun"] / med["puller-rerun"]
    print()
    print(f"median cold:   puller {med['puller']:.2f}s   skopeo sync {med['skopeo']:.2f}s "
          f"(YAML {med['skopeo-yaml']:.2f}s)   ratio {cold_ratio:.2f}x")
    print(f"median re-run: puller {med['puller-rerun']:.2f}s   skopeo sync "
          f"{med['skopeo-rerun']:.2f}s (YAML {med['skopeo-yaml-rerun']:.2f}s)   "
          f"ratio {rerun_ratio:.2f}x")
    rows = []
    for name, label in (("puller", "puller mirror (one process)"),
                        ("skopeo", "skopeo sync (one process per repository)"),
                        ("skopeo-yaml", "skopeo sync --src yaml (one process)")):
        floor = (med[f"{name}-cpu"] + med[f"{name}-registries-cpu"]) / cores
        rows.append(f"| {label} | {med[name]:.2f} s | {med[f'{name}-cpu']:.2f} s | "
                    f"{med[f'{name}-registries-cpu']:.2f} s | {floor:.2f} s | "
                    f"{med[f'{name}-rerun']:.2f} s |")
    text = "\n".join([
        "# Bulk mirror: puller mirror vs skopeo sync",
        "",
        f"{REPOS} repositories x {TAGS} tags (one shared 16 MB base, a 4 MB layer per "
        "repository, a 64 KiB layer per tag), registry to registry, both Debian "
        f"`docker-registry` on this machine ({cores} cores). Medians of {args.reps} "
        "repetitions, each tool going first in turn; command: "
        f"`.venv/bin/python benchmarks/mirror_bench.py --reps {args.reps}`.",
        "",
        "| tool | cold wall | tool CPU | registries CPU | CPU / cores | no-change re-run |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Cold: puller is {cold_ratio:.2f}x faster than skopeo sync's faster way; "
        f"no-change re-run {rerun_ratio:.2f}x faster.",
        "",
        "\"CPU / cores\" is the CPU the tool and both registries spent in the cold run, "
        "spread over the machine's cores: a wall time near it means the machine was busy "
        "throughout and the registries' share is what is left.",
        "",
    ])
    out = ROOT / "benchmarks" / "results" / "mirror.md"
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
