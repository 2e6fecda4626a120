"""Commands that move images between the store and registries.

``add_parsers(sub)`` registers the subcommands on the command line's parser; each sets
``handler`` to a function taking the parsed arguments and returning an exit code.

- ``puller push REF...``: images from the store to their registries;
- ``puller tag SRC DST``: a second name for an image in the store;
- ``puller copy SRC DST``: registry to registry, blobs streamed through;
- ``puller mirror``: many repositories and tags in one run, with filters and shards.

Exit codes: 0 all done; 1 something failed (the rest completed), or the output could not
be written (:mod:`puller.output`); 2 bad usage;
130 interrupted. Only argparse is imported at start-up; the engine is imported by the
handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable


__all__ = ["add_parsers"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_parsers(sub: Any) -> None:
    """Register push, tag, copy and mirror."""
    from .cli import _add_network_options

    push = sub.add_parser("push", help="push images from the store to a registry",
                          description="Push images from the store to their registries. Blobs "
                          "the registry has are skipped, blobs in another repository of it are "
                          "mounted, manifests are sent byte for byte.")
    push.add_argument("refs", nargs="+", metavar="REF", help="a reference named in the store")
    push.add_argument("--store", metavar="DIR",
                      help="store directory (default: $PULLER_STORE or ~/.cache/puller)")
    push.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                      help="when the store has only some platforms of an index, the one to push")
    _common(push)
    _add_network_options(push)
    push.set_defaults(handler=_push_command)

    tag = sub.add_parser("tag", help="give an image in the store another name",
                         description="Name the image SRC (in the store) also DST, like "
                         "`docker tag`; push DST afterwards.")
    tag.add_argument("source", metavar="SRC")
    tag.add_argument("target", metavar="DST")
    tag.add_argument("--store", metavar="DIR",
                     help="store directory (default: $PULLER_STORE or ~/.cache/puller)")
    tag.set_defaults(handler=_tag_command)

    copy = sub.add_parser("copy", help="copy an image from one registry to another",
                          description="Copy SRC to DST registry to registry, every platform "
                          "of an index by default, digests unchanged. Blobs stream through "
                          "without touching the disk unless --via-store.")
    copy.add_argument("source", metavar="SRC")
    copy.add_argument("target", metavar="DST",
                      help="target reference (without a tag: SRC's tag)")
    copy.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                      help="copy only this platform of an index (repeatable; several make a "
                      "new index with a new digest)")
    _via_store(copy)
    _common(copy)
    _add_network_options(copy)
    copy.set_defaults(handler=_copy_command)

    mirror = sub.add_parser(
        "mirror", help="mirror many repositories and tags into a registry",
        description="Mirror SOURCEs (a repository: all its tags; or one reference) into "
        "--target HOST[/PREFIX] as HOST/PREFIX/<source repository>, or as --config says. "
        "Tags already at the target with the same digest cost one manifest HEAD on each side.")
    mirror.add_argument("sources", nargs="*", metavar="SOURCE")
    mirror.add_argument("--target", metavar="HOST[/PREFIX]", help="where images go")
    mirror.add_argument("--config", metavar="FILE", help="mirror.yaml (see docs/mirror.md)")
    mirror.add_argument("--include", action="append", default=[], metavar="REGEX",
                        help="only tags matching REGEX (repeatable) for SOURCE repositories")
    mirror.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                        help="leave out tags matching REGEX (repeatable)")
    mirror.add_argument("--semver", metavar="RANGE", help="only versions in RANGE (>=1.2 <2)")
    mirror.add_argument("--keep", type=int, metavar="N", help="only the newest N tags")
    mirror.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                        help="only this platform of indexes (repeatable; default: all, "
                        "byte for byte)")
    mirror.add_argument("--dry-run", action="store_true",
                        help="list what would be copied; change nothing")
    mirror.add_argument("--shard", metavar="K/N",
                        help="this worker's share: repositories dealt out to N workers, K from 0")
    mirror.add_argument("--shards", type=int, metavar="N",
                        help="N workers, this one's K from $JOB_COMPLETION_INDEX (Kubernetes "
                        "Indexed Jobs)")
    mirror.add_argument("--rate-limit-reserve", type=int, default=10, metavar="N",
                        help="when a registry's RateLimit-Remaining falls to N, space out "
                        "manifest GETs instead of running into 429s (default: 10)")
    _via_store(mirror)
    _common(mirror)
    _add_network_options(mirror)
    mirror.set_defaults(handler=_mirror_command)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--concurrency", type=int, default=8, metavar="N",
                   help="blobs uploaded at once, across all images (default: 8)")
    p.add_argument("--chunk-size", type=_size, default=32 << 20, metavar="BYTES",
                   help="blobs larger than this are uploaded in resumable chunks of this size "
                   "(default: 32M; suffixes K, M, G)")
    p.add_argument("--retries", type=int, default=5, metavar="N",
                   help="extra attempts after a transient failure (default: 5)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    out.add_argument("--json", action="store_true", help="print one JSON event per line")


def _via_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--via-store", action="store_true",
                   help="pass blobs through the store (a cache for later runs and pulls)")
    p.add_argument("--store", metavar="DIR",
                   help="store for --via-store (default: $PULLER_STORE or ~/.cache/puller)")


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMG":
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[t[-1]]
        t = t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None
    if value < 1024:
        raise argparse.ArgumentTypeError("must be at least 1K")
    return value


# -- output ----------------------------------------------------------------------------------

class _Out:
    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False))

    def event(self, ev: dict[str, Any]) -> None:
        if self.json:
            print(json.dumps(ev, separators=(",", ":")), flush=True)

    def line(self, text: str) -> None:
        if not self.json and not self.quiet:
            print(text, flush=True)

    def error(self, text: str) -> None:
        if self.json:
            print(json.dumps({"event": "error", "error": text}, separators=(",", ":")), flush=True)
        print(f"puller: {text}", file=sys.stderr)


def _usage(out: _Out, message: str) -> int:
    out.error(message)
    return EXIT_USAGE


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _run(coro_fn: Callable[[], Any], out: _Out) -> int:
    """The command's coroutine run as :func:`puller.loop.run` runs it; a signal ends it
    with "interrupted" and exit 130."""
    from .loop import run

    try:
        return int(run(coro_fn))
    except KeyboardInterrupt:
        out.error("interrupted")
        return EXIT_INTERRUPTED


def _client_options(args: argparse.Namespace) -> Any:
    from .cli import _network_options

    return _network_options(args, retries=max(0, args.retries),
                            max_connections_per_host=max(16, args.concurrency * 2))


def _transfer_options(args: argparse.Namespace) -> Any:
    from .push import TransferOptions

    return TransferOptions(concurrency=args.concurrency, chunk_size=args.chunk_size,
                           retries=max(0, args.retries))


def _check_common(args: argparse.Namespace) -> str | None:
    if not 1 <= args.concurrency <= 256:
        return "--concurrency must be between 1 and 256"
    if args.retries < 0:
        return "--retries must be >= 0"
    return None


# -- tag ---------------------------------------------------------------------------------------

def _tag_command(args: argparse.Namespace) -> int:
    from .errors import PullerError
    from .reference import Reference
    from .store import ContentStore, default_store_path

    out = _Out(args)
    try:
        src, dst = Reference.parse(args.source), Reference.parse(args.target)
    except PullerError as exc:
        return _usage(out, str(exc))
    store = ContentStore(args.store or default_store_path())
    try:
        # Read and named in one update, as a pull names an image: see copy_ref.
        if not (store.root / "index.json").exists() or not store.copy_ref(str(src), str(dst)):
            out.error(f"{src} is not in the store {store.root} (pull it first)")
            return EXIT_FAILED
    except PullerError as exc:
        out.error(str(exc))
        return EXIT_FAILED
    return EXIT_OK


# -- push --------------------------------------------------------------------------------------

def _push_command(args: argparse.Namespace) -> int:
    from .errors import PullerError
    from .platform import Platform
    from .reference import Reference
    from .store import ContentStore, default_store_path

    out = _Out(args)
    problem = _check_common(args)
    if problem:
        return _usage(out, problem)
    try:
        refs = [Reference.parse(r) for r in args.refs]
        platform = Platform.parse(args.platform) if args.platform else None
        client_options = _client_options(args)
        options = _transfer_options(args)
    except (PullerError, ValueError) as exc:
        return _usage(out, str(exc))
    store = ContentStore(args.store or default_store_path())

    async def run() -> int:
        from .cli import command_transport
        from .client import RegistryClient
        from .push import ImageStats, StoreProvider, Transfer

        async with RegistryClient(client_options,
                                  transport=command_transport(client_options)) as client:
            transfer = Transfer(client, options, emit=out.event)

            async def one(ref: Reference) -> bool:
                name = str(ref)
                lines = [f"The push refers to repository [{ref.name}]"]
                try:
                    entry = await _to_thread(store.lookup, name) \
                        if (store.root / "index.json").exists() else None
                    if entry is None:
                        raise PullerError(f"{name} is not in the store {store.root} (pull it, "
                                          "or name an image with `puller tag`)")
                    provider = StoreProvider(store, name)
                    data, media_type = await _store_top(store, entry, provider, platform, name,
                                                        lines)
                    stats = ImageStats()

                    def on_blob(desc: Any, status: str, frm: str | None) -> None:
                        text = {"exists": "Layer already exists", "uploaded": "Pushed",
                                "mounted": f"Mounted from {frm}"}[status]
                        lines.append(f"{_short(str(desc.digest))}: {text}")
                        out.event({"event": "blob.done", "ref": name, "digest": str(desc.digest),
                                   "size": desc.size, "status": status, "from": frm})

                    ident = ref.tag if ref.tag is not None else str(ref.digest)
                    digest = await transfer.push_image(provider, data, media_type, ref, ident,
                                                       stats=stats, on_blob=on_blob)
                    lines.append(f"{ref.tag or 'digest'}: digest: {digest} size: {len(data)}")
                    out.event({"event": "push.done", "ref": name, "digest": str(digest),
                               **stats.to_json()})
                    for text in lines:
                        out.line(text)
                    return True
                except PullerError as exc:
                    out.event({"event": "push.failed", "ref": name, "error": str(exc)})
                    out.error(f"{name}: {exc}")
                    return False

            import asyncio

            try:
                results = await asyncio.gather(*(one(r) for r in refs))
            finally:
                await transfer.aclose()
        return EXIT_OK if all(results) else EXIT_FAILED

    return _run(run, out)


async def _to_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


async def _store_top(store: Any, entry: dict[str, Any], provider: Any, platform: Any, name: str,
                     lines: list[str]) -> tuple[bytes, str | None]:
    """The manifest to push for a store entry: the whole index when the store has every
    image of it, else the one platform image it has (or ``--platform``)."""
    from .digest import Digest
    from .errors import PullerError
    from .manifest import ImageIndex, parse_manifest
    from .platform import select

    try:
        top = Digest.parse(entry.get("digest", ""))
    except PullerError as exc:
        raise PullerError(f"{name}: the store's index entry is broken: {exc}") from None
    data, media_type = await provider.manifest(top, entry.get("mediaType"))
    parsed = parse_manifest(data, media_type)
    if not isinstance(parsed, ImageIndex):
        return data, media_type
    missing = [c for c in parsed.manifests if not store.has(c.digest)]
    if not missing:
        return data, media_type
    present = [c for c in parsed.images() if store.has(c.digest)]
    if not present:
        raise PullerError(f"{name}: the store has none of the images of its index")
    have = f"the store has {len(parsed.manifests) - len(missing)} of the index's " \
        f"{len(parsed.manifests)} manifests (a pull never fetches attestations)"
    if platform is None and len(present) > 1:
        # Several platforms were pulled, so the index is wanted; one image pushed in its
        # place would quietly make a multi-platform tag single-platform at the target.
        raise PullerError(f"{name}: {have}, so the index can't be pushed as it is: push one "
                          "image with --platform, or copy the whole index from its registry "
                          "with `puller copy`")
    if platform is not None:
        choice = select([(c.platform, c) for c in present], platform)
    else:
        choice = present[0]
    lines.append(f"Pushing only {choice.platform or 'the image'} ({_short(str(choice.digest))}):"
                 f" {have}; `puller copy` copies a whole index from its registry")
    child, child_type = await provider.manifest(choice.digest, choice.media_type)
    return child, child_type or choice.media_type


# -- copy --------------------------------------------------------------------------------------

def _target_of(src: Any, raw_target: str) -> Any:

    from .mirror import parse_source

    dst, named = parse_source(raw_target)
    if not named:
        dst = dst.replace(tag=src.tag, digest=None if src.tag else src.digest)
    return dst


def _copy_command(args: argparse.Namespace) -> int:
    from .errors import PullerError
    from .platform import Platform
    from .reference import Reference

    out = _Out(args)
    problem = _check_common(args)
    if problem:
        return _usage(out, problem)
    try:
        src = Reference.parse(args.source)
        dst = _target_of(src, args.target)
        platforms = [Platform.parse(p) for p in args.platform] or None
        client_options = _client_options(args)
        options = _transfer_options(args)
    except (PullerError, ValueError) as exc:
        return _usage(out, str(exc))
    if dst.digest is not None and dst.tag is None and src.digest is not None \
            and dst.digest != src.digest:
        return _usage(out, "DST names another digest than SRC")

    async def run() -> int:
        async with _Engine(args, client_options, options, out) as engine:
            from .push import ImageStats, choose_platforms

            try:
                fetched = await engine.client.get_manifest(src)
                data, media_type, one = choose_platforms(fetched.data, fetched.media_type,
                                                         platforms, str(src))
                provider = engine.provider(src)
                if one is not None:
                    data, media_type = await provider.manifest(one.digest, one.media_type)
                stats = ImageStats()
                from .digest import Digest

                ident = dst.tag if dst.tag is not None else str(Digest.from_bytes(data,
                                                                                  "sha256"))
                digest = await engine.transfer.push_image(provider, data, media_type, dst,
                                                          ident, stats=stats)
            except PullerError as exc:
                out.event({"event": "copy.failed", "ref": str(src), "target": str(dst),
                           "error": str(exc)})
                out.error(f"copying {src} to {dst}: {exc}")
                return EXIT_FAILED
            out.event({"event": "copy.done", "ref": str(src), "target": str(dst),
                       "digest": str(digest), **stats.to_json()})
            out.line(f"Copied {src} -> {dst}")
            out.line(f"Digest: {digest}")
            out.line(_blob_summary(stats))
            return EXIT_OK

    return _run(run, out)


def _blob_summary(stats: Any) -> str:
    return (f"Blobs: {stats.uploaded} uploaded, {stats.mounted} mounted, {stats.existed} "
            f"already there; {_human(stats.bytes_uploaded)} moved, "
            f"{_human(stats.bytes_reused)} reused")


class _Engine:
    """Client + transfer (+ the store and a download scheduler for --via-store)."""

    def __init__(self, args: argparse.Namespace, client_options: Any, options: Any,
                 out: _Out) -> None:
        self.args = args
        self.client_options = client_options
        self.options = options
        self.out = out
        self.client: Any = None
        self.transfer: Any = None
        self.store: Any = None
        self.scheduler: Any = None
        self._executor: Any = None

    async def __aenter__(self) -> _Engine:
        from .cli import command_transport
        from .client import RegistryClient
        from .push import Transfer

        self.client = await RegistryClient(
            self.client_options, transport=command_transport(self.client_options)).__aenter__()
        self.transfer = Transfer(self.client, self.options, emit=self.out.event)
        if getattr(self.args, "via_store", False):
            import asyncio
            from concurrent.futures import ThreadPoolExecutor

            from .scheduler import BlobScheduler
            from .store import ContentStore, default_store_path

            self.store = ContentStore(self.args.store or default_store_path())
            await asyncio.to_thread(self.store.init)
            self._executor = ThreadPoolExecutor(max_workers=min(32, self.options.concurrency + 2),
                                                thread_name_prefix="puller-io")
            self.scheduler = BlobScheduler(self.client, self.store,
                                           concurrency=self.options.concurrency,
                                           executor=self._executor, emit=lambda ev: None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Each step runs even when one before it was cancelled or failed: the threads of
        # both the downloads and the uploads are stopped before the connections close.
        try:
            try:
                if self.scheduler is not None:
                    await self.scheduler.aclose()
            finally:
                try:
                    await self.transfer.aclose()
                finally:
                    await self.client.__aexit__(None, None, None)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def provider(self, ref: Any) -> Any:
        from .push import RegistryProvider

        return RegistryProvider(self.client, ref, scheduler=self.scheduler, store=self.store)


# -- mirror ------------------------------------------------------------------------------------

def _mirror_command(args: argparse.Namespace) -> int:
    from .errors import PullerError
    from .mirror import ConfigError, MirrorSource, TagFilter, check_targets, load_config, \
        parse_shard, parse_source, parse_target
    from .platform import Platform

    out = _Out(args)
    problem = _check_common(args)
    if problem:
        return _usage(out, problem)
    if args.rate_limit_reserve < 0:
        return _usage(out, "--rate-limit-reserve must be >= 0")
    try:
        shard = parse_shard(args.shard, args.shards, dict(os.environ))
        platforms = tuple(Platform.parse(p) for p in args.platform) or None
        config = None
        if args.config:
            try:
                with open(args.config, encoding="utf-8") as f:
                    text = f.read(1 << 20)
            except OSError as exc:
                raise ConfigError(f"cannot read {args.config}: {exc.strerror}") from None
            config = load_config(text, args.config)
        target_raw = args.target or (config.target if config else None)
        target = parse_target(target_raw) if target_raw else None
        tags = TagFilter(include=tuple(args.include), exclude=tuple(args.exclude),
                         semver=args.semver, keep=args.keep)
        sources: list[MirrorSource] = list(config.sources) if config else []
        for raw in args.sources:
            ref, pinned = parse_source(raw)
            if pinned and tags.active:
                raise ConfigError(f"tag filters apply to repositories, not to {raw}")
            sources.append(MirrorSource(ref=ref, pinned=pinned, tags=tags,
                                        platforms=platforms or (config.platforms
                                                                if config else None)))
        if not sources:
            raise ConfigError("nothing to mirror: give SOURCEs or --config")
        check_targets(sources, target)  # before any request: a usage error, exit 2
        if config is not None and config.concurrency and args.concurrency == 8:
            args.concurrency = config.concurrency
        client_options = _client_options(args)
        options = _transfer_options(args)
    except (PullerError, ValueError) as exc:
        return _usage(out, str(exc))

    async def run() -> int:
        from .mirror import run_mirror
        from .push import ImageStats

        async with _Engine(args, client_options, options, out) as engine:
            def emit(ev: dict[str, Any]) -> None:
                out.event(ev)
                kind = ev["event"]
                if kind == "image.copied":
                    out.line(f"copied   {ev['ref']} -> {ev['target']} {_short(ev['digest'])} "
                             f"({ev['uploaded']} uploaded, {ev['mounted']} mounted, "
                             f"{ev['existed']} already there)")
                elif kind == "image.skipped":
                    out.line(f"skipped  {ev['ref']} -> {ev['target']} (up to date)")
                elif kind == "image.planned":
                    out.line(f"would copy {ev['ref']} -> {ev['target']} {_short(ev['digest'])}")
                elif kind == "image.failed":
                    if not out.json:
                        print(f"puller: {ev['ref']} -> {ev['target']}: {ev['error']}",
                              file=sys.stderr)
                elif kind == "rate.wait":
                    out.line(f"rate limit: {ev['remaining']} requests left on {ev['host']}; "
                             f"waiting {ev['seconds']}s")

            jobs = await run_mirror(engine.client, engine.transfer, sources, target,
                                    shard=shard, dry_run=args.dry_run,
                                    rate_reserve=args.rate_limit_reserve,
                                    provider_for=engine.provider, emit=emit)
        total = ImageStats()
        for j in jobs:
            if j.stats is not None:
                total.add(j.stats)
        counts = {s: sum(1 for j in jobs if j.status == s)
                  for s in ("copied", "skipped", "failed", "would-copy")}
        summary = {"event": "mirror.done", "images": len(jobs), "shard": f"{shard[0]}/{shard[1]}",
                   "dry_run": args.dry_run, **counts, **total.to_json()}
        out.event(summary)
        if args.dry_run:
            out.line(f"Dry run: {len(jobs)} images: {counts['would-copy']} would be copied, "
                     f"{counts['skipped']} up to date, {counts['failed']} failed")
        else:
            out.line(f"Mirrored {len(jobs)} images: {counts['copied']} copied, "
                     f"{counts['skipped']} skipped, {counts['failed']} failed")
            out.line(_blob_summary(total))
        return EXIT_FAILED if counts["failed"] else EXIT_OK

    return _run(run, out)
