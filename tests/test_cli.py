"""The `pglayer` command end to end, as separate processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from pglayer._embedded import EmbeddedPostgres, _pgserver_bindir
from tests.conftest import free_port, require_external, wait_for

SHOP = str(Path(sys.executable).parent / "pglayer-shop")
PGLAYER = str(Path(sys.executable).parent / "pglayer")


def run_cli(
    *args: str, env: dict[str, str], command: str = SHOP
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command, *args], capture_output=True, text=True, env=env, timeout=180, check=False
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PGLAYER_")
    }
    env.update(extra)
    return env


@contextlib.contextmanager
def embedded_dir(prefix: str) -> Iterator[Path]:
    """A directory for an embedded server, its server stopped and files removed after."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    try:
        yield base
    finally:
        # Stop a server a failed test may have left behind, then remove its files.
        if (base / "pg" / "data").exists():
            EmbeddedPostgres(base).destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with embedded_dir("pglayer-cli-") as base:
        yield base


def wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"serve exited early:\n{proc.stdout.read() if proc.stdout else ''}"
            )
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("serve did not become ready")


def serve_once(data_dir: Path, env: dict[str, str]) -> tuple[int, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [SHOP, "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(url, proc)
        users = httpx.get(f"{url}/users", params={"limit": 1}, timeout=5)
        assert users.status_code == 200
        assert users.json()["items"], "an empty database is seeded"
        created = httpx.post(
            f"{url}/users", json={"name": "Run", "email": f"run{port}@example.com"}, timeout=5
        )
        assert created.status_code == 201
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    return proc.returncode, output


def test_serve_without_database_url_runs_on_embedded_postgres_and_stops_it(data_dir: Path) -> None:
    code, output = serve_once(data_dir, clean_env())
    assert code == 0, output
    assert "embedded PostgreSQL started" in output
    assert "embedded PostgreSQL stopped" in output
    assert not (data_dir / "pg" / "data" / "postmaster.pid").exists()
    assert oct((data_dir / "password").stat().st_mode)[-3:] == "600"
    password = (data_dir / "password").read_text().strip()
    assert password not in output
    # Said in the order it happened: pglayer's tables, then the shop's, then the demo data.
    assert output.index("applied migrations: pglayer/") < output.index("seeding"), output

    # A second run reuses the cluster and its data instead of seeding again.
    code, output = serve_once(data_dir, clean_env())
    assert code == 0, output
    assert "initialising" not in output
    assert "seeding" not in output


def test_embedded_server_runs_from_the_pgserver_wheel(data_dir: Path) -> None:
    bindir = _pgserver_bindir()
    require_external(bindir is not None, "the pgserver wheel is not installed")
    assert bindir is not None
    env = clean_env(PGLAYER_PG_BINDIR=str(bindir))
    code, output = serve_once(data_dir, env)
    assert code == 0, output
    assert (data_dir / "pg" / "data" / "PG_VERSION").read_text().strip() == "16"


def test_migrate_names_what_it_applies_as_serve_does(empty_db_url: str) -> None:
    migrated = run_cli("migrate", env=clean_env(DATABASE_URL=empty_db_url))
    assert migrated.returncode == 0, migrated.stderr
    said = " ".join(migrated.stderr.split())
    assert "applied migrations: pglayer/0001_idempotency_keys.sql," in said, said
    assert ", default/0001_initial.sql," in said  # it said "0001_initial.sql": which history?


def test_migrate_and_seed_against_database_url(db_url: str) -> None:
    env = clean_env(DATABASE_URL=db_url)
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert "up to date" in migrated.stderr
    seeded = run_cli("seed", "--users", "50", "--products", "5", "--orders", "100", env=env)
    assert seeded.returncode == 0, seeded.stderr
    assert "seeded 50 users" in seeded.stderr
    password = db_url.split(":")[2].split("@")[0]
    assert password not in seeded.stderr + seeded.stdout


def test_migrate_and_seed_write_only_json_lines_under_json_logs(db_url: str) -> None:
    # A plain "applied: ..." line and the progress bar broke a shipper that reads JSON lines.
    env = clean_env(DATABASE_URL=db_url, PGLAYER_LOG_FORMAT="json")
    for args in (["migrate"], ["seed", "--users", "5", "--products", "1", "--orders", "5"]):
        done = run_cli(*args, env=env)
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
        assert records, args
        assert all(isinstance(record, dict) for record in records), records
    said = [record["message"] for record in records]
    assert any(message.startswith("seeding 5 users") for message in said), said  # no bar


@pytest.mark.parametrize(
    ("args", "said"),
    [([], "no command given"), (["seed", "--users", "-5"], "--users"), (["bogus"], "bogus")],
)
def test_a_usage_error_under_json_logs_is_one_json_record(args: list[str], said: str) -> None:
    # Drawn in a box by typer (the help's 21 lines with no command at all).
    done = run_cli(*args, env=clean_env(PGLAYER_LOG_FORMAT="json"))
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = [x for x in done.stderr.splitlines() if x.strip()]
    record = json.loads(line)
    assert record["level"] == "error"
    assert said in record["message"]


def test_an_error_under_json_logs_is_a_json_line(tmp_path: Path) -> None:
    # Refused before logging was set up: a plain line among JSON ones.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(DATABASE_URL="postgresql://postgres@127.0.0.1:5432/postgres")
        env["PGLAYER_LOG_FORMAT"] = "json"
        refused = run_cli("serve", "--port", str(port), "--no-seed", env=env)
    assert refused.returncode == 1
    [line] = [x for x in refused.stderr.splitlines() if x.strip()]
    record = json.loads(line)
    assert record["level"] == "error", record
    assert "cannot listen" in record["message"], record


def test_migrate_and_seed_without_database_url_use_the_embedded_server(data_dir: Path) -> None:
    env = clean_env(PGLAYER_DATA_DIR=str(data_dir))
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert "using the embedded PostgreSQL" in migrated.stderr
    seeded = run_cli("seed", "--users", "5", "--products", "2", "--orders", "3", env=env)
    assert seeded.returncode == 0, seeded.stderr
    assert "seeded 5 users" in seeded.stderr
    assert EmbeddedPostgres(data_dir).running_port() is None  # stopped what each started


def test_seed_counts_are_bounded() -> None:
    refused = run_cli("seed", "--users", "99999999999999999999", env=clean_env())
    assert refused.returncode == 2
    assert "--users" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_unreachable_database_url_fails_with_a_masked_message() -> None:
    env = clean_env(
        DATABASE_URL=f"postgresql://app:hunter2@127.0.0.1:{free_port()}/shop",
        PGLAYER_STARTUP_TIMEOUT="1",
        PGLAYER_CONNECT_TIMEOUT="0.2",
    )
    result = run_cli("migrate", env=env)
    assert result.returncode == 1
    assert "not reachable" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", [SHOP, PGLAYER])
def test_a_port_outside_the_tcp_range_is_refused(command: str) -> None:
    # The kernel would take 83637 modulo 65536 (18101) while the log said 83637.
    args = ["serve", "--port", "83637"] + ([] if command == SHOP else ["main:app"])
    result = run_cli(*args, env=clean_env(), command=command)
    assert result.returncode == 2
    assert "less than or equal to 65535" in " ".join(result.stderr.split())


@pytest.mark.parametrize("command", [SHOP, PGLAYER])
def test_serve_refuses_a_worker_count_past_the_bound_before_starting_anything(
    command: str,
) -> None:
    # uvicorn started workers until the machine ran out of memory. Should the check go,
    # the unreachable database ends the command before uvicorn starts (not a runaway).
    args = ["serve", "--workers", "99999999999999999999"] + ([] if command == SHOP else ["x:y"])
    env = clean_env(DATABASE_URL="postgresql://x@127.0.0.1:1/x", PGLAYER_STARTUP_TIMEOUT="1")
    result = run_cli(*args, env=env, command=command)
    assert result.returncode == 1, result.stderr
    assert "--workers must be from 1 to 128, not 99999999999999999999" in result.stderr
    assert "embedded" not in result.stdout + result.stderr


def test_serve_refuses_an_invalid_shop_setting_before_saying_it_serves() -> None:
    env = clean_env(PGLAYER_ORDER_BATCH_SIZE="0", DATABASE_URL="postgresql://u@127.0.0.1:1/x")
    result = run_cli("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 1
    assert "PGLAYER_ORDER_BATCH_SIZE" in result.stderr
    assert "serving" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", [SHOP, PGLAYER])
def test_migrate_refuses_a_setting_the_app_would_refuse(command: str, tmp_path: Path) -> None:
    env = clean_env(PGLAYER_MAX_SIZE="abc", DATABASE_URL="postgresql://u@127.0.0.1:1/x")
    args = ["migrate"] + ([] if command == SHOP else ["--dir", str(tmp_path)])
    result = run_cli(*args, env=env, command=command)
    assert result.returncode == 1
    assert "PGLAYER_MAX_SIZE" in result.stderr


async def test_an_interrupted_seed_says_that_nothing_was_seeded(empty_db_url: str) -> None:
    # It exited 130 without a word.
    env = clean_env(DATABASE_URL=empty_db_url)
    args = [SHOP, "seed", "--users", "2000000", "--products", "1", "--orders", "0"]
    seed = subprocess.Popen(  # noqa: ASYNC220  started, then watched: never waited on here
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    conn = await asyncpg.connect(empty_db_url)
    try:
        copying = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE query LIKE 'COPY%' AND pid <> pg_backend_pid()"
        )

        async def started() -> bool:
            return bool(await conn.fetchval(copying))

        assert await wait_for(started, timeout=60, interval=0.05)
        seed.send_signal(signal.SIGINT)
        output, _ = await asyncio.to_thread(seed.communicate, timeout=60)
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await conn.close()
        if seed.poll() is None:
            seed.kill()
            seed.wait()
    assert seed.returncode == 130, output
    assert "interrupted: nothing was seeded" in output
