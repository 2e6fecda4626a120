"""Content digests (``sha256:<hex>``) as used by OCI descriptors and registry URLs."""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from puller.errors import InvalidDigest
from puller.record import Record

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["ALGORITHMS", "Digest"]

#: Supported algorithm -> length of its lowercase hex encoding.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}

# Only lowercase hex: go-digest refuses upper case, and ``hex`` ends up in file paths.
_HEX = re.compile(r"[0-9a-f]+")


def _preview(value: object, limit: int = 100) -> str:
    """A one-line, length-capped rendering of ``value`` for error messages."""
    if isinstance(value, str):
        # Slice before repr so a huge input costs nothing; repr escapes newlines.
        text = repr(value[: limit + 1])
    elif isinstance(value, (bytes, bytearray)):
        text = repr(bytes(value[: limit + 1]))
    else:
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class Digest(Record):
    """A validated digest; ``hex`` is always safe to use as a file name."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        # Validate here too so a Digest built directly can't smuggle "../" into a path.
        if not isinstance(self.algorithm, str) or self.algorithm not in ALGORITHMS:
            raise InvalidDigest(f"unsupported digest algorithm {_preview(self.algorithm)}"
                                f" (supported: {', '.join(ALGORITHMS)})")
        if not isinstance(self.hex, str):
            raise InvalidDigest(f"digest hex must be a string, got {_preview(self.hex)}")
        want = ALGORITHMS[self.algorithm]
        if len(self.hex) != want:
            raise InvalidDigest(f"invalid {self.algorithm} digest length: expected {want} hex "
                                f"characters, got {len(self.hex)} in {_preview(self.hex)}")
        if not _HEX.fullmatch(self.hex):
            raise InvalidDigest(f"invalid {self.algorithm} digest: hex must be lowercase "
                                f"[0-9a-f], got {_preview(self.hex)}")

    @classmethod
    def parse(cls, s: str) -> Digest:
        """Parse ``algorithm:hex``; raises InvalidDigest on anything else."""
        if not isinstance(s, str):
            raise InvalidDigest(f"digest must be a string, got {_preview(s)}")
        algorithm, sep, hexpart = s.partition(":")
        if not sep:
            raise InvalidDigest(f"invalid digest {_preview(s)}: expected 'algorithm:hex'")
        if algorithm not in ALGORITHMS:
            raise InvalidDigest(f"unsupported digest algorithm in {_preview(s)}"
                                f" (supported: {', '.join(ALGORITHMS)})")
        try:
            return cls(algorithm, hexpart)
        except InvalidDigest:
            # Re-raise naming the whole input rather than just the hex part.
            want = ALGORITHMS[algorithm]
            if len(hexpart) != want:
                raise InvalidDigest(f"invalid {algorithm} digest length in {_preview(s)}: "
                                    f"expected {want} hex characters, got {len(hexpart)}"
                                    ) from None
            raise InvalidDigest(f"invalid digest {_preview(s)}: hex must be lowercase "
                                f"[0-9a-f]") from None

    @classmethod
    def from_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """Digest of ``data`` (the exact bytes, e.g. a manifest as received)."""
        if algorithm not in ALGORITHMS:
            raise InvalidDigest(f"unsupported digest algorithm {_preview(algorithm)}"
                                f" (supported: {', '.join(ALGORITHMS)})")
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> _Hash:
        """A fresh hashlib object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        """First 12 hex characters, as docker shows layer ids."""
        return self.hex[:12]
