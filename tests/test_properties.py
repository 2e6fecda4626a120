"""Property tests for hostile input: whatever a user or registry sends, parsing either
refuses it with the module's own error or yields values that are safe to put into file
paths and URLs. (Round trips of well-formed input live in test_digest/test_reference.)"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from puller.client import _parse_retry_after
from puller.digest import ALGORITHMS, Digest
from puller.errors import InvalidDigest, InvalidReference, ManifestError
from puller.manifest import ImageIndex, ImageManifest, parse_manifest
from puller.reference import Reference
from puller.store import ContentStore

ROOT = Path("/nonexistent/store-root")
STORE = ContentStore(ROOT)

# Characters that matter to paths and URLs, mixed with ones that are legal in digests.
_HOSTILE = "sha256512:0123456789abcdefABCDEF./\\%?#@ \x00\n-_+=~"
_hostile_text = st.one_of(st.text(alphabet=_HOSTILE, max_size=140), st.text(max_size=140))


def _hexes() -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(ALGORITHMS)).flatmap(
        lambda alg: st.text(alphabet="0123456789abcdef", min_size=ALGORITHMS[alg],
                            max_size=ALGORITHMS[alg]).map(lambda h: f"{alg}:{h}"))


@given(st.one_of(_hostile_text, _hexes()))
def test_no_accepted_digest_can_leave_the_store(text: str) -> None:
    try:
        d = Digest.parse(text)
    except InvalidDigest:
        return
    for path in (STORE.blob_path(d), STORE.partial_path(d)):
        rel = path.relative_to(ROOT)
        assert ".." not in rel.parts and "." not in rel.parts
        assert all(re.fullmatch(r"[a-z0-9-]+", part) for part in rel.parts)
    assert STORE.blob_path(d).parent == ROOT / "blobs" / d.algorithm


@given(st.one_of(st.none(), st.integers(), st.binary(max_size=80), st.floats(), _hostile_text),
       st.one_of(st.none(), st.integers(), st.binary(max_size=80), _hostile_text))
def test_digest_construction_refuses_anything_unsafe(algorithm: object, hexpart: object) -> None:
    try:
        d = Digest(algorithm, hexpart)  # type: ignore[arg-type]
    except InvalidDigest as e:
        assert "\n" not in str(e) and len(str(e)) < 400
        return
    assert Digest.parse(str(d)) == d


@given(_hexes().filter(lambda t: re.search(r"[a-f]", t.split(":")[1]) is not None))
def test_upper_case_hex_is_refused(text: str) -> None:
    alg, hexpart = text.split(":")
    try:
        Digest.parse(f"{alg}:{hexpart.upper()}")
    except InvalidDigest:
        return
    raise AssertionError("upper-case hex accepted")


_ref_alphabet = string.ascii_letters + string.digits + "._-/:@[]%?#\\ ~" + "\u00e9"


@given(st.one_of(st.text(alphabet=_ref_alphabet, max_size=120), st.text(max_size=120)))
def test_accepted_references_are_safe_in_urls(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except InvalidReference as e:
        assert "\n" not in str(e)
        return
    # The repository and tag go into /v2/<repository>/manifests/<tag>: nothing may
    # escape the path or start a query, fragment or escape sequence.
    assert re.fullmatch(r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*",
                        ref.repository), ref.repository
    assert len(ref.name) <= 255
    if ref.tag is not None:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", ref.tag)
    assert not re.search(r"[/?#%\\\s@]", ref.registry.replace("[", "").replace("]", ""))
    assert ref.tag is not None or ref.digest is not None
    assert Reference.parse(str(ref)) == ref
    assert Reference.parse(ref.familiar()) == ref


@given(st.text(alphabet=string.ascii_lowercase + string.digits + "-_.", min_size=1,
               max_size=30),
       st.text(alphabet=string.ascii_letters + string.digits + "_.-", min_size=1, max_size=40),
       _hexes())
def test_name_tag_and_digest_all_survive(repo: str, tag: str, digest: str) -> None:
    try:
        ref = Reference.parse(f"localhost:5000/{repo}:{tag}@{digest}")
    except InvalidReference:
        assume(False)
        return
    assert ref.tag == tag and str(ref.digest) == digest
    assert ref.identifier == digest  # a pinned reference asks for the digest, keeps the tag


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=20)

_descriptor = st.fixed_dictionaries(
    {"mediaType": st.sampled_from(["application/vnd.oci.image.layer.v1.tar", "x", "",
                                   "application/vnd.oci.image.manifest.v1+json"]),
     "digest": st.one_of(_hexes(), _hostile_text),
     "size": st.one_of(st.integers(min_value=-2, max_value=2**60), st.booleans(), _json)},
    optional={"urls": _json, "platform": _json, "annotations": _json})

_manifest_like = st.fixed_dictionaries(
    {},
    optional={"schemaVersion": st.one_of(st.just(2), st.just(1), _json),
              "mediaType": st.sampled_from(["application/vnd.oci.image.manifest.v1+json",
                                            "application/vnd.oci.image.index.v1+json",
                                            "application/vnd.docker.distribution.manifest.v1+json",
                                            "text/plain"]),
              "config": st.one_of(_descriptor, _json),
              "layers": st.one_of(st.lists(_descriptor, max_size=3), _json),
              "manifests": st.one_of(st.lists(_descriptor, max_size=3), _json),
              "subject": st.one_of(_descriptor, _json),
              "annotations": _json})


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_manifest_like.map(lambda d: json.dumps(d).encode()),
                 _json.map(lambda d: json.dumps(d).encode()),
                 st.binary(max_size=200)),
       st.one_of(st.none(), st.sampled_from(["application/json",
                                             "application/vnd.oci.image.index.v1+json",
                                             "application/vnd.docker.distribution.manifest.v2+json",
                                             "text/html"])))
def test_manifest_parsing_only_raises_manifest_errors(data: bytes, content_type: str | None
                                                      ) -> None:
    try:
        parsed = parse_manifest(data, content_type)
    except ManifestError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(parsed, (ImageManifest, ImageIndex))
    blobs = (parsed.config, *parsed.layers) if isinstance(parsed, ImageManifest) \
        else parsed.manifests
    for d in blobs:  # every descriptor that got through is safe to store and fetch
        assert 0 <= d.size <= 2**53
        assert STORE.blob_path(d.digest).parent == ROOT / "blobs" / d.digest.algorithm


@given(st.one_of(st.none(), st.text(max_size=60),
                 st.integers(min_value=-10**6, max_value=10**6).map(str),
                 st.floats(allow_nan=True, allow_infinity=True).map(str)))
def test_retry_after_is_never_negative_and_never_raises(value: str | None) -> None:
    delay = _parse_retry_after(value)
    assert delay is None or delay >= 0
