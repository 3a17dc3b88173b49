"""Every manifest the chart renders, validated by kubeconform in strict mode against offline schemas.

Proves: with default values and with every option on (deploy/helm/ci-values-all-on.yaml), each rendered object
passes kubeconform -strict, for the chart's oldest Kubernetes (1.27) and the newest kubernetes-validate ships:
core objects against the Kubernetes OpenAPI schemas (kubernetes-validate's strict schemas), ScaledObject and
TriggerAuthentication against KEDA's real CRDs, ServiceMonitor and PrometheusRule against prometheus-operator's
(scripts/kubeconform_schemas.py pins and converts them). No object is skipped and no schema is missing
(-ignore-missing-schemas is never passed). A misspelled field, a wrong type or an unknown API version fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import ALL_ON_VALUES, Helm, Kubeconform, template_args

KUBERNETES_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]  # the chart's kubeVersion floor, the newest


def rendered(helm: Helm, values: Path | None) -> str:
    done = helm(*template_args([values] if values else []))
    assert done.returncode == 0, f"helm template failed:\n{done.stderr}"
    return done.stdout


def validate(kubeconform: Kubeconform, manifests: str, kubernetes_version: str) -> dict[str, Any]:
    """kubeconform's JSON report of every object (-verbose lists the valid ones too)."""
    done = kubeconform(
        "-strict",
        "-summary",
        "-verbose",
        "-output",
        "json",
        f"-kubernetes-version={kubernetes_version}",
        "-",
        stdin=manifests,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    failed = report["summary"]["invalid"] + report["summary"]["errors"]
    assert (done.returncode != 0) == (failed > 0), done.stdout + done.stderr
    return report


def by_kind(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for resource in report["resources"]:
        kinds.setdefault(resource["kind"], []).append(resource)
    return kinds


def all_on_docs(helm: Helm) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(rendered(helm, ALL_ON_VALUES)) if doc]


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", [None, ALL_ON_VALUES], ids=["default", "all-on"])
def test_every_rendered_object_is_valid(
    helm: Helm, kubeconform: Kubeconform, values: Path | None, kubernetes_version: str
) -> None:
    manifests = rendered(helm, values)
    docs = [doc for doc in yaml.safe_load_all(manifests) if doc]
    report = validate(kubeconform, manifests, kubernetes_version)
    not_valid = [r for r in report["resources"] if r["status"] != "statusValid"]
    assert not not_valid, json.dumps(not_valid, indent=2)
    assert report["summary"] == {"valid": len(docs), "invalid": 0, "errors": 0, "skipped": 0}
    assert sorted((r["kind"], r["name"]) for r in report["resources"]) == sorted(
        (doc["kind"], doc["metadata"]["name"]) for doc in docs
    )
    if values:  # the CRDs' objects are among them, each validated against its own CRD
        assert {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"} <= by_kind(report).keys()


def misspell(docs: list[Any], kind: str, change: Any) -> str:
    """The all-on manifests with one object of `kind` changed by `change(doc)`."""
    (target,) = [doc for doc in docs if doc["kind"] == kind]
    change(target)
    return yaml.safe_dump_all(docs)


def rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        pytest.param(
            "ScaledObject",
            lambda d: rename(d["spec"], "maxReplicaCount", "maxReplicaCont"),
            "additional properties 'maxReplicaCont' not allowed",
            id="scaledobject-misspelled-field",
        ),
        pytest.param(
            "ScaledObject",
            lambda d: d["spec"].update(pollingInterval="10s"),
            "at '/spec/pollingInterval'",
            id="scaledobject-wrong-type",
        ),
        pytest.param(
            "TriggerAuthentication",
            lambda d: d["spec"]["secretTargetRef"][0].update(secret="x"),
            "additional properties 'secret' not allowed",
            id="triggerauthentication-unknown-field",
        ),
        pytest.param(
            "PrometheusRule",
            lambda d: d["spec"]["groups"][0]["rules"][0].update(exprs="up == 0"),
            "additional properties 'exprs' not allowed",
            id="prometheusrule-misspelled-field",
        ),
        pytest.param(
            "ServiceMonitor",
            lambda d: rename(d["spec"]["endpoints"][0], "scrapeTimeout", "scrapeTimout"),
            "additional properties 'scrapeTimout' not allowed",
            id="servicemonitor-misspelled-field",
        ),
        pytest.param(
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(resource={}),
            "additional properties 'resource' not allowed",
            id="deployment-misspelled-field",
        ),
        pytest.param(
            "ScaledObject",
            lambda d: d.update(apiVersion="keda.sh/v1beta9"),
            "could not find schema for ScaledObject",
            id="unknown-api-version",
        ),
    ],
)
def test_a_broken_manifest_fails(helm: Helm, kubeconform: Kubeconform, kind: str, change: Any, message: str) -> None:
    report = validate(kubeconform, misspell(all_on_docs(helm), kind, change), KUBERNETES_VERSIONS[-1])
    failed = [r for r in report["resources"] if r["status"] != "statusValid"]
    assert [r["kind"] for r in failed] == [kind], json.dumps(report, indent=2)
    assert failed[0]["status"] in {"statusInvalid", "statusError"}
    assert message in failed[0]["msg"], failed[0]["msg"]
