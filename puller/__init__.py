"""puller: fast, verified, resumable container image pulls.

The public API is loaded lazily so that ``import puller`` (and the command line's
start-up) stays cheap::

    async with puller.Puller(store="./cache") as p:
        result = await p.pull("alpine")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Puller",
    "PullOptions",
    "PullResult",
    "ImageResult",
    "Reference",
    "Digest",
    "Platform",
    "ContentStore",
    "ClientOptions",
    "errors",
    "events",
    "__version__",
]

_LAZY = {
    "Puller": "puller.api",
    "PullOptions": "puller.api",
    "PullResult": "puller.api",
    "ImageResult": "puller.api",
    "Reference": "puller.reference",
    "Digest": "puller.digest",
    "Platform": "puller.platform",
    "ContentStore": "puller.store",
    "ClientOptions": "puller.client",
}

if TYPE_CHECKING:  # pragma: no cover
    from . import errors, events
    from .api import ImageResult, Puller, PullOptions, PullResult
    from .client import ClientOptions
    from .digest import Digest
    from .platform import Platform
    from .reference import Reference
    from .store import ContentStore


def __getattr__(name: str) -> Any:
    import importlib

    if name in ("errors", "events"):
        return importlib.import_module(f"puller.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'puller' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
