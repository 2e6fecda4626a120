#!/usr/bin/env python3
"""How puller's pull cost grows with layer count and with bytes, next to ``skopeo copy``.

    python benchmarks/growth.py [--reps N] [--quick] [--out DIR] [--verify full|size]

Two sweeps, each a set of deterministic images (benchmarks/seed.py) pushed to one CNCF
distribution registry on loopback:

- **layers**: one image per point with N layers of 256 KiB each (N = 10, 25, 50, 100, 200;
  ``--quick``: 5, 10, 20, 40). The images of a point share their first layers with the
  larger points, which changes nothing for a pull into an empty destination.
- **bytes**: one image per point with 4 layers of S MiB each (S = 16, 32, 64, 128; ``--quick``:
  2, 4, 8, 16).

Per sweep, one untimed pull per tool of the smallest point comes first (bytecode cache, binaries
and the registry's files in the page cache). Then, for each of ``--reps`` repetitions, every
point is pulled once by puller and once by skopeo, the tool that goes first alternating from
point to point and from repetition to repetition. Repetitions are the outer loop, so a burst of
load from elsewhere spreads over all points instead of bending one end of the curve. Every run
goes into a fresh, empty destination (nothing cached), is measured as one process tree with
``run.measure`` (wall, user+sys CPU, peak RSS via ``os.wait4``), and is verified outside the
timing with run.py's checks (exit codes; every blob present with the right size and sha256,
the manifest digest reported or listed).

From the per-point medians of wall time, ordinary least squares gives, per tool:

- layers sweep: ``wall = a + b * layers``: ``a`` is the fixed cost (start-up, manifest), ``b``
  the cost of one more 256 KiB layer (ms per layer); ``b`` minus the bytes sweep's per-MiB
  cost times 0.25 MiB estimates the per-layer overhead net of moving its bytes;
- bytes sweep: ``wall = a + c * MiB`` (MiB of blobs the pull moves): ``c`` in ms per MiB and
  the implied MiB/s; R² says how linear wall time is in bytes.

Writes ``growth.md`` and ``growth.json`` (every run, the medians, the fits) to ``--out`` after
each sweep, and prints the tables. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402  (benchmarks/run.py; puts the repository on sys.path)
    BENCH, KiB, MiB, PY, TOOLS, WORK, Bench, Ctx, Tool, machine_lines, measure,
    run_error, save_report, seed,
)
from tests.support.registry import Registry  # noqa: E402

TOOL_NAMES = ["puller", "skopeo"]
LAYER_SIZE = 256 * KiB
LAYER_COUNTS = {False: [10, 25, 50, 100, 200], True: [5, 10, 20, 40]}
BYTES_LAYERS = 4
BYTES_MIB = {False: [16, 32, 64, 128], True: [2, 4, 8, 16]}
SEED_LAYERS = 6000          # layers sweep: seeds 6000.. (run.py uses 1000..5999)
SEED_BYTES = 7000           # bytes sweep: 7000 + 10 * point + layer


# ------------------------------------------------------------------------------------------------
# least squares
# ------------------------------------------------------------------------------------------------

def fit_line(xs: list[float], ys: list[float]) -> dict | None:
    """Ordinary least squares ``y = a + b * x``; None with fewer than two distinct x."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
    return {"a": a, "b": b, "r2": r2, "n": n}


# ------------------------------------------------------------------------------------------------
# sweeps
# ------------------------------------------------------------------------------------------------

@dataclass
class Point:
    x: float                  # layers (layers sweep) or MiB of blobs (bytes sweep)
    label: str
    image: seed.Image

    @property
    def blob_bytes(self) -> int:
        return sum(self.image.blobs().values())


@dataclass
class Sweep:
    name: str
    title: str
    x_name: str
    points: list[Point] = field(default_factory=list)


class Growth:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"growth-{os.getpid()}-", dir=WORK))
        self.layer_dir = WORK / "layers"
        self.registry: Registry | None = None
        self.runs: list[dict] = []
        self.done: list[Sweep] = []
        self.meta: dict = {}
        self.seq = 0

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- seeding ------------------------------------------------------------------------------
    def layers_sweep(self) -> Sweep:
        assert self.registry is not None
        counts = LAYER_COUNTS[self.quick]
        t0 = time.perf_counter()
        layers = [seed.build_layer(self.layer_dir, SEED_LAYERS + i, LAYER_SIZE)
                  for i in range(max(counts))]
        sw = Sweep("layers", f"N layers of {LAYER_SIZE // KiB} KiB, one image, cold", "layers")
        for n in counts:
            img = seed.Image("growth/layers", f"n{n}", layers[:n])
            seed.push_image(self.registry.url, img)
            sw.points.append(Point(float(n), f"{n} × {LAYER_SIZE // KiB} KiB", img))
        self.log(f"seeded layers sweep ({len(counts)} images, {max(counts)} distinct layers) in "
                 f"{time.perf_counter() - t0:.1f}s")
        return sw

    def bytes_sweep(self) -> Sweep:
        assert self.registry is not None
        sizes = BYTES_MIB[self.quick]
        t0 = time.perf_counter()
        sw = Sweep("bytes", f"{BYTES_LAYERS} layers of S MiB, one image, cold", "MiB")
        for k, s in enumerate(sizes):
            # not cached: built, pushed, deleted (the registry keeps its copy), so at most one
            # image's layers are on disk twice
            layers = [seed.build_layer(self.run_dir / "layers", SEED_BYTES + 10 * k + i,
                                       s * MiB, cache=False) for i in range(BYTES_LAYERS)]
            img = seed.Image("growth/bytes", f"m{s}", layers)
            try:
                seed.push_image(self.registry.url, img)
            finally:
                for layer in layers:
                    layer.path.unlink(missing_ok=True)
            pt = Point(0.0, f"{BYTES_LAYERS} × {s} MiB", img)
            pt.x = pt.blob_bytes / MiB
            sw.points.append(pt)
        self.log(f"seeded bytes sweep ({len(sizes)} images, "
                 f"{sum(p.blob_bytes for p in sw.points) / MiB:.0f} MiB) in "
                 f"{time.perf_counter() - t0:.1f}s")
        return sw

    # -- running ------------------------------------------------------------------------------
    def one_run(self, sw: Sweep, pt: Point, name: str, rep: int, timed: bool = True) -> dict:
        assert self.registry is not None
        tool: Tool = TOOLS[name]
        ctx = Ctx(self.registry.host, [pt.image])
        self.seq += 1
        dest = self.run_dir / f"dest-{self.seq}"
        cmds = tool.commands(ctx, dest)
        try:
            m = measure(cmds, self.run_dir / "logs" / f"{sw.name}-{pt.image.tag}-{name}-{rep}"
                        f"-{self.seq}")
            err = run_error(tool, ctx, dest, m, self.args.verify)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        rec = {
            "sweep": sw.name, "point": pt.label, "x": round(pt.x, 4), "tool": name, "rep": rep,
            **m.fields(), "blob_bytes": pt.blob_bytes, "layers": len(pt.image.layers),
            "ok": err is None, "error": err, "commands": cmds,
        }
        if timed:
            self.runs.append(rec)
        self.log(f"  {sw.name:6} {pt.label:>16} {name:7} rep {rep}: {m.wall:7.3f}s wall "
                 f"{m.user + m.sys:7.3f}s cpu {m.maxrss_kib / 1024:6.1f} MiB rss "
                 f"{'' if timed else '(untimed) '}{'ok' if err is None else 'FAILED: ' + err}")
        return rec

    def run_sweep(self, sw: Sweep) -> None:
        self.log(f"sweep {sw.name}: {sw.title}; points {', '.join(p.label for p in sw.points)}; "
                 f"{self.args.reps} reps")
        if not self.args.no_warmup:
            for name in TOOL_NAMES:
                self.one_run(sw, sw.points[0], name, -1, timed=False)
        for rep in range(self.args.reps):
            for i, pt in enumerate(sw.points):
                order = TOOL_NAMES if (rep + i) % 2 == 0 else TOOL_NAMES[::-1]
                for name in order:
                    self.one_run(sw, pt, name, rep)
        self.done.append(sw)
        self.write_results()

    # -- reporting ----------------------------------------------------------------------------
    def summary(self) -> dict:
        out: dict = {}
        for sw in self.done:
            rows = []
            for pt in sw.points:
                row: dict = {"point": pt.label, "x": pt.x, "layers": len(pt.image.layers),
                             "layer_bytes": sum(layer.size for layer in pt.image.layers),
                             "blob_bytes": pt.blob_bytes}
                for name in TOOL_NAMES:
                    runs = [r for r in self.runs if r["sweep"] == sw.name
                            and r["point"] == pt.label and r["tool"] == name]
                    walls = [r["wall_s"] for r in runs if r["ok"]]
                    row[name] = {"runs": len(runs), "ok": len(walls)}
                    if walls:
                        row[name].update({"wall_median": statistics.median(walls),
                                          "wall_min": min(walls), "wall_max": max(walls)})
                p, s = row["puller"].get("wall_median"), row["skopeo"].get("wall_median")
                row["ratio"] = s / p if p and s is not None else None
                rows.append(row)
            fits = {}
            for name in TOOL_NAMES:
                pts = [(r["x"], r[name]["wall_median"]) for r in rows if "wall_median" in r[name]]
                fits[name] = fit_line([x for x, _ in pts], [y for _, y in pts])
            out[sw.name] = {"title": sw.title, "x": sw.x_name, "rows": rows, "fits": fits}
        return out

    def write_results(self) -> None:
        config = {"quick": self.quick, "reps": self.args.reps, "verify": self.args.verify,
                  "warmup": not self.args.no_warmup}
        save_report(Path(self.args.out), "growth", self.meta, config, self.summary(),
                    self.runs, render_md)

    # -- main ---------------------------------------------------------------------------------
    def main(self) -> int:
        try:
            self.registry = Registry(self.run_dir / "registry")
            self.registry.start()
            self.log(f"registry {self.registry.url} (storage {self.registry.root})")
            # run.py's machine description (it only needs .registry), plus the processor field
            self.meta = Bench.collect_meta(types.SimpleNamespace(registry=self.registry))
            self.meta["processor"] = platform.processor() or "?"
            ms = [measure([["true"]], self.run_dir / "logs" / f"floor-{i}") for i in range(3)]
            self.meta["spawn_overhead_s"] = round(statistics.median(m.wall for m in ms), 4)
            for make in (self.layers_sweep, self.bytes_sweep):
                self.run_sweep(make())
        finally:
            if self.registry is not None:
                self.registry.stop()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        failed = [r for r in self.runs if not r["ok"]]
        self.log(f"done: {len(self.runs)} timed runs, {len(failed)} failed; results in "
                 f"{self.args.out}")
        print(render_tables(self.summary()))
        return 1 if failed else 0


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------

def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _wall(cell: dict) -> str:
    if "wall_median" not in cell:
        return f"failed ({cell['ok']}/{cell['runs']} ok)"
    s = f"{cell['wall_median']:.3f} ({cell['wall_min']:.3f}–{cell['wall_max']:.3f})"
    return s if cell["ok"] == cell["runs"] else f"{s} {cell['ok']}/{cell['runs']} ok"


def render_tables(summ: dict) -> str:
    L: list[str] = []
    for name, s in summ.items():
        L += [f"## {name} sweep: {s['title']}", ""]
        if name == "bytes":
            L.append("| layers × size | blob MiB | puller wall s (min–max) | puller MiB/s "
                     "| skopeo wall s (min–max) | skopeo MiB/s | skopeo / puller |")
            L.append("|---|---|---|---|---|---|---|")
        else:
            L.append("| layers × size | blob MiB | puller wall s (min–max) "
                     "| skopeo wall s (min–max) | skopeo / puller |")
            L.append("|---|---|---|---|---|")
        for r in s["rows"]:
            mib = r["blob_bytes"] / MiB
            cells = [r["point"], f"{mib:.1f}"]
            for tool in TOOL_NAMES:
                cells.append(_wall(r[tool]))
                if name == "bytes":
                    med = r[tool].get("wall_median")
                    cells.append(_fmt(mib / med if med else None, ".0f"))
            cells.append(_fmt(r["ratio"]))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    L += ["## Fits (least squares on the medians)", ""]
    L.append("| tool | layers: a (s) | b (ms/layer) | R² | bytes: a (s) | c (ms/MiB) "
             "| ⇒ MiB/s | R² |")
    L.append("|---|---|---|---|---|---|---|---|")
    net: list[str] = []
    for tool in TOOL_NAMES:
        fl = summ.get("layers", {}).get("fits", {}).get(tool)
        fb = summ.get("bytes", {}).get("fits", {}).get(tool)
        cells = [tool]
        cells += ([_fmt(fl["a"], ".3f"), _fmt(fl["b"] * 1000, ".2f"), _fmt(fl["r2"], ".4f")]
                  if fl else ["—"] * 3)
        if fb:
            c_ms = fb["b"] * 1000
            cells += [_fmt(fb["a"], ".3f"), _fmt(c_ms, ".2f"),
                      _fmt(1000 / c_ms if c_ms > 0 else None, ".0f"), _fmt(fb["r2"], ".4f")]
        else:
            cells += ["—"] * 4
        L.append("| " + " | ".join(cells) + " |")
        if fl and fb:
            lrows = summ["layers"]["rows"]
            per_layer_bytes = (sum(r["layer_bytes"] for r in lrows) / MiB
                               / sum(r["layers"] for r in lrows))
            net.append(f"- {tool}: per-layer overhead net of its bytes ≈ b − c × "
                       f"{per_layer_bytes:.3f} MiB = "
                       f"{(fl['b'] - fb['b'] * per_layer_bytes) * 1000:.2f} ms/layer")
    L.append("")
    L.append("Layers sweep: `wall = a + b × layers` (a: fixed cost — process start-up, "
             "manifest; b: cost of one more layer, its bytes included). Bytes sweep: "
             "`wall = a + c × MiB` over the MiB of blobs pulled (c: marginal cost per MiB, "
             "⇒ MiB/s = 1000 / c; R² near 1 = wall time linear in bytes).")
    L.append("")
    L += net
    if net:
        L.append("")
    return "\n".join(L)


def render_md(meta: dict, config: dict, summ: dict) -> str:
    L = ["# puller cost growth: layers and bytes", ""]
    L.append(f"{'Quick run' if config['quick'] else 'Full run'}, {config['reps']} repetition(s) "
             f"per tool and point, medians; command: `python benchmarks/growth.py "
             f"{' '.join(config['argv'])}`".rstrip())
    L.append("")
    L.append("Each run: one cold pull of one image into a fresh empty destination (puller: "
             "`puller pull --store DIR -q REF`; skopeo: `skopeo copy --src-tls-verify=false "
             "docker://REF oci:DIR:TAG`), from the CNCF distribution registry on loopback, "
             f"verified afterwards ({config['verify']}). Wall column: median (min–max). "
             "Ratio = skopeo median / puller median (> 1: puller is faster). MiB/s = blob bytes "
             "/ median wall time.")
    L.append("")
    L += machine_lines(meta, " (part of every intercept a)")
    L.append(render_tables(summ))
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure how puller's (and skopeo's) pull time "
                                 "grows with layer count and with bytes.")
    ap.add_argument("--quick", action="store_true",
                    help="small sweeps: 5..40 layers, 4 × 2..16 MiB")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per tool and point (3)")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--verify", choices=("full", "size"), default="full",
                    help="after each run check blobs by sha256 (full) or just sizes")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed pull per tool at the start of each sweep")
    args = ap.parse_args(argv)
    if not 1 <= args.reps <= 100:
        ap.error("--reps must be 1..100")
    if shutil.which("skopeo") is None:
        ap.error("skopeo is not installed (scripts/bootstrap.sh installs it)")
    if not Path(PY).exists():
        ap.error(f"no python for puller at {PY}")
    WORK.mkdir(parents=True, exist_ok=True)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return Growth(args).main()
    except KeyboardInterrupt:
        print("growth.py: interrupted; registry stopped, work files removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
