"""`pglayer bench --quick` end to end: the smoke run CI executes (no thresholds asserted)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from benchmarks.run import median_row, parser
from tests.conftest import Server, require_external
from tests.test_cli import SHOP, clean_env

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_quick_bench_runs_every_server_and_scenario_and_writes_results(server: Server) -> None:
    require_external(shutil.which("wrk") is not None, "wrk is not installed")
    before = set(RESULTS.glob("bench-*.json")) if RESULTS.exists() else set()
    result = subprocess.run(
        [SHOP, "bench", "--quick", "--duration", "1", "--concurrency", "16", "--rounds", "2"],
        env=clean_env(DATABASE_URL=server.admin_url, COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [new] = set(RESULTS.glob("bench-*.json")) - before
    try:
        report = json.loads(new.read_text())
        assert new.with_suffix(".png").stat().st_size > 0
        seen = {(r["scenario"], r["server"]) for r in report["rows"]}
        for scenario in ("users", "dashboard"):
            assert {(scenario, s) for s in ("shop", "baseline", "bare", "floor")} <= seen
        for scenario in ("orders", "mix", "overload", "storm", "hotrow-orders", "hotrow-reads"):
            assert {(scenario, s) for s in ("shop", "baseline")} <= seen
        for row in report["rows"]:
            assert row["requests"] > 0 or row["server"] == "baseline", row
            if row["scenario"] in ("users", "dashboard", "orders", "mix"):
                assert row["socket_errors"] == 0, row
                assert len(row["rps_rounds"]) == 2, row  # both rounds, the median kept
                if row["server"] == "shop":  # its access log times the app's part
                    assert 0 < row["app_p99_ms"] <= row["p99_ms"] * 1.1 + 5, row
                elif row["server"] in ("baseline", "bare", "floor"):
                    assert row["app_p99_ms"] is None, row
        assert "rps/baseline" in result.stdout
    finally:
        if not os.environ.get("PGLAYER_KEEP_BENCH_RESULTS"):
            new.unlink()
            new.with_suffix(".png").unlink(missing_ok=True)


def test_each_server_keeps_its_median_round() -> None:
    rounds = [
        {"rps": 900.0, "p99_ms": 9},
        {"rps": 1200.0, "p99_ms": 5},
        {"rps": 1000.0, "p99_ms": 7},
    ]
    row = median_row(rounds)
    assert (row["rps"], row["p99_ms"]) == (1000.0, 7)  # one round's figures, not a blend
    assert row["rps_rounds"] == [900.0, 1200.0, 1000.0]
    assert median_row(rounds[:2])["rps"] == 900.0  # an even count keeps the lower middle
    assert "rps_rounds" not in median_row(rounds[:1])


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--workers", "99999999999999999999"], "whole numbers"),  # started workers without end
        (["--workers", "17"], "from 1 to 16"),
        (["--workers", "\uff12"], "whole numbers"),  # a fullwidth 2, which int() takes
        (["--concurrency", "64,,128"], "whole numbers"),
        (["--concurrency", "0"], "from 1 to"),
        (["--duration", "nan"], "not a number of seconds"),
        (["--duration", "3601"], "from 1 to 3600"),
        (["--duration", "0.001"], "from 1 to 3600"),  # a run of a millisecond measured req/s
        (["--duration", "\u0665"], "not a number of seconds"),  # an Arabic-Indic 5
        (["--scenarios", "users,,orders"], "an empty name"),
        (["--rounds", "2,3"], "one number"),
        (["--rounds", "0"], "--rounds: must be from 1 to 15"),
        (["--workers", "2,2"], "given twice"),
        (["--servers", "shop,shop"], "given twice"),
        (["--scenarios", "users,nope"], "'nope' (choose from users"),
        (["--servers", ","], "an empty name"),
    ],
)
def test_bench_refuses_options_out_of_bounds_before_starting_anything(
    args: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(args)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_a_usage_error_of_bench_under_json_logs_is_one_json_record() -> None:
    env = clean_env(PGLAYER_LOG_FORMAT="json")
    done = subprocess.run(
        [SHOP, "bench", "--workers", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    [record] = [json.loads(line) for line in done.stderr.splitlines()]
    assert record["level"] == "error"
    assert "argument --workers: must be from 1 to 16: '0'" in record["message"]


@pytest.mark.parametrize(
    ("log_format", "url", "said"),
    [
        ("text", "postgresql://x@127.0.0.1:1/x", "database: nothing is listening at"),
        ("json", "postgresql://x@127.0.0.1:1/x", "database: nothing is listening at"),
        ("text", "postgresql://x:pw@127.0.0.1:99999/x", "a port is not one of 1..65535"),
    ],
)
def test_a_bench_that_cannot_reach_its_database_says_so_in_one_line(
    log_format: str, url: str, said: str
) -> None:
    # It printed asyncpg's traceback (52 lines for a port out of range), under JSON logs too.
    env = clean_env(DATABASE_URL=url, PGLAYER_LOG_FORMAT=log_format)
    done = subprocess.run(
        [SHOP, "bench", "--quick"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    message = json.loads(line)["message"] if log_format == "json" else line
    assert said in message, message


def test_a_bench_terminated_as_it_starts_exits_as_a_shell_says_so() -> None:
    # Killed before it handles signals, its child's -15 became 241.
    bench = subprocess.Popen(
        [SHOP, "bench", "--quick"], env=clean_env(DATABASE_URL="postgresql://x@127.0.0.1:1/x"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not psutil.Process(bench.pid).children():  # the wrapper is up, its child starting
        assert time.monotonic() < deadline
        time.sleep(0.005)
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=60) == 128 + signal.SIGTERM


@pytest.mark.timeout(420)
@pytest.mark.parametrize("into_the_run", [3.0, 0.0])  # measuring, or while a server starts
def test_a_terminated_bench_stops_every_server_it_started(
    server: Server, into_the_run: float
) -> None:
    bench = subprocess.Popen(
        [SHOP, "bench", "--quick", "--duration", "60", "--servers", "shop", "--scenarios",
         "users", "--no-overload", "--no-storm", "--no-hotrow", "--generator", "asyncio"],
        env=clean_env(DATABASE_URL=server.admin_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        started = _wait_for_a_server(bench, time.monotonic() + 240, into_the_run)
        bench.send_signal(signal.SIGTERM)  # to `pglayer-shop bench` alone, not its group
        output, _ = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM" in output
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [p.cmdline() for p in alive]


def _wait_for_a_server(
    bench: subprocess.Popen[str], deadline: float, then: float
) -> list[psutil.Process]:
    """Every process under `bench` `then` seconds after one of them is uvicorn."""
    while time.monotonic() < deadline:
        assert bench.poll() is None, bench.communicate()[0][-3000:]
        below = psutil.Process(bench.pid).children(recursive=True)
        with_cmdline = [p for p in below if "uvicorn" in " ".join(_cmdline(p))]
        if with_cmdline:
            time.sleep(then)
            return list(psutil.Process(bench.pid).children(recursive=True))
        time.sleep(0.2)
    raise AssertionError("the benchmark started no server")


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return list(process.cmdline())
    except psutil.Error:
        return []
