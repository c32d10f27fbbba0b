"""The shop against its own OpenAPI document: schemathesis, every check, on a real server.

Bounded and repeatable: at most MAX_EXAMPLES cases per operation and phase, deterministic
generation, one worker, so the same requests run every time (about 2,000 cases in 20 s
here). Contract rules no schema can state are applied by tests/schemathesis_hooks.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from pglayer_shop.seed import SeedCounts, seed

from pglayer import Database
from pglayer.fastapi import Cursors
from tests.conftest import ServerProcess, server_env, settings_for
from tests.schemathesis_hooks import ORDERS_SINCE

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")  # contract rules no schema states
ADMIN_TOKEN = "schemathesis-admin-token"
MAX_EXAMPLES = 100
# A cursor is opaque: only one the server issued is valid, which no schema can say, so
# generated requests carry real ones (invalid cursors are tested in test_shop_users.py).
CURSOR_SECRET = "schemathesis-cursor-secret"


def config(cursors: Cursors) -> str:
    return f"""
[[operations]]
include-name = "GET /users"
parameters = {{ "query.after" = "{cursors.encode(1, of="users")}" }}

[[operations]]
include-name = "GET /products"
parameters = {{ "query.after" = "{cursors.encode(1, of="products")}" }}

[[operations]]
include-name = "GET /users/{{user_id}}/orders"
parameters = {{ "query.after" = "{cursors.encode(ORDERS_SINCE, 1, of="orders of user 1")}" }}
"""


def command(url: str, config: Path) -> list[str]:
    return [
        SCHEMATHESIS,
        "--config-file",
        str(config),
        "run",
        url,
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-deterministic",
        # NUL in text is refused (422) by the contract; tested in test_shop_users.py.
        "--generation-allow-x00",
        "false",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
    ]


async def test_the_api_conforms_to_its_openapi_document(db_url: str, tmp_path: Path) -> None:
    async with Database(settings_for(db_url)) as db:
        # Rows behind small ids, so that generated requests also reach the handlers' logic.
        await seed(db, SeedCounts(users=20, products=10, orders=50))
    config_file = tmp_path / "schemathesis.toml"
    config_file.write_text(config(Cursors(CURSOR_SECRET)))
    env = server_env(db_url, PGLAYER_ADMIN_TOKEN=ADMIN_TOKEN, PGLAYER_CURSOR_SECRET=CURSOR_SECRET)
    async with ServerProcess("pglayer_shop.app:create_app", env) as server:
        result = await asyncio.to_thread(
            subprocess.run,
            command(f"{server.url}/openapi.json", config_file),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tmp_path,  # anything it writes goes there
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": str(HOOKS),
                "PGLAYER_CURSOR_SECRET": CURSOR_SECRET,  # the hooks sign cursors per user
            },
        )
    # The run's summary, for a closing note or a curious reader (default: the test's tmp dir).
    summary = Path(os.environ.get("PGLAYER_SCHEMATHESIS_SUMMARY", tmp_path / "summary.txt"))
    await asyncio.to_thread(summary.write_text, result.stdout)
    assert result.returncode == 0, result.stdout[-40000:] + result.stderr[-5000:]
