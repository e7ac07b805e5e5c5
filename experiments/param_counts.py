"""Print total and active parameter counts of every preset, from shapes only (no allocation).

    python experiments/param_counts.py
"""

import time

from v4jax.config import PRESETS, preset
from v4jax.params import count_params


def main():
    print(f"{'preset':8} {'total':>12} {'with MTP':>12} {'active/token':>14} {'active+emb':>12} {'routed/layer':>13}")
    for name in PRESETS:
        cfg = preset(name)
        t = time.time()
        c = count_params(cfg)
        fmt = lambda n: f"{n / 1e9:.3f}B" if n > 1e9 else f"{n / 1e6:.2f}M"
        print(f"{name:8} {fmt(c.total):>12} {fmt(c.total_with_mtp):>12} {fmt(c.active):>14} "
              f"{fmt(c.active_with_embedding):>12} {fmt(c.routed_experts / cfg.n_layers):>13}   ({time.time() - t:.1f}s)")


if __name__ == "__main__":
    main()
