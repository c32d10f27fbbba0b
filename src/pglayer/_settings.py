"""Settings read from `DATABASE_URL` and `PGLAYER_*` environment variables."""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import shlex
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pglayer._dsn import host_ports

__all__ = [
    "DatabaseSettings",
    "ServerSettings",
    "default_application_name",
    "detect_workers",
    "misspelt_settings",
]

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.:@/-]")
PG_MAX_SECONDS = 2_147_483.647  # the longest timeout PostgreSQL takes: 2^31 - 1 ms
_SERVERS = ("uvicorn", "gunicorn", "hypercorn", "granian")


def default_application_name(argv: Sequence[str] | None = None, cwd: str | None = None) -> str:
    """`pglayer:<app>:<hash>`, the same in every worker of one app and distinct between apps.

    `<app>` is the `module:attr` the server was given (else the program's name); the hash
    adds the working directory, so two checkouts of one app are told apart too.
    """
    argv = sys.argv if argv is None else argv
    cwd = os.getcwd() if cwd is None else cwd
    target = next((a for a in argv[1:] if ":" in a and not a.startswith("-")), None)
    label = _UNSAFE_NAME.sub("_", target or Path(argv[0] if argv else "python").stem)
    digest = hashlib.blake2s(f"{cwd}\0{label}".encode(), digest_size=3).hexdigest()
    return f"pglayer:{label[:45]}:{digest}"


def _flag_value(args: Sequence[str], long: str, short: str | None) -> str | None:
    for i, arg in enumerate(args):
        if arg in (long, short) and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(long + "="):
            return arg.split("=", 1)[1]
        if short and arg.startswith(short) and len(arg) > len(short):
            return arg[len(short) :]
    return None


def _count(value: str | None) -> int | None:
    return int(value) if value and value.isascii() and value.isdigit() and int(value) > 0 else None


def detect_workers(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """How many worker processes this app's server runs, and where that was read.

    Looks at the server's command line (uvicorn, gunicorn, hypercorn, granian
    `--workers`/`-w`), then `GUNICORN_CMD_ARGS`, `UVICORN_WORKERS` and `WEB_CONCURRENCY`.
    """
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    program = Path(argv[0]).parent.name if argv and argv[0].endswith("__main__.py") else ""
    program = program or (Path(argv[0]).name if argv else "")
    server = next((name for name in _SERVERS if name in program), None)
    if server is not None:
        short = None if server == "uvicorn" else "-w"
        found = _count(_flag_value(argv[1:], "--workers", short))
        if found:
            return found, f"{server} --workers"
    gunicorn_args = environ.get("GUNICORN_CMD_ARGS", "")
    found = _count(_flag_value(shlex.split(gunicorn_args), "--workers", "-w"))
    if found:
        return found, "GUNICORN_CMD_ARGS"
    for name in ("UVICORN_WORKERS", "WEB_CONCURRENCY"):
        found = _count(environ.get(name))
        if found:
            return found, name
    return 1, "none detected; set PGLAYER_WORKERS"


# How every settings class of pglayer (and the shop's, which extends one) reads `PGLAYER_*`.
# `hide_input_in_errors`: a refused setting's error would otherwise print every input, the
# URL with its password among them.
_FROM_ENV = SettingsConfigDict(
    env_prefix="PGLAYER_",
    extra="ignore",
    frozen=True,
    populate_by_name=True,
    hide_input_in_errors=True,
    allow_inf_nan=False,  # "inf" seconds is no deadline: every wait is bounded
)


class DatabaseSettings(BaseSettings):
    """Pool, timeout and connection settings; every duration is in seconds."""

    model_config = _FROM_ENV

    url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("url", "DATABASE_URL", "PGLAYER_DATABASE_URL"),
        description="The primary's URL (`DATABASE_URL`); masked wherever it is shown.",
    )
    embedded: bool = Field(
        default=True,
        description="Without `url`, `pglayer serve` (and the shop's commands) start an "
        "embedded PostgreSQL; false: they refuse to start instead, so a deploy that lost "
        "`DATABASE_URL` fails rather than serve a new, empty database.",
    )
    embedded_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="The embedded PostgreSQL's port on 127.0.0.1, 1024-65535 (0: a free one "
        "at each start, printed), for tools that connect to it (psql, a GUI); below 1024 only "
        "root may listen, and the server runs as another user.",
    )
    min_size: int = Field(
        default=2, ge=0, description="Connections kept open; made at open(), refilled later."
    )
    max_size: int = Field(default=10, ge=1, description="Most connections this pool opens.")
    max_waiters: int = Field(
        default=2048,
        ge=0,
        description="A hard cap on queued acquirers (memory). Below it a newcomer is refused"
        " at once only when its predicted wait exceeds its deadline.",
    )
    bulkheads: dict[str, int] = Field(
        default_factory=dict,
        description='Most connections each kind of work may hold, as JSON (`{"write": 6}`).'
        " Unnamed work is `read` or `write`; by default writes may hold all but a quarter of"
        " the pool, so reads keep some however writes are stuck.",
    )
    refusal_delay: float = Field(
        default=0.025,
        ge=0,
        le=1.0,
        description="Least pause before a refusal (503 `overloaded`) is answered; a refusal"
        " that predicts a long wait pauses a fifth of it (at most half of `acquire_timeout`),"
        " and while refusals outnumber what the pool serves, as long as the refusals already"
        " paused take to serve (at most 1 s; never past the request deadline). Slows clients"
        " that retry at once, at no cost to the server; 0: no pause.",
    )
    acquire_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Longest wait for a pooled connection (seconds); what would wait longer"
        " is refused at once (admission by predicted wait).",
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, description="Longest wait to open one connection (seconds)."
    )
    query_timeout: float = Field(
        default=15.0,
        gt=0,
        description="Client-side deadline of one statement (seconds); the server's"
        " `statement_timeout` fires first.",
    )
    statement_timeout: float = Field(
        default=10.0,
        ge=0,
        le=PG_MAX_SECONDS,
        description="Server-side `statement_timeout` (seconds; 0: none; under a millisecond: one).",
    )
    lock_timeout: float = Field(
        default=5.0,
        ge=0,
        le=PG_MAX_SECONDS,
        description="Server-side `lock_timeout` (seconds; 0: none; under a millisecond: one).",
    )
    idle_in_transaction_timeout: float = Field(
        default=30.0,
        ge=0,
        le=PG_MAX_SECONDS,
        description="`idle_in_transaction_session_timeout` (seconds): a transaction left open"
        " by a stuck client is ended by the server.",
    )
    client_connection_check_interval: float = Field(
        default=1.0,
        ge=0,
        le=PG_MAX_SECONDS,
        description="PostgreSQL 14+: how often a busy backend checks its client is still there,"
        " so a query whose connection was cut stops on the server too (seconds).",
    )
    jit: bool = Field(
        default=False,
        description="PostgreSQL's JIT compiler for this app's statements (`jit`). Off by"
        " default: it can spend seconds compiling a short statement whose plan looks costly,"
        " such as asyncpg's type introspection on each new connection.",
    )
    startup_timeout: float = Field(
        default=30.0,
        ge=0,
        description="How long open() keeps retrying an unreachable server (with"
        " `require_on_startup`).",
    )
    require_on_startup: bool = Field(
        default=False,
        description="Fail startup when the database is unreachable; when false the app starts"
        " and becomes ready by itself.",
    )
    close_timeout: float = Field(
        default=10.0, ge=0, description="How long close() waits for connections in use."
    )
    retry_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts (the first included) for transient failures of reads and of"
        " whole transactions.",
    )
    retry_initial_wait: float = Field(
        default=0.05, ge=0, description="First backoff between attempts (seconds, jittered)."
    )
    retry_max_wait: float = Field(
        default=1.0, ge=0, description="Longest backoff between attempts (seconds)."
    )
    max_inactive_connection_lifetime: float = Field(
        default=300.0, ge=0, description="Idle connections above `min_size` close after this."
    )
    statement_cache_size: int = Field(
        default=1024,
        ge=0,
        description="Prepared statements cached per connection (0 behind a transaction pooler"
        " that loses them).",
    )
    slow_query_threshold: float = Field(
        default=0.5,
        ge=0,
        description="Statements slower than this are logged, SQL text only (seconds; 0: off).",
    )
    application_name: str = Field(
        default_factory=default_application_name,
        max_length=63,
        description="Names this app's connections in pg_stat_activity; the connection budget"
        " counts connections with this name in this database as its own. Default:"
        " `pglayer:<module:attr>:<hash of the working directory>`, the same in every worker.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="Worker processes sharing the server's connections. Default: detected"
        " from the server's command line and environment (see `detect_workers`), else 1.",
    )
    connection_reserve: int = Field(
        default=5,
        ge=0,
        description="Connections the budget leaves free for admins, migrations and cron.",
    )
    on_budget_exceeded: Literal["warn", "refuse", "ignore"] = Field(
        default="warn",
        description="What open() does when workers x max_size + reserve exceed what the server"
        " allows: log a warning, refuse to open, or nothing.",
    )
    pooler: Literal["auto", "none", "pgbouncer-transaction", "pgbouncer-session"] = Field(
        default="auto",
        description="What sits between pglayer and the primary. `auto` probes at open(): a"
        " server port unlike the URL's means a pooler, then its mode and whether prepared"
        " statements survive it. Replicas are always probed.",
    )
    replica_urls: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Read replicas, comma-separated; reads that ask for one go to a healthy"
        " replica, round-robin.",
    )
    replica_max_lag: float = Field(
        default=5.0, ge=0, description="A replica further behind than this is skipped."
    )
    replica_check_interval: float = Field(
        default=1.0, gt=0, description="How often each replica's health and lag are read."
    )
    reads_read_only: bool = Field(
        default=False,
        description="Run reads on the primary (db.read, read_connection, ReadConnection) in a"
        " READ ONLY transaction, as a replica would run them: a write there fails (25006) as"
        " it would in production with replicas. Two more round trips a read; the pytest"
        " plugin turns it on.",
    )
    read_your_writes_window: float | None = Field(
        default=None,
        ge=0,
        description="After a write, the same client reads from the primary this long (a cookie)."
        " Unset: the most a replica still in rotation can be behind, replica_max_lag + 3 x"
        " replica_check_interval.",
    )

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else SecretStr(_postgres_url(value.get_secret_value()))

    @field_validator("embedded_port")
    @classmethod
    def _port_a_user_may_take(cls, value: int) -> int:
        if 0 < value < 1024:
            raise ValueError(
                "below 1024 only root may listen, and the server never runs as root (under"
                " root, as an unprivileged user): use 1024-65535, or 0 for a free port"
            )
        return value

    @field_validator("application_name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        # PostgreSQL shows other characters as '?': the budget would not know its own.
        if not value or not (value.isascii() and value.isprintable()):
            raise ValueError("must be printable ASCII, not empty")
        return value

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("replica_urls")
    @classmethod
    def _postgres_urls(cls, value: list[SecretStr]) -> list[SecretStr]:
        return [SecretStr(_postgres_url(url.get_secret_value())) for url in value]

    @model_validator(mode="after")
    def _connect_timeout_from_url(self) -> DatabaseSettings:
        """libpq's `connect_timeout` in a URL (platforms write it there) is this setting,
        unless it is set itself; the driver would send it to the server, which refuses it."""
        # Frozen settings, still being built: set as pydantic itself does.
        put = object.__setattr__
        if self.url is not None:
            url, seconds = _without_connect_timeout(self.url.get_secret_value())
            put(self, "url", SecretStr(url))
            if seconds and "connect_timeout" not in self.model_fields_set:
                put(self, "connect_timeout", max(seconds, 2.0))  # libpq's least
        replicas = [_without_connect_timeout(u.get_secret_value())[0] for u in self.replica_urls]
        put(self, "replica_urls", [SecretStr(u) for u in replicas])
        return self

    @model_validator(mode="after")
    def _check_sizes(self) -> DatabaseSettings:
        if self.min_size > self.max_size:
            raise ValueError(
                f"min_size ({self.min_size}) must not exceed max_size ({self.max_size}):"
                " PGLAYER_MIN_SIZE, PGLAYER_MAX_SIZE"
            )
        if any(cap < 1 for cap in self.bulkheads.values()):
            raise ValueError("every bulkhead needs at least one connection")
        return self

    @classmethod
    def for_command(cls) -> DatabaseSettings:
        """The environment's settings for a one-off command's own work (migrate, seed): a
        pool of one or two connections that must reach the database, no budget check."""
        cls()  # the environment as the app reads it: a value it would refuse is refused here
        return cls(
            require_on_startup=True,
            min_size=1,
            max_size=2,
            on_budget_exceeded="ignore",
            replica_urls=[],  # its work is the primary's: no pool per replica to open
        )

    def worker_count(self) -> tuple[int, str]:
        """The workers assumed by the connection budget, and where that came from."""
        if self.workers is not None:
            return self.workers, "PGLAYER_WORKERS, which `pglayer serve --workers` sets"
        return detect_workers()

    def bulkhead_caps(self) -> dict[str, int]:
        """Each bulkhead's cap: the configured ones over the defaults."""
        quarter = max(1, self.max_size // 4)
        reserved_for_reads = quarter if self.max_size > 1 else 0
        defaults = {
            "read": self.max_size,
            "write": self.max_size - reserved_for_reads,
            # Streams (`ndjson_response`) hold a connection as long as their client reads.
            "stream": quarter,
        }
        return {**defaults, **self.bulkheads}

    def server_settings(self) -> dict[str, str]:
        """Startup parameters for every connection (not `SET`: PgBouncer-safe)."""

        def ms(seconds: float) -> str:
            # Rounded, and at least 1: 0 turns the bound off, which 0.0004 s did.
            return str(max(round(seconds * 1000), 1)) if seconds > 0 else "0"

        return {
            "application_name": self.application_name,
            "statement_timeout": ms(self.statement_timeout),
            "lock_timeout": ms(self.lock_timeout),
            "idle_in_transaction_session_timeout": ms(self.idle_in_transaction_timeout),
            "client_connection_check_interval": ms(self.client_connection_check_interval),
            "jit": "on" if self.jit else "off",
        }

    def for_replica(self, url: SecretStr) -> DatabaseSettings:
        """These settings for one replica: its URL, no replicas of its own, and its pooler
        found by probing (`pooler` names what sits in front of the primary)."""
        return self.model_copy(update={"url": url, "replica_urls": [], "pooler": "auto"})

    def dsn(self) -> str:
        """The connection string; raises if none is configured."""
        if self.url is None:
            raise ValueError("no database URL: set DATABASE_URL")
        return self.url.get_secret_value()


def _postgres_url(url: str) -> str:
    """`url` as asyncpg takes it, or a ValueError that says what is wrong (never the URL)."""
    url = url.strip()  # a compose file's stray space or newline
    scheme, found, rest = url.partition("://")
    if not found:
        raise ValueError("not a URL: write postgresql://user:password@host:port/database")
    driver = scheme.lower().partition("+")
    if driver[0] not in ("postgresql", "postgres"):
        raise ValueError(f"the scheme is {scheme[:20]!r}: write postgresql://")
    if driver[1]:  # SQLAlchemy's form (postgresql+asyncpg://): the driver is asyncpg anyway
        url = f"postgresql://{rest}"
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if "#" in rest or "@" in rest[len(authority) :] or authority.count("@") > 1:
        # Never quoted: what a parser takes for the port or path here is part of a password.
        raise ValueError(_UNENCODED)
    for host, port in host_ports(url):
        if host.count("[") != host.count("]"):
            raise ValueError("an IPv6 host needs both brackets: write [::1]:5432")
        if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            # Not quoted, digits neither: it may be a password's first part (`pw,rest@`).
            raise ValueError(f"a port is not one of 1..65535 ({_UNENCODED})")
    query = urllib.parse.parse_qs(rest.partition("?")[2])
    for mode in query.get("sslmode", []):
        if mode not in _SSL_MODES:
            raise ValueError(f"sslmode {mode[:20]!r} is not one of {', '.join(_SSL_MODES)}")
    for seconds in query.get("connect_timeout", []):
        _timeout_seconds(seconds)  # taken out of the URL later, said here as the URL's fault
    return url


def _without_connect_timeout(url: str) -> tuple[str, float | None]:
    """`url` without its `connect_timeout` parameter, and that parameter's seconds."""
    base, found, query = url.partition("?")
    if not found or "connect_timeout" not in query:
        return url, None
    kept, seconds = [], None
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if urllib.parse.unquote(name) == "connect_timeout":
            seconds = _timeout_seconds(urllib.parse.unquote(value))
        else:
            kept.append(part)
    return (f"{base}?{'&'.join(kept)}" if kept else base), seconds


def _timeout_seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"connect_timeout {value[:20]!r} in the URL is not a number") from None
    return seconds if math.isfinite(seconds) and seconds > 0 else None  # 0: libpq's "no bound"


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_UNENCODED = (
    "a '/', '?', '#', '@' or ',' in the user or password must be percent-encoded"
    " (%2F, %3F, %23, %40, %2C)"
)


class ServerSettings(BaseSettings):
    """What pglayer's HTTP side reads from `PGLAYER_*`: the bounds `pglayer serve`'s HTTP
    server puts on every request (`pglayer._http`), the garbage collector (`tune_gc`), and
    what `setup()`, `setup_metrics()` and `health_router()` use when not told otherwise
    (body bound, access log, logging, metrics, readiness deadline, admin token)."""

    model_config = _FROM_ENV

    max_header_size: int = Field(
        default=65536,
        ge=1024,
        description="Most bytes a request line and its headers may take; a larger head "
        "gets 431 and the connection is closed.",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a request line and its headers may take to arrive, from the "
        "connection's start (or the request's first byte on a kept-alive connection); "
        "later gets 408 and the connection is closed.",
    )
    body_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a request body may take to arrive after its headers; later "
        "gets 408 and the connection is closed.",
    )
    tune_gc: bool = Field(
        default=False,
        description="Once per process after startup: `gc.freeze()` and a young-generation "
        "threshold of 200,000 instead of 700, so that garbage collection stops taking a "
        "share of the CPU that grows with concurrency (`pglayer serve`: on).",
    )
    max_body_size: int = Field(
        default=1 << 20, gt=0, description="Request bodies above this many bytes get 413."
    )
    access_log: bool = Field(
        default=False,
        description="One line per request on `pglayer.access` (`pglayer serve`: on).",
    )
    log_format: Literal["text", "json"] | None = Field(
        default=None,
        description="`setup()` sends every log (pglayer's, the server's, the app's) to stderr "
        "in this format, masked, with the request id; unset leaves logging to the host "
        "(`pglayer serve`: text).",
    )
    log_level: str = Field(
        default="INFO",
        description="The root log level, with `log_format`: DEBUG, INFO, WARNING, ERROR or"
        " CRITICAL.",
    )
    metrics: bool = Field(
        default=True,
        description="`setup_metrics()`: Prometheus HTTP metrics too (pool metrics are read at "
        "scrape time and cost nothing per request).",
    )
    ready_timeout: float = Field(
        default=1.0,
        gt=0,
        description="`health_router()`: /health/ready answers 503 when `SELECT 1` takes longer.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the admin routes (`admin_router(token=...)`); unset, "
        "they answer 404.",
    )

    @field_validator("log_level")
    @classmethod
    def _a_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level


# Read straight from the environment, not by a settings class.
_READ_DIRECTLY = frozenset(
    {"PGLAYER_TEST_DATABASE_URL", "PGLAYER_DATA_DIR", "PGLAYER_PG_BINDIR", "PGLAYER_EMBEDDED_USER"}
)


def _known_settings() -> set[str]:
    """Every `PGLAYER_*` name a loaded settings class reads (pglayer's, and an app's own)."""
    known = set(_READ_DIRECTLY)
    classes: list[type[BaseSettings]] = [BaseSettings]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if cls.model_config.get("env_prefix", "").upper() != "PGLAYER_":
            continue
        for name, field in cls.model_fields.items():
            known.add(f"PGLAYER_{name.upper()}")
            alias = field.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
            known |= {c.upper() for c in choices if isinstance(c, str)}
    return known


def misspelt_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """A message for each `PGLAYER_*` variable that no setting reads but one nearly does
    (a typo would otherwise be ignored in silence)."""
    environ = os.environ if environ is None else environ
    names = [n.upper() for n in environ if n.upper().startswith("PGLAYER_")]
    known = _known_settings()
    messages = []
    for name in sorted(set(names) - known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.9)
        if close:
            messages.append(f"{name} is not a setting (ignored): did you mean {close[0]}?")
    return messages


def invalid_fields(exc: ValidationError) -> str:
    """What a settings class refused, field by field (never the values), by environment
    variable: its class found by the error's title among the settings classes loaded, its
    prefix read from it (`Class.field` for a class not found, or a field of a nested value)."""
    prefix = _env_prefix(exc.title)
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = error["loc"]
        if prefix is not None and len(loc) == 1:
            name = setting_variable(str(loc[0]), prefix)
        else:
            name = ".".join([exc.title, *(str(part) for part in loc)])
        problems.append(f"{name}: {error['msg']}" if loc else error["msg"])
    return "; ".join(problems)


def setting_variable(field: str, prefix: str = "PGLAYER_") -> str:
    """The environment variable of a settings field (pglayer's by default)."""
    if field == "url" and prefix == "PGLAYER_":
        return "DATABASE_URL"
    return f"{prefix}{field}".upper()


def _env_prefix(title: str) -> str | None:
    classes: list[type[BaseSettings]] = [BaseSettings]
    while classes:
        cls = classes.pop()
        if cls.__name__ == title:
            return str(cls.model_config.get("env_prefix", ""))
        classes.extend(cls.__subclasses__())
    return None
