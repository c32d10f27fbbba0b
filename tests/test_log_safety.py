"""Client-controlled text cannot forge or colour log lines, in either log format."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import orjson
import pytest
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings

from pglayer import ConnectionLostError, Database, _logs
from pglayer._logs import (
    AccessLog,
    JsonFormatter,
    TextFormatter,
    _tenths,
    configure_logging,
    escape,
)
from pglayer.fastapi._middleware import _Exchange
from tests.conftest import LiveServer, logs_clock

# Raw request targets and the path the server decodes from each.
FORGED = "2026-11-25 00:00:00,000 ERROR pglayer.http [-] forged"
TARGETS = {
    "/users/1%0a2026-11-25%2000:00:00,000%20ERROR%20pglayer.http%20[-]%20forged": (
        f"/users/1\n{FORGED}"
    ),
    "/users/1%0d2026-11-25%2000:00:00,000%20ERROR%20pglayer.http%20[-]%20forged": (
        f"/users/1\r{FORGED}"
    ),
    "/users/1%0d%0a%0d%0aX": "/users/1\r\n\r\nX",
    "/users/%1b%5b31mred%1b%5b0m": "/users/\x1b[31mred\x1b[0m",
    "/users/a%5cnb": "/users/a\\nb",  # a backslash and an n: must not read as a newline
    "/users/q%22%20200%20x": '/users/q" 200 x',
    "/users/%e2%80%a8%e2%80%a9%c2%85%c2%9b31m%e2%80%ae%00%7f%09": (
        "/users/\u2028\u2029\x85\x9b31m\u202e\x00\x7f\t"
    ),
    "/users/caf%c3%a9": "/users/café",
}
STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
ACCESS = re.compile(
    r'INFO pglayer\.access \[[^\]]+\] "(?P<method>\S+) (?P<path>(?:[^"\\]|\\.)*)" (?P<status>\d+) '
)
_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)")
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}


def unescape(text: str) -> str:
    """The inverse of `escape`, written independently of it."""

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        return chr(int(code[1:], 16)) if len(code) > 1 else _SIMPLE[code]

    return _ESCAPE.sub(one, text)


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


@asynccontextmanager
async def serve_logged(
    db: Database, log_format: Literal["text", "json"]
) -> AsyncIterator[tuple[LiveServer, io.StringIO]]:
    settings = ShopSettings(admin_token=None, access_log=True, log_format=log_format)
    app: FastAPI = create_app(db=db, settings=settings)

    @app.get("/boom/{word}")
    async def boom(word: str) -> None:
        raise RuntimeError(f"cannot handle {word}")

    @app.get("/lost/{word}")
    async def lost(word: str) -> None:
        raise ConnectionLostError()

    sink = io.StringIO()
    [handler] = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(sink)
    async with app.router.lifespan_context(app), LiveServer(app) as server:
        yield server, sink


async def raw_request(port: int, request: bytes) -> bytes:
    """Send `request` as is; the answer's status line (the connection is then closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


def get(target: str, *headers: bytes) -> bytes:
    lines = [f"GET {target} HTTP/1.1".encode(), b"Host: shop.test", *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def flushed(sink: io.StringIO) -> str:
    await asyncio.sleep(0.05)  # access lines are written right after the loop iteration
    return sink.getvalue()


@pytest.mark.usefixtures("restore_root_logger")
async def test_text_access_log_escapes_every_control_character_in_the_path(db: Database) -> None:
    async with serve_logged(db, "text") as (server, sink):
        for target in TARGETS:
            status = await raw_request(server.port, get(target))
            assert status.startswith(b"HTTP/1.1 4"), (target, status)
        output = await flushed(sink)
    assert output.endswith("\n")
    lines = output[:-1].split("\n")
    assert len(lines) == len(TARGETS), lines
    paths = []
    for line in lines:
        assert line.isprintable(), repr(line)
        assert STAMP.match(line), line
        match = ACCESS.search(line)
        assert match is not None, line
        paths.append(unescape(match["path"]))
    assert paths == list(TARGETS.values())


@pytest.mark.usefixtures("restore_root_logger")
async def test_json_access_log_is_one_printable_line_per_request(db: Database) -> None:
    async with serve_logged(db, "json") as (server, sink):
        for target in TARGETS:
            await raw_request(server.port, get(target))
        output = await flushed(sink)
    lines = output[:-1].split("\n")
    assert len(lines) == len(TARGETS)
    for line in lines:
        assert line.isprintable(), repr(line)
    assert [unescape(orjson.loads(line)["path"]) for line in lines] == list(TARGETS.values())


@pytest.mark.usefixtures("restore_root_logger")
async def test_an_access_line_keeps_a_bounded_part_of_a_long_path(db: Database) -> None:
    async with serve_logged(db, "text") as (server, sink):
        status = await raw_request(server.port, get("/" + "a" * 60_000))
        # Characters escaped at four or six times their length: cut after escaping.
        escaped = await raw_request(server.port, get("/" + "%E2%80%A8" * 3_000))
        output = await flushed(sink)
    assert status.startswith(b"HTTP/1.1 404")
    assert escaped.startswith(b"HTTP/1.1 404")
    plain, special = output.splitlines()
    assert len(plain) < 1300, len(plain)
    assert "...(60001 characters)" in plain
    assert len(special) < 1300, len(special)
    assert "...(3001 characters)" in special


@pytest.mark.usefixtures("restore_root_logger")
async def test_headers_with_control_characters_forge_nothing(db: Database) -> None:
    hostile = (
        b"User-Agent: \x1b[31mred\x1b[0m",
        b"X-Request-ID: r1\x1b[2J",
        b"Idempotency-Key: k\x85\x9b",
        b"Referer: a\rb",
    )
    async with serve_logged(db, "text") as (server, sink):
        for header in hostile:
            await raw_request(server.port, get("/users/1", header))
        output = await flushed(sink)
    assert output.endswith("\n")
    for line in output[:-1].split("\n"):
        assert line.isprintable(), repr(line)
        assert STAMP.match(line), line


@pytest.mark.usefixtures("restore_root_logger")
async def test_error_logs_escape_the_path_and_indent_tracebacks(db: Database) -> None:
    async with serve_logged(db, "text") as (server, sink):
        for prefix in ("/boom/", "/lost/"):
            target = prefix + "x%0a2026-11-25%2000:00:00,000%20ERROR%20forged%1b%5b2J"
            status = await raw_request(server.port, get(target))
            assert status.split()[1] in (b"500", b"503")
        output = await flushed(sink)
    lines = output[:-1].split("\n")
    records = [line for line in lines if STAMP.match(line)]
    # An error line and an access line for each request; traceback lines are indented.
    assert len(records) == 4, lines
    assert all(line.startswith("  ") for line in lines if not STAMP.match(line)), lines
    assert all(line.isprintable() for line in lines), lines
    assert sum("x\\n2026-11-25 00:00:00,000 ERROR forged\\x1b[2J" in r for r in records) == 4


@pytest.mark.usefixtures("restore_root_logger")
async def test_json_error_logs_are_one_printable_line_each(db: Database) -> None:
    async with serve_logged(db, "json") as (server, sink):
        for prefix in ("/boom/", "/lost/"):
            await raw_request(server.port, get(prefix + "x%0aforged%e2%80%a8%c2%9b2J"))
        output = await flushed(sink)
    lines = output[:-1].split("\n")
    assert len(lines) == 4, lines
    for line in lines:
        assert line.isprintable(), repr(line)
        orjson.loads(line)


def test_text_formatter_keeps_any_message_on_one_line() -> None:
    record = logging.makeLogRecord(
        {"name": "app", "levelname": "WARNING", "msg": "a\nb\x1b[31m\u2028", "args": None}
    )
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert line.isprintable()
    assert line.endswith("a\\nb\\x1b[31m\\u2028")


def test_a_traceback_printed_into_a_message_is_laid_out_below_it() -> None:
    # uvicorn logs "Application startup failed" with the traceback as its message.
    printed = 'Traceback (most recent call last):\n  File "app.py", line 1\nValueError: x\x1b\n'
    record = logging.makeLogRecord(
        {"name": "uvicorn.error", "levelname": "ERROR", "msg": printed, "args": None}
    )
    lines = TextFormatter().format(record).split("\n")
    assert lines[0].endswith("uvicorn.error [-] traceback"), lines
    assert lines[1:] == [
        "  Traceback (most recent call last):",
        '    File "app.py", line 1',
        "  ValueError: x\\x1b",
    ]


def test_escape_is_the_identity_on_clean_text_and_invertible_otherwise() -> None:
    for text in ("/users/42", "/products/é", "", "GET"):
        assert escape(text) is text
    for text in (*TARGETS.values(), "\\", '"', "\\x1b", "\udc80"):
        escaped = escape(text)
        assert escaped.isprintable()
        assert unescape(escaped) == text


def test_a_request_id_with_a_trailing_newline_is_replaced() -> None:
    async def nothing(*_: object) -> Any:
        raise AssertionError("unused")

    for value in (b"r1\n", b"r1\r\n", b"r1 ", b"", b"x" * 129):
        scope = {"type": "http", "headers": [(b"x-request-id", value)]}
        assert _Exchange(scope, nothing, nothing, 0.0).request_id.isalnum()
    scope = {"type": "http", "headers": [(b"x-request-id", b"req-1.a:b_c")]}
    assert _Exchange(scope, nothing, nothing, 0.0).request_id == "req-1.a:b_c"


@pytest.mark.usefixtures("restore_root_logger")
def test_configuring_logs_again_keeps_uvicorns_access_log_off_when_it_was_turned_off() -> None:
    access = logging.getLogger("uvicorn.access")
    before = (list(access.handlers), access.propagate)
    try:
        access.handlers, access.propagate = [], False  # uvicorn's `access_log=False`
        configure_logging(format="text")  # the app, built after the server's config
        assert not access.hasHandlers()
        access.handlers, access.propagate = [logging.NullHandler()], False  # uvicorn's default
        configure_logging(format="text")
        assert access.propagate  # one format for every logger
        assert not access.handlers
    finally:
        access.handlers, access.propagate = before


def test_uvicorns_colour_variant_of_a_message_is_not_logged() -> None:
    record = logging.makeLogRecord(
        {"name": "uvicorn.error", "levelname": "INFO", "msg": "Started server process [%d]",
         "args": (7,), "color_message": "Started server process [\x1b[36m%d\x1b[0m]"}
    )  # fmt: skip
    assert TextFormatter().format(record).endswith("[-] Started server process [7]")
    assert "color_message" not in orjson.loads(JsonFormatter().format(record))


LINE_CASES = [
    ("GET", "/users/42", "/users/{user_id}", 200, 0.0123),
    ("POST", "/orders", "/orders", 0, 1.5),
    ("GET", '/users/q" 200 x', "unmatched", 404, 0.00004),
    ("GET", "/users/1\n\x1b[31m\u2028", "unmatched", 499, 12.345678),
    ("GET", "/go/postgresql://u:secret@db/x", "unmatched", 404, 0.2),
    ("PUT", "/a b", "/a b", 405, 0.0),
]


@pytest.mark.usefixtures("restore_root_logger")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_access_line_written_directly_is_the_line_logging_would_write(
    log_format: Literal["text", "json"],
) -> None:
    handler = configure_logging(format=log_format, level="INFO")
    assert isinstance(handler, logging.StreamHandler)
    access = logging.getLogger("pglayer.access")
    for case in LINE_CASES:
        lines = []
        for direct in (True, False):
            stream = io.StringIO()
            handler.setStream(stream)
            through_logging = logging.Filter()  # any filter on the logger: not direct
            if not direct:
                access.addFilter(through_logging)
            try:
                AccessLog().write(*case, "req-1")  # no running loop: written at once
            finally:
                access.removeFilter(through_logging)
            [line] = stream.getvalue().splitlines()
            lines.append(line)
        if log_format == "json":
            direct_line, logged = (orjson.loads(line) for line in lines)
            assert direct_line.pop("time")[:19] == logged.pop("time")[:19]
            assert direct_line == logged, case
        else:
            assert lines[0][24:] == lines[1][24:], case
            assert all(STAMP.match(line) for line in lines)
        assert "secret" not in lines[0]


@pytest.mark.usefixtures("restore_root_logger")
def test_a_text_access_line_says_each_field_once() -> None:
    handler = configure_logging(format="text", level="INFO")
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    AccessLog().write(*LINE_CASES[0], "req-1")
    line = stream.getvalue().rstrip("\n")
    assert STAMP.match(line)
    assert (
        line[24:] == 'INFO pglayer.access [req-1] "GET /users/42" 200 12.3ms route=/users/{user_id}'
    )


class _Capture(logging.Filter):
    """Takes the records it sees, so that none reaches a handler."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@pytest.mark.usefixtures("restore_root_logger")
async def test_where_access_lines_go_is_decided_once_per_loop_iteration() -> None:
    handler = configure_logging(format="text", level="INFO")
    assert isinstance(handler, logging.StreamHandler)
    direct = io.StringIO()
    handler.setStream(direct)
    access_log, access = AccessLog(), logging.getLogger("pglayer.access")
    capture = _Capture()
    access_log.write(*LINE_CASES[0], "req-1")
    access.addFilter(capture)  # mid-iteration: the iteration's lines keep their way
    try:
        access_log.write(*LINE_CASES[1], "req-2")
        await asyncio.sleep(0)  # the iteration's lines are written
        access_log.write(*LINE_CASES[2], "req-3")  # the next iteration goes through logging
    finally:
        access.removeFilter(capture)
    assert [line.split(" [")[1][:5] for line in direct.getvalue().splitlines()] == [
        "req-1",
        "req-2",
    ]
    assert [record.getMessage()[:6] for record in capture.records] == ['"GET /']


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0.0, "0.0"), (0.04, "0.0"), (0.25, "0.3"), (12.34, "12.3"), (99.94, "99.9"),
     (99.95, "100.0"), (100.0, "100.0"), (1234.56, "1234.6")],
)  # fmt: skip
def test_an_access_lines_milliseconds_have_one_decimal_halves_up(ms: float, text: str) -> None:
    assert _tenths(ms) == text


def test_a_throttled_line_says_how_many_like_it_were_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = logs_clock(monkeypatch, 100.0)
    throttle = _logs.Throttle(every=1.0)
    said = [throttle.allow("retry") for _ in range(5)]
    now[0] += 1.5
    said += [throttle.allow("retry"), throttle.allow("other")]
    assert said == [0, None, None, None, None, 4, 0]
    assert _logs.left_out(4) == " (4 more like it left out)"
