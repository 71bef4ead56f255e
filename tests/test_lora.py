"""Multi-LoRA serving (omniserve/lora): adapters checked, resident by LRU, applied per batch row.

The adapters are made here with PEFT (random, non-zero LoRA weights, saved as ``omniserve train --lora
--no-merge-lora`` saves them), so each visibly changes the output. The engine-level tests compare a
mixed batch with each adapter merged alone (float32). The gateway tests run a real server with the
openai client; until the transformers engine applies ``per_row`` itself, its LoRA hooks are given by
``TransformersLora``-free recorders (the engine's ``stream`` scripted as in ``scripted_engine``) and the
tests of generated output through the server are skipped ("needs engine wiring").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from omniserve.engines.base import ChoiceDelta, GenerationRequest
from omniserve.errors import InvalidRequest
from omniserve.lora.adapter import LoraAdapter, LoraBase, read_adapter
from tests.conftest import RunningServer, free_port, wait_until

#: the vision tower's linear layers and its merger (the projector into the language model)
VISUAL_TARGETS = r"visual\.(blocks\.\d+\.(attn\.(q|k|v|proj)|mlp\.(gate|up|down)_proj)|merger\.mlp\.(0|2))"
LM_TARGETS = r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


# ---------------------------------------------------------------- adapters made here


def make_adapter(base: Path, out: Path, *, seed: int, targets: str | list[str] = LM_TARGETS, rank: int = 4) -> Path:
    """A PEFT adapter over ``base``'s generating module with random (non-zero) A and B, saved as training does."""
    if out.exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model

    from omniserve.models.loading import generating_module, load_checkpoint

    module = generating_module(load_checkpoint(base).model)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    get_peft_model(module, config).save_pretrained(str(out))
    return out


def merged(base: Path, adapter: Path | None, *, merge: bool = True) -> Any:
    """The base with ``adapter`` merged into its weights (the reference an adapter served alone must match).

    ``merge=False``: PEFT's own single-adapter model, unmerged (where activations are quantized, merging
    changes the answer: the LoRA path sees the activations unquantized)."""
    from peft import PeftModel

    from omniserve.models.loading import generating_module, load_checkpoint

    module = generating_module(load_checkpoint(base).model).eval()
    if adapter is None:
        return module
    peft_model = PeftModel.from_pretrained(module, str(adapter)).eval()
    return peft_model.merge_and_unload().eval() if merge else peft_model


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def qwen2_adapters(tiny_qwen2: Path, lora_dir: Path) -> tuple[Path, Path]:
    return make_adapter(tiny_qwen2, lora_dir / "qa", seed=1), make_adapter(tiny_qwen2, lora_dir / "qb", seed=2)


@pytest.fixture(scope="module")
def qwen2_base(tiny_qwen2: Path) -> LoraBase:
    return LoraBase.from_checkpoint(tiny_qwen2, max_lora_rank=16)


def _adapter(name: str, path: Path, int_id: int, base: LoraBase) -> LoraAdapter:
    return read_adapter(name, path, int_id, base)


# ---------------------------------------------------------------- C: the transformers side, no server


def _logits(module: Any, ids: Any, **media: Any) -> Any:
    import torch

    with torch.inference_mode():
        return module(input_ids=ids, **media).logits.float()


@pytest.mark.parametrize("kind", ["qwen2", "omni"])
def test_mixed_batch_rows_match_each_adapter_merged_alone(
    kind: str, tiny_qwen2: Path, tiny_omni: Path, lora_dir: Path
) -> None:
    """Rows [a, base, b] in one forward pass equal a merged, the base, b merged, each run alone."""
    import torch

    from omniserve.lora.peft_batch import TransformersLora, per_row
    from omniserve.models.loading import load_checkpoint

    base = tiny_qwen2 if kind == "qwen2" else tiny_omni
    a = make_adapter(base, lora_dir / f"{kind}-a", seed=11)
    b = make_adapter(base, lora_dir / f"{kind}-b", seed=12)
    described = LoraBase.from_checkpoint(base, max_lora_rank=16)
    model = load_checkpoint(base).model.eval()
    lora = TransformersLora(model)
    lora.load(_adapter("a", a, 1, described))
    lora.load(_adapter("org/b.v2", b, 2, described))  # a served name no module key could hold
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]] * 3)
    with per_row(model, ["a", None, "org/b.v2"]):
        mixed = _logits(lora._module, ids)
    alone = [_logits(merged(base, path), ids[:1])[0] for path in (a, None, b)]
    for row, expected in enumerate(alone):
        torch.testing.assert_close(mixed[row], expected, atol=1e-4, rtol=1e-4)
    assert (alone[0] - alone[1]).abs().max() > 1e-2  # the adapters do change the answer
    assert (alone[2] - alone[0]).abs().max() > 1e-2
    # outside per_row the model is the base; after an unload the other adapter still applies
    torch.testing.assert_close(_logits(lora._module, ids[:1])[0], alone[1])
    lora.unload("a")
    with per_row(model, [None, "org/b.v2", None]):
        again = _logits(lora._module, ids)
    torch.testing.assert_close(again[1], alone[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again[0], alone[1])
    with pytest.raises(KeyError), per_row(model, ["a"]):
        pass


def _image_prompt(model_path: Path) -> tuple[Any, dict[str, Any]]:
    import torch
    from PIL import Image

    from omniserve.media.loader import MediaItem
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(model_path)
    image = Image.new("RGB", (56, 56), (200, 30, 0))
    content = [{"type": "image"}, {"type": "text", "text": "what is it?"}]
    prompt = renderer.render_chat([{"role": "user", "content": content}], [MediaItem("image", image)])
    media = {k: (v.float() if v.is_floating_point() else v) for k, v in prompt.mm_inputs.items() if torch.is_tensor(v)}
    return torch.tensor([prompt.token_ids]), media


def test_tower_adapter_changes_the_image_prompt_only(tiny_omni: Path, lora_dir: Path) -> None:
    """An adapter on the vision tower alone: the image prompt's logits move (as merged), a text prompt's do not."""
    import torch

    from omniserve.lora.peft_batch import TransformersLora, per_row
    from omniserve.models.loading import load_checkpoint

    path = make_adapter(tiny_omni, lora_dir / "omni-visual", seed=21, targets=VISUAL_TARGETS)
    adapter = _adapter("seeing", path, 7, LoraBase.from_checkpoint(tiny_omni, max_lora_rank=16))
    assert adapter.tower_modules == adapter.target_modules and adapter.tower_modules
    model = load_checkpoint(tiny_omni).model.eval()
    lora = TransformersLora(model)
    lora.load(adapter)
    ids, media = _image_prompt(tiny_omni)
    base = _logits(lora._module, ids, **media)
    with per_row(model, ["seeing"]):
        tuned = _logits(lora._module, ids, **media)
    expected = _logits(merged(tiny_omni, path), ids, **media)
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(tuned, expected, atol=1e-4, rtol=1e-4)
    text = torch.tensor([[3, 14, 15, 92]])
    with per_row(model, ["seeing"]):
        torch.testing.assert_close(_logits(lora._module, text), _logits(lora._module, text))
    # a tower cannot tell batch rows apart: a batch mixing adapters must not encode media
    with pytest.raises(RuntimeError, match="one request at a time"), per_row(model, ["seeing", None]):
        _logits(lora._module, ids.expand(2, -1), **media)


@pytest.mark.parametrize("method", ["fp8", "gptq"])  # awq writes the same W4A16 layout as gptq
def test_adapter_over_a_quantized_base(
    tiny_qwen2: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory, method: str
) -> None:
    """A checkpoint from `omniserve quantize` (FP8, or GPTQ W4A16; dequantized at load) takes the adapter trained on
    its original: the adapter's row is PEFT's single-adapter answer on that checkpoint, the base row its own."""
    import torch

    from omniserve.lora.peft_batch import TransformersLora, per_row
    from omniserve.models.loading import load_checkpoint
    from omniserve.quantize.options import QuantizeOptions
    from omniserve.quantize.run import quantize

    pytest.importorskip("llmcompressor")
    out = tmp_path_factory.mktemp("quantized") / method
    folder = quantize(QuantizeOptions(model=tiny_qwen2, method=method, output=out)).output
    path = make_adapter(tiny_qwen2, lora_dir / f"for-{method}", seed=31)
    adapter = _adapter("q", path, 3, LoraBase.from_checkpoint(folder, max_lora_rank=16))
    model = load_checkpoint(folder).model.eval()
    lora = TransformersLora(model)
    lora.load(adapter)
    ids = torch.tensor([[3, 14, 15, 92, 65], [3, 14, 15, 92, 65]])
    with per_row(model, ["q", None]):
        mixed = _logits(lora._module, ids)
    # FP8_DYNAMIC quantizes activations too: the reference is PEFT's own unmerged adapter alone (for both)
    alone = merged(folder, path, merge=False)
    torch.testing.assert_close(mixed[0], _logits(alone, ids[:1])[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1], _logits(merged(folder, None), ids[:1])[0], atol=1e-4, rtol=1e-4)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2


# ---------------------------------------------------------------- bad adapters: each refused, naming its cause


def _variant(source: Path, out: Path, change: str, tiny_omni: Path) -> Path:
    """A copy of ``source`` broken in one way."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    weights = out / "adapter_model.safetensors"
    config = out / "adapter_config.json"
    if change == "no config":
        config.unlink()
    elif change == "malformed config":
        config.write_text("{not json")
    elif change == "no weights":
        weights.unlink()
    elif change == "unreadable weights":
        weights.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": garbage')
    elif change in ("unknown module", "hidden size"):
        import torch

        tensors = load_file(str(weights))
        if change == "unknown module":
            tensors = {k.replace("layers.0.", "layers.7."): v for k, v in tensors.items()}
        else:  # trained on a base with another hidden size: q_proj takes 99 inputs there
            key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
            tensors[key] = torch.zeros(tensors[key].shape[0], 99)
        save_file(tensors, str(weights))
    elif change == "architecture":
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = str(tiny_omni)
        config.write_text(json.dumps(data))
    return out


BAD = {
    "no config": "no adapter_config.json",
    "malformed config": "adapter_config.json is not readable JSON",
    "no weights": "no adapter_model.safetensors",
    "unreadable weights": "adapter_model.safetensors is not a readable safetensors file",
    "unknown module": "modules the base model does not have: model.layers.7.",
    "hidden size": "takes|99->",
    "architecture": "Qwen2_5OmniForConditionalGeneration base",
}


@pytest.mark.parametrize("change", sorted(BAD))
def test_bad_adapter_is_refused_naming_the_cause(
    change: str, qwen2_adapters: tuple[Path, Path], qwen2_base: LoraBase, tiny_omni: Path, tmp_path: Path
) -> None:
    broken = _variant(qwen2_adapters[0], tmp_path / "broken", change, tiny_omni)
    with pytest.raises(InvalidRequest) as refused:
        read_adapter("broken", broken, 1, qwen2_base)
    message = refused.value.message
    if change == "hidden size":
        assert "hidden size 99 in the adapter, 128 in the base" in message, message
    elif change == "architecture":
        assert "Qwen2_5OmniForConditionalGeneration base" in message and "serves a Qwen2ForCausalLM" in message
    else:
        assert BAD[change] in message, message
    assert "broken" in message


def test_rank_above_the_limit_is_refused(qwen2_adapters: tuple[Path, Path], tiny_qwen2: Path) -> None:
    strict = LoraBase.from_checkpoint(tiny_qwen2, max_lora_rank=2)
    with pytest.raises(InvalidRequest, match=r"rank 4, above this server's limit of 2 \(--max-lora-rank\)"):
        read_adapter("big", qwen2_adapters[0], 1, strict)


def test_adapter_description(qwen2_adapters: tuple[Path, Path], qwen2_base: LoraBase) -> None:
    adapter = read_adapter("a", qwen2_adapters[0], 5, qwen2_base)
    assert adapter.rank == 4 and adapter.int_id == 5 and adapter.tower_modules == ()
    assert "model.layers.0.self_attn.q_proj" in adapter.target_modules
    assert len(adapter.target_modules) == 14  # 2 layers x (q, k, v, o, gate, up, down)


# ---------------------------------------------------------------- options


def test_lora_file_formats_and_flags(tmp_path: Path) -> None:
    from omniserve.config import DeployOptions, ServerConfig
    from omniserve.errors import ModelLoadError
    from omniserve.flags import OptionError, parse_options
    from omniserve.lora.serving import configured_adapters

    lines = tmp_path / "loras.txt"
    lines.write_text("# adapters\na = one\n\nb=/abs/two\n")
    as_yaml = tmp_path / "loras.yaml"
    as_yaml.write_text("- {name: a, path: one}\n- name: c\n  path: three\n")
    as_json = tmp_path / "loras.json"
    as_json.write_text('{"a": "one"}')
    assert configured_adapters(ServerConfig(lora_file=lines)) == {"a": tmp_path / "one", "b": Path("/abs/two")}
    assert configured_adapters(ServerConfig(lora_file=as_yaml)) == {"a": tmp_path / "one", "c": tmp_path / "three"}
    flag_wins = ServerConfig(lora_file=as_json, lora={"a": Path("/x")})
    assert configured_adapters(flag_wins) == {"a": Path("/x")}
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: a}\n")
    with pytest.raises(ModelLoadError, match="lacks a name or path"):
        configured_adapters(ServerConfig(lora_file=bad))
    options = parse_options(DeployOptions, {"lora": ["a=/p/a", "b=/p/b"], "max_loras": 2, "max_lora_rank": 8})
    assert options.server.lora == {"a": Path("/p/a"), "b": Path("/p/b")}
    assert (options.engine_options.max_loras, options.engine_options.max_lora_rank) == (2, 8)
    with pytest.raises(OptionError, match="--allow-runtime-lora needs --lora-root"):
        parse_options(DeployOptions, {"allow_runtime_lora": True})


# ---------------------------------------------------------------- D: the gateway, a real server


class Hooks:
    """The engine's LoRA hooks, recorded (the transformers engine's own come with its wiring)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def install(self, engine: Any) -> None:
        engine.check_adapter = lambda adapter: None

        async def load(adapter: LoraAdapter) -> None:
            self.calls.append(("load", adapter.name))

        async def unload(name: str) -> None:
            self.calls.append(("unload", name))

        engine.load_adapter, engine.unload_adapter = load, unload


class Script:
    """The engine's ``stream`` replaced: each reply names the adapter the request carried."""

    def __init__(self) -> None:
        self.seen: list[GenerationRequest] = []
        self.hold: dict[str, threading.Event] = {}  # adapter name -> released when set

    def install(self, engine: Any) -> None:
        async def stream(request: GenerationRequest, native: Any) -> AsyncIterator[ChoiceDelta]:
            self.seen.append(request)
            name = request.adapter.name if request.adapter is not None else "base"
            yield ChoiceDelta(index=0, text=f"served by {name}", token_ids=[1])
            gate = self.hold.get(name)
            while gate is not None and not gate.is_set():
                await asyncio.sleep(0.01)
            yield ChoiceDelta(index=0, finish_reason="stop")

        engine.stream = stream


def start_lora_server(model: Path, *, server: dict[str, Any], engine: dict[str, Any] | None = None) -> RunningServer:
    """``conftest.start_server`` with the engine's LoRA hooks recorded and its stream scripted before it starts."""
    import uvicorn

    from omniserve.config import EngineConfig, ServerConfig
    from omniserve.engines.registry import create_engine
    from omniserve.server.app import build_app

    engine_config = EngineConfig(model=model, served_model_name="tiny", **(engine or {}))
    port = free_port()
    eng = create_engine("transformers", engine_config)
    eng.hooks, eng.script = Hooks(), Script()
    eng.hooks.install(eng)
    eng.script.install(eng)
    app = build_app(eng, engine_config, ServerConfig(host="127.0.0.1", port=port, **server))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))

    def run() -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when the app fails to start: the test reads why
            uv.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server did not start: {getattr(app.state, 'start_failure', None)}")
        time.sleep(0.05)
    return RunningServer(f"http://127.0.0.1:{port}", uv, thread, eng, app, "tiny")


@pytest.fixture(scope="module")
def lora_server(tiny_qwen2: Path, qwen2_adapters: tuple[Path, Path], lora_dir: Path) -> Iterator[RunningServer]:
    a, b = qwen2_adapters
    srv = start_lora_server(
        tiny_qwen2,
        server={
            "api_keys": ("key",),
            "lora": {"a": a, "b": b},
            "allow_runtime_lora": True,
            "lora_root": lora_dir,
            "lora_admin_key": "admin",
        },
        engine={"max_loras": 1},
    )
    yield srv
    srv.stop()


def _say(client: Any, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert reply.model  # answered
    return reply.choices[0].message.content


def test_models_lists_the_base_and_each_adapter(lora_server: RunningServer, qwen2_adapters: tuple[Path, Path]) -> None:
    client = lora_server.client("key")
    cards = {card.id: card for card in client.models.list().data}
    assert list(cards)[:3] == ["tiny", "a", "b"]
    assert cards["a"].parent == "tiny" and cards["a"].root == str(qwen2_adapters[0])
    assert cards["tiny"].parent is None
    assert client.models.retrieve("b").root == str(qwen2_adapters[1])
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_each_request_is_served_with_its_adapter_and_lru_keeps_one(lora_server: RunningServer) -> None:
    """--max-loras 1: asking for a, b, a, base alternates residency; every request carries its own adapter."""
    client, hooks = lora_server.client("key"), lora_server.engine.hooks
    hooks.calls.clear()
    assert _say(client, "b") == "served by b"
    assert _say(client, "a") == "served by a"
    assert _say(client, "a") == "served by a"
    assert _say(client, "tiny") == "served by base"
    assert hooks.calls == [("unload", "a"), ("load", "b"), ("unload", "b"), ("load", "a")]
    text = client.completions.create(model="b", prompt="hi", max_tokens=4).choices[0].text
    assert text == "served by b" and lora_server.engine.script.seen[-1].adapter.name == "b"
    with pytest.raises(openai.NotFoundError, match="serves 'tiny', 'a', 'b'"):
        _say(client, "c-not-loaded")


def test_runtime_load_unload_with_the_admin_key(lora_server: RunningServer, qwen2_adapters: tuple[Path, Path]) -> None:
    """Loaded under the root, served by name, unloaded refused (409) while a stream holds it, then gone (404)."""
    import shutil

    root = lora_server.app.state.ctx.server.lora_root
    if not (root / "runtime-c").exists():
        shutil.copytree(qwen2_adapters[1], root / "runtime-c")
    url, admin = lora_server.base_url + "/v1", {"Authorization": "Bearer admin"}
    load = {"lora_name": "c", "lora_path": "runtime-c"}  # relative to --lora-root
    refused = httpx.post(f"{url}/load_lora_adapter", json=load, headers={"Authorization": "Bearer key"})
    assert refused.status_code == 401 and "--lora-admin-key" in refused.json()["error"]["message"]
    loaded = httpx.post(f"{url}/load_lora_adapter", json=load, headers=admin)
    assert loaded.status_code == 200, loaded.text
    assert "Success" in loaded.text
    again = httpx.post(f"{url}/load_lora_adapter", json=load, headers=admin)
    assert again.status_code == 400 and again.json()["error"]["code"] == "lora_already_loaded"
    client = lora_server.client("key")
    assert "c" in [card.id for card in client.models.list().data]
    gate = lora_server.engine.script.hold["c"] = threading.Event()
    try:
        stream = client.chat.completions.create(
            model="c", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        chunks = iter(stream)
        first = next(chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content)
        assert first.choices[0].delta.content == "served by c"
        busy = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "c"}, headers=admin)
        assert busy.status_code == 409 and "refuses rather than waits" in busy.json()["error"]["message"]
    finally:
        gate.set()
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"  # it ended normally
    unloaded = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "c"}, headers=admin)
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError):
        _say(client, "c")
    gone = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "c"}, headers=admin)
    assert gone.status_code == 404


def test_a_request_waits_while_every_resident_adapter_is_in_use(lora_server: RunningServer) -> None:
    """--max-loras 1 with a held by a stream: a request for b waits (listed as waiting), then runs once a ends."""
    from concurrent.futures import ThreadPoolExecutor

    client, script = lora_server.client("key"), lora_server.engine.script
    _say(client, "a")  # a resident
    gate = script.hold["a"] = threading.Event()

    def info() -> str:
        text = httpx.get(lora_server.base_url + "/metrics").text
        return next(line for line in text.splitlines() if line.startswith("omniserve_lora_requests_info{"))

    try:
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(_say, client, "a")
            wait_until(lambda: 'running_lora_adapters="a"' in info())
            waiting = pool.submit(_say, client, "b")
            wait_until(lambda: 'waiting_lora_adapters="b"' in info())
            assert not waiting.done()
            gate.set()
            assert held.result(timeout=30) == "served by a"
            assert waiting.result(timeout=30) == "served by b"
    finally:
        gate.set()
        del script.hold["a"]
    assert lora_server.engine.hooks.calls[-2:] == [("unload", "a"), ("load", "b")]


@pytest.mark.parametrize("path", ["/etc", "../outside", "escape"])
def test_runtime_paths_outside_the_root_are_refused(lora_server: RunningServer, path: str, tmp_path: Path) -> None:
    root = lora_server.app.state.ctx.server.lora_root
    link = root / "escape"
    if not link.exists():
        link.symlink_to(tmp_path)  # inside the root by name, outside once resolved
    answer = httpx.post(
        lora_server.base_url + "/v1/load_lora_adapter",
        json={"lora_name": "x", "lora_path": path},
        headers={"Authorization": "Bearer admin"},
    )
    assert answer.status_code == 403, answer.text
    assert "--lora-root" in answer.json()["error"]["message"]


def test_runtime_load_of_a_bad_adapter_is_a_400(lora_server: RunningServer, tiny_omni: Path) -> None:
    root = lora_server.app.state.ctx.server.lora_root
    broken = root / "runtime-broken"
    if not broken.exists():
        _variant(root / "qa", broken, "unknown module", tiny_omni)
    answer = httpx.post(
        lora_server.base_url + "/v1/load_lora_adapter",
        json={"lora_name": "x", "lora_path": str(broken)},
        headers={"Authorization": "Bearer admin"},
    )
    assert answer.status_code == 400 and "model.layers.7." in answer.json()["error"]["message"]
    assert _say(lora_server.client("key"), "a") == "served by a"  # the others still served


def test_metrics_carry_the_adapter_label(lora_server: RunningServer) -> None:
    client = lora_server.client("key")
    _say(client, "a")
    _say(client, "tiny")
    with pytest.raises(openai.NotFoundError):
        _say(client, "unknown-adapter")
    text = httpx.get(lora_server.base_url + "/metrics").text
    assert 'omniserve_prompt_tokens_total{adapter="a"}' in text
    assert 'omniserve_prompt_tokens_total{adapter="tiny"}' in text
    assert 'omniserve_request_latency_seconds_count{adapter="a",endpoint="chat"}' in text
    assert "unknown-adapter" not in text  # only served names become labels
    info = [line for line in text.splitlines() if line.startswith("omniserve_lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="1"' in info[0] and 'running_lora_adapters=""' in info[0]


def test_runtime_loading_is_off_by_default(tiny_qwen2: Path) -> None:
    srv = start_lora_server(tiny_qwen2, server={})
    try:
        answer = httpx.post(
            srv.base_url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, timeout=30
        )
        assert answer.status_code == 403 and "--allow-runtime-lora" in answer.json()["error"]["message"]
        assert [card.id for card in srv.client().models.list().data] == ["tiny"]
        assert "omniserve_lora_requests_info" not in httpx.get(srv.base_url + "/metrics").text
    finally:
        srv.stop()


def test_a_bad_adapter_at_start_up_stops_the_server(tiny_qwen2: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match=r"--lora x=.*empty: LoRA adapter 'x'.*no adapter_config.json"):
        start_lora_server(tiny_qwen2, server={"lora": {"x": tmp_path / "empty"}})


# ---------------------------------------------------------------- through the engine (after its wiring)


def test_mixed_adapters_through_the_server_match_each_merged(
    tiny_qwen2: Path, qwen2_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    """Concurrent greedy requests for a, b and the base on one server: each as that adapter merged, served alone."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import start_server

    a, b = qwen2_adapters
    expected = {}
    for name, path in (("a", a), ("b", b), ("tiny", None)):
        folder = tmp_path / f"merged-{name}"
        merged_model = merged(tiny_qwen2, path)
        merged_model.save_pretrained(str(folder))
        for item in tiny_qwen2.iterdir():
            if item.is_file() and not item.name.endswith((".safetensors", "config.json")):
                (folder / item.name).write_bytes(item.read_bytes())
        alone = start_server(folder, name="tiny", engine={"dtype": "float32"})
        try:
            expected[name] = (
                alone.client()
                .completions.create(model="tiny", prompt="hello there", max_tokens=8, temperature=0)
                .choices[0]
                .text
            )
        finally:
            alone.stop()
    srv = start_server(tiny_qwen2, name="tiny", engine={"dtype": "float32"}, server={"lora": {"a": a, "b": b}})
    try:
        names = ["a", "b", "tiny"] * 4
        with ThreadPoolExecutor(len(names)) as pool:
            texts = list(
                pool.map(
                    lambda m: (
                        srv.client()
                        .completions.create(model=m, prompt="hello there", max_tokens=8, temperature=0)
                        .choices[0]
                        .text
                    ),
                    names,
                )
            )
        assert texts == [expected[name] for name in names]
        assert len(set(expected.values())) == 3
        # the reply names what the request asked for, the adapter or the base (as vLLM answers)
        client = srv.client()
        assert client.completions.create(model="a", prompt="hi", max_tokens=1).model == "a"
        chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert chat.model == "b"
        assert client.responses.create(model="a", input="hi", max_output_tokens=1).model == "a"
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=1).model == "tiny"
    finally:
        srv.stop()


def test_tower_adapter_through_the_server(tiny_omni: Path, lora_dir: Path) -> None:
    """A vision-tower adapter served by name changes the answer to an image, not to text."""
    from tests.conftest import start_server
    from tests.media_factory import png_bytes

    path = make_adapter(tiny_omni, lora_dir / "omni-visual", seed=21, targets=VISUAL_TARGETS)
    srv = start_server(tiny_omni, name="tiny", engine={"dtype": "float32"}, server={"lora": {"seeing": path}})
    image_url = "data:image/png;base64," + base64.b64encode(png_bytes(56, 56)).decode()
    try:
        client = srv.client()

        def ask(model: str, image: bool) -> str:
            content: list[dict[str, Any]] = [{"type": "text", "text": "what is it?"}]
            if image:
                content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
            )
            return reply.choices[0].message.content

        assert ask("seeing", True) != ask("tiny", True)
        assert ask("seeing", False) == ask("tiny", False)
    finally:
        srv.stop()


def test_eval_lora_option_serves_the_adapter_beside_the_base(tmp_path: Path) -> None:
    """`omniserve eval --model BASE --lora NAME=PATH`: the started server gets the adapter, the run asks for NAME."""
    from pydantic import ValidationError

    from omniserve.eval.target import TargetOptions

    options = TargetOptions(model=tmp_path, lora={"tuned": tmp_path / "adapter"}, deploy_args=["--lora=x=/x"])
    assert options.server is not None
    assert options.server.server.lora == {"x": Path("/x"), "tuned": tmp_path / "adapter"}
    with pytest.raises(ValidationError, match="one adapter per run"):
        TargetOptions(model=tmp_path, lora={"a": tmp_path, "b": tmp_path})
    with pytest.raises(ValidationError, match="apply to --model only"):
        TargetOptions(url="http://127.0.0.1:1/v1", lora={"a": tmp_path})


def test_runtime_load_and_unload_under_load_fail_no_request(
    tiny_qwen2: Path, qwen2_adapters: tuple[Path, Path], lora_dir: Path
) -> None:
    """Requests on a and the base keep flowing while c is loaded, used and unloaded over and over (--max-loras 2)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import start_server

    a, b = qwen2_adapters
    srv = start_server(
        tiny_qwen2,
        name="tiny",
        engine={"dtype": "float32", "max_loras": 2},
        server={"lora": {"a": a}, "allow_runtime_lora": True, "lora_root": lora_dir},
    )
    try:
        client = srv.client()
        alone = {m: _say(client, m) for m in ("a", "tiny")}
        stop = threading.Event()

        def traffic(model: str) -> list[str]:
            answers = []
            while not stop.is_set():
                answers.append(_say(client, model))
            return answers

        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(traffic, m) for m in ("a", "tiny", "a", "tiny")]
            url = srv.base_url + "/v1"
            for _ in range(5):
                loaded = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "c", "lora_path": str(b)})
                assert loaded.status_code == 200, loaded.text
                assert _say(client, "c") != alone["a"]
                while (gone := httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "c"})).status_code == 409:
                    time.sleep(0.01)
                assert gone.status_code == 200, gone.text
            stop.set()
            answers = [f.result() for f in running]
        assert all(text == alone["a"] for text in answers[0] + answers[2])
        assert all(text == alone["tiny"] for text in answers[1] + answers[3])
    finally:
        srv.stop()
