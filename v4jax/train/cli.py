"""Command lines: ``v4jax-train`` and ``v4jax-eval``.

``v4jax-train --config tiny --workdir DIR [--steps N] [--set key=value ...]``: ``--config`` is a
preset (tiny, small, flash, pro) or a ``train_config.json``; ``--steps N`` trains until global step
N (the LR schedule follows ``total_steps``/``optim.*`` of the config, so stopping early and going
on later gives the same run). A workdir that holds a checkpoint is resumed, with the config saved
in it (``--set`` may still change loop settings such as ``eval_every``, not the model).

Your own data: ``--data PATH`` (a directory, glob or file of ``.txt``/``.md``, ``.jsonl``/``.json``,
``.parquet``; ``--text-field``), or ``--tfds NAME[:VERSION]`` prepared under ``--data-dir``; a
held-out set ``--eval-data PATH``, else ``--eval-fraction`` of the documents by hash; and
``--tokenizer bpe|byte|tokenizer.json``. ``v4jax-tokenizer --data PATH --vocab-size N --out FILE``
trains a byte-level BPE on them.

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

from v4jax import host


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
    _data_args(p)
    _distributed_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--plot", action="store_true", help="write loss.png in the workdir at the end (matplotlib)")
    return p


DATA_FIELDS = ("data", "tfds", "text_field", "eval_data", "eval_fraction", "tokenizer", "data_dir")


def _data_args(p: argparse.ArgumentParser, train: bool = True) -> None:
    g = p.add_argument_group("your own data (default: the shipped corpus)")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="a directory, glob or file of .txt/.md (one document per file), .jsonl/.json (a text "
                        "field) or .parquet; streamed once into array_record shards under the data dir")
    g.add_argument("--tfds", default=None, metavar="NAME[:VERSION]",
                   help="a TFDS dataset already prepared under --data-dir (its train split; validation or test "
                        "is held out)")
    g.add_argument("--text-field", default=None, metavar="NAME", help="JSON field / Parquet column / TFDS "
                   "feature with the text (default: text)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="TFDS data_dir and cache of prepared shards (default: $V4JAX_DATA_DIR or ~/.cache/v4jax/tfds)")
    if train:
        g.add_argument("--eval-data", default=None, metavar="PATH", help="held-out documents (same formats)")
        g.add_argument("--eval-fraction", type=float, default=None, metavar="F",
                       help="without --eval-data: hold out this fraction of the documents by a hash of their "
                            "text (default 0.05)")
        g.add_argument("--tokenizer", default=None, metavar="SPEC",
                       help="bpe (shipped, 4096), byte (259), or a tokenizer.json (any Hugging Face tokenizers "
                            "file, e.g. from v4jax-tokenizer); its vocabulary must fit model.vocab_size")


def _data_settings(args) -> dict:
    """The data flags given, as TrainConfig fields (paths made absolute: a resumed run finds them)."""
    out = {}
    for f in DATA_FIELDS:
        v = getattr(args, f, None)
        if v is None:
            continue
        if f in ("data", "eval_data", "data_dir") or (f == "tokenizer" and v not in ("bpe", "byte")):
            v = os.path.abspath(os.path.expanduser(v)) if not _has_glob(v) else os.path.expanduser(v)
        out[f] = v
    return out


def _has_glob(v: str) -> bool:
    import glob

    return glob.has_magic(v)


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
    import dataclasses

    from v4jax.config import ConfigError
    from v4jax.data.sources import DataError
    from v4jax.train.config import TrainConfig, train_preset
    from v4jax.train.loop import CONFIG_FILE, NonFiniteError, latest_step, train

    args = _train_parser().parse_args(argv)
    data = _data_settings(args)
    saved = os.path.join(args.workdir, CONFIG_FILE)
    try:
        _start_distributed(args)
        if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
            raise ConfigError(f"--workdir {args.workdir!r} is a file, not a directory")
        resuming = os.path.isfile(saved) and latest_step(os.path.abspath(args.workdir)) is not None
        if resuming:
            cfg = TrainConfig.from_json(saved)
            new = cfg.override(args.overrides)
            if new.model != cfg.model or new.optim != cfg.optim:
                raise ConfigError("--set cannot change model.* or optim.* of a run being resumed; "
                                  "start a new workdir instead")
            changed = [f for f in DATA_FIELDS if f in data and data[f] != getattr(cfg, f)]
            changed += [f for f in DATA_FIELDS if getattr(new, f) != getattr(cfg, f)]
            if changed:
                raise ConfigError(f"the data settings ({', '.join(sorted(set(changed)))}) of a run being resumed "
                                  f"cannot change (its saved position indexes that data); start a new workdir")
            cfg = new
        else:
            cfg = train_preset(args.config, args.overrides)
            if data:
                cfg = dataclasses.replace(cfg, **data)
        if args.mesh is not None:
            cfg = cfg.override([f"mesh={args.mesh}"])
        if args.steps is not None and args.steps < 0:
            raise ConfigError("--steps must be >= 0")
        res = train(cfg, args.workdir, stop_step=args.steps, progress=not args.no_progress)
    except (ConfigError, DataError, NonFiniteError, FileNotFoundError) as e:
        print(f"v4jax-train: error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        from v4jax.train.metrics import plot_losses

        print(f"v4jax-train: loss curve {plot_losses(args.workdir)}")
    print(json.dumps({"step": res.step, "loss": res.last_loss, "eval_loss": res.eval_loss,
                      "skipped_steps": res.skipped_steps, "spikes": res.spikes, "stopped_by": res.stopped_by,
                      "workdir": res.workdir}))
    return 0


def _tuned(main):
    """The console-script form of ``main``: first re-executed with malloc tuned for XLA:CPU
    (``v4jax.host``: no per-step page faults, a third off a CPU train step), except for ``--help``."""
    def entry() -> int:
        if not {"-h", "--help"} & set(sys.argv[1:]):
            host.reexec_tuned()
        return main()
    entry.__doc__ = main.__doc__
    return entry


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
    from v4jax.checkpoint import newest_good_step, restore_variables, verify_step
    from v4jax.config import ConfigError

    try:
        cfg = TrainConfig.from_json(saved)
    except ConfigError as e:
        print(f"v4jax-eval: error: {e}", file=sys.stderr)
        return 2
    step = newest_good_step(args.workdir) if args.step is None else args.step
    if step is None:
        print(f"v4jax-eval: error: no (undamaged) checkpoint in {args.workdir!r}", file=sys.stderr)
        return 2
    status, why = verify_step(os.path.join(args.workdir, str(step)))
    if status == "damaged" or not os.path.isdir(os.path.join(args.workdir, str(step))):
        print(f"v4jax-eval: error: checkpoint step {step} in {args.workdir!r} "
              f"{'is damaged: ' + why if status == 'damaged' else 'does not exist'}", file=sys.stderr)
        return 2
    mngr = checkpoint_manager(args.workdir)

    variables = restore_variables(mngr, step, cfg.model)
    mngr.close()
    stage = cfg.stage(max(step - 1, 0))
    res = evaluate(cfg, variables["params"], variables.get("buffers", {}), stage, split=args.split,
                   max_batches=args.batches)
    print(json.dumps({"step": step, "split": args.split, "stage": stage, **res}))
    return 0


def tokenizer_main(argv: list[str] | None = None) -> int:
    """``v4jax-tokenizer``: train a byte-level BPE (v4jax's special ids) on your documents."""
    from v4jax.data.shards import UserData  # noqa: F401  (keeps the import cost of the data stack here)
    from v4jax.data.sources import DataError, FileSource, TfdsSource
    from v4jax.data.tokenizer import train_bpe

    p = argparse.ArgumentParser(prog="v4jax-tokenizer", description=tokenizer_main.__doc__ + " Reads the "
                                "documents once, streaming, and writes a tokenizer.json for --tokenizer.")
    _data_args(p, train=False)
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, the 3 specials included "
                   "(default 4096; the model's vocab_size must be at least this)")
    p.add_argument("--out", required=True, help="the tokenizer.json to write")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if (args.data is None) == (args.tfds is None):
            raise DataError("give one of --data PATH or --tfds NAME[:VERSION]")
        if args.vocab_size < 259:
            raise DataError(f"--vocab-size {args.vocab_size}: must be >= 259 (256 bytes + 3 specials)")
        field = args.text_field or "text"
        src = FileSource(args.data, field) if args.data is not None else TfdsSource(args.tfds, "train",
                                                                                     args.data_dir, field)
        from tqdm.auto import tqdm

        stats = {"docs": 0, "bytes": 0}

        def texts():
            for _, text in tqdm(src.documents(), desc="v4jax-tokenizer: reading", unit=" docs",
                                disable=args.no_progress, leave=False):
                stats["docs"] += 1
                stats["bytes"] += len(text.encode("utf-8"))
                yield text

        tok = train_bpe(texts(), vocab_size=args.vocab_size)
        out = os.path.abspath(os.path.expanduser(args.out))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tok.save(out)
    except (DataError, ValueError) as e:
        print(f"v4jax-tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": out, "vocab_size": tok.vocab_size, **stats, "fingerprint": tok.fingerprint}))
    return 0


# console scripts (pyproject.toml): the mains tuned for the host first
train_entry = _tuned(train_main)
eval_entry = _tuned(eval_main)
