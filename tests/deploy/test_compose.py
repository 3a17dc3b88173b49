"""docker-compose.yml against the official compose-spec JSON schema (vendored, offline) and the worker's contract.

No Docker engine or `docker compose` plugin runs here, so the file is validated the way compose-go does it: YAML
(with merge keys), `${VAR:-default}` interpolation, then JSON Schema (draft 2020-12) with `jsonschema`. On top:
the cross-references Compose checks at load time (depends_on targets, named volumes, profiles), and the facts the
worker needs (KRaft single node, topics sized for RERANK_MAX_MESSAGE_BYTES, GPU reservation, CPU profile, demo).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from tests.deploy.conftest import REPO, load_yaml
from worker.kafka.config import FRAMING_BYTES
from worker.settings import ENV_PREFIX, Settings

COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA_FILE = REPO / "deploy" / "compose" / "compose-spec.json"
# check-jsonschema 0.39.0's vendored copy (deploy/compose/README.md): a schema change must be deliberate.
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"

# ${VAR}, ${VAR:-default}, ${VAR-default}; $$ is a literal $ (the compose-spec interpolation rules we use).
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(node: Any, environ: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: interpolate(value, environ) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, environ) for value in node]
    if isinstance(node, str):

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, operator, default = match.group(1), match.group(2), match.group(3)
            value = environ.get(name)
            if operator == ":-" and not value:
                return default or ""
            if operator == "-" and value is None:
                return default or ""
            assert value is not None, f"${{{name}}} has no default: compose would warn and use an empty string"
            return value

        return _VARIABLE.sub(substitute, node)
    return node


@pytest.fixture(scope="module")
def schema() -> Any:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def raw() -> Any:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def compose(raw: Any) -> Any:
    """The file as Compose sees it with no variables set: defaults applied, $$ unescaped."""
    return interpolate(raw, {})


def validator(schema: Any) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)  # type: ignore[no-any-return]


def schema_errors(schema: Any, document: Any) -> list[str]:
    errors = sorted(validator(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def env_of(service: Any) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of environment"
    return {key: str(value) for key, value in env.items()}


# -- the schema ----------------------------------------------------------------------------------------------------


def test_vendored_schema_is_the_official_compose_spec(schema: Any) -> None:
    assert hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest() == SCHEMA_SHA256
    assert schema["title"] == "Compose Specification"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert validator(schema).__class__ is jsonschema.Draft202012Validator
    assert (REPO / "deploy" / "compose" / "LICENSE.compose-spec").read_text().lstrip().startswith("Apache License")


def test_compose_file_is_valid_against_the_schema(schema: Any, raw: Any, compose: Any) -> None:
    assert schema_errors(schema, raw) == []
    assert schema_errors(schema, compose) == []
    # with variables set, too
    overridden = interpolate(raw, {"RERANK_MODEL": "/models/local", "RERANK_IMAGE": "registry/rw:1"})
    assert schema_errors(schema, overridden) == []
    assert overridden["services"]["worker"]["environment"]["RERANK_MODEL"] == "/models/local"


def _gpu_typo(d: Any) -> None:
    d["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilitys"] = ["gpu"]


def _bad_condition(d: Any) -> None:
    d["services"]["worker"]["depends_on"]["kafka"]["condition"] = "service_ready"


def _healthcheck_typo(d: Any) -> None:
    d["services"]["worker"]["healthcheck"]["intervall"] = "15s"


def _profiles_not_a_list(d: Any) -> None:
    d["services"]["worker-cpu"]["profiles"] = "cpu"


def _unknown_service_key(d: Any) -> None:
    d["services"]["kafka"]["gpus_please"] = 1


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (_gpu_typo, "'capabilitys'"),
        (_bad_condition, "'service_ready'"),
        (_healthcheck_typo, "'intervall'"),
        (_profiles_not_a_list, "'cpu' is not of type 'array'"),
        (_unknown_service_key, "'gpus_please'"),
    ],
)
def test_schema_rejects_broken_variants(
    schema: Any, compose: Any, mutate: Callable[[Any], None], complaint: str
) -> None:
    """The validator is strict: a typo or a wrong type in the places that matter is an error, not ignored."""
    broken = copy.deepcopy(compose)
    mutate(broken)
    errors = schema_errors(schema, broken)
    assert any(complaint in e for e in errors), errors


# -- what Compose checks at load time beyond the schema -----------------------------------------------------------


def test_cross_references_resolve(compose: Any) -> None:
    services = compose["services"]
    declared_volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        for target in service.get("depends_on", {}):
            assert target in services, f"{name} depends on unknown service {target}"
            # a service started by default must not wait for one that only a profile starts
            if not service.get("profiles"):
                assert not services[target].get("profiles"), f"{name} depends on profiled {target}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name} mounts undeclared volume {source}"
            else:
                assert (REPO / source).exists(), f"{name} bind-mounts missing {source}"
    host_ports = [p.rsplit(":", 1)[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), f"host ports collide: {host_ports}"


# -- Kafka ---------------------------------------------------------------------------------------------------------


def test_kafka_is_a_single_kraft_node_of_the_official_image(compose: Any) -> None:
    kafka = compose["services"]["kafka"]
    image, tag = kafka["image"].split(":")
    assert image == "apache/kafka"
    assert tag.startswith("4."), "pin a Kafka 4.x tag"
    env = env_of(kafka)
    assert env["KAFKA_NODE_ID"] == "1"
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), "CLUSTER_ID: a base64url UUID (22 characters)"
    for name in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
    ):
        assert env[name] == "1", name
    # every listener has a protocol, the advertised ones exist, the inter-broker one is advertised
    listeners = {entry.split("://")[0] for entry in env["KAFKA_LISTENERS"].split(",")}
    protocols = dict(entry.split(":") for entry in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    advertised = dict(entry.split("://") for entry in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert listeners == set(protocols)
    assert set(advertised) <= listeners
    assert "CONTROLLER" not in advertised
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    # the containers reach it where the workers are told to
    assert compose["x-worker-env"]["KAFKA_BOOTSTRAP_SERVERS"] == advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= Settings.model_construct().max_message_bytes + FRAMING_BYTES
    assert env["KAFKA_LOG_DIRS"] in {v.split(":")[1] for v in kafka["volumes"]}
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def topic_commands(compose: Any) -> dict[str, dict[str, Any]]:
    """--create commands of the topics service: topic -> {partitions, configs, if_not_exists}."""
    (script,) = compose["services"]["topics"]["command"]
    created: dict[str, dict[str, Any]] = {}
    for line in script.splitlines():
        words = shlex.split(line)
        if "--create" not in words:
            continue
        configs = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--config")
        created[words[words.index("--topic") + 1]] = {
            "partitions": int(words[words.index("--partitions") + 1]),
            "configs": configs,
            "if_not_exists": "--if-not-exists" in words,
            "tool": words[0],
        }
    return created


def test_topics_service_creates_the_workers_topics_sized_for_big_jobs(compose: Any) -> None:
    topics = compose["services"]["topics"]
    assert topics["image"] == compose["services"]["kafka"]["image"]
    assert topics["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert topics["restart"] == "no"
    assert topics["entrypoint"][0] == "/bin/bash"
    script = topics["command"][0]
    assert script.startswith("topics=/opt/kafka/bin/kafka-topics.sh\n")
    assert "$$" not in script, "$$ in the file must reach the shell as $ (interpolation)"
    assert "$topics" in script
    created = topic_commands(compose)
    env = compose["x-worker-env"]
    assert set(created) == {env["RERANK_JOBS_TOPIC"], env["RERANK_RESULTS_TOPIC"], env["RERANK_DLQ_TOPIC"]}
    needed = int(env["RERANK_MAX_MESSAGE_BYTES"]) + FRAMING_BYTES
    for name, topic in created.items():
        assert topic["tool"] == "$topics", name
        assert topic["if_not_exists"], f"{name}: re-running the stack must not fail"
        assert int(topic["configs"]["max.message.bytes"]) >= needed, name
        assert topic["configs"]["compression.type"] == "producer", name
    assert created[env["RERANK_JOBS_TOPIC"]]["partitions"] == 6


# -- the workers ---------------------------------------------------------------------------------------------------


def test_gpu_worker_reserves_an_nvidia_gpu(compose: Any) -> None:
    worker = compose["services"]["worker"]
    assert "profiles" not in worker, "the GPU worker starts with a plain `docker compose up`"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert env_of(worker)["RERANK_DEVICE"] == "cuda"


def test_cpu_worker_is_a_profile_without_gpu(compose: Any) -> None:
    cpu = compose["services"]["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert env_of(cpu)["RERANK_DEVICE"] == "cpu"
    assert cpu["image"] == compose["services"]["worker"]["image"]


@pytest.mark.parametrize("name", ["worker", "worker-cpu"])
def test_worker_waits_for_kafka_and_topics_and_keeps_its_model(compose: Any, name: str) -> None:
    worker = compose["services"][name]
    assert worker["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "topics": {"condition": "service_completed_successfully"},
    }
    assert worker["build"]["context"] == "."
    assert worker["command"] == ["run"]
    assert "models:/models" in worker["volumes"]  # HF_HOME of the image
    env = env_of(worker)
    port = env["RERANK_HTTP_PORT"]
    assert any(p.endswith(f":{port}") for p in worker["ports"])
    test = worker["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert "/healthz" in test[-1]
    shutdown = float(env["RERANK_SHUTDOWN_TIMEOUT_S"])
    assert float(worker["stop_grace_period"].rstrip("s")) > shutdown + 2


@pytest.mark.parametrize("name", ["worker", "worker-cpu", "demo"])
def test_worker_accepts_the_compose_environment(compose: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith((ENV_PREFIX, "KAFKA_")):
            monkeypatch.delenv(key)
    for key, value in env_of(compose["services"][name]).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.bootstrap_servers == "kafka:19092"
    assert settings.max_message_bytes == 16 * 1024 * 1024


def test_demo_is_a_one_shot_producer_of_the_example_job(compose: Any) -> None:
    demo = compose["services"]["demo"]
    assert demo["profiles"] == ["demo"]
    assert demo["restart"] == "no"
    command = demo["command"]
    assert command[:3] == ["enqueue", "--file", "/examples/job.json"]
    assert "--wait" in command
    assert demo["entrypoint"] == ["rerank-worker"]
    assert "./examples:/examples:ro" in demo["volumes"]
    assert (REPO / "examples" / "job.json").is_file()
    assert demo["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert demo["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert demo["healthcheck"] == {"disable": True}
