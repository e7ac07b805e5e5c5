"""Command lines: ``v4jax-train`` and ``v4jax-eval``.

``v4jax-train --config tiny --workdir DIR [--steps N] [--set key=value ...]``: ``--config`` is a
preset (tiny, small, flash, pro) or a ``train_config.json``; ``--steps N`` trains until global step
N (the LR schedule follows ``total_steps``/``optim.*`` of the config, so stopping early and going
on later gives the same run). A workdir that holds a checkpoint is resumed, with the config saved
in it (``--set`` may still change loop settings such as ``eval_every``, not the model).

``v4jax-eval --workdir DIR [--step S] [--split validation] [--batches N]``: loss and perplexity of
a checkpoint, as one JSON object on stdout.

Several processes / hosts (``v4jax.parallel.distributed``): run the same ``v4jax-train`` command in
every process, with the same ``--workdir`` on a file system they all see (orbax writes one
checkpoint from all of them; only process 0 writes ``metrics.jsonl``) and a ``--mesh`` over all
the devices of all the processes (``batch_size`` split over its data/fsdp axes; each process reads
only its rows, so the losses do not depend on the number of processes). The processes find each other

* on a Cloud TPU VM pod (here 32 chips), with ``--distributed`` (JAX reads the hosts from the TPU
  metadata); the workdir on a file system every worker mounts::

      gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \\
          --command="v4jax-train --distributed --config small --workdir /mnt/shared/run --mesh data=4,fsdp=8"

  (a GKE / multislice TPU job sets ``TPU_WORKER_HOSTNAMES`` / ``MEGASCALE_*``: no flag needed);
* under SLURM or Open MPI, by themselves (``SLURM_NTASKS`` / ``OMPI_COMM_WORLD_SIZE`` > 1)::

      srun --nodes 4 --ntasks-per-node 8 --gpus-per-task 1 v4jax-train --workdir /shared/run --mesh data=4,fsdp=8
      # one task per node holding all 8 GPUs: add --local-device-ids 0,1,2,3,4,5,6,7

* by hand: ``--coordinator HOST:PORT`` (process 0's address, a free port), ``--num-processes N``,
  ``--process-id I`` (0 .. N-1), or the variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``; e.g. two CPU processes on one box with 4 simulated devices each::

      export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4
      v4jax-train --workdir /tmp/run --mesh data=2,fsdp=2,expert=2 --coordinator 127.0.0.1:12345 \\
          --num-processes 2 --process-id 0 &
      v4jax-train --workdir /tmp/run --mesh data=2,fsdp=2,expert=2 --coordinator 127.0.0.1:12345 \\
          --num-processes 2 --process-id 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="v4jax-train", description=__doc__.split("\n\n")[1],
                                epilog="Several processes / hosts" + __doc__.split("Several processes / hosts", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset name (tiny, small, flash, pro) or a JSON run config")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, TensorBoard)")
    p.add_argument("--steps", type=int, default=None, help="train until this global step (default: total_steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. batch_size=4, model.dim=128, optim.peak_lr=1e-3")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="device mesh, e.g. data=2,fsdp=2,expert=2 (axes data, fsdp, expert, tensor; the sizes "
                        "must multiply to the device count). A resumed run may use another mesh")
    _distributed_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--plot", action="store_true", help="write loss.png in the workdir at the end (matplotlib)")
    return p


def _distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes / hosts (see below; default: from the environment, else one process)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address and a free port, the same in every process (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 .. N-1 (env JAX_PROCESS_ID)")
    g.add_argument("--local-device-ids", default=None, metavar="0,1,...",
                   help="the local accelerators this process uses (env JAX_LOCAL_DEVICE_IDS)")
    g.add_argument("--distributed", action="store_true", default=None,
                   help="call jax.distributed.initialize() and let JAX detect the cluster (Cloud TPU VM pods; "
                        "env V4JAX_DISTRIBUTED=1)")


def _start_distributed(args) -> bool:
    """``v4jax.parallel.distributed.initialize`` from the flags (before anything touches JAX)."""
    from v4jax.parallel.distributed import initialize

    return initialize(args.coordinator, args.num_processes, args.process_id, args.local_device_ids,
                      auto=args.distributed)


def train_main(argv: list[str] | None = None) -> int:
    from v4jax.config import ConfigError
    from v4jax.train.config import TrainConfig, train_preset
    from v4jax.train.loop import CONFIG_FILE, NonFiniteError, checkpoint_manager, train

    args = _train_parser().parse_args(argv)
    saved = os.path.join(args.workdir, CONFIG_FILE)
    try:
        _start_distributed(args)
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
        if args.mesh is not None:
            cfg = cfg.override([f"mesh={args.mesh}"])
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
