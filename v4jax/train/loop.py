"""The training loop: data -> jitted ``train_step`` -> metrics, periodic evaluation and orbax
checkpoints, exact resume.

Workdir layout (an orbax ``CheckpointManager`` root, so ``v4jax-generate WORKDIR`` and
``v4jax.checkpoint.load_workdir`` read it too):

- ``<step>/state``        model variables ``{"params", "buffers"}`` (StandardSave)
- ``<step>/config``       the model config (HF-style dict)
- ``<step>/train_state``  optimizer state, step counter, RNG key (StandardSave)
- ``<step>/meta``         data-iterator position and the run config (JSON)
- ``train_config.json``, ``metrics.jsonl``, ``tensorboard/``, ``loss.png``

A checkpoint is written only when every parameter, optimizer and buffer value is finite.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from v4jax.sharding import logical_specs
from v4jax.train.config import TrainConfig
from v4jax.train.metrics import MetricsWriter
from v4jax.train.optimizer import lr_schedule, make_optimizer
from v4jax.train.step import all_finite, init_state, make_eval_step, make_train_step

CONFIG_FILE = "train_config.json"


class NonFiniteError(RuntimeError):
    """Training produced non-finite values for too many consecutive steps (nothing was saved)."""


@dataclass
class RunResult:
    step: int
    last_loss: float | None
    eval_loss: float | None
    skipped_steps: int
    workdir: str


def checkpoint_manager(workdir: str, cfg: TrainConfig | None = None) -> ocp.CheckpointManager:
    keep = cfg.keep_checkpoints if cfg else None
    async_ = cfg.async_checkpointing if cfg else False
    return ocp.CheckpointManager(
        os.path.abspath(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_))


def save_checkpoint(mngr: ocp.CheckpointManager, state: dict, cfg: TrainConfig, data_state) -> int:
    """Queue an (async) save of ``state`` at its step; refuses non-finite values."""
    step = int(state["step"])
    if not all_finite((state["params"], state["buffers"], state["opt_state"])):
        raise NonFiniteError(f"refusing to checkpoint step {step}: the state holds non-finite values")
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": state["params"], "buffers": state["buffers"]}),
        config=ocp.args.JsonSave(cfg.model.to_hf_dict()),
        train_state=ocp.args.StandardSave({"opt_state": state["opt_state"], "step": state["step"],
                                           "rng": state["rng"]}),
        meta=ocp.args.JsonSave({"step": step, "data": data_state, "train_config": cfg.to_dict()})))
    return step


def _placed(abstract, shardings):
    """``ShapeDtypeStruct`` targets carrying the shardings to restore onto."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, cfg: TrainConfig, tx, mesh=None):
    """-> (state, data-iterator state) of checkpoint ``step``, restored straight onto ``mesh``'s
    shardings (any mesh: orbax reshards on read) or onto the default device."""
    from v4jax.checkpoint import CheckpointLayoutError, step_layout
    from v4jax.params import abstract_variables

    if step_layout(mngr, step) == "per_layer":
        raise CheckpointLayoutError(
            f"checkpoint step {step} in {mngr.directory} was written before the scanned layer stack (per-layer "
            f"parameters) and its optimizer state cannot be resumed by this version. Its weights still load: "
            f"v4jax.checkpoint.load_workdir(workdir) gives a V4Model; start a new run from model.variables.")
    abstract_vars = abstract_variables(cfg.model)
    abstract_opt = jax.eval_shape(tx.init, abstract_vars["params"])
    abstract_train = {"opt_state": abstract_opt, "step": jax.ShapeDtypeStruct((), jnp.int32),
                      "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract_vars = _placed(abstract_vars, jax.tree.map(lambda _: one, abstract_vars))
        abstract_train = _placed(abstract_train, jax.tree.map(lambda _: one, abstract_train))
    else:
        from v4jax.train.step import state_shardings

        sh = state_shardings(cfg, tx, mesh)
        abstract_vars = _placed(abstract_vars, {k: sh[k] for k in abstract_vars})
        abstract_train = _placed(abstract_train, {k: sh[k] for k in abstract_train})
    got = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_vars), train_state=ocp.args.StandardRestore(abstract_train),
        meta=ocp.args.JsonRestore()))
    variables, train = got["state"], got["train_state"]
    state = {"step": jnp.asarray(train["step"], jnp.int32), "params": variables["params"],
             "buffers": variables.get("buffers", {}), "opt_state": train["opt_state"], "rng": train["rng"]}
    return state, got["meta"]["data"]


def _save_tokenizer(cfg: TrainConfig, workdir: str) -> None:
    """``tokenizer.json`` beside the checkpoints (``v4jax-generate WORKDIR --prompt ...`` reads it)."""
    tok = run_tokenizer(cfg)
    if hasattr(tok, "save"):
        tok.save(os.path.join(workdir, "tokenizer.json"))


def abstract_params(cfg: TrainConfig):
    from v4jax.params import abstract_variables

    return abstract_variables(cfg.model)["params"]


def make_data(cfg: TrainConfig, split: str, mesh=None, progress: bool = False):
    """The endless shuffled training iterator, or one fixed-order pass over ``split``, of the shipped
    corpus or the run's own data (``cfg.data`` / ``cfg.tfds``, prepared once into shards). With several
    processes each reads only the rows of the global batch its devices hold (the global batches,
    and so the losses, are the same for any number of processes)."""
    from v4jax.data.pipeline import make_dataset, make_eval_dataset

    tok = run_tokenizer(cfg)
    rows = None
    if mesh is not None and jax.process_count() > 1:
        from v4jax.parallel.mesh import process_rows

        rows = process_rows(mesh, cfg.batch_size)
    kw = dict(data_dir=cfg.data_dir, tokenizer=tok, rows=rows, source=cfg.user_data(), progress=progress)
    if split == "train":
        return make_dataset("train", cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=True, **kw)
    return make_eval_dataset(split, cfg.seq_len, cfg.batch_size, **kw)


def run_tokenizer(cfg: TrainConfig):
    """The run's tokenizer, its vocabulary checked against the model's."""
    from v4jax.config import ConfigError
    from v4jax.data.tokenizer import get_tokenizer

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
    from v4jax.parallel.mesh import put_batch
    from v4jax.train.config import STAGES

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


def train(cfg: TrainConfig, workdir: str, stop_step: int | None = None, progress: bool = True,
          log=print, max_consecutive_skips: int = 20) -> RunResult:
    """Train until global step ``stop_step`` (default ``cfg.total_steps``), resuming from the
    latest checkpoint in ``workdir`` when there is one."""
    from v4jax.parallel.mesh import batch_sharding, describe, make_mesh, put_batch

    mesh = make_mesh(cfg.mesh) if cfg.mesh else None
    if mesh is not None:
        batch_sharding(mesh, cfg.batch_size)          # batch_size must split evenly: fail before any work
    primary = jax.process_index() == 0          # several processes: process 0 logs and writes the files
    if not primary:
        log, progress = (lambda *a, **k: None), False
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    stop = cfg.total_steps if stop_step is None else stop_step
    tx = make_optimizer(cfg.optim, abstract_params(cfg), logical_specs(cfg.model))
    lr_fn = lr_schedule(cfg.optim)
    mngr = checkpoint_manager(workdir, cfg)
    data = make_data(cfg, "train", mesh, progress=progress)
    if data.stats:
        held = make_data(cfg, "validation", mesh).stats
        for name, st in (("train", data.stats), ("validation", held)):
            log(f"v4jax-train: {name} data: {st['docs']} documents, {st['tokens']} tokens, "
                f"{st['bytes_per_token']} bytes/token, {st['rows']} rows of {cfg.seq_len + 1}")
    writer = MetricsWriter(workdir)
    latest = mngr.latest_step()
    if latest is None:
        if primary:
            cfg.to_json(os.path.join(workdir, CONFIG_FILE))
            _save_tokenizer(cfg, workdir)
        state = init_state(cfg, tx, mesh=mesh)
        writer.truncate_after(0)
        log(f"v4jax-train: new run {cfg.name!r} in {workdir} (steps {0} -> {stop}) on {describe(mesh)}")
    else:
        state, data_state = restore_checkpoint(mngr, latest, cfg, tx, mesh)
        data.set_state(data_state)
        writer.truncate_after(latest)
        log(f"v4jax-train: resumed {workdir} at step {latest} (-> {stop}) on {describe(mesh)}")
    step = int(state["step"])
    train_step, eval_fn = make_train_step(cfg, tx, None, lr_fn, mesh=mesh), make_eval_step(cfg, mesh=mesh)
    seen_stages = set()
    skipped = consecutive = 0
    last_loss = eval_loss = None
    bar = None
    if progress and step < stop:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=step, unit="step", dynamic_ncols=True)
    if latest is None and stop > 0:   # the starting point (about ln(vocab) for a fresh model)
        res = evaluate(cfg, state["params"], state["buffers"], cfg.stage(0), eval_fn, max_batches=cfg.eval_batches,
                       mesh=mesh)
        writer.write({"step": 0, "eval": True, "split": "validation", **res})
        log(f"v4jax-train: step 0: validation loss {res['loss']:.4f} (ppl {res['perplexity']:.2f})")
    window_t, window_tokens, acc = time.perf_counter(), 0, []
    try:
        while step < stop:
            stage = cfg.stage(step)
            if stage not in seen_stages:
                seen_stages.add(stage)
                log(f"v4jax-train: step {step}: stage {stage!r}")
            batch = put_batch(next(data), mesh, cfg.batch_size)
            state, metrics = train_step(state, batch)
            step += 1
            acc.append(metrics)
            window_tokens += cfg.batch_size * cfg.seq_len
            if step % cfg.log_every == 0 or step == stop:
                rows = jax.device_get(acc)
                acc = []
                now = time.perf_counter()
                row = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]
                       if k not in ("skipped", "lr", "stage")}
                bad = 0
                for r in rows:   # the trailing run of skipped steps decides the stop
                    consecutive = consecutive + 1 if int(r["skipped"]) else 0
                    bad += int(r["skipped"])
                skipped += bad
                row.update(step=step, stage=stage, lr=float(rows[-1].get("lr", float("nan"))),
                           skipped=bad, tokens_per_s=window_tokens / max(now - window_t, 1e-9))
                window_t, window_tokens = now, 0
                writer.write(row)
                last_loss = row["loss"]
                if bad:
                    log(f"v4jax-train: WARNING {bad} step(s) up to {step} had a non-finite loss or gradient "
                        f"and were not applied ({skipped} in total)")
                if consecutive >= max_consecutive_skips:
                    raise NonFiniteError(f"{consecutive} consecutive non-finite steps up to step {step}; "
                                         f"stopping (last good checkpoint: {mngr.latest_step()})")
                if bar is not None:
                    bar.set_postfix(loss=f"{row['lm_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", stage=stage)
            if bar is not None:
                bar.update(1)
            if step % cfg.eval_every == 0 or step == stop:
                res = evaluate(cfg, state["params"], state["buffers"], cfg.stage(step - 1), eval_fn,
                               max_batches=cfg.eval_batches, mesh=mesh)
                eval_loss = res["loss"]
                writer.write({"step": step, "eval": True, "split": "validation", **res})
                log(f"v4jax-train: step {step}: validation loss {res['loss']:.4f} (ppl {res['perplexity']:.2f})")
            if step % cfg.checkpoint_every == 0 or step == stop:
                save_checkpoint(mngr, state, cfg, data.get_state())
                log(f"v4jax-train: checkpoint step {step} {'queued' if cfg.async_checkpointing else 'written'}")
    finally:
        if bar is not None:
            bar.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
    log(f"v4jax-train: done at step {step}; checkpoints and metrics in {workdir}")
    return RunResult(step, last_loss, eval_loss, skipped, workdir)
