"""Parsing and validation of image manifests and indexes (OCI and Docker schema2).

The parsed types never carry the raw bytes: callers keep those to store verbatim,
since the digest is over the exact bytes the registry sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from puller import mediatypes as mt
from puller.digest import Digest, _preview
from puller.errors import (
    InvalidDigest,
    InvalidPlatform,
    ManifestError,
    ManifestTooLarge,
    UnsupportedManifest,
)
from puller.platform import Platform, is_unknown
from puller.platform import select as _select
from puller.record import Record

__all__ = [
    "MAX_MANIFEST_SIZE", "MAX_ENTRIES", "MAX_SIZE", "Annotations", "Descriptor",
    "ImageManifest", "ImageIndex", "parse_manifest", "is_attestation",
]

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: Most layers/entries accepted; real images have tens, more is hostile.
MAX_ENTRIES = 10_000
#: Largest descriptor size: JSON numbers beyond 2**53 aren't exact in most parsers.
MAX_SIZE = 2**53

# RFC 6838 restricted-name/restricted-name, as the OCI spec requires for media types.
_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
# Content-Types that say nothing about the manifest kind (plain HTTP servers, old proxies).
_GENERIC_CONTENT_TYPES = frozenset({"", "application/json", "application/octet-stream"})

_SCHEMA1_MESSAGE = ("Docker schema1 manifests are deprecated and not supported; the image must "
                    "be pushed again as Docker schema2 or OCI (current docker/buildx do this)")


class Annotations(Mapping[str, str]):
    """A read-only, hashable ``str -> str`` mapping (keeps descriptors hashable)."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._data: dict[str, str] = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"Annotations({self._data!r})"


def _media_type(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"{what} must be a string, got {_preview(value)}")
    if not _MEDIA_TYPE.fullmatch(value):
        raise ManifestError(f"{what} is not a valid media type: {_preview(value)}")
    return value


def _annotations(value: object, what: str = "annotations") -> Annotations | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError(f"{what} must be a JSON object, got {_preview(value)}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise ManifestError(f"{what} value for {_preview(k)} must be a string, "
                                f"got {_preview(v)}")
    return Annotations(value)


def _frozen_annotations(value: Mapping[str, str] | None) -> Annotations | None:
    if value is None or isinstance(value, Annotations):
        return value
    return Annotations(value)


class Descriptor(Record):
    """An OCI content descriptor: what a blob or manifest is, and how to verify it."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    annotations: Annotations | None = None
    artifact_type: str | None = None

    def __post_init__(self) -> None:
        # Accept plain dicts/lists from callers but store immutable, hashable forms.
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))
        object.__setattr__(self, "urls", tuple(self.urls))

    @classmethod
    def from_json(cls, obj: object) -> Descriptor:
        """Validate and build from a JSON descriptor object; raises ManifestError."""
        if not isinstance(obj, dict):
            raise ManifestError(f"descriptor must be a JSON object, got {_preview(obj)}")
        for key in ("mediaType", "digest", "size"):
            if key not in obj:
                raise ManifestError(f"descriptor has no {key!r}")
        media_type = _media_type(obj["mediaType"], "descriptor mediaType")
        try:
            digest = Digest.parse(obj["digest"])
        except InvalidDigest as e:
            raise ManifestError(f"descriptor digest: {e}") from None
        size = obj["size"]
        # bool is an int subclass in Python; JSON true is not a size.
        if type(size) is not int or not 0 <= size <= MAX_SIZE:
            raise ManifestError(f"descriptor size must be an integer from 0 to 2**53, "
                                f"got {_preview(size) if not isinstance(size, int) else size}")
        urls = obj.get("urls")
        if urls is None:
            urls = ()
        elif not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
            raise ManifestError(f"descriptor urls must be a list of strings, got {_preview(urls)}")
        platform = None
        if obj.get("platform") is not None:
            try:
                platform = Platform.from_json(obj["platform"])
            except InvalidPlatform as e:
                raise ManifestError(f"descriptor platform: {e}") from None
        artifact_type = obj.get("artifactType")
        if artifact_type is not None:
            artifact_type = _media_type(artifact_type, "descriptor artifactType")
        return cls(media_type=media_type, digest=digest, size=size, platform=platform,
                   urls=tuple(urls), annotations=_annotations(obj.get("annotations"),
                                                              "descriptor annotations"),
                   artifact_type=artifact_type)

    def to_json(self) -> dict[str, Any]:
        """The OCI descriptor JSON object (camelCase keys, only the set fields)."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest),
                               "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations is not None:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type is not None:
            out["artifactType"] = self.artifact_type
        return out


def is_attestation(d: Descriptor) -> bool:
    """True for BuildKit attestation/builder entries of an index (not runnable images)."""
    if (d.annotations is not None and d.annotations.get(mt.ANNOTATION_DOCKER_REFERENCE_TYPE)
            == mt.DOCKER_REFERENCE_TYPE_ATTESTATION):
        return True
    # Descriptors without a platform are ordinary single-image entries, not attestations.
    return d.platform is not None and is_unknown(d.platform)


class ImageManifest(Record):
    """An OCI image manifest or Docker schema2 manifest."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    subject: Descriptor | None = None
    annotations: Annotations | None = None
    artifact_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))
        object.__setattr__(self, "layers", tuple(self.layers))


class ImageIndex(Record):
    """An OCI image index or Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None = None
    annotations: Annotations | None = None
    artifact_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))
        object.__setattr__(self, "manifests", tuple(self.manifests))

    def images(self) -> tuple[Descriptor, ...]:
        """Entries that are runnable images or nested indexes (attestations left out)."""
        return tuple(d for d in self.manifests
                     if d.media_type in mt.MANIFESTS and not is_attestation(d))

    def select(self, want: Platform) -> Descriptor:
        """The image entry best matching ``want``; raises NoMatchingPlatform."""
        return _select([(d.platform, d) for d in self.images()], want)


def _content_type(content_type: str | None) -> str:
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def _decode(data: bytes) -> dict[str, Any]:
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs) and not duplicates:
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    duplicates.append(key)
                    break
                seen.add(key)
        return obj

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    def bounded_int(text: str) -> int:  # no size or count needs more than 20 digits
        if len(text.lstrip("-")) > 20:
            raise ValueError(f"the number {text[:12]}... ({len(text)} digits) is too large")
        return int(text)

    try:
        # Strict UTF-8: json.loads(bytes) would also guess UTF-16/32, which no registry sends.
        doc = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=pairs_hook,
                         parse_constant=no_constants, parse_int=bounded_int)
    except RecursionError:
        raise ManifestError("malformed manifest JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = " ".join(str(e).split())  # one line whatever the decoder said
        raise ManifestError(f"malformed manifest JSON: {detail[:160]}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"manifest JSON must be an object, got {type(doc).__name__}")
    if _is_schema1(doc, None):
        raise UnsupportedManifest(_SCHEMA1_MESSAGE)
    if duplicates:
        # Parsers disagree on which duplicate wins; that ambiguity is an attack vector.
        raise ManifestError(f"manifest JSON has duplicate key {_preview(duplicates[0])}")
    return doc


def _is_schema1(doc: dict[str, Any], content_type: str | None) -> bool:
    version = doc.get("schemaVersion")
    body_type = doc.get("mediaType")
    return ((type(version) is int and version == 1)
            or (isinstance(body_type, str) and body_type in mt.SCHEMA1)
            or content_type in mt.SCHEMA1
            # schema1 shape even if schemaVersion was edited (tampered documents)
            or ("fsLayers" in doc and "layers" not in doc and "manifests" not in doc))


def _kind(doc: dict[str, Any], ct: str) -> str:
    body_type = doc.get("mediaType")
    ct_known = ct in mt.MANIFESTS
    if body_type is not None:
        if not isinstance(body_type, str):
            raise ManifestError(f"manifest mediaType must be a string, got {_preview(body_type)}")
        if ct_known and ct != body_type:
            raise ManifestError(f"Content-Type {_preview(ct)} disagrees with the manifest's "
                                f"mediaType {_preview(body_type)}")
        if body_type not in mt.MANIFESTS:
            raise UnsupportedManifest(f"unsupported manifest media type {_preview(body_type)}")
        return body_type
    if ct_known:
        return ct
    # OCI lets mediaType be omitted; fall back to the document's shape.
    has_index_keys = "manifests" in doc
    has_image_keys = "config" in doc and "layers" in doc
    if has_index_keys and not has_image_keys:
        return mt.OCI_INDEX
    if has_image_keys and not has_index_keys:
        return mt.OCI_MANIFEST
    if ct not in _GENERIC_CONTENT_TYPES:
        raise UnsupportedManifest(f"unsupported manifest media type {_preview(ct)}")
    raise ManifestError("cannot tell the manifest kind: no mediaType and neither 'manifests' "
                        "nor 'config'+'layers'")


def _descriptor(obj: object, where: str) -> Descriptor:
    try:
        return Descriptor.from_json(obj)
    except ManifestError as e:
        raise ManifestError(f"{where}: {e}") from None


def _descriptors(doc: dict[str, Any], key: str) -> tuple[Descriptor, ...]:
    if key not in doc:
        raise ManifestError(f"manifest has no {key!r}")
    items = doc[key]
    if items is None:
        # Go decodes null as an empty slice; docker save writes "manifests": null.
        return ()
    if not isinstance(items, list):
        raise ManifestError(f"manifest {key!r} must be a list, got {_preview(items)}")
    if len(items) > MAX_ENTRIES:
        raise ManifestError(f"manifest has {len(items)} {key}, more than the "
                            f"{MAX_ENTRIES} accepted")
    return tuple(_descriptor(item, f"{key}[{i}]") for i, item in enumerate(items))


def _optional_descriptor(doc: dict[str, Any], key: str) -> Descriptor | None:
    value = doc.get(key)
    return None if value is None else _descriptor(value, key)


def parse_manifest(data: bytes, content_type: str | None = None) -> ImageManifest | ImageIndex:
    """Parse manifest bytes as received from a registry or read from a layout.

    ``content_type`` is the HTTP Content-Type, if any. Raises ManifestTooLarge,
    UnsupportedManifest (schema1, unknown media types) or ManifestError.
    """
    if len(data) > MAX_MANIFEST_SIZE:
        raise ManifestTooLarge(f"manifest is {len(data)} bytes, over the "
                               f"{MAX_MANIFEST_SIZE // (1024 * 1024)} MiB limit")
    doc = _decode(data)
    ct = _content_type(content_type)
    if _is_schema1(doc, ct):
        raise UnsupportedManifest(_SCHEMA1_MESSAGE)
    kind = _kind(doc, ct)
    # A document with both shapes could be read as either kind by different clients.
    if kind in mt.IMAGE_MANIFESTS and "manifests" in doc:
        raise ManifestError("image manifest must not have a 'manifests' list")
    if kind in mt.INDEXES and ("config" in doc or "layers" in doc):
        raise ManifestError("image index must not have 'config' or 'layers'")
    version = doc.get("schemaVersion")
    if type(version) is not int or version != 2:
        raise ManifestError(f"manifest schemaVersion must be 2, got {_preview(version)}"
                            if "schemaVersion" in doc else "manifest has no schemaVersion")
    annotations = _annotations(doc.get("annotations"), "manifest annotations")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None:
        artifact_type = _media_type(artifact_type, "manifest artifactType")
    subject = _optional_descriptor(doc, "subject")
    if kind in mt.INDEXES:
        return ImageIndex(media_type=kind, manifests=_descriptors(doc, "manifests"),
                          subject=subject, annotations=annotations, artifact_type=artifact_type)
    if "config" not in doc:
        raise ManifestError("manifest has no 'config'")
    return ImageManifest(media_type=kind, config=_descriptor(doc["config"], "config"),
                         layers=_descriptors(doc, "layers"), subject=subject,
                         annotations=annotations, artifact_type=artifact_type)
