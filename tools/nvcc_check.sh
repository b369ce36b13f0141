#!/usr/bin/env bash
# Compile one csrc/*.cu (or .cpp) file alone, arch 9.0, with the flags setup.py uses: a quick
# syntax/type check without a full build. Usage: tools/nvcc_check.sh csrc/layer_norm_forward.cu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
read -r TORCH_INC PY_INC < <($PY -c "import torch, os, sysconfig; print(os.path.join(os.path.dirname(torch.__file__), 'include'), sysconfig.get_paths()['include'])")
ABI=$($PY -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
out=$(mktemp -d)/obj.o
"$CUDA_HOME/bin/nvcc" -c "$1" -o "$out" -I csrc -I "$TORCH_INC" -I "$TORCH_INC/torch/csrc/api/include" -I "$PY_INC" \
  -D_GLIBCXX_USE_CXX11_ABI=$ABI -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
  -std=c++20 -O3 --expt-relaxed-constexpr -lineinfo \
  -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -gencode arch=compute_90,code=sm_90 -Xcompiler -fPIC ${NVCC_EXTRA:-}
echo "compiled $1 -> $out ($(stat -c %s "$out") bytes)"
