"""The engine registry, a third-party engine plugged in through the entry point group (one file
filling in the ``Engine`` hooks), the pieces shared by engine adapters, and the request mapping of
the SGLang and LMDeploy adapters.

SGLang and LMDeploy need CUDA, so they cannot generate here. Their mapping is checked against their
real parameter and config classes where those import (scripts/install-engine-api-packages.sh puts
them into an environment without their CUDA dependencies); those tests skip, saying why, elsewhere.
The rest runs everywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import re
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from omniserve.config import EngineConfig
from omniserve.engines.adapter_support import ChoiceDecoder, engine_args_from_cli_parser
from omniserve.engines.base import ChoiceDelta
from omniserve.engines.registry import available_engines, create_engine
from omniserve.engines.streams import Admission, AdmittedStream
from omniserve.errors import ModelLoadError, QueueFull, UnsupportedParameter
from omniserve.sampling import SamplingParams
from omniserve.structured.spec import StructuredOutput

FULL = SamplingParams(
    max_tokens=9,
    temperature=0.7,
    top_p=0.9,
    top_k=20,
    seed=5,
    n=2,
    stop=("END",),
    stop_token_ids=(7,),
    presence_penalty=0.5,
    frequency_penalty=0.25,
    repetition_penalty=1.1,
    logprobs=True,
    top_logprobs=3,
    ignore_eos=True,
    min_tokens=2,
)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


needs_sglang = pytest.mark.skipif(
    not _importable("sglang"), reason="sglang is not installed (scripts/install-engine-api-packages.sh)"
)
needs_lmdeploy = pytest.mark.skipif(
    not _importable("lmdeploy"), reason="lmdeploy is not installed (scripts/install-engine-api-packages.sh)"
)


# ---------------------------------------------------------------- registry


def test_builtin_engines_are_listed() -> None:
    assert {"transformers", "vllm", "sglang", "lmdeploy"} <= set(available_engines())


@pytest.mark.parametrize("name", ["vllm", "sglang", "lmdeploy"])
def test_missing_engine_package_is_one_clear_error(name: str, tiny_qwen2: Path) -> None:
    if _importable(name):
        pytest.skip(f"{name} is installed here")
    with pytest.raises(ModelLoadError) as info:
        create_engine(name, EngineConfig(model=tiny_qwen2, served_model_name="x", dtype="bfloat16"))
    text = str(info.value)
    assert f"the {name} engine" in text and str(tiny_qwen2) in text and "not installed" in text
    assert "--engine transformers" in text


@pytest.mark.parametrize("name", ["sglang", "lmdeploy"])
def test_a_failed_start_is_one_message_with_the_engines_own_error(name: str, tiny_qwen2: Path) -> None:
    """Without CUDA both engines fail to start for real; LMDeploy even calls exit(1) after logging why."""
    import asyncio

    if not _importable(name):
        pytest.skip(f"{name} is not installed here")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the engine may start")
    engine = create_engine(name, EngineConfig(model=tiny_qwen2, served_model_name="x", dtype="bfloat16"))
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(engine.start())
    text = str(info.value)
    assert text.startswith(f"the {name} engine could not start {tiny_qwen2}: ") and "\n" not in text
    assert "Fix: " in text and "--engine transformers" in text
    if name == "lmdeploy":  # its checker logs the reason, then exits: the reason is quoted, not "status 1"
        assert "Found no NVIDIA driver" in text and "needs a CUDA GPU" in text


def test_unknown_engine_names_the_available_ones(tiny_qwen2: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"available: .*transformers"):
        create_engine("nonesuch", EngineConfig(model=tiny_qwen2, served_model_name="x"))


# ---------------------------------------------------------------- a third-party engine, through entry points

ECHO_ENGINE = '''
"""A complete third-party omniserve engine: it answers with the last words of the prompt.

The four hooks are all it writes; admission, readiness, stats and the 400/429/503s come with ``Engine``.
"""
from omniserve.engines.base import ChoiceDelta, Engine


class EchoEngine(Engine):
    NAME = "echo"
    UNSUPPORTED = ("presence_penalty",)

    async def launch(self):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self._config.model))
        return self.served(512, [self.tokenizer.eos_token_id])

    def shutdown(self):
        pass

    def prepare(self, request):
        return request.prompt.token_ids[-request.sampling.max_tokens :]

    async def stream(self, request, native):
        for i in range(request.sampling.n):
            yield ChoiceDelta(i, self.tokenizer.decode(native), list(native), finish_reason="length")
'''


@pytest.fixture
def echo_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An installed-looking distribution declaring ``[project.entry-points."omniserve.engines"] echo``."""
    (tmp_path / "omniserve_echo.py").write_text(textwrap.dedent(ECHO_ENGINE))
    dist = tmp_path / "omniserve_echo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: omniserve-echo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[omniserve.engines]\necho = omniserve_echo:EchoEngine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return "echo"


def test_third_party_engine_serves_through_the_gateway(echo_package: str, tiny_qwen2: Path) -> None:
    from tests.conftest import start_server

    assert echo_package in available_engines()
    server = start_server(tiny_qwen2, name="echo-model", engine_name=echo_package, engine={"max_concurrency": 2})
    try:
        client = server.client()
        out = client.completions.create(model="echo-model", prompt="the quick brown fox", max_tokens=2, n=2)
        assert type(server.engine).__name__ == "EchoEngine"
        assert [c.text for c in out.choices] == [out.choices[0].text] * 2
        assert out.choices[0].text and "the quick brown fox".endswith(out.choices[0].text)
        assert out.usage.completion_tokens == 4
        assert server.engine.stats().waiting == server.engine.stats().running == 0  # admission given back
        # what the base class refuses for every engine, with the engine's name
        for extra, param in (({"n": 3}, "n"), ({"presence_penalty": 0.5}, "presence_penalty")):
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model="echo-model", prompt="hi", max_tokens=1, **extra)
            assert info.value.body["param"] == param and "echo engine" in info.value.body["message"]
    finally:
        server.stop()


# ---------------------------------------------------------------- admission and streams shared by adapters


async def _deltas(*deltas: ChoiceDelta) -> AsyncIterator[ChoiceDelta]:
    for delta in deltas:
        yield delta


def test_admission_counts_sequences_and_refuses_beyond_capacity() -> None:
    admission = Admission(max_concurrency=2, max_queue=1)
    admission.reserve(2)
    with pytest.raises(QueueFull) as info:
        admission.reserve(2)
    assert info.value.status_code == 429
    admission.reserve(1)
    assert (admission.waiting, admission.running) == (3, 0)


def test_stream_gives_its_places_back_once_whether_finished_or_closed_unstarted() -> None:
    """Waiting until a choice's first delta, running until its last: the queue metrics' meaning."""
    admission = Admission(max_concurrency=4, max_queue=0)

    async def scenario() -> None:
        admission.reserve(2)
        finished = AdmittedStream(
            _deltas(
                ChoiceDelta(0, "a", [1]),
                ChoiceDelta(1, "b", [2]),
                ChoiceDelta(0, "", [3], finish_reason="stop"),
                ChoiceDelta(1, "c", [4], finish_reason="length"),
            ),
            admission,
            2,
        )
        first = await finished.__anext__()
        assert first.text == "a" and (admission.waiting, admission.running) == (1, 1)
        assert (await finished.__anext__()).text == "b" and (admission.waiting, admission.running) == (0, 2)
        assert (await finished.__anext__()).finish_reason == "stop" and (admission.waiting, admission.running) == (0, 1)
        assert [d.text async for d in finished] == ["c"]
        assert (admission.waiting, admission.running) == (0, 0)
        await finished.aclose()  # closing again changes nothing
        assert (admission.waiting, admission.running) == (0, 0)

        admission.reserve(4)
        never_started = AdmittedStream(_deltas(ChoiceDelta(0, "x", [1])), admission, 4)
        await never_started.aclose()
        assert (admission.waiting, admission.running) == (0, 0)

    asyncio.run(scenario())


def test_choice_decoder_applies_stop_strings_like_the_transformers_engine(tiny_qwen2: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2))
    ids = tokenizer("hello world, stop here please", add_special_tokens=False)["input_ids"]
    decoder = ChoiceDecoder(0, tokenizer, ("stop",))
    texts, finish = [], None
    for token in ids:
        delta = decoder.feed([token], None, None)
        if delta is not None:
            texts.append(delta.text)
            finish = delta.finish_reason
        if decoder.finished:
            break
    assert "".join(texts) == "hello world, " and finish == "stop" and decoder.stopped
    assert decoder.feed(ids, None, "length") is None  # nothing after the end

    plain = ChoiceDecoder(1, tokenizer, ())
    whole = plain.feed(ids, None, "length")
    assert whole is not None and whole.text == "hello world, stop here please" and whole.finish_reason == "length"
    assert whole.token_ids == ids and whole.index == 1


def test_choice_decoder_keeps_only_the_special_tokens_a_tool_parser_reads(tiny_qwen2: Path) -> None:
    """SGLang and LMDeploy stream ids that omniserve decodes: ``keep_special`` keeps exactly the listed control
    tokens in the text (a tool format's markers), every other special token is still dropped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2))
    kept, dropped = tokenizer.all_special_tokens[:2]
    ids = tokenizer(f"a{kept}b{dropped}c", add_special_tokens=False)["input_ids"]
    keeping = ChoiceDecoder(0, tokenizer, (), (kept,)).feed(ids, None, "stop")
    plain = ChoiceDecoder(0, tokenizer, ()).feed(ids, None, "stop")
    assert keeping is not None and plain is not None
    assert keeping.text.replace(" ", "") == f"a{kept}bc" and plain.text.replace(" ", "") == "abc"


# ---------------------------------------------------------------- engine args through an engine's own CLI parser


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--cuda-graph-sizes", type=int, nargs="+")
    parser.add_argument("--context-length", type=int)
    return parser


def test_engine_args_are_typed_by_the_engines_parser() -> None:
    parsed = engine_args_from_cli_parser(
        _toy_parser(),
        {
            "tensor-parallel-size": "2",
            "kv_cache_dtype": "fp8",
            "enforce_eager": "false",
            "trust-remote-code": "true",
            "cuda_graph_sizes": "1,2 4",
        },
        engine="toy",
        owned={"context_length": "--max-model-len"},
    )
    assert parsed == {
        "tp_size": 2,
        "kv_cache_dtype": "fp8",
        "enforce_eager": False,
        "trust_remote_code": True,
        "cuda_graph_sizes": [1, 2, 4],
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tp_sise": "2"}, "toy has no engine argument 'tp_sise'; did you mean tp_size"),
        ({"tp_size": "2.5"}, "tp_size='2.5': toy rejects this value"),
        ({"kv_cache_dtype": "fp4"}, "expected one of auto, fp8"),
        ({"enforce_eager": "sometimes"}, "expected true or false"),
        ({"context-length": "99"}, "use --max-model-len"),
    ],
)
def test_bad_engine_args_name_the_key_the_engine_and_the_fix(raw: dict[str, str], message: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        engine_args_from_cli_parser(_toy_parser(), raw, engine="toy", owned={"context_length": "--max-model-len"})
    assert message in str(info.value)


# ---------------------------------------------------------------- SGLang


def test_sglang_sampling_and_media_mapping() -> None:
    from omniserve.engines.sglang_engine import logprob_request, processor_outputs, to_sglang_sampling

    mapped = to_sglang_sampling(FULL)
    assert mapped["max_new_tokens"] == 9 and mapped["min_new_tokens"] == 2 and mapped["n"] == 2
    assert mapped["sampling_seed"] == 5 and mapped["stop"] == ["END"] and mapped["stop_token_ids"] == [7]
    assert to_sglang_sampling(SamplingParams(max_tokens=1))["top_k"] == -1  # SGLang's "all tokens"
    assert logprob_request(FULL) == {"return_logprob": True, "top_logprobs_num": 3, "logprob_start_len": -1}
    outputs = processor_outputs(
        {
            "pixel_values": "P",
            "image_grid_thw": "G",
            "pixel_values_videos": "V",
            "video_grid_thw": "VG",
            "video_second_per_grid": "S",
            "input_features": "A",
            "feature_attention_mask": "M",
            "mm_token_type_ids": "T",
        }
    )
    assert outputs == {
        "image_data": [{"format": "processor_output", "pixel_values": "P", "image_grid_thw": "G"}],
        "video_data": [
            {
                "format": "processor_output",
                "pixel_values_videos": "V",
                "video_grid_thw": "VG",
                "second_per_grid_ts": "S",
            }
        ],
        "audio_data": [{"format": "processor_output", "input_features": "A", "feature_attention_mask": "M"}],
    }


@needs_sglang
def test_sglang_accepts_the_mapped_sampling_params(tiny_qwen2: Path) -> None:
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams
    from transformers import AutoTokenizer

    from omniserve.engines.sglang_engine import to_sglang_sampling

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2))
    for params in (FULL, SamplingParams(max_tokens=4, temperature=0.0), SamplingParams(max_tokens=4, top_k=0)):
        theirs = SGLangSamplingParams(**to_sglang_sampling(params))
        theirs.verify(len(tokenizer))
        theirs.normalize(tokenizer)
        assert theirs.max_new_tokens == params.max_tokens and theirs.n == params.n
    greedy = SGLangSamplingParams(**to_sglang_sampling(SamplingParams(max_tokens=4, temperature=0.0)))
    greedy.normalize(tokenizer)
    assert greedy.top_k == 1  # SGLang's own reading of temperature 0: greedy
    full = SGLangSamplingParams(**to_sglang_sampling(FULL))
    full.normalize(tokenizer)
    assert full.stop_strs == ["END"] and 7 in full.stop_token_ids and full.sampling_seed == 5


@needs_sglang
def test_sglang_knows_the_processor_output_names_we_send() -> None:
    """SGLang files processor outputs under a modality by name; ours must land where we sent them."""
    from omniserve.engines.sglang_engine import processor_outputs

    # Read, not imported: importing SGLang's processors pulls in its CUDA-side dependencies.
    spec = importlib.util.find_spec("sglang.srt.multimodal.processors.base_processor")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    theirs = {name: modality.lower() for name, modality in re.findall(r'"(\w+)": Modality\.(\w+)', source)}
    names = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"]
    names += ["input_features", "feature_attention_mask"]
    for modality, (data,) in processor_outputs(dict.fromkeys(names, 0)).items():
        for name in data.keys() - {"format"}:
            assert theirs[name] == modality.removesuffix("_data"), name


@needs_sglang
def test_sglang_engine_args_use_server_args(tiny_qwen2: Path) -> None:
    from omniserve.engines.sglang_engine import parse_engine_args

    assert parse_engine_args({"tensor-parallel-size": "2", "mem_fraction_static": "0.8"}) == {
        "tp_size": 2,
        "mem_fraction_static": 0.8,
    }
    with pytest.raises(ModelLoadError, match="use --max-model-len"):
        parse_engine_args({"context_length": "4096"})
    with pytest.raises(ModelLoadError, match="sglang rejects this value"):
        parse_engine_args({"tp_size": "many"})
    engine = create_engine("sglang", EngineConfig(model=tiny_qwen2, served_model_name="x", max_concurrency=3))
    args = engine.server_args()
    assert args["model_path"] == str(tiny_qwen2) and args["max_running_requests"] == 3


# ---------------------------------------------------------------- LMDeploy


def test_lmdeploy_image_items_cut_from_the_processor_output(tiny_qwen2_vl: Path) -> None:
    """Each image's rows of pixel_values, its grid, and the offset/length of its placeholder run."""
    from PIL import Image

    from omniserve.engines.lmdeploy_engine import image_items
    from omniserve.media.loader import MediaItem
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(tiny_qwen2_vl)
    images = [Image.new("RGB", (64, 64), (200, 0, 0)), Image.new("RGB", (120, 64), (0, 0, 200))]
    content = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "text", "text": "?"}]
    prompt = renderer.render_chat([{"role": "user", "content": content}], [MediaItem("image", i) for i in images])
    pad = renderer.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    items = image_items(prompt.token_ids, prompt.mm_inputs, pad)
    assert len(items) == 2
    rows = 0
    for item, grid in zip(items, prompt.mm_inputs["image_grid_thw"], strict=True):
        start, length = item["offset"], item["image_tokens"]
        assert prompt.token_ids[start : start + length] == [pad] * length
        assert prompt.token_ids[start - 1] != pad and prompt.token_ids[start + length] != pad
        assert length == int(grid.prod()) // 4  # 2x2 patches per token
        assert item["pixel_values"].shape[0] == int(grid.prod())
        assert (item["pixel_values"] == prompt.mm_inputs["pixel_values"][rows : rows + int(grid.prod())]).all()
        rows += int(grid.prod())
    assert rows == prompt.mm_inputs["pixel_values"].shape[0]


@needs_lmdeploy
def test_lmdeploy_generation_config_as_its_engine_reads_it() -> None:
    from lmdeploy.pytorch.messages import SamplingParam

    from omniserve.engines.lmdeploy_engine import to_generation_config

    sampled = FULL.__class__(**{**FULL.__dict__, "presence_penalty": 0.0, "frequency_penalty": 0.0})
    configs = [to_generation_config(sampled, choice) for choice in range(sampled.n)]
    assert [c.random_seed for c in configs] == [5, 6]  # one request per choice, seeded like the transformers engine
    first = configs[0]
    assert (first.n, first.max_new_tokens, first.min_new_tokens, first.do_sample) == (1, 9, 2, True)
    assert first.stop_token_ids == [7] and first.logprobs == 3 and first.ignore_eos
    theirs = SamplingParam.from_gen_config(first)
    assert (theirs.temperature, theirs.top_p, theirs.top_k, theirs.max_new_tokens) == (0.7, 0.9, 20, 9)
    assert theirs.repetition_penalty == 1.1 and theirs.random_seed == 5 and theirs.num_logprobs == 3

    greedy = to_generation_config(SamplingParams(max_tokens=4, temperature=0.0))
    assert greedy.do_sample is False
    assert SamplingParam.from_gen_config(greedy).max_new_tokens == 4


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_lmdeploy_refuses_what_it_cannot_do(name: str) -> None:
    """The penalties LMDeploy lacks are 400s naming them (checked by ``Engine.generate`` before mapping)."""
    from omniserve.engines.base import refuse_unsupported
    from omniserve.engines.lmdeploy_engine import ENGINE, LMDeployEngine

    refuse_unsupported(SamplingParams(max_tokens=4), LMDeployEngine.UNSUPPORTED, ENGINE)  # defaults pass
    with pytest.raises(UnsupportedParameter, match=f"lmdeploy engine does not support {name}") as info:
        refuse_unsupported(SamplingParams(max_tokens=4, **{name: 0.5}), LMDeployEngine.UNSUPPORTED, ENGINE)
    assert info.value.param == name and info.value.status_code == 400


@needs_lmdeploy
def test_lmdeploy_engine_args_typed_by_its_backend_config(tiny_qwen2: Path) -> None:
    from omniserve.engines.lmdeploy_engine import parse_engine_args

    assert parse_engine_args({"tp": "2", "cache_max_entry_count": "0.5", "eager_mode": "true"}) == (
        "pytorch",
        {"tp": 2, "cache_max_entry_count": 0.5, "eager_mode": True},
    )
    assert parse_engine_args({"backend": "turbomind", "quant_policy": "8"}) == ("turbomind", {"quant_policy": 8})
    for raw, message in [
        ({"backend": "onnx"}, "backends are pytorch, turbomind"),
        ({"tp": "two"}, "expects <class 'int'>"),
        ({"cache_max_entry": "0.5"}, "did you mean cache_max_entry_count"),
        ({"session_len": "4096"}, "use --max-model-len"),
    ]:
        with pytest.raises(ModelLoadError, match=re.escape(message)):
            parse_engine_args(raw)
    with pytest.raises(ModelLoadError, match="pass --dtype bfloat16"):
        create_engine("lmdeploy", EngineConfig(model=tiny_qwen2, served_model_name="x", dtype="float32"))
    engine = create_engine(
        "lmdeploy", EngineConfig(model=tiny_qwen2, served_model_name="x", dtype="bfloat16", max_model_len=1024)
    )
    config = engine.backend_config()
    assert (config.dtype, config.session_len, config.max_batch_size) == ("bfloat16", 1024, 8)


@needs_lmdeploy
def test_lmdeploy_image_items_match_lmdeploys_own_preprocessing(tiny_qwen2_vl: Path) -> None:
    """LMDeploy's Qwen2-VL preprocessing of the same image gives the same pixels, grid and token count."""
    from lmdeploy.vl.model.qwen2 import Qwen2VLModel
    from PIL import Image

    from omniserve.engines.lmdeploy_engine import image_items
    from omniserve.media.loader import MediaItem
    from omniserve.templates.render import PromptRenderer

    image = Image.new("RGB", (120, 64), (0, 90, 200))
    renderer = PromptRenderer.from_pretrained(tiny_qwen2_vl)
    prompt = renderer.render_chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}], [MediaItem("image", image)]
    )
    theirs_model = Qwen2VLModel(str(tiny_qwen2_vl))
    theirs_model.build_preprocessor()
    messages = theirs_model.preprocess([{"role": "user", "content": [{"type": "image", "data": image}]}])
    (theirs,) = messages[-1]["content"]
    (ours,) = image_items(prompt.token_ids, prompt.mm_inputs, theirs_model.image_token_id)
    assert (ours["image_grid_thw"] == theirs["image_grid_thw"]).all()
    assert ours["image_tokens"] == int(theirs["image_tokens"])
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() < 1e-5


# ---------------------------------------------------------------- constrained decoding on SGLang and LMDeploy

CONSTRAINTS = [
    StructuredOutput.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}, "response_format"),
    StructuredOutput("json_object"),
    StructuredOutput("regex", "[a-c]{2}"),
    StructuredOutput.choice(["yes", "no"], "guided_choice"),
    StructuredOutput("grammar", 'root ::= "a" | "b"'),
    StructuredOutput.structural_tag(
        {"type": "structural_tag", "format": {"type": "const_string", "value": "<tool_call>"}}, "tools"
    ),
]


def _xgrammar_compiler(tiny_qwen2: Path) -> object:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(str(tiny_qwen2))))


@needs_sglang
@pytest.mark.parametrize("spec", CONSTRAINTS, ids=lambda s: s.kind)
def test_sglang_takes_each_constraint_in_its_own_fields(spec: StructuredOutput, tiny_qwen2: Path) -> None:
    """SGLang's ``SamplingParams`` accepts the fields, and each compiles the way its xgrammar backend compiles it."""
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams

    from omniserve.engines.sglang_engine import to_sglang_sampling

    theirs = SGLangSamplingParams(**to_sglang_sampling(SamplingParams(max_tokens=4, structured=spec)))
    compiler: Any = _xgrammar_compiler(tiny_qwen2)
    if theirs.json_schema is not None:
        compiler.compile_json_schema(theirs.json_schema)
    elif theirs.regex is not None:
        compiler.compile_regex(theirs.regex)
    else:
        assert theirs.structural_tag is not None
        compiler.compile_structural_tag(theirs.structural_tag)


@needs_lmdeploy
@pytest.mark.parametrize("spec", CONSTRAINTS, ids=lambda s: s.kind)
def test_lmdeploy_compiles_each_constraint_as_its_response_format(spec: StructuredOutput, tiny_qwen2: Path) -> None:
    """LMDeploy's own ``compile_response_format`` (what its PyTorch engine calls) reads the mapped format."""
    from lmdeploy._guided_decoding import compile_response_format
    from lmdeploy.pytorch.messages import SamplingParam

    from omniserve.engines.lmdeploy_engine import to_generation_config

    config = to_generation_config(SamplingParams(max_tokens=4, structured=spec))
    assert SamplingParam.from_gen_config(config).response_format is not None
    compile_response_format(_xgrammar_compiler(tiny_qwen2), config.response_format)
