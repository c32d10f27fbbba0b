"""Logging: one line per event, as text or JSON, with the request id, and secrets masked."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import orjson

from pglayer._context import current_request_id
from pglayer._context import request_id as request_id_of
from pglayer._dsn import mask_text

__all__ = [
    "AccessLog",
    "JsonFormatter",
    "MaskSecrets",
    "TextFormatter",
    "Throttle",
    "configure_logging",
    "install_request_id",
]


class Throttle:
    """At most one line per key a second: an outage repeats the same line for every request
    in flight (a retry, a lost connection), and a flood hides the one line that matters.

    `allow(key)` is None for a line to leave out, else how many were left out since the last
    one (to say so in it). Keys are a few kinds of event, not client input; at most `keys`
    are remembered."""

    _all: ClassVar[list[Throttle]] = []

    def __init__(self, every: float = 1.0, keys: int = 256) -> None:
        self.every = every
        self._keys = keys
        self._seen: dict[Any, list[float]] = {}  # key: [time of its last line, left out since]
        Throttle._all.append(self)

    @classmethod
    def forget_all(cls) -> None:
        """Every throttle as new (for tests that look for a line)."""
        for throttle in cls._all:
            throttle._seen.clear()

    def allow(self, key: Any) -> int | None:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= self._keys:
                self._seen.clear()
            self._seen[key] = [now, 0]
            return 0
        if now - seen[0] < self.every:
            seen[1] += 1
            return None
        left_out = int(seen[1])
        seen[0], seen[1] = now, 0
        return left_out


def left_out(count: int) -> str:
    """What a throttled line adds about the lines left out before it."""
    return f" ({count} more like it left out)" if count else ""


# Attributes every LogRecord has; anything else was passed with `extra=` and is logged.
# uvicorn's `color_message` repeats the message with terminal colours: never logged.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
}


# What an access line's message already says ("GET /users/42" 200 1.2ms): in the text format
# only the route follows it; the JSON format and other formatters get every field.
_IN_ACCESS_MESSAGE = frozenset({"method", "path", "status", "duration_ms"})


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


_TRACEBACK = "Traceback (most recent call last):"


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message`, then any extra fields as key=value; the
    logger's name followed by the PID (`pglayer.pool[4242]`) with `worker`.

    A record is one line, whatever its message holds; a traceback follows on lines
    indented by two spaces, so no text inside a record can pass for the start of another.
    """

    def __init__(self, *, worker: bool = False) -> None:
        # `name[pid]` where several workers write to one stream: which one said it.
        name = "%(name)s[%(process)d]" if worker else "%(name)s"
        super().__init__(f"%(asctime)s %(levelname)s {name} [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        message = record.getMessage().rstrip("\n")
        printed = ""
        at = message.find(_TRACEBACK)
        if at == 0 or (at > 0 and message[at - 1] == "\n"):
            # A traceback printed into the message (uvicorn's "Application startup failed"):
            # laid out as one, below the line, not folded into it.
            message, printed = message[:at].rstrip("\n") or "traceback", message[at:]
        record.message = _one_line(message)
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        shown = _IN_ACCESS_MESSAGE if record.name == "pglayer.access" else ()
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k not in shown}
        if extra:
            line += " " + " ".join(f"{k}={_value(v)}" for k, v in extra.items() if k != "statement")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        stack = record.stack_info and self.formatStack(record.stack_info)
        for block in (printed, record.exc_text, stack):
            if block:
                line += "".join(f"\n  {_one_line(part)}" for part in block.splitlines())
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
            "worker": record.process,  # the PID: which of several workers wrote it
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = _json_safe(mask_text(value)) if isinstance(value, str) else value
        if record.exc_info:
            exception = "".join(traceback.format_exception(*record.exc_info))
            out["exception"] = _json_safe(mask_text(exception))
        out["message"] = _json_safe(mask_text(out["message"]))
        return orjson.dumps(out, default=str).decode()


def escape(text: str) -> str:
    r"""Client-controlled `text` made safe for a log line: printable, one line, unambiguous.

    Control and other unprintable characters (CR, LF, ESC, NEL, U+2028...) become Python
    escapes (`\n`, `\x1b`, `\u2028`), and so do `\` and `"`, so the original can always
    be read back. Text that needs none of it is returned as is, at the cost of one scan.
    """
    if text.isprintable() and "\\" not in text and '"' not in text:
        return text
    return "".join(_ESCAPES.get(c) or (c if c.isprintable() else _escape_one(c)) for c in text)


_ESCAPES = {"\\": "\\\\", '"': '\\"'}


def _escape_one(char: str) -> str:
    code = ord(char)
    if char in "\n\r\t":
        return repr(char)[1:-1]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _one_line(text: str) -> str:
    # Any text in a text-format line: unprintable characters escaped, backslashes kept (a
    # safety net for text nobody marked as the client's; `escape` is the exact form).
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_one(c) for c in text)


def _value(value: object) -> str:
    # key=value: a value with a space is quoted, so it cannot pass for further pairs.
    text = _one_line(str(value))
    return f'"{text}"' if " " in text else text


def _message(method: str, path: str, status: int, ms: float) -> str:
    return f'"{method} {path}" {status or "-"} {_tenths(ms)}ms'


def _json_safe(text: str) -> str:
    # JSON escapes only characters below U+0020 itself; NEL, U+2028, C1 controls would
    # otherwise reach the line raw.
    if text.isascii() or text.isprintable():
        return text
    return "".join(c if c.isprintable() or c < "\x7f" else _escape_one(c) for c in text)


class _Clock:
    """Wall-clock stamps as the formatters write them, recomputed once a second."""

    __slots__ = ("_iso", "_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""
        self._iso = ""

    def stamps(self, now: float) -> tuple[str, str, str]:
        """The second as text and as ISO 8601, and its milliseconds as three digits."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._iso = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return self._text, self._iso, _MILLIS[int((now - second) * 1000)]


# Formatted once: per line a lookup costs a fraction of a format spec's parse.
_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))
_TENTHS = tuple(f"{tenths / 10:.1f}" for tenths in range(1000))  # "0.0" to "99.9"
_STATUS = {code: str(code) for code in range(100, 600)}
_MAX_LOGGED_PATH = 1024  # characters of a request path an access line keeps
# Methods a server passes on as they are; any other is escaped like the path.
_PLAIN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_MAX_ROUTES = 1024  # route templates remembered quoted; an app has a bounded set


def _tenths(ms: float) -> str:
    """`ms` with one decimal, as `f"{ms:.1f}"` (halves rounded up): a lookup below 100."""
    tenths = int(ms * 10 + 0.5)
    return _TENTHS[tenths] if 0 <= tenths < 1000 else f"{ms:.1f}"


class AccessLog:
    """One INFO line per request on `pglayer.access`, with the request id.

    When the line goes only to the handler `configure_logging()` installed (the `serve`
    default), it is formatted here exactly as that handler would, without building a
    `LogRecord` (40 µs a line here, most of a request's budget); otherwise it goes through
    `logging` like any other record. Client-controlled text is escaped either way.
    """

    def __init__(self) -> None:
        self.logger = logging.getLogger("pglayer.access")
        self._root = logging.getLogger()
        self._clock = _Clock()
        # Lines of one event-loop iteration, written together right after it: one lock,
        # one write and one flush for many requests under load, none held back when idle.
        # Where they go is decided by the first line of each iteration.
        self._batch: list[str] = []
        self._batch_handler: StreamHandlerWithFormat | None = None
        self._routes: dict[str, str] = {}

    def _direct(self) -> StreamHandlerWithFormat | None:
        access = self.logger
        if access.handlers or access.filters or not access.propagate or access.disabled:
            return None
        handlers = self._root.handlers
        if len(handlers) != 1 or not isinstance(handlers[0], StreamHandlerWithFormat):
            return None
        handler = handlers[0]
        plain = len(handler.filters) == 1 and isinstance(handler.filters[0], MaskSecrets)
        return handler if plain and handler.level <= logging.INFO else None

    def write(
        self,
        method: str,
        path: str,
        route: str,
        status: int,
        seconds: float,
        request_id: str,
        cut_short: bool = False,
    ) -> None:
        """One request's line; `cut_short`: a streamed response that ended without its final
        chunk, which its status alone (200) would read as sent whole."""
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if method not in _PLAIN_METHODS:
            method = escape(method)
        # Only the path is the client's to fill: masked here, once, rather than the whole
        # line (the same text: nothing else in a line can hold a URL or `password=`).
        escaped = escape(path)
        if len(escaped) > _MAX_LOGGED_PATH:  # a path may take most of a 64 KiB head
            escaped = f"{escaped[:_MAX_LOGGED_PATH]}...({len(path)} characters)"
        path = mask_text(escaped)
        ms = seconds * 1000
        handler = self._batch_handler if self._batch else self._direct()
        if handler is None or cut_short:  # the latter rare: said through `logging`
            extra = {
                "method": method,
                "path": path,
                "route": route,
                "status": status or None,
                "duration_ms": round(ms, 2),
            }
            message = _message(method, path, status, ms)
            if cut_short:
                message, extra["cut_short"] = f"{message} cut short", True
            with request_id_of(request_id):  # the request's own context has ended
                self.logger.info(message, extra=extra)
            return
        text, iso, millis = self._clock.stamps(time.time())
        if handler.format_name == "json":
            line = orjson.dumps(
                {
                    "time": f"{iso}.{millis}+00:00",
                    "level": "info",
                    "logger": "pglayer.access",
                    "message": _message(method, path, status, ms),
                    "request_id": request_id,
                    "worker": os.getpid(),
                    "method": method,
                    "path": path,
                    "route": route,
                    "status": status or None,
                    "duration_ms": round(ms, 2),
                }
            ).decode()
        else:
            # What `TextFormatter` writes for the record `logging` would build, in one
            # f-string (`_message` inlined; `_value` quotes a value with a space).
            code = _STATUS.get(status) or (str(status) if status else "-")
            tenths = int(ms * 10 + 0.5)  # `_tenths`, inlined
            duration = _TENTHS[tenths] if 0 <= tenths < 1000 else _tenths(ms)
            quoted = self._routes.get(route) or self._quoted(route)
            line = (
                f'{text},{millis} INFO {handler.access_name} [{request_id}] "{method} {path}" '
                f"{code} {duration}ms route={quoted}"
            )
        batch = self._batch
        if not batch:  # written (and emptied) after the iteration by the handler itself
            try:
                asyncio.get_running_loop().call_soon(handler.write_lines, batch)
            except RuntimeError:  # no event loop: write it now
                handler.write_lines([line])
                return
            self._batch_handler = handler
        batch.append(line)

    def _quoted(self, route: str) -> str:
        quoted = f'"{route}"' if " " in route else route
        if len(self._routes) < _MAX_ROUTES:
            self._routes[route] = quoted
        return quoted


class StreamHandlerWithFormat(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging()` installs; it knows its format by name."""

    def __init__(self, format_name: str, *, worker: bool = False) -> None:
        super().__init__(sys.stderr)
        self.format_name = format_name
        self.access_name = f"pglayer.access[{os.getpid()}]" if worker else "pglayer.access"

    def write_lines(self, lines: list[str]) -> None:
        """Write `lines`, then empty the list (`AccessLog` starts its next batch in it)."""
        text = self.terminator.join(lines) + self.terminator
        lines.clear()
        stream = self.stream
        with self.lock:  # type: ignore[union-attr]
            stream.write(text)
            # A line-buffered stream (stderr is one) has just flushed itself.
            if not (getattr(stream, "line_buffering", False) and text.endswith("\n")):
                stream.flush()


def configure_logging(
    *, format: Literal["text", "json"] = "text", level: str | int = "INFO"
) -> logging.Handler:
    """Send all logs (pglayer's, uvicorn's, the app's) to stderr in one format; masked.
    Text names the PID with each logger where `serve --workers` runs several (JSON always
    does)."""
    install_request_id()
    worker = os.environ.get("PGLAYER_WORKERS", "1").strip() not in ("", "0", "1")
    handler = StreamHandlerWithFormat(format, worker=worker)
    handler.addFilter(MaskSecrets())
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter(worker=worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not logger.handlers and not logger.propagate:
            continue  # turned off (uvicorn's `access_log=False`), before the app was built
        logger.handlers.clear()
        logger.propagate = True
    return handler
