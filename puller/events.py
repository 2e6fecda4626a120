"""Progress events: plain values that flow out of the engine to whoever listens.

The command line turns them into docker-style lines, tqdm bars or JSON lines; an
embedding program passes a callback to :class:`puller.Puller`. Events never carry
credentials. ``to_json()`` gives the ``--json`` line form, with an ``event`` key.
"""

from __future__ import annotations

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


class Event:
    """An immutable record. Each subclass lists its fields as annotations (``kind`` is
    the event's name); the constructor takes them as keywords, a field with a value in
    the class body is optional (a list default is copied per event).

    Plain classes rather than dataclasses: generating ten dataclasses cost several ms of
    every command-line run's start-up."""

    kind: ClassVar[str] = "event"
    ref: str  # the normalised reference of the image this event is about
    _fields: ClassVar[tuple[str, ...]] = ("ref",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [n for n, t in cls.__dict__.get("__annotations__", {}).items()
               if not str(t).startswith("ClassVar")]
        cls._fields = tuple(dict.fromkeys([*cls._fields, *own]))

    def __init__(self, **values: Any) -> None:
        for name in self._fields:
            if name in values:
                value = values.pop(name)
            elif hasattr(type(self), name):
                value = getattr(type(self), name)
                if isinstance(value, list):
                    value = list(value)
            else:
                raise TypeError(f"{type(self).__name__} needs {name}")
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(values))}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self._fields)

    def __hash__(self) -> int:
        return hash((type(self), *(repr(getattr(self, n)) for n in self._fields)))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__name__}({inner})"

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
