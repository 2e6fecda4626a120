"""Manifest/index parsing: real captured documents plus hostile and malformed input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from puller import mediatypes as mt
from puller.digest import Digest
from puller.errors import ManifestError, ManifestTooLarge, UnsupportedManifest
from puller.manifest import (
    MAX_MANIFEST_SIZE,
    Annotations,
    Descriptor,
    ImageIndex,
    ImageManifest,
    is_attestation,
    parse_manifest,
)
from puller.platform import Platform


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


def _schema1_files() -> list[str]:
    if not FIXTURES.is_dir():
        return ["(fixtures missing)"]
    return sorted(p.name for p in FIXTURES.glob("*schema1*.json")
                  if not p.name.startswith("unknown-origin"))


H = "a" * 64
D = f"sha256:{H}"


def desc(**over: object) -> dict:
    base: dict = {"mediaType": mt.OCI_LAYER_GZIP, "digest": D, "size": 1}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def image(**over: object) -> dict:
    base: dict = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                  "config": desc(mediaType=mt.OCI_CONFIG), "layers": [desc()]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def index_doc(**over: object) -> dict:
    base: dict = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
                  "manifests": [desc(mediaType=mt.OCI_MANIFEST,
                                     platform={"architecture": "amd64", "os": "linux"})]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def raw(doc: object) -> bytes:
    return json.dumps(doc).encode()


# -- real captures ---------------------------------------------------------------------------

@needs_fixtures
@pytest.mark.parametrize("name, kind, media_type, count", [
    ("dockerhub-hello-world-20230604.manifest-list.json", ImageIndex, mt.DOCKER_MANIFEST_LIST, 11),
    ("dockerhub-hello-world-20220217.manifest-list.json", ImageIndex, mt.DOCKER_MANIFEST_LIST, 11),
    ("dockerhub-hello-world-2022Q4.manifest-list.json", ImageIndex, mt.DOCKER_MANIFEST_LIST, 11),
    ("dockerhub-hello-world-20230604.linux-amd64.v2s2-manifest.json", ImageManifest,
     mt.DOCKER_MANIFEST, 1),
    ("dockerhub-hello-world-2021.linux-amd64.v2s2-manifest.json", ImageManifest,
     mt.DOCKER_MANIFEST, 1),
    ("dockerhub-alpine-3.23.2.oci-index.json", ImageIndex, mt.OCI_INDEX, 16),
    ("dockerhub-alpine-3.23.2.linux-arm-v7.oci-manifest.json", ImageManifest, mt.OCI_MANIFEST, 1),
    ("dockerhub-alpine-3.23.2.linux-amd64.attestation-manifest.json", ImageManifest,
     mt.OCI_MANIFEST, 2),
    ("dockerhub-busybox-2017.manifest-list.json", ImageIndex, mt.DOCKER_MANIFEST_LIST, 7),
    ("dockerhub-httpd-2.4.23-2016.v2s2-manifest.edited-config-mediatype.json", ImageManifest,
     mt.DOCKER_MANIFEST, 5),
    ("quay-testdata-mysql-complex.v2s2-manifest.json", ImageManifest, mt.DOCKER_MANIFEST, 11),
    ("quayio-kairos-ubuntu-v3.5.2.oci-index.verbatim.json", ImageIndex, mt.OCI_INDEX, 2),
    ("quayio-kairos-ubuntu-v3.5.2.attestation-manifest.json", ImageManifest, mt.OCI_MANIFEST, 2),
    ("regclient-testrepo.artifact-manifest-with-subject.sbom.json", ImageManifest,
     mt.OCI_MANIFEST, 1),
    ("regclient-testrepo.artifact-index-with-subject.json", ImageIndex, mt.OCI_INDEX, 1),
    ("regclient-testrepo.index-with-unknown-platform-builder-entries.json", ImageIndex,
     mt.OCI_INDEX, 4),
    ("regclient-testrepo.referrers-fallback-tag-index.json", ImageIndex, mt.OCI_INDEX, 2),
    ("unknown-origin.manifest-list-of-schema1-children.json", ImageIndex,
     mt.DOCKER_MANIFEST_LIST, 5),
])
def test_parse_captures(name: str, kind: type, media_type: str, count: int) -> None:
    parsed = parse_manifest(fixture(name))
    assert type(parsed) is kind
    assert parsed.media_type == media_type
    entries = parsed.manifests if isinstance(parsed, ImageIndex) else parsed.layers
    assert len(entries) == count


@needs_fixtures
@pytest.mark.parametrize("name", _schema1_files())
def test_schema1_captures_refused(name: str) -> None:
    with pytest.raises(UnsupportedManifest) as e:
        parse_manifest(fixture(name))
    assert "schema1" in str(e.value) and "deprecated" in str(e.value)


@needs_fixtures
def test_schema1_tampered_and_extra_data_refused_as_schema1() -> None:
    # schemaVersion edited to 2 but schema1 shape; and a duplicate-key attack document.
    for name in ("dockerhub-hello-world-2015.schema1-signed.tampered-bad-signature.json",
                 "dockerhub-hello-world-2015.schema1-signed.extra-data.json"):
        with pytest.raises(UnsupportedManifest):
            parse_manifest(fixture(name))
    assert len(_schema1_files()) == 15


@needs_fixtures
def test_config_blob_is_not_a_manifest() -> None:
    with pytest.raises(ManifestError, match="cannot tell the manifest kind"):
        parse_manifest(fixture("dockerhub-hello-world-20230604.linux-amd64.config.json"))


@needs_fixtures
def test_hello_world_list_and_raw_bytes_hashing() -> None:
    data = fixture("dockerhub-hello-world-20230604.manifest-list.json")
    assert b"\\/" in data  # Docker Hub escapes slashes; the parser must not care
    assert str(Digest.from_bytes(data)).startswith("sha256:fc6cf906")
    idx = parse_manifest(data)
    assert isinstance(idx, ImageIndex)
    assert all(d.media_type == mt.DOCKER_MANIFEST for d in idx.manifests)
    windows = [d.platform for d in idx.manifests if d.platform and d.platform.os == "windows"]
    assert [p.os_version for p in windows] == ["10.0.20348.1726", "10.0.17763.4377"]
    assert len(idx.images()) == 11

    amd64 = idx.manifests[0]
    child = fixture("dockerhub-hello-world-20230604.linux-amd64.v2s2-manifest.json")
    # The digest is over the exact bytes (3-space indent, no final newline), not re-serialised JSON.
    assert Digest.from_bytes(child) == amd64.digest and len(child) == amd64.size == 525
    assert Digest.from_bytes(json.dumps(json.loads(child)).encode()) != amd64.digest

    m = parse_manifest(child, "application/vnd.docker.distribution.manifest.v2+json")
    assert isinstance(m, ImageManifest)
    config = fixture("dockerhub-hello-world-20230604.linux-amd64.config.json")
    layer = fixture("dockerhub-hello-world-20230604.linux-amd64.layer.tar.gz")
    assert (Digest.from_bytes(config), len(config)) == (m.config.digest, m.config.size)
    assert m.config.media_type == mt.DOCKER_CONFIG
    assert (Digest.from_bytes(layer), len(layer)) == (m.layers[0].digest, m.layers[0].size)
    assert m.layers[0].media_type == mt.DOCKER_LAYER


@needs_fixtures
def test_alpine_index_attestations() -> None:
    data = fixture("dockerhub-alpine-3.23.2.oci-index.json")
    idx = parse_manifest(data, "application/vnd.oci.image.index.v1+json")
    assert isinstance(idx, ImageIndex)
    images = idx.images()
    assert len(images) == 8
    attestations = [d for d in idx.manifests if is_attestation(d)]
    assert len(attestations) == 8
    assert not any(is_attestation(d) for d in images)
    image_digests = {str(d.digest) for d in images}
    for att in attestations:
        assert att.platform == Platform("unknown", "unknown")
        assert att.annotations is not None
        assert att.annotations[mt.ANNOTATION_DOCKER_REFERENCE_TYPE] == "attestation-manifest"
        assert att.annotations[mt.ANNOTATION_DOCKER_REFERENCE_DIGEST] in image_digests
    # annotations carry the \/-unescaped URLs
    assert images[0].annotations is not None
    url = images[0].annotations["org.opencontainers.image.url"]
    assert url == "https://hub.docker.com/_/alpine"
    # descriptor JSON round-trips exactly for this index (all platforms already canonical)
    assert [d.to_json() for d in idx.manifests] == json.loads(data)["manifests"]


@needs_fixtures
@pytest.mark.parametrize("stem", ["linux-amd64", "linux-arm-v6", "linux-arm-v7",
                                  "linux-arm64-v8", "linux-386", "linux-ppc64le",
                                  "linux-riscv64", "linux-s390x"])
def test_alpine_graph_hashes(stem: str) -> None:
    idx = parse_manifest(fixture("dockerhub-alpine-3.23.2.oci-index.json"))
    assert isinstance(idx, ImageIndex)
    by_digest = {d.digest: d for d in idx.manifests}
    for kind in ("oci-manifest", "attestation-manifest"):
        data = fixture(f"dockerhub-alpine-3.23.2.{stem}.{kind}.json")
        entry = by_digest[Digest.from_bytes(data)]
        assert entry.size == len(data)
        assert is_attestation(entry) is (kind == "attestation-manifest")
    m = parse_manifest(fixture(f"dockerhub-alpine-3.23.2.{stem}.oci-manifest.json"))
    assert isinstance(m, ImageManifest)
    config = fixture(f"dockerhub-alpine-3.23.2.{stem}.config.json")
    assert m.config.digest == Digest.from_bytes(config) and m.config.size == len(config)
    assert m.config.media_type == mt.OCI_CONFIG
    assert [layer.media_type for layer in m.layers] == [mt.OCI_LAYER_GZIP]
    assert m.annotations is not None
    assert m.annotations["org.opencontainers.image.version"] == "3.23.2"
    att = parse_manifest(fixture(f"dockerhub-alpine-3.23.2.{stem}.attestation-manifest.json"))
    assert isinstance(att, ImageManifest)
    assert {layer.media_type for layer in att.layers} == {"application/vnd.in-toto+json"}


@needs_fixtures
def test_kairos_attestation_entry() -> None:
    idx = parse_manifest(fixture("quayio-kairos-ubuntu-v3.5.2.oci-index.verbatim.json"))
    assert isinstance(idx, ImageIndex)
    image_entry, att = idx.manifests
    assert not is_attestation(image_entry) and is_attestation(att)
    assert idx.images() == (image_entry,)
    data = fixture("quayio-kairos-ubuntu-v3.5.2.attestation-manifest.json")
    assert Digest.from_bytes(data) == att.digest and len(data) == att.size


@needs_fixtures
def test_regclient_builder_entries_and_index_annotations() -> None:
    idx = parse_manifest(fixture(
        "regclient-testrepo.index-with-unknown-platform-builder-entries.json"))
    assert isinstance(idx, ImageIndex)
    assert idx.annotations == {"org.example.version": "v1"}
    builders = [d for d in idx.manifests
                if d.annotations and d.annotations.get("vnd.docker.reference.type") == "builder"]
    assert len(builders) == 2
    assert all(is_attestation(d) for d in builders)  # unknown/unknown platform
    assert [str(d.platform) for d in idx.images()] == ["linux/amd64", "linux/arm64/v8"]


@needs_fixtures
def test_artifact_manifest_with_subject() -> None:
    m = parse_manifest(fixture("regclient-testrepo.artifact-manifest-with-subject.sbom.json"))
    assert isinstance(m, ImageManifest)
    assert m.artifact_type == "application/example.sbom"
    assert m.config.media_type == mt.OCI_EMPTY and m.config.size == 2
    assert m.config.digest == Digest.from_bytes(b"{}")
    assert m.layers[0].media_type == "application/example.sbom.breakfast"
    assert m.subject is not None
    assert m.subject.media_type == mt.OCI_INDEX
    assert m.subject.digest.short == "dfae8f425735" and m.subject.size == 934


@needs_fixtures
def test_artifact_index_with_subject_and_referrers() -> None:
    idx = parse_manifest(fixture("regclient-testrepo.artifact-index-with-subject.json"))
    assert isinstance(idx, ImageIndex)
    assert idx.artifact_type == "application/example.loop"
    assert idx.subject is not None and idx.subject.digest == idx.manifests[0].digest
    assert idx.manifests[0].platform is None and not is_attestation(idx.manifests[0])
    ref = parse_manifest(fixture("regclient-testrepo.referrers-fallback-tag-index.json"))
    assert isinstance(ref, ImageIndex)
    assert [d.artifact_type for d in ref.manifests] == ["application/example.sbom",
                                                        "application/example.signature"]


@needs_fixtures
def test_httpd_octet_stream_config_is_accepted() -> None:
    m = parse_manifest(fixture(
        "dockerhub-httpd-2.4.23-2016.v2s2-manifest.edited-config-mediatype.json"))
    assert isinstance(m, ImageManifest)
    assert m.config.media_type == "application/octet-stream"
    config = fixture("dockerhub-httpd-2.4.23-2016.config.json")
    assert m.config.digest == Digest.from_bytes(config) and m.config.size == len(config)
    assert {layer.media_type for layer in m.layers} == {mt.DOCKER_LAYER}
    assert m.layers[0].size == 51354364


@needs_fixtures
def test_every_layout_manifest_parses() -> None:
    count = 0
    for path in sorted((FIXTURES / "layouts").rglob("*")):
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_SIZE:
            continue
        try:
            doc = json.loads(path.read_bytes())
        except ValueError:
            continue
        if isinstance(doc, dict) and ("manifests" in doc or "layers" in doc):
            parse_manifest(path.read_bytes())
            count += 1
    assert count > 50


# -- media type / content type resolution ---------------------------------------------------------

@pytest.mark.parametrize("doc, content_type, expected", [
    (image(mediaType=...), mt.OCI_MANIFEST, mt.OCI_MANIFEST),
    (image(mediaType=...), None, mt.OCI_MANIFEST),
    (image(mediaType=...), "application/json", mt.OCI_MANIFEST),
    (image(mediaType=...), mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST),
    (index_doc(mediaType=...), None, mt.OCI_INDEX),
    (index_doc(mediaType=...), "text/plain", mt.OCI_INDEX),
    (index_doc(mediaType=...), mt.DOCKER_MANIFEST_LIST, mt.DOCKER_MANIFEST_LIST),
    (image(), mt.OCI_MANIFEST, mt.OCI_MANIFEST),
    (image(), "application/octet-stream", mt.OCI_MANIFEST),
    (image(), "", mt.OCI_MANIFEST),
    (image(), "text/plain; charset=utf-8", mt.OCI_MANIFEST),
    (image(), f" {mt.OCI_MANIFEST.upper()} ; charset=utf-8", mt.OCI_MANIFEST),
    (image(mediaType=mt.DOCKER_MANIFEST), "application/json", mt.DOCKER_MANIFEST),
    (index_doc(mediaType=mt.DOCKER_MANIFEST_LIST), None, mt.DOCKER_MANIFEST_LIST),
    (index_doc(manifests=None), None, mt.OCI_INDEX),  # docker save writes "manifests": null
])
def test_kind_resolution(doc: dict, content_type: str | None, expected: str) -> None:
    assert parse_manifest(raw(doc), content_type).media_type == expected


@pytest.mark.parametrize("doc, content_type, error, fragment", [
    (image(), mt.OCI_INDEX, ManifestError, "disagrees"),
    (image(), mt.DOCKER_MANIFEST, ManifestError, "disagrees"),
    (index_doc(), mt.OCI_MANIFEST, ManifestError, "disagrees"),
    (image(), mt.DOCKER_SCHEMA1_SIGNED, UnsupportedManifest, "schema1"),
    (image(mediaType=mt.DOCKER_SCHEMA1), None, UnsupportedManifest, "schema1"),
    (image(schemaVersion=1, mediaType=...), None, UnsupportedManifest, "schema1"),
    (image(mediaType="application/vnd.oci.artifact.manifest.v1+json"), None,
     UnsupportedManifest, "application/vnd.oci.artifact.manifest.v1+json"),
    (image(mediaType=mt.OCI_CONFIG), None, UnsupportedManifest, mt.OCI_CONFIG),
    ({"schemaVersion": 2}, "application/vnd.example+json", UnsupportedManifest,
     "application/vnd.example+json"),
    ({"schemaVersion": 2}, None, ManifestError, "cannot tell"),
    ({"schemaVersion": 2, "layers": []}, None, ManifestError, "cannot tell"),
    (image(mediaType=7), None, ManifestError, "mediaType must be a string"),
    (image(mediaType=...), mt.OCI_INDEX, ManifestError, "must not have 'config'"),
    (index_doc(mediaType=..., config=desc(), layers=[]), None, ManifestError, "cannot tell"),
    (image(manifests=[]), None, ManifestError, "must not have a 'manifests'"),
    (index_doc(layers=[]), None, ManifestError, "must not have 'config' or 'layers'"),
    (image(schemaVersion=...), None, ManifestError, "no schemaVersion"),
    (image(schemaVersion=3), None, ManifestError, "schemaVersion must be 2"),
    (image(schemaVersion="2"), None, ManifestError, "schemaVersion must be 2"),
    (image(schemaVersion=True), None, ManifestError, "schemaVersion must be 2"),
    (image(schemaVersion=2.0), None, ManifestError, "schemaVersion must be 2"),
    (image(config=...), mt.OCI_MANIFEST, ManifestError, "no 'config'"),
    (image(layers=...), None, ManifestError, "no 'layers'"),
    (index_doc(manifests=...), None, ManifestError, "no 'manifests'"),
    (image(layers={}), None, ManifestError, "must be a list"),
    (image(config=[]), None, ManifestError, "config: descriptor must be a JSON object"),
])
def test_kind_and_structure_errors(doc: dict, content_type: str | None, error: type,
                                   fragment: str) -> None:
    with pytest.raises(error) as e:
        parse_manifest(raw(doc), content_type)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


# -- hostile input ------------------------------------------------------------------------------

NESTED = b"[" * 100_000
HOSTILE = [
    (b" " * (5 * 1024 * 1024), ManifestTooLarge, "over the 4 MiB limit"),
    (raw(image()) + b" " * (MAX_MANIFEST_SIZE + 1), ManifestTooLarge, "limit"),
    (NESTED, ManifestError, "malformed manifest JSON"),
    (NESTED + b"]" * 100_000, ManifestError, "malformed manifest JSON"),
    (b'{"a":' * 100_000, ManifestError, "malformed manifest JSON"),
    (b'{"schemaVersion": 2, "x": "\xff\xfe"}', ManifestError, "malformed manifest JSON"),
    (b"\xef\xbb\xbf" + raw(image()), ManifestError, "malformed manifest JSON"),
    (raw(image()).decode().encode("utf-16"), ManifestError, "malformed manifest JSON"),
    (b"", ManifestError, "malformed manifest JSON"),
    (b"{", ManifestError, "malformed manifest JSON"),
    (b"[]", ManifestError, "must be an object, got list"),
    (b'"manifest"', ManifestError, "must be an object"),
    (b"null", ManifestError, "must be an object"),
    (raw(image()) + b"{}", ManifestError, "malformed manifest JSON"),
    (raw(image(layers=[desc(size=-1)])), ManifestError, "layers[0]"),
    (raw(image(layers=[desc(size="1")])), ManifestError, "size must be an integer"),
    (raw(image(layers=[desc(size=True)])), ManifestError, "size must be an integer"),
    (raw(image(layers=[desc(size=1.0)])), ManifestError, "size must be an integer"),
    (raw(image(layers=[desc(size=2**53 + 1)])), ManifestError, "size must be an integer"),
    (raw(image(layers=[desc(size=None)])), ManifestError, "size must be an integer"),
    (raw(image(layers=[desc(size=...)])), ManifestError, "no 'size'"),
    (raw(image(layers=[desc(digest=...)])), ManifestError, "layers[0]: descriptor has no 'digest'"),
    (raw(image(layers=[desc(), desc(digest="sha256:../../../../etc/passwd")])), ManifestError,
     "layers[1]: descriptor digest"),
    (raw(image(layers=[desc(digest=f"sha256:{H.upper()}")])), ManifestError, "lowercase"),
    (raw(image(layers=[desc(digest=f"md5:{'a' * 32}")])), ManifestError, "unsupported"),
    (raw(image(layers=[desc(digest=None)])), ManifestError, "must be a string"),
    (raw(image(config=desc(digest="sha256:" + "a" * 63 + "/"))), ManifestError, "config:"),
    (raw(image(layers=[desc(mediaType=...)])), ManifestError, "no 'mediaType'"),
    (raw(image(layers=[desc(mediaType="")])), ManifestError, "not a valid media type"),
    (raw(image(layers=[desc(mediaType="a/b\r\nX-Evil: 1")])), ManifestError,
     "not a valid media type"),
    (raw(image(layers=[desc(mediaType=["x"])])), ManifestError, "must be a string"),
    (raw(image(layers=[desc(urls="https://x")])), ManifestError, "urls must be a list"),
    (raw(image(layers=[desc(urls=[1])])), ManifestError, "urls must be a list"),
    (raw(image(layers=[desc(annotations={"a": 1})])), ManifestError, "must be a string"),
    (raw(image(layers=[desc(annotations=["a"])])), ManifestError, "must be a JSON object"),
    (raw(image(annotations={"a": None})), ManifestError, "manifest annotations"),
    (raw(image(layers=[desc(artifactType=5)])), ManifestError, "artifactType"),
    (raw(image(artifactType="not a type")), ManifestError, "artifactType"),
    (raw(image(subject={"mediaType": mt.OCI_MANIFEST})), ManifestError, "subject:"),
    (raw(image(layers=["sha256:" + H])), ManifestError, "descriptor must be a JSON object"),
    (raw(index_doc(manifests=[desc(platform={"architecture": 1, "os": "linux"})])),
     ManifestError, "manifests[0]: descriptor platform"),
    (raw(index_doc(manifests=[desc(platform="linux/amd64")])), ManifestError, "platform"),
    (raw(image(layers=[desc()] * 10_001)), ManifestError, "10001 layers"),
    (raw(index_doc(manifests=[desc()] * 10_001)), ManifestError, "10001 manifests"),
    (b'{"schemaVersion": 2, "schemaVersion": 2, "mediaType": "%s", "config": %s, "layers": []}'
     % (mt.OCI_MANIFEST.encode(), raw(desc())), ManifestError, "duplicate key 'schemaVersion'"),
    (raw(image()).replace(b'"size": 1', b'"size": NaN', 1), ManifestError, "NaN"),
    (raw(image()).replace(b'"size": 1', b'"size": 1e400', 1), ManifestError, "size"),
    (raw(image()).replace(b'"size": 1', b'"size": ' + b"9" * 5000, 1), ManifestError,
     "(5000 digits) is too large"),
    (raw(image()).replace(b'"size": 1', b'"size": ' + b"9" * 21, 1), ManifestError,
     "too large"),
]


@pytest.mark.parametrize("data, error, fragment", HOSTILE,
                         ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile(data: bytes, error: type, fragment: str) -> None:
    with pytest.raises(error) as e:
        parse_manifest(data)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg and len(msg) < 400


def test_limits_are_inclusive() -> None:
    padded = raw(image())
    padded += b" " * (MAX_MANIFEST_SIZE - len(padded))
    assert isinstance(parse_manifest(padded), ImageManifest)
    assert len(parse_manifest(raw(image(layers=[desc()] * 10_000))).layers) == 10_000
    big = desc(size=2**53)
    assert parse_manifest(raw(image(layers=[big]))).layers[0].size == 2**53
    assert isinstance(parse_manifest(memoryview(raw(image()))), ImageManifest)


def test_null_layers_and_optional_fields() -> None:
    m = parse_manifest(raw(image(layers=None, subject=None, annotations=None,
                                 artifactType=None)))
    assert isinstance(m, ImageManifest)
    assert m.layers == () and m.subject is None and m.annotations is None
    assert m.artifact_type is None


def test_unknown_fields_ignored() -> None:
    doc = image(extra={"x": 1}, layers=[desc(data="e30=", future=True)])
    assert len(parse_manifest(raw(doc)).layers) == 1


# -- Descriptor ------------------------------------------------------------------------------------

def test_descriptor_round_trip_and_hashable() -> None:
    obj = {"mediaType": mt.OCI_MANIFEST, "digest": D, "size": 7,
           "urls": ["https://example.com/blob"], "annotations": {"k": "v"},
           "platform": {"architecture": "arm", "os": "linux", "variant": "v7"},
           "artifactType": "application/example"}
    d = Descriptor.from_json(obj)
    assert d.to_json() == obj
    assert Descriptor.from_json(d.to_json()) == d
    assert hash(d) == hash(Descriptor.from_json(dict(obj)))
    assert d.annotations == {"k": "v"} and dict(d.annotations) == {"k": "v"}
    assert d.annotations["k"] == "v" and d.annotations.get("z") is None
    assert isinstance(d.annotations, Annotations)
    assert d.urls == ("https://example.com/blob",)
    with pytest.raises(AttributeError):
        d.size = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        d.annotations["k"] = "w"  # type: ignore[index]


def test_descriptor_minimal_and_keyword_construction() -> None:
    d = Descriptor(media_type=mt.OCI_LAYER, digest=Digest.parse(D), size=0,
                   annotations={"a": "b"}, urls=["u"])  # type: ignore[arg-type]
    assert isinstance(d.annotations, Annotations) and d.urls == ("u",)
    assert d.to_json() == {"mediaType": mt.OCI_LAYER, "digest": D, "size": 0,
                           "urls": ["u"], "annotations": {"a": "b"}}
    assert Descriptor.from_json({"mediaType": mt.OCI_LAYER, "digest": D, "size": 0}).to_json() \
        == {"mediaType": mt.OCI_LAYER, "digest": D, "size": 0}
    assert len({d, Descriptor(media_type=mt.OCI_LAYER, digest=Digest.parse(D), size=0,
                              annotations=Annotations({"a": "b"}), urls=("u",))}) == 1


@pytest.mark.parametrize("obj", [None, [], "x", 1])
def test_descriptor_from_json_needs_object(obj: object) -> None:
    with pytest.raises(ManifestError):
        Descriptor.from_json(obj)


@pytest.mark.parametrize("annotations, platform, attestation", [
    (None, None, False),
    (None, {"architecture": "amd64", "os": "linux"}, False),
    (None, {"architecture": "unknown", "os": "unknown"}, True),
    ({"vnd.docker.reference.type": "attestation-manifest"}, None, True),
    ({"vnd.docker.reference.type": "attestation-manifest"},
     {"architecture": "amd64", "os": "linux"}, True),
    ({"vnd.docker.reference.type": "other"}, {"architecture": "amd64", "os": "linux"}, False),
])
def test_is_attestation(annotations: dict | None, platform: dict | None,
                        attestation: bool) -> None:
    d = Descriptor.from_json(desc(mediaType=mt.OCI_MANIFEST,
                                  annotations=annotations if annotations else ...,
                                  platform=platform if platform else ...))
    assert is_attestation(d) is attestation


def test_images_filters_media_types() -> None:
    doc = index_doc(manifests=[
        desc(mediaType=mt.OCI_MANIFEST, platform={"architecture": "amd64", "os": "linux"}),
        desc(mediaType=mt.OCI_INDEX),
        desc(mediaType=mt.DOCKER_SCHEMA1, platform={"architecture": "amd64", "os": "linux"}),
        desc(mediaType="application/example.sbom"),
    ])
    idx = parse_manifest(raw(doc))
    assert isinstance(idx, ImageIndex)
    assert [d.media_type for d in idx.images()] == [mt.OCI_MANIFEST, mt.OCI_INDEX]


def test_mediatypes_constants() -> None:
    assert mt.ACCEPT.split(", ") == [mt.OCI_INDEX, mt.OCI_MANIFEST, mt.DOCKER_MANIFEST_LIST,
                                     mt.DOCKER_MANIFEST]
    assert mt.IMAGE_MANIFESTS == {mt.OCI_MANIFEST, mt.DOCKER_MANIFEST}
    assert mt.INDEXES == {mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST}
    assert mt.SCHEMA1 == {"application/vnd.docker.distribution.manifest.v1+json",
                          "application/vnd.docker.distribution.manifest.v1+prettyjws"}
    assert mt.OCI_LAYOUT_VERSION == "1.0.0"
    assert mt.ANNOTATION_REF_NAME == "org.opencontainers.image.ref.name"


def test_parsing_modules_import_no_io_libraries() -> None:
    code = ("import sys, puller.digest, puller.reference, puller.platform, puller.mediatypes, "
            "puller.manifest\n"
            "bad = {'aiohttp', 'aiofiles', 'tqdm', 'uvloop', 'asyncio'} & set(sys.modules)\n"
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"
