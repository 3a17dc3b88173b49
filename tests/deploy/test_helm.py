"""The Helm chart (deploy/helm/rerank-worker), rendered by the real Helm CLI (scripts/helm.sh builds it when missing).

Proves: both values files lint (--strict) and render (test_kubeconform.py validates what they render); the rendered
manifests carry the fields a GPU Kafka worker needs (GPU limit, probes on the worker's port, grace period above the
shutdown timeout, PDB, KEDA trigger on the worker's own group and topic with maxReplicaCount <= partitions,
ServiceMonitor, mounted PVC, SASL password from a Secret) and the operator's options (image digest, ServiceAccount,
extra volumes, init containers, envFrom, a bounded /tmp, KEDA lag options, Grafana dashboard, PrometheusRule with
per-alert overrides); the chart names every setting of worker/settings.py with the worker's defaults, and
values.schema.json allows exactly the worker's choices; the worker accepts the environment the chart renders;
unknown keys, wrong types, bad enums, bad quantities and negative counts fail `helm lint` and `helm template` naming
the value; values that break the scaling rule or the shutdown contract fail to render.
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import ALL_ON_VALUES, CHART, Helm, load_yaml, render, template_args
from worker.kafka.config import consumer_kwargs
from worker.settings import ENV_PREFIX, Settings, default_text, env_name

SETTING_NAMES = {env_name(name) for name in Settings.model_fields}
# Settings the chart takes from a Secret, never from values.
SECRET_SETTINGS = {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"}
# Deliberate chart defaults that differ from the worker's (values.yaml says why).
CHART_OVERRIDES = {"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "RERANK_DEVICE": "cuda"}
WATCHDOG_S = 2  # the worker exits at the latest RERANK_SHUTDOWN_TIMEOUT_S + 2 s after SIGTERM (worker/kafka/loop.py)


def by_kind(docs: list[Any], kind: str) -> list[Any]:
    return [doc for doc in docs if doc.get("kind") == kind]


def one(docs: list[Any], kind: str) -> Any:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def worker_container(docs: list[Any]) -> Any:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    return containers[0]


def env_entries(container: Any) -> dict[str, Any]:
    entries = {e["name"]: e for e in container["env"]}
    assert len(entries) == len(container["env"]), "duplicate environment variables"
    return entries


def plain_env(container: Any) -> dict[str, str]:
    return {name: e["value"] for name, e in env_entries(container).items() if "value" in e}


def container_port(container: Any, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


@pytest.fixture(scope="module")
def default_docs(helm: Helm) -> list[Any]:
    return render(helm)


@pytest.fixture(scope="module")
def all_on_docs(helm: Helm) -> list[Any]:
    return render(helm, [ALL_ON_VALUES])


@pytest.fixture(scope="module")
def chart_values() -> Any:
    return load_yaml(CHART / "values.yaml")


@pytest.fixture(scope="module")
def all_on_values() -> Any:
    return load_yaml(ALL_ON_VALUES)


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No RERANK_* or KAFKA_* variable of this process leaks into a Settings() built from a rendered env."""
    import os

    for key in list(os.environ):
        if key.upper().startswith((ENV_PREFIX, "KAFKA_")):
            monkeypatch.delenv(key)
    return monkeypatch


# -- lint --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_ON_VALUES], ids=["default", "all-on"])
def test_helm_lint_strict_passes(helm: Helm, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    done = helm(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


# -- default values ----------------------------------------------------------------------------------------------


def test_default_render_has_the_core_objects_and_no_optional_ones(default_docs: list[Any]) -> None:
    kinds = sorted(doc["kind"] for doc in default_docs)
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service"]


def test_default_deployment_requests_a_gpu_and_probes_the_worker_port(
    default_docs: list[Any], chart_values: Any
) -> None:
    deployment = one(default_docs, "Deployment")
    container = worker_container(default_docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == ["run"]  # the image's ENTRYPOINT is rerank-worker

    env = plain_env(container)
    port = container_port(container, "http")
    assert port == int(env["RERANK_HTTP_PORT"]) == 8080
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}

    pod = deployment["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > float(env["RERANK_SHUTDOWN_TIMEOUT_S"]) + WATCHDOG_S
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert deployment["spec"]["replicas"] <= chart_values["jobsTopicPartitions"]

    # model cache: an emptyDir at HF_HOME when persistence is off; /tmp writable under a read-only root
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes["model-cache"]
    assert mounts["model-cache"] == env["HF_HOME"] == "/models"
    assert mounts["tmp"] == "/tmp"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # PLAINTEXT by default: no credentials at all
    assert not any("valueFrom" in e for e in container["env"])


def test_default_pdb_and_service_select_the_worker_pods(default_docs: list[Any]) -> None:
    pod_labels = one(default_docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = one(default_docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = one(default_docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["publishNotReadyAddresses"] is True  # idle (unready) workers are scraped too
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]


# -- every option on ---------------------------------------------------------------------------------------------


def test_all_on_renders_every_optional_object(all_on_docs: list[Any]) -> None:
    kinds = sorted(doc["kind"] for doc in all_on_docs)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "PrometheusRule",
        "ScaledObject",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
        "TriggerAuthentication",
    ]


def test_all_on_keda_scales_on_the_workers_own_group_and_topic(all_on_docs: list[Any], all_on_values: Any) -> None:
    deployment = one(all_on_docs, "Deployment")
    env = plain_env(worker_container(all_on_docs))
    scaled = one(all_on_docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]  # KEDA owns the replica count; a fixed one would fight it

    # scaling rule: never more workers than partitions of the jobs topic
    assert spec["maxReplicaCount"] == all_on_values["keda"]["maxReplicaCount"]
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"] <= all_on_values["jobsTopicPartitions"]

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert meta["bootstrapServers"] == env["KAFKA_BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == env["RERANK_GROUP_ID"]
    assert meta["topic"] == env["RERANK_JOBS_TOPIC"]
    assert meta["lagThreshold"] == "50"
    assert meta["activationLagThreshold"] == "1"
    assert meta["allowIdleConsumers"] == "false"
    # KEDA must reset offsets the way the worker's consumer does, or it misjudges the lag of a new group
    settings = Settings.model_construct()  # the defaults, whatever this process's environment holds
    assert meta["offsetResetPolicy"] == consumer_kwargs(settings, client_id="t", group_id="g")["auto_offset_reset"]
    # SASL_SSL with SCRAM-SHA-512 in KEDA's words
    assert meta["sasl"] == "scram_sha512"
    assert meta["tls"] == "enable"

    auth = one(all_on_docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    sasl = all_on_values["kafka"]["sasl"]
    ca = all_on_values["kafka"]["tls"]["caSecret"]
    client = all_on_values["kafka"]["tls"]["clientSecret"]
    assert refs == {
        "username": (sasl["existingSecret"], sasl["usernameKey"]),
        "password": (sasl["existingSecret"], sasl["passwordKey"]),
        "ca": (ca["name"], ca["key"]),
        "cert": (client["name"], client["certKey"]),
        "key": (client["name"], client["keyKey"]),
    }
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]


def test_all_on_credentials_come_from_secrets(all_on_docs: list[Any], all_on_values: Any) -> None:
    container = worker_container(all_on_docs)
    entries = env_entries(container)
    sasl = all_on_values["kafka"]["sasl"]
    for name, key in (("KAFKA_SASL_USERNAME", sasl["usernameKey"]), ("KAFKA_SASL_PASSWORD", sasl["passwordKey"])):
        assert entries[name] == {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": sasl["existingSecret"], "key": key}},
        }
    # the CA Secret is mounted read-only and KAFKA_SSL_CAFILE points into the mount
    ca = all_on_values["kafka"]["tls"]["caSecret"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["kafka-ca"]["readOnly"] is True
    assert entries["KAFKA_SSL_CAFILE"]["value"] == f"{mounts['kafka-ca']['mountPath']}/{ca['key']}"
    volumes = {v["name"]: v for v in one(all_on_docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["kafka-ca"]["secret"]["secretName"] == ca["name"]
    # the client certificate Secret (mutual TLS) likewise, the key readable by the owner only
    client = all_on_values["kafka"]["tls"]["clientSecret"]
    assert mounts["kafka-client"]["readOnly"] is True
    assert entries["KAFKA_SSL_CERTFILE"]["value"] == f"{mounts['kafka-client']['mountPath']}/{client['certKey']}"
    assert entries["KAFKA_SSL_KEYFILE"]["value"] == f"{mounts['kafka-client']['mountPath']}/{client['keyKey']}"
    assert volumes["kafka-client"]["secret"]["secretName"] == client["name"]
    assert volumes["kafka-client"]["secret"]["defaultMode"] == 0o400
    # extraEnv passes valueFrom through
    assert entries["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"


def test_all_on_model_cache_pvc_is_mounted_at_hf_home(all_on_docs: list[Any], all_on_values: Any) -> None:
    pvc = one(all_on_docs, "PersistentVolumeClaim")
    persistence = all_on_values["modelCache"]["persistence"]
    assert pvc["spec"]["accessModes"] == persistence["accessModes"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == persistence["size"]
    assert pvc["spec"]["storageClassName"] == persistence["storageClassName"]
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}

    container = worker_container(all_on_docs)
    pod = one(all_on_docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["model-cache"] == plain_env(container)["HF_HOME"] == "/models"


def test_all_on_servicemonitor_scrapes_the_service(all_on_docs: list[Any]) -> None:
    monitor = one(all_on_docs, "ServiceMonitor")
    service = one(all_on_docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "http"
    assert endpoint["path"] == "/metrics"


def test_all_on_pod_settings(all_on_docs: list[Any], all_on_values: Any) -> None:
    pod = one(all_on_docs, "Deployment")["spec"]["template"]["spec"]
    env = plain_env(worker_container(all_on_docs))
    assert pod["terminationGracePeriodSeconds"] == 90
    assert pod["terminationGracePeriodSeconds"] > float(env["RERANK_SHUTDOWN_TIMEOUT_S"]) + WATCHDOG_S
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["priorityClassName"] == "gpu-batch"
    assert pod["nodeSelector"] == all_on_values["nodeSelector"]
    assert one(all_on_docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in one(all_on_docs, "PodDisruptionBudget")["spec"]
    # numbers in a values file arrive in Helm as float64: they must still render as plain integers
    assert env["RERANK_MAX_PACK_TOKENS"] == "65536"
    assert env["RERANK_SHUTDOWN_TIMEOUT_S"] == "60"


# -- the chart against worker/settings.py ------------------------------------------------------------------------


def test_values_name_every_setting_with_the_workers_defaults(chart_values: Any) -> None:
    env = chart_values["env"]
    assert set(env) | SECRET_SETTINGS == SETTING_NAMES, "values.yaml env drifted from worker/settings.py"
    assert not set(env) & SECRET_SETTINGS, "SASL credentials must come from a Secret, not values"
    for name, field in Settings.model_fields.items():
        variable = env_name(name)
        if variable in SECRET_SETTINGS:
            continue
        assert isinstance(env[variable], str), f"{variable}: quote it (values are strings)"
        expected = CHART_OVERRIDES.get(variable, "" if field.default is None else default_text(field.default))
        assert env[variable] == expected, f"{variable}: values.yaml {env[variable]!r}, expected {expected!r}"


def test_all_on_render_sets_every_setting_but_the_empty_ones(all_on_docs: list[Any], all_on_values: Any) -> None:
    entries = env_entries(worker_container(all_on_docs))
    settings_in_env = {name for name in entries if name in SETTING_NAMES}
    merged = {**load_yaml(CHART / "values.yaml")["env"], **all_on_values["env"]}
    # from caSecret and clientSecret
    from_secrets = {"KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE"}
    expected_unset = {name for name, value in merged.items() if value == ""} - from_secrets
    assert settings_in_env == SETTING_NAMES - expected_unset
    # nothing else that looks like a setting: a typo would be refused by the worker at start
    others = {name for name in entries if name not in SETTING_NAMES}
    assert others == {"HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN"}


@pytest.mark.parametrize("values", [None, ALL_ON_VALUES], ids=["default", "all-on"])
def test_worker_accepts_the_rendered_environment(
    helm: Helm, values: Path | None, clean_environ: pytest.MonkeyPatch
) -> None:
    docs = render(helm, [values] if values else [])
    for name, entry in env_entries(worker_container(docs)).items():
        if not name.startswith((ENV_PREFIX, "KAFKA_")):
            continue
        value = entry.get("value", f"secret-from-{name}")  # valueFrom: the Secret's content at run time
        clean_environ.setenv(name, value)
    settings = Settings()  # raises on unknown RERANK_* names, bad values or contradictions
    assert settings.http_port == 8080
    if values:
        assert settings.security_protocol == "SASL_SSL"
        assert settings.sasl_mechanism == "SCRAM-SHA-512"
        assert settings.max_pack_tokens == 65536
        assert settings.shutdown_timeout_s == 60.0
        assert settings.sasl_password is not None
        assert settings.sasl_password.get_secret_value() == "secret-from-KAFKA_SASL_PASSWORD"


# -- values that must not render ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"keda.enabled": "true", "keda.maxReplicaCount": "7"}, "keda.maxReplicaCount=7 exceeds jobsTopicPartitions=6"),
        ({"keda.enabled": "true", "keda.minReplicaCount": "4", "keda.maxReplicaCount": "3"}, "keda.minReplicaCount=4"),
        ({"replicaCount": "7"}, "replicaCount=7 exceeds jobsTopicPartitions=6"),
        ({"terminationGracePeriodSeconds": "30"}, "must exceed RERANK_SHUTDOWN_TIMEOUT_S=30"),
        ({"terminationGracePeriodSeconds": "32"}, "must exceed RERANK_SHUTDOWN_TIMEOUT_S=30"),
        (
            {"env.RERANK_SHUTDOWN_TIMEOUT_S": "120", "terminationGracePeriodSeconds": "90"},
            "RERANK_SHUTDOWN_TIMEOUT_S=120",
        ),
        ({"env.KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs kafka.sasl.existingSecret"),
        ({"env.KAFKA_SASL_PASSWORD": "hunter2"}, "env.KAFKA_SASL_PASSWORD is not read from values"),
        ({"env.KAFKA_SASL_USERNAME": "svc"}, "env.KAFKA_SASL_USERNAME is not read from values"),
        ({"env.RERANK_HTTP_PORT": "0"}, "RERANK_HTTP_PORT must be a fixed port"),
        ({"env.RERANK_HTTP_HOST": "127.0.0.1"}, "must not be a loopback address"),
        ({"gpu.enabled": "false"}, "gpu.enabled=false with RERANK_DEVICE=cuda"),
        ({"kafka.tls.caSecret.name": "ca", "env.KAFKA_SSL_CAFILE": "/ca.pem"}, "not both"),
        ({"kafka.tls.clientSecret.name": "me", "env.KAFKA_SSL_KEYFILE": "/key.pem"}, "not both"),
    ],
)
def test_bad_values_fail_to_render(helm: Helm, sets: dict[str, str], message: str) -> None:
    done = helm(*template_args(sets=sets))
    assert done.returncode != 0, f"rendered although {sets}"
    assert message in done.stderr, done.stderr


def test_scaling_rule_boundary_renders(helm: Helm) -> None:
    """maxReplicaCount == partitions is allowed (one worker per partition); one more is not (above)."""
    docs = render(helm, sets={"keda.enabled": "true", "keda.maxReplicaCount": "6", "keda.minReplicaCount": "0"})
    assert one(docs, "ScaledObject")["spec"]["maxReplicaCount"] == 6
    docs = render(helm, sets={"jobsTopicPartitions": "24", "replicaCount": "24"})
    assert one(docs, "Deployment")["spec"]["replicas"] == 24


@pytest.mark.parametrize("shutdown", ["10", "30.0", "60", "119.5"])
def test_grace_period_follows_the_shutdown_timeout(helm: Helm, shutdown: str) -> None:
    docs = render(helm, sets={"env.RERANK_SHUTDOWN_TIMEOUT_S": shutdown})
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == math.ceil(float(shutdown)) + 15
    assert grace > float(shutdown) + WATCHDOG_S


def test_cpu_only_release_renders_without_gpu(helm: Helm) -> None:
    docs = render(helm, sets={"gpu.enabled": "false", "env.RERANK_DEVICE": "cpu"})
    container = worker_container(docs)
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert plain_env(container)["RERANK_DEVICE"] == "cpu"


# -- values.schema.json: mistakes fail lint and template, naming the value ----------------------------------------

SCHEMA_PATH = CHART / "values.schema.json"


@pytest.fixture(scope="module")
def values_schema() -> Any:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        # unknown keys (typos), at several levels
        ({"keda.lagTreshold": "5"}, "at '/keda': additional properties 'lagTreshold' not allowed"),
        ({"replicaCounts": "2"}, "at '': additional properties 'replicaCounts' not allowed"),
        ({"kafka.tls.caSecret.nam": "ca"}, "at '/kafka/tls/caSecret': additional properties 'nam' not allowed"),
        ({"probes.liveness.periodSecond": "3"}, "at '/probes/liveness': additional properties 'periodSecond'"),
        ({"env.RERANK_MAX_DOC_TOKEN": "256"}, "at '/env': additional properties 'RERANK_MAX_DOC_TOKEN' not allowed"),
        ({"serviceAccount.automount": "true"}, "at '/serviceAccount': additional properties 'automount'"),
        ({"prometheusRule.alerts.X.fro": "5m"}, "at '/prometheusRule/alerts/X': additional properties 'fro'"),
        # wrong types
        ({"keda.maxReplicaCount": "abc"}, "at '/keda/maxReplicaCount': got string, want integer"),
        ({"gpu.enabled": "yes"}, "at '/gpu/enabled': got string, want boolean"),
        ({"serviceMonitor.interval": "30"}, "at '/serviceMonitor/interval': got number, want string"),
        ({"keda.excludePersistentLag": "sometimes"}, "at '/keda/excludePersistentLag'"),
        ({"env.RERANK_CUDA_GRAPHS": "maybe"}, "at '/env/RERANK_CUDA_GRAPHS'"),
        ({"env.RERANK_SHUTDOWN_TIMEOUT_S": "soon"}, "at '/env/RERANK_SHUTDOWN_TIMEOUT_S'"),
        # bad enums and patterns
        ({"env.RERANK_DTYPE": "fp16"}, "at '/env/RERANK_DTYPE': value must be one of"),
        ({"env.RERANK_DELIVERY": "exactly-once"}, "at '/env/RERANK_DELIVERY': value must be one of"),
        ({"env.RERANK_QUANTIZATION": "int8"}, "at '/env/RERANK_QUANTIZATION': value must be one of"),
        ({"env.RERANK_DEVICE": "gpu"}, "at '/env/RERANK_DEVICE'"),
        ({"env.RERANK_JOBS_TOPIC": "jobs topic"}, "at '/env/RERANK_JOBS_TOPIC'"),
        ({"keda.offsetResetPolicy": "newest"}, "at '/keda/offsetResetPolicy': value must be one of"),
        ({"image.pullPolicy": "Sometimes"}, "at '/image/pullPolicy': value must be one of"),
        ({"image.digest": "sha256:xyz"}, "at '/image/digest'"),
        # bad quantities and durations
        ({"resources.limits.cpu": "abc"}, "at '/resources/limits/cpu'"),
        ({"resources.requests.memory": "8GB"}, "at '/resources/requests/memory'"),
        ({"tmp.sizeLimit": "lots"}, "at '/tmp/sizeLimit'"),
        ({"modelCache.persistence.size": "-20Gi"}, "at '/modelCache/persistence/size'"),
        ({"prometheusRule.alerts.X.for": "5 minutes"}, "at '/prometheusRule/alerts/X/for'"),
        # negative or zero counts
        ({"replicaCount": "-1"}, "at '/replicaCount': minimum: got -1, want 0"),
        ({"jobsTopicPartitions": "0"}, "at '/jobsTopicPartitions': minimum: got 0, want 1"),
        ({"keda.minReplicaCount": "-1"}, "at '/keda/minReplicaCount': minimum: got -1, want 0"),
        ({"gpu.count": "0"}, "at '/gpu/count': minimum: got 0, want 1"),
        ({"probes.startup.failureThreshold": "0"}, "at '/probes/startup/failureThreshold'"),
        ({"env.RERANK_MAX_DOCS": "-5"}, "at '/env/RERANK_MAX_DOCS'"),
        ({"env.RERANK_HTTP_PORT": "70000"}, "at '/env/RERANK_HTTP_PORT'"),
        ({"terminationGracePeriodSeconds": "-1"}, "at '/terminationGracePeriodSeconds'"),
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
def test_a_mistake_fails_lint_and_template_naming_the_value(helm: Helm, sets: dict[str, str], message: str) -> None:
    done = helm(*template_args(sets=sets))
    assert done.returncode != 0, f"helm template accepted {sets}"
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr
    assert message in done.stderr, done.stderr
    linted = helm("lint", str(CHART), *[arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")])
    assert linted.returncode != 0, f"helm lint accepted {sets}"
    assert f"[ERROR] values.yaml: - {message}" in linted.stdout, linted.stdout


def test_a_typo_in_a_values_file_fails(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("keda:\n  enabled: true\n  lagTreshold: 5\n", encoding="utf-8")
    done = helm(*template_args([values]))
    assert done.returncode != 0
    assert "at '/keda': additional properties 'lagTreshold' not allowed" in done.stderr, done.stderr


def test_schema_refuses_unknown_keys_wherever_the_chart_defines_them(values_schema: Any) -> None:
    """Every schema object that lists its properties closes itself; open maps say what their values are."""
    open_objects = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}/{index}")

    walk(values_schema, "")
    # list items (extraEnv, extraVolumes, ...) are Kubernetes objects: the chart names only what it requires of them
    assert [p for p in open_objects if not p.endswith("/items")] == []
    assert values_schema["$schema"] == "http://json-schema.org/draft-07/schema#"


def literal_choices(annotation: Any) -> tuple[str, ...] | None:
    for candidate in [annotation, *typing.get_args(annotation)]:
        if typing.get_origin(candidate) is Literal:
            return tuple(str(v) for v in typing.get_args(candidate))
    return None


def test_schema_env_allows_exactly_the_workers_choices(values_schema: Any) -> None:
    """Each setting's schema: the worker's default and "" (unset) pass; Literal settings list exactly the worker's
    choices; numbers, booleans and topic names refuse what the worker refuses."""
    validator = jsonschema.Draft7Validator(values_schema)
    env_schema = values_schema["properties"]["env"]["properties"]
    assert set(env_schema) == SETTING_NAMES

    def ok(name: str, value: object) -> bool:
        return validator.is_valid({"env": {name: value}})

    for field_name, field in Settings.model_fields.items():
        name = env_name(field_name)
        assert ok(name, ""), f"{name}: empty (unset) refused"
        if field.default is not None:
            assert ok(name, default_text(field.default)), f"{name}: the worker's default refused"
        choices = literal_choices(field.annotation)
        if choices is not None:
            assert env_schema[name]["enum"] == ["", *choices], f"{name}: enum drifted from worker/settings.py"
            assert not ok(name, "not-a-choice")
        kinds = {t for t in [field.annotation, *typing.get_args(field.annotation)] if t in (bool, int, float)}
        if kinds & {int, float}:
            assert not ok(name, "abc"), f"{name}: a word accepted as a number"
            assert not ok(name, -1), f"{name}: a negative number accepted"
        if bool in kinds:
            assert ok(name, True)
            assert ok(name, "false")
            assert not ok(name, "maybe")
    for topic in ("RERANK_JOBS_TOPIC", "RERANK_RESULTS_TOPIC", "RERANK_DLQ_TOPIC"):
        assert not ok(topic, "a topic")
        assert not ok(topic, "t" * 250)
        assert ok(topic, "rerank.jobs-v2_x")
    assert ok("RERANK_DEVICE", "cuda:1")
    assert not ok("RERANK_DEVICE", "gpu")


# -- operator options ---------------------------------------------------------------------------------------------


def test_default_pod_options(default_docs: list[Any], chart_values: Any) -> None:
    pod = one(default_docs, "Deployment")["spec"]["template"]["spec"]
    container = worker_container(default_docs)
    assert container["image"] == f"{chart_values['image']['repository']}:0.1.0"  # the chart's appVersion
    assert "serviceAccountName" not in pod  # the namespace's default ServiceAccount
    assert pod["automountServiceAccountToken"] is False
    assert "initContainers" not in pod
    assert "envFrom" not in container
    assert {v["name"]: v for v in pod["volumes"]}["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}
    # the worker's compile caches land on the model cache volume by default (RERANK_CACHE_DIR empty)
    assert "RERANK_CACHE_DIR" not in plain_env(container)
    assert chart_values["env"]["RERANK_CACHE_DIR"] == ""


def test_all_on_operator_options(all_on_docs: list[Any], all_on_values: Any) -> None:
    pod = one(all_on_docs, "Deployment")["spec"]["template"]["spec"]
    container = worker_container(all_on_docs)
    image = all_on_values["image"]
    assert container["image"] == f"{image['repository']}@{image['digest']}"  # the digest wins over the tag

    account = one(all_on_docs, "ServiceAccount")
    assert account["metadata"]["name"] == pod["serviceAccountName"] == all_on_values["serviceAccount"]["name"]
    assert account["metadata"]["annotations"] == all_on_values["serviceAccount"]["annotations"]
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False

    assert pod["initContainers"] == all_on_values["initContainers"]
    assert container["envFrom"] == all_on_values["envFrom"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for volume in all_on_values["extraVolumes"]:
        assert volumes[volume["name"]] == volume
    for mount in all_on_values["extraVolumeMounts"]:
        assert mounts[mount["name"]] == mount
        assert mount["name"] in volumes
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": all_on_values["tmp"]["sizeLimit"]}
    assert plain_env(container)["RERANK_CUDA_GRAPHS"] == "true"  # a YAML boolean, as the worker spells it

    (trigger,) = one(all_on_docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["excludePersistentLag"] == "true"
    assert trigger["metadata"]["limitToPartitionsWithLag"] == "false"


def test_keda_lag_options_render_only_when_set(helm: Helm) -> None:
    (trigger,) = one(render(helm, sets={"keda.enabled": "true"}), "ScaledObject")["spec"]["triggers"]
    assert "excludePersistentLag" not in trigger["metadata"]
    assert "limitToPartitionsWithLag" not in trigger["metadata"]
    docs = render(helm, sets={"keda.enabled": "true", "keda.limitToPartitionsWithLag": "true"})
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["limitToPartitionsWithLag"] == "true"
    assert trigger["metadata"]["allowIdleConsumers"] == "false"  # KEDA refuses both true together
    assert "excludePersistentLag" not in trigger["metadata"]


def test_service_account_names(helm: Helm) -> None:
    created = render(helm, sets={"serviceAccount.create": "true"})
    assert one(created, "ServiceAccount")["metadata"]["name"] == "rr-rerank-worker"
    assert one(created, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "rr-rerank-worker"
    existing = render(helm, sets={"serviceAccount.name": "models-reader"})
    assert not by_kind(existing, "ServiceAccount")
    assert one(existing, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "models-reader"
    # the flat key of chart 0.1.0 still works, for one release
    old = render(helm, sets={"serviceAccountName": "models-reader"})
    assert one(old, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "models-reader"
    done = helm(*template_args(sets={"serviceAccountName": "a", "serviceAccount.name": "b"}))
    assert done.returncode != 0
    assert "serviceAccountName=a and serviceAccount.name=b disagree" in done.stderr


def test_all_on_grafana_dashboard_configmap(all_on_docs: list[Any], all_on_values: Any) -> None:
    (configmap,) = by_kind(all_on_docs, "ConfigMap")
    settings = all_on_values["grafanaDashboard"]
    assert configmap["metadata"]["namespace"] == settings["namespace"]
    assert settings["labels"].items() <= configmap["metadata"]["labels"].items()
    assert configmap["metadata"]["annotations"] == settings["annotations"]
    assert configmap["data"] == {"rerank-worker.json": (CHART / "files" / "dashboard.json").read_text(encoding="utf-8")}
    json.loads(configmap["data"]["rerank-worker.json"])


def test_grafana_dashboard_defaults_to_the_release_namespace_and_sidecar_label(helm: Helm) -> None:
    (configmap,) = by_kind(render(helm, sets={"grafanaDashboard.enabled": "true"}), "ConfigMap")
    assert configmap["metadata"]["namespace"] == "ml"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


def alerts_file() -> Any:
    return load_yaml(CHART / "files" / "alerts.yaml")


def alert_names() -> list[str]:
    return [rule["alert"] for group in alerts_file()["groups"] for rule in group["rules"] if "alert" in rule]


def test_all_on_prometheus_rule_is_the_alerts_file_with_extra_labels(
    all_on_docs: list[Any], all_on_values: Any
) -> None:
    rule = one(all_on_docs, "PrometheusRule")
    settings = all_on_values["prometheusRule"]
    assert settings["labels"].items() <= rule["metadata"]["labels"].items()
    assert rule["metadata"]["annotations"] == settings["annotations"]
    expected = alerts_file()["groups"]
    for group in expected:
        for entry in group["rules"]:
            if "alert" in entry:
                entry["labels"] = {**settings["additionalRuleLabels"], **entry.get("labels", {})}
    assert rule["spec"]["groups"] == expected


def test_prometheus_rule_overrides_per_alert(helm: Helm) -> None:
    names = alert_names()
    assert len(names) >= 2, "files/alerts.yaml needs alerts"
    first, second = names[0], names[1]
    docs = render(
        helm,
        sets={
            "prometheusRule.enabled": "true",
            f"prometheusRule.alerts.{first}.for": "42m",
            f"prometheusRule.alerts.{first}.expr": "vector(1) > 0",
            f"prometheusRule.alerts.{first}.labels.severity": "page",
            f"prometheusRule.alerts.{second}.disabled": "true",
        },
    )
    rules = {r["alert"]: r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert second not in rules
    assert set(rules) == set(names) - {second}
    assert rules[first]["for"] == "42m"
    assert rules[first]["expr"] == "vector(1) > 0"
    assert rules[first]["labels"]["severity"] == "page"


def test_prometheus_rule_override_of_an_unknown_alert_fails(helm: Helm) -> None:
    done = helm(*template_args(sets={"prometheusRule.enabled": "true", "prometheusRule.alerts.RerankTypo.for": "5m"}))
    assert done.returncode != 0
    assert "prometheusRule.alerts.RerankTypo: files/alerts.yaml has no alert of that name" in done.stderr, done.stderr


def test_alerts_file_is_plain_yaml_without_template_syntax_reaching_helm() -> None:
    """The chart reads files/alerts.yaml with .Files.Get (never tpl): Prometheus' own {{ $labels.x }} pass through."""
    text = (CHART / "files" / "alerts.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text)["groups"]
