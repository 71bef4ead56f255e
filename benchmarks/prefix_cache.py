"""Prefix and encoder caching in the transformers engine, measured in-process (no HTTP) on one checkpoint.

1. ``--streams`` concurrent streams whose prompts share a ``--system-tokens`` system prompt (each with its
   own short question), once with ``--prefix-cache-tokens 0`` and once with the cache: output tokens/s,
   TTFT p50/p99 and the with/without ratio. One request warms the engine (and the cache) first, as a
   server that has seen its system prompt before.
2. TTFT of an image prompt seen for the first time against the same prompt again (the repeat reuses the
   prefix KV, the image embeddings too), over ``--images`` different images.

The medium checkpoint is ``dtype_threads.py``'s (a random-weight Qwen2-VL with Qwen2-0.5B's text shape cut
to 12 layers). Machines are noisy: compare the ratios, run it more than once.

    python benchmarks/prefix_cache.py [--size medium|tiny] [--dtype bfloat16] [--streams 16] [--requests 32]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dtype_threads import build


def engine_for(model: Path, args: argparse.Namespace, prefix_tokens: int, encoder_items: int) -> Any:
    from omniserve.config import EngineConfig
    from omniserve.engines.transformers_engine import TransformersEngine

    config = EngineConfig(
        model=model,
        served_model_name="bench",
        dtype=args.dtype,
        max_concurrency=args.streams,
        max_queue=256,
        prefix_cache_tokens=prefix_tokens,
        encoder_cache_items=encoder_items,
    )
    return TransformersEngine(config)


async def timed(engine: Any, prompt: Any, max_tokens: int) -> tuple[float, int]:
    """TTFT (s) and tokens of one greedy request."""
    from omniserve.engines.base import GenerationRequest
    from omniserve.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    ttft, tokens = 0.0, 0
    async for delta in engine.generate(GenerationRequest(f"r{random.random()}", prompt, params)):
        if not tokens:
            ttft = time.perf_counter() - start
        tokens += len(delta.token_ids)
    return ttft, tokens


async def shared_system(model: Path, args: argparse.Namespace, prefix_tokens: int) -> dict[str, float]:
    from omniserve.templates.render import RenderedPrompt

    rng = random.Random(0)
    system = [rng.randrange(100, 3000) for _ in range(args.system_tokens)]
    prompts = [
        RenderedPrompt(token_ids=system + [rng.randrange(100, 3000) for _ in range(20)]) for _ in range(args.requests)
    ]
    engine = engine_for(model, args, prefix_tokens, 64)
    await engine.start()
    try:
        await timed(engine, RenderedPrompt(token_ids=[*system, 7, 8, 9]), 2)  # a server that has seen it
        queue = list(prompts)
        samples: list[tuple[float, int]] = []

        async def worker() -> None:
            while queue:
                samples.append(await timed(engine, queue.pop(), args.max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.streams)))
        elapsed = time.perf_counter() - start
    finally:
        await engine.stop()
    ttfts = sorted(s[0] for s in samples)
    return {
        "output_tokens_per_s": sum(s[1] for s in samples) / elapsed,
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p99_ms": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1000,
    }


async def repeated_image(model: Path, args: argparse.Namespace) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    from omniserve.media.loader import MediaItem
    from omniserve.templates.render import PromptRenderer, RenderedPrompt

    renderer = PromptRenderer.from_pretrained(model)
    rng = np.random.default_rng(0)
    engine = engine_for(model, args, 16384, 64)
    await engine.start()
    new, again = [], []
    try:
        for _ in range(args.images):
            pixels = rng.integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8)
            content = [{"type": "image"}, {"type": "text", "text": "Describe this picture in detail."}]
            prompt = renderer.render_chat(
                [{"role": "user", "content": content}], [MediaItem("image", Image.fromarray(pixels))]
            )
            for bucket in (new, again):
                fresh = RenderedPrompt(token_ids=list(prompt.token_ids), mm_inputs=dict(prompt.mm_inputs))
                bucket.append((await timed(engine, fresh, 4))[0])
        tokens = len(prompt.token_ids)
    finally:
        await engine.stop()
    return {
        "prompt_tokens": tokens,
        "ttft_new_ms": statistics.median(new) * 1000,
        "ttft_repeated_ms": statistics.median(again) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["medium", "tiny"], default="medium")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=300)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=448)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build(args.size, Path(tmp))
        without = asyncio.run(shared_system(model, args, 0))
        with_cache = asyncio.run(shared_system(model, args, 16384))
        print(f"shared {args.system_tokens}-token system prompt, {args.streams} streams")
        print(f"  without prefix cache: {without}")
        print(f"  with prefix cache:    {with_cache}")
        ratio = with_cache["output_tokens_per_s"] / without["output_tokens_per_s"]
        ttft = without["ttft_p99_ms"] / with_cache["ttft_p99_ms"]
        print(f"  tokens/s ratio {ratio:.2f}x, TTFT p99 ratio {ttft:.2f}x")
        image = asyncio.run(repeated_image(model, args))
        print(f"image prompt ({image['prompt_tokens']} tokens): {image}")
        print(f"  repeated image TTFT {image['ttft_new_ms'] / image['ttft_repeated_ms']:.2f}x faster than a new one")


if __name__ == "__main__":
    main()
