"""The training loop: data -> jitted ``train_step`` -> metrics, periodic evaluation and orbax
checkpoints, exact resume.

Workdir layout (an orbax ``CheckpointManager`` root, so ``v4jax-generate WORKDIR`` and
``v4jax.checkpoint.load_workdir`` read it too):

- ``<step>/state``        model variables ``{"params", "buffers"}`` (StandardSave)
- ``<step>/config``       the model config (HF-style dict)
- ``<step>/train_state``  optimizer state, step counter, RNG key (StandardSave)
- ``<step>/meta``         data-iterator position, the run config, the loss-spike window (JSON)
- ``<step>/v4jax_checksums.json``  size and SHA-256 of every file of the step (after it commits)
- ``corrupt/``            damaged or unfinished steps moved aside on resume (never deleted)
- ``train_config.json``, ``metrics.jsonl``, ``tensorboard/``, ``loss.png``

A checkpoint is written only when every parameter, optimizer and buffer value is finite and the
latest steps were applied. SIGTERM / SIGINT end the run cleanly with a checkpoint; faults and
restarts: ``v4jax.train.checkpoints``, ``v4jax.train.preemption``, docs/reliability.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import ConfigError
from v4jax.data.pipeline import make_dataset, make_eval_dataset
from v4jax.data.tokenizer import get_tokenizer
from v4jax.parallel.mesh import batch_sharding, describe, make_mesh, process_rows, put_batch
from v4jax.parallel.placement import logical_specs
from v4jax.params import abstract_variables
from v4jax.train.checkpoints import (  # noqa: F401
    CheckpointMismatchError,
    NonFiniteError,
    checkpoint_manager,
    latest_step,
    restore_checkpoint,
    resume,
    save_checkpoint,
    write_checksums,
)
from v4jax.train.config import STAGES, TrainConfig
from v4jax.train.metrics import MetricsWriter
from v4jax.train.optimizer import lr_schedule, make_optimizer
from v4jax.train.preemption import StopSignals
from v4jax.train.step import init_state, make_eval_step, make_train_step

CONFIG_FILE = "train_config.json"


@dataclass
class RunResult:
    step: int
    last_loss: float | None
    eval_loss: float | None
    skipped_steps: int
    workdir: str
    stopped_by: str | None = None      # "SIGTERM" / "SIGINT" when a signal ended the run early
    spikes: int = 0                    # loss spikes detected (reported or skipped: TrainConfig.spike_action)


def _save_tokenizer(cfg: TrainConfig, workdir: str) -> None:
    """``tokenizer.json`` beside the checkpoints (``v4jax-generate WORKDIR --prompt ...`` reads it)."""
    tok = run_tokenizer(cfg)
    if hasattr(tok, "save"):
        tok.save(os.path.join(workdir, "tokenizer.json"))


def abstract_params(cfg: TrainConfig):
    return abstract_variables(cfg.model)["params"]


def make_data(cfg: TrainConfig, split: str, mesh=None, progress: bool = False):
    """The endless shuffled training iterator, or one fixed-order pass over ``split``, of the shipped
    corpus or the run's own data (``cfg.data`` / ``cfg.tfds``, prepared once into shards). With several
    processes each reads only the rows of the global batch its devices hold (the global batches,
    and so the losses, are the same for any number of processes)."""
    tok = run_tokenizer(cfg)
    rows = None
    if mesh is not None and jax.process_count() > 1:
        rows = process_rows(mesh, cfg.batch_size)
    kw = dict(data_dir=cfg.data_dir, tokenizer=tok, rows=rows, source=cfg.user_data(), progress=progress)
    if split == "train":
        return make_dataset("train", cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=True, **kw)
    return make_eval_dataset(split, cfg.seq_len, cfg.batch_size, **kw)


def run_tokenizer(cfg: TrainConfig):
    """The run's tokenizer, its vocabulary checked against the model's."""
    try:
        tok = get_tokenizer(cfg.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"TrainConfig.tokenizer: {e}") from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {cfg.tokenizer!r} has {tok.vocab_size} ids but model.vocab_size is "
                          f"{cfg.model.vocab_size}: use a smaller tokenizer or --set model.vocab_size="
                          f"{tok.vocab_size}")
    return tok


def evaluate(cfg: TrainConfig, params, buffers, stage: str, eval_fn=None, split: str = "validation",
             max_batches: int | None = None, mesh=None) -> dict:
    """Mean next-token loss (and perplexity; MTP loss too) over ``split``, with the attention of
    ``stage`` (dense CSA before the sparse stage); on ``mesh`` when given."""
    eval_fn = eval_fn or make_eval_step(cfg, mesh=mesh)
    sid = jnp.int32(STAGES.index(stage))
    tot = {}
    for i, batch in enumerate(make_data(cfg, split, mesh)):
        if max_batches is not None and i >= max_batches:
            break
        res = jax.device_get(eval_fn(params, buffers, put_batch(batch, mesh, cfg.batch_size), sid))
        for k, v in res.items():
            tot[k] = tot.get(k, 0.0) + float(v)
    if not tot.get("tokens"):
        raise ValueError(f"split {split!r} produced no evaluation tokens")
    loss = tot["lm_sum"] / tot["tokens"]
    out = {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0))), "tokens": int(tot["tokens"])}
    if "mtp_sum" in tot:
        out["mtp_loss"] = tot["mtp_sum"] / max(tot["mtp_tokens"], 1.0)
    return out


class _Checkpointer:
    """Saves through orbax (async when configured) and, once a save has committed, writes that
    step's checksum file (``v4jax.train.checkpoints``); at most one step is saved per step number."""

    def __init__(self, workdir: str, cfg: TrainConfig, primary: bool):
        self.mngr = checkpoint_manager(workdir, cfg)
        self.cfg, self.primary = cfg, primary
        self.pending: list[int] = []
        self.last = self.mngr.latest_step()

    def save(self, state, data_state, extra: dict) -> bool:
        step = int(state["step"])
        if self.last is not None and step <= self.last:
            return False
        self.commit()
        save_checkpoint(self.mngr, state, self.cfg, data_state, extra)
        self.pending.append(step)
        self.last = step
        return True

    def commit(self) -> None:
        """Wait for queued saves and checksum them."""
        if not self.pending:
            return
        self.mngr.wait_until_finished()
        if self.primary and self.cfg.checkpoint_checksums:
            for s in self.pending:
                d = os.path.join(os.fspath(self.mngr.directory), str(s))
                if os.path.isdir(d):
                    write_checksums(d)
        self.pending = []

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.mngr.close()


class _Faults:
    """Host side of the non-finite and loss-spike handling: counts, the stop rule, and the window
    of applied LM losses whose median sets the spike limit passed to every step. The limit is
    recomputed only at multiples of ``log_every`` and saved with each checkpoint (with the window),
    so a resumed run uses exactly the limits of an uninterrupted one."""

    def __init__(self, cfg: TrainConfig, meta: dict | None, max_consecutive: int):
        from collections import deque

        meta = meta or {}
        self.cfg, self.max_consecutive = cfg, max_consecutive
        self.window = deque((float(x) for x in meta.get("loss_window", [])), maxlen=cfg.spike_window)
        lim = meta.get("loss_limit")
        self.limit = float("inf") if lim is None else float(lim)
        self.limit_arr = jnp.float32(self.limit)
        self.consecutive = self.skipped = self.spikes = 0

    def take(self, rows: list[dict], log) -> int:
        """Account for fetched step metrics; -> how many of them were not applied."""
        bad = 0
        for r in rows:
            nonfinite, spike, skipped = int(r["nonfinite"]), int(r["spike"]), int(r["skipped"])
            self.consecutive = self.consecutive + 1 if skipped else 0
            bad += skipped
            if spike:
                self.spikes += 1
                verb = "skipped (not applied)" if skipped else "reported (applied)"
                log(f"v4jax-train: WARNING loss spike at step {int(r['step_index']) + 1}: LM loss {float(r['lm_loss']):.4f} > "
                    f"{self.cfg.spike_factor} x running median ({self.limit:.4f}); {verb}")
            if not skipped and not nonfinite:
                self.window.append(float(r["lm_loss"]))
        self.skipped += bad
        return bad

    def update_limit(self) -> None:
        need = max(8, self.cfg.spike_window // 4)
        if self.cfg.spike_factor is None or len(self.window) < need:
            self.limit = float("inf")
        else:
            self.limit = float(self.cfg.spike_factor * np.median(np.asarray(self.window)))
        self.limit_arr = jnp.float32(self.limit)

    def state(self) -> dict:
        return {"loss_window": list(self.window), "loss_limit": None if np.isinf(self.limit) else self.limit}


def train(cfg: TrainConfig, workdir: str, stop_step: int | None = None, progress: bool = True,
          log=print, max_consecutive_skips: int | None = None, on_log=None) -> RunResult:
    """Train until global step ``stop_step`` (default ``cfg.total_steps``), resuming from the
    newest good checkpoint in ``workdir`` when there is one (``v4jax.train.checkpoints.resume``).

    SIGTERM / SIGINT finish the current step, write a checkpoint and return (``stopped_by``).
    Non-finite steps are not applied; ``max_consecutive_skips`` (default
    ``cfg.max_consecutive_skips``) of them in a row raise ``NonFiniteError`` without checkpointing
    the steps since the last good checkpoint. Bad settings raise ``ConfigError`` before anything is
    written. ``on_log(row)``: called with every metrics row (train and eval) as it is written."""
    mesh = make_mesh(cfg.mesh) if cfg.mesh else None
    if mesh is not None:
        batch_sharding(mesh, cfg.batch_size)          # batch_size must split evenly: fail before any work
    primary = jax.process_index() == 0          # several processes: process 0 logs and writes the files
    if not primary:
        log, progress = (lambda *a, **k: None), False
    workdir = os.path.abspath(workdir)
    stop = cfg.total_steps if stop_step is None else stop_step
    if not isinstance(stop, int) or stop < 0:
        raise ConfigError(f"stop_step must be an integer >= 0, got {stop!r}")
    max_consecutive = cfg.max_consecutive_skips if max_consecutive_skips is None else max_consecutive_skips
    tx = make_optimizer(cfg.optim, abstract_params(cfg), logical_specs(cfg.model))
    lr_fn = lr_schedule(cfg.optim)
    # everything that can be refused is checked before the workdir is touched: the mesh (above),
    # the tokenizer and the data (here), a checkpoint of another config (in resume, before it moves anything)
    data = make_data(cfg, "train", mesh, progress=progress)
    held = make_data(cfg, "validation", mesh)
    if data.stats:
        for name, st in (("train", data.stats), ("validation", held.stats)):
            log(f"v4jax-train: {name} data: {st['docs']} documents, {st['tokens']} tokens, "
                f"{st['bytes_per_token']} bytes/token, {st['rows']} rows of {cfg.seq_len + 1}")
        if data.stats["rows"] < cfg.batch_size:
            log(f"v4jax-train: WARNING the training data fills {data.stats['rows']} row(s) of {cfg.seq_len + 1} "
                f"tokens, fewer than one batch ({cfg.batch_size}): every batch repeats rows (fine for an "
                f"overfitting check; add data or lower batch_size/seq_len otherwise)")
    got = resume(workdir, cfg, tx, mesh, log=log, primary=primary) if latest_step(workdir) is not None else None
    os.makedirs(workdir, exist_ok=True)
    writer = MetricsWriter(workdir)
    ckpt = _Checkpointer(workdir, cfg, primary)
    if got is None:
        if primary:
            cfg.to_json(os.path.join(workdir, CONFIG_FILE))
            _save_tokenizer(cfg, workdir)
        state = init_state(cfg, tx, mesh=mesh)
        faults = _Faults(cfg, None, max_consecutive)
        writer.truncate_after(0)
        log(f"v4jax-train: new run {cfg.name!r} in {workdir} (steps {0} -> {stop}) on {describe(mesh)}")
    else:
        state, data_state, meta = got
        data.set_state(data_state)
        faults = _Faults(cfg, meta, max_consecutive)
        writer.truncate_after(int(state["step"]))
        log(f"v4jax-train: resumed {workdir} at step {int(state['step'])} (-> {stop}) on {describe(mesh)}")
    step = int(state["step"])
    fresh = got is None

    def emit(row):
        writer.write(row)
        if on_log is not None:
            on_log(row)

    train_step, eval_fn = make_train_step(cfg, tx, None, lr_fn, mesh=mesh), make_eval_step(cfg, mesh=mesh)
    seen_stages = set()
    last_loss = eval_loss = None
    bar = None
    stop_signals = StopSignals()
    if progress and step < stop:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=step, unit="step", dynamic_ncols=True)
    window_t, window_tokens, acc, fetched = time.perf_counter(), 0, [], []

    def drain():
        """Fetch the queued step metrics and account for them (skips, spikes, the loss window)."""
        nonlocal acc
        if acc:
            rows = [{**m, "step_index": i} for i, m in jax.device_get(acc)]
            acc = []
            fetched.append((rows, faults.take(rows, log)))

    def log_row(stage):
        nonlocal window_t, window_tokens, last_loss
        drain()
        rows = [r for rs, _ in fetched for r in rs]
        bad = sum(b for _, b in fetched)
        fetched.clear()
        if not rows:
            return
        now = time.perf_counter()
        row = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]
               if k not in ("skipped", "nonfinite", "spike", "lr", "stage", "step_index")}
        row.update(step=step, stage=stage, lr=float(rows[-1].get("lr", float("nan"))), skipped=bad,
                   spikes=int(sum(int(r["spike"]) for r in rows)),
                   tokens_per_s=window_tokens / max(now - window_t, 1e-9))
        window_t, window_tokens = now, 0
        emit(row)
        last_loss = row["loss"]
        nonfinite = sum(int(r["nonfinite"]) for r in rows)
        if nonfinite:
            log(f"v4jax-train: WARNING {nonfinite} step(s) up to {step} had a non-finite loss or gradient "
                f"and were not applied ({faults.skipped} skipped in total)")
        if bar is not None:
            bar.set_postfix(loss=f"{row['lm_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", stage=stage)
        else:
            log(f"v4jax-train: step {step}: loss {row['loss']:.4f} (lm {row['lm_loss']:.4f}), "
                f"{row['tokens_per_s']:.0f} tokens/s")

    def check_faults():
        if faults.consecutive >= faults.max_consecutive:
            raise NonFiniteError(f"{faults.consecutive} consecutive steps up to step {step} were not applied "
                                 f"(non-finite loss or gradient, or loss spikes); stopping. The last good checkpoint "
                                 f"(step {ckpt.last}) is untouched in {workdir}")

    def checkpoint(reason: str = "") -> None:
        drain()
        check_faults()
        if faults.consecutive:
            log(f"v4jax-train: WARNING not checkpointing step {step}: its last {faults.consecutive} step(s) were "
                f"not applied; the last checkpoint stays step {ckpt.last}")
            return
        if ckpt.save(state, data.get_state(), faults.state()):
            if reason:
                ckpt.commit()
            how = "written" if reason or not cfg.async_checkpointing else "queued"
            log(f"v4jax-train: checkpoint step {step} {how}{reason}")

    try:
        with stop_signals:
            if fresh and stop > 0:   # the starting point (about ln(vocab) for a fresh model)
                res = evaluate(cfg, state["params"], state["buffers"], cfg.stage(0), eval_fn,
                               max_batches=cfg.eval_batches, mesh=mesh)
                emit({"step": 0, "eval": True, "split": "validation", **res})
                log(f"v4jax-train: step 0: validation loss {res['loss']:.4f} (ppl {res['perplexity']:.2f})")
            while step < stop:
                if stop_signals.requested(step):
                    break
                stage = cfg.stage(step)
                if stage not in seen_stages:
                    seen_stages.add(stage)
                    log(f"v4jax-train: step {step}: stage {stage!r}")
                batch = put_batch(next(data), mesh, cfg.batch_size)
                state, metrics = train_step(state, batch, faults.limit_arr)
                acc.append((step, metrics))
                step += 1
                window_tokens += cfg.batch_size * cfg.seq_len
                if step % cfg.log_every == 0 or step == stop:
                    log_row(stage)
                    check_faults()
                    if step % cfg.log_every == 0:
                        faults.update_limit()
                if bar is not None:
                    bar.update(1)
                if step % cfg.eval_every == 0 or step == stop:
                    res = evaluate(cfg, state["params"], state["buffers"], cfg.stage(step - 1), eval_fn,
                                   max_batches=cfg.eval_batches, mesh=mesh)
                    eval_loss = res["loss"]
                    emit({"step": step, "eval": True, "split": "validation", **res})
                    log(f"v4jax-train: step {step}: validation loss {res['loss']:.4f} (ppl {res['perplexity']:.2f})")
                if step % cfg.checkpoint_every == 0 or step == stop:
                    checkpoint()
            if stop_signals.reason is not None:
                log(f"v4jax-train: {stop_signals.reason} received: stopping after step {step}")
                log_row(cfg.stage(max(step - 1, 0)))
                checkpoint(f" (stopped by {stop_signals.reason})")
                if len(stop_signals.received) > 1:
                    log(f"v4jax-train: {len(stop_signals.received) - 1} further signal(s) ignored while saving")
            ckpt.commit()          # still under the handlers: a signal now cannot cut the last save short
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        writer.close()
    if stop_signals.reason is not None:
        log(f"v4jax-train: stopped at step {step} by {stop_signals.reason}; resume with the same command")
    else:
        log(f"v4jax-train: done at step {step}; checkpoints and metrics in {workdir}")
    return RunResult(step, last_loss, eval_loss, faults.skipped, workdir, stop_signals.reason, faults.spikes)
