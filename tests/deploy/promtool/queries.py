"""The PromQL of the chart's Grafana dashboard and Prometheus rules, and the metric names it reads.

Expressions are parsed by Prometheus's own parser (`bash scripts/promtool.sh promql-names`: tests/deploy/promtool/
promql_names, built against the Prometheus module promtool is built from), never by pattern matching. Grafana's
variables are substituted first: its interval variables by durations, the dashboard's own variables by a label
value (they only appear inside label matchers); a variable the dashboard does not define is an error.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from tests.deploy.conftest import REPO, build_tool, run_tool

CHART_FILES = REPO / "deploy" / "helm" / "rerank-worker" / "files"
DASHBOARD = CHART_FILES / "dashboard.json"
ALERTS = CHART_FILES / "alerts.yaml"
PROMTOOL_TESTS = REPO / "tests" / "deploy" / "promtool" / "alerts_test.yaml"
PROMTOOL_SH = REPO / "scripts" / "promtool.sh"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
RUNBOOK_URL = "https://github.com/example/rerank-worker/blob/main/docs/OPERATIONS.md"

# The first call builds promtool from the Go module proxy (several minutes on 2 cores with empty Go caches).
PROMTOOL_BUILD_TIMEOUT_S = 1800
PROMTOOL_CALL_TIMEOUT_S = 120

# Grafana's built-in interval variables, as Grafana would expand them for a 30 s scrape interval.
GRAFANA_DURATIONS = {"__rate_interval": "2m", "__interval": "30s", "__range": "6h", "__range_s": "21600"}
# $name, ${name}, ${name:format} and the deprecated [[name]].
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$", re.DOTALL)
# Names whose series Prometheus itself makes: the scrape's health. ALERTS is allowed too, unused so far.
PROMETHEUS_NAMES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it lives (a dashboard panel's target, a template variable, a rule)."""

    where: str
    expr: str


def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def rules() -> Any:
    return yaml.safe_load(ALERTS.read_text(encoding="utf-8"))


def panels(dash: Any) -> Iterator[Any]:
    """Every panel, those inside collapsed rows included; rows themselves are not panels."""
    for panel in dash["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variable_names(dash: Any) -> set[str]:
    return {v["name"] for v in dash["templating"]["list"]}


def substitute(expr: str, defined: set[str]) -> str:
    """`expr` with Grafana's variables replaced, ready for a PromQL parser; KeyError for an undefined variable."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in GRAFANA_DURATIONS:
            return GRAFANA_DURATIONS[name]
        if name not in defined:
            raise KeyError(f"undefined Grafana variable ${name} in {expr!r}")
        return "value-of-" + name

    return VARIABLE.sub(value, expr)


def dashboard_queries(dash: Any) -> list[Query]:
    """Every panel target's expression and every query variable's selector, variables substituted."""
    defined = variable_names(dash)
    out = []
    for panel in panels(dash):
        for target in panel.get("targets", []):
            out.append(Query(f"panel {panel['title']!r} target {target['refId']}", substitute(target["expr"], defined)))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = LABEL_VALUES.match(query)
        if match is None:
            raise AssertionError(f"variable {var['name']}: {query!r} is not label_values(<selector>, <label>)")
        out.append(Query(f"variable {var['name']}", substitute(match["selector"], defined)))
    return out


def rule_queries(doc: Any) -> list[Query]:
    return [
        Query(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


def recorded_names(doc: Any) -> set[str]:
    return {rule["record"] for group in doc["groups"] for rule in group["rules"] if "record" in rule}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`bash scripts/promtool.sh ARGS`: the real promtool (or `promql-names`), built once when missing."""
    _built()
    return run_tool(PROMTOOL_SH, *args, timeout_s=PROMTOOL_CALL_TIMEOUT_S, stdin=stdin)


@functools.cache
def _built() -> None:
    build_tool(PROMTOOL_SH, "--version", timeout_s=PROMTOOL_BUILD_TIMEOUT_S)


def metric_names(queries: list[Query]) -> dict[Query, set[str]]:
    """The metric names each query's vector selectors name, by Prometheus's parser; AssertionError listing every
    expression that does not parse (or selects by a non-literal name)."""
    done = promtool("promql-names", stdin=json.dumps([q.expr for q in queries]))
    assert done.returncode == 0, f"promql-names failed:\n{done.stderr}"
    parsed = json.loads(done.stdout)
    assert [p["expr"] for p in parsed] == [q.expr for q in queries]
    errors = [f"{q.where}: {p['error']}\n  {q.expr}" for q, p in zip(queries, parsed, strict=True) if p["error"]]
    assert not errors, "expressions that Prometheus's parser refuses:\n" + "\n".join(errors)
    return {q: set(p["metrics"]) for q, p in zip(queries, parsed, strict=True)}


def unknown_names(names: dict[Query, set[str]], known: set[str]) -> list[str]:
    """`where: name` for every name a query uses that is not in `known`."""
    return [f"{q.where}: {name}" for q, used in names.items() for name in sorted(used - known)]


def family_names(families: Iterator[Any]) -> tuple[set[str], set[str]]:
    """(names with samples, names declared) of prometheus_client metric families: a registry's `collect()` or
    `text_string_to_metric_families` of a scrape. A labelled metric with no series yet is declared (its HELP and
    TYPE) without samples; a histogram's names are its _bucket, _sum and _count."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    sampled: set[str] = set()
    declared: set[str] = set()
    for family in families:
        declared.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        sampled.update(sample.name for sample in family.samples)
    return sampled, declared | sampled
