"""Logging: one line per event, as text or JSON, with the request id, and secrets masked."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from pglayer.context import current_request_id
from pglayer.dsn import mask_text

__all__ = [
    "JsonFormatter",
    "MaskSecrets",
    "TextFormatter",
    "configure_logging",
    "install_request_id",
]

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


class MaskSecrets(logging.Filter):
    """Masks passwords in URLs and `password=` parameters of the formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message)
        if masked is not message:
            record.msg, record.args = masked, None
        return True


def _with_request_id(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        # Read when the record is made: a handler may format it later, in another task.
        record.request_id = current_request_id()
        return record

    make.pglayer = True  # type: ignore[attr-defined]
    return make


def install_request_id() -> None:
    """Give every log record the request id of the task that made it (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "pglayer", False):
        logging.setLogRecordFactory(_with_request_id(factory))


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message`, then any extra fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        line = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items() if k != "statement")
        return mask_text(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = mask_text(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = mask_text("".join(traceback.format_exception(*record.exc_info)))
        out["message"] = mask_text(out["message"])
        return orjson.dumps(out, default=str).decode()


def configure_logging(
    *, format: Literal["text", "json"] = "text", level: str | int = "INFO"
) -> logging.Handler:
    """Send all logs (pglayer's, uvicorn's, the app's) to stderr in one format; masked."""
    install_request_id()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(MaskSecrets())
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
