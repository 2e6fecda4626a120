"""``puller bench``: measure how fast a registry serves an image to this machine.

Each run pulls the image into a throw-away store (never the user's), cold unless
``--warm``, and records from the engine's own events: time to the manifest, time to the
first blob byte on disk, each layer's throughput, and the total. Across runs it reports
the median and the 95th percentile, and says which resource bounded the pull: this
process's CPU (hashing, parsing), the disk, or the network and registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreError
from .fsutil import write_all

__all__ = ["RunStats", "BenchReport", "bench", "machine_rates"]

_MB = 1024 * 1024


@dataclass(slots=True)
class RunStats:
    concurrency: int
    wall: float  # seconds from start to the image being indexed
    to_manifest: float | None  # seconds until the platform manifest was resolved
    to_first_byte: float | None  # seconds until the first blob bytes were on disk
    bytes: int  # blob bytes fetched
    blobs: int
    cpu: float  # user+sys seconds of this process during the run
    layer_mbps: list[float] = field(default_factory=list)

    @property
    def mbps(self) -> float:
        return self.bytes / _MB / self.wall if self.wall > 0 else 0.0


@dataclass(slots=True)
class BenchReport:
    reference: str
    digest: str
    runs: list[RunStats]
    hash_mbps: float  # one core, sha256
    disk_mbps: float  # sequential write + fsync into the bench directory
    cpus: int

    def summary(self) -> list[dict[str, Any]]:
        """One row per concurrency: medians and p95 across runs, and the bound."""
        rows = []
        for c in sorted({r.concurrency for r in self.runs}):
            rs = [r for r in self.runs if r.concurrency == c]
            walls = [r.wall for r in rs]
            mbps = [r.mbps for r in rs]
            layers = [m for r in rs for m in r.layer_mbps]
            util = statistics.median(r.cpu / r.wall for r in rs if r.wall > 0) / self.cpus
            row: dict[str, Any] = {
                "concurrency": c,
                "runs": len(rs),
                "wall_p50": _pct(walls, 50), "wall_p95": _pct(walls, 95),
                "mbps_p50": _pct(mbps, 50), "mbps_p95": _pct(mbps, 5),  # p95 of speed: slow end
                "to_manifest_p50": _pct([r.to_manifest for r in rs if r.to_manifest], 50),
                "to_first_byte_p50": _pct([r.to_first_byte for r in rs if r.to_first_byte], 50),
                "layer_mbps_p50": _pct(layers, 50),
                "bytes": rs[0].bytes,
                "blobs": rs[0].blobs,
                "cpu_utilisation": round(util, 3),
            }
            row["bound"] = self._bound(row)
            rows.append(row)
        return rows

    def _bound(self, row: dict[str, Any]) -> str:
        if not row["bytes"]:
            return "round trips (nothing to download)"
        if row["cpu_utilisation"] >= 0.85:
            return "cpu (hashing and parsing in this process)"
        speed = row["mbps_p50"] or 0.0
        if speed >= 0.7 * self.disk_mbps:
            return "disk"
        if speed >= 0.7 * self.hash_mbps * self.cpus:
            return "hashing"
        return "network or registry"


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return round(v[lo] + (v[hi] - v[lo]) * (k - lo), 4)


def machine_rates(directory: Path, sample: int = 64 * _MB) -> tuple[float, float]:
    """(sha256 MB/s on one core, disk MB/s for a write + fsync in ``directory``)."""
    data = os.urandom(sample)
    t = time.perf_counter()
    hashlib.sha256(data).digest()
    hash_rate = sample / _MB / max(time.perf_counter() - t, 1e-9)
    path = directory / ".disk-probe"
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    disk_rate = sample / _MB / max(time.perf_counter() - t, 1e-9)
    return round(hash_rate, 1), round(disk_rate, 1)


async def _one_run(ref: str, store: Path, concurrency: int, options: Any,
                   client_options: Any) -> tuple[RunStats, str]:
    from .api import Puller, PullOptions

    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    started: dict[str, tuple[float, int]] = {}
    layer_rates: list[float] = []

    def on_event(ev: Any) -> None:
        now = time.perf_counter()
        if ev.kind == "manifest.resolved":
            marks.setdefault("manifest", now)
        elif ev.kind == "blob.started":
            started[ev.digest] = (now, ev.offset)
        elif ev.kind == "blob.progress":
            marks.setdefault("first_byte", now)
        elif ev.kind == "blob.done" and ev.digest in started and ev.bytes_fetched >= _MB:
            # (blobs under a MiB measure round trips, not throughput)
            begun, _ = started.pop(ev.digest)
            if now > begun:
                layer_rates.append(ev.bytes_fetched / _MB / (now - begun))

    popts = PullOptions(platform=options.platform, all_platforms=options.all_platforms,
                        concurrency=concurrency, segments=options.segments)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    async with Puller(store=store, options=popts, client_options=client_options,
                      on_event=on_event) as p:
        result = await p.pull(ref)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return RunStats(
        concurrency=concurrency, wall=round(wall, 4),
        to_manifest=round(marks["manifest"] - t0, 4) if "manifest" in marks else None,
        to_first_byte=round(marks["first_byte"] - t0, 4) if "first_byte" in marks else None,
        bytes=result.bytes_fetched, blobs=result.blobs_fetched, cpu=round(cpu, 4),
        layer_mbps=[round(x, 1) for x in layer_rates]), result.digest


async def bench(ref: str, *, runs: int, concurrencies: list[int], warm: bool,
                options: Any, client_options: Any, work_dir: str | None = None,
                progress: Any = None) -> BenchReport:
    """Pull ``ref`` ``runs`` times per concurrency into throw-away stores."""
    try:
        base = Path(tempfile.mkdtemp(prefix="puller-bench-", dir=work_dir))
    except OSError as exc:  # (FileNotFoundError too: "no usable temporary directory")
        where = work_dir or "the temporary directory ($TMPDIR)"
        hint = "" if work_dir else " (give --work-dir)"
        raise StoreError(f"bench: cannot make its throw-away stores in {where}: "
                         f"{exc.strerror or exc}{hint}") from None
    try:
        hash_mbps, disk_mbps = await asyncio.to_thread(machine_rates, base)
        all_runs: list[RunStats] = []
        digest = ""
        for c in concurrencies:
            warm_store = base / f"warm-{c}"
            if warm:  # fill once, untimed
                _, digest = await _one_run(ref, warm_store, c, options, client_options)
            for i in range(runs):
                store = warm_store if warm else base / f"run-{c}-{i}"
                stats, digest = await _one_run(ref, store, c, options, client_options)
                all_runs.append(stats)
                if progress is not None:
                    progress(stats)
                if not warm:
                    await asyncio.to_thread(shutil.rmtree, store, True)
        return BenchReport(reference=ref, digest=digest, runs=all_runs, hash_mbps=hash_mbps,
                           disk_mbps=disk_mbps, cpus=os.cpu_count() or 1)
    finally:
        await asyncio.to_thread(shutil.rmtree, base, True)


def report_json(report: BenchReport) -> dict[str, Any]:
    return {"reference": report.reference, "digest": report.digest,
            "machine": {"cpus": report.cpus, "sha256_mbps_per_core": report.hash_mbps,
                        "disk_write_mbps": report.disk_mbps},
            "summary": report.summary(), "runs": [asdict(r) for r in report.runs]}


def report_text(report: BenchReport) -> str:
    lines = [f"{report.reference}  {report.digest}",
             f"machine: {report.cpus} CPUs, sha256 {report.hash_mbps:.0f} MB/s per core, "
             f"disk write {report.disk_mbps:.0f} MB/s",
             "",
             f"{'conc':>4} {'runs':>4} {'wall p50':>9} {'wall p95':>9} {'MB/s p50':>9} "
             f"{'MB/s p95':>9} {'manifest':>9} {'1st byte':>9} {'layer MB/s':>10}  bound"]

    def f(v: float | None, width: int, digits: int = 3) -> str:
        return f"{v:>{width}.{digits}f}" if v is not None else f"{'-':>{width}}"

    for row in report.summary():
        lines.append(
            f"{row['concurrency']:>4} {row['runs']:>4} {f(row['wall_p50'], 9)} "
            f"{f(row['wall_p95'], 9)} {f(row['mbps_p50'], 9, 1)} {f(row['mbps_p95'], 9, 1)} "
            f"{f(row['to_manifest_p50'], 9)} {f(row['to_first_byte_p50'], 9)} "
            f"{f(row['layer_mbps_p50'], 10, 1)}  {row['bound']}")
    lines.append("")
    lines.append("wall: start to image indexed (s); MB/s: blob bytes / wall (p95 = the slow "
                 "end); manifest / 1st byte: seconds from start")
    return "\n".join(lines)
