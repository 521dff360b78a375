#!/usr/bin/env bash
# The reranking suites of `mmr bench` on a CUDA machine in one call, from a plain copy of this tree.
#
# `blip`: BLIP from cached tokens vs re-encoding, per storage option, with the folded and the
# standard cross-attention side by side (time and MACs per candidate, the break-even sweep). It
# needs python3 with torch, torchvision, transformers, click, numpy and Pillow; NOT Milvus,
# open_clip or an installed mm_retrieval (the first stage is then a transformers CLIP ViT-B/32
# stand-in, said so in the JSON). No network: the BLIP checkpoint is a random BLIP-base-sized one
# built on the spot (timing only), unless MMR_BLIP names a local one.
# `rerank` (the token store read and our own reranker) joins it where pymilvus, milvus-lite and
# open_clip import (MMR_BENCH_SUITES="blip rerank" to insist, "blip" to skip it).
#
#   OUT=/some/dir bash benchmarks/gpu_blip.sh           # on the GPU machine (blip: ~3 minutes on an H200)
#   MMR_BENCH_DEVICE=cpu MMR_BENCH_QUICK=1 OUT=/tmp/x bash benchmarks/gpu_blip.sh   # dry run anywhere
#
# Writes $OUT/blip-<device>.json (the `mmr bench --out` document: merge it into a results file with
# `mmr bench --from A.json B.json`), $OUT/blip-<device>.md and $OUT/blip-<device>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
DEVICE="${MMR_BENCH_DEVICE:-cuda}"  # cuda, not auto: fail loudly instead of timing the CPU
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c 'import sys; sys.exit("Python >= 3.11 needed, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
SUITES="${MMR_BENCH_SUITES:-auto}"
if [ "$SUITES" = auto ]; then
  SUITES=blip
  if "$PYTHON" -c 'import pymilvus, milvus_lite, open_clip' 2>/dev/null; then SUITES="blip rerank"; fi
fi
echo "suites: $SUITES" >&2
args=(--device "$DEVICE")
for s in $SUITES; do args+=(--suite "$s"); done
if [ "${MMR_BENCH_QUICK:-0}" = 1 ]; then args+=(--quick); fi
if [ -n "${MMR_BLIP:-}" ]; then args+=(--blip "$MMR_BLIP"); fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv >&2 || true; fi
"$PYTHON" -m mm_retrieval.cli -v bench "${args[@]}" --workdir "$work" --out "$OUT/blip-$DEVICE.json" \
  --markdown "$OUT/blip-$DEVICE.md" 2>&1 | tee "$OUT/blip-$DEVICE.log"
