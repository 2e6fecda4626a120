"""Every error puller raises.

The hierarchy::

    PullerError                      base; ``retryable`` says whether trying again may help
    ├── InvalidReference   (ValueError)   a reference that breaks docker's grammar
    ├── InvalidDigest      (ValueError)   a digest that is malformed or of an unknown algorithm
    ├── InvalidPlatform    (ValueError)   a platform string that can't be parsed
    ├── ManifestError      (ValueError)   a manifest or index that is malformed or hostile
    │   ├── ManifestTooLarge              over the size cap
    │   └── UnsupportedManifest           schema1, unknown media types
    ├── NoMatchingPlatform                an index has no image for the wanted platform
    ├── RegistryError                     the registry answered with an error status
    │   ├── AuthenticationRequired  401
    │   ├── AccessDenied            403
    │   ├── NotFound                404
    │   ├── RateLimited             429 (retryable, carries retry_after)
    │   └── ServerError             5xx (retryable)
    ├── TransportError                    connection refused/reset, timeouts, cut bodies (retryable)
    ├── IntegrityError                    bytes that don't match their descriptor
    │   ├── DigestMismatch
    │   └── SizeMismatch
    └── StoreError                        the local store can't be read or written (disk full, ...)

Lower-level exceptions (aiohttp, OSError) are mapped into these at the boundary
where they happen and chained with ``raise ... from``. Messages are one line and
never contain credentials.
"""

from __future__ import annotations

__all__ = [
    "PullerError",
    "InvalidReference",
    "InvalidDigest",
    "InvalidPlatform",
    "ManifestError",
    "ManifestTooLarge",
    "UnsupportedManifest",
    "NoMatchingPlatform",
    "RegistryError",
    "AuthenticationRequired",
    "AccessDenied",
    "NotFound",
    "RateLimited",
    "ServerError",
    "TransportError",
    "IntegrityError",
    "DigestMismatch",
    "SizeMismatch",
    "StoreError",
]


class PullerError(Exception):
    """Base of every puller error. ``retryable`` is True when a later attempt may succeed."""

    retryable: bool = False


class InvalidReference(PullerError, ValueError):
    """An image reference that docker's reference grammar refuses."""


class InvalidDigest(PullerError, ValueError):
    """A digest string that is malformed or uses an unsupported algorithm."""


class InvalidPlatform(PullerError, ValueError):
    """A platform string such as ``linux/arm64/v8`` that can't be parsed."""


class ManifestError(PullerError, ValueError):
    """A manifest or index that is malformed, inconsistent or hostile."""


class ManifestTooLarge(ManifestError):
    """A manifest larger than the size cap."""


class UnsupportedManifest(ManifestError):
    """A manifest kind puller does not pull (schema1, unknown media types)."""


class NoMatchingPlatform(PullerError):
    """An index that has no image for the requested platform."""


class RegistryError(PullerError):
    """The registry answered with an error status.

    ``status`` is the HTTP status, ``host`` the registry host, ``code`` the first
    error code of the distribution error body when there was one.
    """

    def __init__(self, message: str, *, status: int | None = None, host: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.host = host
        self.code = code


class AuthenticationRequired(RegistryError):
    """401: the registry wants credentials puller does not have (or refused them)."""


class AccessDenied(RegistryError):
    """403: the credentials are valid but not allowed to do this."""


class NotFound(RegistryError):
    """404: the repository, manifest or blob does not exist."""


class RateLimited(RegistryError):
    """429: too many requests; ``retry_after`` is in seconds when the registry said."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServerError(RegistryError):
    """5xx: the registry failed; usually transient."""

    retryable = True


class TransportError(PullerError):
    """The connection failed: refused, reset, timed out or cut mid-body."""

    retryable = True


class IntegrityError(PullerError):
    """Bytes that don't match the descriptor that named them."""

    retryable = True  # a clean re-fetch may succeed; the scheduler bounds how often


class DigestMismatch(IntegrityError):
    """The content hashes to another digest than the one expected."""


class SizeMismatch(IntegrityError):
    """The content is longer or shorter than the descriptor's size."""


class StoreError(PullerError):
    """The local store can't be read or written (disk full, permissions, corruption)."""
