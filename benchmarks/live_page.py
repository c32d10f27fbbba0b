"""What an open live pool page costs the shop: req/s of `GET /users/{id}` with the page open
in headless Chromium, against none, in interleaved runs.

    python -m benchmarks.live_page [--rounds 6] [--duration 8] [--concurrency 64]

Seeds the quick benchmark database (as `pglayer bench --quick`: `DATABASE_URL`, else the
embedded server), serves the shop with one uvicorn worker as the benchmark does
(`python -m uvicorn --factory pglayer_shop.app:create_app --loop uvloop --http httptools`,
`PGLAYER_ADMIN_TOKEN` set), signs a headless Chromium in through the page's token form,
then alternates runs of `wrk -t2 -c64 -d8s` (random user ids, `load.wrk.lua`) with the
browser on the page and on `about:blank` (the order flips every round, so drift hits both
alike). Prints each run and writes `results/live-page-cost.json`. Needs wrk, chromium,
chromedriver and selenium.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
import orjson
import psutil
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from benchmarks.load import run_wrk
from benchmarks.run import POOL_MAX, RESULTS, ROOT, _free_port, prepare_database, wait_until_serving

TOKEN = "live-page-benchmark-token"  # noqa: S105  (a local throwaway server)


def serve_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "--factory", "pglayer_shop.app:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning", "--backlog", "4096",
    ]  # fmt: skip


def start_shop(url: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
        "PGLAYER_ADMIN_TOKEN": TOKEN,
        "PGLAYER_MIN_SIZE": str(POOL_MAX),
        "PGLAYER_MAX_SIZE": str(POOL_MAX),
        "PGLAYER_TUNE_GC": "true",
    }
    proc = subprocess.Popen(serve_command(port), env=env, cwd=ROOT)
    try:
        wait_until_serving(proc, f"http://127.0.0.1:{port}", "the shop")
    except RuntimeError:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # our own child, by its PID
            proc.wait(30)
        raise
    return proc


def start_browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--disable-extensions", "--no-first-run", "--window-size=1280,1000",
    ):  # fmt: skip
        options.add_argument(argument)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(options=options, service=service)


def browser_cpu(driver: webdriver.Chrome) -> float:
    """CPU seconds of chromedriver and every Chromium process so far."""
    pid = driver.service.process.pid
    total = 0.0
    root = psutil.Process(pid)
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def poll_cost(base: str, pid: int, n: int = 1000) -> dict[str, float]:
    """The shop's CPU per answer of `pool.json` (what the page asks every second) and, for
    scale, per `GET /users/{id}`: `n` sequential requests each, CPU of the server only."""
    process = psutil.Process(pid)
    out: dict[str, float] = {}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, headers=headers) as client:
        for name, path in (("pool_json", "/admin/pool.json"), ("users", "/users/1")):
            before = sum(process.cpu_times()[:2])
            for _ in range(n):
                response = client.get(path)
                assert response.status_code == 200
            out[f"{name}_cpu_us"] = round((sum(process.cpu_times()[:2]) - before) / n * 1e6, 1)
            out[f"{name}_bytes"] = len(response.content)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.live_page", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    # Stopped with SIGTERM: still close the browser, the shop and the database (`finally`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    url, max_id, product, stop_database = prepare_database(quick=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    shop = start_shop(url, port)
    driver = None
    per_poll: dict[str, float] = {}
    runs: list[dict[str, Any]] = []
    try:
        run_wrk(base, "users", args.concurrency, 4, max_id, product)  # warm up
        driver = start_browser()
        driver.get(f"{base}/admin/pool")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "open").click()
        WebDriverWait(driver, 10).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '[data-pool="primary"]')
        )
        for round_ in range(args.rounds):
            order = ("none", "page") if round_ % 2 == 0 else ("page", "none")
            for mode in order:
                driver.get(f"{base}/admin/pool" if mode == "page" else "about:blank")
                time.sleep(2)  # the page loaded and polling
                if mode == "page":
                    assert driver.find_elements(By.CSS_SELECTOR, '[data-pool="primary"]')
                cpu = browser_cpu(driver)
                result = run_wrk(base, "users", args.concurrency, args.duration, max_id, product)
                row = {
                    "round": round_,
                    "mode": mode,
                    "rps": round(result.rps, 1),
                    "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms,
                    "non2xx": result.non2xx,
                    "browser_cpu_seconds": round(browser_cpu(driver) - cpu, 3),
                }
                runs.append(row)
                print(orjson.dumps(row).decode(), flush=True)
        per_poll = poll_cost(base, shop.pid)
    finally:
        if driver is not None:
            driver.quit()
        shop.send_signal(signal.SIGTERM)  # our own child, by its PID
        shop.wait(30)
        stop_database()

    summary: dict[str, Any] = {}
    for mode in ("none", "page"):
        rps = [r["rps"] for r in runs if r["mode"] == mode]
        summary[mode] = {
            "runs": rps,
            "mean_rps": round(statistics.mean(rps), 1),
            "median_rps": round(statistics.median(rps), 1),
            "stdev_rps": round(statistics.stdev(rps), 1) if len(rps) > 1 else 0.0,
            "mean_p99_ms": round(
                statistics.mean(r["p99_ms"] for r in runs if r["mode"] == mode), 2
            ),
            "browser_cpu_seconds": [r["browser_cpu_seconds"] for r in runs if r["mode"] == mode],
        }
    summary["server_cpu_per_request"] = per_poll
    cost = 1 - summary["page"]["mean_rps"] / summary["none"]["mean_rps"]
    # Paired by round: each round ran both modes back to back.
    paired = [
        1 - p["rps"] / n["rps"]
        for n, p in zip(
            (r for r in runs if r["mode"] == "none"),
            (r for r in runs if r["mode"] == "page"),
            strict=True,
        )
    ]
    summary["cost_of_the_page"] = round(cost, 4)
    summary["paired_costs"] = [round(c, 4) for c in paired]
    summary["median_paired_cost"] = round(statistics.median(paired), 4)
    meta = {
        "command": " ".join(serve_command(port)).replace(sys.executable, "python"),
        "load": f"wrk -t2 -c{args.concurrency} -d{int(args.duration)}s -s benchmarks/load.wrk.lua"
        " (GET /users/{random id})",
        "cores": os.cpu_count(),
        "seeded": "quick (5k users)",
        "pool": f"{POOL_MAX} connections, one worker",
    }
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "live-page-cost.json"
    out.write_bytes(
        orjson.dumps({"meta": meta, "summary": summary, "runs": runs}, option=orjson.OPT_INDENT_2)
    )
    print(f"written: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
