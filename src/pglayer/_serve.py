"""Serving an ASGI app as `pglayer serve` does: a database (embedded if none is given), its
migrations applied, then uvicorn with pglayer's defaults and limits."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import importlib.util
import inspect
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
from pydantic import ValidationError

from pglayer._budget import read_budget
from pglayer._database import Database
from pglayer._dsn import describe_target
from pglayer._errors import ConfigurationError, explain_connect_error
from pglayer._logs import configure_logging
from pglayer._pooler import connect_plain, connected_through_pooler
from pglayer._process import alive, note_worker_death
from pglayer._settings import (
    DatabaseSettings,
    ServerSettings,
    default_application_name,
    invalid_fields,
)
from pglayer.migrations import (
    DEFAULT_TIMEOUT,
    _given_twice,
    _History,
    _migrate,
    _pglayer_history,
    _qualified,
    load_migrations,
)

__all__ = ["apply_directories", "check_app", "check_importable", "event_loop", "serve"]

log = logging.getLogger("pglayer.cli")

Prepare = Callable[[Database], Awaitable[None]]


_STARTUP_FAILURE = 3  # uvicorn's exit status when its one worker fails to start

# What `pglayer serve` turns on, unless the environment says otherwise.
_SERVE_DEFAULTS = {
    "PGLAYER_TUNE_GC": "true",
    "PGLAYER_LOG_FORMAT": "text",
    "PGLAYER_ACCESS_LOG": "true",
}


def _absolute(directory: Path) -> Path:
    return Path(os.path.abspath(directory))  # the path alone: no link followed


async def apply_directories(
    settings: DatabaseSettings,
    directories: Sequence[Path],
    prepare: Prepare | None = None,
    histories: Sequence[str] = (),
    say: Callable[[str], None] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[str]:
    """Apply pglayer's own tables, each directory's migrations (each its own history: the
    directory's name, or the name `histories` gives it in turn), then `prepare(db)`; what
    was applied is said (`say`) before `prepare` runs."""
    if len(histories) > len(directories):
        raise ConfigurationError("more histories than migration directories")
    # Made absolute, not resolved: `--dir .` (or `../app/migrations`) names the directory's
    # own, and a symbolic link keeps its own name, as it always had.
    implicit = [_absolute(d) for d in directories[len(histories) :]]
    if any(not d.name for d in implicit):
        raise ConfigurationError("the root directory has no name: name its history (--history)")
    # One transaction for all: every history is checked before any is applied.
    runs = [_pglayer_history()] + [
        _History(history, load_migrations(directory), named=True)
        for directory, history in zip(directories, histories, strict=False)
    ]
    if len({run.name for run in runs}) < len(runs):
        raise ConfigurationError("two --history names are the same: each directory needs its own")
    twice = _given_twice(directories)
    if twice is not None:
        raise ConfigurationError(f"a migration directory is given twice: {twice[0]} and {twice[1]}")
    runs += [
        _History(d.name, load_migrations(d), named=False, qualified=_qualified(d)) for d in implicit
    ]
    async with Database(settings) as db:
        done = await _migrate(db, runs, timeout=timeout)
        applied = [f"{history}/{name}" for history, name in done]
        if applied and say is not None:
            say(f"applied migrations: {', '.join(applied)}")
        if prepare is not None:
            await prepare(db)
    return applied


async def check_budget(workers: int) -> None:
    """Refuse, before any worker starts, the connection budget that each worker would refuse
    at start-up (`PGLAYER_ON_BUDGET_EXCEEDED=refuse`): workers that fail to start leave
    uvicorn's supervisor ending with status 0, which a service manager takes for success."""
    settings = DatabaseSettings()
    if workers < 2 or settings.on_budget_exceeded != "refuse":
        return
    try:
        conn = await connect_plain(settings.dsn(), settings)
        try:
            if await connected_through_pooler(conn, settings.dsn()):
                return  # behind a pooler the server's limit is the pooler's business
            budget = await read_budget(
                conn,
                application_name=settings.application_name,
                workers=workers,
                max_size=settings.max_size,
                reserve=settings.connection_reserve,
            )
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # TimeoutError too
        # Unreachable now: each worker checks it when it opens (and refuses, or waits).
        log.warning(
            "connection budget not checked before the workers start (%s: %s)",
            type(exc).__name__,
            explain_connect_error(exc, describe_target(settings.dsn())),
        )
        return
    if not budget.fits:
        target = describe_target(settings.dsn())
        sizes = f"max_size {settings.max_size}"
        raise ConfigurationError(budget.exceeded(target, sizes, f"--workers {workers}"))


class _StartupFailures(logging.Handler):
    """Notices uvicorn's supervisor giving up on a worker that failed to start: it then
    stops and returns as if all went well (status 0)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if "failed to start" in record.getMessage():
            self.seen = True


class _OneLineRefusals(logging.Filter):
    """An app's lifespan refusing to start (a `ConfigurationError`: a late commit, two
    transactions in one route) is one line saying why, as the command's own errors are,
    not Starlette's traceback of the lifespan."""

    marker = "\npglayer.ConfigurationError: "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if isinstance(message, str) and self.marker in message and "Traceback" in message:
            record.msg = "cannot start: %s"
            record.args = (message.rpartition(self.marker)[2].strip(),)
            record.exc_info = record.exc_text = None
        return True


class _SkippedShutdown(logging.Filter):
    """A forced quit (a second Ctrl-C) skips the app's shutdown and cancels its lifespan:
    Starlette reports the cancellation as a failed shutdown, which uvicorn logs as an
    ERROR with its traceback; it is what was asked for, said as a warning in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if (
            isinstance(message, str)
            and message.startswith("Traceback")
            and message.rstrip().endswith("CancelledError")
            and "in lifespan" in message
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "quit at once: the app's shutdown was skipped", ()
        return True


class _WorkerDeaths(logging.Filter):
    """uvicorn's supervisor says at INFO that a worker died before it starts another, for
    any end it did not ask for: an error to alerts, which would miss it, with how it ended
    (a signal: killed, out of memory; a status: crashed), and counted; a worker that ended
    well (told to stop on its own, SIGTERM or SIGINT: drained) a warning, not counted."""

    exit_code: Callable[[int], int | None] = staticmethod(lambda pid: None)  # the supervisor's

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not (
            isinstance(message, str)
            and message.startswith("Child process [")
            and message.endswith("] died")
        ):
            return True
        pid = message[len("Child process [") : -len("] died")]
        code = self.exit_code(int(pid)) if pid.isdigit() else None
        # uvicorn drains on SIGTERM and SIGINT, then ends by the signal it caught.
        if code in (0, -signal.SIGTERM, -signal.SIGINT):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = (
                f"Child process [{pid}] stopped (it was told to, and drained):"
                " a new worker replaces it"
            )
            return True
        record.levelno, record.levelname = logging.ERROR, "ERROR"
        record.msg = f"{message} ({_ended(code)}): a new worker replaces it"
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared:  # for `pglayer_worker_deaths_total`: the dead one's series just vanish
            note_worker_death(Path(shared))
        return True


def _ended(code: int | None) -> str:
    """How a worker that died ended, from its exit code (multiprocessing's: -N for signal N)."""
    if code is None:
        return "killed, out of memory, or crashed"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (": out of memory, or kill -9" if code == -9 else "")
    return f"exited with status {code}: crashed"


@functools.cache
def _uvicorn_filters() -> None:
    logger = logging.getLogger("uvicorn.error")
    logger.addFilter(_OneLineRefusals())
    logger.addFilter(_SkippedShutdown())
    logger.addFilter(_WorkerDeaths())


_NO_EMBEDDED = (
    "no DATABASE_URL set, and PGLAYER_EMBEDDED=false: set DATABASE_URL (or unset"
    " PGLAYER_EMBEDDED for an embedded PostgreSQL)"
)


def metrics_directory() -> Path:
    """A directory for the workers' metrics, named for this process; those of processes
    gone without removing theirs (`kill -9`) are removed."""
    for old in Path(tempfile.gettempdir()).glob("pglayer-metrics-*-*"):
        pid = old.name.split("-")[2]
        with contextlib.suppress(OSError):
            if pid.isdigit() and not alive(int(pid)) and old.stat().st_uid == os.getuid():
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"pglayer-metrics-{os.getpid()}-"))


def _supervise(config: Any) -> None:
    """Run uvicorn's process manager, which closes its listening socket here as the workers
    are told to stop. It keeps the socket for the workers it starts; while they drained, the
    kernel went on taking new connections into a backlog no one accepted from any more, and
    reset them at the exit (a single worker's refuses them at once)."""
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def terminate_all(self) -> None:
            for sock in self.sockets:
                sock.close()
            super().terminate_all()

        def exit_code(self, pid: int) -> int | None:
            for process in self.processes:
                if process.pid == pid:
                    return process.exitcode
            return None

    supervisor = Supervisor(config, sockets=[config.bind_socket()])
    _WorkerDeaths.exit_code = supervisor.exit_code
    supervisor.run()


_SERVE_PID = "PGLAYER_SERVE_PID"  # the serving process, for its workers (see worker_loop)
_PR_SET_PDEATHSIG = 1  # Linux's prctl(2): a signal when the parent ends


def check_importable(app: str) -> None:
    """Raise `ConfigurationError` unless `app`'s module (`module:attr`) can be found, in the
    current directory too (put on the import path, as `uvicorn` and `python -m` do: an
    installed script would not look there; worker processes inherit it)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = app.split(":", 1)[0]
    try:
        found = bool(module) and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a malformed name
        found = False
    if not found:
        raise ConfigurationError(
            f"cannot find module {module!r} of {app!r} in the current directory or the"
            " installed packages: run from the directory that holds it, or install it"
        )


MAX_WORKERS = 128  # a bound, not advice: past a few per CPU, workers add memory, not speed


def check_workers(workers: int) -> None:
    """`ConfigurationError` for a worker count out of 1..MAX_WORKERS (uvicorn starts any
    number, until the machine runs out of memory)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigurationError(f"--workers must be from 1 to {MAX_WORKERS}, not {workers}")


def check_port(host: str, port: int) -> int:
    """The port to serve on (a free one for 0); `ConfigurationError` if `host:port` cannot
    be bound (in use, not this host's), before anything is started or migrated."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return port  # uvicorn says what is wrong with the host
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another"
                " port with --port"
            ) from None
        return int(probe.getsockname()[1])


def check_app(app: str, *, factory: bool | None = False) -> None:
    """Raise `ConfigurationError` unless `app` (`module:attr`) imports and names an app (a
    factory with `factory`; either with None)."""
    check_importable(app)
    module_name, _, attr = app.partition(":")
    if not attr:
        raise ConfigurationError(f"{app!r}: name the app as module:attr (e.g. main:app)")
    try:
        found: object = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigurationError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    except SystemExit as exc:  # `sys.exit(0)` at import would end serve with success
        raise ConfigurationError(
            f"importing module {module_name!r} called sys.exit({exc.code!r})"
        ) from None
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}")
        found = getattr(found, part)
    refusal = _not_servable(app, found, factory)
    if refusal is not None:
        raise ConfigurationError(refusal)


def _not_servable(target: str, found: object, factory: bool | None) -> str | None:
    """Why `found` cannot be served as `target`, if it cannot."""
    if inspect.iscoroutine(found):
        found.close()
        return f"{target!r} is an async factory: make it a plain def that returns the app"
    if not callable(found):
        return f"{target!r} is not an ASGI app (it is {type(found).__name__})"
    if factory is True and not _takes_no_arguments(found):
        return (
            f"{target!r} takes arguments, as an ASGI app does, not an app factory: drop --factory"
        )
    if factory is False and _takes_no_arguments(found):
        # uvicorn would take it for an ASGI2 app and answer every request with a 500.
        return (
            f"{target!r} takes no arguments, as an app factory does, not an ASGI app: add --factory"
        )
    return None


def _takes_no_arguments(found: Callable[..., object]) -> bool:
    """Whether `found` can be called with nothing: an app (ASGI3 or ASGI2) takes a scope."""
    try:
        parameters = inspect.signature(found).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: not for us to judge
        return False
    return not any(
        parameter.kind is parameter.VAR_POSITIONAL
        or (
            parameter.default is parameter.empty
            and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        )
        for parameter in parameters
    )


_APP_ENV = "PGLAYER_SERVE_APP"  # what `load_app` loads in each worker, and how
_FACTORY_ENV = "PGLAYER_SERVE_FACTORY"


def load_app() -> Any:
    """The app `serve` was given, as uvicorn would load it (`--factory`: called), in the
    worker; one that cannot be loaded ends the worker as failing to start. (uvicorn's
    supervisor restarts a worker whose import or factory raised for ever.)"""
    from uvicorn.importer import import_from_string

    target = os.environ[_APP_ENV]
    _uvicorn_filters()
    factory = os.environ.get(_FACTORY_ENV) == "1"
    loaded = _loaded(target, import_from_string, target)
    if factory:
        _refuse(target, _not_servable(target, loaded, True))
        loaded = _loaded(target, loaded)
    _refuse(target, _not_servable(target, loaded, None if factory else False))
    return loaded


def _loaded(target: str, load: Callable[..., Any], *args: Any) -> Any:
    """`load(*args)` (an import, a factory's call); what it raises ends the worker."""
    try:
        return load(*args)
    except ConfigurationError as exc:  # the app's own refusal says why: no traceback
        log.error("cannot load %s: %s", target, exc)  # noqa: TRY400  (no traceback: the point)
        sys.exit(_STARTUP_FAILURE)
    except ValidationError as exc:  # the app's settings, from the environment: said as such
        log.error("cannot load %s: invalid settings: %s", target, invalid_fields(exc))  # noqa: TRY400
        sys.exit(_STARTUP_FAILURE)
    except (Exception, SystemExit, KeyboardInterrupt):  # `sys.exit("no SECRET_KEY")` too
        log.exception("cannot load %s", target)
        sys.exit(_STARTUP_FAILURE)


def _refuse(target: str, refusal: str | None) -> None:
    if refusal is not None:
        log.error("cannot load %s: %s", target, refusal)
        sys.exit(_STARTUP_FAILURE)


_FORCED_QUIT = 130  # a second Ctrl-C: ended as an interrupted command ends


class _Terminated(SystemExit):
    """SIGTERM, outside uvicorn's own handling: before it serves, or after it drained."""


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(0)


def _hang_up(signum: int, frame: FrameType | None) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler while it serves, else ours


def event_loop() -> str:
    """uvloop with a server that accepts a burst of connections at once (see _loop), if any."""
    if importlib.util.find_spec("uvloop") is None:
        return "auto"
    from pglayer._loop import LOOP

    return LOOP


def worker_loop() -> asyncio.AbstractEventLoop:
    """The event loop of a `serve --workers N` worker (as `event_loop()` says); the worker
    also ends with the server's process, so a `kill -9` of it leaves none serving on."""
    _end_with_parent()
    if importlib.util.find_spec("uvloop") is None:
        return asyncio.new_event_loop()
    from pglayer._loop import new_event_loop

    return new_event_loop()


def _end_with_parent() -> None:
    parent = os.environ.get(_SERVE_PID)
    if not parent or sys.platform != "linux":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # a graceful end, as a SIGTERM to serve
    if os.getppid() != int(parent):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def serve(
    app: str,
    *,
    factory: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    migrations: Sequence[Path] = (),
    histories: Sequence[str] = (),
    data_dir: Path = Path(".pglayer"),
    database: str = "app",
    prepare: Prepare | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Serve `app` (`module:attr`) until Ctrl-C or SIGTERM, then drain and stop what started.

    With no `DATABASE_URL`, an embedded PostgreSQL in `data_dir` (database `database`) is
    started (or reused) and stopped at the end if this call started it.
    """
    import uvicorn

    from pglayer._embedded import EmbeddedPostgres
    from pglayer._http import PROTOCOL
    from pglayer._ws import WS_PROTOCOL

    check_workers(workers)
    check_importable(app)  # before migrating
    port = check_port(host, port)  # 0: a free one, said below as the one served on

    # Worker processes build their app from the environment, as a user's would; `setup()`
    # configures logging there (uvicorn's workers start with none).
    os.environ["PGLAYER_WORKERS"] = str(workers)
    os.environ[_SERVE_PID] = str(os.getpid())
    # Named by the app, whichever command serves it (`pglayer-shop serve` too), so that
    # `pglayer doctor APP` from here finds its connections.
    os.environ.setdefault("PGLAYER_APPLICATION_NAME", default_application_name(["serve", app]))
    for name, default in _SERVE_DEFAULTS.items():
        os.environ.setdefault(name, default)
    server = ServerSettings()
    configure_logging(format=server.log_format or "text", level=server.log_level)
    if server.log_format == "json":  # every line of stderr a JSON object
        say = logging.getLogger("pglayer").info
    embedded: EmbeddedPostgres | None = None
    unwatch: Callable[[], None] | None = None
    metrics_dir: Path | None = None
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Any worker answers /metrics for all of them (see pglayer.fastapi.metrics).
        metrics_dir = metrics_directory()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # uvicorn drains, then re-raises the signal it caught; SIGTERM's default action would end
    # the process before the embedded server is stopped below.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # A closed terminal (SIGHUP) ends one process as SIGTERM does, drained and with what it
    # started stopped; with workers, uvicorn's supervisor takes SIGHUP to restart them.
    hung_up = signal.signal(signal.SIGHUP, _hang_up) if workers == 1 else None
    serving = False
    try:
        if DatabaseSettings().url is None:
            if not DatabaseSettings().embedded:
                raise ConfigurationError(_NO_EMBEDDED)
            embedded_port = DatabaseSettings().embedded_port or None
            embedded = EmbeddedPostgres(data_dir, database=database, port=embedded_port)
            say(f"no DATABASE_URL: using embedded PostgreSQL in {embedded.data_dir}")
            os.environ["DATABASE_URL"] = embedded.start()
            unwatch = embedded.keep_running()
            say(
                f"embedded PostgreSQL at {describe_target(os.environ['DATABASE_URL'])}"
                f" (password in {embedded.base_dir / 'password'})"
            )
        asyncio.run(check_budget(workers))  # before migrating: a refusal changes nothing
        asyncio.run(
            apply_directories(DatabaseSettings.for_command(), migrations, prepare, histories, say)
        )
        if workers == 1:
            # uvicorn imports it here too: a missing attribute is one line, not "serving"
            # and a traceback. (Workers import it themselves; a failure ends with status 3.)
            check_app(app, factory=factory)
        say(f"serving {app} on http://{host}:{port}")
        serving = True
        failures = _StartupFailures()
        logging.getLogger("uvicorn.error").addHandler(failures)
        _uvicorn_filters()  # the supervisor's own lines too
        os.environ[_APP_ENV], os.environ[_FACTORY_ENV] = app, "1" if factory else "0"
        config = uvicorn.Config(
            "pglayer._serve:load_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            loop=event_loop() if workers == 1 else "pglayer._serve:worker_loop",
            # httptools with bounds on header size and header/body read time (see _http).
            http=PROTOCOL if importlib.util.find_spec("httptools") else "h11",
            ws=WS_PROTOCOL if importlib.util.find_spec("websockets") else "auto",
            timeout_graceful_shutdown=10,
            ws_max_size=server.max_body_size,  # a WebSocket message, as a request's body
            log_config=None,
            access_log=False,  # pglayer's own access log carries the request id
            server_header=False,  # `server: uvicorn` on every response: bytes, a fingerprint
        )
        single: uvicorn.Server | None = None
        with contextlib.suppress(KeyboardInterrupt):  # as `uvicorn.run`
            if workers > 1:
                _supervise(config)
            else:
                single = uvicorn.Server(config)
                single.run()
                if not single.started:
                    raise SystemExit(_STARTUP_FAILURE)
        logging.getLogger("uvicorn.error").removeHandler(failures)
        if failures.seen:
            raise SystemExit(_STARTUP_FAILURE)
        if single is not None and single.force_exit:
            raise SystemExit(_FORCED_QUIT)  # what was in flight was dropped: not a clean stop
    except (_Terminated, KeyboardInterrupt) as exc:
        if not serving:  # waiting for the database, or migrating: it ended without a word
            said = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
            say(f"stopped before serving ({said})")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if hung_up is not None:
            signal.signal(signal.SIGHUP, hung_up)
        if unwatch is not None:
            unwatch()
        if embedded is not None:
            # Stopping already: a second Ctrl-C would only cut the wait for it short (and
            # call a stopped server's stop failed).
            interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                embedded.stop()
            finally:
                signal.signal(signal.SIGINT, interrupt)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
