"""Placing an order: stock, balance and the order row change together or not at all."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import hashlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

from pglayer import (
    Connection,
    Database,
    IdempotencyKeys,
    IntegrityError,
    InvalidInputError,
    LockTimeoutError,
    Record,
)
from pglayer.fastapi import Problem
from pglayer_shop.models import OrderCreate

__all__ = ["ORDER_COLUMNS", "OrderBatches", "place_order", "request_hash"]

log = logging.getLogger("pglayer_shop")

_ORDER_FIELDS = ("id", "user_id", "product_id", "quantity", "unit_price", "total", "created_at")
ORDER_COLUMNS = ", ".join(_ORDER_FIELDS)

# Migration 0007: lock, check, then change, in one call, for one order or several of one
# product, each with its outcome. Without a key it is its own implicit transaction, so the
# product's row lock is never held across a round trip to the app; with one, it runs inside
# the key's transaction.
_PLACE = "SELECT * FROM shop_place_orders($1, $2, $3, $4)"
MAX_WAITING = 1024  # orders of one product waiting for the next call; more are placed alone


def request_hash(body: OrderCreate) -> str:
    """What an idempotency key is bound to: the request body."""
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


async def _place_each(conn: Connection, product: int, bodies: list[OrderCreate]) -> list[Record]:
    # `lock_timeout_ms`: the bound left, set by `db.run` and `run_in_transaction`: the function
    # queues on an advisory lock, then bounds both of its lock waits together (migration 0007).
    users = [body.user_id for body in bodies]
    quantities = [body.quantity for body in bodies]
    return await conn.fetch(_PLACE, users, quantities, product, conn.lock_timeout_ms)


def _order(body: OrderCreate, row: Record) -> dict[str, Any]:
    """The order `row` placed for `body`, or the problem that refused it."""
    outcome = row["outcome"]
    if outcome == "placed":
        return {name: row[name] for name in _ORDER_FIELDS}
    if outcome == "no_user":
        raise Problem(404, "not_found", f"User {body.user_id} does not exist.")
    if outcome == "no_product":
        raise Problem(404, "not_found", f"Product {body.product_id} does not exist.")
    if outcome == "stock":
        raise Problem(409, "insufficient_stock", "Not enough stock for this quantity.")
    raise Problem(409, "insufficient_funds", "The balance does not cover this order.")


async def _place(conn: Connection, body: OrderCreate) -> dict[str, Any]:
    [row] = await _place_each(conn, body.product_id, [body])
    return _order(body, row)


async def place_order(
    db: Database,
    body: OrderCreate,
    key: str | None,
    keys: IdempotencyKeys,
    lock_timeout: float,
    batches: OrderBatches | None = None,
) -> tuple[dict[str, Any], bool]:
    """Place the order; return it and whether it is a replay. Committed on return.

    With a key, `pglayer.IdempotencyKeys` claims it first in the order's transaction: a
    concurrent request with the same key waits on it, then replays the stored order; a
    rollback takes the key with it. That transaction is replayed whole on serialization
    failures, deadlocks or a connection lost before COMMIT. Without a key the order is
    one statement, replayed only if it was never sent: a connection lost while it ran
    leaves its outcome unknown (`CommitIndeterminateError`), which is what keys are for.
    A row locked past `lock_timeout` is `LockTimeoutError` either way, and no connection
    is held longer. Without a key, `batches` may place it together with others.
    """
    if key is None:
        if batches is not None:
            return await batches.place(body), False
        return await _place_alone(db, body, lock_timeout), False
    digest = request_hash(body)
    return await db.run_in_transaction(
        lambda c: keys.run(c, "orders", key, digest, lambda c: _place(c, body)),
        lock_timeout=lock_timeout,
    )


async def _place_alone(db: Database, body: OrderCreate, lock_timeout: float) -> dict[str, Any]:
    return await db.run(lambda c: _place(c, body), lock_timeout=lock_timeout)


class _Pending:
    """An order waiting for its call: what it asks, and where its answer goes."""

    __slots__ = ("batch", "body", "call", "context", "future")

    def __init__(self, body: OrderCreate) -> None:
        self.body = body
        self.context = contextvars.copy_context()  # its deadline and request id
        self.future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.call: asyncio.Task[None] | None = None  # the call that carries it, while it runs
        self.batch: Sequence[_Pending] = ()  # the orders that call carries

    def abandon(self) -> None:
        """Its client left: the call that carries it is cancelled, with its statement on the
        server, once every order it carries was abandoned. (A client told 503 "send again"
        by a stopping server, or 499 in the log, must not find its order placed after.)"""
        call = self.call
        if call is not None and all(order.future.done() for order in self.batch):
            call.cancel()


class OrderBatches:
    """Keyless orders of one product placed together: one call, one lock wait and one commit
    for many (migration 0007).

    An order that finds no call running for its product is placed at once, alone. While a
    call runs, the orders that arrive for the product wait, and the next call takes up to
    `max_batch` of them together, in the context (deadline, request id) of the first: under
    load the product's lock is taken once a batch instead of once an order, and nothing
    waits on a timer when idle. Each call has the whole lock bound; when one ends `busy`,
    the orders that waited for it end `busy` too (they waited on the same lock), so no
    order waits much past its bound. An order whose client left before its call began is
    not placed; one whose client left during its call is placed with the others it carries,
    unless their clients all left too: then the call is cancelled on the server.
    """

    def __init__(self, db: Database, *, lock_timeout: float, max_batch: int = 64) -> None:
        self._db = db
        self._lock_timeout = lock_timeout
        self._max_batch = max_batch
        self._waiting: dict[int, deque[_Pending]] = {}  # a product's key: a call of it runs
        self._calls: set[asyncio.Task[None]] = set()
        self.calls = 0  # calls made, and orders they carried (for tests and benchmarks)
        self.orders = 0

    @property
    def waiting(self) -> int:
        """Orders waiting for their product's next call."""
        return sum(len(waiting) for waiting in self._waiting.values())

    async def place(self, body: OrderCreate) -> dict[str, Any]:
        """Place `body` (without a key); committed on return, as `place_order`."""
        if self._max_batch <= 1:
            return await _place_alone(self._db, body, self._lock_timeout)
        product = body.product_id
        waiting = self._waiting.get(product)
        if waiting is not None and len(waiting) >= MAX_WAITING:
            return await _place_alone(self._db, body, self._lock_timeout)
        order = _Pending(body)
        if waiting is None:
            self._waiting[product] = deque()
            self._start(product, [order])
        else:
            waiting.append(order)
        try:
            return await order.future
        except asyncio.CancelledError:
            # The client left: dropped if its call has not begun, else placed with the
            # others its call carries, unless they all left too.
            order.abandon()
            raise

    def _start(self, product: int, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._call(product, batch), context=batch[0].context)
        for order in batch:
            order.call, order.batch = task, batch
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def _next(self, product: int) -> None:
        """The next call for `product`, with the orders that waited for it (if any)."""
        waiting = self._waiting[product]
        batch: list[_Pending] = []
        while waiting and len(batch) < self._max_batch:
            order = waiting.popleft()
            if not order.future.done():
                batch.append(order)
        if batch:
            self._start(product, batch)
        elif not waiting:
            del self._waiting[product]

    async def _call(self, product: int, carried: list[_Pending]) -> None:
        batch = [order for order in carried if not order.future.done()]  # their clients left
        try:
            if batch:
                await self._place(product, batch)
        except LockTimeoutError as exc:
            for order in (*batch, *self._waiting[product]):
                _fail(order, _own(exc))
        except Exception as exc:
            for order in batch:
                _fail(order, _own(exc))
        except BaseException:  # cancelled: the app is stopping, or its clients all left
            for order in batch:
                order.future.cancel()
            raise
        finally:
            for order in carried:  # no cycle through the task for the collector to find
                order.call, order.batch = None, ()
            self._next(product)

    async def _place(self, product: int, batch: list[_Pending]) -> None:
        self.calls += 1
        self.orders += len(batch)
        bodies = [order.body for order in batch]
        try:
            rows = await self._db.run(
                lambda c: _place_each(c, product, bodies), lock_timeout=self._lock_timeout
            )
        except (IntegrityError, InvalidInputError):
            if len(batch) == 1:
                raise
            # One order the database refused rolled back all of them (none does today; a
            # constraint added later might): each is placed alone, so only that one is.
            for order in batch:
                try:
                    _answer(order, await _place_alone(self._db, order.body, self._lock_timeout))
                except Exception as exc:  # this order's own answer
                    _fail(order, exc)
            return
        for order, row in zip(batch, rows, strict=True):
            try:
                _answer(order, _order(order.body, row))
            except Problem as refused:
                _fail(order, refused)


def _answer(order: _Pending, result: dict[str, Any]) -> None:
    if not order.future.done():
        order.future.set_result(result)


def _fail(order: _Pending, exc: Exception) -> None:
    if not order.future.done():
        order.future.set_exception(exc)


def _own(exc: Exception) -> Exception:
    """A copy of `exc` for one of the requests it answers: each raise adds its traceback."""
    try:
        own = copy.copy(exc)
    except Exception:
        return exc
    own.__cause__ = exc.__cause__  # what the error log shows as its origin
    return own
