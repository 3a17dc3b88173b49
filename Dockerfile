# syntax=docker/dockerfile:1
# The rerank worker on a CUDA runtime base: `docker build -t rerank-worker .`, then
#   docker run --gpus all -e KAFKA_BOOTSTRAP_SERVERS=broker:9092 -v rerank-models:/models rerank-worker
# Every Python package comes from requirements/image.txt, a lock with a sha256 for every file (docs/DEPENDENCIES.md;
# `bash scripts/lock.sh` regenerates it): the same sources give the same packages. torch is its CUDA 13.2 build
# (NVIDIA driver >= 580), matching the base image's CUDA.
# Every setting is an environment variable (README "Settings"); the model cache (HF_HOME) is the /models volume.

ARG CUDA_IMAGE=nvidia/cuda:13.2.1-runtime-ubuntu24.04

# -- base: Python and what the worker needs at run time ------------------------------------------------------------
FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc, libc6-dev and python3-dev: Triton (FlexAttention through torch.compile on CUDA) compiles a small C launcher
# against Python.h the first time a kernel runs; without a C compiler the CUDA path fails at the first job.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# -- build: a virtual environment with the locked dependencies, then the worker ------------------------------------
FROM base AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The lock alone decides this layer (several GB of torch and CUDA wheels): a change to worker/ reuses it.
# --require-hashes: every file must match the lock's sha256; --no-deps: nothing is resolved at build time;
# --only-binary: no sdist is built.
COPY requirements/image.txt requirements/image.txt
RUN pip install --require-hashes --no-deps --only-binary :all: -r requirements/image.txt
COPY pyproject.toml README.md ./
COPY worker ./worker
# --no-build-isolation: the build backend (setuptools) is the locked one, not a fresh download.
RUN pip install --no-deps --no-build-isolation . && pip check

# -- runtime: non-root, no build tools beyond the C compiler Triton needs ------------------------------------------
FROM base AS runtime
ARG UID=10001
RUN groupadd --system --gid "$UID" rerank \
    && useradd --system --uid "$UID" --gid "$UID" --home-dir /home/rerank --create-home --shell /usr/sbin/nologin rerank \
    && mkdir -p /models \
    && chown "$UID:$UID" /models
COPY --from=build /opt/venv /opt/venv
# HF_HOME: downloaded models live on the /models volume (a named volume or a PersistentVolumeClaim), not in the
# container layer. The worker keeps its compile caches (TorchInductor, Triton, CUDA) on that volume too, under
# RERANK_CACHE_DIR (default /models/rerank-worker/compile), so a restarted worker reuses them; every other cache goes
# to /tmp, so the root filesystem can be read-only with /tmp an emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_HOME=/tmp
VOLUME ["/models"]
WORKDIR /home/rerank
USER ${UID}:${UID}
EXPOSE 8080
# /healthz answers 200 from the start (also while Kafka is waited for and the model downloads) and 503 once the
# consumer loop or the GPU thread is stuck: urllib raises on 503, so the check fails then. No curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('RERANK_HTTP_PORT') or '8080'), timeout=4)"]
# SIGTERM (docker stop, Kubernetes): the worker finishes the batch in hand, commits and exits 0 within
# RERANK_SHUTDOWN_TIMEOUT_S; give it longer than that (docker stop -t, terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["rerank-worker"]
CMD ["run"]
