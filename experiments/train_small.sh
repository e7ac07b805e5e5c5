#!/usr/bin/env bash
# The 'small' run preset (v4jax/train/config.py: 5000 steps of 16 x 512 tokens).
# Needs an accelerator to finish in reasonable time.
# Usage: experiments/train_small.sh [WORKDIR] [extra v4jax-train args, e.g. --steps 10 --set batch_size=1]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-experiments/runs/small}"; shift || true
.venv/bin/v4jax-train --config small --workdir "$WORKDIR" "$@"
echo "logs: $WORKDIR/metrics.jsonl, TensorBoard: $WORKDIR/tensorboard, checkpoints: $WORKDIR/<step>/"
