#!/usr/bin/env bash
# GPU acceptance check for kd. GPU-ONLY: needs an NVIDIA GPU, a CUDA build of torch and CUDA vLLM.
#
# Run as is on a GPU machine that has this repo and its environment (`pip install -e ".[gpu,dev]"`
# with the CUDA torch matching the driver), or inside the GPU image (docker/Dockerfile.gpu):
#
#   scripts/gpu_check.sh                                   # tiny teacher preset (4 layers x 128)
#   scripts/gpu_check.sh --hidden-size 1024 --layers 8     # a wider random teacher: GPU-bound numbers
#   scripts/gpu_check.sh --samples 256 --seq-tokens 512    # any bench/gpu_check.py option passes through
#
# It installs nothing and reaches no network (HF_HUB_OFFLINE, PIP_NO_INDEX): the teacher is built
# locally with kd.pipeline.demo.tiny_models. Steps:
#   1. environment: GPU, driver, torch / CUDA / vLLM versions           (GPU-only)
#   2. bench/gpu_check.py --device cuda:                                 (GPU-only)
#      fidelity: CUDA vLLM vs the transformers engine in float32 (top-k ids, log-probs within
#      2e-3, tail mass, hidden states within 1e-4 + 1e-2 * max|h|), then capture tokens/s for
#      k = 0, 20, 64 with hidden states (bfloat16), for both engines.
# The same python runs on CPU with `python bench/gpu_check.py --device cpu` (tests/test_gpu_check.py).
# Then the capture ratios at a driving VLM's shape (kd capture vs plain prefill, target >= 0.9 on a GPU):
#   python bench/capture.py --device cuda --shape real --seq-tokens 2600 --hidden-size 256 --vocab 151936 --samples 32
#   python bench/capture.py --device cuda --shape real --vocab 151936 --teacher qwen2.5-0.5b --samples 64  # all 24 layers
# Results also go to $KD_GPU_CHECK_JSON (default gpu_check.json).
# Exit status: 0 pass, 1 fidelity failure, 2 setup problem (no GPU, no CUDA torch, no vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false
# vLLM's hidden-state extraction (a KV connector) needs its in-process engine core.
export VLLM_ENABLE_V1_MULTIPROCESSING=0

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no nvidia-smi; this script is for GPU machines (on CPU: $PY bench/gpu_check.py --device cpu)" >&2
    exit 2
fi
echo "== GPU"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
echo "== software"
"$PY" - <<'PYEOF' || exit 2
import importlib.util
import sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU visible to torch: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (a CPU build of torch, or CUDA_VISIBLE_DEVICES empty)")
if importlib.util.find_spec("vllm") is None:
    sys.exit("gpu_check: vLLM is not installed (pip install -e '.[gpu]')")
PYEOF

echo "== fidelity and capture throughput"
exec "$PY" bench/gpu_check.py --device cuda --json "${KD_GPU_CHECK_JSON:-gpu_check.json}" "$@"
