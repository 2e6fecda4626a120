"""A command's output to stdout, which must never be what stops the command.

``puller pull ... | head -1`` closes the pipe after one line, and ``puller mirror --json >
log`` may fill the disk: either way the pull, push or mirror goes on and finishes, since its
work is in the store or the target registry, not in the output. :func:`guarded_stdout`
(around every command, see :func:`puller.cli.main`) puts a :class:`GuardedStdout` in front
of ``sys.stdout``: after a write fails, further output is dropped (and what is still
buffered goes to ``/dev/null`` rather than failing at exit). A reader that left is normal
use and goes unremarked; any other failure is said once on stderr and makes the command
exit non-zero.

Binary output (``puller save`` writing an archive to ``sys.stdout.buffer``) is not guarded:
an archive that can't be written is the command's failure, reported as such.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO


class GuardedStdout:
    """Stands in for a text stream; ``error`` is why its output stopped, if it did."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                return self.stream.write(text)
            except OSError as exc:
                self._failed(exc)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.stream.flush()
            except OSError as exc:
                self._failed(exc)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, buffer, encoding, ...
        return getattr(self.stream, name)

    @property
    def failed(self) -> bool:
        """The output was lost for a reason other than its reader leaving."""
        return self.error is not None and not isinstance(self.error, BrokenPipeError)

    def _failed(self, exc: OSError) -> None:
        self.error = exc
        if not isinstance(exc, BrokenPipeError):
            print(f"puller: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        discard(self.stream)


def discard(stream: TextIO) -> None:
    """From now on, what is written to ``stream`` (and what it still buffers) goes nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor: an in-process caller
        pass


@contextmanager
def guarded_stdout() -> Iterator[GuardedStdout]:
    """``sys.stdout`` guarded while the block runs, and flushed at its end."""
    if isinstance(sys.stdout, GuardedStdout):  # a command run from within one
        yield sys.stdout
        return
    guard = GuardedStdout(sys.stdout)
    sys.stdout = guard  # type: ignore[assignment]
    try:
        yield guard
        guard.flush()
    finally:
        sys.stdout = guard.stream
