#!/usr/bin/env bash
# Creates .venv (once) and installs the pinned requirements and the project into it.
# Idempotent: a second run only checks that everything is present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  # The pinned numpy, transformers and pillow need Python 3.11 or newer: say so before pip does.
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: megatron_sail needs Python 3.11 or newer; '$PY' is $("$PY" -V 2>&1 || echo missing)." \
         "Set PYTHON=/path/to/python3.11 and rerun." >&2
    exit 2
  fi
  echo "setup: creating .venv with $("$PY" -V 2>&1)" >&2
  "$PY" -m venv .venv
fi
echo "setup: installing the pinned requirements into .venv (a few minutes the first time)" >&2
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements.txt
echo "setup: installing megatron_sail (editable)" >&2
.venv/bin/python -m pip install -q --no-deps -e . >/dev/null 2>&1 || .venv/bin/python -m pip install --no-deps -e .
