"""Progress events: plain values that flow out of the engine to whoever listens.

The command line turns them into docker-style lines, tqdm bars or JSON lines; an
embedding program passes a callback to :class:`puller.Puller`. Events never carry
credentials. ``to_json()`` gives the ``--json`` line form, with an ``event`` key.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from .record import Record

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


class Event(Record, kw_only=True):
    """An immutable record (see :mod:`puller.record`); the constructor takes keywords.
    ``kind`` is the event's name."""

    kind: ClassVar[str] = "event"
    ref: str  # the normalised reference of the image this event is about

    def __hash__(self) -> int:  # some fields are lists
        return hash((type(self), *(repr(v) for v in self._values())))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"event": self.kind}
        for n in self._fields:
            v = getattr(self, n)
            d[n] = list(v) if isinstance(v, list) else v
        return d


class PullStarted(Event):
    kind: ClassVar[str] = "pull.started"


class ManifestResolved(Event):
    """The image manifest to pull is known (after platform selection)."""

    kind: ClassVar[str] = "manifest.resolved"
    digest: str  # digest of what the reference names (index or manifest)
    manifest_digest: str  # digest of the platform image manifest
    media_type: str
    platform: str | None
    layers: int
    total_bytes: int


class BlobQueued(Event):
    kind: ClassVar[str] = "blob.queued"
    digest: str
    size: int
    role: str  # "layer" or "config"


class BlobStarted(Event):
    kind: ClassVar[str] = "blob.started"
    digest: str
    size: int
    offset: int  # bytes already on disk from an earlier attempt (resume)


class BlobProgress(Event):
    kind: ClassVar[str] = "blob.progress"
    digest: str
    complete: int
    total: int


class BlobDone(Event):
    kind: ClassVar[str] = "blob.done"
    digest: str
    size: int
    # "exists": already in the store; "downloaded": fetched now (by this image or by
    # another image of the same run that wanted the same digest).
    status: str
    bytes_fetched: int = 0


class BlobRetry(Event):
    kind: ClassVar[str] = "blob.retry"
    digest: str
    attempt: int
    offset: int
    error: str
    delay: float


class PullDone(Event):
    kind: ClassVar[str] = "pull.done"
    digest: str
    platforms: list[str] = []  # noqa: RUF012 (copied per event)
    blobs_fetched: int = 0
    blobs_reused: int = 0
    bytes_fetched: int = 0
    up_to_date: bool = False


class PullFailed(Event):
    kind: ClassVar[str] = "pull.failed"
    error: str
    error_type: str


Listener = Callable[[Event], None]
