"""The transformers engine's batching: scaling with streams, TTFT, and a long prompt arriving mid-decode.

Serves the medium checkpoint (``dtype_threads.py``'s: a random-weight Qwen2-VL with Qwen2-0.5B's text
shape cut to 12 layers) in bfloat16 with ``omniserve deploy``, then

1. sends the same streamed chat requests at 1, 4 and 16 streams and prints output tokens/s, TTFT
   p50/p99 and the scaling ratio against one stream measured in the same run, per shape (``--shapes``:
   ``text``, and ``image``: one 64x64 image per request, a different one every request of the run, so
   each is prefilled as a media prompt: no prefix- or encoder-cache hit); with
   ``--baseline-tree DIR`` (another checkout of omniserve, e.g. ``git worktree add DIR <commit>``)
   a server started from DIR runs beside it, the two take turns level by level for ``--rounds``
   rounds (so a load change on the machine hits both), and the new/old ratios of the best round
   of each are printed;
2. starts a few streams decoding, sends one long prompt while they run, and prints the longest
   gap between two tokens of the running streams against their median gap, once with
   ``--max-batch-tokens`` at ``--long-budget`` (chunked) and once so large that the prompt is
   prefilled in one piece (the baseline).

Machines are noisy (and this one is shared): compare the ratios printed, not absolute figures.

    python benchmarks/engine_batching.py [--size medium|tiny] [--concurrency 1,4,16] [--requests 32]
        [--shapes text,image] [--baseline-tree DIR] [--long-budget 256] [--skip-long]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dtype_threads import build
from serve_throughput import Sample, free_port, one_streamed, payload, percentile, run_level, wait_healthy

#: what ``--max-batch-tokens`` is set to for the unchunked baseline: more than any prompt here
NO_CHUNKING = 1_000_000
#: numbers the images of the ``image`` shape: never the same image twice in a run
_IMAGES = itertools.count()


def distinct_png() -> str:
    """A 64x64 PNG data URL whose colour no other request of the run has."""
    from PIL import Image

    i = next(_IMAGES)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (i % 256, (i // 256) % 256, 128)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def run_image_level(base: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """``serve_throughput.run_level`` with a new image in every request (the media prefill path each time)."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        left = list(range(requests))
        samples: list[Sample] = []

        async def worker() -> None:
            while left:
                left.pop()
                samples.append(await one_streamed(client, payload("bench", max_tokens, distinct_png(), True)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = [s.ttft for s in samples]
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "output_tokens_per_s": sum(s.tokens for s in samples) / elapsed,
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
    }


def run_shape(base: str, shape: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    if shape == "image":
        return asyncio.run(run_image_level(base, concurrency, requests, max_tokens))
    return asyncio.run(run_level(base, "bench", concurrency, requests, max_tokens, None))


def serve(
    model: Path, dtype: str, port: int, max_concurrency: int, max_batch_tokens: int | None, tree: Path | None = None
) -> subprocess.Popen:
    """``omniserve deploy`` from this checkout, or from ``tree`` (its ``omniserve`` package comes first)."""
    cmd = [
        sys.executable, "-m", "omniserve.cli", "deploy", "--model", str(model), "--dtype", dtype,
        "--port", str(port), "--max-concurrency", str(max_concurrency), "--max-queue", "256",
        "--served-model-name", "bench", "--log-level", "warning",
    ]  # fmt: skip
    if max_batch_tokens is not None:
        cmd += ["--max-batch-tokens", str(max_batch_tokens)]
    return wait_healthy(subprocess.Popen(cmd, cwd=tree), port, timeout=600)


async def _stream_times(client: httpx.AsyncClient, body: dict) -> list[float]:
    """The arrival time of each content chunk of one streamed chat request."""
    times: list[float] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    times.append(time.perf_counter())
    return times


async def long_prompt_case(base: str, streams: int, prompt_words: int) -> dict:
    """Running streams' token gaps while a ``prompt_words``-word prompt is prefilled."""

    def body(text: str, max_tokens: int) -> dict:
        return {
            "model": "bench",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }

    long_text = " ".join(f"word{i % 97}" for i in range(prompt_words))
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        running = [asyncio.create_task(_stream_times(client, body("Tell me a story.", 96))) for _ in range(streams)]
        await asyncio.sleep(1.0)  # the streams are decoding
        start = time.perf_counter()
        long_times = await _stream_times(client, body(long_text, 4))
        runs = await asyncio.gather(*running)
    gaps = [b - a for times in runs for a, b in itertools.pairwise(times)]
    return {
        "long_prompt_ttft_s": long_times[0] - start if long_times else float("nan"),
        "max_gap_ms": max(gaps) * 1000,
        "median_gap_ms": statistics.median(gaps) * 1000,
        "p99_gap_ms": percentile(gaps, 0.99) * 1000,
    }


def levels_on(
    model: Path, args: argparse.Namespace, shape: str, levels: list[int], trees: list[Path | None]
) -> list[list[dict]]:
    """Per tree, per level of ``shape``: the best (highest tok/s) of ``--rounds`` runs, the trees taking turns."""
    procs, bases = [], []
    try:
        for tree in trees:
            port = free_port()
            procs.append(serve(model, args.dtype, port, max(levels), None if tree else args.max_batch_tokens, tree))
            bases.append(f"http://127.0.0.1:{port}")
        for base in bases:
            run_shape(base, shape, max(levels), max(levels), 8)  # warm-up
        best: list[list[dict]] = [[{} for _ in levels] for _ in trees]
        for _ in range(args.rounds):
            for i, c in enumerate(levels):
                for t, base in enumerate(bases):
                    r = run_shape(base, shape, c, args.requests, args.max_tokens)
                    if r["output_tokens_per_s"] > best[t][i].get("output_tokens_per_s", 0):
                        best[t][i] = r
        return best
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


def long_case_on(model: Path, args: argparse.Namespace, budget: int) -> dict:
    port = free_port()
    proc = serve(model, args.dtype, port, args.long_streams + 1, budget)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_level(base, "bench", 2, 2, 4, None))  # warm-up
        return asyncio.run(long_prompt_case(base, args.long_streams, args.long_prompt_words))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "medium"], default="medium")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint instead of a built one")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--shapes", default="text,image", help="text, image (a new 64x64 image per request)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="for the levels (default: the engine's)")
    parser.add_argument("--baseline-tree", type=Path, default=None, help="an older checkout to compare the levels")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each level (the best is kept)")
    parser.add_argument("--long-budget", type=int, default=256, help="--max-batch-tokens of the chunked long case")
    parser.add_argument("--long-prompt-words", type=int, default=600)
    parser.add_argument("--long-streams", type=int, default=4)
    parser.add_argument("--skip-long", action="store_true", help="only the throughput levels")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build(args.size, Path(tmp))
        trees = [None, args.baseline_tree.resolve()] if args.baseline_tree else [None]
        by_shape = {}
        for shape in args.shapes.split(","):
            by_shape[shape] = [*levels_on(model, args, shape, levels, trees), None][:2]
        chunked = whole = None
        if not args.skip_long:
            chunked = long_case_on(model, args, args.long_budget)
            whole = long_case_on(model, args, NO_CHUNKING)

    print(f"\n{args.size} checkpoint, {args.dtype}")
    for shape, (results, old) in by_shape.items():
        for name, runs in (("this checkout", results), (f"baseline {args.baseline_tree}", old)):
            if runs is None:
                continue
            one = runs[0]["output_tokens_per_s"]
            print(f"{shape}, {name}:\n{'streams':>7} {'tok/s':>9} {'x 1 stream':>10} {'TTFT p50':>10} {'TTFT p99':>10}")
            for r in runs:
                print(
                    f"{r['concurrency']:>7} {r['output_tokens_per_s']:>9.1f} {r['output_tokens_per_s'] / one:>10.2f} "
                    f"{r['ttft_p50_ms']:>8.0f}ms {r['ttft_p99_ms']:>8.0f}ms"
                )
        if old is not None:
            for new_r, old_r in zip(results, old, strict=True):
                print(
                    f"{shape}, {new_r['concurrency']:>3} streams, this / baseline: tok/s "
                    f"{new_r['output_tokens_per_s'] / old_r['output_tokens_per_s']:.2f}, "
                    f"TTFT p99 {new_r['ttft_p99_ms'] / old_r['ttft_p99_ms']:.2f}"
                )
    for name, case in ((f"chunked (--max-batch-tokens {args.long_budget})", chunked), ("whole (baseline)", whole)):
        if case is not None:
            print(
                f"long prompt ({args.long_prompt_words} words) during {args.long_streams} streams, {name}: "
                f"running streams' max gap {case['max_gap_ms']:.0f} ms (median {case['median_gap_ms']:.0f} ms, "
                f"p99 {case['p99_gap_ms']:.0f} ms), long prompt TTFT {case['long_prompt_ttft_s']:.2f} s"
            )
    if chunked and whole:
        print(f"max gap, chunked / whole: {chunked['max_gap_ms'] / whole['max_gap_ms']:.2f}")


if __name__ == "__main__":
    main()
