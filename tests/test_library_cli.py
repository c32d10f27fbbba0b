"""`pglayer serve APP`, `pglayer migrate --dir`, `pglayer doctor --settings`: for any app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pglayer import DatabaseSettings
from pglayer._embedded import EmbeddedPostgres
from pglayer._settings import misspelt_settings
from tests.conftest import children_of, free_port
from tests.test_cli import clean_env, data_dir  # noqa: F401  (a fixture)

PGLAYER = [sys.executable, "-m", "pglayer"]
# The installed command, as a user types it: unlike `python -m`, it does not put the current
# directory on the import path by itself.
PGLAYER_SCRIPT = str(Path(sys.executable).with_name("pglayer"))

APP = """
import asyncio
from pathlib import Path

from fastapi import FastAPI, WebSocket

from pglayer import Database
from pglayer.fastapi import Db, setup

app = FastAPI()
setup(app, Database())


@app.get("/notes/count")
async def count(db: Db) -> int:
    return await db.read(lambda conn: conn.fetchval("SELECT count(*) FROM notes"))


@app.post("/notes/echo")
async def echo(note: dict[str, str]) -> dict[str, str]:
    return note


@app.websocket("/echo")
async def echo_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())


@app.get("/notes/slow")
async def slow() -> None:
    Path("entered").touch()  # in the app's directory: the test waits for it
    await asyncio.sleep(60)
"""


def run(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PGLAYER, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str, env: dict[str, str]) -> Iterator[Served]:
    """`pglayer serve` of APP with its migrations, as a user runs it, until it answers; its
    output once stopped (SIGTERM, by its PID) is in `served.output`."""
    (tmp_path / "notesapp.py").write_text(APP)
    write_migrations(tmp_path / "migrations", "notes")
    port = free_port()
    command = [PGLAYER_SCRIPT, "serve", "notesapp:app", "--migrations", "migrations",
               "--port", str(port), *args]  # fmt: skip
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"{served.url}/notes/count", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        served.output, _ = proc.communicate(timeout=60)


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[str]
    output: str = ""


def write_migrations(directory: Path, table: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "0001_schema.sql").write_text(f"CREATE TABLE {table} (id int);")
    return directory


async def test_migrate_keeps_each_directorys_history_apart(db_url: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=db_url)
    first = run("migrate", "--dir", str(write_migrations(tmp_path / "billing", "bills")), env=env)
    assert first.returncode == 0, first.stderr
    second = run("migrate", "--dir", str(write_migrations(tmp_path / "notes", "notes")), env=env)
    assert second.returncode == 0, second.stderr
    assert "notes/0001_schema.sql" in second.stderr
    again = run("migrate", "--dir", str(tmp_path / "notes"), env=env)
    assert "up to date" in again.stderr
    conn = await asyncpg.connect(db_url)
    try:
        histories = await conn.fetch(
            "SELECT history FROM pglayer_migrations WHERE version = '0001' ORDER BY history"
        )
    finally:
        await conn.close()
    assert [r["history"] for r in histories] == ["billing", "default", "notes", "pglayer"]


def json_lines(text: str) -> list[dict[str, object]]:
    """Each line of `text` as a JSON object (fails on a line that is not one)."""
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(record, dict) for record in records), text
    return records


def test_under_json_logs_migrate_and_doctor_write_only_json(db_url: str, tmp_path: Path) -> None:
    # Plain "applied:" and warning lines, doctor's tables and click's usage boxes among them.
    env = clean_env(DATABASE_URL=db_url, PGLAYER_LOG_FORMAT="json")
    (tmp_path / "empty").mkdir()
    for args in (
        ["migrate", "--dir", str(write_migrations(tmp_path / "billing", "bills"))],
        ["migrate", "--dir", str(tmp_path / "empty")],
        ["doctor"],
        ["doctor", "--settings"],
    ):
        done = run(*args, env=env)
        records = json_lines(done.stdout) + json_lines(done.stderr)
        assert done.returncode in (0, 1), (args, done.stderr)
        assert records, args
    applied = json_lines(run("migrate", "--dir", str(tmp_path / "billing"), env=env).stderr)
    assert [r["message"] for r in applied if r["logger"] == "pglayer.cli"] == ["up to date"]
    [report] = json_lines(run("doctor", env=env).stdout)
    assert {"target", "failed", "findings", "will_use"} <= report.keys()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([], "no command given"),
        (["migrate"], "Missing option '--dir'"),
        (["serve", "--bogus"], "No such option: --bogus"),
        (["doctor", "--workers", "0"], "--workers"),
    ],
)
def test_a_usage_error_under_json_logs_is_one_json_record(args: list[str], said: str) -> None:
    done = run(*args, env=clean_env(PGLAYER_LOG_FORMAT="json"))
    assert done.returncode == 2
    assert done.stdout == ""
    [record] = json_lines(done.stderr)
    assert record["level"] == "error"
    assert said in str(record["message"])


def test_migrate_refuses_an_empty_history_name(db_url: str, tmp_path: Path) -> None:
    # Taken silently as the directory's name, where " app" was refused.
    directory = write_migrations(tmp_path / "billing", "bills")
    done = run(
        "migrate", "--dir", str(directory), "--history", "", env=clean_env(DATABASE_URL=db_url)
    )
    assert done.returncode == 1
    assert "history name '' is empty" in done.stderr


async def test_migrate_applies_nothing_when_one_history_is_refused(
    db_url: str, tmp_path: Path
) -> None:
    env = clean_env(DATABASE_URL=db_url)
    directory = write_migrations(tmp_path / "billing", "bills")
    (directory / "0002_more.sql").write_text("ALTER TABLE bills ADD COLUMN total int;")
    assert run("migrate", "--dir", str(directory), env=env).returncode == 0
    (directory / "0002_more.sql").write_text("ALTER TABLE bills ADD COLUMN total bigint;")
    pending = "DELETE FROM pglayer_migrations WHERE history = 'pglayer' AND version = '0004'"
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(pending)  # one of pglayer's own files left to apply
        refused = run("migrate", "--dir", str(directory), env=env)
        assert refused.returncode == 1
        assert "changed after it was applied" in " ".join(refused.stderr.split())
        mine = "SELECT count(*) FROM pglayer_migrations WHERE history = 'pglayer'"
        assert await conn.fetchval(mine + " AND version = '0004'") == 0
    finally:
        await conn.close()


def test_two_apps_directories_of_one_name_are_told_apart_by_history(
    db_url: str, tmp_path: Path
) -> None:
    env = clean_env(DATABASE_URL=db_url)
    items, notes = tmp_path / "items" / "migrations", tmp_path / "notes" / "migrations"
    items.mkdir(parents=True)
    notes.mkdir(parents=True)
    (items / "0001_items.sql").write_text("CREATE TABLE items (id int);")
    (notes / "0001_notes.sql").write_text("CREATE TABLE notes (id int);")
    assert run("migrate", "--dir", str(items), env=env).returncode == 0
    # The contract: "each directory's history is kept apart". It was refused as the first's.
    second = run("migrate", "--dir", str(notes), env=env)
    assert second.returncode == 0, second.stderr
    assert "applied: notes/migrations/0001_notes.sql" in second.stderr
    assert "history 'migrations' on this database is another directory's" in second.stderr
    assert asyncio.run(_regclass(db_url, "notes")) == "notes"
    again = run("migrate", "--dir", str(notes), env=env)
    assert (again.returncode, again.stderr.strip()) == (0, "up to date")


def test_migrate_says_at_once_that_it_is_waiting_for_an_unreachable_database(
    tmp_path: Path,
) -> None:
    env = clean_env(
        DATABASE_URL=f"postgresql://app:hunter2@127.0.0.1:{free_port()}/app",
        PGLAYER_STARTUP_TIMEOUT="1.5",
        PGLAYER_CONNECT_TIMEOUT="0.2",
    )
    result = run("migrate", "--dir", str(write_migrations(tmp_path / "notes", "notes")), env=env)
    lines = result.stderr.splitlines()
    assert result.returncode == 1
    waiting = [line for line in lines if "retrying for up to 1.5s" in line]
    assert len(waiting) == 1, result.stderr
    assert "app@127.0.0.1" in waiting[0]
    assert "hunter2" not in result.stderr + result.stdout


def test_an_invalid_setting_is_one_line_that_never_shows_the_url() -> None:
    env = clean_env(DATABASE_URL="postgresql://app:hunter2@127.0.0.1:1/app", PGLAYER_MAX_SIZE="1")
    result = run("doctor", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "invalid settings" in output
    assert "min_size (2) must not exceed max_size (1): PGLAYER_MIN_SIZE" in output
    assert "hunter2" not in output
    assert "Traceback" not in output
    with pytest.raises(ValidationError) as refused:
        DatabaseSettings(url="postgresql://app:hunter2@127.0.0.1:1/app", min_size=2, max_size=1)
    assert "hunter2" not in str(refused.value)


def test_a_setting_that_cannot_be_parsed_is_one_line() -> None:
    env = clean_env(DATABASE_URL="postgresql://app@127.0.0.1:1/app", PGLAYER_BULKHEADS="{bad",
                    COLUMNS="40")  # fmt: skip
    result = run("doctor", env=env)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines  # not wrapped at the terminal's width, no traceback
    assert "invalid settings: PGLAYER_BULKHEADS: not valid JSON" in lines[0]


def test_doctor_settings_prints_every_setting_masked() -> None:
    env = clean_env(
        DATABASE_URL="postgresql://app:hunter2@127.0.0.1:1/app",
        PGLAYER_ADMIN_TOKEN="admintok123",
        COLUMNS="200",
    )
    result = run("doctor", "--settings", env=env)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "admintok123" not in result.stdout
    assert "*** (set)" in result.stdout
    names = ("DATABASE_URL", "PGLAYER_MAX_SIZE", "PGLAYER_WORKERS", "PGLAYER_ADMIN_TOKEN")
    for name in names:
        assert name in result.stdout


def test_serve_runs_any_app_on_an_embedded_database_with_its_migrations(
    tmp_path: Path,
    data_dir: Path,  # noqa: F811
) -> None:
    with serving(tmp_path, "--data-dir", str(data_dir), env=clean_env()) as served:
        answer = httpx.get(f"{served.url}/notes/count", timeout=5)
        assert answer.status_code == 200
        assert answer.json() == 0
    output = served.output
    assert served.proc.returncode == 0, output
    assert "embedded PostgreSQL at postgres@127.0.0.1:" in output  # where to point psql
    assert f"password in {data_dir.resolve() / 'password'}" in " ".join(output.split())
    assert EmbeddedPostgres(data_dir).password not in output
    assert EmbeddedPostgres(data_dir).running_port() is None  # stopped what it started


def test_serve_sets_up_every_workers_logs_and_bounds_from_the_environment(
    db_url: str, tmp_path: Path
) -> None:
    env = clean_env(DATABASE_URL=db_url, PGLAYER_LOG_FORMAT="json", PGLAYER_MAX_BODY_SIZE="64")
    with serving(tmp_path, "--workers", "2", env=env) as served:
        small = httpx.post(f"{served.url}/notes/echo", json={"text": "hi"}, timeout=5)
        large = httpx.post(f"{served.url}/notes/echo", json={"text": "x" * 100}, timeout=5)
        assert (small.status_code, large.status_code) == (200, 413)
    output = served.output
    records = [json.loads(line) for line in output.splitlines() if line.strip()]  # every one
    started = {r["message"] for r in records if r["message"].startswith("Started server process")}
    assert len(started) == 2, output  # both workers' own lines, in the format asked for
    workers = {r["worker"] for r in records if r["message"].startswith("Started server process")}
    assert len(workers) == 2, output  # each line says which worker wrote it
    assert all(isinstance(r["worker"], int) for r in records if r["logger"] == "pglayer.access")
    access = [r for r in records if r["logger"] == "pglayer.access"]
    assert {r["status"] for r in access} >= {200, 413}, output


def test_serve_names_each_workers_pid_in_text_logs(db_url: str, tmp_path: Path) -> None:
    # Text lines of two workers could not be told apart (JSON has a `worker` field).
    env = clean_env(DATABASE_URL=db_url, PGLAYER_LOG_FORMAT="text", PGLAYER_ACCESS_LOG="true")
    with serving(tmp_path, "--workers", "2", env=env) as served:
        for _ in range(4):  # a new connection each: both workers answer, most likely
            assert httpx.get(f"{served.url}/notes/echo", timeout=5).status_code == 405
    lines = served.output.splitlines()
    started = [re.search(r" INFO \S+\[(\d+)\] .*Started server process", x) for x in lines]
    assert len({m[1] for m in started if m}) == 2, served.output
    access = [x for x in lines if " pglayer.access" in x]
    assert len(access) >= 4, served.output  # and the readiness probe's
    assert all(re.search(r" INFO pglayer\.access\[\d+\] \[", x) for x in access), access


def test_serve_bounds_a_websocket_message_as_a_body(db_url: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=db_url, PGLAYER_MAX_BODY_SIZE="64")

    async def exchange(url: str, text: str) -> str | int:
        async with connect(url.replace("http", "ws") + "/echo") as socket_:
            await socket_.send(text)
            try:
                return str(await socket_.recv())
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else 1006

    with serving(tmp_path, env=env) as served:
        small = asyncio.run(exchange(served.url, "hi"))
        large = asyncio.run(exchange(served.url, "x" * 100))
    assert (small, large) == ("hi", 1009)  # "message too big" (uvicorn's default: 16 MiB)


def test_serve_names_an_app_it_cannot_find_before_migrating(db_url: str, tmp_path: Path) -> None:
    write_migrations(tmp_path / "migrations", "notes")
    command = [PGLAYER_SCRIPT, "serve", "nosuchapp:app", "--migrations", "migrations"]
    result = subprocess.run(
        command, cwd=tmp_path, env=clean_env(DATABASE_URL=db_url), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot find module 'nosuchapp'" in result.stderr
    assert asyncio.run(_regclass(db_url, "notes")) is None  # nothing applied


def test_serve_without_a_database_url_refuses_when_embedded_is_off(tmp_path: Path) -> None:
    # A production deploy that lost DATABASE_URL: not a new, empty database served.
    (tmp_path / "notesapp.py").write_text(APP)
    command = [PGLAYER_SCRIPT, "serve", "notesapp:app", "--port", str(free_port())]
    env = clean_env(PGLAYER_EMBEDDED="false", PGLAYER_DATA_DIR=str(tmp_path / "data"))
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no DATABASE_URL set, and PGLAYER_EMBEDDED=false" in result.stderr
    assert not (tmp_path / "data").exists()


def test_serve_with_workers_refuses_a_budget_the_workers_would_refuse(
    db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "notesapp.py").write_text(APP)
    max_connections = asyncio.run(_setting(db_url, "max_connections"))
    env = clean_env(
        DATABASE_URL=db_url,
        PGLAYER_MAX_SIZE=str(int(max_connections)),  # two workers of that cannot fit
        PGLAYER_ON_BUDGET_EXCEEDED="refuse",
    )
    port = str(free_port())
    command = [PGLAYER_SCRIPT, "serve", "notesapp:app", "--workers", "2", "--port", port]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "connection budget exceeded" in result.stderr
    assert "serving" not in result.stdout  # refused before any worker started


def test_serve_with_workers_that_fail_to_start_exits_with_their_status(
    db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "brokenapp.py").write_text(
        "from contextlib import asynccontextmanager\n"
        "from fastapi import FastAPI\n"
        "@asynccontextmanager\n"
        "async def lifespan(app):\n"
        "    raise RuntimeError('cannot start')\n"
        "    yield\n"
        "app = FastAPI(lifespan=lifespan)\n"
    )
    port = str(free_port())
    command = [PGLAYER_SCRIPT, "serve", "brokenapp:app", "--workers", "2", "--port", port]
    result = subprocess.run(
        command, cwd=tmp_path, env=clean_env(DATABASE_URL=db_url), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr  # as with one worker


@pytest.mark.parametrize(
    ("source", "options", "said"),
    [
        ("def create_app():\n    raise RuntimeError('no app')\n", ["--factory"],
         "RuntimeError: no app"),
        ("raise ImportError('a missing dependency')\napp = None\n", [],
         "ImportError: a missing dependency"),
        ("app = 42\n", [], "is not an ASGI app"),
        ("import sys\nsys.exit('config missing: SECRET_KEY')\n", [],
         "config missing: SECRET_KEY"),
    ],
)  # fmt: skip
def test_serve_with_workers_whose_app_cannot_be_loaded_exits_at_once(
    db_url: str, tmp_path: Path, source: str, options: list[str], said: str
) -> None:
    # uvicorn's supervisor restarts a worker that fails this way for ever.
    (tmp_path / "badapp.py").write_text(source)
    target = "badapp:create_app" if options else "badapp:app"
    command = [PGLAYER_SCRIPT, "serve", target, *options, "--workers", "2",
               "--port", str(free_port())]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=clean_env(DATABASE_URL=db_url), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert said in result.stderr
    assert result.stderr.count(said) <= 4  # a line and a traceback per worker, not per restart


FACTORIES = """
import functools

from fastapi import FastAPI


def create_app(title="app"):
    return FastAPI(title=title)


class Holder:
    @classmethod
    def create(cls):
        return FastAPI()


class Maker:
    def __call__(self):
        return FastAPI()


partial = functools.partial(create_app, "partial")
make = Maker()
"""


@pytest.mark.parametrize("factory", ["create_app", "Holder.create", "partial", "make"])
@pytest.mark.parametrize(("workers", "status"), [("1", 1), ("2", 3)])
def test_serve_refuses_a_factory_given_as_an_app_and_says_to_add_factory(
    db_url: str, tmp_path: Path, workers: str, status: int, factory: str
) -> None:
    # uvicorn takes a callable of no arguments for an ASGI2 app: every request a 500.
    (tmp_path / "factoryapp.py").write_text(FACTORIES)
    args = "serve", f"factoryapp:{factory}", "--workers", workers, "--port", str(free_port())
    result = run(*args, env=clean_env(DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == status, result.stdout + result.stderr
    assert "as an app factory does, not an ASGI app: add --factory" in result.stderr


@pytest.mark.parametrize(("workers", "status"), [("1", 1), ("2", 3)])
def test_serve_refuses_an_app_given_as_a_factory_and_says_to_drop_factory(
    db_url: str, tmp_path: Path, workers: str, status: int
) -> None:
    (tmp_path / "plainapp.py").write_text("from fastapi import FastAPI\napp = FastAPI()\n")
    args = "serve", "plainapp:app", "--factory", "--workers", workers, "--port", str(free_port())
    result = run(*args, env=clean_env(DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == status, result.stdout + result.stderr
    assert "not an app factory: drop --factory" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_module_that_exits_as_it_is_imported(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    args = "serve", "exits:app", "--port", str(free_port())
    result = run(*args, env=clean_env(DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "called sys.exit(0)" in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_says_in_one_line_why_a_factory_refused_its_settings(
    db_url: str, tmp_path: Path, workers: str
) -> None:
    # An admin token no header can carry, say: ~20 lines of traceback around the reason.
    (tmp_path / "refuses.py").write_text(
        "from pglayer import ConfigurationError\n"
        "def create_app():\n    raise ConfigurationError('the admin token is not usable')\n"
    )
    args = "serve", "refuses:create_app", "--factory", "--workers", workers
    env = clean_env(DATABASE_URL=db_url)
    result = run(*args, "--port", str(free_port()), env=env, cwd=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "the admin token is not usable" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("PGLAYER_ORDER_BATCH_SIZE=0", "PGLAYER_ORDER_BATCH_SIZE: Input should be greater"),
        ("PGLAYER_CURSOR_SECRET= ", "a cursor secret must not be empty or blank"),
    ],
)
def test_serve_says_in_one_line_what_an_apps_settings_refused(
    db_url: str, tmp_path: Path, setting: str, said: str
) -> None:
    # 18 lines of traceback naming a Python field, where `pglayer-shop serve` said one.
    name, _, value = setting.partition("=")
    args = "serve", "pglayer_shop.app:create_app", "--factory", "--port", str(free_port())
    result = run(*args, env=clean_env(DATABASE_URL=db_url, **{name: value}), cwd=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_serve_takes_an_asgi_app_of_any_shape_and_refuses_an_async_factory(
    db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "shapes.py").write_text(
        "from fastapi import FastAPI\n"
        "async def app(*args):\n    pass\n"
        "async def create_app():\n    return FastAPI()\n"
    )
    env = clean_env(DATABASE_URL=db_url)
    from pglayer._serve import check_app

    sys.path.insert(0, str(tmp_path))
    try:
        check_app("shapes:app")  # ASGI3 with *args: served
    finally:
        sys.path.remove(str(tmp_path))
    args = "serve", "shapes:create_app", "--factory", "--port", str(free_port())
    result = run(*args, env=env, cwd=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "is an async factory: make it a plain def" in result.stderr


def test_serve_refuses_an_app_that_is_not_an_asgi_app(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "notapp.py").write_text("app = 42\n")
    result = subprocess.run(
        [PGLAYER_SCRIPT, "serve", "notapp:app", "--port", str(free_port())], cwd=tmp_path,
        env=clean_env(DATABASE_URL=db_url), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "'notapp:app' is not an ASGI app" in result.stderr
    assert "serving" not in result.stdout + result.stderr


async def _setting(url: str, name: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SELECT current_setting($1)", name))
    finally:
        await conn.close()


def test_serve_names_an_attribute_its_module_lacks(db_url: str, tmp_path: Path) -> None:
    write_migrations(tmp_path / "migrations", "notes")
    (tmp_path / "notesapp.py").write_text(APP)
    command = [PGLAYER_SCRIPT, "serve", "notesapp:nosuch", "--migrations", "migrations"]
    result = subprocess.run(
        command, cwd=tmp_path, env=clean_env(DATABASE_URL=db_url), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "module 'notesapp' has no attribute 'nosuch'" in result.stderr
    assert "serving" not in result.stdout + result.stderr


def test_doctor_names_an_app_it_cannot_find(db_url: str, tmp_path: Path) -> None:
    result = run("doctor", "nosuchapp:app", env=clean_env(DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == 0  # a warning: the name alone tells the app's connections
    assert "warning: cannot find module 'nosuchapp'" in " ".join(result.stderr.split())


def test_doctor_names_an_attribute_the_apps_module_lacks(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "notesapp.py").write_text(APP)
    result = run("doctor", "notesapp:nosuch", env=clean_env(DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == 0  # a warning
    said = " ".join(result.stderr.split())
    assert "warning: module 'notesapp' has no attribute 'nosuch'" in said, result.stderr


def test_the_version_is_printed() -> None:
    result = run("--version", env=clean_env())
    assert result.returncode == 0
    assert re.fullmatch(r"pglayer \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout


def test_the_shops_version_is_printed_with_the_librarys() -> None:
    shop = str(Path(sys.executable).with_name("pglayer-shop"))
    result = subprocess.run(
        [shop, "--version"], capture_output=True, text=True, env=clean_env(), check=False
    )
    assert result.returncode == 0
    assert re.fullmatch(r"pglayer-shop \S+ \(pglayer \S+\)\n", result.stdout), result.stdout


def test_the_command_alone_shows_its_help() -> None:
    result = run(env=clean_env())
    assert "Missing command" not in result.stdout + result.stderr
    assert "serve" in result.stdout
    assert "doctor" in result.stdout


async def _regclass(url: str, name: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        found: str | None = await conn.fetchval("SELECT to_regclass($1)::text", name)
        return found
    finally:
        await conn.close()


def test_a_misspelt_setting_is_named_with_the_one_meant() -> None:
    environ = {
        "PGLAYER_MAX_SIZ": "3",
        "pglayer_statement_timeout_s": "1",
        "PGLAYER_MAX_SIZE": "4",  # a setting
        "PGLAYER_WRITE_LOCK_TIMEOUT": "1",  # the shop's own (its settings are loaded here)
        "PGLAYER_SOMETHING_ELSE": "1",  # nothing like a setting: not a typo of one
    }
    assert misspelt_settings(environ) == [
        "PGLAYER_MAX_SIZ is not a setting (ignored): did you mean PGLAYER_MAX_SIZE?",
        "PGLAYER_STATEMENT_TIMEOUT_S is not a setting (ignored): did you mean"
        " PGLAYER_STATEMENT_TIMEOUT?",
    ]


def test_serve_does_not_name_its_server_software(db_url: str, tmp_path: Path) -> None:
    with serving(tmp_path, env=clean_env(DATABASE_URL=db_url)) as served:
        answer = httpx.get(f"{served.url}/notes/count", timeout=5)
    assert answer.status_code == 200
    assert "server" not in answer.headers  # `server: uvicorn`: bytes, and a fingerprint


def test_serve_warns_of_a_misspelt_setting_in_the_apps_log(db_url: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=db_url, PGLAYER_ACCES_LOG="false")
    with serving(tmp_path, env=env) as served:
        assert httpx.get(f"{served.url}/notes/count", timeout=5).status_code == 200
    warned = [x for x in served.output.splitlines() if "did you mean PGLAYER_ACCESS_LOG" in x]
    assert len(warned) == 1, served.output
    assert "WARNING" in warned[0]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("127.0.0.1:5432/app", "not a URL"),
        ("mysql://app:hunter2@127.0.0.1/app", "the scheme is 'mysql'"),
        (
            "postgresql://app:hun@ter2@127.0.0.1/app",
            "must be percent-encoded (%2F, %3F, %23, %40, %2C)",
        ),
        ("postgresql://app:hunter2@127.0.0.1:99999/app", "a port is not one of 1..65535"),
        ("postgresql://app:hunter2@[::1/app", "an IPv6 host needs both brackets"),
        ("postgresql://app:hunter2@127.0.0.1/app?sslmode=bogus", "sslmode 'bogus' is not one"),
    ],
)
def test_a_malformed_url_is_refused_saying_why_and_never_shown(url: str, reason: str) -> None:
    with pytest.raises(ValidationError) as refused:
        DatabaseSettings(url=url)
    assert reason in str(refused.value)
    assert "hunter2" not in str(refused.value)
    assert "ter2" not in str(refused.value)
    with pytest.raises(ValidationError, match="not a URL"):
        DatabaseSettings(replica_urls="postgresql://a@r1/app,r2:5432/app")


def test_a_sqlalchemy_url_is_taken_as_the_postgresql_url_it_names() -> None:
    settings = DatabaseSettings(url="postgresql+asyncpg://app:p%40ss@db.example:5433/app")
    assert settings.dsn() == "postgresql://app:p%40ss@db.example:5433/app"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("sslmode=require", "does not speak SSL, which the URL's sslmode requires"),
        ("bogus=1", 'refused a parameter of the URL: unrecognized configuration parameter "bogus"'),
        (  # the SQLSTATE alone it said, not which parameter or why
            "options=-c%20statement_timeout%3Dx",
            'refused the connection: invalid value for parameter "statement_timeout": "x"',
        ),
    ],
)
def test_doctor_says_which_part_of_the_url_the_server_refused(
    db_url: str, query: str, reason: str
) -> None:
    result = run("doctor", env=clean_env(DATABASE_URL=f"{db_url}?{query}", COLUMNS="300"))
    assert result.returncode == 1
    assert reason in " ".join(result.stdout.split()), result.stdout


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_deadline_must_be_a_finite_number(value: str) -> None:
    with pytest.raises(ValidationError, match="finite number"):
        DatabaseSettings(url="postgresql://app@127.0.0.1/app", acquire_timeout=value)


def test_doctor_given_the_app_finds_the_connections_of_the_shops_serve(
    db_url: str, tmp_path: Path
) -> None:
    # `pglayer-shop serve` names no module:attr on its command line; serve names the app.
    env = clean_env(DATABASE_URL=db_url, COLUMNS="300")
    port = free_port()
    shop = str(Path(sys.executable).with_name("pglayer-shop"))
    command = [shop, "serve", "--no-seed", "--port", str(port)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, **quiet)  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).is_success:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        result = run("doctor", "pglayer_shop.app:create_app", env=env, cwd=tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)  # our own child, by its PID
        proc.wait(60)
    text = " ".join(result.stdout.split())
    assert re.search(r"[1-9][0-9]* connection\(s\) are this app's", text), text


def test_doctor_refuses_a_server_setting_the_app_would_refuse() -> None:
    result = run(
        "doctor", env=clean_env(PGLAYER_LOG_FORMAT="xml", DATABASE_URL="postgresql://u@h/d")
    )
    assert result.returncode == 1
    assert "PGLAYER_LOG_FORMAT" in result.stderr


LOOP_APP = """
import asyncio

from fastapi import FastAPI

app = FastAPI()


@app.get("/loop")
async def loop() -> str:
    return type(asyncio.get_running_loop()).__module__


def create_app() -> FastAPI:
    return app
"""


def test_plain_uvicorn_runs_on_pglayers_loop_and_bounds_as_the_readme_says(
    tmp_path: Path,
) -> None:
    (tmp_path / "loopapp.py").write_text(LOOP_APP)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    options = "--loop pglayer.uvicorn:new_event_loop --http pglayer.uvicorn:HttpProtocol"
    assert f"uvicorn notes:create_app --factory {options}\n" in readme
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "loopapp:create_app", "--factory", *options.split(),
               "--port", str(port)]  # fmt: skip
    env = clean_env(PGLAYER_MAX_HEADER_SIZE="4096")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/loop", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert answer.json() == "pglayer._loop"
        big = httpx.get(f"http://127.0.0.1:{port}/loop", headers={"x-big": "x" * 5000})
        assert big.status_code == 431
        assert big.headers["content-type"] == "application/problem+json"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_on_a_port_in_use_says_so_before_migrating(db_url: str, tmp_path: Path) -> None:
    write_migrations(tmp_path / "migrations", "notes")
    (tmp_path / "notesapp.py").write_text(APP)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [PGLAYER_SCRIPT, "serve", "notesapp:app", "--migrations", "migrations",
             "--port", str(port)],
            cwd=tmp_path, env=clean_env(DATABASE_URL=db_url), capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr + result.stdout
    assert "choose another port with --port" in " ".join((result.stderr + result.stdout).split())
    assert "Traceback" not in result.stderr
    assert "applied" not in result.stdout  # nothing migrated


def test_workers_end_with_a_serve_that_is_killed(db_url: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=db_url)
    with serving(tmp_path, "--workers", "2", env=env) as served:
        assert httpx.get(f"{served.url}/notes/count", timeout=5).status_code == 200
        workers = [p for p in children_of(served.proc.pid) if _cmdline(p).find(b"spawn") >= 0]
        assert len(workers) == 2, [_cmdline(p) for p in children_of(served.proc.pid)]
        served.proc.kill()  # SIGKILL: no drain, no word to the workers
        try:
            deadline = time.monotonic() + 20
            while any(_alive(p) for p in workers) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(_alive(p) for p in workers)
        finally:
            for pid in workers:  # left serving if the test fails: ended here, by PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended (its parent, killed, cannot reap it)


def test_serve_on_port_zero_says_the_port_it_serves_on(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "notesapp.py").write_text(APP)
    write_migrations(tmp_path / "migrations", "notes")
    command = [PGLAYER_SCRIPT, "serve", "notesapp:app", "--migrations", "migrations",
               "--port", "0"]  # fmt: skip
    env = clean_env(DATABASE_URL=db_url)
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert proc.stdout is not None
        said = ""
        while "serving notesapp:app on" not in said:
            line = proc.stdout.readline()
            assert line, said
            said += line
        url = said.rsplit("serving notesapp:app on ", 1)[1].split()[0]
        assert not url.endswith(":0")
        deadline = time.monotonic() + 30
        while True:  # said just before uvicorn binds it
            try:
                assert httpx.get(f"{url}/notes/count", timeout=5).status_code == 200
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_a_hang_up_ends_serve_as_sigterm_does(tmp_path: Path, data_dir: Path) -> None:  # noqa: F811
    with serving(tmp_path, "--data-dir", str(data_dir), env=clean_env()) as served:
        assert httpx.get(f"{served.url}/notes/count", timeout=5).status_code == 200
        served.proc.send_signal(signal.SIGHUP)  # the terminal closed
        served.proc.wait(timeout=60)
    assert served.proc.returncode == 0, served.output
    assert EmbeddedPostgres(data_dir).running_port() is None  # stopped what it started


def test_a_forced_quit_says_in_two_warnings_what_it_cut_and_skipped(
    db_url: str, tmp_path: Path
) -> None:
    # It said "the shutdown's grace ran out" (there was none) and an ERROR with a traceback.
    with serving(tmp_path, env=clean_env(DATABASE_URL=db_url)) as served:
        slow = threading.Thread(
            target=lambda: httpx.get(f"{served.url}/notes/slow", timeout=30), daemon=True
        )
        slow.start()
        deadline = time.monotonic() + 30
        while not (tmp_path / "entered").exists():
            assert time.monotonic() < deadline, "the slow request never started"
            time.sleep(0.05)
        served.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)  # into the drain: uvicorn takes the second as a forced quit
        served.proc.send_signal(signal.SIGINT)
        served.proc.wait(timeout=30)
    assert served.proc.returncode == 130  # it was 0, as if it had drained
    assert "a request was cancelled: the server quit at once" in served.output, served.output
    assert "WARNING uvicorn.error [-] quit at once: the app's shutdown was skipped" in served.output
    assert "grace ran out" not in served.output
    assert "Traceback" not in served.output
    slow.join(30)


@pytest.mark.parametrize(("sent", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_stop_while_serve_waits_for_the_database_says_so(
    tmp_path: Path, sent: signal.Signals, code: int
) -> None:
    # It ended without a word: the operator could not tell it from a crash or a success.
    (tmp_path / "notesapp.py").write_text(APP)
    env = clean_env(DATABASE_URL="postgresql://x@127.0.0.1:1/x", PGLAYER_STARTUP_TIMEOUT="60")
    command = [PGLAYER_SCRIPT, "serve", "notesapp:app", "--port", str(free_port())]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert proc.stdout is not None
        said = proc.stdout.readline()
        assert "retrying for up to 60s" in said, said
        proc.send_signal(sent)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, output
    assert f"stopped before serving ({sent.name})" in output, output


def test_doctor_says_a_port_that_is_not_postgresql_may_be_the_mistake() -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:  # answers what HTTP would
        port = other.getsockname()[1]

        def answer() -> None:
            conn, _ = other.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        url = f"postgresql://app@127.0.0.1:{port}/app"
        result = run("doctor", env=clean_env(DATABASE_URL=url, COLUMNS="300"))
    assert result.returncode == 1
    assert "is it a PostgreSQL server at that port?" in " ".join(result.stdout.split())


async def test_doctor_shows_text_from_the_server_as_it_is(db_url: str) -> None:
    # Another client's application_name is not Rich markup (`[/bold]` raised MarkupError).
    name = "[/bold] :fire: [red]x"
    other = await asyncpg.connect(db_url, server_settings={"application_name": name})
    try:
        env = clean_env(DATABASE_URL=db_url, COLUMNS="300")
        result = await asyncio.to_thread(run, "doctor", env=env)
    finally:
        await other.close()
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert f"by '{name}'" in result.stdout


def test_a_log_level_that_is_not_one_is_refused_in_one_line() -> None:
    env = clean_env(PGLAYER_LOG_LEVEL="LOUD", DATABASE_URL="postgresql://x@127.0.0.1/x")
    result = run("migrate", "--dir", ".", env=env)
    assert result.returncode == 1
    assert "PGLAYER_LOG_LEVEL: Value error, must be DEBUG, INFO" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_migrate_warns_of_a_directory_without_migrations(db_url: str, tmp_path: Path) -> None:
    result = run("migrate", "--dir", str(tmp_path), env=clean_env(DATABASE_URL=db_url))
    assert result.returncode == 0, result.stderr
    assert f"warning: no NNNN_name.sql files in {tmp_path}" in result.stderr


def test_migrate_without_a_database_url_says_how_the_embedded_server_is_migrated(
    tmp_path: Path,
) -> None:
    result = run("migrate", "--dir", str(tmp_path), env=clean_env())
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "pglayer serve APP --migrations DIR" in message, message


async def test_migrate_timeout_bounds_the_wait_for_another_run(db_url: str, tmp_path: Path) -> None:
    # pglayer's own tables are migrated first: their wait for the lock is the run's too.
    from pglayer.migrations import LOCK_KEY

    write_migrations(tmp_path / "migrations", "notes")
    other = await asyncpg.connect(db_url)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)  # another run, going on
        command = ("migrate", "--dir", str(tmp_path / "migrations"), "--timeout", "2")
        env = clean_env(DATABASE_URL=db_url)
        started = time.monotonic()
        result = await asyncio.to_thread(run, *command, env=env)
        took = time.monotonic() - started
    finally:
        await other.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"waited [12](\.\d+)? s for another process's migrations", result.stderr)
    assert took < 20


def test_serve_with_workers_and_a_budget_to_refuse_says_a_down_database_in_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "notesapp.py").write_text(APP)
    env = clean_env(DATABASE_URL=f"postgresql://app@127.0.0.1:{free_port()}/app",
                    PGLAYER_ON_BUDGET_EXCEEDED="refuse", PGLAYER_STARTUP_TIMEOUT="1")  # fmt: skip
    result = subprocess.run(
        [PGLAYER_SCRIPT, "serve", "notesapp:app", "--workers", "2", "--port", str(free_port())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "database not reachable within 1s" in result.stderr + result.stdout


def test_migrate_dir_dot_names_the_history_after_the_directory_itself(
    db_url: str, tmp_path: Path
) -> None:
    directory = write_migrations(tmp_path / "notes", "notes")
    env = clean_env(DATABASE_URL=db_url)
    assert run("migrate", "--dir", str(directory), env=env).returncode == 0
    again = run("migrate", "--dir", ".", env=env, cwd=directory)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up to date" in again.stderr


LATE_COMMIT_APP = """
from typing import Annotated

from fastapi import Depends, FastAPI

from pglayer import Connection, Database
from pglayer.fastapi import setup, transaction_dependency

app = FastAPI()
setup(app, Database())
Late = Annotated[Connection, Depends(transaction_dependency())]


@app.post("/late")
async def late(conn: Late) -> None:
    await conn.execute("SELECT 1")
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_says_why_an_app_refuses_to_start_in_one_line(
    db_url: str, tmp_path: Path, workers: str
) -> None:
    (tmp_path / "lateapp.py").write_text(LATE_COMMIT_APP)
    args = "serve", "lateapp:app", "--workers", workers, "--port", str(free_port())
    result = run(*args, env=clean_env(DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot start: " in result.stderr
    assert "/late" in result.stderr
    assert "Traceback" not in result.stderr


async def test_migrate_names_a_linked_directory_after_the_link_as_it_always_did(
    db_url: str, tmp_path: Path
) -> None:
    directory = write_migrations(tmp_path / "real" / "migrations", "linked")
    (tmp_path / "app_sql").symlink_to(directory)
    result = run("migrate", "--dir", str(tmp_path / "app_sql"), env=clean_env(DATABASE_URL=db_url))
    assert result.returncode == 0, result.stderr
    assert "app_sql/0001_schema.sql" in result.stderr
