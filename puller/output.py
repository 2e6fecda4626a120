"""A command's output to stdout, which must never be what stops the command.

``puller pull ... | head -1`` closes the pipe after one line, and ``puller mirror --json >
log`` may fill the disk: either way the pull, push or mirror goes on and finishes, since its
work is in the store or the target registry, not in the output. Further output is dropped
(anything still buffered goes to ``/dev/null`` rather than failing at exit). A reader that
left is normal use and goes unremarked; any other failure is said once on stderr, and the
command exits non-zero (see :attr:`Output.failed`).
"""

from __future__ import annotations

import os
import sys
from typing import Callable


def discard_stdout() -> None:
    """From now on, what is written to stdout (and what is still buffered) goes nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (an in-process caller)
        pass


class Output:
    """Guards a command's writes to stdout; see the module's docstring."""

    # Why the output stopped, if it did.
    output_error: OSError | None = None

    def _out(self, write: Callable[[], object]) -> None:
        """Run ``write``, some output to stdout, unless the output already stopped."""
        if self.output_error is not None:
            return
        try:
            write()
        except OSError as exc:
            self.output_error = exc
            if not isinstance(exc, BrokenPipeError):
                print(f"puller: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
            discard_stdout()

    def _line(self, text: str) -> None:
        """One line to stdout, flushed."""
        def write() -> None:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        self._out(write)

    @property
    def output_failed(self) -> bool:
        """The output was lost for a reason other than its reader leaving."""
        return self.output_error is not None and not isinstance(self.output_error,
                                                                BrokenPipeError)
