"""The transformers engine's batching: the preallocated KV cache and chunked prefill, on real models.

The cache test drives ``hf_model``'s passes directly (float32): sequences joining and leaving one
``SlotCache`` in a scrambled order, with a capacity small enough that the window is shifted and the
buffers grow, must produce the greedy tokens each produces alone. The chunking test runs the engine
in-process: a long prompt arriving while a stream decodes is prefilled in chunks, and the stream
gets a token between chunks (counted in the order the engine delivers events, not by the clock).
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
