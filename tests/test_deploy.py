"""The operator's files under deploy/: Prometheus alert rules (checked and unit-tested by
promtool) and the Grafana dashboard, both naming only metrics the project exports."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import yaml  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pglayer import Histogram, PoolStats
from pglayer._metrics import PoolCollector, SharedPoolCollector, Snapshot
from pglayer._observability import BulkheadStats, RequestSeries
from tests.conftest import require_external

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "pglayer-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "pglayer-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pglayer.json"
PROMTOOL = shutil.which("promtool")

# A metric name in PromQL; not part of a recording rule's name (`level:metric:op`).
METRIC_NAME = re.compile(r"(?<![\w:])pglayer_[a-z0-9_]+(?![\w:])")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    require_external(
        PROMTOOL is not None, "promtool not found (Debian: apt-get install prometheus)"
    )
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


# -- what the project exports ---------------------------------------------------------------


def _histogram() -> Histogram:
    return Histogram((0.01, 0.1), (1, 2, 0), 0.12)


def _pool(name: str, *, replica: bool) -> PoolStats:
    """A pool snapshot with every family populated (bulkheads, errors, retries, ...)."""
    return PoolStats(
        name=name,
        open=True,
        min_size=1,
        max_size=4,
        size=2,
        idle=1,
        in_use=1,
        waiting=0,
        acquisitions=3,
        acquire_timeouts=0,
        requests_shed=0,
        connections_opened=2,
        connections_closed=0,
        connections_lost=0,
        connections_failed=0,
        slow_queries=0,
        acquire_wait=_histogram(),
        hold_time=_histogram(),
        retries={"connection_lost": 1},
        give_ups={"connection_lost": 1},
        errors={"UniqueViolationError": 1},
        query_time={"GET /users/{user_id}": _histogram()},
        bulkheads={"read": BulkheadStats(4, 1, 0, 0, 0, 0.001)},
        replica_healthy=True if replica else None,
        replica_lag_seconds=0.25 if replica else None,
    )


class FixedCollector(PoolCollector):
    """The project's collector, fed a fixed snapshot instead of live pools."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__([])
        self.fixed = snapshot

    def snapshot(self) -> Snapshot:
        return self.fixed


def _full_snapshot() -> Snapshot:
    http = [RequestSeries("GET", "/users/{user_id}", 200, _histogram())]
    return [_pool("primary", replica=False), _pool("replica-1", replica=True)], http


def exposition(collector: PoolCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def exported_names() -> set[str]:
    """Every sample name the collector writes (with `_total`, `_bucket`, `_sum`, `_count`)."""
    families = list(text_string_to_metric_families(exposition(FixedCollector(_full_snapshot()))))
    empty = [f.name for f in families if not f.samples]
    assert not empty, f"the synthetic snapshot leaves these families empty: {empty}"
    with tempfile.TemporaryDirectory() as shared:  # and what only the workers' collector adds
        workers = sample_names(exposition(SharedPoolCollector([], shared)))
    return {s.name for f in families for s in f.samples} | workers


def test_the_exported_names_include_the_replica_gauges_and_histogram_series() -> None:
    names = exported_names()
    assert {"pglayer_replica_in_rotation", "pglayer_replica_lag_seconds"} <= names
    assert "pglayer_pool_acquire_wait_seconds_bucket" in names
    assert "pglayer_pool_acquire_timeouts_total" in names
    assert "pglayer_pool_acquire_wait_seconds" not in names  # only its series


async def test_the_shop_exports_nothing_outside_that_set(client: httpx.AsyncClient) -> None:
    await client.get("/users/1")
    response = await client.get("/metrics")
    assert response.status_code == 200
    scraped = sample_names(response.text)
    assert "pglayer_pool_size" in scraped
    assert "pglayer_http_requests_total" in scraped
    assert scraped <= exported_names()


def test_replica_gauges_only_for_replicas_and_lag_absent_while_unknown() -> None:
    # Out of rotation, lag unknown (behind, and nothing replayed since it started).
    unknown = replace(
        _pool("replica-2", replica=True), replica_healthy=False, replica_lag_seconds=None
    )
    text = exposition(FixedCollector(([_pool("primary", replica=False), unknown], [])))
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    rotation = [s for s in samples if s.name == "pglayer_replica_in_rotation"]
    assert [(s.labels, s.value) for s in rotation] == [({"pool": "replica-2"}, 0.0)]
    assert not [s for s in samples if s.name == "pglayer_replica_lag_seconds"]


def test_replica_health_travels_through_the_worker_snapshot_files(tmp_path: Path) -> None:
    class Fixed(SharedPoolCollector):
        def snapshot(self) -> Snapshot:
            return [_pool("primary", replica=False), _pool("replica-1", replica=True)], []

    collector = Fixed([], tmp_path)
    try:
        text = exposition(collector)
    finally:
        collector.remove()
    samples = {
        (s.name, s.labels.get("pool")): s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("pglayer_replica_")
    }
    assert set(samples) == {
        ("pglayer_replica_in_rotation", "replica-1"),
        ("pglayer_replica_lag_seconds", "replica-1"),
    }
    assert samples["pglayer_replica_in_rotation", "replica-1"].value == 1.0
    assert samples["pglayer_replica_lag_seconds", "replica-1"].value == 0.25
    assert all("worker" in s.labels for s in samples.values())


# -- names in PromQL --------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def rule_exprs(path: Path = RULES) -> list[str]:
    rules = yaml.safe_load(path.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))  # a collapsed row holds its panels
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the panels, and the template variables' queries."""
    exprs = [
        target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def unknown_names(exprs: list[str], exported: set[str]) -> dict[str, set[str]]:
    """Expression -> the metric names in it that the project does not export."""
    out = {}
    for expr in exprs:
        missing = metric_names(expr) - exported
        if missing:
            out[expr] = missing
    return out


def test_every_rule_names_an_exported_metric() -> None:
    exprs = rule_exprs()
    assert len(exprs) >= 10
    assert all(metric_names(e) for e in exprs)
    assert unknown_names(exprs, exported_names()) == {}


def test_every_dashboard_expression_names_an_exported_metric() -> None:
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 20
    assert all(metric_names(e) for e in exprs)
    assert unknown_names(exprs, exported_names()) == {}


def test_the_name_check_catches_a_wrong_name() -> None:
    exported = exported_names()
    # A synthetic example: the family name of a histogram is not a series; a typo is not a name.
    assert metric_names(
        "histogram_quantile(0.99, rate(pglayer_pool_acquire_wait_seconds_bucket"
        '{pool=~"$pool"}[5m])) / pglayer:recorded:rate5m'
    ) == {"pglayer_pool_acquire_wait_seconds_bucket"}
    assert unknown_names(
        ["sum(rate(pglayer_pool_acquire_wait_seconds[5m]))", "pglayer_pool_wiating > 0"], exported
    ) == {
        "sum(rate(pglayer_pool_acquire_wait_seconds[5m]))": {"pglayer_pool_acquire_wait_seconds"},
        "pglayer_pool_wiating > 0": {"pglayer_pool_wiating"},
    }
    # A copy of the dashboard with one name misspelt fails the check, on that name only.
    dashboard = copy.deepcopy(json.loads(DASHBOARD.read_text()))
    target = next(
        t
        for p in _panels(dashboard["panels"])
        for t in p.get("targets", [])
        if "pglayer_pool_waiting" in t["expr"]
    )
    target["expr"] = target["expr"].replace("pglayer_pool_waiting", "pglayer_pool_waiters")
    assert set().union(*unknown_names(dashboard_exprs(dashboard), exported).values()) == {
        "pglayer_pool_waiters"
    }


# -- the dashboard's shape --------------------------------------------------------------------


def test_the_dashboard_has_a_row_per_concern_and_uses_its_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("pool", "worker"):
        assert variables[name]["type"] == "query"
        assert variables[name]["query"]["query"].startswith("label_values(pglayer_")
        assert variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"  # also matches series without `worker`
    rows = [p["title"].lower() for p in dashboard["panels"] if p["type"] == "row"]
    for concern in (
        "pool",
        "acquire wait",
        "refusals",
        "errors",
        "retries",
        "connections",
        "replicas",
        "queries",
        "http",
    ):
        assert any(concern in row for row in rows), (concern, rows)
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert '$worker"' in expr, (panel["title"], expr)
            if "pglayer_http_" not in expr:  # HTTP series have no pool
                assert 'pool=~"$pool"' in expr, (panel["title"], expr)


def _as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, for promtool to parse."""
    label_values = re.fullmatch(r"label_values\((.*), *\w+\)", expr)
    if label_values:
        expr = label_values.group(1)
    return expr.replace("$__rate_interval", "5m").replace('"$', '"').replace("$", "")


def test_every_dashboard_expression_parses_as_promql(tmp_path: Path) -> None:
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": _as_promql(e)}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# -- the rules, by promtool -------------------------------------------------------------------


def test_every_alert_has_a_severity_a_summary_a_description_and_a_for() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 10
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        assert {"summary", "description"} <= set(alert["annotations"]), alert["alert"]
        assert re.fullmatch(r"\d+[ms]", alert["for"]), alert["alert"]


def test_every_alert_is_unit_tested_both_ways() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    assert fires == alerts
    assert silent == alerts


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_fails_when_an_alert_changes(tmp_path: Path) -> None:
    """The unit tests can fail: with one threshold raised, the alert they expect is missing."""
    rules = RULES.read_text()
    changed = rules.replace(
        "pglayer_replica_lag_seconds) > 30", "pglayer_replica_lag_seconds) > 90"
    )
    assert changed != rules
    (tmp_path / RULES.name).write_text(changed)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = promtool("test", "rules", tmp_path / RULE_TESTS.name)
    assert result.returncode != 0
    assert "alertname: PglayerReplicaLagging" in result.stdout + result.stderr
