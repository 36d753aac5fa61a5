"""Third-party warnings and log lines that a user cannot act on (deprecations inside the
libraries we call, advice meant for their own users), silenced where they arise and shown
again when ubc logs verbosely (a command's ``-v``: the ``ubc`` logger at INFO)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator

__all__ = ["TORCHSCRIPT_DEPRECATED", "configure_logging", "is_verbose", "ignoring_log",
           "ignoring_stderr", "ignoring_warnings"]

#: PyTorch deprecates TorchScript: each torch.jit call warns (FutureWarning) although
#: model.ts is a supported artifact of ours and the user has nothing to change
TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


def configure_logging(verbose: bool) -> None:
    """What a command's ``-v`` means: INFO log lines and the third-party warnings this
    module silences; without it, warnings and errors only."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def is_verbose() -> bool:
    return logging.getLogger("ubc").isEnabledFor(logging.INFO)


@contextlib.contextmanager
def ignoring_warnings(message: str, category: type[Warning]) -> Iterator[None]:
    """Inside the block, drop the warnings of ``category`` whose message matches
    ``message`` (a regular expression matched at the start), unless verbose."""
    with warnings.catch_warnings():
        if not is_verbose():
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


class _Drop(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = re.compile(message)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.message.match(record.getMessage())


@contextlib.contextmanager
def ignoring_log(logger: str, message: str) -> Iterator[None]:
    """Inside the block, drop the records that ``logger`` ("" for the root logger, which
    ``logging.warning()`` writes to) logs with a message matching ``message`` (at the
    start), unless verbose."""
    target = logging.getLogger(logger or None)
    drop = _Drop(message)
    if not is_verbose():
        target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


@contextlib.contextmanager
def ignoring_stderr(message: str) -> Iterator[None]:
    """Inside the block, drop the lines that native code (or anything else) writes to file
    descriptor 2 when they match ``message`` (a regular expression searched), unless
    verbose. Best effort: a line split across two writes passes."""
    if is_verbose():
        yield
        return
    pattern = re.compile(message.encode())
    sys.stderr.flush()
    saved, (read_end, write_end) = os.dup(2), os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with open(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                lines = chunk.splitlines(keepends=True)  # "\r" too: progress bars flow
                os.write(saved, b"".join(line for line in lines if not pattern.search(line)))

    thread = threading.Thread(target=forward, name="ubc-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer gone: the thread reads to its end
        thread.join(timeout=5)
