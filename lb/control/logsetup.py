"""Where log lines go.

Two streams, so each can be read by a machine: diagnostics (start-up,
health, reloads, errors) on stderr as `time LEVEL logger: message`, and the
access log on stdout as pure logfmt lines -- `ts=... rid=... status=...`,
nothing before the first key -- that a log shipper can parse as they are.
Every line of both passes through the same masking step (`lb.redact`), so a
secret that reaches a message by any path is not written.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from . import accesslog
from ..tts import redact

DIAGNOSTIC_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _AccessFormatter(logging.Formatter):
    """The message is already logfmt; only a UTC timestamp goes in front."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"ts={stamp}.{int(record.msecs):03d}Z {record.getMessage()}"


def configure(level: str, *, diagnostics: TextIO | None = None,
              access: TextIO | None = None) -> list[logging.Handler]:
    """Install the two handlers (replacing any earlier ones), each masking
    secrets (`redact.Filter`); returns them."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    diag = logging.StreamHandler(diagnostics or sys.stderr)
    diag.setFormatter(logging.Formatter(DIAGNOSTIC_FORMAT))
    diag.addFilter(redact.Filter())
    root.addHandler(diag)
    root.setLevel(level.upper())

    access_logger = accesslog.logger
    for handler in list(access_logger.handlers):
        access_logger.removeHandler(handler)
    lines = logging.StreamHandler(access or sys.stdout)
    lines.setFormatter(_AccessFormatter())
    lines.addFilter(redact.Filter())
    access_logger.addHandler(lines)
    access_logger.setLevel(logging.INFO)     # log.access turns it off, not the level
    access_logger.propagate = False          # not again, with a prefix, on stderr
    return [diag, lines]


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
