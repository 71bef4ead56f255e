"""Decode-step time of the transformers engine per linear kernel (``--linear-kernel``), in process.

Loads the checkpoint once per (dtype, kernel), prefills ``--prompt`` tokens into each of B cache rows
and times ``hf_model.decode_step`` for B in ``--batches`` in process CPU time, one thread by default
(on a shared machine wall time mostly measures the neighbours). The kernels run in interleaved rounds,
the best round of each kept, and their last logits are compared, so the table also shows how far
oneDNN's results are from torch's. ``--compile`` adds ``torch.compile`` of the
language model (inductor, ``freezing``, dynamic shapes) as a third candidate and reports its compile
time and recompiles.

    python benchmarks/linear_kernels.py [--size medium|tiny] [--dtypes bfloat16,float32] [--batches 1,4,16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dtype_threads import build


def prefilled(loaded: Any, batch: int, prompt: int) -> tuple[Any, list[int], list[int]]:
    """A cache of ``batch`` rows holding ``prompt`` tokens each, the next tokens and their positions."""
    from omniserve.engines.hf_model import new_cache, prefill_chunk

    cache = new_cache(loaded, batch, prompt + 512)
    cache.add_rows(batch)
    pieces = [[(7 * b + i) % 100 + 3 for i in range(prompt)] for b in range(batch)]
    logits = prefill_chunk(loaded, cache, pieces, [0] * batch, [None] * batch)
    return cache, [int(x) for x in logits.argmax(-1)], [prompt] * batch


def time_steps(loaded: Any, state: tuple[Any, list[int], list[int]], steps: int) -> tuple[float, Any]:
    """CPU seconds per decode step over ``steps`` greedy steps (the state advances), and the last logits."""
    from omniserve.engines.hf_model import decode_step

    cache, tokens, positions = state
    started = time.process_time()  # CPU time: on a shared machine wall time mostly measures the neighbours
    for _ in range(steps):
        logits = decode_step(loaded, cache, tokens, positions, [None] * len(tokens))
        tokens[:] = [int(x) for x in logits.argmax(-1)]
        positions[:] = [p + 1 for p in positions]
    return (time.process_time() - started) / steps, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "medium"], default="medium")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint instead of a built one")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row before the timed steps")
    parser.add_argument("--steps", type=int, default=4, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: CPU time = work)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor, freezing)")
    args = parser.parse_args()

    import torch

    from omniserve.engines.hf_model import load_model

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    kernels = ["torch", "onednn"] + (["compile"] if args.compile else [])
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build(args.size, Path(tmp))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {model.name}")
        for dtype in args.dtypes.split(","):
            loaded = {}
            for kernel in kernels:
                started = time.perf_counter()
                loaded[kernel] = load_model(
                    model, dtype=dtype, linear_kernel="torch" if kernel == "compile" else kernel
                )
                if kernel == "compile":
                    import torch._inductor.config as inductor

                    inductor.freezing = True
                    loaded[kernel].lm.forward = torch.compile(loaded[kernel].lm.forward, dynamic=True)
                print(f"{dtype} {kernel}: loaded in {time.perf_counter() - started:.1f} s", flush=True)
            for batch in (int(b) for b in args.batches.split(",")):
                states = {k: prefilled(loaded[k], batch, args.prompt) for k in kernels}
                best = dict.fromkeys(kernels, float("inf"))
                last: dict[str, Any] = {}
                for round_ in range(args.rounds + 1):  # round 0 warms up (and compiles)
                    for kernel in kernels:
                        started = time.perf_counter()
                        per_step, last[kernel] = time_steps(loaded[kernel], states[kernel], args.steps)
                        if round_ == 0:
                            print(f"  {kernel} B={batch} first round {time.perf_counter() - started:.1f} s", flush=True)
                        else:
                            best[kernel] = min(best[kernel], per_step)
                diff = {k: float((last[k] - last["torch"]).abs().max()) for k in kernels if k != "torch"}
                figures = "  ".join(f"{k} {best[k] * 1e3:7.1f} ms ({best['torch'] / best[k]:.2f}x)" for k in kernels)
                print(f"{dtype:>8} B={batch:<3} {figures}  max |logit diff| vs torch {diff}", flush=True)


if __name__ == "__main__":
    main()
