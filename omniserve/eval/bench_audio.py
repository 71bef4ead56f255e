"""``omniserve bench --audio-output chat|speech``: load on spoken replies, measured with the official client.

EvalScope's perf tool times text tokens only, so audio output has its own small loop: ``--requests``
requests per ``--concurrency`` level, ``concurrency`` of them in flight at once, each timed from its send to
its first audio byte (time to first audio byte, TTFAB) and to its end. ``chat`` streams chat completions with
``modalities: ["text", "audio"]`` in pcm16 (audio arrives while the text is written); ``speech`` streams
``/v1/audio/speech`` bodies in pcm. The real-time factor is seconds of audio per second of wall time: per
request (its audio over its latency) and for the level (all audio over the level's duration: above 1, the
server speaks faster than a listener hears, across all its clients).
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from omniserve.atomic_files import write_text_atomic
from omniserve.eval.bench import ReportRecord, save_chart
from omniserve.eval.errors import BenchError
from omniserve.eval.html_report import embedded_png, page, table
from omniserve.eval.target import Target

#: pcm16 from both endpoints is mono 16-bit little-endian at the model's rate (24 kHz for Qwen2.5-Omni, as OpenAI's).
BYTES_PER_SAMPLE = 2
#: What the requests ask: chat questions for spoken replies, sentences for /v1/audio/speech.
_QUESTIONS = (
    "Tell me a short story about a river.",
    "Describe a red car near a tree.",
    "What does the music in a quiet room sound like?",
    "Explain how a boat crosses the sea.",
)
_SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river.",
    "A red car stands under the green tree beside the road.",
    "Every morning the birds sing before the sun comes up.",
    "The ship sails north across the cold and quiet sea.",
)


class AudioStats(BaseModel):
    mean: float | None = None
    p50: float | None = None
    p99: float | None = None


class AudioLevelResult(BaseModel):
    concurrency: int
    requests: int
    succeeded: int
    failed: int
    seconds: float = Field(description="Wall time of the level.")
    audio_seconds: float = Field(description="Audio received in the level, all requests together.")
    realtime_factor: float = Field(description="audio_seconds / seconds: the level's real-time factor.")
    ttfab_ms: AudioStats = Field(description="Time to first audio byte, per request.")
    request_rtf: AudioStats = Field(description="Per request: its audio seconds over its latency.")
    latency_s: AudioStats
    errors: list[str] = Field(default_factory=list, description="The first few failures' messages.")


class AudioBenchReport(ReportRecord):
    levels: list[AudioLevelResult]

    def markdown(self) -> str:
        mode = self.options.get("audio_output")
        what = (
            f"chat audio output, streamed pcm16, {self.options.get('max_tokens')} tokens of text"
            if mode == "chat"
            else "/v1/audio/speech, streamed pcm"
        )
        lines = [
            f"Audio benchmark of {self.target.get('model')} ({what}, voice {self.options.get('voice')})",
            "",
            "| concurrency | ok/failed | TTFAB ms p50/p99 | RTF level | RTF per request p50 | latency s p50/p99 |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.levels:
            lines.append(
                f"| {r.concurrency} | {r.succeeded}/{r.failed} | {_fmt(r.ttfab_ms.p50, 0)}/{_fmt(r.ttfab_ms.p99, 0)} "
                f"| {r.realtime_factor:.2f} | {_fmt(r.request_rtf.p50, 2)} "
                f"| {_fmt(r.latency_s.p50, 2)}/{_fmt(r.latency_s.p99, 2)} |"
            )
        return "\n".join(lines) + "\n"


@dataclass
class _Timing:
    ttfab: float | None  # seconds to the first audio byte; None when no audio came
    latency: float
    audio_bytes: int


def run_audio_bench(options: Any, target: Target, folder: Path) -> AudioBenchReport:
    """Every ``options.concurrency`` level against ``target``; writes bench.json/.md/.png/.html into ``folder``."""
    voice = options.voice or _first_voice(target)
    levels = [
        asyncio.run(_level(options, target, voice, concurrency, options.audio_sample_rate))
        for concurrency in options.concurrency
    ]
    recorded = options.model_dump(mode="json", exclude={"api_key"})
    report = AudioBenchReport(
        target=target.identity, options={**recorded, "voice": voice}, levels=levels, folder=folder
    )
    if not any(level.succeeded for level in levels):
        raise BenchError(f"no audio request succeeded: {'; '.join(levels[0].errors) or 'no requests ran'}")
    write_text_atomic(folder / "bench.json", report.model_dump_json(indent=2) + "\n")
    write_text_atomic(folder / "bench.md", report.markdown())
    _chart(report, folder / "bench.png")
    rows = [
        (
            str(r.concurrency),
            f"{r.succeeded}/{r.failed}",
            _fmt(r.ttfab_ms.p50, 0),
            _fmt(r.ttfab_ms.p99, 0),
            f"{r.realtime_factor:.2f}",
            _fmt(r.latency_s.p50, 2),
        )
        for r in report.levels
    ]
    header = ("concurrency", "ok/failed", "TTFAB p50 ms", "TTFAB p99 ms", "RTF (level)", "latency p50 s")
    sections = [table(header, rows), embedded_png(folder / "bench.png", "TTFAB and real-time factor")]
    write_text_atomic(folder / "bench.html", page(f"omniserve bench (audio): {target.model}", sections))
    return report


def _first_voice(target: Target) -> str:
    """The server's first voice (``GET /v1/audio/voices``), so ``--voice`` is needed only to pick another."""
    import httpx

    try:
        response = httpx.get(
            f"{target.base_url}/audio/voices", headers={"Authorization": f"Bearer {target.api_key}"}, timeout=30
        )
        voices = response.json().get("data") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        voices = None
    if not voices:
        raise BenchError(
            f"{target.base_url} lists no voices (GET /audio/voices): give --voice, or serve a speaking model"
        )
    return str(voices[0])


async def _level(options: Any, target: Target, voice: str, concurrency: int, rate: int) -> AudioLevelResult:
    import openai

    client = openai.AsyncOpenAI(
        base_url=target.base_url, api_key=target.api_key, max_retries=0, timeout=options.request_timeout
    )
    timings: list[_Timing] = []
    errors: list[str] = []
    queue = list(range(options.requests))
    one = _chat if options.audio_output == "chat" else _speech

    async def worker() -> None:
        while queue:
            index = queue.pop()
            try:
                timings.append(await one(client, options, target.model, voice, index))
            except Exception as exc:  # a failed request is counted and reported, the level goes on
                errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    seconds = time.perf_counter() - started
    audio = [t.audio_bytes / BYTES_PER_SAMPLE / rate for t in timings]
    total_audio = sum(audio)
    return AudioLevelResult(
        concurrency=concurrency,
        requests=options.requests,
        succeeded=len(timings),
        failed=len(errors),
        seconds=seconds,
        audio_seconds=total_audio,
        realtime_factor=total_audio / seconds if seconds > 0 else 0.0,
        ttfab_ms=_stats([t.ttfab * 1000 for t in timings if t.ttfab is not None]),
        request_rtf=_stats([a / t.latency for a, t in zip(audio, timings, strict=True) if t.latency > 0]),
        latency_s=_stats([t.latency for t in timings]),
        errors=errors[:5],
    )


async def _chat(client: Any, options: Any, model: str, voice: str, index: int) -> _Timing:
    started = time.perf_counter()
    first: float | None = None
    received = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": _QUESTIONS[index % len(_QUESTIONS)]}],
        max_tokens=options.max_tokens,
        temperature=0.0,
        modalities=["text", "audio"],
        audio={"voice": voice, "format": "pcm16"},
        stream=True,
        extra_body={"ignore_eos": True} if options.ignore_eos else None,
    )
    async for chunk in stream:
        for choice in chunk.choices:
            audio = getattr(choice.delta, "audio", None)
            data = audio.get("data") if isinstance(audio, dict) else getattr(audio, "data", None)
            if data:
                received += len(base64.b64decode(data))
                if first is None:
                    first = time.perf_counter() - started
    return _Timing(first, time.perf_counter() - started, received)


async def _speech(client: Any, options: Any, model: str, voice: str, index: int) -> _Timing:
    started = time.perf_counter()
    first: float | None = None
    received = 0
    async with client.audio.speech.with_streaming_response.create(
        model=model, input=_SENTENCES[index % len(_SENTENCES)], voice=voice, response_format="pcm"
    ) as response:
        async for data in response.iter_bytes():
            if data:
                received += len(data)
                if first is None:
                    first = time.perf_counter() - started
    return _Timing(first, time.perf_counter() - started, received)


def _stats(values: list[float]) -> AudioStats:
    if not values:
        return AudioStats()
    ordered = sorted(values)
    return AudioStats(mean=statistics.fmean(ordered), p50=_percentile(ordered, 0.50), p99=_percentile(ordered, 0.99))


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), on a sorted list."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _chart(report: AudioBenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.concurrency for r in report.levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pick in (("TTFAB p50", lambda r: r.ttfab_ms.p50), ("TTFAB p99", lambda r: r.ttfab_ms.p99)):
        left.plot(xs, [float("nan") if pick(r) is None else pick(r) for r in report.levels], "o-", label=name)
    left.set_ylabel("milliseconds")
    left.set_title("Time to first audio byte")
    left.legend(fontsize=8)
    right.plot(xs, [r.realtime_factor for r in report.levels], "o-", label="level (all requests)")
    right.plot(
        xs, [float("nan") if r.request_rtf.p50 is None else r.request_rtf.p50 for r in report.levels], "s--",
        label="per request p50",
    )  # fmt: skip
    right.set_ylabel("seconds of audio per second")
    right.set_title("Real-time factor")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.set_xlabel("concurrency")
    save_chart(fig, (left, right), xs, f"omniserve bench (audio): {report.target.get('model')}", path)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
