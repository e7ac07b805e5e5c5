#!/usr/bin/env bash
# The tiny preset on a CPU (spec 11 model): 110 steps of 4 x 256 tokens of the shipped Python
# corpus, dense CSA for 20 steps, 10 indexer warm-up steps, then sparse; writes loss.png.
# About 13 minutes on an idle 2-core CPU.  Usage: experiments/train_tiny.sh [WORKDIR] [extra v4jax-train args]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-experiments/runs/tiny}"; shift || true
.venv/bin/v4jax-train --config tiny --workdir "$WORKDIR" --plot "$@"
echo "logs: $WORKDIR/metrics.jsonl, TensorBoard: $WORKDIR/tensorboard, loss curve: $WORKDIR/loss.png"
echo "checkpoints: $WORKDIR/<step>/ (resume by running this again; evaluate with: .venv/bin/v4jax-eval --workdir $WORKDIR)"
