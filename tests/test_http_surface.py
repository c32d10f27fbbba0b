"""The HTTP surface as CONTRACT.md states it: bodies, methods, ids, money, errors, OpenAPI.

One app and one database for the module: these tests read and create their own rows only.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
import uuid
from collections.abc import AsyncIterator, MutableMapping
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings

from pglayer import Database, InvalidInputError
from pglayer.fastapi import Cursors, _bodies, health_router, setup
from tests.conftest import LiveServer, Server, asgi_client, settings_for
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
async def surface_app(surface_db: Database) -> AsyncIterator[FastAPI]:
    app = create_app(db=surface_db, settings=ShopSettings(admin_token=TOKEN))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture(scope="module")
async def http(surface_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(surface_app) as client:
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
        pytest.param(
            b'{"amount": 1e999, "x": NaN}', "not valid JSON", id="nan-after-a-huge-number"
        ),
        pytest.param(
            b'{"amount": 1e999, "x": "\\ud800"}', "surrogate", id="surrogate-after-a-huge-number"
        ),
        pytest.param(
            b'{"a": 1e999, "b": ' + b"[" * 65 + b"]" * 65 + b"}",
            "nested",
            id="nested-after-a-huge-number",
        ),
        pytest.param(b'{"amount": "\\ud800"}', "not valid JSON", id="lone-surrogate-escape"),
        pytest.param(b'{"amount": "1.00"} {}', "not valid JSON", id="extra-data"),
        pytest.param(b"\xef\xbb\xbf{}", "not valid JSON", id="bom"),
        pytest.param(b"[" * 9_000 + b"]" * 9_000, "nested", id="nested-9000"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "10,000", id="nested-100000"),
        pytest.param(b'{"amount": ' + b"[" * 64 + b"]" * 64 + b"}", "nested", id="nested-65"),
        pytest.param(b'{"a":' * 65 + b"1" + b"}" * 65, "nested", id="objects-65"),
        pytest.param(b'{"amount": ' + b"1" * 5000 + b"}", "number", id="huge-integer"),
        # Its cost is per object: a MiB of them took the event loop 0.3-0.5 s.
        pytest.param(b"[" + b",".join([b"{}"] * 10_001) + b"]", "10,000", id="objects-10001"),
        pytest.param(
            b"[1e999," + b",".join([b"[]"] * 10_001) + b"]", "10,000", id="arrays-after-1e999"
        ),
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


async def test_ten_thousand_objects_are_still_json(
    http: httpx.AsyncClient, rows: dict[str, int]
) -> None:
    body = b'{"amount": [' + b",".join([b"{}"] * 9_998) + b"]}"
    response = await http.post(f"/accounts/{rows['user']}/deposits", content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["body", "amount"], problem


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
        "application/+json",
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


@pytest.mark.parametrize(
    "types", [["text/plain", "application/json"], ["application/json", "text/plain"]]
)
async def test_two_content_types_are_415_whichever_comes_first(
    http: httpx.AsyncClient, types: list[str]
) -> None:
    # The request layer read the last, FastAPI the first: 422 one way, 415 the other.
    body = orjson.dumps({"name": "Ada", "email": f"{uuid.uuid4().hex}@example.com"})
    headers = [("content-type", t) for t in types]
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


async def test_head_through_uvicorn_keeps_the_headers_of_get(
    surface_app: FastAPI, rows: dict[str, int]
) -> None:
    async with LiveServer(surface_app) as live, httpx.AsyncClient(base_url=live.url) as client:
        for path in (f"/users/{rows['user']}", "/users?limit=2", "/orders"):
            got, head = await client.get(path), await client.head(path)
            assert head.status_code == got.status_code, path
            assert head.content == b""
            assert head.headers["content-length"] == got.headers["content-length"], path


# -- 11: ids and limits in canonical decimal only ----------------------------------------------

NON_CANONICAL = ["1_0", "1.0", "+7", "01", "%201", "1%20", "0", "-1", "1e3", str(2**63),
                 "\u0663", "\uff11", "0x1", "abc", "10.00"]  # fmt: skip
ID_ROUTES = [
    ("GET", "/users/{}"),
    ("GET", "/users/{}/orders"),
    ("GET", "/accounts/{}"),
    ("POST", "/accounts/{}/deposits"),
    ("GET", "/products/{}"),
    ("GET", "/orders/{}"),
    ("GET", "/transfers/{}"),
    ("GET", "/dashboard/{}"),
]


@pytest.mark.parametrize(("method", "route"), ID_ROUTES)
@pytest.mark.parametrize("bad_id", NON_CANONICAL)
async def test_a_path_id_not_in_canonical_decimal_is_422(
    http: httpx.AsyncClient, method: str, route: str, bad_id: str
) -> None:
    body = {"amount": "1.00"} if method == "POST" else None
    response = await http.request(method, route.format(bad_id), json=body)
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"][0] == "path", problem


@pytest.mark.parametrize("route", ["/users/{}", "/orders/{}", "/accounts/{}"])
async def test_the_largest_id_is_canonical(http: httpx.AsyncClient, route: str) -> None:
    assert_problem(await http.get(route.format(MAX_ID)), 404, "not_found")


@pytest.mark.parametrize(
    "limit", ["1.0", "%2B5", "05", "1_0", "%205", "5%20", "0", "101", "", "1e1", "\u0665"]
)
@pytest.mark.parametrize("route", ["/users", "/products", "/users/{user}/orders"])
async def test_a_limit_not_in_canonical_decimal_or_outside_1_to_100_is_422(
    http: httpx.AsyncClient, rows: dict[str, int], route: str, limit: str
) -> None:
    response = await http.get(f"{route.format(**rows)}?limit={limit}")
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["query", "limit"], problem


@pytest.mark.parametrize("limit", ["1", "100"])
async def test_limits_at_the_bounds_are_accepted(http: httpx.AsyncClient, limit: str) -> None:
    assert (await http.get(f"/users?limit={limit}")).status_code == 200


@pytest.mark.parametrize(
    "bad_id",
    ["1", 1.0, True, 2**63, pytest.param(10**400, id="400-digits"), 0, -1, 1e3, None, [1]],
)
@pytest.mark.parametrize("field", ["from_user_id", "to_user_id"])
async def test_a_body_id_must_be_a_json_integer_in_range(
    http: httpx.AsyncClient, rows: dict[str, int], field: str, bad_id: Any
) -> None:
    body: dict[str, Any] = {"from_user_id": rows["user"], "to_user_id": rows["user"] + 1,
                            "amount": "1.00"}  # fmt: skip
    body[field] = bad_id
    response = await http.post("/transfers", json=body)
    problem = assert_problem(response, 422, "validation_error")
    assert ["body", field] in [e["loc"] for e in problem["errors"]], problem


# -- 12: money in ASCII decimal only -------------------------------------------------------------

BAD_MONEY = ["\u0661\u0662", "\uff11", "\u0663.\u0665\u0660", "1.00\n", "\n1.00", " 1.00",
             "1.00 ", "1,00", "1.", ".5", "1e2", "+1", "-1", "1.001", "0x1", "", 12, 12.5,
             None]  # fmt: skip


@pytest.mark.parametrize("amount", BAD_MONEY)
async def test_a_deposit_amount_outside_ascii_decimal_is_422(
    http: httpx.AsyncClient, amount: Any
) -> None:
    user = await new_user(http)
    response = await http.post(f"/accounts/{user}/deposits", json={"amount": amount})
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["body", "amount"], problem
    assert await balance(http, user) == 0


@pytest.mark.parametrize("price", ["\u0663.\u0665\u0660", "3.50\n", "\uff13"])
async def test_a_product_price_outside_ascii_decimal_is_422(
    http: httpx.AsyncClient, price: str
) -> None:
    response = await http.post("/products", json={"name": "P", "price": price, "stock": 1})
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["body", "price"], problem


@pytest.mark.parametrize(("amount", "credited"), [("12", "12.00"), ("0.5", "0.50"),
                                                  ("1000000", "1000000.00")])  # fmt: skip
async def test_ascii_decimal_amounts_are_credited_exactly(
    http: httpx.AsyncClient, amount: str, credited: str
) -> None:
    user = await new_user(http)
    response = await http.post(f"/accounts/{user}/deposits", json={"amount": amount})
    assert response.status_code == 200, response.text
    assert response.json()["balance"] == credited


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


# -- 17: Idempotency-Key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["ключ".encode(), "café".encode(), b"caf\xe9", b"\x01abc", b"a\tb", b"a\x7fb", b"k" * 201],
)
async def test_an_idempotency_key_outside_printable_ascii_is_422(
    http: httpx.AsyncClient, rows: dict[str, int], key: bytes
) -> None:
    body = {"user_id": rows["user"], "product_id": rows["product"], "quantity": 1}
    response = await http.post("/orders", json=body, headers={b"Idempotency-Key": key})
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["header", "Idempotency-Key"], problem


@pytest.mark.parametrize("key", ["a b ~!", "K" * 200, "x"])
async def test_printable_ascii_idempotency_keys_are_accepted(
    http: httpx.AsyncClient, rows: dict[str, int], key: str
) -> None:
    body = {"user_id": rows["user"], "product_id": rows["product"], "quantity": 1}
    key = f"{key[:-1]}{uuid.uuid4().hex[:1]}"
    response = await http.post("/orders", json=body, headers={"Idempotency-Key": key})
    assert response.status_code == 201, response.text


# -- 18: 422s found by the database name their field --------------------------------------------


ORDERS_OF = "orders of user {user}"


@pytest.mark.parametrize(
    ("route", "of", "key"),
    [
        ("/users", "users", [2**63]),
        ("/users", "users", [-1]),
        ("/products", "products", [0]),
        ("/users/{user}/orders", ORDERS_OF, ["2024-01-01T00:00:00+00:00", 2**63]),
        ("/users/{user}/orders", ORDERS_OF, ["2024-01-01T00:00:00+00:00", -5]),
        ("/users/{user}/orders", ORDERS_OF, ["0001-01-01T00:00:00", 1]),
        ("/users/{user}/orders", ORDERS_OF, ["0001-01-01T00:00:00+14:00", 1]),
        ("/users/{user}/orders", ORDERS_OF, ["9999-12-31T23:59:59-14:00", 1]),
    ],
)
async def test_a_signed_cursor_that_decodes_to_nonsense_is_422_naming_after(
    http: httpx.AsyncClient, surface_db: Database, rows: dict[str, int], route: str, of: str,
    key: list[Any],
) -> None:  # fmt: skip
    cursors = await Cursors.from_database(surface_db)  # the secret the shop signs with
    after = cursors.encode(*key, of=of.format(**rows))
    response = await http.get(route.format(**rows), params={"after": after})
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["query", "after"], problem


async def test_a_cursor_edited_by_hand_is_422_naming_after(
    http: httpx.AsyncClient, rows: dict[str, int]
) -> None:
    page = (await http.get("/users", params={"limit": 1})).json()
    cursor = page["next_cursor"]
    unsigned = base64.urlsafe_b64encode(json.dumps([1]).encode()).decode().rstrip("=")
    for edited in (unsigned, cursor[:5] + "!!" + cursor[5:], cursor + "==", cursor + "A"):
        response = await http.get("/users", params={"limit": 1, "after": edited})
        problem = assert_problem(response, 422, "validation_error")
        assert problem["errors"][0]["loc"] == ["query", "after"], edited
    assert (await http.get("/users", params={"limit": 1, "after": cursor})).status_code == 200


async def test_a_deposit_that_would_overflow_the_balance_is_422_naming_amount(
    http: httpx.AsyncClient, surface_db: Database
) -> None:
    user = await new_user(http)
    async with surface_db.connection() as conn:
        await conn.execute("UPDATE accounts SET balance = 999999999999.00 WHERE user_id = $1", user)
    response = await http.post(f"/accounts/{user}/deposits", json={"amount": "1000000"})
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["body", "amount"], problem
    assert await balance(http, user) == Decimal("999999999999.00")


async def test_a_transfer_that_would_overflow_the_balance_is_422_naming_amount(
    http: httpx.AsyncClient, surface_db: Database
) -> None:
    rich, full = await new_user(http), await new_user(http)
    async with surface_db.connection() as conn:
        await conn.execute("UPDATE accounts SET balance = 999999999999.00 WHERE user_id = $1", full)
        await conn.execute("UPDATE accounts SET balance = 10.00 WHERE user_id = $1", rich)
    response = await http.post(
        "/transfers", json={"from_user_id": rich, "to_user_id": full, "amount": "5.00"}
    )
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["body", "amount"], problem
    assert await balance(http, rich) == Decimal("10.00")


async def test_a_database_422_the_app_did_not_map_still_lists_errors(surface_db: Database) -> None:
    app = FastAPI()
    setup(app, surface_db)  # its lifespan is not run: the database is already open

    @app.get("/refused")
    async def refused() -> None:
        raise InvalidInputError(sqlstate="22003", column="balance")

    async with asgi_client(app) as client:
        problem = assert_problem(await client.get("/refused"), 422, "validation_error")
    said = "A value is not valid for its type."
    assert problem["detail"] == f"1 invalid value: {said}"  # every 422 says how many
    assert problem["errors"] == [{"loc": ["balance"], "msg": said, "type": "database_value_error"}]


# -- 19: OpenAPI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def spec_text(http: httpx.AsyncClient) -> str:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    return response.text


@pytest.fixture(scope="module")
def spec(spec_text: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(spec_text)
    return parsed


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def walk(node: Any) -> list[tuple[str, Any]]:
    """Every (key, value) pair in a JSON document."""
    out: list[tuple[str, Any]] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            out.extend(item.items())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


MONEY_FIELDS = [
    ("Deposit", "amount"),
    ("ProductCreate", "price"),
    ("TransferCreate", "amount"),
    ("Account", "balance"),
    ("Product", "price"),
    ("Order", "unit_price"),
    ("Order", "total"),
    ("Transfer", "amount"),
    ("Dashboard", "balance"),
]


@pytest.mark.parametrize(("model", "field"), MONEY_FIELDS)
def test_openapi_money_is_a_string_with_the_contract_pattern(
    spec: dict[str, Any], model: str, field: str
) -> None:
    schema = spec["components"]["schemas"][model]["properties"][field]
    assert schema["type"] == "string", schema
    assert schema["pattern"] == MONEY_PATTERN
    assert not {"anyOf", "gt", "ge", "lt", "le"} & schema.keys(), schema


def test_openapi_numbers_are_integers_in_the_json_text(
    spec_text: str, spec: dict[str, Any]
) -> None:
    assert "e+18" not in spec_text
    assert str(MAX_ID) in spec_text
    for key, value in walk(spec):
        if key in ("maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum"):
            assert type(value) is int, (key, value)


@pytest.mark.parametrize(
    ("model", "field"),
    [("OrderCreate", "user_id"), ("OrderCreate", "product_id"),
     ("TransferCreate", "from_user_id"), ("TransferCreate", "to_user_id")],
)  # fmt: skip
def test_openapi_body_ids_are_int64(spec: dict[str, Any], model: str, field: str) -> None:
    schema = spec["components"]["schemas"][model]["properties"][field]
    assert schema["type"] == "integer"
    assert schema["maximum"] == MAX_ID
    assert schema.get("minimum") == 1 or schema.get("exclusiveMinimum") == 0


def test_openapi_path_ids_and_limits_are_integers_with_bounds(spec: dict[str, Any]) -> None:
    seen = 0
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                schema = param["schema"]
                if param["in"] == "path" and param["name"] != "name":  # the page's files
                    assert schema["type"] == "integer", (path, schema)
                    assert schema["maximum"] == MAX_ID
                    assert schema["minimum"] == 1
                    seen += 1
                elif param["name"] == "limit":
                    assert (schema["type"], schema["minimum"], schema["maximum"]) == (
                        "integer", 1, 100,
                    )  # fmt: skip
    assert seen >= 8


def test_openapi_declares_the_admin_bearer_scheme(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    bearer = [n for n, s in schemes.items() if (s["type"], s.get("scheme")) == ("http", "bearer")]
    assert bearer, schemes
    operation = spec["paths"]["/admin/db-stats"]["get"]
    assert operation["security"] == [{bearer[0]: []}]
    assert not [p for p in operation.get("parameters", []) if p["name"].lower() == "authorization"]
    for path, operations in spec["paths"].items():
        if not path.startswith("/admin/"):
            assert all("security" not in op for op in operations.values()), path


def test_openapi_declares_the_headers_every_response_may_carry(spec: dict[str, Any]) -> None:
    expected = {"401": "WWW-Authenticate", "405": "Allow", "503": "Retry-After"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                headers = response.get("headers", {})
                assert "X-Request-ID" in headers, (path, method, status)
                if status in expected:
                    assert expected[status] in headers, (path, method, status)
    for path in ("/users", "/products", "/orders", "/transfers"):
        created = spec["paths"][path]["post"]["responses"]["201"]["headers"]
        assert "Location" in created, path
        assert ("Idempotent-Replayed" in created) == (path in ("/orders", "/transfers")), path


def test_openapi_bounds_ids_and_lists_in_responses(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    ids = [
        (name, field)
        for name in ("User", "Product", "Order", "Transfer", "Account")
        for field, schema in schemas[name]["properties"].items()
        if field == "id" or field.endswith("_id")
    ]
    assert len(ids) == 9
    for name, field in ids:
        schema = schemas[name]["properties"][field]
        assert (schema["type"], schema["minimum"], schema["maximum"]) == (
            "integer", 1, MAX_ID,
        ), (name, field)  # fmt: skip
    assert schemas["Dashboard"]["properties"]["recent_orders"]["maxItems"] == 20
    pages = [name for name in schemas if name.startswith("Page_")]
    assert len(pages) == 3
    assert {schemas[name]["properties"]["items"]["maxItems"] for name in pages} == {100}


def test_openapi_email_has_format_email(spec: dict[str, Any]) -> None:
    assert spec["components"]["schemas"]["UserCreate"]["properties"]["email"]["format"] == "email"
    assert spec["components"]["schemas"]["User"]["properties"]["email"]["format"] == "email"


def expected_statuses(path: str, method: str, operation: dict[str, Any]) -> set[str]:
    statuses = {"400", "405", "408", "413", "431", "500", "501", "505"}
    if "application/json" in operation.get("requestBody", {}).get("content", {}):
        statuses |= {"415", "422"}
    if operation.get("parameters"):
        statuses.add("422")
    if not path.startswith(("/health/", "/metrics", "/admin/")):
        statuses.add("503")
    if path.startswith("/admin/"):
        statuses |= {"401", "404"}
    if "{" in path:
        statuses.add("404")
    if path in ("/users", "/orders", "/transfers") and method == "post":
        statuses.add("409")
    if path == "/health/ready":
        statuses.add("503")
    return statuses


def test_openapi_declares_every_problem_status_as_problem_json(spec: dict[str, Any]) -> None:
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            missing = expected_statuses(path, method, operation) - responses.keys()
            assert not missing, (method, path, missing)
            for status, response in responses.items():
                if int(status) < 400:
                    continue
                content = response["content"]
                # The live page's 401 is also its token form, for a browser.
                page = {"text/html"} if (path, status) == ("/admin/pool", "401") else set()
                assert set(content) == {"application/problem+json"} | page, (method, path, status)
                schema = resolve(spec, content["application/problem+json"]["schema"])
                assert schema["title"] == "ProblemDetails", (method, path, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_openapi_declares_the_field_errors_of_a_problem(spec: dict[str, Any]) -> None:
    problem = spec["components"]["schemas"]["ProblemDetails"]
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])
    assert "errors" in problem["properties"]


async def test_an_empty_cursor_is_422_naming_after(http: httpx.AsyncClient) -> None:
    problem = assert_problem(await http.get("/users?after="), 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["query", "after"]


async def test_money_with_leading_zeros_is_its_value(http: httpx.AsyncClient) -> None:
    user = await new_user(http)
    response = await http.post(
        f"/accounts/{user}/deposits", json={"amount": "0000000000000000000000001.50"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["balance"] == "1.50"


async def test_an_email_longer_than_64_before_the_at_is_422(http: httpx.AsyncClient) -> None:
    response = await http.post("/users", json={"name": "L", "email": "a" * 65 + "@example.com"})
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["body", "email"]


@pytest.mark.parametrize(
    "path", ["/users%2f1", "/users%2F1%2Forders", "/health%2Flive", "/users%5c1"]
)
async def test_a_path_with_an_encoded_separator_is_404(http: httpx.AsyncClient, path: str) -> None:
    # Decoded, it would be routed as another path than a proxy filtering by prefix saw.
    response = await http.get(path)
    assert_problem(response, 404, "not_found")
    assert "x-request-id" in response.headers


async def test_other_percent_encodings_in_a_path_are_routed(http: httpx.AsyncClient) -> None:
    assert (await http.get("/health/%6Cive")).status_code == 200  # %6C: "l"


async def test_openapi_declares_504_on_any_apps_routes_but_the_exempt(db: Database) -> None:
    app = FastAPI()
    setup(app, db)

    @app.get("/things/{thing_id}")
    async def thing(thing_id: int) -> int:  # a plain route: no responses= of pglayer's
        return thing_id

    app.include_router(health_router())
    async with asgi_client(app) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert "504" in paths["/things/{thing_id}"]["get"]["responses"]  # a query's deadline
    assert "504" not in paths["/health/live"]["get"]["responses"]  # exempt, no database


async def test_a_request_the_server_gives_up_on_at_shutdown_gets_a_problem(
    surface_app: FastAPI,
) -> None:
    # A body still arriving when the server's graceful shutdown runs out: it cancels the
    # request. The answer is a 503 problem, not the server's plain-text 500.
    sent: list[MutableMapping[str, Any]] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b'{"name": "Sl', "more_body": True}
        await asyncio.Event().wait()  # the rest never comes
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/users", "raw_path": b"/users", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(b"host", b"shop"), (b"content-type", b"application/json"),
                    (b"content-length", b"100")],
    }  # fmt: skip
    task = asyncio.create_task(surface_app(scope, receive, send))
    await asyncio.sleep(0.1)
    task.cancel()  # what uvicorn does once its graceful shutdown times out
    await asyncio.gather(task, return_exceptions=True)
    assert sent[0]["status"] == 503
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"retry-after"] == b"1"
    assert json.loads(sent[1]["body"])["code"] == "unavailable"


def test_a_body_past_a_doubles_range_is_parsed_once_where_bytes_show_no_more_is_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Four passes over a MiB (plain parse, shape, exact parse, a re-encoding): 0.2 s.
    def never(*_: object) -> None:
        raise AssertionError("a pass the body's bytes show it does not need")

    monkeypatch.setattr(_bodies, "_encodable", never)
    monkeypatch.setattr(json, "loads", never)
    body = b"[1e999," + b",".join([b"[" + b",".join([b"1"] * 500) + b"]"] * 100) + b"]"
    assert len(_bodies.parse_json(body)) == 101
