"""Progress events: plain values that flow out of the engine to whoever listens.

The command line turns them into docker-style lines, tqdm bars or JSON lines; an
embedding program passes a callback to :class:`puller.Puller`. Events never carry
credentials. ``to_json()`` gives the ``--json`` line form, with an ``event`` key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

__all__ = [
    "Event",
    "PullStarted",
    "ManifestResolved",
    "BlobQueued",
    "BlobStarted",
    "BlobProgress",
    "BlobDone",
    "BlobRetry",
    "PullDone",
    "PullFailed",
    "Listener",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    kind: ClassVar[str] = "event"
    ref: str  # the normalised reference of the image this event is about

    def to_json(self) -> dict[str, Any]:
        d = {"event": self.kind}
        d.update(asdict(self))
        return d


@dataclass(frozen=True, slots=True, kw_only=True)
class PullStarted(Event):
    kind: ClassVar[str] = "pull.started"


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestResolved(Event):
    """The image manifest to pull is known (after platform selection)."""

    kind: ClassVar[str] = "manifest.resolved"
    digest: str  # digest of what the reference names (index or manifest)
    manifest_digest: str  # digest of the platform image manifest
    media_type: str
    platform: str | None
    layers: int
    total_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobQueued(Event):
    kind: ClassVar[str] = "blob.queued"
    digest: str
    size: int
    role: str  # "layer" or "config"


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobStarted(Event):
    kind: ClassVar[str] = "blob.started"
    digest: str
    size: int
    offset: int  # bytes already on disk from an earlier attempt (resume)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobProgress(Event):
    kind: ClassVar[str] = "blob.progress"
    digest: str
    complete: int
    total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobDone(Event):
    kind: ClassVar[str] = "blob.done"
    digest: str
    size: int
    # "exists": already in the store; "downloaded": fetched now (by this image or by
    # another image of the same run that wanted the same digest).
    status: str
    bytes_fetched: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobRetry(Event):
    kind: ClassVar[str] = "blob.retry"
    digest: str
    attempt: int
    offset: int
    error: str
    delay: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PullDone(Event):
    kind: ClassVar[str] = "pull.done"
    digest: str
    platforms: list[str] = field(default_factory=list)
    blobs_fetched: int = 0
    blobs_reused: int = 0
    bytes_fetched: int = 0
    up_to_date: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PullFailed(Event):
    kind: ClassVar[str] = "pull.failed"
    error: str
    error_type: str


Listener = Callable[[Event], None]
