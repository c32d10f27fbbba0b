"""The embedded server's ownership (who stops it), its errors, and its watcher."""

from __future__ import annotations

import asyncio
import logging
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
import pytest
from pydantic import ValidationError

from pglayer import DatabaseSettings
from pglayer._embedded import EmbeddedPostgres, EmbeddedPostgresError, _pgserver_bindir
from tests.conftest import free_port, require_external
from tests.test_cli import embedded_dir


@pytest.fixture(scope="module")
def cluster_dir() -> Iterator[Path]:
    """One initialised cluster for the module (initdb once), stopped after each test."""
    with embedded_dir("pglayer-embedded-") as base:
        first = EmbeddedPostgres(base)  # made here: a test run alone finds it made too
        first.start()
        first.stop()
        yield base


@pytest.fixture
def base(cluster_dir: Path) -> Iterator[Path]:
    yield cluster_dir
    EmbeddedPostgres(cluster_dir).stop(force=True)
    shutil.rmtree(cluster_dir / "users", ignore_errors=True)


def test_the_process_that_started_it_leaves_it_running_for_another_that_uses_it(
    base: Path,
) -> None:
    first, second = EmbeddedPostgres(base), EmbeddedPostgres(base)
    first.start()
    second.start()  # reuses it
    first.stop()
    assert second.running_port() is not None  # still served to the second
    second.stop()  # the last user: it stops it, though it did not start it
    assert second.running_port() is None


def test_a_port_asked_for_is_used_and_one_in_use_is_named(base: Path) -> None:
    port = free_port()
    server = EmbeddedPostgres(base, port=port)
    assert f"127.0.0.1:{port}/" in server.start()
    server.stop()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(EmbeddedPostgresError, match=f"127.0.0.1:{port}.*in use"):
            EmbeddedPostgres(base, port=port).start()


def test_a_port_asked_for_a_server_already_running_elsewhere_is_said(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = EmbeddedPostgres(base, port=free_port())
    first.start()
    asked = free_port()
    second = EmbeddedPostgres(base, port=asked)
    try:
        url = second.start()  # reused where it runs: it serves the first's users too
    finally:
        second.stop()
        first.stop()
    assert f":{asked}/" not in url
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"not {asked} as asked" in m for m in said), said


def test_an_embedded_port_below_1024_is_refused_by_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGLAYER_EMBEDDED_PORT", "80")
    with pytest.raises(ValidationError, match="below 1024 only root may listen"):
        DatabaseSettings()


def test_a_cluster_without_pglayers_settings_gets_them_at_its_next_start(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Ctrl-C between initdb and the settings left such a cluster, started as it was for
    # good: localhost, the system's socket directory, 100 connections.
    server = EmbeddedPostgres(base)
    server.start()
    server.stop()
    conf = base / "pg" / "data" / "postgresql.conf"
    text = conf.read_text()
    conf.write_text(text[: text.index("# added by pglayer")])
    server.start()
    max_connections = asyncio.run(_show(server.url, "max_connections"))
    assert max_connections == "200"
    assert any("lacked pglayer's settings" in r.getMessage() for r in caplog.records)


async def _show(url: str, name: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval(f"SHOW {name}"))
    finally:
        await conn.close()


def test_an_interrupted_initdb_leaves_no_cluster_that_counts_as_made() -> None:
    with embedded_dir("pglayer-embedded-init-") as fresh:
        server = EmbeddedPostgres(fresh)
        leftover = server.pg_dir / "data.new"  # as an initdb cut short leaves it
        leftover.mkdir(parents=True)
        (leftover / "PG_VERSION").write_text("15\n")
        assert not server.initialized()
        server.start()
        try:
            assert asyncio.run(_show(server.url, "listen_addresses")) == "127.0.0.1"
            assert not leftover.exists()
        finally:
            server.stop()


def test_destroying_a_server_another_process_uses_is_refused(base: Path) -> None:
    # `make clean` under a running `make run` took the shop's database from under it.
    user = subprocess.Popen(
        [sys.executable, "-c", _USES_IT, str(base)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert user.stdout is not None
        assert user.stdout.readline().strip() == "started"
        with pytest.raises(EmbeddedPostgresError, match=f"in use by PID {user.pid}"):
            EmbeddedPostgres(base).destroy()
        assert EmbeddedPostgres(base).running_port() is not None  # still serving its user
    finally:
        user.terminate()
        user.communicate(timeout=30)


_USES_IT = """
import sys, time
from pathlib import Path
from pglayer._embedded import EmbeddedPostgres

EmbeddedPostgres(Path(sys.argv[1])).start()
print("started", flush=True)
time.sleep(60)
"""


def test_a_server_whose_user_was_killed_is_stopped_by_the_next_user(base: Path) -> None:
    orphaned = EmbeddedPostgres(base)
    orphaned.start()
    # Its process killed (-9): its entry stays, naming a process that no longer exists.
    entry = orphaned._user_file
    assert entry is not None
    entry.rename(entry.with_name(f"{2**22 + 12345}.dead"))
    later = EmbeddedPostgres(base)
    later.start()
    later.stop()
    assert later.running_port() is None


def test_entries_of_processes_that_are_not_users_do_not_keep_it_running(base: Path) -> None:
    users = base / "users"
    users.mkdir(exist_ok=True)
    other = subprocess.Popen(["sleep", "60"])
    try:
        started = (Path(f"/proc/{other.pid}/stat").read_text().rsplit(")", 1)[1].split())[19]
        # Left while the server was stopped (a crash, a reboot): it names a live process.
        (users / f"{other.pid}.{started}.left").touch()
        server = EmbeddedPostgres(base)
        server.start()  # started afresh: nobody could have been using it
        # A PID given to another process since: the same PID, another start time.
        (users / f"{other.pid}.1.reused").touch()
        server.stop()
        assert server.running_port() is None
    finally:
        other.kill()
        other.wait()


def test_a_stale_pid_file_naming_another_program_does_not_stop_a_start(base: Path) -> None:
    server = EmbeddedPostgres(base)
    server.start()
    server.stop()
    # Left by a server that died; its PID now runs another program of the server's user,
    # named as a backend of some other PostgreSQL would be.
    owner = server.data_dir.stat()
    other = subprocess.Popen(
        ["bash", "-c", 'exec -a "postgres: app shop 127.0.0.1 idle" sleep 60'],
        user=owner.st_uid,
        group=owner.st_gid,
    )
    try:
        pid_file = server.data_dir / "postmaster.pid"
        pid_file.write_text(f"{other.pid}\n{server.data_dir}\n0\n1\n")  # port 1: nothing
        os.chown(pid_file, owner.st_uid, owner.st_gid)
        again = EmbeddedPostgres(base)
        again.start()
        assert again.running_port() not in (None, 1)
        again.stop()
    finally:
        other.kill()
        other.wait()


def test_a_server_started_by_hand_with_another_spelling_of_its_directory_is_kept(
    base: Path,
) -> None:
    server = EmbeddedPostgres(base)
    server.start()
    server.stop()
    # An operator's `pg_ctl` with a relative data directory and a port of their own: the
    # server's command line does not name the directory as pglayer spells it.
    owner = server.data_dir.stat()
    port = free_port()
    pg_ctl = str(server.bindir / "pg_ctl")
    subprocess.run(
        [pg_ctl, "start", "-w", "-D", "data", "-o", f"-p {port}", "-l", "by-hand.log"],
        cwd=server.pg_dir, user=owner.st_uid, group=owner.st_gid, check=True,
        capture_output=True,
    )  # fmt: skip
    assert EmbeddedPostgres(base).running_port() == port  # not taken for a stale PID file
    assert (server.data_dir / "postmaster.pid").exists()


def test_a_server_that_dies_is_started_again_and_said(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pglayer.embedded")
    server = EmbeddedPostgres(base)
    server.start()
    port = server.port
    unwatch = server.keep_running(every=0.2)
    try:
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server.running_port() != port and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.running_port() == port  # on the same port: the app's URL still holds
    finally:
        unwatch()
        server.stop()
    said = [r.getMessage() for r in caplog.records]
    assert any("is not running any more" in m and "server.log" in m for m in said), said


def test_a_server_whose_directory_was_removed_is_not_made_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="pglayer.embedded")
    with embedded_dir("pglayer-gone-") as base:
        server = EmbeddedPostgres(base)
        server.start()
        unwatch = server.keep_running(every=0.2)
        try:
            server.stop(force=True)
            shutil.rmtree(server.pg_dir)  # `make clean` in another terminal, say
            time.sleep(1.0)
            assert not server.initialized()  # no new, empty cluster with a new password
        finally:
            unwatch()
    said = [r.getMessage() for r in caplog.records]
    assert any("is gone: it is not started again" in m for m in said), said


def test_a_file_where_the_directory_should_be_is_one_line_that_says_what_to_do(
    tmp_path: Path,
) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(EmbeddedPostgresError, match="choose another directory with --data-dir"):
        EmbeddedPostgres(tmp_path / "afile").start()


def test_a_missing_password_file_is_named(base: Path) -> None:
    password = base / "password"
    kept = password.read_bytes()
    password.unlink()
    try:
        with pytest.raises(EmbeddedPostgresError, match=r"password file .* is missing"):
            EmbeddedPostgres(base).start()
        assert EmbeddedPostgres(base).running_port() is None  # started for nothing: stopped
    finally:
        password.write_bytes(kept)
        password.chmod(0o600)


def test_a_wrong_password_file_is_named(base: Path) -> None:
    password = base / "password"
    kept = password.read_bytes()
    password.write_text("not-the-password")
    try:
        with pytest.raises(EmbeddedPostgresError, match="refused the password in"):
            EmbeddedPostgres(base).start()
        # It was left running: `pglayer-shop migrate` ended with its server still up.
        assert EmbeddedPostgres(base).running_port() is None
    finally:
        password.write_bytes(kept)


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the server then runs as another user")
def test_server_files_kept_apart_from_a_removed_directory_do_not_block_a_new_one() -> None:
    private = Path(tempfile.mkdtemp(prefix="pglayer-private-"))  # 0700, as /root is: the
    base = private / "app"  # server user cannot reach it, so its files are kept in /var/tmp
    first = EmbeddedPostgres(base)
    kept_apart = first.pg_dir.parent
    try:
        assert kept_apart.parent == Path("/var/tmp")  # noqa: S108
        first.start()
        first.stop()
        shutil.rmtree(base)  # `make clean`
        again = EmbeddedPostgres(base)
        again.start()  # a new cluster, not "the password file is missing"
        assert again.running_port() is not None
        again.stop()
        assert list(kept_apart.glob("pg.orphaned-*"))  # the old one kept, out of the way
    finally:
        EmbeddedPostgres(base).destroy()
        shutil.rmtree(kept_apart, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


_CTRL_C_DURING_STOP = """
import os, signal, sys, threading, time
from pathlib import Path
from pglayer._embedded import EmbeddedPostgres

signal.signal(signal.SIGINT, lambda *_: None)  # this process carries on, as serve does
server = EmbeddedPostgres(Path(sys.argv[1]))
server.start()
failed = []

def stop():
    try:
        server.stop()
    except Exception as exc:
        failed.append(exc)

stopping = threading.Thread(target=stop)
stopping.start()
while stopping.is_alive():  # a terminal's Ctrl-C, again and again, to the whole group
    os.killpg(os.getpgrp(), signal.SIGINT)
    time.sleep(0.002)
print("failed" if failed else "stopped", failed)
"""


def test_a_ctrl_c_to_the_terminal_while_it_stops_does_not_fail_the_stop(base: Path) -> None:
    # `pg_ctl stop` shared the terminal's process group: Ctrl-C killed it halfway ("pg_ctl
    # stop failed (exit -2)") though the server went on stopping.
    result = subprocess.run(
        [sys.executable, "-c", _CTRL_C_DURING_STOP, str(base)],
        capture_output=True, text=True, timeout=120, start_new_session=True, check=False,
    )  # fmt: skip
    assert result.stdout.startswith("stopped"), result.stdout + result.stderr
    assert EmbeddedPostgres(base).running_port() is None


def test_its_directory_is_writable_by_its_owner_alone_whatever_the_umask(
    tmp_path: Path,
) -> None:
    # Under `umask 000` the directory, its lock and `users/` were writable by anyone, who
    # could then replace the password file or the list of processes using the server.
    server = EmbeddedPostgres(tmp_path / "app")
    before = os.umask(0)
    try:
        with server._locked():
            server._register()
    finally:
        os.umask(before)
        server._unregister()
    modes = {
        name: (tmp_path / "app" / name).stat().st_mode & 0o777 for name in ("", "lock", "users")
    }
    assert modes == {"": 0o755, "lock": 0o600, "users": 0o700}


def test_a_cluster_of_another_postgresql_version_is_one_line_that_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A newcomer's cluster made by the pgserver wheel (16), started after a system
    # PostgreSQL 15 came on the path: pg_ctl's failure and 15 lines of the server's log.
    wheel, system = _pgserver_bindir(), Path("/usr/lib/postgresql/15/bin")
    require_external(wheel is not None, "the pgserver wheel is not installed")
    require_external((system / "pg_ctl").is_file(), "PostgreSQL 15 is not installed")
    monkeypatch.setenv("PGLAYER_PG_BINDIR", str(wheel))
    assert wheel is not None
    made = EmbeddedPostgres(tmp_path / "app")
    try:
        made.start()
        made.stop()
        monkeypatch.setenv("PGLAYER_PG_BINDIR", str(system))
        with pytest.raises(EmbeddedPostgresError) as refused:
            EmbeddedPostgres(tmp_path / "app").start()
    finally:
        monkeypatch.setenv("PGLAYER_PG_BINDIR", str(wheel))
        EmbeddedPostgres(tmp_path / "app").destroy()
    said = str(refused.value)
    assert "was made by PostgreSQL 16, and the server found" in said, said
    assert "is 15." in said
    assert "\n" not in said
