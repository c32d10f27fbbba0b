"""The HTTP surface as CONTRACT.md states it: bodies, methods, ids, money, errors, OpenAPI.

One app and one database for the module: these tests read and create their own rows only.
"""

from __future__ import annotations

import gzip
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from pglayer import Database
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings
from tests.conftest import Server, asgi_client, settings_for
from tests.test_shop_users import assert_problem

TOKEN = "surface-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_ID = 2**63 - 1
MONEY_PATTERN = r"^[0-9]+(\.[0-9]{1,2})?$"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
async def surface_db(
    server: Server, admin: asyncpg.Connection[Any], template: str
) -> AsyncIterator[Database]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        async with Database(settings_for(server.url_for(name))) as database:
            yield database
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
async def http(surface_db: Database) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(db=surface_db, settings=ShopSettings(admin_token=TOKEN))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        yield client


async def new_user(http: httpx.AsyncClient, deposit: str | None = None) -> int:
    email = f"{uuid.uuid4().hex[:12]}@example.com"
    response = await http.post("/users", json={"name": "Surface", "email": email})
    assert response.status_code == 201, response.text
    user_id = int(response.json()["id"])
    if deposit is not None:
        r = await http.post(f"/accounts/{user_id}/deposits", json={"amount": deposit})
        assert r.status_code == 200, r.text
    return user_id


async def balance(http: httpx.AsyncClient, user_id: int) -> Decimal:
    return Decimal((await http.get(f"/accounts/{user_id}")).json()["balance"])


@pytest.fixture(scope="module")
async def rows(http: httpx.AsyncClient) -> dict[str, int]:
    """One of each resource, for routes that need an existing id."""
    user = await new_user(http, "100.00")
    other = await new_user(http)
    product = await http.post("/products", json={"name": "P", "price": "1.00", "stock": 50})
    assert product.status_code == 201, product.text
    product_id = int(product.json()["id"])
    order = await http.post("/orders", json={"user_id": user, "product_id": product_id,
                                             "quantity": 1})  # fmt: skip
    assert order.status_code == 201, order.text
    transfer = await http.post(
        "/transfers", json={"from_user_id": user, "to_user_id": other, "amount": "1.00"}
    )
    assert transfer.status_code == 201, transfer.text
    return {
        "user": user,
        "product": product_id,
        "order": int(order.json()["id"]),
        "transfer": int(transfer.json()["id"]),
    }


# -- 9: bodies that are not JSON, or not sent as JSON ------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        pytest.param(b'{"amount": "1.00\xff"}', "UTF-8", id="bad-utf8"),
        pytest.param(b'{"amount": "\xed\xa0\x80"}', "UTF-8", id="utf8-surrogate"),
        pytest.param(b'{"amount": "1.00",}', "not valid JSON", id="trailing-comma"),
        pytest.param(b'{"amount": x}', "not valid JSON", id="syntax"),
        pytest.param(b'{"amount": NaN}', "not valid JSON", id="nan"),
        pytest.param(b'{"amount": "\\ud800"}', "not valid JSON", id="lone-surrogate-escape"),
        pytest.param(b'{"amount": "1.00"} {}', "not valid JSON", id="extra-data"),
        pytest.param(b"\xef\xbb\xbf{}", "not valid JSON", id="bom"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested", id="nested-100000"),
        pytest.param(b'{"amount": ' + b"[" * 64 + b"]" * 64 + b"}", "nested", id="nested-65"),
        pytest.param(b'{"a":' * 65 + b"1" + b"}" * 65, "nested", id="objects-65"),
        pytest.param(b'{"amount": ' + b"1" * 5000 + b"}", "number", id="huge-integer"),
    ],
)
async def test_a_body_that_is_not_valid_json_is_422_saying_why(
    http: httpx.AsyncClient, rows: dict[str, int], body: bytes, says: str
) -> None:
    response = await http.post(f"/accounts/{rows['user']}/deposits", content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation_error")
    assert says in problem["detail"], problem["detail"]
    assert problem["errors"], problem
    assert problem["errors"][0]["loc"][0] == "body"


async def test_a_syntax_error_names_its_byte(http: httpx.AsyncClient, rows: dict[str, int]) -> None:
    response = await http.post(
        f"/accounts/{rows['user']}/deposits", content='{"ñame": x}'.encode(), headers=JSON
    )
    problem = assert_problem(response, 422, "validation_error")
    assert "at byte 10" in problem["detail"], problem["detail"]


async def test_nesting_of_64_levels_is_still_json(
    http: httpx.AsyncClient, rows: dict[str, int]
) -> None:
    body = b'{"amount": ' + b"[" * 63 + b"]" * 63 + b"}"
    response = await http.post(f"/accounts/{rows['user']}/deposits", content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["body", "amount"], problem


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/json; charset=latin-1",
        None,
    ],
)
async def test_a_body_not_sent_as_json_is_415(
    http: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    body = orjson.dumps({"name": "Ada", "email": f"{uuid.uuid4().hex}@example.com"})
    response = await http.post("/users", content=body, headers=headers)
    assert_problem(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "identity"])
async def test_any_content_encoding_is_415(http: httpx.AsyncClient, encoding: str) -> None:
    body = orjson.dumps({"name": "Ada", "email": f"{uuid.uuid4().hex}@example.com"})
    if encoding == "gzip":
        body = gzip.compress(body)
    response = await http.post(
        "/users", content=body, headers={**JSON, "content-encoding": encoding}
    )
    assert_problem(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
async def test_json_content_types_are_accepted(http: httpx.AsyncClient, content_type: str) -> None:
    body = orjson.dumps({"name": "Ada", "email": f"{uuid.uuid4().hex}@example.com"})
    response = await http.post("/users", content=body, headers={"content-type": content_type})
    assert response.status_code == 201, response.text


# -- 10: methods, Allow and HEAD ---------------------------------------------------------------

ALLOWED = {
    "/users": {"GET", "HEAD", "POST"},
    "/products": {"GET", "HEAD", "POST"},
    "/users/{user}": {"GET", "HEAD"},
    "/users/{user}/orders": {"GET", "HEAD"},
    "/products/{product}": {"GET", "HEAD"},
    "/orders": {"POST"},
    "/orders/{order}": {"GET", "HEAD"},
    "/accounts/{user}": {"GET", "HEAD"},
    "/accounts/{user}/deposits": {"POST"},
    "/transfers": {"POST"},
    "/transfers/{transfer}": {"GET", "HEAD"},
    "/dashboard/{user}": {"GET", "HEAD"},
    "/admin/db-stats": {"GET", "HEAD"},
    "/health/live": {"GET", "HEAD"},
    "/health/ready": {"GET", "HEAD"},
    "/metrics": {"GET", "HEAD"},
    "/openapi.json": {"GET", "HEAD"},
}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@pytest.mark.parametrize(
    ("path", "method"),
    [(path, m) for path, allowed in ALLOWED.items() for m in METHODS if m not in allowed],
)
async def test_an_unsupported_method_is_405_allowing_every_method_of_the_path(
    http: httpx.AsyncClient, rows: dict[str, int], path: str, method: str
) -> None:
    response = await http.request(method, path.format(**rows), headers=AUTH)
    assert_problem(response, 405, "method_not_allowed")
    allow = {m.strip() for m in response.headers["allow"].split(",")}
    assert allow == ALLOWED[path]


@pytest.mark.parametrize("path", [path for path, allowed in ALLOWED.items() if "GET" in allowed])
async def test_head_answers_as_get_does_without_a_body(
    http: httpx.AsyncClient, rows: dict[str, int], path: str
) -> None:
    url = path.format(**rows)
    got = await http.get(url, headers=AUTH)
    head = await http.head(url, headers=AUTH)
    assert head.status_code == got.status_code == 200, (head.status_code, got.text)
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    if path != "/metrics":  # its counters move between the two requests
        assert head.headers["content-length"] == got.headers["content-length"]


async def test_head_on_a_path_without_get_is_405(http: httpx.AsyncClient) -> None:
    response = await http.head("/orders")
    assert response.status_code == 405
    assert response.content == b""
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"POST"}


# -- 14: error lists are bounded, and so is the work behind them ---------------------------------


def unknown_keys_body(size: int) -> tuple[bytes, int]:
    """`{"amount": "1.00", <unknown keys>...}` of at most `size` bytes; and how many keys."""
    parts = [b'{"amount":"1.00"']
    total = len(parts[0]) + 1
    count = 0
    while True:
        item = b',"%x":0' % count
        if total + len(item) > size:
            break
        parts.append(item)
        total += len(item)
        count += 1
    return b"".join([*parts, b"}"]), count


async def test_errors_are_capped_at_20_and_the_detail_counts_them(
    http: httpx.AsyncClient, rows: dict[str, int]
) -> None:
    body, count = unknown_keys_body(2000)
    response = await http.post(f"/accounts/{rows['user']}/deposits", content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation_error")
    assert count > 20
    assert len(problem["errors"]) == 20
    assert str(count) in problem["detail"], problem["detail"]


async def test_a_mib_of_unknown_keys_gets_a_small_422_for_little_cpu(
    http: httpx.AsyncClient, rows: dict[str, int]
) -> None:
    body, count = unknown_keys_body(1 << 20)
    assert count > 100_000
    started = time.process_time()
    response = await http.post(f"/accounts/{rows['user']}/deposits", content=body, headers=JSON)
    cpu = time.process_time() - started
    problem = assert_problem(response, 422, "validation_error")
    assert len(response.content) <= 16 * 1024
    assert str(count) in problem["detail"], problem["detail"]
    assert cpu < 0.3, f"{cpu:.3f} s of CPU"  # 1.1 s before the bound on this machine


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"amount": "1.00", "k" * 100_000: 1}, id="long-unknown-key"),
        pytest.param({"amount": "x" * 500_000}, id="long-value"),
        pytest.param({"amount": {"k" * 50_000 + str(i): 1 for i in range(15)}}, id="long-keys"),
        pytest.param({"k" * 40_000 + str(i): 1 for i in range(25)}, id="many-long-keys"),
        pytest.param([{"x" * 30_000: 1}] * 30, id="list"),
    ],
)
async def test_no_error_response_exceeds_16_kib_or_echoes_input_at_length(
    http: httpx.AsyncClient, rows: dict[str, int], body: Any
) -> None:
    response = await http.post(f"/accounts/{rows['user']}/deposits", json=body)
    assert_problem(response, 422, "validation_error")
    assert len(response.content) <= 16 * 1024, len(response.content)
    assert "x" * 300 not in response.text
    assert "k" * 300 not in response.text


async def test_a_long_user_name_is_not_echoed(http: httpx.AsyncClient) -> None:
    response = await http.post("/users", json={"name": "n" * 900_000, "email": "x"})
    assert_problem(response, 422, "validation_error")
    assert len(response.content) <= 16 * 1024
    assert "n" * 300 not in response.text


# -- 15: duplicate keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"amount":"-5.00","amount":"2.00"}', id="flat"),
        pytest.param(b'{"amount":"2.00", "amount" : "2.00"}', id="same-value"),
        pytest.param(b'{"amount":"2.00","note:":"a:b","amount":"3.00"}', id="colons-in-strings"),
    ],
)
async def test_duplicate_keys_are_422(http: httpx.AsyncClient, body: bytes) -> None:
    user = await new_user(http)
    response = await http.post(f"/accounts/{user}/deposits", content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation_error")
    assert "duplicate" in problem["detail"], problem["detail"]
    assert await balance(http, user) == 0


async def test_duplicate_keys_in_a_user_body_are_422(http: httpx.AsyncClient) -> None:
    email = f"{uuid.uuid4().hex}@example.com"
    body = f'{{"name":"A: b","email":"{email}","name":"C"}}'.encode()
    response = await http.post("/users", content=body, headers=JSON)
    assert_problem(response, 422, "validation_error")
