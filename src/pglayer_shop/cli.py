"""The `pglayer` command: serve the shop, migrate, seed."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pglayer import Database, DatabaseSettings, PglayerError
from pglayer._doctor import diagnose
from pglayer._embedded import EmbeddedPostgres
from pglayer._http import PROTOCOL as BOUNDED_HTTP
from pglayer._logs import configure_logging
from pglayer_shop.schema import apply_migrations
from pglayer_shop.seed import SeedCounts, is_empty, seed
from pglayer_shop.settings import ShopSettings

__all__ = ["app", "main"]

app = typer.Typer(help="pglayer: the shop service and its tools.", no_args_is_help=True)
console = Console(stderr=True)
log = logging.getLogger("pglayer.cli")

DataDir = Annotated[
    Path,
    typer.Option(envvar="PGLAYER_DATA_DIR", help="Embedded PostgreSQL directory (no DATABASE_URL)"),
]


def _configure_logging() -> None:
    shop = ShopSettings()
    configure_logging(format=shop.log_format or "text", level=shop.log_level)


def _settings() -> DatabaseSettings:
    # The CLI waits for the database: a migration or seed against nothing is a failure.
    return DatabaseSettings(
        require_on_startup=True, min_size=1, max_size=2, on_budget_exceeded="ignore"
    )


async def _migrate(settings: DatabaseSettings) -> list[str]:
    async with Database(settings) as db:
        return await apply_migrations(db)


async def _seed(settings: DatabaseSettings, counts: SeedCounts, only_if_empty: bool) -> bool:
    async with Database(settings) as db:
        if only_if_empty and not await is_empty(db):
            return False
        total = counts.users + counts.products + counts.orders
        with Progress(
            TextColumn("[bold]seeding[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("rows", total=total)

            def progress(table: str, rows: int) -> None:
                bar.update(task, advance=rows, description=table)

            await seed(db, counts, progress=progress)
        return True


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/] {message}")
    return typer.Exit(code=1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    seed_data: Annotated[
        bool, typer.Option("--seed/--no-seed", help="Seed an empty database")
    ] = True,
    data_dir: DataDir = Path(".pglayer"),
) -> None:
    """Serve the shop; with no DATABASE_URL, on an embedded PostgreSQL."""
    # Every worker process builds its app from the environment, as a user's would.
    os.environ.setdefault("PGLAYER_LOG_FORMAT", "text")
    os.environ.setdefault("PGLAYER_ACCESS_LOG", "true")
    os.environ.setdefault("PGLAYER_FREEZE_GC", "true")
    os.environ["PGLAYER_WORKERS"] = str(workers)
    _configure_logging()
    embedded: EmbeddedPostgres | None = None
    metrics_dir: Path | None = None
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Any worker answers /metrics for all of them (see pglayer.fastapi.metrics).
        metrics_dir = Path(tempfile.mkdtemp(prefix="pglayer-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        if DatabaseSettings().url is None:
            embedded = EmbeddedPostgres(data_dir, database="shop")
            console.print(f"no DATABASE_URL: using embedded PostgreSQL in {embedded.data_dir}")
            # Worker processes read the URL from the environment, as a user's would.
            os.environ["DATABASE_URL"] = embedded.start()
        settings = _settings()
        applied = asyncio.run(_migrate(settings))
        if applied:
            console.print(f"applied migrations: {', '.join(applied)}")
        if seed_data:
            asyncio.run(_seed(settings, SeedCounts(), only_if_empty=True))
        console.print(f"serving the shop on http://{host}:{port} (docs at /docs)")
        uvicorn.run(
            "pglayer_shop.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            loop="uvloop",
            http=BOUNDED_HTTP,  # httptools with header size, header and body time bounds
            timeout_graceful_shutdown=10,
            log_config=None,
            access_log=False,  # pglayer's own access log carries the request id
        )
    except PglayerError as exc:
        raise _fail(str(exc)) from None
    finally:
        if embedded is not None:
            embedded.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command()
def migrate() -> None:
    """Apply the schema to DATABASE_URL (safe from several processes at once)."""
    _configure_logging()
    try:
        applied = asyncio.run(_migrate(_settings()))
    except PglayerError as exc:
        raise _fail(str(exc)) from None
    console.print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@app.command("seed")
def seed_command(
    users: Annotated[int, typer.Option(min=0)] = 1_000,
    products: Annotated[int, typer.Option(min=0)] = 100,
    orders: Annotated[int, typer.Option(min=0)] = 5_000,
) -> None:
    """Bulk-load demo data into DATABASE_URL with COPY."""
    _configure_logging()
    try:
        counts = SeedCounts(users, products, orders)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    started = time.perf_counter()
    try:
        settings = _settings()
        asyncio.run(_migrate(settings))
        asyncio.run(_seed(settings, counts, only_if_empty=False))
    except PglayerError as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"seeded {users} users, {products} products, {orders} orders "
        f"in {time.perf_counter() - started:.1f}s"
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """The load benchmark (benchmarks/ in a checkout); `pglayer bench --help` for options."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "run.py").exists():
        raise _fail("pglayer bench runs from a source checkout (benchmarks/ not found)")
    # A child process: the benchmark starts and stops servers and must own its signals.
    code = subprocess.call([sys.executable, "-m", "benchmarks", *ctx.args], cwd=root)
    raise typer.Exit(code=code)


@app.command()
def doctor(
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Worker processes planned (default: PGLAYER_WORKERS, else detected)"
        ),
    ] = None,
    reserve: Annotated[
        int, typer.Option(min=0, help="Connections to keep free for admins, migrations, cron")
    ] = 5,
) -> None:
    """Check DATABASE_URL: reachable, version, connection budget, pooler; exit 1 on a problem."""
    settings = DatabaseSettings()
    if settings.url is None:
        raise _fail("no DATABASE_URL set (pglayer serve would start an embedded PostgreSQL)")
    diagnosis = asyncio.run(diagnose(settings, workers=workers, reserve=reserve))
    table = Table(title=f"pglayer doctor: {diagnosis.target}", show_lines=False)
    table.add_column("check")
    table.add_column("")
    table.add_column("detail", overflow="fold")
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for finding in diagnosis.findings:
        table.add_row(finding.check, marks[finding.level], finding.detail)
    out = Console()
    out.print(table)
    if not diagnosis.failed and diagnosis.findings:
        cache = settings.statement_cache_size
        pooler = diagnosis.facts.get("pooler")
        if pooler in ("transaction", "statement") and not diagnosis.facts.get(
            "prepared_statements", True
        ):
            cache = 0
        out.print(
            "pglayer will use: "
            f"pool {settings.min_size}..{settings.max_size} per worker, "
            f"statement_cache_size={cache}, "
            + ("only application_name as startup parameter, " if pooler else "")
            + f"acquire_timeout={settings.acquire_timeout:g}s, "
            f"statement_timeout={settings.statement_timeout:g}s"
        )
    if diagnosis.failed:
        raise typer.Exit(code=1)


def main() -> None:
    app()
