"""The chart's Grafana dashboard (files/dashboard.json) and Prometheus rules (files/alerts.yaml).

Proves: the rules pass the real `promtool check rules`, and `promtool test rules` (tests/deploy/promtool/
alerts_test.yaml) in which every alert fires on synthetic series of its incident and stays silent on the nearest
healthy shape; every alert has a severity, a summary, a description that names its labels or value, and a runbook
URL whose anchor is a heading of docs/OPERATIONS.md; the dashboard is Grafana JSON with a data source variable and
no hard-coded data source, units on every panel, rates over $__rate_interval, p50/p95/p99 job latency from summed
histogram buckets, and a panel for each item the issue lists; every expression of both files parses with
Prometheus's own parser and names only metrics the worker's registry exports (tests/integration/
test_metrics_queries.py checks the same names against a real worker's /metrics).
"""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from tests.deploy.promtool.queries import (
    ALERTS,
    OPERATIONS,
    PROMETHEUS_NAMES,
    PROMTOOL_TESTS,
    RUNBOOK_URL,
    Query,
    dashboard,
    dashboard_queries,
    family_names,
    metric_names,
    panels,
    promtool,
    recorded_names,
    rule_queries,
    rules,
    substitute,
    unknown_names,
)
from worker.pipeline.metrics import WorkerMetrics

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
SEVERITIES = {"warning", "critical"}


@pytest.fixture(scope="module")
def dash() -> Any:
    return dashboard()


@pytest.fixture(scope="module")
def rule_doc() -> Any:
    return rules()


def alert_rules(doc: Any) -> list[Any]:
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


# -- rules ----------------------------------------------------------------------------------------------------------


def test_promtool_check_rules_passes(rule_doc: Any) -> None:
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    count = sum(len(group["rules"]) for group in rule_doc["groups"])
    assert f"SUCCESS: {count} rules found" in done.stdout, done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(PROMTOOL_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not(rule_doc: Any) -> None:
    cases = yaml.safe_load(PROMTOOL_TESTS.read_text(encoding="utf-8"))
    assert cases["rule_files"] == ["../../../deploy/helm/rerank-worker/files/alerts.yaml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for test in cases["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
            for alert in case["exp_alerts"]:
                # the whole annotation set is compared by promtool: a case that fires states all of it
                assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}, test["name"]
                assert alert["exp_labels"]["severity"] in SEVERITIES
    names = {rule["alert"] for rule in alert_rules(rule_doc)}
    assert names - fires == set(), "alerts never seen firing"
    assert names - silent == set(), "alerts never seen staying silent"
    tested_records = {
        case["expr"] for test in cases["tests"] for case in test.get("promql_expr_test", []) if "expr" in case
    }
    assert recorded_names(rule_doc) <= tested_records, "recording rules without a promql_expr_test"


def test_rules_file_is_plain_and_alerts_are_complete(rule_doc: Any) -> None:
    assert list(rule_doc) == ["groups"], "a plain rules file: the chart uses its groups as they are"
    anchors = markdown_anchors(OPERATIONS.read_text(encoding="utf-8"))
    names = [rule["alert"] for rule in alert_rules(rule_doc)]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert {"RerankConsumerLagGrowing", "RerankDeadLetterRateHigh", "RerankNoCommitWhileLagging"} <= set(names)
    assert {"RerankOutOfMemoryRetries", "RerankConsumerPausedTooLong", "RerankWorkerNotReady"} <= set(names)
    for rule in alert_rules(rule_doc):
        name = rule["alert"]
        assert name.startswith("Rerank"), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert "$labels.namespace" in annotations["description"], name
        assert "$labels.job" in annotations["description"], name
        assert annotations["runbook_url"] == f"{RUNBOOK_URL}#{name.lower()}", name
        assert name.lower() in anchors, f"docs/OPERATIONS.md has no heading for {name}"
        # one alert per deployment (or per pod): every aggregation keeps namespace and job
        for clause in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in clause.split(",")}
            assert {"namespace", "job"} <= labels or labels == {"le"}, f"{name}: by ({clause})"
    assert all(name.startswith("rerank:") for name in recorded_names(rule_doc))


def markdown_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in text.splitlines():
        if match := re.match(r"^#{1,6}\s+(.*?)\s*$", line):
            out.add(re.sub(r"[^\w\- ]", "", match[1].lower()).replace(" ", "-"))
    return out


# -- dashboard ------------------------------------------------------------------------------------------------------


def test_dashboard_is_grafana_json_with_a_datasource_variable(dash: Any) -> None:
    assert dash["uid"] == "rerank-worker"
    assert dash["title"]
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "pod"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"] == DATASOURCE_REF, name
    ids = [p["id"] for p in dash["panels"]] + [p["id"] for row in dash["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_no_datasource_uid_is_hard_coded(dash: Any) -> None:
    def refs(node: Any, path: str) -> list[tuple[str, Any]]:
        found = []
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    found.append((path, value))
                found += refs(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                found += refs(value, f"{path}[{i}]")
        return found

    found = refs({k: v for k, v in dash.items() if k != "annotations"}, "")
    assert len(found) > len(list(panels(dash)))
    for path, ref in found:
        assert ref == DATASOURCE_REF, f"{path}: {ref}"
    for annotation in dash["annotations"]["list"]:  # Grafana's own annotations and alerts, no Prometheus uid
        assert annotation["datasource"] == {"type": "grafana", "uid": "-- Grafana --"}


def test_every_panel_has_a_unit_and_queries(dash: Any) -> None:
    for panel in panels(dash):
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {panel['title']!r} has no unit"
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]


def test_dashboard_rates_use_the_rate_interval(dash: Any) -> None:
    for panel in panels(dash):
        for target in panel["targets"]:
            windows = re.findall(r"\[([^\]]+)\]", target["expr"])
            assert all(w == "$__rate_interval" for w in windows), f"{panel['title']}: {target['expr']}"


def test_job_latency_percentiles_come_from_summed_buckets(dash: Any) -> None:
    exprs = [t["expr"] for p in panels(dash) if p["fieldConfig"]["defaults"]["unit"] == "s" for t in p["targets"]]
    for quantile in ("0.5", "0.95", "0.99"):
        expected = (
            f"histogram_quantile({quantile}, sum by (le) (rate(rerank_job_latency_seconds_bucket"
            '{namespace=~"$namespace", job=~"$job", pod=~"$pod"}[$__rate_interval])))'
        )
        assert expected in exprs, f"no p{quantile} job latency panel"
    for expr in exprs:
        if "histogram_quantile" in expr:
            assert re.search(r"sum by \(le\b", expr), expr


# What the issue asks the dashboard to show: a panel reading this metric, with this unit (and legend label).
ISSUE_PANELS = {
    "jobs/s": ("rerank_jobs_total", "ops", None),
    "docs/s": ("rerank_documents_total", "ops", None),
    "tokens/s": ("rerank_tokens_total", "ops", None),
    "job latency": ("rerank_job_latency_seconds_bucket", "s", None),
    "consumer lag per partition": ("rerank_consumer_lag", "none", "{{partition}}"),
    "dead letters by reason": ("rerank_dead_letters_total", "ops", "{{reason}}"),
    "retries by reason": ("rerank_retries_total", "ops", "{{reason}}"),
    "pass fill": ("rerank_pass_fill_ratio_bucket", "percentunit", None),
    "GPU memory": ("rerank_gpu_memory_allocated_bytes", "bytes", None),
    "queue depth": ("rerank_queued_jobs", "none", None),
    "paused state": ("rerank_consumer_paused", "none", None),
    "replicas": ("rerank_ready", "none", "ready"),
}


def test_dashboard_shows_what_the_issue_lists(dash: Any) -> None:
    queries = dashboard_queries(dash)
    names = metric_names(queries)
    by_where = {q.where: used for q, used in names.items()}
    missing = []
    for item, (metric, unit, legend) in ISSUE_PANELS.items():
        found = False
        for panel in panels(dash):
            if panel["fieldConfig"]["defaults"]["unit"] != unit:
                continue
            for target in panel["targets"]:
                used = by_where[f"panel {panel['title']!r} target {target['refId']}"]
                if metric in used and (legend is None or legend in target["legendFormat"]):
                    found = True
        if not found:
            missing.append(f"{item} ({metric}, unit {unit})")
    assert not missing, f"no panel for: {missing}"


# -- metric names ---------------------------------------------------------------------------------------------------


def registry_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every name the worker's metrics registry exports, the CUDA-only GPU memory gauges included: they are read at
    scrape time from torch.cuda, which a CPU machine lacks, so a stand-in reports one device with no memory used."""
    cuda = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 1,
        memory_allocated=lambda device: 0,
        memory_reserved=lambda device: 0,
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    _, declared = family_names(iter(WorkerMetrics().registry.collect()))
    monkeypatch.undo()
    assert "rerank_gpu_memory_allocated_bytes" in declared
    return declared


def test_every_expression_names_only_exported_metrics(
    dash: Any, rule_doc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = dashboard_queries(dash) + rule_queries(rule_doc)
    names = metric_names(queries)
    exported = registry_names(monkeypatch)
    known = exported | recorded_names(rule_doc) | PROMETHEUS_NAMES
    assert unknown_names(names, known) == []
    used = set().union(*names.values())
    # the dashboard reads the rules' recordings nowhere: it must work with the PrometheusRule turned off
    assert not {n for q, ns in names.items() if q.where.startswith(("panel", "variable")) for n in ns if ":" in n}
    assert "rerank_consumer_lag" in used
    assert "rerank_job_latency_seconds_bucket" in used


def test_a_misspelled_metric_or_a_broken_expression_is_reported() -> None:
    queries = [Query("a", 'sum(rate(rerank_jobz_total{job="x"}[5m])) / sum(rate(rerank_jobs_total[5m]))')]
    names = metric_names(queries)
    assert names[queries[0]] == {"rerank_jobz_total", "rerank_jobs_total"}
    assert unknown_names(names, {"rerank_jobs_total"}) == ["a: rerank_jobz_total"]
    with pytest.raises(AssertionError, match="parse error"):
        metric_names([Query("b", "sum(rate(rerank_jobs_total[5m])")])
    with pytest.raises(AssertionError, match="names no metric literally"):
        metric_names([Query("c", '{__name__=~"rerank_.*"}')])


def test_grafana_variables_are_substituted_and_undefined_ones_refused() -> None:
    expr = 'rate(x{job=~"$job", pod=~"${pod:regex}"}[$__rate_interval]) * [[job]]'
    assert substitute(expr, {"job", "pod"}) == ('rate(x{job=~"value-of-job", pod=~"value-of-pod"}[2m]) * value-of-job')
    with pytest.raises(KeyError, match=r"\$nmespace"):
        substitute('up{namespace="$nmespace"}', {"namespace"})
