"""float32 against bfloat16 (and `--dtype auto`'s choice) for the transformers engine, one server at a time.

Serves the same checkpoint with `omniserve deploy --dtype float32` and then `--dtype bfloat16`, sends
the same streamed chat requests at each concurrency level, and prints output tokens/s and TTFT p99 of
each with the bfloat16/float32 ratio measured in the same run (machines are noisy: ratios, not
absolute figures, are what to compare). `--size medium` builds, offline, the checkpoint issue 15
measured: a random-weight Qwen2-VL whose text model has Qwen2-0.5B's shape cut to 12 layers (hidden
896, 14 heads, 2 KV heads, ~180M parameters). It also prints what `--dtype auto` picks on this machine.

    python benchmarks/dtype_threads.py [--size tiny|medium] [--concurrency 1,4,16] [--requests 32]
    python benchmarks/dtype_threads.py --size medium --build-only DIR   # only build it (vllm_vs_omniserve.py)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import free_port, run_level, tiny_png, wait_healthy

#: Qwen2-0.5B's text model shape, cut to 12 layers.
MEDIUM_TEXT = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 12,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}


def build(size: str, folder: Path) -> Path:
    from omniserve.models import build_tiny_omni
    from omniserve.models.tiny import build_tiny_qwen2_vl

    if size == "medium":
        return build_tiny_qwen2_vl(folder / "medium-qwen2-vl", text=MEDIUM_TEXT)
    return build_tiny_omni(folder / "tiny-omni")


def serve(model: Path, dtype: str, port: int, max_concurrency: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "omniserve.cli", "deploy", "--model", str(model), "--dtype", dtype,
        "--port", str(port), "--max-concurrency", str(max_concurrency), "--max-queue", "256",
        "--served-model-name", "bench", "--log-level", "warning",
    ]  # fmt: skip
    return wait_healthy(subprocess.Popen(cmd), port, timeout=600)


def measure(model: Path, dtype: str, levels: list[int], args: argparse.Namespace) -> list[dict]:
    port = free_port()
    proc = serve(model, dtype, port, max(levels))
    base = f"http://127.0.0.1:{port}"
    image = tiny_png() if args.image else None
    try:
        asyncio.run(run_level(base, "bench", max(levels), max(levels), 8, image))  # warm-up
        return [asyncio.run(run_level(base, "bench", c, args.requests, args.max_tokens, image)) for c in levels]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "medium"], default="medium")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint instead of a built one")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image", action="store_true", help="attach a 64x64 image to every request")
    parser.add_argument("--build-only", type=Path, default=None, help="build the checkpoint in this folder, exit")
    args = parser.parse_args()
    if args.build_only:
        print(build(args.size, args.build_only))
        return
    levels = [int(x) for x in args.concurrency.split(",")]

    from omniserve.engines.compute import available_cores, choose_dtype

    auto = choose_dtype("auto", "cpu")
    print(f"--dtype auto here: {auto.name} ({auto.reason}); compute threads: {available_cores()}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build(args.size, Path(tmp))
        runs = {dtype: measure(model, dtype, levels, args) for dtype in ("float32", "bfloat16")}
    header = ("conc", "fp32 tok/s", "bf16 tok/s", "ratio", "fp32 TTFT p99", "bf16 TTFT p99")
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, (5, 11, 11, 6, 14, 14), strict=True)))
    for fp32, bf16 in zip(runs["float32"], runs["bfloat16"], strict=True):
        ratio = bf16["output_tokens_per_s"] / fp32["output_tokens_per_s"]
        print(
            f"{fp32['concurrency']:>5} {fp32['output_tokens_per_s']:>11.1f} {bf16['output_tokens_per_s']:>11.1f} "
            f"{ratio:>6.2f} {fp32['ttft_p99_ms']:>12.0f}ms {bf16['ttft_p99_ms']:>12.0f}ms"
        )


if __name__ == "__main__":
    main()
