"""The transformers engine's sampler with and without grammar masks: per-token cost at 16 concurrent rows.

Runs ``sample_rows`` (the sampler the engine calls once per decode step) on random logits of a real
tokenizer's vocabulary, 16 rows at temperature 1: no grammar (the baseline, measured in the same run),
one row constrained, and all 16 constrained by a JSON schema. The model's forward pass is left out: this
is what the masks add to a step. Grammar rows are restarted when their output ends, so every step masks.

    .venv/bin/python benchmarks/grammar_overhead.py [--tokenizer PATH] [--steps 200] [--rounds 5] [--threads 1]

Without ``--tokenizer`` a tiny Qwen2 checkpoint (4,096 tokens) is built in a temporary folder; pass a
real model's folder to measure a real vocabulary (masks cost grows with it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = 16
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "mood", "ok"],
    "additionalProperties": False,
}


def run(tokenizer_path: Path, steps: int, rounds: int) -> dict[str, float]:
    import torch
    from transformers import AutoTokenizer

    from omniserve.engines.sampler import SamplerState, sample_rows
    from omniserve.sampling import SamplingParams
    from omniserve.structured.grammar import GrammarCache
    from omniserve.structured.spec import StructuredOutput

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    vocab = len(tokenizer)
    eos = (tokenizer.eos_token_id,)
    compiled = GrammarCache(tokenizer, vocab).compile(StructuredOutput.json_schema(SCHEMA, "bench"))
    params = SamplingParams(max_tokens=10_000, temperature=1.0)

    def fresh(constrained: bool, i: int) -> SamplerState:
        return SamplerState.create(params, i, eos, compiled if constrained else None)

    def per_token_us(constrained_rows: int) -> float:
        states = [fresh(i < constrained_rows, i) for i in range(ROWS)]
        logits = torch.randn(ROWS, vocab)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            sample_rows(logits, states)
            times.append(time.perf_counter() - start)
            for i, s in enumerate(states):
                if s.grammar_ended:
                    states[i] = fresh(True, i)
        return statistics.median(times) / ROWS * 1e6

    per_token_us(ROWS)  # warm-up: first masks, thread pools
    configs = (("no grammar", 0), ("1 of 16 rows", 1), ("16 of 16 rows", ROWS))
    samples: dict[str, list[float]] = {label: [] for label, _ in configs}
    for _ in range(rounds):  # interleaved, so a burst of load elsewhere on the machine hits every configuration
        for label, constrained in configs:
            samples[label].append(per_token_us(constrained))
    return {label: statistics.median(values) for label, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=None, help="a model folder with a tokenizer")
    parser.add_argument("--steps", type=int, default=200, help="sampler calls per configuration and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the configurations (median reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default: on a busy small machine, ops split over threads wait for each other",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.tokenizer
        if path is None:
            from omniserve.models import build_tiny_qwen2

            path = build_tiny_qwen2(Path(tmp) / "tiny-qwen2")
        results: dict[str, Any] = run(path, args.steps, args.rounds)
    base = results["no grammar"]
    print(f"sampler cost per token, {ROWS} concurrent rows, {args.rounds} rounds x {args.steps} steps ({path.name}):")
    for label, value in results.items():
        print(f"  {label:>14}: {value:8.1f} us/token  ({value / base:5.2f}x the no-grammar baseline)")


if __name__ == "__main__":
    main()
