# syntax=docker/dockerfile:1.7
#
# sparseflow images: two targets from one file (docs/deploy.md, "Images").
#
#   api     python slim base, CPU torch. The REST API (`sparseflow serve`) and the chart's hook Jobs
#           (migrations, `sparseflow deploy`). In cluster mode the API runs no flows, so it needs no GPU.
#   worker  nvidia/cuda runtime base with Python 3.12 and nvcc, CUDA torch, our sm90 2:4 kernels and the
#           cuSPARSELt shim built ahead of time. The Prefect worker (`sparseflow worker`) and every
#           KubeRay head and worker pod: Ray needs the same Ray, Python and sparseflow code on both sides.
#
#   docker build --target api    -t ghcr.io/sparseflow/sparseflow:0.1.0 .
#   docker build --target worker -t ghcr.io/sparseflow/sparseflow-worker:0.1.0 .
#
# Both run as the non-root user 1000:1000, the uid the Helm chart's securityContexts name.

ARG PYTHON_VERSION=3.12
ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG TORCH_VERSION=2.13.0
ARG CUTLASS_VERSION=4.2.0.0

# ---------------------------------------------------------------------------------------------------
# api: build a virtualenv on the slim base; torch from the CPU index (the default wheel pulls GBs of CUDA)
FROM python:${PYTHON_VERSION}-slim-bookworm AS api-build
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . .
# The package itself, from the build context; its dependencies follow pyproject.toml
# hadolint ignore=DL3013
RUN pip install ".[postgres,s3]"

FROM python:${PYTHON_VERSION}-slim-bookworm AS api
COPY --from=api-build /opt/venv /opt/venv
RUN groupadd --gid 1000 sparseflow \
 && useradd --uid 1000 --gid 1000 --home-dir /var/lib/sparseflow --create-home --shell /usr/sbin/nologin sparseflow
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/var/lib/sparseflow \
    SPARSEFLOW_HOME=/var/lib/sparseflow \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/sparseflow
USER 1000:1000
EXPOSE 8000
CMD ["sparseflow", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------------
# cuda-base: the CUDA runtime, Python 3.12 (Ubuntu 24.04's own), and the minimal CUDA build tools
# (nvcc, cudart headers, CCCL). nvcc stays in the worker image on purpose: the sm90 library's cache key
# includes the nvcc release, and the cuSPARSELt shim is compiled with g++ against the cusparselt wheel.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS cuda-base
ARG CUDA_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Package versions follow the base image's Ubuntu and CUDA repositories, pinned by the base tag.
# hadolint ignore=DL3008
RUN cuda_pkg="$(echo "${CUDA_VERSION}" | cut -d. -f1,2 | tr . -)" \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.12 python3.12-venv g++ wget ca-certificates "cuda-minimal-build-${cuda_pkg}" \
 && rm -rf /var/lib/apt/lists/*
ENV CUDA_HOME=/usr/local/cuda

# worker-build: CUDA torch, the package, CUTLASS headers, then the kernels into /opt/sparseflow-cache
FROM cuda-base AS worker-build
ARG TORCH_VERSION
ARG CUTLASS_VERSION
# torch's CUDA flavour, on the same CUDA major as CUDA_VERSION (older drivers: CUDA_VERSION=12.8.1 with
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# 0 skips the ahead-of-time kernel build (minutes); the tuner then skips the sm90 backend and says why
ARG BUILD_KERNELS=1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    SPARSEFLOW_CACHE=/opt/sparseflow-cache
RUN python3.12 -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . .
# nvidia-cutlass without its dependencies: only the headers its cutlass_library package ships are used
# hadolint ignore=DL3013
RUN pip install ".[postgres,s3]" \
 && pip install --no-deps "nvidia-cutlass==${CUTLASS_VERSION}"
WORKDIR /tmp
RUN mkdir -p /opt/sparseflow-cache \
 && if [ "${BUILD_KERNELS}" = "1" ]; then \
      python -m kernels.cutlass24 build --cache /opt/sparseflow-cache \
      && python -c "from kernels import cslt; print(cslt.build_shim())"; \
    fi

FROM cuda-base AS worker
COPY --from=worker-build /opt/venv /opt/venv
COPY --from=worker-build /opt/sparseflow-cache /opt/sparseflow-cache
# Ubuntu 24.04 images ship a user `ubuntu` with uid 1000; the chart runs everything as 1000:1000.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && groupadd --gid 1000 sparseflow \
 && useradd --uid 1000 --gid 1000 --home-dir /var/lib/sparseflow --create-home --shell /bin/bash sparseflow
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/var/lib/sparseflow \
    SPARSEFLOW_HOME=/var/lib/sparseflow \
    SPARSEFLOW_CACHE=/opt/sparseflow-cache \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/sparseflow
USER 1000:1000
CMD ["sparseflow", "worker"]
