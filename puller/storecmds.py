"""Commands that show and use what the store holds.

``add_parsers(sub)`` registers the subcommands on the command line's parser; each sets
``handler`` to a function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    """Register the store commands (none yet)."""
    del sub
