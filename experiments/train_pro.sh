#!/usr/bin/env bash
# The 'pro' run preset (v4jax/train/config.py: the report's recipe at 4K: LR schedule, Muon/AdamW, MTP 0.3->0.1, balance 1e-4, bias speed 1e-3).
# Needs a TPU/GPU pod: set batch_size (and a mesh) for your hardware with --set.
# Usage: experiments/train_pro.sh [WORKDIR] [extra v4jax-train args, e.g. --steps 10 --set batch_size=1]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-experiments/runs/pro}"; shift || true
.venv/bin/v4jax-train --config pro --workdir "$WORKDIR" "$@"
echo "logs: $WORKDIR/metrics.jsonl, TensorBoard: $WORKDIR/tensorboard, checkpoints: $WORKDIR/<step>/"
