"""Mirror planning: sources, tag filters, semver ranges, shards and rate limits.

Everything above :func:`run_mirror` is pure (no I/O) so it can be tested on its own:

- :func:`parse_source` tells a repository (mirror all its tags) from one reference;
- :func:`load_config` reads ``mirror.yaml`` (or JSON) into :class:`MirrorConfig`;
- :func:`filter_tags` applies include/exclude regexes, a semver range and keep-newest-N;
- :func:`shard_of` assigns repositories to one of N workers deterministically;
- :func:`rate_delay` says how long to wait before a manifest GET when Docker Hub's
  ``RateLimit-Remaining`` is nearly spent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .errors import InvalidReference, PullerError
from .platform import Platform
from .reference import Reference, is_tag

__all__ = ["TagFilter", "MirrorSource", "MirrorConfig", "ConfigError", "parse_source",
           "parse_target", "load_config", "filter_tags", "parse_version", "version_matches",
           "shard_of", "assign_shards", "parse_shard", "rate_delay", "MAX_RATE_DELAY", "Job",
           "plan_target", "check_targets"]


class ConfigError(PullerError, ValueError):
    """A mirror configuration or option that can't be used."""


# -- semantic versions ----------------------------------------------------------------------

_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?"
                      r"(?:\+[0-9A-Za-z.-]+)?$")


@dataclass(frozen=True, slots=True, order=True)
class Version:
    major: int
    minor: int
    patch: int
    release: int  # 1 for a release, 0 for a pre-release (so releases sort above)
    pre: tuple[Any, ...]

    @property
    def prerelease(self) -> bool:
        return self.release == 0


def parse_version(tag: str) -> Version | None:
    """``v1.2.3``, ``1.2``, ``1``, ``1.2.3-rc.1`` -> Version; anything else None."""
    m = _VERSION.match(tag)
    if not m:
        return None
    major, minor, patch, pre = m.groups()
    pre_key: tuple[Any, ...] = ()
    if pre:
        pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return Version(int(major), int(minor or 0), int(patch or 0), 0 if pre else 1, pre_key)


_COMPARATOR = re.compile(r"^(>=|<=|>|<|=|\^|~)?\s*v?(\d+|[xX*])(?:\.(\d+|[xX*]))?"
                         r"(?:\.(\d+|[xX*]))?(?:-([0-9A-Za-z.-]+))?$")


def _bounds(token: str) -> list[tuple[str, Version]]:
    """One comparator as (op, version) constraints; x-ranges, ^ and ~ expand to two."""
    m = _COMPARATOR.match(token)
    if not m:
        raise ConfigError(f"invalid semver range element {token!r}")
    op, a, b, c, pre = m.groups()
    op = op or "="
    wild = [p is None or p in "xX*" for p in (a, b, c)]
    nums = [0 if w else int(p) for w, p in zip(wild, (a, b, c), strict=True)]
    parsed = parse_version(f"0.0.0-{pre}") if pre else None  # same characters: parses
    pre_key = parsed.pre if parsed is not None else ()
    v = Version(nums[0], nums[1], nums[2], 0 if pre else 1, pre_key)
    low = Version(nums[0], nums[1], nums[2], 0, ())  # lowest possible, pre-releases included

    def bump(i: int) -> Version:
        n = list(nums)
        n[i] += 1
        for j in range(i + 1, 3):
            n[j] = 0
        return Version(n[0], n[1], n[2], 0, ())

    if wild[0]:
        return [] if op in ("=", "^", "~", ">=", "<=") else [(op, v)]
    if op == "^":
        i = 0 if nums[0] else (1 if nums[1] or wild[1] else 2)
        if wild[i]:
            i = max(0, i - 1)
        return [(">=", v if not any(wild) else low), ("<", bump(i))]
    if op == "~":
        i = 1 if not wild[1] else 0
        return [(">=", v if not any(wild) else low), ("<", bump(i))]
    if any(wild):
        first = wild.index(True)
        if op == "=":
            return [(">=", low), ("<", bump(first - 1))]
        if op in (">", "<="):
            return [("<" if op == "<=" else ">=", bump(first - 1))]
        return [(op, low)]
    return [(op, v)]


def version_matches(version: Version, expression: str) -> bool:
    """npm-style ranges: ``>=1.2 <2``, ``^1.4``, ``~1.4.2``, ``1.x``, ``1.2.*``, with ``||``
    between alternatives. Pre-releases match only when the range names one."""
    for alternative in expression.split("||"):
        # An operator may be followed by spaces (">= 1.2 < 2", as npm allows).
        tokens = re.findall(r"(?:(?:>=|<=|>|<|=|\^|~)\s*)?[^\s]+", alternative.strip())
        if not tokens:
            return True
        constraints: list[tuple[str, Version]] = []
        for t in tokens:
            constraints += _bounds(t.replace(" ", ""))
        if version.prerelease and not any(v.prerelease and v.pre for _, v in constraints):
            continue
        if all(_compare(version, op, v) for op, v in constraints):
            return True
    return False


def _compare(a: Version, op: str, b: Version) -> bool:
    return {">=": a >= b, ">": a > b, "<=": a <= b, "<": a < b, "=": a == b}[op]


# -- tag filters ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TagFilter:
    include: tuple[str, ...] = ()  # regexes (re.search); a tag must match one, when given
    exclude: tuple[str, ...] = ()  # regexes; a tag matching any is left out
    semver: str | None = None  # a range; tags that aren't versions are left out
    keep: int | None = None  # the newest N (by version; tags that aren't versions last)

    def __post_init__(self) -> None:
        for rx in self.include + self.exclude:
            try:
                re.compile(rx)
            except re.error as exc:
                raise ConfigError(f"invalid tag regex {rx!r}: {exc}") from None
        if self.semver is not None:
            version_matches(Version(0, 0, 0, 1, ()), self.semver)  # validates
        if self.keep is not None and self.keep < 1:
            raise ConfigError("keep must be at least 1")

    @property
    def active(self) -> bool:
        return bool(self.include or self.exclude or self.semver or self.keep)


def filter_tags(tags: list[str], f: TagFilter) -> list[str]:
    """The tags that pass ``f``, newest first when ``keep`` or ``semver`` is set, else in
    the registry's order."""
    out = []
    for t in tags:
        if f.include and not any(re.search(rx, t) for rx in f.include):
            continue
        if any(re.search(rx, t) for rx in f.exclude):
            continue
        if f.semver is not None:
            v = parse_version(t)
            if v is None or not version_matches(v, f.semver):
                continue
        out.append(t)
    if f.keep is not None or f.semver is not None:
        def key(t: str) -> tuple[int, Any, str]:
            v = parse_version(t)
            return (1, v, t) if v is not None else (0, None, t)

        versioned = sorted((t for t in out if parse_version(t) is not None),
                           key=lambda t: (parse_version(t), t), reverse=True)
        others = sorted(t for t in out if parse_version(t) is None)
        out = versioned + others
        if f.keep is not None:
            out = out[:f.keep]
    return out


# -- sources, targets, config ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MirrorSource:
    ref: Reference  # the repository (tag/digest only when ``pinned``)
    pinned: bool  # a single tag or digest was named; otherwise every tag (filtered)
    tags: TagFilter = TagFilter()
    platforms: tuple[Platform, ...] | None = None  # None: every platform, byte for byte
    target: str | None = None  # full target repository (registry/path), overriding the prefix

    @property
    def repository(self) -> str:
        return self.ref.name


def parse_source(raw: str) -> tuple[Reference, bool]:
    """``registry/repo`` (all tags) or ``registry/repo:tag`` / ``@digest`` (just that)."""
    ref = Reference.parse(raw)
    rest = raw.split("@", 1)[0]
    named = "@" in raw or ":" in rest.rsplit("/", 1)[-1]
    return ref, named


def parse_target(raw: str) -> tuple[str, str]:
    """``HOST[/PREFIX]`` -> (registry, prefix without slashes at the ends)."""
    raw = raw.strip().rstrip("/")
    if not raw or "@" in raw:
        raise ConfigError(f"invalid target {raw!r}: expected HOST[/PREFIX]")
    host, _, prefix = raw.partition("/")
    try:
        check = Reference.parse(f"{raw}/x" if prefix else f"{host}/x")
    except InvalidReference as exc:
        raise ConfigError(f"invalid target {raw!r}: {exc}") from None
    if check.registry != host:
        raise ConfigError(f"invalid target {raw!r}: the first component must be a registry "
                          "host (with a '.' or ':' or 'localhost')")
    return host, prefix


def plan_target(source: Reference, target: tuple[str, str], override: str | None) -> Reference:
    """Where ``source`` goes: ``HOST/PREFIX/<source repository path>`` or the override."""
    if override:
        base = Reference.parse(override)
        return base.replace(tag=source.tag, digest=source.digest)
    host, prefix = target
    path = f"{prefix}/{source.repository}" if prefix else source.repository
    try:
        checked = Reference.parse(f"{host}/{path}")
    except InvalidReference as exc:
        raise ConfigError(f"target for {source.name}: {exc}") from None
    return checked.replace(tag=source.tag, digest=source.digest)


def check_targets(sources: list[MirrorSource] | tuple[MirrorSource, ...],
                  target: tuple[str, str] | None) -> None:
    """Raise ConfigError, before any request, if a source has no valid target name (none
    given, or ``PREFIX/`` + its path is not a repository name, e.g. too long)."""
    for s in sources:
        if s.target is None and target is None:
            raise ConfigError(f"no target for {s.repository}: give --target HOST[/PREFIX] "
                              "or 'target:' in the config")
        plan_target(s.ref, target or ("", ""), s.target)


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    target: str | None = None
    sources: tuple[MirrorSource, ...] = ()
    concurrency: int | None = None
    platforms: tuple[Platform, ...] | None = None


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{what} must be a string or a list of strings")


def _platforms(value: Any, what: str) -> tuple[Platform, ...] | None:
    if value is None or value == "all":
        return None
    try:
        return tuple(Platform.parse(p) for p in _strings(value, what))
    except PullerError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _tag_filter(obj: Any, where: str) -> TagFilter:
    if obj is None:
        return TagFilter()
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: tags must be a mapping (include, exclude, semver, keep)")
    unknown = set(obj) - {"include", "exclude", "semver", "keep"}
    if unknown:
        raise ConfigError(f"{where}: unknown tags key {sorted(unknown)[0]!r}")
    keep = obj.get("keep")
    if keep is not None and (type(keep) is not int):
        raise ConfigError(f"{where}: keep must be an integer")
    semver = obj.get("semver")
    if semver is not None and not isinstance(semver, str):
        semver = str(semver)
    return TagFilter(include=_strings(obj.get("include"), f"{where}: include"),
                     exclude=_strings(obj.get("exclude"), f"{where}: exclude"),
                     semver=semver, keep=keep)


def load_config(text: str, name: str = "mirror config") -> MirrorConfig:
    """Read a mirror config (YAML, or JSON)::

        target: registry.example.com/mirror      # HOST[/PREFIX]; --target overrides
        concurrency: 8
        platforms: all                           # or [linux/amd64, linux/arm64]
        sources:
          - source: docker.io/library/alpine     # a repository: its tags, filtered
            tags: {include: ['^3\\.'], exclude: [rc], semver: '>=3.18', keep: 3}
            platforms: [linux/amd64]
            target: registry.example.com/base/alpine   # this repository instead
          - 127.0.0.1:5000/fleet/api:1           # one reference, as it is
    """
    doc: Any
    lines: list[int] = []  # YAML: the line of each entry of 'sources', for messages
    stripped = text.lstrip()
    # A key given twice is a mistake in the file (which one was meant?), not a choice
    # for the parser to make silently.
    if stripped.startswith("{"):
        def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in pairs:
                if key in out:
                    raise ConfigError(f"{name}: key {key!r} is given twice")
                out[key] = value
            return out

        try:
            doc = json.loads(text, object_pairs_hook=unique)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{name}: invalid JSON: {exc}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{name}: reading YAML needs PyYAML (pip install pyyaml); "
                              "or write the config as JSON") from None

        class _Loader(yaml.SafeLoader):
            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or \
                            not isinstance(key_node, yaml.ScalarNode):
                        continue  # '<<' merges may be overridden; other keys: the parser's
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise ConfigError(f"{name}: key {key!r} is given twice (line "
                                          f"{key_node.start_mark.line + 1})")
                    seen.add(key)
                return super().construct_mapping(node, deep=deep)

        try:
            doc = yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise ConfigError(f"{name}: invalid YAML: {detail[:200]}") from None
        lines = _source_lines(text, yaml)
    if not isinstance(doc, dict):
        raise ConfigError(f"{name}: expected a mapping with 'sources'")
    unknown = set(doc) - {"target", "sources", "concurrency", "platforms"}
    if unknown:
        raise ConfigError(f"{name}: unknown key {sorted(unknown)[0]!r}")
    target = doc.get("target")
    if target is not None and not isinstance(target, str):
        raise ConfigError(f"{name}: target must be a string HOST[/PREFIX]")
    if target is not None:
        parse_target(target)
    concurrency = doc.get("concurrency")
    if concurrency is not None and (type(concurrency) is not int or not 1 <= concurrency <= 256):
        raise ConfigError(f"{name}: concurrency must be an integer from 1 to 256")
    default_platforms = _platforms(doc.get("platforms"), f"{name}: platforms")
    items = doc.get("sources")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{name}: 'sources' must be a non-empty list")
    sources = []
    for i, item in enumerate(items):
        where = f"{name}: sources[{i}]"
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, dict) or not isinstance(item.get("source"), str):
            raise ConfigError(f"{where}: expected a reference or a mapping with 'source'")
        where += f" ({' '.join(item['source'][:200].split())}"
        where += f", line {lines[i]})" if i < len(lines) else ")"
        unknown = set(item) - {"source", "tags", "platforms", "target"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        try:
            ref, pinned = parse_source(item["source"])
        except PullerError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        override = item.get("target")
        if override is not None:
            if not isinstance(override, str):
                raise ConfigError(f"{where}: target must be a repository name")
            try:
                o, named = parse_source(override)
            except PullerError as exc:
                raise ConfigError(f"{where}: target: {exc}") from None
            if named:
                raise ConfigError(f"{where}: target names a repository, without tag or digest")
            override = o.name
        try:
            tags = _tag_filter(item.get("tags"), where)
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        if pinned and tags.active:
            raise ConfigError(f"{where}: tag filters apply to a repository, not to one tag")
        platforms = _platforms(item.get("platforms"), f"{where}: platforms") \
            if "platforms" in item else default_platforms
        sources.append(MirrorSource(ref=ref, pinned=pinned, tags=tags, platforms=platforms,
                                    target=override))
    return MirrorConfig(target=target, sources=tuple(sources), concurrency=concurrency,
                        platforms=default_platforms)


def _source_lines(text: str, yaml: Any) -> list[int]:
    """The line (from 1) where each entry of a YAML config's ``sources`` starts."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "sources" and \
                isinstance(value, yaml.SequenceNode):
            return [n.start_mark.line + 1 for n in value.value]
    return []


# -- shards -------------------------------------------------------------------------------------

def parse_shard(text: str | None, shards: int | None, env: dict[str, str]) -> tuple[int, int]:
    """``--shard K/N`` (K from 0), or ``--shards N`` with K from ``$JOB_COMPLETION_INDEX``
    (Kubernetes Indexed Jobs). Default 0/1: everything."""
    if text is not None and shards is not None:
        raise ConfigError("give --shard K/N or --shards N, not both")
    if text is not None:  # an empty --shard= (a CI variable left unset) is an error too
        m = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", text)
        if not m:
            raise ConfigError(f"--shard wants K/N (e.g. 0/4), not {text!r}")
        k, n = int(m.group(1)), int(m.group(2))
    elif shards is not None:
        index = env.get("JOB_COMPLETION_INDEX")
        if index is None or not re.fullmatch(r"\s*[0-9]+\s*", index):
            raise ConfigError("--shards N takes this worker's number from "
                              "$JOB_COMPLETION_INDEX, which is not set to a number")
        k, n = int(index), shards
    else:
        return 0, 1
    if n < 1 or not 0 <= k < n:
        raise ConfigError(f"shard {k}/{n}: K must be from 0 to N-1")
    return k, n


def shard_of(repository: str, shards: int) -> int:
    """A stable shard for a repository name (the same on every machine and run)."""
    h = hashlib.sha256(repository.encode()).digest()
    return int.from_bytes(h[:8], "big") % shards


def assign_shards(repositories: list[str], shards: int) -> dict[str, int]:
    """Each distinct repository to one of ``shards`` workers: the names sorted and dealt
    out in turn, so workers get equal shares; every worker computes the same table from
    the same source list."""
    names = sorted(set(repositories))
    return {name: i % shards for i, name in enumerate(names)}


# -- rate limits ---------------------------------------------------------------------------------

MAX_RATE_DELAY = 900.0  # the longest single pause before a GET (a 429 after it is retried)


def rate_delay(remaining: int | None, limit: int | None, window: int | None,
               reserve: int) -> float:
    """Seconds to wait before the next counted request: 0 while more than ``reserve``
    requests are left; else the time the registry takes to give one back
    (window / limit, e.g. 21600 s / 100 on Docker Hub), at most :data:`MAX_RATE_DELAY`.
    A limit or window that isn't a positive number counts as unknown (60 s)."""
    if remaining is None or remaining > reserve:
        return 0.0
    if limit is not None and limit > 0 and window is not None and window > 0:
        return min(window / limit, MAX_RATE_DELAY)
    return 60.0


class _Get:
    """One manifest GET that went through a :class:`RateGate`."""

    __slots__ = ("host", "sent", "ended", "answered")

    def __init__(self, host: str) -> None:
        self.host = host
        self.sent = time.monotonic()
        self.ended: float | None = None
        self.answered = asyncio.Event()


class RateGate:
    """Spaces out manifest GETs to a registry whose ``RateLimit-Remaining`` runs low.

    HEADs don't count on Docker Hub, so only GETs pass through here. The last
    announced ``remaining`` is reduced by every GET the registry may not have counted
    when it answered: those still in flight, and those that ended after the announcing
    request was sent. So concurrent jobs can't rush past the reserve on an old number;
    once at the reserve, GETs go one per ``window / limit`` seconds, the pace at which
    the registry gives requests back. Until a registry has answered one GET, the others
    wait for that answer: it may announce a limit."""

    def __init__(self, reserve: int, lookup: Callable[[Reference], Any],
                 on_wait: Callable[[str, float, int], None] | None = None) -> None:
        self.reserve = reserve
        self._lookup = lookup
        self._gets: dict[str, list[_Get]] = {}  # host -> GETs it may not have counted
        self._heard: set[str] = set()  # hosts that have answered a GET
        self._locks: dict[str, asyncio.Lock] = {}
        self._on_wait = on_wait

    async def before_get(self, ref: Reference) -> _Get:
        """Wait as long as the limit asks. Returns the GET's ticket for
        :meth:`after_get`."""
        host = ref.api_host
        lock = self._locks.setdefault(host, asyncio.Lock())
        gets = self._gets.setdefault(host, [])
        async with lock:
            info = self._lookup(ref)
            if info is None and host not in self._heard and gets:
                # Nothing heard from this registry yet and a GET is out: its answer may
                # announce a limit, so wait for it rather than send a burst blind.
                await gets[0].answered.wait()
                info = self._lookup(ref)
            asked_at = getattr(info, "asked_at", None)
            # GETs that ended before the announcing request was sent are in its count.
            gets[:] = [g for g in gets if g.ended is None or
                       (asked_at is not None and g.ended > asked_at)]
            if info is not None:
                remaining, limit, window = info[0], info[1], info[2]
                left = remaining - len(gets)
                delay = rate_delay(left, limit, window, self.reserve)
                if delay > 0:
                    if self._on_wait is not None:
                        self._on_wait(host, delay, left)
                    await asyncio.sleep(delay)
            ticket = _Get(host)
            gets.append(ticket)
            return ticket

    def after_get(self, ticket: _Get) -> None:
        ticket.ended = time.monotonic()
        ticket.answered.set()
        self._heard.add(ticket.host)


# -- jobs ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class Job:
    source: Reference
    target: Reference
    platforms: tuple[Platform, ...] | None
    status: str = "pending"  # copied, skipped, failed, would-copy
    digest: str | None = None
    error: str | None = None
    stats: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- the run ------------------------------------------------------------------------------------

async def run_mirror(client: Any, transfer: Any, sources: list[MirrorSource],
                     target: tuple[str, str] | None, *, shard: tuple[int, int] = (0, 1),
                     dry_run: bool = False, rate_reserve: int = 10,
                     provider_for: Callable[[Reference], Any],
                     emit: Callable[[dict[str, Any]], None]) -> list[Job]:
    """Plan (list tags, filter, shard) and copy every job through one ``transfer``."""
    from .push import ImageStats, choose_platforms

    check_targets(sources, target)
    k, n = shard
    table = assign_shards([s.repository for s in sources], n)
    mine = [s for s in sources if table[s.repository] == k]
    emit({"event": "mirror.planned", "shard": f"{k}/{n}",
          "repositories": len({s.repository for s in mine})})

    jobs: list[Job] = []
    failed_listing: list[Job] = []

    def dest(src_ref: Reference, s: MirrorSource) -> Reference:  # (checked above)
        return plan_target(src_ref, target or ("", ""), s.target)

    async def expand(s: MirrorSource) -> list[Job]:
        if s.pinned:
            return [Job(s.ref, dest(s.ref, s), s.platforms)]
        try:
            tags = await client.list_tags(s.ref)
        except PullerError as exc:
            j = Job(s.ref, dest(s.ref.replace(tag=None, digest=None), s), s.platforms)
            j.status, j.error = "failed", str(exc)
            failed_listing.append(j)
            return []
        # A name in the tag list that isn't a tag would put '?', '#' or '/' into URLs
        # and name some other manifest: never copied; a failure when the filters want it.
        good: list[str] = []
        bad: list[str] = []
        for t in tags:
            (good if is_tag(t) else bad).append(t)
        if bad:
            repo = s.ref.replace(tag=None, digest=None)
            for t in filter_tags(bad, replace(s.tags, keep=None)):
                j = Job(repo, dest(repo, s), s.platforms)
                j.status = "failed"
                j.error = f"the tag list of {repo} names {t[:80]!r}, which is not a valid tag"
                failed_listing.append(j)
        out = []
        for t in filter_tags(good, s.tags):
            ref = s.ref.replace(tag=t, digest=None)
            out.append(Job(ref, dest(ref, s), s.platforms))
        return out

    for group in await asyncio.gather(*(expand(s) for s in mine)):
        seen = {(str(j.source), str(j.target)) for j in jobs}
        jobs += [j for j in group if (str(j.source), str(j.target)) not in seen]
    for j in failed_listing:
        emit({"event": "image.failed", "ref": str(j.source), "target": str(j.target),
              "error": j.error})

    gate = RateGate(rate_reserve, client.rate_limit,
                    lambda host, delay, left: emit({"event": "rate.wait", "host": host,
                                                    "seconds": round(delay, 1),
                                                    "remaining": left}))

    async def copy(job: Job, provider: Any, data: bytes, media_type: str | None,
                   expected: Any) -> None:
        dst = job.target
        stats = ImageStats()
        put_as = dst.tag if dst.tag is not None else str(expected)
        digest = await transfer.push_image(provider, data, media_type, dst, put_as,
                                           stats=stats)
        job.status, job.digest, job.stats = "copied", str(digest), stats
        emit({"event": "image.copied", "ref": str(job.source), "target": str(dst),
              "digest": str(digest), **stats.to_json()})

    async def one(job: Job) -> None:
        src, dst = job.source, job.target
        ident = src.identifier
        try:
            have = await client.head_manifest(dst, dst.identifier)
            if have is None and not dry_run and job.platforms is None:
                # Not at the target: the source's manifest is needed anyway, so one GET
                # stands in for its HEAD.
                provider = provider_for(src)
                ticket = await gate.before_get(src)
                try:
                    src_digest, data, media_type = await provider.fetch_top(ident)
                finally:
                    gate.after_get(ticket)
                await copy(job, provider, data, media_type, src_digest)
                return
            head = await client.head_manifest(src, ident)
            if head is None:
                raise PullerError(f"manifest unknown: {src} not found on {src.registry}")
            src_digest = head[0]
            expected = src_digest
            data = media_type = None
            if job.platforms is not None:
                # The digest the target will hold depends on the index (a dry run too: it
                # says what a real run would copy, or that it would fail).
                ticket = await gate.before_get(src)
                try:
                    fetched = await client.get_manifest(src, str(src_digest))
                finally:
                    gate.after_get(ticket)
                data, media_type = fetched.data, fetched.media_type
                data, media_type, one_image = choose_platforms(data, media_type,
                                                               list(job.platforms), str(src))
                expected = one_image.digest if one_image is not None else \
                    _sha256(data)
                job.extra["one_image"] = one_image
                if dst.tag is None and dst.digest != expected:
                    # A pinned digest narrowed to some platforms: the target holds (and
                    # is named by) the narrowed manifest, not the source's digest.
                    dst = job.target = dst.replace(digest=expected)
                    have = await client.head_manifest(dst, str(expected))
            if have is not None and have[0] == expected:
                job.status, job.digest = "skipped", str(expected)
                emit({"event": "image.skipped", "ref": str(src), "target": str(dst),
                      "digest": str(expected)})
                return
            if dry_run:
                job.status, job.digest = "would-copy", str(expected)
                emit({"event": "image.planned", "ref": str(src), "target": str(dst),
                      "digest": str(expected),
                      "target_digest": str(have[0]) if have is not None else None})
                return
            provider = provider_for(src)
            if data is None:
                ticket = await gate.before_get(src)
                try:
                    data, media_type = await provider.manifest(src_digest, head[2])
                finally:
                    gate.after_get(ticket)
            one_image = job.extra.get("one_image")
            if one_image is not None:
                data, media_type = await provider.manifest(one_image.digest,
                                                           one_image.media_type)
            await copy(job, provider, data, media_type, expected)
        except PullerError as exc:
            job.status, job.error = "failed", str(exc)
            emit({"event": "image.failed", "ref": str(src), "target": str(dst),
                  "error": str(exc)})

    await asyncio.gather(*(one(j) for j in jobs))
    return failed_listing + jobs


def _sha256(data: bytes) -> Any:
    from .digest import Digest

    return Digest.from_bytes(data, "sha256")
