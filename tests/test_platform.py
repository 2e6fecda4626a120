"""Platform parsing, normalisation and selection, including real captured indexes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from puller.digest import Digest
from puller.errors import InvalidPlatform, ManifestError, NoMatchingPlatform
from puller.manifest import ImageIndex, parse_manifest
from puller.platform import Platform, candidates, is_unknown, normalize_arch, select


def _fixtures_dir() -> Path:
    # CI clones the repo next to shared/, so go up from tests/ -> repo -> its parent.
    env = os.environ.get("PULLER_FIXTURES")
    if env:
        return Path(env)
    workspace = Path(__file__).resolve().parent.parent.parent
    return workspace / "shared" / "fixtures" / "registry-captures"


FIXTURES = _fixtures_dir()
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"registry capture fixtures not found at {FIXTURES} (set PULLER_FIXTURES)")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def index(name: str) -> ImageIndex:
    parsed = parse_manifest(fixture(name))
    assert isinstance(parsed, ImageIndex)
    return parsed


def P(s: str) -> Platform:
    return Platform.parse(s)


# -- parsing and normalisation -----------------------------------------------------------

@pytest.mark.parametrize("text, os_, arch, variant", [
    ("linux/amd64", "linux", "amd64", None),
    ("linux/x86_64", "linux", "amd64", None),
    ("linux/x86-64", "linux", "amd64", None),
    ("linux/amd64/v1", "linux", "amd64", None),
    ("linux/amd64/v3", "linux", "amd64", "v3"),
    ("linux/arm64", "linux", "arm64", "v8"),
    ("linux/arm64/v8", "linux", "arm64", "v8"),
    ("linux/arm64/8", "linux", "arm64", "v8"),
    ("linux/aarch64", "linux", "arm64", "v8"),
    ("linux/arm64/v9", "linux", "arm64", "v9"),
    ("linux/arm", "linux", "arm", "v7"),
    ("linux/arm/v7", "linux", "arm", "v7"),
    ("linux/arm/7", "linux", "arm", "v7"),
    ("linux/arm/v6", "linux", "arm", "v6"),
    ("linux/arm/5", "linux", "arm", "v5"),
    ("linux/armhf", "linux", "arm", "v7"),
    ("linux/armel", "linux", "arm", "v6"),
    ("linux/i386", "linux", "386", None),
    ("linux/386", "linux", "386", None),
    ("linux/ppc64le", "linux", "ppc64le", None),
    ("linux/s390x", "linux", "s390x", None),
    ("linux/riscv64", "linux", "riscv64", None),
    ("Linux/AMD64", "linux", "amd64", None),
    ("windows/amd64", "windows", "amd64", None),
    ("macos/arm64", "darwin", "arm64", "v8"),
    ("arm64", "linux", "arm64", "v8"),
    ("x86_64", "linux", "amd64", None),
])
def test_parse_good(text: str, os_: str, arch: str, variant: str | None) -> None:
    p = Platform.parse(text)
    assert (p.os, p.architecture, p.variant, p.os_version) == (os_, arch, variant, None)
    assert Platform.parse(str(p)) == p


@pytest.mark.parametrize("text", [
    "", "/", "linux/", "/amd64", "linux//v7", "linux/amd64/v8/x", "linux amd64",
    "linux/amd64\n", "linux/am d64", "foo", "linux/arm64/v8/", "linux/\u00e4md64",
])
def test_parse_bad(text: str) -> None:
    with pytest.raises(InvalidPlatform) as e:
        Platform.parse(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [None, 3, b"linux/amd64"])
def test_parse_refuses_non_str(value: object) -> None:
    with pytest.raises(InvalidPlatform):
        Platform.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("machine, expected", [
    ("x86_64", "linux/amd64"),
    ("AMD64", "linux/amd64"),
    ("aarch64", "linux/arm64/v8"),
    ("arm64", "linux/arm64/v8"),
    ("armv7l", "linux/arm/v7"),
    ("armv6l", "linux/arm/v6"),
    ("armv5tel", "linux/arm/v5"),
    ("armv8l", "linux/arm/v8"),
    ("i686", "linux/386"),
    ("i386", "linux/386"),
    ("ppc64le", "linux/ppc64le"),
    ("s390x", "linux/s390x"),
    ("riscv64", "linux/riscv64"),
])
def test_host(monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert str(Platform.host()) == expected


def test_os_only_means_host_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.machine", lambda: "armv7l")
    assert Platform.parse("linux") == Platform("linux", "arm", "v7")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert Platform.parse("linux") == Platform("linux", "amd64")


def test_real_host_is_linux() -> None:
    p = Platform.host()
    assert p.os == "linux" and p.architecture


@pytest.mark.parametrize("arch, variant, expected", [
    ("x86_64", None, ("amd64", None)),
    ("x86-64", "v1", ("amd64", None)),
    ("amd64", "v2", ("amd64", "v2")),
    ("aarch64", None, ("arm64", "v8")),
    ("aarch64", "8", ("arm64", "v8")),
    ("arm64", "v8.0", ("arm64", "v8")),
    ("ARM64", "V8", ("arm64", "v8")),
    ("armhf", None, ("arm", "v7")),
    ("armhf", "v6", ("arm", "v7")),
    ("armel", None, ("arm", "v6")),
    ("arm", None, ("arm", "v7")),
    ("arm", "6", ("arm", "v6")),
    ("arm", "v5", ("arm", "v5")),
    ("arm", "armv7", ("arm", "armv7")),  # non-canonical values are kept (containerd does too)
    ("i386", None, ("386", None)),
    ("mips64le", None, ("mips64le", None)),
])
def test_normalize_arch(arch: str, variant: str | None, expected: tuple) -> None:
    assert normalize_arch(arch, variant) == expected


@pytest.mark.parametrize("obj, expected", [
    ({"architecture": "amd64", "os": "linux"}, Platform("linux", "amd64")),
    ({"architecture": "arm64", "os": "linux"}, Platform("linux", "arm64", "v8")),
    ({"architecture": "arm", "os": "linux", "variant": "v6"}, Platform("linux", "arm", "v6")),
    ({"architecture": "arm", "os": "linux", "variant": ""}, Platform("linux", "arm", "v7")),
    ({"architecture": "amd64", "os": "windows", "os.version": "10.0.20348.1726"},
     Platform("windows", "amd64", None, "10.0.20348.1726")),
    ({"architecture": "amd64", "os": "linux", "features": ["sse"]}, Platform("linux", "amd64")),
    ({"architecture": "unknown", "os": "unknown"}, Platform("unknown", "unknown")),
])
def test_from_json(obj: dict, expected: Platform) -> None:
    assert Platform.from_json(obj) == expected


@pytest.mark.parametrize("obj", [
    None, [], "linux/amd64",
    {"os": "linux"},
    {"architecture": "amd64"},
    {"architecture": 64, "os": "linux"},
    {"architecture": "amd64", "os": None},
    {"architecture": "amd64", "os": "linux", "variant": 7},
    {"architecture": "amd64", "os": "linux", "os.version": 10},
    {"architecture": "", "os": "linux"},
    {"architecture": "amd64", "os": "li/nux"},
    {"architecture": "amd64\n", "os": "linux"},
    {"architecture": "amd64", "os": "windows", "os.version": "10 0"},
])
def test_from_json_bad(obj: object) -> None:
    with pytest.raises(InvalidPlatform) as e:
        Platform.from_json(obj)  # type: ignore[arg-type]
    assert not isinstance(e.value, ManifestError)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("p, obj", [
    (Platform("linux", "amd64"), {"architecture": "amd64", "os": "linux"}),
    (Platform("linux", "arm", "v7"), {"architecture": "arm", "os": "linux", "variant": "v7"}),
    (Platform("windows", "amd64", None, "10.0.17763.4377"),
     {"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.4377"}),
])
def test_to_json(p: Platform, obj: dict) -> None:
    assert p.to_json() == obj
    assert Platform.from_json(p.to_json()) == p


def test_str() -> None:
    assert str(P("linux/arm64")) == "linux/arm64/v8"
    assert str(P("linux/amd64")) == "linux/amd64"
    assert str(Platform("windows", "amd64", None, "10.0.1")) == "windows/amd64"


@pytest.mark.parametrize("p, unknown", [
    (None, True),
    (Platform("unknown", "unknown"), True),
    (Platform("linux", "unknown"), True),
    (Platform("linux", "amd64"), False),
])
def test_is_unknown(p: Platform | None, unknown: bool) -> None:
    assert is_unknown(p) is unknown


# -- candidates and select -------------------------------------------------------------------

@pytest.mark.parametrize("want, expected", [
    ("linux/arm/v7", ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
    ("linux/arm/v8", ["linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
    ("linux/arm/v6", ["linux/arm/v6", "linux/arm/v5"]),
    ("linux/arm/v5", ["linux/arm/v5"]),
    ("linux/arm64/v8", ["linux/arm64/v8", "linux/arm64"]),
    ("linux/arm64/v9", ["linux/arm64/v9", "linux/arm64/v8", "linux/arm64"]),
    ("linux/amd64", ["linux/amd64"]),
    ("linux/amd64/v3", ["linux/amd64/v3", "linux/amd64/v2", "linux/amd64"]),
    ("linux/386", ["linux/386"]),
    ("linux/s390x", ["linux/s390x"]),
])
def test_candidates(want: str, expected: list[str]) -> None:
    assert [str(c) for c in candidates(P(want))] == expected


def test_candidates_variantless_arm64_entry() -> None:
    # An index entry built by hand without normalisation still matches arm64/v8.
    entries = [(Platform("linux", "amd64"), "amd"), (Platform("linux", "arm64", None), "arm")]
    assert select(entries, P("linux/arm64")) == "arm"


def test_select_first_listed_wins_and_best_candidate_wins() -> None:
    entries = [
        (Platform("linux", "arm", "v5"), "v5"),
        (Platform("linux", "arm", "v6"), "v6-a"),
        (Platform("linux", "arm", "v6"), "v6-b"),
    ]
    assert select(entries, P("linux/arm/v7")) == "v6-a"
    assert select(entries, P("linux/arm/v5")) == "v5"


def test_select_ignores_none_and_unknown() -> None:
    entries = [(None, "none"), (Platform("unknown", "unknown"), "att"),
               (Platform("linux", "unknown"), "half")]
    with pytest.raises(NoMatchingPlatform, match="available: none$"):
        select(entries, P("linux/amd64"))
    with pytest.raises(NoMatchingPlatform):
        select([], P("linux/amd64"))


def test_select_amd64_levels() -> None:
    entries = [(Platform("linux", "amd64", "v3"), "v3"), (Platform("linux", "amd64"), "base")]
    assert select(entries, P("linux/amd64/v3")) == "v3"
    assert select(entries, P("linux/amd64/v2")) == "base"
    assert select(entries, P("linux/amd64")) == "base"


def test_select_no_32bit_fallback() -> None:
    entries = [(Platform("linux", "arm", "v7"), "arm"), (Platform("linux", "386"), "386")]
    with pytest.raises(NoMatchingPlatform):
        select(entries, P("linux/arm64"))
    with pytest.raises(NoMatchingPlatform):
        select(entries, P("linux/amd64"))


def test_select_error_lists_platforms_bounded() -> None:
    entries = [(Platform("linux", f"arch{i}"), i) for i in range(500)]
    with pytest.raises(NoMatchingPlatform) as e:
        select(entries, P("linux/amd64"))
    msg = str(e.value)
    assert msg.startswith("no image for linux/amd64 in index; available: linux/arch0, ")
    assert "more)" in msg and len(msg) < 1000 and "\n" not in msg


# -- real indexes ------------------------------------------------------------------------------

HW = "dockerhub-hello-world-20230604.manifest-list.json"
HW_DIGESTS = {
    "linux/amd64": "7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3",
    "linux/arm/v5": "084c3bdd1271adc754e2c5f6ba7046f1a2c099597dbd9643592fa8eb99981402",
    "linux/arm/v7": "a0a386314d69d1514d7aa63d12532b284bf37bba15ed7b4fc1a3f86605f86c63",
    "linux/arm/v6": "084c3bdd1271adc754e2c5f6ba7046f1a2c099597dbd9643592fa8eb99981402",  # -> v5
    "linux/arm/v8": "a0a386314d69d1514d7aa63d12532b284bf37bba15ed7b4fc1a3f86605f86c63",  # -> v7
    "linux/arm64": "efebf0f7aee69450f99deafe11121afa720abed733943e50581a9dc7540689c8",
    "linux/arm64/v8": "efebf0f7aee69450f99deafe11121afa720abed733943e50581a9dc7540689c8",
    "linux/386": "004d23c66201b22fce069b7505756f17088de7889c83891e9bc69d749fa3690e",
    "linux/mips64le": "06bca41ba617acf0b3644df05d0d9c2d2f82ccaab629c0e39792b24682970040",
    "linux/riscv64": "72ba79e34f1baa40cd4d9ecd684b8389d0a1e18cf6e6d5c44c19716d25f65e20",
    # two windows builds: the first listed wins (os.version is not matched)
    "windows/amd64": "85481f9fb05b83c912dfdec9cea6230f2df24e5dfde84a23def8915cec2519b5",
}


@needs_fixtures
@pytest.mark.parametrize("want, hexdigest", sorted(HW_DIGESTS.items()))
def test_select_hello_world(want: str, hexdigest: str) -> None:
    assert index(HW).select(P(want)).digest.hex == hexdigest


@needs_fixtures
def test_hello_world_no_match_message() -> None:
    with pytest.raises(NoMatchingPlatform) as e:
        index(HW).select(P("linux/mips"))
    assert str(e.value) == (
        "no image for linux/mips in index; available: linux/amd64, linux/arm/v5, linux/arm/v7, "
        "linux/arm64/v8, linux/386, linux/mips64le, linux/ppc64le, linux/riscv64, linux/s390x, "
        "windows/amd64")


@needs_fixtures
@pytest.mark.parametrize("want, hexprefix", [
    ("linux/arm/v7", "b5dbad4bdb44"),  # no v7 in the list: falls back to v6, like containerd
    ("linux/arm/v6", "b5dbad4bdb44"),
    ("linux/arm/v5", "9142d97ef280"),
    ("linux/arm/v8", "b5dbad4bdb44"),
    ("linux/arm64", "dc472a59fb00"),
    ("linux/amd64", "030fcb92e148"),
    ("linux/s390x", "e5aa1b0a2462"),
])
def test_select_busybox_2017_arm_fallback(want: str, hexprefix: str) -> None:
    chosen = index("dockerhub-busybox-2017.manifest-list.json").select(P(want))
    assert chosen.digest.short == hexprefix


ALPINE_PLATFORMS = {
    "linux/amd64": "linux-amd64", "linux/arm/v6": "linux-arm-v6", "linux/arm/v7": "linux-arm-v7",
    "linux/arm64/v8": "linux-arm64-v8", "linux/386": "linux-386",
    "linux/ppc64le": "linux-ppc64le", "linux/riscv64": "linux-riscv64",
    "linux/s390x": "linux-s390x",
}


@needs_fixtures
@pytest.mark.parametrize("want, stem", sorted(ALPINE_PLATFORMS.items()))
def test_select_alpine_and_verify_child_bytes(want: str, stem: str) -> None:
    chosen = index("dockerhub-alpine-3.23.2.oci-index.json").select(P(want))
    assert str(chosen.platform) == want
    child = fixture(f"dockerhub-alpine-3.23.2.{stem}.oci-manifest.json")
    assert Digest.from_bytes(child) == chosen.digest and len(child) == chosen.size


@needs_fixtures
@pytest.mark.parametrize("want, expected", [
    ("linux/arm64", "linux/arm64/v8"),
    ("linux/arm/v8", "linux/arm/v7"),
    ("linux/amd64/v2", "linux/amd64"),
])
def test_select_alpine_fallbacks(want: str, expected: str) -> None:
    chosen = index("dockerhub-alpine-3.23.2.oci-index.json").select(P(want))
    assert str(chosen.platform) == expected


@needs_fixtures
@pytest.mark.parametrize("want", ["linux/arm/v5", "linux/mips64le", "windows/amd64",
                                  "linux/arm64/v7"])
def test_select_alpine_no_match(want: str) -> None:
    with pytest.raises(NoMatchingPlatform) as e:
        index("dockerhub-alpine-3.23.2.oci-index.json").select(P(want))
    msg = str(e.value)
    assert "unknown" not in msg
    assert msg.endswith("available: linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8, "
                        "linux/386, linux/ppc64le, linux/riscv64, linux/s390x")


@needs_fixtures
def test_select_over_all_entries_skips_attestations() -> None:
    # Even without images(), unknown/unknown entries never match.
    idx = index("dockerhub-alpine-3.23.2.oci-index.json")
    assert len(idx.manifests) == 16
    chosen = select([(d.platform, d) for d in idx.manifests], P("linux/amd64"))
    assert chosen.digest.short == "1882fa4569e0"


@needs_fixtures
def test_select_regclient_variantless_arm64() -> None:
    idx = index("regclient-testrepo.index-with-unknown-platform-builder-entries.json")
    raw = json.loads(fixture("regclient-testrepo.index-with-unknown-platform-builder-entries.json"))
    assert "variant" not in raw["manifests"][1]["platform"]
    assert idx.select(P("linux/arm64/v8")).digest.short == "7e87ffc91b9c"
    assert idx.select(P("linux/amd64")).digest.short == "1effc9d48232"


@needs_fixtures
def test_select_kairos_single_arch() -> None:
    idx = index("quayio-kairos-ubuntu-v3.5.2.oci-index.verbatim.json")
    assert idx.select(P("linux/amd64")).digest.short == "c93ad9a4ed48"
    with pytest.raises(NoMatchingPlatform, match="available: linux/amd64$"):
        idx.select(P("linux/arm64"))


@needs_fixtures
def test_schema1_children_list_has_no_images() -> None:
    idx = index("unknown-origin.manifest-list-of-schema1-children.json")
    assert [str(d.platform) for d in idx.manifests] == [
        "linux/ppc64le", "linux/amd64", "linux/s390x", "linux/arm/armv7", "linux/arm64/armv8"]
    assert idx.images() == ()
    with pytest.raises(NoMatchingPlatform, match="available: none"):
        idx.select(P("linux/amd64"))
