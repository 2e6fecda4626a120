"""puller mirror: edge cases of planning and reporting (semver ranges, config errors,
rate-limit delays, platform filters in dry runs and on pinned digests, target names)."""

from __future__ import annotations

import json

import pytest

from puller.mirror import (
    ConfigError,
    TagFilter,
    filter_tags,
    load_config,
    parse_version,
    rate_delay,
    version_matches,
)
from tests.support.images import build_image, build_index, push
from tests.test_push import run

pytestmark = pytest.mark.filterwarnings("error")

LONGEST_PAUSE = 3600.0  # no single rate-limit pause may be longer than this


# -- pure functions --------------------------------------------------------------------------

def test_semver_operator_may_be_followed_by_a_space_in_every_comparator():
    v = parse_version
    # npm accepts "< 2.0" as "<2.0"; the first comparator of a range already did.
    assert version_matches(v("1.5"), ">= 1.0 < 2.0")
    assert not version_matches(v("2.0"), ">= 1.0 < 2.0")
    assert version_matches(v("1.5"), ">=1.0 <= 1.5")
    assert not version_matches(v("3.5"), "^1 || >= 4")
    assert version_matches(v("4.1"), "^1 || >= 4")
    tags = ["0.9", "1.0", "1.5", "2.0", "latest"]
    assert filter_tags(tags, TagFilter(semver=">=1.0 < 2.0")) == ["1.5", "1.0"]


def test_semver_edges_that_already_hold():
    v = parse_version
    assert not version_matches(v("1.2.0-rc1"), ">=1.0")  # pre-releases only when named
    assert version_matches(v("v1.2"), "~1.2") and version_matches(v("1"), "1.x")
    assert version_matches(v("99999999999999999999.0.0"), ">=1")
    assert filter_tags(["1", "1.2", "v1.10", "1.9.1", "latest", "edge"], TagFilter(keep=4)) \
        == ["v1.10", "1.9.1", "1.2", "1"]
    with pytest.raises(ConfigError):
        TagFilter(keep=-1)


def test_rate_delay_is_bounded_and_never_skipped_below_the_reserve():
    assert rate_delay(10, 100, 21600, 10) == 216.0  # Docker Hub: 100 per 6 h
    assert rate_delay(-3, 100, 21600, 10) == 216.0  # a negative count: spent
    # A limit of 1 per huge window would otherwise pause the run for years.
    assert 0 < rate_delay(0, 1, 10 ** 9, 10) <= LONGEST_PAUSE
    # A zero or negative limit is garbage, not "no need to wait".
    for limit in (0, -100):
        assert 0 < rate_delay(5, limit, 21600, 10) <= LONGEST_PAUSE
    assert 0 < rate_delay(5, 100, 0, 10) <= LONGEST_PAUSE
    assert rate_delay(11, -100, 21600, 10) == 0.0


@pytest.mark.parametrize("tags, problem", [
    ("{include: ['(']}", "invalid tag regex"),
    ("{exclude: ['[a-']}", "invalid tag regex"),
    ("{semver: '>=banana'}", "invalid semver range"),
    ("{keep: 0}", "keep must be at least 1"),
])
def test_tag_filter_errors_name_the_source_and_its_line(tags, problem):
    text = ("target: reg.example/m\n"
            "sources:\n"
            "  - a.io/first\n"
            "  - source: a.io/second\n"
            f"    tags: {tags}\n")
    with pytest.raises(ConfigError) as info:
        load_config(text, "mirror.yaml")
    msg = str(info.value)
    assert "\n" not in msg
    assert problem in msg
    assert "mirror.yaml" in msg and "sources[1]" in msg and "a.io/second" in msg
    assert "line 4" in msg, msg


# -- against a registry ----------------------------------------------------------------------

def _index(registry, repo: str, seed: int):
    amd = build_image(seed=seed, layer_sizes=[1_000], platform=("linux", "amd64", None))
    arm = build_image(seed=seed + 1, layer_sizes=[1_000], platform=("linux", "arm64", "v8"))
    idx = build_index([amd, arm], attestations=False)
    push(registry.url, repo, "1", idx)
    return amd, idx


def test_dry_run_with_a_platform_filter_says_what_a_real_run_does(
        registry, registry_factory, fault_proxy, unique_repo):
    amd, idx = _index(registry, unique_repo, seed=3101)
    other = registry_factory()
    dst = fault_proxy(other)
    source = f"{registry.host}/{unique_repo}:1"

    r = run("mirror", "--json", "--dry-run", "--platform", "linux/amd64", "--target",
            dst.host, source)
    assert r.returncode == 0, r.stderr
    planned = [json.loads(x) for x in r.stdout.splitlines()]
    planned = [e for e in planned if e["event"] == "image.planned"]
    # The digest the target will hold: the amd64 image's, not the index's.
    assert [e["digest"] for e in planned] == [str(amd.digest)]
    assert {q["method"] for q in dst.requests if q["path"] != "/v2/"} == {"HEAD"}

    # No platform matches: the real run fails, so the dry run can't promise a copy.
    r = run("mirror", "--dry-run", "--platform", "linux/s390x", "--target", dst.host, source)
    assert r.returncode == 1
    assert "would copy" not in r.stdout
    assert "0 would be copied, 0 up to date, 1 failed" in r.stdout
    assert "no image for linux/s390x" in r.stderr and "Traceback" not in r.stderr

    r = run("mirror", "--json", "--platform", "linux/amd64", "--target", dst.host, source)
    assert r.returncode == 0, r.stderr
    copied = [json.loads(x) for x in r.stdout.splitlines()]
    assert [e["digest"] for e in copied if e["event"] == "image.copied"] == [str(amd.digest)]


def test_a_pinned_digest_with_a_platform_filter_is_skipped_once_mirrored(
        registry, registry_factory, unique_repo):
    amd, idx = _index(registry, unique_repo, seed=3201)
    other = registry_factory()
    source = f"{registry.host}/{unique_repo}@{idx.digest}"
    args = ("mirror", "--platform", "linux/amd64", "--target", f"{other.host}/pin", source)
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "1 copied, 0 skipped, 0 failed" in r.stdout
    # The target is named by what it holds: the amd64 image, not the index it came from.
    assert f"{other.host}/pin/{unique_repo}@{amd.digest}" in r.stdout
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "0 copied, 1 skipped, 0 failed" in r.stdout, r.stdout


def test_a_target_name_too_long_is_a_usage_error_before_any_request(
        registry, registry_factory, fault_proxy, unique_repo):
    src = fault_proxy(registry)
    other = registry_factory()
    # Long enough for .../short to fit, and for the other repository not to.
    long_prefix = "p" * (255 - len(f"{other.host}//{unique_repo}/short") - 10)
    r = run("mirror", "--target", f"{other.host}/{long_prefix}",
            f"{src.host}/{unique_repo}/short", f"{src.host}/{unique_repo}/{'a' * 60}")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "255 characters" in r.stderr and "a" * 60 in r.stderr
    assert [q for q in src.requests if q["path"] != "/v2/"] == []


def test_a_paginated_tag_list_is_followed_and_an_empty_one_copies_nothing(
        registry, registry_factory, proxy, unique_repo):
    for i, tag in enumerate(("a1", "a2", "a3")):
        push(registry.url, unique_repo, tag, build_image(seed=3301 + i, layer_sizes=[500]))
    page = f"/v2/{unique_repo}/tags/list"
    proxy.status(200, path_regex=r"/tags/list$", method="GET",
                 body=json.dumps({"name": unique_repo, "tags": ["a1", "a2"]}).encode(),
                 headers={"Link": f'<{page}?last=a2&n=2>; rel="next"'})
    proxy.status(200, path_regex=r"/tags/list$", method="GET",
                 body=json.dumps({"name": unique_repo, "tags": ["a3"]}).encode())
    other = registry_factory()
    r = run("mirror", "--target", other.host, f"{proxy.host}/{unique_repo}")
    assert r.returncode == 0, r.stderr
    assert "Mirrored 3 images: 3 copied, 0 skipped, 0 failed" in r.stdout
    listed = [q["query"] for q in proxy.requests if q["path"] == page]
    assert len(listed) == 2 and "last=a2" in listed[1]

    proxy.status(200, path_regex=r"/tags/list$", method="GET",
                 body=json.dumps({"name": unique_repo, "tags": None}).encode())
    r = run("mirror", "--target", f"{other.host}/e", f"{proxy.host}/{unique_repo}")
    assert r.returncode == 0, r.stderr
    assert "Mirrored 0 images: 0 copied, 0 skipped, 0 failed" in r.stdout


def test_a_mixed_run_counts_each_outcome_and_fails_with_1(registry, registry_factory,
                                                         unique_repo):
    for i, tag in enumerate(("old", "new")):
        push(registry.url, unique_repo, tag, build_image(seed=3401 + i, layer_sizes=[500]))
    other = registry_factory()
    base = f"{registry.host}/{unique_repo}"
    assert run("mirror", "--target", other.host, f"{base}:old").returncode == 0
    r = run("mirror", "--json", "--target", other.host, f"{base}:old", f"{base}:new",
            f"{base}:absent", f"{base}-gone")
    assert r.returncode == 1
    done = json.loads(r.stdout.splitlines()[-1])
    assert (done["images"], done["copied"], done["skipped"], done["failed"]) == (4, 1, 1, 2)
