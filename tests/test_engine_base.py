"""The ``Engine`` template method, on a fake engine that fills in the four hooks.

Every engine (transformers, vLLM, SGLang, LMDeploy, third-party) inherits this flow, so it is
checked once here without a model: everything that refuses a request does so when ``generate`` is
called, before any iteration and before the engine does any work; a stream closed unstarted gives
its queue places back and never reaches the engine; closing a merged stream closes every stream in
it; and the conversions every engine shares (finish reasons, logprobs).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from omniserve.config import EngineConfig
from omniserve.engines.base import ChoiceDelta, Engine, GenerationRequest, ModelInfo, TokenLogprobs, finish_reason
from omniserve.engines.streams import merge_streams
from omniserve.errors import EngineUnavailable, InvalidRequest, QueueFull, UnsupportedParameter
from omniserve.sampling import SamplingParams
from omniserve.templates.render import RenderedPrompt


class FakeEngine(Engine[str]):
    """Answers each choice with two deltas; records which hooks ran."""

    NAME = "fake"
    UNSUPPORTED = ("frequency_penalty",)

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.calls: list[str] = []

    async def launch(self) -> ModelInfo:
        self.calls.append("launch")
        return self.served(64, [2, None, 2, 3])

    def shutdown(self) -> None:
        self.calls.append("shutdown")

    def prepare(self, request: GenerationRequest) -> str:
        self.calls.append("prepare")
        return f"native {request.request_id}"

    async def stream(self, request: GenerationRequest, native: str) -> AsyncIterator[ChoiceDelta]:
        self.calls.append(f"stream {native}")
        try:
            for i in range(request.sampling.n):
                yield ChoiceDelta(i, "a", [5])
            for i in range(request.sampling.n):
                yield ChoiceDelta(i, "b", [6], finish_reason="length")
        finally:
            self.calls.append("closed")


def request(n: int = 1, frequency_penalty: float = 0.0) -> GenerationRequest:
    params = SamplingParams(max_tokens=2, n=n, frequency_penalty=frequency_penalty)
    return GenerationRequest(request_id="r", prompt=RenderedPrompt(token_ids=[1, 2]), sampling=params)


def engine(max_concurrency: int = 2, max_queue: int = 1) -> FakeEngine:
    config = EngineConfig(
        model=Path("fake"), served_model_name="fake-model", max_concurrency=max_concurrency, max_queue=max_queue
    )
    return FakeEngine(config)


def test_lifecycle_readiness_and_model_info() -> None:
    fake = engine()

    async def scenario() -> None:
        assert not fake.is_ready()
        with pytest.raises(EngineUnavailable):
            fake.generate(request())  # not started: a 503, before any iteration
        await fake.start()
        assert fake.is_ready()
        assert fake.model_info == ModelInfo("fake-model", "fake", 64, (2, 3))  # eos deduplicated, None dropped
        await fake.stop()
        assert not fake.is_ready() and fake.calls == ["launch", "shutdown"]

    asyncio.run(scenario())


def test_every_refusal_comes_from_generate_itself_before_the_engine_works() -> None:
    fake = engine(max_concurrency=2, max_queue=1)

    async def scenario() -> None:
        await fake.start()
        with pytest.raises(InvalidRequest) as too_many:
            fake.generate(request(n=3))  # can never fit the batch: 400, not a 429 retried forever
        assert too_many.value.param == "n" and too_many.value.status_code == 400
        assert "n=3" in str(too_many.value) and "fake engine" in str(too_many.value)
        with pytest.raises(UnsupportedParameter) as unsupported:
            fake.generate(request(frequency_penalty=0.5))
        assert unsupported.value.param == "frequency_penalty" and "fake engine" in str(unsupported.value)
        assert fake.calls == ["launch"]  # prepare never ran for requests refused first

        held = fake.generate(request(n=2))
        with pytest.raises(QueueFull):
            fake.generate(request(n=2))  # 2 + 2 sequences > 2 running + 1 waiting
        assert fake.stats().waiting == 2
        assert fake.calls == ["launch", "prepare", "prepare"]  # the refused one was mapped, never streamed
        await held.aclose()  # closed unstarted: places back, the engine never asked
        assert (fake.stats().waiting, fake.stats().running) == (0, 0)
        assert "closed" not in fake.calls and not any(c.startswith("stream") for c in fake.calls)

    asyncio.run(scenario())


def test_a_stream_counts_running_sequences_until_each_finishes() -> None:
    fake = engine(max_concurrency=2, max_queue=0)

    async def scenario() -> None:
        await fake.start()
        stream = fake.generate(request(n=2))
        seen = []
        async for delta in stream:
            seen.append((delta.index, delta.text, fake.stats().waiting, fake.stats().running))
        assert seen == [(0, "a", 1, 1), (1, "a", 0, 2), (0, "b", 0, 1), (1, "b", 0, 0)]
        assert fake.calls[-2:] == ["stream native r", "closed"]

    asyncio.run(scenario())


def test_closing_a_merged_stream_closes_every_stream_in_it() -> None:
    fake = engine(max_concurrency=4, max_queue=0)

    async def scenario() -> None:
        await fake.start()
        streams = [fake.generate(request()) for _ in range(3)]
        merged = merge_streams(streams)
        _, delta = await merged.__anext__()
        assert delta.text == "a"
        await merged.aclose()
        started = sum(c.startswith("stream") for c in fake.calls)
        assert fake.calls.count("closed") == started >= 1  # each stream that started was ended in the engine
        assert (fake.stats().waiting, fake.stats().running) == (0, 0)  # and every admission given back

    asyncio.run(scenario())


def test_finish_reasons_map_the_same_for_every_engine() -> None:
    assert [finish_reason(r) for r in (None, "", "stop", "length", "abort", "repetition", "eos")] == [
        None,
        None,
        "stop",
        "length",
        "abort",
        "stop",
        "stop",
    ]


def test_logprobs_are_decoded_one_token_at_a_time() -> None:
    class Tokenizer:
        def decode(self, ids: list[int]) -> str:
            return "".join(f"<{i}>" for i in ids)

    converted = TokenLogprobs.decoded(Tokenizer(), 7, -0.5, [(7, -0.5), (9, -1.5)])
    assert (converted.token_id, converted.token, converted.logprob) == (7, "<7>", -0.5)
    assert converted.top == ((7, "<7>", -0.5), (9, "<9>", -1.5))


class SilentEngine(FakeEngine):
    """Emits one delta, then nothing until released: an engine wedged inside its native library."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.release = asyncio.Event()

    async def stream(self, request: GenerationRequest, native: str) -> AsyncIterator[ChoiceDelta]:
        yield ChoiceDelta(0, "a", [5])
        await self.release.wait()
        yield ChoiceDelta(0, "b", [6], finish_reason="length")


def test_any_engine_reports_a_stall_from_the_deltas_it_stops_sending() -> None:
    """vLLM, SGLang and LMDeploy do not report their steps: time without a delta, while work is admitted,
    is what ``/health`` and ``omniserve_engine_stalled_seconds`` judge them by."""
    config = EngineConfig(model=Path("fake"), served_model_name="fake-model")
    silent = SilentEngine(config)

    async def scenario() -> None:
        await silent.start()
        await asyncio.sleep(0.3)
        assert silent.stalled_for() == 0.0  # idle for a while is not stalled
        stream = silent.generate(request())
        assert silent.stalled_for() < 0.1  # the clock starts when work arrives
        first = await anext(stream)
        assert first.text == "a"
        waiter = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.4)
        assert silent.stalled_for() >= 0.4
        silent.release.set()
        assert (await waiter).finish_reason == "length"
        assert silent.stalled_for() == 0.0  # done: idle again
        await silent.stop()

    asyncio.run(scenario())


def test_a_loader_letting_out_stop_iteration_fails_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``next()`` on an empty iterator inside model loading raises ``StopIteration``, which asyncio cannot put on a
    future: ``launch`` waited forever (found with a test hook that looked for a module name Qwen3-Omni lacks). Only
    a fake loader can raise it on purpose; the launch must fail within seconds, naming the cause."""
    from omniserve.engines.transformers_engine import TransformersEngine

    def load(_engine: TransformersEngine) -> ModelInfo:
        return next(iter([]))

    monkeypatch.setattr(TransformersEngine, "_load", load)
    engine = TransformersEngine(EngineConfig(model=Path("fake"), served_model_name="fake-model"))
    with pytest.raises(RuntimeError, match="exhausted iterator"):
        asyncio.run(asyncio.wait_for(engine.launch(), timeout=30))
