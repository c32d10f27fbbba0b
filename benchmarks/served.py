"""What metrics and the access log cost the shop as `pglayer serve` serves it, counted.

    python -m benchmarks.served [--requests 600] [--clients 1]

Runs the shop under uvicorn with pglayer's HTTP protocol and event loop, inside valgrind's
callgrind, four ways (metrics and access log both on, both off, each alone), and sends it
`GET /users/{id}` from outside: one at a time on one kept-alive connection, or from
`--clients` connections at once. A variant's
figure is the user-space instructions of (warm-up + N requests) less (warm-up only), per
request: the same to ~1% from run to run whatever else the machine does, where req/s on a
shared 2-core machine moves ±15% (see README, "metrics and access log on within 5%").
Kernel work (the socket's reads and writes) is not counted, so the shares it prints are
larger than the same layers' share of CPU time. One request at a time, the access log
writes once per request (its worst case); with several clients, once per loop iteration
for the requests of that iteration, as under load.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import re
import signal
import subprocess
import sys
import tempfile

import httpx

from benchmarks.run import (
    HTTP,
    LOOP,
    POOL_MAX,
    ROOT,
    _free_port,
    prepare_database,
    wait_until_serving,
)

WARM_UP = 200
VARIANTS = {  # name: (metrics, access log)
    "both on": (True, True),
    "both off": (False, False),
    "metrics only": (True, False),
    "log only": (False, True),
}


def _serve_and_count(url: str, max_id: int, variant: str, n: int, clients: int = 1) -> int:
    """Instructions of one shop process that answers `WARM_UP + n` requests, then stops."""
    metrics, access_log = VARIANTS[variant]
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        # This checkout's code, also when another is installed (a worktree of an old commit).
        "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("src", "shop/src", ".")),
        "PGLAYER_MIN_SIZE": str(POOL_MAX),
        "PGLAYER_MAX_SIZE": str(POOL_MAX),
        "PGLAYER_LOG_FORMAT": "text",
        "PGLAYER_TUNE_GC": "true",
        "PGLAYER_METRICS": str(metrics).lower(),
        "PGLAYER_ACCESS_LOG": str(access_log).lower(),
    }
    with tempfile.NamedTemporaryFile("r", suffix=".callgrind.log") as log:
        cmd = [
            "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            f"--log-file={log.name}", sys.executable, "-m", "uvicorn",
            "--factory", "pglayer_shop.app:create_app", "--host", "127.0.0.1",
            "--port", str(port), "--loop", LOOP["shop"], "--http", HTTP["shop"],
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        # The lines go to /dev/null: what is counted is making and writing them.
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
        try:
            _send(f"http://127.0.0.1:{port}", max_id, WARM_UP + n, proc, clients)
        finally:
            proc.send_signal(signal.SIGTERM)  # our own child, by its PID
            proc.wait(600)
        match = re.search(r"Collected : (\d+)", log.read())
    if match is None:
        raise RuntimeError(f"callgrind printed no count for {variant}")
    return int(match.group(1))


def _send(base: str, max_id: int, count: int, proc: subprocess.Popen[bytes], clients: int) -> None:
    """Wait (bounded) for the server under callgrind, then send `count` requests: from
    `clients` connections at once, each its next request as its answer comes."""
    wait_until_serving(proc, base, "the shop under callgrind", timeout=600)

    def one_client(k: int) -> None:
        rnd = random.Random(7 + k)  # the same ids for every variant
        with httpx.Client(base_url=base, timeout=120) as client:
            for _ in range(count // clients):
                response = client.get(f"/users/{rnd.randint(1, max_id)}")
                if response.status_code != 200:
                    raise RuntimeError(f"GET /users: {response.status_code}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one_client, range(clients)))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.served", description=__doc__)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument(
        "--clients", type=int, default=1,
        help="connections sending at once (1: one request at a time, each access line its"
        " own write; more: several requests a loop turn, as under load)",
    )  # fmt: skip
    args = parser.parse_args()
    clients = max(1, min(args.clients, 64))
    n = max(100, min(args.requests, 5000)) // clients * clients
    url, max_id, _, stop = prepare_database(quick=True)
    jobs = [(variant, k) for variant in VARIANTS for k in (0, n)]
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            counts = dict(
                zip(
                    jobs,
                    pool.map(lambda job: _serve_and_count(url, max_id, *job, clients), jobs),
                    strict=True,
                )
            )
    finally:
        stop()
    per_request = {v: (counts[v, n] - counts[v, 0]) / n / 1000 for v in VARIANTS}
    off = per_request["both off"]
    print(f"{'variant':<14} {'k instr/req':>12} {'vs both off':>12}")
    for variant, figure in per_request.items():
        print(f"{variant:<14} {figure:>12.1f} {figure / off - 1:>+12.1%}")


if __name__ == "__main__":
    main()
