"""The ``puller`` command line: a thin layer over :class:`puller.Puller`.

Exit codes: 0 every image pulled and verified; 1 at least one image failed, or the
output could not be written (see :mod:`puller.output`); 2 bad usage or input (a bad
reference, platform or option); 130 interrupted.
Output is docker-style lines (with tqdm bars on a terminal), ``-q`` for just the
pinned references, or ``--json`` for one event per line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from typing import Any, NoReturn, Sequence, TextIO

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_SECONDS = 7 * 24 * 3600  # the longest timeout or wait an option takes: a week


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other usage error
        self.exit(EXIT_USAGE, f"puller: {message} (see `{self.prog} --help`)\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every add_argument (to check the metavar), and
        # each one asks shutil for the terminal size: importing shutil (with bz2 and
        # lzma) and a hundred size lookups were a few ms of every command's start-up.
        return self.formatter_class(prog=self.prog, width=_help_width())  # type: ignore[call-arg]


@functools.cache
def _help_width() -> int:
    """What argparse would use: the terminal's width ($COLUMNS first) less 2, else 78."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 80
    return max(columns - 2, 20)


def _build_parser(only_pull: bool = False) -> argparse.ArgumentParser:
    """The whole command line, or (``only_pull``, the hot path) just ``pull``, which
    spares the start-up of every other command's module."""
    p = _Parser(prog="puller", description="Fast, verified, resumable container image pulls.")
    p.add_argument("--version", action="version", version=f"puller {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    pull = sub.add_parser("pull", help="pull images into the store",
                          description="Pull images into the local store (an OCI image layout).")
    pull.add_argument("refs", nargs="+", metavar="REF",
                      help="reference (docker rules: alpine = docker.io/library/alpine:latest)")
    pull.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                      help="platform to pull from a multi-platform image (default: this host's)")
    pull.add_argument("--all-platforms", action="store_true",
                      help="pull every platform of a multi-platform image (never attestations)")
    pull.add_argument("--store", metavar="DIR",
                      help="store directory (default: $PULLER_STORE or ~/.cache/puller)")
    pull.add_argument("-c", "--concurrency", type=int, default=8, metavar="N",
                      help="blobs downloaded at once, across all images (default: 8)")
    pull.add_argument("--segments", type=int, default=4, metavar="N",
                      help="fetch a large blob as up to N parallel byte ranges when there is "
                      "spare concurrency (1 = off; default: 4)")
    pull.add_argument("--segment-min", type=int, default=16, metavar="MIB",
                      help="smallest byte range worth its own connection, in MiB (default: 16)")
    _add_network_options(pull)
    pull.add_argument("--retries", type=int, default=5, metavar="N",
                      help="extra attempts after a transient failure (default: 5)")
    pull.add_argument("--stall-timeout", type=float, default=30.0, metavar="SECONDS",
                      help="a transfer that receives nothing this long is retried (default: 30)")
    pull.add_argument("--include-foreign", action="store_true",
                      help="also download non-distributable layers that name external URLs")
    pull.add_argument("--fail-fast", action="store_true",
                      help="stop at the first image that fails")
    out = pull.add_mutually_exclusive_group()
    out.add_argument("-q", "--quiet", action="store_true",
                     help="print only the digest-qualified reference of each image")
    out.add_argument("--json", action="store_true", help="print one JSON event per line")
    pull.add_argument("--no-progress", action="store_true",
                      help="plain lines instead of progress bars, even on a terminal")
    if only_pull:
        return p

    login = sub.add_parser("login", help="log in to a registry",
                           description="Verify credentials against a registry and save them "
                           "where docker keeps them ($DOCKER_CONFIG/config.json or a "
                           "credential helper).")
    login.add_argument("registry", nargs="?", metavar="REGISTRY",
                       help="registry host[:port] (default: Docker Hub)")
    login.add_argument("-u", "--username", metavar="USER")
    secret = login.add_mutually_exclusive_group()
    secret.add_argument("-p", "--password", metavar="PASS",
                        help="password or token (prefer --password-stdin)")
    secret.add_argument("--password-stdin", action="store_true",
                        help="read the password or token from standard input")
    _add_network_options(login)

    bench = sub.add_parser("bench", help="measure pull throughput from a registry",
                           description="Pull REF repeatedly into throw-away stores (never "
                           "your store) and report time to manifest, time to first byte, "
                           "per-layer and total throughput (p50/p95), and what bounded it.")
    bench.add_argument("ref", metavar="REF")
    bench.add_argument("--runs", type=int, default=3, metavar="N",
                       help="timed runs per concurrency (default: 3)")
    bench.add_argument("--concurrency", default="8", metavar="LIST",
                       help="comma-separated concurrency values to sweep (default: 8)")
    bench.add_argument("--warm", action="store_true",
                       help="time re-pulls of an image already in the store")
    bench.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    bench.add_argument("--all-platforms", action="store_true")
    bench.add_argument("--segments", type=int, default=4, metavar="N",
                       help="parallel byte ranges for a large blob (1 = off; default: 4)")
    bench.add_argument("--work-dir", metavar="DIR",
                       help="where the throw-away stores go (default: the system temp dir)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_network_options(bench)

    logout = sub.add_parser("logout", help="remove saved credentials for a registry")
    logout.add_argument("registry", nargs="?", metavar="REGISTRY",
                        help="registry host[:port] (default: Docker Hub)")

    from . import maintenance, storecmds, transfer

    maintenance.add_parsers(sub)
    storecmds.add_parsers(sub)
    transfer.add_parsers(sub)
    return p


def _add_network_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-cert", metavar="FILE",
                   help="also trust this CA bundle (PEM) for registry TLS certificates")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                   help="allow plain HTTP or an unverified certificate for HOST[:PORT] "
                   "(repeatable; also $PULLER_INSECURE_REGISTRIES, comma-separated)")
    p.add_argument("--add-host", action="append", default=[], metavar="HOST:IP",
                   help="resolve HOST to IP without DNS (repeatable)")


def _network_options(args: argparse.Namespace, **kw: Any) -> Any:
    """ClientOptions from the shared network flags; ValueError names a bad one."""
    from .client import ClientOptions

    hosts = []
    for item in args.add_host:
        name, sep, address = item.partition(":")
        if not sep or not name or not address:
            raise ValueError(f"--add-host wants HOST:IP, not {item!r}")
        hosts.append((name, address.strip("[]")))
    if args.ca_cert and not os.path.isfile(args.ca_cert):
        raise ValueError(f"--ca-cert: no such file: {args.ca_cert}")
    return ClientOptions(ca_cert=args.ca_cert, insecure_registries=tuple(args.insecure_registry),
                         add_hosts=tuple(hosts), **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. Output that can't be written doesn't stop the
    command, but makes a successful one exit 1 (:mod:`puller.output`)."""
    from .output import guarded_stdout

    with guarded_stdout() as out:
        try:
            rc = _command(list(sys.argv[1:] if argv is None else argv))
        except KeyboardInterrupt:  # where a command had nothing of its own to say
            print("puller: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except EOFError:  # a prompt (login) met the end of standard input
            print("puller: standard input ended before the answer", file=sys.stderr)
            return EXIT_USAGE
        except SystemExit as exc:  # argparse's --help and --version end this way
            if exc.code in (0, None):
                out.flush()
                if out.failed:
                    raise SystemExit(EXIT_FAILED) from None
            raise
    return EXIT_FAILED if rc == EXIT_OK and out.failed else rc


def _command(argv: list[str]) -> int:
    hot = bool(argv) and argv[0] == "pull" and not {"-h", "--help"} & set(argv)
    args = _build_parser(only_pull=hot).parse_args(argv)
    if getattr(args, "store", None) == "":  # would be the current directory
        return _fail_usage("--store: an empty path (leave the option out for the default "
                           "store)", bool(getattr(args, "json", False)))
    if args.command == "pull":
        return _pull_command(args)
    if args.command == "login":
        return _login_command(args)
    if args.command == "logout":
        return _logout_command(args)
    if args.command == "bench":
        return _bench_command(args)
    handler = getattr(args, "handler", None)
    if handler is not None:  # commands that register themselves (see maintenance.py)
        try:
            return int(handler(args))
        except KeyboardInterrupt:
            print("puller: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    return EXIT_USAGE  # pragma: no cover - argparse enforces a command


def run() -> NoReturn:
    """The ``puller`` program (console script and ``python -m puller``): :func:`main`,
    then a quick exit.

    Once a command is over nothing is left to do but the interpreter's teardown, which
    frees every module and object one by one: 20-25 ms of a 0.4 s pull of 100 small
    layers, measured (a fifth of a warm re-pull). Everything puller writes is closed and
    synced by then, so with no other thread alive the process flushes its output, runs
    the ``atexit`` handlers and leaves with ``os._exit``. Otherwise (a thread still at
    work, an interpreter without ``atexit._run_exitfuncs``) it exits the usual way.
    """
    # A SIGTERM (a service manager, a Kubernetes pod ending, `timeout`) ends a command the
    # way Ctrl-C does: partial work cleaned up or kept to resume, "interrupted", exit 130.
    # Commands that run an event loop cancel their task on it instead while it runs.
    signal.signal(signal.SIGTERM, _terminated)
    rc = main()
    import atexit
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if threading.active_count() > 1 or run_exitfuncs is None:
        sys.exit(rc)
    for stream in (sys.stdout, sys.stderr):  # main() said if its output was lost
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    run_exitfuncs()
    os._exit(rc)


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# -- pull --------------------------------------------------------------------------------

def _fail_usage(message: str, as_json: bool) -> int:
    if as_json:
        _json_line(sys.stdout, {"event": "error", "error": message, "error_type": "usage"})
    print(f"puller: {message}", file=sys.stderr)
    return EXIT_USAGE


def _json_line(stream: TextIO, obj: dict[str, Any]) -> None:
    stream.write(json.dumps(obj, separators=(",", ":")) + "\n")
    stream.flush()


def _pull_command(args: argparse.Namespace) -> int:
    from .errors import PullerError
    from .platform import Platform
    from .reference import Reference

    refs = []
    for raw in args.refs:
        try:
            refs.append(Reference.parse(raw))
        except PullerError as exc:
            return _fail_usage(str(exc), args.json)
    platform = None
    if args.platform is not None:
        if args.all_platforms:
            return _fail_usage("--platform and --all-platforms exclude each other", args.json)
        try:
            platform = Platform.parse(args.platform)
        except PullerError as exc:
            return _fail_usage(str(exc), args.json)
    if not 1 <= args.concurrency <= 256:
        return _fail_usage("--concurrency must be between 1 and 256", args.json)
    if not 1 <= args.segments <= 64:
        return _fail_usage("--segments must be between 1 and 64", args.json)
    if args.segment_min < 1:
        return _fail_usage("--segment-min must be at least 1 (MiB)", args.json)
    if args.retries < 0:
        return _fail_usage("--retries must be >= 0", args.json)
    if not 0 < args.stall_timeout <= MAX_SECONDS:  # (also false for nan)
        return _fail_usage(f"--stall-timeout must be more than 0 and at most {MAX_SECONDS} "
                           "seconds", args.json)
    try:
        client_options = _network_options(
            args, retries=args.retries, stall_timeout=args.stall_timeout,
            max_connections_per_host=max(16, args.concurrency))
    except ValueError as exc:
        return _fail_usage(str(exc), args.json)

    if args.json:
        view: _View = _JsonView()
    elif args.quiet:
        view = _QuietView()
    else:
        view = _TextView(refs, bars=not args.no_progress and sys.stderr.isatty())


    try:
        current = _already_current(refs, args, platform, client_options)
    except KeyboardInterrupt:
        print("puller: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if current is not None:  # nothing to download: answered without loading the engine
        for ref, result in zip(refs, current, strict=True):
            view.event(_started(ref))
            view.event(_done(ref, result))
            view.done(ref, result)
        view.close()
        return EXIT_OK

    async def run() -> int:
        from .api import Puller, PullOptions

        options = PullOptions(platform=platform, all_platforms=args.all_platforms,
                              concurrency=args.concurrency, include_foreign=args.include_foreign,
                              segments=args.segments, segment_min=args.segment_min << 20)
        try:
            async with Puller(store=args.store, options=options, client_options=client_options,
                              on_event=view.event if view.listens else None,
                              transport=command_transport(client_options)
                              ) as puller:
                results = await puller.pull_many(refs, fail_fast=args.fail_fast)
        except PullerError as exc:  # the store itself could not be opened
            view.fatal(str(exc))
            return EXIT_FAILED
        failed = False
        for ref, r in zip(refs, results, strict=True):
            if isinstance(r, PullerError):
                failed = True
                view.failed(ref, r)
            else:
                view.done(ref, r)
        view.close()
        return EXIT_FAILED if failed else EXIT_OK

    from .loop import run as run_loop

    try:
        return int(run_loop(run))
    except KeyboardInterrupt:
        view.close()
        print("puller: interrupted; partial downloads are kept and resume on the next pull",
              file=sys.stderr)
        return EXIT_INTERRUPTED


# -- login / logout -----------------------------------------------------------------------

_PLAINTEXT_WARNING = """WARNING! Your password will be stored unencrypted in {path}.
Configure a credential helper to remove this warning. See
https://docs.docker.com/engine/reference/commandline/login/#credentials-store"""


def _registry_arg(raw: str | None) -> str:
    """``REGISTRY`` as docker takes it: a host[:port], maybe written as a URL."""
    from .credentials import hostname_of
    from .reference import Reference

    if not raw:
        return "docker.io"
    host = hostname_of(raw.strip())
    if host in ("index.docker.io", "registry-1.docker.io"):
        return "docker.io"
    # Reuse the reference grammar to validate the host part.
    ref = Reference.parse(f"{host}/puller-login-check")
    if ref.registry != host:
        raise ValueError(f"invalid registry {raw!r}: expected HOST[:PORT]")
    return host


def _login_command(args: argparse.Namespace) -> int:
    import getpass

    from .credentials import Credentials, CredentialError, DockerConfig
    from .errors import PullerError

    try:
        registry = _registry_arg(args.registry)
        client_options = _network_options(args, retries=2)
    except (ValueError, PullerError) as exc:
        print(f"puller: {exc}", file=sys.stderr)
        return EXIT_USAGE
    username = args.username
    interactive = sys.stdin.isatty()
    if not username:
        if not interactive or args.password_stdin:
            print("puller: login needs --username when not run interactively", file=sys.stderr)
            return EXIT_USAGE
        username = input("Username: ").strip()
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif args.password is not None:
        print("WARNING! Using --password via the CLI is insecure. Use --password-stdin.",
              file=sys.stderr)
        password = args.password
    elif interactive:
        password = getpass.getpass("Password: ")
    else:
        print("puller: login needs --password-stdin when not run interactively",
              file=sys.stderr)
        return EXIT_USAGE
    if not username or not password:
        print("puller: username and password must not be empty", file=sys.stderr)
        return EXIT_USAGE
    creds = Credentials(username=username, password=password)

    import asyncio

    async def verify() -> None:
        from .client import RegistryClient
        from .reference import Reference

        class _Given:
            def get(self, registry: str) -> Credentials:
                return creds

        async with RegistryClient(client_options, credentials=_Given()) as client:
            await client.check_login(Reference.parse(f"{registry}/puller-login-check"))

    try:
        asyncio.run(verify())
    except PullerError as exc:
        print(f"puller: login to {registry} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    config = DockerConfig()
    try:
        where = config.store(registry, creds)
    except CredentialError as exc:
        print(f"puller: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if where == str(config.path):
        print(_PLAINTEXT_WARNING.format(path=config.path), file=sys.stderr)
    print("Login Succeeded")
    return EXIT_OK


def _logout_command(args: argparse.Namespace) -> int:
    from .credentials import CredentialError, DockerConfig, config_key
    from .errors import PullerError

    try:
        registry = _registry_arg(args.registry)
    except (ValueError, PullerError) as exc:
        print(f"puller: {exc}", file=sys.stderr)
        return EXIT_USAGE
    key = config_key(registry)
    try:
        removed = DockerConfig().erase(registry)
    except CredentialError as exc:
        print(f"puller: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Removing login credentials for {key}" if removed else f"Not logged in to {key}")
    return EXIT_OK


def _bench_command(args: argparse.Namespace) -> int:
    from .errors import PullerError
    from .platform import Platform
    from .reference import Reference

    try:
        ref = str(Reference.parse(args.ref))
        platform = Platform.parse(args.platform) if args.platform is not None else None
        if platform is not None and args.all_platforms:
            raise ValueError("--platform and --all-platforms exclude each other")
        concurrencies = [int(x) for x in args.concurrency.split(",") if x.strip()]
        if not concurrencies or not all(1 <= c <= 256 for c in concurrencies):
            raise ValueError("--concurrency wants numbers between 1 and 256, e.g. 1,4,16")
        if not 1 <= args.runs <= 1000:
            raise ValueError("--runs must be between 1 and 1000")
        if not 1 <= args.segments <= 64:
            raise ValueError("--segments must be between 1 and 64")
        if args.work_dir and not os.path.isdir(args.work_dir):
            raise ValueError(f"--work-dir: no such directory: {args.work_dir}")
        client_options = _network_options(args)
    except (ValueError, PullerError) as exc:
        msg = str(exc)
        if "invalid literal" in msg:
            msg = "--concurrency wants comma-separated numbers, e.g. 1,4,16"
        print(f"puller: {msg}", file=sys.stderr)
        return EXIT_USAGE

    import asyncio

    from . import bench as bench_mod

    class _Opts:
        all_platforms = args.all_platforms
        segments = args.segments

    _Opts.platform = platform  # type: ignore[attr-defined]

    def progress(stats: Any) -> None:
        if not args.json:
            print(f"  c={stats.concurrency:<3} {stats.wall:7.3f} s  {stats.mbps:8.1f} MB/s",
                  file=sys.stderr, flush=True)

    try:
        report = asyncio.run(bench_mod.bench(
            ref, runs=args.runs, concurrencies=concurrencies, warm=args.warm, options=_Opts,
            client_options=client_options, work_dir=args.work_dir, progress=progress))
    except PullerError as exc:
        print(f"puller: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("puller: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        _json_line(sys.stdout, bench_mod.report_json(report))
    else:
        print(bench_mod.report_text(report))
    return EXIT_OK


def command_transport(client_options: Any) -> Any:
    """The command line (pull, push, copy, mirror) talks to registries over
    ``http.client`` in threads (no aiohttp to import: about 0.2 s less per run, measured)
    unless a proxy is configured, which only the aiohttp transport honours."""
    from .transport import ThreadedTransport, proxy_configured

    if proxy_configured():
        return None
    return ThreadedTransport(timeout=client_options.stall_timeout,
                             add_hosts=dict(client_options.add_hosts),
                             user_agent=client_options.user_agent)


def _already_current(refs: list[Any], args: argparse.Namespace, platform: Any,
                     client_options: Any) -> list[Any] | None:
    """Results for every ref if all are already in the store and current, else None.

    Asks each registry with one manifest HEAD over the standard library's HTTP client,
    so a warm re-pull costs start-up plus one round trip, without importing aiohttp.
    Anything unusual (a proxy, an error, a missing blob) leaves it to the engine."""
    from .errors import PullerError
    from .store import ContentStore, default_store_path
    from .transport import ThreadedTransport, proxy_configured

    if proxy_configured():
        return None
    try:  # a ref the store has never held can't be current: no engine, no event loop
        store = ContentStore(args.store or default_store_path())
        if any(store.lookup(str(r)) is None for r in refs):
            return None
    except (PullerError, OSError):
        return None

    import asyncio

    from .api import Puller, PullOptions

    options = PullOptions(platform=platform, all_platforms=args.all_platforms,
                          concurrency=args.concurrency, include_foreign=args.include_foreign)
    quick = client_options.replace(retries=0)
    # In a thread, so Ctrl-C (which cancels the task) can abort a request that stalls.
    transport = ThreadedTransport(timeout=min(quick.connect_timeout, quick.stall_timeout),
                                  add_hosts=dict(quick.add_hosts), user_agent=quick.user_agent)

    async def check() -> list[Any] | None:
        async with Puller(store=args.store, options=options, client_options=quick,
                          transport=transport) as p:
            results = []
            for ref in refs:
                r = await p.check(ref)
                if r is None:
                    return None
                results.append(r)
            return results

    try:
        return asyncio.run(check())
    except (PullerError, OSError):
        return None
    except asyncio.CancelledError:  # Ctrl-C cancelled the check
        raise KeyboardInterrupt from None


def _started(ref: Any) -> Any:
    from .events import PullStarted

    return PullStarted(ref=str(ref))


def _done(ref: Any, result: Any) -> Any:
    from .events import PullDone

    return PullDone(ref=str(ref), digest=result.digest,
                    platforms=[i.platform for i in result.images if i.platform],
                    blobs_fetched=0, blobs_reused=result.blobs_reused, bytes_fetched=0,
                    up_to_date=True)


class _View:
    listens = False  # True where event() does something: else the engine builds none

    def event(self, ev: Any) -> None:
        pass

    def done(self, ref: Any, result: Any) -> None:
        pass

    def failed(self, ref: Any, error: Exception) -> None:
        print(f"puller: {ref}: {error}", file=sys.stderr)

    def fatal(self, message: str) -> None:
        print(f"puller: {message}", file=sys.stderr)

    def close(self) -> None:
        pass


class _QuietView(_View):
    def done(self, ref: Any, result: Any) -> None:
        print(result.pinned, flush=True)


class _JsonView(_View):
    listens = True

    def event(self, ev: Any) -> None:
        _json_line(sys.stdout, ev.to_json())

    def fatal(self, message: str) -> None:
        _json_line(sys.stdout, {"event": "error", "error": message, "error_type": "store"})
        super().fatal(message)


class _TextView(_View):
    """docker pull's output: a header per image, a line per layer, digest and status."""

    listens = True

    def __init__(self, refs: Sequence[Any], *, bars: bool) -> None:
        self._refs = {str(r): r for r in refs}
        self._held: dict[str, list[str]] = {str(r): [] for r in refs} if len(refs) > 1 else {}
        self._layers: dict[str, set[str]] = {}  # image -> digests that are layers
        self._bars: dict[tuple[str, str], Any] = {}
        self._total: Any = None
        self._tqdm: Any = None
        if bars:
            from tqdm import tqdm

            self._tqdm = tqdm
            self._total = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                               desc="Total", position=0, leave=False, dynamic_ncols=True,
                               file=sys.stderr)

    def _say(self, image: str, text: str) -> None:
        """A line about one image. With several images at once, each image's lines are
        held back and printed together when it finishes, so they don't interleave."""
        held = self._held.get(image)
        if held is None:
            self._line(text)
        else:
            held.append(text)

    def _flush(self, image: str) -> None:
        for text in self._held.pop(image, None) or ():
            self._line(text)

    def _line(self, text: str) -> None:
        if self._tqdm is not None:  # above the bars
            self._tqdm.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def event(self, ev: Any) -> None:
        kind = ev.kind
        if kind == "pull.started":
            ref = self._refs.get(ev.ref)
            if ref is not None:
                ident = str(ref.digest) if ref.digest and not ref.tag else ref.tag
                self._say(ev.ref, f"{ident}: Pulling from {ref.repository}")
        elif kind == "blob.queued":
            if ev.role == "layer":
                self._layers.setdefault(ev.ref, set()).add(ev.digest)
                if self._total is not None:  # the total counts every layer, present or not
                    self._total.total += ev.size
                    self._total.refresh()
        elif kind == "blob.started":
            if self._is_layer(ev):
                if self._total is not None:
                    self._total.update(ev.offset)
                    bar = self._tqdm(total=ev.size, initial=ev.offset, unit="B", unit_scale=True,
                                     unit_divisor=1024, desc=self._short(ev.digest), leave=False,
                                     dynamic_ncols=True, file=sys.stderr)
                    self._bars[(ev.ref, ev.digest)] = bar
                elif ev.offset:
                    self._say(ev.ref, f"{self._short(ev.digest)}: Resuming at {ev.offset} bytes")
        elif kind == "blob.progress":
            bar = self._bars.get((ev.ref, ev.digest))
            if bar is not None:
                step = ev.complete - bar.n
                bar.update(step)
                self._total.update(step)
        elif kind == "blob.retry":
            self._say(ev.ref, f"{self._short(ev.digest)}: Retrying in {ev.delay:.1f}s "
                       f"(attempt {ev.attempt}): {ev.error}")
        elif kind == "pull.done":
            self._finished(ev)
        elif kind == "pull.failed":
            self._flush(ev.ref)
        elif kind == "blob.done":
            bar = self._bars.pop((ev.ref, ev.digest), None)
            if bar is not None:
                self._total.update(ev.size - bar.n)  # another image's download finished it
                bar.close()
            elif self._total is not None and self._is_layer(ev):
                self._total.update(ev.size)
            if self._is_layer(ev):
                status = "Already exists" if ev.status == "exists" else "Pull complete"
                self._say(ev.ref, f"{self._short(ev.digest)}: {status}")

    def _is_layer(self, ev: Any) -> bool:
        return ev.digest in self._layers.get(ev.ref, ())

    @staticmethod
    def _short(digest: str) -> str:
        return digest.split(":", 1)[-1][:12]

    def _finished(self, ev: Any) -> None:
        self._flush(ev.ref)
        ref = self._refs.get(ev.ref)
        short = ref.familiar() if ref is not None else ev.ref
        self._line(f"Digest: {ev.digest}")
        if ev.up_to_date:
            self._line(f"Status: Image is up to date for {short}")
        else:
            self._line(f"Status: Downloaded newer image for {short}")
        self._line(ev.ref)

    def failed(self, ref: Any, error: Exception) -> None:
        for key in [k for k in self._bars if k[0] == str(ref)]:
            self._bars.pop(key).close()
        self._flush(str(ref))
        super().failed(ref, error)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        if self._total is not None:
            self._total.close()
            self._total = None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
