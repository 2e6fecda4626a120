#!/usr/bin/env python3
"""puller vs. the tools users would pick instead, on a real local registry, in one run.

    python benchmarks/run.py [--quick] [--scenarios large,small] [--reps N] [--out DIR]

Starts the CNCF distribution registry on loopback, seeds deterministic images, and for each
scenario runs every tool ``--reps`` times, alternating tools run by run (the order is rotated
every repetition), each run into a fresh empty destination (warm: one pre-filled by an untimed
run of the same tool). Each run is a child process tree measured with ``os.wait4``: wall time,
user+sys CPU, peak RSS. Every run's output is verified (every expected blob present with the
right size -- and sha256 unless ``--verify size`` -- plus the manifest digest the tool reports)
so that a broken run cannot look fast. Writes ``results.md``, ``results.json`` and
``chart.png`` to ``--out``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import seed  # noqa: E402  (benchmarks/seed.py)
from tests.support.registry import Registry  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() \
    else sys.executable
DXF_PY = WORK / "dxf-venv" / "bin" / "python"
RUN_VENV = WORK / "run-venv"
RUN_TIMEOUT = 600.0  # seconds, per run (all of a run's commands); the child tree is killed after
# Python tools get bytecode caching as an installed package would have it (this environment
# may set PYTHONDONTWRITEBYTECODE, which would make every run compile puller from source); the
# cache lives under .work, not in the source tree. The untimed warm-up runs fill it.
TOOL_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
TOOL_ENV["PYTHONPYCACHEPREFIX"] = str(WORK / "pycache")
ALL_SCENARIOS = ["large", "small", "shared", "warm", "huge", "sweep", "wan", "wan1", "tls"]
SWEEP = [1, 2, 4, 8, 16, 32]


@functools.cache
def tool_python() -> str:
    """The interpreter puller and the floor run under: puller as a user's installation
    imports it, without the development install's import hook.

    ``.venv`` holds puller as an editable install, whose ``.pth`` file imports a finder
    module at every interpreter start (about 17 ms here: a quarter of puller's start-up,
    paid by nothing a user runs). ``benchmarks/.work/run-venv`` is a bare venv of the same
    Python whose one ``.pth`` file only lists directories -- this checkout and ``.venv``'s
    site-packages (puller's dependencies) -- the way a plain ``pip install`` puts packages
    on ``sys.path``. Falls back to ``.venv``'s python where the venv can't be made."""
    py = RUN_VENV / "bin" / "python"
    try:
        if not py.exists():
            subprocess.run([PY, "-m", "venv", "--without-pip", str(RUN_VENV)], check=True,
                           capture_output=True, timeout=120)
        purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        site = subprocess.run([PY, "-c", purelib], check=True, capture_output=True,
                              text=True).stdout.strip()
        own = subprocess.run([str(py), "-c", purelib], check=True, capture_output=True,
                             text=True).stdout.strip()
        Path(own, "puller-checkout.pth").write_text(f"{ROOT}\n{site}\n")
        subprocess.run([str(py), "-c", "import puller.cli, tqdm, uvloop"], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return PY
    return str(py)


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------

def sizes(quick: bool) -> dict:
    if quick:
        return {"large": [8 * MiB] * 8, "small": [256 * KiB] * 30,
                "shared_base": [4 * MiB, 3 * MiB, 2 * MiB], "shared_own": [1 * MiB, 1 * MiB],
                "huge": [256 * MiB], "single": [64 * MiB]}
    return {"large": [64 * MiB] * 8, "small": [256 * KiB] * 100,
            "shared_base": [16 * MiB, 12 * MiB, 8 * MiB], "shared_own": [3 * MiB, 2 * MiB],
            "huge": [1024 * MiB], "single": [256 * MiB]}


# ------------------------------------------------------------------------------------------------
# measuring one run
# ------------------------------------------------------------------------------------------------

@dataclass
class Measured:
    wall: float
    user: float
    sys: float
    maxrss_kib: int
    rcs: list[int]
    stdout: str
    stderr: str
    timed_out: bool = False

    def fields(self) -> dict:
        """The figures a results record keeps of this run."""
        return {"wall_s": round(self.wall, 4), "user_s": round(self.user, 4),
                "sys_s": round(self.sys, 4), "cpu_s": round(self.user + self.sys, 4),
                "peak_rss_mib": round(self.maxrss_kib / 1024, 1)}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def measure(cmds: list[list[str]], log_dir: Path, timeout: float = RUN_TIMEOUT) -> Measured:
    """Run ``cmds`` one after the other through benchmarks/launch.py; wall time of the
    sequence, summed rusage, max peak RSS (see launch.py for why a launcher).

    The launcher and everything below it are one session (process group): on timeout, on
    Ctrl-C and after every run the whole group is killed, so nothing outlives its run."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout", log_dir / "stderr"
    res_path, cmds_path = log_dir / "result.json", log_dir / "cmds.json"
    cmds_path.write_text(json.dumps(cmds))
    res_path.unlink(missing_ok=True)
    timed_out = False
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        proc = subprocess.Popen([PY, "-I", "-S", str(BENCH / "launch.py"), str(res_path),
                                 str(cmds_path)], stdin=subprocess.DEVNULL, stdout=fo,
                                stderr=fe, start_new_session=True, cwd=str(ROOT),
                                env=TOOL_ENV)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            _kill_group(proc.pid)  # stray grandchildren, or the timed-out run
            proc.wait()
    try:
        r = json.loads(res_path.read_text())
    except (OSError, ValueError):
        r = {"wall": timeout if timed_out else 0.0, "user": 0.0, "sys": 0.0, "maxrss_kib": 0,
             "rcs": [-1]}
    return Measured(r["wall"], r["user"], r["sys"], r["maxrss_kib"], r["rcs"],
                    out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                    timed_out)


class _SharedStorage(Registry):
    """A registry serving another one's storage (here: over TLS)."""

    def __init__(self, tmp_dir: Path, storage: Path, **kw: object) -> None:
        super().__init__(tmp_dir, **kw)  # type: ignore[arg-type]
        self._storage = storage

    def _config(self) -> dict:
        config = super()._config()
        config["storage"]["filesystem"]["rootdirectory"] = str(self._storage)
        return config


# ------------------------------------------------------------------------------------------------
# tools
# ------------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    """What a tool needs to know about the scenario it runs in."""
    host: str                    # registry (or proxy) host:port the tool pulls from
    images: list[seed.Image]
    concurrency: int | None = None
    tls: bool = False            # the registry speaks HTTPS (self-signed)

    def ref(self, img: seed.Image) -> str:
        return f"{self.host}/{img.repo}:{img.tag}"


@dataclass
class Tool:
    name: str
    commands: Callable[[Ctx, Path], list[list[str]]]
    verify: Callable[[Ctx, Path, Measured, str], str | None]  # -> error message or None
    note: str = ""


def _check_blob(path: Path, digest: str, size: int, mode: str) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"missing {digest[:19]} ({path})"
    if st.st_size != size:
        return f"{digest[:19]}: size {st.st_size} != {size}"
    if mode == "full":
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 * MiB):
                h.update(chunk)
        if "sha256:" + h.hexdigest() != digest:
            return f"{digest[:19]}: content does not match its digest"
    return None


def _check_layout(ctx: Ctx, dest: Path, mode: str, with_manifests: bool = True) -> str | None:
    bdir = dest / "blobs" / "sha256"
    for img in ctx.images:
        want = dict(img.blobs())
        if with_manifests:
            want[img.digest] = len(img.manifest)
        for digest, size in want.items():
            err = _check_blob(bdir / digest.split(":", 1)[1], digest, size, mode)
            if err:
                return err
    return None


def _check_pinned(ctx: Ctx, out: str) -> str | None:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for img in ctx.images:
        if not any(ln.endswith("@" + img.digest) and f"/{img.repo}@" in ln for ln in lines):
            return f"no pinned ref for {img.repo}:{img.tag}@{img.digest[:19]} in stdout"
    return None


def puller_cmds(ctx: Ctx, dest: Path) -> list[list[str]]:
    argv = [tool_python(), "-m", "puller", "pull", "--store", str(dest), "-q"]
    if ctx.concurrency:
        argv += ["-c", str(ctx.concurrency)]
    return [argv + [ctx.ref(i) for i in ctx.images]]


def puller_one_stream_cmds(ctx: Ctx, dest: Path) -> list[list[str]]:
    """puller with parallel byte ranges turned off: one connection per blob."""
    return [cmd[:-len(ctx.images)] + ["--segments", "1"] + cmd[-len(ctx.images):]
            for cmd in puller_cmds(ctx, dest)]


def puller_verify(ctx: Ctx, dest: Path, m: Measured, mode: str) -> str | None:
    return _check_pinned(ctx, m.stdout) or _check_layout(ctx, dest, mode)


def skopeo_cmds(ctx: Ctx, dest: Path) -> list[list[str]]:
    return [["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ctx.ref(i)}",
             f"oci:{dest}:{i.tag}"] for i in ctx.images]


def skopeo_verify(ctx: Ctx, dest: Path, m: Measured, mode: str) -> str | None:
    try:
        index = json.loads((dest / "index.json").read_text())
    except (OSError, ValueError) as exc:
        return f"index.json: {exc}"
    listed = {d.get("digest") for d in index.get("manifests", [])}
    for img in ctx.images:
        if img.digest not in listed:
            return f"index.json lacks {img.digest[:19]} (skopeo re-encoded the manifest?)"
    return _check_layout(ctx, dest, mode)


def sync_cmds(ctx: Ctx, dest: Path) -> list[list[str]]:
    repos = sorted({i.repo for i in ctx.images})
    return [["skopeo", "sync", "--src", "docker", "--dest", "dir", "--src-tls-verify=false",
             f"{ctx.host}/{r}", str(dest)] for r in repos]


def sync_verify(ctx: Ctx, dest: Path, m: Measured, mode: str) -> str | None:
    for img in ctx.images:
        d = dest / f"{img.repo.rsplit('/', 1)[-1]}:{img.tag}"
        for digest, size in img.blobs().items():
            err = _check_blob(d / digest.split(":", 1)[1], digest, size, mode)
            if err:
                return err
        try:
            man = (d / "manifest.json").read_bytes()
        except OSError as exc:
            return f"{d.name}: {exc}"
        if hashlib.sha256(man).hexdigest() != img.digest.split(":", 1)[1]:
            return f"{d.name}: manifest.json is not the registry's manifest"
    return None


def floor_cmds(ctx: Ctx, dest: Path) -> list[list[str]]:
    return [[tool_python(), str(BENCH / "floor.py"), "--dest", str(dest)] +
            (["--tls"] if ctx.tls else []) + [ctx.ref(i) for i in ctx.images]]


def dxf_cmds(ctx: Ctx, dest: Path) -> list[list[str]]:
    return [[str(DXF_PY), str(BENCH / "dxf_pull.py"), "--dest", str(dest)]
            + [ctx.ref(i) for i in ctx.images]]


TOOLS = {
    "puller": Tool("puller", puller_cmds, puller_verify,
                   "one `puller pull -q` process for all refs of the scenario"),
    "puller-1stream": Tool("puller", puller_one_stream_cmds, puller_verify,
                           "puller with --segments 1 (one connection per blob)"),
    "skopeo": Tool("skopeo", skopeo_cmds, skopeo_verify,
                   "`skopeo copy` to one OCI layout; one process per image, run sequentially"),
    "skopeo-sync": Tool("skopeo-sync", sync_cmds, sync_verify,
                        "`skopeo sync --dest dir` of the whole repository: one directory per "
                        "image, so shared layers are stored (and fetched) once per image"),
    "floor": Tool("floor", floor_cmds, puller_verify,
                  "benchmarks/floor.py: one thread per blob, http.client, no retries"),
    "python-dxf": Tool("python-dxf", dxf_cmds, puller_verify,
                       "benchmarks/dxf_pull.py: python-dxf's get_manifest + pull_blob per blob, "
                       "sequential (python-dxf has no parallel download), separate venv"),
}


# ------------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    title: str
    images: list[seed.Image]
    tools: list[tuple[str, Tool, int | None]]  # (label, tool, concurrency)
    baseline: str = "puller"
    warm: bool = False
    via_proxy: bool = False
    via_tls: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def blob_bytes(self) -> int:
        seen: dict[str, int] = {}
        for img in self.images:
            seen.update(img.blobs())
        return sum(seen.values())


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.sz = sizes(args.quick)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=WORK))
        self.layer_dir = WORK / "layers"
        self.registry: Registry | None = None
        self.proxy: subprocess.Popen | None = None
        self.proxy_host: str | None = None
        self.tls_registry: Registry | None = None
        self.runs: list[dict] = []
        self.scenarios_done: list[Scenario] = []
        self.meta: dict = {}
        self.seq = 0
        self.images: dict[str, list[seed.Image]] = {}
        self.dxf = DXF_PY.exists() and not args.no_dxf and self._dxf_ok()

    # -- setup --------------------------------------------------------------------------------
    def _dxf_ok(self) -> bool:
        return subprocess.run([str(DXF_PY), "-c", "import dxf"], capture_output=True,
                              timeout=60).returncode == 0

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def layers(self, base_seed: int, sizes_: list[int], cache: bool = True) -> list[seed.Layer]:
        return [seed.build_layer(self.layer_dir, base_seed + i, s, cache=cache)
                for i, s in enumerate(sizes_)]

    def image_set(self, name: str) -> list[seed.Image]:
        """Build (or take from the cache) and push the images of one set, once per run."""
        if name in self.images:
            return self.images[name]
        t0 = time.perf_counter()
        assert self.registry is not None
        if name == "large":
            imgs = [seed.Image("bench/large", "v1", self.layers(1000, self.sz["large"]))]
        elif name == "small":
            imgs = [seed.Image("bench/small", "v1", self.layers(2000, self.sz["small"]))]
        elif name == "shared":
            base = self.layers(3000, self.sz["shared_base"])
            imgs = [seed.Image("bench/shared", f"s{k}",
                               base + self.layers(3100 + 10 * k, self.sz["shared_own"]))
                    for k in range(5)]
        elif name == "single":
            imgs = [seed.Image("bench/single", "v1", self.layers(5000, self.sz["single"]))]
        elif name == "huge":
            # not cached: built, pushed and deleted (disk), size-suffixed so quick != full
            imgs = [seed.Image("bench/huge", "v1", self.layers(4000, self.sz["huge"], cache=False))]
        else:
            raise ValueError(name)
        for img in imgs:
            seed.push_image(self.registry.url, img)
        if name == "huge":
            for layer in imgs[0].layers:
                layer.path.unlink(missing_ok=True)
        self.images[name] = imgs
        total = sum(s for s in {d: s for i in imgs for d, s in i.blobs().items()}.values())
        self.log(f"seeded {name}: {len(imgs)} image(s), {total / MiB:.1f} MiB unique blobs "
                 f"({time.perf_counter() - t0:.1f}s)")
        return imgs

    def start_proxy(self) -> str:
        if self.proxy_host:
            return self.proxy_host
        assert self.registry is not None
        libc = ctypes.CDLL(None, use_errno=True)

        def die_with_parent() -> None:
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

        self.proxy = subprocess.Popen(
            [PY, str(BENCH / "wanproxy.py"), "--upstream", self.registry.url,
             "--latency", str(self.args.wan_latency), "--rate", str(self.args.wan_rate)],
            stdout=subprocess.PIPE, stderr=open(self.run_dir / "wanproxy.log", "wb"),
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 20
        line = b""
        import selectors
        with selectors.DefaultSelector() as sel:
            sel.register(self.proxy.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline and not line.endswith(b"\n"):
                if not sel.select(timeout=0.5):
                    if self.proxy.poll() is not None:
                        break
                    continue
                b = os.read(self.proxy.stdout.fileno(), 64)
                if not b:
                    break
                line += b
        if not line.startswith(b"PORT "):
            self.stop_proxy()
            raise RuntimeError(f"wanproxy did not start: {line!r}; see "
                               f"{self.run_dir / 'wanproxy.log'}")
        self.proxy_host = f"127.0.0.1:{int(line.split()[1])}"
        self.log(f"WAN proxy on {self.proxy_host}: +{self.args.wan_latency * 1000:.0f} ms per "
                 f"request, {self.args.wan_rate / 1e6:.0f} MB/s per connection")
        return self.proxy_host

    def start_tls(self) -> Registry:
        """A second registry on the same storage, speaking HTTPS with a self-signed
        certificate (every tool is told not to check it)."""
        if self.tls_registry is not None:
            return self.tls_registry
        assert self.registry is not None
        import trustme

        d = self.run_dir / "tls"
        d.mkdir(exist_ok=True)
        cert = trustme.CA().issue_cert("127.0.0.1")
        with open(d / "server.crt", "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
        cert.private_key_pem.write_to_path(str(d / "server.key"))
        self.tls_registry = _SharedStorage(self.run_dir / "registry-tls", self.registry.root,
                                           tls=(d / "server.crt", d / "server.key")).start()
        self.log(f"TLS registry {self.tls_registry.url} (storage {self.registry.root})")
        return self.tls_registry

    def stop_proxy(self) -> None:
        p, self.proxy = self.proxy, None
        self.proxy_host = None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def scenario(self, name: str) -> Scenario:
        base_tools = [("puller", TOOLS["puller"], None), ("skopeo", TOOLS["skopeo"], None),
                      ("floor", TOOLS["floor"], None)]
        if self.dxf:
            base_tools.append(("python-dxf", TOOLS["python-dxf"], None))
        sz = self.sz
        if name == "large":
            return Scenario(name, f"{len(sz['large'])} x {sz['large'][0] // MiB} MiB layers, cold",
                            self.image_set("large"), base_tools)
        if name == "small":
            return Scenario(name, f"{len(sz['small'])} x {sz['small'][0] // KiB} KiB layers, cold",
                            self.image_set("small"), base_tools)
        if name == "shared":
            imgs = self.image_set("shared")
            tools = base_tools[:2] + [("skopeo-sync", TOOLS["skopeo-sync"], None)] + base_tools[2:]
            return Scenario(name, "5 images sharing a 3-layer base, one run (dedupe)", imgs, tools,
                            notes=["puller and floor get all 5 refs in one process; skopeo copy "
                                   "runs 5 processes one after another into one OCI layout "
                                   "(it skips blobs the layout already has); skopeo sync copies "
                                   "the repository's 5 tags into 5 separate dirs (no cross-image "
                                   "dedupe, so it downloads the base 5 times)",
                                   "MB/s is unique blob bytes / wall time for every tool"])
        if name == "warm":
            return Scenario(name, "re-pull of the `large` image into a store that has it",
                            self.image_set("large"), base_tools, warm=True,
                            notes=["destination pre-filled by one untimed run of the same tool; "
                                   "no blob bytes need to move, so MB/s is not meaningful"])
        if name == "huge":
            return Scenario(name, f"one {sz['huge'][0] // MiB} MiB layer, cold",
                            self.image_set("huge"), base_tools)
        if name == "sweep":
            tools = [(f"puller -c{c}", TOOLS["puller"], c) for c in SWEEP]
            tools.append(("floor", TOOLS["floor"], None))
            return Scenario(name, "puller concurrency sweep on the `large` image",
                            self.image_set("large"), tools, baseline="puller -c8",
                            notes=["ratio is vs. puller's default concurrency (-c8); floor "
                                   "(one thread per blob) as reference"])
        if name == "wan":
            imgs = self.image_set("large")
            self.start_proxy()
            return Scenario(name, f"the `large` image through a WAN-like proxy "
                            f"(+{self.args.wan_latency * 1000:.0f} ms/request, "
                            f"{self.args.wan_rate / 1e6:.0f} MB/s per connection)",
                            imgs, base_tools, via_proxy=True,
                            notes=["the proxy is a Python/aiohttp process on the same 2 cores; "
                                   "its CPU is not counted in any tool's CPU"])
        if name == "tls":
            self.start_tls()
            return Scenario(name, f"the `large` image over HTTPS ({len(sz['large'])} x "
                            f"{sz['large'][0] // MiB} MiB layers, cold)",
                            self.image_set("large"), [t for t in base_tools
                                                      if t[0] != "python-dxf"],
                            via_tls=True,
                            notes=["the same registry storage served over TLS (self-signed "
                                   "certificate, not checked by any tool); what real "
                                   "registries speak"])
        if name == "wan1":
            imgs = self.image_set("single")
            self.start_proxy()
            tools = [base_tools[0], ("puller 1 stream", TOOLS["puller-1stream"], None)]
            tools += base_tools[1:]
            return Scenario(name, f"one {sz['single'][0] // MiB} MiB layer through the WAN-like "
                            f"proxy (+{self.args.wan_latency * 1000:.0f} ms/request, "
                            f"{self.args.wan_rate / 1e6:.0f} MB/s per connection)",
                            imgs, tools, via_proxy=True,
                            notes=["`puller` fetches the layer as parallel byte ranges (its "
                                   "default, --segments 4); `puller 1 stream` is the same with "
                                   "--segments 1"])
        raise ValueError(name)

    # -- running ------------------------------------------------------------------------------
    def new_dest(self) -> Path:
        self.seq += 1
        d = self.run_dir / f"dest-{self.seq}"
        return d

    def one_run(self, sc: Scenario, label: str, tool: Tool, conc: int | None, rep: int,
                dest: Path, timed: bool = True) -> dict:
        assert self.registry is not None
        serving = self.tls_registry if sc.via_tls and self.tls_registry else self.registry
        host = self.proxy_host if sc.via_proxy else serving.host
        ctx = Ctx(host, sc.images, conc, tls=sc.via_tls)
        cmds = tool.commands(ctx, dest)
        server = serving.proc.pid if serving.proc is not None else None
        server_cpu = _process_cpu(server)
        m = measure(cmds, self.run_dir / "logs" / f"{sc.name}-{label.replace(' ', '')}-{rep}"
                    f"-{self.seq}")
        after = _process_cpu(server)
        registry_cpu = after - server_cpu if after is not None and server_cpu is not None \
            else None
        err = run_error(tool, ctx, dest, m, self.args.verify)
        rec = {
            "scenario": sc.name, "tool": label, "rep": rep, "timed": timed, **m.fields(),
            "registry_cpu_s": None if registry_cpu is None else round(registry_cpu, 3),
            "blob_bytes": 0 if sc.warm else sc.blob_bytes,
            "ok": err is None, "error": err, "commands": cmds,
        }
        if timed:
            self.runs.append(rec)
        status = "ok" if err is None else f"FAILED: {err}"
        self.log(f"  {sc.name:6} {label:12} rep {rep}: {m.wall:7.3f}s wall "
                 f"{m.user + m.sys:7.3f}s cpu {m.maxrss_kib / 1024:7.1f} MiB rss "
                 f"{'' if timed else '(untimed) '}{status}")
        return rec

    def run_scenario(self, name: str) -> None:
        sc = self.scenario(name)
        self.log(f"scenario {name}: {sc.title}; {sc.blob_bytes / MiB:.1f} MiB of blobs; tools "
                 f"{', '.join(t for t, _, _ in sc.tools)}; {self.args.reps} reps")
        warm_dirs: dict[str, Path] = {}
        try:
            if sc.warm:
                for label, tool, conc in sc.tools:
                    d = self.new_dest()
                    self.one_run(sc, label, tool, conc, -1, d, timed=False)
                    warm_dirs[label] = d
            elif not self.args.no_warmup:
                # one untimed cold pull per tool first, so no tool pays for the registry's cold
                # page cache or for compiling its modules; sweep: one per distinct tool
                seen: set[str] = set()
                for label, tool, conc in sc.tools:
                    if tool.name in seen:
                        continue
                    seen.add(tool.name)
                    d = self.new_dest()
                    try:
                        self.one_run(sc, label, tool, conc, -1, d, timed=False)
                    finally:
                        shutil.rmtree(d, ignore_errors=True)
            n = len(sc.tools)
            for rep in range(self.args.reps):
                order = sc.tools[rep % n:] + sc.tools[:rep % n]
                for label, tool, conc in order:
                    if sc.warm:
                        self.one_run(sc, label, tool, conc, rep, warm_dirs[label])
                    else:
                        d = self.new_dest()
                        try:
                            self.one_run(sc, label, tool, conc, rep, d)
                        finally:
                            shutil.rmtree(d, ignore_errors=True)
        finally:
            for d in warm_dirs.values():
                shutil.rmtree(d, ignore_errors=True)
            if sc.via_proxy:
                self.stop_proxy()
        self.scenarios_done.append(sc)
        self.write_results()

    # -- reporting -----------------------------------------------------------------------------
    def collect_meta(self) -> dict:
        def cmd(argv: list[str]) -> str:
            try:
                return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                      cwd=str(ROOT)).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                return "?"
        cpu = "?"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        commit = cmd(["git", "rev-parse", "--short=12", "HEAD"])
        if cmd(["git", "status", "--porcelain", "--", "puller"]):
            commit += " (puller/ has uncommitted changes)"
        mem = "?"
        try:
            mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) // 1024} MiB"
        except (OSError, ValueError, IndexError):
            pass
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nproc": cmd(["nproc"]), "cpu": cpu, "memory": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "skopeo": cmd(["skopeo", "--version"]),
            "registry": cmd([self.registry.binary, "--version"]) if self.registry else "?",
            "puller_commit": commit,
            "puller_python": cmd([PY, "-c", "import sys, aiohttp; "
                                  "print(sys.version.split()[0], 'aiohttp', aiohttp.__version__)"]),
            "loadavg_start": os.getloadavg(),
        }

    def summary(self) -> dict:
        out: dict = {}
        for sc in self.scenarios_done:
            rows = []
            base_wall = base_cpu = None
            for label, tool, _ in sc.tools:
                runs = [r for r in self.runs if r["scenario"] == sc.name and r["tool"] == label]
                ok = [r for r in runs if r["ok"]]
                row = {"tool": label, "runs": len(runs), "ok": len(ok), "note": tool.note}
                if ok:
                    walls = [r["wall_s"] for r in ok]
                    row.update({
                        "wall_median": statistics.median(walls), "wall_min": min(walls),
                        "wall_max": max(walls),
                        "cpu_median": statistics.median(r["cpu_s"] for r in ok),
                        "registry_cpu_median": _median_or_none(
                            [r.get("registry_cpu_s") for r in ok]),
                        "rss_median": statistics.median(r["peak_rss_mib"] for r in ok),
                    })
                    row["mbps"] = (sc.blob_bytes / MiB / row["wall_median"]
                                   if not sc.warm and row["wall_median"] > 0 else None)
                if label == sc.baseline and ok:
                    base_wall, base_cpu = row["wall_median"], row["cpu_median"]
                rows.append(row)
            for row in rows:
                if base_wall and "wall_median" in row:
                    row["ratio_wall"] = row["wall_median"] / base_wall
                    row["ratio_cpu"] = row["cpu_median"] / base_cpu if base_cpu else None
            out[sc.name] = {"title": sc.title, "baseline": sc.baseline,
                            "blob_bytes": sc.blob_bytes, "images": len(sc.images),
                            "notes": sc.notes, "rows": rows}
        return out

    def write_results(self) -> None:
        out = Path(self.args.out)
        summ = self.summary()
        config = {"quick": self.quick, "reps": self.args.reps, "verify": self.args.verify,
                  "wan_latency_s": self.args.wan_latency, "wan_rate_Bps": self.args.wan_rate}
        save_report(out, "results", self.meta, config, summ, self.runs, render_md)
        try:
            chart(summ, out / "chart.png")
        except ImportError:
            self.log("matplotlib not installed: no chart.png (pip install matplotlib)")

    # -- main ------------------------------------------------------------------------------------
    def main(self, names: list[str]) -> int:
        try:
            self.registry = Registry(self.run_dir / "registry")
            self.registry.start()
            self.log(f"registry {self.registry.url} (storage {self.registry.root})")
            self.meta = self.collect_meta()
            ms = [measure([["true"]], self.run_dir / "logs" / f"rss-floor-{i}") for i in range(3)]
            self.meta["rss_floor_mib"] = round(max(m.maxrss_kib for m in ms) / 1024, 1)
            self.meta["spawn_overhead_s"] = round(statistics.median(m.wall for m in ms), 4)
            for name in names:
                self.run_scenario(name)
                if name == "huge":  # 1 GiB in the registry: give the disk back now
                    self.drop_huge()
        finally:
            self.stop_proxy()
            if self.tls_registry is not None:
                self.tls_registry.stop()
            if self.registry is not None:
                self.registry.stop()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        failed = [r for r in self.runs if not r["ok"]]
        self.log(f"done: {len(self.runs)} timed runs, {len(failed)} failed; results in "
                 f"{self.args.out}")
        print((Path(self.args.out) / "results.md").read_text())
        return 1 if failed else 0

    def drop_huge(self) -> None:
        imgs = self.images.pop("huge", [])
        assert self.registry is not None
        for img in imgs:
            for layer in img.layers:
                hexd = layer.digest.split(":", 1)[1]
                shutil.rmtree(self.registry.root / "docker" / "registry" / "v2" / "blobs" /
                              "sha256" / hexd[:2] / hexd, ignore_errors=True)


def _fmt(v: float | None, nd: int = 2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def machine_lines(meta: dict, floor_note: str = "") -> list[str]:
    """The "## Machine" section of a results page (also used by growth.py)."""
    L = ["## Machine", ""]
    for k, label in (("date", "date"), ("nproc", "nproc"), ("cpu", "CPU"),
                     ("processor", "platform.processor()"), ("memory", "memory"),
                     ("kernel", "kernel"), ("python", "python (harness)"),
                     ("puller_python", "python/aiohttp (puller)"), ("skopeo", "skopeo"),
                     ("registry", "registry"), ("puller_commit", "puller commit")):
        if k in meta:
            L.append(f"- {label}: {meta[k]}")
    if "spawn_overhead_s" in meta:
        rss = f", {meta['rss_floor_mib']} MB peak RSS" if "rss_floor_mib" in meta else ""
        L.append(f"- measurement floor: `true` run through the launcher takes "
                 f"{meta['spawn_overhead_s'] * 1000:.1f} ms wall{rss}{floor_note}")
    la0, la1 = meta.get("loadavg_start"), meta.get("loadavg_end")
    if la0 and la1:
        L.append(f"- load average at start / end: {la0[0]:.2f} / {la1[0]:.2f}")
    L.append("")
    return L


def run_error(tool: Tool, ctx: Ctx, dest: Path, m: Measured, verify: str) -> str | None:
    """Why a measured run does not count (timed out, failed, wrong output), or None."""
    if m.timed_out:
        return f"timed out after {RUN_TIMEOUT:.0f}s"
    if any(rc != 0 for rc in m.rcs):
        return f"exit {m.rcs}: {m.stderr.strip()[-400:]}"
    return tool.verify(ctx, dest, m, verify)


def save_report(out: Path, stem: str, meta: dict, config: dict, summary: dict, runs: list,
                render: Callable[[dict, dict, dict], str]) -> None:
    """Write ``STEM.json`` (everything, the command line and the load average at the end
    included) and ``STEM.md`` (``render(meta, config, summary)``) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, loadavg_end=os.getloadavg())
    config = dict(config, argv=sys.argv[1:])
    doc = {"meta": meta, "config": config, "summary": summary, "runs": runs}
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render(meta, config, summary))


def _process_cpu(pid: int | None) -> float | None:
    """user+sys seconds a running process (and its reaped children) has used, from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _median_or_none(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _cores(meta: dict) -> int | None:
    try:
        return int(meta.get("nproc") or 0) or None
    except ValueError:
        return None


def render_md(meta: dict, config: dict, summ: dict) -> str:
    L = ["# puller benchmark results", ""]
    L.append(f"{'Quick run' if config['quick'] else 'Full run'}, {config['reps']} repetitions "
             f"per tool, medians; command: `python benchmarks/run.py "
             f"{' '.join(config['argv'])}`".rstrip())
    L.append("")
    L.append("Ratio = tool's median / baseline's median (baseline: puller; > 1 means puller is "
             "faster or cheaper). Wall column: median (min–max). MB = MiB = 2^20 bytes; MB/s = "
             "the scenario's unique blob bytes / median wall time. CPU = user+sys of the tool's "
             "process tree. Registry CPU = what the registry process spent during the run "
             "(the tool's requests cost it that; in `wan`/`wan1` the proxy's CPU is not "
             "counted). Bound = (CPU + registry CPU) / cores: with the tool and the registry "
             "sharing this machine's cores, no run can be faster. RSS = peak resident set of "
             "the largest process.")
    L.append("")
    L += machine_lines(meta)
    for name, s in summ.items():
        L.append(f"## {name}: {s['title']}")
        L.append("")
        L.append(f"{s['images']} image(s), {s['blob_bytes'] / MiB:.1f} MiB of unique blobs; "
                 f"ratios vs **{s['baseline']}**.")
        L.append("")
        L.append("| tool | ok/runs | wall s (min–max) | MB/s | CPU s | registry CPU s | bound s "
                 "| peak RSS MB | wall ratio | CPU ratio |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        cores = _cores(meta)
        for r in s["rows"]:
            if "wall_median" not in r:
                L.append(f"| {r['tool']} | {r['ok']}/{r['runs']} | failed | — | — | — | — | — "
                         "| — | — |")
                continue
            reg = r.get("registry_cpu_median")
            bound = (r["cpu_median"] + reg) / cores if reg is not None and cores else None
            L.append(f"| {r['tool']} | {r['ok']}/{r['runs']} | {r['wall_median']:.3f} "
                     f"({r['wall_min']:.3f}–{r['wall_max']:.3f}) | {_fmt(r.get('mbps'), 0)} | "
                     f"{r['cpu_median']:.2f} | {_fmt(reg)} | {_fmt(bound)} | "
                     f"{r['rss_median']:.0f} | "
                     f"{_fmt(r.get('ratio_wall'))} | {_fmt(r.get('ratio_cpu'))} |")
        L.append("")
        for n in s["notes"]:
            L.append(f"- {n}")
        if s["notes"]:
            L.append("")
    L.append("## Tools")
    L.append("")
    seen = set()
    for s in summ.values():
        for r in s["rows"]:
            key = r["tool"].split(" ")[0]
            if key not in seen:
                seen.add(key)
                L.append(f"- **{key}**: {r['note']}")
    L.append("")
    return "\n".join(L)


def chart(summ: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in summ.items() if any("wall_median" in r for r in s["rows"])]
    if not names:
        return
    cols = min(3, len(names))
    rows_n = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.2 * rows_n), squeeze=False)
    palette = {"puller": "#1f77b4", "skopeo": "#ff7f0e", "skopeo-sync": "#d62728",
               "floor": "#7f7f7f", "python-dxf": "#2ca02c"}
    for ax, name in zip(axes.flat, names, strict=False):
        rows = [r for r in summ[name]["rows"] if "wall_median" in r]
        labels = [r["tool"] for r in rows]
        med = [r["wall_median"] for r in rows]
        lo = [r["wall_median"] - r["wall_min"] for r in rows]
        hi = [r["wall_max"] - r["wall_median"] for r in rows]
        colors = [palette.get(label.split(" ")[0], "#9467bd") for label in labels]
        y = range(len(rows))
        ax.barh(list(y), med, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_yticks(list(y), labels)
        ax.invert_yaxis()
        ax.set_title(textwrap.fill(f"{name}: {summ[name]['title']}", 64), fontsize=8)
        ax.set_xlabel("median wall time, s (bars: min–max)", fontsize=8)
        if max(med) / max(min(med), 1e-6) > 30:
            ax.set_xscale("log")
        for yi, r in zip(y, rows, strict=False):
            if r.get("ratio_wall") is not None:
                ax.annotate(f"  {r['wall_median']:.2f}s  x{r['ratio_wall']:.2f}",
                            (r["wall_max"], yi), fontsize=7, va="center")
        ax.margins(x=0.35)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("puller vs alternatives (lower is better; xN = ratio vs baseline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark puller against skopeo and a bare floor.")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, 3 reps, no `huge` (about two minutes)")
    ap.add_argument("--scenarios", help=f"comma-separated subset of {','.join(ALL_SCENARIOS)}")
    ap.add_argument("--reps", type=int, help="repetitions per tool (default 5; --quick 3)")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--verify", choices=("full", "size"), default="full",
                    help="after each run check blobs by sha256 (full) or just sizes")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed pull per tool that warms caches first")
    ap.add_argument("--no-dxf", action="store_true", help="leave python-dxf out")
    ap.add_argument("--wan-latency", type=float, default=0.020, help="seconds per request")
    ap.add_argument("--wan-rate", type=float, default=40e6, help="bytes/s per connection")
    ap.add_argument("--replot", action="store_true",
                    help="only rewrite results.md and chart.png from --out's results.json")
    args = ap.parse_args(argv)
    if args.replot:
        out = Path(args.out)
        doc = json.loads((out / "results.json").read_text())
        (out / "results.md").write_text(render_md(doc["meta"], doc["config"], doc["summary"]))
        chart(doc["summary"], out / "chart.png")
        return 0
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    if not 1 <= args.reps <= 100:
        ap.error("--reps must be 1..100")
    if args.scenarios:
        names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        bad = [s for s in names if s not in ALL_SCENARIOS]
        if bad:
            ap.error(f"unknown scenario(s) {bad}; choose from {ALL_SCENARIOS}")
    else:
        names = [s for s in ALL_SCENARIOS if not (args.quick and s == "huge")]
    if shutil.which("skopeo") is None:
        ap.error("skopeo is not installed (scripts/bootstrap.sh installs it)")
    WORK.mkdir(parents=True, exist_ok=True)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return Bench(args).main(names)
    except KeyboardInterrupt:
        print("run.py: interrupted; registry stopped, work files removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
