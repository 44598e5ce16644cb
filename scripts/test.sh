#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite (CPU; GPU tests skip without CUDA).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra "$@"
