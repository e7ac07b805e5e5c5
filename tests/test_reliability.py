"""Reliability of whole runs (issue #13): preemption by SIGTERM / SIGINT, SIGKILL during a checkpoint
write, damaged checkpoint files, non-finite steps and loss spikes, and bad input at the command
line, each against an uninterrupted reference run (bit-identical on CPU) or the files on disk.

Real ``v4jax-train`` subprocesses where the process boundary matters (signals, SIGKILL); the
library's ``train`` / ``resume`` in-process elsewhere. All runs share one tiny config and the
session's persistent compilation cache (``conftest.py``), so a run costs seconds, not a compile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from v4jax.train.checkpoints import (CheckpointMismatchError, NonFiniteError, committed_steps, resume, verify_step,
                                     write_checksums)
from v4jax.train.config import train_preset
from v4jax.train.metrics import read_metrics

# Two layers carry every kind of state a checkpoint holds (CSA: hash routing, indexer and
# compressors; HCA: learned routing with its bias buffer; Muon and AdamW moments); no MTP block, and
# the dense attention oracle, which compiles fastest. Resume itself is tree-generic.
RUN_SETTINGS = ["model.dim=32", "model.n_layers=2", 'model.layer_types=["csa","hca"]', "model.n_hash_layers=1",
                "model.n_mtp_layers=0", "model.hca_ratio=8", "model.n_heads=2", "model.head_dim=16",
                "model.rope_head_dim=8", "model.q_lora_rank=16", "model.o_lora_rank=8", "model.window_size=8",
                "model.index_n_heads=2", "model.index_head_dim=16", "model.index_topk=3",
                "model.n_routed_experts=4", "model.moe_inter_dim=16", "model.vocab_size=260",
                "runtime.attention=reference", "tokenizer=byte", "seq_len=32", "batch_size=2", "total_steps=8",
                "optim.total_steps=8", "optim.decay_start=6", "optim.warmup_steps=2", "dense_attention_steps=0",
                "indexer_warmup_steps=0", "log_every=1", "eval_every=100", "eval_batches=2", "checkpoint_every=3",
                "async_checkpointing=false"]
QUIET = dict(progress=False, log=lambda *a, **k: None)


def _cfg(*extra):
    return train_preset("tiny", RUN_SETTINGS + list(extra))


def _script(name):
    """The installed console script (the README's ``pip install -e .`` puts it beside python)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.exists(path), f"{name} is not installed next to {sys.executable}"
    return path


def _launch(workdir, steps, *extra):
    cmd = [_script("v4jax-train"), "--config", "tiny", "--workdir", str(workdir), "--steps", str(steps),
           "--no-progress"] + [f"--set={s}" for s in RUN_SETTINGS + list(extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _until(proc, marker, timeout=600):
    """Read the process's output until a line contains ``marker``; -> the lines read."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
        assert time.time() < deadline, "".join(lines)
    raise AssertionError(f"{marker!r} never printed:\n{''.join(lines)}")


def _train_rows(workdir):
    return [(r["step"], r["loss"], r["lm_loss"], r["grad_norm"]) for r in read_metrics(str(workdir)) if not r.get("eval")]


def _eval_rows(workdir):
    return [r for r in read_metrics(str(workdir)) if r.get("eval")]


def _snapshot(path):
    """Every file under ``path`` with its size and mtime (None: the path does not exist)."""
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 8-step run, as a subprocess: its workdir (metrics, checkpoints 3, 6, 8)."""
    ref = tmp_path_factory.mktemp("reliability") / "ref"
    rc, out = _finish(_launch(ref, 8))
    assert rc == 0, out
    assert [s for s, *_ in _train_rows(ref)] == list(range(1, 9))
    return ref


def _same_run(workdir, reference):
    assert _train_rows(workdir) == _train_rows(reference)            # bit-identical on CPU
    assert _eval_rows(workdir) == _eval_rows(reference)


# -- 1. preemption ----------------------------------------------------------------------------------

def test_sigterm_twice_finishes_the_step_checkpoints_exits_0_and_resumes_exactly(tmp_path, reference):
    """SIGTERM (a preemption notice), then a second one while it saves: the run ends with status
    0 and a complete, verified checkpoint of the step it reached; resuming gives the reference."""
    run = tmp_path / "run"
    victim = _launch(run, 40)
    lines = _until(victim, "v4jax-train: step 4: loss")
    victim.send_signal(signal.SIGTERM)
    lines += _until(victim, "SIGTERM received: stopping after step")
    victim.send_signal(signal.SIGTERM)        # while it writes the final checkpoint
    rc, out = _finish(victim)
    out = "".join(lines) + out
    assert rc == 0, out
    assert "SIGTERM received: stopping after step" in out and "further signal(s) ignored" in out, out
    res = json.loads(out.strip().splitlines()[-1])
    stopped = res["step"]
    assert res["stopped_by"] == "SIGTERM" and 4 <= stopped < 40, res
    assert f"checkpoint step {stopped} written (stopped by SIGTERM)" in out
    assert committed_steps(str(run))[-1] == stopped
    assert verify_step(str(run / str(stopped))) == ("ok", "")
    assert not any(".orbax-checkpoint-tmp" in d for d in os.listdir(run))
    rc, out = _finish(_launch(run, 8))
    assert rc == 0, out
    assert f"resumed {run} at step {stopped}" in out, out
    _same_run(run, reference)


def test_sigint_in_process_returns_with_a_checkpoint_and_resumes_exactly(tmp_path, reference):
    """Ctrl-C / a notebook's interrupt, delivered to this process from inside the loop (the
    metrics hook after step 3): ``train`` returns ``stopped_by="SIGINT"`` instead of raising
    KeyboardInterrupt, leaves step 3 (not 6) as the newest checkpoint and resumes to the reference."""
    cfg, run = _cfg("checkpoint_every=6"), tmp_path / "run"

    def interrupt(row):
        if row.get("step") == 3 and not row.get("eval"):
            os.kill(os.getpid(), signal.SIGINT)

    from v4jax.train.loop import train

    before = signal.getsignal(signal.SIGINT)     # default_int_handler, or SIG_IGN when started in the background
    res = train(cfg, str(run), stop_step=40, on_log=interrupt, **QUIET)
    assert res.stopped_by == "SIGINT" and res.step in (3, 4), res
    assert committed_steps(str(run)) == [res.step]
    assert signal.getsignal(signal.SIGINT) is before                          # handlers restored
    assert train(cfg, str(run), stop_step=8, **QUIET).step == 8
    assert _train_rows(run) == _train_rows(reference)


# -- 2. crash safety ------------------------------------------------------------------------------

def test_sigkill_while_saving_then_restart_resumes_from_a_complete_checkpoint(tmp_path, reference):
    """Asynchronous saves every step; SIGKILL the moment a save is queued (while orbax writes it).
    The restart never fails: it moves any unfinished write aside, resumes from the newest complete
    step, and the run equals the reference; v4jax-eval reproduces the logged validation loss."""
    run = tmp_path / "run"
    victim = _launch(run, 40, "checkpoint_every=1", "async_checkpointing=true")
    lines = _until(victim, "checkpoint step 4 queued")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "".join(lines)
    rc, out = _finish(_launch(run, 8, "checkpoint_every=1", "async_checkpointing=true"))
    assert rc == 0, out
    assert "resumed" in out and ("at step 3" in out or "at step 4" in out), out
    tmp_dirs = [d for d in os.listdir(run / "corrupt")] if (run / "corrupt").exists() else []
    assert all(".orbax-checkpoint-tmp" in d for d in tmp_dirs if not d.endswith(".reason.txt")), tmp_dirs
    _same_run(run, reference)
    ev = subprocess.run([_script("v4jax-eval"), "--workdir", str(run), "--batches", "2"], capture_output=True,
                        text=True)
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout.strip().splitlines()[-1])
    assert got["step"] == 8 and got["loss"] == pytest.approx(_eval_rows(reference)[-1]["loss"], abs=1e-6)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """An in-process run with checkpoints at steps 2, 4 and 6, and the restored state of each."""
    from v4jax.train.loop import abstract_params, train
    from v4jax.train.optimizer import make_optimizer

    cfg = _cfg("checkpoint_every=2", "async_checkpointing=true")
    run = tmp_path_factory.mktemp("three") / "run"
    train(cfg, str(run), stop_step=6, **QUIET)
    assert committed_steps(str(run)) == [2, 4, 6]
    tx = make_optimizer(cfg.optim, abstract_params(cfg))
    return cfg, tx, run


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state["params"], state["buffers"], state["opt_state"]))]


def _data_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if "/d/" in os.path.join(r, f)]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    p = _data_file(step_dir)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    return os.path.relpath(p, step_dir)


def _bitflip(step_dir):
    p = _data_file(step_dir)
    b = bytearray(open(p, "rb").read())
    b[len(b) // 2] ^= 0x10
    open(p, "wb").write(bytes(b))
    return os.path.relpath(p, step_dir)


def _remove(step_dir):
    p = os.path.join(step_dir, "train_state", "_METADATA")
    os.remove(p)
    return os.path.relpath(p, step_dir)


@pytest.mark.parametrize("damage", [_truncate, _bitflip, _remove])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(three_steps, tmp_path, damage):
    """A truncated, bit-flipped (orbax alone restores that silently, with wrong values) or missing
    file of step 6: the restart warns naming step 6 and the file, moves step 6 to corrupt/ with a
    reason, and restores step 4 exactly; steps 2 and 4 are untouched."""
    cfg, tx, run = three_steps
    want = resume(str(run), cfg, tx, log=lambda *a: None)  # read-only here: nothing is damaged yet
    assert int(want[0]["step"]) == 6
    work = tmp_path / "run"
    shutil.copytree(run, work)
    before4 = _snapshot(work / "4")
    rel = damage(str(work / "6"))
    assert verify_step(str(work / "6"))[0] == "damaged"
    msgs = []
    state, data_state, meta = resume(str(work), cfg, tx, log=msgs.append)
    assert int(state["step"]) == 4 and meta["step"] == 4
    ref4 = resume(str(_copy_only(run, tmp_path / "ref4", 4)), cfg, tx, log=lambda *a: None)[0]
    for a, b in zip(_leaves(state), _leaves(ref4)):
        np.testing.assert_array_equal(a, b)
    assert any("checkpoint step 6 is damaged" in m and rel in m and "trying step 4" in m for m in msgs), msgs
    assert committed_steps(str(work)) == [2, 4] and _snapshot(work / "4") == before4
    assert os.path.isdir(work / "corrupt" / "6") and "step 6" in open(work / "corrupt" / "6.reason.txt").read()


def _copy_only(run, dest, step):
    """A workdir holding only ``step`` of ``run``."""
    os.makedirs(dest, exist_ok=True)
    shutil.copytree(run / str(step), dest / str(step))
    return dest


def test_unfinished_write_unverified_step_and_all_damaged(three_steps, tmp_path):
    """An unfinished write (a SIGKILL mid-save leaves ``<step>.orbax-checkpoint-tmp-*``) is moved
    aside with a warning; a step without a checksum file restores with a warning, unless it does
    not restore, then it is moved aside too; when every step is damaged the run starts afresh
    (nothing deleted)."""
    cfg, tx, run = three_steps
    work = tmp_path / "a"
    shutil.copytree(run, work)
    partial = work / "8.orbax-checkpoint-tmp-1234"
    shutil.copytree(work / "6", partial)
    os.remove(partial / "commit_success.txt")
    os.remove(work / "6" / "v4jax_checksums.json")
    msgs = []
    state, _, _ = resume(str(work), cfg, tx, log=msgs.append)
    assert int(state["step"]) == 6
    assert any("unfinished checkpoint write of step 8" in m for m in msgs), msgs
    assert any("step 6 has no checksum file" in m for m in msgs), msgs
    assert os.path.isdir(work / "corrupt" / "8.orbax-checkpoint-tmp-1234")

    # unverified and truncated: orbax's own read fails -> aside, step 4 restored
    _truncate(str(work / "6"))
    msgs = []
    state, _, _ = resume(str(work), cfg, tx, log=msgs.append)
    assert int(state["step"]) == 4
    assert any("checkpoint step 6 is damaged: it does not restore" in m for m in msgs), msgs

    # everything damaged: None (a fresh start), every step kept under corrupt/
    for s in (2, 4):
        _bitflip(str(work / str(s)))
    msgs = []
    assert resume(str(work), cfg, tx, log=msgs.append) is None
    assert committed_steps(str(work)) == []
    assert sorted(d for d in os.listdir(work / "corrupt") if not d.endswith(".txt")) == [
        "2", "4", "6", "8.orbax-checkpoint-tmp-1234"]
    assert any("no older checkpoint: starting from step 0" in m for m in msgs), msgs


def test_checkpoint_of_another_config_or_layout_is_refused_and_nothing_moves(three_steps, tmp_path):
    cfg, tx, run = three_steps
    work = tmp_path / "w"
    shutil.copytree(run, work)
    # a tmp dir too: a refused resume must not move even that
    shutil.copytree(work / "6", work / "9.orbax-checkpoint-tmp-1")
    before = _snapshot(work)
    from v4jax.train.loop import train

    other = _cfg("model.dim=48", "checkpoint_every=2")
    with pytest.raises(CheckpointMismatchError, match=r"another model config: dim=32 \(this run: 48\)"):
        train(other, str(work), stop_step=8, **QUIET)
    assert _snapshot(work) == before

    # a newer checkpoint format
    meta = work / "6" / "meta" / "metadata"
    m = json.loads(meta.read_text())
    m["format"] = 99
    meta.write_text(json.dumps(m))
    write_checksums(str(work / "6"))
    before = _snapshot(work)
    with pytest.raises(CheckpointMismatchError, match="format 99, written by a newer v4jax"):
        resume(str(work), cfg, tx, log=lambda *a: None)
    assert _snapshot(work) == before

    # another parameter layout (a leaf renamed, checksums valid: not damage)
    md = work / "4" / "state" / "_METADATA"
    md.write_text(md.read_text().replace('"key": "head"', '"key": "lm_head"'))
    write_checksums(str(work / "4"))
    shutil.rmtree(work / "6")
    before = _snapshot(work)
    with pytest.raises(CheckpointMismatchError, match=r"another parameter layout in 'state'.*params/head"):
        resume(str(work), cfg, tx, log=lambda *a: None)
    assert _snapshot(work) == before


# -- 3. numerical faults ------------------------------------------------------------------------------

def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, reference):
    """From step 4 on every step is non-finite (a NaN planted in the embedding before the step):
    no step is applied, no checkpoint is written after step 3, and after 3 such steps in a row
    the run stops with NonFiniteError naming step 3, whose files verify and whose values are the
    reference run's step 3."""
    import jax.numpy as jnp

    from v4jax.train import loop

    real = loop.make_train_step

    def poisoned(*a, **k):
        step_fn = real(*a, **k)

        def run(state, batch, limit=None):
            if int(state["step"]) >= 3:
                emb = state["params"]["embed"]["embedding"]
                state["params"]["embed"]["embedding"] = emb.at[:, 0].set(jnp.nan)
            return step_fn(state, batch, limit)

        return run

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    cfg, run = _cfg("max_consecutive_skips=3", "checkpoint_every=1"), tmp_path / "run"
    msgs = []
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps up to step 6 .*last good checkpoint \(step 3\)"):
        loop.train(cfg, str(run), stop_step=8, progress=False, log=msgs.append)
    assert committed_steps(str(run)) == [1, 2, 3]
    assert verify_step(str(run / "3")) == ("ok", "")
    assert any("not checkpointing step 4" in m for m in msgs), msgs
    rows = [r for r in read_metrics(str(run)) if not r.get("eval")]
    assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert _train_rows(run)[:3] == _train_rows(reference)[:3]
    from v4jax.checkpoint import load_workdir

    got, want = load_workdir(str(run)), load_workdir(str(_copy_only(reference, tmp_path / "r3", 3)))
    for a, b in zip(jax.tree.leaves(got.variables), jax.tree.leaves(want.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loss_spike_limit_is_the_factor_times_the_running_median():
    """The host side: the limit follows the median of the applied LM losses (skipped spikes and
    non-finite steps never enter the window), is recomputed only when asked (at log steps), and
    round-trips through the checkpoint's meta."""
    from v4jax.train.loop import _Faults

    cfg = _cfg("spike_factor=2.0", "spike_window=8", "spike_action=skip")
    f = _Faults(cfg, None, 20)
    row = lambda i, lm, spike=0, skipped=0, nonfinite=0: {"step_index": i, "lm_loss": lm, "spike": spike,
                                                            "skipped": skipped, "nonfinite": nonfinite}
    f.update_limit()
    assert f.limit == float("inf")
    f.take([row(i, 4.0 + 0.1 * i) for i in range(7)], print)
    f.update_limit()
    assert f.limit == float("inf")                                   # 7 < max(8, 8 // 4) losses
    f.take([row(7, 4.7)], print)
    f.update_limit()
    assert f.limit == pytest.approx(2.0 * np.median([4.0 + 0.1 * i for i in range(8)]))
    msgs = []
    bad = f.take([row(8, 50.0, spike=1, skipped=1), row(9, float("nan"), skipped=1, nonfinite=1), row(10, 4.0)],
                 msgs.append)
    assert bad == 2 and f.spikes == 1 and f.consecutive == 0 and f.skipped == 2
    assert list(f.window)[-1] == 4.0 and 50.0 not in f.window and len(f.window) == 8
    assert any("loss spike at step 9" in m and "skipped" in m for m in msgs), msgs
    g = _Faults(cfg, f.state(), 20)
    assert list(g.window) == list(f.window) and g.limit == f.limit


@pytest.mark.parametrize("action", ["skip", "report"])
def test_spike_step_is_skipped_or_reported(action):
    """The device side: a step whose LM loss exceeds the limit is flagged; ``skip`` applies
    nothing (as a non-finite step), ``report`` applies it."""
    from v4jax.train.loop import abstract_params
    from v4jax.train.optimizer import lr_schedule, make_optimizer
    from v4jax.train.step import init_state, make_train_step

    import jax.numpy as jnp

    cfg = _cfg(f"spike_action={action}")
    tx = make_optimizer(cfg.optim, abstract_params(cfg))
    state = init_state(cfg, tx)
    before = [np.asarray(x) for x in jax.tree.leaves(state["opt_state"])]   # step 0 has LR 0: the moments move
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(1, 259, (2, 33)), jnp.int32),
             "segment_ids": jnp.ones((2, 33), jnp.int32)}
    step = make_train_step(cfg, tx, None, lr_schedule(cfg.optim))
    new, m = step(state, batch, jnp.float32(1.0))            # the LM loss of a fresh model is ~ln(260)
    assert int(m["spike"]) == 1 and int(m["nonfinite"]) == 0
    assert int(m["skipped"]) == (action == "skip")
    changed = any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(new["opt_state"])))
    assert changed == (action == "report")
    new2, m2 = step(new, batch, jnp.float32(1e9))
    assert int(m2["spike"]) == 0 and int(m2["skipped"]) == 0


# -- 4. bad input at the command line -----------------------------------------------------------------

def _cli(argv, capsys):
    from v4jax.train.cli import train_main

    try:
        rc = train_main(argv)
    except SystemExit as e:        # argparse
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [
    (["--set", "nope=1"], ["nope", "no field"]),
    (["--set", "model.nope=1"], ["model.nope", "no field"]),
    (["--set", "nope.dim=1"], ["nope.dim", "unknown section"]),
    (["--set", "batch_size=abc"], ["batch_size", "'abc'"]),
    (["--set", "batch_size=2.5"], ["batch_size", "2.5"]),
    (["--set", "async_checkpointing=yes"], ["async_checkpointing", "'yes'"]),
    (["--set", "mtp_weight=heavy"], ["mtp_weight", "'heavy'"]),
    (["--set", "spike_action=ignore"], ["spike_action", "'ignore'"]),
    (["--set", "model.dim=-4"], ["dim", "-4"]),
    (["--set", "model.n_heads=3"], ["n_heads"]),
    (["--set", "seq_len=5000"], ["seq_len", "max_seq_len"]),
    (["--set", "optim.warmup_steps=5000"], ["warmup_steps", "decay_start"]),
    (["--set", "runtime.attention=fast"], ["attention", "'fast'"]),
    (["--set", "batch_size"], ["key=value", "'batch_size'"]),
    (["--mesh", "data=3"], ["mesh", "3"]),
    (["--mesh", "data=2,warp=4"], ["warp"]),
    (["--config", "huge"], ["huge", "unknown run config"]),
    (["--steps", "-1"], ["--steps"]),
    (["--tokenizer", "/nonexistent/tok.json"], ["/nonexistent/tok.json"]),
    (["--steps", "abc"], ["--steps", "'abc'"]),
    (["--bogus-flag"], ["--bogus-flag"]),
])
def test_bad_command_line_gives_one_clear_error_and_writes_nothing(argv, names, tmp_path, capsys):
    work = tmp_path / "work"
    rc, err = _cli(["--workdir", str(work), "--no-progress"] + argv, capsys)
    assert rc == 2, err
    for n in names:
        assert n in err, (n, err)
    assert "Traceback" not in err
    assert not work.exists()


def test_bad_data_and_resumed_runs_change_nothing(tmp_path, capsys, three_steps):
    # empty directory, a single document (nothing to hold out), documents too few for one batch
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("just one document " * 20)
    (tmp_path / "few").mkdir()
    for i in range(3):
        (tmp_path / "few" / f"{i}.txt").write_text(f"doc {i}")
    data_dir = tmp_path / "cache"
    for d, names in ((tmp_path / "empty", ["empty", "holds no"]), (tmp_path / "one", ["1 document", "held-out split"])):
        work = tmp_path / f"work-{d.name}"
        rc, err = _cli(["--workdir", str(work), "--no-progress", "--data", str(d), "--data-dir", str(data_dir)]
                       + [f"--set={s}" for s in RUN_SETTINGS], capsys)
        assert rc == 2 and all(n in err for n in names), (d, err)
        assert not work.exists()
    # too few rows for one batch: allowed (an overfitting check), with a warning (--steps 0: no training)
    from v4jax.train.cli import train_main

    rc = train_main(["--workdir", str(tmp_path / "work-few"), "--no-progress", "--data", str(tmp_path / "few"),
                     "--data-dir", str(data_dir), "--steps", "0"] + [f"--set={s}" for s in RUN_SETTINGS])
    out = capsys.readouterr().out
    assert rc == 0 and "fills 1 row(s) of 33 tokens, fewer than one batch (2)" in out, out

    # a resumed run: model changes and other data refused; a damaged train_config.json named
    _, _, run = three_steps
    work = tmp_path / "resumed"
    shutil.copytree(run, work)
    before = _snapshot(work)
    for argv, names in ((["--set", "model.dim=64"], ["model.*", "resumed"]),
                        (["--data", str(tmp_path / "few")], ["data", "resumed"]),
                        (["--set", "eval_every=abc"], ["eval_every", "'abc'"])):
        rc, err = _cli(["--workdir", str(work), "--no-progress"] + argv, capsys)
        assert rc == 2 and all(n in err for n in names), (argv, err)
        assert _snapshot(work) == before
    (work / "train_config.json").write_text('{"model": {"dim": 32')
    before = _snapshot(work)
    rc, err = _cli(["--workdir", str(work), "--no-progress"], capsys)
    assert rc == 2 and "train_config.json" in err and "not valid JSON" in err, err
    assert _snapshot(work) == before
