"""Image references parsed with docker's grammar and normalisation.

Grammar from distribution/reference; normalisation (default registry, ``library/``,
default tag) from docker's ``ParseNormalizedNamed``.
"""

from __future__ import annotations

import ipaddress
import re

from puller.digest import Digest, _preview
from puller.errors import InvalidDigest, InvalidReference
from puller.record import Record

__all__ = ["DEFAULT_REGISTRY", "DOCKER_HUB_API_HOST", "Reference"]

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_LEGACY_DEFAULT_REGISTRY = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
_DEFAULT_TAG = "latest"
_NAME_MAX = 255

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
# \w in Go's RE2 is ASCII-only; re.ASCII keeps Python from accepting e.g. "é".
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
# docker refuses a bare image id as a name so it can't be confused with one.
_IDENTIFIER = re.compile(r"[a-f0-9]{64}")


def is_tag(s: object) -> bool:
    """``s`` is a valid tag (docker's rule: ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``)."""
    return isinstance(s, str) and _TAG.fullmatch(s) is not None


def _bad(s: str, problem: str) -> InvalidReference:
    return InvalidReference(f"invalid reference {_preview(s)}: {problem}")


class Reference(Record):
    """A normalised image reference such as ``docker.io/library/alpine:latest``."""

    registry: str
    repository: str
    tag: str | None
    digest: Digest | None

    def __post_init__(self) -> None:
        # Tags also come from registries (a repository's tag list, which a mirror copies
        # from): one that isn't a tag would put '?', '#' or '/' into a URL and name some
        # other manifest.
        if self.tag is not None and not is_tag(self.tag):
            raise InvalidReference(f"invalid tag format {_preview(self.tag)} "
                                   f"for {self.registry}/{self.repository}")

    @classmethod
    def parse(cls, s: str) -> Reference:
        """Parse and normalise like ``docker pull`` does; raises InvalidReference."""
        if not isinstance(s, str):
            raise InvalidReference(f"reference must be a string, got {_preview(s)}")
        if not s:
            raise InvalidReference("invalid reference: empty string (repository name must "
                                   "have at least one component)")
        if _IDENTIFIER.fullmatch(s):
            raise _bad(s, "cannot specify 64-byte hexadecimal strings (that is an image id)")

        rest, at, digest_text = s.partition("@")
        if at and "@" in digest_text:
            raise _bad(s, "invalid reference format (more than one '@')")
        # A ':' after the last '/' starts the tag; earlier ones belong to a registry port.
        colon = rest.rfind(":")
        if colon > rest.rfind("/"):
            name, tag = rest[:colon], rest[colon + 1:]
        else:
            name, tag = rest, None
        if not name:
            raise _bad(s, "invalid reference format (no repository name)")

        registry, repository = _split_registry(name)
        full_name = f"{registry}/{repository}"
        # Checked before the regexes: docker's limit, and it bounds their work.
        if len(full_name) > _NAME_MAX:
            raise _bad(s, f"repository name must not be more than {_NAME_MAX} characters")
        if repository.lower() != repository:
            raise _bad(s, "repository name must be lowercase")
        if not _DOMAIN.fullmatch(registry) or not _PATH.fullmatch(repository):
            raise _bad(s, "invalid reference format")
        if tag is not None and not _TAG.fullmatch(tag):
            raise _bad(s, f"invalid tag format {_preview(tag)}")

        digest = None
        if at:
            try:
                digest = Digest.parse(digest_text)
            except InvalidDigest as e:
                raise _bad(s, f"invalid digest format: {e}") from None
        elif tag is None:
            tag = _DEFAULT_TAG
        return cls(registry=registry, repository=repository, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """Registry and repository: ``docker.io/library/alpine``."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    @property
    def identifier(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None  # parse() guarantees a tag or a digest
        return self.tag

    @property
    def api_host(self) -> str:
        """``host[:port]`` to contact; Docker Hub's API lives on another host than its name."""
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def is_loopback(self) -> bool:
        """True for localhost / 127.0.0.0/8 / ::1, which docker talks to over plain HTTP."""
        host = self.registry
        if host.startswith("["):
            host = host[1:].partition("]")[0]
        else:
            host = host.partition(":")[0]
        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def with_digest(self, d: Digest) -> Reference:
        """The same name and tag pinned to ``d``."""
        return self.replace(digest=d)

    def familiar(self) -> str:
        """Docker's short form for output: ``alpine:latest``, ``user/app:1``."""
        if self.registry != DEFAULT_REGISTRY:
            return str(self)
        path = self.repository
        first = path.partition("/")[0]
        if "." in first or ":" in first or first == "localhost":
            # Dropping docker.io here would make the path read as a registry (docker does
            # drop it; Docker Hub namespaces can't contain '.' so this never shows there).
            return str(self)
        short = path[len(_OFFICIAL_PREFIX):]
        if path.startswith(_OFFICIAL_PREFIX) and "/" not in short:
            path = short
        # str(self) minus the name is the ":tag@digest" suffix.
        return path + str(self)[len(self.name):]


def _split_registry(name: str) -> tuple[str, str]:
    """docker's splitDockerDomain: tell a registry from the first path component."""
    first, slash, remainder = name.partition("/")
    # An upper-case first component can't be a repository, so docker takes it as a host.
    if not slash or ("." not in first and ":" not in first and first != "localhost"
                     and first.lower() == first):
        registry, remainder = DEFAULT_REGISTRY, name
    else:
        registry = first
    if registry == _LEGACY_DEFAULT_REGISTRY:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in remainder:
        remainder = _OFFICIAL_PREFIX + remainder
    return registry, remainder
