"""Run metrics: JSON lines (``metrics.jsonl``, one object per logged step with ``step`` and
``loss``; evaluation rows carry ``"eval": true``) and TensorBoard event files (``tensorboard/``,
written with ``tensorboardX``: no TensorFlow needed)."""

from __future__ import annotations

import json
import math
import os


class MetricsWriter:
    """Appends rows; on resume from step S, ``truncate_after(S)`` first drops rows logged after the
    checkpoint (they are recomputed), so the file always describes one consistent run."""

    def __init__(self, workdir: str, tensorboard: bool = True, primary: bool | None = None):
        if primary is None:   # several processes share the workdir: only process 0 writes
            import jax

            primary = jax.process_index() == 0
        self.primary = primary
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if tensorboard and primary:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def truncate_after(self, step: int) -> None:
        if not self.primary or not os.path.exists(self.path):
            return
        rows = read_metrics(os.path.dirname(self.path))
        keep = [r for r in rows if r["step"] <= step]
        with open(self.path + ".tmp", "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(self.path + ".tmp", self.path)

    def write(self, row: dict) -> None:
        if not self.primary:
            return
        row = {k: _plain(v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            prefix = "eval/" if row.get("eval") else "train/"
            for k, v in row.items():
                if k not in ("step", "eval") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(prefix + k, v, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)      # JSON has no NaN/Inf
    return v


def read_metrics(workdir: str) -> list[dict]:
    """All rows of ``metrics.jsonl`` (an empty list when there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut short by a crash mid-write: dropped (resume rewrites it)
                import warnings

                warnings.warn(f"{path}: line {n} is not complete JSON (a crash while writing it?); ignored")
    return rows


def plot_losses(workdir: str, out: str | None = None) -> str:
    """Training and validation loss curves of a run as a PNG (needs matplotlib); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    train = [(r["step"], r["lm_loss"]) for r in rows if not r.get("eval") and isinstance(r.get("lm_loss"), float)]
    val = [(r["step"], r["loss"]) for r in rows if r.get("eval")]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train (next-token CE)", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation (next-token CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    out = out or os.path.join(workdir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
