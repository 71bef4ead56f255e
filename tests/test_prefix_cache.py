"""Prefix caching in the transformers engine, on real tiny models in float32, run in-process.

Every scenario compares against the same requests served with ``prefix_cache_tokens=0``: greedy tokens
must be identical and logprobs equal to float noise, while the hit counter shows that KV was reused
(or, for different media and different adapters, that it was not). Eviction is checked on the store
itself and through the engine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from omniserve.config import EngineConfig
from omniserve.engines.base import GenerationRequest
from omniserve.engines.transformers_engine import TransformersEngine
from omniserve.sampling import SamplingParams
from omniserve.templates.render import RenderedPrompt
from tests.test_engine_batching import Output, same_outputs


def _request(name: str, prompt: RenderedPrompt, max_tokens: int = 6, adapter: Any = None) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=True)
    return GenerationRequest(request_id=name, prompt=prompt, sampling=params, adapter=adapter)


def _serve(
    model: Path, prompts: list[RenderedPrompt], *, adapters: list[Any] | None = None, **options: Any
) -> tuple[list[Output], TransformersEngine]:
    """Serve ``prompts`` one after the other (each to its end) on one engine; tokens and logprobs of each."""
    options = {"max_batch_tokens": 32, **options}

    async def scenario() -> tuple[list[Output], TransformersEngine]:
        config = EngineConfig(model=model, served_model_name="tiny", dtype="float32", **options)
        engine = TransformersEngine(config)
        await engine.start()
        try:
            for adapter in {a.name: a for a in adapters or [] if a is not None}.values():
                await engine.load_adapter(adapter)
            outputs = []
            for i, prompt in enumerate(prompts):
                adapter = adapters[i] if adapters else None
                # a copy: the engine lets a prefilled prompt's media go
                fresh = RenderedPrompt(token_ids=list(prompt.token_ids), mm_inputs=dict(prompt.mm_inputs))
                tokens: list[int] = []
                logprobs: list[float] = []
                async for delta in engine.generate(_request(f"r{i}", fresh, adapter=adapter)):
                    tokens.extend(delta.token_ids)
                    logprobs.extend(lp.logprob for lp in delta.logprobs or [])
                outputs.append((tokens, logprobs))
            return outputs, engine
        finally:
            await engine.stop()

    return asyncio.run(scenario())


def _hits(engine: TransformersEngine) -> tuple[int, int]:
    stats = engine.stats()
    assert stats.prefix_cache_queries is not None and stats.prefix_cache_hits is not None
    return stats.prefix_cache_queries, stats.prefix_cache_hits


SYSTEM = [(11 * i) % 190 + 5 for i in range(150)]


def test_a_shared_system_prompt_is_computed_once(tiny_qwen2: Path) -> None:
    """Three prompts behind one 150-token system prompt, then an exact repeat: the later ones reuse its KV
    (token-granular: the partial third block too), the repeat all but its last token; outputs unchanged."""
    from prometheus_client.parser import text_string_to_metric_families

    from omniserve.server.metrics import Metrics

    suffixes = [[3, 4, 5, 6], [7, 8, 9], [40, 41, 42, 43, 44, 45]]
    prompts = [RenderedPrompt(token_ids=SYSTEM + s) for s in suffixes]
    prompts.append(prompts[0])
    expected, plain = _serve(tiny_qwen2, prompts, prefix_cache_tokens=0)
    assert plain.stats().prefix_cache_hits is None  # off: no counter at all
    got, engine = _serve(tiny_qwen2, prompts)
    same_outputs(got, expected)
    queries, hits = _hits(engine)
    assert queries == sum(len(p.token_ids) for p in prompts)
    assert hits == 150 + 150 + len(prompts[0].token_ids) - 1
    scraped = {
        s.name: s.value
        for family in text_string_to_metric_families(Metrics(engine, "tiny").render().decode())
        for s in family.samples
    }
    assert scraped["omniserve_prefix_cache_hits_total"] == hits
    assert scraped["omniserve_prefix_cache_queries_total"] == queries


def test_prompts_arriving_together_still_match_the_uncached_output(tiny_qwen2: Path) -> None:
    """Rows resumed from the cache and rows prefilled from scratch share chunks and decode steps."""

    async def scenario(cache_tokens: int) -> list[list[int]]:
        config = EngineConfig(
            model=tiny_qwen2,
            served_model_name="tiny",
            dtype="float32",
            max_batch_tokens=24,
            max_concurrency=4,
            prefix_cache_tokens=cache_tokens,
        )
        engine = TransformersEngine(config)
        await engine.start()
        try:
            first = RenderedPrompt(token_ids=[*SYSTEM, 1, 2])
            async for _ in engine.generate(_request("warm", first)):
                pass

            async def one(i: int) -> list[int]:
                tokens: list[int] = []
                prompt = RenderedPrompt(token_ids=(SYSTEM if i % 2 else SYSTEM[::-1]) + [i + 20] * (i + 1))
                async for delta in engine.generate(_request(f"r{i}", prompt, max_tokens=5 + i)):
                    tokens.extend(delta.token_ids)
                return tokens

            return list(await asyncio.gather(*(one(i) for i in range(4))))
        finally:
            await engine.stop()

    assert asyncio.run(scenario(8192)) == asyncio.run(scenario(0))


def _image_prompts(model: Path) -> list[RenderedPrompt]:
    from PIL import Image

    from omniserve.media.loader import MediaItem
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(model)
    system = {"role": "system", "content": " ".join(f"rule {i}." for i in range(40))}
    prompts = []
    for colour in ((200, 30, 0), (0, 90, 250)):
        image = Image.new("RGB", (56, 56), colour)
        content = [{"type": "image"}, {"type": "text", "text": "what is it?"}]
        messages = [system, {"role": "user", "content": content}]
        prompts.append(renderer.render_chat(messages, [MediaItem("image", image)]))
    return prompts


def test_different_images_behind_identical_placeholders_never_share(tiny_qwen2_vl: Path) -> None:
    """Images A and B render to the same token ids; served A, B, A, B with the cache, each answer equals
    its uncached one: B does not reuse A's KV, and each repeat reuses its own whole prefix."""
    a, b = _image_prompts(tiny_qwen2_vl)
    assert a.token_ids == b.token_ids and a.mm_inputs["pixel_values"].ne(b.mm_inputs["pixel_values"]).any()
    expected, _ = _serve(tiny_qwen2_vl, [a, b])
    # the test can fail: the two images make different answers
    assert expected[0][1] != pytest.approx(expected[1][1], abs=1e-3)
    got, engine = _serve(tiny_qwen2_vl, [a, b, a, b])
    same_outputs(got, expected + expected)
    _, hits = _hits(engine)
    # A: nothing; B: nothing (a media prompt reuses only a prefix holding its media, prefilled whole otherwise);
    # A and B again: all but the last token, each its own image's KV (the answers above)
    assert hits == 2 * (len(a.token_ids) - 1)


def test_images_prefilled_in_one_pass_each_keep_their_own_prefix(tiny_qwen2_vl: Path) -> None:
    """A and B (identical token ids, different images) admitted together share one media pass; each row's KV is
    stored under its own image, so A and B admitted together again each resume from their own prefix, and
    every answer equals the uncached one. The same image twice in one pass goes through the tower once."""
    from tests.test_engine_batching import serve_together

    a, b = _image_prompts(tiny_qwen2_vl)
    expected, _ = _serve(tiny_qwen2_vl, [a, b], prefix_cache_tokens=0, encoder_cache_items=0)
    got, engine = serve_together(tiny_qwen2_vl, [[a, b], [a, b]], prefix_cache_tokens=8192)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected] * 2
    for (_, logprobs), (_, want) in zip(got, expected * 2, strict=True):
        assert logprobs == pytest.approx(want, abs=1e-4)
    assert engine.media_passes == {2: 1}  # the second time, both resumed as text
    _, hits = _hits(engine)
    assert hits == 2 * (len(a.token_ids) - 1)

    _, engine = serve_together(tiny_qwen2_vl, [[a, a, b]], prefix_cache_tokens=0)
    assert engine.media_passes == {3: 1} and engine._encoders.encoded == 2


def test_the_cache_is_keyed_by_adapter(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same prompt under the base and under an adapter: the adapter's request reuses nothing the base
    computed (its output equals the uncached one), and its own repeat hits."""
    from omniserve.lora.adapter import LoraBase, read_adapter
    from tests.test_lora import make_adapter

    path = make_adapter(tiny_qwen2, tmp_path_factory.mktemp("lora") / "a", seed=1)
    adapter = read_adapter("tuned", path, 1, LoraBase.from_checkpoint(tiny_qwen2, max_lora_rank=16))
    prompt = RenderedPrompt(token_ids=[*SYSTEM, 3, 4])
    adapters = [None, adapter, adapter]
    expected, _ = _serve(tiny_qwen2, [prompt] * 3, adapters=adapters, prefix_cache_tokens=0, enable_lora=True)
    assert expected[0] != expected[1]  # the adapter changes the answer
    got, engine = _serve(tiny_qwen2, [prompt] * 3, adapters=adapters, enable_lora=True)
    same_outputs(got, expected)
    _, hits = _hits(engine)
    assert hits == len(prompt.token_ids) - 1  # only the adapter's own repeat


def test_the_store_stays_within_its_budget_least_recently_used_first() -> None:
    """Blocks of 4 tokens, budget 20: a third 8-token prompt evicts the least recently used leaf block (b's
    second; a was looked up since), parents outlive their children, matching is token-granular and salted."""
    import torch

    from omniserve.engines.prefix_cache import PrefixCache, PrefixKey

    cache = PrefixCache(20, block=4)
    key = PrefixKey()

    def kv(first: int, last: int) -> list[tuple[Any, Any]]:
        values = torch.arange(first, last, dtype=torch.float32).view(1, -1, 1)
        return [(values, values + 100)]

    a, b, c = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 1, 1, 1, 1], [5, 5, 5, 5, 6, 6, 6, 6]
    cache.store(a, key, kv)
    cache.store(b, key, kv)
    assert cache.tokens == 16 and cache.match([*a, 0], key).length == 8
    cache.store(c, key, kv)
    assert cache.tokens == 20
    assert cache.match([*b, 0], key).length == 4  # its leaf went first; its parent block stays
    assert cache.match([*a, 0], key).length == 8 and cache.match([*c, 0], key).length == 8
    assert cache.match(c, key).length == 7  # the last prompt token is always computed
    keys, values = cache.load(cache.match([*c, 7], key))[0]
    assert keys.flatten().tolist() == list(range(8)) and values.flatten().tolist() == [100.0 + i for i in range(8)]
    assert cache.match([5, 5, 5, 5, 6, 6, 9, 9], key).length == 6  # a common start inside the second block
    assert cache.match([*c, 0], PrefixKey(adapter="other")).length == 0
    cache.store([*c, 0], PrefixKey(adapter="other"), kv)
    cache.drop_adapter("other")
    assert cache.match([*c, 0], PrefixKey(adapter="other")).length == 0 and cache.tokens <= 20


def test_engine_eviction_keeps_answers_right(tiny_qwen2: Path) -> None:
    """A budget of 128 tokens and three 150-token system prompts in turn: the store never holds more than
    its budget, and answers stay those of the uncached engine whether a prefix was evicted or not."""
    systems = [SYSTEM, SYSTEM[::-1], [t + 1 for t in SYSTEM]]
    prompts = [RenderedPrompt(token_ids=[*s, 1, 2, 3]) for s in systems * 2]
    expected, _ = _serve(tiny_qwen2, prompts, prefix_cache_tokens=0)
    got, engine = _serve(tiny_qwen2, prompts, prefix_cache_tokens=128)
    same_outputs(got, expected)
    assert engine._prefix.tokens <= 128


def test_a_repeated_image_is_encoded_once(tiny_qwen2_vl: Path) -> None:
    """The same image behind two different questions (so no prefix covers it): the vision tower runs for it
    once (counted by wrapping the real tower), and both answers equal the uncached engine's."""
    from PIL import Image

    from omniserve.media.loader import MediaItem
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(tiny_qwen2_vl)
    image = Image.new("RGB", (56, 56), (10, 200, 60))
    prompts = [
        renderer.render_chat(
            [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}],
            [MediaItem("image", image)],
        )
        for question in ("first look at this", "and now tell me what you see here")
    ]
    expected, _ = _serve(tiny_qwen2_vl, prompts, prefix_cache_tokens=0, encoder_cache_items=0)

    calls: list[int] = []
    got, engine = _serve_counting_tower(tiny_qwen2_vl, prompts, calls)
    same_outputs(got, expected)
    assert len(calls) == 1  # the second prompt's image came from the cache
    assert engine._encoders.hits == 1 and engine._encoders.encoded == 1


def _serve_counting_tower(model: Path, prompts: list[RenderedPrompt], calls: list[int]) -> Any:
    """``_serve``, counting the vision tower's forward passes with a hook on the loaded tower."""
    original_load = TransformersEngine._load

    def load(engine: TransformersEngine) -> Any:
        info = original_load(engine)
        engine._loaded.model.model.visual.register_forward_hook(lambda *_: calls.append(1))
        return info

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TransformersEngine, "_load", load)
        return _serve(model, prompts)
