"""An embedded PostgreSQL server in a local directory, for zero-configuration runs and tests.

Binaries are looked for in this order: `PGLAYER_PG_BINDIR`, `pg_ctl` on `PATH`,
`/usr/lib/postgresql/<newest>/bin`, then the `pgserver` wheel (`pip install 'pglayer[embedded]'`).
PostgreSQL refuses to run as root, so as root the server runs as `PGLAYER_EMBEDDED_USER`
(default: `postgres` if that user exists, else `nobody`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import asyncpg

from pglayer._errors import PglayerError, explain_connect_error
from pglayer._process import alive

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "find_binaries"]

log = logging.getLogger("pglayer.embedded")
# The directory's own mode, whatever the umask (`umask 000` made it writable by anyone, who
# could then replace its password file): readable, so the server's user can reach `pg/`.
_BASE_MODE = 0o755
_OTHER_VERSION = re.compile(
    r"initialized by PostgreSQL version (\d+), which is not compatible with this version"
    r" ([\d.]+)"
)

_FAST_TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class EmbeddedPostgresError(PglayerError):
    """The embedded server could not be found, initialised, started or stopped."""


def _has_server(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("pg_ctl", "initdb", "postgres"))


def find_binaries() -> Path:
    """The directory holding `pg_ctl`, `initdb` and `postgres`."""
    configured = os.environ.get("PGLAYER_PG_BINDIR")
    if configured:
        if _has_server(Path(configured)):
            return Path(configured)
        raise EmbeddedPostgresError(f"PGLAYER_PG_BINDIR={configured} has no pg_ctl/initdb/postgres")
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    wheel = _pgserver_bindir()
    if wheel is not None:
        return wheel
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries found: install PostgreSQL, "
        "or `pip install 'pglayer[embedded]'`, or set DATABASE_URL"
    )


def _pgserver_bindir() -> Path | None:
    # Located, not imported: importing pgserver has side effects we do not need.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if _has_server(bindir) else None


_CONFIGURED = "# added by pglayer"
_CONF = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "max_connections": "200",
    "logging_collector": "off",
}


def _configure(data_dir: Path) -> bool:
    """Add pglayer's settings to `data_dir`'s configuration, unless there; whether it did."""
    conf = data_dir / "postgresql.conf"
    if _CONFIGURED in conf.read_text(errors="replace"):
        return False
    with conf.open("a") as f:
        f.write(f"\n{_CONFIGURED}\n")
        f.writelines(f"{k} = {v}\n" for k, v in _CONF.items())
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (bound as PostgreSQL binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _started(pid: int) -> str:
    """When `pid` started (Linux: ticks since boot; "" where /proc cannot tell, or a zombie's
    which has ended), to tell a process from a later one given the same PID."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if fields[0] == "Z" else fields[19]


def _still_running(entry: str) -> bool:
    """Whether a `users/` entry (`pid.started.token`) names a process that still runs."""
    pid, _, rest = entry.partition(".")
    started = rest.rpartition(".")[0]
    if not pid.isdigit():
        return False
    if not Path("/proc/self").exists():  # no /proc here: the PID alone
        return alive(int(pid))
    return bool(started) and _started(int(pid)) == started


def _runs_cluster(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is the server of `data_dir` (true where /proc cannot tell). A backend
    of another server is not.

    PostgreSQL works in its data directory: the process's working directory says it,
    however the directory was spelt when it was started (`pg_ctl -D data` by hand)."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc here: trust pg_ctl
    except OSError:
        return True  # another user's, and we may not look: cannot tell
    return cwd == str(data_dir.resolve())


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    name = os.environ.get("PGLAYER_EMBEDDED_USER")
    candidates = [name] if name else ["postgres", "nobody"]
    for candidate in candidates:
        try:
            return pwd.getpwnam(candidate)
        except KeyError:
            continue
    raise EmbeddedPostgresError(
        f"running as root, and no unprivileged user {candidates} exists to run PostgreSQL"
    )


def _traversable_by(path: Path, user: pwd.struct_passwd) -> bool:
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == user.pw_gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster under `base_dir`, started on 127.0.0.1 only.

    `start()` initialises the cluster on first use (password auth, the password kept in
    `base_dir/password`, mode 0600), or reuses one that is already running. `stop()` stops
    it only if this object started it, unless `force`.
    """

    base_dir: Path
    database: str = "pglayer"
    port: int | None = None
    server_settings: dict[str, str] = field(default_factory=dict)
    fast_unsafe: bool = False  # fsync off: for throwaway test clusters only
    standby: bool = False  # a read-only replica: no database is created at start
    started_here: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).resolve()
        self.bindir = find_binaries()
        self._user = _server_user()
        with self._said_plainly():
            self.pg_dir = self._choose_pg_dir()
        self.data_dir = self.pg_dir / "data"
        self.log_file = self.pg_dir / "server.log"
        self._password_file = self.base_dir / "password"
        self._user_file: Path | None = None  # this object's entry in `users/` while started

    @contextlib.contextmanager
    def _said_plainly(self) -> Iterator[None]:
        """What goes wrong with the directory or the server, as one line that says what to do."""
        try:
            yield
        except EmbeddedPostgresError:
            raise
        except asyncpg.InvalidPasswordError as exc:
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL in {self.data_dir} refused the password in"
                f" {self._password_file}: put the cluster's password back there, or remove"
                f" {self.base_dir} to start afresh (its data is lost)"
            ) from exc
        except FileNotFoundError as exc:
            if exc.filename == str(self._password_file):
                raise EmbeddedPostgresError(
                    f"the embedded PostgreSQL's password file {self._password_file} is missing:"
                    f" put it back, or remove {self.base_dir} to start afresh (its data is lost)"
                ) from exc
            raise EmbeddedPostgresError(self._unusable(exc)) from exc
        # The server, not the directory (a refused connection is an OSError too).
        except (
            ConnectionError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            target = f"the embedded PostgreSQL on 127.0.0.1:{self.port}"
            raise EmbeddedPostgresError(explain_connect_error(exc, target)) from exc
        except OSError as exc:
            raise EmbeddedPostgresError(self._unusable(exc)) from exc

    def _unusable(self, exc: OSError) -> str:
        where = exc.filename or self.base_dir
        return (
            f"cannot keep the embedded PostgreSQL in {self.base_dir}: {where}:"
            f" {exc.strerror or type(exc).__name__} (choose another directory with --data-dir)"
        )

    def _choose_pg_dir(self) -> Path:
        preferred = self.base_dir / "pg"
        if self._user is None:
            return preferred
        self.base_dir.mkdir(mode=_BASE_MODE, parents=True, exist_ok=True)
        if _traversable_by(self.base_dir, self._user):
            return preferred
        # e.g. a checkout under /root (mode 0700): the server user cannot reach it.
        digest = hashlib.sha256(str(self.base_dir).encode()).hexdigest()[:12]
        fallback = Path("/var/tmp") / f"pglayer-{digest}" / "pg"  # noqa: S108  persistent, sticky
        log.info(
            "%s is not reachable by user %s; keeping server files in %s",
            self.base_dir,
            self._user.pw_name,
            fallback,
        )
        return fallback

    # -- running commands as the server user -------------------------------------------

    def _run(self, name: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / name), *args]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGPASSWORD", None)
        env.update(kwargs.pop("env", {}))
        user_kwargs: dict[str, Any] = {}
        if self._user is not None:
            user_kwargs = {
                "user": self._user.pw_uid,
                "group": self._user.pw_gid,
                "extra_groups": [],
            }
        # A session of its own: a terminal's Ctrl-C reaches the process that drives the
        # server (which decides), not `pg_ctl` or `initdb` halfway through.
        kwargs.setdefault("start_new_session", True)
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd="/", **user_kwargs, **kwargs
        )
        return result

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            tail = ""
            if self.log_file.exists():
                tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-15:])
            version = _OTHER_VERSION.search(tail)
            if version is not None:  # one line that says what to do, not the log's tail
                raise EmbeddedPostgresError(
                    f"the cluster in {self.data_dir} was made by PostgreSQL {version[1]}, and"
                    f" the server found ({self.bindir}) is {version[2]}: set PGLAYER_PG_BINDIR"
                    f" to a PostgreSQL {version[1]}'s bin directory, or choose another"
                    " directory with --data-dir (or move this one aside)"
                )
            raise EmbeddedPostgresError(
                f"{what} failed (exit {result.returncode}): {result.stderr.strip()}\n{tail}".strip()
            )

    def _own(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def password(self) -> str:
        return self._password_file.read_text().strip()

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedPostgresError("the embedded server is not started")
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def admin_url(self, database: str = "postgres") -> str:
        """The URL of another database on this server."""
        return self.url.rsplit("/", 1)[0] + f"/{database}"

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def _initdb(self) -> None:
        self.base_dir.mkdir(mode=_BASE_MODE, parents=True, exist_ok=True)
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        self.pg_dir.chmod(0o700)
        self._own(self.pg_dir)
        if not self._password_file.exists():
            fd = os.open(self._password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        pwfile = self.pg_dir / "initdb-password"
        pwfile.write_text(self.password)
        pwfile.chmod(0o600)
        self._own(pwfile)
        # Made aside and renamed once configured: a Ctrl-C after initdb left a cluster that
        # counted as made without pglayer's settings (localhost, the system's socket
        # directory, 100 connections), for good.
        staging = self.pg_dir / "data.new"
        shutil.rmtree(staging, ignore_errors=True)  # an earlier attempt's, interrupted
        try:
            result = self._run(
                "initdb", "-D", str(staging), "-U", "postgres", "--auth=scram-sha-256",
                f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C", "--no-instructions",
            )  # fmt: skip
            self._check(result, "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        _configure(staging)
        staging.rename(self.data_dir)

    def running_port(self) -> int | None:
        """The port of a server already running on this data directory, if any."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return None
        status = self._run("pg_ctl", "status", "-D", str(self.data_dir))
        if status.returncode != 0:
            return None
        lines = pid_file.read_text().splitlines()
        if lines and lines[0].isdigit() and not _runs_cluster(int(lines[0]), self.data_dir):
            # Left by a server that died, its PID since taken by another program: stale.
            log.warning(
                "removing %s: PID %s does not run this cluster's server (it ended, or the PID"
                " is another program's now)",
                pid_file,
                lines[0],
            )
            pid_file.unlink(missing_ok=True)
            return None
        return int(lines[3]) if len(lines) > 3 and lines[3].isdigit() else None

    def start(self) -> str:
        """Start (or reuse) the server, create the database, and return its URL.

        Every process using the server notes itself in `base_dir/users` while it does, and
        `stop()` stops the server only when no other live process still uses it, whoever
        started it (one whose user was killed is taken over). A lock on the directory makes
        two processes starting at once take turns."""
        with self._said_plainly(), self._locked():
            self._set_aside_orphan()
            try:
                url = self._start(forget_users=True)
            except BaseException:
                self._stop_started_here()
                raise
            self._register()
            return url

    def _stop_started_here(self) -> None:
        """Stop the server this `start()` started, when what followed failed (its password
        refused, its database not made): nobody uses it, and it outlived the command."""
        if not self.started_here or self.running_port() is None:
            return
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60")
        self.started_here = False
        log.info("embedded PostgreSQL stopped")

    def _set_aside_orphan(self) -> None:
        """Server files kept apart (`/var/tmp/pglayer-<hash>`) whose directory was removed
        (`make clean`), password and all: moved aside, so that a new cluster can be made,
        rather than each start asking for a password file that is gone for good."""
        if self.pg_dir.parent == self.base_dir or self._password_file.exists():
            return
        if not self.initialized():
            return
        if self.running_port() is not None:
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w")
        aside = self.pg_dir.with_name(f"pg.orphaned-{int(time.time())}")
        self.pg_dir.rename(aside)
        log.warning(
            "%s was removed; its server files are moved aside to %s (delete them when sure)",
            self.base_dir,
            aside,
        )

    def _start(self, *, forget_users: bool = False) -> str:
        if not self.initialized():
            log.info("initialising an embedded PostgreSQL cluster in %s", self.data_dir)
            self._initdb()
        elif not self.standby and _configure(self.data_dir):
            log.warning(
                "%s lacked pglayer's settings (its initdb was interrupted): added", self.data_dir
            )
        running = self.running_port()
        if running is not None:
            if self.port and self.port != running:
                log.warning(
                    "the embedded PostgreSQL in %s already runs on port %s, not %s as asked:"
                    " reusing it there (stop it to move it)",
                    self.data_dir,
                    running,
                    self.port,
                )
            self.port = running
            log.info("reusing the embedded PostgreSQL already running on port %s", running)
        else:
            if self.port and _in_use(self.port):
                raise EmbeddedPostgresError(
                    f"127.0.0.1:{self.port}, the embedded server's port, is in use by another"
                    " program: choose another (PGLAYER_EMBEDDED_PORT), or 0 for a free one"
                )
            self.port = self.port or _free_port()
            settings = dict(_FAST_TEST_SETTINGS if self.fast_unsafe else {})
            settings.update(self.server_settings)
            options = " ".join([f"-p {self.port}", *(f"-c {k}={v}" for k, v in settings.items())])
            result = self._run(
                "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file),
                "-w", "-t", "60", "-o", options,
            )  # fmt: skip
            self._check(result, "pg_ctl start")
            if forget_users:
                # It was not running, so nobody used it: entries a crash or a reboot left go.
                shutil.rmtree(self.base_dir / "users", ignore_errors=True)
            self.started_here = True
            log.info("embedded PostgreSQL started on 127.0.0.1:%s", self.port)
        if not self.standby:
            self.create_database(self.database)
        return self.url

    def make_standby_of(self, primary: EmbeddedPostgres) -> None:
        """Fill this (uninitialised) directory with a streaming standby of `primary`.

        `pg_basebackup -R` copies the running primary and writes `primary_conninfo`, so
        `start()` then runs a hot standby that follows it.
        """
        if self.initialized():
            raise EmbeddedPostgresError(f"{self.data_dir} already holds a cluster")
        self.base_dir.mkdir(mode=_BASE_MODE, parents=True, exist_ok=True)
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        self.pg_dir.chmod(0o700)
        self._own(self.pg_dir)
        fd = os.open(self._password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(primary.password)
        result = self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(self.data_dir), "-R", "-X", "stream", "--checkpoint=fast",
            env={"PGPASSWORD": primary.password},
        )  # fmt: skip
        self._check(result, "pg_basebackup")
        self.standby = True

    def create_database(self, name: str) -> None:
        """Create database `name` unless it exists."""

        async def create() -> None:
            conn = await asyncpg.connect(self.admin_url(), timeout=10)
            try:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        # A thread of its own, so that this works whether or not an event loop is running.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, create()).result()

    def stop(self, *, force: bool = False, mode: str = "fast") -> None:
        """Stop the server unless another live process still uses it (`force`: regardless).

        Only an object that started (or reused) it stops it, unless `force`."""
        if not (self._user_file is not None or self.started_here or force):
            return
        with self._locked():
            others = self._unregister()
            if others and not force:
                log.info(
                    "embedded PostgreSQL left running: PID %s uses it too",
                    ", ".join(str(p) for p in others),
                )
                self.started_here = False
                return
            if self.running_port() is None:
                self.started_here = False
                return
            result = self._run(
                "pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60"
            )  # fmt: skip
            self._check(result, "pg_ctl stop")
            self.started_here = False
            log.info("embedded PostgreSQL stopped")

    def keep_running(self, every: float = 2.0) -> Callable[[], None]:
        """Watch the server from a thread and start it again, saying so, if it dies (the
        OOM killer, a `kill -9`); returns the function that stops watching."""
        stopped = threading.Event()

        def watch() -> None:
            while not stopped.wait(every):
                if self._postmaster_alive():
                    continue
                if not self.initialized():
                    log.error(
                        "the embedded PostgreSQL's directory %s is gone: it is not started"
                        " again (restart to make a new one)",
                        self.data_dir,
                    )
                    return
                log.error(
                    "the embedded PostgreSQL in %s is not running any more (its log: %s);"
                    " starting it again",
                    self.data_dir,
                    self.log_file,
                )
                try:
                    with self._said_plainly(), self._locked():
                        self._start()
                except PglayerError as exc:
                    log.error("the embedded PostgreSQL could not be started again: %s", exc)  # noqa: TRY400

        thread = threading.Thread(target=watch, name="pglayer-embedded-watch", daemon=True)
        thread.start()

        def stop_watching() -> None:
            stopped.set()
            thread.join(timeout=every + 1)

        return stop_watching

    def _postmaster_alive(self) -> bool:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return False
        return first.isdigit() and alive(int(first)) and _runs_cluster(int(first), self.data_dir)

    # -- who uses it ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.base_dir.mkdir(mode=_BASE_MODE, parents=True, exist_ok=True)
        fd = os.open(self.base_dir / "lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def _register(self) -> None:
        if self._user_file is None:
            users = self.base_dir / "users"
            users.mkdir(mode=0o700, exist_ok=True)
            pid = os.getpid()
            self._user_file = users / f"{pid}.{_started(pid)}.{secrets.token_hex(4)}"
            self._user_file.touch()

    def _unregister(self) -> list[int]:
        """Forget this object as a user; the PIDs of the live processes that still use it."""
        if self._user_file is not None:
            self._user_file.unlink(missing_ok=True)
            self._user_file = None
        live = []
        for entry in (self.base_dir / "users").glob("*.*"):
            if _still_running(entry.name):
                live.append(int(entry.name.split(".", 1)[0]))
            else:
                entry.unlink(missing_ok=True)  # its process ended without saying so
        return sorted(set(live))

    def restart(self, *, mode: str = "fast") -> None:
        """Restart the server on the same port (for fault-injection tests)."""
        result = self._run(
            "pg_ctl", "restart", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60",
            "-l", str(self.log_file),
        )  # fmt: skip
        self._check(result, "pg_ctl restart")

    def destroy(self, *, force: bool = False) -> None:
        """Stop the server (if running) and delete every file of the cluster; refused while
        another process uses it (`make clean` under a running `make run` took its database
        from under it), unless `force`."""
        if not force and (self.base_dir / "users").is_dir():
            with self._locked():
                others = [pid for pid in self._unregister() if pid != os.getpid()]
            if others:
                raise EmbeddedPostgresError(
                    f"{self.base_dir} is in use by PID {', '.join(map(str, others))}: stop it first"
                )
        with contextlib.suppress(EmbeddedPostgresError):
            self.stop(force=True, mode="immediate")
        shutil.rmtree(self.pg_dir, ignore_errors=True)
        self._password_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
