#!/usr/bin/env bash
# The main job end to end on a built-in default: a synthetic BraTS-like cohort, verified weight loading.
# Completed step by step as commands land (train, eval, predict).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
echo "== medcli: what it can do =="
$BIN/medcli --help
