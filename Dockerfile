# syntax=docker/dockerfile:1
# The rerank worker on a CUDA runtime base: `docker build -t rerank-worker .`, then
#   docker run --gpus all -e KAFKA_BOOTSTRAP_SERVERS=broker:9092 -v rerank-models:/models rerank-worker
# torch comes from the PyTorch wheel index matching the base image's CUDA (13.2: NVIDIA driver >= 580). Other builds:
#   CPU only (no CUDA wheels, several GB smaller):
#     docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t rerank-worker:cpu .
#   Older drivers (CUDA 12.8, driver >= 570), with a torch version that index serves:
#     docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg TORCH_SPEC=torch==X.Y.Z .
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

# -- build: a virtual environment with torch (CUDA 13.2 wheels by default) and the worker --------------------------
FROM base AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from the PyTorch index matching the base image's CUDA: its layer survives source changes.
# 2.15.0 is the version the test suite runs with (pyproject allows >= 2.6); hadolint cannot see the pin in the ARG.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu132
ARG TORCH_SPEC=torch==2.15.0
# hadolint ignore=DL3013
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip install . && pip check

# -- runtime: non-root, no build tools beyond the C compiler Triton needs ------------------------------------------
FROM base AS runtime
ARG UID=10001
RUN groupadd --system --gid "$UID" rerank \
    && useradd --system --uid "$UID" --gid "$UID" --home-dir /home/rerank --create-home --shell /usr/sbin/nologin rerank \
    && mkdir -p /models \
    && chown "$UID:$UID" /models
COPY --from=build /opt/venv /opt/venv
# HF_HOME: downloaded models live on the /models volume (a named volume or a PersistentVolumeClaim), not in the
# container layer. Compile caches go to /tmp, so the root filesystem can be read-only with /tmp an emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_HOME=/tmp \
    TRITON_CACHE_DIR=/tmp/.triton/cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache
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
