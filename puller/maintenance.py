"""Store maintenance commands: checking and cleaning the store.

``add_parsers(sub)`` registers the subcommands on the command line's parser; each sets
``handler`` to a function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    """Register maintenance subcommands (none yet)."""
    del sub


__all__ = ["add_parsers"]
_ = argparse
