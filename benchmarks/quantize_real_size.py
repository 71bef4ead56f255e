"""Time and peak memory of every method on a real-sized decoder built from a config (random weights).

    python benchmarks/quantize_real_size.py OUT_DIR [--hidden 2048 --layers 24 --intermediate 5632]

Builds a Qwen2 causal LM of the given size in bfloat16 (vocabulary 151,936 as Qwen2.5; the tiny
model's tokenizer, whose ids all fall inside it), then quantizes it with each method in its own
process (so peak host memory is per method) through ``omniserve.quantize.run.quantize`` with the
default calibration set, and writes one JSON line per method to OUT_DIR/bench.jsonl plus each
report table. Random weights give fidelity figures that say nothing about a trained model; time
and memory are what this measures.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

METHODS = ("fp8", "gptq", "fp8-static", "awq")


def build(folder: Path, hidden: int, layers: int, intermediate: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from omniserve.models import build_tiny_qwen2

    tiny = build_tiny_qwen2(folder.parent / "tiny-tokenizer")
    config = Qwen2Config(
        vocab_size=151_936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        num_key_value_heads=min(4, max(2, hidden // 64)),
        max_position_embeddings=32_768,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        eos_token_id=json.loads((tiny / "config.json").read_text())["eos_token_id"],
    )
    _save_random(lambda: Qwen2ForCausalLM(config), folder, tiny)


def build_omni(folder: Path, hidden: int, layers: int, intermediate: int, tower_hidden: int, tower_layers: int) -> None:
    """A Qwen2.5-Omni thinker at the given sizes (real towers: 1280 wide, 32 deep), tiny omni's processor."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    from omniserve.models import build_tiny_omni

    tiny = build_tiny_omni(folder.parent / "tiny-omni-processor")
    config = json.loads((tiny / "config.json").read_text())
    thinker = config["thinker_config"]
    head_dim = 128
    thinker["text_config"].update(
        vocab_size=151_936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=2,
    )
    thinker["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]  # head_dim 128 as Qwen2.5-Omni
    thinker["vision_config"].update(
        depth=tower_layers,
        hidden_size=tower_hidden,
        intermediate_size=tower_hidden * 8 // 3,
        num_heads=max(1, tower_hidden // 80),
        out_hidden_size=hidden,
        fullatt_block_indexes=list(range(tower_layers // 4 - 1, tower_layers, tower_layers // 4 or 1)),
    )
    thinker["audio_config"].update(
        d_model=tower_hidden,
        encoder_layers=tower_layers,
        encoder_attention_heads=max(1, tower_hidden // 64),
        encoder_ffn_dim=tower_hidden * 4,
        output_dim=hidden,
    )
    thinker["text_config"]["layer_types"] = ["full_attention"] * layers
    _save_random(lambda: Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig.from_dict(config)), folder, tiny)


def _save_random(make: Callable[[], Any], folder: Path, tiny: Path) -> None:
    """``make()``'s model in bfloat16 with its random weights (built on the GPU when there is one: minutes
    faster at real sizes) saved to ``folder``, with the tiny model's tokenizer and processor files; prints its size."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = make().to(torch.bfloat16)
    model.save_pretrained(folder)
    for file in tiny.iterdir():
        if file.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy2(file, folder / file.name)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"built": str(folder), "parameters": params, "device": device}), flush=True)


def run_one(model: Path, method: str, out: Path, reports: Path) -> dict[str, object]:
    import torch

    from omniserve.quantize.options import QuantizeOptions
    from omniserve.quantize.run import quantize

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = quantize(QuantizeOptions(model=model, method=method, output=out, overwrite=True, progress=False))
    wall = time.perf_counter() - start
    report = result.report.as_dict()
    shutil.copy2(out / "quantization_report.md", reports / f"report-{method}.md")
    return {
        "method": method,
        "scheme": report["scheme"],
        "wall_seconds": round(wall, 1),
        "seconds": report["seconds"],
        "size_before_gib": round(report["size"]["before_bytes"] / 2**30, 3),
        "size_after_gib": round(report["size"]["after_bytes"] / 2**30, 3),
        "ratio": report["size"]["ratio"],
        "calibration_samples": report["calibration"]["used"],
        "calibration_modalities": report["calibration"]["by_modality"],
        "quantized_modules": report["modules"]["quantized_count"],
        "kept_modules": report["modules"]["kept_count"],
        "kept_parameters_bit_identical": report["verification"]["kept_parameters_checked"],
        "fidelity": report["fidelity"],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--arch", choices=("qwen2", "omni"), default="qwen2")
    parser.add_argument("--tower-hidden", type=int, default=1280)
    parser.add_argument("--tower-layers", type=int, default=32)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--work", type=Path, help="Where checkpoints are written (default: OUT/work).")
    args = parser.parse_args()
    work = args.work or args.out / "work"
    model = work / "model"
    if args.one:
        line = run_one(model, args.one, work / f"q-{args.one}", args.out)
        shutil.rmtree(work / f"q-{args.one}", ignore_errors=True)
        with (args.out / "bench.jsonl").open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.arch == "omni":
        build_omni(model, args.hidden, args.layers, args.intermediate, args.tower_hidden, args.tower_layers)
    else:
        build(model, args.hidden, args.layers, args.intermediate)
    print(json.dumps({"build_seconds": round(time.perf_counter() - start, 1)}), flush=True)
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, str(args.out), "--one", method, "--work", str(work)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(json.dumps({"method": method, "failed": done.stderr[-3000:]}), flush=True)
        else:
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
