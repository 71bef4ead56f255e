"""The transformers engine's batching: the preallocated KV cache and chunked prefill, on real models.

The cache test drives ``hf_model``'s passes directly (float32): sequences joining and leaving one
``SlotCache`` in a scrambled order, with a capacity small enough that the window is shifted and the
buffers grow, must produce the greedy tokens each produces alone. The chunking test runs the engine
in-process: a long prompt arriving while a stream decodes is prefilled in chunks, and the stream
gets a token between chunks (counted in the order the engine delivers events, not by the clock).
The media tests run the engine on tiny Qwen2.5-Omni and Qwen2-VL checkpoints: image prompts of
different sizes, a video and a text prompt admitted together are prefilled in one media pass (or as
many as ``--max-batch-tokens`` allows) and answer exactly what each answers alone.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from omniserve.config import EngineConfig
from omniserve.engines.base import GenerationRequest
from omniserve.engines.transformers_engine import TransformersEngine
from omniserve.models.families import FAMILIES
from omniserve.sampling import SamplingParams
from omniserve.templates.render import RenderedPrompt


@pytest.fixture(scope="module")
def loaded(tiny_qwen2: Path) -> Any:
    from omniserve.engines.hf_model import load_model

    return load_model(tiny_qwen2, dtype="float32")


def _alone(loaded: Any, prompt: list[int], steps: int) -> list[int]:
    from omniserve.engines.hf_model import decode_step, new_cache, prefill_chunk

    staging, cache = new_cache(loaded, 1), new_cache(loaded, 1)
    staging.add_rows(1)
    logits = prefill_chunk(loaded, staging, [prompt], [0], ["alone"])
    cache.append_copies(staging, 0, 0, len(prompt), 1)
    tokens = [int(logits[0].argmax())]
    for i in range(steps - 1):
        logits = decode_step(loaded, cache, [tokens[-1]], [len(prompt) + i], ["alone"])
        tokens.append(int(logits[0].argmax()))
    return tokens


def test_rows_joining_and_leaving_in_any_order_decode_as_alone(loaded: Any) -> None:
    """Prompts of different lengths join a running cache at different steps (a longer one than every
    running row shifts the window right), prefilled two at a time in chunks of 5 tokens; rows leave
    from the middle (the last row moves into their slot). Capacity 8 forces shifts and growth."""
    from omniserve.engines.hf_model import decode_step, new_cache, prefill_chunk

    prompts = {
        "a": [5, 17, 42, 8, 99, 3],
        "b": [7, 7, 21],
        "c": list(range(30, 52)),  # longer than anything running when it joins
        "d": [11, 64, 2, 9],
        "e": [120, 4],
    }
    steps = {"a": 14, "b": 5, "c": 9, "d": 12, "e": 3}
    joins = {0: ["a", "b"], 2: ["c"], 3: ["d"], 6: ["e"]}  # decode step at which each is prefilled
    expected = {name: _alone(loaded, prompts[name], steps[name]) for name in prompts}

    cache = new_cache(loaded, 4, capacity=8)
    rows: list[str] = []  # cache row i is rows[i]
    out: dict[str, list[int]] = {}
    largest = cache.capacity
    for step in range(40):
        joining = joins.get(step, [])
        if joining:  # prefill together, in chunks, on a staging cache
            staging = new_cache(loaded, len(joining), capacity=4)
            staging.add_rows(len(joining))
            done = dict.fromkeys(joining, 0)
            while any(done[n] < len(prompts[n]) for n in joining):
                pieces = [prompts[n][done[n] : done[n] + 5] for n in joining]
                if any(not p for p in pieces):
                    raise AssertionError("every row in a chunk has tokens left (rows finish before the end)")
                logits = prefill_chunk(loaded, staging, pieces, [done[n] for n in joining], joining)
                for n, piece in zip(joining, pieces, strict=True):
                    done[n] += len(piece)
                finished = [i for i, n in enumerate(joining) if done[n] == len(prompts[n])]
                for i in reversed(finished):
                    name = joining[i]
                    start = staging.starts[i]
                    cache.append_copies(staging, i, start, start + len(prompts[name]), 1)
                    rows.append(name)
                    out[name] = [int(logits[i].argmax())]
                    staging.remove_row(i)
                    joining[i] = joining[-1]
                    joining.pop()
        if not rows:
            if step > max(joins):
                break
            continue
        positions = [len(prompts[n]) + len(out[n]) - 1 for n in rows]
        logits = decode_step(loaded, cache, [out[n][-1] for n in rows], positions, rows)
        largest = max(largest, cache.capacity)
        for i, name in enumerate(rows):
            out[name].append(int(logits[i].argmax()))
        for i in reversed(range(len(rows))):  # leave as soon as done, whatever the row
            if len(out[rows[i]]) >= steps[rows[i]]:
                cache.remove_row(i)
                rows[i] = rows[-1]
                rows.pop()
    assert out == expected
    assert largest > 8  # the buffers grew, so that path ran too
    # empty again: the grown buffers are given back
    assert cache.rows == 0 and cache.tokens() == 0 and cache.capacity == 8
    assert not any(layer.is_initialized for layer in cache.layers)


def _request(name: str, tokens: list[int], max_tokens: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(request_id=name, prompt=RenderedPrompt(token_ids=tokens), sampling=params)


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny_qwen2: Path) -> None:
    """Budget 8 tokens a step: a 120-token prompt takes ~18 chunks; the running stream gets a token in
    each of those steps. Without chunking (the previous engine) it got none until the prefill ended."""

    async def scenario() -> tuple[int, int, list[int], list[int]]:
        config = EngineConfig(
            model=tiny_qwen2, served_model_name="tiny", max_concurrency=4, max_batch_tokens=8, dtype="float32"
        )
        engine = TransformersEngine(config)
        await engine.start()
        try:
            running = engine.generate(_request("running", [5, 6, 7], 200))
            got = [0]
            running_ids: list[int] = []

            async def consume() -> None:
                async for delta in running:
                    got[0] += 1
                    running_ids.extend(delta.token_ids)

            task = asyncio.create_task(consume())
            while got[0] < 3:  # it is decoding
                await asyncio.sleep(0.01)
            long_prompt = [(7 * i) % 200 + 3 for i in range(120)]
            passes_before, got_before = engine.prefill_passes, got[0]
            long_stream = engine.generate(_request("long", long_prompt, 1))
            long_ids: list[int] = []
            async for delta in long_stream:
                if not long_ids:
                    got_during = got[0] - got_before
                long_ids.extend(delta.token_ids)
            chunks = engine.prefill_passes - passes_before
            await task
            return chunks, got_during, running_ids, long_ids
        finally:
            await engine.stop()

    chunks, got_during, running_ids, long_ids = asyncio.run(scenario())
    assert chunks >= 120 // 8  # each step's prefill share is under 8 tokens
    # one decode step per chunk: the stream's tokens are delivered before the long prompt's first one
    # (the last chunk's step may deliver both at once)
    assert got_during >= chunks - 1
    assert len(running_ids) == 200 and len(long_ids) == 1


def test_cache_bookkeeping_keeps_every_row_intact_through_joins_leaves_shifts_and_growth() -> None:
    """Random joins (with ``n`` copies, prompts longer than the running rows), leaves and decode
    writes on a 4-column cache: every row's columns hold exactly its own values, in order."""
    import random

    import torch

    from omniserve.engines.kv_cache import SlotCache

    def write(cache: SlotCache, values: list[float]) -> None:
        q = len(values) // cache.rows
        cache.reserve(q)
        states = torch.tensor(values).view(cache.rows, 1, q, 1)
        cache.layers[0].update(states, states)
        cache.advance(q)

    rng = random.Random(0)
    cache = SlotCache(1, 4, capacity=4)
    rows: list[list[float]] = []  # what row i must hold
    counter = 0.0
    largest = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.3 and cache.rows < 4:
            prompt = [counter + j for j in range(rng.randint(1, 12))]
            counter += len(prompt)
            source = SlotCache(1, 1, capacity=2)
            source.add_rows(1)
            write(source, prompt)
            copies = rng.randint(1, 4 - cache.rows)
            cache.append_copies(source, 0, 0, len(prompt), copies)
            rows.extend(list(prompt) for _ in range(copies))
        elif op < 0.5 and cache.rows:
            row = rng.randrange(cache.rows)
            cache.remove_row(row)
            rows[row] = rows[-1]
            rows.pop()
        elif cache.rows:
            values = [counter + j for j in range(cache.rows)]
            counter += cache.rows
            write(cache, values)
            for held, value in zip(rows, values, strict=True):
                held.append(value)
        largest = max(largest, cache.capacity)
        if cache.rows:
            keys = cache.layers[0].keys
            assert [keys[i, 0, cache.starts[i] : cache.end, 0].tolist() for i in range(cache.rows)] == rows
            assert int(cache.attention_mask(0).sum()) == cache.tokens() == sum(map(len, rows))
    assert largest > 4


Output = tuple[list[int], list[float]]


def _media_prompts(model: Path) -> list[RenderedPrompt]:
    """Three images (two sizes, different pixels), two images in one prompt, two videos, and a text prompt."""
    import numpy as np
    from PIL import Image

    from omniserve.media.loader import MediaItem
    from omniserve.media.video import DecodedVideo
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(model)
    rng = np.random.default_rng(0)

    def image(size: int) -> MediaItem:
        return MediaItem("image", Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)))

    def user(items: list[MediaItem], text: str) -> RenderedPrompt:
        content = [*({"type": item.kind} for item in items), {"type": "text", "text": text}]
        return renderer.render_chat([{"role": "user", "content": content}], items)

    def video(count: int, size: int) -> MediaItem:
        frames = rng.integers(0, 255, (count, size, size, 3), dtype=np.uint8)
        return MediaItem("video", DecodedVideo(frames, 2.0, tuple(0.25 + 0.5 * i for i in range(count)), count / 2))

    return [
        user([image(56)], "what is it?"),
        user([image(84)], "describe this picture in a few words"),
        user([video(4, 56)], "what moves?"),
        user([image(56)], "and this one?"),
        user([image(84), image(56)], "compare them"),
        user([video(6, 84)], "and in this longer one?"),
        user([], "and now something without media"),
    ]


def serve_together(
    model: Path, groups: list[list[RenderedPrompt]], *, adapters: list[Any] | None = None, **options: Any
) -> tuple[list[Output], TransformersEngine]:
    """Each group's prompts handed to the engine in one call (admitted together), group after group; the
    greedy tokens and logprobs of every prompt, and the engine (stopped: its counters stay readable).
    ``adapters``: the LoRA adapter (or None) of each prompt, in the order of all groups' prompts."""

    async def one(stream: Any) -> Output:
        tokens: list[int] = []
        logprobs: list[float] = []
        async for delta in stream:
            tokens.extend(delta.token_ids)
            logprobs.extend(lp.logprob for lp in delta.logprobs or [])
        return tokens, logprobs

    async def scenario() -> tuple[list[Output], TransformersEngine]:
        config = EngineConfig(model=model, served_model_name="tiny", dtype="float32", max_concurrency=8, **options)
        engine = TransformersEngine(config)
        await engine.start()
        try:
            for adapter in {a.name: a for a in adapters or [] if a is not None}.values():
                await engine.load_adapter(adapter)
            outputs: list[Output] = []
            for group in groups:
                params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)
                requests = [
                    GenerationRequest(
                        request_id=f"r{len(outputs) + i}",
                        # a copy: the engine lets a prefilled prompt's media go
                        prompt=RenderedPrompt(token_ids=list(p.token_ids), mm_inputs=dict(p.mm_inputs)),
                        sampling=params,
                        adapter=adapters[len(outputs) + i] if adapters else None,
                    )
                    for i, p in enumerate(group)
                ]
                # every request queued before the worker looks (it needs the GIL to wake): admitted together
                interval = sys.getswitchinterval()
                sys.setswitchinterval(5.0)
                try:
                    streams = engine.generate_all(requests)
                finally:
                    sys.setswitchinterval(interval)
                outputs.extend(await asyncio.gather(*(one(s) for s in streams)))
            return outputs, engine
        finally:
            await engine.stop()

    return asyncio.run(scenario())


def same_outputs(got: list[Output], expected: list[Output]) -> None:
    """Each request's greedy tokens equal, and its logprobs within 1e-4 (also used by tests/test_prefix_cache.py)."""
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, expected, strict=True):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)


@pytest.mark.parametrize("checkpoint", ["tiny_omni", "tiny_qwen2_vl"])
def test_media_prompts_admitted_together_are_prefilled_together_and_answer_as_alone(
    checkpoint: str, request: pytest.FixtureRequest
) -> None:
    """Six media prompts (images of two sizes, two images in one prompt, two videos) and a text prompt admitted
    together: the four image prompts go through one media pass and the two videos through another (images
    and videos never share a pass: ``hf_model.media_layout``), each row with its own multimodal-rope offset,
    and every answer equals the one its prompt gets alone. With a budget of 64 tokens a step the media are
    split into more passes that fit it (a pass costs rows x its longest prompt), with the same answers."""
    model = request.getfixturevalue(checkpoint)
    prompts = _media_prompts(model)
    media = [p for p in prompts if p.mm_inputs]
    alone, engine = serve_together(model, [[p] for p in prompts])
    assert engine.media_passes == {1: len(media)}
    # the test can fail: every prompt makes a different answer
    assert len({tuple(tokens) for tokens, _ in alone}) == len(prompts)

    together, engine = serve_together(model, [prompts])
    same_outputs(together, alone)
    assert engine.media_passes == {4: 1, 2: 1}

    budget = 64
    split, engine = serve_together(model, [prompts], max_batch_tokens=budget)
    same_outputs(split, alone)
    passes = engine.media_passes
    assert sum(rows * count for rows, count in passes.items()) == len(media)
    assert 1 < max(passes) < len(media)  # joined, but within the budget


@pytest.mark.parametrize("checkpoint", ["tiny_omni"])
def test_audio_prompts_admitted_together_are_prefilled_together_and_answer_as_alone(
    checkpoint: str, request: pytest.FixtureRequest
) -> None:
    """Clips of different lengths (one prompt with two), and a clip with an image: their Whisper-style features are
    padded to the longest clip and masked (``hf_model._PADDED_ITEM_KEYS``), so the audio prompts share one pass
    and the audio+image prompt another; every answer equals the one its prompt gets alone."""
    import numpy as np
    from PIL import Image

    from omniserve.media.audio import DecodedAudio
    from omniserve.media.loader import MediaItem
    from omniserve.templates.render import PromptRenderer

    model = request.getfixturevalue(checkpoint)
    renderer = PromptRenderer.from_pretrained(model)
    rng = np.random.default_rng(3)

    def clip(seconds: float) -> MediaItem:
        samples = (0.3 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32)
        return MediaItem("audio", DecodedAudio(samples, 16_000))

    def user(items: list[MediaItem], text: str) -> RenderedPrompt:
        content = [*({"type": item.kind} for item in items), {"type": "text", "text": text}]
        return renderer.render_chat([{"role": "user", "content": content}], items)

    picture = MediaItem("image", Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)))
    prompts = [
        user([clip(0.6)], "what is it?"),
        user([clip(1.7)], "and this longer one?"),
        user([clip(1.1), clip(0.4)], "compare the sounds"),
        user([picture, clip(0.9)], "the picture and the sound"),
        user([], "no media"),
    ]
    alone, engine = serve_together(model, [[p] for p in prompts])
    assert engine.media_passes == {1: 4}
    assert len({tuple(tokens) for tokens, _ in alone}) == len(prompts)

    together, engine = serve_together(model, [prompts])
    same_outputs(together, alone)
    assert engine.media_passes == {3: 1, 1: 1}


def test_media_prompts_under_different_adapters_are_prefilled_apart(
    tiny_omni: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A vision-tower adapter's image prompts and the base's, admitted together: a tower runs one adapter per pass
    (``lora.peft_batch``), so each adapter's prompts get a pass of their own; answers equal each prompt alone."""
    from omniserve.lora.adapter import LoraBase, read_adapter
    from tests.test_lora import VISUAL_TARGETS, make_adapter

    path = make_adapter(tiny_omni, tmp_path_factory.mktemp("lora") / "seeing", seed=21, targets=VISUAL_TARGETS)
    seeing = read_adapter("seeing", path, 1, LoraBase.from_checkpoint(tiny_omni, max_lora_rank=16))
    images = [_media_prompts(tiny_omni)[i] for i in (0, 1, 3)]
    prompts = images * 2
    adapters = [None, None, None, seeing, seeing, seeing]
    alone, _ = serve_together(tiny_omni, [[p] for p in prompts], adapters=adapters, enable_lora=True)
    assert [tokens for tokens, _ in alone[:3]] != [tokens for tokens, _ in alone[3:]]  # the adapter matters
    mixed = [prompts[i] for i in (0, 3, 1, 4, 2, 5)]
    got, engine = serve_together(
        tiny_omni, [mixed], adapters=[adapters[i] for i in (0, 3, 1, 4, 2, 5)], enable_lora=True
    )
    same_outputs(got, [alone[i] for i in (0, 3, 1, 4, 2, 5)])
    assert engine.media_passes == {3: 2}


IMAGE_FAMILIES = [f.name for f in FAMILIES if "image" in f.modalities and f.write is not None]


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_media_prompts_join_only_where_one_pass_equals_each_alone(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """For every family with images: prompts whose processor outputs ``media_layout`` says join (three images of
    two sizes; two videos of different lengths) give in one pass the logits and rope offsets each gives alone.
    A family whose outputs never join is prefilled alone, which needs no check (skipped, with its keys)."""
    import numpy as np
    from PIL import Image

    from omniserve.engines import hf_model
    from omniserve.media.loader import MediaItem
    from omniserve.media.video import DecodedVideo
    from omniserve.models.families import get
    from omniserve.templates.render import PromptRenderer
    from tests.test_train_support import published_template

    family = get(name)
    model = family.build(tmp_path_factory.mktemp("family") / name, published_template(family.template or ""))
    renderer = PromptRenderer.from_pretrained(model)
    rng = np.random.default_rng(0)

    def user(item: MediaItem, text: str) -> RenderedPrompt:
        return renderer.render_chat(
            [{"role": "user", "content": [{"type": item.kind}, {"type": "text", "text": text}]}], [item]
        )

    prompts = [
        user(MediaItem("image", Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))), text)
        for size, text in ((56, "what is it?"), (84, "describe this picture in words"), (56, "and this?"))
    ]
    if "video" in family.modalities:
        for count, size in ((4, 56), (6, 84)):
            frames = rng.integers(0, 255, (count, size, size, 3), dtype=np.uint8)
            times = tuple(0.25 + 0.5 * i for i in range(count))
            prompts.append(user(MediaItem("video", DecodedVideo(frames, 2.0, times, count / 2)), "what moves?"))
    layouts = [hf_model.media_layout(p.mm_inputs) for p in prompts]
    groups: list[list[int]] = []
    for i, layout in enumerate(layouts):
        home = next((g for g in groups if hf_model.layouts_join(layouts[g[0]], layout)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        pytest.skip(f"{family.title}'s media never join ({sorted(prompts[0].mm_inputs)}): prefilled alone")

    loaded = hf_model.load_model(model, dtype="float32")
    for group in groups:
        alone = []
        for i in group:
            cache = hf_model.new_cache(loaded, 1)
            alone.append(hf_model.prefill_alone(loaded, cache, prompts[i].token_ids, prompts[i].mm_inputs, [None]))
        cache = hf_model.new_cache(loaded, len(group))
        logits, deltas = hf_model.prefill_media(
            loaded,
            cache,
            [prompts[i].token_ids for i in group],
            [prompts[i].mm_inputs for i in group],
            [None] * len(group),
        )
        assert deltas == (None if alone[0][1] is None else [delta for _, delta in alone])
        for row, (want, _) in enumerate(alone):
            assert int(logits[row].argmax()) == int(want.argmax())
            assert float((logits[row] - want).abs().max()) < 1e-4
