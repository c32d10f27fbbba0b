"""`/transfers` and deposits: money moves between accounts without deadlocks or overdrafts."""

from __future__ import annotations

from fastapi import Request, Response

from pglayer import Connection, IdempotencyKeys, InvalidInputError, Record, body_hash
from pglayer.fastapi import (
    Db,
    IdempotencyKey,
    Problem,
    field_error,
    json_response,
    problem_responses,
)
from pglayer_shop.models import Account, Deposit, Transfer, TransferCreate
from pglayer_shop.routes import router
from pglayer_shop.routes.params import TransferId, UserId, created, replayed
from pglayer_shop.settings import ShopSettings

__all__: list[str] = []

_TRANSFER_COLUMNS = "id, from_user_id, to_user_id, amount, created_at"
_DEPOSIT = """
WITH a AS (
    UPDATE accounts SET balance = balance + $2, updated_at = now()
    WHERE user_id = $1 RETURNING user_id, balance
), d AS (
    INSERT INTO deposits (user_id, amount) SELECT user_id, $2 FROM a
)
SELECT user_id, balance FROM a
"""
_OUT_OF_RANGE = "22003"  # numeric_value_out_of_range: a balance past numeric(14, 2)


def _overflow() -> Problem:
    """The 422 naming `amount` for a balance that would overflow."""
    detail = "The amount would take the balance past its maximum (999999999999.99)."
    return Problem(
        422,
        "validation_error",
        detail,
        errors=[field_error(["body", "amount"], detail, "balance_overflow")],
    )


@router.post(
    "/accounts/{user_id}/deposits",
    tags=["accounts"],
    response_model=Account,
    responses={**problem_responses(
        404, 413, 422, _422="Invalid body, or `idempotency_key_reused` with a different body"
    ), 200: {"description": "The account after the deposit", "headers": replayed()}},
)  # fmt: skip
async def deposit(
    user_id: UserId,
    body: Deposit,
    db: Db,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Add to the balance; the deposit is recorded in the same statement. With an
    `Idempotency-Key`, as orders: the same key and body again get the same answer back
    (`Idempotent-Replayed: true`), deposited once."""
    settings: ShopSettings = request.app.state.shop_settings
    keys: IdempotencyKeys = request.app.state.idempotency_keys
    digest = body_hash({"user_id": user_id, **body.model_dump(mode="json")})

    async def work(conn: Connection) -> Record:
        account = await conn.fetchrow(_DEPOSIT, user_id, body.amount)
        if account is None:  # raised inside, so that the key is not spent on it
            raise Problem(404, "not_found", f"Account of user {user_id} does not exist.")
        return account

    try:
        # Bounded as orders and transfers are: an account row held locked (a long transfer,
        # an operator's transaction) answers 503 `busy` after the write bound, not 5 s.
        account, again = await db.run_in_transaction(
            lambda c: keys.run(c, "deposits", idempotency_key, digest, work),
            lock_timeout=settings.write_lock_timeout,
        )
    except InvalidInputError as exc:
        if exc.sqlstate != _OUT_OF_RANGE:
            raise
        raise _overflow() from None
    return json_response(account, headers={"Idempotent-Replayed": "true"} if again else None)


async def _transfer(conn: Connection, body: TransferCreate) -> Record:
    # Both rows are locked in user_id order (LockRows runs above the sort), so crossing
    # transfers A→B and B→A queue up instead of deadlocking.
    rows = await conn.fetch(
        """
        SELECT user_id, balance FROM accounts WHERE user_id = ANY($1::bigint[])
        ORDER BY user_id FOR UPDATE
        """,
        [body.from_user_id, body.to_user_id],
    )
    balances = {r["user_id"]: r["balance"] for r in rows}
    for user_id in (body.from_user_id, body.to_user_id):
        if user_id not in balances:
            raise Problem(404, "not_found", f"Account of user {user_id} does not exist.")
    if balances[body.from_user_id] < body.amount:
        raise Problem(409, "insufficient_funds", "The balance does not cover this transfer.")
    transfer = await conn.fetchrow(
        f"""
        WITH debit AS (
            UPDATE accounts SET balance = balance - $3, updated_at = now() WHERE user_id = $1
        ), credit AS (
            UPDATE accounts SET balance = balance + $3, updated_at = now() WHERE user_id = $2
        )
        INSERT INTO transfers (from_user_id, to_user_id, amount) VALUES ($1, $2, $3)
        RETURNING {_TRANSFER_COLUMNS}
        """,
        body.from_user_id,
        body.to_user_id,
        body.amount,
    )
    assert transfer is not None
    return transfer


@router.get(
    "/transfers/{transfer_id}",
    tags=["accounts"],
    response_model=Transfer,
    responses=problem_responses(404, 422),
)
async def get_transfer(transfer_id: TransferId, db: Db) -> Response:
    # From the primary: a client follows the Location of a transfer it just made.
    transfer = await db.run(
        lambda conn: conn.fetchrow(
            f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE id = $1", transfer_id
        ),
        bulkhead="read",
    )
    if transfer is None:
        raise Problem(404, "not_found", f"Transfer {transfer_id} does not exist.")
    return json_response(transfer)


@router.post(
    "/transfers",
    tags=["accounts"],
    status_code=201,
    response_model=Transfer,
    responses={**problem_responses(
        404, 409, 413, 422,
        _409="`insufficient_funds`; nothing changed",
        _422="Invalid body, or `idempotency_key_reused` with a different body",
    ), **created(replayable=True)},
)  # fmt: skip
async def create_transfer(
    body: TransferCreate, db: Db, request: Request, idempotency_key: IdempotencyKey = None
) -> Response:
    """Move money between two accounts. With an `Idempotency-Key`, as orders: the same key and
    body again get the same transfer back (`Idempotent-Replayed: true`), made once."""
    settings: ShopSettings = request.app.state.shop_settings
    keys: IdempotencyKeys = request.app.state.idempotency_keys
    digest = body_hash(body.model_dump(mode="json"))
    try:
        transfer, again = await db.run_in_transaction(
            lambda c: keys.run(
                c, "transfers", idempotency_key, digest, lambda c: _transfer(c, body)
            ),
            lock_timeout=settings.write_lock_timeout,
        )
    except InvalidInputError as exc:
        if exc.sqlstate != _OUT_OF_RANGE:
            raise
        raise _overflow() from None
    headers = {"Location": f"/transfers/{transfer['id']}"}
    if again:
        headers["Idempotent-Replayed"] = "true"
    return json_response(transfer, status_code=201, headers=headers)
