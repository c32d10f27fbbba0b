"""Slow and oversized requests against `pglayer serve`: bounded in size and in time."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pglayer._http import BoundedHttpToolsProtocol, _AnsweredHere
from tests.conftest import Server, free_port

SHOP = str(Path(sys.executable).parent / "pglayer-shop")
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
MAX_HEADER_SIZE = 8192
SLACK = 3.0  # a loaded two-core machine: how late a timeout may still fire


@dataclass
class Served:
    port: int
    log: Path

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture(scope="module")
async def module_db_url(server: Server, admin: asyncpg.Connection[Any], template: str) -> Any:
    name = f"t_{uuid.uuid4().hex[:16]}"
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield server.url_for(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def served(module_db_url: str) -> Iterator[Served]:
    """`pglayer serve` as a user runs it, with short limits, stopped by its PID."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLAYER_")}
    env.update(
        DATABASE_URL=module_db_url,
        PGLAYER_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        PGLAYER_BODY_TIMEOUT=str(BODY_TIMEOUT),
        PGLAYER_MAX_HEADER_SIZE=str(MAX_HEADER_SIZE),
        PGLAYER_ACCESS_LOG="false",
    )
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="pglayer-serve-", suffix=".log")[1])
    with log.open("w") as out:
        proc = subprocess.Popen(
            [SHOP, "serve", "--port", str(port), "--no-seed"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield Served(port, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.unlink()


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes; fails if it is still open `within`."""
    data = b""
    async with asyncio.timeout(within):
        try:
            while chunk := await reader.read(65536):
                data += chunk
                assert len(data) < 1 << 20
        except ConnectionResetError:
            pass
    return data


async def send_head(served: Served, head: bytes) -> bytes:
    """What the server answers to `head`, read until it closes the connection."""
    reader, writer = await served.open()
    try:
        writer.write(head)
        await writer.drain()
        return await read_until_closed(reader, SLACK)
    finally:
        writer.close()


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def assert_problem(response: bytes, status: int, code: str) -> None:
    got, headers, body = parse(response)
    assert got == status, response[:300]
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert re.fullmatch(r"[0-9a-f]{26}", headers["x-request-id"]), headers
    problem = orjson.loads(body)
    assert (problem["status"], problem["code"]) == (status, code)


async def test_a_connection_that_sends_nothing_is_closed(served: Served) -> None:
    reader, writer = await served.open()
    started = time.monotonic()
    try:
        assert await read_until_closed(reader, HEADER_TIMEOUT + SLACK) == b""
    finally:
        writer.close()
    assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9


async def answered_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sends within `seconds` (b"" if nothing); waiting is the pacing."""
    try:
        async with asyncio.timeout(seconds):
            return await reader.read(65536) or b"closed"
    except TimeoutError:
        return b""
    except ConnectionResetError:
        return b"reset"


async def drip(served: Served, first: bytes, piece: bytes, every: float, count: int) -> bytes:
    """Send `first`, then `piece` each `every` seconds until the server answers or closes."""
    reader, writer = await served.open()
    try:
        writer.write(first)
        answer = b""
        for _ in range(count):
            answer = await answered_within(reader, every)
            if answer:
                break
            writer.write(piece)
        return answer + await read_until_closed(reader, HEADER_TIMEOUT + SLACK)
    finally:
        writer.close()


async def drip_headers(served: Served, every: float, count: int) -> tuple[bytes, float]:
    """A request line, then one header each `every` seconds; the answer and its delay."""
    started = time.monotonic()
    first = b"GET /health/live HTTP/1.1\r\nHost: shop.test\r\n"
    answer = await drip(served, first, b"X-Drip: aaaaaaaaaa\r\n", every, count)
    return answer, time.monotonic() - started


async def test_headers_dripped_past_the_header_timeout_get_408(served: Served) -> None:
    answer, took = await drip_headers(served, every=0.2, count=40)
    assert_problem(answer, 408, "timeout")
    assert HEADER_TIMEOUT * 0.9 <= took <= HEADER_TIMEOUT + SLACK


async def test_a_head_too_slow_is_timed_as_long_as_it_was_given(served: Served) -> None:
    async def unmatched_seconds() -> float:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{served.port}/metrics")).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = {"method": "GET", "route": "unmatched"}
                if s.name == "pglayer_http_request_duration_seconds_sum" and s.labels == labels:
                    return s.value
        return 0.0

    before = await unmatched_seconds()
    answer, _ = await drip_headers(served, every=0.2, count=40)
    assert_problem(answer, 408, "timeout")
    assert await unmatched_seconds() - before == pytest.approx(HEADER_TIMEOUT)


async def test_fifty_dripping_connections_are_all_closed(served: Served) -> None:
    results = await asyncio.gather(*(drip_headers(served, 0.3, 40) for _ in range(50)))
    for answer, took in results:
        assert parse(answer)[0] == 408
        assert took <= HEADER_TIMEOUT + 2 * SLACK
    async with httpx.AsyncClient() as client:
        live = await client.get(f"http://127.0.0.1:{served.port}/health/live")
    assert live.status_code == 200


async def test_headers_that_arrive_in_time_are_served_however_slowly(served: Served) -> None:
    reader, writer = await served.open()
    try:
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: shop.test\r\n")
        for _ in range(3):
            await asyncio.sleep(0.1)
            writer.write(b"X-Slow: yes\r\n")
        writer.write(b"Connection: close\r\n\r\n")
        answer = await read_until_closed(reader, SLACK)
    finally:
        writer.close()
    assert parse(answer)[0] == 200


async def test_an_idle_keep_alive_connection_is_not_a_slow_request(served: Served) -> None:
    reader, writer = await served.open()
    request = b"GET /health/live HTTP/1.1\r\nHost: shop.test\r\n\r\n"
    try:
        for _ in range(2):
            writer.write(request)
            async with asyncio.timeout(SLACK):
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers, _ = parse(head)
                await reader.readexactly(int(headers["content-length"]))
            assert status == 200
            await asyncio.sleep(HEADER_TIMEOUT * 1.5)  # past the header timeout, idle
    finally:
        writer.close()


@pytest.mark.parametrize(
    "head",
    [
        b"X-Big: " + b"a" * (1 << 20) + b"\r\n",  # 1 MiB in one header
        b"".join(b"X-Many-%d: %s\r\n" % (i, b"b" * 90) for i in range(200)),  # 20 KB in 200
    ],
    ids=["one-huge-header", "many-headers"],
)
async def test_headers_over_the_size_bound_get_431(served: Served, head: bytes) -> None:
    reader, writer = await served.open()
    try:
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: shop.test\r\n")
        for start in range(0, len(head), 4096):  # in pieces, as a network delivers it
            if reader.at_eof():
                break
            writer.write(head[start : start + 4096])
            try:
                await writer.drain()
            except ConnectionError:
                break
        if not reader.at_eof():
            writer.write(b"\r\n")
        answer = await read_until_closed(reader, SLACK)
    finally:
        writer.close()
    assert_problem(answer, 431, "payload_too_large")


async def test_a_head_over_the_bound_whose_last_read_is_tiny_gets_431(served: Served) -> None:
    # All but the blank line in one read, then the blank line alone: the head ends in a read
    # of two bytes, and its size is the reads before it.
    reader, writer = await served.open()
    try:
        fill = b"".join(b"X-Many-%d: %s\r\n" % (i, b"b" * 90) for i in range(200))
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: shop.test\r\n" + fill)
        await writer.drain()
        await asyncio.sleep(0.3)  # read by the server before the rest arrives
        writer.write(b"\r\n")
        answer = await read_until_closed(reader, SLACK)
    finally:
        writer.close()
    assert_problem(answer, 431, "payload_too_large")


@pytest.mark.parametrize(
    "head",
    [
        b"FOO\x01 /users HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        b"GET /users HTTP/1.1\r\nHost: shop.test\r\nContent-Length: -1\r\n\r\n",
        b"POST /users HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
        b"GET /users/\x1b HTTP/1.1\r\nHost: shop.test\r\n\r\n",
    ],
    ids=["method", "negative-length", "two-lengths", "escape-in-path"],
)
async def test_a_request_the_parser_rejects_gets_a_400_problem(served: Served, head: bytes) -> None:
    answer = await send_head(served, head)
    assert_problem(answer, 400, "validation_error")


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (b"FOO /users/1 HTTP/1.1\r\nHost: s\r\n\r\n", 405, "method_not_allowed"),
        (b"get /users/1 HTTP/1.1\r\nHost: s\r\n\r\n", 405, "method_not_allowed"),
        (b"FOO /no/such/path HTTP/1.1\r\nHost: s\r\n\r\n", 404, "not_found"),
        (b"GET /users/1 HTTP/1.1\r\n\r\n", 400, "validation_error"),
        (b"GET /users/1 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "validation_error"),
        (b"GET /users/1#top HTTP/1.1\r\nHost: s\r\n\r\n", 400, "validation_error"),
        (b"GET /users/1 HTTP/2.0\r\nHost: s\r\n\r\n", 505, "validation_error"),
        (b"GET /users/1 HTTP/1.2\r\nHost: s\r\n\r\n", 505, "validation_error"),
        (b"GET /users/1 HTTP/1.1\r\nHost: a, b\r\n\r\n", 400, "validation_error"),
        (b"GET /users/1 HTTP/1.1\r\nHost: user@evil\r\n\r\n", 400, "validation_error"),
        (b"GET /users/1 HTTP/1.1\r\nHost: x:99999\r\n\r\n", 400, "validation_error"),
        (b"GET * HTTP/1.1\r\nHost: s\r\n\r\n", 400, "validation_error"),
        (b"CONNECT s:443 HTTP/1.1\r\nHost: s:443\r\n\r\n", 501, "method_not_allowed"),
        (
            b"POST /users HTTP/1.0\r\nHost: s\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            400,
            "validation_error",
        ),
        (
            b"POST /users HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            501,
            "unsupported_media_type",
        ),
    ],
    ids=["unknown-method", "lower-case-method", "unknown-method-no-route", "no-host",
         "two-hosts", "fragment", "http-2.0", "http-1.2", "host-list", "host-user", "host-port",
         "asterisk", "connect", "http-1.0-chunked", "gzip-coding"],
)  # fmt: skip
async def test_a_head_http_1_1_does_not_allow_is_refused(
    served: Served, head: bytes, status: int, code: str
) -> None:
    answer = await send_head(served, head)
    assert_problem(answer, status, code)
    if status == 405:  # a method the parser does not know: the path's own methods
        assert b"\r\nallow: GET, HEAD\r\n" in answer, answer


async def test_a_refused_head_whose_body_the_parser_then_refuses_is_answered_once(
    served: Served,
) -> None:
    # The coding is refused where the head ends; the parser then fails on the body that
    # follows in the same read, and its 400 must not be written after the first answer.
    before = served.log.read_text()
    answer = await send_head(
        served,
        b"POST /users HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: xchunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    assert_problem(answer, 501, "unsupported_media_type")
    assert answer.count(b"HTTP/1.1 ") == 1
    await asyncio.sleep(0.2)
    logged = served.log.read_text()[len(before) :]
    assert "Traceback" not in logged, logged
    assert "Invalid HTTP request received" not in logged, logged  # answered and logged here


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /users/1 HTTP/1.2\r\nHost: a\r\nX-Request-ID: mine-1\r\n\r\n", 505),
        (b"FOO /users/1 HTTP/1.1\r\nHost: a\r\nX-Request-ID: mine-1\r\n\r\n", 405),
        (
            b"POST /users HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\nx-request-id:  mine-1 \r\n\r\n{}",
            400,
        ),
    ],
    ids=["version", "method", "framing"],
)
async def test_a_head_the_parser_refuses_keeps_the_clients_request_id(
    served: Served, head: bytes, status: int
) -> None:
    got, headers, _ = parse(await send_head(served, head))
    assert (got, headers["x-request-id"]) == (status, "mine-1")


async def test_an_http_1_0_request_needs_no_host(served: Served) -> None:
    answer = await send_head(served, b"GET /health/live HTTP/1.0\r\n\r\n")
    assert parse(answer)[0] == 200, answer[:300]


async def test_headers_under_the_size_bound_are_served(served: Served) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"http://127.0.0.1:{served.port}/health/live",
            headers={"X-Fill": "c" * (MAX_HEADER_SIZE - 1024)},
        )
    assert response.status_code == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_that_does_not_arrive_in_time_gets_408(served: Served, chunked: bool) -> None:
    head = b"POST /users HTTP/1.1\r\nHost: shop.test\r\nContent-Type: application/json\r\n"
    started = time.monotonic()
    if chunked:  # a byte every 0.2 s: never done in time
        first = head + b"Transfer-Encoding: chunked\r\n\r\n"
        answer = await drip(served, first, b"1\r\n \r\n", 0.2, 40)
    else:
        answer = await drip(served, head + b'Content-Length: 100\r\n\r\n{"name": ', b"", 1, 0)
    assert_problem(answer, 408, "timeout")
    assert BODY_TIMEOUT * 0.9 <= time.monotonic() - started <= BODY_TIMEOUT + SLACK


async def test_a_body_that_arrives_in_time_is_served(served: Served) -> None:
    reader, writer = await served.open()
    body = orjson.dumps({"name": "Slow", "email": "slow@example.com"})
    try:
        writer.write(
            b"POST /users HTTP/1.1\r\nHost: shop.test\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for start in range(0, len(body), 10):
            await asyncio.sleep(0.05)
            writer.write(body[start : start + 10])
        answer = await read_until_closed(reader, SLACK)
    finally:
        writer.close()
    assert parse(answer)[0] == 201, answer


async def test_serve_logs_no_second_access_line_from_uvicorn(served: Served) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{served.port}/health/live")).is_success
    await asyncio.sleep(0.1)
    assert "uvicorn.access" not in served.log.read_text()


async def test_a_refusal_from_the_server_is_counted_as_the_apps_requests_are(
    served: Served,
) -> None:
    def count(text: str, status: str) -> float:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = {"method": "GET", "route": "unmatched", "status": status}
                if s.name == "pglayer_http_requests_total" and s.labels == labels:
                    return s.value
        return 0.0

    url = f"http://127.0.0.1:{served.port}/metrics"
    async with httpx.AsyncClient() as client:
        before = count((await client.get(url)).text, "400")
        for _ in range(3):
            answer = await send_head(served, b"GET /users/1 HTTP/1.1\r\n\r\n")  # no Host
            assert_problem(answer, 400, "validation_error")
        after = count((await client.get(url)).text, "400")
    assert after - before == 3


def test_a_request_line_the_parser_refused_is_accounted_by_its_method() -> None:
    got: list[tuple[bytes, bytes, int]] = []

    class Door:
        def account_refused(self, method: bytes, url: bytes, status: int, *_: object) -> None:
            got.append((method, url, status))

    protocol = BoundedHttpToolsProtocol.__new__(BoundedHttpToolsProtocol)
    protocol._door, protocol._last_read = Door(), b"FOO /users/1 HTTP/1.1\r\nHost: s\r\n\r\n"
    protocol._account(501, "id")  # the parser stopped at the method: both from the read
    assert got == [(b"FOO", b"/users/1", 501)]


async def test_a_refusal_from_the_server_keeps_the_clients_request_id(served: Served) -> None:
    head = b"GET /users/1 HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Request-ID: mine-42\r\n\r\n"
    status, headers, _ = parse(await send_head(served, head))
    assert (status, headers["x-request-id"]) == (400, "mine-42")


async def test_an_absolute_form_target_is_served(served: Served) -> None:
    head = b"GET http://s/health/live HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    assert parse(await send_head(served, head))[0] == 200


async def test_an_upgrade_to_a_protocol_not_spoken_is_ignored_and_the_body_kept(
    served: Served,
) -> None:
    base = f"http://127.0.0.1:{served.port}"
    async with httpx.AsyncClient() as client:
        user = (await client.post(f"{base}/users", json={"name": "U", "email": "up@x.io"})).json()
    body = b'{"amount":"1.00"}'
    head = (
        f"POST /accounts/{user['id']}/deposits HTTP/1.1\r\nHost: s\r\n"
        "Connection: Upgrade, close\r\nUpgrade: h2c\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    status, _, answer = parse(await send_head(served, head + body))
    assert (status, orjson.loads(answer)["balance"]) == (200, "1.00")
    pipelined = (
        b"GET /health/live HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n"
        b"GET /health/live HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    )
    assert (await send_head(served, pipelined)).count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.parametrize(
    ("cancelled", "said"),
    [
        (  # uvicorn's own cancel, when its graceful shutdown times out
            asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded"),
            "a request was cancelled: the shutdown's grace ran out",
        ),
        (asyncio.CancelledError(), "a request was cancelled: the server quit at once"),
    ],
)
def test_a_request_cancelled_at_shutdown_is_one_line_not_a_traceback(
    cancelled: asyncio.CancelledError, said: str
) -> None:
    try:
        raise cancelled
    except asyncio.CancelledError:
        record = logging.LogRecord(
            "uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application\n",
            (), sys.exc_info(),
        )  # fmt: skip
    assert _AnsweredHere().filter(record)
    assert record.getMessage() == said
    assert (record.exc_info, record.levelname) == (None, "WARNING")


class _Door:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, bytes, int]] = []

    def allowed(self, url: bytes) -> str:
        return "GET, HEAD" if url.startswith(b"/users/") else ""

    def account_refused(self, method: bytes, url: bytes, status: int, *_: object) -> None:
        self.got.append((method, url, status))


def _refusing(read: bytes) -> tuple[BoundedHttpToolsProtocol, _Door]:
    protocol = BoundedHttpToolsProtocol.__new__(BoundedHttpToolsProtocol)
    door = _Door()
    protocol._door, protocol._last_read = door, read
    return protocol, door


def test_an_unknown_method_is_accounted_with_its_path() -> None:
    protocol, door = _refusing(b"FOO /users/1 HTTP/1.1\r\nHost: s\r\n\r\n")
    head, _ = protocol._unknown_method(4)
    assert head.startswith(b"HTTP/1.1 405 ")
    protocol._account(405, "id")
    assert door.got == [(b"FOO", b"/users/1", 405)]


def test_an_unknown_method_pipelined_behind_a_request_gets_no_other_paths_allow() -> None:
    # The read begins with the request the parser took; the refused one's target is not
    # at hand, so the answer names no methods rather than the first request's.
    protocol, _ = _refusing(b"GET /users/1 HTTP/1.1\r\nHost: s\r\n\r\nFOO /x HTTP/1.1\r\n\r\n")
    head, _ = protocol._unknown_method(4)
    assert head.startswith(b"HTTP/1.1 501 ")


WS_HEAD = (
    "Host: s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


@pytest.mark.parametrize(
    "head",
    [
        f"POST /users HTTP/1.1\r\n{WS_HEAD}Content-Type: application/json\r\n"
        "Content-Length: 2\r\n\r\n{}",
        f"GET /users/1 HTTP/1.1\r\n{WS_HEAD}Content-Length: 2\r\n\r\n{{}}",
        f"PUT /users/1 HTTP/1.1\r\n{WS_HEAD}Transfer-Encoding: chunked\r\n\r\n"
        "2\r\n{}\r\n0\r\n\r\n",
    ],
    ids=["post", "get-with-body", "put-chunked"],
)
async def test_a_websocket_handshake_with_a_body_gets_a_400(served: Served, head: str) -> None:
    # It was never answered, nor timed out: the upgrade stops the head and body timers.
    answer = await asyncio.wait_for(send_head(served, head.encode()), 5)
    assert_problem(answer, 400, "validation_error")


async def test_a_body_whose_trailers_go_on_and_on_gets_413(served: Served) -> None:
    # Trailers are bound by neither the header nor the body bound, and cost the parser
    # quadratic CPU (100 MB: 11 s of the event loop).
    head = (
        b"POST /users HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: "
    )
    answer = await asyncio.wait_for(send_head(served, head + b"t" * 6_000_000), 10)
    assert_problem(answer, 413, "payload_too_large")
