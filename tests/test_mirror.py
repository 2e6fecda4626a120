"""puller mirror: many repositories, tag filters, dry runs, HEAD-only re-runs, auth, shards;
and the pure planning functions."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from puller.mirror import (
    ConfigError,
    RateGate,
    TagFilter,
    assign_shards,
    filter_tags,
    load_config,
    parse_shard,
    parse_source,
    parse_target,
    parse_version,
    plan_target,
    rate_delay,
    version_matches,
)
from puller.errors import InvalidReference
from puller.reference import Reference
from tests.support.images import build_image, build_index, push
from tests.test_push import run, skopeo_raw, uploads

pytestmark = pytest.mark.filterwarnings("error")

TAGS = ["1.0", "1.1", "1.2.0", "2.0", "2.1-rc1", "latest", "nightly"]


def seed_repos(registry, prefix: str, names: list[str], tags: list[str], seed: int,
               base_size: int = 300_000) -> dict[tuple[str, str], object]:
    """Repositories whose images share one base layer; returns (repo, tag) -> image."""
    base = build_image(seed=seed, layer_sizes=[base_size])
    out = {}
    for i, name in enumerate(names):
        for j, tag in enumerate(tags):
            img = build_image(seed=seed + 1 + i * 50 + j, layer_sizes=[2_000 + j], base=base)
            push(registry.url, f"{prefix}/{name}", tag, img)
            out[(f"{prefix}/{name}", tag)] = img
    return out


def test_mirror_config_with_tag_filters_and_dry_run(registry, registry_factory, unique_repo,
                                                    tmp_path: Path):
    images = seed_repos(registry, unique_repo, ["api", "web"], TAGS, seed=801)
    other = registry_factory()
    config = tmp_path / "mirror.yaml"
    config.write_text(f"""
target: {other.host}/mir
sources:
  - source: {registry.host}/{unique_repo}/api
    tags:
      semver: ">=1.1 <3"
      keep: 2
  - source: {registry.host}/{unique_repo}/web
    tags:
      include: ['^1\\.']
      exclude: ['^1\\.0$']
  - {registry.host}/{unique_repo}/web:latest
""")
    want = {("api", "2.0"), ("api", "1.2.0"), ("web", "1.1"), ("web", "1.2.0"), ("web", "latest")}

    r = run("mirror", "--config", str(config), "--dry-run")
    assert r.returncode == 0, r.stderr
    planned = {line.split()[4] for line in r.stdout.splitlines() if line.startswith("would")}
    assert planned == {f"{other.host}/mir/{unique_repo}/{n}:{t}" for n, t in want}
    assert "Dry run: 5 images: 5 would be copied" in r.stdout
    gone = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                           f"docker://{other.host}/mir/{unique_repo}/api:2.0"],
                          capture_output=True, timeout=60)
    assert gone.returncode != 0  # a dry run changes nothing

    r = run("mirror", "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["event"] == "mirror.done"
    assert (summary["images"], summary["copied"], summary["failed"]) == (5, 5, 0)
    # The shared base layer: uploaded once, mounted into the other repository.
    assert summary["uploaded"] == 1 + 5 * 2 and summary["mounted"] == 1
    for n, t in want:
        img = images[(f"{unique_repo}/{n}", t)]
        assert skopeo_raw(f"{other.host}/mir/{unique_repo}/{n}:{t}") == img.manifest
    tags = subprocess.run(["skopeo", "list-tags", "--tls-verify=false",
                           f"docker://{other.host}/mir/{unique_repo}/web"],
                          capture_output=True, check=True, timeout=60).stdout
    assert sorted(json.loads(tags)["Tags"]) == ["1.1", "1.2.0", "latest"]


def test_no_change_rerun_costs_one_manifest_head_per_side(registry, registry_factory,
                                                          fault_proxy, unique_repo):
    seed_repos(registry, unique_repo, ["a", "b"], ["1", "2"], seed=851)
    src = fault_proxy(registry)
    other = registry_factory()
    dst = fault_proxy(other)
    sources = [f"{src.host}/{unique_repo}/a", f"{src.host}/{unique_repo}/b"]
    r = run("mirror", "--target", dst.host, *sources)
    assert r.returncode == 0, r.stderr
    assert "Mirrored 4 images: 4 copied, 0 skipped, 0 failed" in r.stdout

    src.clear_log()
    dst.clear_log()
    r = run("mirror", "--target", dst.host, *sources)
    assert r.returncode == 0, r.stderr
    assert "Mirrored 4 images: 0 copied, 4 skipped, 0 failed" in r.stdout
    on_dst = Counter((q["method"], "/manifests/" in q["path"]) for q in dst.requests
                     if q["path"] != "/v2/")
    assert on_dst == Counter({("HEAD", True): 4})
    on_src = Counter((q["method"], q["path"].rsplit("/", 2)[-2]) for q in src.requests
                     if q["path"] != "/v2/")
    assert on_src == Counter({("HEAD", "manifests"): 4, ("GET", "tags"): 2})


def test_rate_limit_headers_pace_manifest_gets_instead_of_hitting_429(
        registry, registry_factory, fault_proxy, unique_repo):
    """A source that limits manifest GETs like Docker Hub (4 in the bucket, 2 back per
    second, HEADs free) and announces it in RateLimit-* headers: the mirror spaces its
    GETs out at the reserve and the registry never has to refuse one."""
    seed_repos(registry, unique_repo, ["a", "b"], ["1", "2", "3", "4"], seed=861)
    src = fault_proxy(registry)
    src.rate_limit(limit=4, window=2)
    other = registry_factory()
    r = run("mirror", "--json", "--rate-limit-reserve", "1", "--target", other.host,
            f"{src.host}/{unique_repo}/a", f"{src.host}/{unique_repo}/b")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["event"] == "mirror.done"
    assert sum(1 for e in events if e["event"] == "image.copied") == 8
    waits = [e for e in events if e["event"] == "rate.wait"]
    assert waits and all(e["host"] == src.host for e in waits)
    gets = [q for q in src.requests if q["method"] == "GET" and "/manifests/" in q["path"]]
    assert len(gets) == 8, [(q['path'][-20:], q['status']) for q in gets]
    assert src.rate_limited == 0, [q["status"] for q in gets]


def test_mirror_into_a_registry_with_auth(registry, registry_factory, unique_repo,
                                          tmp_path: Path):
    images = seed_repos(registry, unique_repo, ["svc"], ["1", "2"], seed=871)
    secret = "s3cret-pa55"
    locked = registry_factory(auth="htpasswd", htpasswd_users={"mirror": secret})
    source = f"{registry.host}/{unique_repo}/svc"

    r = run("mirror", "--target", f"{locked.host}/m", source, env={"DOCKER_CONFIG":
                                                                   str(tmp_path / "none")})
    assert r.returncode == 1
    assert "authentication required" in r.stderr and "Traceback" not in r.stderr
    assert "Mirrored 2 images: 0 copied, 0 skipped, 2 failed" in r.stdout

    conf = tmp_path / "docker"
    conf.mkdir()
    auth = base64.b64encode(f"mirror:{secret}".encode()).decode()
    (conf / "config.json").write_text(json.dumps({"auths": {locked.host: {"auth": auth}}}))
    r = run("mirror", "--json", "--target", f"{locked.host}/m", source,
            env={"DOCKER_CONFIG": str(conf)})
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout + r.stderr and auth not in r.stdout + r.stderr
    fetched = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", "--creds", f"mirror:{secret}",
         f"docker://{locked.host}/m/{unique_repo}/svc:2"], capture_output=True, check=True,
        timeout=60).stdout
    assert fetched == images[(f"{unique_repo}/svc", "2")].manifest


def test_mirror_into_a_token_registry(registry, token_registry, unique_repo, tmp_path: Path):
    img = build_image(seed=881, layer_sizes=[5_000])
    idx = build_index([img], attestations=False)
    push(registry.url, unique_repo, "t", idx)
    user, password = token_registry.credentials
    conf = tmp_path / "docker"
    conf.mkdir()
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (conf / "config.json").write_text(json.dumps({"auths": {token_registry.host: {"auth": auth}}}))
    r = run("mirror", "--target", f"{token_registry.host}/tok", f"{registry.host}/{unique_repo}:t",
            env={"DOCKER_CONFIG": str(conf)})
    assert r.returncode == 0, r.stderr
    assert password not in r.stdout + r.stderr
    assert skopeo_raw(f"{token_registry.host}/tok/{unique_repo}:t") == idx.manifest


def test_failed_source_does_not_stop_the_rest(registry, registry_factory, unique_repo):
    seed_repos(registry, unique_repo, ["ok"], ["1"], seed=891)
    other = registry_factory()
    r = run("mirror", "--target", other.host, f"{registry.host}/{unique_repo}/ok",
            f"{registry.host}/{unique_repo}/absent", f"{registry.host}/{unique_repo}/ok:nope")
    assert r.returncode == 1
    assert "1 copied, 0 skipped, 2 failed" in r.stdout
    assert all(line.startswith("puller: ") for line in r.stderr.splitlines())
    assert "Traceback" not in r.stderr
    assert run("mirror", "--target", other.host).returncode == 2
    assert run("mirror", "--shard", "3/3", "--target", other.host, "x.io/a").returncode == 2


def test_names_in_a_tag_list_that_are_not_tags_are_never_copied(registry, registry_factory,
                                                                proxy, unique_repo):
    images = seed_repos(registry, unique_repo, ["app"], ["1.0", "x", "latest"], seed=897)
    repo = f"{unique_repo}/app"
    # A source whose tag list names things that would become other tags' URLs.
    listed = ["1.0", "x?y=1", "latest?z", "x#frag", "a/b", "../../up"]
    proxy.status(200, path_regex=r"/tags/list$", times=None, method="GET",
                 body=json.dumps({"name": repo, "tags": listed}).encode())
    other = registry_factory()
    r = run("mirror", "--target", f"{other.host}/m", f"{proxy.host}/{repo}")
    assert r.returncode == 1
    assert "1 copied, 0 skipped, 5 failed" in r.stdout
    err = r.stderr.splitlines()
    assert len(err) == 5 and all("is not a valid tag" in e for e in err), r.stderr
    assert skopeo_raw(f"{other.host}/m/{repo}:1.0") == images[(repo, "1.0")].manifest
    for tag in ("x", "latest"):  # what the bad names would have overwritten
        gone = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                               f"docker://{other.host}/m/{repo}:{tag}"],
                              capture_output=True, timeout=60)
        assert gone.returncode != 0
    # Filters apply first: a name they leave out is not reported.
    r = run("mirror", "--include", "^1", "--target", f"{other.host}/m2", f"{proxy.host}/{repo}")
    assert r.returncode == 0, r.stderr
    assert "1 copied, 0 skipped, 0 failed" in r.stdout


def test_a_reference_never_holds_a_tag_that_is_not_one():
    ref = Reference.parse("example.com/app:1")
    for bad in ("x?y", "a/b", "", ".hidden", "x" * 129, "x#y"):
        with pytest.raises(InvalidReference):
            ref.replace(tag=bad)
    assert ref.replace(tag="v2.0_rc-1").tag == "v2.0_rc-1"


def test_shards_in_parallel_cover_everything_once(registry, registry_factory, fault_proxy,
                                                  unique_repo):
    names = ["r0", "r1", "r2", "r3", "r4", "r5"]
    images = seed_repos(registry, unique_repo, names, ["1"], seed=901)
    other = registry_factory()
    n = 3
    fronts = [fault_proxy(other) for _ in range(n)]  # one per worker, to tell them apart
    sources = [f"{registry.host}/{unique_repo}/{x}" for x in names]
    env = dict(os.environ)
    env.pop("PULLER_STORE", None)
    procs = []
    for k in range(n):
        e = dict(env, JOB_COMPLETION_INDEX=str(k))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "puller", "mirror", "--json", "--shards", str(n),
             "--target", fronts[k].host, *sources],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e))
    outs = [p.communicate(timeout=120) for p in procs]
    copied: list[str] = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        copied += [json.loads(x)["ref"] for x in out.splitlines()
                   if json.loads(x)["event"] == "image.copied"]
    # The union is complete and disjoint.
    assert sorted(copied) == sorted(f"{registry.host}/{unique_repo}/{x}:1" for x in names)
    table = assign_shards([f"{registry.host}/{unique_repo}/{x}" for x in names], n)
    assert Counter(table.values()) == Counter({0: 2, 1: 2, 2: 2})
    for x in names:
        img = images[(f"{unique_repo}/{x}", "1")]
        assert skopeo_raw(f"{other.host}/{unique_repo}/{x}:1") == img.manifest
    # Within each worker every blob was uploaded once (the shared base into the first of
    # its repositories, then mounted into the second).
    base = images[(f"{unique_repo}/r0", "1")].layer_digests[0]
    total = Counter()
    for front in fronts:
        log = front.requests
        done = Counter(parse_qs(q["query"])["digest"][0] for q in uploads(log))
        assert max(done.values()) == 1
        mounts = [q for q in log if q["method"] == "POST" and "mount=" in q["query"]
                  and q["status"] == 201]
        assert [parse_qs(q["query"])["mount"][0] for q in mounts] == [base]
        total.update(done)
    assert total[base] <= n  # at most once per worker that needs it


# -- pure planning functions --------------------------------------------------------------------

def test_versions_and_ranges():
    assert parse_version("v1.2.3") > parse_version("1.2.3-rc.1") > parse_version("1.2.2")
    assert parse_version("latest") is None
    v = parse_version
    assert version_matches(v("1.4.0"), ">=1.2 <2")
    assert not version_matches(v("2.0"), ">=1.2 <2")
    assert version_matches(v("1.9"), "^1.4") and not version_matches(v("2.0"), "^1.4")
    assert version_matches(v("0.2.5"), "^0.2.1") and not version_matches(v("0.3.0"), "^0.2.1")
    assert version_matches(v("1.4.9"), "~1.4.2") and not version_matches(v("1.5.0"), "~1.4.2")
    assert version_matches(v("1.7"), "1.x") and not version_matches(v("2.0"), "1.x")
    assert version_matches(v("3.0"), "1.x || >=3")
    assert not version_matches(v("1.5.0-rc1"), ">=1.2")
    assert version_matches(v("1.5.0-rc1"), ">=1.5.0-rc0")
    with pytest.raises(ConfigError):
        version_matches(v("1.0"), ">=banana")


def test_filter_tags():
    tags = ["latest", "1.0", "1.10", "1.9", "2.0-rc1", "2.0", "edge"]
    assert filter_tags(tags, TagFilter()) == tags
    assert filter_tags(tags, TagFilter(semver=">=1.9")) == ["2.0", "1.10", "1.9"]
    assert filter_tags(tags, TagFilter(keep=2)) == ["2.0", "2.0-rc1"]
    assert filter_tags(tags, TagFilter(include=(r"^1\.",), exclude=(r"0$",))) == ["1.9"]
    assert filter_tags(tags, TagFilter(include=("e",))) == ["latest", "edge"]
    with pytest.raises(ConfigError):
        TagFilter(include=("(",))


def test_sources_targets_and_config(tmp_path: Path):
    assert parse_source("127.0.0.1:5000/fleet/api") == (
        Reference.parse("127.0.0.1:5000/fleet/api"), False)
    assert parse_source("127.0.0.1:5000/fleet/api:1")[1] is True
    assert parse_source(f"alpine@sha256:{'a' * 64}")[1] is True
    assert parse_target("127.0.0.1:5001/mirror/") == ("127.0.0.1:5001", "mirror")
    with pytest.raises(ConfigError):
        parse_target("just-a-name")
    src = Reference.parse("127.0.0.1:5000/fleet/api:1")
    planned = plan_target(src, ("reg.example:5000", "m"), None)
    assert str(planned) == "reg.example:5000/m/fleet/api:1"
    assert str(plan_target(src, ("x:1", ""), "other.io/pinned/api")) == "other.io/pinned/api:1"
    cfg = load_config("""
target: reg.example:5000/m
concurrency: 4
platforms: [linux/amd64]
sources:
  - source: docker.io/library/alpine
    tags: {semver: ">=3.18", keep: 3}
    platforms: all
  - 127.0.0.1:5000/fleet/api:1
""")
    assert cfg.concurrency == 4 and len(cfg.sources) == 2
    assert cfg.sources[0].platforms is None and cfg.sources[0].tags.keep == 3
    assert cfg.sources[1].pinned and str(cfg.sources[1].platforms[0]) == "linux/amd64"
    assert load_config('{"sources": ["a.io/b"]}').sources[0].ref.name == "a.io/b"
    for bad in ("sources: []", "target: 5\nsources: [a.io/b]", "sources: [{source: 'A//b'}]",
                "sources: [{source: a.io/b:1, tags: {keep: 1}}]", "bogus: 1\nsources: [a.io/b]",
                "sources: [{source: a.io/b, tags: {keep: 0}}]", "- [unbalanced"):
        with pytest.raises(ConfigError):
            load_config(bad)
    # A key given twice: which one was meant? Refused, not left to the parser.
    for bad, key in (("target: a.io\ntarget: b.io\nsources: [a.io/b]", "'target'"),
                     ("sources: [{source: a.io/b, tags: {keep: 1, keep: 2}}]", "'keep'"),
                     ('{"sources": ["a.io/b"], "sources": []}', "'sources'")):
        with pytest.raises(ConfigError, match=f"key {key} is given twice"):
            load_config(bad)
    merged = load_config("sources:\n  - source: a.io/b\n    tags: &t {keep: 2}\n"
                         "  - source: a.io/c\n    tags: {<<: *t, keep: 3}\n")
    assert [x.tags.keep for x in merged.sources] == [2, 3]  # a merge may be overridden


def test_shards():
    assert parse_shard(None, None, {}) == (0, 1)
    assert parse_shard("2/4", None, {}) == (2, 4)
    assert parse_shard(None, 5, {"JOB_COMPLETION_INDEX": "3"}) == (3, 5)
    for text, shards, env in (("4/4", None, {}), ("x", None, {}), (None, 3, {}),
                              ("0/2", 2, {}), (None, 0, {"JOB_COMPLETION_INDEX": "0"}),
                              ("", None, {}), ("", 2, {"JOB_COMPLETION_INDEX": "0"}),
                              (None, 3, {"JOB_COMPLETION_INDEX": "\u00b2"})):
        with pytest.raises(ConfigError):
            parse_shard(text, shards, env)
    repos = [f"r.io/team/app{i}" for i in range(10)]
    table = assign_shards(repos, 3)
    assert table == assign_shards(list(reversed(repos)), 3)  # order of sources doesn't matter
    assert sorted(Counter(table.values()).values()) == [3, 3, 4]


def test_rate_limit_gate():
    assert rate_delay(None, None, None, 10) == 0
    assert rate_delay(50, 100, 21600, 10) == 0
    assert rate_delay(10, 100, 21600, 10) == 216.0
    assert rate_delay(0, None, None, 10) == 60.0

    waits: list[tuple[str, float, int]] = []
    info = {"h": (12, 100, 100)}  # 12 left, one back per second
    ref = Reference.parse("registry.example/a/b:1")

    async def scenario() -> None:
        gate = RateGate(10, lambda r: info["h"], lambda h, d, left: waits.append((h, d, left)))
        original = asyncio.sleep

        async def no_sleep(delay: float) -> None:
            await original(0)

        asyncio.sleep = no_sleep  # type: ignore[assignment]
        try:
            for _ in range(4):
                await gate.before_get(ref)
        finally:
            asyncio.sleep = original  # type: ignore[assignment]

    asyncio.run(scenario())
    # 12 and 11 left: go; at 10 (the reserve) the gate starts spacing requests out.
    assert [w[2] for w in waits] == [10, 9]
    assert all(w[1] == 1.0 for w in waits)


def test_registries_without_the_digest_header_are_mirrored_and_rechecked(
        registry, registry_factory, fault_proxy, unique_repo):
    """Docker-Content-Digest is optional: a source and a target that never send it are
    mirrored, and a re-run still skips what is there (a GET of a tag's manifest instead
    of the HEAD's header; for a digest, the 200 itself)."""
    seed_repos(registry, unique_repo, ["a"], ["1", "2"], seed=853)
    src = fault_proxy(registry)
    other = registry_factory()
    dst = fault_proxy(other)
    for p in (src, dst):
        p.drop_header("Docker-Content-Digest", path_regex="/manifests/")
    source = f"{src.host}/{unique_repo}/a"
    r = run("mirror", "--target", dst.host, source)
    assert r.returncode == 0, r.stderr
    assert "Mirrored 2 images: 2 copied, 0 skipped, 0 failed" in r.stdout
    r = run("mirror", "--target", dst.host, source)
    assert r.returncode == 0, r.stderr
    assert "Mirrored 2 images: 0 copied, 2 skipped, 0 failed" in r.stdout
    for tag in ("1", "2"):
        assert skopeo_raw(f"{other.host}/{unique_repo}/a:{tag}") == \
            skopeo_raw(f"{registry.host}/{unique_repo}/a:{tag}")


def test_tag_list_pages_are_followed_wherever_the_link_points_on_the_registry():
    from puller.client import _next_link
    from puller.errors import RegistryError

    ref = Reference.parse("reg.example:5000/team/app:1")
    here = "/v2/team/app/tags/list?n=2"
    assert _next_link('</v2/team/app/tags/list?last=b&n=2>; rel="next"', ref, here) == \
        "/v2/team/app/tags/list?last=b&n=2"
    assert _next_link('<?last=b&n=2>; rel="next"', ref, here) == \
        "/v2/team/app/tags/list?last=b&n=2"  # query only: the same path
    assert _next_link('<https://reg.example:5000/v2/team/app/tags/list?last=b>; rel=next',
                      ref, here) == "/v2/team/app/tags/list?last=b"
    assert _next_link('<http://x/y>; rel="prev"', ref, here) is None
    assert _next_link(None, ref, here) is None
    for elsewhere in ('<https://cdn.example/v2/team/app/tags/list?last=b>; rel="next"',
                      '</api/tags?last=b>; rel="next"'):
        with pytest.raises(RegistryError, match="continued the tag list"):
            _next_link(elsewhere, ref, here)


async def test_a_tag_list_longer_than_allowed_is_an_error_not_a_cut(registry, proxy,
                                                                    unique_repo):
    """A registry whose tag list keeps naming a next page: past the limit, an error
    (a mirror must not quietly use part of the list)."""
    from puller.client import ClientOptions, RegistryClient
    from puller.errors import RegistryError

    page = f"/v2/{unique_repo}/tags/list"
    for i in range(3):
        proxy.status(200, path_regex=r"/tags/list$", method="GET",
                     body=json.dumps({"name": unique_repo, "tags": [f"t{i}"]}).encode(),
                     headers={"Link": f'<{page}?last=t{i}&n=1>; rel="next"'} if i < 2 else {})
    ref = Reference.parse(f"{proxy.host}/{unique_repo}")
    async with RegistryClient(ClientOptions(), credentials=None) as c:
        with pytest.raises(RegistryError, match="goes on past 2 pages"):
            await c.list_tags(ref, page_size=1, max_pages=2)
        assert await c.list_tags(ref, page_size=1) == ["t2"]  # (the rules are used up)
