"""Command lines: ``v4jax-train`` and ``v4jax-eval``.

``v4jax-train --config tiny --workdir DIR [--steps N] [--set key=value ...]``: ``--config`` is a
preset (tiny, small, flash, pro) or a ``train_config.json``; ``--steps N`` trains until global step
N (the LR schedule follows ``total_steps``/``optim.*`` of the config, so stopping early and going
on later gives the same run). A workdir that holds a checkpoint is resumed, with the config saved
in it (``--set`` may still change loop settings such as ``eval_every``, not the model).

``v4jax-eval --workdir DIR [--step S] [--split validation] [--batches N]``: loss and perplexity of
a checkpoint, as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="v4jax-train", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset name (tiny, small, flash, pro) or a JSON run config")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, TensorBoard)")
    p.add_argument("--steps", type=int, default=None, help="train until this global step (default: total_steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. batch_size=4, model.dim=128, optim.peak_lr=1e-3")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--plot", action="store_true", help="write loss.png in the workdir at the end (matplotlib)")
    return p


def train_main(argv: list[str] | None = None) -> int:
    from v4jax.config import ConfigError
    from v4jax.train.config import TrainConfig, train_preset
    from v4jax.train.loop import CONFIG_FILE, NonFiniteError, checkpoint_manager, train

    args = _train_parser().parse_args(argv)
    saved = os.path.join(args.workdir, CONFIG_FILE)
    try:
        resuming = os.path.isfile(saved) and checkpoint_manager(args.workdir).latest_step() is not None
        if resuming:
            cfg = TrainConfig.from_json(saved)
            new = cfg.override(args.overrides)
            if new.model != cfg.model or new.optim != cfg.optim:
                raise ConfigError("--set cannot change model.* or optim.* of a run being resumed; "
                                  "start a new workdir instead")
            cfg = new
        else:
            cfg = train_preset(args.config, args.overrides)
        if args.steps is not None and args.steps < 0:
            raise ConfigError("--steps must be >= 0")
        res = train(cfg, args.workdir, stop_step=args.steps, progress=not args.no_progress)
    except (ConfigError, NonFiniteError, FileNotFoundError) as e:
        print(f"v4jax-train: error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        from v4jax.train.metrics import plot_losses

        print(f"v4jax-train: loss curve {plot_losses(args.workdir)}")
    print(json.dumps({"step": res.step, "loss": res.last_loss, "eval_loss": res.eval_loss,
                      "skipped_steps": res.skipped_steps, "workdir": res.workdir}))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    import orbax.checkpoint as ocp

    from v4jax.train.config import TrainConfig
    from v4jax.train.loop import CONFIG_FILE, checkpoint_manager, evaluate

    p = argparse.ArgumentParser(prog="v4jax-eval", description="Evaluate a v4jax-train checkpoint.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--split", default="validation")
    p.add_argument("--batches", type=int, default=None, help="at most this many batches (default: all)")
    args = p.parse_args(argv)
    saved = os.path.join(args.workdir, CONFIG_FILE)
    if not os.path.isfile(saved):
        print(f"v4jax-eval: error: {args.workdir!r} is not a v4jax-train workdir (no {CONFIG_FILE})", file=sys.stderr)
        return 2
    cfg = TrainConfig.from_json(saved)
    mngr = checkpoint_manager(args.workdir)
    step = mngr.latest_step() if args.step is None else args.step
    if step is None:
        print(f"v4jax-eval: error: no checkpoint in {args.workdir!r}", file=sys.stderr)
        return 2
    from v4jax.checkpoint import restore_variables

    variables = restore_variables(mngr, step, cfg.model)
    mngr.close()
    stage = cfg.stage(max(step - 1, 0))
    res = evaluate(cfg, variables["params"], variables.get("buffers", {}), stage, split=args.split,
                   max_batches=args.batches)
    print(json.dumps({"step": step, "split": args.split, "stage": stage, **res}))
    return 0
