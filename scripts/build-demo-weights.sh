#!/usr/bin/env bash
# Rebuilds the built-in demo model's weights (omniserve/models/demo/tiny-omni-demo) from nothing, as shipped:
# the commands docs/training.md ("The built-in demo model") describes, in order, on this project's CPU.
#
#   bash scripts/build-demo-weights.sh WORKDIR      (needs the .venv of scripts/test-all.sh and espeak-ng)
#
# Three stages, each from the previous one's weights:
#   1. the five synthetic omni tasks from the untrained tiny Omni (colour, motion, pitch, larger, mixed)
#   2. all eight tasks (adds tool_colour, json_colour, spoken): the checkpoint after 300 of 450 steps
#   3. 3,000 more spoken clips (another seed) with 150 lines of each other task replayed, 3 then 8 epochs
# Stage 2 keeps its step-300 checkpoint (two epochs into a three-epoch schedule): the later steps were not
# needed for the tools and cost the spoken task. The weights are saved as bfloat16 at the end of each stage.
set -euo pipefail
work="${1:?usage: build-demo-weights.sh WORKDIR}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
omni() { "$repo/.venv/bin/omniserve" "$@"; }
mkdir -p "$work" && cd "$work"

# stage 1 (the weights shipped before the tool, JSON and spoken tasks existed)
omni build-tiny --output tiny-omni
omni synth --output synth5 --seed 0 --train-size 300 --test-size 100 \
  --task colour --task motion --task pitch --task larger --task mixed
omni train --model tiny-omni --data synth5/train.jsonl --output stage1 \
  --epochs 6 --batch-size 16 --learning-rate 1e-3 --tower-learning-rate 1e-2 --warmup-steps 20 --save-dtype bfloat16

# stage 2: every task, 300 lines each; the step-300 checkpoint with stage 1's processor and tokenizer files
omni synth --output synth8 --seed 0 --train-size 300 --test-size 100
omni train --model stage1 --data synth8/train.jsonl --output stage2-run \
  --epochs 3 --batch-size 16 --learning-rate 1e-3 --tower-learning-rate 3e-3 --warmup-steps 20 \
  --save-steps 150 --save-dtype bfloat16
mkdir -p stage2 && find stage1 -maxdepth 1 -type f -exec cp {} stage2/ \;
cp stage2-run/checkpoints/checkpoint-300/{config.json,model.safetensors,generation_config.json} stage2/

# stage 3: 3,000 spoken clips of seed 7 (the split rule keeps every test utterance out of any seed's train
# split) and 150 lines of each other task from synth8, shuffled with seed 0, media linked beside the file
omni synth --output synth-spoken --seed 7 --train-size 3000 --test-size 0 --task spoken
mkdir -p mix && cp -al synth-spoken/media mix/media-spoken && cp -al synth8/media mix/media-8
"$repo/.venv/bin/python" - <<'EOF'
import collections, json, random

lines = [line.replace('"media/', '"media-spoken/') for line in open("synth-spoken/train.jsonl")]
taken = collections.Counter()
for line in open("synth8/train.jsonl"):
    task = json.loads(line)["task"]
    if task != "spoken" and taken[task] < 150:
        taken[task] += 1
        lines.append(line.replace('"media/', '"media-8/'))
random.Random(0).shuffle(lines)
open("mix/train.jsonl", "w").writelines(lines)
EOF
omni train --model stage2 --data mix/train.jsonl --output stage3a \
  --epochs 3 --batch-size 16 --learning-rate 1e-3 --tower-learning-rate 1e-2 --warmup-steps 20 --save-dtype bfloat16
omni train --model stage3a --data mix/train.jsonl --output stage3 \
  --epochs 8 --batch-size 16 --learning-rate 1e-3 --tower-learning-rate 1e-2 --warmup-steps 20 --save-dtype bfloat16
# shipped in stage 1's layout (the whole Omni's config, weights under thinker.*): the runs from stage 2 on hold
# the thinker alone, and the speaking demo (builtin:omni-speech) builds from the whole Omni's layout
mkdir -p demo && find stage1 -maxdepth 1 -type f -exec cp {} demo/ \;
"$repo/.venv/bin/python" - <<'PY'
from safetensors.torch import load_file, save_file

weights = load_file("stage3/model.safetensors")
save_file({f"thinker.{name}": t for name, t in weights.items()}, "demo/model.safetensors", metadata={"format": "pt"})
PY
echo "demo weights: $work/demo/model.safetensors"
