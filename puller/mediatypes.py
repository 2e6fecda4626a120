"""Media types and annotation keys of the OCI image spec and Docker's distribution formats."""

from __future__ import annotations

__all__ = [
    "OCI_MANIFEST", "OCI_INDEX", "OCI_CONFIG", "OCI_EMPTY",
    "OCI_LAYER", "OCI_LAYER_GZIP", "OCI_LAYER_ZSTD",
    "OCI_LAYER_NONDISTRIBUTABLE", "OCI_LAYER_NONDISTRIBUTABLE_GZIP",
    "OCI_LAYER_NONDISTRIBUTABLE_ZSTD",
    "DOCKER_MANIFEST", "DOCKER_MANIFEST_LIST", "DOCKER_CONFIG", "DOCKER_LAYER",
    "DOCKER_FOREIGN_LAYER", "DOCKER_SCHEMA1", "DOCKER_SCHEMA1_SIGNED",
    "IMAGE_MANIFESTS", "INDEXES", "SCHEMA1", "MANIFESTS", "LAYERS", "CONFIGS", "ACCEPT",
    "OCI_LAYOUT_VERSION", "ANNOTATION_REF_NAME",
    "ANNOTATION_DOCKER_REFERENCE_TYPE", "ANNOTATION_DOCKER_REFERENCE_DIGEST",
    "DOCKER_REFERENCE_TYPE_ATTESTATION",
]

# OCI image spec
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# Deprecated in image-spec 1.1 but still found on Windows base images.
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDISTRIBUTABLE_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

# Docker distribution (image manifest v2 schema 2 and manifest list)
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Schema 1: recognised only to refuse it with a clear message.
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

IMAGE_MANIFESTS: frozenset[str] = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES: frozenset[str] = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
SCHEMA1: frozenset[str] = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
#: Everything parse_manifest understands.
MANIFESTS: frozenset[str] = IMAGE_MANIFESTS | INDEXES
LAYERS: frozenset[str] = frozenset({
    OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
    OCI_LAYER_NONDISTRIBUTABLE, OCI_LAYER_NONDISTRIBUTABLE_GZIP, OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
    DOCKER_LAYER, DOCKER_FOREIGN_LAYER,
})
CONFIGS: frozenset[str] = frozenset({OCI_CONFIG, DOCKER_CONFIG})

#: Accept header for manifest requests; indexes first so multi-arch tags resolve to the list.
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

OCI_LAYOUT_VERSION = "1.0.0"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

# BuildKit marks attestation (SBOM/provenance) manifests in an index with these.
ANNOTATION_DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"
ANNOTATION_DOCKER_REFERENCE_DIGEST = "vnd.docker.reference.digest"
DOCKER_REFERENCE_TYPE_ATTESTATION = "attestation-manifest"
