"""The daemon's log through the standard library `logging`: one line per event on stderr.

    json     {"ts": 1715241325.123, "level": "warning", "msg": "datadog-disappeared", ...}
    logfmt   ts=2024-05-09T07:55:25.123Z level=warn msg=datadog-disappeared namespace=...

An event is a message (its name) and fields: `log.info("ready", extra=fields(namespaces=3))`,
or the daemon's `Log` callable, `log("info", "ready", namespaces=3)`. Under systemd (stderr is
the journal: JOURNAL_STREAM names its device and inode) each line starts with its sd-daemon
priority, `<6>` for info (sd-daemon(3)), so `journalctl -p warning` finds the warnings.
Nothing here prints a traceback: an exception attached to a record is one more field.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

LOGGER = "tcprio"
LEVELS = {
    "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR,
}  # fmt: skip
FORMATS = ("json", "logfmt")
# sd-daemon(3) priorities: SD_DEBUG 7, SD_INFO 6, SD_WARNING 4, SD_ERR 3
JOURNAL_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def fields(**values: object) -> dict[str, Any]:
    """`extra=` for a logging call: the event's fields."""
    return {"fields": values}


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    found = dict(getattr(record, "fields", None) or {})
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        found.setdefault("error", f"{type(exc).__name__}: {exc}")
    return found


class JsonFormatter(logging.Formatter):
    """The daemon's JSON lines, as they were before logging went through `logging`."""

    NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
             logging.ERROR: "error", logging.CRITICAL: "error"}  # fmt: skip

    def format(self, record: logging.LogRecord) -> str:
        level = self.NAMES.get(record.levelno, record.levelname.lower())
        document = {"ts": round(record.created, 3), "level": level, "msg": record.getMessage()}
        return json.dumps({**document, **_fields_of(record)}, default=str)


def _logfmt_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple | set | frozenset):
        value = json.dumps(value, default=str, separators=(",", ":"))
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' ="\\'):
        return text
    return json.dumps(text)  # quoted, with \n, \" and the other escapes: always one line


class LogfmtFormatter(logging.Formatter):
    """key=value pairs, as the Prometheus exporters write them (go-kit's logfmt)."""

    NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
             logging.ERROR: "error", logging.CRITICAL: "error"}  # fmt: skip

    def format(self, record: logging.LogRecord) -> str:
        millis = int(record.created * 1000) % 1000
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{millis:03d}Z"
        pairs = {"ts": ts, "level": self.NAMES.get(record.levelno, "info"),
                 "msg": record.getMessage(), **_fields_of(record)}  # fmt: skip
        return " ".join(f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in pairs.items())


def _logfmt_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in key) or "_"


class JournalFormatter(logging.Formatter):
    """Another formatter's line behind its sd-daemon priority prefix."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = JOURNAL_PRIORITIES.get(record.levelno, 3 if record.levelno > 40 else 6)
        return f"<{priority}>{self.inner.format(record)}"


def under_journal(stream: IO[str]) -> bool:
    """Whether `stream` is systemd's journal: JOURNAL_STREAM is its "device:inode"."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def formatter(log_format: str, stream: IO[str]) -> logging.Formatter:
    inner = LogfmtFormatter() if log_format == "logfmt" else JsonFormatter()
    return JournalFormatter(inner) if under_journal(stream) else inner


class _Handler(logging.StreamHandler):
    """Marks the handler this module installed, so a reconfiguration replaces it."""


def configure(level: str = "info", log_format: str = "json",
              stream: IO[str] | None = None) -> logging.Logger:  # fmt: skip
    """The `tcprio` logger writing one line per record to `stream` (stderr)."""
    logger = logging.getLogger(LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format, stream or sys.stderr))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[level])
    logger.propagate = False
    return logger


class Log:
    """The daemon's way to log an event: `log("warning", "datadog-disappeared", **fields)`."""

    def __init__(self, level: str = "info", log_format: str = "json") -> None:
        self.logger = configure(level, log_format)

    def __call__(self, level: str, message: str, **values: object) -> None:
        self.logger.log(LEVELS[level], message, extra=fields(**values))
