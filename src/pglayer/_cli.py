"""The `pglayer` command, for any app built on pglayer: serve, migrate, doctor."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise SystemExit("the pglayer command needs its extra: pip install 'pglayer[cli]'") from exc

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

from pglayer._doctor import Diagnosis, diagnose
from pglayer._errors import PglayerError
from pglayer._logs import configure_logging
from pglayer._serve import apply_directories, check_app, serve
from pglayer._settings import DatabaseSettings, ServerSettings, invalid_fields, setting_variable
from pglayer.migrations import DEFAULT_TIMEOUT, load_migrations

__all__ = ["app", "invalid_settings", "main", "print_diagnosis", "print_settings"]

app = typer.Typer(
    help="pglayer: serve, migrate and check an app built on pglayer.", no_args_is_help=True
)
# Text from elsewhere (a server's application names, paths, errors) is never markup or emoji
# codes (`[/bold]` raised MarkupError, `:fire:` became an emoji), and lines are not wrapped.
console = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)
out = Console(emoji=False, highlight=False, soft_wrap=True)
_log = logging.getLogger("pglayer.cli")


def _json_logs() -> bool:
    return os.environ.get("PGLAYER_LOG_FORMAT", "").strip().lower() == "json"


def _record(level: int, message: str) -> None:
    """`message` as a JSON log record of pglayer.cli (logging set up here if it is not)."""
    if not logging.getLogger().handlers:  # before the command set logging up, or refused
        configure_logging(format="json")
    _log.log(level, "%s", message)


def say(text: str) -> None:
    """A line of the command's own output to stderr, as it is (no markup); a JSON record
    under `PGLAYER_LOG_FORMAT=json`, as every other line then."""
    if _json_logs():
        _record(logging.INFO, text)
    else:
        console.print(text, markup=False)


def warn(text: str) -> None:
    """A warning of the command's own, as `say` writes a line."""
    if _json_logs():
        _record(logging.WARNING, text)
    else:
        console.print(f"[yellow]warning:[/] {escape(text)}")


def _version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"pglayer {version('pglayer')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version"),
    ] = False,
) -> None:
    """pglayer: serve, migrate and check an app built on pglayer."""


Migrations = Annotated[
    list[Path] | None,
    typer.Option(
        "--migrations",
        exists=True,
        file_okay=False,
        help="A directory of NNNN_name.sql migrations to apply first (repeatable)",
    ),
]
Histories = Annotated[
    list[str] | None,
    typer.Option(
        "--history",
        help="The history of each --migrations directory in turn (default: its name, or,"
        " where a history of that name holds none of its files, its parent's and its own:"
        " app/migrations)",
    ),
]


def fail(message: str) -> typer.Exit:
    """Print `message` as an error (a JSON record under `PGLAYER_LOG_FORMAT=json`, as every
    other line then); the exit to raise."""
    if _json_logs():
        _record(logging.ERROR, message)
    else:
        # One line however narrow the terminal: scripts grep it, and logs keep it whole.
        console.print(f"[red]error:[/] {escape(message)}")
    return typer.Exit(code=1)


@app.command("serve")
def serve_command(
    target: Annotated[str, typer.Argument(metavar="APP", help="The ASGI app, as module:attr")],
    migrations: Migrations = None,
    history: Histories = None,
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (at most 128)")] = 1,
    factory: Annotated[bool, typer.Option(help="APP is a function that returns the app")] = False,
    data_dir: Annotated[
        Path,
        typer.Option(envvar="PGLAYER_DATA_DIR", help="Embedded PostgreSQL directory"),
    ] = Path(".pglayer"),
) -> None:
    """Serve APP; with no DATABASE_URL, on an embedded PostgreSQL, migrations applied first."""
    database = target.split(":", 1)[0].rsplit(".", 1)[-1] or "app"
    try:
        serve(
            target,
            factory=factory,
            host=host,
            port=port,
            workers=workers,
            migrations=migrations or [],
            histories=history or [],
            data_dir=data_dir,
            database=database,
            say=say,
        )
    except PglayerError as exc:
        raise fail(str(exc)) from None


@app.command()
def migrate(
    directory: Annotated[
        Path,
        typer.Option(
            "--dir", exists=True, file_okay=False, help="The directory of NNNN_name.sql files"
        ),
    ],
    history: Annotated[
        str | None,
        typer.Option(
            help="The directory's history (default: its name, or, where a history of that"
            " name holds none of its files, its parent's and its own: app/migrations)"
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            min=1,
            max=7 * 86400,
            help="Seconds the run may take, waiting for another process's run included (its"
            " statements are not bound by PGLAYER_QUERY_TIMEOUT or statement_timeout)",
        ),
    ] = DEFAULT_TIMEOUT,
) -> None:
    """Apply a directory's migrations to DATABASE_URL, in a history of its own, so that
    another app's `0001_...` never collides with its own."""
    if _json_logs():  # every line a record, what is applied included
        configure_logging(format="json", level="INFO")
    else:
        configure_logging(format=ServerSettings().log_format or "text", level="WARNING")
    if DatabaseSettings().url is None:
        raise fail(
            "no DATABASE_URL set: set it (for the embedded server,"
            " postgresql://postgres:PASSWORD@127.0.0.1:PORT/DATABASE with the port and database"
            " `pglayer serve` prints and the password in its data directory's `password` file),"
            " or let `pglayer serve APP --migrations DIR` apply DIR as it starts"
        )
    try:
        if not load_migrations(directory):
            warn(f"no NNNN_name.sql files in {directory}")
    except PglayerError as exc:
        raise fail(str(exc)) from None
    try:
        histories = [] if history is None else [history]  # "" is refused, not the default
        applied = asyncio.run(
            apply_directories(
                DatabaseSettings.for_command(), [directory], None, histories, timeout=timeout
            )
        )
    except PglayerError as exc:
        raise fail(str(exc)) from None
    say(f"applied: {', '.join(applied)}" if applied else "up to date")


@app.command()
def doctor(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="[APP]",
            help="The app (module:attr) as it is served, run from its directory: its"
            " connections are then told from others' (as its default application_name is)",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Worker processes planned (default: PGLAYER_WORKERS, else 1)"),
    ] = None,
    reserve: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Connections to keep free for admins, migrations, cron"
            " (default: PGLAYER_CONNECTION_RESERVE, else 5)",
        ),
    ] = None,
    settings_only: Annotated[
        bool, typer.Option("--settings", help="Print every setting and its value, and stop")
    ] = False,
) -> None:
    """Check DATABASE_URL: reachable, version, connection budget, pooler; exit 1 on a problem."""
    if target is not None:
        try:
            check_app(target, factory=None)
        except PglayerError as exc:  # its name still names its connections: go on
            warn(str(exc))
    settings, server = DatabaseSettings(), ServerSettings()  # both as the app reads them
    if settings_only:
        print_settings(settings, server, as_json=_json_logs())
        return
    if settings.url is None:
        raise fail("no DATABASE_URL set (pglayer serve would start an embedded PostgreSQL)")
    if reserve is None:
        reserve = settings.connection_reserve
    diagnosis = asyncio.run(diagnose(settings, workers=workers, reserve=reserve))
    print_diagnosis(diagnosis, settings, as_json=_json_logs())
    if diagnosis.failed:
        raise typer.Exit(code=1)


def print_settings(*groups: BaseSettings, as_json: bool = False) -> None:
    """Every setting of `groups`: its variable, its effective value (secrets masked), and
    what it does; a table, or (`as_json`) one JSON document on one line."""
    rows = [
        (setting_variable(name), _shown(name, getattr(settings, name)), field.description or "")
        for settings in groups
        for name, field in type(settings).model_fields.items()
    ]
    if as_json:
        keys = ("variable", "value", "meaning")
        print(json.dumps({"settings": [dict(zip(keys, row, strict=True)) for row in rows]}))
        return
    table = Table(title="pglayer settings", show_lines=False)
    for column in ("variable", "value", "meaning"):
        table.add_column(column, overflow="fold")
    for variable, value, meaning in rows:
        table.add_row(variable, escape(value), escape(meaning))
    out.print(table)


def _shown(name: str, value: object) -> str:
    from pydantic import SecretStr

    from pglayer._dsn import mask_dsn

    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        # A URL shows all but its password; any other secret (a token) shows nothing.
        return mask_dsn(secret) if "://" in secret else "*** (set)"
    if isinstance(value, list) and all(isinstance(v, SecretStr) for v in value):
        return ", ".join(mask_dsn(v.get_secret_value()) for v in value) or "(none)"
    return "(not set)" if value is None else repr(value)


def print_diagnosis(
    diagnosis: Diagnosis, settings: DatabaseSettings, *, as_json: bool = False
) -> None:
    """The findings as a table, and the pool pglayer will use when nothing failed; or
    (`as_json`) both in one JSON document on one line."""
    use = None if diagnosis.failed or not diagnosis.findings else _will_use(diagnosis, settings)
    if as_json:
        findings = [dataclasses.asdict(f) for f in diagnosis.findings]
        print(json.dumps({"target": diagnosis.target, "failed": diagnosis.failed,
                          "findings": findings, "will_use": use}))  # fmt: skip
        return
    table = Table(title=f"pglayer doctor: {diagnosis.target}", show_lines=False)
    table.add_column("check")
    table.add_column("")
    table.add_column("detail", overflow="fold")
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for finding in diagnosis.findings:
        table.add_row(escape(finding.check), marks[finding.level], escape(finding.detail))
    out.print(table)
    if use is not None:
        out.print(f"pglayer will use: {use}", markup=False)


def _will_use(diagnosis: Diagnosis, settings: DatabaseSettings) -> str:
    """The pool pglayer will use against the server diagnosed."""
    cache = settings.statement_cache_size
    pooler = diagnosis.facts.get("pooler")
    if pooler in ("transaction", "statement") and not diagnosis.facts.get(
        "prepared_statements", True
    ):
        cache = 0
    server_ms = diagnosis.facts.get("server_timeouts_ms", {}).get("statement_timeout")
    statement_timeout = (
        f"{int(settings.server_settings()['statement_timeout']) / 1000:g}s"  # as sent: 1 ms least
        if server_ms is None
        else f"{server_ms / 1000:g}s (the role's: a transaction pooler drops pglayer's)"
    )
    return (
        f"pool {settings.min_size}..{settings.max_size} per worker, "
        f"statement_cache_size={cache}, "
        + ("only application_name as startup parameter, " if pooler else "")
        + f"acquire_timeout={settings.acquire_timeout:g}s, "
        f"statement_timeout={statement_timeout}"
    )


def main() -> None:
    try:
        if _json_logs():
            raise SystemExit(_run_for_json(app))
        app()
    except ValidationError as exc:  # a setting from the environment: one line, not a traceback
        raise SystemExit(fail(f"invalid settings: {invalid_settings(exc)}").exit_code) from None
    except SettingsError as exc:  # a value pydantic-settings could not even parse (JSON)
        raise SystemExit(fail(f"invalid settings: {unparsable_setting(exc)}").exit_code) from None


def _run_for_json(command: typer.Typer) -> int:
    """Run `command` with its usage errors as JSON records (not click's boxes); its exit code."""
    if len(sys.argv) < 2:  # typer would print its help (a box, to stdout) before the error
        _record(logging.ERROR, "usage: no command given (see --help)")
        return 2
    try:
        return int(command(standalone_mode=False) or 0)
    except typer.Abort:
        fail("aborted")
        return 1
    except Exception as exc:
        # click's usage errors (typer carries its own copy of click: told by their shape).
        said, code = getattr(exc, "format_message", None), getattr(exc, "exit_code", None)
        if not callable(said) or not isinstance(code, int):
            raise
        _record(logging.ERROR, f"usage: {said()}")
        return code


def invalid_settings(exc: ValidationError) -> str:
    """What is wrong with the settings, by environment variable (never their values)."""
    return invalid_fields(exc)


def unparsable_setting(exc: SettingsError) -> str:
    """pydantic-settings' "error parsing value for field ..." by environment variable."""
    field = re.search(r'for field "(\w+)"', str(exc))
    if field is None:
        return str(exc)
    return f"{setting_variable(field[1])}: not valid JSON"
