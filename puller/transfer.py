"""Commands that move images between the store and registries.

``add_parsers(sub)`` registers the subcommands on the command line's parser; each sets
``handler`` to a function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    """Register the transfer commands (none yet)."""
    del sub
