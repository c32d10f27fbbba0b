"""The `pglayer-shop` command: serve the shop, migrate, seed, bench."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import pglayer
from pglayer import Database, DatabaseSettings, PglayerError, configure_logging
from pglayer_shop.schema import HISTORY, apply_migrations, migrations_directory
from pglayer_shop.seed import MAX_ORDERS, MAX_PRODUCTS, MAX_USERS, SeedCounts, is_empty, seed
from pglayer_shop.settings import ShopSettings

__all__ = ["app", "main"]

app = typer.Typer(help="pglayer-shop: the reference service and its tools.", no_args_is_help=True)
# Paths and errors are never markup or emoji codes, and lines are not wrapped.
console = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)
log = logging.getLogger("pglayer_shop.cli")


def _version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"pglayer-shop {version('pglayer-shop')} (pglayer {version('pglayer')})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version"),
    ] = False,
) -> None:
    """pglayer-shop: the reference service and its tools."""


DataDir = Annotated[
    Path,
    typer.Option(envvar="PGLAYER_DATA_DIR", help="Embedded PostgreSQL directory (no DATABASE_URL)"),
]


_log = logging.getLogger("pglayer_shop")


def _configure_logging() -> None:
    shop = ShopSettings()
    configure_logging(format=shop.log_format or "text", level=shop.log_level)


def _json_logs() -> bool:
    return os.environ.get("PGLAYER_LOG_FORMAT", "").strip().lower() == "json"


def _say(text: str) -> None:
    """A line for the operator: under JSON logs a record (every line of stderr a JSON
    object, for a shipper that reads them so), else plain."""
    if _json_logs():
        _log.info("%s", text)
    else:
        console.print(text, markup=False)


async def _migrate(settings: DatabaseSettings) -> list[str]:
    async with Database(settings) as db:
        return await apply_migrations(db)


async def _seed_rows(db: Database, counts: SeedCounts, *, only_if_empty: bool = False) -> None:
    total = counts.users + counts.products + counts.orders
    with Progress(
        TextColumn("[bold]seeding[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=_json_logs(),  # a bar is not a JSON line
    ) as bar:
        task = bar.add_task("rows", total=total)

        def progress(table: str, rows: int) -> None:
            bar.update(task, advance=rows, description=table)

        if _json_logs():  # no bar: its start as a record
            _say(
                f"seeding {counts.users} users, {counts.products} products, {counts.orders} orders"
            )
        await seed(db, counts, progress=progress, only_if_empty=only_if_empty)


async def _seed(settings: DatabaseSettings, counts: SeedCounts) -> None:
    # Its COPYs are long by design: not slow queries to warn of over the progress bar.
    async with Database(settings.model_copy(update={"slow_query_threshold": 0})) as db:
        await _seed_rows(db, counts)


@contextlib.contextmanager
def _database(data_dir: Path) -> Iterator[None]:
    """`DATABASE_URL`, or else the embedded server in `data_dir` (the one `serve` uses),
    started or reused for this command."""
    settings = DatabaseSettings()
    if settings.url is not None:
        yield
        return
    if not settings.embedded:
        raise pglayer.ConfigurationError(
            "no DATABASE_URL set, and PGLAYER_EMBEDDED=false: set DATABASE_URL"
            " (or unset PGLAYER_EMBEDDED for an embedded PostgreSQL)"
        )
    port = settings.embedded_port or None
    embedded = pglayer.EmbeddedPostgres(data_dir, database="shop", port=port)
    os.environ["DATABASE_URL"] = embedded.start()
    _say(f"no DATABASE_URL: using the embedded PostgreSQL in {embedded.data_dir}")
    try:
        yield
    finally:
        embedded.stop()


def _variable(loc: tuple[int | str, ...]) -> str:
    """The environment variable a settings error is about (every setting is PGLAYER_*)."""
    if not loc:
        return "settings"
    return "DATABASE_URL" if loc[0] == "url" else f"PGLAYER_{str(loc[0]).upper()}"


def _fail(message: str) -> typer.Exit:
    if _json_logs():
        if not logging.getLogger().handlers:  # refused before logging was set up
            configure_logging(format="json")
        _log.error("%s", message)
    else:
        console.print(f"[red]error:[/] {escape(message)}")  # one line, however narrow
    return typer.Exit(code=1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (at most 128)")] = 1,
    seed_data: Annotated[
        bool, typer.Option("--seed/--no-seed", help="Seed an empty database")
    ] = True,
    data_dir: DataDir = Path(".pglayer"),
) -> None:
    """Serve the shop; with no DATABASE_URL, on an embedded PostgreSQL."""
    ShopSettings()  # refused here, not by each worker after "serving" was said

    async def prepare(db: Database) -> None:
        if seed_data and await is_empty(db):  # checked again under the seed's lock
            await _seed_rows(db, SeedCounts(), only_if_empty=True)

    try:
        pglayer.serve(
            "pglayer_shop.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            data_dir=data_dir,
            database="shop",
            # With pglayer's own tables, in one run: a refused file applies nothing.
            migrations=[migrations_directory()],
            histories=[HISTORY],
            prepare=prepare,
            say=_say,
        )
    except PglayerError as exc:
        raise _fail(str(exc)) from None


@app.command()
def migrate(data_dir: DataDir = Path(".pglayer")) -> None:
    """Apply the schema to DATABASE_URL, else to the embedded server (safe from several
    processes at once)."""
    _configure_logging()
    try:
        with _database(data_dir):
            applied = asyncio.run(_migrate(DatabaseSettings.for_command()))
    except PglayerError as exc:
        raise _fail(str(exc)) from None
    # Named as `serve` names them: each with its history.
    named = [name if "/" in name else f"{HISTORY}/{name}" for name in applied]
    _say(f"applied migrations: {', '.join(named)}" if applied else "schema is up to date")


@app.command("seed")
def seed_command(
    users: Annotated[int, typer.Option(min=0, max=MAX_USERS)] = 1_000,
    products: Annotated[int, typer.Option(min=0, max=MAX_PRODUCTS)] = 100,
    orders: Annotated[int, typer.Option(min=0, max=MAX_ORDERS)] = 5_000,
    data_dir: DataDir = Path(".pglayer"),
) -> None:
    """Bulk-load demo data with COPY into DATABASE_URL, else into the embedded server."""
    _configure_logging()
    try:
        counts = SeedCounts(users, products, orders)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    started = time.perf_counter()
    try:
        with _database(data_dir):
            settings = DatabaseSettings.for_command()
            asyncio.run(_migrate(settings))
            asyncio.run(_seed(settings, counts))
    except PglayerError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:  # it ended without a word: was anything seeded?
        _fail("interrupted: nothing was seeded (the rows go in one transaction)")
        raise typer.Exit(code=130) from None
    _say(
        f"seeded {users} users, {products} products, {orders} orders "
        f"in {time.perf_counter() - started:.1f}s"
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """The load benchmark (benchmarks/ in a checkout); `pglayer-shop bench --help` for options."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "benchmarks" / "run.py").exists():
        raise _fail("pglayer-shop bench runs from a source checkout (benchmarks/ not found)")
    # A child process: the benchmark starts and stops servers and must own its signals.
    # Passed on, not acted on: killed mid-run, the child would leave its servers running
    # (subprocess.call kills it on Ctrl-C; a SIGTERM would orphan it).
    relay = _Relay()
    forward = {each: signal.signal(each, relay) for each in _STOPPING}
    try:
        code = relay.run([sys.executable, "-m", "benchmarks", *ctx.args], root)
    finally:
        for each, handler in forward.items():
            signal.signal(each, handler)
    # Ended by a signal before it handles them (still starting): as a shell says it (241
    # was -15 modulo 256).
    raise typer.Exit(code=128 - code if code < 0 else code)


_STOPPING = (signal.SIGINT, signal.SIGTERM)


class _Relay:
    """A signal handler that passes each signal on to the child it runs; one that comes
    while the child is being started is passed on once it is."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: list[int] = []

    def __call__(self, signum: int, _frame: object) -> None:
        if self.child is None:
            self.pending.append(signum)
        elif self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self, args: list[str], cwd: Path) -> int:
        self.child = subprocess.Popen(args, cwd=cwd)
        for signum in self.pending:
            self.child.send_signal(signum)
        return self.child.wait()


def main() -> None:
    try:
        if _json_logs():
            raise SystemExit(_run_for_json())
        app()
    except ValidationError as exc:  # a setting from the environment: one line, not a traceback
        errors = exc.errors(include_input=False, include_url=False)
        wrong = "; ".join(f"{_variable(e['loc'])}: {e['msg']}" for e in errors)
        raise SystemExit(_fail(f"invalid settings: {wrong}").exit_code) from None
    except SettingsError as exc:  # a value pydantic-settings could not parse (JSON)
        field = re.search(r'for field "(\w+)"', str(exc))
        said = f"{_variable((field[1],))}: not valid JSON" if field else str(exc)
        raise SystemExit(_fail(f"invalid settings: {said}").exit_code) from None


def _run_for_json() -> int:
    """The command with its usage errors as JSON records, as every other line is then (typer
    draws them in boxes); its exit code."""
    if len(sys.argv) < 2:  # typer would print its help to stdout before the error
        return _usage("no command given (see --help)")
    try:
        return int(app(standalone_mode=False) or 0)
    except typer.Abort:
        return _fail("aborted").exit_code
    except Exception as exc:
        # click's usage errors (typer carries its own copy of click: told by their shape).
        said, code = getattr(exc, "format_message", None), getattr(exc, "exit_code", None)
        if not callable(said) or not isinstance(code, int):
            raise
        _usage(said())
        return code


def _usage(message: str) -> int:
    _fail(f"usage: {message}")
    return 2
