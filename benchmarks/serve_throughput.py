"""Throughput, TTFT and gateway overhead of `omniserve deploy` on the tiny omni model.

Starts the real CLI in a subprocess (so the load generator does not share its GIL), then for each
concurrency level sends the same number of streamed chat requests and reports requests/s, output
tokens/s, TTFT p50/p99 and the batching speed-up (throughput at the highest concurrency divided
by throughput at concurrency 1, measured in the same run). The gateway's own overhead (time in the
server outside the engine) comes from the Server-Timing header of non-streamed requests.

    python benchmarks/serve_throughput.py [--concurrency 1,4,16] [--requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def payload(model: str, max_tokens: int, image: str | None, stream: bool) -> dict:
    content: list[dict] = [{"type": "text", "text": "Describe a quiet morning by the sea in a few sentences."}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": 1,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def one_streamed(client: httpx.AsyncClient, body: dict) -> Sample:
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
    return Sample(ttft=ttft or float("nan"), latency=time.perf_counter() - start, tokens=tokens)


async def run_level(base: str, model: str, concurrency: int, requests: int, max_tokens: int, image: str | None) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        samples: list[Sample] = []

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                samples.append(await one_streamed(client, payload(model, max_tokens, image, True)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = [s.ttft for s in samples]
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "requests_per_s": len(samples) / elapsed,
        "output_tokens_per_s": sum(s.tokens for s in samples) / elapsed,
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
        "latency_p50_ms": percentile([s.latency for s in samples], 0.5) * 1000,
    }


async def gateway_overhead(base: str, model: str, concurrency: int, requests: int, image: str | None) -> dict:
    """Non-streamed requests; the server reports its own time outside the engine in Server-Timing."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        overheads: list[float] = []
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                resp = await client.post("/v1/chat/completions", json=payload(model, 16, image, False))
                resp.raise_for_status()
                timing = dict(part.strip().split(";dur=") for part in resp.headers["server-timing"].split(","))
                overheads.append(float(timing["gateway"]))

        await asyncio.gather(*(one() for _ in range(requests)))
    return {
        "concurrency": concurrency,
        "with_image": bool(image),
        "gateway_overhead_p50_ms": percentile(overheads, 0.5),
        "gateway_overhead_p99_ms": percentile(overheads, 0.99),
    }


def start_server(model_dir: Path | None, port: int, max_concurrency: int, cache: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "omniserve.cli",
        "deploy",
        "--port",
        str(port),
        "--max-concurrency",
        str(max_concurrency),
        "--max-queue",
        "256",
        "--served-model-name",
        "bench",
        "--log-level",
        "warning",
    ]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)} if model_dir is None else None
    return wait_healthy(subprocess.Popen(cmd, env=env), port, timeout=300)


def wait_healthy(proc: subprocess.Popen, port: int, *, timeout: float) -> subprocess.Popen:
    """``proc`` once its /health answers 200; exits the benchmark if it dies or never gets there."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited during start-up: {' '.join(map(str, proc.args))}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not become healthy")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: built-in tiny omni)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image", action="store_true", help="attach a 64x64 image to every request")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    port = free_port()
    image = tiny_png() if args.image else None
    with tempfile.TemporaryDirectory() as cache:
        proc = start_server(args.model, port, max(levels), Path(cache))
        base = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_level(base, "bench", max(levels), max(levels), 8, image))  # warm-up
            results = [asyncio.run(run_level(base, "bench", c, args.requests, args.max_tokens, image)) for c in levels]
            overhead = [
                asyncio.run(gateway_overhead(base, "bench", c, args.requests, image))
                for c in dict.fromkeys((levels[0], levels[-1]))
            ]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    print(f"{'conc':>5} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>10} {'TTFT p99':>10} {'lat p50':>9}")
    for r in results:
        print(
            f"{r['concurrency']:>5} {r['requests_per_s']:>8.2f} {r['output_tokens_per_s']:>9.1f} "
            f"{r['ttft_p50_ms']:>8.1f}ms {r['ttft_p99_ms']:>8.1f}ms {r['latency_p50_ms']:>7.0f}ms"
        )
    speedup = results[-1]["output_tokens_per_s"] / results[0]["output_tokens_per_s"]
    print(f"batching speed-up (tok/s at c={levels[-1]} / c={levels[0]}): {speedup:.2f}x")
    for o in overhead:
        print(
            f"gateway overhead at c={o['concurrency']}: p50 {o['gateway_overhead_p50_ms']:.2f} ms, "
            f"p99 {o['gateway_overhead_p99_ms']:.2f} ms"
        )
    summary = {
        "levels": results,
        "speedup": speedup,
        "gateway_overhead": overhead,
        "median_tok_s": statistics.median(r["output_tokens_per_s"] for r in results),
    }
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
