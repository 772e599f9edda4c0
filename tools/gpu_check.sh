#!/usr/bin/env bash
# The GPU proof: `bash tools/gpu_check.sh OUT.json [--dry-run] [--only a,b] [--peak-tflops N]`.
# Writes OUT.json (rewritten after each section) and prints a short table; ≤ 9 minutes on a GPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE="${WANDB_MODE:-offline}"
exec "${PYTHON:-python}" -m mmdiff.jobs.gpu_check "$@"
