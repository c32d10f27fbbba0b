"""`pglayer serve --workers 2`: one pool per worker, metrics for all from any, a clean drain."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from pglayer._serve import metrics_directory
from tests.conftest import backends, children_of, free_port, wait_for
from tests.test_cli import SHOP, clean_env, wait_ready


def serve_two_workers(port: int, env: dict[str, str], log_file: IO[str]) -> subprocess.Popen[str]:
    """`pglayer serve --workers 2`, its output to `log_file`; returns at once."""
    return subprocess.Popen(
        [SHOP, "serve", "--port", str(port), "--workers", "2", "--no-seed"],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _refused(port: int) -> bool:
    """Whether a new connection to `port` is refused now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def samples(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


async def test_two_workers_share_metrics_log_json_and_drain_on_sigterm(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(
        DATABASE_URL=db_url,
        PGLAYER_LOG_FORMAT="json",
        PGLAYER_APPLICATION_NAME="pglayer-workers",
        PGLAYER_MIN_SIZE="2",
    )
    with tempfile.TemporaryFile(mode="w+") as log_file:
        proc = serve_two_workers(port, env, log_file)
        try:
            wait_ready(url, proc)
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:

                async def both_pools_open() -> bool:
                    rows = await backends(admin, db_name)
                    return len([r for r in rows if r["application_name"] == "pglayer-workers"]) >= 4

                assert await wait_for(both_pools_open, timeout=20)
                for i in range(40):
                    response = await client.get("/users/1", headers={"X-Request-ID": f"multi-{i}"})
                    assert response.status_code == 404
                # Whichever worker answers the scrape reports what both served.
                await asyncio.sleep(1.2)  # one publishing interval of the workers
                for _ in range(4):
                    text = (await client.get("/metrics")).text
                    parsed = samples(text)
                    served = sum(
                        s.value
                        for s in parsed
                        if s.name == "pglayer_http_requests_total"
                        and s.labels.get("route") == "/users/{user_id}"
                    )
                    assert served == 40
                    acquisitions = [
                        s for s in parsed if s.name == "pglayer_pool_acquisitions_total"
                    ]
                    assert len({s.labels["worker"] for s in acquisitions}) == 2
                    assert sum(s.value for s in acquisitions) >= 40
        finally:
            proc.send_signal(signal.SIGTERM)  # our own child, by its PID
            code = proc.wait(30)
        log_file.seek(0)
        lines = log_file.read().splitlines()
    assert code == 0, "\n".join(lines[-30:])
    records = [orjson.loads(line) for line in lines if line.startswith("{")]
    access = [r for r in records if r["logger"] == "pglayer.access"]
    assert {r["request_id"] for r in access} >= {f"multi-{i}" for i in range(40)}
    assert all(r["route"] == "/users/{user_id}" for r in access if r["path"] == "/users/1")

    async def pools_closed() -> bool:
        rows = await backends(admin, db_name)
        return not any(r["application_name"] == "pglayer-workers" for r in rows)

    assert await wait_for(pools_closed, timeout=10)


async def test_sigterm_lets_an_in_flight_order_finish_before_the_workers_exit(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(DATABASE_URL=db_url, PGLAYER_LOG_LEVEL="WARNING")
    with tempfile.TemporaryFile(mode="w+") as log_file:
        proc = serve_two_workers(port, env, log_file)
        try:
            wait_ready(url, proc)
            async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                user = (
                    await client.post("/users", json={"name": "T", "email": "term@example.com"})
                ).json()["id"]
                assert (
                    await client.post(f"/accounts/{user}/deposits", json={"amount": "50.00"})
                ).status_code == 200
                product = (
                    await client.post("/products", json={"name": "P", "price": "5.00", "stock": 3})
                ).json()["id"]
                locker: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
                try:
                    # Hold the product's row lock: the order waits on it, in flight.
                    tx = locker.transaction()
                    await tx.start()
                    await locker.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", product)
                    order = asyncio.create_task(
                        client.post(
                            "/orders", json={"user_id": user, "product_id": product, "quantity": 1}
                        )
                    )

                    async def waiting_on_the_lock() -> bool:
                        rows = await admin.fetch(
                            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND datname = $1",
                            db_name,
                        )
                        return bool(rows)

                    assert await wait_for(waiting_on_the_lock, timeout=4)
                    proc.send_signal(signal.SIGTERM)  # our own child, by its PID
                    # Draining: a new connection is refused, not taken into a backlog that
                    # no worker accepts from any more and reset at the exit. The supervisor
                    # looks at its signals every half second: refused within a few.
                    assert await wait_for(lambda: asyncio.to_thread(_refused, port), timeout=5)
                    assert proc.poll() is None, "exited with a request in flight"
                    await tx.rollback()  # the order proceeds now
                finally:
                    await locker.close()
                response = await order
            code = await asyncio.to_thread(proc.wait, 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log_file.seek(0)
        output = log_file.read()
    assert response.status_code == 201, response.text
    assert code == 0, output[-3000:]


async def test_a_worker_killed_under_the_supervisor_is_logged_as_an_error(db_url: str) -> None:
    # uvicorn says it at INFO; an alert on errors would miss a worker the kernel killed
    # for its memory. One told to stop (SIGTERM) drains: a warning, not a death.
    port = free_port()
    env = clean_env(DATABASE_URL=db_url, PGLAYER_LOG_FORMAT="json")
    with tempfile.TemporaryFile(mode="w+") as log_file:
        proc = serve_two_workers(port, env, log_file)

        def said(pid: int) -> list[dict[str, Any]]:
            log_file.seek(0)
            lines = [orjson.loads(x) for x in log_file.read().splitlines() if x[:1] == "{"]
            return [r for r in lines if f"[{pid}] " in r["message"] and "replaces" in r["message"]]

        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
            workers = children_of(proc.pid)
            assert len(workers) >= 2, workers
            killed, stopped = sorted(workers)[-2:]  # our own workers, by their PIDs
            os.kill(killed, signal.SIGKILL)
            assert await wait_for(lambda: asyncio.sleep(0, said(killed)), timeout=15)
            os.kill(stopped, signal.SIGTERM)
            assert await wait_for(lambda: asyncio.sleep(0, said(stopped)), timeout=15)
            wait_ready(f"http://127.0.0.1:{port}", proc)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                scraped = samples((await client.get("/metrics")).text)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        ((died,), (ended,)) = said(killed), said(stopped)
    assert died["level"] == "error", died
    assert "killed by SIGKILL" in died["message"], died
    assert ended["level"] == "warning", ended
    assert "stopped" in ended["message"], ended
    # The dead worker's series just vanish: its death is counted for an alert.
    deaths = [s.value for s in scraped if s.name == "pglayer_worker_deaths_total"]
    assert deaths == [1.0], deaths


def test_metrics_directories_of_servers_gone_without_removing_them_are_removed() -> None:
    # `kill -9` of `pglayer serve --workers N` left its directory in /tmp for good.
    ended = subprocess.Popen(["true"])
    ended.wait()
    gone = Path(tempfile.mkdtemp(prefix=f"pglayer-metrics-{ended.pid}-"))
    ours = Path(tempfile.mkdtemp(prefix=f"pglayer-metrics-{os.getpid()}-"))  # a live one's
    try:
        made = metrics_directory()
        try:
            assert not gone.exists()
            assert ours.exists()
            assert made.name.startswith(f"pglayer-metrics-{os.getpid()}-")
        finally:
            made.rmdir()
    finally:
        for path in (gone, ours):
            if path.exists():
                path.rmdir()
