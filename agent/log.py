"""Logging: one line per recording event, as text or as JSON objects with stable field names.

>>> log.info("spooled", extra={"fields": {"recording_id": rid, "kind": "call", "bytes": 123}})

Field names (JSON): ts, level, logger, event, then the event's fields. Never a secret: callers pass
ids, paths, sizes, kids and error texts only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:  # only for bugs (expected failures are logged without one)
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = " ".join(f"{k}={_text(v)}" for k, v in getattr(record, "fields", {}).items())
        line = f"{ts}Z {record.levelname:<7} {record.getMessage()}" + (f" {fields}" if fields else "")
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def _text(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c.isspace() or c in '"=' for c in s)) else s


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger("mediaseal")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
