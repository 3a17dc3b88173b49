"""Shared helpers of the deploy tests: the repository root, the real Helm CLI (scripts/helm.sh), kubeconform with
offline schemas (scripts/kubeconform.sh, scripts/kubeconform_schemas.py) and YAML loading."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "rerank-worker"
ALL_ON_VALUES = REPO / "deploy" / "helm" / "ci-values-all-on.yaml"
HELM_SH = REPO / "scripts" / "helm.sh"
KUBECONFORM_SH = REPO / "scripts" / "kubeconform.sh"
KUBECONFORM_SCHEMAS = REPO / "scripts" / "kubeconform_schemas.py"

# The first call builds Helm from the Go module proxy (about 1.5-2.5 minutes on 2 cores with empty Go caches).
HELM_BUILD_TIMEOUT_S = 1800
HELM_CALL_TIMEOUT_S = 120

# The first call builds kubeconform (well under a minute) and converts the schemas (about 15 s).
KUBECONFORM_BUILD_TIMEOUT_S = 900

Helm = Callable[..., "subprocess.CompletedProcess[str]"]
Kubeconform = Callable[..., "subprocess.CompletedProcess[str]"]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def run_tool(script: Path, *args: str, timeout_s: float, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`bash scripts/<tool>.sh ARGS` from the repository root: the tool the script builds once and caches."""
    return subprocess.run(
        ["bash", str(script), *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def build_tool(script: Path, *probe: str, timeout_s: float) -> str:
    """Run `probe` through `script` so that a missing tool is built now, under the build's own timeout; returns the
    script's stderr (it says when it built). Never skipped: a tool that cannot be built fails the test."""
    built = run_tool(script, *probe, timeout_s=timeout_s)
    assert built.returncode == 0, f"{script.relative_to(REPO)} could not build or run its tool:\n{built.stderr}"
    return built.stderr


@pytest.fixture(scope="session")
def helm() -> Helm:
    """`helm(*args)` runs the real Helm CLI through scripts/helm.sh; never skipped: it builds Helm when missing."""
    started = time.monotonic()
    if "building Helm" in build_tool(HELM_SH, "version", "--short", timeout_s=HELM_BUILD_TIMEOUT_S):
        print(f"\nscripts/helm.sh built Helm in {time.monotonic() - started:.0f} s")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_tool(HELM_SH, *args, timeout_s=HELM_CALL_TIMEOUT_S)

    return run


def template_args(values_files: Sequence[Path] = (), sets: Mapping[str, str] | None = None) -> list[str]:
    args = ["template", "rr", str(CHART), "--namespace", "ml"]
    for path in values_files:
        args += ["-f", str(path)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def render(helm: Helm, values_files: Sequence[Path] = (), sets: Mapping[str, str] | None = None) -> list[Any]:
    """The manifests `helm template` renders, parsed (empty documents dropped)."""
    done = helm(*template_args(values_files, sets))
    assert done.returncode == 0, f"helm template failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="session")
def kubeconform_schema_args() -> list[str]:
    """`-schema-location` arguments of the offline schemas: Kubernetes (kubernetes-validate's strict schemas, every
    version it ships is reachable through `-kubernetes-version`) and the pinned KEDA and prometheus-operator CRDs."""
    import kubernetes_validate

    versions = ["1.27.0", kubernetes_validate.latest_version()]
    args = [sys.executable, str(KUBECONFORM_SCHEMAS), "--json"]
    for version in versions:
        args += ["--kubernetes-version", version]
    done = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=KUBECONFORM_BUILD_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"scripts/kubeconform_schemas.py failed:\n{done.stderr}"
    prepared = json.loads(done.stdout)
    assert prepared["kubernetes_versions"] == versions
    return [f"-schema-location={location}" for location in prepared["schema_locations"]]


@pytest.fixture(scope="session")
def kubeconform(kubeconform_schema_args: list[str]) -> Kubeconform:
    """`kubeconform(*args, stdin=...)` runs kubeconform (scripts/kubeconform.sh builds it when missing) with the
    offline schemas only: no schema is ever fetched from the network."""
    build_tool(KUBECONFORM_SH, "-v", timeout_s=KUBECONFORM_BUILD_TIMEOUT_S)

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_tool(KUBECONFORM_SH, *kubeconform_schema_args, *args, timeout_s=HELM_CALL_TIMEOUT_S, stdin=stdin)

    return run
