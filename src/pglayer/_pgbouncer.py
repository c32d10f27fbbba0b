"""A real PgBouncer (Debian's package) in front of a server, started and stopped by PID.

For tests and benchmarks of an app behind a transaction pooler; `pglayer.testing` exports it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["PgBouncer", "PoolMode", "pgbouncer_binary"]

PoolMode = Literal["transaction", "session", "statement"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pgbouncer_binary() -> str | None:
    """The path of the `pgbouncer` executable, or None when it is not installed."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)),
        None,
    )


class PgBouncer:
    """PgBouncer on a free loopback port, forwarding every database to `server_url`'s server.

    `host` and `port` put it elsewhere on the loopback: `127.0.0.2` and the server's own port
    is a pooler a client cannot tell by its port.

    The client user and password are the server's; the same user is an admin of the
    console (database `pgbouncer`), for PAUSE/RESUME/RECONNECT.
    """

    def __init__(
        self,
        server_url: str,
        *,
        pool_mode: PoolMode = "transaction",
        pool_size: int = 5,
        max_client_conn: int = 2000,
        server_login_retry: int = 15,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed")
        self.binary = binary
        parts = urlsplit(server_url)
        self.user = parts.username or "postgres"
        self.password = parts.password or ""
        self.server_host = parts.hostname or "127.0.0.1"
        self.server_port = parts.port or 5432
        self.host = host
        self.port = _free_port() if port is None else port
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.server_login_retry = server_login_retry  # seconds it refuses after a failed login
        self.dir = Path(tempfile.mkdtemp(prefix="pglayer-pgbouncer-"))
        self.dir.chmod(0o755)
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        auth = f"{self.user}:{self.password}" if self.password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def _write_config(self) -> Path:
        auth_file = self.dir / "users.txt"
        auth_file.write_text(f'"{self.user}" "{self.password}"\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            f"""
[databases]
* = host={self.server_host} port={self.server_port}

[pgbouncer]
listen_addr = {self.host}
listen_port = {self.port}
unix_socket_dir =
auth_type = {"scram-sha-256" if self.password else "trust"}
auth_file = {auth_file}
admin_users = {self.user}
pool_mode = {self.pool_mode}
default_pool_size = {self.pool_size}
max_client_conn = {self.max_client_conn}
server_login_retry = {self.server_login_retry}
max_db_connections = {self.pool_size}
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {self.dir / "pgbouncer.log"}
"""
        )
        user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if user is not None:
            for path in (self.dir, auth_file, ini):
                os.chown(path, user.pw_uid, user.pw_gid)
            auth_file.chmod(0o600)
        return ini

    def start(self) -> PgBouncer:
        ini = self._write_config()
        # PgBouncer refuses to run as root: -u drops to the server's unprivileged user.
        args = [self.binary, *(["-u", "postgres"] if os.geteuid() == 0 else []), str(ini)]
        stderr = self.dir / "stderr.log"
        with stderr.open("ab") as err:
            self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        try:
            self._wait_listening(stderr)
        except BaseException:  # not listening, or interrupted (a signal): not left running
            self.stop()
            raise
        return self

    def _wait_listening(self, stderr: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {self._proc.returncode}: {stderr.read_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("pgbouncer did not start listening")

    def stop(self) -> None:
        """Stop our own process, by its PID (SIGTERM: immediate shutdown)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            self._proc.wait(10)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        try:
            return self.start()
        except BaseException:  # __exit__ does not run: its directory goes too
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
